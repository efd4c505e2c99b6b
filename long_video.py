"""Videos of any length, and prompts that change along the video (prompt travel).

SimDA's adapters know no absolute frame position (a 3-frame depth-wise convolution over time, and
latent-shift attention a few frames back), but they were trained on clips of F frames, and one pass
over many more frames drifts (docs/demo.md). Two ways to go past F, both at the memory of one window:

- windows (MultiDiffusion along time, as AnimateDiff's context windows): at every sampler step the UNet
  runs on windows of F frames that overlap; each frame's prediction is the weighted mean of the windows
  that hold it (the weights of a frame sum to one). The sampler is the pipeline's, unchanged: the
  windowed UNet is handed to `Pipeline.denoise` in place of the UNet (`run_windows`). FreeNoise's noise
  rescheduling (Qiu et al. 2023) is an option: the starting noise past the first window repeats the
  first window's frames, shuffled, so windows start alike (`freenoise`).
- continue: window k+1 is sampled after window k's last frames, given as clean latents (the given-frame
  path of image-to-video and continuation, Pipeline.denoise's `given`), for adapters trained with them.

Prompt travel: a schedule "0: a red circle moving right; 8: a red circle moving down" gives each frame
the prompt of its segment; the UNet takes one text context per frame ([B, F, 77, D]: the cross-attention
runs frame by frame), optionally interpolated across `blend` frames at each boundary.
"""
import argparse
import os
import sys
from dataclasses import dataclass

import torch

from video import DEFAULT_FRAMES

METHODS = ("windows", "continue")
WEIGHTINGS = ("pyramid", "flat")


@dataclass
class Long:
    """How a video longer than one window is sampled."""
    window: int  # frames per window: what the adapters were trained on
    overlap: int  # frames two neighbouring windows share (windows)
    method: str = "windows"  # or "continue"
    weighting: str = "pyramid"  # a window's weights on its frames: pyramid (1, 2, .., 2, 1) or flat
    freenoise: bool = True  # windows: FreeNoise's shuffled repeats of the first window's noise (docs/demo.md)
    given: int = 0  # continue: the frames each window is given, the adapters' given_frames


# ---------------------------------------------------------------------------- the schedule (prompt travel)

def parse_travel(text, frames):
    """'0: PROMPT; 8: PROMPT' (or the same as lines) -> [(frame, prompt)], checked against a video of
    `frames` frames: the frames start at 0, increase and stay below `frames`; no prompt is empty."""
    schedule = []
    for item in (s.strip() for s in text.replace("\n", ";").split(";")):
        if not item:
            continue
        frame, sep, prompt = item.partition(":")
        if not sep or not frame.strip().lstrip("-").isdigit():
            raise ValueError(f"travel: expected 'FRAME: PROMPT' items separated by ';' (or lines), got {item!r}")
        frame, prompt = int(frame), prompt.strip()
        if frame < 0:
            raise ValueError(f"travel: frame {frame} is negative")
        if not prompt:
            raise ValueError(f"travel: frame {frame} has an empty prompt")
        if schedule and frame <= schedule[-1][0]:
            raise ValueError(f"travel: frame {frame} comes after frame {schedule[-1][0]}: frames must increase")
        if frame >= frames:
            raise ValueError(f"travel: frame {frame} is past the video's last frame ({frames - 1} of {frames})")
        schedule.append((frame, prompt))
    if not schedule:
        raise ValueError("travel: the schedule is empty")
    if schedule[0][0] != 0:
        raise ValueError(f"travel: the schedule must start at frame 0 (it starts at {schedule[0][0]})")
    return schedule


def read_travel(path, frames):
    """parse_travel of a text file of 'FRAME: PROMPT' lines (blank lines skipped)."""
    if not os.path.isfile(path):
        raise ValueError(f"travel file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return parse_travel(f.read(), frames)


def frame_weights(schedule, frames, blend=0):
    """[frames, P]: how much of each of the schedule's P prompts each frame's text context holds. One
    prompt per frame; with `blend` > 1, linearly from one to the next across `blend` frames centred
    on each boundary (within the two segments)."""
    starts = [f for f, _ in schedule] + [frames]
    weights = torch.zeros(frames, len(schedule), dtype=torch.float64)
    for i in range(len(schedule)):
        weights[starts[i]:starts[i + 1], i] = 1
    for i in range(1, len(schedule) if blend > 1 else 1):  # each boundary, with a blend
        lo, hi = max(starts[i] - blend // 2, starts[i - 1]), min(starts[i] - blend // 2 + blend, starts[i + 1])
        for f in range(lo, hi):
            a = (f - starts[i] + blend / 2 + 0.5) / blend  # 0 -> 1 across the blend, 0.5 at the boundary
            weights[f] = 0
            weights[f, i - 1], weights[f, i] = 1 - a, a
    return weights


@torch.no_grad()
def travel_context(pipe, schedules, frames, negative="", guidance=7.5, blend=0):
    """Per-frame text contexts [B, frames, 77, D] of B schedules, the negative prompt's before them
    ([2B, frames, 77, D]) when guided: Pipeline.guided_context, frame by frame."""
    contexts = []
    for schedule in schedules:
        states = pipe.text_context([p for _, p in schedule])  # [P, 77, D]
        weights = frame_weights(schedule, frames, blend)
        if (weights.max(1).values == 1).all():  # one prompt a frame: its states exactly
            contexts.append(states[weights.argmax(1).to(states.device)])
        else:
            contexts.append(torch.einsum("fp,p...->f...", weights.to(states), states))
    context = torch.stack(contexts)
    if guidance == 1:
        return context
    uncond = pipe.text_context([negative])[:, None].expand(len(schedules), frames, -1, -1)
    return torch.cat([uncond, context])


# ---------------------------------------------------------------------------- windows

def default_overlap(window):
    """Neighbouring windows share three quarters of their frames: on the demo's travel videos (8-frame windows)
    overlap 6 turned at 96.9% of the segments, 4 (half) at 88.5%, 2 at 90.6% (docs/demo.md); a step then runs
    about twice the UNet calls of half-overlapping windows."""
    return window * 3 // 4


def window_starts(frames, size, overlap):
    """The first frames of windows of `size` frames over `frames` frames, neighbours sharing at least `overlap`
    frames; the last window ends at the last frame. One window when the video fits in one."""
    if frames <= size:
        return [0]
    if not 0 <= overlap < size:
        raise ValueError(f"the windows' overlap must be in 0..{size - 1} frames, got {overlap}")
    starts = list(range(0, frames - size + 1, size - overlap))
    return starts + [frames - size] if starts[-1] + size < frames else starts


def blend_weights(frames, size, overlap, weighting="pyramid"):
    """[windows, frames]: the weight of each window's prediction on each frame (0 outside it); every frame's
    weights sum to one. pyramid: a window trusts its middle frames most (its edges see half their neighbours)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown window weighting {weighting!r}: use one of {', '.join(WEIGHTINGS)}")
    starts, size = window_starts(frames, size, overlap), min(size, frames)
    i = torch.arange(size, dtype=torch.float64)
    own = torch.minimum(i + 1, size - i) if weighting == "pyramid" else torch.ones(size, dtype=torch.float64)
    weights = torch.zeros(len(starts), frames, dtype=torch.float64)
    for k, s in enumerate(starts):
        weights[k, s:s + size] = own
    return weights / weights.sum(0)


def run_windows(unet, long, x, t, context, y=None):
    """unet(x, t, context, y) on windows of `long.window` frames, blended per frame (blend_weights): what
    Pipeline.denoise calls in place of the UNet. Per-frame timesteps [B, F] and contexts [B, F, 77, D] are
    cut with the frames; one window is one plain UNet call."""
    frames = x.shape[2]
    if frames <= long.window:
        return unet(x, t, context, y)
    weights = blend_weights(frames, long.window, long.overlap, long.weighting).float().to(x.device)
    out = None
    for k, s in enumerate(window_starts(frames, long.window, long.overlap)):
        cut = slice(s, s + long.window)
        part = unet(x[:, :, cut], t[:, cut] if torch.is_tensor(t) and t.dim() == 2 else t,
                    context[:, cut] if context.dim() == 4 else context, y).float()
        out = torch.zeros(part.shape[:2] + x.shape[2:], device=x.device) if out is None else out
        out[:, :, cut] += part * weights[k, cut].view(1, 1, -1, 1, 1)
    return out


def freenoise(noise, size, overlap, generator):
    """FreeNoise's rescheduled noise [B, C, F, h, w]: the first `size` frames as drawn, then each next block
    of `size - overlap` frames the block `size` frames before it, its frames shuffled (from `generator`)."""
    noise = noise.clone()
    stride = max(size - overlap, 1)
    for s in range(size, noise.shape[2], stride):
        n = min(stride, noise.shape[2] - s)
        order = torch.randperm(stride, generator=generator)[:n] + s - size
        noise[:, :, s:s + n] = noise[:, :, order]
    return noise


# ---------------------------------------------------------------------------- sampling

def decode_chunks(pipe, latents, chunk=None):
    """Pipeline.decode of long latents [B, 4, F, h, w] in chunks of `chunk` frames (default: the VAE's
    chunk_size): float pixels for one chunk at a time, uint8 [B, F, H, W, 3] for the video."""
    chunk = chunk or pipe.vae.chunk_size
    return torch.cat([pipe.decode(latents[:, :, i:i + chunk]) for i in range(0, latents.shape[2], chunk)], dim=1)


@torch.no_grad()
def sample(pipe, schedules, frames, height, width, long=None, steps=50, guidance=7.5, negative="", seed=0,
           sampler="ddim", blend=0, progress=True, eta=0.0, latents=None):
    """B videos (one per schedule [(frame, prompt)], one seed) of `frames` frames -> uint8 [B, frames, H, W, 3].
    `long`: windows or continuation past `long.window` frames; None: one pass over all frames (what
    Pipeline.__call__ does, with a per-frame context). `latents`: start from these (e.g. inverted) instead of noise."""
    factor = pipe.vae.config.downsample_factor
    shape = (len(schedules), pipe.vae.config.latent_channels, frames, height // factor, width // factor)
    generator = torch.Generator().manual_seed(seed)
    x = pipe.start_latents(shape, generator, latents, f"{len(schedules)} video(s), {frames} frames of {width}x{height}")
    guidance = 1 if sampler == "lcm" else guidance  # distilled into the adapters
    context = travel_context(pipe, schedules, frames, negative, guidance, blend)
    if long is None or frames <= long.window:
        latents = pipe.denoise(x, context, steps, guidance, eta, generator, progress, sampler=sampler)
    elif long.method == "continue":
        latents = continue_windows(pipe, x, context, long, steps, guidance, eta, generator, progress, sampler)
    else:
        if long.freenoise:
            x = freenoise(x.cpu(), long.window, long.overlap, generator).to(x.device)
        latents = pipe.denoise(x, context, steps, guidance, eta, generator, progress, sampler=sampler,
                               unet=lambda *a: run_windows(pipe.unet, long, *a))
    return decode_chunks(pipe, latents)


def continue_windows(pipe, x, context, long, steps, guidance, eta, generator, progress, sampler):
    """Continuation: the first window sampled from its noise, each next one after the last `long.given` frames
    of the one before (clean latents, Pipeline.denoise's `given`), its new frames from their own noise."""
    if not 0 < long.given < long.window:
        raise ValueError(f"continuation needs adapters trained with given frames (train.py --given-frames), fewer "
                         f"than the window's {long.window}: these have {long.given}")
    frames, latents = x.shape[2], None
    while latents is None or latents.shape[2] < frames:
        s = 0 if latents is None else latents.shape[2] - long.given
        cut = slice(s, min(s + long.window, frames))
        given = None if latents is None else latents[:, :, s:]
        out = pipe.denoise(x[:, :, cut], context[:, cut], steps, guidance, eta, generator, progress, sampler=sampler,
                           given=given)
        latents = out if latents is None else torch.cat([latents, out[:, :, long.given:]], dim=2)
    return latents


# ---------------------------------------------------------------------------- sample.py's flags

def add_flags(p):
    g = p.add_argument_group("long videos and prompt travel (long_video.py)")
    g.add_argument("--travel", metavar="SPEC", help="prompts along the video, instead of the prompt(s): \"0: PROMPT; 8: "
                   "PROMPT; ...\", each from its frame on")
    g.add_argument("--travel-file", metavar="FILE", help="the --travel schedule from a file of 'FRAME: PROMPT' lines")
    g.add_argument("--travel-blend", type=int, default=0, metavar="N", help="interpolate the text embeddings across N "
                   "frames at each --travel boundary (default: 0, a cut)")
    g.add_argument("--window", type=int, help="past this many frames, sample in temporal windows (default: the frames "
                   f"the adapters were trained on, else {DEFAULT_FRAMES})")
    g.add_argument("--overlap", type=int, help="frames two neighbouring windows share (default: three quarters of the window)")
    g.add_argument("--long-method", choices=METHODS, help="windows: overlapping windows blended at every step; "
                   "continue: each window after the last given frames of the one before (default: continue for "
                   "adapters trained with given frames, as the demo's, else windows; docs/demo.md measures both)")
    g.add_argument("--freenoise", action=argparse.BooleanOptionalAction, default=True, help="windows: start from "
                   "FreeNoise's shuffled repeats of the first window's noise (default: on; docs/demo.md measures both)")


def plan(args, meta, frames, adapters):
    """(Long or None, the travel schedule or None) of a sample.py run: windows (or continuation) where a
    text-to-video run with adapters has more frames than the window."""
    travel = args.travel is not None or args.travel_file is not None
    if travel and (args.prompt or args.prompts):
        raise ValueError("--travel gives the prompts: drop the prompt(s) given beside it")
    others = [f for f, v in (("--edit", args.edit), ("--inverted", args.inverted), ("--image", args.image),
                             ("--continue", args.continue_clip), ("--upscale-video", args.upscale_video)) if v]
    if travel and others:
        raise ValueError(f"--travel samples a video from text: it does not go with {others[0]}")
    if args.travel_blend < 0:
        raise ValueError(f"--travel-blend must be 0 (a cut) or more frames, got {args.travel_blend}")
    schedule = None
    if travel:
        schedule = parse_travel(args.travel, frames) if args.travel is not None else read_travel(args.travel_file, frames)
    window = args.window or int(meta.get("frames", DEFAULT_FRAMES))
    overlap = default_overlap(window) if args.overlap is None else args.overlap
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"--window must be at least 1 and --overlap in 0..{window - 1}, got {window} and {overlap}")
    given = int(meta.get("given_frames", 0))
    # continuation turned more often than windows on the demo, in a third of the time (docs/demo.md)
    method = args.long_method or ("continue" if 0 < given < window else "windows")
    long = Long(window, overlap, method, freenoise=args.freenoise, given=given)
    if long.method == "continue" and not 0 < long.given < window:
        raise ValueError(f"--long-method continue needs adapters trained with given frames (train.py --given-frames), "
                         f"fewer than the --window {window}: {adapters or 'no --adapters'} has {long.given}")
    return (long if adapters and frames > window and not others else None), schedule


def sample_cli(args, plan, pipe, prompt, latents=None):
    """sample.py's text-to-video (plan.travel's prompts, else `prompt`; from `latents` if given): uint8 [F, H, W, 3],
    with its line on stderr."""
    schedule, long = plan.travel or [(0, prompt)], plan.long
    how = "" if long is None else f" ({long.method}, {long.window}-frame windows" + \
        (f" overlapping by {long.overlap}" + (", FreeNoise" if long.freenoise else "") if long.method == "windows"
         else f" after {long.given} given frames") + ")"
    what = "; ".join(f"{f}: {p}" for f, p in schedule) if plan.travel else repr(prompt)
    print(f"{what}: {plan.frames} frames of {plan.width}x{plan.height}{how}, {plan.steps} {plan.sampler} steps, "
          f"guidance {plan.guidance}", file=sys.stderr)
    return sample(pipe, [schedule], plan.frames, plan.height, plan.width, long, plan.steps, plan.guidance,
                  args.negative, args.seed, plan.sampler, args.travel_blend, eta=args.eta, latents=latents)[0]
