"""The D3PO loss and preferences: a hand-worked case, a slow loop, the DPO form, where the gradient vanishes;
shared initial noise of a pair; the reference model at initialisation; label pairs."""
import math

import numpy as np
import pytest
import torch

import common
import d3po


def slow_d3po_loss(log_probs, ref_log_probs, prefer, beta, eps):
    """The reference code's loss written pair by pair with Python floats."""
    total = 0.0
    for (lp1, lp2), (rf1, rf2), p in zip(log_probs.tolist(), ref_log_probs.tolist(), prefer.tolist()):
        r1 = min(max(math.exp(lp1 - rf1), 1 - eps), 1 + eps)
        r2 = min(max(math.exp(lp2 - rf2), 1 - eps), 1 + eps)
        z = beta * p * (math.log(r1) - math.log(r2))
        total += math.log(1 + math.exp(-z))  # -log sigmoid(z)
    return total / len(prefer)


def test_hand_worked_case():
    # winner: log-ratio 0.05 (ratio 1.051, inside the band); loser: log-ratio -0.30 (ratio 0.741, clamped to 0.9)
    log_probs, ref = torch.tensor([[-1.00, -1.40]]), torch.tensor([[-1.05, -1.10]])
    loss, accuracy, clipfrac = d3po.d3po_loss(log_probs, ref, torch.tensor([1]), beta=0.1, ratio_clip=0.1)
    z = 0.1 * (0.05 - math.log(0.9))  # = 0.1 * (0.05 + 0.10536)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-z)), abs=1e-6)
    assert loss.item() == pytest.approx(0.685409, abs=1e-5)  # log(1 + e^-0.015536), by hand
    assert accuracy.item() == 1.0 and clipfrac.item() == 0.5


def test_matches_a_slow_loop():
    g = torch.Generator().manual_seed(1)
    log_probs = -1 + 0.2 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    ref = log_probs + 0.1 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    prefer = torch.randint(-1, 2, (64,), generator=g)
    for beta, eps in ((0.1, 0.1), (2.0, 0.05), (0.5, 0.5)):
        loss, _, _ = d3po.d3po_loss(log_probs, ref, prefer, beta, eps)
        assert loss.item() == pytest.approx(slow_d3po_loss(log_probs, ref, prefer, beta, eps), rel=1e-10)


def test_with_the_clamp_inactive_it_is_the_standard_dpo_loss():
    g = torch.Generator().manual_seed(2)
    log_probs = -1 + 0.1 * torch.randn(16, 2, generator=g, dtype=torch.float64)
    ref = log_probs + 0.01 * torch.randn(16, 2, generator=g, dtype=torch.float64)  # ratios within 1 +- 0.05
    prefer = torch.tensor([1, -1] * 8)
    w = torch.where(prefer == 1, 0, 1)  # column of the winner
    lw, ll = log_probs.gather(1, w[:, None])[:, 0], log_probs.gather(1, 1 - w[:, None])[:, 0]
    rw, rl = ref.gather(1, w[:, None])[:, 0], ref.gather(1, 1 - w[:, None])[:, 0]
    dpo = -torch.nn.functional.logsigmoid(0.7 * ((lw - rw) - (ll - rl))).mean()
    loss, _, clipfrac = d3po.d3po_loss(log_probs, ref, prefer, beta=0.7, ratio_clip=0.5)
    assert clipfrac == 0
    torch.testing.assert_close(loss, dpo)


def test_tie_and_clamped_ratio_give_zero_gradient():
    log_probs = torch.tensor([[-1.0, -1.3], [-1.0, -1.3], [-1.0, -1.02]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-1.01, -1.0]])
    # pair 0: a tie; pair 1: the second image's ratio (0.74) is outside the band; pair 2: both inside
    loss, _, _ = d3po.d3po_loss(log_probs, ref, torch.tensor([0, 1, 1]), beta=0.1, ratio_clip=0.1)
    loss.backward()
    grad = log_probs.grad
    assert grad[0].abs().max() == 0                    # tie: nothing
    assert grad[1, 1] == 0 and grad[1, 0] < 0          # clamped loser: nothing; winner pushed up
    assert grad[2, 0] < 0 and grad[2, 1] > 0           # winner up, loser down


def test_accuracy_counts_pairs_whose_log_ratio_already_ranks_the_winner_first():
    log_probs = torch.tensor([[-1.0, -1.1], [-1.0, -1.1], [-1.2, -1.0], [-1.0, -1.0]])
    ref = torch.full((4, 2), -1.05)
    _, accuracy, _ = d3po.d3po_loss(log_probs, ref, torch.tensor([1, -1, -1, 0]), 0.1, 0.5)
    assert accuracy.item() == pytest.approx(2 / 3)  # right, wrong, right; the tie is not counted


def test_preferences_by_pareto_dominance():
    rewards = np.array([[1.0, 2.0], [0.5, 2.0],   # first dominates: +1
                        [0.0, 1.0], [1.0, 1.0],   # second dominates: -1
                        [1.0, 0.0], [0.0, 1.0],   # neither dominates: 0
                        [3.0, 3.0], [3.0, 3.0]])  # tie: 0
    assert d3po.preferences(rewards).tolist() == [1, -1, 0, 0]
    assert d3po.preferences(np.array([[0.2], [0.1], [0.3], [0.3]])).tolist() == [1, 0]


def test_labelled_pairs_are_every_pair_with_different_scores():
    scores = np.array([[3.0, 1.0, 3.0], [0.0, 0.0, 0.0]])
    pairs, prefer = d3po.labelled_pairs(scores)
    assert pairs.tolist() == [[0, 1], [1, 2]] and prefer.tolist() == [1, -1]  # (0, 2) tie; prompt 1 all ties


@pytest.fixture(scope="module", params=[4, 0], ids=["lora", "full"])
def pipeline(request, tiny_dir):
    return common.load_pipeline(tiny_dir, "cpu", "no", lora_rank=request.param, reference=True)


class Settings:
    num_steps, eta, guidance_scale, sample_batch_size, sample_batches_per_epoch = 4, 1.0, 5.0, 4, 2


def test_pairs_share_their_initial_noise_and_differ_afterwards(pipeline):
    pipe, _, autocast = pipeline
    neg = common.encode_prompts(pipe, [""])
    prompts, samples = common.sample_epoch(pipe, Settings, ["a cat", "a dog", "a red circle"], neg,
                                           torch.Generator().manual_seed(0), autocast, images_per_prompt=2,
                                           shared_noise=True, progress=False)
    assert prompts[0::2] == prompts[1::2]
    torch.testing.assert_close(samples.latents[0::2, 0], samples.latents[1::2, 0], rtol=0, atol=0)
    assert not torch.equal(samples.latents[0, 0], samples.latents[2, 0])  # different pairs, different noise
    for s in range(1, 5):
        assert (samples.latents[0::2, s] - samples.latents[1::2, s]).abs().amax((1, 2, 3)).min() > 1e-3


def test_reference_log_probs_equal_the_policy_at_initialisation_and_stay_put(pipeline):
    pipe, params, autocast = pipeline
    neg = common.encode_prompts(pipe, [""])
    _, samples = common.sample_epoch(pipe, Settings, ["a cat", "a dog"], neg, torch.Generator().manual_seed(3),
                                     autocast, images_per_prompt=2, shared_noise=True, progress=False)
    ref = common.reference_log_probs(pipe, samples, neg, Settings)
    torch.testing.assert_close(ref, samples.log_probs, atol=1e-5, rtol=0)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    try:
        moved = common.recompute_log_probs(pipe, samples.latents[:, 1], samples.latents[:, 2], samples.timesteps[1],
                                           samples.prompt_embeds, neg, 5.0, 1.0)
        assert (moved - samples.log_probs[:, 1]).abs().max() > 1e-4           # the policy moved ...
        torch.testing.assert_close(common.reference_log_probs(pipe, samples, neg, Settings), ref)  # ... pi_ref did not
        # only the trained pairs' (a tie's two images are never trained): the same numbers, NaN elsewhere
        some = common.reference_log_probs(pipe, samples, neg, Settings, rows=torch.tensor([[2, 3]]))
        torch.testing.assert_close(some[2:4], ref[2:4], atol=1e-6, rtol=0)
        assert some[:2].isnan().all() and some[4:].isnan().all()
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
