"""The grader of exercises.py. Every check computes its expected value independently of the code under test:
diffusers' DDIMScheduler.step and torch.distributions for the step, slow loops written the obvious way and
hand-worked numbers for the losses, the closed-form optimum for PRDP, and gradients where the papers say they
vanish or not. A failed check says in one sentence what was expected, and names the mistake when it recognises
it (a sum for a mean, a missing beta, the winner and loser swapped, the clip on the wrong side, ...)."""
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

STEPS = 10


def close(a, b, atol=1e-5, rtol=1e-4):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=rtol)


@pytest.fixture(scope="module")
def scheduler():
    """Stable Diffusion v1.5's DDIM scheduler, at 10 steps."""
    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1)
    s.set_timesteps(STEPS)
    return s


def diffusers_mean_std(scheduler, eps, t, x, eta):
    """The step's mean and std from diffusers alone: the step with noise 0 is the mean; noise 1 adds the std."""
    zero = scheduler.step(eps, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
    one = scheduler.step(eps, t, x, eta=eta, variance_noise=torch.ones_like(x)).prev_sample
    return zero, (one - zero).mean()


def student_step(ex, scheduler, eps, t, x, eta):
    mean, std = ex.ddim_step_mean_std(scheduler.alphas_cumprod, scheduler.final_alpha_cumprod, 1000 // STEPS, eps,
                                      int(t), x, eta)
    return mean, torch.as_tensor(std).expand_as(mean)


def step_cases(scheduler, seed):
    """(eps, t, x_t, eta) for every step but the last, at eta 1 and 0.5, on random eps and x_t."""
    g = torch.Generator().manual_seed(seed)
    eps, x = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    return [(eps, t, x, eta) for t in scheduler.timesteps[:-1] for eta in (1.0, 0.5)]


# ---- 1. The DDIM step ------------------------------------------------------------------------------------------------

@pytest.mark.points("1. DDIM step: mean and std", 2)
def test_the_step_s_mean_is_diffusers(ex, scheduler):
    for eps, t, x, eta in step_cases(scheduler, 0):
        mean, _ = student_step(ex, scheduler, eps, t, x, eta)
        expected, _ = diffusers_mean_std(scheduler, eps, t, x, eta)
        if not close(mean, expected):
            deterministic, _ = diffusers_mean_std(scheduler, eps, t, x, 0.0)
            assert not close(mean, deterministic), (
                f"at timestep {int(t)}, eta {eta} your mean is the deterministic step's: the eps coefficient is "
                f"sqrt(1 - abar_prev - sigma_t^2), sigma_t included")
            assert False, f"at timestep {int(t)}, eta {eta} your mean differs from diffusers' DDIMScheduler.step " \
                          f"(largest difference {float((mean - expected).abs().max()):.3g})"


@pytest.mark.points("1. DDIM step: mean and std", 2)
def test_the_step_s_std_is_diffusers(ex, scheduler):
    for eps, t, x, eta in step_cases(scheduler, 1):
        _, std = student_step(ex, scheduler, eps, t, x, eta)
        _, expected = diffusers_mean_std(scheduler, eps, t, x, eta)
        s = float(std.flatten()[0])
        assert not math.isclose(s, float(expected) / eta, rel_tol=1e-4) or eta == 1.0, \
            f"at eta {eta} your std is eta = 1's: sigma_t = eta sqrt(...), multiply by eta"
        assert not math.isclose(s, float(expected) ** 2, rel_tol=1e-4), \
            f"at timestep {int(t)} your std is the variance sigma_t^2: take its square root"
        assert close(std, expected.expand_as(std)), \
            f"at timestep {int(t)}, eta {eta} your std is {s:.6g}; diffusers' step adds {float(expected):.6g} z"


@pytest.mark.points("1. DDIM step: mean and std", 1)
def test_the_last_step_uses_the_final_alpha(ex, scheduler):
    g = torch.Generator().manual_seed(2)
    eps, x = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = scheduler.timesteps[-1]
    mean, std = student_step(ex, scheduler, eps, t, x, 1.0)
    expected_mean, expected_std = diffusers_mean_std(scheduler, eps, t, x, 1.0)
    assert close(mean, expected_mean) and close(std, expected_std.expand_as(std)), \
        f"at the last step (timestep {int(t)}) timestep - step_ratio < 0: abar_prev is final_alpha_cumprod there"


@pytest.mark.points("2. DDIM step: log-density", 2)
def test_the_log_prob_is_torch_distributions_mean_over_elements(ex):
    g = torch.Generator().manual_seed(3)
    mean, x = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    std = torch.tensor(0.7)
    got = ex.ddim_log_prob(x, mean, std)
    expected = torch.distributions.Normal(mean, std).log_prob(x).mean(dim=(1, 2, 3))
    assert torch.as_tensor(got).shape == (3,), f"ddim_log_prob must return one number a sample, shape (3,), not " \
                                               f"{tuple(torch.as_tensor(got).shape)}"
    elements = 4 * 8 * 8
    assert not close(got, expected * elements), \
        f"your log-prob is {elements} (= C x H x W) times too large: take the mean over the latent elements, " \
        f"not the sum"
    assert close(got, expected), "your log-prob differs from torch.distributions.Normal(mean, std).log_prob(x) " \
                                 "averaged over C, H, W"


@pytest.mark.points("2. DDIM step: log-density", 1)
def test_the_gradient_flows_to_the_mean_not_to_the_sample(ex):
    mean = torch.zeros(2, 4, 4, 4, requires_grad=True)
    x = torch.full((2, 4, 4, 4), 0.5, requires_grad=True)
    ex.ddim_log_prob(x, mean, torch.tensor(1.0)).sum().backward()
    assert mean.grad is not None and mean.grad.abs().sum() > 0, "no gradient reached the mean, where theta is"
    assert x.grad is None or x.grad.abs().sum() == 0, \
        "a gradient reached prev_sample: the action taken is data, detach it"


# ---- 3. DDPO ---------------------------------------------------------------------------------------------------------

def slow_advantages(history, prompts, rewards, buffer_size, min_count):
    """The per-prompt stat tracker, a sample at a time: `history` is every earlier batch (prompts, rewards)."""
    out = []
    for prompt, reward in zip(prompts, rewards):
        earlier = [r for batch_prompts, batch_rewards in history for p, r in zip(batch_prompts, batch_rewards)
                   if p == prompt]
        own = (earlier + [r for p, r in zip(prompts, rewards) if p == prompt])[-buffer_size:]
        ref = own if len(own) >= min_count else list(rewards)
        out.append((reward - np.mean(ref)) / (np.std(ref) + 1e-6))
    return out


@pytest.mark.points("3. DDPO: per-prompt advantages", 2)
def test_advantages_by_hand(ex):
    got = ex.per_prompt_advantages({}, ["a", "a", "b", "b"], [1.0, 3.0, 10.0, 14.0], buffer_size=16, min_count=2)
    expected = torch.tensor([-1.0, 1.0, -1.0, 1.0]) / (1 + 1e-6)  # a: mean 2, std 1; b: mean 12, std 2
    batch = (torch.tensor([1.0, 3.0, 10.0, 14.0]) - 7.0) / (float(np.std([1, 3, 10, 14])) + 1e-6)
    assert not close(got, batch), "you normalised over the whole batch: each prompt has min_count rewards, so " \
                                  "each is normalised by its own prompt's mean and std"
    assert close(got, expected), f"prompt a's rewards 1, 3 and b's 10, 14 give advantages -1, 1, -1, 1; got " \
                                 f"{torch.as_tensor(got).tolist()}"


@pytest.mark.points("3. DDPO: per-prompt advantages", 2)
def test_advantages_follow_the_buffer_and_min_count_over_epochs(ex):
    rng, stats, history = np.random.default_rng(0), {}, []
    for epoch in range(4):
        prompts = [str(p) for p in rng.choice(["cat", "dog", "owl"], size=6)]
        rewards = rng.normal(size=6).round(3).tolist()
        got = ex.per_prompt_advantages(stats, prompts, rewards, buffer_size=4, min_count=3)
        expected = slow_advantages(history, prompts, rewards, buffer_size=4, min_count=3)
        history.append((prompts, rewards))
        assert close(got, expected), f"epoch {epoch}: your advantages differ from the stat tracker's (buffer of " \
                                     f"the last 4 rewards per prompt, batch statistics until a prompt has 3)"
        assert torch.as_tensor(got).dtype == torch.float32, "return a float32 tensor"


@pytest.mark.points("4. DDPO: clipped surrogate", 2)
def test_the_surrogate_is_the_loop(ex):
    g = torch.Generator().manual_seed(4)
    old = torch.randn(8, generator=g)
    new = old + 3e-4 * torch.randn(8, generator=g)
    adv = torch.randn(8, generator=g)
    got = ex.ddpo_clipped_loss(new, old, adv, 1e-4)
    terms, optimistic = [], []
    for lp, olp, a in zip(new.tolist(), old.tolist(), adv.tolist()):
        ratio = math.exp(lp - olp)
        clipped = min(max(ratio, 1 - 1e-4), 1 + 1e-4)
        terms.append(max(-a * ratio, -a * clipped))
        optimistic.append(min(-a * ratio, -a * clipped))
    assert not close(got, np.mean(optimistic)), \
        "you took the smaller of -A ratio and -A clip(ratio): PPO's surrogate is pessimistic, the larger one"
    assert not close(got, np.sum(terms)), "you summed over the samples: the loss is the MEAN of their terms"
    assert close(got, np.mean(terms)), "your loss differs from the mean over samples of max(-A ratio, -A clip(ratio))"


@pytest.mark.points("4. DDPO: clipped surrogate", 1)
def test_at_ratio_one_the_gradient_is_the_score_function_s(ex):
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0])
    old = torch.tensor([-1.0, -0.5, -2.0, -1.5])
    new = old.clone().requires_grad_(True)
    ex.ddpo_clipped_loss(new, old, adv, 1e-4).backward()
    assert close(new.grad, -adv / 4), f"at theta = theta_old the gradient wrt log pi_theta is -A / b = " \
                                      f"{(-adv / 4).tolist()}; got {new.grad.tolist()}"


@pytest.mark.points("4. DDPO: clipped surrogate", 2)
def test_the_gradient_vanishes_once_the_ratio_has_moved_the_way_its_advantage_wants(ex):
    old = torch.zeros(4)
    new = torch.tensor([2e-4, 2e-4, -2e-4, -2e-4], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    ex.ddpo_clipped_loss(new, old, adv, 1e-4).backward()
    grad = new.grad.tolist()
    assert grad[0] == 0 and grad[3] == 0, "a ratio beyond 1 + eps with A > 0 (or below 1 - eps with A < 0) has " \
                                          f"been pushed far enough: its gradient must be 0; got {grad}"
    assert grad[1] != 0 and grad[2] != 0, "a ratio that moved AGAINST its advantage must keep its gradient; got " \
                                          f"{grad} (is the clip on the wrong side?)"


# ---- 5. D3PO ---------------------------------------------------------------------------------------------------------

def slow_d3po(log_probs, ref, beta, eps):
    losses = []
    for (w, l), (rw, rl) in zip(log_probs.tolist(), ref.tolist()):
        ratio_w = min(max(math.exp(w - rw), 1 - eps), 1 + eps)
        ratio_l = min(max(math.exp(l - rl), 1 - eps), 1 + eps)
        z = beta * (math.log(ratio_w) - math.log(ratio_l))
        losses.append(math.log(1 + math.exp(-z)))          # -log sigmoid(z)
    return float(np.mean(losses))


@pytest.mark.points("5. D3PO loss", 1)
def test_at_the_reference_the_loss_is_log_2_and_pushes_the_winner_up(ex):
    ref = torch.tensor([[-1.0, -1.2], [-0.8, -0.9]])
    lp = ref.clone().requires_grad_(True)
    loss = ex.d3po_loss(lp, ref, 0.1, 0.1)
    loss.backward()
    assert close(loss.detach(), math.log(2)), f"at theta = theta_ref every log-ratio is 0 and the loss is log 2; got " \
                                              f"{float(loss):.4f}"
    grad = lp.grad
    assert not close(grad, torch.tensor([[0.025, -0.025]] * 2)), \
        "your gradient raises the loser and lowers the winner: log_probs[:, 0] is the winner's"
    assert not close(grad, torch.tensor([[-0.25, 0.25]] * 2)), "your gradient is 1/beta times too large: multiply " \
                                                               "the log-ratio difference by beta"
    assert close(grad, torch.tensor([[-0.025, 0.025]] * 2)), \
        f"at the reference the gradient is -beta/2b for each winner and +beta/2b for each loser; got {grad.tolist()}"


@pytest.mark.points("5. D3PO loss", 2)
def test_the_loss_is_the_loop(ex):
    g = torch.Generator().manual_seed(5)
    ref = torch.randn(6, 2, generator=g)
    lp = ref + 0.3 * torch.randn(6, 2, generator=g)
    got = ex.d3po_loss(lp, ref, 0.1, 0.1)
    assert not close(got, slow_d3po(lp, ref, 1.0, 0.1)), "your loss has no beta: it is -log sigmoid(BETA (...))"
    assert not close(got, slow_d3po(lp.flip(1), ref.flip(1), 0.1, 0.1)), \
        "your loss has the winner and the loser swapped: column 0 is the winner"
    assert close(got, slow_d3po(lp, ref, 0.1, 0.1)), "your loss differs from the mean over pairs of " \
                                                     "-log sigmoid(beta (log clamp(ratio_w) - log clamp(ratio_l)))"


@pytest.mark.points("5. D3PO loss", 2)
def test_the_clamp_stops_the_gradient_outside_its_band(ex):
    ref = torch.zeros(3, 2)
    # pair 0: winner's ratio 1.2 (outside 1.1); pair 1: winner's 0.902 (inside 0.9); pair 2: loser's 1.104 (outside)
    lp = torch.tensor([[math.log(1.2), 0.0], [math.log(0.902), 0.0], [0.0, math.log(1.104)]], requires_grad=True)
    ex.d3po_loss(lp, ref, 0.1, 0.1).backward()
    grad = lp.grad
    assert grad[0, 0] == 0, "a ratio of 1.2 is outside [0.9, 1.1]: the clamp makes its gradient 0"
    assert grad[2, 1] == 0, "a ratio of 1.104 is outside [0.9, 1.1]: its gradient must be 0 (clamp the ratio, " \
                            "not the log-ratio)"
    assert grad[1, 0] != 0, "a ratio of 0.902 is inside [0.9, 1.1]: it must keep its gradient (clamp the ratio to " \
                            "[1 - eps, 1 + eps], not the log-ratio to [-eps, eps])"


# ---- 6. PRDP ---------------------------------------------------------------------------------------------------------

def slow_rdp(log_ratio, old, rewards, pairs, beta, eps):
    losses = []
    for a, b in pairs.tolist():
        r_hat = [float(np.mean(log_ratio[i].tolist())) for i in (a, b)]
        r_clip = [float(np.mean([o + min(max(x - o, -eps), eps) for x, o in zip(log_ratio[i].tolist(),
                                                                               old[i].tolist())])) for i in (a, b)]
        target = (float(rewards[a]) - float(rewards[b])) / beta
        losses.append(max((r_hat[0] - r_hat[1] - target) ** 2, (r_clip[0] - r_clip[1] - target) ** 2))
    return float(np.mean(losses))


@pytest.mark.points("6. PRDP loss", 2)
def test_the_rdp_loss_is_the_loop(ex):
    g = torch.Generator().manual_seed(6)
    old = torch.randn(6, 4, generator=g)
    log_ratio = old + 0.2 * torch.randn(6, 4, generator=g)
    rewards = torch.rand(6, generator=g)
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2], [3, 4], [3, 5], [4, 5]])
    got = ex.rdp_loss(log_ratio, old, rewards, pairs, 0.5, 0.1)
    assert not close(got, slow_rdp(log_ratio * 4, old * 4, rewards, pairs, 0.5, 0.4)), \
        "your r_hat sums the T steps' log-ratios: the project (the paper's appendix code) takes their MEAN"
    assert not close(got, slow_rdp(log_ratio, old, rewards, pairs, 1.0, 0.1)), \
        "your target has no beta: it is (r(a) - r(b)) / beta"
    assert not close(got, len(pairs) * slow_rdp(log_ratio, old, rewards, pairs, 0.5, 0.1)), \
        "you summed the pairs' squared errors: the loss is their MEAN over the pairs"
    assert close(got, slow_rdp(log_ratio, old, rewards, pairs, 0.5, 0.1)), \
        "your loss differs from the mean over pairs of max(unclipped, clipped) squared errors"


@pytest.mark.points("6. PRDP loss", 2)
def test_the_loss_is_zero_at_the_kl_regularised_optimum(ex):
    """pi* = pi_ref exp(r / beta) / Z: its log-ratio is r / beta - log Z, and every pair's error vanishes."""
    g = torch.Generator().manual_seed(7)
    K, beta = 6, 0.3
    log_ref = torch.log_softmax(torch.randn(K, generator=g), 0)
    r = torch.rand(K, generator=g)
    log_opt = torch.log_softmax(log_ref + r / beta, 0)
    pairs = torch.combinations(torch.arange(K))
    optimum = (log_opt - log_ref)[:, None]                   # one-step trajectories
    at_opt = float(ex.rdp_loss(optimum, optimum, r, pairs, beta, 10.0))
    at_ref = float(ex.rdp_loss(torch.zeros(K, 1), torch.zeros(K, 1), r, pairs, beta, 10.0))
    assert at_opt < 1e-10, f"at the KL-regularised optimum pi* = pi_ref exp(r / beta) / Z the loss must be 0; got " \
                           f"{at_opt:.3g} (is the reward difference divided by beta?)"
    assert at_ref > 0.01, "at pi_ref, away from the optimum, the loss must be positive"


@pytest.mark.points("6. PRDP loss", 2)
def test_the_proximal_clip_stops_progress_not_correction(ex):
    old, rewards, pair = torch.zeros(2, 4), torch.tensor([1.0, 0.0]), torch.tensor([[0, 1]])
    towards = torch.zeros(2, 4)
    towards[0, 0] = 0.5                                      # a's first step moved 0.5 towards the target, eps 0.1
    towards.requires_grad_(True)
    ex.rdp_loss(towards, old, rewards, pair, 1.0, 0.1).backward()
    assert towards.grad[0, 0] == 0 and towards.grad[0, 1] != 0, \
        "a step that moved beyond eps TOWARDS the target gets no gradient, the others still do"
    away = torch.zeros(2, 4)
    away[0, 0] = -0.5
    away.requires_grad_(True)
    ex.rdp_loss(away, old, rewards, pair, 1.0, 0.1).backward()
    assert away.grad[0, 0] != 0, "a step that moved beyond eps AWAY from the target keeps its gradient (the " \
                                 "pessimistic max picks the unclipped error): is the clip on the wrong side?"


@pytest.mark.points("7. PRDP: two-pass gradient", 3)
def test_two_passes_give_the_one_pass_gradient(ex):
    torch.manual_seed(8)
    weight = torch.randn(5, requires_grad=True)
    features = torch.randn(3, 4, 5)                          # (b, T, D): a toy "policy" per step
    actions = torch.randn(3, 4)
    calls = []

    def step_log_prob(s):
        calls.append(torch.is_grad_enabled())
        return -(actions[:, s] - torch.tanh(features[:, s] @ weight)) ** 2

    def loss_fn(log_probs):
        r_hat = log_probs.mean(1)
        return ((r_hat[0] - r_hat[1] - 0.3) ** 2 + (r_hat[1] - r_hat[2] + 0.2) ** 2)

    expected_loss = loss_fn(torch.stack([step_log_prob(s) for s in range(4)], 1))
    expected_loss.backward()
    expected, calls[:] = weight.grad.clone(), []
    weight.grad = None
    loss = ex.two_pass_backward(step_log_prob, 4, loss_fn)
    assert weight.grad is not None, "no gradient reached the parameters: backpropagate each step's log-prob"
    assert close(weight.grad, expected), "the parameters' gradient differs from the one-pass gradient of loss_fn"
    assert close(torch.as_tensor(loss).detach(), expected_loss.detach()), "return the loss"
    assert calls.count(False) == 4 and calls.count(True) == 4, (
        f"expected 4 calls without a graph then 4 with one, one step's graph at a time; got "
        f"{calls.count(False)} without and {calls.count(True)} with")
