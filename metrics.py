"""Scores of generated videos.

Against their truth, for the super-resolution stage (evaluate.py sr): each function takes uint8
videos [B, F, H, W, 3] (what the pipelines return; numpy or torch) and the true videos of the same
shape, and returns one float64 number per video:
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


def unit_embeddings(x, what, dims):
    x = np.asarray(x, np.float64)
    if x.ndim != dims:
        raise ValueError(f"expected {what}, found an array of shape {list(x.shape)}")
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clipsim(image_embeddings, text_embeddings):
    """[N, F, D] frame embeddings and [N, D] caption embeddings -> [N] mean cosine per video."""
    images = unit_embeddings(image_embeddings, "frame embeddings [N, F, D]", 3)
    texts = unit_embeddings(text_embeddings, "caption embeddings [N, D]", 2)
    if images.shape[0] != texts.shape[0] or images.shape[2] != texts.shape[1]:
        raise ValueError(f"{images.shape[0]} videos of {images.shape[2]}-wide embeddings but {texts.shape[0]} "
                         f"captions of {texts.shape[1]}-wide ones")
    return np.einsum("nfd,nd->nf", images, texts).mean(axis=1)


def frame_consistency(image_embeddings):
    """[N, F, D] frame embeddings -> [N] mean cosine over the F (F - 1) ordered pairs of distinct
    frames, x100."""
    x = unit_embeddings(image_embeddings, "frame embeddings [N, F, D]", 3)
    frames = x.shape[1]
    if frames < 2:
        raise ValueError(f"frame consistency needs at least 2 frames, got {frames}")
    cosines = np.einsum("nfd,ngd->nfg", x, x)
    off_diagonal = cosines.sum(axis=(1, 2)) - np.trace(cosines, axis1=1, axis2=2)
    return 100 * off_diagonal / (frames * (frames - 1))


def symmetric_sqrt(matrix):
    """The positive semi-definite square root of a symmetric matrix (negative round-off eigenvalues -> 0)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T


def frechet_distance(features_a, features_b):
    """Frechet distance between Gaussians fitted to two feature sets [N, D] (N >= 2 each)."""
    a, b = (np.asarray(f, np.float64) for f in (features_a, features_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two feature sets [N, D] of one width, got {list(a.shape)} and {list(b.shape)}")
    if min(len(a), len(b)) < 2:
        raise ValueError(f"a Frechet distance needs at least 2 videos in each set (a covariance), got {len(a)} and "
                         f"{len(b)}")
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = (np.atleast_2d(np.cov(f, rowvar=False, ddof=1)) for f in (a, b))
    root_a = symmetric_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)
