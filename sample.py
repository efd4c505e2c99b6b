"""Text-to-video sampling with SD + SimDA adapters, one-shot video editing (SimDA Sec. 3.4), and the
second stage, SD's x4 upscaler inflated to video (Sec. 3.4 and 4).

    python sample.py "a dog surfing" --adapters out/adapters.safetensors --out dog.gif
    python sample.py "a jeep car is moving on the snow" --edit clip.mp4 --adapters out/adapters.safetensors
    python sample.py "a dog surfing" --adapters out/adapters.safetensors --upscale     # 256 -> 1024
    python sample.py "a dog surfing" --upscale-video clip.mp4 --sr-adapters out/sr/adapters.safetensors
    python sample.py "a red circle moving right" --image first.png      # image-to-video (the demo's adapters)
    python sample.py "a red circle moving right" --continue out.gif --out longer.gif
    python sample.py --travel "0: a red circle moving right; 8: a red circle moving down" --frames 16

The sampling itself is simda.Pipeline's (DDIM with classifier-free guidance, seeded CPU noise).
Editing (Tune-A-Video style) encodes a clip with the VAE, DDIM-inverts its latents under the source
prompt, and samples from those latents with the new prompt. `--image` and `--continue` give the
pipeline first frames (Pipeline.animate, .continue_video), for adapters trained with them (train.py
--given-frames). With no weights configured, the built-in demo model in models/ samples moving shapes.
"""
import argparse
import os
import sys
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

import data
import ddim
import long_video
import shapes
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
    if not prompts and (args.upscale_video or args.travel is not None or args.travel_file is not None):
        return [""]  # the upscaler can go without a caption; --travel gives its own
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


def edit_latents(args, pipe, meta, plan):
    """The starting latents for editing: DDIM inversion of --edit's clip (saved beside the output), or --inverted's."""
    frames, height, width = plan.frames, plan.height, plan.width
    if args.inverted:
        return read_inverted(args.inverted)[0]  # the pipeline checks its shape
    source = args.source_prompt if args.source_prompt is not None else meta.get("prompt")
    if source is None:
        raise ValueError("--edit needs the prompt the clip is described by: pass --source-prompt (the adapter "
                         "file has no 'prompt' metadata)")
    stride = args.stride if args.stride is not None else int(meta.get("stride", 1))
    clip = data.read_clip(args.edit, frames, stride, height, width, start=0)
    steps = args.inversion_steps if args.inversion_steps is not None else plan.steps
    ends, starts = ddim.timesteps(steps)[0], ddim.timesteps(plan.steps)[0]
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


def read_image(path):
    """uint8 [1, H, W, 3]: --image's picture (any format pillow reads), as one frame."""
    if not os.path.isfile(path):
        raise ValueError(f"--image {path} does not exist")
    try:
        with Image.open(path) as image:
            return torch.from_numpy(np.asarray(image.convert("RGB")).copy())[None]
    except (OSError, ValueError) as e:  # pillow's UnidentifiedImageError is an OSError
        raise ValueError(f"--image {path} cannot be read as an image: {e}") from e


def read_given(args, plan, meta):
    """--image / --continue: (the given frames, float [1, 3, k, H, W] in [-1, 1] at the video's size, and the
    plan settled for them), else (None, plan). The input's size sets the video's, unless --size (--width,
    --height) says otherwise: it is then resized and centre-cropped, which is said in one line."""
    path = args.image or args.continue_clip
    if path is None:
        return None, plan
    given_frames = int(meta.get("given_frames", 0))
    if not given_frames:
        raise ValueError(f"{'--image' if args.image else '--continue'} needs adapters trained with given frames "
                         f"(train.py --given-frames): {plan.adapters or 'no --adapters'} has none")
    frames = read_image(path) if args.image else torch.from_numpy(data.read_frames(path))  # uint8 [k, h, w, 3]
    if args.continue_clip and len(frames) < given_frames:
        raise ValueError(f"--continue {path} has {len(frames)} frame(s), fewer than the {given_frames} the adapters "
                         f"continue from")
    h, w = frames.shape[1:3]
    height, width = (plan.height, plan.width) if args.size or args.width or args.height else (h, w)
    if height % 8 or width % 8:
        raise ValueError(f"{path} is {w}x{h}, not a multiple of 8 a side: pass --size (or --width and --height) "
                         f"to resize and centre-crop it")
    if (height, width) != (h, w):
        print(f"{path}: resized and centre-cropped from {w}x{h} to {width}x{height}", file=sys.stderr)
    pixels = data.resize_crop(frames.permute(0, 3, 1, 2), height, width).movedim(0, 1)[None]  # 1 3 k H W
    new = plan.frames if args.frames or args.image else int(meta.get("frames", DEFAULT_FRAMES)) - given_frames
    return pixels, replace(plan, height=height, width=width, frames=new, given_frames=given_frames)


def sample_given(args, plan, pipe, prompt, pixels):
    """uint8 [F, H, W, 3]: --image animated (frame 0 its VAE round trip), or --continue's clip and its new frames."""
    what = f"{plan.steps} {plan.sampler} steps, guidance {plan.guidance}"
    if args.image:
        print(f"{prompt!r}: {plan.frames} frames of {plan.width}x{plan.height} from {args.image} (frame 0: its VAE "
              f"round trip), {what}", file=sys.stderr)
        return pipe.animate(pixels[0, :, 0], prompt, plan.frames, plan.steps, plan.guidance, args.negative, args.eta,
                            args.seed, sampler=plan.sampler)[0]
    print(f"{prompt!r}: {plan.frames} more frames after the last {plan.given_frames} of {args.continue_clip} "
          f"({pixels.shape[2]} frames of {plan.width}x{plan.height}), {what}", file=sys.stderr)
    new = pipe.continue_video(pixels, prompt, plan.frames, plan.given_frames, plan.steps, plan.guidance,
                              args.negative, args.eta, args.seed, sampler=plan.sampler)[0]
    return torch.cat([to_uint8(pixels[0].movedim(0, -1)), new])  # the clip as read, then the new frames


def steps_text(defaults):
    return " or ".join(f"{steps} with {sampler}" for sampler, steps in defaults[1].items())


def add_start_flags(p):
    """What a video starts from besides noise: a clip to edit (or its inverted latents), an image, a clip to
    continue."""
    start = p.add_mutually_exclusive_group()
    start.add_argument("--edit", metavar="CLIP", help="edit this clip: start from the DDIM inversion of its latents, "
                                                      "saved as <out stem>.inverted.safetensors (DDIM throughout)")
    start.add_argument("--inverted", metavar="PATH", help="start from the inverted latents an earlier --edit saved")
    start.add_argument("--image", metavar="FIRST.png",
                       help="animate this image: it is frame 0 (its VAE round trip) and sets the size unless --size "
                            "does (then it is resized and centre-cropped); needs adapters trained with given frames")
    start.add_argument("--continue", dest="continue_clip", metavar="CLIP",
                       help="extend this clip by --frames frames, sampled after its last K (the adapters' given "
                            "frames); writes the clip and the new frames; its size sets the video's unless --size does")
    add = p.add_argument
    add("--source-prompt", metavar="PROMPT", help="--edit: the prompt describing the clip (default: the adapters')")
    add("--inversion-steps", type=int, help="--edit: DDIM inversion steps (default: --steps)")
    add("--stride", type=int, help="--edit, --upscale-video: every stride-th frame from the clip's start (default: "
                                   "--edit: the adapters' metadata, else 1; --upscale-video: 1)")


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
    add("--frames", type=int, help=f"frames per video (default: the adapters' metadata, else {DEFAULT_FRAMES}); "
                                   "--continue: the frames added (default: the adapters' frames less their given ones)")
    add("--size", type=int, help=f"square size in pixels (default: the adapters' metadata, else {DEFAULT_SIZE})")
    add("--width", type=int, help="width in pixels, instead of --size (default: as --size)")
    add("--height", type=int, help="height in pixels, instead of --size (default: as --size)")
    add("--sampler", choices=list(simda.SAMPLERS),
        help=f"ddim or dpm++ (DPM-Solver++(2M)), for both stages, or lcm for distilled adapters (default: lcm for those, "
             f"else {simda.SD_SAMPLING[0]} for SD and the demo; the upscaler's: {simda.SR_SAMPLING[0]}; --edit and "
             f"--inverted: ddim, the only one that replays an inversion)")
    add("--steps", type=int, help=f"sampler steps (default: for SD {steps_text(simda.SD_SAMPLING)}; for the demo "
                                  f"{steps_text(simda.DEMO_SAMPLING)}; lcm {simda.LCM_STEPS})")
    add("--guidance", type=float, help="classifier-free guidance scale, 1: none (default: 7.5; lcm: distilled in)")
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
    add_start_flags(p)
    long_video.add_flags(p)
    sr = p.add_argument_group("super-resolution (the second stage: SD's x4 upscaler, with SimDA adapters for video)")
    stage = sr.add_mutually_exclusive_group()
    stage.add_argument("--upscale", action="store_true", help="upscale each sampled video x4 (the stage-one video is "
                                                               "kept beside it as <out stem>-lowres)")
    stage.add_argument("--upscale-video", metavar="CLIP", help="upscale this video x4 instead of sampling one (read at "
                                                               "--size/--frames/--stride; the prompt describes it)")
    sr.add_argument("--sr-ckpt", metavar="PATH", help=f"x4 upscaler checkpoint (default: $SIMDA_SR_CKPT, else "
                                                      f"{simda.DEFAULT_SR_CHECKPOINT}, else, when stage one is the demo "
                                                      f"model or the clip is given, the demo's upscaler and its adapters)")
    sr.add_argument("--sr-adapters", metavar="PATH", help="SimDA adapters for the upscaler, from train.py --stage sr "
                                                          "(default: none, the image upscaler frame by frame)")
    sr.add_argument("--sr-steps", type=int, help=f"sampler steps of the upscaler (default: {steps_text(simda.SR_SAMPLING)}; "
                                                 f"the demo's: {steps_text(simda.DEMO_SR_SAMPLING)})")
    sr.add_argument("--sr-guidance", type=float, help=f"guidance of the upscaler (default: {simda.SR_GUIDANCE}; the "
                                                      f"demo's: {simda.DEMO_SR_GUIDANCE})")
    sr.add_argument("--frame-chunk", type=int, default=0, help="run the upscaler UNet's per-frame layers on this many "
                                                               "frames at a time: less memory, the same result (default: 0, all at once)")
    sr.add_argument("--noise-level", type=int, default=20, help=f"noise added to the low-res video, 0..."
                                                                 f"{simda.MAX_NOISE_LEVEL - 1} (default: %(default)s)")
    return p


def pick_models(args):
    """(checkpoint, adapters): --ckpt, else the SD weights simda.default_checkpoint finds, else the built-in demo
    model and its adapters, with a notice. A $SIMDA_CKPT that points nowhere stays an error."""
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
    return simda.DEMO_CHECKPOINT, args.adapters or (simda.DEMO_LCM_ADAPTERS if args.sampler == "lcm" else
                                                    simda.DEMO_ADAPTERS)


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


def checked(flag, check, *values):
    """check(*values), its ValueError prefixed with the flag at fault."""
    try:
        return check(*values)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from e


def sampling(args, defaults, steps, upscaler=False):
    """(sampler, steps) of a stage: the flags, else the model's `defaults` (sampler, {sampler: steps})."""
    chosen = None if upscaler and args.sampler == "lcm" else args.sampler  # lcm is stage one's: no upscaler is distilled
    sampler = "ddim" if (args.edit or args.inverted) and not upscaler else chosen or defaults[0]
    steps = steps if steps is not None else defaults[1][sampler]
    checked("--sr-steps" if upscaler else "--steps", simda.check_sampling, sampler, steps, args.eta)
    return sampler, steps


def stage_one_sampling(args, defaults, adapters, meta):
    """(sampler, steps, guidance) of stage one; distilled adapters (`meta`) default to lcm, which alone they take."""
    distilled = meta.get("distilled")
    lcm_steps = (distilled or {}).get("phases") or simda.LCM_STEPS  # phased adapters: a step a phase
    sampler, steps = sampling(args, ("lcm" if distilled else defaults[0], {**defaults[1], "lcm": lcm_steps}), args.steps)
    if sampler == "lcm" and not distilled:
        raise ValueError(f"--sampler lcm samples distilled adapters (train.py --distill): {adapters or 'none'} are not")
    if sampler == "lcm" and args.guidance not in (None, 1):
        raise ValueError(f"--guidance: lcm samples the guidance distilled into the adapters ({distilled['guidance']})")
    return sampler, steps, 1.0 if sampler == "lcm" else 7.5 if args.guidance is None else args.guidance


def check_flags(args):
    """Everything the flags alone can get wrong, before any model loads."""
    if args.inversion_steps is not None:
        checked("--inversion-steps", ddim.timesteps, args.inversion_steps)
    if (args.edit or args.inverted) and args.sampler not in (None, "ddim"):
        raise ValueError(f"--edit and --inverted replay a DDIM inversion, which only DDIM does: drop --sampler "
                         f"{args.sampler} (editing always samples with ddim)")
    if args.frame_chunk < 0:
        raise ValueError(f"--frame-chunk must be 0 (off) or more, got {args.frame_chunk}")
    if not 0 <= args.noise_level < simda.MAX_NOISE_LEVEL:
        raise ValueError(f"--noise-level must be in 0..{simda.MAX_NOISE_LEVEL - 1}, got {args.noise_level}")
    check_output(args.out)
    if args.fps is not None and args.fps < 1:
        raise ValueError(f"--fps must be at least 1, got {args.fps}")
    if args.upscale_video is not None and (args.edit or args.inverted or args.image or args.continue_clip):
        raise ValueError("--upscale-video upscales a given clip, --edit/--inverted/--image/--continue sample one: use "
                         "one or the other")
    if args.continue_clip is not None and not os.path.isfile(args.continue_clip):
        raise ValueError(f"--continue {args.continue_clip} does not exist")
    given = lambda *names: [f"--{n.replace('_', '-')}" for n in names if getattr(args, n)]  # noqa: E731
    sr_flags = given("sr_ckpt", "sr_adapters", "sr_steps", "sr_guidance", "frame_chunk")
    if not (args.upscale or args.upscale_video) and sr_flags:
        raise ValueError(f"{', '.join(sr_flags)} set the upscaler: add --upscale (or --upscale-video CLIP)")
    if args.upscale_video is not None and given("ckpt", "adapters", "prediction"):
        raise ValueError(f"--upscale-video runs the upscaler alone: {', '.join(given('ckpt', 'adapters', 'prediction'))} "
                         f"would not be used (the upscaler's are --sr-ckpt, --sr-adapters)")
    if args.upscale_video is not None and not os.path.isfile(args.upscale_video):
        raise ValueError(f"--upscale-video {args.upscale_video} does not exist")


@dataclass
class Plan:
    """What a sample.py run will do, settled from the flags and the adapters' metadata."""
    ckpt: str  # stage one (None: --upscale-video, the upscaler alone)
    adapters: str
    sampler: str
    steps: int
    sr_ckpt: str  # the upscaler (None: no second stage)
    sr_adapters: str
    sr_sampler: str
    sr_steps: int
    sr_guidance: float
    frames: int
    height: int
    width: int
    fps: int
    given_frames: int = 0  # --image, --continue: the first frames given (1, or the adapters' given frames)
    guidance: float = 7.5  # stage one's (lcm: 1, the guidance distilled into the adapters)
    long: long_video.Long = None  # windows or continuation past the adapters' frames (None: one pass)
    travel: list = None  # --travel's schedule [(frame, prompt)]


def make_plan(args, prompts):
    """The models (the demo's where no weights are found), the upscaler's steps and guidance, and the video's
    shape and rate: the flags, else what the adapters (or --inverted's latents) were made with."""
    ckpt, adapters = pick_models(args) if args.upscale_video is None else (None, None)
    is_demo = lambda path, demo_path: path is not None and os.path.abspath(path) == demo_path  # noqa: E731
    demo = is_demo(ckpt, simda.DEMO_CHECKPOINT)
    if demo and shapes.unknown_notice(prompts):  # it still samples: the words it knows steer what it draws
        print(shapes.unknown_notice(prompts), file=sys.stderr)
    upscaling = args.upscale or args.upscale_video is not None
    sr_ckpt, sr_adapters = pick_upscaler(args, ckpt is None or demo) if upscaling else (None, None)
    meta = simda.read_adapters(adapters)[1] if adapters else {}
    sampler, steps, guidance = stage_one_sampling(args, simda.DEMO_SAMPLING if demo else simda.SD_SAMPLING, adapters, meta)
    demo_sr = is_demo(sr_ckpt, simda.DEMO_UPSCALER)
    sr_sampler, sr_steps = sampling(args, simda.DEMO_SR_SAMPLING if demo_sr else simda.SR_SAMPLING, args.sr_steps,
                                    upscaler=True)
    sr_guidance = args.sr_guidance if args.sr_guidance is not None else \
        simda.DEMO_SR_GUIDANCE if demo_sr else simda.SR_GUIDANCE
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
    long, travel = long_video.plan(args, meta, frames, adapters)
    return Plan(ckpt, adapters, sampler, steps, sr_ckpt, sr_adapters, sr_sampler, sr_steps, sr_guidance, frames, height,
                width, args.fps or int(meta.get("fps", DEFAULT_FPS)), guidance=guidance, long=long, travel=travel), meta


def load(args, plan):
    """(stage-one pipeline or None, upscaler or None) on the chosen device and dtype, with their notices."""
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    pipe = upscaler = None
    if plan.ckpt is not None:
        print(f"loading {plan.ckpt} on {device} ({str(dtype).removeprefix('torch.')})", file=sys.stderr)
        pipe = simda.load_pipeline(plan.ckpt, device, dtype, adapters=plan.adapters, prediction=args.prediction)
        print(f"{pipe.family} checkpoint, predicts {pipe.prediction} ({pipe.prediction_source})", file=sys.stderr)
        if not plan.adapters:
            print("no --adapters: the plain image model samples every frame on its own", file=sys.stderr)
        check_shape(plan.frames, plan.height, plan.width, pipe.vae.config.downsample_factor)
        if args.compile:  # compiled on the first step (a minute or more), then faster: bench.py --sampling --compile
            pipe.unet = torch.compile(pipe.unet)
    if plan.sr_ckpt is not None:
        print(f"loading the upscaler {plan.sr_ckpt}", file=sys.stderr)
        upscaler = simda.load_upscaler(plan.sr_ckpt, device, dtype, adapters=plan.sr_adapters)
        upscaler.unet.frame_chunk = args.frame_chunk
        if not plan.sr_adapters:
            print("no --sr-adapters: the image upscaler works on every frame on its own", file=sys.stderr)
    return pipe, upscaler


def make_video(args, plan, pipe, upscaler, prompt, path, latents, given=None):
    """One prompt's video, uint8 [F, H, W, 3]: sampled (after `given` frames: --image, --continue; or
    --upscale-video's clip), then upscaled where asked."""
    frames, height, width = plan.frames, plan.height, plan.width
    if given is not None:
        video = sample_given(args, plan, pipe, prompt, given)
    elif pipe is not None:  # text-to-video (from --edit's latents, if given), in windows past the adapters' frames
        video = long_video.sample_cli(args, plan, pipe, prompt, latents)
    else:
        clip = data.read_clip(args.upscale_video, frames, args.stride or 1, height, width, start=0)
        video = to_uint8(clip.movedim(1, -1))
    if upscaler is None:
        return video
    if pipe is not None:
        stem, ext = os.path.splitext(path)
        save_video(video, f"{stem}-lowres{ext}", plan.fps)
    print(f"{prompt!r}: upscaling {frames} frames of {width}x{height} to {4 * width}x{4 * height}, "
          f"{plan.sr_steps} {plan.sr_sampler} steps, guidance {plan.sr_guidance}, noise level {args.noise_level}",
          file=sys.stderr)
    low_res = video.permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # f H W 3 -> 1 3 f H W, in [-1, 1]
    high = upscaler.upscale(low_res, [prompt], plan.sr_steps, plan.sr_guidance, args.noise_level, args.negative,
                            args.eta, args.seed, sampler=plan.sr_sampler)
    return to_frames(high)[0]


def run(args):
    prompts = read_prompts(args)
    check_flags(args)
    plan, meta = make_plan(args, prompts)
    given, plan = read_given(args, plan, meta)  # before any model loads: a bad image fails fast
    pipe, upscaler = load(args, plan)
    latents = edit_latents(args, pipe, meta, plan) if args.edit or args.inverted else None
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for prompt, path in zip(prompts, output_paths(args.out, prompts)):
        video = make_video(args, plan, pipe, upscaler, prompt, path, latents, given)
        save_video(video, path, plan.fps)
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
