"""Who am I in a job: task ids for rollouts (Slurm array or torchrun), kept out of the recipes."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from .errors import GdroError


def task_from_env(task_id: int | None = None, num_tasks: int | None = None) -> tuple[int, int]:
    """(task_id, num_tasks): explicit values, else a Slurm array, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    env = os.environ
    if task_id is None or num_tasks is None:  # each value not given explicitly comes from the environment
        env_id = env_n = None
        if "SLURM_ARRAY_TASK_ID" in env:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            env_id = int(env["SLURM_ARRAY_TASK_ID"]) - first
            count = env.get("SLURM_ARRAY_TASK_COUNT")
            env_n = int(count) if count else int(env["SLURM_ARRAY_TASK_MAX"]) - first + 1
        elif "WORLD_SIZE" in env:
            env_id, env_n = int(env.get("RANK", "0")), int(env["WORLD_SIZE"])
        task_id = env_id if task_id is None else task_id
        num_tasks = env_n if num_tasks is None else num_tasks
    task_id = 0 if task_id is None else task_id
    num_tasks = 1 if num_tasks is None else num_tasks
    if num_tasks < 1 or not 0 <= task_id < num_tasks:
        raise GdroError(f"--task-id {task_id} is outside 0..{num_tasks - 1} (--num-tasks {num_tasks})")
    return task_id, num_tasks


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int, "torch.device"]:
    """(rank, world, local_rank, device). Works under torchrun/srun and as a plain single process (where it
    fills in the variables DeepSpeed needs, which would otherwise make it look for MPI)."""
    import deepspeed
    import torch

    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=env.get("MASTER_PORT", str(free_port())))
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, local, device


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (keeps rank checks out of recipes)."""
    if os.environ.get("RANK", "0") == "0":
        print(*args, **kwargs, flush=True)
