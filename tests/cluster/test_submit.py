"""`gdro submit` without a Slurm: rendered scripts (a 4-node, 8-GPU launch run against fake srun/scontrol/python),
bad input, the chain of submissions against a fake sbatch, the status of submitted runs, the requeue call, the
DeepSpeed config files."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from pipeline.errors import GdroError

from .conftest import REPO, fake_tool, gdro

# 12 prompts in shards of 4: 3 shards
BASE = ["--set", f"model.path={REPO / 'models' / 'toy-base'}", "--set", f"rollouts.prompts={REPO / 'prompts' / 'toy_train.jsonl'}",
        "--set", "rollouts.num_prompts=12", "--set", "rollouts.prompts_per_shard=4", "--set", "name=t"]


def sets(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def split_scripts(stdout: str) -> dict[str, tuple[str, str]]:
    """Dry-run output -> {stage: (header line, script)}."""
    out = {}
    for chunk in stdout.split("# ===== ")[1:]:
        header, script = chunk.split("\n", 1)
        out[header.split(":")[0]] = (header, script)
    return out


def directives(script: str) -> list[str]:
    lines = script.splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    found = [(i, line[len("#SBATCH "):]) for i, line in enumerate(lines) if line.startswith("#SBATCH ")]
    assert all(i < first_command for i, _ in found), "sbatch stops reading #SBATCH lines at the first command"
    return [d for _, d in found]


def test_dry_run_4_nodes_8_gpus_launch_line_and_environment(tmp_path):
    fake = tmp_path / "bin"
    out = tmp_path / "out"
    out.mkdir()
    r = gdro("submit", "train", "--dry-run", *BASE, *sets(
        f"train.out={tmp_path / 'run'}", "slurm.train_nodes=4", "slurm.gpus_per_node=8", "slurm.partition=gpu",
        "slurm.account=proj-x", "slurm.train_cpus_per_node=64", "slurm.train_minutes=2880",
        f"slurm.python={fake / 'python'}", "slurm.setup=[export NCCL_DEBUG=WARN]"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"
    scripts = split_scripts(r.stdout)
    assert list(scripts) == ["train"]
    header, script = scripts["train"]
    assert header == f"train: sbatch --parsable {tmp_path / 'run' / 'slurm' / 'train.sbatch'}"
    d = directives(script)
    for want in ["--job-name=t-train", "--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=64", "--gres=gpu:8",
                 "--partition=gpu", "--account=proj-x", "--time=2880", "--requeue", "--open-mode=append",
                 "--signal=USR2@300", f"--chdir={tmp_path}", f"--output={tmp_path / 'run' / 'slurm' / 'logs'}/%x-%j.out"]:
        assert want in d, f"{want} missing from {d}"

    # Run the script as slurmd would on the first of 4 nodes, with fake Slurm tools and a fake interpreter.
    fake_tool(fake, "scontrol", 'if [ "$1 $2" = "show hostnames" ] && [ "$3" = "gpu-a[01-04]" ]; then\n'
                                '  printf "gpu-a01\\ngpu-a02\\ngpu-a03\\ngpu-a04\\n"; else exit 1; fi\n')
    fake_tool(fake, "srun", 'printf "%s\\n" "$@" > "$OUT/srun.args"\nwhile [[ "$1" == --* ]]; do shift; done\n'
                            'SLURM_PROCID=0 exec "$@"\n')
    fake_tool(fake, "python", 'printf "%s\\n" "$@" > "$OUT/python.args"\nenv > "$OUT/python.env"\n'
                              'grep SigIgn /proc/$$/status > "$OUT/python.sigign"\n')
    (tmp_path / "train.sbatch").write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RDZV_", "OMP_"))}
    env.update(PATH=f"{fake}:{env['PATH']}", OUT=str(out), SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-a[01-04]",
               SLURM_NNODES="4")
    import subprocess

    p = subprocess.run(["bash", str(tmp_path / "train.sbatch")], check=False, capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "4 node(s) x 8 rank(s), rendezvous gpu-a01:29742" in p.stdout
    assert (out / "srun.args").read_text().splitlines()[:4] == [
        "--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=64", "--kill-on-bad-exit=1"]
    args = (out / "python.args").read_text().splitlines()
    config = args[-1]
    assert args == ["-m", "torch.distributed.run", "--nnodes=4", "--nproc_per_node=8", "--rdzv_backend=c10d",
                    "--rdzv_endpoint=gpu-a01:29742", "--rdzv_id=4242", "-m", "pipeline.cli", "train",
                    "--preset", "", "--config", config]
    assert Path(config).parent == tmp_path / "run" / "slurm" and Path(config).name.startswith("config-")
    job_env = dict(line.split("=", 1) for line in (out / "python.env").read_text().splitlines() if "=" in line)
    assert job_env["RDZV_HOST"] == "gpu-a01" and job_env["RDZV_PORT"] == "29742"
    assert job_env["OMP_NUM_THREADS"] == "8"  # 64 CPUs / 8 ranks
    assert job_env["NCCL_DEBUG"] == "WARN"  # slurm.setup ran
    assert job_env["GDRO_REQUEUE"] == "1"  # rank 0 may requeue this job
    sig_ign = int((out / "python.sigign").read_text().split()[1], 16)
    assert sig_ign & (1 << (signal.SIGUSR2 - 1)), "torchrun must ignore USR2 (the ranks install their handler)"


def test_dry_run_all_renders_the_chain(tmp_path):
    r = gdro("submit", "all", "--dry-run", *BASE, *sets(f"train.out={tmp_path / 'run'}", "slurm.rollouts_parallel=2",
                                                        "slurm.gpus_per_node=0"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    scripts = split_scripts(r.stdout)
    assert list(scripts) == ["rollouts", "assemble", "train", "eval"]
    assert "--dependency=afterok:<rollouts job>" in scripts["assemble"][0]
    assert "--dependency=afterok:<assemble job>" in scripts["train"][0]
    assert "--dependency=afterok:<train job>" in scripts["eval"][0]
    d = directives(scripts["rollouts"][1])
    assert "--array=0-2%2" in d and "--signal=B:USR2@300" in d and "--requeue" in d
    assert not any(x.startswith("--gres") for s in scripts.values() for x in directives(s[1]))  # CPU only
    assert 'scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' in scripts["rollouts"][1]
    assert "rollouts --assemble-only --preset ''" in scripts["assemble"][1]
    assert "-m pipeline.cli eval --preset ''" in scripts["eval"][1]


def test_the_frozen_config_resolves_to_the_submitted_one(tmp_path):
    from pipeline.config import ExperimentConfig, dump, resolve

    cfg = resolve(ExperimentConfig, preset="toy", overrides=["slurm.rollouts_minutes=90", "train.lr=3e-5",
                                                             'rollouts.rewards={"toy_geneval": {}}'])
    snap = tmp_path / "config.yaml"
    snap.write_text(dump(cfg))
    r = gdro("config", "show", "--preset", "", "--config", str(snap), cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout == dump(cfg)  # the job sees exactly this config (no preset merged under it)


# ------------------------------------------------------------------------------------------------ bad input
def test_sbatch_missing_from_path(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path / "empty"))
    r = gdro("submit", "rollouts", *BASE, *sets(f"train.out={tmp_path / 'run'}"), cwd=tmp_path, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "sbatch is not on PATH" in r.stderr and "--dry-run" in r.stderr
    assert not (tmp_path / "run" / "slurm" / "jobs.jsonl").exists()


def test_more_array_tasks_than_shards(tmp_path):
    r = gdro("submit", "rollouts", "--dry-run", *BASE, *sets("slurm.rollouts_tasks=5"), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "slurm.rollouts_tasks=5 but the dataset has 3 shard(s)" in r.stderr
    assert "tasks 3..4 would have nothing to do; use at most 3 tasks" in r.stderr


@pytest.mark.parametrize("overrides, fragment", [
    (["slurm.train_minutes=04:00:00"], "slurm.train_minutes must be int, got str"),
    (["slurm.train_minutes=5", "slurm.signal_lead_s=300"],
     "slurm.signal_lead_s=300 is not shorter than slurm.train_minutes=5 minutes"),
    (["slurm.signal_lead_s=70000"], "slurm.signal_lead_s must be in 0..65535"),
    (["slurm.train_nodes=0"], "slurm.train_nodes must be > 0"),
    (["train.deepspeed_config=cluster/deepspeed/zero3.json"], "is a ZeRO-3 config but train.zero_stage=2"),
    (["train.deepspeed_config=nope.json"], "train.deepspeed_config: nope.json does not exist"),
])
def test_bad_slurm_settings_are_one_clear_line(overrides, fragment):
    r = gdro("submit", "train", "--dry-run", *BASE, *sets(*overrides), cwd=REPO)
    assert r.returncode == 2 and fragment in r.stderr and "Traceback" not in r.stderr


def test_train_without_a_dataset_needs_after(tmp_path):
    r = gdro("submit", "train", *BASE, *sets(f"train.dataset={tmp_path / 'none'}", f"train.out={tmp_path / 'run'}"),
             cwd=tmp_path)
    assert r.returncode == 2 and "has no manifest.json yet" in r.stderr and "--after JOBID" in r.stderr


def test_after_must_be_a_job_id(tmp_path):
    r = gdro("submit", "eval", "--after", "12;rm", *BASE, cwd=tmp_path)
    assert r.returncode == 2 and "is not a Slurm job id" in r.stderr


# ------------------------------------------------------------------------------------------------ a fake sbatch
FAKE_SBATCH = '''n=$(( $(cat "$OUT/n" 2>/dev/null || echo 100) + 1 )); echo $n > "$OUT/n"
echo "$*" >> "$OUT/sbatch.calls"
if [ -n "${FAIL_AT:-}" ] && [ "$n" = "$FAIL_AT" ]; then echo "sbatch: error: Batch job submission failed: Invalid account" >&2; exit 1; fi
echo "$n"
'''


def fake_slurm(tmp_path) -> dict:
    fake, out = tmp_path / "bin", tmp_path / "calls"
    out.mkdir()
    fake_tool(fake, "sbatch", FAKE_SBATCH)
    fake_tool(fake, "scancel", 'echo "$*" >> "$OUT/scancel.calls"\n')
    # scontrol -o show job ID: the rollouts array half done, the others pending on their dependency
    fake_tool(fake, "scontrol", '''case "$4" in
101) echo "JobId=101 ArrayJobId=101 ArrayTaskId=0 JobState=COMPLETED Reason=None Restarts=0"
     echo "JobId=102 ArrayJobId=101 ArrayTaskId=1 JobState=RUNNING Reason=None Restarts=1"
     echo "JobId=101 ArrayJobId=101 ArrayTaskId=2 JobState=PENDING Reason=Resources Restarts=0";;
*) echo "JobId=$4 JobState=PENDING Reason=Dependency Restarts=0";;
esac
''')
    return dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", OUT=str(out))


def test_submit_all_chains_with_afterok_and_records_the_jobs(tmp_path):
    env = fake_slurm(tmp_path)
    ds = tmp_path / "ds"
    r = gdro("submit", "all", *BASE, *sets(f"train.out={tmp_path / 'run'}", f"rollouts.out={ds}", f"train.dataset={ds}",
                                           "train.steps=50"), cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "submitted rollouts: job 101 (array 0-2)" in r.stdout and "submitted eval: job 104, after 103" in r.stdout
    calls = (tmp_path / "calls" / "sbatch.calls").read_text().splitlines()
    folder = tmp_path / "run" / "slurm"
    assert calls == [f"--parsable {folder}/rollouts.sbatch",
                     f"--parsable --dependency=afterok:101 --kill-on-invalid-dep=yes {folder}/assemble.sbatch",
                     f"--parsable --dependency=afterok:102 --kill-on-invalid-dep=yes {folder}/train.sbatch",
                     f"--parsable --dependency=afterok:103 --kill-on-invalid-dep=yes {folder}/eval.sbatch"]
    jobs = [json.loads(line) for line in (folder / "jobs.jsonl").read_text().splitlines()]
    assert [(j["stage"], j["job_id"], j["after"]) for j in jobs] == [
        ("rollouts", "101", None), ("assemble", "102", "101"), ("train", "103", "102"), ("eval", "104", "103")]
    for j in jobs:  # the rendered scripts are kept under the job id, with the frozen config they name
        script = Path(j["script"]).read_text()
        assert Path(j["script"]).name == f"{j['stage']}-{j['job_id']}.sbatch" and j["config"] in script
    assert Path(jobs[0]["config"]).is_file() and (folder / "logs").is_dir()

    status = gdro("status", str(tmp_path / "run"), cwd=tmp_path, env=env)
    assert status.returncode == 0, status.stderr
    text = status.stdout
    assert "rollouts job 101 (array 0-2): 1 COMPLETED, 1 PENDING, 1 RUNNING (Resources), requeued 1x" in text
    assert f"{ds}: no task has started yet" in text
    assert "train    job 103: PENDING (Dependency)" in text and "step 0/50; no checkpoint yet" in text
    assert "eval     job 104: PENDING (Dependency)" in text and "results: not yet" in text


def test_a_refused_submission_cancels_the_jobs_already_queued(tmp_path):
    env = dict(fake_slurm(tmp_path), FAIL_AT="102")
    r = gdro("submit", "all", *BASE, *sets(f"train.out={tmp_path / 'run'}"), cwd=tmp_path, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert ("sbatch refused assemble.sbatch: sbatch: error: Batch job submission failed: Invalid account "
            "(cancelled the jobs this command had already submitted: rollouts 101)") in r.stderr
    assert (tmp_path / "calls" / "scancel.calls").read_text().split() == ["101"]


def test_status_of_a_dataset_folder_is_unchanged(tmp_path):
    r = gdro("status", str(tmp_path))
    assert r.returncode == 2 and "no rollouts job has started there" in r.stderr


# ------------------------------------------------------------------------------------------------ requeue
def test_requeue_target_is_array_aware():
    from pipeline.preemption import requeue_target

    assert requeue_target({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "2"}) == "7_2"
    assert requeue_target({"SLURM_JOB_ID": "9"}) == "9"
    assert requeue_target({}) is None


@pytest.mark.parametrize("rank, usr2, env, called", [
    (0, True, {"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "2", "GDRO_REQUEUE": "1"},
     "requeue 7_2"),
    (0, True, {"SLURM_JOB_ID": "9", "GDRO_REQUEUE": "1"}, "requeue 9"),
    (1, True, {"SLURM_JOB_ID": "9", "GDRO_REQUEUE": "1"}, None),  # only rank 0 requeues
    (0, False, {"SLURM_JOB_ID": "9", "GDRO_REQUEUE": "1"}, None),  # TERM (scancel) saves, never requeues
    (0, True, {"SLURM_JOB_ID": "9"}, None),  # not asked for by the job script (a test, an interactive srun)
    (0, True, {"GDRO_REQUEUE": "1"}, None),  # not in a Slurm job
])
def test_rank_0_requeues_the_job(tmp_path, monkeypatch, capsys, rank, usr2, env, called):
    from pipeline.preemption import requeue_on_preemption

    fake_tool(tmp_path / "bin", "scontrol", f'echo "$*" > {tmp_path / "called"}\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "GDRO_REQUEUE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    got = requeue_on_preemption(rank, usr2)
    if called:
        assert (tmp_path / "called").read_text().strip() == called and got == called.split()[1]
        assert "resumes from the checkpoint" in capsys.readouterr().out
    else:
        assert got is None and not (tmp_path / "called").exists()


def rank0_of_job(tmp_path, monkeypatch, job: str, scontrol_body: str) -> None:
    """This process as rank 0 of Slurm job `job` that may requeue itself, with a fake scontrol."""
    fake_tool(tmp_path / "bin", "scontrol", scontrol_body)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", job)
    monkeypatch.setenv("GDRO_REQUEUE", "1")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)


def test_a_failed_requeue_is_reported_not_raised(tmp_path, monkeypatch, capsys):
    from pipeline.preemption import requeue_on_preemption

    rank0_of_job(tmp_path, monkeypatch, "9", 'echo "scontrol: error: Only batch jobs are accepted" >&2; exit 1\n')
    assert requeue_on_preemption(0, True) is None
    assert "Only batch jobs are accepted; resubmit to resume" in capsys.readouterr().out


def test_the_requeue_survives_the_sigterm_it_triggers(tmp_path, monkeypatch, capsys):
    """`scontrol requeue` of a running job makes slurmd SIGTERM every process of the job, scontrol (a child of
    rank 0) included, often before it has exited: it must not die of it and be reported as a failure (a real
    CI run printed "scontrol requeue 47 failed: ; resubmit to resume" for a job that was requeued). The fake
    scontrol sends itself TERM after the request, as slurmd would, and then exits 0."""
    from pipeline.preemption import requeue_on_preemption

    rank0_of_job(tmp_path, monkeypatch, "47", f'kill -TERM $$\necho "$*" > {tmp_path / "called"}\n')
    before = signal.getsignal(signal.SIGTERM)
    assert requeue_on_preemption(0, True) == "47"
    assert "slurm: requeued job 47; it resumes from the checkpoint" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is before  # this process's own handling is back


def test_a_requeue_killed_by_a_signal_says_so(tmp_path, monkeypatch, capsys):
    from pipeline.preemption import requeue_on_preemption

    rank0_of_job(tmp_path, monkeypatch, "47", "kill -KILL $$\n")
    assert requeue_on_preemption(0, True) is None
    out = capsys.readouterr().out
    assert "scontrol requeue 47 was killed by SIGKILL" in out and "failed: ;" not in out


# ------------------------------------------------------------------------------------------------ small parts
def test_job_state_summaries():
    from pipeline.slurm import _count_tasks, _summary

    assert [_count_tasks(s) for s in ("3", "1-4", "0,2-3%2")] == [1, 4, 3]
    assert _summary([("COMPLETED", 1, "None", 0)]) == "COMPLETED"
    assert _summary([("COMPLETED", 2, "None", 1), ("PENDING", 1, "Priority", 0)]) == \
        "2 COMPLETED, 1 PENDING (Priority), requeued 1x"


def test_templates_name_only_known_placeholders(tmp_path):
    from pipeline.slurm import render

    with pytest.raises(GdroError, match=r"x.sbatch uses nodes_typo"):
        render("#SBATCH --nodes={{nodes_typo}}", {"nodes": "1"}, "x.sbatch")


def test_deepspeed_config_files_merge_over_the_built_config():
    from pipeline.distributed import deepspeed_config

    base = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2, "x": 1}, "bf16": {"enabled": False}}
    assert deepspeed_config(base, "", 2) is base
    off = deepspeed_config(base, str(REPO / "cluster/deepspeed/zero2_offload.json"), 2)
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and off["zero_optimization"]["x"] == 1
    assert off["train_micro_batch_size_per_gpu"] == 8 and not any(k.startswith("_") for k in off)
    z3 = deepspeed_config(base, str(REPO / "cluster/deepspeed/zero3.json"), 3)
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("content, fragment", [
    ('{"gradient_accumulation_steps": 4}', "sets gradient_accumulation_steps, which gdro fills from train.grad_accum"),
    ('{"bf16": {"enabled": true}}', "fills from train.precision"),
    ("[1, 2]", "must hold a JSON object"),
    ("{nope", "is not a readable JSON file"),
])
def test_bad_deepspeed_config_files(tmp_path, content, fragment):
    from pipeline.distributed import deepspeed_config

    (tmp_path / "ds.json").write_text(content)
    with pytest.raises(GdroError, match=fragment.replace("(", r"\(")):
        deepspeed_config({}, str(tmp_path / "ds.json"), 2)


def test_the_rollouts_requeue_trap_survives_the_sigterm_it_triggers(tmp_path):
    """The rollouts script's USR2 trap stops the task and runs `scontrol requeue`, which makes slurmd TERM the
    whole job, scontrol included. The fake scontrol TERMs itself after the request, as slurmd would: the
    task must still end 0 with the request made (with TERM not ignored, `set -e` ended it 143)."""
    import subprocess
    import time

    fake = tmp_path / "bin"
    r = gdro("submit", "rollouts", "--dry-run", *BASE, *sets(f"train.out={tmp_path / 'run'}",
                                                            f"slurm.python={fake / 'python'}"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (tmp_path / "rollouts.sbatch").write_text(split_scripts(r.stdout)["rollouts"][1])
    fake_tool(fake, "python", f"touch {tmp_path / 'started'}\nexec sleep 60\n")
    fake_tool(fake, "scontrol", f'echo "$*" > {tmp_path / "called"}\nkill -TERM $$\nexit 0\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{fake}:{env['PATH']}", SLURM_ARRAY_JOB_ID="51", SLURM_ARRAY_TASK_ID="0",
               SLURM_ARRAY_TASK_COUNT="2")
    p = subprocess.Popen(["bash", str(tmp_path / "rollouts.sbatch")], env=env, stdout=subprocess.PIPE, text=True)
    for _ in range(200):
        if (tmp_path / "started").exists():
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR2)
    out, _ = p.communicate(timeout=60)
    assert (tmp_path / "called").read_text().split() == ["requeue", "51_0"]
    assert p.returncode == 0, out
