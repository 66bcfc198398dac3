"""Exercises: write the key pieces of DDPO, D3PO and PRDP. Grade them with

    python -m pytest tutorials/exercises

Each function below says what to compute, with the shapes of its tensors and the equation it comes from
(docs/papers.md and tutorials/ hold the papers' equations; the notebooks in tutorials/ teach them). Replace
each `raise NotImplementedError(...)` with your code, in plain PyTorch; do not import the project's scripts here.
Log-probabilities are MEANS over the latent's elements, as in the project and the papers' reference code.
"""
import torch  # noqa: F401 (your code will need it)


# ---- 1. The policy: one stochastic DDIM step (notebook 1) ------------------------------------------------------------

def ddim_step_mean_std(alphas_cumprod, final_alpha_cumprod, step_ratio, model_output, timestep, sample, eta):
    """The Gaussian of one DDIM step x_t -> x_{t-1} for an epsilon-predicting model: its mean and standard deviation.

    alphas_cumprod: (1000,) abar of every training timestep (scheduler.alphas_cumprod); final_alpha_cumprod: the
    abar used when the previous timestep is negative (scheduler.final_alpha_cumprod); step_ratio: how far apart the
    DDIM timesteps are (1000 // the number of steps), so the previous timestep is timestep - step_ratio;
    model_output: eps_theta (B, C, H, W); timestep: an int; sample: x_t (B, C, H, W); eta: in (0, 1].

      x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
      sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev))            (DDIM Eq. 16)
      mean = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps                    (DDIM Eq. 12)

    Returns (mean (B, C, H, W), std): std a tensor that broadcasts against the mean (a 0-d tensor is fine).
    """
    raise NotImplementedError("ddim_step_mean_std: compute the step's mean and standard deviation (see its docstring)")


def ddim_log_prob(prev_sample, mean, std):
    """log pi(x_{t-1} | x_t, c) of each sample: the log-density of N(mean, std^2 I) at prev_sample, taken
    element by element and then AVERAGED over the C, H, W elements (the reference code's convention).

    prev_sample, mean: (B, C, H, W); std: broadcasts against them. Returns (B,). The gradient must flow to `mean`
    (that is where theta is) and not to prev_sample (the action taken is data).
    """
    raise NotImplementedError("ddim_log_prob: compute the Gaussian log-density, mean over elements (see its docstring)")


# ---- 2. DDPO (notebook 2) --------------------------------------------------------------------------------------------

def per_prompt_advantages(stats, prompts, rewards, buffer_size, min_count):
    """DDPO's advantages, normalised per prompt (the reference code's per-prompt stat tracker).

    stats: a dict prompt -> list of that prompt's earlier rewards, UPDATED here: append this batch's rewards of the
    prompt and keep the last buffer_size. prompts: B strings; rewards: B numbers. For each prompt, once its list
    holds at least min_count rewards, A = (r - mean(list)) / (std(list) + 1e-6), with numpy's std (ddof 0);
    before that, the mean and std of the whole batch's rewards stand in. Returns a float32 tensor (B,).
    """
    raise NotImplementedError("per_prompt_advantages: normalise each reward against its own prompt's statistics")


def ddpo_clipped_loss(log_probs, old_log_probs, advantages, clip_range):
    """DDPO_IS with PPO's clip, for one denoising step of b samples (DDPO Sec. 4.3).

    log_probs (b,): log pi_theta of the step, with gradients; old_log_probs (b,): log pi_old, when sampled;
    advantages (b,). ratio = pi_theta / pi_old; the loss is the mean over samples of the pessimistic (larger) of
    -A ratio and -A clip(ratio, 1 - clip_range, 1 + clip_range). Returns a scalar.
    """
    raise NotImplementedError("ddpo_clipped_loss: the clipped importance-sampling surrogate (see its docstring)")


# ---- 3. D3PO (notebook 3) --------------------------------------------------------------------------------------------

def d3po_loss(log_probs, ref_log_probs, beta, ratio_clip):
    """D3PO's loss of one denoising step of b pairs, the winner first (D3PO's per-step loss, docs/papers.md).

    log_probs (b, 2): log pi_theta of the winner's and the loser's step, with gradients; ref_log_probs (b, 2):
    the same under pi_ref. As the reference code: the ratio pi_theta / pi_ref is clamped to
    [1 - ratio_clip, 1 + ratio_clip] before its log, then
        loss = -log sigmoid(beta (log ratio_winner - log ratio_loser)),  averaged over the b pairs.
    Returns a scalar.
    """
    raise NotImplementedError("d3po_loss: DPO's loss on each step's clamped log-ratios (see its docstring)")


# ---- 4. PRDP (notebook 4) --------------------------------------------------------------------------------------------

def rdp_loss(log_ratio, old_log_ratio, rewards, pairs, beta, clip_eps):
    """PRDP's reward difference prediction loss with the proximal clip (PRDP Eqs. 10-14 and 16-21).

    log_ratio (n, T): log pi_theta / pi_ref of each of the T steps of n trajectories, with gradients;
    old_log_ratio (n, T): the same at theta_old; rewards (n,); pairs (m, 2): indices (a, b) of trajectories of one
    prompt. r_hat = the MEAN over the T steps of log_ratio (the paper's appendix code); r_hat_clip the same mean of
    each step's log-ratio clipped to within clip_eps of its old value. For each pair,
        unclipped = (r_hat(a) - r_hat(b) - (r(a) - r(b)) / beta)^2, clipped the same with r_hat_clip,
    and the loss is the mean over pairs of the larger of the two. Returns a scalar.
    """
    raise NotImplementedError("rdp_loss: reward difference prediction with the proximal clip (see its docstring)")


def two_pass_backward(step_log_prob, num_steps, loss_fn):
    """Backpropagate loss_fn(log_probs) without holding the graphs of all steps at once (as prdp.rdp_backward).

    step_log_prob(s) -> (b,): the log-probs of step s, with a graph to the parameters when gradients are enabled;
    loss_fn(log_probs (b, T)) -> a scalar. First compute every step's log-prob WITHOUT a graph (torch.no_grad),
    make that (b, T) tensor a leaf that requires grad, compute the loss and its gradient with respect to it;
    then, step by step, recompute step s WITH a graph and backpropagate that step's column of the gradient into
    the parameters. By the chain rule the parameters get exactly the gradient of loss_fn. Returns the loss.
    """
    raise NotImplementedError("two_pass_backward: the loss's gradient, one step's graph at a time (see its docstring)")
