"""SimDA's new modules (Xing et al., 2023, Sec. 3.3): the spatial and temporal adapters and
latent-shift attention. unet.py wires them into the SD UNet under their own names, beside the SD
modules, so the SD checkpoint keys load unchanged:
- SpatialAdapter: a bottleneck MLP after the self-attention of every transformer block (residual,
  `attn_adapter`) and one beside its feed-forward (`ffn_adapter`);
- TemporalAdapter: 1x1x1 down-projection, depth-wise 3x1x1 convolution over time, 1x1x1
  up-projection, residual (`temporal_adapter`), one before every SpatialTransformer;
- latent_shift: the self-attention of each frame also attends to a patch-wise temporal shift of
  earlier frames' tokens (latent-shift attention, LSA); it adds no parameters.
- LoRA (not SimDA's; only with `lora_rank` > 0): a low-rank update beside every attention projection and
  ResBlock convolution of the frozen SD (`lora`), the extra capacity few-step distillation may take
  (train.py --distill --lora-rank; LCM-LoRA's layers).
The up-projections start at zero, so a fresh SimDA UNet computes what the SD UNet computes.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTER_NAMES = ("attn_adapter", "ffn_adapter", "temporal_adapter", "lora")
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
    lora_rank: int = 0              # > 0: a LoRA of this rank beside the frozen SD's layers (distillation); 0: none


def latent_shift(tokens, frames, height, width):
    """Patch-level temporal shift of the tokens [(b f), h*w, c] (row-major positions): every token
    is replaced by the same position's token SHIFT_TABLE[i % 4][j % 4] frames earlier."""
    bf, n, c = tokens.shape
    source, positions = shift_index(frames, height, width, tokens.device)
    # (b f) n c -> b f n c
    tokens = tokens.reshape(bf // frames, frames, n, c)
    return tokens[:, source, positions].reshape(bf, n, c)


_SHIFT_INDEX = {}  # (frames, height, width, device) -> shift_index's tensors


def shift_index(frames, height, width, device):
    """(source [f, h*w]: the frame each token is read from, positions [1, h*w]), latent_shift's gather
    index. Built from the Python table once per shape and device, then cached: building it is a
    host-to-device copy, which on a GPU waits for every queued kernel, 32 times in an SD-1.5 forward.
    Not cached while torch.compile traces (the graph keeps it as a constant) or under a FakeTensorMode
    (memory estimates: its fake tensors must not outlive the mode)."""
    # is_compiling first: dynamo cannot trace the dispatch-mode query (it would break the graph)
    if torch.compiler.is_compiling() or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE):
        return _build_shift_index(frames, height, width, device)
    key = (frames, height, width, torch.device(device))
    if key not in _SHIFT_INDEX:
        _SHIFT_INDEX[key] = _build_shift_index(frames, height, width, device)
    return _SHIFT_INDEX[key]


def _build_shift_index(frames, height, width, device):
    table = torch.tensor(SHIFT_TABLE, device=device)
    rows, cols = torch.arange(height, device=device) % 4, torch.arange(width, device=device) % 4
    shift = table[rows[:, None], cols[None, :]].reshape(height * width)
    frame = torch.arange(frames, device=device)[:, None]
    source = frame - shift[None]  # [f, n]
    source = torch.where(source >= 0, source, frame)  # a frame earlier than its shift keeps its own token
    return source, torch.arange(height * width, device=device)[None]


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


class LoRA(nn.Module):
    """A low-rank update of a frozen layer (Hu et al. 2021), added to its output: for a Linear, linears
    d_in -> rank -> d_out; for a Conv2d, the layer's own kernel d_in -> rank, then a 1x1 conv rank -> d_out (the
    usual conv form). No biases; the up-projection starts at zero, so the layer starts unchanged."""

    def __init__(self, layer, rank):
        super().__init__()
        if isinstance(layer, nn.Linear):
            self.down = nn.Linear(layer.in_features, rank, bias=False)
            self.up = nn.Linear(rank, layer.out_features, bias=False)
        else:
            self.down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, bias=False)
            self.up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        self.down.reset_parameters()
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.up(self.down(x))


def loras(rank, **layers):
    """The `lora` of a module: a LoRA of `rank` beside each named layer (a ModuleDict), or None for rank 0."""
    return nn.ModuleDict({name: LoRA(layer, rank) for name, layer in layers.items()}) if rank else None


def with_lora(layer, lora, name, x):
    """The frozen layer's output on x, plus that of its LoRA lora[name] (lora None: none). `layer` may be a
    Sequential ending in the layer (a ResBlock's GroupNorm, SiLU, conv): the LoRA sees what the last one sees."""
    if lora is None:
        return layer(x)
    if isinstance(layer, nn.Sequential):
        *before, layer = layer
        for first in before:
            x = first(x)
    return layer(x) + lora[name](x)


def is_adapter_key(key):
    return any(f"{name}." in key for name in ADAPTER_NAMES)


def adapter_state_dict(unet):
    """The adapters' weights only (keys as in the UNet's state dict)."""
    return {k: v for k, v in unet.state_dict().items() if is_adapter_key(k)}


def adapter_modules(model):
    return [m for m in model.modules() if isinstance(m, (SpatialAdapter, TemporalAdapter, LoRA))]


def cast_adapters(model, dtype):
    """The adapters' parameters in `dtype`, in place (through .data: Module.to cannot swap the fake tensors of
    bench.py --memory)."""
    for m in adapter_modules(model):
        for p in m.parameters():
            p.data = p.data.to(dtype)


def reset_adapters(model):
    """Fresh initialisation of every adapter in `model` (after a load that did not hold them)."""
    for m in adapter_modules(model):
        m.reset_parameters()


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
