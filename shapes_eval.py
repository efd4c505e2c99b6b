"""The demo's tables on the shapes world (`python evaluate.py shapes`, `python evaluate.py sr`): the
paper's ablation (its Table 6) in miniature, and the second stage against its truth.

`evaluate.py shapes` (the default of `evaluate.py`): every row samples the same videos (each caption
of the shapes world, times --seeds) and shapes.score rates them with the colour-segmentation tracker;
the result is a markdown table (and a JSON file with every score). Rows (default): the frozen image
model run frame by frame (no adapters, no latent-shift attention), the shipped SimDA adapters (1500
steps), and the ablation: SimDA, without latent-shift attention, without temporal adapters and
without spatial adapters, each trained with the same budget (750 steps; README: "The demo model").

`evaluate.py sr` scores the demo's second stage (32x32 -> 128x128): each row upscales the same clips,
downscaled x4 from their true 128x128 render (so the input is exact), and metrics.py compares them
with the truth (PSNR, SSIM, flicker) while the tracker reads them; then, end to end, stage one's
videos from the captions are upscaled and tracked. Cells are means and one standard error.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

import metrics
import shapes
import simda
from runtime import Progress, pick_dtype
from video import resample, resolve_shape, save_video, to_frames

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


SR_ROWS = [
    ("bicubic", "bicubic"),
    ("image upscaler, frame by frame", None),
    ("video upscaler (SimDA)", simda.DEMO_SR_ADAPTERS),
    ("without temporal adapters", os.path.join(simda.MODELS_DIR, "ablation", "sr-no-temporal-adapters.safetensors")),
    ("without latent-shift attention", os.path.join(simda.MODELS_DIR, "ablation", "sr-no-latent-shift.safetensors")),
]
SR_COLUMNS = [("psnr", "PSNR (dB)", 2), ("ssim", "SSIM", 4), ("flicker", "flicker (levels)", 3),
              ("shape_correct", "shape", "%"), ("colour_clean", "colour, whole frame", "%"),
              ("motion_correct", "direction", "%"), ("stray_fraction", "stray blob (frames)", "%")]
SR_SEED = 1000  # the evaluation's clips: shapes.sample's seeds SR_SEED, SR_SEED + 1, ...; training used seed 0


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


def cell(values, kind):
    """'mean ± standard error' of one column's per-video values."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    mean, se = values.mean(), values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{100 * mean:.1f}% ± {100 * se:.1f}" if kind == "%" else f"{mean:.{kind}f} ± {se:.{kind}f}"


def sr_table(results, columns):
    """Markdown: one row per method, each column's mean ± one standard error over the videos."""
    lines = ["| method | " + " | ".join(title for _, title, _ in columns) + " | videos |",
             "|" + "---|" * (len(columns) + 2)]
    for name, scores in results.items():
        cells = [cell([s[k] for s in scores], kind) for k, _, kind in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(scores)} |")
    return "\n".join(lines)


def sr_clips(seeds, frames=shapes.FRAMES, size=shapes.SIZE):
    """Every caption of the world once per seed: the true videos [N, 3, F, 4 size, 4 size] in [-1, 1],
    drawn at 4x from scenes of `size` pixels, their captions, and the seed of each."""
    jobs = [(i, SR_SEED + s) for s in range(seeds) for i in range(len(shapes.COMBINATIONS))]
    videos, captions = zip(*(shapes.sample(i, seed, frames, size, size * simda.UPSCALE) for i, seed in jobs))
    truth = torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # b f H W 3 -> b 3 f H W
    return truth, list(captions), [seed - SR_SEED for _, seed in jobs]


def upscale_all(upscaler, low_res, captions, seeds, steps, guidance, noise_level, batch_size, name):
    """Upscale every video (one call per batch of one seed) -> uint8 frames [N, F, 4H, 4W, 3]; upscaler
    None: bicubic."""
    if upscaler is None:
        return to_frames(resample(low_res, simda.UPSCALE))
    out, progress = [None] * len(captions), Progress(f"{name}: videos", len(captions))
    for seed in sorted(set(seeds)):
        mine = [i for i, s in enumerate(seeds) if s == seed]
        for j in range(0, len(mine), batch_size):
            batch = mine[j:j + batch_size]
            videos = upscaler.upscale(low_res[batch], [captions[i] for i in batch], steps, guidance, noise_level,
                                      seed=seed, progress=False)
            for i, video in zip(batch, to_frames(videos)):
                out[i] = video
            progress.show(sum(v is not None for v in out))
    return torch.stack(out)


def sr_scores(videos, truth, captions):
    """Per video: PSNR, SSIM and flicker against the truth, and the tracker's scores (shapes.score)."""
    numbers = {"psnr": metrics.psnr(videos, truth), "ssim": metrics.ssim(videos, truth),
               "flicker": metrics.flicker(videos, truth)}
    return [{**shapes.score(video.numpy(), text), **{k: float(v[i]) for k, v in numbers.items()}}
            for i, (video, text) in enumerate(zip(videos, captions))]


def main_sr(argv):
    p = argparse.ArgumentParser(prog="evaluate.py sr", description="Score the demo's second stage: the upscalers "
                                "(32x32 -> 128x128) against the true 128x128 render, and end to end from captions.")
    p.add_argument("--sr-ckpt", default=simda.DEMO_UPSCALER, help="the upscaler (default: the demo's)")
    p.add_argument("--ckpt", default=simda.DEMO_CHECKPOINT, help="stage one, end to end (default: the demo model)")
    p.add_argument("--adapters", default=simda.DEMO_ADAPTERS, help="stage one's adapters (default: the demo's)")
    p.add_argument("--row", action="append", default=[], metavar="NAME=ADAPTERS",
                   help="a row: its name and upscaler adapter file (empty: the image upscaler frame by frame; "
                        "'bicubic': bicubic upsampling); repeatable (default: the README's five rows)")
    p.add_argument("--seeds", type=int, default=2, help="clips per caption, 48 captions (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="the upscaler's DDIM steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=1.0, help="the upscaler's guidance (default: %(default)s)")
    p.add_argument("--noise-level", type=int, default=20, help="noise level of the low-res input (default: %(default)s)")
    p.add_argument("--t2v-steps", type=int, default=25, help="stage one's DDIM steps, end to end (default: %(default)s)")
    p.add_argument("--t2v-guidance", type=float, default=7.5, help="stage one's guidance (default: %(default)s)")
    p.add_argument("--end-to-end", action="append", metavar="NAME",
                   help="a row to run end to end too, on stage one's videos (repeatable; default: the first three rows "
                        "of the default table, or every --row; 'none': skip the end-to-end table)")
    p.add_argument("--batch-size", type=int, default=8, help="videos per upscaler call (default: %(default)s)")
    p.add_argument("--out", default="out/evaluate-sr.json", help="every score, per row, as JSON (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        rows = parse_rows(args.row) if args.row else SR_ROWS
        missing = [(name, path) for name, path in rows if path not in (None, "bicubic") and not os.path.exists(path)]
        if missing and args.row:
            raise ValueError(f"row {missing[0][0]!r}: adapter file not found: {missing[0][1]}")
        for name, path in missing:
            print(f"skipping row {name!r}: no adapters at {path} (README: 'The demo's second stage')", file=sys.stderr)
        rows = [row for row in rows if row not in missing]
        chosen = args.end_to_end or [name for name, _ in rows if args.row or (name, _) in SR_ROWS[:3]]
        if unknown := set(chosen) - {name for name, _ in rows} - {"none"}:
            raise ValueError(f"--end-to-end {sorted(unknown)[0]!r} is not a row: pick from {[n for n, _ in rows]}")
        chosen = [name for name in chosen if name != "none"]
        if args.seeds < 1 or args.batch_size < 1:
            raise ValueError("--seeds and --batch-size must be at least 1")
        truth, captions, seeds = sr_clips(args.seeds)
        low_res, truth_frames = resample(truth, 1 / simda.UPSCALE), to_frames(truth)
        print(f"{len(captions)} clips of {truth.shape[2]} frames, {low_res.shape[-1]}x{low_res.shape[-2]} -> "
              f"{truth.shape[-1]}x{truth.shape[-2]}; {args.steps} DDIM steps, guidance {args.guidance}, noise level "
              f"{args.noise_level}", file=sys.stderr)
        results, upscalers = {}, {}
        for name, path in rows:
            upscaler = None if path == "bicubic" else simda.load_upscaler(args.sr_ckpt, adapters=path)
            upscalers[name] = upscaler
            videos = upscale_all(upscaler, low_res, captions, seeds, args.steps, args.guidance, args.noise_level,
                                 args.batch_size, name)
            results[name] = sr_scores(videos, truth_frames, captions)
            print(sr_table({name: results[name]}, SR_COLUMNS).splitlines()[-1], file=sys.stderr, flush=True)
        chosen = {name: upscalers[name] for name in chosen}
        end_to_end = sr_end_to_end(args, chosen) if chosen else {}
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "scores": results, "end_to_end": end_to_end}, f, indent=1)
    print(sr_table(results, SR_COLUMNS))
    if end_to_end:
        print()
        print(sr_table(end_to_end, SR_COLUMNS[3:]))
    print(f"(every score: {args.out})", file=sys.stderr)


def sr_end_to_end(args, upscalers):
    """Stage one's videos from every caption (per seed), then each upscaler row on them: the tracker's
    scores at 32x32 and at 128x128."""
    pipe = simda.load_pipeline(args.ckpt, adapters=args.adapters)
    jobs = prompts_and_seeds(args.seeds)
    low, progress = [], Progress("stage one: videos", len(jobs))
    for seed in range(args.seeds):
        prompts = [p for p, s in jobs if s == seed]
        low.append(pipe(prompts, shapes.FRAMES, shapes.SIZE, shapes.SIZE, args.t2v_steps, args.t2v_guidance,
                        seed=seed, progress=False))
        progress.show(len(low) * len(prompts))
    low = torch.cat(low)
    captions, seeds = [p for p, _ in jobs], [s for _, s in jobs]
    results = {"stage one alone (32x32)": [shapes.score(v.numpy(), c) for v, c in zip(low, captions)]}
    low_res = low.permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # b f h w 3 -> b 3 f h w, in [-1, 1]
    for name, upscaler in upscalers.items():
        videos = upscale_all(upscaler, low_res, captions, seeds, args.steps, args.guidance, args.noise_level,
                             args.batch_size, f"end to end, {name}")
        results[f"stage one + {name} (128x128)"] = [shapes.score(v.numpy(), c) for v, c in zip(videos, captions)]
    return results


def parse_rows(values):
    rows = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name:
            raise ValueError(f"--row takes NAME=ADAPTERS (ADAPTERS empty: the image model alone), got {value!r}")
        rows.append((name, path or None))
    return rows


def main_shapes(argv):
    p = argparse.ArgumentParser(prog="evaluate.py shapes", description="Score sampled videos of the shapes world with the tracker: the "
                                            "ablation table of the demo model (README).")
    p.add_argument("--ckpt", default=simda.DEMO_CHECKPOINT, help="image model (default: the demo model)")
    p.add_argument("--row", action="append", default=[], metavar="NAME=ADAPTERS",
                   help="(sub-command 'sr': the second stage, see `evaluate.py sr --help`) "
                        "a row: its name and adapter file (empty: the image model frame by frame); repeatable "
                        "(default: the five rows of the README)")
    p.add_argument("--seeds", type=int, default=2, help="videos per caption, 48 captions (default: %(default)s)")
    p.add_argument("--frames", type=int, help=f"frames per video (default: the adapters' metadata, else {shapes.FRAMES})")
    p.add_argument("--size", type=int, help=f"frame size (default: the adapters' metadata, else {shapes.SIZE})")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=48, help="videos per sampling call (default: %(default)s)")
    p.add_argument("--out", default="out/evaluate.json", help="every score, per row, as JSON (default: %(default)s)")
    p.add_argument("--save-videos", metavar="DIR", help="also write every sampled video as a GIF under DIR/<row>/")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"],
                   help="the models' dtype on the CPU (auto: runtime.pick_dtype; default: %(default)s, as the README's "
                        "table)")
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
            pipe = simda.load_pipeline(args.ckpt, dtype=pick_dtype(args.dtype, torch.device("cpu")), adapters=path)
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
