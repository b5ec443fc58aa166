"""Recipe, stage two: DeepSpeed ZeRO training of a group-weighted loss, reading only the shards.

setup (distributed, data, transformer, optional LoRA, reference, engine, resume) -> train (shared t and eps per
group, policy errors, reference errors from the cache or a live model, loss, metrics) -> checkpoint every N
steps through DeepSpeed on all ranks -> export what diffusers loads. The run folder and its writers are
pipeline/runs.py, preemption and requeue pipeline/preemption.py. No text encoder, VAE or reward model is ever
loaded here.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import runs
from pipeline.adapters import trainable
from pipeline.backends.base import Conditioning, dataset_velocity, load_transformer
from pipeline.config import ExperimentConfig, TrainConfig, save_resolved
from pipeline.distributed import deepspeed_config, init_distributed, print0
from pipeline.ema import WeightEMA
from pipeline.errors import GdroError
from pipeline.eval.selection import Selector
from pipeline.flow import error_weight, flow_errors, nft_branch_errors, sample_t
from pipeline.losses import (
    EVERY_GROUP,
    NEEDS_REFERENCE,
    NEEDS_VELOCITY,
    batch_std,
    PAIRWISE,
    group_loss,
    kl_penalty,
    member_rows,
    pair_members,
    pairwise_accuracy,
)
from pipeline.preemption import Preemption, requeue_on_preemption
from pipeline.train_data import check_datasets, group_batches
from schemas.seeds import noise_for

LORA_TARGETS = TrainConfig().lora_targets  # the default: every attention projection of these names


def resolve_reference(mode: str, manifest: dict, lora: bool, needs_velocity: bool = False) -> str:
    """needs_velocity (a loss of NEEDS_VELOCITY): auto takes a live reference even when the dataset has a cache."""
    has_cache = manifest["reference_cache"]["K"] > 0
    if mode == "auto":
        return "cache" if has_cache and not needs_velocity else ("lora" if lora else "copy")
    if mode == "cache" and needs_velocity:
        raise GdroError("train.reference=cache: the loss needs the reference's velocities, which the cache does not "
                        "store; use train.reference=auto (a live reference)")
    if mode == "cache" and not has_cache:
        raise GdroError("train.reference=cache, but the dataset was generated with rollouts.ref_cache_k=0; use "
                        "train.reference=auto (a live reference) or regenerate with a cache")
    return mode


def ds_config(t, world: int, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": t.groups_per_step,  # in groups; DeepSpeed only uses it for bookkeeping
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": {"stage": t.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # a client torch AdamW: no compiled op needed
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _group_generators(seed: int, step: int, first: int, n: int) -> list[torch.Generator]:
    """One generator per group, seeded by (seed, step, the group's position in the step's global batch): the
    draws depend neither on how the global batch is split over ranks nor on a restart."""
    def one(pos: int) -> torch.Generator:
        digest = hashlib.sha256(f"{seed}:{step}:{pos}:train-draw".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))

    return [one(first + i) for i in range(n)]


def _draws(batch: dict, ref: str, t_cfg, gens: list[torch.Generator], shape) -> tuple:
    """Per group, from its own generator: (t [N], eps [N, C, H, W], cached reference errors [N, G] or None)."""
    n = len(gens)
    if ref == "cache":
        k = torch.cat([torch.randint(batch["ref_t"].shape[1], (1,), generator=g) for g in gens])
        t = batch["ref_t"][torch.arange(n), k]
        eps = torch.stack([noise_for(int(batch["ref_noise_seeds"][i][int(k[i])]), shape) for i in range(n)])
        return t, eps, batch["ref_errors"][torch.arange(n), k]
    t = torch.cat([sample_t(1, g, law=t_cfg.t_law, t_min=t_cfg.t_min, t_max=t_cfg.t_max) for g in gens])
    return t, torch.stack([torch.randn(shape, generator=g) for g in gens]), None


def _averaged_groups(loss: str, out_) -> torch.Tensor:
    """[N] bool: the groups `loss` is a mean over (pipeline/losses.py): raft and nft every group, the others those
    with reward spread."""
    return torch.ones_like(out_.signal) if loss in EVERY_GROUP else out_.signal


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(x)
    return x


def _frozen_copy(model: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    """The live reference for train.reference=copy, cast as DeepSpeed casts the engine's module (parameters to
    the training dtype, buffers such as SD3's position table kept as they are), so that it computes exactly
    what the policy computes at step 0."""
    ref = copy.deepcopy(model).requires_grad_(False).eval().to(device)
    for p in ref.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return ref


def main(cfg: ExperimentConfig, *, resume: bool | None = None) -> Path:
    import deepspeed
    import torch.distributed as dist

    t = cfg.train
    rank, world, _local, device = init_distributed()
    out = Path(t.out)
    ckdir = out / runs.CHECKPOINTS
    start_tag = runs.latest_tag(out)
    # every refusal comes before anything is written: a refused run leaves the folder as it was
    if resume is False and start_tag is not None:
        raise GdroError(f"{out} already holds checkpoints; resume it (drop --no-resume) or choose a new train.out")
    if resume is True and start_tag is None:
        raise GdroError(f"--resume: {ckdir} holds no checkpoint to resume; drop --resume to start a new run")
    check_datasets(t.dataset, t.reward_weights, verify=t.verify_shards, mix=t.dataset_weights)  # folders or URLs
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out / runs.CONFIG)
    torch.manual_seed(t.seed)

    # ---- data (a resumed run skips the batches it already used, after the checkpoint is loaded)
    manifest, loader = group_batches(t.dataset, groups=t.groups_per_step, weights=t.reward_weights,
                                     seed=t.seed, rank=rank, world=world, workers=t.num_workers,
                                     shuffle_buffer=t.shuffle_buffer, order=t.data_order, mix=t.dataset_weights)
    G = manifest["group_size"]
    shape = tuple(manifest["generator"]["latent_shape"])
    lora = t.lora_rank > 0
    needs_ref = t.loss in NEEDS_REFERENCE or t.loss in NEEDS_VELOCITY or t.kl_beta
    ref_mode = resolve_reference(t.reference, manifest, lora, t.loss in NEEDS_VELOCITY) if needs_ref else "none"
    if ref_mode == "cache" and t.kl_beta:
        raise GdroError("train.kl_beta > 0 needs a live reference: set train.reference=lora or copy")
    gen_sha = manifest["generator"]["weights_sha256"].get("transformer/diffusion_pytorch_model.safetensors")
    from schemas.records import sha256_file

    here = Path(cfg.model.path) / "transformer/diffusion_pytorch_model.safetensors"
    if ref_mode == "cache" and gen_sha and here.is_file() and sha256_file(here) != gen_sha:
        raise GdroError(f"model.path {cfg.model.path} is not the model that generated {t.dataset} (weights sha256 "
                        f"differ), so the cached reference errors do not apply; train from the generator's weights")
    velocity = dataset_velocity(cfg.model.backend, manifest)  # the backend's own, as in stage one

    # ---- model, reference, engine
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    dtype = torch.bfloat16 if bf16 else torch.float32  # DeepSpeed casts the engine's module and inputs to it
    transformer = load_transformer(cfg.model.backend, cfg.model.path, dtype)  # no float32 copy of a bf16 model
    reference = _frozen_copy(transformer, device, dtype) if ref_mode == "copy" else None
    params = trainable(transformer, t, lora)  # the adapter is added here, before checkpointing and train mode
    if t.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    n_trainable = sum(p.numel() for p in params)  # counted before ZeRO-3 partitions them away (numel 0)
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, t.warmup_steps)))
    engine, _, _, _ = deepspeed.initialize(model=transformer, optimizer=optimizer, lr_scheduler=sched,
                                           config=deepspeed_config(ds_config(t, world, bf16), t.deepspeed_config,
                                                                   t.zero_stage))
    ema = WeightEMA(engine.module, t.ema_decay) if t.ema_decay else None
    step = 0
    if start_tag:
        # a LoRA checkpoint holds no frozen weights (save_checkpoint): those stay as loaded from model.path
        _, client = engine.load_checkpoint(str(ckdir), tag=start_tag, load_module_strict=not lora)
        step = int(client["step"])
        if ema is not None:
            if "ema" not in client:
                raise GdroError(f"{ckdir / start_tag} holds no EMA of the weights (it was trained without "
                                f"train.ema_decay); resume with train.ema_decay=0 or start a new train.out")
            ema.load_state_dict(client["ema"])
        print0(f"train: resumed from {ckdir / start_tag} at step {step}")
    print0(f"train: {n_trainable / 1e6:.3f} M trainable parameters ({'LoRA' if lora else 'full'}), "
           f"loss {t.loss}, reference {ref_mode}, ZeRO-{t.zero_stage}, {dtype}, {world} rank(s), G={G}"
           + (f", EMA {t.ema_decay:g}" if ema is not None else ""))

    def policy_v(x, tt, c):
        return velocity(engine, x, tt, c)

    def reference_v(x, tt, c):
        if ref_mode == "lora":
            engine.module.disable_adapters()
            try:
                return velocity(engine.module, x, tt, c)
            finally:
                engine.module.enable_adapters()
        return velocity(reference, x, tt, c)

    # ---- loop
    if rank == 0:
        runs.trim_jsonl(out / runs.METRICS, step)
    metrics_f = open(out / runs.METRICS, "a") if rank == 0 else None  # noqa: SIM115  open for the whole loop
    tb = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out / runs.TENSORBOARD))
    select = Selector(cfg, out, rank, step, ema=ema) if t.eval_every else None  # train.eval_every: keep <out>/best
    it = iter(loader)
    for _ in range(step):  # resume: skip the batches the run already used, so
        next(it)  # it continues exactly as an uninterrupted run would (same data, same per-step seeds)
    bar = tqdm(total=t.steps, initial=step, desc="train", unit="step", disable=rank != 0, dynamic_ncols=True)
    t_last, cpu_last = time.time(), time.process_time()
    with Preemption() as stop:  # SIGUSR2/SIGTERM: checkpoint, then requeue; the old handlers come back after
        while step < t.steps:
            t_data, cpu_data = time.time(), time.process_time()
            batch = next(it)
            data_s = time.time() - t_data  # time waiting for the loader: the bench's data-loading share
            data_cpu_s = time.process_time() - cpu_data
            n = batch["rewards"].shape[0]
            tt, eps, ref_cached = _draws(batch, ref_mode, t, _group_generators(t.seed, step, rank * n, n), shape)
            x0 = batch["latents"].reshape(n * G, *shape).to(device, dtype)
            eps_g = eps.repeat_interleave(G, 0).to(device, dtype)  # one eps and one t per group
            t_g = tt.repeat_interleave(G, 0).to(device)
            cond = Conditioning(batch["prompt_embeds"], batch["pooled_embeds"]).repeat_interleave(G).to(device, dtype)
            valid = batch["valid"].to(device)
            all_rewards = batch["rewards"].to(device)
            all_rewards = torch.where(valid.unsqueeze(1), all_rewards, torch.zeros_like(all_rewards))  # invalid: no spread
            rewards, m = all_rewards, G
            if ref_cached is not None:
                ref_cached = ref_cached.to(device, torch.float32)
            if t.loss in PAIRWISE and not t.kl_beta:
                # dpo / raft read each group's best and worst member only: errors for those two, not all G (the same
                # loss and gradient, G / 2 times fewer forward and backward passes)
                pick = pair_members(all_rewards)
                flat = member_rows(pick, G)
                x0, eps_g, t_g, cond = x0[flat], eps_g[flat], t_g[flat], cond[flat]
                rewards, m = torch.gather(all_rewards, 1, pick), 2
                if ref_cached is not None:
                    ref_cached = torch.gather(ref_cached, 1, pick)
            err, v = flow_errors(policy_v, x0, eps_g, t_g, cond, return_velocity=True)
            kl = torch.zeros((), device=device)
            if ref_mode in ("lora", "copy"):
                with torch.no_grad():
                    ref_err, v_ref = flow_errors(reference_v, x0, eps_g, t_g, cond, return_velocity=True)
                if t.kl_beta:
                    kl = kl_penalty(v, v_ref)
                ref_err = ref_err.view(n, m)
            else:
                ref_err = ref_cached
            w = error_weight(tt, t.error_param).to(device).unsqueeze(1)  # the same factor for policy and reference
            # adv_scope=batch: the std over every image of the global batch, all ranks (as DGPO's and Flow-GRPO's code)
            adv_std = batch_std(all_rewards.float(), _sum_over_ranks) if t.adv_scope == "batch" else None
            if t.loss in NEEDS_VELOCITY:  # nft: its own (adaptive) weighting of the two branches' x0 errors
                pos, neg = nft_branch_errors(v, v_ref, x0, eps_g, t_g, t.nft_beta)
                out_ = group_loss(t.loss, pos.view(n, G), None, rewards.float(), beta=t.beta, adv_scope=t.adv_scope,
                                  adv_clip=t.adv_clip, neg_err=neg.view(n, G), nft_beta=t.nft_beta, adv_std=adv_std)
            else:
                out_ = group_loss(t.loss, err.view(n, m) * w, ref_err * w if ref_err is not None else None,
                                  rewards.float(), beta=t.beta, adv_scope=t.adv_scope, adv_clip=t.adv_clip, tau=t.tau,
                                  adv_std=adv_std)
            # The losses average over this rank's groups with signal, and DeepSpeed averages gradients over ranks: with
            # unequal counts per rank that is not the mean over the global batch. Scaling by count x world / global
            # count makes it exactly that mean (what one process with the whole global batch computes), whatever the
            # spread of the groups on each rank. One all-reduce also gives the logged loss as the global mean.
            counted = _averaged_groups(t.loss, out_).sum().double()
            totals = torch.stack([counted, out_.loss.detach().double() * counted, kl.detach().double()]).to(device)
            dist.all_reduce(totals)
            n_global = float(totals[0])
            scale = float(counted) * world / n_global if n_global > 0 else 1.0
            loss = out_.loss * scale + t.kl_beta * kl
            loss_global = (float(totals[1]) / n_global if n_global > 0 else 0.0) + t.kl_beta * float(totals[2]) / world
            engine.backward(loss)
            engine.step()
            if ema is not None:
                ema.update(engine.module)
            step += 1
            now, cpu_now = time.time(), time.process_time()
            sig = out_.signal
            record = {
                "step": step, "loss": loss_global, "kl": float(totals[2]) / world,  # means over all ranks
                "implicit_acc": pairwise_accuracy(out_.rho.detach(), rewards),
                "rho_mean": float(out_.rho.detach().mean()),
                "abs_adv": float(out_.advantages[sig].abs().mean()) if sig.any() else 0.0,
                "zero_spread": float((~sig & valid).float().mean()), "invalid_groups": int((~valid).sum()),
                "reward_mean": float(all_rewards[valid].mean()) if valid.any() else float("nan"),
                "grad_norm": float(engine.get_global_grad_norm() or 0.0), "lr": float(sched.get_last_lr()[0]),
                "images_per_s": n * G * world / max(now - t_last, 1e-9), "t_mean": float(tt.mean()),
                "step_s": now - t_last, "data_s": data_s,
                "step_cpu_s": cpu_now - cpu_last, "data_cpu_s": data_cpu_s,  # this process's CPU time, for the bench
            }
            t_last, cpu_last = now, cpu_now
            if rank == 0:
                metrics_f.write(json.dumps(record) + "\n")
                metrics_f.flush()
                for k, v_ in record.items():
                    if k != "step" and np.isfinite(v_):
                        tb.add_scalar(f"train/{k}", v_, step)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['implicit_acc']:.2f}",
                                r=f"{record['reward_mean']:.3f}")
            if select is not None and step % t.eval_every == 0 and select(engine, step):  # train.patience reached
                runs.save_checkpoint(engine, cfg, ckdir, step, rank, ema)
                break
            preempted = stop.any_rank(device)
            if step % t.save_every == 0 or step == t.steps or preempted:
                runs.save_checkpoint(engine, cfg, ckdir, step, rank, ema)
            if preempted:
                print0(f"train: preemption signal: checkpointed at step {step}; exiting for requeue")
                requeue_on_preemption(rank, stop.requeue_requested)  # rank 0 in a Slurm job: scontrol requeue
                return out
    bar.close()
    if rank == 0:
        metrics_f.close()
        tb.close()
    runs.export(engine, cfg, out / runs.EXPORT, lora=lora, rank=rank, ema=ema)
    return out
