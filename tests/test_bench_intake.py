"""bench/intake.py, in a short run: it drives the real lane and every request it times is
answered (the bench asserts each object answer and that every waiter parked)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_a_short_intake_run_times_objects_parked_reloads_and_their_wake():
    run = subprocess.run(
        [sys.executable, "-m", "bench.intake", "--requests", "400", "--waiters", "200",
         "--rounds", "2"], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = dict(re.findall(r"^(object|park|wake) +least +([\d.]+) us/request", run.stdout,
                              re.MULTILINE))
    assert set(figures) == {"object", "park", "wake"}, run.stdout
    assert all(float(value) > 0 for value in figures.values()), figures
