"""I3D (Carreira & Zisserman 2017, "Quo Vadis, Action Recognition?"): the Kinetics-400 action
classifier whose features FVD compares (Unterthiner et al. 2018).

The weights are the PyTorch conversion of DeepMind's TF-Hub model that VideoGPT, TATS and cd-fvd
load, `i3d_pretrained_400.pt`: a plain state dict, read here without unpickling anything else
(checkpoint.read_state_dict). Parameter names are that file's keys. Its BatchNorm epsilon is 1e-5,
where the TF original (Sonnet) used 1e-3: we follow the conversion whose weights we load (README:
"The paper's metrics" says how far the choice moves features and FVD).

Network: Inception-v1 inflated to 3D. Every convolution and max pool pads as TF's "SAME" does
(the padding computed from the input size and the stride, the odd pixel on the far side); after
Mixed_5c a 2x7x7 average pool, the 1x1x1 logits convolution, and the mean over the remaining time
steps. FVD's feature is that [400] vector of logits (VideoGPT's protocol).

Input: `preprocess` makes [B, 3, F, 224, 224] in [-1, 1] from uint8 videos as TATS and cd-fvd do:
every frame resized to 224x224 (bilinear, no antialiasing), so a non-square video is stretched, not
cropped; crop it first where a protocol says so.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CheckpointError, key_problems, read_state_dict

SIZE = 224
MIN_FRAMES = 9  # three stride-2 poolings in time, then a 2-frame average: ceil(F / 8) >= 2
BATCH_NORM_EPS = 1e-5  # the PyTorch conversion's; TF's Sonnet used 1e-3


def same_padding(x, kernel, stride):
    """Pad [B, C, T, H, W] as TF's "SAME": output size ceil(input / stride), the extra pixel at the end."""
    pad = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):  # F.pad wants w, h, t
        total = max(k - (s if size % s == 0 else size % s), 0)
        pad += [total // 2, total - total // 2]
    return F.pad(x, pad)


class Unit3D(nn.Module):
    """Convolution ("SAME" padding) -> BatchNorm -> ReLU; the logits unit: a convolution with bias only."""

    def __init__(self, in_channels, out_channels, kernel=(1, 1, 1), stride=(1, 1, 1), logits=False):
        super().__init__()
        self.kernel, self.stride, self.logits = kernel, stride, logits
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride, bias=logits)
        if not logits:
            self.bn = nn.BatchNorm3d(out_channels, eps=BATCH_NORM_EPS)

    def forward(self, x):
        x = self.conv3d(same_padding(x, self.kernel, self.stride))
        return x if self.logits else F.relu(self.bn(x))


class MaxPool3dSame(nn.Module):
    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x):
        # zeros padded before a max pool of ReLU outputs (>= 0) change nothing, as in TF
        return F.max_pool3d(same_padding(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionModule(nn.Module):
    # b0: 1x1 | b1a, b1b: 1x1 then 3x3x3 | b2a, b2b: 1x1 then 3x3x3 | b3b: a 3x3x3 max pool then 1x1
    def __init__(self, in_channels, widths):
        super().__init__()
        self.b0 = Unit3D(in_channels, widths[0])
        self.b1a, self.b1b = Unit3D(in_channels, widths[1]), Unit3D(widths[1], widths[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(in_channels, widths[3]), Unit3D(widths[3], widths[4], (3, 3, 3))
        self.b3a, self.b3b = MaxPool3dSame((3, 3, 3), (1, 1, 1)), Unit3D(in_channels, widths[5])

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


# (name, output widths of b0, b1a, b1b, b2a, b2b, b3b) of the inception modules, in order
MIXED = [("Mixed_3b", (64, 96, 128, 16, 32, 32)), ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
         ("Mixed_4b", (192, 96, 208, 16, 48, 64)), ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
         ("Mixed_4d", (128, 128, 256, 24, 64, 64)), ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
         ("Mixed_4f", (256, 160, 320, 32, 128, 128)), ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
         ("Mixed_5c", (384, 192, 384, 48, 128, 128))]
POOL_BEFORE = {"Mixed_3b": ((1, 3, 3), (1, 2, 2)), "Mixed_4b": ((3, 3, 3), (2, 2, 2)),
               "Mixed_5b": ((2, 2, 2), (2, 2, 2))}  # MaxPool3d_3a_3x3, _4a_3x3, _5a_2x2: (kernel, stride)


class I3D(nn.Module):
    """Videos [B, 3, F, 224, 224] in [-1, 1] (F >= 9) -> logits [B, num_classes], averaged over time."""

    def __init__(self, num_classes=400):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.pools = nn.ModuleDict({name: MaxPool3dSame(*kernel_stride) for name, kernel_stride in POOL_BEFORE.items()})
        channels = 192
        for name, widths in MIXED:
            self.add_module(name, InceptionModule(channels, widths))
            channels = widths[0] + widths[2] + widths[4] + widths[5]
        self.logits = Unit3D(channels, num_classes, logits=True)

    def forward(self, x):
        if x.dim() != 5 or x.shape[1] != 3 or tuple(x.shape[3:]) != (SIZE, SIZE):
            raise ValueError(f"I3D takes videos [B, 3, F, {SIZE}, {SIZE}] (i3d.preprocess), got {tuple(x.shape)}")
        if x.shape[2] < MIN_FRAMES:
            raise ValueError(f"I3D needs at least {MIN_FRAMES} frames (its pooling over time), got {x.shape[2]}; "
                             "FVD is usually computed on 16")
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(self.MaxPool3d_2a_3x3(self.Conv3d_1a_7x7(x))))
        for name, _ in MIXED:
            if name in POOL_BEFORE:
                x = self.pools[name](x)
            x = getattr(self, name)(x)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # 7x7 is all that is left of space
        return self.logits(x).mean(dim=(2, 3, 4))  # b classes t 1 1 -> b classes


def preprocess(videos):
    """uint8 videos [B, F, H, W, 3] -> float32 [B, 3, F, 224, 224] in [-1, 1] (TATS's resize)."""
    videos = torch.as_tensor(np.asarray(videos))
    if videos.dtype != torch.uint8 or videos.dim() != 5 or videos.shape[-1] != 3:
        raise ValueError(f"expected uint8 videos [B, F, H, W, 3], found {videos.dtype} {list(videos.shape)}")
    b, f, h, w, _ = videos.shape
    x = videos.reshape(b * f, h, w, 3).permute(0, 3, 1, 2).float()  # (b f) h w c -> (b f) c h w
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (2 * x / 255 - 1).reshape(b, f, 3, SIZE, SIZE).transpose(1, 2)  # b f c h w -> b c f h w


def load_i3d(path, device="cpu", dtype=torch.float32) -> I3D:
    """I3D from `i3d_pretrained_400.pt` (or the same tensors as .safetensors), strict, in eval mode."""
    sd = read_state_dict(path)
    if "logits.conv3d.weight" not in sd:
        raise CheckpointError(f"{path} is not the I3D of i3d_pretrained_400.pt (VideoGPT/TATS layout: "
                              f"Conv3d_1a_7x7.conv3d.weight, Mixed_3b.b0.conv3d.weight, ..., logits.conv3d.weight); "
                              f"found keys like {sorted(sd)[:3]}")
    model = I3D(sd["logits.conv3d.weight"].shape[0])
    if problems := key_problems(model.state_dict(), sd):
        raise CheckpointError(f"{path} does not fit the I3D network:\n  " + "\n  ".join(problems))
    model.load_state_dict(sd, strict=True)
    return model.to(device, dtype).eval()


@torch.no_grad()
def features(model, videos, batch_size=8, progress=None):
    """uint8 videos [N, F, H, W, 3] -> FVD features [N, num_classes], float64; preprocessed a batch at a
    time. `progress` (runtime.Progress) counts videos."""
    param = next(model.parameters())
    out = []
    for i in range(0, len(videos), batch_size):
        x = preprocess(videos[i:i + batch_size]).to(param.device, param.dtype)
        out.append(model(x).double().cpu())
        if progress:
            progress.show(min(i + batch_size, len(videos)))
    return torch.cat(out).numpy()
