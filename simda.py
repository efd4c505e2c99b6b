"""SimDA, the library's front door: load Stable Diffusion (1.x or 2.x) with SimDA's adapters as a
`Pipeline`, sample videos with it, and save and load adapter files; load SD's x4 upscaler, the
second stage, the same way (`load_upscaler`, then `.upscale`).

    pipe = simda.load_pipeline("checkpoints/v1-5-pruned-emaonly.safetensors", adapters="out/adapters.safetensors")
    frames = pipe("a dog surfing", frames=16)   # uint8 [B, F, H, W, 3]

Sampling is DDIM (ddim.py) or DPM-Solver++ (dpm_solver.py) with classifier-free guidance: the conditional and the unconditional
(negative prompt) predictions come from one batched UNet call; or, for adapters distilled into a consistency
model (train.py --distill), the few-step consistency sampler (lcm.py), one call a step on the prompt alone. What
the UNet predicts, the noise or v (SD 2.x 768-v, the upscaler), is the pipeline's `prediction`; checkpoint.py infers it, the user
may override it. The starting noise is drawn on the CPU from a generator seeded with `seed` and
then moved, so the same seed on the same device gives the same video. `invert` is DDIM inversion,
for one-shot editing (the paper's Sec. 3.4). `animate` and `continue_video` go beyond the paper: frames
given as clean latents at timestep 0 (per-frame timesteps) beside the noisy ones, which adapters trained
with given frames (train.py --given-frames) carry on from: an image made to move, a clip made longer.
The models are vae.py, clip_text.py and unet.py (SimDA's modules: adapters.py); checkpoint.py reads the
weights.
"""
import json
import os
from dataclasses import asdict, dataclass, replace

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import clip_text
import ddim
import dpm_solver
import lcm
import unet as unet_module
import vae as vae_module
from adapters import SimDAConfig, adapter_state_dict, cast_adapters
from checkpoint import CheckpointError, key_problems, load_models, save_safetensors
from runtime import Progress
from vae import LATENT_SCALE
from video import DEFAULT_FRAMES, DEFAULT_SIZE, check_shape, to_frames

DEFAULT_CHECKPOINT = os.path.join("checkpoints", "v1-5-pruned-emaonly.safetensors")
DEFAULT_SR_CHECKPOINT = os.path.join("checkpoints", "x4-upscaler-ema.safetensors")
# The built-in demo (docs/demo.md): a tiny SD trained from scratch on the shapes world of
# shapes.py (train_image.py), and SimDA adapters trained on it (train.py --data shapes). sample.py
# falls back to them when no SD weights are found.
MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
DEMO_CHECKPOINT = os.path.join(MODELS_DIR, "sd-shapes.safetensors")
DEMO_ADAPTERS = os.path.join(MODELS_DIR, "simda-shapes.safetensors")
DEMO_LCM_ADAPTERS = os.path.join(MODELS_DIR, "simda-shapes-lcm.safetensors")  # them distilled (train.py --distill)
# ... and its second stage: a tiny x4 upscaler (train_image.py --upscaler), its video adapters (train.py
# --stage sr --data shapes); sample.py --upscale falls back to them too
DEMO_UPSCALER = os.path.join(MODELS_DIR, "sr-shapes.safetensors")
DEMO_SR_ADAPTERS = os.path.join(MODELS_DIR, "simda-sr-shapes.safetensors")
UPSCALE = 4  # the upscaler's factor: [B, 3, F, H, W] -> [B, 3, F, 4H, 4W]
MAX_NOISE_LEVEL = 350  # the x4 upscaler was trained with low-res noise levels 0..349 (x4-upscaling.yaml)
# the samplers: DDIM (ddim.py; the paper's, and the one that inverts) and DPM-Solver++(2M) (dpm_solver.py),
# which reaches DDIM's quality in fewer steps; both call the UNet once a step (on the guided batch); and the
# consistency sampler (lcm.py) of distilled adapters, one call a step on the prompt alone
SAMPLERS = {"ddim": ddim.timesteps, "dpm++": dpm_solver.timesteps, "lcm": lcm.timesteps}
LCM_STEPS = 4  # the steps of distilled adapters, for SD and the demo (docs/demo.md)
# What the command lines' sampler and step counts default to, per model: (sampler, {sampler: steps}). For SD
# the published practice, not measured here: DPM-Solver++(2M) at 25 steps (DDIM: 50); for SD's x4 upscaler
# diffusers' 75 DDIM steps. For the demo's stage one, the fewest steps that matched 50 DDIM steps (docs/demo.md);
# for its upscaler the 20 DDIM steps of docs/second-stage.md's tables. The upscalers' DPM-Solver++ counts are
# not measured. One-shot editing always runs DDIM (it replays a DDIM inversion).
SD_SAMPLING = ("dpm++", {"dpm++": 25, "ddim": 50})
DEMO_SAMPLING = ("dpm++", {"dpm++": 15, "ddim": 25})
SR_SAMPLING = ("ddim", {"ddim": 75, "dpm++": 25})
DEMO_SR_SAMPLING = ("ddim", {"ddim": 20, "dpm++": 10})
SR_GUIDANCE = 9.0  # diffusers' StableDiffusionUpscalePipeline's
DEMO_SR_GUIDANCE = 1.0  # the demo upscaler is best without guidance (docs/second-stage.md)


def check_sampling(sampler, steps, eta=0.0):
    """A sampler name, a step count it can take and an eta it allows, or a ValueError that says why not."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    SAMPLERS[sampler](steps)  # raises on a step count the sampler cannot take
    if eta and sampler != "ddim":
        raise ValueError(f"eta {eta} adds DDIM's step noise: {sampler} is deterministic (use the ddim sampler)")


@dataclass
class Pipeline:
    tokenizer: clip_text.Tokenizer
    text_encoder: clip_text.CLIPTextEncoder
    vae: vae_module.AutoencoderKL
    unet: unet_module.UNet
    family: str = "SD 1.x"  # the name of checkpoint.SD1, SD2 or X4
    prediction: str = "epsilon"  # what the UNet outputs: "epsilon" (the noise) or "v"
    prediction_source: str = ""  # why we think so (checkpoint.choose_prediction)
    latent_scale: float = LATENT_SCALE  # the diffusion model sees VAE latents times this
    alphas: torch.Tensor = None  # the noise schedule's alphas_cumprod; None: SD's (ddim.alphas_cumprod)
    given_frames: int = 0  # the most first frames the adapters were trained to be given (train.py --given-frames)
    distilled: dict = None  # distilled adapters (train.py --distill): how; None: not distilled, no lcm sampling

    @property
    def vae_dtype(self):
        return next(self.vae.parameters()).dtype

    @property
    def is_upscaler(self):
        return self.unet.config.num_classes > 0

    @property
    def device(self):
        return next(self.unet.parameters()).device

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype

    @torch.no_grad()
    def text_context(self, prompts):
        """Prompts -> the text encoder's states [B, 77, D], the UNet's cross-attention context."""
        return self.text_encoder(self.tokenizer(prompts).to(self.device))

    def guided_context(self, prompts, negative, guidance):
        """The text context of `prompts`, with the negative prompt's before it ([uncond; cond]) when guided."""
        context = self.text_context(prompts)
        if guidance == 1:
            return context
        return torch.cat([self.text_context([negative] * len(prompts)), context])

    def guided_model(self, context, guidance, low_res=None, noise_level=None, unet=None):
        """The UNet's output (eps or v) as a function of (x, t), with classifier-free guidance: `context`
        is [uncond; cond] ([2B, 77, D]) when guidance != 1, else just cond. Guiding v is guiding eps:
        for a given x_t, v is affine in eps and the guidance weights sum to 1. Latents stay float32;
        the UNet runs in the pipeline's dtype. The upscaler's UNet also takes the noised low-res video
        `low_res` [B, 3, F, h, w], concatenated to the latents' channels, and its `noise_level` [B]. `unet`: what
        runs in the UNet's place (its arguments), e.g. long_video's windows; `context` may be per frame [B, F, 77, D]."""
        guided, unet = guidance != 1, unet or self.unet

        def model(x, t):
            x_in = x if low_res is None else torch.cat([x, low_res], dim=1)
            x_in = torch.cat([x_in, x_in]) if guided else x_in
            if not torch.is_tensor(t):  # a tensor, filled on the device: torch.compile would take an int for a constant
                t = torch.full((x_in.shape[0],), t, dtype=torch.long, device=x_in.device)  # and recompile every step
            y = None if noise_level is None else torch.cat([noise_level, noise_level]) if guided else noise_level
            out = unet(x_in.to(self.dtype), t, context, y).float()
            if not guided:
                return out
            uncond, cond = out.chunk(2)
            return uncond + guidance * (cond - uncond)
        return model

    @torch.no_grad()
    def denoise(self, x, context, steps=50, guidance=7.5, eta=0.0, generator=None, progress=True, low_res=None,
                noise_level=None, sampler="ddim", given=None, unet=None):
        """`sampler` (DDIM, ddim.sample, or DPM-Solver++, dpm_solver.sample) from x (scaled latents
        [B, 4, F, h, w] at the first timestep) to clean latents (float32), with a progress line. With eta > 0
        (DDIM only) the step noise comes from `generator`. `low_res`, `noise_level`: the upscaler's
        conditioning (see `guided_model`). `given`: clean latents [B, 4, k, h, w] of the first k frames, which
        stay exactly what they are (see `with_given`). `unet`: in the UNet's place (see `guided_model`)."""
        check_sampling(sampler, steps, eta)
        if sampler == "lcm" and not self.distilled:
            raise ValueError("these adapters were not distilled (train.py --distill): sample them with ddim or dpm++, "
                             "not lcm")
        if sampler == "lcm" and guidance != 1:
            raise ValueError(f"lcm samples with the guidance distilled into the adapters: one UNet call a step, "
                             f"guidance 1, not {guidance}")
        model = self.guided_model(context, guidance, low_res, noise_level, unet)
        model = with_progress(model if given is None else with_given(model, given),
                              Progress("sampling" if low_res is None else "upscaling", steps, enabled=progress))
        if sampler == "dpm++":
            x = dpm_solver.sample(x.float(), model, steps, prediction=self.prediction, alphas=self.alphas)
        elif sampler == "lcm":
            x = lcm.sample(x.float(), model, steps, generator, self.distilled["skip"], self.prediction, self.alphas,
                           phased=bool(self.distilled.get("phases")))
        else:
            x = ddim.sample(x.float(), model, steps, eta=eta, generator=generator, prediction=self.prediction,
                            alphas=self.alphas)
        if given is not None:  # what the sampler made of the given frames was never used: put them back
            x[:, :, :given.shape[2]] = given
        return x

    @torch.no_grad()
    def invert(self, latents, prompt, steps=50, progress=True):
        """DDIM inversion of clean scaled latents [1, 4, F, h, w] under `prompt`, without guidance, to the
        noisy latents that `denoise` with the same prompt, steps, guidance 1 and eta 0 maps back to them."""
        model = with_progress(self.guided_model(self.text_context([prompt]), guidance=1),
                              Progress("inverting", steps, enabled=progress))
        return ddim.invert(latents.float(), model, steps, prediction=self.prediction, alphas=self.alphas)

    @torch.no_grad()
    def encode(self, video):
        """Videos [B, 3, F, H, W] in [-1, 1] -> scaled latents [B, 4, F, h, w] (the posterior mean), float32."""
        mean, _ = self.vae.encode_video(video.to(self.device, self.vae_dtype))
        return mean.float() * self.latent_scale

    @torch.no_grad()
    def decode_pixels(self, latents):
        """Scaled latents [B, 4, F, h, w] -> videos [B, 3, F, H, W], float32, [-1, 1] before clamping."""
        return self.vae.decode_video((latents / self.latent_scale).to(self.vae_dtype)).float()

    def decode(self, latents):
        """Scaled latents [B, 4, F, h, w] -> uint8 frames [B, F, H, W, 3] on the CPU."""
        return to_frames(self.decode_pixels(latents))

    def start_latents(self, shape, generator, latents=None, what=""):
        """The starting noise [B, 4, F, h, w] on the pipeline's device: `latents` if given (checked against
        `shape`), else drawn on the CPU from `generator`."""
        if latents is None:
            return torch.randn(shape, generator=generator).to(self.device)
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {tuple(shape)} for {what}")
        return latents.float().contiguous().to(self.device)

    def __call__(self, prompts, frames=DEFAULT_FRAMES, height=DEFAULT_SIZE, width=DEFAULT_SIZE, steps=50, guidance=7.5,
                 negative="", eta=0.0, seed=0, latents=None, progress=True, sampler="ddim"):
        """Sample one video per prompt -> uint8 tensor [B, F, H, W, 3] with `steps` of `sampler` ("ddim", "dpm++", or
        "lcm" for distilled adapters, which runs the guidance distilled into them: `guidance` is not used).
        `latents`: start from these scaled latents [B, 4, F, h, w] (e.g. DDIM-inverted ones, which only DDIM
        replays) instead of seeded noise."""
        if self.is_upscaler:
            raise ValueError(f"this pipeline is {self.family}: call .upscale(low_res, prompts), not the pipeline")
        prompts = as_prompts(prompts)
        factor = self.vae.config.downsample_factor
        check_shape(frames, height, width, factor)
        shape = (len(prompts), self.vae.config.latent_channels, frames, height // factor, width // factor)
        generator = torch.Generator().manual_seed(seed)
        x = self.start_latents(shape, generator, latents, f"{len(prompts)} prompt(s), {frames} frames of {width}x{height}")
        guidance = 1 if sampler == "lcm" else guidance  # distilled into the adapters
        context = self.guided_context(prompts, negative, guidance)
        return self.decode(self.denoise(x, context, steps, guidance, eta, generator, progress, sampler=sampler))

    @torch.no_grad()
    def extend(self, given, prompts, frames, steps=50, guidance=7.5, negative="", eta=0.0, seed=0, progress=True,
               sampler="ddim"):
        """Clean scaled latents `given` [B, 4, k, h, w] (B = 1: for every prompt) of a video's first k frames ->
        its latents [B, 4, frames, h, w], the first k exactly `given`, the rest sampled (one video per prompt).
        The starting noise is text-to-video's for the same seed and shape."""
        if self.is_upscaler:
            raise ValueError(f"this pipeline is {self.family}: it upscales, it does not extend videos")
        prompts = as_prompts(prompts)
        if given.dim() != 5 or given.shape[0] not in (1, len(prompts)) or \
                given.shape[1] != self.vae.config.latent_channels:
            raise ValueError(f"given latents must be [B, {self.vae.config.latent_channels}, k, h, w] with B = 1 or "
                             f"{len(prompts)} prompt(s), got shape {tuple(given.shape)}")
        if not 0 < given.shape[2] < frames:
            raise ValueError(f"{given.shape[2]} given frame(s) leave none of {frames} to sample: ask for more frames")
        given = given.float().to(self.device).expand(len(prompts), -1, -1, -1, -1)
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn((len(prompts), given.shape[1], frames, *given.shape[3:]), generator=generator).to(self.device)
        guidance = 1 if sampler == "lcm" else guidance  # distilled into the adapters
        context = self.guided_context(prompts, negative, guidance)
        return self.denoise(x, context, steps, guidance, eta, generator, progress, sampler=sampler, given=given)

    def animate(self, image, prompts, frames=DEFAULT_FRAMES, steps=50, guidance=7.5, negative="", eta=0.0, seed=0,
                progress=True, sampler="ddim"):
        """Image-to-video: images [B, 3, H, W] (or one [3, H, W], for every prompt) in [-1, 1] -> uint8 [B, frames,
        H, W, 3] whose frame 0 is the image's VAE round trip (its latents are kept exactly) and whose other
        frames are sampled after it. Adapters trained with given frames (`given_frames` > 0) carry on from it;
        others only see it put in place (docs/demo.md measures both)."""
        image = image[None] if image.dim() == 3 else image
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be [3, H, W] or [B, 3, H, W] in [-1, 1], got shape {tuple(image.shape)}")
        check_shape(frames, image.shape[2], image.shape[3], self.vae.config.downsample_factor)
        given = self.encode(image[:, :, None])  # one frame: [B, 4, 1, h, w]
        return self.decode(self.extend(given, prompts, frames, steps, guidance, negative, eta, seed, progress, sampler))

    def continue_video(self, clip, prompts, frames, given=None, steps=50, guidance=7.5, negative="", eta=0.0, seed=0,
                       progress=True, sampler="ddim"):
        """Continuation: clips [B, 3, F, H, W] (or one [3, F, H, W]) in [-1, 1] -> their next `frames` frames, uint8
        [B, frames, H, W, 3], sampled after the clip's last `given` frames (default: the adapters' given_frames).
        Called again on its output it goes on: a video of any length at the memory of one window."""
        clip = clip[None] if clip.dim() == 4 else clip
        given = self.given_frames if given is None else given
        if not given:
            raise ValueError("these adapters were not trained with given frames (train.py --given-frames): they "
                             "cannot continue a clip (pass given=K to try anyway)")
        if clip.dim() != 5 or clip.shape[1] != 3:
            raise ValueError(f"clip must be [3, F, H, W] or [B, 3, F, H, W] in [-1, 1], got shape {tuple(clip.shape)}")
        if clip.shape[2] < given:
            raise ValueError(f"the clip has {clip.shape[2]} frame(s), fewer than the {given} it is continued from")
        check_shape(given + frames, clip.shape[3], clip.shape[4], self.vae.config.downsample_factor)
        latents = self.extend(self.encode(clip[:, :, -given:]), prompts, given + frames, steps, guidance, negative, eta,
                              seed, progress, sampler)
        return self.decode(latents[:, :, given:])

    @torch.no_grad()
    def upscale(self, low_res, prompts, steps=75, guidance=9.0, noise_level=20, negative="", eta=0.0, seed=0,
                latents=None, noise=None, progress=True, sampler="ddim"):
        """The x4 upscaler (a pipeline from `load_upscaler`): videos `low_res` [B, 3, F, H, W] in [-1, 1], one
        prompt each -> [B, 3, F, 4H, 4W] float32 in [-1, 1] before clamping (the defaults are diffusers'
        StableDiffusionUpscalePipeline's). The low-res video is noised to `noise_level` (0..349) on the
        upscaler's schedule (the noise `noise`, else seeded), and the level is the UNet's class label;
        the latents start from `latents` [B, 4, F, H, W], else seeded noise drawn after it."""
        if not self.is_upscaler:
            raise ValueError(f"this pipeline is {self.family}, not an upscaler: load one with simda.load_upscaler")
        prompts = as_prompts(prompts)
        if low_res.dim() != 5 or tuple(low_res.shape[:2]) != (len(prompts), 3):
            raise ValueError(f"low_res must be videos [B, 3, F, H, W] with B = {len(prompts)} prompt(s), "
                             f"got shape {tuple(low_res.shape)}")
        if not 0 <= noise_level < MAX_NOISE_LEVEL:
            raise ValueError(f"noise_level must be in 0..{MAX_NOISE_LEVEL - 1}, got {noise_level}")
        generator = torch.Generator().manual_seed(seed)
        if noise is None:
            noise = torch.randn(low_res.shape, generator=generator)
        elif tuple(noise.shape) != tuple(low_res.shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected the low-res videos' {tuple(low_res.shape)}")
        level = torch.full((len(prompts),), noise_level, dtype=torch.long)
        augmented = ddim.add_noise(low_res.float().cpu(), noise.float().cpu(), level, self.alphas).to(self.device)
        shape = (len(prompts), self.vae.config.latent_channels, *low_res.shape[2:])  # latents at the low-res size
        x = self.start_latents(shape, generator, latents, f"low-res videos of shape {tuple(low_res.shape)}")
        context = self.guided_context(prompts, negative, guidance)
        clean = self.denoise(x, context, steps, guidance, eta, generator, progress, augmented, level.to(self.device),
                             sampler)
        return self.decode_pixels(clean)


def as_prompts(prompts):
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("a pipeline call needs at least one prompt")
    return prompts


def with_progress(model, progress):
    """`model` that also ticks a progress line: one model call per DDIM step."""
    def model_with_progress(x, t):
        out = model(x, t)
        progress.tick()
        return out
    return model_with_progress


def with_given(model, given):
    """`model` (x, t) -> output, for which the first k frames of x are the clean latents `given` [B, 4, k, h, w]
    at timestep 0 (per-frame timesteps [1, F]), whatever the sampler holds there: as the adapters were trained
    (train.py --given-frames). The samplers' updates are elementwise, so what they make of those frames
    never reaches the others."""
    k = given.shape[2]

    def model_with_given(x, t):
        steps = torch.full((1, x.shape[2]), t, dtype=torch.long, device=x.device)
        steps[:, :k] = 0
        return model(torch.cat([given, x[:, :, k:]], dim=2), steps)
    return model_with_given


def default_checkpoint(upscaler=False):
    """The weights to use when none are named: $SIMDA_CKPT if set, else
    checkpoints/v1-5-pruned-emaonly.safetensors (relative to the working directory); with `upscaler`,
    $SIMDA_SR_CKPT, else checkpoints/x4-upscaler-ema.safetensors."""
    var, default, what, download = (
        ("SIMDA_SR_CKPT", DEFAULT_SR_CHECKPOINT, "SD x4 upscaler checkpoint", "the x4 upscaler's single-file "
         "checkpoint x4-upscaler-ema.safetensors (about 3.5 GB) from the stabilityai/stable-diffusion-x4-upscaler "
         "model page") if upscaler else
        ("SIMDA_CKPT", DEFAULT_CHECKPOINT, "Stable Diffusion checkpoint", "the SD v1.5 single-file checkpoint "
         "v1-5-pruned-emaonly.safetensors (about 4 GB) from the Stable Diffusion v1.5 model page"))
    flag = "--sr-ckpt" if upscaler else "--ckpt"
    env = os.environ.get(var)
    path = env or default
    if os.path.exists(path):
        return path
    where = f"{var} points to {env}, which does not exist" if env else \
        f"{var} is not set and {os.path.abspath(default)} does not exist"
    raise CheckpointError(f"no {what} found: {where}. Download {download} on the Hugging Face Hub, and put it in "
                          f"checkpoints/ (or set {var}, or pass {flag}, to its path).")


def load_pipeline(path, device="cpu", dtype=torch.float32, adapters=None, simda_config=None, prediction=None,
                  adapter_dtype=None, lora_rank=0):
    """Load an SD 1.x or 2.x checkpoint (single file or diffusers folder; the family is told by the
    weights) as a Pipeline of frozen eval-mode modules. `adapters`: a SimDA adapter file, whose config
    and weights the UNet takes; or `simda_config`: fresh adapters (for training); neither: the plain
    per-frame SD UNet. `prediction`: "epsilon" or "v" overrides what the checkpoint suggests (None),
    else the adapters' metadata, which records what they were trained with; the pipeline's
    `.prediction` and `.prediction_source` say which is used and why. The text encoder and the UNet are
    held in `dtype`, the adapters in `adapter_dtype` (None: `dtype`; training: float32 under autocast), the
    VAE in float32 on every device (SD's VAE overflows to NaN in float16 at larger sizes). `lora_rank` > 0: a
    fresh LoRA of that rank beside the frozen SD as well as the `adapters` (distillation's student)."""
    return _load(path, device, dtype, adapters, simda_config, prediction, False, adapter_dtype, lora_rank)


def load_upscaler(path, device="cpu", dtype=torch.float32, adapters=None, simda_config=None, adapter_dtype=None):
    """Load SD's x4 upscaler (x4-upscaler-ema.safetensors, or the stable-diffusion-x4-upscaler diffusers
    folder) as a Pipeline whose `.upscale` runs it; with `adapters` or `simda_config` as load_pipeline's,
    the video upscaler (SimDA's adapters on the upscaler's UNet). The VAE decodes 2 frames at a time
    (1024x1024 frames are large), in float32 as load_pipeline's."""
    pipe = _load(path, device, dtype, adapters, simda_config, None, True, adapter_dtype)
    pipe.vae.chunk_size = 2
    return pipe


def _load(path, device, dtype, adapters, simda_config, prediction, upscaler, adapter_dtype=None, lora_rank=0):
    adapter_weights, meta = None, {}
    if adapters is not None:
        adapter_weights, meta = read_adapters(os.fspath(adapters))
        simda_config = SimDAConfig(**meta["simda_config"])
        if lora_rank and simda_config.lora_rank:
            raise CheckpointError(f"{adapters} holds a LoRA already (rank {simda_config.lora_rank}): no second one")
        simda_config = replace(simda_config, lora_rank=lora_rank or simda_config.lora_rank)
    trained = prediction is None and meta.get("prediction") is not None
    *models, family, prediction, why = load_models(path, device, dtype, simda_config,
                                                   meta["prediction"] if trained else prediction, upscaler,
                                                   vae_dtype=torch.float32)
    if trained:
        why = f"the adapters were trained so ({os.fspath(adapters)})"
    pipe = Pipeline(*models, family.name, prediction, why, family.latent_scale, ddim.make_alphas_cumprod(*family.betas),
                    int(meta.get("given_frames", 0)), meta.get("distilled"))
    if adapter_dtype is not None:  # before their weights are read in: float32 weights stay exact
        cast_adapters(pipe.unet, adapter_dtype)
    if adapter_weights is not None and meta.get("family", pipe.family) != pipe.family:
        trained_on = f" ({meta['checkpoint']})" if meta.get("checkpoint") else ""
        raise CheckpointError(f"{adapters} holds adapters trained on {meta['family']}{trained_on}, "
                              f"but {path} is {pipe.family}: train adapters for this checkpoint")
    if adapter_weights is not None:
        if lora_rank:  # the file's adapters, and the fresh LoRA (zero at first: the file's model unchanged)
            adapter_weights = {**{k: v for k, v in adapter_state_dict(pipe.unet).items() if "lora." in k}, **adapter_weights}
        load_adapters(pipe.unet, adapter_weights, os.fspath(adapters))
    return pipe


# ---------------------------------------------------------------------------- adapter files

def save_adapters(unet, path, **metadata):
    """Write the adapters (and the SimDA config, plus any metadata such as the prompt, frames, size
    and base checkpoint they were tuned with) to a safetensors file, atomically."""
    if unet.simda_config is None:
        raise ValueError("this UNet has no adapters to save: build it with a SimDAConfig")
    meta = {"simda_config": json.dumps(asdict(unet.simda_config)), **{k: json.dumps(v) for k, v in metadata.items()}}
    save_safetensors(adapter_state_dict(unet), path, metadata=meta)


def read_adapters(path):
    """(weights, metadata) of an adapter file; metadata values are decoded from JSON."""
    if not os.path.exists(path):
        raise CheckpointError(f"adapter file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        weights = load_file(path)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable adapter file (.safetensors): {type(e).__name__}: {e}") from e
    if "simda_config" not in meta:
        raise CheckpointError(f"{path} is not a SimDA adapter file: it has no 'simda_config' metadata")
    return weights, {k: json.loads(v) for k, v in meta.items()}


def load_adapters(unet, weights, where="adapters"):
    """Copy adapter weights into a UNet built with the same SimDA config, after checking they fit."""
    expected = adapter_state_dict(unet)
    problems = key_problems(expected, weights)
    if problems:
        raise CheckpointError(f"{where} does not fit this UNet ({unet.config.model_channels} base channels, "
                              f"{len(expected)} adapter tensors): " + "; ".join(problems))
    unet.load_state_dict(weights, strict=False)  # the SD weights stay; the keys were checked above
