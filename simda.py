"""SimDA, the library's front door: load Stable Diffusion (1.x or 2.x) with SimDA's adapters as a
`Pipeline`, sample videos with it, and save and load adapter files.

    pipe = simda.load_pipeline("checkpoints/v1-5-pruned-emaonly.safetensors", adapters="out/adapters.safetensors")
    frames = pipe("a dog surfing", frames=16)   # uint8 [B, F, H, W, 3]

Sampling is DDIM (ddim.py) with classifier-free guidance: the conditional and the unconditional
(negative prompt) predictions come from one batched UNet call. What the UNet predicts, the noise or
v (SD 2.x 768-v), is the pipeline's `prediction`; checkpoint.py infers it, the user may override it. The starting noise is drawn on
the CPU from a generator seeded with `seed` and then moved, so the same seed on the same device
gives the same video. `invert` is DDIM inversion, for one-shot editing (the paper's Sec. 3.4).
The models are vae.py, clip_text.py and unet.py (SimDA's modules: adapters.py); checkpoint.py
reads the weights.
"""
import json
import os
from dataclasses import asdict, dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import clip_text
import ddim
import unet as unet_module
import vae as vae_module
from adapters import SimDAConfig, adapter_state_dict
from checkpoint import CheckpointError, key_problems, load_models, save_safetensors
from runtime import Progress
from vae import LATENT_SCALE
from video import DEFAULT_FRAMES, DEFAULT_SIZE, check_shape, to_uint8

DEFAULT_CHECKPOINT = os.path.join("checkpoints", "v1-5-pruned-emaonly.safetensors")
# The built-in demo (README: "The demo model"): a tiny SD trained from scratch on the shapes world of
# shapes.py (train_image.py), and SimDA adapters trained on it (train.py --data shapes). sample.py
# falls back to them when no SD weights are found.
MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
DEMO_CHECKPOINT = os.path.join(MODELS_DIR, "sd-shapes.safetensors")
DEMO_ADAPTERS = os.path.join(MODELS_DIR, "simda-shapes.safetensors")


@dataclass
class Pipeline:
    tokenizer: clip_text.Tokenizer
    text_encoder: clip_text.CLIPTextEncoder
    vae: vae_module.AutoencoderKL
    unet: unet_module.UNet
    family: str = "SD 1.x"  # checkpoint.SD1 or SD2's name
    prediction: str = "epsilon"  # what the UNet outputs: "epsilon" (the noise) or "v"
    prediction_source: str = ""  # why we think so (checkpoint.choose_prediction)

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

    def guided_model(self, context, guidance):
        """The UNet's output (eps or v) as a function of (x, t), with classifier-free guidance: `context`
        is [uncond; cond] ([2B, 77, D]) when guidance != 1, else just cond. Guiding v is guiding eps:
        for a given x_t, v is affine in eps and the guidance weights sum to 1. Latents stay float32;
        the UNet runs in the pipeline's dtype."""
        guided = guidance != 1

        def model(x, t):
            x_in = torch.cat([x, x]) if guided else x
            out = self.unet(x_in.to(self.dtype), t, context).float()
            if not guided:
                return out
            uncond, cond = out.chunk(2)
            return uncond + guidance * (cond - uncond)
        return model

    @torch.no_grad()
    def denoise(self, x, context, steps=50, guidance=7.5, eta=0.0, generator=None, progress=True):
        """DDIM (ddim.sample) from x (scaled latents [B, 4, F, h, w] at the first timestep) to clean
        latents (float32), with a progress line. With eta > 0 the step noise comes from `generator`."""
        model = with_progress(self.guided_model(context, guidance), Progress("sampling", steps, enabled=progress))
        return ddim.sample(x.float(), model, steps, eta=eta, generator=generator, prediction=self.prediction)

    @torch.no_grad()
    def invert(self, latents, prompt, steps=50, progress=True):
        """DDIM inversion of clean scaled latents [1, 4, F, h, w] under `prompt`, without guidance, to the
        noisy latents that `denoise` with the same prompt, steps, guidance 1 and eta 0 maps back to them."""
        model = with_progress(self.guided_model(self.text_context([prompt]), guidance=1),
                              Progress("inverting", steps, enabled=progress))
        return ddim.invert(latents.float(), model, steps, prediction=self.prediction)

    @torch.no_grad()
    def encode(self, video):
        """Videos [B, 3, F, H, W] in [-1, 1] -> scaled latents [B, 4, F, h, w] (the posterior mean), float32."""
        mean, _ = self.vae.encode_video(video.to(self.device, self.dtype))
        return mean.float() * LATENT_SCALE

    @torch.no_grad()
    def decode(self, latents):
        """Scaled latents [B, 4, F, h, w] -> uint8 frames [B, F, H, W, 3] on the CPU."""
        videos = self.vae.decode_video((latents / LATENT_SCALE).to(self.dtype)).float()
        return to_uint8(videos).cpu().permute(0, 2, 3, 4, 1)  # b 3 f H W -> b f H W 3

    def __call__(self, prompts, frames=DEFAULT_FRAMES, height=DEFAULT_SIZE, width=DEFAULT_SIZE, steps=50, guidance=7.5,
                 negative="", eta=0.0, seed=0, latents=None, progress=True):
        """Sample one video per prompt -> uint8 tensor [B, F, H, W, 3]. `latents`: start from these scaled
        latents [B, 4, F, h, w] (e.g. DDIM-inverted ones) instead of seeded noise."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("a pipeline call needs at least one prompt")
        factor = self.vae.config.downsample_factor
        check_shape(frames, height, width, factor)
        shape = (len(prompts), self.vae.config.latent_channels, frames, height // factor, width // factor)
        generator = torch.Generator().manual_seed(seed)
        if latents is None:
            x = torch.randn(shape, generator=generator).to(self.device)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape} for {len(prompts)} "
                             f"prompt(s), {frames} frames of {width}x{height}")
        else:
            x = latents.float().contiguous().to(self.device)
        context = self.text_context(prompts)
        if guidance != 1:
            context = torch.cat([self.text_context([negative] * len(prompts)), context])
        return self.decode(self.denoise(x, context, steps, guidance, eta, generator, progress))


def with_progress(model, progress):
    """`model` that also ticks a progress line: one model call per DDIM step."""
    def model_with_progress(x, t):
        out = model(x, t)
        progress.tick()
        return out
    return model_with_progress


def default_checkpoint():
    """The SD weights to use when none are named: $SIMDA_CKPT if set, else
    checkpoints/v1-5-pruned-emaonly.safetensors (relative to the working directory)."""
    env = os.environ.get("SIMDA_CKPT")
    path = env or DEFAULT_CHECKPOINT
    if os.path.exists(path):
        return path
    where = f"SIMDA_CKPT points to {env}, which does not exist" if env else \
        f"SIMDA_CKPT is not set and {os.path.abspath(DEFAULT_CHECKPOINT)} does not exist"
    raise CheckpointError(
        f"no Stable Diffusion checkpoint found: {where}. Download the SD v1.5 single-file checkpoint "
        f"v1-5-pruned-emaonly.safetensors (about 4 GB) from the Stable Diffusion v1.5 model page on the "
        f"Hugging Face Hub, and put it in checkpoints/ (or set SIMDA_CKPT, or pass --ckpt, to its path).")


def load_pipeline(path, device="cpu", dtype=torch.float32, adapters=None, simda_config=None, prediction=None):
    """Load an SD 1.x or 2.x checkpoint (single file or diffusers folder; the family is told by the
    weights) as a Pipeline of frozen eval-mode modules. `adapters`: a SimDA adapter file, whose config
    and weights the UNet takes; or `simda_config`: fresh adapters (for training); neither: the plain
    per-frame SD UNet. `prediction`: "epsilon" or "v" overrides what the checkpoint suggests (None),
    else the adapters' metadata, which records what they were trained with; the pipeline's
    `.prediction` and `.prediction_source` say which is used and why."""
    adapter_weights, meta = None, {}
    if adapters is not None:
        adapter_weights, meta = read_adapters(os.fspath(adapters))
        simda_config = SimDAConfig(**meta["simda_config"])
    trained = prediction is None and meta.get("prediction") is not None
    pipe = Pipeline(*load_models(path, device, dtype, simda_config, meta["prediction"] if trained else prediction))
    if trained:
        pipe.prediction_source = f"the adapters were trained so ({os.fspath(adapters)})"
    if adapter_weights is not None and meta.get("family", pipe.family) != pipe.family:
        trained_on = f" ({meta['checkpoint']})" if meta.get("checkpoint") else ""
        raise CheckpointError(f"{adapters} holds adapters trained on {meta['family']}{trained_on}, "
                              f"but {path} is {pipe.family}: train adapters for this checkpoint")
    if adapter_weights is not None:
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
