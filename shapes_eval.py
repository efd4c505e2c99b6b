"""The demo's tables on the shapes world (`python evaluate.py shapes`, `python evaluate.py sr`): the
paper's ablation (its Table 6) in miniature, and the second stage against its truth.

`evaluate.py shapes` (the default of `evaluate.py`): every row samples the same videos (each caption of the shapes
world, times --seeds) and shapes.score rates them with the colour-segmentation tracker; the result is a markdown
table (and a JSON file with every score). Rows (default): the frozen image model run frame by frame (no adapters,
no latent-shift attention), the shipped SimDA adapters, and the ablation: SimDA, without latent-shift attention,
without temporal adapters and without spatial adapters, each trained the same 750 steps (docs/demo.md).

`evaluate.py sr` scores the demo's second stage (32x32 -> 128x128): each row upscales the same clips, downscaled
x4 from their true 128x128 render (so the input is exact), and metrics.py compares them with the truth (PSNR,
SSIM, flicker) while the tracker reads them; then, end to end, stage one's videos from the captions are upscaled
and tracked. Cells are means and one standard error.

`evaluate.py i2v` scores image-to-video and continuation (Pipeline.extend) on drawn videos of seeds the training
never used: each row animates their first frames (does frame 0 stay, does the object keep its colour and shape,
move the prompted way, not jump from frame 0 to 1?), then continues their first --frames frames from the last K
(does the object keep its course across the seam?).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

import metrics
import shapes
import simda
from runtime import Progress, pick_dtype
from video import resample, resolve_shape, save_video, to_frames

ROWS = [
    ("frozen image model, frame by frame", None),
    ("SimDA, shipped", simda.DEMO_ADAPTERS),
    ("SimDA (750 steps, like each row below)", os.path.join(simda.MODELS_DIR, "ablation", "simda-750-steps.safetensors")),
    ("without latent-shift attention", os.path.join(simda.MODELS_DIR, "ablation", "no-latent-shift.safetensors")),
    ("without temporal adapters", os.path.join(simda.MODELS_DIR, "ablation", "no-temporal-adapters.safetensors")),
    ("without spatial adapters", os.path.join(simda.MODELS_DIR, "ablation", "no-spatial-adapters.safetensors")),
]
COLUMNS = [("motion_correct", "motion direction", "%"), ("colour_correct", "colour", "%"), ("shape_correct", "shape", "%"),
           ("shape_by_fill", "shape (box fill)", "%"), ("present_fraction", "object present (frames)", "%"), ("area_variation",
           "area variation", 3), ("smoothness", "smoothness (0 = steady)", 3), ("stray_fraction", "stray blob (frames)", "%"),
           ("seconds", "s / video", 3)]


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
I2V_SEED = 2000  # evaluate.py i2v's drawn videos, seeds I2V_SEED, I2V_SEED + 1, ...: unseen too
I2V_ROWS = [
    ("SimDA, shipped (given frames, 3500 steps)", simda.DEMO_ADAPTERS),
    ("given frames, the first 1500 steps", os.path.join(simda.MODELS_DIR, "ablation", "simda-given-1500-steps.safetensors")),
    ("text-to-video adapters, replacement only", os.path.join(simda.MODELS_DIR, "ablation", "simda-no-given-frames.safetensors")),
]
I2V_COLUMNS = [("motion_correct", "direction", "%"), ("kept", "colour and shape (frames)", "%"),
               ("continuity", "frame 0 -> 1 within 3 px", "%"), ("jump", "frame 0 -> 1 (px)", 2),
               ("smoothness", "smoothness (0 = steady)", 3), ("stray_fraction", "stray blob (frames)", "%"),
               ("first_exact", "frame 0 latent exact", "%"), ("first_error", "frame 0 error (levels)", 2)]
CONTINUE_COLUMNS = [("motion_correct", "direction after the seam", "%"), ("kept", "colour and shape (new frames)", "%"),
                    ("no_jump", "seam within 3 px", "%"), ("seam", "seam jump (px)", 2),
                    ("course", "off the drawn course (px)", 2), ("smoothness", "smoothness, whole (0 = steady)", 3)]


def prompts_and_seeds(seeds):
    """Every caption of the world once per seed: (prompt, seed) pairs, seed-major."""
    return [(shapes.caption(*c), s) for s in range(seeds) for c in shapes.COMBINATIONS]


def evaluate_row(pipe, jobs, frames, height, width, sampling, guidance, batch_size, save_dir=None):
    """Sample (`sampling`: (sampler, steps)) and score every (prompt, seed) job: score dicts, with each video's seconds."""
    scores = []
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
    progress = Progress("videos", len(jobs))
    for i in range(0, len(jobs), batch_size):
        batch = jobs[i:i + batch_size]
        for seed in sorted({s for _, s in batch}):  # a pipeline call takes one seed
            prompts, start = [p for p, s in batch if s == seed], time.perf_counter()
            videos = pipe(prompts, frames, height, width, sampling[1], guidance, seed=seed, progress=False,
                          sampler=sampling[0]).numpy()  # lcm: the guidance distilled in
            seconds = (time.perf_counter() - start) / len(prompts)  # sampling and decoding, per video of the call
            for prompt, video in zip(prompts, videos):
                scores.append({**shapes.score(video, prompt), "seconds": seconds})
                if save_dir:
                    save_video(video, os.path.join(save_dir, f"{len(scores) - 1:03d}-{prompt.replace(' ', '-')}.gif"))
        progress.show(len(scores))
    return scores


def cell(values, kind):
    """'mean ± standard error' of one column's per-video values."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return "n/a"
    mean, se = values.mean(), values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{100 * mean:.1f}% ± {100 * se:.1f}" if kind == "%" else f"{mean:.{kind}f} ± {se:.{kind}f}"


def table(results, columns, what="method"):
    """Markdown: one row per method ({name: per-video score dicts}), each column's mean ± one standard error
    over the videos (NaNs, e.g. no object found, left out)."""
    lines = [f"| {what} | " + " | ".join(title for _, title, _ in columns) + " | videos |",
             "|" + "---|" * (len(columns) + 2)]
    for name, scores in results.items():
        cells = [cell([s[k] for s in scores], kind) for k, _, kind in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(scores)} |")
    return "\n".join(lines)


def show_row(results, name, columns):
    print(table({name: results[name]}, columns, "model").splitlines()[-1], file=sys.stderr, flush=True)


def sr_clips(seeds, frames=shapes.FRAMES, size=shapes.SIZE):
    """Every caption of the world once per seed: the true videos [N, 3, F, 4 size, 4 size] in [-1, 1],
    drawn at 4x from scenes of `size` pixels, their captions, and the seed of each."""
    jobs = [(i, SR_SEED + s) for s in range(seeds) for i in range(len(shapes.COMBINATIONS))]
    videos, captions = zip(*(shapes.sample(i, seed, frames, size, size * simda.UPSCALE) for i, seed in jobs))
    truth = torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # b f H W 3 -> b 3 f H W
    return truth, list(captions), [seed - SR_SEED for _, seed in jobs]


def upscale_all(upscaler, low_res, captions, seeds, sampling, guidance, noise_level, batch_size, name):
    """Upscale every video (one call per batch of one seed; `sampling`: (sampler, steps)) -> uint8 frames
    [N, F, 4H, 4W, 3]; upscaler None: bicubic."""
    if upscaler is None:
        return to_frames(resample(low_res, simda.UPSCALE))
    out, progress = [None] * len(captions), Progress(f"{name}: videos", len(captions))
    for seed in sorted(set(seeds)):
        mine = [i for i, s in enumerate(seeds) if s == seed]
        for j in range(0, len(mine), batch_size):
            batch = mine[j:j + batch_size]
            videos = upscaler.upscale(low_res[batch], [captions[i] for i in batch], sampling[1], guidance, noise_level,
                                      seed=seed, progress=False, sampler=sampling[0])
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
                        "'bicubic': bicubic upsampling); repeatable (default: the five rows of docs/second-stage.md)")
    p.add_argument("--seeds", type=int, default=2, help="clips per caption, 48 captions (default: %(default)s)")
    add_sampling_flags(p, steps=20)
    p.add_argument("--guidance", type=float, default=1.0, help="the upscaler's guidance (default: %(default)s)")
    p.add_argument("--noise-level", type=int, default=20, help="noise level of the low-res input (default: %(default)s)")
    p.add_argument("--t2v-sampler", choices=list(simda.SAMPLERS), default="ddim",
                   help="stage one's sampler, end to end (default: %(default)s)")
    p.add_argument("--t2v-steps", type=int, default=25, help="stage one's steps, end to end (default: %(default)s)")
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
            print(f"skipping row {name!r}: no adapters at {path} (docs/second-stage.md says how to train them)",
                  file=sys.stderr)
        rows = [row for row in rows if row not in missing]
        chosen = args.end_to_end or [name for name, _ in rows if args.row or (name, _) in SR_ROWS[:3]]
        if unknown := set(chosen) - {name for name, _ in rows} - {"none"}:
            raise ValueError(f"--end-to-end {sorted(unknown)[0]!r} is not a row: pick from {[n for n, _ in rows]}")
        chosen = [name for name in chosen if name != "none"]
        if args.seeds < 1 or args.batch_size < 1:
            raise ValueError("--seeds and --batch-size must be at least 1")
        settings = settings_of(args)
        simda.check_sampling(args.t2v_sampler, args.t2v_steps)
        truth, captions, seeds = sr_clips(args.seeds)
        low_res, truth_frames = resample(truth, 1 / simda.UPSCALE), to_frames(truth)
        print(f"{len(captions)} clips of {truth.shape[2]} frames, {low_res.shape[-1]}x{low_res.shape[-2]} -> "
              f"{truth.shape[-1]}x{truth.shape[-2]}; {', '.join(f'{n} {s} steps' for s, n in settings)}, guidance "
              f"{args.guidance}, noise level {args.noise_level}", file=sys.stderr)
        results, upscalers = {}, {}
        for name, path in rows:
            upscaler = None if path == "bicubic" else simda.load_upscaler(args.sr_ckpt, adapters=path)
            upscalers[name] = upscaler
            for sampling in settings[:1] if upscaler is None else settings:
                row = name if upscaler is None else named(name, sampling, settings)
                videos = upscale_all(upscaler, low_res, captions, seeds, sampling, args.guidance, args.noise_level,
                                     args.batch_size, row)
                results[row] = sr_scores(videos, truth_frames, captions)
                show_row(results, row, SR_COLUMNS)
        chosen = {name: upscalers[name] for name in chosen}
        end_to_end = sr_end_to_end(args, chosen) if chosen else {}
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "scores": results, "end_to_end": end_to_end}, f, indent=1)
    print(table(results, SR_COLUMNS))
    if end_to_end:
        print()
        print(table(end_to_end, SR_COLUMNS[3:]))
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
                        seed=seed, progress=False, sampler=args.t2v_sampler))
        progress.show(len(low) * len(prompts))
    low = torch.cat(low)
    captions, seeds = [p for p, _ in jobs], [s for _, s in jobs]
    results = {"stage one alone (32x32)": [shapes.score(v.numpy(), c) for v, c in zip(low, captions)]}
    low_res = low.permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # b f h w 3 -> b 3 f h w, in [-1, 1]
    for name, upscaler in upscalers.items():
        videos = upscale_all(upscaler, low_res, captions, seeds, settings_of(args)[0], args.guidance,
                             args.noise_level, args.batch_size, f"end to end, {name}")
        results[f"stage one + {name} (128x128)"] = [shapes.score(v.numpy(), c) for v, c in zip(videos, captions)]
    return results


def add_sampling_flags(p, steps, sampler="ddim"):
    p.add_argument("--sampler", choices=list(simda.SAMPLERS), default=sampler, help="ddim, dpm++ or lcm (default: %(default)s)")
    p.add_argument("--steps", type=int, default=steps, help="sampler steps (default: %(default)s)")
    p.add_argument("--sampling", metavar="SAMPLER:STEPS,...", help="instead of --sampler/--steps: every row once per "
                   "setting, e.g. ddim:50,dpm++:10 (the rows are named with it)")


def settings_of(args):
    """[(sampler, steps)] of --sampling, else of --sampler and --steps; checked."""
    settings = []
    for item in (args.sampling.split(",") if args.sampling else [f"{args.sampler}:{args.steps}"]):
        sampler, sep, steps = item.strip().partition(":")
        if not sep or not steps.isdigit():
            raise ValueError(f"--sampling takes SAMPLER:STEPS items, e.g. ddim:50,dpm++:10, got {item!r}")
        simda.check_sampling(sampler, int(steps))
        settings.append((sampler, int(steps)))
    return settings


def named(name, sampling, settings):
    """A row's name, with its sampler and steps where --sampling compares several."""
    return f"{name}, {sampling[0]} {sampling[1]}" if len(settings) > 1 else name


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
                                            "ablation table of the demo model (docs/demo.md).")
    p.add_argument("--ckpt", default=simda.DEMO_CHECKPOINT, help="image model (default: the demo model)")
    p.add_argument("--row", action="append", default=[], metavar="NAME=ADAPTERS",
                   help="(sub-command 'sr': the second stage, see `evaluate.py sr --help`) a row: its name and adapter "
                        "file (empty: the image model frame by frame); repeatable (default: the six rows of docs/demo.md)")
    p.add_argument("--seeds", type=int, default=2, help="videos per caption, 48 captions (default: %(default)s)")
    p.add_argument("--frames", type=int, help=f"frames per video (default: the adapters' metadata, else {shapes.FRAMES})")
    p.add_argument("--size", type=int, help=f"frame size (default: the adapters' metadata, else {shapes.SIZE})")
    add_sampling_flags(p, steps=25)
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=48, help="videos per sampling call (default: %(default)s)")
    p.add_argument("--out", default="out/evaluate.json", help="every score, per row, as JSON (default: %(default)s)")
    p.add_argument("--save-videos", metavar="DIR", help="also write every sampled video as a GIF under DIR/<row>/")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"],
                   help="the models' dtype on the CPU (auto: runtime.pick_dtype; default: %(default)s, as docs/demo.md's "
                        "table)")
    args = p.parse_args(argv)
    try:
        rows = parse_rows(args.row) if args.row else ROWS
        for name, path in rows:
            if path and not os.path.exists(path):
                if args.row:
                    raise ValueError(f"row {name!r}: adapter file not found: {path}")
                print(f"skipping row {name!r}: no adapters at {path} (docs/demo.md says how to train them)", file=sys.stderr)
        rows = [(name, path) for name, path in rows if not path or os.path.exists(path)]
        if args.seeds < 1 or args.batch_size < 1:
            raise ValueError("--seeds and --batch-size must be at least 1")
        jobs, settings = prompts_and_seeds(args.seeds), settings_of(args)
        results, everything = {}, {}
        for (name, path), sampling in ((row, sampling) for row in rows for sampling in settings):
            meta = simda.read_adapters(path)[1] if path else {}
            frames, height, width = resolve_shape(args.frames, args.size, defaults=[
                meta.get("frames", shapes.FRAMES), meta.get("height", shapes.SIZE), meta.get("width", shapes.SIZE)])
            name = named(name, sampling, settings)
            print(f"{name}: {len(jobs)} videos of {frames} frames at {width}x{height}, {sampling[1]} {sampling[0]} "
                  f"steps, guidance {'distilled' if sampling[0] == 'lcm' else args.guidance}", file=sys.stderr, flush=True)
            pipe = simda.load_pipeline(args.ckpt, dtype=pick_dtype(args.dtype, torch.device("cpu")), adapters=path)
            save_dir = os.path.join(args.save_videos, name.replace(" ", "-").replace(",", "")) if args.save_videos else None
            scores = evaluate_row(pipe, jobs, frames, height, width, sampling, args.guidance, args.batch_size, save_dir)
            results[name], everything[name] = shapes.summarise(scores), scores
            show_row({name: scores}, name, COLUMNS)
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "summary": results, "scores": everything}, f, indent=1)
    print(table(everything, COLUMNS, "model"))
    print(f"(every score: {args.out})", file=sys.stderr)


def centroids(tracks, colour):
    """[F, 2]: per frame of shapes.track's `tracks`, the centroid (x, y) of the largest `colour` object (NaN: none)."""
    return np.array([next((o["centroid"] for o in f if o["colour"] == colour), (np.nan, np.nan)) for f in tracks])


def kept(tracks, colour, shape):
    """The fraction of frames (shapes.track's `tracks`) whose largest object has the colour and the shape."""
    return float(np.mean([bool(f) and (f[0]["colour"], f[0]["shape"]) == (colour, shape) for f in tracks]))


def i2v_scores(video, truth, caption, exact):
    """Image-to-video: `video` sampled after `truth`'s frame 0 (uint8 [F, H, W, 3] both); `exact`: its frame-0
    latents are the given ones bitwise (None: not sampled)."""
    (colour, shape, _), tracks = shapes.parse_caption(caption), shapes.track(video)
    c, base = centroids(tracks, colour), shapes.score(video, caption)
    jump = float(np.hypot(*(c[1] - c[0])))  # NaN where frame 0 or 1 shows no such object: no continuity
    return {"motion_correct": base["motion_correct"], "kept": kept(tracks, colour, shape),
            "continuity": float(jump <= 3 * video.shape[2] / 32), "jump": jump, "smoothness": base["smoothness"],
            "stray_fraction": base["stray_fraction"], "first_exact": float("nan") if exact is None else float(exact),
            "first_error": float(np.abs(video[0].astype(np.float64) - truth[0]).mean())}


def continue_scores(whole, truth, caption, clip):
    """Continuation: `whole` is truth's first `clip` frames and the frames sampled after them (uint8 [F, H, W, 3]);
    the seam jump is the first new centroid's distance from where the clip's mean step would put it."""
    colour, shape, _ = shapes.parse_caption(caption)
    c, drawn = centroids(shapes.track(whole), colour), centroids(shapes.track(truth), colour)
    step = (c[clip - 1] - c[0]) / (clip - 1)
    seam = float(np.hypot(*(c[clip] - c[clip - 1] - step)))
    course = np.hypot(*(c[clip:] - drawn[clip:len(whole)]).T)
    return {"motion_correct": shapes.score(whole[clip - 1:], caption)["motion_correct"],
            "kept": kept(shapes.track(whole[clip:]), colour, shape),
            "no_jump": float(seam <= 3 * whole.shape[2] / 32), "seam": seam,
            "course": float(np.nanmean(course)) if np.isfinite(course).any() else float("nan"),
            "smoothness": shapes.score(whole, caption)["smoothness"]}


def extend_all(pipe, pixels, captions, seeds, frames, sampling, guidance, batch_size, name):
    """pipe.extend after each video's given frames `pixels` [N, 3, k, H, W] ([-1, 1]), one call per batch of one
    seed: (uint8 [N, frames, H, W, 3] decoded, whether each kept its given latents bitwise)."""
    out, exact, progress = [None] * len(captions), [None] * len(captions), Progress(f"{name}: videos", len(captions))
    for seed in sorted(set(seeds)):
        mine = [i for i, s in enumerate(seeds) if s == seed]
        for j in range(0, len(mine), batch_size):
            batch = mine[j:j + batch_size]
            given = pipe.encode(pixels[batch])
            latents = pipe.extend(given, [captions[i] for i in batch], frames, sampling[1], guidance, seed=seed,
                                  progress=False, sampler=sampling[0])
            for i, video, lat, g in zip(batch, pipe.decode(latents), latents, given):
                out[i], exact[i] = video.numpy(), torch.equal(lat[:, :g.shape[1]], g)
            progress.show(sum(v is not None for v in out))
    return np.stack(out), exact


def i2v_parser():
    p = argparse.ArgumentParser(prog="evaluate.py i2v", description="Score image-to-video and continuation on drawn "
                                "shapes videos of unseen seeds (docs/demo.md).")
    p.add_argument("--ckpt", default=simda.DEMO_CHECKPOINT, help="image model (default: the demo model)")
    p.add_argument("--row", action="append", default=[], metavar="NAME=ADAPTERS",
                   help="a row: its name and adapter file; repeatable (default: the shipped adapters and, where "
                        "models/ablation has them, the text-to-video ones with their given frames replaced only)")
    p.add_argument("--seeds", type=int, default=2, help="videos per caption, 48 captions (default: %(default)s)")
    p.add_argument("--frames", type=int, default=shapes.FRAMES, help="frames of an animated video, and of the clip "
                                                                     "continued (default: %(default)s)")
    p.add_argument("--given", type=int, default=2, help="continuation: the clip's last frames given, as the demo "
                                                        "adapters were trained (default: %(default)s)")
    add_sampling_flags(p, simda.DEMO_SAMPLING[1][simda.DEMO_SAMPLING[0]], simda.DEMO_SAMPLING[0])  # sample.py's
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=48, help="videos per sampling call (default: %(default)s)")
    p.add_argument("--out", default="out/evaluate-i2v.json",
                   help="every score, per row, as JSON (default: %(default)s)")
    return p


def main_i2v(argv):
    p = i2v_parser()
    args = p.parse_args(argv)
    try:
        rows = parse_rows(args.row) if args.row else I2V_ROWS[:1] + [r for r in I2V_ROWS[1:] if os.path.exists(r[1])]
        if missing := [(n, a) for n, a in rows if not a or not os.path.exists(a)]:
            raise ValueError(f"row {missing[0][0]!r}: adapter file not found: {missing[0][1]}")
        if args.seeds < 1 or args.batch_size < 1 or not 0 < args.given < args.frames:
            raise ValueError(f"need --seeds, --batch-size >= 1 and 0 < --given < --frames {args.frames}")
        sampling = settings_of(args)[0]
        # drawn videos of --frames plus what continuation adds, so that its truth goes on past the clip
        clip, added = args.frames, args.frames - args.given
        jobs = [(i, I2V_SEED + s) for s in range(args.seeds) for i in range(len(shapes.COMBINATIONS))]
        truth, captions = zip(*(shapes.sample(i, seed, args.frames + added, shapes.SIZE) for i, seed in jobs))
        truth, seeds = np.stack(truth), [seed - I2V_SEED for _, seed in jobs]
        pixels = torch.from_numpy(truth).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # b f H W 3 -> b 3 f H W
        print(f"{len(jobs)} drawn videos of seeds {I2V_SEED}+; animated: {clip} frames from frame 0; continued: "
              f"{added} frames after frames {clip - args.given}-{clip - 1}; {sampling[1]} {sampling[0]} steps, "
              f"guidance {args.guidance}", file=sys.stderr)
        animated = {"drawn (the truth)": [i2v_scores(v[:clip], v, c, None) for v, c in zip(truth, captions)]}
        continued = {"drawn (the truth)": [continue_scores(v, v, c, clip) for v, c in zip(truth, captions)]}
        for name, path in rows:
            pipe = simda.load_pipeline(args.ckpt, adapters=path)
            videos, exact = extend_all(pipe, pixels[:, :, :1], captions, seeds, clip, sampling, args.guidance,
                                       args.batch_size, f"{name}, animated")
            animated[name] = [i2v_scores(v, t, c, e) for v, t, c, e in zip(videos, truth, captions, exact)]
            show_row(animated, name, I2V_COLUMNS)
            new, _ = extend_all(pipe, pixels[:, :, clip - args.given:clip], captions, seeds, args.given + added,
                                sampling, args.guidance, args.batch_size, f"{name}, continued")
            whole = np.concatenate([truth[:, :clip], new[:, args.given:]], axis=1)
            continued[name] = [continue_scores(w, t, c, clip) for w, t, c in zip(whole, truth, captions)]
            show_row(continued, name, CONTINUE_COLUMNS)
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "animated": animated, "continued": continued}, f, indent=1)
    print(table(animated, I2V_COLUMNS, "image-to-video"), table(continued, CONTINUE_COLUMNS, "continuation"), sep="\n\n")
    print(f"(every score: {args.out})", file=sys.stderr)
