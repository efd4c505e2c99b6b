"""DDIM sampling and inversion with Stable Diffusion's noise schedule, as plain functions.

The schedule is SD's "scaled linear" one: betas spaced linearly in sqrt from 0.00085 to 0.012 over
1000 training steps. SD (CompVis ldm) computes it in float64 and keeps alphas_cumprod in float32;
we do the same, which agrees with diffusers' float32 DDIMScheduler to ~1e-6.

Sampling conventions are SD's (diffusers DDIMScheduler with steps_offset=1, "leading" spacing,
set_alpha_to_one=False, clip_sample=False): 50 steps visit 981, 961, ..., 1, and the last step goes
to alphas_cumprod[0] rather than to a clean alpha of 1. We write a negative timestep for that "clean
end" of the chain. SD 2.x shares the schedule.

What the model predicts is the checkpoint's `prediction`: "epsilon" (the noise; SD 1.x, SD 2.x
512-base) or "v" (v = sqrt(a) * eps - sqrt(1 - a) * x0, Salimans & Ho 2022; SD 2.x 768-v). Every
function converts the model's output to (eps, x0) with `split`, so the DDIM update is written once.

Every function works on any latent shape: images [B, 4, h, w] or videos [B, 4, F, h, w].
"""
import torch

from runtime import to_device

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012


def make_alphas_cumprod(beta_start, beta_end):
    """alphas_cumprod [1000] of a "scaled linear" schedule (LDM calls it "linear"): betas spaced
    linearly in sqrt, computed in float64 and kept in float32, as SD stores them."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


# SD 1.x and 2.x's schedule, the default of every function below; a model trained on another (the
# x4 upscaler: 0.0001 to 0.02) passes its own table as `alphas`.
alphas_cumprod = make_alphas_cumprod(BETA_START, BETA_END)
PREDICTIONS = ("epsilon", "v")


def timesteps(num_inference_steps):
    """Descending timesteps with SD's "leading" spacing and offset 1: 50 -> [981, 961, ..., 1]."""
    # 1000 steps would put the first one at 1000, outside the table, so 999 is the most we accept.
    if not 1 <= num_inference_steps < NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"num_inference_steps must be in [1, {NUM_TRAIN_TIMESTEPS - 1}], got {num_inference_steps}")
    step_ratio = NUM_TRAIN_TIMESTEPS // num_inference_steps
    return (torch.arange(num_inference_steps - 1, -1, -1) * step_ratio + 1).long()


def _alpha(t, alphas=None, like=None):
    """alphas[t] as a 0-d float32 tensor; a negative t is the clean end, alphas[0]. Timesteps [B] (a tensor, one per
    sample of `like`): their alphas shaped to broadcast against `like` (`_alphas`), gathered with no read back."""
    if isinstance(t, torch.Tensor) and t.dim() > 0:
        return _alphas(t.clamp(min=0), like, alphas)
    t = int(t)
    if t >= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"timestep must be < {NUM_TRAIN_TIMESTEPS}, got {t}")
    return (alphas_cumprod if alphas is None else alphas)[max(t, 0)]


def check_prediction(prediction):
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def split(x_t, model_output, a_t, prediction="epsilon"):
    """(eps, x0) of the noisy x_t whose model output is `model_output`, at alphas_cumprod a_t."""
    if prediction == "epsilon":
        return model_output, (x_t - (1 - a_t) ** 0.5 * model_output) / a_t**0.5
    check_prediction(prediction)
    # x_t = sqrt(a) x0 + sqrt(1-a) eps and v = sqrt(a) eps - sqrt(1-a) x0, a rotation, inverted:
    return a_t**0.5 * model_output + (1 - a_t) ** 0.5 * x_t, a_t**0.5 * x_t - (1 - a_t) ** 0.5 * model_output


def step(x_t, model_output, t, t_prev, eta=0.0, noise=None, prediction="epsilon", alphas=None):
    """One DDIM update x_t -> x_{t_prev} from the model's output at t (DDIM paper, eq. 12).

    t_prev < 0 marks the final step. eta = 0 is deterministic DDIM; eta > 0 adds sigma_t * noise, and the
    caller must pass `noise` (a standard normal tensor shaped like x_t), so this function stays pure.
    The alphas are float32 0-d tensors, so the arithmetic runs in x_t's dtype, as in diffusers. t and t_prev may
    also be tensors [B], one step per sample of x_t (distill.py's teacher), their alphas in x_t's dtype as add_noise's:
    in float32 each sample's result is the one-sample step's, bit for bit.
    """
    a_t, a_prev = _alpha(t, alphas, x_t), _alpha(t_prev, alphas, x_t)
    eps, x0 = split(x_t, model_output, a_t, prediction)
    if eta == 0:  # deterministic; also valid run backwards (t_prev > t), which inversion relies on
        return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    if noise is None:
        raise ValueError(f"step with eta={eta} > 0 needs `noise` shaped like x_t {tuple(x_t.shape)}, got None")
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    return a_prev**0.5 * x0 + (1 - a_prev - sigma**2) ** 0.5 * eps + sigma * noise


def invert_step(x_t, model_output, t, t_next, prediction="epsilon", alphas=None):
    """One DDIM inversion update x_t -> x_{t_next}, t_next > t: the deterministic update run backwards.

    t < 0 is the clean end (alphas_cumprod[0]), matching where sampling's final step lands. The caller
    passes the output predicted at t_next (see `invert`), the timestep at which sampling will later
    evaluate it. A v output is turned into eps with t_next's alpha, the noise level the model was told:
    that is the eps an eps-model would have predicted there, so both predictions invert alike.
    """
    eps, _ = split(x_t, model_output, _alpha(t_next, alphas), prediction)  # what an eps model would have said at t_next
    return step(x_t, eps, t, t_next, alphas=alphas)  # the eta=0 update is the same formula in either direction


def draw_timestep(gen, bias=0.0):
    """One training timestep [1]: uniform over 0..999 as in SD's training (bias 0), else with density
    proportional to (t / 1000) ** bias, which favours the noisiest steps, where a sampled video's layout
    and motion are decided and the eps loss weighs errors least."""
    if bias == 0:
        return torch.randint(0, NUM_TRAIN_TIMESTEPS, (1,), generator=gen)
    u = torch.rand(1, generator=gen, dtype=torch.float64)
    return (u ** (1 / (1 + bias)) * NUM_TRAIN_TIMESTEPS).long().clamp(max=NUM_TRAIN_TIMESTEPS - 1)


def _alphas(t, like, alphas=None):
    """alphas at the timesteps t [B], shaped [B, 1, 1, ...] to broadcast against `like`. Timesteps drawn on the
    host (training's, LCM's) are looked up there: B values reach the device, without waiting for it."""
    table = alphas_cumprod if alphas is None else alphas
    a = to_device(table[t], like.device) if t.device.type == "cpu" else to_device(table, t.device)[t]
    return a.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def add_noise(x0, noise, t, alphas=None):
    """The forward process q(x_t | x0) for training: t is a LongTensor [B], one timestep per sample.
    The same for either prediction; only the regression target differs (`target`)."""
    a = _alphas(t, x0, alphas)
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def target(x0, noise, t, prediction="epsilon", alphas=None):
    """What the model must output for add_noise(x0, noise, t): the noise, or v."""
    if prediction == "epsilon":
        return noise
    check_prediction(prediction)
    a = _alphas(t, x0, alphas)
    return a**0.5 * noise - (1 - a) ** 0.5 * x0


@torch.no_grad()
def sample(x_T, model_fn, num_inference_steps, eta=0.0, generator=None, prediction="epsilon", alphas=None):
    """Run the DDIM sampler from noise x_T to x0. model_fn(x, t) returns the model's output (the noise,
    or v: `prediction`); t is an int.

    With eta > 0 the step noise is drawn on the CPU with torch.randn from `generator` (None: the global
    RNG) and then moved to x's device, so that a seed means the same noise on every device.
    """
    ts = timesteps(num_inference_steps).tolist()
    x = x_T
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        noise = None
        if eta > 0:
            noise = to_device(torch.randn(x.shape, generator=generator, dtype=x.dtype), x.device)  # a CPU generator
        x = step(x, model_fn(x, t), t, t_prev, eta=eta, noise=noise, prediction=prediction, alphas=alphas)
    return x


@torch.no_grad()
def invert(x0, model_fn, num_inference_steps, prediction="epsilon", alphas=None):
    """DDIM inversion of a clean latent x0 to the x_T that `sample` maps back to x0 (Tune-A-Video style).

    Each step goes from the previous timestep (the clean end first) up to t, with model_fn evaluated at t
    on the current, less noisy latent: the mirror image of the sampler's step from t, so the round trip
    is exact when eps does not depend on x, and close when it depends on x mildly.
    """
    ts = timesteps(num_inference_steps).flip(0).tolist()  # ascending: 1, 21, ..., 981
    x = x0
    for i, t in enumerate(ts):
        t_from = ts[i - 1] if i > 0 else -1
        x = invert_step(x, model_fn(x, t), t_from, t, prediction, alphas)
    return x
