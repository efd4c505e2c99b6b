"""Reference models (diffusers / transformers) built to match our configs, holding our weights as
converted by the reference libraries' own LDM converters, so that our parameter names are checked
against the official layout by an independent party. Tests only: product code never imports these
(the UNet's is bench_unet.py's `peer_unet`, the same model the benchmark times)."""
import os
import shutil

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_vae_checkpoint,
                                                 convert_open_clip_checkpoint)
from transformers import CLIPTextModel

from bench_unet import diffusers_vae_config, peer_unet, sd_ddim_scheduler, transformers_clip_config  # noqa: F401
from checkpoint import OPEN_CLIP_PREFIX, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, ldm_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build(model_class, config, sd):
    """Construct (really, not on the meta device: transformers keeps non-persistent buffers such as
    CLIP's position_ids, which a meta construction would leave empty) and load strictly."""
    model = model_class(config) if not isinstance(config, dict) else model_class(**config)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def diffusers_unet(unet=None, ldm=None, config=None):
    """diffusers' UNet2DConditionModel holding our UNet's weights (or those of an LDM checkpoint dict):
    bench_unet.py's peer, which the benchmark times."""
    ldm = ldm if ldm is not None else {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    return peer_unet(config or unet.config, ldm)


def diffusers_vae(vae=None, ldm=None, config=None):
    config = diffusers_vae_config(config or vae.config)
    ldm = ldm if ldm is not None else {VAE_PREFIX + k: v for k, v in vae.state_dict().items()}
    return _build(AutoencoderKL, config, convert_ldm_vae_checkpoint(ldm, config))


def transformers_clip(text_encoder=None, ldm=None, config=None):
    """transformers' CLIPTextModel holding our text encoder's weights (or an LDM checkpoint's: SD 1.x's
    `cond_stage_model.transformer.*` or SD 2.x's OpenCLIP `cond_stage_model.model.*` keys), converted by
    diffusers' own single-file converters."""
    config = config or text_encoder.config
    if ldm is None:
        ldm = ldm_state_dict(text_encoder, *_no_models())
    hf_config = transformers_clip_config(config)
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in ldm):
        sd = convert_open_clip_checkpoint(CLIPTextModel(hf_config), {k: v for k, v in ldm.items()
                                                                      if k.startswith(OPEN_CLIP_PREFIX)})
        # diffusers drops SD 2.x's unused last layer by its full-size name (resblocks.23) and keeps the
        # projection; at other depths we drop them here
        sd = {k: v for k, v in sd.items() if not k.startswith((f"text_model.encoder.layers.{config.layers}.",
                                                                "text_projection"))}
    else:
        sd = convert_ldm_clip_checkpoint({k: v for k, v in ldm.items() if k.startswith(TEXT_PREFIX)})
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}  # transformers 5 names them without it
    return _build(CLIPTextModel, hf_config, sd)


def _no_models():
    """Empty stand-ins for the VAE and UNet, for ldm_state_dict of a text encoder alone."""
    empty = torch.nn.Module()
    return empty, empty


def save_diffusers_folder(folder, text_encoder, vae, unet):
    """Write reference models as the Hub's SD folders hold them (unet/, vae/, text_encoder/, tokenizer/)."""
    unet.save_pretrained(os.path.join(folder, "unet"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))
    os.makedirs(os.path.join(folder, "tokenizer"), exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(ROOT, "clip_vocab", name), os.path.join(folder, "tokenizer", name))
