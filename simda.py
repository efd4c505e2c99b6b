"""SimDA: Simple Diffusion Adapter (Xing et al., 2023), and loading the Stable Diffusion weights it adapts.

A frozen SD-1.x text-to-image UNet becomes a text-to-video model by training small new modules only
(the paper's Sec. 3.3):
- SpatialAdapter: a bottleneck MLP after the self-attention (residual) and beside the feed-forward;
- TemporalAdapter: 1x1x1 down-projection, depth-wise 3x1x1 convolution over time, 1x1x1
  up-projection, residual; one before every SpatialTransformer;
- latent_shift: the self-attention of each frame also attends to a patch-wise temporal shift of
  earlier frames' tokens (latent-shift attention, LSA); it adds no parameters.
unet.py wires them in; this file defines them, saves and loads them on their own, and loads the
SD weights: the official single-file checkpoint or a diffusers folder (`load_pipeline`).

Our parameter names are the LDM keys, so loading SD is: strip a prefix (a diffusers folder is first
renamed by rule), infer the config from the tensor shapes, and load strictly, listing whatever does
not match. The adapters live under their own names (`attn_adapter`, `ffn_adapter`,
`temporal_adapter`) beside the SD ones, so SD keys load unchanged.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# unet.py imports this module too (for the adapters), so these imports are module-style and used
# only inside functions.
import clip_text
import unet as unet_module
import vae as vae_module

# Latent shift: the token at spatial position (i, j) of frame f is taken from frame
# f - SHIFT_TABLE[i % 4][j % 4] (the authors' code, rows i = 0..3). A frame earlier than its shift
# keeps its own token.
SHIFT_TABLE = ((4, 3, 2, 1), (3, 2, 1, 0), (2, 1, 0, 0), (1, 2, 3, 4))


@dataclass
class SimDAConfig:
    spatial_adapters: bool = True   # attention and FFN adapters in every transformer block
    temporal_adapters: bool = True  # a TemporalAdapter before every SpatialTransformer
    latent_shift: bool = True       # latent-shift attention in place of per-frame self-attention
    spatial_ratio: float = 0.25     # SpatialAdapter width d -> d/4
    temporal_ratio: float = 0.5     # TemporalAdapter width d -> d/2


def latent_shift(tokens, frames, height, width):
    """Patch-level temporal shift of the tokens [(b f), h*w, c] (row-major positions): every token
    is replaced by the same position's token SHIFT_TABLE[i % 4][j % 4] frames earlier."""
    bf, n, c = tokens.shape
    table = torch.tensor(SHIFT_TABLE, device=tokens.device)
    rows, cols = torch.arange(height, device=tokens.device) % 4, torch.arange(width, device=tokens.device) % 4
    shift = table[rows[:, None], cols[None, :]].reshape(n)
    frame = torch.arange(frames, device=tokens.device)[:, None]
    source = frame - shift[None]  # [f, n]: the frame each token is read from
    source = torch.where(source >= 0, source, frame)
    # (b f) n c -> b f n c
    tokens = tokens.reshape(bf // frames, frames, n, c)
    return tokens[:, source, torch.arange(n, device=tokens.device)[None]].reshape(bf, n, c)


class SpatialAdapter(nn.Module):
    """Linear d -> d*ratio, GELU, linear back; the up-projection starts at zero so that the adapted
    model starts as the image model. `skip`: add the input back (the adapter after attention); the
    FFN adapter runs beside the feed-forward and adds only its own output."""

    def __init__(self, dim, ratio=0.25, skip=True):
        super().__init__()
        self.skip = skip
        self.down = nn.Linear(dim, int(dim * ratio))
        self.up = nn.Linear(int(dim * ratio), dim)
        self.reset_parameters()

    def reset_parameters(self):
        self.down.reset_parameters()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        out = self.up(F.gelu(self.down(x)))
        return x + out if self.skip else out


class TemporalAdapter(nn.Module):
    """On [b, c, f, h, w]: 1x1x1 conv d -> d*ratio, depth-wise 3x1x1 conv over time, 1x1x1 conv back
    (zero-initialised), plus the input. No activation: the temporal conv stands in for it (Sec. 3.3)."""

    def __init__(self, dim, ratio=0.5):
        super().__init__()
        hidden = int(dim * ratio)
        self.down = nn.Conv3d(dim, hidden, 1)
        self.conv = nn.Conv3d(hidden, hidden, (3, 1, 1), padding=(1, 0, 0), groups=hidden)
        self.up = nn.Conv3d(hidden, dim, 1)
        self.reset_parameters()

    def reset_parameters(self):
        self.down.reset_parameters()
        self.conv.reset_parameters()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return x + self.up(self.conv(self.down(x)))


def adapter_state_dict(unet):
    """The adapters' weights only (keys as in the UNet's state dict)."""
    return {k: v for k, v in unet.state_dict().items() if is_adapter_key(k)}


def is_adapter_key(key):
    return any(f"{name}." in key for name in ("attn_adapter", "ffn_adapter", "temporal_adapter"))


def freeze_for_training(unet):
    """Freeze every SD weight; return the adapters' parameters, the only ones SimDA trains."""
    trainable = []
    for name, p in unet.named_parameters():
        p.requires_grad_(is_adapter_key(name))
        if p.requires_grad:
            trainable.append(p)
    if not trainable:
        raise ValueError("this UNet has no adapters to train: build it with a SimDAConfig")
    return trainable


def trainable_summary(unet):
    """One line for the start of training: at SD-1.5 size, 24,855,680 of 884,376,644 (2.81%)."""
    total = sum(p.numel() for p in unet.parameters())
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    return f"{trainable:,} trainable parameters of {total:,} in the UNet ({100 * trainable / total:.2f}%)"


def save_adapters(unet, path, **metadata):
    """Write the adapters (and the SimDA config, plus any metadata such as the prompt, frames, size
    and base checkpoint they were tuned with) to a safetensors file, atomically."""
    if unet.simda_config is None:
        raise ValueError("this UNet has no adapters to save: build it with a SimDAConfig")
    meta = {"simda_config": json.dumps(asdict(unet.simda_config)), **{k: json.dumps(v) for k, v in metadata.items()}}
    tmp = f"{path}.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(unet).items()}, tmp, metadata=meta)
    os.replace(tmp, path)


def read_adapters(path):
    """(weights, metadata) of an adapter file; metadata values are decoded from JSON."""
    if not os.path.exists(path):
        raise CheckpointError(f"adapter file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        weights = load_file(path)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable adapter file (.safetensors): {type(e).__name__}: {e}") from None
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


UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
# What real SD-1.x files hold besides the three models, ignored by rule: the EMA copy of the UNet,
# the DDPM schedule buffers of the training code (ddim.py recomputes the schedule) and CLIP's
# position_ids buffer.
EMA_PREFIX = "model_ema."
DDPM_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"}
# A diffusers folder: the file names each component may be stored under, preferred first.
DIFFUSERS_FILES = {
    "unet": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin"],
    "vae": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin"],
    "text_encoder": ["model.safetensors", "model.fp16.safetensors", "pytorch_model.bin"],
}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, of another model family, or does not fit the model."""


@dataclass
class Pipeline:
    tokenizer: clip_text.Tokenizer
    text_encoder: clip_text.CLIPTextEncoder
    vae: vae_module.AutoencoderKL
    unet: unet_module.UNet

    def __call__(self, prompts, **options):
        """Sample videos: uint8 [B, F, H, W, 3]; the options are sample.generate's (frames, height,
        width, steps, guidance, negative, eta, seed, latents, progress)."""
        import sample  # sample.py imports this module: import it only when called
        return sample.generate(self, prompts, **options)


DEFAULT_CHECKPOINT = os.path.join("checkpoints", "v1-5-pruned-emaonly.safetensors")
# The built-in demo (README: "The demo model"): a tiny SD trained from scratch on the shapes world of
# shapes.py (train_image.py), and SimDA adapters trained on it (train.py --data shapes). sample.py
# falls back to them when no SD weights are found.
MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
DEMO_CHECKPOINT = os.path.join(MODELS_DIR, "sd-shapes.safetensors")
DEMO_ADAPTERS = os.path.join(MODELS_DIR, "simda-shapes.safetensors")


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


def read_state_dict(path):
    """A flat {key: tensor} dict from a .safetensors file or a (weights-only) torch pickle."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (expected a .safetensors file or a "
                              f"torch state dict): {type(e).__name__}: {e}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors (found {type(sd).__name__})")
    return sd


def check_family(keys, where):
    """Name the model families we recognise but do not support, instead of failing on key lists."""
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise CheckpointError(f"{where} is an SDXL checkpoint; SDXL checkpoints are not supported (SD 1.x only)")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise CheckpointError(f"{where} is an SD 2.x checkpoint (OpenCLIP text encoder); "
                              "SD 2.x checkpoints are not supported yet (SD 1.x only)")


def split_ldm(sd, where):
    """Split a single-file LDM state dict into (unet, vae, text encoder) dicts without their prefixes."""
    check_family(sd.keys(), where)
    parts = {UNET_PREFIX: {}, VAE_PREFIX: {}, TEXT_PREFIX: {}}
    unexpected = []
    for key, value in sd.items():
        prefix = next((p for p in parts if key.startswith(p)), None)
        if prefix is not None and not key.endswith("position_ids"):
            parts[prefix][key[len(prefix):]] = value
        elif not (prefix or key.startswith(EMA_PREFIX) or key in DDPM_BUFFERS):
            unexpected.append(key)
    if not parts[UNET_PREFIX]:
        raise CheckpointError(f"{where} holds no '{UNET_PREFIX}*' weights: not a Stable Diffusion 1.x "
                              f"checkpoint (first keys: {sorted(sd)[:5]})")
    if unexpected:
        raise CheckpointError(f"{where}: {describe('unexpected', unexpected)}")
    return parts[UNET_PREFIX], parts[VAE_PREFIX], parts[TEXT_PREFIX]


def describe(what, keys):
    keys = sorted(keys)
    more = f" ... and {len(keys) - 10} more" if len(keys) > 10 else ""
    return f"{len(keys)} {what} keys: {', '.join(keys[:10])}{more}"


def key_problems(expected, given):
    """What keeps the tensors `given` from loading into a model whose state dict is `expected`."""
    problems = []
    if missing := expected.keys() - given.keys():
        problems.append(describe("missing", missing))
    if unexpected := given.keys() - expected.keys():
        problems.append(describe("unexpected", unexpected))
    for key in sorted(expected.keys() & given.keys()):
        if expected[key].shape != given[key].shape:
            problems.append(f"shape mismatch at {key}: expected {tuple(expected[key].shape)}, found {tuple(given[key].shape)}")
    return problems[:12]


def build(module, model_class, sd, name, where, device, dtype, **options):
    """Infer the config from the shapes (module.config_from_state_dict), allocate the model on
    `device` in `dtype` without a random init, and copy the weights in. SimDA's adapters, which no
    SD checkpoint holds, get their fresh initialisation."""
    try:
        config = module.config_from_state_dict(sd)
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot infer the {name} configuration from the weights "
                              f"(missing or odd key: {e})") from None
    with torch.device("meta"):
        model = model_class(config, **options).to(dtype)
    model.to_empty(device=device)
    expected = {k: v for k, v in model.state_dict().items() if not is_adapter_key(k)}
    if problems := key_problems(expected, sd):
        raise CheckpointError(f"{where}: {name} weights do not fit the model: " + "; ".join(problems))
    model.load_state_dict(sd, strict=False)  # strict about the SD keys (checked above); adapters are new
    for m in model.modules():
        if isinstance(m, (SpatialAdapter, TemporalAdapter)):
            m.reset_parameters()
    return model


def read_diffusers_folder(folder):
    parts = {}
    for part, names in DIFFUSERS_FILES.items():
        found = [os.path.join(folder, part, n) for n in names if os.path.exists(os.path.join(folder, part, n))]
        if not found:
            raise CheckpointError(f"{folder} looks like a diffusers folder but has no {part}/ weights "
                                  f"(looked for {', '.join(names)})")
        parts[part] = read_state_dict(found[0])
    if os.path.isdir(os.path.join(folder, "text_encoder_2")):
        raise CheckpointError(f"{folder} is an SDXL folder; SDXL checkpoints are not supported (SD 1.x only)")
    return (unet_module.from_diffusers(parts["unet"]), vae_module.from_diffusers(parts["vae"]),
            clip_text.from_diffusers(parts["text_encoder"]))


def load_pipeline(path, device="cpu", dtype=torch.float32, adapters=None, simda_config=None):
    """Load an SD-1.x checkpoint (single file or diffusers folder) as a Pipeline of frozen eval-mode
    modules. `adapters`: a SimDA adapter file, whose config and weights the UNet takes; or
    `simda_config`: fresh adapters (for training); neither: the plain per-frame SD UNet."""
    path = os.fspath(path)
    adapter_weights = None
    if adapters is not None:
        adapter_weights, meta = read_adapters(os.fspath(adapters))
        simda_config = SimDAConfig(**meta["simda_config"])
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    vocab_dir = None
    if os.path.isdir(path):
        unet_sd, vae_sd, text_sd = read_diffusers_folder(path)
        if os.path.exists(os.path.join(path, "tokenizer", "vocab.json")):
            vocab_dir = os.path.join(path, "tokenizer")
    else:
        unet_sd, vae_sd, text_sd = split_ldm(read_state_dict(path), path)
    for name, sd in (("VAE", vae_sd), ("text encoder", text_sd)):
        if not sd:
            raise CheckpointError(f"{path} holds no {name} weights")
    unet = build(unet_module, unet_module.UNet, unet_sd, "UNet", path, device, dtype, simda_config=simda_config)
    if adapter_weights is not None:
        load_adapters(unet, adapter_weights, os.fspath(adapters))
    if unet.config.context_dim == 1024:
        raise CheckpointError(f"{path} has a 1024-wide text context: SD 2.x checkpoints are not supported yet (SD 1.x only)")
    text_encoder = build(clip_text, clip_text.CLIPTextEncoder, text_sd, "text encoder", path, device, dtype)
    if text_encoder.config.width != unet.config.context_dim:
        raise CheckpointError(f"{path}: the UNet attends to {unet.config.context_dim}-wide text states but the "
                              f"text encoder is {text_encoder.config.width} wide")
    vae = build(vae_module, vae_module.AutoencoderKL, vae_sd, "VAE", path, device, dtype)
    models = [m.eval().requires_grad_(False) for m in (text_encoder, vae, unet)]
    return Pipeline(clip_text.Tokenizer(vocab_dir), *models)
