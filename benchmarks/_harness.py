"""Shared timing and reporting for the benchmark scripts: medians of repeated runs, each
figure printed beside its baseline from the same run, with the ratio (ours / baseline)."""
import gc
import json
import os
import platform
import statistics
import time

__all__ = ["median_time", "Row", "print_table", "machine", "write_json"]


def median_time(fn, *, repeat=7, number=1, setup=None):
    """Median seconds per call of fn() over `repeat` rounds of `number` calls each.

    `setup()` (if given) runs before each round outside the timing and its result is
    passed to fn."""
    times = []
    for _ in range(repeat):
        arg = setup() if setup else None
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            for _ in range(number):
                fn(arg) if setup else fn()
            times.append((time.perf_counter() - t0) / number)
        finally:
            gc.enable()
    return statistics.median(times)


class Row:
    """One comparison: our time beside a baseline's, with the target ratio (ours/baseline)."""

    def __init__(self, name, ours, baseline_name, baseline, target=None, unit="s"):
        self.name, self.ours, self.baseline_name, self.baseline = name, ours, baseline_name, baseline
        self.target, self.unit = target, unit

    @property
    def ratio(self):
        return self.ours / self.baseline if self.baseline else float("inf")

    @property
    def met(self):
        return None if self.target is None else self.ratio <= self.target

    def as_dict(self):
        return {"name": self.name, "ours": self.ours, "baseline_name": self.baseline_name,
                "baseline": self.baseline, "ratio": self.ratio, "target": self.target, "met": self.met}


def _fmt(seconds):
    for unit, scale in (("s", 1), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if seconds >= scale:
            return f"{seconds / scale:8.2f} {unit}"
    return f"{seconds / 1e-9:8.2f} ns"


def machine():
    return f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}"


def print_table(title, rows):
    print(f"\n{title}  ({machine()})")
    print(f"{'benchmark':44} {'ours':>11}  {'baseline':>28}  {'ratio':>6}  target")
    for r in rows:
        tgt = "" if r.target is None else f"<= {r.target:g}  {'ok' if r.met else 'MISSED'}"
        print(f"{r.name:44} {_fmt(r.ours):>11}  {r.baseline_name[:16]:>16} {_fmt(r.baseline):>11}  "
              f"{r.ratio:6.2f}  {tgt}")


def write_json(path, rows, **extra):
    with open(path, "w") as f:
        json.dump({"machine": machine(), "rows": [r.as_dict() for r in rows], **extra}, f, indent=2)
