"""Weight files: writing them atomically, reading them safely, and loading Stable Diffusion 1.x and
2.x checkpoints (the official single file, or a diffusers folder) into our models.

Our parameter names are the LDM keys, so loading SD is: strip a prefix (a diffusers folder, and SD
2.x's OpenCLIP text tower, are first renamed by rule), infer each model's config from the tensor
shapes, and load strictly, listing whatever does not match. What no shape tells (head counts, the
text encoder's activation and padding, attention precision) is the model family's rule, `SD1` or
`SD2`, and the family is told by the keys (single file) or the text encoder's config (folder).
Whether the UNet predicts the noise or v is not in the weights either: `choose_prediction` reads
what the checkpoint's metadata, scheduler config, file name or step count say.
SimDA's adapters (adapters.py) are the only parameters a checkpoint does not hold; they get their
fresh initialisation.
"""
import json
import re
import zipfile
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import clip_text
import ddim
import unet as unet_module
import vae as vae_module
from adapters import is_adapter_key, reset_adapters

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."  # SD 1.x: OpenAI CLIP, transformers' names
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP's text tower
SDXL_PREFIX = "conditioner.embedders."
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
    text_prefix: str        # where a single file keeps the text encoder
    unet_heads: int         # attention heads at every UNet level (-1: heads of unet_head_channels)
    unet_head_channels: int  # channels per UNet head (-1: unet_heads heads)
    upcast_attention: bool  # UNet attention in float32 under fp16/bf16
    text_head_width: int    # channels per head of the text encoder
    hidden_act: str         # the text encoder's MLP activation
    pad_id: int             # the token id after <|endoftext|>
    predictions: str        # what its models predict, for the user's information
    latent_scale: float = 0.18215  # the diffusion model sees VAE latents times this
    betas: tuple = (0.00085, 0.012)  # the training noise schedule's (beta_start, beta_end), scaled linear


# LDM's v1 configs; CLIP ViT-L/14: 12 heads of 64, quick GELU, padded with <|endoftext|>.
SD1 = Family("SD 1.x", TEXT_PREFIX, unet_heads=8, unet_head_channels=-1, upcast_attention=False, text_head_width=64,
             hidden_act="quick_gelu", pad_id=clip_text.EOS, predictions="epsilon")
# Stability's v2 configs: 64-channel UNet heads, attention in float32 (their ATTN_PRECISION default);
# OpenCLIP ViT-H/14: 16 heads of 64, exact GELU, padded with 0.
SD2 = Family("SD 2.x", OPEN_CLIP_PREFIX, unet_heads=-1, unet_head_channels=64, upcast_attention=True,
             text_head_width=64, hidden_act="gelu", pad_id=clip_text.OPEN_CLIP_PAD,
             predictions="v (768-v models) or epsilon (512-base models)")
# Stability's x4-upscaling.yaml: SD 2.x's text tower, a UNet with 8 heads and the low-res image's noise
# level as a class label, a 3-level VAE (x4, not x8) with its own latent scale, and its own schedule.
X4 = Family("SD x4 upscaler", OPEN_CLIP_PREFIX, unet_heads=8, unet_head_channels=-1, upcast_attention=True,
            text_head_width=64, hidden_act="gelu", pad_id=clip_text.OPEN_CLIP_PAD, predictions="v",
            latent_scale=0.08333, betas=(0.0001, 0.02))
LOW_SCALE_PREFIX = "low_scale_model."  # the upscaler's noise-augmentation schedule buffers, recomputed by us
# safetensors metadata: the UNet levels whose attn1 attends to the text ("1,2"), which the shapes cannot
# tell where the text is as wide as the level (the demo upscaler's level 1)
TEXT_ONLY_LEVELS_KEY = "disable_self_attentions"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, of another model family, or does not fit the model."""


# ---------------------------------------------------------------------------- writing and reading

def write_atomic(path, write):
    """`write(tmp)` writes the file under a temporary name; it is flushed to the disk and renamed
    over `path`, so a reader, a kill or a power loss at any instant leaves the old file or the new."""
    def sync(name, flags):
        fd = os.open(name, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    tmp = f"{path}.tmp"
    write(tmp)
    sync(tmp, os.O_RDWR)
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):  # the rename itself, on POSIX
        sync(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)


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


def safetensors_header(path):
    """(keys, metadata) of a .safetensors file, without reading its tensors."""
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys()), f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (expected a .safetensors file or a "
                              f"torch state dict): {type(e).__name__}: {e}") from e


def is_torchscript(path):
    """A TorchScript archive: a zip that holds code and constants besides tensors."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("constants.pkl") or "/code/" in name for name in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


READ_BYTES = 256 * 2**20  # what read_tensors reads of a .safetensors file between reopening it


def read_tensors(path, dtype_of=None, device="cpu"):
    """{key: tensor} of a .safetensors file or a (weights-only) torch pickle, read one tensor at a time, each
    cast to `dtype_of(key)` (floating-point tensors only; None: the key is skipped) and moved to `device` as it
    comes, so that no second copy of the file's tensors is ever alive: a float32 file read for a bfloat16
    model peaks at the bfloat16 tensors plus one float32 tensor. `dtype_of` None: every tensor as stored. A
    pickle is memory-mapped (mmap=True), not read into memory first: the pages its tensors were cast from are
    the kernel's page cache, resident while mapped but reclaimable."""
    def convert(key, tensor):
        dtype = tensor.dtype if dtype_of is None else dtype_of(key)
        if dtype is None:
            return None
        return tensor.to(device, dtype if tensor.is_floating_point() else tensor.dtype)
    if not path.endswith(".safetensors"):
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        inner = sd.get("state_dict") if isinstance(sd, dict) else None
        tensors = inner if isinstance(inner, dict) else sd
        if isinstance(tensors, dict):
            for key in list(tensors):  # each mapped tensor replaced by its converted copy, in place
                if isinstance(tensors[key], torch.Tensor) and isinstance(key, str):
                    value = convert(key, tensors.pop(key))
                    if value is not None:
                        tensors[key] = value
        return sd
    sd, keys = {}, [key for key in safetensors_header(path)[0] if dtype_of is None or dtype_of(key) is not None]
    while keys:  # safe_open maps the whole file, and what it read stays resident until it closes: reopen it
        with safe_open(path, framework="pt") as f:  # every READ_BYTES, so that the file never adds a second copy
            read = 0
            while keys and read < READ_BYTES:
                key = keys.pop(0)
                tensor = f.get_tensor(key)
                read += tensor.nbytes
                sd[key] = convert(key, tensor)
    return sd


def read_checkpoint(path, dtype_of=None, device="cpu"):
    """(state dict, facts) of a .safetensors file or a (weights-only) torch pickle: a flat {key: tensor}
    dict (read by `read_tensors`, which casts and skips keys as `dtype_of` says), and what the file says
    about itself: {"metadata": the safetensors header's metadata, "global_step": the step count a .ckpt was
    saved at}, where present."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if is_torchscript(path):  # torch.load would hand it to torch.jit.load, even with weights_only
        raise CheckpointError(
            f"{path} is a TorchScript archive (e.g. OpenAI's CLIP download), not a state dict, and is never loaded "
            f"here. Convert it once:\n  python -c \"import torch; torch.save(torch.jit.load('{path}', "
            "map_location='cpu').state_dict(), 'state-dict.pt')\"")
    facts = {}
    try:
        if path.endswith(".safetensors"):
            facts["metadata"] = safetensors_header(path)[1]
        sd = read_tensors(path, dtype_of, device)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (expected a .safetensors file or a "
                              f"torch state dict): {type(e).__name__}: {e}") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        if isinstance(sd.get("global_step"), int):
            facts["global_step"] = sd["global_step"]
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors (found {type(sd).__name__})")
    return sd, facts


def read_state_dict(path):
    """A flat {key: tensor} dict from a .safetensors file or a (weights-only) torch pickle."""
    return read_checkpoint(path)[0]


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

def family_of(keys, where):
    """The family of a single-file checkpoint, told by where it keeps its text encoder; the families
    we recognise but do not support get a named error instead of a list of keys."""
    keys = list(keys)
    if any(k.startswith(SDXL_PREFIX) for k in keys):
        raise CheckpointError(f"{where} is an SDXL checkpoint (two text encoders under '{SDXL_PREFIX}*'); "
                              "SDXL is not supported (SD 1.x and 2.x only)")
    for family in (SD1, SD2):
        if any(k.startswith(family.text_prefix) for k in keys):
            return family
    raise CheckpointError(f"{where} is not a Stable Diffusion checkpoint: it has no text encoder under "
                          f"'{TEXT_PREFIX}*' (SD 1.x) or '{OPEN_CLIP_PREFIX}*' (SD 2.x) (first keys: {sorted(keys)[:5]})")


def split_ldm(sd, where, family):
    """Split a single-file LDM state dict into (unet, vae, text encoder) dicts in our names."""
    parts = {UNET_PREFIX: {}, VAE_PREFIX: {}, family.text_prefix: {}}
    unexpected = []
    for key, value in sd.items():
        prefix = next((p for p in parts if key.startswith(p)), None)
        if prefix is not None and not key.endswith("position_ids"):
            parts[prefix][key[len(prefix):]] = value
        elif not (prefix or key.startswith(EMA_PREFIX) or key.removeprefix(LOW_SCALE_PREFIX) in DDPM_BUFFERS):
            unexpected.append(key)
    if not parts[UNET_PREFIX]:
        raise CheckpointError(f"{where} holds no '{UNET_PREFIX}*' weights: not a Stable Diffusion "
                              f"checkpoint (first keys: {sorted(sd)[:5]})")
    if unexpected:
        raise CheckpointError(f"{where}: {describe('unexpected', unexpected)}")
    text = parts[family.text_prefix]
    return parts[UNET_PREFIX], parts[VAE_PREFIX], clip_text.from_open_clip(text) if family is not SD1 else text


def folder_family(folder):
    """The family of a diffusers folder: SD 2.x's text encoder uses the exact GELU (its config says
    so; without a config, its 1024 width tells)."""
    if os.path.isdir(os.path.join(folder, "text_encoder_2")):
        raise CheckpointError(f"{folder} is an SDXL folder (it has text_encoder_2/); SDXL is not supported "
                              "(SD 1.x and 2.x only)")
    config = os.path.join(folder, "text_encoder", "config.json")
    if os.path.exists(config):
        with open(config) as f:
            act = json.load(f).get("hidden_act")
        if act in (SD1.hidden_act, SD2.hidden_act):
            return SD2 if act == SD2.hidden_act else SD1
    return None  # decided by the width, once the weights are read


def read_diffusers_folder(folder, dtypes=None, device="cpu"):
    """(unet, vae, text encoder) state dicts of a diffusers folder, renamed to the LDM keys; `dtypes`: the
    dtype each part is read in ({"unet": ..., "vae": ..., "text_encoder": ...}; None: as stored)."""
    parts = {}
    for part, names in DIFFUSERS_FILES.items():
        found = [os.path.join(folder, part, n) for n in names if os.path.exists(os.path.join(folder, part, n))]
        if not found:
            raise CheckpointError(f"{folder} looks like a diffusers folder but has no {part}/ weights "
                                  f"(looked for {', '.join(names)})")
        dtype = dtypes and dtypes[part]
        parts[part] = read_checkpoint(found[0], dtype and (lambda key, dtype=dtype: dtype), device)[0]
    return (unet_module.from_diffusers(parts["unet"]), vae_module.from_diffusers(parts["vae"]),
            clip_text.from_diffusers(parts["text_encoder"]))


def choose_prediction(path, family, facts, prediction=None):
    """(prediction, why): what the UNet predicts, "epsilon" or "v", and one phrase saying how we know.
    The weights cannot tell; in order we trust the user, the checkpoint's own word (a diffusers
    scheduler config, safetensors metadata), the file name of the official SD 2.x files (768-v
    predict v; 512-base predict epsilon), and SD 2.0-base's step count; else the family's default."""
    if prediction is not None:
        ddim.check_prediction(prediction)
        return prediction, "as asked"
    said = facts.get("scheduler_config", {}).get("prediction_type")
    source = "scheduler/scheduler_config.json"
    metadata = facts.get("metadata", {})
    if said is None and "modelspec.prediction_type" in metadata:  # Stability's model-spec header
        source, said = "the file's metadata (modelspec.prediction_type)", metadata["modelspec.prediction_type"]
    if said is None and str(metadata.get("ss_v_parameterization")).lower() == "true":  # kohya's trainers
        source, said = "the file's metadata (ss_v_parameterization)", "v"
    if said is not None:
        named = {"epsilon": "epsilon", "v": "v", "v_prediction": "v", "velocity": "v"}.get(said)
        if named is None:
            raise CheckpointError(f"{path}: {source} says the model predicts {said!r}, which we do not support "
                                  "(epsilon or v); override with --prediction")
        return named, f"{source} says {said}"
    if family is not SD2:
        return family.predictions, f"as {family.name} models do"
    name = os.path.basename(os.path.normpath(path)).lower()
    words = set(re.split(r"[^0-9a-z]+", name))  # whole words only: a hub cache's hash folder may hold "768"
    size = ({"768", "512"} & words) or ({"512"} if "base" in words else set())
    if size == {"768"}:
        return "v", "SD 2.x file named 768: a 768-v model"
    if size == {"512"}:
        return "epsilon", "SD 2.x file named 512/base: a 512-base model"
    if facts.get("global_step") == 875000:
        return "epsilon", "SD 2.x saved at step 875000: SD 2.0-base"
    return "v", ("SD 2.x, and nothing in the checkpoint says which prediction: assuming v, as the 768-v models "
                 "predict (pass --prediction epsilon, or prediction='epsilon', for a 512-base model)")


def build(model_class, config_of, sd, name, where, device, **options):
    """Infer the config (`config_of(sd)`), build the model on the meta device (no memory, no random init)
    and give it the tensors of `sd` themselves (assign: no copy, their dtype and device), strictly for every
    key but the adapters', which get their fresh initialisation on `device` in the UNet's dtype."""
    try:
        config = config_of(sd)
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot infer the {name} configuration from the weights "
                              f"({type(e).__name__}: {e})") from e
    with torch.device("meta"):
        model = model_class(config, **options)
    expected = {k: v for k, v in model.state_dict().items() if not is_adapter_key(k)}
    if problems := key_problems(expected, sd):
        raise CheckpointError(f"{where}: {name} weights do not fit the model: " + "; ".join(problems))
    model.load_state_dict(sd, strict=False, assign=True)  # strict about the SD keys (checked above)
    dtype = next((v.dtype for v in sd.values() if v.is_floating_point()), torch.float32)
    for module in model.modules():  # what the file does not hold, the adapters, is still on the meta device
        for key, p in module.named_parameters(recurse=False):
            if p.is_meta:
                module.register_parameter(key, torch.nn.Parameter(torch.empty_like(p, device=device, dtype=dtype)))
    reset_adapters(model)
    return model


def part_dtypes(dtype, vae_dtype):
    """dtype_of for read_checkpoint on a single file: the UNet and the text encoder in `dtype`, the VAE in
    `vae_dtype`, what SD files hold besides the three models (the EMA copy, the DDPM buffers) not read at
    all, any other key as stored (for split_ldm to report)."""
    def dtype_of(key):
        if key.startswith(EMA_PREFIX) or key.removeprefix(LOW_SCALE_PREFIX) in DDPM_BUFFERS:
            return None
        return vae_dtype if key.startswith(VAE_PREFIX) else dtype
    return dtype_of


def load_models(path, device="cpu", dtype=torch.float32, simda_config=None, prediction=None, upscaler=False,
                vae_dtype=torch.float32):
    """(tokenizer, text encoder, VAE, UNet, family, prediction, why) of an SD 1.x or 2.x checkpoint (or,
    with `upscaler`, of SD's x4 upscaler): the models frozen and in eval mode, the text encoder and the UNet
    in `dtype`, the VAE in `vae_dtype`, each tensor cast as it is read (no full copy in the file's dtype); the
    UNet with fresh SimDA adapters when `simda_config` is given; the Family; what the UNet predicts ("epsilon"
    or "v"; `prediction` when given) and why we think so."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    vocab_dir, facts = None, {}
    if os.path.isdir(path):
        family = folder_family(path)
        unet_sd, vae_sd, text_sd = read_diffusers_folder(path, dict(unet=dtype, vae=vae_dtype, text_encoder=dtype),
                                                         device)
        if family is None:
            width = text_sd.get("embeddings.token_embedding.weight", torch.zeros(0, 0)).shape[1]
            family = SD2 if width == 1024 else SD1
        if os.path.exists(os.path.join(path, "tokenizer", "vocab.json")):
            vocab_dir = os.path.join(path, "tokenizer")
        if os.path.exists(scheduler := os.path.join(path, "scheduler", "scheduler_config.json")):
            with open(scheduler) as f:
                facts["scheduler_config"] = json.load(f)
    else:
        if path.endswith(".safetensors"):
            family_of(safetensors_header(path)[0], path)  # refuse other families before reading gigabytes
        sd, facts = read_checkpoint(path, part_dtypes(dtype, vae_dtype), device)
        family = family_of(sd.keys(), path)
        unet_sd, vae_sd, text_sd = split_ldm(sd, path, family)
    for name, sd in (("VAE", vae_sd), ("text encoder", text_sd)):
        if not sd:
            raise CheckpointError(f"{path} holds no {name} weights")
    if family is SD2 and "label_emb.weight" in unet_sd:  # only the upscaler's UNet has a class embedding
        family = X4
    if upscaler and family is not X4:
        raise CheckpointError(f"{path} is an {family.name} text-to-image checkpoint, not SD's x4 upscaler "
                              f"(x4-upscaler-ema.safetensors): pass it as --ckpt, and the upscaler as --sr-ckpt")
    if family is X4 and not upscaler:
        raise CheckpointError(f"{path} is SD's x4 upscaler, the super-resolution stage: pass it as --sr-ckpt "
                              f"(simda.load_upscaler), and a text-to-image checkpoint as --ckpt")
    prediction, why = choose_prediction(path, family, facts, prediction)
    text_encoder = build(clip_text.CLIPTextEncoder,
                         lambda sd: clip_text.config_from_state_dict(sd, family.text_head_width, family.hidden_act),
                         text_sd, "text encoder", path, device)
    context = unet_sd.get("middle_block.1.transformer_blocks.0.attn2.to_k.weight")
    if context is not None and context.shape[1] != text_encoder.config.width:
        raise CheckpointError(f"{path}: its {family.name} text encoder is {text_encoder.config.width} wide, but the UNet "
                              f"attends to {context.shape[1]}-wide text states: the two are not one model "
                              f"(a UNet of another SD version?)")
    stated = (facts.get("metadata") or {}).get(TEXT_ONLY_LEVELS_KEY)  # train_image.py writes it
    unet = build(unet_module.UNet, lambda sd: unet_module.config_from_state_dict(
        sd, family.unet_heads, family.unet_head_channels, family.upcast_attention,
        [int(level) for level in stated.split(",") if level] if stated else None),
        unet_sd, "UNet", path, device, simda_config=simda_config)
    vae = build(vae_module.AutoencoderKL, vae_module.config_from_state_dict, vae_sd, "VAE", path, device)
    models = [m.eval().requires_grad_(False) for m in (text_encoder, vae, unet)]
    return (clip_text.Tokenizer(vocab_dir, pad_id=family.pad_id), *models, family, prediction, why)


def ldm_state_dict(text_encoder, vae, unet):
    """The three models as one state dict in the official single-file layout of their family (SD 2.x
    when the text encoder uses the exact GELU: OpenCLIP's names, plus the unused last layer as zeros)."""
    text = text_encoder.state_dict()
    sd2 = text_encoder.config.hidden_act == SD2.hidden_act
    parts = [(SD2.text_prefix, clip_text.to_open_clip(text)) if sd2 else (SD1.text_prefix, text),
             (VAE_PREFIX, vae.state_dict()), (UNET_PREFIX, unet.state_dict())]
    return {prefix + k: v for prefix, part in parts for k, v in part.items()}
