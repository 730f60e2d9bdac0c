"""Peak host RSS of one ``Embedder.encode`` over N image rows (run in a fresh process).

Usage: python tests/rss_encode.py MODEL_DIR IMAGE_DIR N  -> prints JSON {"rows", "peak_rss_mib", "seconds"}.
Small images (112 x 112: 64 patches per row) repeated from a few files keep it fast; before the
streaming pipeline each row's patches stayed in memory until the end of the call.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from g2e_jax import Embedder


def main():
    model_dir, image_dir, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    files = sorted(str(p) for p in image_dir.glob("*.png"))
    emb = Embedder.from_pretrained(model_dir, dtype="float32", batch_size=8, max_len=256, progress=False)
    emb.encode(["warm-up"] * 8, [files[0]] * 8, role="query", progress=False)  # compile before measuring
    started = time.perf_counter()
    out = emb.encode([f"row {i}" for i in range(n)], [files[i % len(files)] for i in range(n)], role="query",
                     progress=False)  # fmt: skip
    assert out.shape[0] == n
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {"rows": n, "peak_rss_mib": round(peak, 1), "seconds": round(time.perf_counter() - started, 2)}
        )
    )


if __name__ == "__main__":
    main()
