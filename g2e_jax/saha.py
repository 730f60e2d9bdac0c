"""Self-aware hard negative sampling (SaHa): mutually hard clusters from zero-shot embeddings.

The algorithm is DESIGN.md §1 steps 2-7, as the reference implements it, order-dependence
included. Inputs are indices into deduplicated embeddings: ``row_query[r]`` / ``row_positive[r]``
say which unique query and which unique positive dataset row ``r`` holds.

Per subset: ``first_n = top_k * pool_mult``, ``pool = 2 * first_n`` nearest positives per query.
Phase 1 walks the rows in order; an unused anchor query maps each retrieved negative candidate
(its own positive excluded) to an owner query (a query whose positive it is) that is not used yet
— the most similar to the anchor when several — until ``first_n`` owners; except for
classification subsets the owners are then sorted by query-query similarity *ascending* (hard in
candidate space, but not near-duplicates of the anchor) and the first ``top_k`` kept. The anchor
and its kept owners become used. Phase 2 repeats over the still-unused queries with ``first_n``
doubled (same pool); owners may be queries used in phase 1 but not twice within phase 2 — unless
phase 1 produced no cluster at all, in which case phase 2 excludes used queries as phase 1 does,
as the reference does.

Faithful details: an owner query is represented by its *last* dataset row; an owner that owns
several retrieved candidates is collected once per candidate (the reference does not dedupe);
exact score ties are broken by the lower index everywhere (the reference leaves them to faiss
and to Python set order).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class Cluster:
    anchor: int  # dataset row of the anchor
    negatives: tuple[int, ...]  # dataset rows of the kept owners, in emitted order
    phase: int  # 1 or 2

    @property
    def rows(self) -> tuple[int, ...]:
        return (self.anchor, *self.negatives)


@dataclasses.dataclass
class MiningStats:
    clusters: int = 0
    phase2_clusters: int = 0
    size_histogram: dict[int, int] = dataclasses.field(default_factory=dict)  # rows per cluster -> count
    owners_dropped: int = 0  # collected owners not kept (filter / truncation to top_k)
    queries: int = 0
    queries_without_owner: int = 0  # unique queries that never found an eligible owner (in no cluster)
    recall: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["size_histogram"] = {str(k): v for k, v in sorted(self.size_histogram.items())}
        return out


# --- exact nearest neighbours -----------------------------------------------------------------------------


def nearest(queries: np.ndarray, cands: np.ndarray, k: int, *, query_block: int = 1024,
            cand_block: int = 16384, devices=None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Exact top-``k`` candidates by inner product for every query: ``(scores, indices)``, both
    ``[Q, k]`` sorted by descending score, ties by lower index; ``-1`` where fewer than k exist.

    Sharded over ``devices`` (default: every device of every process): each holds one contiguous
    block of the candidates and streams over it in blocks of ``cand_block``, keeping a running
    top-k; the per-device top-k lists are gathered and merged. Memory per device is bounded by
    ``query_block * (cand_block + k)``, never a full ``[Q, C]`` matrix. Block shapes are fixed (the
    tails are padded), so it compiles once. In a multi-process job it is collective: every process
    passes the same arrays and gets the whole result.
    """
    queries = np.asarray(queries, np.float32)
    cands = np.asarray(cands, np.float32)
    n_q, n_c = queries.shape[0], cands.shape[0]
    k_eff = min(k, n_c)
    out_scores = np.full((n_q, k), -np.inf, np.float32)
    out_index = np.full((n_q, k), -1, np.int64)
    if n_q == 0 or k_eff == 0:
        return out_scores, out_index
    devices = list(jax.devices() if devices is None else devices)
    mesh = Mesh(np.array(devices), ("cands",), axis_types=(AxisType.Auto,))
    per_device = -(-n_c // len(devices))
    cand_block = min(cand_block, per_device)
    per_device = -(-per_device // cand_block) * cand_block  # whole blocks on every device
    query_block = min(query_block, n_q)
    padded = np.zeros((len(devices) * per_device, cands.shape[1]), np.float32)
    padded[:n_c] = cands
    cands_on_mesh = jax.device_put(padded, NamedSharding(mesh, P("cands")))
    search = _sharded_search(mesh, k_eff, cand_block)
    replicated = NamedSharding(mesh, P())
    for qs in range(0, n_q, query_block):
        q = np.zeros((query_block, queries.shape[1]), np.float32)
        q[: min(query_block, n_q - qs)] = queries[qs : qs + query_block]
        best, best_i = search(jax.device_put(q, replicated), cands_on_mesh, np.int32(n_c))
        rows = min(query_block, n_q - qs)
        out_scores[qs : qs + rows, :k_eff] = np.asarray(best)[:rows]
        out_index[qs : qs + rows, :k_eff] = np.asarray(best_i)[:rows]
    return out_scores, out_index


@functools.lru_cache(maxsize=16)
def _sharded_search(mesh: Mesh, k: int, cand_block: int):
    """The jitted search of one query block against every device's candidates."""

    def local(q, cands, n_c):
        start = jax.lax.axis_index("cands") * cands.shape[0]
        best = jnp.full((q.shape[0], k), -jnp.inf, jnp.float32)
        best_i = jnp.full((q.shape[0], k), -1, jnp.int32)
        blocks = cands.reshape(-1, cand_block, cands.shape[1])

        def step(carry, b):
            offset = start + b * cand_block
            return _merge_block(q, blocks[b], offset, n_c - offset, *carry), None

        (best, best_i), _ = jax.lax.scan(step, (best, best_i), jnp.arange(blocks.shape[0]))
        # Every device's list, lower candidate blocks first: top_k keeps the lower index on ties.
        all_best = jax.lax.all_gather(best, "cands", axis=1, tiled=True)
        all_index = jax.lax.all_gather(best_i, "cands", axis=1, tiled=True)
        top, where = jax.lax.top_k(all_best, k)
        return top, jnp.take_along_axis(all_index, where, axis=1)

    fn = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P("cands"), P()), out_specs=(P(), P()), check_vma=False
    )
    return jax.jit(fn)


def _merge_block(queries, cands, offset, valid, best_scores, best_index):
    """Merges one candidate block into the running top-k. Running entries come from earlier
    (lower-index) blocks and go first, and top_k prefers the lower position on ties, so exact
    ties resolve to the lower candidate index."""
    k = best_scores.shape[1]
    scores = jnp.dot(queries, cands.T, precision=jax.lax.Precision.HIGHEST)
    local = jnp.arange(cands.shape[0], dtype=jnp.int32)
    scores = jnp.where((local < valid)[None, :], scores, -jnp.inf)  # padded tail rows must never win
    index = jnp.broadcast_to((offset + local)[None, :], scores.shape)
    all_scores = jnp.concatenate([best_scores, scores], axis=1)
    all_index = jnp.concatenate([best_index, index], axis=1)
    top, where = jax.lax.top_k(all_scores, k)
    return top, jnp.take_along_axis(all_index, where, axis=1)


def recall_at(ranked: np.ndarray, row_query, row_positive, ks=(1, 5, 10)) -> dict[str, float]:
    """Share of dataset rows whose positive is within the top-k retrieved for its query."""
    row_query, row_positive = np.asarray(row_query), np.asarray(row_positive)
    hits = ranked[row_query] == row_positive[:, None]
    return {f"recall@{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks if k <= ranked.shape[1]}


# --- the mining algorithm ---------------------------------------------------------------------------------


def mine_clusters(row_query: Sequence[int], row_positive: Sequence[int], query_emb: np.ndarray,
                  cand_emb: np.ndarray, *, top_k: int, pool_mult: int, classification: bool,
                  neighbours: np.ndarray | None = None, stats: MiningStats | None = None) -> list[Cluster]:  # fmt: skip
    """Clusters of one subset, phase 1 then phase 2 (see the module docstring).

    ``neighbours`` (``[Q, 2 * top_k * pool_mult]`` candidate indices, e.g. from ``nearest``) may
    be passed to reuse a search; ``stats`` is filled in when given.
    """
    row_query = np.asarray(row_query, np.int64)
    row_positive = np.asarray(row_positive, np.int64)
    query_emb = np.asarray(query_emb, np.float32)
    if row_query.shape != row_positive.shape:
        raise ValueError(
            f"row_query and row_positive differ in length: {row_query.shape} vs {row_positive.shape}"
        )
    if top_k < 1 or pool_mult < 1:
        raise ValueError(f"top_k and pool_mult must be >= 1, got {top_k}, {pool_mult}")
    first_n = top_k * pool_mult
    pool = 2 * first_n
    if neighbours is None:
        _, neighbours = nearest(query_emb, cand_emb, pool)
    elif neighbours.shape[1] < pool:
        raise ValueError(f"neighbours has {neighbours.shape[1]} columns, mining needs {pool}")
    neighbours = neighbours[:, :pool]

    owners: dict[int, list[int]] = {}  # positive -> its owner queries, ascending
    last_row: dict[int, int] = {}  # query -> its last dataset row
    for r, (q, p) in enumerate(zip(row_query.tolist(), row_positive.tolist())):
        owners.setdefault(p, [])
        if q not in owners[p]:
            owners[p].append(q)
        last_row[q] = r
    for p in owners:
        owners[p].sort()

    used: set[int] = set()
    clusters: list[Cluster] = []
    dropped = 0
    for phase, n_owners in ((1, first_n), (2, 2 * first_n)):
        # Phase 2 lets phase-1 queries be owners again, once -- if phase 1 used any query at all.
        reuse = phase == 2 and bool(used)
        excluded: set[int] = set() if reuse else used
        for r in range(len(row_query)):
            anchor_q = int(row_query[r])
            if anchor_q in used:
                continue
            positive = int(row_positive[r])
            anchor_vec = query_emb[anchor_q]
            chosen: list[int] = []
            for cand in neighbours[anchor_q].tolist():
                if cand < 0 or cand == positive:
                    continue
                eligible = [q for q in owners.get(cand, ()) if q not in excluded]
                if not eligible:
                    continue
                if len(eligible) == 1:
                    chosen.append(eligible[0])
                else:
                    sims = query_emb[eligible] @ anchor_vec
                    chosen.append(eligible[int(np.argmax(sims))])  # first maximum: lowest query index
                if len(chosen) >= n_owners:
                    break
            if not chosen:
                continue  # no eligible owner: the query stays unused
            used.add(anchor_q)
            if not classification:
                sims = (query_emb[chosen] @ anchor_vec).tolist()
                order = sorted(range(len(chosen)), key=lambda i: sims[i])  # stable: ties keep retrieval order
                chosen = [chosen[i] for i in order]
            kept = chosen[:top_k]
            dropped += len(chosen) - len(kept)
            clusters.append(Cluster(r, tuple(last_row[q] for q in kept), phase))
            used.update(kept)
            if reuse:
                excluded.update(kept)

    if stats is not None:
        in_clusters = {int(row_query[c.anchor]) for c in clusters}
        in_clusters |= {int(row_query[n]) for c in clusters for n in c.negatives}
        stats.clusters = len(clusters)
        stats.phase2_clusters = sum(c.phase == 2 for c in clusters)
        stats.size_histogram = dict(Counter(len(c.rows) for c in clusters))
        stats.owners_dropped = dropped
        stats.queries = len(set(row_query.tolist()))
        stats.queries_without_owner = stats.queries - len(in_clusters)
        stats.recall = recall_at(neighbours, row_query, row_positive)
    return clusters
