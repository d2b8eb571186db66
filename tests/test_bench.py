"""The benchmark runs and reports (its figures are never asserted: speed lives in the
bench and docs/performance.md, not in the test suite)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.procs import child_env

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@dataclass
class QuickRun:
    proc: subprocess.CompletedProcess[str]
    json: Path
    plot: Path | None
    leaked: list[str]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuickRun]:
    """One ``python -m shmchan bench --quick`` for the whole module (it takes ~20-40 s)."""
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "shmchan", "bench", "--quick", "--json", str(out / "bench.json")]
    if HAS_MATPLOTLIB:
        cmd += ["--plot", str(out / "bench.png")]
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env()
    ) as p:
        try:
            stdout, stderr = p.communicate(timeout=170)
        finally:
            p.kill()
    proc = subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)
    yield QuickRun(proc, out / "bench.json", out / "bench.png" if HAS_MATPLOTLIB else None, _left_by(p.pid))


def _left_by(pid: int) -> list[str]:
    """What the bench (process ``pid``, which makes every queue) left behind: its
    /dev/shm names, and SysV segments it created. (Not a before/after snapshot: other
    test runs may share this machine.)"""
    left = [name for name in os.listdir("/dev/shm") if "shmchan-bench" in name]
    with contextlib.suppress(OSError):
        for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[4] == str(pid):
                left.append(f"sysv shm {fields[1]}")
    return left


@pytest.mark.timeout(180)
def test_quick_bench_prints_every_table(quick_run: QuickRun) -> None:
    proc = quick_run.proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for title in (
        "#### A.",
        "#### B-E.",
        "#### F.",
        "against its targets (default settings)",
        "#### Per call",
    ):
        assert title in out
    for row in ("| mp.Queue |", "| mp.SimpleQueue |", "| mp.Pipe |", "| **shmchan.Queue[posix]** |"):
        assert row in out
    for backend in ("sysv", "mmap"):
        assert f"| shmchan.Queue[{backend}] |" in out
    assert "failed" not in out, out
    assert "1.00x" in out  # mp.Queue's own ratio: every figure has one
    assert "Ring bytes (capacity)" in out


@pytest.mark.timeout(180)
def test_quick_bench_shows_progress_and_cleans_up(quick_run: QuickRun) -> None:
    assert "run 1/1" in quick_run.proc.stderr
    assert "A-64B" in quick_run.proc.stderr
    assert quick_run.leaked == []


@pytest.mark.timeout(180)
def test_quick_bench_writes_json(quick_run: QuickRun) -> None:
    assert quick_run.proc.returncode == 0
    data = json.loads(quick_run.json.read_text())
    rows = {(r["workload"], r["peer"]): r for r in data["results"]}
    for workload in ("A-64B", "A-1KiB", "A-64KiB", "A-1MiB", "B", "C", "D", "F-A-64B", "F-C"):
        assert rows[(workload, "shmchan.Queue[posix]")]["errors"] == []
        assert rows[(workload, "mp.Queue")]["errors"] == []
    assert rows[("A-64B", "shmchan.Queue[posix]")]["msgs_per_s"] > 0
    assert rows[("C", "shmchan.Queue[posix]")]["p99_us"] > 0
    assert rows[("A-64B", "mp.Queue")]["msgs_per_s_x_mpq"] == pytest.approx(1.0)
    assert rows[("D", "mp.Pipe")]["skipped"]  # n/a with its reason
    for workload in ("A-64B", "A-64KiB", "B", "D"):  # the batch row ran (D: surplus end markers)
        assert rows[(workload, "shmchan.Queue[posix] batch")]["errors"] == []
        assert rows[(workload, "shmchan.Queue[posix] batch")]["msgs_per_s"] > 0
    assert rows[("C", "shmchan.Queue[posix] batch")]["skipped"]
    assert data["machine"]["cores"]


@pytest.mark.timeout(180)
def test_quick_bench_names_missing_peers(quick_run: QuickRun) -> None:
    """faster_fifo and pyzmq (the bench extra) either run or are named as missing."""
    out = quick_run.proc.stdout
    for module, row in (("faster_fifo", "faster_fifo"), ("zmq", "pyzmq")):
        if importlib.util.find_spec(module) is None:
            assert "not installed (pip install 'shmchan[bench]')" in out
        assert f"| {row} |" in out


@pytest.mark.timeout(180)
def test_quick_bench_draws_the_plot(quick_run: QuickRun) -> None:
    if quick_run.plot is None:
        pytest.skip("matplotlib is not installed (pip install 'shmchan[bench]'): --plot not exercised")
    assert quick_run.proc.returncode == 0
    assert quick_run.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_so_before_running() -> None:
    code = (
        "import sys, importlib.util as u; real = u.find_spec\n"
        "u.find_spec = lambda n, *a: None if n == 'matplotlib' else real(n, *a)\n"
        "from shmchan._bench import main; sys.exit(main(['--quick', '--plot', '/nonexistent/x.png']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=60, check=False
    )
    assert proc.returncode == 2 and "matplotlib" in proc.stderr, proc.stderr


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


@pytest.mark.timeout(180)
def test_quick_bench_has_the_redis_rows(quick_run: QuickRun) -> None:
    """Table R: the bench starts its own redis-server (when there is one) and removes it."""
    import shutil

    if shutil.which("redis-server") is None and shutil.which("valkey-server") is None:
        if os.environ.get("SHMCHAN_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not on PATH and SHMCHAN_REQUIRE_REDIS=1")
        pytest.skip("redis-server is not on PATH")
    out = quick_run.proc.stdout
    assert "#### R." in out
    for row in ("| shmchan.Queue[redis] |", "| shmchan.Queue[redis] batch |"):
        assert row in out
    assert "against the targets of issue 10" in out
    assert "redis-server on 127.0.0.1:" in quick_run.proc.stderr


def test_per_call_table_runs_more_calls_than_the_ring_holds() -> None:
    """The full run's per-call table (200 000 puts of 64 B: four times the default ring)
    puts and gets in bursts that fit, so it neither blocks nor finds the queue empty."""
    from shmchan._bench import PERCALL_CHUNK, percall

    lines = percall(["posix"], 6 * PERCALL_CHUNK)
    row = lines[-1]
    assert row.startswith("| posix |") and row.count(" ns |") == 4, row
