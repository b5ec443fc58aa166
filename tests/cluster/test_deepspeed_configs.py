"""Every DeepSpeed config shipped in cluster/deepspeed/ trains, checkpoints and exports (one rank, tiny model).

The three trainings run in one child process: ZeRO-3 patches torch functions (F.linear) for good, which would
change the rounding of whatever this test process computes afterwards.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow

CONFIGS = [("zero2", 2), ("zero2_offload", 2), ("zero3", 3)]  # ZeRO-3 last

CHILD = r'''
import json, os, signal, sys
import deepspeed
from pipeline.config import ExperimentConfig, resolve
from stages.rollouts import main as rollouts
from stages.train import main as train

base, root, configs = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
rollouts(resolve(ExperimentConfig, preset="toy", overrides=base))
seen = {}
real = deepspeed.initialize
def spy(*args, **kwargs):
    seen.update(kwargs["config"])
    return real(*args, **kwargs)
deepspeed.initialize = spy
for name, stage, path in configs:
    seen.clear()
    env = dict(os.environ)
    train(resolve(ExperimentConfig, preset="toy", overrides=[*base, f"train.out={root}/{name}",
          f"train.zero_stage={stage}", f"train.deepspeed_config={path}"]))
    os.environ.clear(); os.environ.update(env)
    print("DSCONFIG " + json.dumps({"name": name, "config": seen}), flush=True)
'''


@pytest.fixture(scope="module")
def trained(tiny_toy_model, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("ds_configs")
    ds = root / "ds"
    base = [f"model.path={tiny_toy_model}", f"rollouts.out={ds}",
            f"rollouts.prompts={REPO / 'prompts' / 'toy_train.jsonl'}", "rollouts.num_prompts=4",
            "rollouts.prompts_per_shard=4", "rollouts.group_size=2", "sampler.steps=1", "rollouts.ref_cache_k=1",
            f"train.dataset={ds}", "train.groups_per_step=2", "train.steps=2", "train.save_every=2"]
    configs = [(n, s, str(REPO / "cluster" / "deepspeed" / f"{n}.json")) for n, s in CONFIGS]
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(base), str(root), json.dumps(configs)],
                       check=False, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = {}
    for line in r.stdout.splitlines():
        if line.startswith("DSCONFIG "):
            rec = json.loads(line[len("DSCONFIG "):])
            seen[rec["name"]] = rec["config"]
    return root, seen


@pytest.mark.parametrize("name, stage, check", [
    ("zero2", 2, lambda z: z["overlap_comm"] is True),
    ("zero2_offload", 2, lambda z: z["offload_optimizer"]["device"] == "cpu"),
    ("zero3", 3, lambda z: z["stage3_gather_16bit_weights_on_model_save"] is True),
])
def test_shipped_deepspeed_configs_train_and_export(trained, name, stage, check):
    root, seen = trained
    zero = seen[name]["zero_optimization"]
    assert zero["stage"] == stage and check(zero)
    assert seen[name]["train_micro_batch_size_per_gpu"] == 2  # still filled from train.*
    assert not any(k.startswith("_") for k in seen[name])  # the comments stay out of DeepSpeed
    out = root / name
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert (out / "export" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
