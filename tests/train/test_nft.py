"""`nft` (DiffusionNFT, arXiv 2509.16117) against an independent, element-by-element implementation of its loss."""
import numpy as np
import pytest
import torch

from pipeline.flow import nft_branch_errors
from pipeline.losses import advantages, group_loss


def nft_by_hand(v_pol, v_old, x0, eps, t, rewards, beta, clip):
    """The paper's objective written out sample by sample, float64, no torch."""
    n, g = rewards.shape
    total = 0.0
    for i in range(n):
        r_ = rewards[i]
        std = r_.std()
        for j in range(g):
            a = 0.0 if r_.max() - r_.min() < 1e-12 else (r_[j] - r_.mean()) / (std + 1e-4)
            r = min(max(a, -clip), clip) / clip / 2 + 0.5
            k = i * g + j
            xt = (1 - t[k]) * x0[k] + t[k] * eps[k]
            v_pos = beta * v_pol[k] + (1 - beta) * v_old[k]
            v_neg = (1 + beta) * v_old[k] - beta * v_pol[k]
            branch = []
            for v in (v_pos, v_neg):
                d = xt - t[k] * v - x0[k]
                branch.append(np.mean(d ** 2) / max(np.mean(np.abs(d)), 1e-5))
            total += clip * (r * branch[0] + (1 - r) * branch[1]) / beta
    return total / (n * g)


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_nft_matches_the_paper_written_out(beta):
    gen = torch.Generator().manual_seed(0)
    n, g, shape = 3, 4, (2, 3, 3)
    x0, eps, v_pol, v_old = (torch.randn(n * g, *shape, generator=gen, dtype=torch.float64) for _ in range(4))
    t = torch.rand(n, generator=gen, dtype=torch.float64).repeat_interleave(g)
    rewards = torch.rand(n, g, generator=gen, dtype=torch.float64)
    rewards[1] = 0.5  # a zero-spread group: r = 1/2, still counted
    pos, neg = nft_branch_errors(v_pol, v_old, x0, eps, t, beta)
    out = group_loss("nft", pos.view(n, g), None, rewards, beta=1.0, neg_err=neg.view(n, g), nft_beta=beta,
                     adv_clip=2.0)
    want = nft_by_hand(*(a.numpy() for a in (v_pol, v_old, x0, eps, t)), rewards.numpy(), beta, 2.0)
    assert float(out.loss) == pytest.approx(want, rel=1e-5)


def test_nft_gradient_at_the_old_model_points_along_the_advantage():
    """At v_theta = v_old, d loss / d v_theta of member k is proportional to (2 r_k - 1) (v_old - v): the
    positive members pull the policy towards their own data, the negative ones push it away, r = 1/2 not at all."""
    gen = torch.Generator().manual_seed(1)
    g, shape = 4, (1, 2, 2)
    x0, eps, v_old = (torch.randn(g, *shape, generator=gen, dtype=torch.float64) for _ in range(3))
    t = torch.full((g,), 0.5, dtype=torch.float64)
    v_pol = v_old.clone().requires_grad_(True)
    rewards = torch.tensor([[0.0, 1.0, 0.2, 0.6]], dtype=torch.float64)
    pos, neg = nft_branch_errors(v_pol, v_old, x0, eps, t, 1.0)
    group_loss("nft", pos.view(1, g), None, rewards, beta=1.0, neg_err=neg.view(1, g), adv_clip=5.0).loss.backward()
    adv, _ = advantages(rewards, clip=5.0)
    r = (adv.clamp(-5, 5) / 10 + 0.5).view(g)
    direction = (v_old - (eps - x0)).flatten(1)
    grad = v_pol.grad.flatten(1)
    cos = torch.nn.functional.cosine_similarity(grad, direction * (2 * r - 1).unsqueeze(1), dim=1)
    assert torch.allclose(cos, torch.ones(g, dtype=torch.float64), atol=1e-9)
    assert torch.all((grad * direction).sum(1).sign() == (2 * r - 1).sign())
