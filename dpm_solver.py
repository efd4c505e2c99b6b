"""DPM-Solver++(2M) sampling with Stable Diffusion's noise schedule, as plain functions.

DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models") solves the diffusion ODE written for the data prediction x0 = x_theta(x_t, t). In the half
log-SNR lambda_t = log(alpha_t / sigma_t) its exact solution from s to t is
    x_t = sigma_t / sigma_s * x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda x_theta d lambda,
whose linear part is integrated exactly; only x_theta is approximated. Taking x_theta constant over the
step gives the first-order solver, which is DDIM. The multistep second-order solver, "2M" (Algorithm 2),
still calls the model once a step and extrapolates x_theta linearly in lambda through the previous
step's prediction.

The conventions are those of diffusers' DPMSolverMultistepScheduler with SD's schedule (algorithm_type
"dpmsolver++", solver_order 2, solver_type "midpoint", lower_order_final, final_sigmas_type "zero", no
thresholding): "linspace" timesteps (20 steps visit 999, 949, ..., 50, not DDIM's 981, ..., 1), the first
step first order (there is no previous prediction yet) and the last one first order down to noise 0,
which returns the last x0 prediction. With `karras`, the noise levels follow Karras et al. 2022 (rho = 7)
between the table's smallest and largest one; the model is told the timestep whose noise level is
nearest (linear in log sigma, rounded) while the solver steps between the exact Karras levels.

A noise level is written as diffusers' sigma = sqrt((1 - a) / a) for alphas_cumprod a; the paper's
alpha_t = 1 / sqrt(1 + sigma^2) and sigma_t = sigma * alpha_t follow from it (and lambda_t = -log sigma).
The schedule, what the model predicts ("epsilon" or "v") and the split of its output into (eps, x0) are
ddim.py's. Every function works on any latent shape: images [B, 4, h, w] or videos [B, 4, F, h, w].
"""
import torch

import ddim

KARRAS_RHO = 7.0  # Karras et al. 2022's choice, as diffusers' use_karras_sigmas


def _sigma_table(alphas=None):
    """sigma = sqrt((1 - a) / a) at each of the 1000 training timesteps, float32 as diffusers has it."""
    a = ddim.alphas_cumprod if alphas is None else alphas
    return ((1 - a) / a) ** 0.5


def _timestep_of(sigmas, table):
    """The fractional timesteps at the noise levels `sigmas` [n], linear in log sigma between table entries."""
    log_table, log_sigma = table.log().double(), sigmas.log()
    i = (torch.searchsorted(log_table, log_sigma, right=True) - 1).clamp(0, len(table) - 2)
    return i + ((log_sigma - log_table[i]) / (log_table[i + 1] - log_table[i])).clamp(0, 1)


def schedule(num_inference_steps, alphas=None, karras=False):
    """(timesteps [n] long, descending, at which the model is called; noise levels sigma [n + 1] float32, one
    per timestep and a final 0)."""
    n, last = num_inference_steps, ddim.NUM_TRAIN_TIMESTEPS - 1
    # more than 999 steps cannot visit distinct timesteps (linspace would repeat one: a zero step, 0 / 0)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= last:
        raise ValueError(f"num_inference_steps must be an int in [1, {last}], got {n!r}")
    table = _sigma_table(alphas)
    if karras:  # Karras et al. 2022, eq. (5): uniform in sigma^(1/rho), computed in float64 as diffusers
        hi, lo = table[-1].double() ** (1 / KARRAS_RHO), table[0].double() ** (1 / KARRAS_RHO)
        sigmas = (hi + torch.linspace(0, 1, n, dtype=torch.float64) * (lo - hi)) ** KARRAS_RHO
        ts = _timestep_of(sigmas, table).round().long()
    else:  # "linspace": n + 1 points i * 999 / n, rounded (half to even), the 0 dropped; numpy's arithmetic
        ts = (torch.arange(n, 0, -1, dtype=torch.float64) * (last / n)).round().long()
        sigmas = table[ts]
    return ts, torch.cat([sigmas.float(), torch.zeros(1)])


def timesteps(num_inference_steps, alphas=None, karras=False):
    """The descending integer timesteps the model is called at: 20 -> [999, 949, ..., 50]."""
    return schedule(num_inference_steps, alphas, karras)[0]


@torch.no_grad()
def sample(x_T, model_fn, num_inference_steps, prediction="epsilon", alphas=None, karras=False):
    """Run DPM-Solver++(2M) from noise x_T to x0. model_fn(x, t) returns the model's output (the noise, or
    v: `prediction`); t is an int. Deterministic; the arithmetic runs in x's dtype (0-d float32 factors).

    Step i goes from noise level s = sigmas[i] to t = sigmas[i + 1] with h = lambda_t - lambda_s (Algorithm 2):
      x0 = x_theta(x_s, s)                                      data prediction, from ddim.split
      D = x0 + (x0 - x0_prev) / (2 r),  r = h_prev / h          Algorithm 2's D_i = (1 + 1/2r) x0 - 1/2r x0_prev
      D = x0                 on the first and the last step     first order, i.e. DDIM
      x_t = sigma_t / sigma_s * x_s - alpha_t (e^-h - 1) D      the exact solution with x_theta -> D
    The last step is first order where Algorithm 2 would not be (diffusers' lower_order_final): to sigma 0,
    h is infinite, and r = 0.
    """
    ddim.check_prediction(prediction)
    ts, sigmas = schedule(num_inference_steps, alphas, karras)
    alpha_t = (sigmas**2 + 1) ** -0.5  # the paper's alpha_t, sigma_t, lambda_t at each level; lambda = inf at 0
    sigma_t = sigmas * alpha_t
    lambda_t = alpha_t.log() - sigma_t.log()
    x, x0_prev, h_prev = x_T, None, None
    for i, t in enumerate(ts.tolist()):
        _, x0 = ddim.split(x, model_fn(x, t), alpha_t[i] ** 2, prediction)
        h = lambda_t[i + 1] - lambda_t[i]
        second_order = 0 < i < len(ts) - 1  # diffusers' lower_order_final: always with a final sigma of 0
        D = x0 + (x0 - x0_prev) * (h / (2 * h_prev)) if second_order else x0
        x = (sigma_t[i + 1] / sigma_t[i]) * x - (alpha_t[i + 1] * (torch.exp(-h) - 1)) * D
        x0_prev, h_prev = x0, h
    return x
