"""I3D, the Kinetics-400 action classifier whose features FVD compares (Unterthiner et al. 2018).

I3D is Inception-v1 inflated to 3D (Carreira & Zisserman 2017, "Quo Vadis, Action Recognition?").
The weights are DeepMind's TF-Hub Kinetics-400 model as converted to PyTorch in the file
`i3d_pretrained_400.pt` that VideoGPT, TATS and cd-fvd load: a plain state dict, whose keys are our
parameter names. It is read with checkpoint.read_state_dict, which unpickles nothing but tensors.

The FVD feature of a video is the network's 400 logits averaged over time. BatchNorm's epsilon is
1e-5, as in that conversion; the TF original (Sonnet) used 1e-3. We follow the conversion whose
weights we load (docs/metrics.md says how far the choice moves features and FVD).

Every convolution and max pool pads as TF's "SAME" does: the padding is computed from the input size
and the stride, and an odd pixel of padding goes on the far side. After Mixed_5c: a 2x7x7 average
pool with stride 1, the 1x1x1 logits convolution (dropout is the identity at inference) and the
mean over the time steps left.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint

SIZE = 224  # the frame size I3D was trained at; its 7x7 average pool assumes it
MIN_FRAMES = 9  # time strides 2, 2, 2 leave ceil(F / 8) steps, and the average pool needs 2
BATCH_NORM_EPS = 1e-5  # the PyTorch conversion's; TF's Sonnet used 1e-3
EXPECTED_LAYOUT = ("the I3D state dict i3d_pretrained_400.pt of VideoGPT/TATS (keys Conv3d_1a_7x7.conv3d.weight, "
                   "Conv3d_1a_7x7.bn.running_var, Mixed_3b.b1b.conv3d.weight, ..., logits.conv3d.weight, "
                   "logits.conv3d.bias)")


def pad_same(x, kernel, stride):
    """Pad [B, C, T, H, W] as TF's "SAME": the output has ceil(size / stride) steps per dimension."""
    pads = []
    for size, k, s in zip(x.shape[2:], kernel, stride):
        total = max(k - (s if size % s == 0 else size % s), 0)
        pads.append((total // 2, total - total // 2))  # the odd pixel at the end
    return F.pad(x, [p for pair in reversed(pads) for p in pair])  # F.pad lists the last dimension first


class ConvUnit(nn.Module):
    """Convolution with "SAME" padding, then BatchNorm and ReLU; the logits unit is a convolution with a bias only."""

    def __init__(self, in_channels, out_channels, kernel=(1, 1, 1), stride=(1, 1, 1), logits=False):
        super().__init__()
        self.kernel, self.stride, self.logits = kernel, stride, logits
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride, bias=logits)
        if not logits:
            self.bn = nn.BatchNorm3d(out_channels, eps=BATCH_NORM_EPS)

    def forward(self, x):
        x = self.conv3d(pad_same(x, self.kernel, self.stride))
        return x if self.logits else F.relu(self.bn(x))


class MaxPoolSame(nn.Module):
    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x):
        # zero padding is harmless: the inputs are ReLU outputs (>= 0), so TF's ignored padding is matched
        return F.max_pool3d(pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class Inception(nn.Module):
    """Four branches side by side, concatenated along the channels."""
    # b0: 1x1 | b1a, b1b: 1x1 then 3x3x3 | b2a, b2b: 1x1 then 3x3x3 | b3a, b3b: 3x3x3 max pool then 1x1
    # widths: the output channels of b0, b1a, b1b, b2a, b2b, b3b

    def __init__(self, in_channels, widths):
        super().__init__()
        self.b0 = ConvUnit(in_channels, widths[0])
        self.b1a, self.b1b = ConvUnit(in_channels, widths[1]), ConvUnit(widths[1], widths[2], (3, 3, 3))
        self.b2a, self.b2b = ConvUnit(in_channels, widths[3]), ConvUnit(widths[3], widths[4], (3, 3, 3))
        self.b3a, self.b3b = MaxPoolSame((3, 3, 3), (1, 1, 1)), ConvUnit(in_channels, widths[5])
        self.out_channels = widths[0] + widths[2] + widths[4] + widths[5]

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class I3D(nn.Module):
    """Videos [B, 3, F, 224, 224] in [-1, 1], F >= 9 -> logits [B, num_classes], averaged over time."""

    def __init__(self, num_classes=400):
        super().__init__()
        # registered in the order the data flows through them (forward relies on it); kernels are (t, h, w)
        self.Conv3d_1a_7x7 = ConvUnit(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = ConvUnit(64, 64)
        self.Conv3d_2c_3x3 = ConvUnit(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        self.Mixed_3b = Inception(192, (64, 96, 128, 16, 32, 32))
        self.Mixed_3c = Inception(256, (128, 128, 192, 32, 96, 64))
        self.MaxPool3d_4a_3x3 = MaxPoolSame((3, 3, 3), (2, 2, 2))
        self.Mixed_4b = Inception(480, (192, 96, 208, 16, 48, 64))
        self.Mixed_4c = Inception(512, (160, 112, 224, 24, 64, 64))
        self.Mixed_4d = Inception(512, (128, 128, 256, 24, 64, 64))
        self.Mixed_4e = Inception(512, (112, 144, 288, 32, 64, 64))
        self.Mixed_4f = Inception(528, (256, 160, 320, 32, 128, 128))
        self.MaxPool3d_5a_2x2 = MaxPoolSame((2, 2, 2), (2, 2, 2))
        self.Mixed_5b = Inception(832, (256, 160, 320, 32, 128, 128))
        self.Mixed_5c = Inception(832, (384, 192, 384, 48, 128, 128))
        self.logits = ConvUnit(1024, num_classes, logits=True)

    def forward(self, x):
        if x.dim() != 5 or x.shape[1] != 3 or tuple(x.shape[3:]) != (SIZE, SIZE):
            raise ValueError(f"I3D takes videos [B, 3, F, {SIZE}, {SIZE}] (see i3d.preprocess), got {list(x.shape)}")
        if x.shape[2] < MIN_FRAMES:
            raise ValueError(f"I3D needs at least {MIN_FRAMES} frames (its pooling over time), got {x.shape[2]}; "
                             f"FVD is usually computed on 16")
        for name, layer in self.named_children():
            if name != "logits":
                x = layer(x)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # space is 7x7 by now: [B, 1024, T - 1, 1, 1]
        return self.logits(x).flatten(2).mean(dim=2)  # B classes (T - 1) -> B classes


def preprocess(videos):
    """uint8 videos [B, F, H, W, 3] (numpy or torch) -> float32 [B, 3, F, 224, 224] in [-1, 1].

    TATS's and cd-fvd's FVD protocol, which the weights come with: every frame resized to 224x224
    (bilinear, no antialiasing), so a non-square video is stretched, not cropped. VideoGPT instead
    resizes the short side and crops the centre: the same for square videos, a protocol knob that
    changes FVD for others (crop your videos first to follow it)."""
    videos = videos if isinstance(videos, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(videos))
    if videos.dtype != torch.uint8 or videos.dim() != 5 or videos.shape[-1] != 3 or 0 in videos.shape[2:4]:
        raise ValueError(f"expected uint8 videos [B, F, H, W, 3], got {videos.dtype} {list(videos.shape)}")
    b, f, h, w, _ = videos.shape
    x = videos.reshape(b * f, h, w, 3).permute(0, 3, 1, 2).float()  # (B F) 3 H W
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (x / 255 * 2 - 1).reshape(b, f, 3, SIZE, SIZE).transpose(1, 2).contiguous()  # B 3 F H W


def load_i3d(path, device="cpu", dtype=torch.float32) -> I3D:
    """I3D with the weights of `i3d_pretrained_400.pt` (or the same tensors as .safetensors), loaded
    strictly (every weight and statistic; the BatchNorm counters `num_batches_tracked` may be absent), in
    eval mode on `device` in `dtype`."""
    if checkpoint.is_torchscript(path):  # e.g. StyleGAN-V's i3d_torchscript.pt: another key layout
        raise checkpoint.CheckpointError(
            f"{path} is a TorchScript archive, not the expected layout: need {EXPECTED_LAYOUT}. Converting a "
            f"TorchScript I3D with torch.save(torch.jit.load(p).state_dict(), out) does not give these keys")
    sd = checkpoint.read_state_dict(path)
    weight = sd.get("logits.conv3d.weight")
    model = I3D(weight.shape[0] if weight is not None and weight.dim() == 5 else 400)
    # BatchNorm's step counter plays no part in evaluation, and files saved before PyTorch 0.4.1 (or
    # converted without a BatchNorm module) lack it: fill it in, as torch's own BatchNorm loader does
    counters = {k: v for k, v in model.state_dict().items() if k.endswith(".num_batches_tracked") and k not in sd}
    sd = {**sd, **counters}
    if problems := checkpoint.key_problems(model.state_dict(), sd):
        raise checkpoint.CheckpointError(f"{path} does not fit: expected {EXPECTED_LAYOUT}; "
                                         + "; ".join(problems))
    model.load_state_dict(sd)  # strict: every key checked above
    return model.to(device, dtype).eval()


@torch.no_grad()
def features(model, videos, batch_size=8, progress=None):
    """uint8 videos [N, F, H, W, 3] -> FVD features [N, num_classes] (float64 numpy), preprocessed a
    batch at a time (all N at 224x224 in float32 would not fit in memory). `progress`: a
    runtime.Progress, shown the count of videos done after each batch."""
    parameter = next(model.parameters())
    out = [np.zeros((0, model.logits.conv3d.out_channels))]
    for start in range(0, len(videos), batch_size):
        x = preprocess(videos[start:start + batch_size]).to(parameter.device, parameter.dtype)
        out.append(model(x).double().cpu().numpy())
        if progress is not None:
            progress.show(min(start + batch_size, len(videos)))
    return np.concatenate(out)
