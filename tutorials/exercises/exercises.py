"""Exercises: write the key pieces of DDPO, D3PO and PRDP. Grade them with

    python -m pytest tutorials/exercises

Each function below says what it computes, in the papers' notation, with the shapes of its tensors and what it
returns, and where the project's notes derive it (docs/papers.md; the notebooks in tutorials/ teach it); working
out the formula from there is the exercise. Each also asks a question about what you wrote: the grader checks
the answer through your function's behaviour. Replace each `raise NotImplementedError(...)` with your code, in
plain PyTorch; do not import the project's scripts here. Log-probabilities are MEANS over the latent's elements,
as in the project and the papers' reference code.
"""
import torch  # noqa: F401 (your code will need it)


# ---- 1. The policy: one stochastic DDIM step (notebook 1) ------------------------------------------------------------

def ddim_step_mean_std(alphas_cumprod, final_alpha_cumprod, step_ratio, model_output, timestep, sample, eta):
    """The Gaussian of one DDIM step x_t -> x_{t-1} for an epsilon-predicting model: its mean and standard deviation.

    alphas_cumprod: (1000,) abar of every training timestep (scheduler.alphas_cumprod); final_alpha_cumprod: the
    abar used when the previous timestep is negative (scheduler.final_alpha_cumprod); step_ratio: how far apart the
    DDIM timesteps are (1000 // the number of steps), so the previous timestep is timestep - step_ratio;
    model_output: eps_theta (B, C, H, W); timestep: an int; sample: x_t (B, C, H, W); eta: in (0, 1].
    The step is DDIM's (DDIM Eqs. 12 and 16; docs/papers.md, "The policy"): predict x_0 from x_t and eps_theta,
    then move to the previous timestep with standard deviation sigma_t, which eta scales.

    Returns (mean (B, C, H, W), std): std a tensor that broadcasts against the mean (a 0-d tensor is fine).

    Question: which abar does the last step (timestep < step_ratio) move to, and how does sigma_t grow with eta?
    """
    raise NotImplementedError("ddim_step_mean_std: compute the step's mean and standard deviation (see its docstring)")


def ddim_log_prob(prev_sample, mean, std):
    """log pi(x_{t-1} | x_t, c) of each sample: the log-density of N(mean, std^2 I) at prev_sample, taken
    element by element and then AVERAGED over the C, H, W elements (the reference code's convention).

    prev_sample, mean: (B, C, H, W); std: broadcasts against them. Returns (B,).

    Question: through which argument may the gradient flow, and why not through the other?
    """
    raise NotImplementedError("ddim_log_prob: compute the Gaussian log-density, mean over elements (see its docstring)")


# ---- 2. DDPO (notebook 2) --------------------------------------------------------------------------------------------

def per_prompt_advantages(stats, prompts, rewards, buffer_size, min_count):
    """DDPO's advantages, normalised per prompt (the reference code's per-prompt stat tracker).

    stats: a dict prompt -> list of that prompt's earlier rewards, UPDATED here: append this batch's rewards of the
    prompt and keep the last buffer_size. prompts: B strings; rewards: B numbers. For each prompt, once its list
    holds at least min_count rewards, A = (r - mean(list)) / (std(list) + 1e-6), with numpy's std (ddof 0);
    before that, the mean and std of the whole batch's rewards stand in. Returns a float32 tensor (B,).

    Question: two prompts, one whose images always score high and one whose images always score low: what
    advantages does each prompt's better image get, once both have min_count rewards?
    """
    raise NotImplementedError("per_prompt_advantages: normalise each reward against its own prompt's statistics")


def ddpo_clipped_loss(log_probs, old_log_probs, advantages, clip_range):
    """DDPO_IS, the importance-sampling estimator with PPO's clipped surrogate, for one denoising step of b samples
    (DDPO Sec. 4.3; docs/papers.md, "DDPO"): a loss to MINIMISE whose gradient at theta = theta_old is the score
    function's, and which stops pushing a sample once its ratio pi_theta / pi_old has left [1 - clip_range,
    1 + clip_range] in the direction its advantage wants.

    log_probs (b,): log pi_theta of the step, with gradients; old_log_probs (b,): log pi_old, recorded when the
    step was sampled; advantages (b,): A; clip_range: epsilon. Returns a scalar, averaged over the b samples.

    Question: for a sample with A > 0, at which ratios is the gradient of your loss zero, and what does a sample
    whose ratio moved the other way get?
    """
    raise NotImplementedError("ddpo_clipped_loss: the clipped importance-sampling surrogate (see its docstring)")


# ---- 3. D3PO (notebook 3) --------------------------------------------------------------------------------------------

def d3po_loss(log_probs, ref_log_probs, beta, ratio_clip):
    """D3PO's loss of one denoising step of b pairs, the winner first: DPO's loss (Bradley-Terry preferences,
    the KL-regularised optimum's log-ratio as the implicit reward, weight beta) applied to one step of each pair's
    two trajectories from one x_T (docs/papers.md, "D3PO"), with the reference code's clamp of each ratio
    pi_theta / pi_ref to [1 - ratio_clip, 1 + ratio_clip].

    log_probs (b, 2): log pi_theta of the winner's and the loser's step, with gradients; ref_log_probs (b, 2): the
    same under pi_ref. Returns a scalar, averaged over the b pairs.

    Question: at pi_theta = pi_ref, what is the loss, and which way does its gradient push the winner's log-prob?
    Where does the clamp leave no gradient?
    """
    raise NotImplementedError("d3po_loss: DPO's loss on each step's clamped log-ratios (see its docstring)")


# ---- 4. PRDP (notebook 4) --------------------------------------------------------------------------------------------

def rdp_loss(log_ratio, old_log_ratio, rewards, pairs, beta, clip_eps):
    """PRDP's reward difference prediction loss with its proximal clip (PRDP Eqs. 10-14 and 16-21;
    docs/papers.md, "PRDP"): each pair's predicted reward difference, from the trajectories' log-ratios to pi_ref
    (r_hat, the MEAN over the T steps, as the paper's appendix code), regressed on the true reward difference on
    the scale the KL-regularised optimum sets; and the same prediction with each step's log-ratio kept within
    clip_eps of its value at theta_old, the pessimistic of the two taken per pair.

    log_ratio (n, T): log pi_theta / pi_ref of each of the T steps of n trajectories, with gradients;
    old_log_ratio (n, T): the same at theta_old; rewards (n,); pairs (m, 2): indices (a, b) of two trajectories of
    one prompt; beta: the KL weight. Returns a scalar, averaged over the m pairs.

    Question: where is your loss exactly zero? (Hint: pi* = pi_ref exp(r / beta) / Z.) And when the clip acts,
    which moves does it stop: those towards the target, or those away from it?
    """
    raise NotImplementedError("rdp_loss: reward difference prediction with the proximal clip (see its docstring)")


def two_pass_backward(step_log_prob, num_steps, loss_fn):
    """Backpropagate loss_fn(log_probs) without holding the graphs of all steps at once (as prdp.rdp_backward).

    step_log_prob(s) -> (b,): the log-probs of step s, with a graph to the parameters when gradients are enabled;
    loss_fn(log_probs (b, T)) -> a scalar. First compute every step's log-prob WITHOUT a graph (torch.no_grad),
    make that (b, T) tensor a leaf that requires grad, compute the loss and its gradient with respect to it;
    then, step by step, recompute step s WITH a graph and backpropagate that step's column of the gradient into
    the parameters. By the chain rule the parameters get exactly the gradient of loss_fn. Returns the loss.

    Question: how many times is step_log_prob called without a graph, and how many with one?
    """
    raise NotImplementedError("two_pass_backward: the loss's gradient, one step's graph at a time (see its docstring)")
