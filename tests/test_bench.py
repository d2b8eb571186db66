"""The benchmark runs (its speed is never asserted: performance lives in the bench)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.procs import child_env


@pytest.mark.timeout(180)
def test_bench_quick_runs_and_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "shmchan", "bench", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=170,
        env=child_env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| mp.Queue |" in proc.stdout
    for backend in ("posix", "sysv", "mmap"):
        assert f"shmchan.Channel[{backend}]" in proc.stdout
    assert "run 1/1" in proc.stderr  # progress is shown
    rows = json.loads(out.read_text())
    assert {r["peer"] for r in rows} >= {"mp.Queue", "shmchan.Channel[posix]"}
    assert all(r["rate"] > 0 for r in rows)


def test_unknown_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "shmchan", "frobnicate"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "bench" in proc.stderr
