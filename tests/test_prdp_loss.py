"""The PRDP loss: a slow loop over pairs, the proximal clip at theta_old, zero exactly at the reward differences,
the closed-form optimum on a categorical policy, and the scale of the log-ratio."""
import itertools

import pytest
import torch

import prdp


def slow_rdp_loss(log_ratio, old_log_ratio, rewards, images_per_prompt, beta, eps):
    """Pair by pair, written the obvious way: every unordered pair of a prompt's images, ties dropped."""
    n, T = log_ratio.shape
    losses = []
    for start in range(0, n, images_per_prompt):
        for a, b in itertools.combinations(range(start, start + images_per_prompt), 2):
            if rewards[a] == rewards[b]:
                continue
            r_hat = [sum(log_ratio[i, t].item() for t in range(T)) / T for i in (a, b)]
            r_hat_clip = [sum(min(max(log_ratio[i, t].item(), old_log_ratio[i, t].item() - eps),
                                  old_log_ratio[i, t].item() + eps) for t in range(T)) / T for i in (a, b)]
            target = (rewards[a].item() - rewards[b].item()) / beta
            losses.append(max((r_hat[0] - r_hat[1] - target) ** 2, (r_hat_clip[0] - r_hat_clip[1] - target) ** 2))
    return sum(losses) / len(losses)


def test_matches_a_slow_loop_over_pairs():
    g = torch.Generator().manual_seed(0)
    log_ratio = 0.01 * torch.randn(12, 5, generator=g, dtype=torch.float64)
    old = log_ratio + 0.002 * torch.randn(12, 5, generator=g, dtype=torch.float64)
    rewards = torch.tensor([0.1, 0.3, 0.3, 0.2, 0.5, 0.5, 0.5, 0.5, 0.9, 0.0, 0.4, 0.4], dtype=torch.float64)
    for B in (2, 3, 4):
        pairs = prdp.prompt_pairs(rewards, B)
        for beta, eps in ((0.1, 1e-3), (1.0, 1e-6), (10.0, 1.0)):
            loss, _ = prdp.rdp_loss(log_ratio, old, rewards, pairs, beta, eps)
            assert loss.item() == pytest.approx(slow_rdp_loss(log_ratio, old, rewards, B, beta, eps), rel=1e-10)


def test_prompt_pairs_are_each_unordered_pair_once_without_ties():
    rewards = torch.tensor([1.0, 2.0, 2.0, 0.0, 0.0, 0.0])
    assert prdp.prompt_pairs(rewards, 3).tolist() == [[0, 1], [0, 2]]  # (1, 2) tie; prompt 2 all ties


def test_at_theta_old_clipped_and_unclipped_coincide():
    g = torch.Generator().manual_seed(1)
    log_ratio = (0.05 * torch.randn(8, 4, generator=g)).requires_grad_(True)
    rewards = torch.rand(8, generator=g)
    pairs = prdp.prompt_pairs(rewards, 4)
    loss, info = prdp.rdp_loss(log_ratio, log_ratio.detach(), rewards, pairs, beta=0.5, clip_eps=1e-6)
    (grad,) = torch.autograd.grad(loss, log_ratio)
    unclipped, _ = prdp.rdp_loss(log_ratio, log_ratio.detach(), rewards, pairs, beta=0.5, clip_eps=1e9)
    (grad_unclipped,) = torch.autograd.grad(unclipped, log_ratio)
    torch.testing.assert_close(loss, unclipped)
    torch.testing.assert_close(grad, grad_unclipped)
    assert info["clipfrac"] == 0


def test_clipped_steps_stop_the_gradient_when_they_would_help():
    """Past eps, moving further toward the target no longer pays: the clipped error is the larger, and
    its clipped steps carry no gradient."""
    old = torch.zeros(2, 2)
    log_ratio = torch.tensor([[0.5, 0.0], [0.0, 0.0]], requires_grad=True)  # image 0, step 0 moved by 0.5
    rewards = torch.tensor([1.0, 0.0])  # target r_hat_0 - r_hat_1 = 10 with beta 0.1: the move helps
    loss, info = prdp.rdp_loss(log_ratio, old, rewards, torch.tensor([[0, 1]]), beta=0.1, clip_eps=0.1)
    loss.backward()
    assert loss.item() == pytest.approx((0.05 - 10) ** 2)  # the clipped error: step 0 counts 0.1, mean over 2 steps
    assert log_ratio.grad[0, 0] == 0 and log_ratio.grad[0, 1] < 0 and log_ratio.grad[1, 0] > 0
    assert info["clipfrac"] == 0.25


def test_zero_exactly_when_log_ratio_differences_equal_reward_differences_over_beta():
    g = torch.Generator().manual_seed(2)
    beta, B, T = 0.3, 4, 6
    rewards = torch.rand(3 * B, generator=g, dtype=torch.float64)
    offsets = torch.randn(3, generator=g, dtype=torch.float64).repeat_interleave(B)  # any per-prompt constant
    steps = torch.randn(3 * B, T, generator=g, dtype=torch.float64)
    steps = steps - steps.mean(1, keepdim=True) + (rewards / beta + offsets)[:, None]  # mean over steps = r/beta + c
    pairs = prdp.prompt_pairs(rewards, B)
    loss, info = prdp.rdp_loss(steps, steps, rewards, pairs, beta, 1e-3)
    assert loss.item() < 1e-20
    assert info["predicted_diff"].item() == pytest.approx(info["actual_diff"].item())
    for i, t in ((0, 0), (5, 3)):
        moved = steps.clone()
        moved[i, t] += 1e-3
        assert prdp.rdp_loss(moved, steps, rewards, pairs, beta, 1.0)[0].item() > 1e-10


@pytest.mark.parametrize("start", range(4))
def test_categorical_policy_reaches_the_closed_form_optimum(start):
    """pi_theta over 6 actions, one step; minimising the RDP loss over all pairs of actions from a random start
    gives pi* = pi_ref * exp(r / beta) / Z, the optimum of E[r] - beta KL(pi || pi_ref)."""
    g = torch.Generator().manual_seed(10 + start)
    K, beta = 6, 0.5
    log_ref = torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)
    rewards = torch.rand(K, generator=g, dtype=torch.float64)
    logits = (2 * torch.randn(K, generator=g, dtype=torch.float64)).requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    pairs = prdp.prompt_pairs(rewards, K)
    for _ in range(3000):
        log_ratio = (torch.log_softmax(logits, 0) - log_ref)[:, None]  # (K actions, 1 step)
        loss, _ = prdp.rdp_loss(log_ratio, log_ratio.detach(), rewards, pairs, beta, clip_eps=1e9)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    optimum = torch.softmax(log_ref + rewards / beta, 0)
    torch.testing.assert_close(torch.softmax(logits, 0), optimum, atol=1e-4, rtol=0)


@pytest.mark.parametrize("train_batch_size", [6, 1], ids=["whole prompts", "UNet batches of 1 within a prompt"])
@pytest.mark.parametrize("at_theta_old", [True, False], ids=["first step (theta = theta_old)", "later step"])
def test_step_by_step_backward_is_the_gradient_of_the_whole_trajectorys_loss(tiny_dir, at_theta_old,
                                                                            train_batch_size):
    """prdp.rdp_backward backpropagates the loss of whole trajectories one UNet call at a time, in UNet batches of
    --train-batch-size images, fewer than a prompt's if asked; its gradient must be the one loss.backward() gives
    through all T steps of all the images at once."""
    from types import SimpleNamespace

    import common
    pipe, params, autocast = common.load_pipeline(tiny_dir, "cpu", "no", lora_rank=4, reference=True)
    policy = common.Policy(pipe, common.encode_prompts(pipe, [""]), 3, 5.0, 1.0, autocast)
    args = SimpleNamespace(num_steps=3, images_per_prompt=3, beta=0.02, clip_eps=2e-4, sample_batch_size=6,
                           sample_batches_per_epoch=1, train_batch_size=train_batch_size)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # theta_old: LoRA away from its no-op start, so that every parameter has a gradient
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    _, samples = common.sample_epoch(policy, args, ["a cat", "a dog"], g, images_per_prompt=3, progress=False)
    ref_log_probs = common.reference_log_probs(policy, samples, 6)
    rewards = torch.rand(6, generator=g)
    if not at_theta_old:  # a later gradient step: theta has moved, and the clip acts on some steps
        with torch.no_grad():
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    idx = torch.arange(6)

    loss, info = prdp.rdp_backward(policy, samples, idx, ref_log_probs, rewards, args, lambda loss: 0.5 * loss,
                                   at_theta_old)
    step_by_step = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    log_probs = torch.stack([common.log_prob(policy, samples, idx, s) for s in range(3)], 1)  # T graphs at once
    plain, _ = prdp.rdp_loss(log_probs - ref_log_probs, samples.log_probs - ref_log_probs, rewards,
                             prdp.prompt_pairs(rewards, 3), args.beta, args.clip_eps)
    (0.5 * plain).backward()
    torch.testing.assert_close(loss, plain.detach(), rtol=1e-5, atol=1e-6)
    assert (info["clipfrac"] > 0) == (not at_theta_old)
    for a, b in zip(step_by_step, [p.grad for p in params]):
        if train_batch_size == 6:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        else:  # convolutions of batch 1 round differently, more so on one thread: the gradient's norm, to 5e-5
            assert float((a - b).norm()) <= 1e-3 * float(b.norm())
    assert max(float(b.abs().max()) for b in step_by_step) > 1e-4
