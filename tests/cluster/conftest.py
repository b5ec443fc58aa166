"""Helpers for the cluster tests: is a local Slurm running, waiting for jobs, fake Slurm tools on PATH.

Tests that need Slurm use the `slurm` fixture: it skips with the reason when no Slurm answers here (start one with
`cluster/local/slurm.sh start`, as .ci/run does), and fails instead when GDRO_REQUIRE_SLURM=1 (set by .ci/run once
it has started one), so CI cannot skip them silently.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def slurm_problem() -> str | None:
    """None when a local Slurm takes jobs, else why not."""
    for tool in ("sbatch", "squeue", "scontrol", "sinfo", "scancel"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH (no Slurm client installed)"
    r = subprocess.run(["sinfo", "-h", "-o", "%t"], check=False, capture_output=True, text=True, timeout=30)
    states = r.stdout.split()
    if r.returncode != 0:
        return f"sinfo failed: {(r.stderr or r.stdout).strip()} (no slurmctld running?)"
    if not any(s.rstrip("*~#") in ("idle", "mix", "alloc") for s in states):
        return f"no usable Slurm node (sinfo states: {' '.join(states) or 'none'})"
    return None


@pytest.fixture(scope="session")
def slurm():
    problem = slurm_problem()
    if problem:
        msg = f"needs a running local Slurm: {problem}; start one with `make slurm-up` (cluster/local/slurm.sh install, then start)"
        if os.environ.get("GDRO_REQUIRE_SLURM") == "1":
            pytest.fail(msg + " (GDRO_REQUIRE_SLURM=1)")
        pytest.skip(msg)


def job_fields(job: str) -> list[dict]:
    r = subprocess.run(["scontrol", "-o", "show", "job", job], check=False, capture_output=True, text=True, timeout=30)
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in r.stdout.splitlines() if "JobId=" in line]


def wait_jobs(ids, timeout: float, poll: float = 1.0) -> dict[str, list[dict]]:
    """Until none of the jobs (array tasks included) is pending, running or being requeued. Returns the last
    fields seen of every job (of each task of an array, in task order): a finished job leaves slurmctld's memory
    after MinJobAge, and without accounting nothing else remembers it, so the states are kept as they are seen."""
    end = time.time() + timeout
    active = {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED",
              "REQUEUE_HOLD", "REQUEUE_FED"}
    seen: dict[str, dict[str, dict]] = {j: {} for j in ids}
    while time.time() < end:
        for j in ids:
            for f in job_fields(j):
                seen[j][f["JobId"]] = f
        if not any(f.get("JobState") in active for j in ids for f in seen[j].values()):
            return {j: sorted(seen[j].values(), key=lambda f: int(f.get("ArrayTaskId") or 0)) for j in ids}
        time.sleep(poll)
    subprocess.run(["scancel", *ids], check=False, capture_output=True)
    raise AssertionError(f"jobs {ids} still active after {timeout} s (cancelled): "
                         f"{[job_fields(j) and job_fields(j)[0].get('JobState') for j in ids]}")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def gdro(*args, cwd=None, env=None) -> Result:
    """`gdro ARGS` in this process (no interpreter start-up), in folder `cwd` with environment `env`, both
    restored afterwards."""
    from pipeline.cli import main

    old_env, old_cwd = dict(os.environ), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
    return Result(code, out.getvalue(), err.getvalue())


def fake_tool(folder: Path, name: str, body: str) -> Path:
    """An executable shell script `name` in `folder` (fake Slurm tools for tests without Slurm)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path
