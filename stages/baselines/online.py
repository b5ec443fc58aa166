"""`gdro online`: one online baseline (online.method) on the product's task, to <online.out>."""
from __future__ import annotations

from pipeline.config import ExperimentConfig

from . import flow_grpo, forward
from .common import run


def main(cfg: ExperimentConfig) -> dict:
    m = cfg.online.method
    return run(cfg, flow_grpo.iterate() if m == "flow-grpo" else forward.iterate(m), m)
