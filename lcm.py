"""Multistep latent consistency sampling (LCM: Luo et al. 2023, "Latent Consistency Models"), as plain functions.

A consistency model f(x_t, t) maps any point of the diffusion ODE's trajectory to the trajectory's clean end in
one call. LCM builds it from the UNet's own output: its x0 prediction (ddim.split) and boundary conditions that
make f(x, 0) = x exactly (Song et al. 2023):
    f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t),
    c_skip = s^2 / ((10 t)^2 + s^2),  c_out = 10 t / sqrt((10 t)^2 + s^2),  s = 0.5 (sigma_data),
on the integer timestep t scaled by 10, as LCM's code: c_skip = 1 and c_out = 0 at t = 0; from t = 19 on,
c_skip < 2e-5 and f is the x0 prediction. Adapters distilled to be such an f (distill.py, train.py --distill)
were trained at the timesteps of a grid every `skip` steps (skip - 1, 2 skip - 1, ..., 999: LCM's 50-step DDIM
schedule for skip 20).

Sampling (consistency models' multistep Algorithm 1): f at 999 gives x0; x0 is noised back to the next, smaller
timestep with fresh noise (the forward process), f is called there, and so on; the last call's x0 is the video.
n steps take n timesteps of the grid, evenly spaced in index from 999 down (4 steps, skip 20: 999, 759, 499,
259). The guidance is distilled into the adapters: one model call a step, on the prompt alone. The conventions
are diffusers' LCMScheduler's (original_inference_steps = 1000 // skip, timestep_scaling 10, sigma_data 0.5, the
step noise drawn from the generator after the starting noise, none after the last step). Every function works on
any latent shape: images [B, 4, h, w] or videos [B, 4, F, h, w].

Phased consistency (PCM: Wang et al. 2024) splits the trajectory at the timesteps of N steps; f maps a point of a
phase to the phase's end (the DDIM step there), not to the clean end. Adapters distilled so sample by deterministic
DDIM steps between those timesteps, no noise drawn: each of the N steps is one f, along the ODE's own trajectory.
"""
import torch

import ddim
from runtime import to_device

SIGMA_DATA = 0.5  # s above: the data's standard deviation assumed by the boundary conditions
TIMESTEP_SCALING = 10.0  # LCM's: the boundary conditions see 10 t, so that they reach f = x0 from t = 19 on
SKIP = 20  # LCM's skip k: its distillation grid is the 50-step DDIM schedule


def grid(skip=SKIP):
    """The timesteps consistency distillation trains at, ascending: skip - 1, 2 skip - 1, ... up to 999."""
    if isinstance(skip, bool) or not isinstance(skip, int) or not 1 <= skip <= ddim.NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"the skip must be an int in [1, {ddim.NUM_TRAIN_TIMESTEPS}], got {skip!r}")
    return torch.arange(1, ddim.NUM_TRAIN_TIMESTEPS // skip + 1) * skip - 1


def timesteps(num_inference_steps, skip=SKIP):
    """The n descending timesteps of the grid that n steps visit: 4 -> [999, 759, 499, 259] for skip 20."""
    ts, n = grid(skip).flip(0), num_inference_steps
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(ts):
        raise ValueError(f"num_inference_steps must be an int in [1, {len(ts)}] (the grid of skip {skip}), got {n!r}")
    # n indices evenly spaced over the grid, floored (numpy's linspace without its end point, as diffusers)
    return ts[(torch.arange(n, dtype=torch.float64) * (len(ts) / n)).floor().long()]


def boundary(t):
    """(c_skip, c_out) at the timesteps t (an int, or a tensor of them): 1 and 0 at t = 0."""
    scaled = (t.double() if torch.is_tensor(t) else float(t)) * TIMESTEP_SCALING
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5


def consistency(x_t, model_output, t, prediction="epsilon", alphas=None):
    """f(x_t, t) = c_skip x_t + c_out x0: the model's output (the noise, or v) made a consistency function. t is an
    int, or one timestep per sample (a LongTensor [B], as distillation draws them); a negative t is 0 (f = x_t)."""
    table = ddim.alphas_cumprod if alphas is None else alphas
    if torch.is_tensor(t):
        t = t.clamp(min=0)
        shape = (-1,) + (1,) * (x_t.dim() - 1)  # [B] -> [B, 1, ...], against x_t
        a_t = table.to(x_t.device)[t.to(x_t.device)].reshape(shape).to(x_t.dtype)
        c_skip, c_out = (c.reshape(shape).to(x_t.device, x_t.dtype) for c in boundary(t))
    else:
        t = max(int(t), 0)
        a_t, (c_skip, c_out) = table[t], boundary(t)
    _, x0 = ddim.split(x_t, model_output, a_t, prediction)
    return c_skip * x_t + c_out * x0


def phase_ends(t, phases, skip=SKIP):
    """Phased consistency: the timestep [B] where the phase of each t [B] ends, the next of the `phases` sampling
    timesteps below t (-1: the clean end). 4 phases, skip 50: t in 750..999 -> 749, 500..749 -> 499, ... 0..249 -> -1.
    The ends are grid timesteps, so a step of the grid from t to t - skip never passes its phase's end."""
    ends = torch.cat([torch.tensor([-1]), timesteps(phases, skip).flip(0)[:-1]]).to(t.device)  # ascending
    return ends[(ends < t.unsqueeze(-1)).sum(-1) - 1]


def phased_consistency(x_t, model_output, t, end, prediction="epsilon", alphas=None):
    """f(x_t, t) of phased consistency (PCM: Wang et al. 2024): the deterministic DDIM step of the model's output
    from t to its phase's end [B] (phase_ends); the boundary f(x, end) = x is exact. The last phase ends where DDIM
    sampling does (ddim.py's clean end)."""
    shape = (-1,) + (1,) * (x_t.dim() - 1)  # [B] -> [B, 1, ...], against x_t
    moved = ddim.step(x_t, model_output, t.clamp(min=0), end, prediction=prediction, alphas=alphas)
    return torch.where((t <= end).reshape(shape).to(x_t.device), x_t, moved)


@torch.no_grad()
def sample(x_T, model_fn, num_inference_steps, generator=None, skip=SKIP, prediction="epsilon", alphas=None,
           phased=False):
    """Multistep consistency sampling from noise x_T to x0. model_fn(x, t) returns the distilled model's output
    (the noise, or v: `prediction`); t is an int. Between steps the noise is drawn on the CPU with torch.randn from
    `generator` (None: the global RNG) and moved to x's device, so that a seed means the same video on every device.
    `phased`: adapters distilled in phases (phased_consistency), sampled by deterministic DDIM steps from one
    timestep to the next, no noise: with as many steps as phases, each step is f, from a phase's start to its end.
    """
    ddim.check_prediction(prediction)
    ts = timesteps(num_inference_steps, skip).tolist()
    x = x_T
    for i, t in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else -1
        if phased:
            x = ddim.step(x, model_fn(x, t), t, t_next, prediction=prediction, alphas=alphas)
            continue
        x0 = consistency(x, model_fn(x, t), t, prediction, alphas)
        if t_next < 0:
            return x0
        noise = to_device(torch.randn(x.shape, generator=generator, dtype=x.dtype), x.device)  # a CPU generator
        x = ddim.add_noise(x0, noise, torch.full((x.shape[0],), t_next, dtype=torch.long), alphas)
    return x
