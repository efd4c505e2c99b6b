"""Scores of generated videos against their truth, for the super-resolution stage (evaluate.py sr).

Every function takes uint8 videos [B, F, H, W, 3] (what the pipelines return; numpy or torch) and
the true videos of the same shape, and returns one float64 number per video:
- `psnr`: peak signal-to-noise ratio in dB over all the video's pixels (peak 255).
- `ssim`: structural similarity (Wang et al. 2004) with its usual constants: an 11-tap Gaussian
  window of sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, population (co)variances, over the positions
  where the window fits; the mean over frames, colour channels and positions.
- `flicker`: temporal flicker, the mean absolute difference (in levels) between the video's
  frame-to-frame changes and the truth's: 0 when the video changes exactly as the truth does,
  whatever its per-frame error; a frame-by-frame model that redraws details differently in every
  frame scores high.
"""
import numpy as np
import torch
import torch.nn.functional as F


def as_videos(videos, truth):
    """Both as float64 tensors [B, F, H, W, 3], checked to match."""
    videos, truth = (torch.as_tensor(np.asarray(v)) for v in (videos, truth))
    if videos.shape != truth.shape or videos.dim() != 5 or videos.shape[-1] != 3:
        raise ValueError(f"need videos and truth of one shape [B, F, H, W, 3], got {list(videos.shape)} and "
                         f"{list(truth.shape)}")
    return videos.double(), truth.double()


def psnr(videos, truth):
    videos, truth = as_videos(videos, truth)
    mse = ((videos - truth) ** 2).mean(dim=(1, 2, 3, 4))
    return (10 * torch.log10(255.0 ** 2 / mse.clamp(min=1e-10))).numpy()


def gaussian_window(size=11, sigma=1.5):
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return w / w.sum()


def ssim(videos, truth, k1=0.01, k2=0.03, peak=255.0):
    videos, truth = as_videos(videos, truth)
    b = videos.shape[0]
    # b f h w c -> (b f c) 1 h w: every channel of every frame is one image
    x, y = (v.permute(0, 1, 4, 2, 3).reshape(-1, 1, *v.shape[2:4]) for v in (videos, truth))
    w = gaussian_window()

    def blur(z):  # separable Gaussian, 'valid' positions only
        z = F.conv2d(z, w.view(1, 1, -1, 1))
        return F.conv2d(z, w.view(1, 1, 1, -1))

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (k1 * peak) ** 2, (k2 * peak) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.reshape(b, -1).mean(1).numpy()


def flicker(videos, truth):
    videos, truth = as_videos(videos, truth)
    if videos.shape[1] < 2:
        raise ValueError(f"flicker needs at least 2 frames, got {videos.shape[1]}")
    change = videos.diff(dim=1) - truth.diff(dim=1)
    return change.abs().mean(dim=(1, 2, 3, 4)).numpy()
