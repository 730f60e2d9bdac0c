"""Where a training run's time goes (``timing.json``): set-up, the first compile, the steady state."""

from __future__ import annotations

import time

from g2e_jax.compile_cache import CompileClock


class RunClock:
    """Where a run's time goes: set-up, the step's first compile, and the steady-state seconds per
    step between metric records with any compile in between (a new shape bucket) taken out, so
    that ``step_s`` compares with the step alone (``bench/bench_train.py``)."""

    def __init__(self):
        self.compiles = CompileClock()
        self.t0 = self._last = time.perf_counter()
        self.marks: dict = {}
        self._done = None
        self._compiled = self._loop_start = (0, 0.0)  # (programs, seconds) compiled before
        self.intervals: list = []

    def _compile_totals(self):
        return self.compiles.count, self.compiles.seconds

    def mark(self, name: str) -> None:
        """The time since the previous mark, and the programs XLA compiled meanwhile (a program
        read from the persistent compilation cache is not compiled); the last mark starts the loop."""
        now, compiled = time.perf_counter(), self._compile_totals()
        self.marks[name] = round(now - self._last, 3)
        self.marks[name.removesuffix("_s") + "_programs"] = compiled[0] - self._compiled[0]
        self._last = now
        self._compiled = self._loop_start = compiled

    def interval(self, done: int) -> None:
        """At a metrics record, once step ``done`` has finished on the device. Kept out of
        metrics.jsonl, which a resumed run reproduces exactly."""
        now, compiled = time.perf_counter(), self._compile_totals()
        if self._done is not None:
            steps = done - self._done
            step_s = (now - self._last - (compiled[1] - self._compiled[1])) / max(steps, 1)
            self.intervals.append((done, steps, step_s))
        # The first interval holds the first steps' one-off costs (allocation, warm-up): not timed.
        self._done, self._last, self._compiled = done, now, compiled

    def summary(self) -> dict:
        steps = sum(n for _, n, _ in self.intervals)
        count, seconds = self._compile_totals()
        return {
            **self.marks,
            "steps": steps,
            "step_s": round(sum(n * t for _, n, t in self.intervals) / steps, 4) if steps else None,
            "compiles_in_loop": count - self._loop_start[0],
            "compile_s_in_loop": round(seconds - self._loop_start[1], 3),
            "total_s": round(time.perf_counter() - self.t0, 3),
            "step_s_by_record": [[done, round(t, 4)] for done, _, t in self.intervals],
        }

    def close(self) -> None:
        self.compiles.close()
