"""Acceptance on a real single-node Slurm (cluster/local/slurm.sh; .ci/run installs and starts it).

One `gdro submit all` of the toy world (rollouts as an array of 3 tasks -> manifest assembly -> training with 2
ranks under srun + torchrun on the CPU (gloo) -> evaluation) is waited for, then checked against a local
single-process run; a second training job is preempted mid-run with USR2 and must resume from its checkpoint
and end with the same losses as the uninterrupted one; a rollouts task is preempted the same way and resumes at
shard granularity; sbatch's own error is shown for an unknown partition.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, gdro, job_fields, wait_jobs

pytestmark = pytest.mark.slow

STEPS = 30  # training steps: enough that a signal sent at step 3 lands mid-run (about 1 step/s on 2 busy cores)
MAX_WAIT = 1200  # seconds for the whole chain


def experiment(root: Path, **extra) -> dict:
    """The toy world, small: 12 prompts in 3 shards of 4, G=4, 4 sampler steps; CPU-only Slurm settings."""
    cfg = {
        "name": "citest",
        "model": {"path": str(REPO / "models" / "toy-base")},
        "sampler": {"steps": 4},
        "rollouts": {"prompts": str(REPO / "prompts" / "toy_train.jsonl"), "num_prompts": 12, "prompts_per_shard": 4,
                     "group_size": 4, "batch_size": 16, "out": str(root / "ds")},
        "train": {"dataset": str(root / "ds"), "out": str(root / "run"), "steps": STEPS, "groups_per_step": 2,
                  "save_every": 10, "lr": 1.0e-4},
        "eval": {"prompts": str(REPO / "prompts" / "toy_test.jsonl"), "num_prompts": 6},
        "slurm": {"gpus_per_node": 0, "train_procs_per_node": 2, "train_cpus_per_node": 2, "rollouts_cpus": 1,
                  "eval_cpus": 1, "rollouts_tasks": 3, "rollouts_minutes": 20, "train_minutes": 20,
                  "eval_minutes": 20, "signal_lead_s": 60},
    }
    for section, values in extra.items():
        if isinstance(values, dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    return cfg


def write_config(root: Path, cfg: dict) -> Path:
    path = root / f"{cfg['name']}-{len(list(root.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def submit(root: Path, stage: str, cfg: dict) -> list[dict]:
    r = gdro("submit", stage, "--preset", "", "--config", write_config(root, cfg), cwd=root)
    assert r.returncode == 0, r.stderr
    lines = (Path(cfg["train"]["out"]) / "slurm" / "jobs.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def log_of(job: dict) -> str:
    logs = Path(job["script"]).parent / "logs"
    pattern = f"*-{job['job_id']}_*.out" if job["array"] else f"*-{job['job_id']}.out"
    return "\n".join(p.read_text(errors="replace") for p in sorted(logs.glob(pattern)))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def wait_for_step(run: Path, step: int, job: str, timeout: float = 600) -> int:
    end = time.time() + timeout
    while time.time() < end:
        try:
            last = metrics(run)[-1]["step"] if (run / "metrics.jsonl").is_file() else 0
        except (ValueError, IndexError):  # a line being written
            last = 0
        if last >= step:
            return last
        states = {f.get("JobState") for f in job_fields(job)}
        assert states & {"PENDING", "RUNNING", "CONFIGURING"}, f"job {job} ended early: {states}"
        time.sleep(0.2)
    raise AssertionError(f"{run} did not reach step {step} within {timeout} s")


@pytest.fixture(scope="module")
def chain(slurm, tmp_path_factory):
    """`gdro submit all`, waited for."""
    root = tmp_path_factory.mktemp("slurm_all")
    cfg = experiment(root)
    t0 = time.time()
    jobs = submit(root, "all", cfg)
    assert [j["stage"] for j in jobs] == ["rollouts", "assemble", "train", "eval"]
    states = wait_jobs([j["job_id"] for j in jobs], MAX_WAIT)
    print(f"\nslurm chain: rollouts x3 -> assemble -> train (2 ranks, {STEPS} steps) -> eval in {time.time() - t0:.0f} s")
    return {"root": root, "cfg": cfg, "jobs": {j["stage"]: j for j in jobs}, "states": states}


def test_every_job_of_the_chain_completed(chain):
    for stage, job in chain["jobs"].items():
        states = [f["JobState"] for f in chain["states"][job["job_id"]]]
        expected = 3 if stage == "rollouts" else 1
        assert states == ["COMPLETED"] * expected, f"{stage} job {job['job_id']}: {states}\n{log_of(job)[-3000:]}"


def test_the_array_wrote_the_same_dataset_as_one_local_process(chain, tmp_path):
    import pyarrow.parquet as pq

    from pipeline.config import ExperimentConfig, resolve
    from stages.rollouts import main

    ds = Path(chain["cfg"]["rollouts"]["out"])
    local = tmp_path / "local"
    cfg = resolve(ExperimentConfig, preset=None, files=(str(write_config(tmp_path, chain["cfg"])),),
                  overrides=[f"rollouts.out={local}"])
    main(cfg, task_id=0, num_tasks=1)
    tasks = {json.loads(p.read_text())["task_id"] for p in (ds / "shards").glob("*.stats.json")}
    assert tasks == {0, 1, 2}  # three array tasks wrote them
    tars = sorted(p.name for p in (ds / "shards").glob("*.tar"))
    assert tars == ["000000.tar", "000001.tar", "000002.tar"]
    for name in tars:
        assert (ds / "shards" / name).read_bytes() == (local / "shards" / name).read_bytes(), name
    for name in ("000000.parquet", "000001.parquet", "000002.parquet"):
        assert pq.read_table(ds / "shards" / name).equals(pq.read_table(local / "shards" / name)), name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (ds, local))
    assert a["shards"] == b["shards"] and a["totals"] == b["totals"] and a["fingerprint"] == b["fingerprint"]
    assert gdro("verify", str(ds)).returncode == 0


def test_training_ran_on_two_ranks_to_its_step_count(chain):
    run = Path(chain["cfg"]["train"]["out"])
    assert [m["step"] for m in metrics(run)] == list(range(1, STEPS + 1))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:07d}"
    assert (run / "export" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    log = log_of(chain["jobs"]["train"])
    assert "1 node(s) x 2 rank(s)" in log and "ZeRO-2, torch.float32, 2 rank(s)" in log


def test_eval_ran_after_training(chain):
    run = Path(chain["cfg"]["train"]["out"])
    assert (run / "eval" / "results.json").is_file(), log_of(chain["jobs"]["eval"])[-3000:]


def test_status_of_the_finished_run(chain):
    r = gdro("status", chain["cfg"]["train"]["out"])
    assert r.returncode == 0, r.stderr
    j = chain["jobs"]
    for line in (f"rollouts job {j['rollouts']['job_id']} (array 0-2): 3 COMPLETED", "3/3 shards done",
                 "task 0: 1 shards", "task 2: 1 shards", f"assemble job {j['assemble']['job_id']}: COMPLETED",
                 "manifest: written", f"train    job {j['train']['job_id']}: COMPLETED",
                 f"step {STEPS}/{STEPS}", f"checkpoint step_{STEPS:07d}; exported",
                 f"eval     job {j['eval']['job_id']}: COMPLETED", "results: "):
        assert line in r.stdout, f"{line!r} not in\n{r.stdout}"


def test_training_preempted_mid_run_resumes_from_its_checkpoint(chain):
    root = chain["root"]
    cfg = experiment(root, train={"out": str(root / "run_requeued")})
    run = Path(cfg["train"]["out"])
    job = submit(root, "train", cfg)[-1]
    at = wait_for_step(run, 3, job["job_id"])
    subprocess.run(["scancel", "--signal=USR2", job["job_id"]], check=True)  # what --signal=USR2@lead sends
    fields = wait_jobs([job["job_id"]], MAX_WAIT)[job["job_id"]][0]
    log = log_of(job)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", log[-3000:]
    saved = int(log.split("train: preemption signal: checkpointed at step ")[1].split(";")[0])
    assert at <= saved < STEPS  # the signal landed mid-run
    assert f"slurm: requeued job {job['job_id']}" in log
    assert "restart 1: 1 node(s) x 2 rank(s)" in log
    assert f"train: resumed from {run / 'checkpoints' / f'step_{saved:07d}'} at step {saved}" in log
    steps = [m["step"] for m in metrics(run)]
    assert steps == list(range(1, STEPS + 1))  # no step lost, none repeated
    # loss continuity: step for step the same losses as the uninterrupted run of the same config
    uninterrupted = {m["step"]: m["loss"] for m in metrics(Path(chain["cfg"]["train"]["out"]))}
    for m in metrics(run):
        assert m["loss"] == pytest.approx(uninterrupted[m["step"]], rel=1e-5, abs=1e-9), m["step"]


def test_rollouts_task_preempted_resumes_at_shard_granularity(chain):
    root = chain["root"]
    cfg = experiment(root, name="citest-ro", rollouts={"out": str(root / "ds_requeued"), "prompts_per_shard": 2},
                     train={"out": str(root / "run_ro")}, slurm={"rollouts_tasks": 1})
    ds = Path(cfg["rollouts"]["out"])
    job = submit(root, "rollouts", cfg)[-1]
    end = time.time() + 600
    while not list((ds / "shards").glob("0*.stats.json")) and time.time() < end:
        time.sleep(0.1)
    subprocess.run(["scancel", "--batch", "--signal=USR2", f"{job['job_id']}_0"], check=True)
    fields = wait_jobs([job["job_id"]], MAX_WAIT)[job["job_id"]][0]
    log = log_of(job)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", log[-3000:]
    assert "USR2" in log and "restart 1" in log
    done_before = int(log.split("rollouts: task 0/1: 6 shards, ")[2].split(" already done")[0])
    assert 1 <= done_before < 6  # finished shards were kept, the rest generated after the requeue
    assert gdro("verify", str(ds)).returncode == 0


def test_unknown_partition_shows_sbatchs_own_error(slurm, tmp_path):
    cfg = experiment(tmp_path, slurm={"partition": "no_such_partition"})
    r = gdro("submit", "rollouts", "--preset", "", "--config", write_config(tmp_path, cfg), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "sbatch refused rollouts.sbatch: sbatch: error: invalid partition specified: no_such_partition" in r.stderr
    assert not (tmp_path / "run" / "slurm" / "jobs.jsonl").exists()
