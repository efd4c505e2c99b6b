"""The paper's ablation (its Table 6) in miniature, measured on the demo model: every row samples the
same videos (each caption of the shapes world, times --seeds) and shapes.score rates them with the
colour-segmentation tracker; the result is a markdown table (and a JSON file with every score).

    python evaluate.py                     # the README's table, from the adapters in models/
    python evaluate.py --row "mine=out/shapes/adapters.safetensors" --row "image model="

Rows (default): the frozen image model run frame by frame (no adapters, no latent-shift attention),
the shipped SimDA adapters (1500 steps), and the ablation: SimDA, without latent-shift attention,
without temporal adapters and without spatial adapters, each trained with the same budget (750
steps; README: "The demo model").
"""
import argparse
import json
import os
import sys

import torch

import shapes
import simda
from runtime import Progress
from video import resolve_shape, save_video

ROWS = [
    ("frozen image model, frame by frame", None),
    ("SimDA, shipped (1500 steps)", simda.DEMO_ADAPTERS),
    ("SimDA (750 steps, like each row below)", os.path.join(simda.MODELS_DIR, "ablation", "simda-750-steps.safetensors")),
    ("without latent-shift attention", os.path.join(simda.MODELS_DIR, "ablation", "no-latent-shift.safetensors")),
    ("without temporal adapters", os.path.join(simda.MODELS_DIR, "ablation", "no-temporal-adapters.safetensors")),
    ("without spatial adapters", os.path.join(simda.MODELS_DIR, "ablation", "no-spatial-adapters.safetensors")),
]
COLUMNS = [("motion_correct", "motion direction", "%"), ("colour_correct", "colour", "%"), ("shape_correct", "shape", "%"),
           ("present_fraction", "object present (frames)", "%"), ("area_variation", "area variation", "f"),
           ("smoothness", "smoothness (0 = steady)", "f"), ("stray_fraction", "stray blob (frames)", "%")]


def prompts_and_seeds(seeds):
    """Every caption of the world once per seed: (prompt, seed) pairs, seed-major."""
    return [(shapes.caption(*c), s) for s in range(seeds) for c in shapes.COMBINATIONS]


def evaluate_row(pipe, jobs, frames, height, width, steps, guidance, batch_size, save_dir=None):
    """Sample and score every (prompt, seed) job; returns the list of score dicts."""
    scores = []
    progress = Progress("videos", len(jobs))
    for i in range(0, len(jobs), batch_size):
        batch = jobs[i:i + batch_size]
        for seed in sorted({s for _, s in batch}):  # a pipeline call takes one seed
            prompts = [p for p, s in batch if s == seed]
            videos = pipe(prompts, frames, height, width, steps, guidance, seed=seed, progress=False).numpy()
            for prompt, video in zip(prompts, videos):
                scores.append(shapes.score(video, prompt))
                if save_dir:
                    save_video(video, os.path.join(save_dir, f"{len(scores) - 1:03d}-{prompt.replace(' ', '-')}.gif"))
        progress.show(len(scores))
    return scores


def table(results):
    """Markdown: one row per evaluated model, the means of shapes.score."""
    head = "| model | " + " | ".join(title for _, title, _ in COLUMNS) + " | videos |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, summary in results.items():
        cells = [f"{100 * summary[k]:.1f}%" if kind == "%" else f"{summary[k]:.3f}" for k, _, kind in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {summary['videos']} |")
    return "\n".join(lines)


def parse_rows(values):
    rows = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name:
            raise ValueError(f"--row takes NAME=ADAPTERS (ADAPTERS empty: the image model alone), got {value!r}")
        rows.append((name, path or None))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description="Score sampled videos of the shapes world with the tracker: the "
                                            "ablation table of the demo model (README).")
    p.add_argument("--ckpt", default=simda.DEMO_CHECKPOINT, help="image model (default: the demo model)")
    p.add_argument("--row", action="append", default=[], metavar="NAME=ADAPTERS",
                   help="a row: its name and adapter file (empty: the image model frame by frame); repeatable "
                        "(default: the five rows of the README)")
    p.add_argument("--seeds", type=int, default=2, help="videos per caption, 48 captions (default: %(default)s)")
    p.add_argument("--frames", type=int, help=f"frames per video (default: the adapters' metadata, else {shapes.FRAMES})")
    p.add_argument("--size", type=int, help=f"frame size (default: the adapters' metadata, else {shapes.SIZE})")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=48, help="videos per sampling call (default: %(default)s)")
    p.add_argument("--out", default="out/evaluate.json", help="every score, per row, as JSON (default: %(default)s)")
    p.add_argument("--save-videos", metavar="DIR", help="also write every sampled video as a GIF under DIR/<row>/")
    args = p.parse_args(argv)
    try:
        rows = parse_rows(args.row) if args.row else ROWS
        for name, path in rows:
            if path and not os.path.exists(path):
                if args.row:
                    raise ValueError(f"row {name!r}: adapter file not found: {path}")
                print(f"skipping row {name!r}: no adapters at {path} (README: 'The demo model' says how to "
                      f"train them)", file=sys.stderr)
        rows = [(name, path) for name, path in rows if not path or os.path.exists(path)]
        if args.seeds < 1 or args.batch_size < 1:
            raise ValueError("--seeds and --batch-size must be at least 1")
        jobs = prompts_and_seeds(args.seeds)
        results, everything = {}, {}
        for name, path in rows:
            meta = simda.read_adapters(path)[1] if path else {}
            frames, height, width = resolve_shape(args.frames, args.size, defaults=[
                meta.get("frames", shapes.FRAMES), meta.get("height", shapes.SIZE), meta.get("width", shapes.SIZE)])
            print(f"{name}: {len(jobs)} videos of {frames} frames at {width}x{height}, {args.steps} DDIM steps, "
                  f"guidance {args.guidance}", file=sys.stderr, flush=True)
            pipe = simda.load_pipeline(args.ckpt, adapters=path)
            save_dir = os.path.join(args.save_videos, name.replace(" ", "-").replace(",", "")) if args.save_videos else None
            if save_dir:
                os.makedirs(save_dir, exist_ok=True)
            scores = evaluate_row(pipe, jobs, frames, height, width, args.steps, args.guidance, args.batch_size, save_dir)
            results[name], everything[name] = shapes.summarise(scores), scores
            print(table({name: results[name]}).splitlines()[-1], file=sys.stderr, flush=True)
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "summary": results, "scores": everything}, f, indent=1)
    print(table(results))
    print(f"(every score: {args.out})", file=sys.stderr)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
