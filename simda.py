"""Loading Stable Diffusion 1.x weights into the simda modules.

`load_pipeline(path)` reads either the official single-file checkpoint (CompVis/LDM key layout:
`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.text_model.*`) or a
diffusers folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`). Our parameter names are the LDM
keys, so loading is: strip a prefix (a diffusers folder is first renamed by rule), infer the config
from the tensor shapes, and load strictly, listing whatever does not match.
"""
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

import clip_text
import unet as unet_module
import vae as vae_module

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


def load_strict(model, sd, name):
    """load_state_dict(strict=True), after a check that lists what does not fit."""
    expected = model.state_dict()
    problems = []
    missing = expected.keys() - sd.keys()
    unexpected = sd.keys() - expected.keys()
    if missing:
        problems.append(describe("missing", missing))
    if unexpected:
        problems.append(describe("unexpected", unexpected))
    for key in sorted(expected.keys() & sd.keys()):
        if expected[key].shape != sd[key].shape:
            problems.append(f"shape mismatch at {key}: expected {tuple(expected[key].shape)}, found {tuple(sd[key].shape)}")
    if problems:
        raise CheckpointError(f"{name} weights do not fit the model: " + "; ".join(problems[:12]))
    model.load_state_dict(sd, strict=True)
    return model


def build(module, model_class, sd, name, where, device, dtype):
    """Infer the config from the shapes (module.config_from_state_dict), allocate the model on
    `device` in `dtype` without a random init, and copy the weights in."""
    try:
        config = module.config_from_state_dict(sd)
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot infer the {name} configuration from the weights "
                              f"(missing or odd key: {e})") from None
    with torch.device("meta"):
        model = model_class(config).to(dtype)
    return load_strict(model.to_empty(device=device), sd, f"{where}: {name}")


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


def load_pipeline(path, device="cpu", dtype=torch.float32):
    """Load an SD-1.x checkpoint (single file or diffusers folder) as a Pipeline of eval-mode modules."""
    path = os.fspath(path)
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
    unet = build(unet_module, unet_module.UNet, unet_sd, "UNet", path, device, dtype)
    if unet.config.context_dim == 1024:
        raise CheckpointError(f"{path} has a 1024-wide text context: SD 2.x checkpoints are not supported yet (SD 1.x only)")
    text_encoder = build(clip_text, clip_text.CLIPTextEncoder, text_sd, "text encoder", path, device, dtype)
    if text_encoder.config.width != unet.config.context_dim:
        raise CheckpointError(f"{path}: the UNet attends to {unet.config.context_dim}-wide text states but the "
                              f"text encoder is {text_encoder.config.width} wide")
    vae = build(vae_module, vae_module.AutoencoderKL, vae_sd, "VAE", path, device, dtype)
    models = [m.eval().requires_grad_(False) for m in (text_encoder, vae, unet)]
    return Pipeline(clip_text.Tokenizer(vocab_dir), *models)
