"""Helpers shared by the benchmarks in bench/: the 2B-width model config and the background-load meter.

The benchmarks run as scripts (``python bench/bench_*.py``), so this folder is on ``sys.path`` and
they import it as ``common``.
"""

from __future__ import annotations

import os
import resource
import time

BUSY_CORES = 0.25  # background load above which the timings are flagged


def qwen2_vl_2b_width(layers: int, vision_blocks: int):
    """Qwen2-VL-2B's widths (tests/backbones.py, the released-widths case) at a reduced depth."""
    from g2e_jax.models.qwen2_vl import Qwen2VLConfig, TextConfig, VisionConfig
    from g2e_jax.models.qwen2_vl.tiny import with_token_ids

    return with_token_ids(
        Qwen2VLConfig(
            text=TextConfig(
                vocab_size=151936,
                hidden_size=1536,
                intermediate_size=8960,
                num_hidden_layers=layers,
                num_attention_heads=12,
                num_key_value_heads=2,
                mrope_section=(16, 24, 24),
                rope_theta=1e6,
            ),
            vision=VisionConfig(
                depth=vision_blocks, embed_dim=1280, num_heads=16, mlp_ratio=4, out_hidden_size=1536
            ),
            tie_word_embeddings=True,
        )
    )


class CpuMeter:
    """Cores kept busy by other processes (and the hypervisor's steal) while it runs: the shared
    machine's background load, which the timings are only comparable without."""

    def __enter__(self):
        self.start = (time.perf_counter(), _machine_busy(), _own_cpu())
        return self

    def __exit__(self, *exc):
        wall, busy, own = (
            b - a for a, b in zip(self.start, (time.perf_counter(), _machine_busy(), _own_cpu()))
        )
        self.background_cores = None if busy is None else max(0.0, (busy - own) / wall)


def _machine_busy() -> float | None:
    """Busy CPU seconds of the whole machine since boot (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    """This process's CPU seconds and its finished children's (a bench that runs the command in a
    subprocess must not count that as the machine's background load)."""
    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usages)


def csv_list(value: str) -> list[str]:
    """A comma-separated flag as a list (empty items dropped)."""
    return [v.strip() for v in value.split(",") if v.strip()]
