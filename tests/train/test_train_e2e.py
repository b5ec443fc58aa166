"""Stage two end to end on a tiny random toy model: rollouts -> train -> checkpoints, resume, export.

The toy model is random, so the toy verifier scores everything 0 (no spread, no signal). The datasets here are
scored by a user reward (`module:function`, written to a temporary folder) that returns the mean pixel value,
so every group has spread and the preference losses have something to learn. Training runs in-process
(DeepSpeed on a gloo process group of one rank); signal handlers and the distributed environment variables
that `stages.train.main` installs are restored after every run.
"""
from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from gdro_testing import check_cached_reference_errors, run_train, transformer_weights

from pipeline.errors import GdroError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PROMPTS = REPO / "prompts" / "toy_train.jsonl"
REWARD = "gdro_e2e_reward:mean_pixel"
G = 4
METRIC_KEYS = {"step", "loss", "kl", "implicit_acc", "rho_mean", "abs_adv", "zero_spread", "invalid_groups",
               "reward_mean", "grad_norm", "lr", "images_per_s", "t_mean", "step_s", "data_s",
               "step_cpu_s", "data_cpu_s"}
REWARD_MODULE = '''
import numpy as np


def mean_pixel():
    def fn(images, prompts, metadata):
        return np.asarray(images, dtype=np.float64).mean(axis=(1, 2, 3)) / 255.0, {}

    return fn
'''


def make_cfg(model, dataset, out=None, *overrides):
    from pipeline.config import ExperimentConfig, resolve

    return resolve(ExperimentConfig, preset="toy", overrides=[
        f"model.path={model}", f"rollouts.out={dataset}", f"rollouts.prompts={PROMPTS}",
        "rollouts.num_prompts=16", "rollouts.prompts_per_shard=8", f"rollouts.group_size={G}", "sampler.steps=2",
        "rollouts.ref_cache_k=2", f'rollouts.rewards={{"{REWARD}": {{}}}}',
        f"train.dataset={dataset}", f"train.out={out or dataset.parent / 'unused_run'}",
        f'train.reward_weights={{"{REWARD}": 1.0}}', "train.groups_per_step=4", "train.lr=1e-3",
        "train.warmup_steps=1", "train.beta=500", "train.keep_checkpoints=2", "train.loss=dgpo",
        "train.lora_rank=0", *overrides])  # full fine-tuning unless a test asks for LoRA (the toy preset's is LoRA)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def differs(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    return any(not torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ datasets
@pytest.fixture(scope="module")
def datasets(tiny_toy_model, tmp_path_factory):
    """Two finished datasets scored by the user reward: 'cached' (16 prompts, 2 shards, K = 2 cached reference
    draws) and 'live' (8 prompts, 1 shard, no cache)."""
    from stages.rollouts import main as rollouts

    root = tmp_path_factory.mktemp("e2e")
    (root / "reward_mod").mkdir()
    (root / "reward_mod" / "gdro_e2e_reward.py").write_text(REWARD_MODULE)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root / "reward_mod"))
        cached = rollouts(make_cfg(tiny_toy_model, root / "cached"))
        live = rollouts(make_cfg(tiny_toy_model, root / "live", None, "rollouts.num_prompts=8",
                                 "rollouts.ref_cache_k=0"))
    return {"root": root, "cached": cached, "live": live}


def test_the_datasets_have_reward_spread(datasets):
    from schemas.manifest import decode_group, iter_tar_groups

    m = json.loads((datasets["cached"] / "manifest.json").read_text())
    assert m["reference_cache"]["K"] == 2 and m["group_size"] == G
    spreads = []
    for sh in m["shards"]:
        for key, raw in iter_tar_groups(datasets["cached"] / sh["tar"]):
            rec, _ = decode_group(key, raw, sh["tar"])
            r = rec.rewards[REWARD]
            spreads.append(max(r) - min(r))
    assert len(spreads) == 16 and min(spreads) > 0


# ------------------------------------------------------------------------------- step 0: theta = reference
def test_recomputed_errors_equal_the_cache(datasets, tiny_toy_model):
    """flow_errors with the model folder's transformer on the stored latents/embeddings, at the cached (t_k, eps
    seed), reproduces the cached reference errors: at step 0 the implicit rewards are zero."""
    from pipeline.backends.base import load_transformer, transformer_velocity

    tr = load_transformer("toy", str(tiny_toy_model)).eval()
    checked = check_cached_reference_errors(datasets["cached"], lambda x, t, c: transformer_velocity(tr, x, t, c), G)
    assert checked == 16 * 2


# --------------------------------------------------------------------------- one run, resumed, exported
@pytest.fixture(scope="module")
def dgpo_run(datasets, tiny_toy_model):
    """DGPO with the cached reference: 4 steps (checkpoints at 2 and 4), then the same run extended to 6."""
    out = datasets["root"] / "run_dgpo"
    first = run_train(make_cfg(tiny_toy_model, datasets["cached"], out, "train.steps=4", "train.save_every=2"))
    after_4 = {"metrics": metrics(out), "weights": transformer_weights(out / "export"),
               "config": (out / "config.json").read_text()}
    second = run_train(make_cfg(tiny_toy_model, datasets["cached"], out, "train.steps=6", "train.save_every=2"))
    assert first == second == out
    return {"out": out, "after_4": after_4}


def test_first_step_is_at_the_reference(dgpo_run, datasets):
    rec = dgpo_run["after_4"]["metrics"][0]
    m = json.loads((datasets["cached"] / "manifest.json").read_text())
    assert m["reference_cache"]["K"] == 2
    # rho = -beta (L - Lref) with L recomputed in another batch layout: zero up to float32 rounding of L ~ 1
    assert abs(rec["rho_mean"]) <= 500 * 1e-5
    assert rec["loss"] == pytest.approx(math.log(2), abs=1e-3)  # -log sigmoid(0) in every group with signal
    assert rec["zero_spread"] == 0.0 and rec["invalid_groups"] == 0
    assert rec["abs_adv"] > 0 and rec["kl"] == 0.0


def test_training_writes_metrics_and_checkpoints(dgpo_run):
    out = dgpo_run["out"]
    recs = dgpo_run["after_4"]["metrics"]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        assert set(r) == METRIC_KEYS
        assert all(math.isfinite(v) for k, v in r.items() if k != "implicit_acc")
        assert 0.0 < r["reward_mean"] < 1.0 and 0.0 <= r["t_mean"] <= 1.0
    assert any(r["rho_mean"] != 0.0 for r in recs[1:])  # the policy moved away from the reference
    ck = out / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_0000006"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_0000004", "step_0000006"]  # keep_checkpoints=2
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 6
    assert list((out / "tensorboard").iterdir())


def test_resume_continues_without_repeating_steps(dgpo_run):
    out = dgpo_run["out"]
    recs = metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[:4] == dgpo_run["after_4"]["metrics"]  # the first run's lines are untouched
    assert differs(transformer_weights(out / "export"), dgpo_run["after_4"]["weights"])  # steps 5-6 trained further


def test_resumed_losses_equal_an_uninterrupted_run(dgpo_run, datasets, tiny_toy_model):
    """Steps 5-6 after resuming from the step-4 checkpoint equal steps 5-6 of one uninterrupted 6-step run: the
    data stream is skipped ahead, and t/eps are drawn per (seed, step, position in the global batch), so nothing
    depends on the restart.
    Tolerance 1e-6 relative: the same ops on the same inputs in one process (CPU); only DeepSpeed's
    checkpoint round trip of fp32 weights and Adam moments lies between them, and that is exact."""
    straight = datasets["root"] / "run_straight"
    run_train(make_cfg(tiny_toy_model, datasets["cached"], straight, "train.steps=6", "train.save_every=2"))
    resumed, uninterrupted = metrics(dgpo_run["out"]), metrics(straight)
    for a, b in zip(resumed, uninterrupted):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-9)
        assert a["rho_mean"] == pytest.approx(b["rho_mean"], rel=1e-6, abs=1e-9)


def test_no_resume_on_an_existing_run_is_a_clear_error(dgpo_run, datasets, tiny_toy_model, capsys):
    from pipeline.cli import main as cli

    out = dgpo_run["out"]
    before = {p: p.read_bytes() for p in (out / "metrics.jsonl", out / "config.json", out / "checkpoints/latest")}
    cfg = make_cfg(tiny_toy_model, datasets["cached"], out, "train.steps=8")
    with pytest.raises(GdroError, match="already holds checkpoints"):
        run_train(cfg, resume=False)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    env = dict(os.environ)
    try:
        rc = cli(["train", "--no-resume", "--set", f"model.path={tiny_toy_model}",
                  "--set", f"train.dataset={datasets['cached']}", "--set", f"train.out={out}",
                  "--set", f'train.reward_weights={{"{REWARD}": 1.0}}', "--set", "train.steps=8"])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        os.environ.clear()
        os.environ.update(env)
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("gdro: error:") and "already holds checkpoints" in err and str(out) in err
    assert before == {p: p.read_bytes() for p in before}  # a refused run leaves the run folder as it was


def test_export_loads_in_diffusers_and_samples(dgpo_run, tiny_toy_model):
    from diffusers import SD3Transformer2DModel

    from pipeline.backends.base import Conditioning
    from pipeline.backends.toy import ToyBackend
    from pipeline.sampling import SamplerConfig, sample
    from schemas.seeds import noise_for

    export = dgpo_run["out"] / "export"
    model = SD3Transformer2DModel.from_pretrained(export / "transformer", local_files_only=True)
    base = SD3Transformer2DModel.from_pretrained(Path(tiny_toy_model) / "transformer", local_files_only=True)
    sd, sb = model.state_dict(), base.state_dict()
    assert differs(sd, sb)
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert json.loads((export / "gdro_export.json").read_text())["train"]["loss"] == "dgpo"
    backend = ToyBackend.from_pretrained(export)
    cond = backend.encode_prompts(["a photo of a red circle"])
    assert isinstance(cond, Conditioning)
    lat = sample(backend, noise_for(0, backend.latent_shape)[None], cond, SamplerConfig(steps=2))
    img = backend.decode(lat)
    assert img.shape == (1, 32, 32, 3) and img.dtype == np.uint8


# -------------------------------------------------------------------------------------- live references
def test_lora_live_reference_and_merged_export(datasets, tiny_toy_model):
    """LoRA on a dataset without a cache: the reference is the model with the adapter disabled; the export holds
    the adapter in diffusers' format and a merged transformer equal to base + B A (alpha = rank: scale 1)."""
    from safetensors.torch import load_file

    out = datasets["root"] / "run_lora"
    run_train(make_cfg(tiny_toy_model, datasets["live"], out, "train.steps=2", "train.lora_rank=4",
                       "train.reference=lora", "train.lr=1e-2"))
    recs = metrics(out)
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[0]["rho_mean"] == 0.0  # B = 0 at init: policy == reference exactly
    assert all(math.isfinite(r["loss"]) for r in recs)
    lora_file = out / "export" / "lora" / "pytorch_lora_weights.safetensors"
    assert lora_file.is_file()
    lora = load_file(str(lora_file))
    assert lora and all("lora_A" in k or "lora_B" in k for k in lora)
    merged, base = transformer_weights(out / "export"), transformer_weights(Path(tiny_toy_model))
    assert merged.keys() == base.keys() and differs(merged, base)
    checked = 0
    for ka in [k for k in lora if ".lora_A." in k]:
        kb = ka.replace(".lora_A.", ".lora_B.")
        name = ka.removeprefix("transformer.").replace(".lora_A.weight", ".weight")
        assert name in base, name
        delta = lora[kb].float() @ lora[ka].float()
        torch.testing.assert_close(merged[name] - base[name], delta, rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked >= 4  # to_q, to_k, to_v, to_out.0 at least


def test_lora_checkpoint_holds_only_the_adapter_and_resumes(datasets, tiny_toy_model):
    """A LoRA run's checkpoint stores the trainable weights (and their optimiser state), not the frozen base
    (the run's model.path): its model-states file is smaller than the base's weights alone. Resuming from it
    (frozen weights from model.path) gives the losses and the export of an uninterrupted run."""
    from pipeline.checkpoints import deepspeed_state_dict
    from pipeline.runs import MODEL_STATES

    lora = ("train.lora_rank=4", "train.lora_alpha=8", "train.reference=lora", "train.lr=1e-2", "train.save_every=2")
    out, straight = datasets["root"] / "run_lora_ck", datasets["root"] / "run_lora_straight"
    run_train(make_cfg(tiny_toy_model, datasets["live"], out, "train.steps=2", *lora))
    tag = out / "checkpoints" / "step_0000002"
    module = torch.load(tag / MODEL_STATES, map_location="cpu", weights_only=True)["module"]
    base = transformer_weights(Path(tiny_toy_model))
    base_bytes = sum(v.numel() * v.element_size() for v in base.values())
    adapter = {k: v for k, v in module.items() if ".lora_" in k}
    assert adapter and not any(".base_layer." in k for k in module)
    assert sum(v.numel() * v.element_size() for v in module.values()) < base_bytes / 4
    assert (tag / MODEL_STATES).stat().st_size < base_bytes
    torch.testing.assert_close(deepspeed_state_dict(tag), transformer_weights(out / "export"))
    run_train(make_cfg(tiny_toy_model, datasets["live"], out, "train.steps=3", *lora))
    run_train(make_cfg(tiny_toy_model, datasets["live"], straight, "train.steps=3", *lora))
    resumed, uninterrupted = metrics(out), metrics(straight)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for a, b in zip(resumed, uninterrupted):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-9)
    torch.testing.assert_close(transformer_weights(out / "export"), transformer_weights(straight / "export"))


def test_copy_reference_with_kl(datasets, tiny_toy_model):
    out = datasets["root"] / "run_copy"
    run_train(make_cfg(tiny_toy_model, datasets["live"], out, "train.steps=2", "train.reference=copy",
                       "train.kl_beta=0.1", "train.loss=gdro-ce"))
    recs = metrics(out)
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[0]["rho_mean"] == 0.0 and recs[0]["kl"] == 0.0  # the copy is the policy at step 0
    assert recs[1]["kl"] > 0.0 and math.isfinite(recs[1]["loss"])
    assert (out / "export" / "transformer").is_dir()
    assert differs(transformer_weights(out / "export"), transformer_weights(Path(tiny_toy_model)))


def test_copy_reference_under_bf16(datasets, tiny_toy_model):
    """train.precision=bf16: DeepSpeed casts the engine's module and inputs to bf16, and the frozen copy must
    compute in bf16 too; at step 0 it is the policy exactly (rho = 0, KL = 0)."""
    out = datasets["root"] / "run_copy_bf16"
    run_train(make_cfg(tiny_toy_model, datasets["live"], out, "train.steps=1", "train.reference=copy",
                       "train.precision=bf16", "train.kl_beta=0.1", "train.loss=gdro-ce"))
    (rec,) = metrics(out)
    assert rec["rho_mean"] == 0.0 and rec["kl"] == 0.0 and math.isfinite(rec["loss"])


# ------------------------------------------------------------------------------------------- refusals
# --------------------------------------------------------------------------------------- EMA of the weights
def _states(tag_dir: Path) -> dict:
    from pipeline.runs import MODEL_STATES

    return torch.load(tag_dir / MODEL_STATES, map_location="cpu", weights_only=True)


def test_ema_is_the_average_of_the_trained_weights_and_is_what_is_exported(datasets, tiny_toy_model):
    """train.ema_decay = 0.5 over 4 steps: the EMA in the step-4 checkpoint equals the recurrence e <- d e + (1-d) w
    over the base weights and the raw weights of checkpoints 1-4; the export and the checkpoint as `gdro eval`
    reads it are those averaged weights, not the raw ones."""
    from pipeline.checkpoints import deepspeed_state_dict

    out = datasets["root"] / "run_ema"
    run_train(make_cfg(tiny_toy_model, datasets["cached"], out, "train.steps=4", "train.save_every=1",
                       "train.keep_checkpoints=10", "train.ema_decay=0.5"))
    expected = {k: v.float() for k, v in transformer_weights(tiny_toy_model).items()}
    for step in range(1, 5):
        raw = _states(out / "checkpoints" / f"step_{step:07d}")["module"]
        expected = {k: 0.5 * v + 0.5 * raw[k].float() for k, v in expected.items()}
    states = _states(out / "checkpoints" / "step_0000004")
    assert set(expected) - set(states["ema"]) == {"pos_embed.pos_embed"}  # a buffer, not a trained parameter
    assert differs(states["ema"], {k: states["module"][k] for k in states["ema"]})  # the average lags the weights
    exported = transformer_weights(out / "export")
    for k, v in expected.items():
        torch.testing.assert_close(states["ema"].get(k, v), v, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(exported[k], v, rtol=1e-6, atol=1e-7)
    read = deepspeed_state_dict(out / "checkpoints" / "step_0000004")
    assert not differs(read, {k: v.float() for k, v in {**states["module"], **states["ema"]}.items()})


def test_ema_survives_a_resume(datasets, tiny_toy_model):
    """2 steps, then resumed to 4: the same EMA and losses as 4 uninterrupted steps (1e-6 relative, see the
    resume test above); a run without an EMA cannot be resumed with one."""
    straight, resumed = datasets["root"] / "run_ema_straight", datasets["root"] / "run_ema_resumed"
    ema = ("train.ema_decay=0.5", "train.save_every=2")
    run_train(make_cfg(tiny_toy_model, datasets["cached"], straight, "train.steps=4", *ema))
    run_train(make_cfg(tiny_toy_model, datasets["cached"], resumed, "train.steps=2", *ema))
    run_train(make_cfg(tiny_toy_model, datasets["cached"], resumed, "train.steps=4", *ema))
    a, b = (_states(r / "checkpoints" / "step_0000004")["ema"] for r in (straight, resumed))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-8)
    assert [r["loss"] for r in metrics(resumed)] == pytest.approx([r["loss"] for r in metrics(straight)], rel=1e-6)
    plain = datasets["root"] / "run_no_ema"
    run_train(make_cfg(tiny_toy_model, datasets["cached"], plain, "train.steps=2", "train.save_every=2"))
    with pytest.raises(GdroError, match="holds no EMA"):
        run_train(make_cfg(tiny_toy_model, datasets["cached"], plain, "train.steps=4", *ema))
    with pytest.raises(GdroError, match="zero_stage=2"):
        make_cfg(tiny_toy_model, datasets["cached"], None, "train.ema_decay=0.9", "train.zero_stage=3")


def test_kl_with_the_cache_is_refused(datasets, tiny_toy_model):
    with pytest.raises(GdroError, match="kl_beta"):
        make_cfg(tiny_toy_model, datasets["cached"], None, "train.reference=cache", "train.kl_beta=0.1")
    # reference=auto resolves to the cache on a cached dataset: refused at run time, before any step
    out = datasets["root"] / "run_kl_auto"
    with pytest.raises(GdroError, match="live reference"):
        run_train(make_cfg(tiny_toy_model, datasets["cached"], out, "train.kl_beta=0.1"))
    assert not (out / "metrics.jsonl").exists()


def test_cache_reference_without_a_cache_is_refused(datasets, tiny_toy_model):
    with pytest.raises(GdroError, match="ref_cache_k=0"):
        run_train(make_cfg(tiny_toy_model, datasets["live"], datasets["root"] / "run_nocache",
                           "train.reference=cache"))


def test_cache_from_another_model_is_refused(datasets, tmp_path):
    from conftest import build_tiny_toy_model

    other = build_tiny_toy_model(tmp_path / "other_model", seed=1)
    with pytest.raises(GdroError, match="sha256"):
        run_train(make_cfg(other, datasets["cached"], tmp_path / "run"))


@pytest.mark.slow
def test_bad_datasets_and_resume_flags_are_refused_before_training(datasets, tiny_toy_model, tmp_path):
    """A shard failing its checksum, a reward the dataset lacks, an unknown schema version, and --resume with
    no checkpoint: each a clear GdroError before any step, and nothing written to train.out."""
    import json
    import shutil

    from pipeline.errors import GdroError
    from pipeline.train_data import check_dataset

    src = datasets["cached"]
    ds = tmp_path / "bad"
    shutil.copytree(src, ds)
    tar = ds / "shards" / "000000.tar"
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF
    tar.write_bytes(bytes(data))
    with pytest.raises(GdroError, match="fails its checksums: shard 000000: shards/000000.tar sha256 differs"):
        check_dataset(ds, {REWARD: 1.0}, verify=True)
    check_dataset(ds, {REWARD: 1.0}, verify=False)  # the opt-out for datasets too large to hash
    with pytest.raises(GdroError, match="names toy_nope, but .* stores only"):
        check_dataset(src, {"toy_nope": 1.0}, verify=False)
    out = tmp_path / "never"
    with pytest.raises(GdroError, match="holds no checkpoint to resume"):
        run_train(make_cfg(tiny_toy_model, src, out), resume=True)
    assert not out.exists()
    with pytest.raises(GdroError, match="fails its checksums"):
        run_train(make_cfg(tiny_toy_model, ds, out))
    assert not out.exists()
    m = json.loads((ds / "manifest.json").read_text())
    m["schema_version"] = 99
    (ds / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(GdroError, match="schema_version is 99"):
        check_dataset(ds, {REWARD: 1.0}, verify=False)
