"""Per-program cost of running model-written code under bubblewrap vs the in-process guards alone.

Workload: a trivial passing program (so the time is the sandbox's, not the program's). Latency: `n`
pairs run one at a time, alternating `isolation="off"` and `"require"` (bwrap) so a changing load on
a shared machine hits both alike; medians. Throughput: `n` programs through the default thread pool
per mode. Then the 164 HumanEval canonical solutions under both, which must give the same outcomes.

    python bench/bench_sandbox.py [--n 100] [--workers 2] 2>/dev/null   # (stderr: progress bars)
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from pkt.eval import humaneval
from pkt.eval.sandbox import resolve_isolation, run_program, run_programs
from pkt.io import int_flag, run_cli

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = "def f(xs):\n    return sorted(xs)[::-1]\nassert f([3, 1, 2]) == [3, 2, 1]"
MODES = ("off", "require")


@dataclass
class BenchConfig:
    """Time the sandbox: --n programs per measurement, --workers threads for throughput (0 = default)."""
    n: int = 100
    workers: int = 0

    def __post_init__(self):
        int_flag(self.n, "--n", low=1)
        int_flag(self.workers, "--workers", low=0)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(cfg: BenchConfig) -> None:
    resolve_isolation("require")  # one-line error without a working bwrap; also runs the one-time probe
    workers = cfg.workers or max(2, os.cpu_count() or 2)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    lat = {m: [] for m in MODES}
    for _ in range(cfg.n):
        for m in MODES:
            lat[m].append(_timed(lambda: run_program(PROGRAM, isolation=m)))
    diff = statistics.median(b - a for a, b in zip(lat["off"], lat["require"]))
    print(f"latency, one at a time (median of {cfg.n}): off {1000 * statistics.median(lat['off']):.1f} ms, "
          f"bwrap {1000 * statistics.median(lat['require']):.1f} ms; paired difference {1000 * diff:.1f} ms")
    for m in MODES:
        dt = _timed(lambda: run_programs([PROGRAM] * cfg.n, workers=workers, isolation=m))
        print(f"throughput, {workers} workers, {m}: {cfg.n / dt:.1f} programs/s")
    problems = humaneval.load(ROOT / "data" / "eval")
    programs = [humaneval.program(p, p["canonical_solution"]) for p in problems]
    outcomes = {}
    for m in MODES:
        t0 = time.perf_counter()
        outcomes[m] = [r["passed"] for r in run_programs(programs, workers=workers, isolation=m)]
        print(f"HumanEval canonical, {m}: {sum(outcomes[m])}/{len(programs)} pass in "
              f"{time.perf_counter() - t0:.1f} s ({workers} workers)")
    print("same outcomes under both:", outcomes["off"] == outcomes["require"])
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    run_cli(bench, BenchConfig)
