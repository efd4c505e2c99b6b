"""DDIM sampling and inversion with Stable Diffusion 1.x's noise schedule, as plain functions.

The schedule is SD's "scaled linear" one: betas spaced linearly in sqrt from 0.00085 to 0.012 over
1000 training steps. SD (CompVis ldm) computes it in float64 and keeps alphas_cumprod in float32;
we do the same, which agrees with diffusers' float32 DDIMScheduler to ~1e-6.

Sampling conventions are SD's (diffusers DDIMScheduler with steps_offset=1, "leading" spacing,
set_alpha_to_one=False, clip_sample=False, epsilon prediction): 50 steps visit 981, 961, ..., 1, and
the last step goes to alphas_cumprod[0] rather than to a clean alpha of 1. We write a negative
timestep for that "clean end" of the chain.

Every function works on any latent shape: images [B, 4, h, w] or videos [B, 4, F, h, w].
"""
import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012

betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).float()  # [1000] float32, as SD stores it


def timesteps(num_inference_steps):
    """Descending timesteps with SD's "leading" spacing and offset 1: 50 -> [981, 961, ..., 1]."""
    # 1000 steps would put the first one at 1000, outside the table, so 999 is the most we accept.
    if not 1 <= num_inference_steps < NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"num_inference_steps must be in [1, {NUM_TRAIN_TIMESTEPS - 1}], got {num_inference_steps}")
    step_ratio = NUM_TRAIN_TIMESTEPS // num_inference_steps
    return (torch.arange(num_inference_steps - 1, -1, -1) * step_ratio + 1).long()


def _alpha(t):
    """alphas_cumprod[t] as a 0-d float32 tensor; a negative t is the clean end, alphas_cumprod[0]."""
    t = int(t)
    if t >= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"timestep must be < {NUM_TRAIN_TIMESTEPS}, got {t}")
    return alphas_cumprod[max(t, 0)]


def step(x_t, eps, t, t_prev, eta=0.0, noise=None):
    """One DDIM update x_t -> x_{t_prev} from the predicted noise eps (DDIM paper, eq. 12).

    t_prev < 0 marks the final step. eta = 0 is deterministic DDIM; eta > 0 adds sigma_t * noise, and the
    caller must pass `noise` (a standard normal tensor shaped like x_t), so this function stays pure.
    The alphas are float32 0-d tensors, so the arithmetic runs in x_t's dtype, as in diffusers.
    """
    a_t, a_prev = _alpha(t), _alpha(t_prev)
    x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    if eta == 0:  # deterministic; also valid run backwards (t_prev > t), which inversion relies on
        return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    if noise is None:
        raise ValueError(f"step with eta={eta} > 0 needs `noise` shaped like x_t {tuple(x_t.shape)}, got None")
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    return a_prev**0.5 * x0 + (1 - a_prev - sigma**2) ** 0.5 * eps + sigma * noise


def invert_step(x_t, eps, t, t_next):
    """One DDIM inversion update x_t -> x_{t_next}, t_next > t: the deterministic update run backwards.

    t < 0 is the clean end (alphas_cumprod[0]), matching where sampling's final step lands. The caller
    passes eps predicted at t_next (see `invert`), the timestep at which sampling will later evaluate it.
    """
    return step(x_t, eps, t, t_next)  # the eta=0 update is the same formula in either direction


def draw_timestep(gen, bias=0.0):
    """One training timestep [1]: uniform over 0..999 as in SD's training (bias 0), else with density
    proportional to (t / 1000) ** bias, which favours the noisiest steps, where a sampled video's layout
    and motion are decided and the eps loss weighs errors least."""
    if bias == 0:
        return torch.randint(0, NUM_TRAIN_TIMESTEPS, (1,), generator=gen)
    u = torch.rand(1, generator=gen, dtype=torch.float64)
    return (u ** (1 / (1 + bias)) * NUM_TRAIN_TIMESTEPS).long().clamp(max=NUM_TRAIN_TIMESTEPS - 1)


def add_noise(x0, noise, t):
    """The forward process q(x_t | x0) for training: t is a LongTensor [B], one timestep per sample."""
    a = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t.to(x0.device)]
    a = a.reshape(-1, *([1] * (x0.dim() - 1)))  # [B] -> [B, 1, 1, ...]
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


@torch.no_grad()
def sample(x_T, eps_fn, num_inference_steps, eta=0.0, generator=None):
    """Run the DDIM sampler from noise x_T to x0. eps_fn(x, t) returns the predicted noise; t is an int.

    With eta > 0 the step noise is drawn on the CPU with torch.randn from `generator` (None: the global
    RNG) and then moved to x's device, so that a seed means the same noise on every device.
    """
    ts = timesteps(num_inference_steps).tolist()
    x = x_T
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        noise = None
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)  # a CPU generator
        x = step(x, eps_fn(x, t), t, t_prev, eta=eta, noise=noise)
    return x


@torch.no_grad()
def invert(x0, eps_fn, num_inference_steps):
    """DDIM inversion of a clean latent x0 to the x_T that `sample` maps back to x0 (Tune-A-Video style).

    Each step goes from the previous timestep (the clean end first) up to t, with eps_fn evaluated at t
    on the current, less noisy latent: the mirror image of the sampler's step from t, so the round trip
    is exact when eps does not depend on x, and close when it depends on x mildly.
    """
    ts = timesteps(num_inference_steps).flip(0).tolist()  # ascending: 1, 21, ..., 981
    x = x0
    for i, t in enumerate(ts):
        t_from = ts[i - 1] if i > 0 else -1
        x = invert_step(x, eps_fn(x, t), t_from, t)
    return x
