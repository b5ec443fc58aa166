"""The `gdro` command line: one subcommand per stage. User errors end in one line on stderr and exit code 2."""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import click

from schemas.codec import ShardError

from .errors import GdroError

CONFIG_OPTIONS = [
    click.option("--preset", default="toy", show_default=True,
                 help="Experiment preset (pipeline/presets/NAME.yaml); `gdro config presets` lists them."),
    click.option("--config", "files", multiple=True, type=click.Path(dir_okay=False),
                 help="YAML file merged over the preset (repeatable)."),
    click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                 help="Override one key, e.g. --set rollouts.group_size=4 (repeatable; values parse as YAML)."),
]


def config_options(fn):
    for opt in reversed(CONFIG_OPTIONS):
        fn = opt(fn)
    return fn


def _experiment(preset, files, overrides, *, show: bool = True):
    from .config import ExperimentConfig, dump, resolve

    cfg = resolve(ExperimentConfig, preset=preset, files=tuple(files), overrides=tuple(overrides))
    if show:
        click.echo("# resolved config\n" + dump(cfg), err=True)
    return cfg


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="gdro")
def cli():
    """gdro: offline, group-level reward post-training for text-to-image rectified-flow models.

    \b
    Stage one  `gdro rollouts`  the frozen model draws G images per prompt, every reward scores them,
                               everything lands in sharded WebDataset tars + Parquet + a manifest.
    Stage two  `gdro train`     DeepSpeed ZeRO training of a group-weighted loss from those shards only.
    Then       `gdro eval`      reference vs. trained model on held-out prompts, with the same noise.

    With no arguments every command runs the embedded toy world (CPU, minutes).
    """


@cli.command("compare")
@config_options
@click.option("--variant", "variants", multiple=True, required=True, metavar="LOSS[:KEY=VALUE,...]",
              help="A loss with optional overrides, e.g. dgpo or dpo:train.beta=50 (repeatable).")
@click.option("--out", default="runs/compare", show_default=True, type=click.Path(file_okay=False))
@click.option("--ceiling", default=None, type=click.Path(file_okay=False),
              help="The eval folder of the ground-truth ceiling (make ceiling: runs/toy-ceiling/eval).")
@click.option("--doc", default=None, type=click.Path(dir_okay=False), help="Also write the table here.")
def compare(preset, files, overrides, variants, out, ceiling, doc):
    """Train and evaluate each variant on the same dataset, steps, seeds and held-out noise; one table."""
    if files:
        raise GdroError("gdro compare takes --preset and --set only (each run re-reads them)")
    from stages.compare import main as run

    click.echo(run(preset, list(overrides), list(variants), Path(out), Path(ceiling) if ceiling else None,
                   Path(doc) if doc else None))


@cli.command("rounds")
@config_options
@click.option("--rounds", "n_rounds", default=3, show_default=True, help="Rounds of rollouts -> train -> eval.")
@click.option("--out", default="runs/rounds", show_default=True, type=click.Path(file_okay=False),
              help="One folder per round (round_K/{dataset, run, eval}), summary.md and summary.png.")
def rounds(preset, files, overrides, n_rounds, out):
    """Rounds: rollouts from the current model -> train -> export -> eval, N times (round 1 = the offline run).

    \b
    Each round samples from the previous round's export; its manifest records the lineage. Rerun the same
    command to resume a killed chain where it stopped (finished rounds, shards and checkpoints are kept).
    """
    cfg = _experiment(preset, files, overrides)
    from stages.rounds import main as run

    click.echo(run(cfg, rounds=n_rounds, out=Path(out)))


# the comparison's own scale (about 65 minutes on 2 CPU cores, measured; docs/offline_vs_online.md), before the user's --set
COMPARISON_SETTINGS = ("rollouts.num_prompts=256", "train.steps=200", "train.save_every=40",
                       "train.keep_checkpoints=10", "eval.num_prompts=150", "online.iterations=100000",
                       "online.eval_every=4", "online.groups=8", "online.updates=4")


@cli.command("offline-vs-online")
@config_options
@click.option("--rounds", "n_rounds", default=2, show_default=True, help="Rounds of the offline chain (2-3).")
@click.option("--extra-loss", "extra", multiple=True, default=("nft",), show_default=True,
              help="Other losses trained on round 1's dataset (repeatable; 'none' for none): experiments it serves "
                   "without generating an image.")
@click.option("--online", "online_methods", multiple=True, default=("dgpo", "nft", "flow-grpo"), show_default=True,
              type=click.Choice(["dgpo", "nft", "flow-grpo"]), help="Online baselines to run (repeatable).")
@click.option("--ceiling", default="", help="The ground-truth ceiling: a model folder, or 'train' to fit it here.")
@click.option("--out", default="runs/offline_vs_online", show_default=True, type=click.Path(file_okay=False))
@click.option("--docs", default=None, type=click.Path(file_okay=False),
              help="Write the table into DOCS/offline_vs_online.md and the figure into DOCS/img/.")
def offline_vs_online(preset, files, overrides, n_rounds, extra, online_methods, ceiling, out, docs):
    """Offline gdro (train.loss), its rounds, other losses on the same dataset, and the online BASELINES
    (DGPO, NFT, Flow-GRPO) on one task against wall-clock seconds; one table and one figure. Resumable."""
    cfg = _experiment(preset, files, COMPARISON_SETTINGS + tuple(overrides))
    from stages.offline_vs_online import main as run

    ceiling_dir = Path(ceiling) if ceiling else None
    if ceiling == "train":  # the toy world's ceiling, for the comparison's training compute
        from stages.toy_ceiling import main as fit_ceiling

        ceiling_dir = Path(out) / "ceiling" / "export"
        if not ceiling_dir.is_dir():
            fit_ceiling(cfg, out=ceiling_dir.parent)
    extra = tuple(x for x in extra if x != "none")
    click.echo(run(cfg, out=Path(out), n_rounds=n_rounds, extra_losses=extra, online=tuple(online_methods),
                   ceiling=ceiling_dir, docs=Path(docs) if docs else None))


@cli.command("online")
@config_options
def online(preset, files, overrides):
    """A BASELINE for comparison, not a product recipe: online DGPO, DiffusionNFT or Flow-GRPO (online.method)
    sampling from the current policy every iteration, on the product's model, prompts and rewards; writes
    online.out/{curve.jsonl, result.json, export/}."""
    cfg = _experiment(preset, files, overrides)
    from stages.baselines.online import main as run

    res = run(cfg)
    last = res["curve"][-1]
    click.echo(f"{res['method']}: {res['iterations']} iterations, {res['wall_s']:.0f} s, {res['images']} images; "
               f"{res['target']} {res['curve'][0][res['target']]:.3f} -> {last[res['target']]:.3f}")


# ------------------------------------------------------------------------------------------------ config
@cli.group()
def config():
    """Show presets and resolved configurations."""


@config.command("presets")
def config_presets():
    """List the experiment presets."""
    from .config import preset_names

    for name in preset_names():
        click.echo(name)


@config.command("show")
@config_options
def config_show(preset, files, overrides):
    """Print the resolved experiment config (preset <- files <- --set overrides) as YAML."""
    from .config import dump

    click.echo(dump(_experiment(preset, files, overrides, show=False)), nl=False)


# ------------------------------------------------------------------------------------------------ stages
@cli.command()
@config_options
@click.option("--task-id", type=int, default=None,
              help="This task's index (default: SLURM_ARRAY_TASK_ID, else RANK, else 0).")
@click.option("--num-tasks", type=int, default=None,
              help="Number of tasks sharing the work (default: the Slurm array size, else WORLD_SIZE, else 1).")
@click.option("--assemble-only", is_flag=True, help="Only (re)write manifest.json and README.md from the stats files.")
def rollouts(preset, files, overrides, task_id, num_tasks, assemble_only):
    """Stage one: generate G images per prompt, score them, write the sharded dataset.

    \b
    Task t of T writes the shards s with s % T == t; rerunning skips finished shards (their
    .stats.json exists and checksums match) and removes leftovers of unfinished ones. A folder
    generated with another configuration is refused, naming the keys that differ.
    """
    cfg = _experiment(preset, files, overrides)
    from stages.rollouts import main as run

    run(cfg, task_id=task_id, num_tasks=num_tasks, assemble_only=assemble_only)


@cli.command()
@click.argument("dataset")
def verify(dataset):
    """Check a dataset (a folder or a URL): checksums, schema version, member sets, counts. Exits 1 naming every
    bad shard."""
    from schemas.manifest import verify_dataset

    from .remote import is_url, mirror

    if is_url(dataset):  # fetched into a temporary folder, each file checked against the manifest as it arrives
        with tempfile.TemporaryDirectory(prefix="gdro-verify-") as tmp:
            try:
                problems = verify_dataset(mirror(dataset, Path(tmp)))
            except ShardError as e:
                problems = [str(e)]
    else:
        problems = verify_dataset(Path(dataset))
    for p in problems:
        click.echo(f"BAD {p}")
    if problems:
        raise SystemExit(1)
    click.echo(f"OK {dataset}")


@cli.command()
@click.argument("dataset")
@click.option("--sheet", type=click.Path(dir_okay=False), default=None,
              help="Contact sheet PNG (default: DATASET/contact_sheet.png; ./contact_sheet.png for a URL).")
@click.option("--groups", "n_groups", default=6, show_default=True, help="Groups on the contact sheet.")
def inspect(dataset, sheet, n_groups):
    """Summarise a dataset (groups, images, reward means per reward and per kind, zero-spread groups) and
    draw a contact sheet of a few groups sorted by reward."""
    from .dataset_summary import inspect_dataset
    from .remote import is_url, mirror

    if not is_url(dataset):
        click.echo(inspect_dataset(Path(dataset), Path(sheet) if sheet else None, n_groups))
        return
    with tempfile.TemporaryDirectory(prefix="gdro-inspect-") as tmp:  # fetched and checked, as for verify
        click.echo(inspect_dataset(mirror(dataset, Path(tmp)), Path(sheet or "contact_sheet.png"), n_groups)
                   .replace(tmp, dataset))


@cli.command()
@click.argument("dataset")
@click.option("--reward", "reward", required=True, metavar="NAME[=PARAMS]",
              help="The reward to add, with its parameters as a YAML mapping, e.g. 'pickscore={path: models/ps}'.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The new revision's folder.")
def rescore(dataset, reward, out):
    """Add a reward to a dataset from its stored images, into a new revision (OUT): new group JSON and Parquet
    column, the other members copied byte for byte, a manifest recording the lineage (parent manifest sha256,
    reward and engine version). The parent is only read. Resumable per shard: rerun the same command."""
    from stages.rescore import main as run

    click.echo(f"OK {run(dataset, reward, Path(out))}")


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False))
def status(folder):
    """Progress of a dataset being generated, or of a run submitted with `gdro submit`.

    \b
    A dataset folder: shards done per task, images/s, whether the manifest is written.
    A run folder (train.out): each submitted job's Slurm state (queued, running, done, requeued), the
    rollouts' shards per array task, the manifest, the training step and checkpoint, the evaluation.
    """
    from .slurm import load_jobs, run_status

    if load_jobs(Path(folder)):
        click.echo(run_status(Path(folder)))
        return
    from .dataset_summary import rollout_status

    click.echo(rollout_status(Path(folder)))


@cli.command()
@click.argument("stage", type=click.Choice(["rollouts", "train", "eval", "all"]))
@config_options
@click.option("--dry-run", is_flag=True, help="Print the rendered sbatch scripts; write and submit nothing.")
@click.option("--after", metavar="JOBID", default=None,
              help="Start only once this job succeeded (--dependency=afterok:JOBID).")
def submit(stage, preset, files, overrides, dry_run, after):
    """Submit a stage to Slurm: render cluster/STAGE.sbatch from the config (slurm.* for the site) and sbatch it.

    \b
    rollouts  an array job, one task per shard by default (slurm.rollouts_tasks), %N throttle
    train     N nodes x torchrun (slurm.train_nodes, slurm.gpus_per_node), requeues itself on preemption
    eval      one task
    all       rollouts -> manifest assembly -> train -> eval, each after the previous (afterok)
    The resolved config, the rendered scripts, the job ids (jobs.jsonl) and the job logs go to
    <train.out>/slurm/; `gdro status <train.out>` follows the jobs.
    """
    cfg = _experiment(preset, files, overrides, show=False)
    from .slurm import submit as run

    run(cfg, stage, dry_run=dry_run, after=after, echo=click.echo)


@cli.command()
@config_options
@click.option("--resume/--no-resume", default=None,
              help="Continue from the newest checkpoint in train.out (default: resume when one exists).")
def train(preset, files, overrides, resume):
    """Stage two: DeepSpeed training of the group-weighted loss from the shards.

    \b
    Single process:  gdro train
    Several:         torchrun --standalone --nproc_per_node 2 -m pipeline.cli train
    Reads only train.dataset (no sampling, no text encoder, VAE or reward model); writes
    train.out/{config.json, metrics.jsonl, tensorboard/, checkpoints/, export/}.
    """
    cfg = _experiment(preset, files, overrides, show=os.environ.get("RANK", "0") == "0")
    from stages.train import main as run

    run(cfg, resume=resume)


@cli.command("eval")
@config_options
def eval_(preset, files, overrides):
    """Sample held-out prompts from the reference and the trained model with the same noise; score both."""
    cfg = _experiment(preset, files, overrides)
    from stages.evaluate import main as run

    run(cfg)


@cli.command()
@config_options
@click.option("--out", default="bench/out", show_default=True, type=click.Path(file_okay=False))
@click.option("--repeats", default=3, show_default=True, help="Timed repeats per case (best is kept).")
@click.option("--full-size", is_flag=True, help="The SD3.5-Medium benchmark for one GPU (random weights, nothing "
              "downloaded; refuses without CUDA): writes OUT/full_size.md. Ignores the config options.")
@click.option("--reduced", is_flag=True, help="With --full-size: the same at reduced depth and width on any device "
              "(the CPU smoke run); writes OUT/full_size_reduced.md.")
@click.option("--peak-tflops", type=float, default=None, help="With --full-size: the device's dense bf16 peak, "
              "TFLOP/s (default: looked up by device name).")
@click.option("--work", type=click.Path(file_okay=False), default=None,
              help="With --full-size: where its temporary model (5 GB), dataset and runs go (default: $TMPDIR).")
def bench(preset, files, overrides, out, repeats, full_size, reduced, peak_tflops, work):
    """Benchmarks, ours vs. the plain alternative in one run: rollouts, their overlap with rewards, training step
    vs. bare PyTorch, data share, cached vs. live reference, a pairwise loss on 2 vs. G members, shard reading
    (writes its own small dataset). Writes OUT/results.md. --full-size: SD3.5-Medium on one GPU (stages/bench_full.py)."""
    if reduced and not full_size:
        raise GdroError("--reduced goes with --full-size (gdro bench --full-size --reduced)")
    if full_size:
        from stages.bench_full import main as run_full

        run_full(reduced=reduced, out=Path(out), peak_tflops=peak_tflops, work=Path(work) if work else None)
        return
    cfg = _experiment(preset, files, overrides, show=False)
    from stages.bench import main as run

    run(cfg, out=Path(out), repeats=repeats)


# ------------------------------------------------------------------------------------------------ toy world
@cli.group()
def toy():
    """The embedded toy world: prompts, base-model pre-training, sample grids."""


@toy.command("prompts")
@click.option("--out", default="prompts", show_default=True, type=click.Path(file_okay=False))
@click.option("--train", "n_train", default=2000, show_default=True, help="Lines in toy_train.jsonl.")
@click.option("--test", "n_test", default=300, show_default=True, help="Lines in toy_test.jsonl.")
def toy_prompts(out, n_train, n_test):
    """Write the deterministic, disjoint train/test prompt files (GenEval metadata JSONL)."""
    from .toy.prompts import write_prompt_files

    Path(out).mkdir(parents=True, exist_ok=True)
    for path in write_prompt_files(Path(out), n_train, n_test):
        click.echo(f"wrote {path}")


@toy.command("pretrain")
@click.option("--config", "files", multiple=True, type=click.Path(dir_okay=False), help="YAML file of pretrain keys.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a pretrain key, e.g. --set steps=500 --set out=runs/mine (repeatable).")
def toy_pretrain(files, overrides):
    """Pre-train the toy base model (text encoder + small UNet) on rendered scenes with noisy captions.

    A rerun with the same settings resumes from <out>/state (same result as an uninterrupted run).

    The shipped weights in models/toy-base come from two runs (`make toy-base`): --config
    pipeline/toy/recipes/base_stage1.yaml, then base_stage2.yaml; see docs/toy_world.md.
    """
    from .config import ToyPretrainConfig, dump, resolve

    cfg = resolve(ToyPretrainConfig, files=tuple(files), overrides=tuple(overrides))
    click.echo("# resolved config\n" + dump(cfg), err=True)
    from stages.toy_pretrain import main as run

    click.echo(f"saved {run(cfg)}")


@toy.command("ceiling")
@config_options
@click.option("--out", default="runs/toy-ceiling", show_default=True, type=click.Path(file_okay=False))
@click.option("--lr", type=float, default=None,
              help="AdamW learning rate of the flow-matching fit [default: train.lr with LoRA, 1e-4 with --full].")
@click.option("--full", is_flag=True, help="Fit every weight, even when the run trains a LoRA adapter "
                                           "(train.lora_rank > 0; by default the ceiling trains the same one).")
@click.option("--seed", default=0, show_default=True)
@click.option("--t-draws", type=click.Choice(["pretrain", "training"]), default="pretrain", show_default=True,
              help="Timesteps fitted: the pre-training law (logit-normal on [0, 1]) or those of the dataset's "
                   "cached draws (rollouts.t_law on [rollouts.t_min, rollouts.t_max]), as `gdro train` sees.")
def toy_ceiling(preset, files, overrides, out, lr, full, seed, t_draws):
    """The ground-truth ceiling (outside the paradigm): fit the base to true renders of the training prompts
    for the compute of `gdro train`, then write <out>/export. Evaluate it with
    `gdro eval --set eval.checkpoint=<out>/export --set eval.out=<out>/eval` (or `make ceiling`)."""
    cfg = _experiment(preset, files, overrides)
    from stages.toy_ceiling import main as run

    click.echo(f"wrote {run(cfg, out=Path(out), lr=lr, seed=seed, t_draws=t_draws, lora=False if full else None)}")


def toy_sampler_options(f):
    """--steps / --guidance of the toy commands that sample; unset, the toy preset's (see _toy_sampler)."""
    f = click.option("--guidance", type=float, default=None,
                     help="Classifier-free guidance [default: the toy preset's sampler.guidance].")(f)
    return click.option("--steps", type=int, default=None,
                        help="Euler steps [default: the toy preset's sampler.steps].")(f)


def _toy_sampler(steps: int | None, guidance: float | None):
    """The toy preset's sampler (that of rollouts and `gdro eval`: scheduler, steps, shift, guidance), with
    --steps / --guidance replacing their fields where given."""
    preset = _experiment("toy", (), (), show=False).sampler
    return dataclasses.replace(preset, steps=preset.steps if steps is None else steps,
                               guidance=preset.guidance if guidance is None else guidance)


@toy.command("samples")
@click.option("--model", default="models/toy-base", show_default=True, type=click.Path())
@click.option("--out", default="docs/toy_base_samples.png", show_default=True, type=click.Path(dir_okay=False))
@click.option("--prompts", default="prompts/toy_test.jsonl", show_default=True, type=click.Path())
@click.option("--per-kind", default=4, show_default=True, help="Prompts shown per kind.")
@click.option("--seeds", default=4, show_default=True, help="Images per prompt.")
@toy_sampler_options
def toy_samples(model, out, prompts, per_kind, seeds, steps, guidance):
    """Draw a labelled sample grid of a toy model on test prompts, with the verifier's verdicts."""
    from .toy.grid import sample_grid

    path = sample_grid(model, Path(out), prompts, _toy_sampler(steps, guidance), per_kind=per_kind, seeds=seeds)
    click.echo(f"wrote {path}")


@toy.command("score")
@click.option("--model", default="models/toy-base", show_default=True, type=click.Path())
@click.option("--prompts", default="prompts/toy_test.jsonl", show_default=True, type=click.Path())
@toy_sampler_options
@click.option("--limit", default=0, help="Only the first N prompt lines (0 = all).")
@click.option("--seed", default=777, show_default=True, help="Noise seeds (777 = gdro eval's eval.base_seed).")
def toy_score(model, prompts, steps, guidance, limit, seed):
    """Sample one image per test prompt line, print the verifier's per-kind table, the true renders' table of
    the same lines and the checks a toy base model must pass (it draws; it composes unreliably)."""
    from .backends.toy import ToyBackend
    from .eval.fixed_noise import sample_prompt_set
    from .eval.tables import format_table, kind_table
    from .prompt_files import load_prompts
    from .toy.scoring import base_target_checks, score_images, true_render_scores

    sampler = _toy_sampler(steps, guidance)
    metas = load_prompts(prompts)
    metas = metas[:limit] if limit else metas
    kinds = [m["tag"] for m in metas]
    images = sample_prompt_set(ToyBackend.from_pretrained(model), metas, sampler, base_seed=seed)
    table = kind_table(score_images(images, metas), kinds)
    truth = kind_table(true_render_scores(metas), kinds)
    click.echo(f"{model} on {len(metas)} lines of {prompts} ({sampler.steps} Euler steps, guidance "
               f"{sampler.guidance:g}):\n{format_table(table)}")
    click.echo(f"\ntrue renders of the same lines:\n{format_table(truth)}\n\nbase-model checks:")
    for what, value, met in base_target_checks(table, truth["quality"]["overall"]):
        click.echo(f"  {'PASS' if met else 'MISS'}  {what}: {value:.3f}")


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="gdro", standalone_mode=False)
    except (GdroError, ShardError) as e:  # a user's mistake or a dataset breaking the contract: one line
        click.echo(f"gdro: error: {e}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("gdro: aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
