"""DDPO's loss and per-prompt advantage normalisation, against slow loops and hand-worked numbers."""
import math

import numpy as np
import pytest
import torch

import ddpo


def ddpo_loss(*args, **kwargs):
    """(loss, approx_kl, clipfrac) of ddpo.ddpo_loss."""
    loss, info = ddpo.ddpo_loss(*args, **kwargs)
    return loss, info["approx_kl"], info["clipfrac"]


def slow_clipped_loss(log_probs, old_log_probs, advantages, clip_range, adv_clip_max):
    """The PPO-clip objective written one sample at a time."""
    total = 0.0
    for lp, old, a in zip(log_probs.tolist(), old_log_probs.tolist(), advantages.tolist()):
        a = min(max(a, -adv_clip_max), adv_clip_max)
        ratio = math.exp(lp - old)
        clipped_ratio = min(max(ratio, 1 - clip_range), 1 + clip_range)
        total += max(-a * ratio, -a * clipped_ratio)
    return total / len(advantages)


def test_clipped_loss_matches_slow_loop():
    torch.manual_seed(0)
    for clip_range in (1e-4, 0.05, 0.2):
        log_probs = torch.randn(64, dtype=torch.float64) * 0.1
        old = log_probs + torch.randn(64, dtype=torch.float64) * 0.1
        adv = torch.randn(64, dtype=torch.float64) * 4  # some beyond the advantage clip of 5
        loss, _, clipfrac = ddpo_loss(log_probs, old, adv, clip_range, 5.0)
        assert loss.item() == pytest.approx(slow_clipped_loss(log_probs, old, adv, clip_range, 5.0), rel=1e-12)
        ratios = torch.exp(log_probs - old)
        assert clipfrac.item() == pytest.approx(((ratios - 1).abs() > clip_range).double().mean().item())


def test_hand_worked_case():
    # ratio e^0.1 = 1.10517 with A = +2: clipped at 1.1 -> -2.2; ratio e^-0.1 = 0.904837 with A = +1: the
    # unclipped -0.904837 is larger than -0.9 -> -0.904837; ratio 1 with A = -10, clipped to A = -5 -> 5.
    log_probs, old = torch.tensor([0.1, -0.1, 0.0]), torch.zeros(3)
    loss, approx_kl, clipfrac = ddpo_loss(log_probs, old, torch.tensor([2.0, 1.0, -10.0]), 0.1, 5.0)
    assert loss.item() == pytest.approx((-2.2 - 0.904837 + 5.0) / 3, abs=1e-5)
    assert approx_kl.item() == pytest.approx(0.5 * (0.01 + 0.01 + 0) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)  # |ratio - 1| = 0.105, 0.095, 0: only the first exceeds 0.1


def test_gradient_vanishes_where_the_clip_is_active():
    # A > 0 and ratio above 1 + eps, or A < 0 and ratio below 1 - eps: the clipped term is the max, constant
    log_probs = torch.tensor([0.5, -0.5, 0.5, -0.5, 0.0, 0.0], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, -1.0])
    loss, _, _ = ddpo_loss(log_probs, torch.zeros(6), adv, 0.2, 5.0)
    loss.backward()
    grad = log_probs.grad
    assert grad[0] == 0 and grad[1] == 0            # clipped: no gradient
    assert grad[2] != 0 and grad[3] != 0            # beyond the band on the pessimistic side: gradient kept
    # inside the band: d/dlp of -A e^(lp - old) / n = -A / n at lp = old
    assert grad[4].item() == pytest.approx(-1 / 6) and grad[5].item() == pytest.approx(1 / 6)


def test_is_and_sf_gradients_agree_at_the_sampling_policy():
    """At theta = theta_old, grad ratio = grad log pi: the two estimators give the same gradient."""
    torch.manual_seed(1)
    base = torch.randn(16)
    adv = torch.randn(16)
    grads = []
    for estimator in ("is", "sf"):
        lp = base.clone().requires_grad_(True)
        ddpo_loss(lp, base, adv, 1e-4, 5.0, estimator)[0].backward()
        grads.append(lp.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_score_function_loss_matches_slow_loop():
    lp, adv = torch.randn(8), torch.randn(8) * 3
    loss, _, _ = ddpo_loss(lp, torch.zeros(8), adv, 1e-4, 2.0, estimator="sf")
    slow = sum(-min(max(a, -2.0), 2.0) * l for l, a in zip(lp.tolist(), adv.tolist())) / 8
    assert loss.item() == pytest.approx(slow, rel=1e-5)


def test_per_prompt_normaliser_hand_worked():
    stats = {}

    def update(prompts, rewards):
        return ddpo.per_prompt_advantages(stats, prompts, torch.tensor(rewards), buffer_size=2, min_count=2).numpy()

    # "a" has two rewards (1, 3): its own mean 2, std 1. "b" has one: the batch's mean 3, std sqrt(8/3).
    np.testing.assert_allclose(update(["a", "a", "b"], [1.0, 3.0, 5.0]), [-1.0, 1.0, 2 / math.sqrt(8 / 3)], rtol=1e-5)
    # the buffer keeps the last two of "a": (3, 7), mean 5, std 2
    np.testing.assert_allclose(update(["a"], [7.0]), [1.0], rtol=1e-5)
    # "b" now has (5, 1): mean 3, std 2, its own statistics from here on; "a" is now (7, 7): std 0, (7 - 7) / 1e-6 = 0
    np.testing.assert_allclose(update(["b", "a"], [1.0, 7.0]), [-1.0, 0.0], rtol=1e-5, atol=1e-6)
    assert stats == {"a": [7.0, 7.0], "b": [5.0, 1.0]}  # the state a checkpoint keeps


@pytest.mark.parametrize("scaling", [False, True])
def test_a_non_finite_gradient_never_reaches_the_weights(scaling):
    """Without fp16 scaling the run stops before the step; with it, the scaler skips the step, as it does."""
    import common
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = common.make_optimizer([weight], 0.1, 0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=scaling)
    scaler.scale((weight * torch.tensor([1.0, float("nan"), 1.0])).sum()).backward()
    if scaling:
        common.optimizer_step(optimizer, scaler, [weight], 1.0)
    else:
        with pytest.raises(common.UserError, match="gradient is not finite"):
            common.optimizer_step(optimizer, scaler, [weight], 1.0)
    assert torch.equal(weight.detach(), torch.ones(3))
    weight.grad = torch.ones(3)  # a finite one is stepped
    common.optimizer_step(optimizer, torch.amp.GradScaler("cpu", enabled=False), [weight], 1.0)
    assert (weight.detach() < 1).all()
