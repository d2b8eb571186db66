"""The Python examples run, give the right answer, and need only one import changed.

Each example is run as a script (``python examples/NAME.py``) under each start method
and must exit 0 with its ``OK`` summary line. Then a copy with its shmchan import
swapped back to ``from multiprocessing import ...`` is run from a temporary
directory, and must print the same answer: the "change one import" claim, checked in
both directions.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.procs import ROOT, child_env

EXAMPLES = ROOT / "examples"
RUN_TIMEOUT = 90

# script -> (the line that makes it a shmchan program, the summary it must print,
#            the part of the summary that must not depend on the queue implementation)
CASES = {
    "worker_pool.py": (
        "from shmchan import JoinableQueue, Queue",
        re.compile(r"^worker_pool: OK: (25997 primes below 300000 from 30 tasks) on 4 workers \((\w+)\)"),
    ),
    "pipeline.py": (
        "from shmchan import Queue",
        re.compile(
            r"^pipeline: OK: (5000 records \(\d+ bytes\) through 2 transformers) \((\w+)\), digest (\w+)"
        ),
    ),
}


def run_example(script: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def summary(proc: subprocess.CompletedProcess[str], pattern: re.Pattern[str]) -> re.Match[str]:
    assert proc.returncode == 0, (
        f"exit code {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    match = pattern.match(lines[0])
    assert match, f"unexpected summary: {lines[0]!r}"
    return match


def swapped_source(script: str) -> str:
    shmchan_line, _ = CASES[script]
    source = (EXAMPLES / script).read_text()
    assert source.splitlines().count(shmchan_line) == 1
    return source.replace(shmchan_line + "\n", shmchan_line.replace("shmchan", "multiprocessing", 1) + "\n")


@pytest.mark.parametrize("script", sorted(CASES))
def test_the_import_is_the_only_shmchan_line(script: str) -> None:
    tree = ast.parse((EXAMPLES / script).read_text())
    imports = [
        node
        for node in ast.walk(tree)
        if (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("shmchan"))
        or (isinstance(node, ast.Import) and any(a.name.startswith("shmchan") for a in node.names))
    ]
    assert len(imports) == 1
    assert ast.get_source_segment((EXAMPLES / script).read_text(), imports[0]) == CASES[script][0]
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert "shmchan" not in names
    assert "from multiprocessing import Process" in (EXAMPLES / script).read_text()
    swapped = ast.parse(swapped_source(script))
    assert not any(
        isinstance(node, ast.ImportFrom) and (node.module or "").startswith("shmchan")
        for node in ast.walk(swapped)
    )


@pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs_with_shmchan(script: str, method: str) -> None:
    _, pattern = CASES[script]
    args = () if method == "spawn" else ("--start-method", method)  # spawn is the default
    match = summary(run_example(EXAMPLES / script, *args), pattern)
    assert match.group(2) == method


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs_with_multiprocessing_after_swapping_the_import(script: str, tmp_path: Path) -> None:
    _, pattern = CASES[script]
    copy = tmp_path / script
    copy.write_text(swapped_source(script))
    with_mp = summary(run_example(copy, cwd=tmp_path), pattern)
    with_shmchan = summary(run_example(EXAMPLES / script), pattern)
    # The same answer, checked by each program against its own reference computation.
    assert with_mp.groups() == with_shmchan.groups()
