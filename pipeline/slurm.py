"""Slurm: render the sbatch templates (cluster/*.sbatch) from the experiment config, submit them chained with
`afterok`, keep the job ids and rendered scripts in the run folder, report the jobs' state. (The running job
requeues itself after a preemption checkpoint: pipeline/preemption.py.)

Everything a job needs is in its rendered script: the resolved config is frozen to
<train.out>/slurm/config-<sha>.yaml and every job runs `gdro <stage> --preset '' --config <that file>`, from the
folder `gdro submit` ran in, with the interpreter that ran it (slurm.python to change).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import GdroError

REPO = Path(__file__).resolve().parents[1]
STAGES = ("rollouts", "assemble", "train", "eval")  # `gdro submit all` chains them in this order
SUBMIT_STAGES = ("rollouts", "train", "eval", "all")
SLURM_DIR = "slurm"  # <train.out>/slurm: config snapshots, rendered scripts, jobs.jsonl, logs/
JOBS = "jobs.jsonl"


# ------------------------------------------------------------------------------------------------ small helpers
def _which(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise GdroError(f"{tool} is not on PATH: run gdro submit on a Slurm login node (or add Slurm's bin folder "
                        f"to PATH); --dry-run prints the scripts without Slurm")
    return path


def _dq(text: str) -> str:
    """A shell word (shlex-quoted) that can also sit inside the double quotes of `bash -c "..."`."""
    if any(c in text for c in '"$`\\'):
        raise GdroError(f"{text!r}: paths with \", $, ` or \\ cannot go into a job script; use another folder")
    return shlex.quote(text)


# ------------------------------------------------------------------------------------------------ rendering
@dataclass
class Job:
    stage: str
    script: str  # the rendered sbatch script
    after: str | None = None  # the stage (in this submission) it waits for, with afterok
    array: str | None = None  # the --array spec, for the records


def num_shards(cfg) -> int:
    from schemas import layout

    from .prompt_files import load_prompts

    r = cfg.rollouts
    n = len(load_prompts(r.prompts))
    if r.num_prompts:
        if r.num_prompts > n:
            raise GdroError(f"rollouts.num_prompts={r.num_prompts} but {r.prompts} holds {n} prompts")
        n = r.num_prompts
    return layout.num_shards(n, r.prompts_per_shard)


def array_tasks(cfg) -> int:
    """T, the rollouts array size: slurm.rollouts_tasks, 0 = one task per shard; never more than the shards."""
    shards = num_shards(cfg)
    tasks = cfg.slurm.rollouts_tasks or shards
    if tasks > shards:
        raise GdroError(f"slurm.rollouts_tasks={tasks} but the dataset has {shards} shard(s) (rollouts.prompts / "
                        f"num_prompts over rollouts.prompts_per_shard={cfg.rollouts.prompts_per_shard}): tasks "
                        f"{shards}..{tasks - 1} would have nothing to do; use at most {shards} tasks "
                        f"(--set slurm.rollouts_tasks={shards}) or a smaller rollouts.prompts_per_shard")
    return tasks


def render(template: str, values: dict[str, str], name: str = "template") -> str:
    """{{key}} -> values[key]; a key the template uses but `values` lacks is an error (naming the template)."""
    missing = sorted(set(re.findall(r"\{\{(\w+)\}\}", template)) - set(values))
    if missing:
        raise GdroError(f"{name} uses {', '.join(missing)}, which gdro does not fill (known: {', '.join(sorted(values))})")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: str(values[m.group(1)]), template)


def template_dir(cfg) -> Path:
    return Path(cfg.slurm.templates) if cfg.slurm.templates else REPO / "cluster"


def _site_lines(s, gpus: int) -> str:
    opts = [f"--partition={s.partition}" if s.partition else "", f"--account={s.account}" if s.account else "",
            f"--qos={s.qos}" if s.qos else "", f"--gres={s.gres}:{gpus}" if gpus else "",
            f"--mem={s.mem}" if s.mem else "", *s.sbatch_args]
    return "\n".join(f"#SBATCH {o}" for o in opts if o) or "# (no site options: slurm.partition, account, ... unset)"


def procs_per_node(s) -> int:
    return s.train_procs_per_node or s.gpus_per_node or 1


def render_jobs(cfg, stage: str, *, run: Path, config_file: Path, python: str) -> list[Job]:
    """The jobs of `gdro submit STAGE`, rendered from the templates (nothing written, nothing submitted)."""
    if stage not in SUBMIT_STAGES:
        raise GdroError(f"unknown stage {stage!r}; submit one of {', '.join(SUBMIT_STAGES)}")
    s = cfg.slurm
    stages = ["rollouts", "assemble", "train", "eval"] if stage == "all" else [stage]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", cfg.name) or "gdro"
    common = {
        "name": name, "workdir": _dq(str(Path.cwd())), "logs": _dq(str(run.resolve() / SLURM_DIR / "logs")),
        "python": _dq(python), "config_args": f"--preset '' --config {_dq(str(config_file.resolve()))}",
        "setup": "\n".join(s.setup) or "# (no setup lines: slurm.setup)", "signal_lead": str(s.signal_lead_s),
    }
    jobs = []
    for st in stages:
        values = dict(common)
        array = None
        if st == "rollouts":
            tasks = array_tasks(cfg)
            array = f"0-{tasks - 1}" + (f"%{s.rollouts_parallel}" if s.rollouts_parallel else "")
            values.update(array=array, cpus=str(s.rollouts_cpus), time=str(s.rollouts_minutes),
                          site=_site_lines(s, 1 if s.gpus_per_node else 0))
        elif st == "assemble":
            values.update(site=_site_lines(s, 0))
        elif st == "train":
            procs = procs_per_node(s)
            values.update(nodes=str(s.train_nodes), procs=str(procs), cpus=str(s.train_cpus_per_node),
                          threads=str(max(1, s.train_cpus_per_node // procs)), time=str(s.train_minutes),
                          rdzv_port=str(s.rdzv_port) if s.rdzv_port else "$((29500 + SLURM_JOB_ID % 1000))",
                          site=_site_lines(s, s.gpus_per_node))
            from .distributed import deepspeed_config

            deepspeed_config({}, cfg.train.deepspeed_config, cfg.train.zero_stage)  # refuse a bad file now
        else:  # eval
            values.update(cpus=str(s.eval_cpus), time=str(s.eval_minutes), site=_site_lines(s, 1 if s.gpus_per_node else 0))
        path = template_dir(cfg) / f"{st}.sbatch"
        if not path.is_file():
            raise GdroError(f"no sbatch template {path} (slurm.templates names the folder holding "
                            f"{', '.join(x + '.sbatch' for x in STAGES)})")
        after = stages[stages.index(st) - 1] if stages.index(st) > 0 else None
        jobs.append(Job(st, render(path.read_text(), values, str(path)), after=after, array=array))
    return jobs


# ------------------------------------------------------------------------------------------------ submitting
def _sbatch(script: Path, dependency: str | None) -> str:
    cmd = [_which("sbatch"), "--parsable"]
    if dependency:
        cmd += [f"--dependency=afterok:{dependency}", "--kill-on-invalid-dep=yes"]
    try:
        r = subprocess.run([*cmd, str(script)], check=False, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise GdroError(f"sbatch did not answer within 120 s submitting {script}") from None
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip() or f"exit code {r.returncode}"
        raise GdroError(f"sbatch refused {script.name}: {msg}")
    job = r.stdout.strip().split(";")[0]
    if not job.isdigit():
        raise GdroError(f"sbatch printed {r.stdout.strip()!r} for {script.name}, not a job id")
    return job


def submit(cfg, stage: str, *, dry_run: bool = False, after: str | None = None, echo=print) -> list[dict]:
    """Render the jobs of STAGE, then either print them (dry run) or write them to <train.out>/slurm/ and submit
    them in order, each after the previous with afterok. Returns the job records (empty for a dry run)."""
    from .config import dump

    if after is not None and not re.fullmatch(r"\d+(_\d+)?", after):
        raise GdroError(f"--after {after!r} is not a Slurm job id")
    run = Path(cfg.train.out)
    folder = run / SLURM_DIR
    text = dump(cfg)
    config_file = folder / f"config-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    python = cfg.slurm.python or sys.executable
    jobs = render_jobs(cfg, stage, run=run, config_file=config_file, python=python)
    if dry_run:
        for j in jobs:
            dep = (f" --dependency=afterok:<{j.after} job>" if j.after else
                   f" --dependency=afterok:{after}" if after else "")
            echo(f"# ===== {j.stage}: sbatch --parsable{dep} {folder / (j.stage + '.sbatch')}")
            echo(j.script)
        return []
    from .remote import is_url
    from .train_data import dataset_list

    unmade = [d for d in dataset_list(cfg.train.dataset) if not is_url(d) and not (Path(d) / "manifest.json").is_file()]
    if stage == "train" and after is None and unmade:
        raise GdroError(f"train.dataset {unmade[0]} has no manifest.json yet: run or submit the rollouts "
                        f"first, chain with --after JOBID, or submit all")
    _which("sbatch")
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    from schemas.layout import atomic_write

    if not config_file.exists():
        atomic_write(config_file, text.encode())
    ids: dict[str, str] = {}
    records = []
    for j in jobs:
        path = folder / f"{j.stage}.sbatch"
        atomic_write(path, j.script.encode())
        dep = ids[j.after] if j.after else after
        try:
            job = _sbatch(path, dep)
        except GdroError as e:
            if ids:  # a broken chain: the jobs already queued would wait for nothing useful
                subprocess.run([_which("scancel"), *ids.values()], check=False, capture_output=True)
                raise GdroError(f"{e} (cancelled the jobs this command had already submitted: "
                                f"{', '.join(f'{k} {v}' for k, v in ids.items())})") from None
            raise
        ids[j.stage] = job
        kept = folder / f"{j.stage}-{job}.sbatch"
        path.rename(kept)
        rec = {"stage": j.stage, "job_id": job, "array": j.array, "after": dep, "script": str(kept.resolve()),
               "config": str(config_file.resolve()), "cwd": str(Path.cwd()),
               "submitted": _dt.datetime.now().isoformat(timespec="seconds")}
        with open(folder / JOBS, "a") as f:
            f.write(json.dumps(rec) + "\n")
        records.append(rec)
        echo(f"submitted {j.stage}: job {job}" + (f" (array {j.array})" if j.array else "")
             + (f", after {dep}" if dep else ""))
    echo(f"scripts, job ids and logs: {folder}; progress: gdro status {run}")
    return records


# ------------------------------------------------------------------------------------------------ status
def _parse_records(text: str) -> list[dict]:
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in text.splitlines() if "JobId=" in line]


def _count_tasks(spec: str) -> int:
    """Tasks in an ArrayTaskId such as '3', '1-4', '0,2-3%2'."""
    n = 0
    for part in spec.split("%")[0].split(","):
        if "-" in part:
            a, b = part.split("-")
            n += int(b) - int(a) + 1
        elif part.isdigit():
            n += 1
    return max(n, 1)


def job_state(job_id: str) -> str:
    """What Slurm says about a job (every task of an array): e.g. 'RUNNING', '2 COMPLETED, 1 PENDING (Priority)',
    'COMPLETED, restarted 1x'."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return "state unknown (no scontrol on PATH)"
    r = subprocess.run([scontrol, "-o", "show", "job", job_id], check=False, capture_output=True, text=True,
                       timeout=60)
    recs = _parse_records(r.stdout) if r.returncode == 0 else []
    if not recs:
        sacct = shutil.which("sacct")
        if sacct:
            a = subprocess.run([sacct, "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State"], check=False,
                               capture_output=True, text=True, timeout=60)
            states = [line.split("|")[1].split()[0] for line in a.stdout.splitlines() if "|" in line]
            if a.returncode == 0 and states:
                return _summary([(s, 1, "", 0) for s in states])
        return "finished (no longer known to Slurm)"
    rows = []
    for rec in recs:
        count = _count_tasks(rec["ArrayTaskId"]) if rec.get("ArrayTaskId") else 1
        rows.append((rec.get("JobState", "?"), count, rec.get("Reason", "None"), int(rec.get("Restarts", "0") or 0)))
    return _summary(rows)


def _summary(rows) -> str:
    counts: dict[str, int] = {}
    reasons = set()
    for state, n, reason, _ in rows:
        counts[state] = counts.get(state, 0) + n
        if state == "PENDING" and reason not in ("None", ""):
            reasons.add(reason)
    total = sum(counts.values())
    if total == 1:
        text = next(iter(counts))
    else:
        text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    if reasons:
        text += f" ({', '.join(sorted(reasons))})"
    restarts = sum(r[3] for r in rows)
    return text + (f", requeued {restarts}x" if restarts else "")


def load_jobs(run: Path) -> list[dict]:
    path = Path(run) / SLURM_DIR / JOBS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_status(run: Path) -> str:
    """For a run submitted with `gdro submit`: every stage's newest job and its Slurm state, the rollouts' shard
    progress per task, whether the manifest is written, the training step, whether the evaluation finished."""
    from .config import ExperimentConfig, resolve

    run = Path(run)
    records = load_jobs(run)
    if not records:
        raise GdroError(f"{run} has no {SLURM_DIR}/{JOBS}: nothing was submitted with gdro submit there")
    newest = {r["stage"]: r for r in records}
    lines = [f"{run}: {len(records)} job(s) submitted, newest {records[-1]['submitted']}"]
    for stage in STAGES:
        rec = newest.get(stage)
        if rec is None:
            continue
        cfg = resolve(ExperimentConfig, preset=None, files=(rec["config"],))
        base = Path(rec.get("cwd", "."))

        def where(p, base=base) -> Path:  # paths in the config are relative to where gdro submit ran
            return Path(p) if Path(p).is_absolute() else base / p

        array = f" (array {rec['array']})" if rec.get("array") else ""
        lines.append(f"  {stage:<8} job {rec['job_id']}{array}: {job_state(rec['job_id'])}")
        if stage == "rollouts":
            from .dataset_summary import rollout_status

            try:
                detail = rollout_status(where(cfg.rollouts.out))
            except GdroError:
                detail = f"{cfg.rollouts.out}: no task has started yet"
            lines += ["    " + line for line in detail.splitlines()]
        elif stage == "assemble":
            done = (where(cfg.rollouts.out) / "manifest.json").is_file()
            lines.append(f"    manifest: {'written' if done else 'not yet'}")
        elif stage == "train":
            from .runs import progress

            lines.append("    " + progress(where(cfg.train.out), cfg.train.steps))
        else:
            out = where(cfg.eval.out) if cfg.eval.out else where(cfg.train.out) / "eval"
            done = (out / "results.json").is_file()
            lines.append(f"    results: {out / 'results.json' if done else 'not yet'}")
    return "\n".join(lines)
