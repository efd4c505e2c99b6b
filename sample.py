"""Text-to-video sampling with SD 1.x + SimDA adapters, and one-shot video editing (SimDA Sec. 3.4).

    python sample.py "a dog surfing" --adapters out/adapters.safetensors --out dog.gif
    python sample.py "a jeep car is moving on the snow" --edit clip.mp4 --adapters out/adapters.safetensors

Sampling is DDIM (ddim.py) with classifier-free guidance: the conditional and the unconditional
(negative prompt) noise predictions come from one batched UNet call. The starting noise is drawn on
the CPU from a generator seeded with --seed and then moved, so the same seed on the same device
gives the same video. Editing (Tune-A-Video style) encodes a clip with the VAE, DDIM-inverts its
latents under the source prompt, and samples from those latents with the new prompt.

Library use (notebooks): `frames = generate(pipe, "a dog surfing", frames=16)` -> uint8 [B, F, H, W, 3];
`save_video(frames[0], "dog.gif")`.
"""
import argparse
import os
import re
import sys
import time

import imageio.v2 as imageio
import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import ddim
import simda
from unet import batch_to_frames, frames_to_batch
from vae import LATENT_SCALE

DEFAULT_FRAMES, DEFAULT_SIZE, DEFAULT_FPS = 16, 256, 8


def pick_device(name="auto"):
    """auto: CUDA if present, else Apple MPS, else the CPU."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(kind for kind, ok in available.items() if ok))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if not available.get(device.type, True):
        raise ValueError(f"--device {name}: {device.type} is not available in this torch build or on this machine")
    return device


def pick_dtype(name, device):
    """auto: float16 on CUDA, float32 elsewhere (CPU half kernels are slow, MPS half is fragile)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def size_factor(pipe):
    """Pixel sizes must be multiples of the VAE's downsampling (SD: 8); the UNet takes any latent size."""
    return pipe.vae.config.downsample_factor


def check_size(pipe, frames, height, width):
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    factor = size_factor(pipe)
    if height < 1 or width < 1 or height % factor or width % factor:
        raise ValueError(f"video size {width}x{height} (width x height) does not fit this model: both must be "
                         f"positive multiples of {factor}, the VAE's downsampling factor")


class Progress:
    """One self-overwriting line on stderr: `what i/n, it/s, ETA`."""

    def __init__(self, what, total, enabled=True):
        self.what, self.total, self.enabled, self.done, self.start = what, total, enabled, 0, time.time()

    def tick(self):
        self.done += 1
        if not self.enabled:
            return
        rate = self.done / max(time.time() - self.start, 1e-9)
        end = "\n" if self.done == self.total else ""
        print(f"\r{self.what} {self.done}/{self.total}  {rate:.2f} it/s  ETA {(self.total - self.done) / rate:.0f}s",
              end=end, file=sys.stderr, flush=True)


def model_params(pipe):
    p = next(pipe.unet.parameters())
    return p.device, p.dtype


@torch.no_grad()
def text_context(pipe, prompts):
    device, _ = model_params(pipe)
    return pipe.text_encoder(pipe.tokenizer(prompts).to(device))


def eps_model(pipe, context, guidance):
    """eps(x, t) with classifier-free guidance. `context` is [uncond; cond] ([2B, 77, D]) when
    guidance != 1, else just cond. Latents stay float32; the UNet runs in the pipeline's dtype."""
    _, dtype = model_params(pipe)
    guided = guidance != 1

    def eps(x, t):
        x_in = torch.cat([x, x]) if guided else x
        out = pipe.unet(x_in.to(dtype), t, context).float()
        if not guided:
            return out
        uncond, cond = out.chunk(2)
        return uncond + guidance * (cond - uncond)
    return eps


@torch.no_grad()
def denoise(pipe, x, context, steps=50, guidance=7.5, eta=0.0, generator=None, progress=True):
    """DDIM (ddim.sample) from x (scaled latents [B, 4, F, h, w] at the first timestep) to clean
    latents (float32), with a progress line. With eta > 0 the step noise comes from `generator`."""
    return ddim.sample(x.float(), with_progress(eps_model(pipe, context, guidance), "sampling", steps, progress),
                       steps, eta=eta, generator=generator)


def with_progress(eps, what, steps, enabled):
    """`eps` that also ticks a progress line: one model call per DDIM step."""
    bar = Progress(what, steps, enabled)

    def eps_with_progress(x, t):
        out = eps(x, t)
        bar.tick()
        return out
    return eps_with_progress


def to_uint8(images):
    """Images in [-1, 1] -> uint8 levels 0..255 (rounded, clipped), same shape."""
    return ((images + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)


@torch.no_grad()
def decode(pipe, latents):
    """Scaled latents [B, 4, F, h, w] -> uint8 frames [B, F, H, W, 3] on the CPU (VAE chunked over frames)."""
    _, dtype = model_params(pipe)
    images = pipe.vae.decode(frames_to_batch(latents / LATENT_SCALE).to(dtype)).float()
    images = to_uint8(images).cpu()
    return batch_to_frames(images, latents.shape[2]).permute(0, 2, 3, 4, 1)  # b 3 f H W -> b f H W 3


def generate(pipe, prompts, frames=16, height=256, width=256, steps=50, guidance=7.5, negative="", eta=0.0,
             seed=0, latents=None, progress=True):
    """Sample one video per prompt -> uint8 tensor [B, F, H, W, 3]. `latents`: start from these scaled
    latents [B, 4, F, h, w] (e.g. DDIM-inverted ones) instead of seeded noise."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    check_size(pipe, frames, height, width)
    device, _ = model_params(pipe)
    f = pipe.vae.config.downsample_factor
    shape = (len(prompts), pipe.vae.config.latent_channels, frames, height // f, width // f)
    generator = torch.Generator().manual_seed(seed)
    if latents is None:
        x = torch.randn(shape, generator=generator).to(device)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape} for {len(prompts)} prompt(s), "
                         f"{frames} frames of {width}x{height}")
    else:
        x = latents.float().contiguous().to(device)
    context = text_context(pipe, prompts)
    if guidance != 1:
        context = torch.cat([text_context(pipe, [negative] * len(prompts)), context])
    x = denoise(pipe, x, context, steps, guidance, eta, generator, progress)
    return decode(pipe, x)


@torch.no_grad()
def encode_video(pipe, video):
    """A clip [F, 3, H, W] in [-1, 1] -> scaled latents [1, 4, F, h, w] (the posterior mean)."""
    device, dtype = model_params(pipe)
    mean, _ = pipe.vae.encode(video.to(device, dtype))
    return batch_to_frames(mean.float() * LATENT_SCALE, video.shape[0]).contiguous()


@torch.no_grad()
def invert(pipe, latents, prompt, steps=50, progress=True):
    """DDIM inversion of clean scaled latents [1, 4, F, h, w] under `prompt`, without guidance, to the
    noisy latents that `denoise` with the same prompt, steps, guidance 1 and eta 0 maps back to them."""
    eps = eps_model(pipe, text_context(pipe, [prompt]), guidance=1)
    return ddim.invert(latents.float(), with_progress(eps, "inverting", steps, progress), steps)


def save_video(frames, path, fps=8):
    """uint8 frames [F, H, W, 3] -> a looping GIF (Pillow; identical consecutive frames are merged, the
    timing kept) or an H.264 MP4 (imageio-ffmpeg; H and W must be even), chosen by the extension."""
    frames = np.asarray(frames.cpu() if isinstance(frames, torch.Tensor) else frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".gif":
        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    elif ext == ".mp4":
        height, width = frames.shape[1:3]
        if height % 2 or width % 2:
            raise ValueError(f"an MP4 (H.264, yuv420p) needs an even width and height, got {width}x{height}: "
                             f"write a .gif instead")
        # FFMPEG: imageio-ffmpeg's plugin; macro_block_size=1 keeps the size (else it resizes to multiples of 16)
        with imageio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p",
                                macro_block_size=1) as writer:
            for f in frames:
                writer.append_data(f)
    else:
        raise ValueError(f"cannot write {path!r}: the output must end in .gif or .mp4")


def save_grid(frames, path):
    """The frames side by side, left to right, as one PNG strip."""
    frames = np.asarray(frames.cpu() if isinstance(frames, torch.Tensor) else frames)
    Image.fromarray(np.concatenate(list(frames), axis=1)).save(path)


def output_paths(out, prompts):
    """One video per prompt: `out` itself for one prompt, else `<stem>-<index>-<slug><ext>`."""
    if len(prompts) == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    slugs = [re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-")[:40] or "prompt" for p in prompts]
    return [f"{stem}-{i:02d}-{slug}{ext}" for i, slug in enumerate(slugs)]


def read_prompts(args):
    prompts = list(args.prompt)
    if args.prompts:
        if not os.path.isfile(args.prompts):
            raise ValueError(f"prompt file not found: {args.prompts}")
        with open(args.prompts, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError("no prompt given: pass one or more prompts, or --prompts FILE (one prompt a line)")
    return prompts


def resolve_shape(args, meta):
    """--frames/--size/--width/--height, else the values in the adapter (or inverted-latents) metadata,
    else 16 frames of 256x256."""
    if args.size is not None and (args.width is not None or args.height is not None):
        raise ValueError("give either --size or --width/--height, not both")
    def pick(*values):
        return int(next(v for v in values if v is not None))
    frames = pick(args.frames, meta.get("frames"), DEFAULT_FRAMES)
    height = pick(args.size, args.height, meta.get("height"), DEFAULT_SIZE)
    width = pick(args.size, args.width, meta.get("width"), DEFAULT_SIZE)
    if frames < 1:
        raise ValueError(f"--frames must be at least 1, got {frames}")
    check_pixel_size(height, width)
    return frames, height, width


def check_pixel_size(height, width):
    """The command lines' check, before any model loads: SD's VAE needs multiples of 8 (check_size
    checks a loaded model's own factor)."""
    if height < 8 or width < 8 or height % 8 or width % 8:
        raise ValueError(f"video size {width}x{height} (width x height): both must be positive multiples of 8")


def read_inverted(path):
    """Inverted latents [1, 4, F, h, w] and their metadata, as `--edit` saved them."""
    if not os.path.isfile(path):
        raise ValueError(f"inverted latents not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            return f.get_tensor("latents"), dict(f.metadata() or {})
    except Exception as e:
        raise ValueError(f"{path} is not an inverted-latents file from sample.py --edit: {e}") from None


def edit_latents(args, pipe, meta, frames, height, width):
    """The starting latents for editing: DDIM inversion of --edit's clip (saved beside the output), or --inverted's."""
    if args.inverted:
        return read_inverted(args.inverted)[0]  # generate checks its shape
    import data  # only editing reads videos
    source = args.source_prompt if args.source_prompt is not None else meta.get("prompt")
    if source is None:
        raise ValueError("--edit needs the prompt the clip is described by: pass --source-prompt (the adapter "
                         "file has no 'prompt' metadata)")
    stride = args.stride if args.stride is not None else int(meta.get("stride", 1))
    video = data.read_clip(args.edit, frames, stride, height, width, start=0)
    steps = args.inversion_steps if args.inversion_steps is not None else args.steps
    ends, starts = ddim.timesteps(steps)[0], ddim.timesteps(args.steps)[0]
    if ends != starts:
        print(f"warning: the inversion ends at timestep {ends} but sampling starts at {starts}: use the same "
              f"--inversion-steps as --steps to stay close to the clip", file=sys.stderr)
    print(f"inverting {args.edit} ({frames} frames, stride {stride}, {width}x{height}) under {source!r}, "
          f"{steps} DDIM steps", file=sys.stderr)
    latents = invert(pipe, encode_video(pipe, video), source, steps).cpu()
    path = os.path.splitext(args.out)[0] + ".inverted.safetensors"
    info = {"clip": args.edit, "source_prompt": source, "inversion_steps": str(steps), "stride": str(stride),
            "frames": str(frames), "height": str(height), "width": str(width)}
    save_file({"latents": latents.contiguous()}, path + ".tmp", metadata=info)
    os.replace(path + ".tmp", path)
    print(f"saved the inverted latents to {path} (reuse them with --inverted)", file=sys.stderr)
    return latents


def build_parser():
    p = argparse.ArgumentParser(description="Sample videos from SD 1.x + SimDA adapters, or edit a clip (one-shot).")
    add = p.add_argument
    add("prompt", nargs="*", help="prompt(s); one video each")
    add("--prompts", metavar="FILE", help="a text file of prompts, one a line (blank lines skipped), after the others")
    add("--ckpt", metavar="PATH", help="SD 1.x checkpoint, single file or diffusers folder (default: $SIMDA_CKPT, "
                                       f"else {simda.DEFAULT_CHECKPOINT}, else the built-in demo model and its adapters)")
    add("--adapters", metavar="PATH", help="SimDA adapter file from train.py (default: none, the plain image model, "
                                           "every frame on its own)")
    add("--frames", type=int, help=f"frames per video (default: the adapters' metadata, else {DEFAULT_FRAMES})")
    add("--size", type=int, help=f"square size in pixels (default: the adapters' metadata, else {DEFAULT_SIZE})")
    add("--width", type=int, help="width in pixels, instead of --size (default: as --size)")
    add("--height", type=int, help="height in pixels, instead of --size (default: as --size)")
    add("--steps", type=int, default=50, help="DDIM steps (default: %(default)s)")
    add("--guidance", type=float, default=7.5, help="classifier-free guidance scale, 1: none (default: %(default)s)")
    add("--negative", default="", help="negative prompt, the unconditional side of guidance (default: empty)")
    add("--eta", type=float, default=0.0, help="DDIM eta, 0: deterministic (default: %(default)s)")
    add("--seed", type=int, default=0, help="seed of the starting noise, the same for each prompt (default: 0)")
    add("--out", default="out.gif", help="output video, .gif or .mp4; with several prompts the names get -NN-slug "
                                         "(default: %(default)s)")
    add("--fps", type=int, help=f"frames per second of the output (default: the adapters' metadata, else {DEFAULT_FPS})")
    add("--grid", action="store_true", help="also write the frames as a PNG strip beside each video (<out stem>.png)")
    add("--device", default="auto", help="auto: CUDA, else MPS, else CPU; or a device such as cuda:1 (default: auto)")
    add("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
        help="auto: float16 on CUDA, float32 elsewhere (default: auto)")
    edit = p.add_mutually_exclusive_group()
    edit.add_argument("--edit", metavar="CLIP", help="edit this clip: start from the DDIM inversion of its latents, "
                                                     "saved as <out stem>.inverted.safetensors")
    edit.add_argument("--inverted", metavar="PATH", help="start from the inverted latents an earlier --edit saved")
    add("--source-prompt", metavar="PROMPT", help="--edit: the prompt describing the clip (default: the adapters')")
    add("--inversion-steps", type=int, help="--edit: DDIM inversion steps (default: --steps)")
    add("--stride", type=int, help="--edit: every stride-th frame from the clip's start (default: the adapters' "
                                   "metadata, else 1)")
    return p


def pick_models(args):
    """(checkpoint, adapters): --ckpt, else the SD weights simda.default_checkpoint finds, else the
    built-in demo model and its adapters (a tiny SD trained on the shapes world), with a notice.
    A $SIMDA_CKPT that points nowhere stays an error."""
    if args.ckpt:
        return args.ckpt, args.adapters
    try:
        return simda.default_checkpoint(), args.adapters
    except simda.CheckpointError:
        if os.environ.get("SIMDA_CKPT") or not os.path.exists(simda.DEMO_CHECKPOINT):
            raise  # weights were asked for by name, or the demo model is not there either
    print(f"no SD weights found: using the built-in demo model (moving shapes at 32x32, prompts like 'a red circle "
          f"moving left'); for Stable Diffusion put {simda.DEFAULT_CHECKPOINT} in place, or pass --ckpt",
          file=sys.stderr)
    return simda.DEMO_CHECKPOINT, args.adapters or simda.DEMO_ADAPTERS


def run(args):
    prompts = read_prompts(args)
    ddim.timesteps(args.steps)  # check the step counts before loading anything
    if args.inversion_steps is not None:
        ddim.timesteps(args.inversion_steps)
    if os.path.splitext(args.out)[1].lower() not in (".gif", ".mp4"):
        raise ValueError(f"cannot write {args.out!r}: the output must end in .gif or .mp4")
    if args.fps is not None and args.fps < 1:
        raise ValueError(f"--fps must be at least 1, got {args.fps}")
    ckpt, adapters = pick_models(args)
    meta = simda.read_adapters(adapters)[1] if adapters else {}
    if args.inverted:  # the inverted latents fix the shape; their metadata is what --edit used
        shape = read_inverted(args.inverted)[1]
        meta = {**meta, **{k: shape[k] for k in ("frames", "height", "width") if k in shape}}
    frames, height, width = resolve_shape(args, meta)
    fps = args.fps or int(meta.get("fps", DEFAULT_FPS))
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    print(f"loading {ckpt} on {device} ({str(dtype).removeprefix('torch.')})", file=sys.stderr)
    pipe = simda.load_pipeline(ckpt, device, dtype, adapters=adapters)
    if not adapters:
        print("no --adapters: the plain image model samples every frame on its own", file=sys.stderr)
    check_size(pipe, frames, height, width)
    latents = edit_latents(args, pipe, meta, frames, height, width) if args.edit or args.inverted else None
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for prompt, path in zip(prompts, output_paths(args.out, prompts)):
        print(f"{prompt!r}: {frames} frames of {width}x{height}, {args.steps} steps, guidance {args.guidance}",
              file=sys.stderr)
        video = generate(pipe, prompt, frames, height, width, args.steps, args.guidance, args.negative, args.eta,
                         args.seed, latents)[0]
        save_video(video, path, fps)
        if args.grid:
            save_grid(video, os.path.splitext(path)[0] + ".png")
        print(f"wrote {path}", file=sys.stderr)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except ValueError as e:  # simda.CheckpointError and data.VideoError are ValueErrors
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    main()
