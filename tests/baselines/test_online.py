"""Online DGPO and NFT: every iteration's data comes from the policy as it is at that iteration (a loop that
reads stale samples, or samples with the base model, fails here), and the loop writes its curve."""
import copy
import json

import pytest
import torch

from pipeline.backends.base import transformer_velocity
from pipeline.backends.toy import ToyBackend
from pipeline.model_folder import merge_lora
from pipeline.sampling import sample


@pytest.mark.parametrize("params", ["full", "lora"])
def test_online_dgpo_trains_on_samples_of_the_current_policy(online_cfg, tiny_toy_model, params):
    from pipeline.adapters import lora_scale
    from stages.baselines import forward
    from stages.baselines.common import setup

    cfg = online_cfg("online.method=dgpo", *(["train.lora_rank=0"] if params == "full" else ["train.lora_rank=4"]))
    s = setup(cfg)
    seen = []

    def record(s_, ro):  # the weights at collection time, and the rollouts the update will use
        seen.append(({k: v.clone() for k, v in s_.policy.state_dict().items()}, ro))

    step = forward.iterate("dgpo", on_collect=record)
    for it in (1, 2, 3):
        step(s, it)
    base = ToyBackend.from_pretrained(tiny_toy_model)
    for k, (weights, ro) in enumerate(seen):
        now = ToyBackend.from_pretrained(tiny_toy_model)
        now.transformer.load_state_dict(merge_lora(weights, lora_scale(cfg.train)))
        again = sample(now, ro.noise, ro.cond, cfg.sampler)  # an independent draw from that policy, same noise
        assert torch.allclose(again, ro.latents, atol=1e-5), f"iteration {k + 1} trained on other samples"
        if k > 0:  # the policy has moved: the base model's samples (or the previous iteration's) are not these
            assert not torch.allclose(sample(base, ro.noise, ro.cond, cfg.sampler), ro.latents, atol=1e-4)
    assert not torch.equal(seen[0][1].noise, seen[1][1].noise)  # fresh noise every iteration


def test_online_runs_write_their_curves(online_cfg, tmp_path):
    from stages.baselines.online import main

    for method in ("dgpo", "nft", "flow-grpo"):
        out = tmp_path / method
        res = main(online_cfg(f"online.method={method}", f"online.out={out}"))
        curve = [json.loads(x) for x in (out / "curve.jsonl").read_text().splitlines()]
        assert [c["iteration"] for c in curve] == [0, 1, 2] and curve == res["curve"]
        assert curve[0]["wall_s"] == 0 and curve[2]["wall_s"] > curve[1]["wall_s"] > 0
        assert curve[2]["images"] == 2 * 2 * 4 and {"strict", "quality"} <= set(curve[0])
        assert (out / "export" / "transformer").is_dir() and json.loads((out / "result.json").read_text())


def test_online_lora_trains_the_runs_adapter_and_exports_it_merged(online_cfg, tiny_toy_model, tmp_path):
    """With train.lora_rank > 0 the online baselines train the adapter `gdro train` trains (so a comparison
    trains the same parameters on both sides): the base weights do not move, the adapter does, and the export
    is a plain model folder whose outputs are the adapted policy's."""
    from stages.baselines import forward
    from stages.baselines.common import run, setup

    cfg = online_cfg("online.method=dgpo", "train.lora_rank=4", f"online.out={tmp_path / 'lora'}")
    s = setup(cfg)
    base = ToyBackend.from_pretrained(tiny_toy_model).transformer.state_dict()
    trained = {id(p) for g in s.opt.param_groups for p in g["params"]}
    names = {n for n, p in s.policy.named_parameters() if id(p) in trained}
    assert names and all(".lora_" in n for n in names)
    before = {n: p.detach().clone() for n, p in s.policy.named_parameters()}
    forward.iterate("dgpo")(s, 1)
    moved = {n for n, p in s.policy.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= names  # only the adapter moved
    assert all(torch.equal(v, s.reference.state_dict()[k]) for k, v in base.items())  # the reference is the base

    last = {}
    step = forward.iterate("dgpo")

    def it(s_, k):  # the adapted policy as the run's last iteration leaves it
        info = step(s_, k)
        last["policy"] = copy.deepcopy(s_.policy).eval()
        return info

    run(cfg, it, "dgpo")
    export = ToyBackend.from_pretrained(tmp_path / "lora" / "export")
    keys = set(export.transformer.state_dict())
    assert keys == set(base) and not any("lora" in k for k in keys)
    assert any(not torch.equal(export.transformer.state_dict()[k], base[k]) for k in base)  # the adapter is in it
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0.7, 0.3])
    cond = export.encode_prompts(["a red circle", "two squares"])
    with torch.no_grad():
        want = transformer_velocity(last["policy"], x, t, cond)
        got = transformer_velocity(export.transformer, x, t, cond)
        at_base = transformer_velocity(s.reference, x, t, cond)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, at_base, atol=1e-4)
