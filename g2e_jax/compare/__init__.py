"""``g2e-jax compare``: g2e_jax's numbers against the official PyTorch pipeline's.

``run.py`` the command (live, offline and cluster modes), ``parts.py`` the rows it compares,
``sides.py`` both sides encoding them, ``reference.py`` the PyTorch side rebuilt
from the official code's behaviour (shares nothing with g2e_jax's prompt code), ``official.py`` the
official output files (no torch), ``report.py`` per-row metrics and the result files.
"""

from g2e_jax.compare.run import compare_config, run_compare

__all__ = ["compare_config", "run_compare"]
