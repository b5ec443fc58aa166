"""SIGKILL a real `gdro train` after a checkpoint, resume it, and get the losses of an uninterrupted run.

No handler runs on SIGKILL: the killed run leaves its checkpoint and metrics lines past it (steps it trained
after checkpointing). The resumed run (plain `gdro train`: auto resume) loads the checkpoint, trims those lines,
skips the data stream ahead and continues; its per-step losses equal those of one uninterrupted run.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from .conftest import build_dataset, cli_env, read_metrics, train_command
from .test_train_e2e import REWARD, REWARD_MODULE

pytestmark = pytest.mark.slow

STEPS, SAVE_EVERY = 20, 4
TAG = re.compile(r"^step_(\d{7})$")


@pytest.fixture(scope="module")
def dataset(tiny_toy_model, tmp_path_factory):
    """8 prompts in 2 shards, G = 4, every group with reward spread (the mean-pixel reward)."""
    root = tmp_path_factory.mktemp("kill_resume")
    return build_dataset(root, tiny_toy_model, REWARD.split(":")[0], REWARD_MODULE, REWARD,
                         "rollouts.num_prompts=8", "rollouts.prompts_per_shard=4")


def overrides(model, dataset, out) -> list[str]:
    # beta 20 and lr 1e-3 keep the loss well away from 0 over the 20 steps (beta 500 drives it to ~1e-10)
    return [f"model.path={model}", f"train.dataset={dataset}", f"train.out={out}",
            f'train.reward_weights={{"{REWARD}": 1.0}}', "train.groups_per_step=4", "train.lr=1e-3",
            "train.warmup_steps=1", "train.beta=20", f"train.steps={STEPS}", f"train.save_every={SAVE_EVERY}"]


def _checkpointed_step(run) -> int | None:
    """The step `checkpoints/latest` names (DeepSpeed writes it once the tag's files are saved), or None."""
    try:
        m = TAG.match((run / "checkpoints" / "latest").read_text().strip())
    except FileNotFoundError:
        return None
    return int(m.group(1)) if m else None  # an empty read: caught between open and write


def _last_step(run) -> int:
    """Newest step in metrics.jsonl of a running process (a last line still being written is ignored)."""
    try:
        lines = (run / "metrics.jsonl").read_text().split("\n")[:-1]  # only lines ended by a newline
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines if line.strip()), default=0)


def _kill_past_a_checkpoint(proc, run) -> tuple[bool, int | None]:
    """SIGKILL the process group once a checkpoint is complete AND the run has trained past it; (whether the
    process was still running then, the checkpointed step)."""
    deadline = time.monotonic() + 300
    ck = None
    while time.monotonic() < deadline and proc.poll() is None:
        ck = _checkpointed_step(run)
        if ck is not None and _last_step(run) > ck:
            break
        time.sleep(0.002)
    running = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group; no handler runs
    proc.wait(timeout=60)
    return running, ck


def test_sigkill_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(dataset, tiny_toy_model, tmp_path):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    env = cli_env()
    # logs go to files, not pipes: nobody reads a pipe while the runs go, and a full one would stall them
    with open(tmp_path / "straight.log", "wb") as straight_log, open(tmp_path / "killed.log", "wb") as log:
        # the uninterrupted run goes alongside (its own process: sharing the CPU changes no result)
        uninterrupted = subprocess.Popen(train_command(overrides(tiny_toy_model, dataset, straight)),
                                         stdout=straight_log, stderr=subprocess.STDOUT, env=env)
        try:
            proc = subprocess.Popen(train_command(overrides(tiny_toy_model, dataset, killed)), stdout=log,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
            running, ck = _kill_past_a_checkpoint(proc, killed)
            uninterrupted.wait(timeout=300)
        finally:
            if uninterrupted.poll() is None:
                uninterrupted.kill()
                uninterrupted.wait()
    out = (tmp_path / "killed.log").read_text(errors="replace")[-3000:]
    assert running, f"the run ended (exit code {proc.returncode}) before it could be killed:\n{out}"
    assert proc.returncode == -signal.SIGKILL
    assert ck is not None and SAVE_EVERY <= ck < STEPS and ck % SAVE_EVERY == 0
    assert _checkpointed_step(killed) == ck
    left = read_metrics(killed)
    assert left[-1]["step"] > ck, "the killed run had not passed its checkpoint"  # lines the resume must trim
    assert not (killed / "export").exists()
    assert uninterrupted.returncode == 0, (tmp_path / "straight.log").read_text(errors="replace")[-3000:]

    resumed = subprocess.run(train_command(overrides(tiny_toy_model, dataset, killed)), capture_output=True,
                             text=True, env=env, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"resumed from {killed / 'checkpoints' / f'step_{ck:07d}'} at step {ck}" in resumed.stdout

    got, want = read_metrics(killed), read_metrics(straight)
    # steps 1..STEPS once each: the killed run's lines past the checkpoint were trimmed, so every line after
    # step ck was written by the resumed process
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    assert got[:ck] == left[:ck]  # the killed run's lines up to its checkpoint are untouched
    # 1e-6 relative: the same ops on the same inputs with one thread; only DeepSpeed's checkpoint round trip of
    # fp32 weights and Adam moments lies between the resumed steps and the uninterrupted ones, and that is exact
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-12), a["step"]
        assert a["rho_mean"] == pytest.approx(b["rho_mean"], rel=1e-6, abs=1e-9), a["step"]
    assert want[-1]["loss"] < want[0]["loss"] and min(r["loss"] for r in want) > 1e-3  # learns; losses not ~0
