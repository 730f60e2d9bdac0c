"""Benchmarks: MMEB (Precision@1 over 36 subsets) and SugarCrepe (compositional retrieval)."""
