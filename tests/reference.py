"""Reference models (diffusers / transformers) built to match our configs, holding our weights as
converted by the reference libraries' own LDM converters, so that our parameter names are checked
against the official layout by an independent party. Tests only: product code never imports these
(the UNet's is bench.py's `peer_unet`, the same model the benchmark times)."""
import os
import shutil

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_vae_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel

from bench import peer_unet
from checkpoint import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def diffusers_vae_config(c):
    n = len(c.channel_mult)
    return dict(in_channels=c.image_channels, out_channels=c.image_channels, latent_channels=c.latent_channels,
                block_out_channels=[c.base_channels * m for m in c.channel_mult], layers_per_block=c.num_res_blocks,
                norm_num_groups=32, down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)


def transformers_clip_config(c):
    return CLIPTextConfig(vocab_size=c.vocab_size, max_position_embeddings=c.max_length, hidden_size=c.width,
                          intermediate_size=4 * c.width, num_hidden_layers=c.layers, num_attention_heads=c.heads,
                          hidden_act="quick_gelu", layer_norm_eps=1e-5)


def _build(model_class, config, sd):
    """Construct (really, not on the meta device: transformers keeps non-persistent buffers such as
    CLIP's position_ids, which a meta construction would leave empty) and load strictly."""
    model = model_class(config) if not isinstance(config, dict) else model_class(**config)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def diffusers_unet(unet=None, ldm=None, config=None):
    """diffusers' UNet2DConditionModel holding our UNet's weights (or those of an LDM checkpoint dict):
    bench.py's peer, which the benchmark times."""
    ldm = ldm if ldm is not None else {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    return peer_unet(config or unet.config, ldm)


def diffusers_vae(vae=None, ldm=None, config=None):
    config = diffusers_vae_config(config or vae.config)
    ldm = ldm if ldm is not None else {VAE_PREFIX + k: v for k, v in vae.state_dict().items()}
    return _build(AutoencoderKL, config, convert_ldm_vae_checkpoint(ldm, config))


def transformers_clip(text_encoder=None, ldm=None, config=None):
    ldm = ldm if ldm is not None else {TEXT_PREFIX + k: v for k, v in text_encoder.state_dict().items()}
    sd = convert_ldm_clip_checkpoint({k: v for k, v in ldm.items() if k.startswith(TEXT_PREFIX)})
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}  # transformers 5 names them without it
    return _build(CLIPTextModel, transformers_clip_config(config or text_encoder.config), sd)


def save_diffusers_folder(folder, text_encoder, vae, unet):
    """Write reference models as the Hub's SD folders hold them (unet/, vae/, text_encoder/, tokenizer/)."""
    unet.save_pretrained(os.path.join(folder, "unet"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))
    os.makedirs(os.path.join(folder, "tokenizer"), exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(ROOT, "clip_vocab", name), os.path.join(folder, "tokenizer", name))
