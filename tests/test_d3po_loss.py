"""The D3PO loss and preferences: a hand-worked case, a slow loop, the DPO form, where the gradient vanishes;
shared initial noise of a pair; the reference model at initialisation; label pairs."""
import math

import pytest
import torch

import common
import d3po


def loss_of(log_probs, ref_log_probs, beta, ratio_clip):
    """(loss, accuracy, clipfrac) of d3po.d3po_loss, the winner first."""
    loss, info = d3po.d3po_loss(log_probs, ref_log_probs, beta, ratio_clip)
    return loss, info["accuracy"], info["clipfrac"]


def slow_d3po_loss(log_probs, ref_log_probs, beta, eps):
    """The reference code's loss written pair by pair with Python floats, the winner first."""
    total = 0.0
    for (lw, ll), (rw, rl) in zip(log_probs.tolist(), ref_log_probs.tolist()):
        ratio_w = min(max(math.exp(lw - rw), 1 - eps), 1 + eps)
        ratio_l = min(max(math.exp(ll - rl), 1 - eps), 1 + eps)
        z = beta * (math.log(ratio_w) - math.log(ratio_l))
        total += math.log(1 + math.exp(-z))  # -log sigmoid(z)
    return total / len(log_probs)


def test_hand_worked_case():
    # winner: log-ratio 0.05 (ratio 1.051, inside the band); loser: log-ratio -0.30 (ratio 0.741, clamped to 0.9)
    log_probs, ref = torch.tensor([[-1.00, -1.40]]), torch.tensor([[-1.05, -1.10]])
    loss, accuracy, clipfrac = loss_of(log_probs, ref, beta=0.1, ratio_clip=0.1)
    z = 0.1 * (0.05 - math.log(0.9))  # = 0.1 * (0.05 + 0.10536)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-z)), abs=1e-6)
    assert loss.item() == pytest.approx(0.685409, abs=1e-5)  # log(1 + e^-0.015536), by hand
    assert accuracy.item() == 1.0 and clipfrac.item() == 0.5


def test_matches_a_slow_loop():
    g = torch.Generator().manual_seed(1)
    log_probs = -1 + 0.2 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    ref = log_probs + 0.1 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    for beta, eps in ((0.1, 0.1), (2.0, 0.05), (0.5, 0.5)):
        loss, _, _ = loss_of(log_probs, ref, beta, eps)
        assert loss.item() == pytest.approx(slow_d3po_loss(log_probs, ref, beta, eps), rel=1e-10)


def test_with_the_clamp_inactive_it_is_the_standard_dpo_loss():
    g = torch.Generator().manual_seed(2)
    log_probs = -1 + 0.1 * torch.randn(16, 2, generator=g, dtype=torch.float64)
    ref = log_probs + 0.01 * torch.randn(16, 2, generator=g, dtype=torch.float64)  # ratios within 1 +- 0.05
    (lw, ll), (rw, rl) = log_probs.unbind(1), ref.unbind(1)
    dpo = -torch.nn.functional.logsigmoid(0.7 * ((lw - rw) - (ll - rl))).mean()
    loss, _, clipfrac = loss_of(log_probs, ref, beta=0.7, ratio_clip=0.5)
    assert clipfrac == 0
    torch.testing.assert_close(loss, dpo)


def test_clamped_ratio_gives_zero_gradient():
    log_probs = torch.tensor([[-1.0, -1.3], [-1.0, -1.02]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0], [-1.01, -1.0]])
    # pair 0: the loser's ratio (0.74) is outside the band; pair 1: both inside
    loss, _, _ = loss_of(log_probs, ref, beta=0.1, ratio_clip=0.1)
    loss.backward()
    grad = log_probs.grad
    assert grad[0, 1] == 0 and grad[0, 0] < 0          # clamped loser: nothing; winner pushed up
    assert grad[1, 0] < 0 and grad[1, 1] > 0           # winner up, loser down


def test_accuracy_counts_pairs_whose_log_ratio_already_ranks_the_winner_first():
    log_probs = torch.tensor([[-1.0, -1.1], [-1.1, -1.0], [-1.0, -1.2]])
    ref = torch.full((3, 2), -1.05)
    _, accuracy, _ = loss_of(log_probs, ref, 0.1, 0.5)
    assert accuracy.item() == pytest.approx(2 / 3)  # right, wrong, right


def test_preferences_by_pareto_dominance_put_the_winner_first():
    rewards = torch.tensor([[1.0, 2.0], [0.5, 2.0],   # first dominates
                            [0.0, 1.0], [1.0, 1.0],   # second dominates
                            [1.0, 0.0], [0.0, 1.0],   # neither dominates: left out
                            [3.0, 3.0], [3.0, 3.0]])  # tie: left out
    pairs = torch.arange(8).view(-1, 2)
    assert d3po.preferences(rewards, pairs).tolist() == [[0, 1], [3, 2]]
    one_reward = torch.tensor([[0.2], [0.1], [0.3], [0.3]])
    assert d3po.preferences(one_reward, torch.arange(4).view(-1, 2)).tolist() == [[0, 1]]


def test_labelled_pairs_are_every_pair_with_different_scores_the_better_first():
    # a round of 2 prompts x 3 images: every pair of a prompt's images, as human_feedback.load_round gives them
    candidates = torch.tensor([[0, 1], [0, 2], [1, 2], [3, 4], [3, 5], [4, 5]])
    scores = torch.tensor([3.0, 1.0, 3.0, 0.0, 0.0, 0.0]).view(-1, 1)
    assert d3po.preferences(scores, candidates).tolist() == [[0, 1], [2, 1]]  # (0, 2) ties; prompt 1 all tie


@pytest.fixture(scope="module", params=[4, 0], ids=["lora", "full"])
def policy(request, tiny_dir):
    pipe, params, autocast = common.load_pipeline(tiny_dir, "cpu", "no", lora_rank=request.param, reference=True)
    return common.Policy(pipe, common.encode_prompts(pipe, [""]), 4, 5.0, 1.0, autocast), params


class Settings:
    sample_batch_size, sample_batches_per_epoch = 4, 2


def test_pairs_share_their_initial_noise_and_differ_afterwards(policy):
    policy, _ = policy
    prompts, samples = common.sample_epoch(policy, Settings, ["a cat", "a dog", "a red circle"],
                                           torch.Generator().manual_seed(0), images_per_prompt=2,
                                           shared_noise=True, progress=False)
    assert prompts[0::2] == prompts[1::2]
    torch.testing.assert_close(samples.latents[0::2, 0], samples.latents[1::2, 0], rtol=0, atol=0)
    assert not torch.equal(samples.latents[0, 0], samples.latents[2, 0])  # different pairs, different noise
    for s in range(1, 5):
        assert (samples.latents[0::2, s] - samples.latents[1::2, s]).abs().amax((1, 2, 3)).min() > 1e-3


def test_reference_log_probs_equal_the_policy_at_initialisation_and_stay_put(policy):
    policy, params = policy
    _, samples = common.sample_epoch(policy, Settings, ["a cat", "a dog"], torch.Generator().manual_seed(3),
                                     images_per_prompt=2, shared_noise=True, progress=False)
    ref = common.reference_log_probs(policy, samples, 4)
    torch.testing.assert_close(ref, samples.log_probs, atol=1e-5, rtol=0)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    try:
        moved = common.log_prob(policy, samples, torch.arange(len(ref)), 1)
        assert (moved - samples.log_probs[:, 1]).abs().max() > 1e-4           # the policy moved ...
        torch.testing.assert_close(common.reference_log_probs(policy, samples, 4), ref)  # ... pi_ref did not
        # only the trained pairs' (a tie's two images are never trained): the same numbers, NaN elsewhere
        some = common.reference_log_probs(policy, samples, 4, rows=torch.tensor([[2, 3]]))
        torch.testing.assert_close(some[2:4], ref[2:4], atol=1e-6, rtol=0)
        assert some[:2].isnan().all() and some[4:].isnan().all()
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
