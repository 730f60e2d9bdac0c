"""`g2e-jax eval`, `mine` and `embed` (fresh and --resume) in one process of a (possibly) multi-process job.

Usage: python tests/multiprocess_jobs.py OUT MODEL_DIR DATA_DIR [COORDINATOR NUM_PROCESSES PROCESS_ID]
Each job gets the same --config.distributed.* keys as `g2e-jax train`; tests/test_multiprocess_jobs.py
compares the outputs of 2 processes x 2 CPU devices with 1 process x 1 device.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

jax.config.update("jax_default_matmul_precision", "highest")

from g2e_jax.config_utils import load_config  # noqa: E402
from g2e_jax.eval.mmeb import run_eval  # noqa: E402
from g2e_jax.export import run_embed  # noqa: E402
from g2e_jax.mine import run_mine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EVAL_SUBSETS = "('SynShape', 'SynT2I', 'SynGround')"


def main():
    out, model, data = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    dist = []
    if len(sys.argv) > 4:
        dist = [f"distributed.coordinator={sys.argv[4]}", f"distributed.num_processes={sys.argv[5]}",
                f"distributed.process_id={sys.argv[6]}"]  # fmt: skip
    common = [f"model.path={model}", "model.dtype=float32", "batch_size=4", *dist]
    run_eval(load_config(str(ROOT / "configs/mmeb_eval.py"), [
        *common, f"data.root={data / 'eval'}", f"data.image_dir={data / 'images'}",
        f"data.groups_file={data / 'groups.json'}", f"subsets={EVAL_SUBSETS}", f"output_dir={out / 'eval'}",
    ]))  # fmt: skip
    run_mine(load_config(str(ROOT / "configs/qwen2vl_2b_saha.py"), [
        *common, f"data.root={data / 'train'}", f"data.image_dir={data / 'images'}", "image_resolution=None",
        "data.subsets=('SynShape', 'SynT2I')", f"mine.output_dir={out / 'mined'}", "mine.top_k=3",
        "mine.pool_mult=2", "mine.encode_chunk=8", "mine.classification_subsets=('SynShape',)",
    ]))  # fmt: skip
    embed_cfg = load_config(str(ROOT / "configs/embed.py"), [*common, "shard_size=4"])
    rows = data / "embed_rows.jsonl"
    run_embed(embed_cfg, rows, out / "embed", role="document", skip_bad=True)
    if (out / "resume").exists():  # a copy of another run's export with its last shard lost
        meta = run_embed(embed_cfg, rows, out / "resume", role="document", skip_bad=True, resume=True)
        if jax.process_index() == 0:
            (out / "resume_meta.json").write_text(json.dumps(meta))


if __name__ == "__main__":
    main()
