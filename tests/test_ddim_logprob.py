"""The policy's log-probability: common.ddim_step_with_logprob against torch.distributions.Normal, with the
mean and standard deviation taken from diffusers' own DDIMScheduler.step (an independent implementation)."""
import pytest
import torch
from diffusers import DDIMScheduler

import common


def sd_scheduler(prediction_type="epsilon", num_steps=20):
    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    s.set_timesteps(num_steps)
    return s


def diffusers_mean_std(scheduler, model_output, t, sample, eta):
    """Mean and sigma of diffusers' DDIM step for ONE scalar timestep (noise switched off for the mean)."""
    mean = scheduler.step(model_output, t, sample, eta=eta, variance_noise=torch.zeros_like(sample)).prev_sample
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    std = eta * scheduler._get_variance(t, prev_t) ** 0.5
    return mean, std


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.3, 0.7, 1.0])
def test_log_prob_matches_normal_scalar_timestep(prediction_type, eta):
    scheduler = sd_scheduler(prediction_type)
    for t in scheduler.timesteps[[0, 7, 13, -1]]:  # first, middle and the last step (abar_prev = abar_0)
        sample, model_output = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
        prev, log_prob = common.ddim_step_with_logprob(scheduler, model_output, t, sample, eta)
        mean, std = diffusers_mean_std(scheduler, model_output, int(t), sample, eta)
        expected = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
        assert log_prob.shape == (3,)
        torch.testing.assert_close(log_prob, expected, atol=1e-4, rtol=1e-5)
        # and the sample really is drawn from that Normal: its standardised noise has unit scale
        z = (prev - mean) / std
        assert 0.8 < z.std().item() < 1.2 and abs(z.mean().item()) < 0.2


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_log_prob_per_sample_timesteps(prediction_type):
    scheduler = sd_scheduler(prediction_type)
    timesteps = scheduler.timesteps[[0, 5, 19, 11]]
    sample, model_output, prev = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    _, log_prob = common.ddim_step_with_logprob(scheduler, model_output, timesteps, sample, 1.0, prev_sample=prev)
    for i, t in enumerate(timesteps):
        mean, std = diffusers_mean_std(scheduler, model_output[i:i + 1], int(t), sample[i:i + 1], 1.0)
        expected = torch.distributions.Normal(mean, std).log_prob(prev[i:i + 1]).mean()
        torch.testing.assert_close(log_prob[i], expected, atol=1e-4, rtol=1e-5)


def test_given_prev_sample_is_scored_and_returned_unchanged():
    scheduler = sd_scheduler()
    t = scheduler.timesteps[3]
    sample, model_output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    prev, log_prob = common.ddim_step_with_logprob(scheduler, model_output, t, sample, 1.0)
    prev2, log_prob2 = common.ddim_step_with_logprob(scheduler, model_output, t, sample, 1.0, prev_sample=prev)
    assert torch.equal(prev, prev2) and torch.equal(log_prob, log_prob2)


def test_generator_makes_the_step_reproducible():
    scheduler = sd_scheduler()
    args = (torch.randn(2, 4, 8, 8), scheduler.timesteps[0], torch.randn(2, 4, 8, 8), 1.0)
    a = common.ddim_step_with_logprob(scheduler, *args, generator=torch.Generator().manual_seed(1))[0]
    b = common.ddim_step_with_logprob(scheduler, *args, generator=torch.Generator().manual_seed(1))[0]
    c = common.ddim_step_with_logprob(scheduler, *args, generator=torch.Generator().manual_seed(2))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_half_precision_model_output_is_scored_in_float32():
    scheduler = sd_scheduler()
    t = scheduler.timesteps[4]
    sample, prev = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    model_output = torch.randn(2, 4, 8, 8).half()
    _, lp_half = common.ddim_step_with_logprob(scheduler, model_output, t, sample, 1.0, prev_sample=prev)
    _, lp_full = common.ddim_step_with_logprob(scheduler, model_output.float(), t, sample, 1.0, prev_sample=prev)
    assert lp_half.dtype == torch.float32
    assert torch.equal(lp_half, lp_full)


def test_gradient_flows_to_model_output_not_to_prev_sample():
    scheduler = sd_scheduler()
    model_output = torch.randn(2, 4, 8, 8, requires_grad=True)
    prev = torch.randn(2, 4, 8, 8, requires_grad=True)
    _, log_prob = common.ddim_step_with_logprob(scheduler, model_output, scheduler.timesteps[2],
                                                torch.randn(2, 4, 8, 8), 1.0, prev_sample=prev)
    log_prob.sum().backward()
    assert model_output.grad.abs().sum() > 0 and prev.grad is None


@pytest.mark.parametrize("eta", [0.0, -0.5])
def test_eta_zero_is_refused(eta):
    scheduler = sd_scheduler()
    with pytest.raises(common.UserError, match="eta must be > 0"):
        common.ddim_step_with_logprob(scheduler, torch.randn(1, 4, 8, 8), scheduler.timesteps[0],
                                      torch.randn(1, 4, 8, 8), eta)
