"""What every online baseline shares: the policy and its frozen reference, prompts drawn per iteration, rollouts'
noise, scoring by the mixed rewards, evaluation with eval's fixed noise, and the loop that times it all."""
from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.adapters import merged, trainable
from pipeline.backends.base import Conditioning, backend_from_config, velocity_fn
from pipeline.config import ExperimentConfig, save_resolved
from pipeline.errors import GdroError
from pipeline.eval.fixed_noise import eval_rewards, evaluate_backend, verifier_of
from pipeline.eval.tables import kind_table
from pipeline.prompt_files import load_prompts
from pipeline.rewards import make_reward
from pipeline.train_data import mixed_rewards
from schemas.layout import atomic_write
from schemas.seeds import member_seed, noise_for

CURVE = "curve.jsonl"
RESULT = "result.json"


@dataclass
class Online:
    """The state of one online run: `backend.transformer` is the policy being trained (the backend samples with it)."""
    cfg: ExperimentConfig
    backend: object
    velocity: Callable  # velocity(module, x, t, cond)
    reference: torch.nn.Module  # the frozen base
    pool: list[dict]
    rewards: list
    opt: torch.optim.Optimizer
    group_size: int
    images: int = 0  # images generated so far
    log: list[dict] = field(default_factory=list)  # per-iteration training diagnostics

    @property
    def policy(self) -> torch.nn.Module:
        return self.backend.transformer

    def v(self, module) -> Callable:
        return lambda x, t, c: self.velocity(module, x, t, c)


def setup(cfg: ExperimentConfig) -> Online:
    torch.manual_seed(cfg.online.seed)
    backend = backend_from_config(cfg)
    if backend.dtype != torch.float32:
        raise GdroError("the online baselines train in float32: set model.dtype=float32")
    policy = backend.transformer
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    policy.train().requires_grad_(True)
    # the parameters `gdro train` trains: the run's LoRA adapter when train.lora_rank > 0, else every weight
    params = trainable(policy, cfg.train, cfg.train.lora_rank > 0)
    pool = load_prompts(cfg.rollouts.prompts)
    pool = pool[: cfg.rollouts.num_prompts] if cfg.rollouts.num_prompts else pool
    if cfg.online.groups > len(pool):
        raise GdroError(f"online.groups={cfg.online.groups} but the prompt pool holds {len(pool)} prompts")
    names = list(cfg.train.reward_weights)
    missing = [n for n in names if n not in cfg.rollouts.rewards]
    if missing:
        raise GdroError(f"train.reward_weights names {', '.join(missing)}, absent from rollouts.rewards (where "
                        f"the online baselines take each reward's parameters)")
    rewards = [make_reward(n, cfg.rollouts.rewards[n]) for n in names]
    opt = torch.optim.AdamW(params, lr=cfg.online.lr or cfg.train.lr,
                            weight_decay=cfg.train.weight_decay)
    return Online(cfg, backend, velocity_fn(cfg.model.backend, guidance=cfg.sampler.guidance), reference, pool,
                  rewards, opt, cfg.rollouts.group_size)


def draw_prompts(s: Online, iteration: int) -> list[dict]:
    """online.groups distinct prompts of the pool, from (seed, iteration) alone: a rerun draws the same."""
    rng = np.random.default_rng([s.cfg.online.seed, iteration])
    return [s.pool[int(i)] for i in rng.choice(len(s.pool), s.cfg.online.groups, replace=False)]


def initial_noise(s: Online, iteration: int, n_groups: int) -> torch.Tensor:
    """[n_groups * G, C, H, W]: a different start per member (a deterministic sampler needs it for spread)."""
    g = s.group_size
    return torch.stack([noise_for(member_seed(s.cfg.online.seed, slot, m, f"online{iteration}"),
                                  s.backend.latent_shape) for slot in range(n_groups) for m in range(g)])


def encode(s: Online, metas: list[dict]) -> Conditioning:
    with torch.no_grad():
        return s.backend.encode_prompts([m["prompt"] for m in metas]).repeat_interleave(s.group_size)


def score(s: Online, latents: torch.Tensor, metas: list[dict]) -> torch.Tensor:
    """[n, G] float32 mixed rewards (train.reward_weights) of the decoded images; a missing score is refused."""
    g = s.group_size
    images = s.backend.decode(latents)
    per_image = [m for m in metas for _ in range(g)]
    texts = [m["prompt"] for m in per_image]
    raw = {rw.name: np.asarray(rw.fn(images, texts, per_image)[0], np.float64).reshape(-1) for rw in s.rewards}
    rows = []
    for i in range(len(metas)):
        r, valid = mixed_rewards({k: list(v[i * g:(i + 1) * g]) for k, v in raw.items()}, s.cfg.train.reward_weights,
                                 "an online rollout")
        if not valid:
            raise GdroError(f"a reward returned no score for prompt {metas[i]['prompt']!r}")
        rows.append(r)
    s.images += len(images)
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def scores_of(backend, cfg: ExperimentConfig, metas: list[dict], rewards: dict) -> dict[str, float]:
    """eval.target and eval.out_of_domain[0] of a model, overall as `gdro eval` reports them (mean over kinds),
    with eval.base_seed noise: the same numbers `gdro eval` gives it on these lines. Every point of the
    offline-vs-online comparison is scored by this one function."""
    e = cfg.eval
    _, scores = evaluate_backend(backend, metas, cfg.sampler, base_seed=e.base_seed, seeds=e.seeds,
                                 batch=e.batch_size, rewards=rewards, verifier=verifier_of(cfg.model.backend))
    names = (e.target, e.out_of_domain[0])
    table = kind_table({n: scores[n] for n in names}, [m["tag"] for m in metas for _ in range(e.seeds)])
    return {n: table[n]["overall"] for n in names}


def evaluate(s: Online, metas: list[dict], rewards: dict) -> dict[str, float]:
    s.policy.eval()
    try:
        return scores_of(s.backend, s.cfg, metas, rewards)
    finally:
        s.policy.train()


def eval_lines(cfg: ExperimentConfig) -> list[dict]:
    metas = load_prompts(cfg.eval.prompts)
    n = cfg.online.eval_num_prompts or cfg.eval.num_prompts
    return metas[:n] if n else metas


def run(cfg: ExperimentConfig, iterate: Callable[[Online, int], dict], name: str) -> dict:
    """The loop: evaluate at 0, every online.eval_every iterations and at the end (online.iterations, or the first
    iteration past online.max_wall_s); `iterate(s, it)` samples from the current policy, scores and updates.
    Wall-clock counts the iterations only (evaluation is measurement).
    Writes <online.out>/{config.json, curve.jsonl, result.json, export/}; returns result.json's content."""
    o = cfg.online
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out / "config.json")
    s = setup(cfg)
    metas = eval_lines(cfg)
    ev_rewards = eval_rewards(cfg)
    curve, wall = [], 0.0

    def point(it: int) -> None:
        curve.append({"iteration": it, "wall_s": round(wall, 3), "images": s.images, **evaluate(s, metas, ev_rewards)})

    point(0)
    bar = tqdm(range(1, o.iterations + 1), desc=f"online {name}", unit="it", dynamic_ncols=True)
    done = 0
    for it in bar:
        t0 = time.time()
        info = iterate(s, it)
        wall += time.time() - t0
        done = it
        s.log.append({"iteration": it, **info})
        bar.set_postfix({k: f"{v:.3f}" for k, v in info.items() if isinstance(v, float)})
        over = bool(o.max_wall_s) and wall >= o.max_wall_s
        if it % o.eval_every == 0 or it == o.iterations or over:
            point(it)
        if over:
            break
    bar.close()
    atomic_write(out / CURVE, "".join(json.dumps(c) + "\n" for c in curve).encode())
    atomic_write(out / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in s.log).encode())
    if hasattr(s.backend, "save_pretrained"):
        tmp = out / "export.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        s.policy.eval()
        if cfg.train.lora_rank:  # a plain model folder, the adapter merged, as `gdro train` exports
            s.backend.transformer = merged(s.policy, cfg.model.backend, cfg.model.path, cfg.train).eval()
        s.backend.save_pretrained(tmp)
        shutil.rmtree(out / "export", ignore_errors=True)
        tmp.rename(out / "export")
    result = {"method": name, "iterations": done, "wall_s": round(wall, 3), "images": s.images,
              "target": cfg.eval.target, "out_of_domain": cfg.eval.out_of_domain[0], "curve": curve}
    atomic_write(out / RESULT, (json.dumps(result, indent=1) + "\n").encode())  # last: the run is complete
    return result
