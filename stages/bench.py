"""Recipe: benchmarks, each a ratio of ours vs. the plain alternative measured in the same run on the same
machine (absolute times on a shared CPU mean little). Writes bench/out/results.md and results.json; a row with a
goal (the stage-two performance goals) says PASS or MISS beside its figure.

- rollouts end to end: `gdro rollouts` vs. a plain prompt-by-prompt loop, and its wall-time shares; the dataset
  it writes (in a temporary folder: the bench needs nothing but a clone) feeds every training row below;
- rollouts sampling: batches spanning prompts (`rollouts.batch_size` images) vs. one prompt's G images per batch;
- rollouts overlap (`stages/bench_overlap.py`): the pipelined command's wall time vs. the max and the sum of
  sampling-only and rewards-only times, with a reward of set cost (goal <= 1.15x the max);
- training, the real trainer (`stages.train.main`, cached reference): the data-loading share of its step time
  (goal <= 5 %), and its median step time vs. a bare PyTorch forward + backward + AdamW step of the same model
  on the same batch (goal: overhead <= 10 %), with DeepSpeed's part of that overhead on its own;
- training step: reference errors from the stage-one cache vs. a live frozen copy of the model (goal <= 0.8x);
- training step of a pairwise loss (`dpo`, `raft`): errors of each group's best and worst member only vs. every
  member;
- shard reading: gdro's group pipeline (no image decoding) vs. decoding every member with webdataset.

Timed steps alternate between the variants compared (per step, or in blocks before and after the trainer run),
so load from other jobs hits both sides alike. Every training row is also given in CPU seconds of this process
(DataLoader worker processes, if train.num_workers > 0, not counted), which such load disturbs less than wall
time; the verdict is on wall time, the CPU figure hints whether a miss is the machine's.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

from pipeline.backends.base import Conditioning, load_backend, load_transformer
from pipeline.config import ExperimentConfig
from pipeline.flow import flow_errors
from pipeline.sampling import SamplerConfig, sample
from stages.bench_overlap import bench_overlap
from stages.bench_real import bench_sd3_rollouts

DATA_SHARE_GOAL = 0.05  # data loading <= 5 % of the trainer's step time
OVERHEAD_GOAL = 1.10  # trainer step <= 1.10 x a bare forward + backward + optimiser step
REFERENCE_GOAL = 0.80  # cached-reference step <= 0.8 x a live-reference step


def _timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _alternating(fns: dict, n: int, warmup: int = 2) -> dict[str, list[tuple[float, float]]]:
    """Run the callables in turn, `warmup` untimed rounds then `n` timed ones: {name: [(wall s, CPU s)]}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(n):
        for k, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            times[k].append((time.perf_counter() - w, time.process_time() - c))
    return times


def _medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def bench_sampling(cfg: ExperimentConfig, n_prompts: int, repeats: int) -> dict:
    backend = load_backend(cfg.model.backend, cfg.model.path)
    g = cfg.rollouts.group_size
    sampler = SamplerConfig(steps=cfg.sampler.steps)
    cond = backend.encode_prompts(["a photo of a red circle and a blue square"] * n_prompts)
    noise = torch.randn(n_prompts * g, *backend.latent_shape)
    full = cond.repeat_interleave(g)

    def batched():
        for s in range(0, len(noise), cfg.rollouts.batch_size):
            sample(backend, noise[s:s + cfg.rollouts.batch_size], full[s:s + cfg.rollouts.batch_size], sampler)

    def per_prompt():
        for p in range(n_prompts):
            sample(backend, noise[p * g:(p + 1) * g], cond[p:p + 1].repeat_interleave(g), sampler)

    a, b = _timeit(batched, repeats), _timeit(per_prompt, repeats)
    return {"name": "rollouts sampling, images/s", "ours": len(noise) / a, "plain": len(noise) / b,
            "ours_label": f"batches of {cfg.rollouts.batch_size} across prompts", "plain_label": f"one prompt ({g} images) per batch"}


def bench_rollouts(cfg: ExperimentConfig, n_prompts: int, dataset: Path) -> list[dict]:
    """`gdro rollouts` end to end (sampling, decoding, every reward, reference cache, encoding, writing) vs. a
    plain loop calling the same model prompt by prompt (G images per call, same sampler, nothing scored or
    written); and where the rollouts' wall time goes, from the shards' own stats. The dataset stays in `dataset`."""
    import dataclasses

    from pipeline.prompt_files import load_prompts
    from schemas.records import ShardStats
    from stages.rollouts import main as rollouts

    g = cfg.rollouts.group_size
    r = dataclasses.replace(cfg.rollouts, out=str(dataset), num_prompts=n_prompts, prompts_per_shard=n_prompts // 2)
    t0 = time.perf_counter()
    rollouts(dataclasses.replace(cfg, rollouts=r))
    ours = time.perf_counter() - t0
    stats = [ShardStats.load(p) for p in sorted(Path(dataset, "shards").glob("[0-9]*.stats.json"))]
    backend = load_backend(cfg.model.backend, cfg.model.path)
    metas = load_prompts(cfg.rollouts.prompts)[:n_prompts]
    null = backend.encode_prompts([""]) if cfg.sampler.guidance != 1.0 else None
    t0 = time.perf_counter()
    for m in metas:
        cond = backend.encode_prompts([m["prompt"]]).repeat_interleave(g)
        backend.decode(sample(backend, torch.randn(g, *backend.latent_shape), cond, cfg.sampler, null_cond=null))
    plain = time.perf_counter() - t0
    images = n_prompts * g
    in_shards = sum(st.seconds for st in stats)  # without the one-off start-up (model load, fingerprint)
    rows = [{"name": "rollouts, images/s", "ours": images / ours, "plain": images / plain,
             "ours_label": "`gdro rollouts` whole command incl. start-up, rewards, cache, writing",
             "plain_label": "prompt-by-prompt loop, images only"},
            {"name": "rollouts per shard, images/s", "ours": images / in_shards, "plain": images / plain,
             "ours_label": "`gdro rollouts` shards (sum of stats seconds)", "plain_label": "prompt-by-prompt loop, images only"}]
    for phase in ("sampling", "rewards", "reference_cache", "writing"):
        share = sum(st.timings.get(phase, 0.0) for st in stats) / ours
        rows.append({"name": f"rollouts wall-time share: {phase} (pipelined phases overlap)", "share": share})
    rows.append({"name": "rollouts wall-time share: start-up and the rest", "share": 1 - in_shards / ours})
    return rows


# ------------------------------------------------------------------------------------------------ training
def _cpu_steps(records: list[dict]) -> list[tuple[float, float]] | None:
    """Per step (step CPU s, loader CPU s) as the trainer logged them in metrics.jsonl (`step_cpu_s`,
    `data_cpu_s`); None when its records do not carry them."""
    if not records or not all("step_cpu_s" in r and "data_cpu_s" in r for r in records):
        return None
    return [(r["step_cpu_s"], r["data_cpu_s"]) for r in records]


def _run_trainer(cfg: ExperimentConfig) -> tuple[list[dict], list[tuple[float, float]] | None]:
    """stages.train.main in this process (metrics.jsonl records, per-step CPU times), leaving the process as it
    found it: the trainer installs signal handlers (Preemption) and sets the distributed environment variables."""
    import signal

    from stages import train

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    env = dict(os.environ)
    try:
        out = train.main(cfg, resume=False)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        os.environ.clear()
        os.environ.update(env)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return records, _cpu_steps(records)


def _training_batch(cfg: ExperimentConfig):
    """The trainer's first batch of its dataset, as it feeds the model: x0, eps, t, conditioning ([N*G, ...], one
    t and eps per group), in the trainer's dtype; and the dataset's velocity function (the trainer's)."""
    from pipeline.backends.base import dataset_velocity
    from pipeline.train_data import group_batches

    t = cfg.train
    manifest, loader = group_batches(Path(t.dataset), groups=t.groups_per_step, weights=t.reward_weights,
                                     seed=t.seed, rank=0, world=1, workers=0, shuffle_buffer=t.shuffle_buffer)
    batch = next(iter(loader))
    n, g = batch["rewards"].shape
    shape = tuple(manifest["generator"]["latent_shape"])
    dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32  # "auto" is fp32 on a CPU, as in the trainer
    gen = torch.Generator().manual_seed(0)
    x0 = batch["latents"].reshape(n * g, *shape).to(dtype)
    eps = torch.randn((n, *shape), generator=gen).repeat_interleave(g, 0).to(dtype)
    tt = torch.rand(n, generator=gen).repeat_interleave(g, 0)
    cond = Conditioning(batch["prompt_embeds"], batch["pooled_embeds"]).repeat_interleave(g).to(dtype)
    return (x0, eps, tt, cond), dataset_velocity(cfg.model.backend, manifest), dtype


def _optimizer(cfg: ExperimentConfig, model):
    t = cfg.train
    return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999))


def _bare_step(cfg: ExperimentConfig, batch, velocity, dtype):
    """Plain PyTorch: the same transformer and batch, the same velocity function, the flow-matching MSE to the
    target velocity, backward, a torch AdamW step. No DeepSpeed, no data loading, no logging."""
    model = load_transformer(cfg.model.backend, cfg.model.path).train()
    if dtype != torch.float32:
        model.to(dtype)
    opt = _optimizer(cfg, model)
    x0, eps, tt, cond = batch

    def step():
        loss = flow_errors(lambda x, t_, c: velocity(model, x, t_, c), x0, eps, tt, cond).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _deepspeed_step(cfg: ExperimentConfig, batch, velocity, dtype):
    """The bare step through the trainer's DeepSpeed engine (its config, optimiser and schedule): what DeepSpeed
    alone adds, without the trainer's loop (draws, loss, metrics, TensorBoard, tqdm, preemption check)."""
    import deepspeed

    from pipeline.distributed import deepspeed_config, init_distributed
    from stages.train import ds_config

    t = cfg.train
    init_distributed()
    model = load_transformer(cfg.model.backend, cfg.model.path).train()
    opt = _optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, t.warmup_steps)))
    config = deepspeed_config(ds_config(t, 1, dtype == torch.bfloat16), t.deepspeed_config, t.zero_stage)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
    x0, eps, tt, cond = batch

    def step():
        loss = flow_errors(lambda x, t_, c: velocity(engine, x, t_, c), x0, eps, tt, cond).mean()
        engine.backward(loss)
        engine.step()

    return step


def _bench_train_cfg(cfg: ExperimentConfig, dataset: Path, out: Path, steps: int) -> ExperimentConfig:
    """The configured training on the bench's dataset for `steps` steps, with a cached reference and full
    fine-tuning (what the bare step does too), no evaluations during training, one checkpoint after the last
    timed step."""
    import dataclasses

    from pipeline.losses import PAIRWISE

    # a pairwise loss trains on 2 of G members (bench_pairwise); the overhead row needs a loss reading all G, as
    # the bare step does
    loss = "dgpo" if cfg.train.loss in PAIRWISE else cfg.train.loss
    t = dataclasses.replace(cfg.train, dataset=str(dataset), out=str(out), steps=steps, save_every=steps,
                            reference="cache", lora_rank=0, kl_beta=0.0, eval_every=0, loss=loss)
    return dataclasses.replace(cfg, train=t)


def bench_training(cfg: ExperimentConfig, batch, velocity, dtype, *, warmup: int, bare_steps: int) -> list[dict]:
    """The real trainer (`cfg` from `_bench_train_cfg`), the first `warmup` steps left out: its data-loading
    share, sum(data_s) / sum(step_s) from metrics.jsonl, and its median step_s against the bare PyTorch step of
    the same model on the same batch (its first). The bare and the DeepSpeed-only steps alternate, in two blocks
    of about `bare_steps / 2` each: before and after the trainer's run."""
    env = dict(os.environ)  # _deepspeed_step sets the distributed variables; put back at the end
    t = cfg.train
    fns = {"bare": _bare_step(cfg, batch, velocity, dtype), "deepspeed": _deepspeed_step(cfg, batch, velocity, dtype)}
    before = _alternating(fns, bare_steps // 2)
    records, cpu = _run_trainer(cfg)
    after = _alternating(fns, bare_steps - bare_steps // 2)
    os.environ.clear()
    os.environ.update(env)

    kept = records[warmup:]
    bare_w, bare_c = _medians(before["bare"] + after["bare"])
    ds_w, ds_c = _medians(before["deepspeed"] + after["deepspeed"])
    ours_w = statistics.median(r["step_s"] for r in kept)
    ours_c = statistics.median(c[0] for c in cpu[warmup:]) if cpu else None
    n_img = len(batch[0])
    share = {"name": f"training: data-loading share of the trainer's step time ({len(kept)} steps after "
                     f"{warmup} warm-up)", "share": sum(r["data_s"] for r in kept) / sum(r["step_s"] for r in kept),
             "cpu_share": sum(c[1] for c in cpu[warmup:]) / sum(c[0] for c in cpu[warmup:]) if cpu else None,
             "goal": DATA_SHARE_GOAL}
    step = {"name": f"training step time, s ({t.groups_per_step} groups, {n_img} images, "
                    f"{str(dtype).removeprefix('torch.')})",
            "ours": ours_w, "plain": bare_w, "cpu_ours": ours_c, "cpu_plain": bare_c, "goal": OVERHEAD_GOAL,
            "ours_label": "`gdro train`, median step_s, cached reference",
            "plain_label": "bare PyTorch fwd + bwd + AdamW, same model and batch"}
    ds = {"name": "training step time, s: DeepSpeed engine alone (where the overhead goes)", "ours": ds_w,
          "plain": bare_w,
          "cpu_ours": ds_c, "cpu_plain": bare_c,
          "ours_label": f"DeepSpeed ZeRO-{t.zero_stage} engine, trainer's config, no loop",
          "plain_label": "bare PyTorch, same batch"}
    return [share, step, ds]


def bench_reference(cfg: ExperimentConfig, batch, velocity, steps: int) -> dict:
    """One training step with the reference errors read from the batch (the stage-one cache: free) vs. computed
    by a live frozen copy of the model, alternating step by step on the same batch."""
    torch.manual_seed(0)
    x0, eps, tt, cond = batch
    model = load_transformer(cfg.model.backend, cfg.model.path).train()
    if x0.dtype != torch.float32:
        model.to(x0.dtype)
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    opt = _optimizer(cfg, model)

    def step(live: bool):
        err = flow_errors(lambda x, t_, c: velocity(model, x, t_, c), x0, eps, tt, cond)
        if live:
            with torch.no_grad():
                ref = flow_errors(lambda x, t_, c: velocity(frozen, x, t_, c), x0, eps, tt, cond)
        else:
            ref = torch.zeros_like(err)  # read from the batch: free
        loss = (err - ref).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = _alternating({"cached": lambda: step(False), "live": lambda: step(True)}, steps)
    (cw, cc), (lw, lc) = _medians(times["cached"]), _medians(times["live"])
    return {"name": "training step time, s: cached vs. live reference", "ours": cw, "plain": lw, "cpu_ours": cc,
            "cpu_plain": lc, "goal": REFERENCE_GOAL, "ours_label": "reference errors from the stage-one cache",
            "plain_label": "live frozen reference copy"}


def bench_pairwise(cfg: ExperimentConfig, batch, velocity, dtype, steps: int) -> dict:
    """A pairwise loss's step (`dpo`, `raft`: the trainer computes errors for each group's best and worst member
    only, `losses.pair_members`) vs. the same step over every member of the group, alternating on one batch."""
    from pipeline.losses import member_rows, pair_members

    x0, eps, tt, cond = batch
    g = cfg.rollouts.group_size
    n = x0.shape[0] // g
    rewards = torch.rand(n, g, generator=torch.Generator().manual_seed(0))
    flat = member_rows(pair_members(rewards), g)
    picked = (x0[flat], eps[flat], tt[flat], cond[flat])
    fns = {"pair": _bare_step(cfg, picked, velocity, dtype), "all": _bare_step(cfg, batch, velocity, dtype)}
    times = _alternating(fns, steps)
    (pw, pc), (aw, ac) = _medians(times["pair"]), _medians(times["all"])
    return {"name": f"training step time, s: a pairwise loss (dpo, raft), {n} groups of G = {g}", "ours": pw,
            "plain": aw, "cpu_ours": pc, "cpu_plain": ac,
            "ours_label": "errors of each group's best and worst member (2 images a group)",
            "plain_label": f"errors of every member ({g} images a group)"}


def bench_reading(dataset: Path, repeats: int) -> dict:
    import webdataset as wds

    from pipeline.train_data import group_batches, shard_urls

    manifest, urls = shard_urls(dataset)
    n = manifest["totals"]["groups"]
    weights = {manifest["rewards"][0]["name"]: 1.0}

    def ours():
        _, loader = group_batches(dataset, groups=1, weights=weights, seed=0, rank=0, world=1, workers=0,
                                  shuffle_buffer=1)
        it = iter(loader)
        for _ in range(n):
            next(it)

    def plain():
        for _ in wds.WebDataset(urls, shardshuffle=False).decode("rgb"):
            pass

    a, b = _timeit(ours, repeats), _timeit(plain, repeats)
    return {"name": "shard reading, groups/s", "ours": n / a, "plain": n / b,
            "ours_label": "gdro group pipeline (arrays only, whitelist decoder)", "plain_label": "webdataset .decode('rgb') of every member"}


# ------------------------------------------------------------------------------------------------ the table
def _verdict(ok: bool, cpu_ok: bool | None) -> str:
    word = "PASS" if ok else "**MISS**"
    if cpu_ok is not None and cpu_ok != ok:
        word += f" (in CPU time: {'PASS' if cpu_ok else 'MISS'})"
    return word


def table(rows: list[dict]) -> str:
    """Markdown; fills in each row's ratio (ours / plain) and, where there is a goal, `pass` (and `cpu_pass`)."""
    lines = ["| benchmark | ours | plain alternative | ratio | ratio in CPU time | goal | result |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        goal = r.get("goal")
        if "text" in r:  # a figure without a plain alternative (a throughput, an out-of-memory note)
            lines.append(f"| {r['name']} | {r['text']} | | | | | |")
            continue
        if "share" in r:
            cpu = r.get("cpu_share")
            fig = f"{100 * r['share']:.1f} %" + (f" (CPU time {100 * cpu:.1f} %)" if cpu is not None else "")
            if goal is None:
                lines.append(f"| {r['name']} | {fig} | | | | | |")
                continue
            r["pass"] = r["share"] <= goal
            r["cpu_pass"] = None if cpu is None else cpu <= goal
            lines.append(f"| {r['name']} | {fig} | | | | <= {100 * goal:.0f} % | {_verdict(r['pass'], r['cpu_pass'])} |")
            continue
        r["ratio"] = r["ours"] / r["plain"]
        cpu = r["cpu_ours"] / r["cpu_plain"] if r.get("cpu_ours") and r.get("cpu_plain") else None
        r["cpu_ratio"] = cpu
        ratio, cpu_cell = f"{r['ratio']:.2f}x", "" if cpu is None else f"{cpu:.2f}x"
        if goal == OVERHEAD_GOAL:  # an overhead: say it in %
            ratio += f" ({100 * (r['ratio'] - 1):+.0f} %)"
            cpu_cell += "" if cpu is None else f" ({100 * (cpu - 1):+.0f} %)"
        digits = 3 if r["ours"] < 10 else 1
        cells = f"| {r['name']} | {r['ours']:.{digits}f} ({r['ours_label']}) | {r['plain']:.{digits}f} ({r['plain_label']}) "
        if goal is None:
            lines.append(f"{cells}| {ratio} | {cpu_cell} | | |")
            continue
        r["pass"] = r["ratio"] <= goal
        r["cpu_pass"] = None if cpu is None else cpu <= goal
        goal_cell = f"<= {goal:.2f}x" + (f" (overhead <= {100 * (goal - 1):.0f} %)" if goal == OVERHEAD_GOAL else "")
        lines.append(f"{cells}| {ratio} | {cpu_cell} | {goal_cell} | {_verdict(r['pass'], r['cpu_pass'])} |")
    return "\n".join(lines)


def main(cfg: ExperimentConfig, *, out: Path = Path("bench/out"), repeats: int = 3, train_steps: int = 50,
         warmup_steps: int = 5, bare_steps: int = 30) -> Path:
    import tempfile

    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = Path(tmp, "dataset")  # written by the rollouts rows, read by the training and reading rows
        rows = bench_rollouts(cfg, n_prompts=64, dataset=dataset)
        rows.append(bench_sampling(cfg, n_prompts=16, repeats=repeats))
        rows += bench_overlap(cfg, n_prompts=32, prompts_per_shard=2)
        train_cfg = _bench_train_cfg(cfg, dataset, Path(tmp, "run"), train_steps)
        batch, velocity, dtype = _training_batch(train_cfg)
        rows += bench_training(train_cfg, batch, velocity, dtype, warmup=warmup_steps, bare_steps=bare_steps)
        rows.append(bench_reference(train_cfg, batch, velocity, steps=bare_steps // 2))
        rows.append(bench_pairwise(train_cfg, batch, velocity, dtype, steps=bare_steps // 2))
        rows.append(bench_reading(dataset, repeats))
    rows += bench_sd3_rollouts()  # stages/bench_real.py: tiny SD3, `gdro rollouts` vs. diffusers' own pipeline
    load1 = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    head = (f"Measured in one run on this machine ({torch.get_num_threads()} threads; 1-minute load average "
            f"{load0[0]:.1f} at the start, {load1[0]:.1f} at the end); compare ratios, not absolute numbers. Time "
            f"rows: ratio = ours / plain, lower is better; the CPU-time ratio is the same steps in CPU seconds of "
            f"this process, which other jobs' load disturbs less than wall time; the result is on wall time.")
    (out / "results.md").write_text(f"{head}\n\n{text}\n")
    (out / "results.json").write_text(json.dumps({"threads": torch.get_num_threads(), "load_average": [load0, load1],
                                                  "rows": rows}, indent=1))
    print(text)
    return out
