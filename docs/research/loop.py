"""Plain-torch research loop behind the rows marked "loop" in docs/research/LOG.md (not product code): the toy model, a
live frozen reference, fresh (t, eps) draws per group, optional EMA of the weights and an A+-weighted flow-matching
term (`--sft_on all`: every member, equal weights: the model fitted to its own samples). `--loss render` is a
ceiling diagnostic outside the paradigm: flow matching on true renders of the training prompts. The model, dataset, test prompts, eval seed and sampler come from a preset's config (`--preset`, toy by
default; `--set` overrides as in the CLI); evaluates on the first --eval_n test lines like `gdro eval`. Run from
the repo root:
  OMP_NUM_THREADS=1 .venv/bin/python docs/research/loop.py --lr 5e-5 --ema 0.99 --tmin 0.5 --scope batch"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pipeline.backends.base import Conditioning, transformer_velocity
from pipeline.backends.toy import ToyBackend
from pipeline.config import ExperimentConfig, resolve
from pipeline.eval.fixed_noise import evaluate_backend, verifier_of
from pipeline.eval.tables import kind_table
from pipeline.flow import flow_errors, sample_t
from pipeline.losses import group_loss
from pipeline.prompt_files import load_prompts
from pipeline.toy.prompts import sample_scene, split_pools
from pipeline.toy.world import render, to_unit
from pipeline.train_data import _to_item, shard_urls
from schemas.manifest import iter_tar_groups

p = argparse.ArgumentParser()
p.add_argument("--preset", default="toy")
p.add_argument("--set", dest="overrides", action="append", default=[])  # section.key=value, as in the CLI
p.add_argument("--weights", default='{"toy_geneval": 1.0}')
p.add_argument("--loss", default="dgpo")
p.add_argument("--beta", type=float, default=500)
p.add_argument("--lr", type=float, default=1e-5)
p.add_argument("--steps", type=int, default=300)
p.add_argument("--groups", type=int, default=8)
p.add_argument("--draws", type=int, default=1)  # (t, eps) draws per group per step
p.add_argument("--ema", type=float, default=0.0)
p.add_argument("--param", default="x0")
p.add_argument("--sft", type=float, default=0.0)  # + weight * flow matching on members with A > 0 (A-weighted)
p.add_argument("--sft_on", default="pos")  # pos: members with A > 0, A-weighted | all: every member, equal weights
# --loss awr: that term alone (no DGPO term)
p.add_argument("--eval_n", type=int, default=300)
p.add_argument("--eval_every", type=int, default=0)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--tmin", type=float, default=0.0)
p.add_argument("--tmax", type=float, default=1.0)
p.add_argument("--out", default="")
p.add_argument("--scope", default="group")
a = p.parse_args()

torch.manual_seed(a.seed)
weights = json.loads(a.weights)
cfg = resolve(ExperimentConfig, preset=a.preset, overrides=tuple(a.overrides))
_, urls = shard_urls(Path(cfg.train.dataset))
items = []
for u in urls:
    for key, raw in iter_tar_groups(Path(u)):
        items.append(_to_item({"__key__": key, "__url__": u, **raw}, weights))
print(f"{len(items)} groups", flush=True)

base = ToyBackend.from_pretrained(cfg.model.path)
policy = base.transformer
policy.train()
ref = copy.deepcopy(policy).eval().requires_grad_(False)
ema = copy.deepcopy(policy).eval().requires_grad_(False) if a.ema else None
opt = torch.optim.AdamW(policy.parameters(), lr=a.lr, weight_decay=0.0)
metas = load_prompts(cfg.eval.prompts)[: a.eval_n]
sampler = cfg.sampler


def vel(module):
    return lambda x, t, c: transformer_velocity(module, x, t, c)


def evaluate(step):
    m = ema if ema is not None else policy
    be = ToyBackend(m, base.text_encoder)
    m.eval()
    _, scores = evaluate_backend(be, metas, sampler, base_seed=cfg.eval.base_seed, seeds=1, batch=cfg.eval.batch_size,
                                 verifier=verifier_of("toy"))
    policy.train()
    tab = kind_table({k: scores[k] for k in ("strict", "partial", "quality")}, [m["tag"] for m in metas])
    res = {k: tab[k]["overall"] for k in tab}
    print(f"EVAL step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)
    print("  strict per kind: " + " ".join(f"{k} {v:.2f}" for k, v in tab["strict"].items()), flush=True)
    return res


gen = torch.Generator().manual_seed(a.seed)
rng = np.random.default_rng(a.seed)
hist = []
t0 = time.time()
accs = []
def warm_up(step):
    for gparam in opt.param_groups:
        gparam["lr"] = a.lr * min(1.0, step / 10)


def ema_step():
    if ema is not None:
        with torch.no_grad():
            for pe_p, pp in zip(ema.parameters(), policy.parameters()):
                pe_p.lerp_(pp, 1 - a.ema)


def finish_step(step, progress):
    """Clip, step, average; a progress line every 20 steps; an evaluation every --eval_every (the last at the end)."""
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step()
    ema_step()
    if step % 20 == 0:
        print(f"step {step} {progress} {time.time() - t0:.0f}s", flush=True)
    if a.eval_every and step % a.eval_every == 0 and step != a.steps:
        hist.append({"step": step, **evaluate(step)})


train_pool = split_pools()[0]  # --loss render: the training prompts' true scenes (a ceiling diagnostic only)
for step in range(1, a.steps + 1):
    if a.loss == "render":  # plain flow matching on true renders, not on the model's samples: what perfect data gives
        metas_b = [train_pool[int(rng.integers(len(train_pool)))] for _ in range(a.groups * 8)]
        x0 = torch.from_numpy(np.stack([to_unit(render(sample_scene(m, rng))) for m in metas_b]))
        with torch.no_grad():
            cond = base.encode_prompts([m["prompt"] for m in metas_b])
        t = sample_t(x0.shape[0], gen, law="logit_normal", t_min=0.0, t_max=1.0)
        eps = torch.randn(x0.shape, generator=gen)
        warm_up(step)
        opt.zero_grad()
        loss = flow_errors(vel(policy), x0, eps, t, cond).mean()
        loss.backward()
        finish_step(step, f"loss {loss.item():.4f}")
        continue
    idx = rng.choice(len(items), a.groups, replace=False)
    batch = [items[i] for i in idx]
    x0 = torch.stack([b["latents"] for b in batch])  # N G C H W
    N, G = x0.shape[:2]
    rewards = torch.stack([b["rewards"] for b in batch])
    pe = torch.stack([b["prompt_embeds"] for b in batch])
    po = torch.stack([b["pooled_embeds"] for b in batch])
    cond = Conditioning(pe, po).repeat_interleave(G)
    warm_up(step)
    opt.zero_grad()
    total = 0.0
    for d in range(a.draws):
        t = a.tmin + (a.tmax - a.tmin) * torch.rand(N, generator=gen)
        eps = torch.randn(N, *x0.shape[2:], generator=gen)
        tg = t.repeat_interleave(G)
        eg = eps.repeat_interleave(G, 0)
        xf = x0.flatten(0, 1)
        err = flow_errors(vel(policy), xf, eg, tg, cond)
        with torch.no_grad():
            rerr = flow_errors(vel(ref), xf, eg, tg, cond)
        w = tg ** 2 if a.param == "x0" else torch.ones_like(tg)
        pe_, re_ = (err * w).view(N, G), (rerr * w).view(N, G)
        out = group_loss("dgpo" if a.loss == "awr" else a.loss, pe_, re_, rewards, beta=a.beta, adv_scope=a.scope)
        loss = out.loss if a.loss != "awr" else 0.0 * out.loss
        if a.sft:
            pos = out.advantages.clamp(min=0) if a.sft_on == "pos" else torch.ones_like(out.advantages)
            loss = loss + a.sft * (pos * (err * w).view(N, G)).sum() / pos.sum().clamp(min=1e-6)
        (loss / a.draws).backward()
        total += loss.item() / a.draws
        with torch.no_grad():
            r = out.rho
            dr = rewards.unsqueeze(2) - rewards.unsqueeze(1)
            dp = r.unsqueeze(2) - r.unsqueeze(1)
            m = dr > 1e-6
            if m.any():
                accs.append(((dp > 0) & m).sum().item() / m.sum().item())
    finish_step(step, f"loss {total:.4f} acc {np.mean(accs[-20 * a.draws:]):.3f}")
hist.append({"step": a.steps, **evaluate(a.steps)})
if a.out:
    Path(a.out).write_text(json.dumps({"args": vars(a), "hist": hist}))
