"""Who am I in a job: task ids for rollouts (Slurm array or torchrun), kept out of the recipes."""
from __future__ import annotations

import atexit
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


def init_distributed() -> tuple[int, int, int, torch.device]:
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
    atexit.unregister(shutdown_distributed)  # once, however often a process initialises
    atexit.register(shutdown_distributed)
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, local, device


def shutdown_distributed() -> None:
    """Destroy the process group; `init_distributed` registers it to run at interpreter exit. Without it, gloo's
    worker threads can still hold work objects when Python finalises, and a rank dies with SIGABRT ("terminate
    called without an active exception") after a run that succeeded. At exit rather than at the end of a run:
    DeepSpeed caches its groups, so a process that trains twice (the tests) must keep the group. A no-op when
    no group is up; local, not a collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (keeps rank checks out of recipes)."""
    if os.environ.get("RANK", "0") == "0":
        print(*args, **kwargs, flush=True)


# Keys of a DeepSpeed config that train.* decides; a train.deepspeed_config file may not set them.
DS_KEYS_FROM_TRAIN = {"train_batch_size": "train.groups_per_step", "train_micro_batch_size_per_gpu":
                      "train.groups_per_step", "gradient_accumulation_steps": "train.grad_accum",
                      "gradient_clipping": "train.max_grad_norm", "bf16": "train.precision", "fp16": "train.precision"}


def deepspeed_config(base: dict, path: str, zero_stage: int) -> dict:
    """The DeepSpeed config built from train.* (`base`) with the JSON file `path` merged over it (train.deepspeed_config,
    e.g. cluster/deepspeed/zero3.json; "" = `base` as it is). Top-level keys starting with "_" are comments."""
    import json
    from pathlib import Path

    if not path:
        return base
    key = "train.deepspeed_config"
    try:
        extra = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise GdroError(f"{key}: {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise GdroError(f"{key}: {path} is not a readable JSON file ({e})") from None
    if not isinstance(extra, dict):
        raise GdroError(f"{key}: {path} must hold a JSON object")
    extra = {k: v for k, v in extra.items() if not k.startswith("_")}
    for k, owner in DS_KEYS_FROM_TRAIN.items():
        if k in extra:
            raise GdroError(f"{key}: {path} sets {k}, which gdro fills from {owner}; remove it and set {owner}")
    zero = extra.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise GdroError(f"{key}: {path}: zero_optimization must be an object")
    if zero.get("stage", zero_stage) != zero_stage:
        raise GdroError(f"{key}: {path} is a ZeRO-{zero.get('stage')} config but train.zero_stage={zero_stage}; "
                        f"set --set train.zero_stage={zero.get('stage')} (the export depends on it)")

    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    return merge(base, extra)
