"""What the sampling benchmarks share: interleaved timing runs and their medians."""

from __future__ import annotations

import statistics
from collections.abc import Callable


def interleaved_medians(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Each run once as a warm-up, then ``repeats`` rounds of every run in turn (so a slow spell of the machine
    hits all of them alike); the median seconds of each. Prints every round."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(repeats):
        for name, run in runs.items():
            times[name].append(run())
        print(f"repeat {i + 1}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()), flush=True)
    return {name: statistics.median(t) for name, t in times.items()}
