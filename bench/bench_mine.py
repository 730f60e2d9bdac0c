"""SaHa mining at scale on CPU: exact nearest neighbours + the mining walk on random unit vectors.

    python bench/bench_mine.py --queries 100000 --candidates 100000 --dim 1536

Prints the time of each part and the process's peak resident memory, and writes a JSON file. The
reference (faiss IndexFlatIP + a per-row Python loop) is not installed here, so this is an
absolute measurement, not a ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--candidates", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--top-k", type=int, default=15)
    parser.add_argument("--pool-mult", type=int, default=3)
    parser.add_argument("--query-block", type=int, default=1024)
    parser.add_argument("--cand-block", type=int, default=16384)
    parser.add_argument("--output", default="bench_mine.json")
    args = parser.parse_args()

    from g2e_jax.saha import MiningStats, mine_clusters, nearest

    rng = np.random.default_rng(0)

    def unit_rows(n):
        out = np.empty((n, args.dim), np.float32)
        for s in range(0, n, 8192):  # in blocks: no float64 temporary of the whole matrix
            block = rng.standard_normal((min(8192, n - s), args.dim), dtype=np.float32)
            out[s : s + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
        return out

    queries, cands = unit_rows(args.queries), unit_rows(args.candidates)
    # Rows: every query once, positives drawn with repeats (several owners per candidate).
    row_positive = rng.integers(0, args.candidates, args.queries)
    pool = 2 * args.top_k * args.pool_mult
    start = time.perf_counter()
    _, neighbours = nearest(queries, cands, pool, query_block=args.query_block, cand_block=args.cand_block)
    search = time.perf_counter() - start
    start = time.perf_counter()
    stats = MiningStats()
    clusters = mine_clusters(np.arange(args.queries), row_positive, queries, cands, top_k=args.top_k,
                             pool_mult=args.pool_mult, classification=False, neighbours=neighbours, stats=stats)  # fmt: skip
    walk = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {
        "queries": args.queries, "candidates": args.candidates, "dim": args.dim, "pool": pool,
        "search_seconds": round(search, 1), "mining_seconds": round(walk, 1),
        "search_gflops": round(2 * args.queries * args.candidates * args.dim / search / 1e9, 1),
        "peak_rss_gib": round(peak_gib, 2), "input_gib": round((queries.nbytes + cands.nbytes) / 2**30, 2),
        "clusters": stats.clusters, "phase2_clusters": stats.phase2_clusters,
        "queries_without_owner": stats.queries_without_owner,
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    del clusters


if __name__ == "__main__":
    main()
