"""Text-to-video sampling with SD + SimDA adapters, one-shot video editing (SimDA Sec. 3.4), and the
second stage, SD's x4 upscaler inflated to video (Sec. 3.4 and 4).

    python sample.py "a dog surfing" --adapters out/adapters.safetensors --out dog.gif
    python sample.py "a jeep car is moving on the snow" --edit clip.mp4 --adapters out/adapters.safetensors
    python sample.py "a dog surfing" --adapters out/adapters.safetensors --upscale     # 256 -> 1024
    python sample.py "a dog surfing" --upscale-video clip.mp4 --sr-adapters out/sr/adapters.safetensors

The sampling itself is simda.Pipeline's (DDIM with classifier-free guidance, seeded CPU noise).
Editing (Tune-A-Video style) encodes a clip with the VAE, DDIM-inverts its latents under the source
prompt, and samples from those latents with the new prompt. With no weights configured, the
built-in demo model in models/ samples moving shapes.
"""
import argparse
import os
import sys

import torch
from safetensors import safe_open

import data
import ddim
import simda
from checkpoint import CheckpointError, save_safetensors
from runtime import pick_device, pick_dtype
from video import (DEFAULT_FPS, DEFAULT_FRAMES, DEFAULT_SIZE, check_output, check_shape, output_paths, resolve_shape,
                   save_grid, save_video, stack_clips, to_frames, to_uint8)


def read_prompts(args):
    prompts = list(args.prompt)
    if args.prompts:
        if not os.path.isfile(args.prompts):
            raise ValueError(f"prompt file not found: {args.prompts}")
        with open(args.prompts, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts and args.upscale_video:
        return [""]  # the upscaler can go without a caption
    if not prompts:
        raise ValueError("no prompt given: pass one or more prompts, or --prompts FILE (one prompt a line)")
    return prompts


def read_inverted(path):
    """Inverted latents [1, 4, F, h, w] and their metadata, as `--edit` saved them."""
    if not os.path.isfile(path):
        raise ValueError(f"inverted latents not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            return f.get_tensor("latents"), dict(f.metadata() or {})
    except Exception as e:
        raise ValueError(f"{path} is not an inverted-latents file from sample.py --edit: {e}") from e


def edit_latents(args, pipe, meta, frames, height, width):
    """The starting latents for editing: DDIM inversion of --edit's clip (saved beside the output), or --inverted's."""
    if args.inverted:
        return read_inverted(args.inverted)[0]  # the pipeline checks its shape
    source = args.source_prompt if args.source_prompt is not None else meta.get("prompt")
    if source is None:
        raise ValueError("--edit needs the prompt the clip is described by: pass --source-prompt (the adapter "
                         "file has no 'prompt' metadata)")
    stride = args.stride if args.stride is not None else int(meta.get("stride", 1))
    clip = data.read_clip(args.edit, frames, stride, height, width, start=0)
    steps = args.inversion_steps if args.inversion_steps is not None else args.steps
    ends, starts = ddim.timesteps(steps)[0], ddim.timesteps(args.steps)[0]
    if ends != starts:
        print(f"warning: the inversion ends at timestep {ends} but sampling starts at {starts}: use the same "
              f"--inversion-steps as --steps to stay close to the clip", file=sys.stderr)
    print(f"inverting {args.edit} ({frames} frames, stride {stride}, {width}x{height}) under {source!r}, "
          f"{steps} DDIM steps", file=sys.stderr)
    latents = pipe.invert(pipe.encode(stack_clips([clip])), source, steps).cpu()
    path = os.path.splitext(args.out)[0] + ".inverted.safetensors"
    info = {"clip": args.edit, "source_prompt": source, "inversion_steps": str(steps), "stride": str(stride),
            "frames": str(frames), "height": str(height), "width": str(width)}
    save_safetensors({"latents": latents}, path, metadata=info)
    print(f"saved the inverted latents to {path} (reuse them with --inverted)", file=sys.stderr)
    return latents


SR_DEFAULTS = (75, 9.0)  # --sr-steps, --sr-guidance: diffusers' StableDiffusionUpscalePipeline's
# the demo upscaler's: it is best without guidance (README: "The demo's second stage")
DEMO_SR_DEFAULTS = (20, 1.0)


def build_parser():
    p = argparse.ArgumentParser(description="Sample videos from SD 1.x/2.x + SimDA adapters, or edit a clip (one-shot).")
    add = p.add_argument
    add("prompt", nargs="*", help="prompt(s); one video each")
    add("--prompts", metavar="FILE", help="a text file of prompts, one a line (blank lines skipped), after the others")
    add("--ckpt", metavar="PATH", help="SD 1.x or 2.x checkpoint, single file or diffusers folder (default: $SIMDA_CKPT, "
                                       f"else {simda.DEFAULT_CHECKPOINT}, else the built-in demo model and its adapters)")
    add("--prediction", choices=ddim.PREDICTIONS, help="what the checkpoint's UNet predicts (default: what the "
                                                        "checkpoint says; SD 2.x files that say nothing: v)")
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
        help="auto: float16 on CUDA, bfloat16 on a CPU with AMX or AVX512-BF16 (the VAE stays float32), else float32 (default: auto)")
    add("--compile", action="store_true", help="torch.compile the UNet: a slow first step, faster steps after "
                                               "(worth it for many steps or videos; measured in bench.py)")
    edit = p.add_mutually_exclusive_group()
    edit.add_argument("--edit", metavar="CLIP", help="edit this clip: start from the DDIM inversion of its latents, "
                                                     "saved as <out stem>.inverted.safetensors")
    edit.add_argument("--inverted", metavar="PATH", help="start from the inverted latents an earlier --edit saved")
    add("--source-prompt", metavar="PROMPT", help="--edit: the prompt describing the clip (default: the adapters')")
    add("--inversion-steps", type=int, help="--edit: DDIM inversion steps (default: --steps)")
    add("--stride", type=int, help="--edit, --upscale-video: every stride-th frame from the clip's start (default: "
                                   "--edit: the adapters' metadata, else 1; --upscale-video: 1)")
    sr = p.add_argument_group("super-resolution (the second stage: SD's x4 upscaler, with SimDA adapters for video)")
    stage = sr.add_mutually_exclusive_group()
    stage.add_argument("--upscale", action="store_true", help="upscale each sampled video x4 (the stage-one video is "
                                                               "kept beside it as <out stem>-lowres)")
    stage.add_argument("--upscale-video", metavar="CLIP", help="upscale this video x4 instead of sampling one (read at "
                                                               "--size/--frames/--stride; the prompt describes it)")
    sr.add_argument("--sr-ckpt", metavar="PATH", help=f"x4 upscaler checkpoint (default: $SIMDA_SR_CKPT, else "
                                                      f"{simda.DEFAULT_SR_CHECKPOINT}, else, when stage one is the "
                                                      f"demo model or the clip is given, the demo's upscaler and its "
                                                      f"adapters)")
    sr.add_argument("--sr-adapters", metavar="PATH", help="SimDA adapters for the upscaler, from train.py --stage sr "
                                                          "(default: none, the image upscaler frame by frame)")
    sr.add_argument("--sr-steps", type=int, help=f"DDIM steps of the upscaler (default: {SR_DEFAULTS[0]}; the "
                                                 f"demo's: {DEMO_SR_DEFAULTS[0]})")
    sr.add_argument("--sr-guidance", type=float, help=f"guidance of the upscaler (default: {SR_DEFAULTS[1]}; the "
                                                      f"demo's: {DEMO_SR_DEFAULTS[1]})")
    sr.add_argument("--frame-chunk", type=int, default=0, help="run the upscaler UNet's per-frame layers on this many "
                                                               "frames at a time: less memory, the same result "
                                                               "(default: 0, all at once)")
    sr.add_argument("--noise-level", type=int, default=20, help=f"noise added to the low-res video, 0..."
                                                                 f"{simda.MAX_NOISE_LEVEL - 1} (default: %(default)s)")
    return p


def pick_models(args):
    """(checkpoint, adapters): --ckpt, else the SD weights simda.default_checkpoint finds, else the
    built-in demo model and its adapters (a tiny SD trained on the shapes world), with a notice.
    A $SIMDA_CKPT that points nowhere stays an error."""
    if args.ckpt:
        return args.ckpt, args.adapters
    try:
        return simda.default_checkpoint(), args.adapters
    except CheckpointError:
        if os.environ.get("SIMDA_CKPT") or not os.path.exists(simda.DEMO_CHECKPOINT):
            raise  # weights were asked for by name, or the demo model is not there either
    print(f"no SD weights found: using the built-in demo model (moving shapes at 32x32, prompts like 'a red circle "
          f"moving left'); for Stable Diffusion put {simda.DEFAULT_CHECKPOINT} in place, or pass --ckpt",
          file=sys.stderr)
    return simda.DEMO_CHECKPOINT, args.adapters or simda.DEMO_ADAPTERS


def pick_upscaler(args, demo_stage_one):
    """(checkpoint, adapters) of the upscaler: --sr-ckpt, else the one simda.default_checkpoint finds,
    else, when stage one is the demo model (or --upscale-video names the clip), the demo's upscaler and
    its video adapters, with a notice. A $SIMDA_SR_CKPT that points nowhere stays an error."""
    if args.sr_ckpt:
        return args.sr_ckpt, args.sr_adapters
    try:
        return simda.default_checkpoint(upscaler=True), args.sr_adapters
    except CheckpointError:
        if os.environ.get("SIMDA_SR_CKPT") or not demo_stage_one or not os.path.exists(simda.DEMO_UPSCALER):
            raise
    print(f"no upscaler weights found: using the built-in demo upscaler (moving shapes, 32x32 -> 128x128); for "
          f"SD's x4 upscaler put {simda.DEFAULT_SR_CHECKPOINT} in place, or pass --sr-ckpt", file=sys.stderr)
    return simda.DEMO_UPSCALER, args.sr_adapters or simda.DEMO_SR_ADAPTERS


def run(args):
    prompts = read_prompts(args)
    for flag, steps in (("--steps", args.steps), ("--sr-steps", args.sr_steps), ("--inversion-steps", args.inversion_steps)):
        try:
            if steps is not None:
                ddim.timesteps(steps)  # check the step counts before loading anything
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from e
    if args.frame_chunk < 0:
        raise ValueError(f"--frame-chunk must be 0 (off) or more, got {args.frame_chunk}")
    if not 0 <= args.noise_level < simda.MAX_NOISE_LEVEL:
        raise ValueError(f"--noise-level must be in 0..{simda.MAX_NOISE_LEVEL - 1}, got {args.noise_level}")
    check_output(args.out)
    if args.fps is not None and args.fps < 1:
        raise ValueError(f"--fps must be at least 1, got {args.fps}")
    upscaling = args.upscale or args.upscale_video is not None
    if args.upscale_video is not None and (args.edit or args.inverted):
        raise ValueError("--upscale-video upscales a given clip, --edit/--inverted sample one: use one or the other")
    given = lambda *names: [f"--{n.replace('_', '-')}" for n in names if getattr(args, n)]  # noqa: E731
    sr_flags = given("sr_ckpt", "sr_adapters", "sr_steps", "sr_guidance", "frame_chunk")
    if not upscaling and sr_flags:
        raise ValueError(f"{', '.join(sr_flags)} set the upscaler: add --upscale "
                         f"(or --upscale-video CLIP)")
    if args.upscale_video is not None and given("ckpt", "adapters", "prediction"):
        raise ValueError(f"--upscale-video runs the upscaler alone: {', '.join(given('ckpt', 'adapters', 'prediction'))} "
                         f"would not be used (the upscaler's are --sr-ckpt, --sr-adapters)")
    if args.upscale_video is not None and not os.path.isfile(args.upscale_video):
        raise ValueError(f"--upscale-video {args.upscale_video} does not exist")
    ckpt, adapters = pick_models(args) if args.upscale_video is None else (None, None)
    demo = lambda path, demo_path: path is not None and os.path.abspath(path) == demo_path  # noqa: E731
    sr_ckpt, sr_adapters = pick_upscaler(args, ckpt is None or demo(ckpt, simda.DEMO_CHECKPOINT)) if upscaling \
        else (None, None)
    sr_steps, sr_guidance = (value if value is not None else default for value, default in zip(
        (args.sr_steps, args.sr_guidance), DEMO_SR_DEFAULTS if demo(sr_ckpt, simda.DEMO_UPSCALER) else SR_DEFAULTS))
    meta = simda.read_adapters(adapters)[1] if adapters else {}
    if args.upscale_video is not None and sr_adapters:  # the clip's default shape: what the adapters were trained on
        sr_meta = simda.read_adapters(sr_adapters)[1]
        meta = {k: sr_meta[k] // simda.UPSCALE for k in ("height", "width") if k in sr_meta}
        meta.update({k: sr_meta[k] for k in ("frames", "fps") if k in sr_meta})
    if args.inverted:  # the inverted latents fix the shape; their metadata is what --edit used
        shape = read_inverted(args.inverted)[1]
        meta = {**meta, **{k: shape[k] for k in ("frames", "height", "width") if k in shape}}
    trained = (meta.get("frames", DEFAULT_FRAMES), meta.get("height", DEFAULT_SIZE), meta.get("width", DEFAULT_SIZE))
    frames, height, width = resolve_shape(args.frames, args.size, args.height, args.width, defaults=trained)
    if upscaling:  # the upscaler's UNet halves the low-res size three times
        check_shape(frames, height, width, 8, "as the upscaler's UNet halves the low-res video three times")
    fps = args.fps or int(meta.get("fps", DEFAULT_FPS))
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    pipe = upscaler = None
    if ckpt is not None:
        print(f"loading {ckpt} on {device} ({str(dtype).removeprefix('torch.')})", file=sys.stderr)
        pipe = simda.load_pipeline(ckpt, device, dtype, adapters=adapters, prediction=args.prediction)
        print(f"{pipe.family} checkpoint, predicts {pipe.prediction} ({pipe.prediction_source})", file=sys.stderr)
        if not adapters:
            print("no --adapters: the plain image model samples every frame on its own", file=sys.stderr)
        check_shape(frames, height, width, pipe.vae.config.downsample_factor)
        if args.compile:  # compiled on the first step (a minute or more), then faster: bench.py --sampling --compile
            pipe.unet = torch.compile(pipe.unet)
    if sr_ckpt is not None:
        print(f"loading the upscaler {sr_ckpt}", file=sys.stderr)
        upscaler = simda.load_upscaler(sr_ckpt, device, dtype, adapters=sr_adapters)
        upscaler.unet.frame_chunk = args.frame_chunk
        if not sr_adapters:
            print("no --sr-adapters: the image upscaler works on every frame on its own", file=sys.stderr)
    latents = edit_latents(args, pipe, meta, frames, height, width) if args.edit or args.inverted else None
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for prompt, path in zip(prompts, output_paths(args.out, prompts)):
        if pipe is not None:
            print(f"{prompt!r}: {frames} frames of {width}x{height}, {args.steps} steps, guidance {args.guidance}",
                  file=sys.stderr)
            video = pipe(prompt, frames, height, width, args.steps, args.guidance, args.negative, args.eta, args.seed,
                         latents)[0]
        else:
            stride = args.stride or 1
            video = to_uint8(data.read_clip(args.upscale_video, frames, stride, height, width, start=0).movedim(1, -1))
        if upscaler is not None:
            if pipe is not None:
                stem, ext = os.path.splitext(path)
                save_video(video, f"{stem}-lowres{ext}", fps)
            print(f"{prompt!r}: upscaling {frames} frames of {width}x{height} to {4 * width}x{4 * height}, "
                  f"{sr_steps} steps, guidance {sr_guidance}, noise level {args.noise_level}", file=sys.stderr)
            low_res = video.permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # f H W 3 -> 1 3 f H W, in [-1, 1]
            high = upscaler.upscale(low_res, [prompt], sr_steps, sr_guidance, args.noise_level,
                                    args.negative, args.eta, args.seed)
            video = to_frames(high)[0]
        save_video(video, path, fps)
        if args.grid:
            save_grid(video, os.path.splitext(path)[0] + ".png")
        print(f"wrote {path}", file=sys.stderr)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except ValueError as e:  # checkpoint.CheckpointError and data.VideoError are ValueErrors
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    main()
