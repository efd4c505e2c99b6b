"""What a video is in this project: the tensor layout, the shapes a model can make, and the files.

Videos are [B, C, F, H, W] tensors (latents: [B, 4, F, h, w]). The image layers of SD (the VAE, the
UNet's ResBlocks and attention) see the frames folded into the batch, (b f) c h w; `frames_to_batch`
and `batch_to_frames` are the one place where that fold happens. A clip read from a file
(data.read_clip) is [F, C, H, W], one frame after another; `stack_clips` makes a batch of them.

`check_shape` is the one rule for a video's shape, used by every script before a model loads and by
the pipeline after: at least one frame, and sides that are positive multiples of the VAE's
downsampling factor (8 for SD; the UNet takes any latent size). `resolve_shape` applies it to the
command lines' --frames/--size/--width/--height.
"""
import os
import re

import imageio.v2 as imageio
import numpy as np
import torch
from PIL import Image

DEFAULT_FRAMES, DEFAULT_SIZE, DEFAULT_FPS = 16, 256, 8
SD_FACTOR = 8  # SD's VAE downsamples by 8: what the command lines check before any model is loaded


def frames_to_batch(x):
    # b c f h w -> (b f) c h w
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def batch_to_frames(x, frames):
    # (b f) c h w -> b c f h w
    bf, c, h, w = x.shape
    return x.reshape(bf // frames, frames, c, h, w).permute(0, 2, 1, 3, 4)


def resample(videos, factor):
    """Videos [B, C, F, H, W] in [-1, 1] scaled by `factor` (0.25: the x4 upscaler's low-res input; 4:
    bicubic upsampling, the baseline it must beat), frame by frame, bicubic with antialiasing, clamped."""
    frames = frames_to_batch(videos.float())
    out = torch.nn.functional.interpolate(frames, scale_factor=factor, mode="bicubic", antialias=factor < 1)
    return batch_to_frames(out, videos.shape[2]).clamp(-1, 1)


def stack_clips(clips):
    """Clips [F, C, H, W] -> one batch [B, C, F, H, W]."""
    # b f c h w -> b c f h w
    return torch.stack(list(clips)).transpose(1, 2)


def check_shape(frames, height, width, factor=SD_FACTOR, why="the VAE's downsampling factor"):
    if frames < 1:
        raise ValueError(f"--frames must be at least 1, got {frames}")
    if height < 1 or width < 1 or height % factor or width % factor:
        raise ValueError(f"video size {width}x{height} (width x height): both must be positive multiples of "
                         f"{factor}, {why}")


def resolve_shape(frames=None, size=None, height=None, width=None, defaults=(DEFAULT_FRAMES, DEFAULT_SIZE, DEFAULT_SIZE)):
    """(frames, height, width) from the flags, else `defaults` (frames, height, width), e.g. what an
    adapter file was trained with; checked with `check_shape`."""
    if size is not None and (width is not None or height is not None):
        raise ValueError("give either --size or --width/--height, not both")
    frames = int(frames if frames is not None else defaults[0])
    height = int(next(v for v in (size, height, defaults[1]) if v is not None))
    width = int(next(v for v in (size, width, defaults[2]) if v is not None))
    check_shape(frames, height, width)
    return frames, height, width


def to_uint8(images):
    """Images in [-1, 1] -> uint8 levels 0..255 (rounded, clipped), same shape."""
    return ((images + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)


def to_frames(videos):
    """Videos [B, 3, F, H, W] in [-1, 1] -> uint8 frames [B, F, H, W, 3] on the CPU (what pipelines return)."""
    return to_uint8(videos).cpu().permute(0, 2, 3, 4, 1)  # b 3 f H W -> b f H W 3


def as_frames(frames):
    """uint8 frames [F, H, W, 3] as a numpy array, checked."""
    frames = np.asarray(frames.cpu() if isinstance(frames, torch.Tensor) else frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    return frames


def check_output(path):
    if os.path.splitext(path)[1].lower() not in (".gif", ".mp4"):
        raise ValueError(f"cannot write {path!r}: the output must end in .gif or .mp4")


def save_video(frames, path, fps=DEFAULT_FPS):
    """uint8 frames [F, H, W, 3] -> a looping GIF (Pillow; identical consecutive frames are merged, the
    timing kept) or an H.264 MP4 (imageio-ffmpeg; H and W must be even), chosen by the extension."""
    frames = as_frames(frames)
    check_output(path)
    if path.lower().endswith(".gif"):
        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        return
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"an MP4 (H.264, yuv420p) needs an even width and height, got {width}x{height}: "
                         f"write a .gif instead")
    # FFMPEG: imageio-ffmpeg's plugin; macro_block_size=1 keeps the size (else it resizes to multiples of 16)
    with imageio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p",
                            macro_block_size=1) as writer:
        for f in frames:
            writer.append_data(f)


def save_grid(frames, path):
    """The frames side by side, left to right, as one PNG strip."""
    Image.fromarray(np.concatenate(list(as_frames(frames)), axis=1)).save(path)


def output_paths(out, prompts):
    """One video per prompt: `out` itself for one prompt, else `<stem>-<index>-<slug><ext>`."""
    if len(prompts) == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    slugs = [re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-")[:40] or "prompt" for p in prompts]
    return [f"{stem}-{i:02d}-{slug}{ext}" for i, slug in enumerate(slugs)]
