"""The Stable Diffusion UNet (1.x and 2.x), inflated to video.

The network is the CompVis/LDM `UNetModel` with SD's settings: a sinusoidal time embedding, ResBlocks,
SpatialTransformers (self-attention, cross-attention to the text, GEGLU feed-forward) and skip connections from every
input block to its mirror output block. It takes video latents [B, C, F, h, w] and runs every 2D layer frame by
frame: the frames are folded into the batch on the way in and unfolded on the way out (video.py's `frames_to_batch`,
`batch_to_frames`). Parameter names are the official checkpoint's keys with `model.diffusion_model.` stripped, so
that SD weights load with a strict load_state_dict. The timestep is one per video ([B]) or one per frame ([B, F]):
the time embedding is added after the fold, so given frames can sit at t = 0 beside noisy ones (image-to-video,
continuation: simda.py).

Given an `adapters.SimDAConfig`, the UNet also carries SimDA's modules (adapters.py) under their own names beside the
SD ones: `attn_adapter` and `ffn_adapter` in every TransformerBlock, `temporal_adapter` at the entry of every
SpatialTransformer, and latent-shift self-attention; with its `lora_rank` > 0 (few-step distillation, not SimDA's),
a `lora` beside the projections of every Attention and the two convolutions of every ResBlock.

SD 2.x changes three things (LDM's v2 configs): heads of 64 channels instead of 8 heads per level, Linear
`proj_in`/`proj_out` instead of 1x1 convolutions (`use_linear_in_transformer`), and a 1024-wide text context;
Stability's code also computes attention in float32 under fp16/bf16 (`upcast_attention`, which our fused attention
needs no code for: see Attention). The head count is not in any weight's shape: `config_from_state_dict` takes it
from the caller (checkpoint.py states each family's rule) and checks that the widths divide.
SD's x4 upscaler adds LDM's `num_classes` (its noise level, embedded and added to the time embedding: `label_emb`,
the forward's `y`) and `disable_self_attentions` (levels whose attn1 attends to the text too; latent-shift attention
only replaces real self-attention).
"""
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from adapters import SpatialAdapter, TemporalAdapter, latent_shift, loras, with_lora
from video import batch_to_frames, frames_to_batch


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)  # levels with a SpatialTransformer (LDM: attention_resolutions 4, 2, 1)
    num_heads: int = 8  # SD 1.x: 8 heads at every level; the head width grows with the channels
    num_head_channels: int = -1  # SD 2.x: heads of 64 channels (num_heads is then unused); -1: off
    use_linear_in_transformer: bool = False  # SD 2.x: Linear proj_in/proj_out, not 1x1 convolutions
    upcast_attention: bool = False  # the family's (SD 2.x): attention in float32 under fp16/bf16; see Attention
    context_dim: int = 768
    num_classes: int = 0  # > 0: a class label embedding added to the time embedding (x4 upscaler: noise levels)
    disable_self_attentions: tuple = ()  # levels whose attn1 attends to the text instead (x4 upscaler: 1, 2)

    @classmethod
    def tiny(cls):
        return cls(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(0, 1), context_dim=128)

    @classmethod
    def sd2(cls):
        return cls(num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, upcast_attention=True,
                   context_dim=1024)

    @classmethod
    def x4_upscaler(cls):
        """SD's x4 upscaler (x4-upscaling.yaml): latents + the 3-channel low-res image in, attention from
        level 1 down, text-only attn1 at levels 1 and 2, its noise level as one of 1000 classes."""
        return cls(in_channels=7, model_channels=256, channel_mult=(1, 2, 2, 4), attention_levels=(1, 2, 3),
                   use_linear_in_transformer=True, upcast_attention=True, context_dim=1024, num_classes=1000,
                   disable_self_attentions=(1, 2))

    def heads(self, channels):
        """The number of attention heads of a transformer `channels` wide (LDM's rule)."""
        return channels // self.num_head_channels if self.num_head_channels != -1 else self.num_heads


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of the timesteps, cos first (SD's flip_sin_to_cos), computed in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def normalization(channels, eps=1e-5):
    return nn.GroupNorm(32, channels, eps=eps)


class ResBlock(nn.Module):
    def __init__(self, in_channels, out_channels, emb_dim, lora_rank=0):
        super().__init__()
        # in_layers: [0] GroupNorm [1] SiLU [2] conv
        self.in_layers = nn.Sequential(normalization(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1))
        # emb_layers: [0] SiLU [1] linear (time embedding -> a per-channel bias)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        # out_layers: [0] GroupNorm [1] SiLU [2] Dropout [3] conv
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        self.lora = loras(lora_rank, conv_in=self.in_layers[2], conv_out=self.out_layers[3])  # None: none (SD, SimDA)

    def forward(self, x, emb):
        h = with_lora(self.in_layers, self.lora, "conv_in", x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + with_lora(self.out_layers, self.lora, "conv_out", h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size):
        # `size` is the skip connection's: twice ours, or one less where a side was odd on the way down
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Attention(nn.Module):
    """Multi-head attention of the tokens x over the tokens of `context` (x itself when None).

    Always SDPA in the dtype it is given (the weights' when sampling, autocast's when training: one behaviour), on
    q/k/v whose last dimension is contiguous, so that a fused kernel runs (flash or memory-efficient on CUDA, the flash
    kernel on the CPU). SD 2.x's `upcast_attention` needs nothing more: Stability's code computes the q.k scores and
    the softmax in float32 (autocast off) and multiplies by v in the low precision, so that the scores cannot overflow
    float16; the fused kernels accumulate the scores and the softmax in float32 already, and diffusers' SDPA
    processor ignores the flag for that reason (only its classic processor upcasts q and k). `lora`: adapters.LoRA."""

    def __init__(self, dim, heads, context_dim=None, lora_rank=0):
        super().__init__()
        self.heads = heads
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))  # to_out: [0] linear [1] Dropout
        self.lora = loras(lora_rank, to_q=self.to_q, to_k=self.to_k, to_v=self.to_v, to_out=self.to_out[0])

    def forward(self, x, context=None, more_keys=None):
        """`more_keys`: a function of the projected keys (and values) whose tokens are attended to as well."""
        context = x if context is None else context
        q, k, v = (with_lora(getattr(self, n), self.lora, n, z) for n, z in (("to_q", x), ("to_k", context), ("to_v", context)))
        if more_keys is not None:
            k, v = torch.cat([k, more_keys(k)], dim=1), torch.cat([v, more_keys(v)], dim=1)
        b, n, d = q.shape
        # b n (heads d) -> b heads n d
        q, k, v = (z.reshape(b, -1, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[1](with_lora(self.to_out[0], self.lora, "to_out", out.transpose(1, 2).reshape(b, n, d)))


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return x * F.gelu(gate)
        # sampling: multiply into gelu's fresh output, one pass and no new tensor (a third faster on the CPU);
        # autograd would need the overwritten output for x's gradient, hence only without it
        return F.gelu(gate).mul_(x)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        # net: [0] GEGLU (holds the input projection) [1] Dropout [2] linear
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, feed-forward; each pre-LayerNorm and residual.
    With SimDA: latent-shift self-attention, an adapter on its output and one beside the feed-forward."""

    def __init__(self, dim, heads, context_dim, simda_config=None, disable_self_attn=False):
        super().__init__()
        # LDM's disable_self_attn (the x4 upscaler's upper levels): attn1 is a second cross-attention
        self.disable_self_attn = disable_self_attn
        rank = simda_config.lora_rank if simda_config else 0
        self.attn1 = Attention(dim, heads, context_dim if disable_self_attn else None, rank)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, context_dim, rank)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.latent_shift = bool(simda_config and simda_config.latent_shift) and not disable_self_attn
        if simda_config and simda_config.spatial_adapters:
            self.attn_adapter = SpatialAdapter(dim, simda_config.spatial_ratio, skip=True)
            self.ffn_adapter = SpatialAdapter(dim, simda_config.spatial_ratio, skip=False)
        else:
            self.attn_adapter = self.ffn_adapter = None

    def forward(self, x, context, frames, height, width, chunk=0):
        # LSA (Sec. 3.3): keys/values are the frame's own tokens and a temporal shift of earlier frames'
        # (the shift moves whole tokens, so it is applied after the k/v projections, which is cheaper).
        # The authors' code concatenates the shifted tokens of frames f-1 and f instead; we follow the paper.
        shift = (lambda z: latent_shift(z, frames, height, width)) if self.latent_shift else None
        h = self.attn1(self.norm1(x), context if self.disable_self_attn else None, more_keys=shift)
        x = x + (self.attn_adapter(h) if self.attn_adapter is not None else h)
        x = x + self.attn2(self.norm2(x), context)
        h = in_chunks(lambda z: self.ff(self.norm3(z)), chunk, x)  # token-wise: the 8x-wide GEGLU is the big one
        return x + (h + self.ffn_adapter(x) if self.ffn_adapter is not None else h)


class SpatialTransformer(nn.Module):
    def __init__(self, channels, heads, context_dim, simda_config=None, linear=False, disable_self_attn=False):
        super().__init__()
        if simda_config and simda_config.temporal_adapters:
            self.temporal_adapter = TemporalAdapter(channels, simda_config.temporal_ratio)
        else:
            self.temporal_adapter = None
        self.norm = normalization(channels, eps=1e-6)
        # SD 1.x projects with 1x1 convolutions before the tokens are laid out, SD 2.x with Linear
        # layers after: the same map, stored in different shapes.
        self.linear = linear
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, heads, context_dim, simda_config,
                                                                  disable_self_attn)])
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x, context, frames, chunk=0):
        if self.temporal_adapter is not None:
            x = frames_to_batch(self.temporal_adapter(batch_to_frames(x, frames)))
        b, c, h, w = x.shape
        z = self.norm(x)
        if self.linear:  # b c h w -> b (h w) c, then project
            z = self.proj_in(z.flatten(2).transpose(1, 2))
        else:  # project, then b c h w -> b (h w) c
            z = self.proj_in(z).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            z = block(z, context, frames, h, w, chunk)
        if self.linear:  # project, then b (h w) c -> b c h w
            z = self.proj_out(z).transpose(1, 2).reshape(b, c, h, w)
        else:
            z = self.proj_out(z.transpose(1, 2).reshape(b, c, h, w))
        return x + z


def in_chunks(fn, chunk, *tensors):
    """fn(*tensors), computed on `chunk` rows (frames) of them at a time when chunk > 0: the same result
    for a function that treats each row on its own, with a fraction of its temporaries alive at once."""
    if not 0 < chunk < tensors[0].shape[0]:
        return fn(*tensors)
    return torch.cat([fn(*parts) for parts in zip(*(t.split(chunk) for t in tensors))])


def run_block(block, h, emb, context, frames, size, checkpointing=False, chunk=0):
    """Run one input/middle/output block (a ModuleList of ResBlock, SpatialTransformer, Down/Upsample);
    `size` is where an Upsample must land. `checkpointing`: recompute the SpatialTransformer in the
    backward pass instead of keeping its activations (attention, the 8x-wide GEGLU: most of the
    memory), while the ResBlocks (the convolutions: most of the compute) keep theirs. `chunk` > 0:
    the layers that see one frame at a time run on that many frames at a time (see UNet.frame_chunk)."""
    for layer in block:
        if isinstance(layer, ResBlock):
            h = in_chunks(layer, chunk, h, emb)
        elif isinstance(layer, SpatialTransformer) and checkpointing:
            h = checkpoint(layer, h, context, frames, chunk, use_reentrant=False)
        elif isinstance(layer, SpatialTransformer):
            h = layer(h, context, frames, chunk)
        elif isinstance(layer, Upsample):
            h = layer(h, size)
        else:
            h = layer(h)
    return h


class UNet(nn.Module):
    def __init__(self, config: UNetConfig, simda_config=None):
        super().__init__()
        self.config = c = config
        self.simda_config = simda_config  # None: the plain SD UNet, run frame by frame
        self.gradient_checkpointing = False  # for training: see run_block
        # > 0: the ResBlocks and the transformers' feed-forwards run on this many frames at a time. They
        # see one frame each (only the temporal adapters and latent shift mix frames), so the result
        # is the same while their temporaries (most of the memory at the upscaler's 256x256 latents)
        # shrink.
        self.frame_chunk = 0
        mc, emb_dim, levels = c.model_channels, c.model_channels * 4, len(c.channel_mult)
        rank = simda_config.lora_rank if simda_config else 0

        def transformer(ch, level=None):
            return SpatialTransformer(ch, c.heads(ch), c.context_dim, simda_config, c.use_linear_in_transformer,
                                      level in c.disable_self_attentions)

        # time_embed: [0] linear [1] SiLU [2] linear
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if c.num_classes:
            self.label_emb = nn.Embedding(c.num_classes, emb_dim)

        self.input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(c.in_channels, mc, 3, padding=1)])])
        skip_channels, ch = [mc], mc
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [ResBlock(ch, mult * mc, emb_dim, rank)]
                ch = mult * mc
                if level in c.attention_levels:
                    layers.append(transformer(ch, level))
                self.input_blocks.append(nn.ModuleList(layers))
                skip_channels.append(ch)
            if level != levels - 1:
                self.input_blocks.append(nn.ModuleList([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle_block = nn.ModuleList([ResBlock(ch, ch, emb_dim, rank), transformer(ch), ResBlock(ch, ch, emb_dim, rank)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), mult * mc, emb_dim, rank)]
                ch = mult * mc
                if level in c.attention_levels:
                    layers.append(transformer(ch, level))
                if level != 0 and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(nn.ModuleList(layers))

        # out: [0] GroupNorm [1] SiLU [2] conv
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(ch, c.out_channels, 3, padding=1))

    def forward(self, x, t, context, y=None):
        """x [B, C, F, h, w] latents, t [B] (or a scalar) timesteps, or [B, F] (or [1, F]) one per frame (given
        frames at t = 0 beside noisy ones: image-to-video, continuation); context [B, 77, D] text states, or
        [B, F, 77, D] one per frame (prompt travel: long_video.py);
        y [B] class labels (LongTensor), for a UNet with `num_classes` (the x4 upscaler's noise level)."""
        if x.dim() != 5:
            raise ValueError(f"UNet expects video latents [B, C, F, h, w], got shape {tuple(x.shape)}")
        if (y is None) != (not self.config.num_classes):
            raise ValueError(f"this UNet has {self.config.num_classes} classes: y (class labels [B]) must be "
                             f"{'given' if self.config.num_classes else 'None'}")
        b, frames = x.shape[0], x.shape[2]
        per_frame = torch.is_tensor(t) and t.dim() == 2
        if isinstance(t, (int, float)):  # a sampler's step: filled on the device, no host-to-device copy (a sync)
            t = torch.full((b,), t, device=x.device)
        elif per_frame:
            if t.shape[1] != frames or t.shape[0] not in (1, b):
                raise ValueError(f"per-frame timesteps must be [B, F] = [{b}, {frames}] (or [1, {frames}]), "
                                 f"got shape {tuple(t.shape)}")
            t = t.to(x.device).expand(b, frames).reshape(-1)  # (b f): the frames' order in the batch
        else:
            t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b)

        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        if y is not None:
            label = self.label_emb(torch.as_tensor(y, device=x.device).reshape(-1).expand(b))
            emb = emb + (label.repeat_interleave(frames, dim=0) if per_frame else label)
        # every frame of a video shares its text, and its timestep unless each frame has its own
        if not per_frame:
            emb = emb.repeat_interleave(frames, dim=0)
        if context.dim() == 4 and tuple(context.shape[:2]) != (b, frames):
            raise ValueError(f"per-frame contexts must be [B, F, 77, D] = [{b}, {frames}, ...], got {tuple(context.shape)}")
        context = context.flatten(0, 1) if context.dim() == 4 else context.repeat_interleave(frames, dim=0)

        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        h = frames_to_batch(x)
        skips = []
        for block in self.input_blocks:
            h = run_block(block, h, emb, context, frames, None, checkpointing, self.frame_chunk)
            skips.append(h)
        h = run_block(self.middle_block, h, emb, context, frames, None, checkpointing, self.frame_chunk)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = run_block(block, h, emb, context, frames, skips[-1].shape[-2:] if skips else None, checkpointing,
                          self.frame_chunk)
        return batch_to_frames(self.out(h), frames)


def config_from_state_dict(sd, num_heads=8, num_head_channels=-1, upcast_attention=False,
                           text_only_levels=None) -> UNetConfig:
    """Infer the UNet's configuration from the shapes of its weights (keys without the checkpoint
    prefix); the heads and the attention precision, which no shape holds, are the model family's
    (checkpoint.py). `text_only_levels`: the levels whose attn1 attends to the text, as the file states
    them, for where the text is as wide as the level and the shapes cannot tell (the demo upscaler's)."""
    mc = sd["input_blocks.0.0.weight"].shape[0]
    levels = 1 + sum(1 for k in sd if re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k))
    num_input_blocks = len({k.split(".")[1] for k in sd if k.startswith("input_blocks.")})
    num_res_blocks = (num_input_blocks - levels) // levels
    context_dim = sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    channel_mult, attention_levels, disabled = [], [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)  # the level's first ResBlock
        channel_mult.append(sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0] // mc)
        if f"input_blocks.{first}.1.proj_in.weight" in sd:
            attention_levels.append(level)
            # attn1's keys come from the text where self-attention is disabled (where the text is as
            # wide as the level, shapes cannot tell: every released model has self-attention there,
            # and the file may say otherwise, `text_only_levels`)
            width = sd[f"input_blocks.{first}.1.transformer_blocks.0.attn1.to_k.weight"].shape[1]
            if width != mc * channel_mult[-1] or (width == context_dim and level in (text_only_levels or ())):
                disabled.append(level)
    widths = {mc * channel_mult[level] for level in attention_levels} | {mc * channel_mult[-1]}  # + the middle block
    rule = f"{num_head_channels}-channel heads" if num_head_channels != -1 else f"{num_heads} heads"
    if any(width % (num_head_channels if num_head_channels != -1 else num_heads) for width in widths):
        raise ValueError(f"the transformers are {sorted(widths)} channels wide, which {rule} do not divide: "
                         "not the model family these weights were taken for")
    return UNetConfig(
        in_channels=sd["input_blocks.0.0.weight"].shape[1], out_channels=sd["out.2.weight"].shape[0],
        model_channels=mc, channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
        attention_levels=tuple(attention_levels), num_heads=num_heads, num_head_channels=num_head_channels,
        use_linear_in_transformer=sd["middle_block.1.proj_in.weight"].dim() == 2, upcast_attention=upcast_attention,
        context_dim=context_dim, num_classes=sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else 0,
        disable_self_attentions=tuple(disabled))


def from_diffusers(sd):
    """Rename a diffusers `unet/` state dict to the LDM layout, by rule: blocks are numbered the
    LDM way (one input block per ResBlock or Downsample), and ResBlock parts get their LDM names."""
    num_res_blocks = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)))
    per_level = num_res_blocks + 1
    up_with_attention = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    resnet_parts = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}

    def block(m):
        kind, i, part, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        layer = 0 if part == "resnets" else 1
        if kind == "down_blocks":
            return f"input_blocks.{1 + i * per_level + j}.{layer}."
        return f"output_blocks.{i * per_level + j}.{layer}."

    out = {}
    for key, value in sd.items():
        k = re.sub(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.", block, key)
        k = re.sub(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.",
                   lambda m: f"input_blocks.{(int(m.group(1)) + 1) * per_level}.0.op.", k)
        k = re.sub(r"^up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"output_blocks.{int(m.group(1)) * per_level + num_res_blocks}."
                             f"{2 if int(m.group(1)) in up_with_attention else 1}.", k)
        k = re.sub(r"^mid_block\.resnets\.(\d+)\.", lambda m: f"middle_block.{2 * int(m.group(1))}.", k)
        k = re.sub(r"^mid_block\.attentions\.0\.", "middle_block.1.", k)
        k = re.sub(r"^time_embedding\.linear_(\d)\.", lambda m: f"time_embed.{2 * int(m.group(1)) - 2}.", k)
        k = re.sub(r"^conv_in\.", "input_blocks.0.0.", k)
        k = re.sub(r"^class_embedding\.weight$", "label_emb.weight", k)
        k = re.sub(r"^conv_norm_out\.", "out.0.", k)
        k = re.sub(r"^conv_out\.", "out.2.", k)
        if re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+\.)?\d+\.[a-z_0-9]+\.(weight|bias)$", k):
            k = re.sub(r"\.(norm1|conv1|time_emb_proj|norm2|conv2|conv_shortcut)\.(weight|bias)$",
                       lambda m: f".{resnet_parts[m.group(1)]}.{m.group(2)}", k)
        out[k] = value
    return out
