"""Config validation: unknown keys, wrong types and impossible values are errors that name the key."""
import pytest

from pipeline.config import (
    ExperimentConfig,
    ToyPretrainConfig,
    apply_overrides,
    from_dict,
    parse_override,
    preset_names,
    resolve,
)
from pipeline.errors import GdroError


def test_toy_preset_resolves_with_typed_sections():
    cfg = resolve(ExperimentConfig, preset="toy")
    assert "toy" in preset_names()
    assert cfg.model.backend == "toy" and isinstance(cfg.rollouts.group_size, int)
    assert cfg.rollouts.rewards == {"toy_geneval": {}, "toy_exact": {}, "toy_strict": {}, "toy_quality": {}}
    assert cfg.train.error_param == "x0" and set(cfg.train.reward_weights) <= set(cfg.rollouts.rewards)


@pytest.mark.parametrize("override, fragment", [
    ("rollouts.grop_size=3", "unknown key rollouts.grop_size"),
    ("nosuchsection.x=1", "unknown key nosuchsection"),
    ("rollouts.group_size=four", "rollouts.group_size must be int"),
    ("rollouts.group_size=1", "rollouts.group_size must be >= 2"),
    ("rollouts.group_size=true", "rollouts.group_size must be int"),
    ("sampler.steps=0", "sampler.steps must be > 0"),
    ("sampler.guidance=0.5", "sampler.guidance must be >= 1"),
    ("rollouts.t_law=cauchy", "rollouts.t_law must be one of"),
    ("rollouts.t_min=1.0", "rollouts.t_min/t_max"),
    ("train.loss=ppo", "train.loss must be one of"),
    ("train.reward_weights=3", "train.reward_weights must be a mapping"),
    ("model.dtype=float8", "model.dtype must be one of"),
    ("train.zero_stage=1", "train.zero_stage must be one of 2, 3; got 1"),
    ("train.zero_stage=2.0", "train.zero_stage must be one of 2, 3; got 2.0"),
    ("eval.checkpoints=best", "eval.checkpoints must be one of all, export; got 'best'"),
    ("rollouts.rewards={}", "rollouts.rewards is empty"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(GdroError) as e:
        resolve(ExperimentConfig, preset="toy", overrides=[override])
    assert fragment in str(e.value)


def test_a_lora_reference_needs_lora():
    with pytest.raises(GdroError, match=r"train.reference=lora needs train.lora_rank > 0"):
        resolve(ExperimentConfig, preset="toy", overrides=["train.lora_rank=0", "train.reference=lora"])


def test_fixed_choices_are_checked_on_configs_built_in_code_too():
    import dataclasses

    from pipeline.config import validate

    cfg = resolve(ExperimentConfig, preset="toy")
    with pytest.raises(GdroError, match="train.precision must be one of auto, fp32, bf16; got 'fp16'"):
        validate(dataclasses.replace(cfg.train, precision="fp16"), "train")


def test_overrides_parse_as_yaml_and_ints_widen_to_floats():
    cfg = resolve(ExperimentConfig, preset="toy", overrides=["train.lr=1e-5", "sampler.shift=3",
                                                              "train.reward_weights={toy_geneval: 2, toy_quality: 0.5}"])
    assert cfg.train.lr == 1e-5 and cfg.sampler.shift == 3.0 and isinstance(cfg.sampler.shift, float)
    assert cfg.train.reward_weights == {"toy_geneval": 2.0, "toy_quality": 0.5}


@pytest.mark.parametrize("text", ["noequals", "=3", "a..b=1", "a.b=[unclosed"])
def test_malformed_override(text):
    with pytest.raises(GdroError):
        parse_override(text)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(GdroError, match="unknown preset 'nope'; known presets: .*toy"):
        resolve(ExperimentConfig, preset="nope")


def test_yaml_file_merges_over_preset(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("rollouts:\n  group_size: 4\n")
    cfg = resolve(ExperimentConfig, preset="toy", files=(str(f),), overrides=["rollouts.num_prompts=8"])
    assert cfg.rollouts.group_size == 4 and cfg.rollouts.num_prompts == 8
    assert cfg.rollouts.prompts_per_shard == 32  # untouched preset value survives the merge
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(GdroError, match="mapping at the top level"):
        resolve(ExperimentConfig, files=(str(bad),))
    with pytest.raises(GdroError, match="does not exist"):
        resolve(ExperimentConfig, files=(str(tmp_path / "missing.yaml"),))


def test_pretrain_config_checks():
    with pytest.raises(GdroError, match="ema_decay"):
        from_dict(ToyPretrainConfig, {"ema_decay": 1.0})
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}
