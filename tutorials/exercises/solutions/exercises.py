"""REFERENCE SOLUTIONS of tutorials/exercises/exercises.py. INSTRUCTORS: withhold this folder (solutions/) when you
hand the exercises out; `EXERCISES_GRADE=solutions python -m pytest tutorials/exercises` grades it.

Where the project computes the same thing with the same signature, the solution is the project's own function
(so the grader checks the scripts too, and nothing here can drift from them); the file and function to read
are named. The DDIM step and the two-pass gradient are written out: the project computes them inside larger
functions (common.ddim_step_with_logprob, prdp.rdp_backward).
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
# bound at import, so that the capstone, which puts your d3po_loss into d3po.py, does not call itself here
from d3po import d3po_loss as project_d3po_loss  # noqa: E402
from ddpo import ddpo_loss as project_ddpo_loss, per_prompt_advantages as project_advantages  # noqa: E402
from prdp import rdp_loss as project_rdp_loss  # noqa: E402


def ddim_step_mean_std(alphas_cumprod, final_alpha_cumprod, step_ratio, model_output, timestep, sample, eta):
    abar_t = alphas_cumprod[timestep]
    prev = timestep - step_ratio
    abar_prev = alphas_cumprod[prev] if prev >= 0 else torch.as_tensor(final_alpha_cumprod)
    x0_hat = (sample - (1 - abar_t).sqrt() * model_output) / abar_t.sqrt()
    std = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()          # DDIM Eq. 16
    mean = abar_prev.sqrt() * x0_hat + (1 - abar_prev - std**2).sqrt() * model_output      # DDIM Eq. 12
    return mean, std


def ddim_log_prob(prev_sample, mean, std):
    log_density = -((prev_sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.mean(dim=tuple(range(1, log_density.ndim)))


def per_prompt_advantages(stats, prompts, rewards, buffer_size, min_count):
    return project_advantages(stats, prompts, rewards, buffer_size, min_count)              # ddpo.py


def ddpo_clipped_loss(log_probs, old_log_probs, advantages, clip_range):
    return project_ddpo_loss(log_probs, old_log_probs, advantages, clip_range, adv_clip_max=float("inf"))[0]  # ddpo.py


def d3po_loss(log_probs, ref_log_probs, beta, ratio_clip):
    return project_d3po_loss(log_probs, ref_log_probs, beta, ratio_clip)[0]                 # d3po.py


def rdp_loss(log_ratio, old_log_ratio, rewards, pairs, beta, clip_eps):
    return project_rdp_loss(log_ratio, old_log_ratio, rewards, pairs, beta, clip_eps)[0]    # prdp.py


def two_pass_backward(step_log_prob, num_steps, loss_fn):
    with torch.no_grad():                                   # pass 1: every step's log-prob, no graph
        log_probs = torch.stack([step_log_prob(s) for s in range(num_steps)], 1)
    log_probs.requires_grad_(True)
    loss = loss_fn(log_probs)
    loss.backward()                                         # d loss / d log_probs, (b, T)
    for s in range(num_steps):                              # pass 2: one step's graph at a time
        step_log_prob(s).backward(log_probs.grad[:, s])
    return loss
