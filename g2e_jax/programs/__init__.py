"""Device programs: pure functions of arrays that are jitted and sharded by their callers."""
