"""Preemption of a training run: the signals that ask it to stop, and the requeue after its last checkpoint.

SIGUSR2 (Slurm's warning before the time limit, `--signal=B:USR2@<slurm.signal_lead_s>`) and SIGTERM
(scancel) only set a flag; the loop all-reduces it so that every rank checkpoints at the same step. Only USR2
asks for a requeue; TERM only saves. The handlers are installed for the loop and the ones they replace are
put back afterwards, so a process that trains twice (the tests, the benchmark) keeps its own handling.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Self

import torch

SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class Preemption:
    """A context manager: inside it, SIGUSR2/SIGTERM set `flag` (and are recorded in `received`)."""

    def __init__(self):
        self.flag = False
        self.received: set[int] = set()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Self:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._set)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _set(self, signum, _frame):
        self.flag = True
        self.received.add(signum)

    @property
    def requeue_requested(self) -> bool:
        return signal.SIGUSR2 in self.received

    def any_rank(self, device) -> bool:
        """True on every rank when any rank got a signal (a collective)."""
        import torch.distributed as dist

        f = torch.tensor([1.0 if self.flag else 0.0], device=device)
        dist.all_reduce(f)
        return bool(f.item() > 0)


def requeue_target(env=None) -> str | None:
    """The id `scontrol requeue` needs for this job: ARRAYJOB_TASK inside an array task (array-aware), else the
    job id; None outside a Slurm job."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


@contextlib.contextmanager
def _term_ignored():
    """SIGTERM ignored in this process while inside, and so in the children started there (an ignored signal
    stays ignored across exec). Requeueing a running job makes slurmd send TERM to every process of the job as
    soon as slurmctld has the request, often before `scontrol requeue` has exited; scontrol would die of it
    (exit -15, no output) and a job that *was* requeued be reported as not. A TERM that reaches this process
    meanwhile is dropped: it is already leaving for the requeue. Outside the main thread, a no-op."""
    try:
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)  # None: set outside Python


def requeue_on_preemption(rank: int, requested: bool = True) -> str | None:
    """Called by every rank after the preemption checkpoint: wait until all ranks saved, then rank 0 puts this
    job (or this array task) back in the queue with `scontrol requeue`, and the requeued job resumes from the
    checkpoint (`gdro train` resumes by default). Only when `requested` (rank 0 got USR2, Slurm's warning before
    the time limit; a TERM from scancel only saves), inside a Slurm job, and with GDRO_REQUEUE=1 (exported by
    cluster/train.sbatch; set it in your own scripts), so that a test or an interactive run inside an
    allocation never requeues its job. Returns the requeued id (on rank 0) or None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank's checkpoint files are written
    target = requeue_target()
    if rank != 0 or not requested or target is None or os.environ.get("GDRO_REQUEUE") != "1":
        return None
    try:
        with _term_ignored():  # scontrol inherits it: see _term_ignored
            r = subprocess.run(["scontrol", "requeue", target], check=False, capture_output=True, text=True,
                               timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"slurm: could not requeue job {target} ({e}); resubmit it to resume", flush=True)
        return None
    if r.returncode < 0:
        print(f"slurm: scontrol requeue {target} was killed by {signal.Signals(-r.returncode).name}; the job may "
              "have been requeued all the same (squeue shows it), else resubmit to resume", flush=True)
        return None
    if r.returncode != 0:
        print(f"slurm: scontrol requeue {target} failed: {(r.stderr or r.stdout).strip()}; resubmit to resume",
              flush=True)
        return None
    print(f"slurm: requeued job {target}; it resumes from the checkpoint", flush=True)
    return target
