"""Online DGPO and NFT: every iteration's data comes from the policy as it is at that iteration (a loop that
reads stale samples, or samples with the base model, fails here), and the loop writes its curve."""
import json

import torch

from pipeline.backends.toy import ToyBackend
from pipeline.sampling import sample


def test_online_dgpo_trains_on_samples_of_the_current_policy(online_cfg, tiny_toy_model):
    from stages.baselines import forward
    from stages.baselines.common import setup

    cfg = online_cfg("online.method=dgpo")
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
        now.transformer.load_state_dict(weights)
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
