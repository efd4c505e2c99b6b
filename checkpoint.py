"""Weight files: writing them atomically, reading them safely, and loading Stable Diffusion 1.x
checkpoints (the official single file, or a diffusers folder) into our models.

Our parameter names are the LDM keys, so loading SD is: strip a prefix (a diffusers folder is first
renamed by rule), infer each model's config from the tensor shapes, and load strictly, listing
whatever does not match. What no shape tells, the head counts, is the model family's rule: `SD1`.
SimDA's adapters (adapters.py) are the only parameters a checkpoint does not hold; they get their
fresh initialisation.
"""
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

import clip_text
import unet as unet_module
import vae as vae_module
from adapters import is_adapter_key, reset_adapters

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


@dataclass(frozen=True)
class Family:
    """What a model family fixes that the weights' shapes cannot tell."""
    name: str
    unet_heads: int       # attention heads at every UNet level
    text_head_width: int  # channels per head of the text encoder


SD1 = Family("SD 1.x", unet_heads=8, text_head_width=64)  # LDM's v1 configs; CLIP ViT-L/14: 12 heads of 64


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, of another model family, or does not fit the model."""


# ---------------------------------------------------------------------------- writing and reading

def write_atomic(path, write):
    """`write(tmp)` writes the file under a temporary name; it is flushed to the disk and renamed
    over `path`, so a reader, a kill or a power loss at any instant leaves the old file or the new."""
    tmp = f"{path}.tmp"
    write(tmp)
    fd = os.open(tmp, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):  # the rename itself, on POSIX
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_temporaries(folder, names):
    """Delete the temporary files a killed `write_atomic` left for the files `names` in `folder`;
    returns the names of those it deleted."""
    left = [f"{name}.tmp" for name in names if os.path.exists(os.path.join(folder, f"{name}.tmp"))]
    for name in left:
        os.remove(os.path.join(folder, name))
    return left


def save_safetensors(tensors, path, metadata=None):
    write_atomic(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                                             metadata=metadata))


def save_torch(obj, path):
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def load_torch(path):
    """A torch file of plain tensors and containers (weights_only: never arbitrary pickles)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable torch file (truncated, corrupt, or not made by torch.save "
                              f"of tensors): {type(e).__name__}: {e}") from e


def read_state_dict(path):
    """A flat {key: tensor} dict from a .safetensors file or a (weights-only) torch pickle."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        sd = load_file(path) if path.endswith(".safetensors") else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (expected a .safetensors file or a "
                              f"torch state dict): {type(e).__name__}: {e}") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors (found {type(sd).__name__})")
    return sd


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


# ---------------------------------------------------------------------------- SD checkpoints

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


def read_diffusers_folder(folder):
    """(unet, vae, text encoder) state dicts of a diffusers folder, renamed to the LDM keys."""
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


def build(model_class, config_of, sd, name, where, device, dtype, **options):
    """Infer the config (`config_of(sd)`), allocate the model on `device` in `dtype` without a random
    init, and copy the weights in, strictly for every key but the adapters'."""
    try:
        config = config_of(sd)
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot infer the {name} configuration from the weights "
                              f"({type(e).__name__}: {e})") from e
    with torch.device("meta"):
        model = model_class(config, **options).to(dtype)
    model.to_empty(device=device)
    expected = {k: v for k, v in model.state_dict().items() if not is_adapter_key(k)}
    if problems := key_problems(expected, sd):
        raise CheckpointError(f"{where}: {name} weights do not fit the model: " + "; ".join(problems))
    model.load_state_dict(sd, strict=False)  # strict about the SD keys (checked above); adapters are new
    reset_adapters(model)
    return model


def load_models(path, device="cpu", dtype=torch.float32, simda_config=None, family=SD1):
    """(tokenizer, text encoder, VAE, UNet) of an SD checkpoint, frozen and in eval mode; the UNet
    with fresh SimDA adapters when `simda_config` is given."""
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
    unet = build(unet_module.UNet, lambda sd: unet_module.config_from_state_dict(sd, family.unet_heads), unet_sd,
                 "UNet", path, device, dtype, simda_config=simda_config)
    if unet.config.context_dim == 1024:
        raise CheckpointError(f"{path} has a 1024-wide text context: SD 2.x checkpoints are not supported yet (SD 1.x only)")
    text_encoder = build(clip_text.CLIPTextEncoder, lambda sd: clip_text.config_from_state_dict(sd, family.text_head_width),
                         text_sd, "text encoder", path, device, dtype)
    if text_encoder.config.width != unet.config.context_dim:
        raise CheckpointError(f"{path}: the UNet attends to {unet.config.context_dim}-wide text states but the "
                              f"text encoder is {text_encoder.config.width} wide")
    vae = build(vae_module.AutoencoderKL, vae_module.config_from_state_dict, vae_sd, "VAE", path, device, dtype)
    models = [m.eval().requires_grad_(False) for m in (text_encoder, vae, unet)]
    return (clip_text.Tokenizer(vocab_dir), *models)


def ldm_state_dict(text_encoder, vae, unet):
    """The three models as one state dict in the official single-file layout."""
    sd = {}
    for prefix, model in ((TEXT_PREFIX, text_encoder), (VAE_PREFIX, vae), (UNET_PREFIX, unet)):
        sd.update({prefix + k: v for k, v in model.state_dict().items()})
    return sd
