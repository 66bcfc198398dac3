"""The policy's log-probability: common.ddim_step_with_logprob against torch.distributions.Normal, with the
mean and standard deviation taken from diffusers' own DDIMScheduler.step (an independent implementation)."""
import pytest
import torch
from diffusers import DDIMScheduler

import common


def sd_scheduler(prediction_type="epsilon", num_steps=20, **config):
    config = dict(dict(clip_sample=False, set_alpha_to_one=False), **config)
    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                      prediction_type=prediction_type, **config)
    s.set_timesteps(num_steps)
    return s


def diffusers_mean_std(scheduler, model_output, t, sample, eta):
    """Mean and sigma of diffusers' DDIM step for ONE scalar timestep (noise switched off for the mean)."""
    mean = scheduler.step(model_output, t, sample, eta=eta, variance_noise=torch.zeros_like(sample)).prev_sample
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    std = eta * scheduler._get_variance(t, prev_t) ** 0.5
    return mean, std


@pytest.mark.parametrize("prediction_type, config", [
    ("epsilon", {}), ("v_prediction", {}), ("sample", {}),
    ("epsilon", {"clip_sample": True, "clip_sample_range": 1.5}), ("sample", {"clip_sample": True})])
@pytest.mark.parametrize("eta", [0.3, 0.7, 1.0])
def test_log_prob_matches_normal_scalar_timestep(prediction_type, config, eta):
    """Every prediction type and clip_sample: the step's mean and sigma are diffusers' DDIMScheduler.step's."""
    scheduler = sd_scheduler(prediction_type, **config)
    for t in scheduler.timesteps[[0, 7, 13, -1]]:  # first, middle and the last step (abar_prev = abar_0)
        sample, model_output = torch.randn(3, 4, 8, 8), 2 * torch.randn(3, 4, 8, 8)  # x0_hat beyond the clip range
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_scored_in_float32(dtype):
    """A half-precision model output (and latents) is scored as its exact float32 value, in float32: the result
    matches a float64 computation to float32 accuracy, which a computation in the half dtype cannot (it is off by
    about 1e-3 relative)."""
    scheduler = sd_scheduler()
    t = scheduler.timesteps[4]
    sample, prev, model_output = (torch.randn(2, 4, 8, 8).to(dtype) for _ in range(3))
    _, log_prob = common.ddim_step_with_logprob(scheduler, model_output, t, sample, 1.0, prev_sample=prev)
    assert log_prob.dtype == torch.float32
    mean, std = diffusers_mean_std(scheduler, model_output.double(), int(t), sample.double(), 1.0)
    expected = torch.distributions.Normal(mean, std).log_prob(prev.double()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob.double(), expected, atol=2e-6, rtol=2e-6)


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


def test_a_scheduler_whose_last_step_is_deterministic():
    """set_alpha_to_one=True: abar_prev = 1 at the last step, so sigma = 0 and x_0 is the step's mean, as
    diffusers' DDIMScheduler.step gives it. The log-density is not defined there; the step is no decision of the
    policy, so its log-prob is 0 (finite, with no gradient), and every earlier step is scored as usual."""
    scheduler = sd_scheduler(set_alpha_to_one=True, num_steps=10)
    last, earlier = scheduler.timesteps[-1], scheduler.timesteps[3]
    sample = torch.randn(2, 4, 8, 8)
    model_output = torch.randn(2, 4, 8, 8, requires_grad=True)
    prev, log_prob = common.ddim_step_with_logprob(scheduler, model_output, last, sample, 1.0,
                                                   generator=torch.Generator().manual_seed(0))
    expected = scheduler.step(model_output.detach(), int(last), sample, eta=1.0).prev_sample  # deterministic: no noise
    torch.testing.assert_close(prev.detach(), expected)
    assert torch.equal(log_prob, torch.zeros(2))
    log_prob.sum().backward()
    assert model_output.grad is None or model_output.grad.abs().max() == 0
    # per-sample timesteps mixing the last step with an earlier one: only the last one is deterministic
    both = torch.stack([last, earlier])
    _, log_prob = common.ddim_step_with_logprob(scheduler, model_output.detach(), both, sample, 1.0,
                                                prev_sample=torch.randn(2, 4, 8, 8))
    assert log_prob[0] == 0 and torch.isfinite(log_prob[1]) and log_prob[1] != 0


def test_dynamic_thresholding_is_refused():
    scheduler = sd_scheduler(thresholding=True)
    with pytest.raises(common.UserError, match="dynamic thresholding"):
        common.ddim_step_with_logprob(scheduler, torch.randn(1, 4, 8, 8), scheduler.timesteps[0],
                                      torch.randn(1, 4, 8, 8), 1.0)
