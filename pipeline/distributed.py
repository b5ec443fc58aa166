"""Who am I in a job: task ids for rollouts (Slurm array or torchrun), kept out of the recipes."""
from __future__ import annotations

import os

from .errors import GdroError


def task_from_env(task_id: int | None = None, num_tasks: int | None = None) -> tuple[int, int]:
    """(task_id, num_tasks): explicit values, else a Slurm array, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    env = os.environ
    if task_id is None and num_tasks is None:
        if "SLURM_ARRAY_TASK_ID" in env:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            task_id = int(env["SLURM_ARRAY_TASK_ID"]) - first
            count = env.get("SLURM_ARRAY_TASK_COUNT")
            num_tasks = int(count) if count else int(env["SLURM_ARRAY_TASK_MAX"]) - first + 1
        elif "WORLD_SIZE" in env:
            task_id, num_tasks = int(env.get("RANK", "0")), int(env["WORLD_SIZE"])
    task_id = 0 if task_id is None else task_id
    num_tasks = 1 if num_tasks is None else num_tasks
    if num_tasks < 1 or not 0 <= task_id < num_tasks:
        raise GdroError(f"--task-id {task_id} is outside 0..{num_tasks - 1} (--num-tasks {num_tasks})")
    return task_id, num_tasks
