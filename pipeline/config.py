"""Typed configuration: dataclasses, YAML presets, dotted command-line overrides, validation that names the key.

A config is built from defaults <- preset YAML <- user YAML <- ``--set a.b=value`` overrides, then checked:
unknown keys, wrong types and impossible values raise `GdroError` naming the dotted key. The resolved config
is printed at start and saved (JSON) beside every output.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml

from .errors import GdroError

PRESETS_DIR = Path(__file__).parent / "presets"
T = TypeVar("T")
TLaw = Literal["uniform", "logit_normal"]  # the law of t: uniform, or SD3's logit-normal


# ------------------------------------------------------------------------------------------------ the configs
@dataclass
class ModelConfig:
    backend: str = "toy"  # toy | sd3 | flux (registered in pipeline.backends)
    path: str = "models/toy-base"  # local folder; nothing is ever downloaded
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # float32 | bfloat16 | float16 (weights and activations)
    resolution: int = 0  # image side in pixels (square); 0 = the model's default (toy: 32, SD3.5/FLUX: 1024)
    max_sequence_length: int = 0  # T5 tokens per prompt; 0 = the backend's default (sd3: 256, flux: 512)

    def check(self, key: str) -> None:
        if self.resolution < 0 or self.max_sequence_length < 0:
            raise GdroError(f"{key}resolution and {key}max_sequence_length must be >= 0 (0 = the model's default)")


@dataclass
class SamplerConfig:
    scheduler: str = "FlowMatchEulerDiscreteScheduler"  # any diffusers FlowMatch* scheduler
    steps: int = 16  # ODE solver steps
    shift: float = 1.0  # timestep shift (SD3.5 uses 3.0); 0 = the model's own, resolution-dependent shift (flux
    # only: FluxPipeline's exp(mu), mu from the image's token count and the model's scheduler config)
    guidance: float = 1.0  # classifier-free guidance scale; 1 = off

    def check(self, key: str) -> None:
        _positive(f"{key}steps", self.steps)
        if self.shift < 0:
            raise GdroError(f"{key}shift must be > 0, or 0 for the model's own (flux), got {self.shift}")
        if self.guidance < 1.0:
            raise GdroError(f"{key}guidance must be >= 1 (1 disables guidance), got {self.guidance}")


@dataclass
class ToyPretrainConfig:
    out: str = "runs/toy-pretrain"  # output folder (weights, log, eval tables, resumable state)
    steps: int = 2400  # optimiser steps (the shipped models/toy-base is step 2400 of seed 0)
    batch_size: int = 64  # images per step
    lr: float = 3e-4  # AdamW, constant after warm-up
    warmup_steps: int = 200
    ema_decay: float = 0.995  # the saved weights are the EMA
    caption_dropout: float = 0.1  # share of empty prompts, so guidance can be used at sampling
    caption_noise: float = 0.7  # share of pairs of the noisy kinds whose image is of a perturbed scene (toy.prompts.perturb)
    # kinds whose captions are noisy (= toy.prompts.NOISY_KINDS; checked against PERTURBED_KINDS by the recipe)
    noisy_kinds: list[str] = field(default_factory=lambda: ["two_object", "counting", "position"])
    relation_noise: str = "other"  # a noisy relation is drawn on: other (any other side) | opposite (the first base)
    count_noise: str = "either"  # a noisy count n is drawn as: either (n - 1 or n + 1) | up (n + 1; n - 1 at the top) | down (n - 1)
    color_noise: str = "other"  # a noisy colour is: other (any other colour) | next (the palette's next one)
    seed: int = 0
    init: str = ""  # a toy model folder to start from (continued pre-training); "" = random weights from `seed`
    # false: the text encoder keeps its initial weights and only the denoiser learns (as a real base's frozen
    # CLIP/T5, and as the ceiling and stage two, which never train it)
    train_text_encoder: bool = True
    threads: int = 2  # torch CPU threads
    text_dim: int = 128
    denoiser: str = "unet"  # unet (UNet2DConditionModel, the shipped base) | sd3 (SD3Transformer2DModel)
    unet_channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # unet: channels at 32, 16, 8 px
    unet_layers_per_block: int = 1
    unet_cross_attention: int = 1  # unet: coarsest resolutions with cross-attention (1: 8x8 only; 2: also 16x16)
    layers: int = 6  # sd3: transformer blocks
    heads: int = 4  # sd3: attention heads
    head_dim: int = 32  # attention head width (both denoisers)
    patch_size: int = 4  # sd3
    eval_every: int = 400  # steps between evaluations of the EMA weights
    eval_prompts: str = "prompts/toy_test.jsonl"
    eval_n: int = 150  # prompt lines evaluated (one image each)
    eval_sampler_steps: int = 16
    eval_guidance: float = 1.0
    keep_every: int = 800  # also keep a weights folder every this many steps (0: only the final one)
    state_every: int = 100  # steps between resumable states (<out>/state/); a rerun of the same config resumes

    NOISE_CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "relation": ("other", "opposite"), "count": ("either", "up", "down"), "color": ("other", "next")}

    def check(self, key: str) -> None:
        for name in ("steps", "batch_size", "lr", "warmup_steps", "threads", "eval_every", "eval_n",
                     "state_every", "unet_layers_per_block", "unet_cross_attention"):
            _positive(f"{key}{name}", getattr(self, name))
        if not 0.0 <= self.ema_decay < 1.0:
            raise GdroError(f"{key}ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise GdroError(f"{key}caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.caption_noise <= 1.0:
            raise GdroError(f"{key}caption_noise must be in [0, 1], got {self.caption_noise}")
        for name, allowed in self.NOISE_CHOICES.items():  # = toy.prompts.CaptionNoise.CHOICES (a test checks)
            value = getattr(self, f"{name}_noise")
            if value not in allowed:
                raise GdroError(f"{key}{name}_noise must be {' or '.join(allowed)}, got {value!r}")
        if self.denoiser not in ("unet", "sd3"):
            raise GdroError(f"{key}denoiser must be unet or sd3, got {self.denoiser!r}")
        if self.denoiser == "unet" and self.unet_cross_attention > len(self.unet_channels):
            raise GdroError(f"{key}unet_cross_attention must be at most the number of UNet levels "
                            f"(len(unet_channels) = {len(self.unet_channels)}), got {self.unet_cross_attention}")


@dataclass
class RolloutsConfig:
    prompts: str = "prompts/toy_train.jsonl"  # .jsonl (GenEval metadata) or .txt (one prompt per line)
    num_prompts: int = 0  # use the first N prompts of the file; 0 = all
    out: str = "datasets/toy"  # dataset folder (shards/, manifest.json, README.md)
    group_size: int = 8  # G images per prompt
    prompts_per_shard: int = 32  # P: shard s holds prompts [s*P, (s+1)*P)
    batch_size: int = 64  # images per forward pass, across prompts (per GPU)
    base_seed: int = 0  # seeds are sha256(base_seed, prompt_id, member)
    rewards: dict[str, dict[str, Any]] = field(default_factory=lambda: {"toy_geneval": {}, "toy_quality": {}})
    # {reward name: its parameters}: every image is scored by each (raw scores stored; the mix is chosen in
    # train.reward_weights). Registered: toy_geneval, toy_strict, toy_quality, toy_color_area; ocr {backend: auto |
    # rapidocr | paddleocr, min_confidence, limit_side_len, det_model_path, rec_model_path (rapidocr ONNX files),
    # det_model_dir, rec_model_dir, det_model_name, rec_model_name (PaddleOCR folders)}; clip_score {model, pretrained
    # (file or local-dir:<folder>), model_config, quick_gelu, batch_size, device}; aesthetic {the same + head (LAION
    # predictor file)}; pickscore {path, processor_path, batch_size, device}; geneval {detector (module:function),
    # detector_params, score: partial | strict, threshold, counting_threshold, position_threshold}; timed
    # {seconds_per_image} (a scorer of set cost, for benchmarks); or
    # "module:function" for your own scorer. Paths are local only; see README "Rewards" and pipeline/rewards/
    ref_cache_k: int = 2  # K cached reference draws per group (t_k, noise seed); 0 disables the cache
    t_law: TLaw = "uniform"  # law of t for the cache draws: uniform | logit_normal
    t_min: float = 0.0  # t range of the cache draws (training with the cache uses the same draws)
    t_max: float = 1.0
    image_format: Literal["png", "webp", "jpeg"] = "png"  # png | webp | jpeg (members .png, .webp, .jpg)
    image_quality: int = 0  # 0 = lossless (png, webp); 1..100 = a lossy webp or jpeg preview at that quality
    # (the manifest then says the images are not faithful enough to re-score: gdro rescore refuses them)
    latents_dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # storage of the latents (bfloat16:
    # .npy uint16 of the bit patterns); stage two trains on them as float32 either way (docs/storage.md)
    embeds_dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # storage of the prompt embeddings
    # the pipeline (pipeline/rollout_pipeline.py; the bytes never depend on these two): shards handed on to the
    # writer thread while the next samples, each held in memory until written (0 = one shard after the other;
    # 2 absorbs shard-to-shard jitter between sampling and rewards: docs/benchmarks.md)
    pipeline_depth: int = 2
    reward_workers: int = 1  # threads scoring beside sampling; per-image rewards (ocr, toy_*) split a shard
    # over them, the others get one call per shard on a thread of their own (0 = score in the sampling thread)
    lineage: list[dict[str, Any]] = field(default_factory=list)  # set by `gdro rounds`: the chain of models this
    # dataset's generator came from, one {round, generator, dataset, run} per round (paths relative to the rounds
    # folder); recorded in the manifest (part of the identity when not empty); [] for a plain dataset

    def check(self, key: str) -> None:
        for name in ("group_size", "prompts_per_shard", "batch_size"):
            _positive(f"{key}{name}", getattr(self, name))
        if self.group_size < 2:
            raise GdroError(f"{key}group_size must be >= 2 (a group needs members to compare), got {self.group_size}")
        for name in ("num_prompts", "ref_cache_k", "pipeline_depth", "reward_workers"):
            if getattr(self, name) < 0:
                raise GdroError(f"{key}{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise GdroError(f"{key}t_min/t_max must satisfy 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")
        if not self.rewards:
            raise GdroError(f"{key}rewards is empty: name at least one reward (e.g. toy_geneval)")
        if not 0 <= self.image_quality <= 100:
            raise GdroError(f"{key}image_quality must be in [0, 100] (0 = lossless), got {self.image_quality}")
        if self.image_format == "png" and self.image_quality:
            raise GdroError(f"{key}image_quality={self.image_quality}: png is lossless; use image_format=webp or "
                            f"jpeg for a lossy preview, or image_quality=0")
        if self.image_format == "jpeg" and not self.image_quality:
            raise GdroError(f"{key}image_format=jpeg is lossy: set image_quality in 1..100 (e.g. 90)")


@dataclass
class TrainConfig:
    dataset: str | list[str] = "datasets/toy"  # a stage-one dataset folder (manifest.json), or its URL (http(s)://,
    # gs://, s3://: shards streamed, each checked against the manifest's sha256 as read), or a list of them made by
    # the same generator (checked from their manifests), mixed by dataset_weights; the only input of training
    dataset_weights: list[float] = field(default_factory=list)  # one per train.dataset entry: the share of groups
    # drawn from each (data_order=shuffled); [] = in proportion to their groups
    out: str = "runs/toy"  # run folder: checkpoints/, metrics.jsonl, tensorboard/, export/, ... (pipeline/runs.py)
    loss: str = "dgpo"  # dgpo | gdro-ce | gdro-pl | dpo | raft | nft (see pipeline/losses.py; nft needs a live
    # reference: auto picks lora or copy for it)
    reward_weights: dict[str, float] = field(default_factory=lambda: {"toy_geneval": 1.0})  # raw reward -> weight
    beta: float = 500.0  # implicit-reward scale: rho = -beta (L - Lref)
    adv_scope: Literal["group", "batch"] = "group"  # std of the advantages over the group | the global batch (all ranks)
    adv_clip: float = 5.0  # |A| <= adv_clip
    tau: float = 1.0  # gdro-ce target temperature
    nft_beta: float = 1.0  # nft: DiffusionNFT's beta, v+ = beta v_theta + (1 - beta) v_old (arXiv 2509.16117)
    kl_beta: float = 0.0  # weight of ||v_theta - v_ref||^2 (needs a live reference, not the cache)
    reference: Literal["auto", "cache", "lora", "copy"] = "auto"  # auto (cache if the dataset has one, else lora if LoRA, else copy) | cache | lora | copy
    error_param: Literal["x0", "v"] = "x0"  # error in the implicit rewards: x0 (DGPO Eq. 17, = t^2 x the velocity error) | v
    t_law: TLaw = "uniform"  # law of t when the reference is live: uniform | logit_normal
    t_min: float = 0.0  # DGPO's timestep clip: t in [t_min, t_max]
    t_max: float = 1.0
    steps: int = 300  # optimiser steps
    groups_per_step: int = 8  # groups per micro-batch per rank (x G images)
    grad_accum: int = 1  # micro-batches per optimiser step (steps, save_every and metrics then count micro-batches)
    lr: float = 1e-5  # AdamW peak learning rate (full fine-tuning of the toy model degrades at 1e-4)
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    lora_rank: int = 0  # 0 = full fine-tuning; > 0 = peft LoRA on the attention projections
    lora_alpha: float = 0.0  # 0 = same as the rank
    lora_targets: list[str] = field(default_factory=lambda: [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"])
    # peft target_modules (module-name suffixes). Bare names adapt every attention of that name, SD3.5-Medium's
    # second (attn2) attention of its dual-attention blocks included; "attn.to_q" etc. adapt `attn` only (DGPO)
    zero_stage: Literal[2, 3] = 2  # DeepSpeed ZeRO stage: 2 | 3
    deepspeed_config: str = ""  # a JSON file merged over the DeepSpeed config gdro builds from train.* (ZeRO
    # tuning, CPU offload: cluster/deepspeed/*.json); "" = the built one (ZeRO-<zero_stage>, defaults)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16
    export_dtype: Literal["auto", "fp32", "bf16"] = "auto"  # dtype of the exported weights: auto (the training precision) | fp32 | bf16
    gradient_checkpointing: bool = False
    save_every: int = 100  # steps between checkpoints (all ranks save through DeepSpeed)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    num_workers: int = 0  # DataLoader workers per rank
    shuffle_buffer: int = 64  # groups
    data_order: Literal["shuffled", "sequential"] = "shuffled"  # shuffled (shards resampled per rank) | sequential (step s's global batch is
    # groups [s*B, (s+1)*B) mod N of all N groups in key order, B = groups_per_step x ranks, rank r taking the
    # r-th slice: the same global batches for any number of ranks; every rank reads every shard; for checks)
    verify_shards: bool = True  # sha256 of every shard against the manifest before training (off for huge sets)
    seed: int = 0
    eval_every: int = 0  # steps between evaluations on the first eval_num_prompts lines of eval.prompts (scores
    # and corrected score as `gdro eval`); the best model by corrected score is kept in <out>/best; 0 = off
    eval_num_prompts: int = 60  # prompt lines of those evaluations (one image each, eval.base_seed noise)
    patience: int = 0  # stop after this many evaluations without a better corrected score; 0 = train all steps
    ema_decay: float = 0.0  # EMA of the trained weights, e.g. 0.99; 0 = off. Checkpoints
    # carry it; the export, `gdro eval` of checkpoints and train.eval_every use the averaged weights. ZeRO-2 only

    def check(self, key: str) -> None:
        from .losses import LOSSES

        _choice(f"{key}loss", self.loss, tuple(LOSSES))
        for name in ("steps", "groups_per_step", "grad_accum", "lr", "save_every", "keep_checkpoints", "adv_clip",
                     "tau", "nft_beta"):
            _positive(f"{key}{name}", getattr(self, name))
        if self.beta <= 0 and self.loss != "raft":
            raise GdroError(f"{key}beta must be > 0 for loss {self.loss}, got {self.beta}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise GdroError(f"{key}t_min/t_max must satisfy 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")
        if not self.reward_weights:
            raise GdroError(f"{key}reward_weights is empty: name at least one stored reward")
        if self.eval_every < 0 or self.patience < 0:
            raise GdroError(f"{key}eval_every and {key}patience must be >= 0 (0 = off)")
        if any(not w > 0 for w in self.dataset_weights):
            raise GdroError(f"{key}dataset_weights must all be > 0, got {self.dataset_weights}")
        _positive(f"{key}eval_num_prompts", self.eval_num_prompts)
        if self.lora_rank < 0 or self.kl_beta < 0 or self.num_workers < 0:
            raise GdroError(f"{key}lora_rank, {key}kl_beta and {key}num_workers must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise GdroError(f"{key}ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if self.ema_decay and self.zero_stage == 3:
            raise GdroError(f"{key}ema_decay needs {key}zero_stage=2: under ZeRO-3 no rank holds the full weights "
                            f"to average")
        if self.lora_rank and not self.lora_targets:
            raise GdroError(f"{key}lora_targets is empty: name the modules LoRA adapts (e.g. attn.to_q)")
        if self.reference == "lora" and self.lora_rank == 0:
            raise GdroError(f"{key}reference=lora needs {key}lora_rank > 0")
        if self.reference == "cache" and self.kl_beta > 0:
            raise GdroError(f"{key}kl_beta > 0 needs a live reference ({key}reference=lora or copy); the cache "
                            f"stores only the reference's errors, not its velocities")


@dataclass
class EvalConfig:
    prompts: str = "prompts/toy_test.jsonl"  # held-out prompts (never in the rollouts' prompt file)
    num_prompts: int = 0  # first N lines; 0 = all
    seeds: int = 1  # images per prompt line
    base_seed: int = 777  # eval noise seeds: sha256(base_seed, line, member): same noise for every model
    checkpoint: str = ""  # model folder to evaluate; "" = <train.out>/export
    checkpoints: Literal["all", "export"] = "all"  # with checkpoint "": all (every checkpoint left in <train.out>/checkpoints, plus
    # <train.out>/best; <train.out>/export when there is none) | export (<train.out>/export only)
    out: str = ""  # report folder; "" = <train.out>/eval
    batch_size: int = 100  # images per sampling batch
    target: str = "strict"  # the target score: strict | partial | quality | no_extra (the toy verifier's) | a reward named in
    # eval.rewards (the only choice for sd3/flux, which have no verifier)
    out_of_domain: list[str] = field(default_factory=lambda: ["quality"])  # scores training never optimised
    rewards: list[str] = field(default_factory=list)  # registered rewards scored on every image (by name), each
    # built once with its parameters from rollouts.rewards.<name> (the same local weights; {} if not there)
    corrected_lambda: float = 1.0  # corrected score: target points per unit of relative out-of-domain loss
    corrected_horizon: float = 0.0  # corrected score: steps the out-of-domain trend is projected ahead; 0 = one
    # evaluation interval (to the next checkpoint, if the spacing stays)
    corrected_window: int = 3  # corrected score: evaluated points (the reference included) the trend is fitted on
    bootstrap: int = 1000  # resamples of the prompt lines (stratified by kind, paired across models); 0 = no CIs
    bootstrap_seed: int = 0
    ci_level: float = 0.95  # confidence level of the bootstrap intervals
    grid_per_kind: int = 2  # prompts of each kind in the comparison grids

    def check(self, key: str) -> None:
        _positive(f"{key}seeds", self.seeds)
        _positive(f"{key}batch_size", self.batch_size)
        if self.num_prompts < 0:
            raise GdroError(f"{key}num_prompts must be >= 0")
        names = ("strict", "partial", "quality", "no_extra", *self.rewards)
        for name, what in ((self.target, "target"), *((o, "out_of_domain") for o in self.out_of_domain)):
            if name not in names:
                raise GdroError(f"{key}{what}: {name!r} is not scored; use strict, partial, quality, no_extra or a "
                                f"reward listed in {key}rewards")
        if not self.out_of_domain or self.target in self.out_of_domain:
            raise GdroError(f"{key}out_of_domain must name at least one score other than the target "
                            f"{self.target!r}")
        for name in ("corrected_window", "grid_per_kind"):
            _positive(f"{key}{name}", getattr(self, name))
        if self.corrected_lambda < 0 or self.corrected_horizon < 0 or self.bootstrap < 0:
            raise GdroError(f"{key}corrected_lambda, {key}corrected_horizon and {key}bootstrap must be >= 0")
        if not 0.0 < self.ci_level < 1.0:
            raise GdroError(f"{key}ci_level must be in (0, 1), got {self.ci_level}")


@dataclass
class OnlineConfig:
    """The online baselines (stages/baselines/, `gdro online`): kept for comparison, not product recipes.
    Each iteration samples from the current policy, scores, and updates; the model, prompt pool (rollouts.prompts,
    rollouts.num_prompts), group size, rewards (train.reward_weights over rollouts.rewards), beta, adv_clip, lr,
    the trained parameters (train.lora_rank / lora_targets: the same adapter as `gdro train`, or every weight) and
    the evaluation (eval.*) are the product's keys, so every method runs on the same task."""
    method: Literal["dgpo", "nft", "flow-grpo"] = "dgpo"  # dgpo: DGPO's online loop (ODE rollouts, shared (t, eps)
    # per group, frozen reference + KL) | nft: DiffusionNFT (ODE rollouts, the sampling model as v_old) | flow-grpo:
    # SDE rollouts with per-step log-probabilities, clipped ratio, KL (arXiv 2505.05470)
    out: str = "runs/online"  # folder: config.json, curve.jsonl (one evaluation a line), result.json, export/
    iterations: int = 40  # sample -> score -> update rounds (at most)
    max_wall_s: float = 0.0  # stop once the iterations took this many seconds (evaluations excluded); 0 = no limit
    groups: int = 8  # prompts (groups of rollouts.group_size images) sampled per iteration
    updates: int = 1  # optimiser steps per iteration: dgpo/nft a fresh (t, eps) per group each; flow-grpo the
    # iteration's groups split into this many minibatches (the ratio is 1 on the first only)
    lr: float = 0.0  # AdamW learning rate; 0 = train.lr
    seed: int = 0  # prompts drawn and initial noises: sha256(seed, iteration, slot, member)
    eval_every: int = 10  # iterations between evaluations (also at 0 and at the end); wall-clock excludes them
    eval_num_prompts: int = 0  # first N lines of eval.prompts (eval.base_seed noise, eval.seeds images); 0 = eval.num_prompts
    dgpo_t_min: float = 0.66  # DGPO's timestep clip t ~ U[t_min, t_max] (the DGPO code's 7 of 10 steps at shift 3)
    dgpo_t_max: float = 1.0
    dgpo_kl_beta: float = 2.0  # DGPO's KL weight, its code's 0.02 in gdro's scale (x 100, as pipeline/presets/sd35_ocr.yaml)
    grpo_noise_level: float = 0.7  # Flow-GRPO's a: the SDE's std_dev_t = a sqrt(t / (1 - t)) (flow_grpo's default)
    grpo_clip_range: float = 1e-4  # Flow-GRPO's ratio clip epsilon (flow_grpo's default)
    grpo_kl_beta: float = 0.04  # Flow-GRPO's KL weight on the steps' Gaussian means (flow_grpo's default)

    def check(self, key: str) -> None:
        for name in ("iterations", "groups", "updates", "eval_every", "grpo_noise_level", "grpo_clip_range"):
            _positive(f"{key}{name}", getattr(self, name))
        if min(self.lr, self.eval_num_prompts, self.dgpo_kl_beta, self.grpo_kl_beta, self.max_wall_s) < 0:
            raise GdroError(f"{key}lr, {key}eval_num_prompts, {key}dgpo_kl_beta, {key}grpo_kl_beta and "
                            f"{key}max_wall_s must be >= 0")
        if not 0.0 <= self.dgpo_t_min < self.dgpo_t_max <= 1.0:
            raise GdroError(f"{key}dgpo_t_min/dgpo_t_max must satisfy 0 <= t_min < t_max <= 1, got "
                            f"{self.dgpo_t_min}, {self.dgpo_t_max}")


@dataclass
class SlurmConfig:
    """How `gdro submit` renders the sbatch templates (cluster/*.sbatch) for a site."""
    partition: str = ""  # --partition; "" = the cluster's default partition
    account: str = ""  # --account; "" = none
    qos: str = ""  # --qos; "" = none
    gpus_per_node: int = 1  # GPUs per training node (one rank each); rollouts and eval tasks take 1; 0 = CPU only
    gres: str = "gpu"  # the GPU resource as the site names it: --gres=<gres>:<count> (e.g. gpu:a100)
    mem: str = ""  # --mem per node (e.g. 200G); "" = the site's default
    sbatch_args: list[str] = field(default_factory=list)  # more #SBATCH options for every job, e.g. [--exclusive]
    setup: list[str] = field(default_factory=list)  # shell lines every job runs first, e.g. [module load cuda/12.4]
    python: str = ""  # the interpreter the jobs run gdro with; "" = the one running `gdro submit`
    templates: str = ""  # folder of the sbatch templates; "" = cluster/ of this repository
    signal_lead_s: int = 300  # USR2 this many seconds before the time limit: save (train) or stop, then requeue
    rollouts_tasks: int = 0  # array size T (task t writes the shards s % T == t); 0 = one task per shard
    rollouts_parallel: int = 0  # the array's %N throttle: at most N tasks at once; 0 = no limit
    rollouts_cpus: int = 8  # CPUs per rollouts task
    rollouts_minutes: int = 240  # time limit per rollouts task
    train_nodes: int = 1
    train_procs_per_node: int = 0  # ranks per node; 0 = gpus_per_node (1 when gpus_per_node is 0)
    train_cpus_per_node: int = 16
    train_minutes: int = 1440  # time limit of the training job (it requeues itself: the run may take longer)
    rdzv_port: int = 0  # torchrun's c10d rendezvous port on the first node; 0 = 29500 + job id mod 1000
    eval_cpus: int = 8
    eval_minutes: int = 120

    def check(self, key: str) -> None:
        for name in ("rollouts_cpus", "rollouts_minutes", "train_nodes", "train_cpus_per_node", "train_minutes",
                     "eval_cpus", "eval_minutes"):
            _positive(f"{key}{name}", getattr(self, name))
        for name in ("gpus_per_node", "rollouts_tasks", "rollouts_parallel", "train_procs_per_node", "rdzv_port"):
            if getattr(self, name) < 0:
                raise GdroError(f"{key}{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.signal_lead_s <= 65535:
            raise GdroError(f"{key}signal_lead_s must be in 0..65535 (Slurm's --signal limit), got {self.signal_lead_s}")
        for name in ("rollouts_minutes", "train_minutes"):
            if self.signal_lead_s >= 60 * getattr(self, name):
                raise GdroError(f"{key}signal_lead_s={self.signal_lead_s} is not shorter than {key}{name}="
                                f"{getattr(self, name)} minutes: the warning would come before any work is done")


@dataclass
class ExperimentConfig:
    name: str = "toy"  # run name, used in folder names and job names
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    rollouts: RolloutsConfig = field(default_factory=RolloutsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)  # the online baselines only (stages/baselines/)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


# ----------------------------------------------------------------------------------------- the machinery
def _positive(key: str, value) -> None:
    if not value > 0:
        raise GdroError(f"{key} must be > 0, got {value!r}")


def _choice(key: str, value, choices) -> None:
    if value not in choices or type(value) not in {type(c) for c in choices}:  # 2.0 is no ZeRO stage
        raise GdroError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _coerce(key: str, tp, value):
    """Check (and gently convert, int -> float) one value against a type annotation."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        _choice(key, value, typing.get_args(tp))
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, a, value)
            except GdroError as e:
                errors.append(str(e))
        raise GdroError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise GdroError(f"{key} must be a mapping of {tp.__name__} fields, got {type(value).__name__}")
        return from_dict(tp, value, key)
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise GdroError(f"{key} must be a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(f"{key}.<key>", kt, k): _coerce(f"{key}.{k}", vt, v) for k, v in value.items()}
    if origin in (list, tuple):
        (et, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise GdroError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", et, v) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise GdroError(f"{key} must be {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise GdroError(f"{key}: unsupported annotation {tp!r}")  # a bug in a config class, not user input


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types name the dotted key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or "the config"
        raise GdroError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(_join(prefix, k) for k in unknown)} "
                        f"(valid in {where}: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(_join(prefix, k), hints[k], v) for k, v in data.items()}
    obj = cls(**kwargs)
    validate(obj, prefix)
    return obj


def validate(obj, prefix: str = "") -> None:
    """The fixed choices (`Literal` fields), then the config's own `check`: the first problem raises, naming its
    key."""
    if dataclasses.is_dataclass(obj):
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            if typing.get_origin(hints[f.name]) is Literal:
                _choice(_join(prefix, f.name), getattr(obj, f.name), typing.get_args(hints[f.name]))
    if hasattr(obj, "check"):
        obj.check(prefix + "." if prefix else "")  # check(p) names its keys f"{p}name"


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], value parsed as YAML, so 3 is an int, 0.1 a float, [a, b] a list)."""
    if "=" not in text:
        raise GdroError(f"override {text!r} is not of the form key=value (e.g. train.lr=1e-5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise GdroError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise GdroError(f"override {text!r}: the value is not valid YAML ({e.problem})") from None
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads 1e-5 as a string
    return key.split("."), value


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = json.loads(json.dumps(data))  # deep copy
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise GdroError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise GdroError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise GdroError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise GdroError(f"config file {path} must hold a mapping at the top level")
    return data


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve(cls: type[T], *, preset: str | None = None, files: tuple[str, ...] = (),
            overrides: tuple[str, ...] | list[str] = ()) -> T:
    """defaults <- preset <- files <- overrides, validated."""
    data: dict = {}
    if preset:
        path = PRESETS_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise GdroError(f"unknown preset {preset!r}; known presets: {', '.join(preset_names()) or 'none'}")
        data = _merge(data, load_yaml(path))
    for f in files:
        data = _merge(data, load_yaml(Path(f)))
    data = apply_overrides(data, list(overrides))
    return from_dict(cls, data)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_resolved(cfg, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(to_dict(cfg), indent=1, sort_keys=False) + "\n")


__all__ = [
    "EvalConfig",
    "ExperimentConfig",
    "ModelConfig",
    "OnlineConfig",
    "RolloutsConfig",
    "SamplerConfig",
    "SlurmConfig",
    "ToyPretrainConfig",
    "TrainConfig",
    "apply_overrides",
    "dump",
    "from_dict",
    "load_yaml",
    "parse_override",
    "preset_names",
    "resolve",
    "save_resolved",
    "to_dict",
    "validate",
]
