"""CLIP (Radford et al. 2021) with both towers and their projections: what CLIPSIM and frame
consistency score videos with (metrics.py, `evaluate.py videos`). SD itself only needs the text
transformer (clip_text.py); this file adds the ViT image tower and reuses clip_text's layers.

Image tower (ViT): a patch convolution without bias, a learned class token, positional embeddings,
a LayerNorm before the transformer (pre-LN blocks, quick GELU, attention without a mask), the
LayerNorm after it applied to the class token, then `visual_projection`. Text tower: clip_text's
encoder over all its layers, the hidden state at the end-of-text token, then `text_projection`.

Parameter names are transformers' `CLIPModel` keys (as clip_text.py already uses for the text
tower), so a transformers folder or file loads with a strict load; OpenAI's own layout (`visual.*`,
`transformer.resblocks.*`, `text_projection` as a matrix applied on the right) is renamed by rule.
The config is read from the shapes: ViT-B/32, B/16, L/14 and L/14-336 alike.

Preprocessing is OpenAI's, bit for bit: PIL bicubic resize of the short side (torchvision's size
rule: the long side truncated to int), a centre crop (offsets rounded half to even, as Python's
round), RGB, then CLIP's mean and std. Resizing with torch instead moves the scores measurably.
"""
import glob
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import clip_text
from checkpoint import CheckpointError, describe, key_problems, read_state_dict
from clip_text import CLIPEncoderLayer, CLIPTextConfig, CLIPTextEncoder

MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's image normalisation
STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTH = 64  # OpenAI's rule for both towers: heads = width // 64
UNUSED_KEYS = ("input_resolution", "context_length", "vocab_size")  # ints in OpenAI's TorchScript state dicts


@dataclass
class CLIPVisionConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    hidden_act: str = "quick_gelu"


@dataclass
class CLIPConfig:  # ViT-B/32: the default CLIPSIM model
    embed_dim: int = 512
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    text: CLIPTextConfig = field(default_factory=lambda: CLIPTextConfig(width=512, layers=12, heads=8))

    @classmethod
    def tiny(cls):
        # heads 64 wide, as the loader infers them (HEAD_WIDTH)
        return cls(embed_dim=32, vision=CLIPVisionConfig(image_size=32, patch_size=8, width=128, layers=2, heads=2),
                   text=CLIPTextConfig(width=128, layers=2, heads=2))


def model_name(cfg: CLIPConfig):
    """OpenAI's name of the model a config describes (ViT-B/32, ViT-L/14-336, ...), else its shape."""
    size = {768: "B", 1024: "L", 1280: "H"}.get(cfg.vision.width, f"{cfg.vision.width}-wide")
    return f"ViT-{size}/{cfg.vision.patch_size}" + ("" if cfg.vision.image_size == 224 else f"-{cfg.vision.image_size}")


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.width)

    def forward(self, pixels):
        # b c h w -> b (h w) c: one token per patch, the class token first
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionEncoder(nn.Module):
    """Pixels [B, 3, S, S] (preprocessed) -> the class token after post_layernorm [B, width]."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=1e-5)  # sic: transformers' spelling of the key
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(CLIPEncoderLayer(cfg, causal=False)
                                                               for _ in range(cfg.layers))))
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=1e-5)

    def forward(self, pixels):
        size = self.config.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"expected preprocessed pixels [B, 3, {size}, {size}], found {tuple(pixels.shape)}")
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextEncoder(cfg.text)
        self.vision_model = CLIPVisionEncoder(cfg.vision)
        self.visual_projection = nn.Linear(cfg.vision.width, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.zeros(()))  # CLIP's temperature; loaded, unused by the scores

    def encode_image(self, pixels):
        """Preprocessed pixels [B, 3, S, S] -> image embeddings [B, embed_dim] (not normalised)."""
        return self.visual_projection(self.vision_model(pixels))

    def encode_text(self, ids):
        """Token ids [B, L] -> text embeddings [B, embed_dim] (not normalised): the hidden state at the
        first end-of-text token, which (attention being causal) no padding after it can change."""
        if not (ids == clip_text.EOS).any(dim=1).all():
            raise ValueError("every row of token ids needs an end-of-text token (clip_text.Tokenizer adds one)")
        hidden = self.text_model(ids)
        eos = (ids == clip_text.EOS).int().argmax(dim=1)
        return self.text_projection(hidden[torch.arange(len(ids), device=ids.device), eos])


# ---------------------------------------------------------------------------- preprocessing

def resized_size(height, width, size):
    """(height, width) after torchvision's Resize(size): the short side to `size`, the long side
    int(size * long / short), truncated."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def preprocess(frames, size):
    """uint8 frames [N, H, W, 3] -> CLIP pixels [N, 3, size, size] float32, as OpenAI's preprocess."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [N, H, W, 3], found {frames.dtype} {list(frames.shape)}")
    height, width = frames.shape[1:3]
    new_h, new_w = resized_size(height, width, size)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))  # round half to even
    out = np.empty((len(frames), size, size, 3), np.float32)
    for i, frame in enumerate(frames):
        image = Image.fromarray(frame, "RGB")
        if (new_h, new_w) != (height, width):
            image = image.resize((new_w, new_h), Image.BICUBIC)
        out[i] = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255.0
    pixels = torch.from_numpy(out).permute(0, 3, 1, 2)  # n h w c -> n c h w
    return (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@torch.no_grad()
def embed_videos(model, videos, batch_size=64, progress=None):
    """uint8 videos [N, F, H, W, 3] -> unit-norm image embeddings of every frame [N, F, embed_dim],
    float64; `progress` (runtime.Progress) counts videos."""
    videos = np.asarray(videos)
    if videos.ndim != 5:
        raise ValueError(f"expected uint8 videos [N, F, H, W, 3], found {list(videos.shape)}")
    param = next(model.parameters())
    frames = videos.reshape(-1, *videos.shape[2:])  # n f h w c -> (n f) h w c
    out = []
    for i in range(0, len(frames), batch_size):
        pixels = preprocess(frames[i:i + batch_size], model.config.vision.image_size)
        out.append(model.encode_image(pixels.to(param.device, param.dtype)).double().cpu())
        if progress:
            progress.show(min(i + batch_size, len(frames)) // videos.shape[1])
    embeddings = torch.cat(out).view(*videos.shape[:2], -1)
    return torch.nn.functional.normalize(embeddings, dim=-1).numpy()


@torch.no_grad()
def embed_texts(model, tokenizer, captions, batch_size=64):
    """Captions -> unit-norm text embeddings [N, embed_dim], float64 (over-long captions are truncated
    with a warning by the tokenizer, as CLIP's context holds 77 tokens)."""
    param = next(model.parameters())
    out = [model.encode_text(tokenizer(captions[i:i + batch_size]).to(param.device)).double().cpu()
           for i in range(0, len(captions), batch_size)]
    return torch.nn.functional.normalize(torch.cat(out), dim=-1).numpy()


# ---------------------------------------------------------------------------- loading

def from_openai(sd):
    """OpenAI CLIP keys -> ours: the text tower by clip_text's OpenCLIP rules (every layer), the image
    tower by the same layer rules plus its own names; the projections are matrices applied on the
    right there, Linear weights here (transposed)."""
    sd = {k: v for k, v in sd.items() if k not in UNUSED_KEYS}
    visual = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
    text = {k: v for k, v in sd.items() if not k.startswith("visual.") and k not in ("text_projection", "logit_scale")}
    renames = {"conv1.weight": "embeddings.patch_embedding.weight", "class_embedding": "embeddings.class_embedding",
               "positional_embedding": "embeddings.position_embedding.weight", "ln_pre.weight": "pre_layrnorm.weight",
               "ln_pre.bias": "pre_layrnorm.bias", "ln_post.weight": "post_layernorm.weight",
               "ln_post.bias": "post_layernorm.bias"}
    out = {f"text_model.{k}": v for k, v in clip_text.from_open_clip(text, all_layers=True).items()}
    for key, value in clip_text.rename_open_clip_layers(visual).items():
        if key == "proj":
            out["visual_projection.weight"] = value.t()
        else:
            out[f"vision_model.{renames.get(key, key)}"] = value
    if "text_projection" in sd:
        out["text_projection.weight"] = sd["text_projection"].t()
    if "logit_scale" in sd:
        out["logit_scale"] = sd["logit_scale"]
    return out


def config_from_state_dict(sd) -> CLIPConfig:
    """The config of a state dict in our (transformers') layout, from its shapes."""
    need = ("vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_embedding.weight",
            "visual_projection.weight")
    if missing := [k for k in need if k not in sd]:
        raise CheckpointError(f"not a CLIP model with both towers: no {missing[0]!r}")
    width, _, patch, _ = sd[need[0]].shape
    grid = int(round((sd[need[1]].shape[0] - 1) ** 0.5))
    layers = {int(k.split(".")[3]) for k in sd if k.startswith("vision_model.encoder.layers.")}
    text = clip_text.config_from_state_dict({k.removeprefix("text_model."): v for k, v in sd.items()
                                             if k.startswith("text_model.")}, HEAD_WIDTH)
    vision = CLIPVisionConfig(image_size=patch * grid, patch_size=patch, width=width, layers=len(layers),
                              heads=width // HEAD_WIDTH)
    return CLIPConfig(embed_dim=sd["visual_projection.weight"].shape[0], vision=vision, text=text)


def read_clip_state_dict(path):
    """A CLIP state dict in our layout from an OpenAI file (.pt state dict or .safetensors), a transformers
    CLIPModel file, or a transformers folder (model.safetensors or pytorch_model.bin)."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) or sorted(glob.glob(os.path.join(path, "*.bin")))
        if not files:
            raise CheckpointError(f"{path} holds no .safetensors or .bin weights (expected a transformers CLIPModel "
                                  "folder, e.g. openai/clip-vit-base-patch32)")
        sd = {k: v for f in files for k, v in read_state_dict(f).items()}
    else:
        if not os.path.exists(path):
            raise CheckpointError(f"CLIP weights not found: {path}")
        sd = read_state_dict(path)  # refuses TorchScript (OpenAI's download) with how to convert it
    if "visual.conv1.weight" in sd:
        return from_openai(sd)
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}  # a buffer in older transformers files
    if any(k.startswith("vision_model.") for k in sd):
        return sd
    raise CheckpointError(f"{path} is not a CLIP model with both towers: expected OpenAI's keys (visual.conv1.weight, "
                          f"transformer.resblocks.*) or transformers' CLIPModel keys (vision_model.*, text_model.*); "
                          f"{describe('found', sd)}")


def load_clip(path, device="cpu", dtype=torch.float32) -> CLIP:
    """CLIP from `path` (see read_clip_state_dict), config from the shapes, strict load, eval mode."""
    sd = read_clip_state_dict(path)
    model = CLIP(config_from_state_dict(sd))
    if problems := key_problems(model.state_dict(), sd):
        raise CheckpointError(f"{path} does not fit the CLIP model its shapes describe:\n  " + "\n  ".join(problems))
    model.load_state_dict(sd, strict=True)
    return model.to(device, dtype).eval()
