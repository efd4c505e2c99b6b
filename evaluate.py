"""Scores of generated videos, one command per kind:

    python evaluate.py videos --videos DIR --prompts captions.csv --clip CLIP [--i3d I3D --real DIR]
    python evaluate.py t2v --ckpt SD --adapters A --prompts msrvtt_test.csv --clip CLIP [--i3d I3D --real DIR]
    python evaluate.py shapes     # (or no sub-command) the demo's ablation table on the shapes world
    python evaluate.py sr         # the demo's second stage against its truth
    python evaluate.py i2v        # the demo's image-to-video and continuation on unseen first frames
    python evaluate.py long       # the demo's long videos: prompt travel by windows, continuation, one pass

`videos` and `t2v` measure what the paper reports (docs/metrics.md): CLIPSIM and frame
consistency with CLIP (clip_model.py), FVD against real videos with I3D (i3d.py), the formulas in
metrics.py. `t2v` is the paper's MSR-VTT protocol: one video per caption, sampled in batches,
resumable (each finished video's features are kept, so a rerun goes on where a kill stopped it),
then scored. `shapes`, `sr` and `i2v` live in shapes_eval.py, `long` in long_eval.py.
"""
import argparse
import csv
import json
import os
import sys

import numpy as np
import torch

import clip_model
import clip_text
import data
import i3d
import long_eval
import metrics
import shapes_eval
import simda
from checkpoint import write_atomic
from runtime import Progress, pick_device, pick_dtype
from video import resolve_shape, save_video


# ---------------------------------------------------------------------------- the paper's metrics

CAPTION_COLUMNS = ("caption", "sentence", "text", "prompt", "name")  # name: WebVid's CSVs
ID_COLUMNS = ("video_id", "videoid", "video", "id", "path", "file")
SCORED_EXTENSIONS = data.VIDEO_EXTENSIONS + (".npy",)
FVD_FRAMES = 16  # the usual protocol: the first 16 frames, consecutive, at 224x224 (i3d.preprocess)


def read_captions(path):
    """[(video id or None, caption)]: a CSV with a caption column (one of CAPTION_COLUMNS) and perhaps an
    id column (ID_COLUMNS; MSR-VTT's video_id, WebVid's videoid), or a text file of one caption a line."""
    if not os.path.isfile(path):
        raise ValueError(f"caption file not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        if not path.lower().endswith(".csv"):
            return [(None, line.strip()) for line in f if line.strip()]
        reader = csv.DictReader(f)
        fields = {name.strip().lower(): name for name in reader.fieldnames or []}
        text = next((fields[c] for c in CAPTION_COLUMNS if c in fields), None)
        if text is None:
            raise ValueError(f"{path}: no caption column: expected one of {', '.join(CAPTION_COLUMNS)}, found "
                             f"{reader.fieldnames}")
        key = next((fields[c] for c in ID_COLUMNS if c in fields), None)
        rows = [(row[key].strip() if key else None, row[text].strip()) for row in reader]
    if not rows or any(not caption for _, caption in rows):
        raise ValueError(f"{path}: empty captions (row {next((i for i, (_, c) in enumerate(rows) if not c), 0) + 2})"
                         if rows else f"{path}: no captions")
    return rows


def video_files(folder, what="--videos"):
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {folder} is not a folder")
    files = sorted(n for n in os.listdir(folder) if n.lower().endswith(SCORED_EXTENSIONS))
    if not files:
        raise ValueError(f"{what} {folder} holds no videos ({', '.join(SCORED_EXTENSIONS)})")
    return [os.path.join(folder, n) for n in files]


def match_captions(paths, rows, prompts_path):
    """The caption of each video: by id (the file name without extension) when the file has ids, else
    in order (videos sorted by name); any video without a caption, or caption without a video, is an error."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if rows[0][0] is None:
        if len(rows) != len(paths):
            raise ValueError(f"{prompts_path} has {len(rows)} captions and no video id column, but there are "
                             f"{len(paths)} videos: with no ids they are matched in order, one each")
        return [caption for _, caption in rows]
    by_id = {}
    for key, caption in rows:
        key = os.path.splitext(os.path.basename(key))[0]
        if key in by_id:
            raise ValueError(f"{prompts_path}: video id {key!r} has more than one caption; keep one caption a video")
        by_id[key] = caption
    if missing := [s for s in stems if s not in by_id]:
        raise ValueError(f"{len(missing)} videos have no caption in {prompts_path} (e.g. {missing[0]!r}; ids are "
                         f"matched to file names without extension)")
    if unused := sorted(by_id.keys() - set(stems)):
        raise ValueError(f"{len(unused)} captions in {prompts_path} have no video (e.g. {unused[0]!r}); score a "
                         f"caption file that lists exactly these videos")
    return [by_id[s] for s in stems]


def load_scorers(args, device):
    """(CLIP, its tokenizer, I3D or None) for the paper's metrics."""
    clip = clip_model.load_clip(args.clip, device)
    detector = i3d.load_i3d(args.i3d, device) if args.i3d else None
    return clip, clip_text.Tokenizer(max_length=clip.config.text.max_length), detector


def video_features(paths, clip, detector, frames, fvd_frames, what):
    """Per readable video: CLIP embeddings of its frames [F, D] (the first `frames`, or all) and, with a
    detector, I3D features [400] of its first `fvd_frames`. Undecodable videos are skipped and counted;
    videos of another size than the first are an error (resize them first: the protocol compares sizes)."""
    out, skipped, size = [], [], None
    progress = Progress(f"{what}: videos", len(paths))
    for path in paths:
        try:
            # FVD alone (the real set) needs only its first frames: a long clip is not decoded to its end
            video = data.read_frames(path, fvd_frames if clip is None else frames)
            if detector is not None and len(video) < fvd_frames:
                raise data.VideoError(f"{path}: too short for FVD: {len(video)} frames, need {fvd_frames}")
        except data.VideoError as e:
            skipped.append(str(e))
            data.warn(f"skipping {e}")
            continue
        if size is None:
            size = video.shape[1:3]
        elif video.shape[1:3] != size:
            raise ValueError(f"{path} is {video.shape[2]}x{video.shape[1]} but the {what} videos before it are "
                             f"{size[1]}x{size[0]}: score videos of one size")
        out.append({"path": path, "frames": len(video), **features_of(video, clip, detector, fvd_frames)})
        progress.show(len(out) + len(skipped))
    if not out:
        raise ValueError(f"none of the {len(paths)} {what} videos could be read: {skipped[0]}")
    return out, skipped, size


def features_of(video, clip, detector, fvd_frames):
    """uint8 frames [F, H, W, 3] -> {"clip": unit embeddings of every frame [F, D], "i3d": the I3D features
    [400] of the first `fvd_frames`}, each where its model is given."""
    item = {}
    if clip is not None:
        item["clip"] = clip_model.embed_videos(clip, video[None])[0]
    if detector is not None:
        item["i3d"] = i3d.features(detector, video[None, :fvd_frames])[0]
    return item


def paper_scores(items, captions, clip, tokenizer, real=None):
    """CLIPSIM and frame consistency per video (and their means), FVD against the real features."""
    per_video = {}
    if clip is not None:
        text = clip_model.embed_texts(clip, tokenizer, captions)
        per_video = {"clipsim": [float(metrics.clipsim(item["clip"][None], text[i:i + 1])[0])
                                 for i, item in enumerate(items)],
                     "frame_consistency": [float(metrics.frame_consistency(item["clip"][None])[0]) if
                                           item["frames"] > 1 else float("nan") for item in items]}
    summary = {k: float(np.nanmean(v)) for k, v in per_video.items()}
    if real is not None:
        summary["fvd"] = metrics.frechet_distance(np.stack([i["i3d"] for i in items]), np.stack([i["i3d"] for i in real]))
    return summary, per_video


def paper_table(summary, knobs):
    names = {"clipsim": "CLIPSIM (raw cosine)", "frame_consistency": "frame consistency (x100)", "fvd": "FVD"}
    lines = ["| metric | value |", "|---|---:|"]
    lines += [f"| {names[k]} | {v:.4f} |" if k == "clipsim" else f"| {names[k]} | {v:.2f} |" for k, v in summary.items()]
    return "\n".join(lines + ["", "protocol: " + "; ".join(f"{k} {v}" for k, v in knobs.items())])


def knobs_of(args, clip, items, skipped, size, real=None, real_skipped=(), real_size=None):
    knobs = {"videos": len(items), "skipped": len(skipped), "size": f"{size[1]}x{size[0]}",
             "frames": args.frames or "all"}
    if clip is not None:
        knobs["CLIP"] = f"{clip_model.model_name(clip.config)} ({args.clip})"
    if real is not None:
        knobs.update({"FVD frames": f"the first {args.fvd_frames}, stride 1", "FVD resolution":
                      f"{i3d.SIZE}x{i3d.SIZE} (every frame stretched, bilinear, as TATS and cd-fvd)",
                      "I3D": f"{args.i3d}, BatchNorm eps {i3d.BATCH_NORM_EPS:g}",
                      "real videos": f"{len(real)} ({len(real_skipped)} skipped) of {real_size[1]}x{real_size[0]}"})
    return knobs


def add_scoring_flags(p):
    p.add_argument("--clip", required=True, metavar="PATH", help="CLIP weights: OpenAI's state dict (.pt or "
                   ".safetensors; their TorchScript download is refused with how to convert it) or a transformers "
                   "CLIPModel folder or file, e.g. ViT-B/32 (docs/metrics.md)")
    p.add_argument("--i3d", metavar="PATH", help="I3D weights for FVD: i3d_pretrained_400.pt (VideoGPT/TATS)")
    p.add_argument("--real", metavar="DIR", help="real videos for FVD (needs --i3d)")
    p.add_argument("--fvd-frames", type=int, default=FVD_FRAMES, help="frames per video for FVD (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")


def check_scoring_flags(args):
    if bool(args.i3d) != bool(args.real):
        raise ValueError("FVD needs both --i3d (the I3D weights) and --real (a folder of real videos)")
    if args.fvd_frames < i3d.MIN_FRAMES:
        raise ValueError(f"--fvd-frames must be at least {i3d.MIN_FRAMES} (I3D's pooling), got {args.fvd_frames}")


def real_features(args, detector):
    if detector is None:
        return None, [], None
    real, skipped, size = video_features(video_files(args.real, "--real"), None, detector, None, args.fvd_frames, "real")
    if len(real) < 2:
        raise ValueError(f"FVD needs at least 2 real videos, got {len(real)}")
    return real, skipped, size


def write_scores(path, args, summary, per_video, knobs, items, skipped):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"args": vars(args), "summary": summary, "protocol": knobs, "skipped": skipped,
                   "videos": [{"path": item["path"], **{k: v[i] for k, v in per_video.items()}}
                              for i, item in enumerate(items)]}, f, indent=1)
    print(f"(every score: {path})", file=sys.stderr)


def main_videos(argv):
    p = argparse.ArgumentParser(prog="evaluate.py videos", description="The paper's metrics of a folder of videos: "
                                "CLIPSIM and frame consistency (CLIP), and FVD against real videos (I3D).")
    p.add_argument("--videos", required=True, metavar="DIR", help=f"the videos ({', '.join(SCORED_EXTENSIONS)})")
    p.add_argument("--prompts", required=True, metavar="FILE", help="their captions: a CSV with a caption column ("
                   f"{', '.join(CAPTION_COLUMNS)}) and, to match by file name, an id column ({', '.join(ID_COLUMNS)}); "
                   "or a text file of one caption a line, in the order of the file names")
    add_scoring_flags(p)
    p.add_argument("--frames", type=int, help="score the first N frames of each video (default: all)")
    p.add_argument("--out", default="out/evaluate-videos.json", help="every score as JSON (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        check_scoring_flags(args)
        paths = video_files(args.videos)
        captions = match_captions(paths, read_captions(args.prompts), args.prompts)
        clip, tokenizer, detector = load_scorers(args, pick_device(args.device))
        items, skipped, size = video_features(paths, clip, detector, args.frames, args.fvd_frames, "generated")
        captions = [captions[paths.index(item["path"])] for item in items]
        if detector is not None and len(items) < 2:
            raise ValueError(f"FVD needs at least 2 videos, got {len(items)}")
        real, real_skipped, real_size = real_features(args, detector)
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    summary, per_video = paper_scores(items, captions, clip, tokenizer, real)
    knobs = knobs_of(args, clip, items, skipped, size, real, real_skipped, real_size)
    write_scores(args.out, args, summary, per_video, knobs, items, skipped)
    print(paper_table(summary, knobs))


T2V_SETTINGS = ("ckpt", "adapters", "prompts", "frames", "height", "width", "sampler", "steps", "guidance", "seed", "clip",
                "i3d", "fvd_frames")  # what a resumed t2v run must share with the run it continues


def output_names(rows):
    """A file name per caption: its video id where the ids are unique, else its row number."""
    keys = [key for key, _ in rows]
    if None not in keys and len(set(keys)) == len(keys):
        return [os.path.splitext(os.path.basename(k))[0] for k in keys]
    return [f"{i:05d}" for i in range(len(rows))]


def check_resume(out_dir, settings):
    """Write the run's settings, or check them against those of the run this one continues."""
    path = os.path.join(out_dir, "run.json")
    if os.path.exists(path):
        with open(path) as f:
            before = {"sampler": "ddim", **json.load(f)}  # runs from before --sampler all sampled with DDIM
        if changed := [k for k in T2V_SETTINGS if before.get(k) != settings[k]]:
            what = ", ".join(f"{k}: {before.get(k)!r} then, {settings[k]!r} now" for k in changed)
            raise ValueError(f"{out_dir} holds a run with other settings ({what}): use another --out-dir to start afresh")
        return
    write_atomic(path, lambda tmp: open(tmp, "w").write(json.dumps(settings, indent=1)))


def save_features(path, item):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **{k: item[k] for k in ("clip", "i3d") if k in item})
    write_atomic(path, write)


def t2v_parser():
    p = argparse.ArgumentParser(prog="evaluate.py t2v", description="The paper's MSR-VTT protocol: sample one video per "
                                "caption with SD and SimDA adapters, then score them (CLIPSIM, frame consistency; FVD "
                                "with --i3d and --real). Resumable: rerun the same command after a stop.")
    p.add_argument("--ckpt", help=f"SD checkpoint (default: $SIMDA_CKPT, else {simda.DEFAULT_CHECKPOINT})")
    p.add_argument("--adapters", help="SimDA adapters from train.py (default: none, the image model frame by frame)")
    p.add_argument("--prompts", required=True, metavar="FILE", help="the captions, one video each: a CSV with a caption "
                   "column (and an id column, which names the videos) or a text file of one caption a line")
    add_scoring_flags(p)
    p.add_argument("--out-dir", default="out/t2v", help="videos, their features and scores.json (default: %(default)s)")
    p.add_argument("--frames", type=int, help="frames per video (default: the adapters' metadata, else 16)")
    p.add_argument("--size", type=int, help="frame size (default: the adapters' metadata, else 256)")
    p.add_argument("--sampler", choices=list(simda.SAMPLERS), default="ddim",
                   help="ddim (the paper's and SimDA's code's) or dpm++ (default: %(default)s)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="video i starts from noise seeded by (seed, i) (default: 0)")
    p.add_argument("--batch-size", type=int, default=4, help="videos per sampling call (default: %(default)s)")
    p.add_argument("--limit", type=int, help="only the first N captions (default: all)")
    p.add_argument("--format", choices=["mp4", "gif", "none"], default="mp4", help="how to keep each video for viewing "
                   "(the scores use the frames as sampled, before any compression; default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="the SD pipeline's dtype; auto: float16 on CUDA, bfloat16 on a CPU with AMX or AVX512-BF16, else float32 (default: auto)")
    return p


def t2v_settings(args):
    """(captions, checkpoint, (frames, height, width), the settings a resumed run must share), checked."""
    check_scoring_flags(args)
    simda.check_sampling(args.sampler, args.steps)
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError("--batch-size and --limit must be at least 1")
    rows = read_captions(args.prompts)[:args.limit]
    ckpt = args.ckpt or simda.default_checkpoint()
    meta = simda.read_adapters(args.adapters)[1] if args.adapters else {}
    shape = resolve_shape(args.frames, args.size, defaults=[meta.get("frames", 16), meta.get("height", 256),
                                                            meta.get("width", 256)])
    if args.i3d and shape[0] < args.fvd_frames:
        raise ValueError(f"FVD takes the first {args.fvd_frames} frames: sample at least that many (--frames)")
    known = {"ckpt": ckpt, "frames": shape[0], "height": shape[1], "width": shape[2]}
    return rows, ckpt, shape, {k: known[k] if k in known else getattr(args, k) for k in T2V_SETTINGS}


def sample_missing(args, ckpt, rows, names, shape, scorers, feature_path, device):
    """Sample, keep and featurise the videos whose features are not on the disk yet, in batches."""
    clip, _, detector = scorers
    frames, height, width = shape
    todo = [i for i, name in enumerate(names) if not os.path.exists(feature_path(name))]
    progress = Progress("t2v: videos", len(rows), done=len(rows) - len(todo))
    if not todo:
        return
    pipe = simda.load_pipeline(ckpt, device, pick_dtype(args.dtype, device), adapters=args.adapters)
    factor, channels = pipe.vae.config.downsample_factor, pipe.vae.config.latent_channels
    for j in range(0, len(todo), args.batch_size):
        batch = todo[j:j + args.batch_size]
        noise = torch.stack([torch.randn((channels, frames, height // factor, width // factor),
                                         generator=data.generator(args.seed, "t2v", i)) for i in batch])
        videos = pipe([rows[i][1] for i in batch], frames, height, width, args.steps, args.guidance, latents=noise,
                      progress=False, sampler=args.sampler).numpy()
        for i, video in zip(batch, videos):
            if args.format != "none":
                save_video(video, os.path.join(args.out_dir, f"{names[i]}.{args.format}"))
            save_features(feature_path(names[i]), features_of(video, clip, detector, args.fvd_frames))
        progress.show(progress.done + len(batch))


def main_t2v(argv):
    p = t2v_parser()
    args = p.parse_args(argv)
    names = []  # one file name per caption; the features of a finished video are what a resumed run skips
    feature_path = lambda name: os.path.join(args.out_dir, "features", f"{name}.npz")  # noqa: E731
    try:
        rows, ckpt, shape, settings = t2v_settings(args)
        os.makedirs(os.path.join(args.out_dir, "features"), exist_ok=True)
        check_resume(args.out_dir, settings)
        device = pick_device(args.device)
        scorers = clip, tokenizer, detector = load_scorers(args, device)
        real, real_skipped, real_size = real_features(args, detector)
        names = output_names(rows)
        sample_missing(args, ckpt, rows, names, shape, scorers, feature_path, device)
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    except KeyboardInterrupt:
        done = sum(os.path.exists(feature_path(name)) for name in names)
        p.exit(130, f"\ninterrupted: {done} of {len(names)} videos are done and kept in {args.out_dir}; run the same "
                    "command again to go on\n")
    items = []
    for name in names:
        with np.load(feature_path(name)) as f:
            items.append({"path": feature_path(name), "frames": shape[0], **{k: f[k] for k in f.files}})
    summary, per_video = paper_scores(items, [caption for _, caption in rows], clip, tokenizer, real)
    knobs = knobs_of(args, clip, items, [], shape[1:], real, real_skipped, real_size)
    knobs.update({"sampling": f"{args.steps} {args.sampler} steps, guidance {args.guidance}, seed {args.seed}"})
    write_scores(os.path.join(args.out_dir, "scores.json"), args, summary, per_video, knobs, items, [])
    print(paper_table(summary, knobs))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"sr": shapes_eval.main_sr, "videos": main_videos, "t2v": main_t2v, "shapes": shapes_eval.main_shapes,
                "i2v": shapes_eval.main_i2v, "long": long_eval.main_long}
    if argv[:1] and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return
    return shapes_eval.main_shapes(argv)  # no sub-command: the demo's ablation table, as before


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
