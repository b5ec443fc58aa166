"""The loss family: pure functions of [groups, G] tensors.

Inputs per group of G images of one prompt: policy errors L, reference errors Lref (the flow-matching errors
of the trained and the frozen model on the same x_t, t, eps), and rewards r (already mixed from the raw
rewards). The implicit reward of a member is rho = -beta (L - Lref): positive when the policy does better
than the reference on it.

- `dgpo`: -log sigmoid(sum_i A_i rho_i). With w_i = |A_i| and G+ = {A_i > 0}, this is DGPO's Eq. 15-17:
  sum_{G+} w rho - sum_{G-} w rho, where the partition function cancels because sum_{G+} w = sum_{G-} w.
- `gdro-ce`, `gdro-pl`: OUR READING of the GDRO paradigm (the paper's loss is unpublished): cross-entropy
  from softmax(A / tau) to softmax(rho), and the Plackett-Luce likelihood of the reward ranking under rho.
- `dpo`: Diffusion-DPO on the best and the worst member (baseline). `raft`: flow matching on the best (baseline).
- `nft`: DiffusionNFT (arXiv 2509.16117), reference-free in the sense that it needs no likelihood and no frozen
  model of its own, only the data-collecting ("old") model's velocity on the same x_t: each member's optimality
  r = clip(A)/(2 adv_clip) + 1/2 weighs the errors of an implicit positive and negative policy
  (`flow.nft_branch_errors`), every member counts.

Groups with zero reward spread carry no preference: their advantages are exactly 0, they are counted, and
they are left out of the mean (never a division by zero: a batch without signal gives a zero loss that
still has a graph).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ADV_EPS = 1e-4  # A = (r - mean) / (std + ADV_EPS)
SPREAD_TOL = 1e-12  # max - min below this: a zero-spread group


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar
    rho: torch.Tensor  # [N, G] implicit rewards
    advantages: torch.Tensor  # [N, G]
    signal: torch.Tensor  # [N] bool: groups with reward spread


def batch_std(rewards: torch.Tensor, sum_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The population std of every reward of the global batch, in float64. `sum_ranks` sums a tensor over the
    ranks (an all-reduce); two passes (mean, then squared deviations) as `Tensor.std` does, so the statistic of
    4 ranks x 2 groups is that of 1 process with 8 up to rounding. None: this process holds the whole batch."""
    sum_ranks = sum_ranks or (lambda x: x)
    r = rewards.double()
    count_sum = sum_ranks(torch.stack([torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device), r.sum()]))
    mean = count_sum[1] / count_sum[0]
    return (sum_ranks((r - mean).pow(2).sum().reshape(1))[0] / count_sum[0]).sqrt()


def advantages(rewards: torch.Tensor, *, scope: str = "group", clip: float = 5.0,
               std: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [N, G], signal [N]): group-mean-centred rewards over the group's std ("group") or the batch's std
    ("batch"; Flow-GRPO's global std: `std` from `batch_std` over all ranks, else this batch's), population std,
    clipped to +-clip; zero-spread groups get A = 0."""
    r = rewards.double()
    centred = r - r.mean(1, keepdim=True)
    if scope == "group":
        std = r.std(1, unbiased=False, keepdim=True)
    elif scope == "batch":
        std = (batch_std(r) if std is None else std.double()).reshape(1, 1).expand(r.shape[0], 1)
    else:
        raise ValueError(f"advantage scope must be 'group' or 'batch', got {scope!r}")
    signal = (r.max(1).values - r.min(1).values) > SPREAD_TOL
    a = (centred / (std + ADV_EPS)).clamp(-clip, clip)
    a = torch.where(signal.unsqueeze(1), a, torch.zeros_like(a))
    return a.to(rewards.dtype), signal


def implicit_rewards(policy_err: torch.Tensor, ref_err: torch.Tensor, beta: float) -> torch.Tensor:
    return -beta * (policy_err - ref_err)


def _mean_over(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values[mask]; a zero that keeps the graph when nothing is selected."""
    if mask.any():
        return values[mask].mean()
    return values.sum() * 0.0


def dgpo(rho: torch.Tensor, adv: torch.Tensor, signal: torch.Tensor, rewards: torch.Tensor, **_) -> torch.Tensor:
    return _mean_over(-F.logsigmoid((adv * rho).sum(1)), signal)


def gdro_ce(rho: torch.Tensor, adv: torch.Tensor, signal: torch.Tensor, rewards: torch.Tensor, *,
            tau: float = 1.0, **_) -> torch.Tensor:
    target = torch.softmax(adv / tau, dim=1)
    return _mean_over(-(target * torch.log_softmax(rho, dim=1)).sum(1), signal)


def gdro_pl(rho: torch.Tensor, adv: torch.Tensor, signal: torch.Tensor, rewards: torch.Tensor, **_) -> torch.Tensor:
    """-log P(ranking by reward | rho) = -sum_j [rho_(j) - logsumexp(rho_(j..G))]; ties keep index order."""
    order = torch.sort(rewards, dim=1, descending=True, stable=True).indices
    s = torch.gather(rho, 1, order)
    tail_lse = torch.logcumsumexp(s.flip(1), dim=1).flip(1)  # logsumexp over positions j..G
    nll = -(s - tail_lse)[:, :-1].sum(1)  # the last factor is 1
    return _mean_over(nll, signal)


def dpo(rho: torch.Tensor, adv: torch.Tensor, signal: torch.Tensor, rewards: torch.Tensor, **_) -> torch.Tensor:
    best = rewards.argmax(1, keepdim=True)
    worst = rewards.argmin(1, keepdim=True)
    margin = torch.gather(rho, 1, best) - torch.gather(rho, 1, worst)
    return _mean_over(-F.logsigmoid(margin.squeeze(1)), signal)


def raft(rho: torch.Tensor, adv: torch.Tensor, signal: torch.Tensor, rewards: torch.Tensor, *,
         policy_err: torch.Tensor, **_) -> torch.Tensor:
    """Flow matching on each group's best member: no reference, no beta (every group counts)."""
    best = rewards.argmax(1, keepdim=True)
    return torch.gather(policy_err, 1, best).mean()


def nft_optimality(adv: torch.Tensor, clip: float) -> torch.Tensor:
    """DiffusionNFT's optimality probability of a member: its clipped advantage mapped to [0, 1] (A = 0: 1/2)."""
    return (adv.clamp(-clip, clip) / clip / 2 + 0.5).clamp(0, 1)


def nft(rho: torch.Tensor, adv: torch.Tensor, signal: torch.Tensor, rewards: torch.Tensor, *,
        policy_err: torch.Tensor, neg_err: torch.Tensor, nft_beta: float, adv_clip: float, **_) -> torch.Tensor:
    """DiffusionNFT: mean over every member of adv_clip x (r L+ + (1 - r) L-) / nft_beta, L+ and L- the errors of
    the implicit positive and negative policies (`policy_err`, `neg_err`). A zero-spread group has r = 1/2,
    whose gradient vanishes while the policy equals the old model."""
    r = nft_optimality(adv, adv_clip)
    return (adv_clip * (r * policy_err + (1 - r) * neg_err) / nft_beta).mean()


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"dgpo": dgpo, "gdro-ce": gdro_ce, "gdro-pl": gdro_pl,
                                                  "dpo": dpo, "raft": raft, "nft": nft}
NEEDS_REFERENCE = {"dgpo", "gdro-ce", "gdro-pl", "dpo"}
# losses that read only each group's best and worst member: the trainer computes errors for those two alone
PAIRWISE = {"dpo", "raft"}
NEEDS_VELOCITY = {"nft"}  # the old model's velocity on the same x_t: a live reference, never the error cache
EVERY_GROUP = {"raft", "nft"}  # losses averaged over every group, not only those with reward spread


def group_loss(name: str, policy_err: torch.Tensor, ref_err: torch.Tensor | None, rewards: torch.Tensor, *,
               beta: float, adv_scope: str = "group", adv_clip: float = 5.0, tau: float = 1.0,
               adv_std: torch.Tensor | None = None, neg_err: torch.Tensor | None = None,
               nft_beta: float = 1.0) -> LossOutput:
    """One entry point for every loss: [N, G] errors and rewards in, a scalar loss and diagnostics out.
    `adv_std`: the global batch's std for adv_scope="batch" (`batch_std` with an all-reduce), else this batch's.
    For `nft`, policy_err and neg_err are the positive and negative branches' errors (`flow.nft_branch_errors`),
    and the diagnostics' implicit reward is L- - L+ (positive where the policy moved towards the member)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    if name in NEEDS_VELOCITY and neg_err is None:
        raise ValueError(f"loss {name!r} needs the negative branch's errors (neg_err)")
    adv, signal = advantages(rewards, scope=adv_scope, clip=adv_clip, std=adv_std)
    if name == "nft":
        rho = (neg_err - policy_err).detach()
    else:
        ref = ref_err if ref_err is not None else policy_err.detach()
        rho = implicit_rewards(policy_err, ref, beta)
    loss = LOSSES[name](rho, adv, signal, rewards, tau=tau, policy_err=policy_err, neg_err=neg_err,
                        nft_beta=nft_beta, adv_clip=adv_clip)
    return LossOutput(loss=loss, rho=rho, advantages=adv, signal=signal)


def pair_members(rewards: torch.Tensor) -> torch.Tensor:
    """[N, 2] member indices (best, worst) per group, chosen exactly as `dpo` and `raft` choose them (first
    argmax, first argmin): on these two columns those losses equal their value on the whole group."""
    return torch.stack([rewards.argmax(1), rewards.argmin(1)], 1)


def member_rows(pick: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, m] member indices per group (e.g. `pair_members`) -> the [N * m] rows they are in a batch of N groups
    flattened group by group ([N * group_size] rows), in the same order."""
    return (torch.arange(pick.shape[0], device=pick.device).unsqueeze(1) * group_size + pick).flatten()


def kl_penalty(v_policy: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
    """beta_kl's term: mean squared distance between the policy's and the reference's velocities."""
    return (v_policy.float() - v_ref.float()).pow(2).mean()


def pairwise_accuracy(rho: torch.Tensor, rewards: torch.Tensor) -> float:
    """Share of within-group pairs with different rewards whose implicit rewards are ordered the same way."""
    dr = rewards.unsqueeze(2) - rewards.unsqueeze(1)
    dp = rho.unsqueeze(2) - rho.unsqueeze(1)
    pairs = dr > SPREAD_TOL
    if not pairs.any():
        return float("nan")
    return float((dp[pairs] > 0).float().mean())
