"""The loss family against brute-force references written here with Python loops and `math`.

Nothing below reuses `pipeline.losses` internals: every reference (advantages, the DGPO group preference of
Eq. 15-17, the cross-entropy, the Plackett-Luce product, DPO, RAFT, pairwise accuracy, KL) is recomputed from
its formula on plain lists of floats, and the pipeline's vectorised version must agree.
"""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from pipeline import losses as L

EPS = 1e-4  # the design's A = (r - mean) / (std + 1e-4)
NAMES = ["dgpo", "gdro-ce", "gdro-pl", "dpo", "raft"]


# ------------------------------------------------------------------------------------ brute-force references
def rows(t: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in row] for row in t]


def ref_advantages(rewards, scope="group", clip=5.0):
    """(A, signal) with loops: population std, group mean, group or batch std, clipped, zero-spread -> 0."""
    flat = [v for row in rewards for v in row]
    bmean = sum(flat) / len(flat)
    bstd = math.sqrt(sum((v - bmean) ** 2 for v in flat) / len(flat))
    out, signal = [], []
    for row in rewards:
        g = len(row)
        mean = sum(row) / g
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / g) if scope == "group" else bstd
        spread = max(row) - min(row) > 0
        signal.append(spread)
        out.append([max(-clip, min(clip, (v - mean) / (std + EPS))) if spread else 0.0 for v in row])
    return out, signal


def ref_rho(policy, ref, beta):
    return [[-beta * (p - q) for p, q in zip(pr, qr)] for pr, qr in zip(policy, ref)]


def log_sigmoid(z):
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def mean_over_signal(values, signal):
    kept = [v for v, s in zip(values, signal) if s]
    return sum(kept) / len(kept) if kept else 0.0


def ref_dgpo_group(rho, adv):
    """DGPO Eq. 15-17 literally: G+ = {A > 0}, G- = {A <= 0}, w = |A|, -log sigmoid(sum_G+ w rho - sum_G- w rho)."""
    pos = [i for i, a in enumerate(adv) if a > 0]
    neg = [i for i, a in enumerate(adv) if a <= 0]
    z = sum(abs(adv[i]) * rho[i] for i in pos) - sum(abs(adv[i]) * rho[i] for i in neg)
    return -log_sigmoid(z)


def ref_softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def ref_gdro_ce_group(rho, adv, tau):
    target = ref_softmax([a / tau for a in adv])
    logp = [math.log(p) for p in ref_softmax(rho)]
    return -sum(t * lp for t, lp in zip(target, logp))


def ref_ranking(rewards):
    """Best first; ties keep index order."""
    return sorted(range(len(rewards)), key=lambda i: (-rewards[i], i))


def ref_pl_probability(rho, ranking):
    """P(ranking) = prod_j exp(rho_pi_j) / sum_{l >= j} exp(rho_pi_l), as a plain product."""
    p = 1.0
    for j in range(len(ranking)):
        num = math.exp(rho[ranking[j]])
        den = sum(math.exp(rho[ranking[l]]) for l in range(j, len(ranking)))
        p *= num / den
    return p


def first_argmax(xs):
    best = 0
    for i, v in enumerate(xs):
        if v > xs[best]:
            best = i
    return best


def first_argmin(xs):
    worst = 0
    for i, v in enumerate(xs):
        if v < xs[worst]:
            worst = i
    return worst


def ref_loss(name, policy, ref, rewards, *, beta, scope="group", clip=5.0, tau=1.0):
    adv, signal = ref_advantages(rewards, scope, clip)
    rho = ref_rho(policy, ref, beta)
    if name == "raft":  # every group counts, no reference
        return sum(p[first_argmax(r)] for p, r in zip(policy, rewards)) / len(policy)
    per_group = []
    for g in range(len(rewards)):
        if name == "dgpo":
            per_group.append(ref_dgpo_group(rho[g], adv[g]))
        elif name == "gdro-ce":
            per_group.append(ref_gdro_ce_group(rho[g], adv[g], tau))
        elif name == "gdro-pl":
            per_group.append(-math.log(ref_pl_probability(rho[g], ref_ranking(rewards[g]))))
        elif name == "dpo":
            b, w = first_argmax(rewards[g]), first_argmin(rewards[g])
            per_group.append(-log_sigmoid(rho[g][b] - rho[g][w]))
    return mean_over_signal(per_group, signal)


def random_batch(n=3, g=4, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    policy = (torch.rand(n, g, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    ref = (policy.double() + 0.01 * torch.randn(n, g, generator=gen, dtype=torch.float64)).to(dtype)
    rewards = torch.rand(n, g, generator=gen, dtype=torch.float64).to(dtype)  # distinct almost surely
    return policy, ref, rewards


# ------------------------------------------------------------------------------------------------ advantages
def test_advantages_hand_worked():
    # mean 0.5, population std 0.5: A = +-0.5 / (0.5 + 1e-4)
    a, signal = L.advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64))
    expect = 0.5 / (0.5 + 1e-4)
    assert expect == pytest.approx(0.99980004, abs=1e-8)
    torch.testing.assert_close(a, torch.tensor([[expect, -expect, -expect, expect]], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    assert signal.tolist() == [True]
    # [3, 1, 2]: mean 2, population std sqrt(2/3)
    a, _ = L.advantages(torch.tensor([[3.0, 1.0, 2.0]], dtype=torch.float64))
    s = math.sqrt(2 / 3) + 1e-4
    torch.testing.assert_close(a, torch.tensor([[1 / s, -1 / s, 0.0]], dtype=torch.float64), rtol=0, atol=1e-12)


def test_advantages_population_std_not_sample_std():
    # two members: population std is |r1 - r0| / 2, so A = +-1 (up to the 1e-4); a sample std would give 1/sqrt(2)
    a, _ = L.advantages(torch.tensor([[0.0, 2.0]], dtype=torch.float64))
    assert a[0, 1].item() == pytest.approx(1 / (1 + 1e-4), abs=1e-12)


@pytest.mark.parametrize("scope", ["group", "batch"])
@pytest.mark.parametrize("clip", [5.0, 1.2, 0.3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_advantages_match_loops(scope, clip, seed):
    gen = torch.Generator().manual_seed(seed)
    r = torch.rand(5, 6, generator=gen, dtype=torch.float64) * torch.tensor([[1.0], [3.0], [0.1], [10.0], [1.0]],
                                                                            dtype=torch.float64)
    r[4] = 0.25  # a zero-spread group among them
    a, signal = L.advantages(r, scope=scope, clip=clip)
    ea, es = ref_advantages(rows(r), scope, clip)
    torch.testing.assert_close(a, torch.tensor(ea, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert signal.tolist() == es == [True, True, True, True, False]


def test_advantages_clipping():
    # G = 100, one winner: A_winner = 0.99 / (sqrt(0.0099) + 1e-4) ~ 9.9 -> clipped to 5; the losers are not
    r = torch.zeros(1, 100, dtype=torch.float64)
    r[0, 7] = 1.0
    a, _ = L.advantages(r, clip=5.0)
    assert a[0, 7].item() == 5.0
    loser = -0.01 / (math.sqrt(0.0099) + 1e-4)
    assert a[0, 0].item() == pytest.approx(loser, abs=1e-12)
    a, _ = L.advantages(r, clip=0.05)
    assert a.max().item() == 0.05 and a.min().item() == -0.05


def test_advantages_batch_scope_uses_group_mean_and_batch_std():
    r = torch.tensor([[0.0, 2.0], [10.0, 10.0 + 4.0]], dtype=torch.float64)
    a, signal = L.advantages(r, scope="batch")
    flat = [0.0, 2.0, 10.0, 14.0]
    m = sum(flat) / 4
    bstd = math.sqrt(sum((v - m) ** 2 for v in flat) / 4)
    expect = [[-1 / (bstd + EPS), 1 / (bstd + EPS)], [-2 / (bstd + EPS), 2 / (bstd + EPS)]]
    torch.testing.assert_close(a, torch.tensor(expect, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert signal.tolist() == [True, True]


@pytest.mark.parametrize("scope", ["group", "batch"])
def test_zero_spread_groups_are_exactly_zero(scope):
    r = torch.tensor([[0.3, 0.3, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.5, 0.5]], dtype=torch.float32)
    a, signal = L.advantages(r, scope=scope)
    assert signal.tolist() == [False, False, True]
    assert torch.equal(a[:2], torch.zeros(2, 4))
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    a, signal = L.advantages(torch.full((2, 3), 0.7))  # a batch without any spread: no 0/0
    assert not signal.any() and torch.equal(a, torch.zeros(2, 3))


def test_advantages_bad_scope():
    with pytest.raises(ValueError, match="scope"):
        L.advantages(torch.rand(2, 3), scope="global")


# ------------------------------------------------------------------------------------------------ the losses
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scope", ["group", "batch"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_losses_match_loops(name, scope, seed):
    policy, ref, rewards = random_batch(4, 5, seed)
    rewards[2, 3] = rewards[2, 1]  # one tie, to pin the tie convention too
    beta = 7.0
    out = L.group_loss(name, policy, ref, rewards, beta=beta, adv_scope=scope, adv_clip=5.0, tau=1.0)
    expect = ref_loss(name, rows(policy), rows(ref), rows(rewards), beta=beta, scope=scope)
    assert out.loss.item() == pytest.approx(expect, rel=1e-10, abs=1e-12)
    torch.testing.assert_close(out.rho, torch.tensor(ref_rho(rows(policy), rows(ref), beta), dtype=torch.float64))


def test_dgpo_is_the_papers_group_preference():
    """Eq. 15-17: the pipeline's -log sigmoid(sum_i A_i rho_i) is the G+ vs G- Bradley-Terry form with w = |A|."""
    for seed in range(5):
        policy, ref, rewards = random_batch(3, 6, seed)
        adv, signal = L.advantages(rewards)
        rho = L.implicit_rewards(policy, ref, 3.0)
        got = L.dgpo(rho, adv, signal, rewards)
        per = [ref_dgpo_group(rw, aw) for rw, aw in zip(rows(rho), rows(adv))]
        assert got.item() == pytest.approx(sum(per) / len(per), rel=1e-12)


def test_dgpo_hand_worked():
    # rewards [1, 0, 0, 1]: A = +-a, a = 0.5 / 0.5001; G+ = {0, 3}, G- = {1, 2}
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    policy = torch.tensor([[0.9, 1.0, 1.1, 1.2]], dtype=torch.float64)
    ref = torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    beta = 2.0
    # rho = -2 (L - 1) = [0.2, 0, -0.2, -0.4]; z = a (0.2 - 0.4) - a (0 - 0.2) = 0
    out = L.group_loss("dgpo", policy, ref, rewards, beta=beta)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-12)
    # at step 0 (policy == reference) every loss of the preference family is at its prior
    out = L.group_loss("dgpo", ref.clone(), ref, rewards, beta=beta)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-12)
    out = L.group_loss("dpo", ref.clone(), ref, rewards, beta=beta)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-12)
    out = L.group_loss("gdro-pl", ref.clone(), ref, rewards, beta=beta)
    assert out.loss.item() == pytest.approx(math.log(24), abs=1e-12)  # uniform over 4! rankings


@pytest.mark.parametrize("scope", ["group", "batch"])
def test_dgpo_partition_cancels(scope):
    """Adding a constant c_g to every rho of group g leaves the loss unchanged: sum_G+ w = sum_G- w."""
    policy, ref, rewards = random_batch(4, 5, seed=11)
    adv, signal = L.advantages(rewards, scope=scope)
    for row in rows(adv):  # the zero-mean property behind the cancellation (no clipping active here)
        assert abs(sum(a for a in row if a > 0) - sum(-a for a in row if a <= 0)) < 1e-12
    rho = L.implicit_rewards(policy, ref, 5.0)
    shift = torch.tensor([[3.0], [-40.0], [0.5], [1e3]], dtype=torch.float64)
    base = L.dgpo(rho, adv, signal, rewards)
    shifted = L.dgpo(rho + shift, adv, signal, rewards)
    assert shifted.item() == pytest.approx(base.item(), rel=1e-9)
    # and in the brute-force reference
    for g, c in enumerate(shift.flatten().tolist()):
        r0 = rows(rho)[g]
        a0 = rows(adv)[g]
        assert ref_dgpo_group([v + c for v in r0], a0) == pytest.approx(ref_dgpo_group(r0, a0), rel=1e-6)
    # the same through the errors: shifting a group's policy errors by a constant changes nothing
    out = L.group_loss("dgpo", policy + shift / 5.0, ref, rewards, beta=5.0, adv_scope=scope)
    assert out.loss.item() == pytest.approx(base.item(), rel=1e-9)


@pytest.mark.parametrize("tau", [1.0, 0.5, 3.0])
def test_gdro_ce_matches_loops(tau):
    policy, ref, rewards = random_batch(3, 4, seed=5)
    out = L.group_loss("gdro-ce", policy, ref, rewards, beta=10.0, tau=tau)
    assert out.loss.item() == pytest.approx(
        ref_loss("gdro-ce", rows(policy), rows(ref), rows(rewards), beta=10.0, tau=tau), rel=1e-10)


def test_gdro_pl_matches_explicit_product():
    policy, ref, rewards = random_batch(3, 5, seed=9)
    rho = L.implicit_rewards(policy, ref, 20.0)
    adv, signal = L.advantages(rewards)
    got = L.gdro_pl(rho, adv, signal, rewards)
    expect = [-math.log(ref_pl_probability(rw, ref_ranking(r))) for rw, r in zip(rows(rho), rows(rewards))]
    assert got.item() == pytest.approx(sum(expect) / 3, rel=1e-10)


def test_plackett_luce_normalises_over_all_rankings():
    """G = 3: the probabilities of the 6 rankings sum to 1, in the brute force and in the pipeline's loss."""
    rho = [0.7, -1.3, 2.1]
    perms = list(itertools.permutations(range(3)))
    assert len(perms) == 6
    assert sum(ref_pl_probability(rho, p) for p in perms) == pytest.approx(1.0, abs=1e-12)
    rho_t = torch.tensor([rho], dtype=torch.float64)
    total = 0.0
    for p in perms:
        rewards = torch.zeros(1, 3, dtype=torch.float64)
        for j, i in enumerate(p):  # member p[j] is ranked j-th
            rewards[0, i] = 3.0 - j
        adv, signal = L.advantages(rewards)
        nll = L.gdro_pl(rho_t, adv, signal, rewards).item()
        assert nll == pytest.approx(-math.log(ref_pl_probability(rho, p)), rel=1e-12)
        total += math.exp(-nll)
    assert total == pytest.approx(1.0, abs=1e-12)


def test_dpo_best_vs_worst():
    rewards = torch.tensor([[0.2, 0.9, 0.1, 0.5]], dtype=torch.float64)
    rho = torch.tensor([[1.0, 0.4, -0.3, 5.0]], dtype=torch.float64)
    adv, signal = L.advantages(rewards)
    got = L.dpo(rho, adv, signal, rewards).item()
    assert got == pytest.approx(-log_sigmoid(0.4 - (-0.3)), rel=1e-12)  # best = 1, worst = 2; member 3 is ignored


def test_raft_mean_of_best_members_error():
    policy = torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.7, 0.3], [0.4, 0.4, 0.4]], dtype=torch.float64)
    rewards = torch.tensor([[0.0, 0.0, 1.0], [5.0, 1.0, 2.0], [0.1, 0.1, 0.1]], dtype=torch.float64)
    out = L.group_loss("raft", policy, None, rewards, beta=1.0)
    # best: 0.9, 0.1, and the zero-spread group's first member 0.4 (raft trains on every group)
    assert out.loss.item() == pytest.approx((0.9 + 0.1 + 0.4) / 3, rel=1e-12)


@pytest.mark.parametrize("name", sorted(L.PAIRWISE))
def test_pairwise_losses_on_the_two_picked_members_equal_the_whole_group(name):
    """The trainer computes errors for `pair_members` only when the loss is pairwise: on those two columns the
    loss and its gradient must be the whole group's, ties (first max, first min) and zero-spread groups included."""
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randint(0, 3, (64, 6), generator=gen).double()  # many ties and some zero-spread groups
    rewards[0] = 1.0
    policy = torch.rand(64, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    ref = torch.rand(64, 6, dtype=torch.float64, generator=gen)
    full = L.group_loss(name, policy, ref, rewards, beta=3.0)
    (g_full,) = torch.autograd.grad(full.loss, policy)
    pick = L.pair_members(rewards)
    assert [int(pick[0, 0]), int(pick[0, 1])] == [0, 0]  # a zero-spread group: first max, first min
    sub = L.group_loss(name, torch.gather(policy, 1, pick), torch.gather(ref, 1, pick), torch.gather(rewards, 1, pick),
                       beta=3.0)
    (g_sub,) = torch.autograd.grad(sub.loss, policy)
    assert sub.loss.item() == pytest.approx(full.loss.item(), rel=1e-12)
    assert torch.allclose(g_sub, g_full, rtol=1e-12, atol=1e-15)
    assert torch.equal(sub.signal, full.signal)
    untouched = torch.ones_like(policy, dtype=torch.bool).scatter(1, pick, False)
    assert float(g_full[untouched].abs().max()) == 0.0  # why the other members need no forward pass


def test_member_rows_are_the_picked_members_of_the_flattened_batch():
    """member_rows indexes a batch flattened group by group ([N * G] rows) as gather indexes the [N, G] view."""
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(7 * 5, 3, generator=gen)  # 7 groups of G = 5, a feature vector per member
    pick = L.pair_members(torch.rand(7, 5, generator=gen))
    rows = x[L.member_rows(pick, 5)]
    want = torch.stack([x[i * 5 + int(pick[i, j])] for i in range(7) for j in range(2)])  # brute force
    assert torch.equal(rows, want)
    assert torch.equal(rows.view(7, 2, 3), x.view(7, 5, 3)[torch.arange(7).unsqueeze(1), pick])


# ------------------------------------------------------------------------------------ averaging and signal
@pytest.mark.parametrize("name", ["dgpo", "gdro-ce", "gdro-pl", "dpo"])
def test_batch_without_signal_is_a_zero_loss_with_a_graph(name):
    policy = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    ref = torch.rand(3, 4, dtype=torch.float64)
    rewards = torch.tensor([[0.5] * 4, [0.0] * 4, [1.0] * 4], dtype=torch.float64)
    out = L.group_loss(name, policy, ref, rewards, beta=100.0)
    assert out.loss.item() == 0.0
    assert out.loss.requires_grad
    assert not out.signal.any()
    out.loss.backward()
    assert policy.grad is not None and torch.isfinite(policy.grad).all()
    assert torch.equal(policy.grad, torch.zeros_like(policy))


@pytest.mark.parametrize("name", ["dgpo", "gdro-ce", "gdro-pl", "dpo"])
def test_zero_spread_groups_do_not_change_the_loss(name):
    policy, ref, rewards = random_batch(3, 4, seed=21)
    alone = L.group_loss(name, policy, ref, rewards, beta=50.0).loss.item()
    flat_pol, flat_ref, _ = random_batch(2, 4, seed=22)
    flat_rw = torch.tensor([[0.4] * 4, [0.9] * 4], dtype=torch.float64)
    mixed = L.group_loss(name, torch.cat([flat_pol[:1], policy, flat_pol[1:]]),
                         torch.cat([flat_ref[:1], ref, flat_ref[1:]]),
                         torch.cat([flat_rw[:1], rewards, flat_rw[1:]]), beta=50.0)
    assert mixed.signal.tolist() == [False, True, True, True, False]
    assert mixed.loss.item() == pytest.approx(alone, rel=1e-12)
    # and the loss is the mean over the groups with signal, not over all groups
    per = [ref_loss(name, [p], [q], [r], beta=50.0) for p, q, r in zip(rows(policy), rows(ref), rows(rewards))]
    assert mixed.loss.item() == pytest.approx(sum(per) / 3, rel=1e-10)


def test_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss"):
        L.group_loss("ppo", torch.rand(2, 3), torch.rand(2, 3), torch.rand(2, 3), beta=1.0)


# ---------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scope", ["group", "batch"])
def test_gradcheck(name, scope):
    policy, ref, rewards = random_batch(3, 4, seed=31)
    assert len(set(rewards.flatten().tolist())) == 12
    policy.requires_grad_(True)
    ref_in = None if name == "raft" else ref

    def f(p):
        return L.group_loss(name, p, ref_in, rewards, beta=3.0, adv_scope=scope, tau=0.7).loss

    assert torch.autograd.gradcheck(f, (policy,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradient_signs_dgpo():
    """Lowering a winner's error (or raising a loser's) lowers the DGPO loss."""
    policy, ref, rewards = random_batch(1, 4, seed=41)
    policy.requires_grad_(True)
    L.group_loss("dgpo", policy, ref, rewards, beta=10.0).loss.backward()
    adv, _ = L.advantages(rewards)
    assert ((policy.grad > 0) == (adv > 0)).all()


# -------------------------------------------------------------------------------------------- diagnostics
def test_pairwise_accuracy_hand_made():
    rewards = torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 0.0]])
    rho = torch.tensor([[0.5, 0.1, 0.9], [0.0, 5.0, -1.0]])
    # group 0: (3>1: 0.5>0.1 yes), (3>2: 0.5>0.9 no), (2>1: 0.9>0.1 yes); group 1: the tie is skipped,
    # (1>0: 0>-1 yes), (1>0: 5>-1 yes): 4 of 5
    assert L.pairwise_accuracy(rho, rewards) == pytest.approx(4 / 5)
    assert L.pairwise_accuracy(rho[:1], rewards[:1]) == pytest.approx(2 / 3)
    assert math.isnan(L.pairwise_accuracy(rho, torch.ones(2, 3)))


def test_pairwise_accuracy_matches_loops():
    rng = random.Random(3)
    rewards = [[rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(6)] for _ in range(5)]
    rho = [[rng.gauss(0, 1) for _ in range(6)] for _ in range(5)]
    good = total = 0
    for r, p in zip(rewards, rho):
        for i in range(6):
            for j in range(6):
                if r[i] > r[j]:
                    total += 1
                    good += p[i] > p[j]
    assert L.pairwise_accuracy(torch.tensor(rho), torch.tensor(rewards)) == pytest.approx(good / total)


def test_kl_penalty_manual():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 4, 4, generator=gen)
    b = torch.randn(2, 3, 4, 4, generator=gen)
    total, count = 0.0, 0
    for x, y in zip(a.flatten().tolist(), b.flatten().tolist()):
        total += (x - y) ** 2
        count += 1
    assert L.kl_penalty(a, b).item() == pytest.approx(total / count, rel=1e-5)
    assert L.kl_penalty(a, a).item() == 0.0
    assert L.kl_penalty(a.bfloat16(), b.bfloat16()).dtype == torch.float32


def _threads_all_reduce(n_ranks: int):
    """A stand-in all-reduce for `n_ranks` threads: each call returns the sum over the ranks' tensors."""
    import threading

    barrier = threading.Barrier(n_ranks)
    slots: list = [None] * n_ranks

    def make(rank: int):
        def sum_ranks(x):
            slots[rank] = x.clone()
            barrier.wait()
            total = sum(slots[1:], slots[0].clone())
            barrier.wait()  # every rank has read the slots before the next call overwrites them
            return total

        return sum_ranks

    return [make(r) for r in range(n_ranks)]


def test_batch_std_over_ranks_is_the_concatenated_batchs():
    """adv_scope=batch across ranks: 3 ranks holding 1, 2 and 3 groups get the population std of all 6 groups'
    rewards, a hand computation over the concatenated batch, and the advantages one process gets from it."""
    import threading

    _, _, rewards = random_batch(6, 4, 11)
    parts = [rewards[:1], rewards[1:3], rewards[3:]]
    flat = [v for row in rows(rewards) for v in row]
    mean = sum(flat) / len(flat)
    want = math.sqrt(sum((v - mean) ** 2 for v in flat) / len(flat))
    got = [None] * 3
    reducers = _threads_all_reduce(3)

    def rank(i):
        got[i] = L.batch_std(parts[i], reducers[i])

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for g in got:
        assert float(g) == pytest.approx(want, rel=1e-12)
    # and each rank's advantages with the global std are the rows of the one-process advantages
    one, _ = L.advantages(rewards, scope="batch")
    per_rank = torch.cat([L.advantages(p, scope="batch", std=g)[0] for p, g in zip(parts, got)])
    torch.testing.assert_close(per_rank, one, rtol=1e-12, atol=1e-12)
    # a rank's own std (what adv_scope=batch took before) is not that
    assert abs(float(L.batch_std(parts[0])) - want) > 1e-3
