"""The Stable Diffusion 1.x image autoencoder (AutoencoderKL of CompVis/latent-diffusion).

encode: images [N, 3, H, W] in [-1, 1] -> posterior mean and logvar, each [N, 4, H/8, W/8]
decode: latents [N, 4, H/8, W/8] -> images [N, 3, H, W]
encode_video, decode_video: the same on videos [B, C, F, H, W], frame by frame.
All work on UNSCALED latents; the diffusion model sees latents * LATENT_SCALE.

Parameter names are the official single-file checkpoint keys with `first_stage_model.` stripped,
so an SD checkpoint loads with a prefix strip and a strict load_state_dict. Frames are processed in
chunks of `chunk_size` so that a 16+ frame video does not need all activations in memory at once.
"""
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from video import batch_to_frames, frames_to_batch

LATENT_SCALE = 0.18215  # SD 1.x: latents are multiplied by this before diffusion, divided after


@dataclass
class VAEConfig:
    base_channels: int = 128
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4
    image_channels: int = 3

    @classmethod
    def tiny(cls):
        return cls(base_channels=32, channel_mult=(1, 2), num_res_blocks=1)

    @classmethod
    def x4_upscaler(cls):
        """The x4 upscaler's VAE: 3 levels (128/256/512), so it downsamples by 4."""
        return cls(channel_mult=(1, 2, 4))

    @property
    def downsample_factor(self):
        return 2 ** (len(self.channel_mult) - 1)


def Normalize(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice plus a skip; no time embedding in the VAE."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, with 1x1 convs as projections."""

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        y = self.norm(x)
        # [n, c, h, w] -> [n, 1, h*w, c]: one head, positions as the sequence. Contiguous, so that SDPA runs a
        # fused kernel, which never holds the [h*w, h*w] scores (with the channels strided it takes the math
        # path, which does: 16 GiB a frame at the x4 upscaler's 256x256 latents).
        q, k, v = (t.reshape(n, 1, c, h * w).transpose(2, 3).contiguous() for t in (self.q(y), self.k(y), self.v(y)))
        y = F.scaled_dot_product_attention(q, k, v)  # default scale = c ** -0.5
        y = y.transpose(2, 3).reshape(n, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # LDM pads only right and bottom, then a stride-2 conv without padding
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid_block(channels):
    return nn.ModuleDict(dict(block_1=ResnetBlock(channels, channels), attn_1=AttnBlock(channels),
                              block_2=ResnetBlock(channels, channels)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult = cfg.base_channels, cfg.channel_mult
        self.conv_in = nn.Conv2d(cfg.image_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, ch * m))
                block_in = ch * m
            if i != len(mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = mid_block(block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult = cfg.base_channels, cfg.channel_mult
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, block_in, 3, padding=1)
        self.mid = mid_block(block_in)
        # up[i] is resolution level i (up[0] = full resolution); they are built and run from the
        # lowest resolution up, as in LDM which inserts each new level at the front of the list
        levels = []
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, ch * mult[i]))
                block_in = ch * mult[i]
            if i != 0:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.image_channels, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig, chunk_size: int = 2):
        super().__init__()
        self.config = cfg
        # frames per encoder/decoder pass: SD's decoder holds 0.27 GiB of float32 activations a 256x256 frame
        self.chunk_size = chunk_size
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def _check(self, t, channels, what):
        if t.ndim != 4 or t.shape[1] != channels:
            raise ValueError(f"{what} must be [N, {channels}, H, W], got shape {tuple(t.shape)}")

    def encode(self, x, chunk_size=None):
        """images [N, C, H, W] in [-1, 1] -> (mean, logvar), each [N, latent, H/f, W/f]."""
        self._check(x, self.config.image_channels, "images")
        f = self.config.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image height and width must be divisible by {f}, got {x.shape[2]}x{x.shape[3]}")
        moments = torch.cat([self.quant_conv(self.encoder(c)) for c in x.split(chunk_size or self.chunk_size)])
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # as LDM's DiagonalGaussianDistribution

    def decode(self, z, chunk_size=None):
        """unscaled latents [N, latent, h, w] -> images [N, C, h*f, w*f]."""
        self._check(z, self.config.latent_channels, "latents")
        return torch.cat([self.decoder(self.post_quant_conv(c)) for c in z.split(chunk_size or self.chunk_size)])

    def encode_video(self, video):
        """videos [B, C, F, H, W] in [-1, 1] -> (mean, logvar), each [B, latent, F, H/f, W/f]."""
        self._check_video(video)
        return tuple(batch_to_frames(m, video.shape[2]) for m in self.encode(frames_to_batch(video)))

    def decode_video(self, z):
        """unscaled latents [B, latent, F, h, w] -> videos [B, C, F, h*f, w*f]."""
        self._check_video(z)
        return batch_to_frames(self.decode(frames_to_batch(z)), z.shape[2])

    def _check_video(self, t):
        if t.ndim != 5:
            raise ValueError(f"expected a video [B, C, F, H, W], got shape {tuple(t.shape)}")


def sample(mean, logvar, generator=None, noise=None):
    """One draw from the diagonal Gaussian posterior. The noise is drawn on the CPU (from a CPU
    `generator`) and then moved, so that a seed gives the same draw on every device; or given, `noise`."""
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    return mean + torch.exp(0.5 * logvar) * noise


def config_from_state_dict(sd) -> VAEConfig:
    """Infer the config from tensor shapes (keys without the `first_stage_model.` prefix)."""
    if "encoder.conv_in.weight" not in sd:
        raise ValueError("not a VAE state dict: no 'encoder.conv_in.weight' (strip 'first_stage_model.' first)")
    base, image_channels = sd["encoder.conv_in.weight"].shape[:2]
    levels = sorted({int(m[1]) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = {int(m[1]) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    mult = tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // base for i in levels)
    return VAEConfig(base_channels=base, channel_mult=mult, num_res_blocks=len(blocks),
                     latent_channels=sd["post_quant_conv.weight"].shape[0], image_channels=image_channels)


def from_diffusers(sd):
    """Rename a diffusers `vae/diffusion_pytorch_model` state dict to our (LDM) keys."""
    ups = [int(m[1]) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))]
    if not ups:
        raise ValueError("not a diffusers VAE state dict: no 'decoder.up_blocks.*' keys")
    n = max(ups) + 1  # diffusers counts decoder levels from the lowest resolution, LDM from the highest
    rules = [
        (r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
        (r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{n - 1 - int(m[1])}.block."),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n - 1 - int(m[1])}.upsample."),
        (r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}."),
        (r"mid_block\.attentions\.0\.", "mid.attn_1."),
        (r"conv_shortcut", "nin_shortcut"),
        (r"conv_norm_out", "norm_out"),
        # attention: new names (to_q, to_out.0) and old ones (query, proj_attn)
        (r"attn_1\.group_norm\.", "attn_1.norm."),
        (r"attn_1\.(?:to_q|query)\.", "attn_1.q."),
        (r"attn_1\.(?:to_k|key)\.", "attn_1.k."),
        (r"attn_1\.(?:to_v|value)\.", "attn_1.v."),
        (r"attn_1\.(?:to_out\.0|proj_attn)\.", "attn_1.proj_out."),
    ]
    out = {}
    for key, value in sd.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", key) and value.ndim == 2:
            value = value[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
        out[key] = value
    return out
