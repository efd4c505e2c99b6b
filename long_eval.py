"""The demo's long-video table (`python evaluate.py long`): prompt-travel videos of 4 segments of 8 frames, each
segment "a COLOUR SHAPE moving DIRECTION" with the direction changed at every boundary (turns around a square,
reversals: paths that keep the object in the frame), sampled in one command each by every method of
long_video.py, and read by the tracker (shapes.track):

  direction   per segment, the object's centroid moved the segment's way (first to last frame of it, by at
              least size/32 pixels)
  colour, shape  per frame, the largest object has the prompted colour (shape)
  steps <= 3 px  per pair of consecutive frames inside a segment, the centroid moved at most 3 px (at 32x32)
  seams <= 3 px  the same across the 3 boundaries between segments, where the prompt changes
  stray blob, present  per frame: a smudge of another hue (shapes.stray_blobs); exactly one object of the colour
"""
import argparse
import json
import os
import sys
import time

import numpy as np

import long_video
import shapes
import simda
from shapes_eval import centroids, show_row, table
from video import save_video

# every path turns or reverses at each boundary and comes back near where it started: it stays in the frame
PATHS = [("right", "down", "left", "up"), ("down", "left", "up", "right"), ("left", "up", "right", "down"),
         ("up", "right", "down", "left"), ("right", "left", "right", "left"), ("left", "right", "left", "right"),
         ("down", "up", "down", "up"), ("up", "down", "up", "down")]
SEGMENT = 8  # frames per segment: the demo adapters' window
METHODS = {"one pass": None, "windows": dict(method="windows", freenoise=False),
           "windows, FreeNoise": dict(method="windows", freenoise=True), "continuation": dict(method="continue")}
COLUMNS = [("direction", "direction / segment", "%"), ("colour", "colour (frames)", "%"), ("shape", "shape (frames)", "%"),
           ("steps", "steps <= 3 px", "%"), ("seams", "seams <= 3 px", "%"), ("stray", "stray blob (frames)", "%"),
           ("present", "object present (frames)", "%")]  # per-video seconds are in the JSON (batched calls)


def paths(count):
    """`count` travel schedules [(frame, prompt)]: path k turns by PATHS[k % 8], with colour and shape cycling."""
    colours = list(shapes.COLOURS)
    out = []
    for k in range(count):
        colour, shape = colours[k % len(colours)], shapes.SHAPES[(k // len(PATHS)) % len(shapes.SHAPES)]
        out.append([(i * SEGMENT, shapes.caption(colour, shape, d)) for i, d in enumerate(PATHS[k % len(PATHS)])])
    return out


def long_scores(video, schedule):
    """The tracker's reading of a travel video (uint8 [F, H, W, 3]) against its schedule (see the module's doc)."""
    colour, shape, _ = shapes.parse_caption(schedule[0][1])
    tracks = shapes.track(video)
    c, size = centroids(tracks, colour), video.shape[1]
    bounds = [f for f, _ in schedule] + [len(video)]
    directions = [shapes.direction_of(c[b - 1] - c[a], size / 32) if np.isfinite(c[[a, b - 1]]).all() else "none"
                  for a, b in zip(bounds, bounds[1:])]
    step = np.hypot(*(c[1:] - c[:-1]).T)  # NaN where a frame lacks the object: not within 3 px
    within = np.nan_to_num(step, nan=np.inf) <= 3 * size / 32
    seams = np.array(bounds[1:-1]) - 1  # the step from frame b - 1 to b
    inside = np.setdiff1d(np.arange(len(step)), seams)
    mine = [[o for o in f if o["colour"] == colour] for f in tracks]
    return {"direction": float(np.mean([d == shapes.parse_caption(p)[2] for d, (_, p) in zip(directions, schedule)])),
            "colour": float(np.mean([bool(f) and f[0]["colour"] == colour for f in tracks])),
            "shape": float(np.mean([bool(f) and f[0]["shape"] == shape for f in tracks])),
            "steps": float(within[inside].mean()), "seams": float(within[seams].mean()),
            "stray": float(np.mean([n > 0 for n in shapes.stray_blobs(video, colour)])),
            "present": float(np.mean([len(f) == 1 for f in mine])), "directions": directions}


def run_row(pipe, schedules, seeds, long, args, save_dir=None):
    """Sample every schedule at every seed with `long` (one call per batch of one seed) and score it."""
    scores = []
    for seed in range(seeds):
        for i in range(0, len(schedules), args.batch_size):
            batch, start = schedules[i:i + args.batch_size], time.perf_counter()
            videos = long_video.sample(pipe, batch, args.frames, shapes.SIZE, shapes.SIZE, long, args.steps,
                                       args.guidance, seed=seed, sampler=args.sampler, blend=args.blend,
                                       progress=False).numpy()
            seconds = (time.perf_counter() - start) / len(batch)
            for k, (video, schedule) in enumerate(zip(videos, batch)):
                scores.append({**long_scores(video, schedule), "seconds": seconds})
                if save_dir:
                    save_video(video, os.path.join(save_dir, f"seed{seed}-{i + k:03d}.gif"), shapes.FPS)
    return scores


def main_long(argv):
    p = argparse.ArgumentParser(prog="evaluate.py long", description="Score prompt-travel videos of the shapes world "
                                "(4 segments of 8 frames) sampled by each long-video method (docs/demo.md).")
    p.add_argument("--ckpt", default=simda.DEMO_CHECKPOINT, help="image model (default: the demo model)")
    p.add_argument("--adapters", default=simda.DEMO_ADAPTERS, help="adapters (default: the demo's)")
    p.add_argument("--method", action="append", choices=list(METHODS), help="a row; repeatable (default: all)")
    p.add_argument("--paths", type=int, default=24, help=f"travel videos per seed, cycling {len(PATHS)} paths "
                                                         "(default: %(default)s)")
    p.add_argument("--seeds", type=int, default=1, help="seeds (default: %(default)s)")
    p.add_argument("--overlap", type=int, default=long_video.default_overlap(SEGMENT), help="windows: frames neighbours share (default: %(default)s)")
    p.add_argument("--blend", type=int, default=0, help="--travel-blend: frames of text interpolation (default: 0)")
    p.add_argument("--sampler", choices=list(simda.SAMPLERS), default=simda.DEMO_SAMPLING[0], help="(default: %(default)s)")
    p.add_argument("--steps", type=int, default=simda.DEMO_SAMPLING[1][simda.DEMO_SAMPLING[0]], help="(default: %(default)s)")
    p.add_argument("--guidance", type=float, default=7.5, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=24, help="videos per sampling call (default: %(default)s)")
    p.add_argument("--out", default="out/evaluate-long.json", help="every score, per row, as JSON (default: %(default)s)")
    p.add_argument("--save-videos", metavar="DIR", help="also write every video as a GIF under DIR/<row>/")
    args = p.parse_args(argv)
    args.frames = len(PATHS[0]) * SEGMENT
    try:
        if min(args.paths, args.seeds, args.batch_size) < 1 or not 0 <= args.overlap < SEGMENT:
            raise ValueError(f"need --paths, --seeds, --batch-size >= 1 and --overlap in 0..{SEGMENT - 1}")
        pipe = simda.load_pipeline(args.ckpt, adapters=args.adapters)
        simda.check_sampling(args.sampler, args.steps)
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    schedules, results = paths(args.paths), {}
    for name in args.method or list(METHODS):
        how = METHODS[name]
        long = None if how is None else long_video.Long(SEGMENT, args.overlap, given=pipe.given_frames, **how)
        print(f"{name}: {len(schedules) * args.seeds} videos of {args.frames} frames, {args.steps} {args.sampler} steps",
              file=sys.stderr, flush=True)
        save_dir = os.path.join(args.save_videos, name.replace(" ", "-").replace(",", "")) if args.save_videos else None
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
        results[name] = run_row(pipe, schedules, args.seeds, long, args, save_dir)
        show_row(results, name, COLUMNS)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "scores": results}, f, indent=1)
    print(table(results, COLUMNS, "method"))
    print(f"(every score: {args.out})", file=sys.stderr)
