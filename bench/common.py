"""Shared helpers for the benchmarks: paths, environments, subprocesses, statistics, the table.

Every part returns a list of Figure rows; run.py prints them as one table.
"""

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
PYTHON = sys.executable
OUR_NUMBER = "+15550000000"
T0 = 1_800_000_000.0  # a fixed "now": every time-dependent step is given explicit times

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def smsbatch_cmd():
    """The `smsbatch` console script next to this Python, else `python -m smsbatch`."""
    script = os.path.join(os.path.dirname(PYTHON), "smsbatch")
    return [script] if os.path.exists(script) else [PYTHON, "-m", "smsbatch"]


def clean_env(**extra):
    """os.environ without any smsbatch/provider settings, plus `extra` (str values)."""
    prefixes = ("SMSBATCH_", "TWILIO_", "OPENAI_", "ENABLE_AI", "AI_SMS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def fresh_db(folder, name="bench.db"):
    """A new, migrated database file in `folder`; returns its path."""
    from smsbatch.db import Store

    path = os.path.join(folder, name)
    store = Store(path)
    store.migrate()
    store.close()
    return path


def tempdir(prefix):
    return tempfile.TemporaryDirectory(prefix=f"smsbatch-bench-{prefix}-")


def stop_process(proc, timeout=10):
    """SIGTERM our own child, then SIGKILL if it does not go."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout)


def percentile(values, p):
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(round(p / 100 * len(ordered) + 0.5))))
    return ordered[rank - 1]


@dataclass
class Figure:
    """One measured figure over several runs, with its target.

    `better` is "higher" (target is a minimum) or "lower" (target is a maximum);
    target None means informational only.
    """

    part: str
    name: str
    unit: str
    values: list = field(default_factory=list)
    target: float = None
    better: str = "higher"
    note: str = ""

    @property
    def median(self):
        return statistics.median(self.values) if self.values else None

    @property
    def ok(self):
        if self.target is None or not self.values:
            return None
        m = self.median
        return m >= self.target if self.better == "higher" else m <= self.target

    def target_text(self):
        if self.target is None:
            return "-"
        return (">= " if self.better == "higher" else "<= ") + fmt(self.target)

    def spread_text(self):
        if not self.values:
            return "-"
        lo, hi = min(self.values), max(self.values)
        return f"{fmt(lo)}-{fmt(hi)}" if len(self.values) > 1 else fmt(lo)


def fmt(x):
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def print_table(figures, out=sys.stdout):
    header = ("part", "figure", "unit", "target", "median", "spread (min-max)", "runs", "ok")
    rows = [header]
    for f in figures:
        ok = {True: "PASS", False: "MISS", None: ""}[f.ok]
        rows.append((f.part, f.name, f.unit, f.target_text(), fmt(f.median), f.spread_text(),
                     str(len(f.values)), ok))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print(line, file=out)
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))), file=out)
        if i == 0:
            print(line, file=out)
    print(line, file=out)
    notes = [f for f in figures if f.note]
    for f in notes:
        print(f"  {f.part}/{f.name}: {f.note}", file=out)


def cpus_busy(seconds=0.5):
    """How many CPUs (of os.cpu_count()) were busy over `seconds`, from /proc/stat; None if unknown.
    Taken while this benchmark is idle, so it is other processes' load."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values), idle
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return (1 - (idle1 - idle0) / total) * (os.cpu_count() or 1) if total else None


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fakes():
    """The test suite's stand-in servers (tests/fakes.py: FakeOpenAI, FakeTwilio)."""
    tests = os.path.join(ROOT, "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import fakes as module

    return module
