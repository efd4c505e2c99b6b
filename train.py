"""Train SimDA's adapters on a frozen Stable Diffusion (1.x or 2.x): text-to-video on WebVid-style data, or
one-shot tuning on a single clip for video editing (the paper's Sec. 3.4).

    python train.py --data webvid_subset --out out/webvid
    python train.py --data shapes --out out/shapes      # the built-in demo world, on the demo model
    python train.py --video clip.mp4 --prompt "a jeep car is moving on the road" --steps 200 --out out/jeep
    python train.py --stage sr --data webvid_subset --size 256 --out out/sr   # the video upscaler (x4, on SD's)
    python train.py --stage sr --data shapes --out out/shapes/sr               # the demo's, on its upscaler
    torchrun --nproc_per_node 4 train.py --data webvid_subset --batch-size 8 --out out/webvid

Each step: encode the captions with the frozen CLIP text encoder and the clips with the frozen VAE (a posterior
sample, times the latent scale), noise the latents at random timesteps (ddim.add_noise) and regress what the frozen
UNet predicts (ddim.target: the noise, or v for SD 2.x 768-v models; MSE); AdamW updates the adapters only
(`--distill TEACHER`: distill.py's consistency distillation instead, for sample.py --sampler lcm). With
`--given-frames K`, a share of the samples (`--given-probability`) keeps its first 1 to K frames clean at timestep 0
and leaves them out of the loss: the same adapters then animate an image and continue a clip (sample.py --image,
--continue). `--stage sr` trains the second stage instead: SimDA's adapters on SD's frozen x4 upscaler, from pairs
made of each clip (at --size) and the clip downscaled x4 with antialiasing, noised to a random level 0..349 as in
the upscaler's own training; the target is v.

Every random draw of a sample (video, start frame, flip, caption dropout, posterior noise, timestep, noise) is
seeded by (--seed, global sample index), so --resume continues a run exactly and a torchrun job with N ranks, each
taking every N-th sample of the global batch, computes what a single process with the same --batch-size computes.
--out holds adapters.safetensors (the adapters and their metadata), state.pt (adapters, optimizer and step: what
--resume reads), log.jsonl (the loss of every step) and samples/ (validation GIFs). Every file is written atomically
and the log is cut back to the saved step on --resume, so a run killed at any instant resumes to the same result.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import shlex
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ddim
import distill
import loader
import shapes
import simda
from adapters import adapter_state_dict, freeze_for_training, trainable_summary
from checkpoint import CheckpointError, load_torch, remove_temporaries, save_torch, write_atomic
from runtime import Progress, autocast_dtype, setup_distributed
from video import DEFAULT_FRAMES, DEFAULT_SIZE, check_shape, output_paths, resolve_shape, save_video


def build_parser():
    p = argparse.ArgumentParser(description="Train SimDA adapters on a frozen SD 1.x/2.x (text-to-video, or one-shot "
                                            "on one clip for editing). Multi-GPU: torchrun --nproc_per_node N train.py ...")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="WebVid-style CSV (or a folder holding one, videos under videos/), "
                                                   "a folder of videos (.mp4/.webm/.gif) with same-named .txt captions, "
                                                   "or 'shapes': fresh videos of the synthetic world of shapes.py")
    src.add_argument("--video", metavar="CLIP", help="one-shot tuning on this clip (frames from its start); needs --prompt")
    p.add_argument("--prompt", help="--video: the caption of the clip (stored in the adapters' metadata)")
    p.add_argument("--ckpt", metavar="PATH", help=f"SD 1.x or 2.x checkpoint (file or diffusers folder); default: $SIMDA_CKPT, "
                                                  f"else {simda.DEFAULT_CHECKPOINT}; with --data shapes, the demo "
                                                  f"image model {simda.DEMO_CHECKPOINT} (--stage sr: the demo "
                                                  f"upscaler {simda.DEMO_UPSCALER})")
    p.add_argument("--stage", choices=["t2v", "sr"], default="t2v",
                   help="t2v: adapters on a text-to-image SD; sr: adapters on SD's x4 upscaler (--ckpt then names the "
                        f"upscaler; default $SIMDA_SR_CKPT, else {simda.DEFAULT_SR_CHECKPOINT}) (default: %(default)s)")
    p.add_argument("--prediction", choices=ddim.PREDICTIONS,
                   help="what the checkpoint's UNet predicts, the training target (default: what the checkpoint "
                        "says; SD 2.x files that say nothing: v)")
    p.add_argument("--out", default="out/train", help="output folder (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out (state.pt) up to --steps")
    p.add_argument("--frames", type=int, help=f"frames per clip (default: {DEFAULT_FRAMES}; with --data shapes {shapes.FRAMES})")
    p.add_argument("--size", type=int, help=f"square frame size in pixels, a multiple of 8 (default: {DEFAULT_SIZE}; "
                                            f"with --data shapes {shapes.SIZE}, with --stage sr too "
                                            f"{shapes.SIZE * simda.UPSCALE}: scenes of {shapes.SIZE} drawn at 4x)")
    p.add_argument("--width", type=int, help=f"frame width, with --height instead of --size (default: {DEFAULT_SIZE})")
    p.add_argument("--height", type=int, help=f"frame height, with --width instead of --size (default: {DEFAULT_SIZE})")
    p.add_argument("--steps", type=int, default=10000, help="total optimizer steps, counting resumed ones (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="global batch, split over torchrun's processes (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--init-from", metavar="ADAPTERS", help="start from these adapters, a fresh optimizer (--distill: "
                   "distilled ones, same --distill-skip and --lora-rank) (default: fresh; --distill: the teacher's)")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this; 0: off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and of every noise draw (default: %(default)s)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet blocks in backward: less memory, slower")
    p.add_argument("--device", default="auto", help="auto: CUDA, else MPS, else CPU; or a torch device (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="the frozen SD's dtype and autocast's (adapters stay float32); auto: bfloat16 on CUDA if supported, "
                        "else float16 with a grad scaler; on the CPU bfloat16 where AMX or AVX512-BF16 runs it, else float32 (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=500, help="save adapters and state every N steps and at the end (default: %(default)s)")
    p.add_argument("--sample-every", type=int, default=500, help="validation GIFs every N steps and at the end; 0: off (default: %(default)s)")
    p.add_argument("--val-prompt", action="append", default=[], help="validation prompt (repeatable; default: none, no validation)")
    p.add_argument("--val-sampler", choices=list(simda.SAMPLERS), help="sampler of the validation samples, ddim, "
                   f"dpm++ or lcm (default: {simda.SD_SAMPLING[0]}; with --distill lcm)")
    p.add_argument("--val-steps", type=int, help=f"steps of the validation samples (default: 25; lcm {simda.LCM_STEPS})")
    p.add_argument("--no-latent-shift", action="store_true", help="ablation: plain per-frame self-attention")
    p.add_argument("--no-temporal-adapters", action="store_true", help="ablation: no TemporalAdapters")
    p.add_argument("--no-spatial-adapters", action="store_true", help="ablation: no SpatialAdapters")
    p.add_argument("--log-every", type=int, default=10, help="print a progress line every N steps (default: %(default)s)")
    loader.add_flags(p)
    distill.add_flags(p)
    return p


def check_args(args):
    """The run's settings, checked before anything is loaded: a copy of `args` with the video shape resolved."""
    if args.video is not None and not args.prompt:
        raise ValueError("--video needs --prompt, the caption of the clip")
    shapes_world, sr = args.data == "shapes", args.stage == "sr"
    size = shapes.SIZE * simda.UPSCALE if sr else shapes.SIZE  # sr: the high-res size, the demo's 32x32 times 4
    default = (shapes.FRAMES, size, size) if shapes_world else (DEFAULT_FRAMES, DEFAULT_SIZE, DEFAULT_SIZE)
    frames, height, width = resolve_shape(args.frames, args.size, args.height, args.width, defaults=default)
    if shapes_world and height != width:
        raise ValueError(f"--data shapes makes square videos: use --size, not {width}x{height}")
    if shapes_world and args.hflip:
        raise ValueError("--hflip would mirror the shapes' motion but not their captions ('moving left'): drop it")
    if args.stage == "sr" and args.prediction not in (None, "v"):
        raise ValueError("--stage sr trains SD's x4 upscaler, which predicts v: drop --prediction")
    if args.stage == "sr" and (args.cache_latents or args.val_prompt):
        raise ValueError("--stage sr makes its low-res inputs from the clips at every step and has no validation "
                         "samples: drop --cache-latents and --val-prompt (sample.py --upscale-video shows the result)")
    if shapes_world and args.cache_latents:
        raise ValueError("--cache-latents needs a fixed set of videos; --data shapes makes fresh ones every step")
    args.distill_settings = distill.check_flags(args)  # None without --distill; it settles --val-sampler/--val-steps
    simda_config = simda.SimDAConfig(spatial_adapters=not args.no_spatial_adapters,
                                     temporal_adapters=not args.no_temporal_adapters, latent_shift=not args.no_latent_shift)
    if args.init_from and not args.distill:
        check_init(args, simda_config)
    for name in ("stride", "steps", "batch_size", "save_every", "log_every", "val_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    simda.check_sampling(args.val_sampler, args.val_steps)
    loader.check_flags(args, frames)
    saved = os.path.exists(os.path.join(args.out, "state.pt"))
    if saved and not args.resume:
        raise ValueError(f"{args.out} already holds a run (state.pt): pass --resume to continue it, or another --out")
    if args.resume and not saved:
        if not os.path.exists(os.path.join(args.out, "log.jsonl")):
            raise ValueError(f"--resume: no saved run in {args.out} (no state.pt)")
        print(f"--resume: the run in {args.out} stopped before its first save; starting it over", file=sys.stderr)
    return argparse.Namespace(**{**vars(args), "frames": frames, "height": height, "width": width,
                                 "resume": args.resume and saved, "simda_config": simda_config})


def check_init(args, simda_config):
    """--init-from without --distill: adapters of this run's --stage, with the modules the --no-* flags leave."""
    meta = simda.read_adapters(args.init_from)[1]  # a missing or unreadable file: one line
    differ = [f"{k} {meta['simda_config'].get(k)}" for k in ("spatial_adapters", "temporal_adapters", "latent_shift")
              if meta["simda_config"].get(k) != getattr(simda_config, k)]
    stage = meta.get("stage", "t2v")
    why = (meta.get("distilled") and f"distilled adapters: go on distilling them with --distill {meta['distilled']['teacher']}"
           or stage != args.stage and f"adapters of --stage {stage}, not {args.stage}"
           or differ and f"adapters with {', '.join(differ)}: match them with the --no-* flags")
    if why:
        raise ValueError(f"--init-from {args.init_from} holds {why}")


@dataclasses.dataclass
class Run:
    """Everything a training run holds; `step` is the number of optimizer steps done."""
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    ckpt: str
    config: dict  # the settings a resumed run should keep
    pipe: simda.Pipeline
    model: torch.nn.Module  # the UNet, or its DistributedDataParallel wrapper
    params: list
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # float16's; disabled (its calls no-ops) in other precisions
    autocast: object
    feed: loader.Feed = None  # this rank's samples of each step, read ahead
    distiller: distill.Distiller = None  # --distill: the teacher's and the target's adapters, the loss
    log: object = None
    progress: Progress = None
    step: int = 0
    saved: int = 0
    first: int = 0  # the step this process started from (a resumed run's saved step)
    pending: list = dataclasses.field(default_factory=list)  # (step, loss on the device, seconds) not yet reported


def build_run(args):
    """Check the settings, read what --resume continues, load the frozen SD with fresh adapters, and
    open the output folder."""
    args = check_args(args)
    state = load_state(args.out) if args.resume else None  # an unreadable state.pt fails before anything else
    rank, world, device = setup_distributed(args.device)
    dtype = autocast_dtype(args.precision, device)
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    sr = args.stage == "sr"
    demo = simda.DEMO_UPSCALER if sr else simda.DEMO_CHECKPOINT
    ckpt = args.ckpt or (demo if args.data == "shapes" else simda.default_checkpoint(upscaler=sr))
    if not os.path.exists(ckpt):
        raise CheckpointError(f"checkpoint not found: {ckpt}")
    dataset = loader.make_dataset(args, rank)  # and checked readable: before any model is loaded

    torch.manual_seed(args.seed)  # the adapters' initialisation
    # the frozen text encoder and UNet held in the compute dtype, the adapters (and AdamW's state) float32
    start = args.distill or args.init_from  # --distill: the teacher (distill.Distiller takes --init-from's)
    if sr:
        pipe = simda.load_upscaler(ckpt, device, dtype, adapters=start, simda_config=args.simda_config,
                                   adapter_dtype=torch.float32)
    else:
        pipe = simda.load_pipeline(ckpt, device, dtype, adapters=start, simda_config=args.simda_config,
                                   prediction=args.prediction, adapter_dtype=torch.float32, lora_rank=args.lora_rank)
    factor = pipe.vae.config.downsample_factor
    if sr:  # the low-res input, a quarter of the size, is halved three times in the upscaler's UNet
        check_shape(args.frames, args.height, args.width, factor * 8, f"{factor} (the upscaler's VAE) x 8 (its UNet)")
    check_shape(args.frames, args.height, args.width, factor)
    pipe.unet.gradient_checkpointing = args.gradient_checkpointing
    params = freeze_for_training(pipe.unet)
    model = pipe.unet if world == 1 else torch.nn.parallel.DistributedDataParallel(
        pipe.unet, device_ids=[device.index] if device.type == "cuda" else None)
    config = dict(batch_size=args.batch_size, seed=args.seed, frames=args.frames, stride=args.stride, height=args.height,
                  width=args.width, caption_dropout=args.caption_dropout, hflip=args.hflip, lr=args.lr,
                  timestep_bias=args.timestep_bias, cache_latents=args.cache_latents, data=args.data or args.video,
                  simda_config=dataclasses.asdict(pipe.unet.simda_config), prediction=pipe.prediction, stage=args.stage,
                  given_frames=args.given_frames, given_probability=args.given_probability if args.given_frames else 0,
                  init_from=args.init_from, distill=args.distill_settings and distill.metadata(args.distill_settings))
    run = Run(args, rank, world, device, ckpt, config, pipe, model, params,
              torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay),
              torch.amp.GradScaler("cuda", enabled=dtype == torch.float16),  # disabled: its calls are no-ops
              (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext)
    run.distiller = args.distill_settings and distill.Distiller(pipe, args.distill_settings, run.optimizer, state)
    if state is not None:
        resume(run, state)
    run.first = run.step
    cache = loader.cache_latents(pipe.vae, dataset, args.seed, rank, world, device, args.out) \
        if args.cache_latents else None
    run.feed = loader.Feed(dataset, args.batch_size, rank, world, run.step, args.steps, args.num_workers, device, cache)
    if rank == 0:
        open_output(run, dtype)
    return run


def open_output(run, dtype):
    """Rank 0: the output folder without leftovers of a killed write, the log cut back to the saved
    step, and the run's first lines."""
    args = run.args
    os.makedirs(args.out, exist_ok=True)
    for name in remove_temporaries(args.out, ["adapters.safetensors", "state.pt", "log.jsonl"]):
        print(f"removed {os.path.join(args.out, name)}, left by an interrupted write", file=sys.stderr)
    run.log = start_log(os.path.join(args.out, "log.jsonl"), run.step)
    run.progress = Progress("step", args.steps, done=run.step, redraw=False)
    source = "fresh shapes-world videos" if args.data == "shapes" else f"{len(run.feed.dataset)} videos"
    stride = "" if args.data == "shapes" else f" (stride {args.stride})"
    print(f"{source}, {args.frames} frames of {args.width}x{args.height}{stride}, global batch {args.batch_size} on "
          f"{run.world} process(es), {run.device}, precision {str(dtype).removeprefix('torch.')}")
    print(f"{run.pipe.family} checkpoint {run.ckpt}, predicts {run.pipe.prediction} ({run.pipe.prediction_source})")
    print(run.feed.describe())
    print(trainable_summary(run.pipe.unet), flush=True)


def train_step(run):
    """One optimizer step on this rank's share of the global batch; returns the loss, averaged over the ranks, as a
    0-d tensor on the device: reading it here (.item()) would make the host wait for the GPU at every step."""
    args = run.args
    gs, batch = run.feed.next()  # this rank's samples of the step
    given = loader.draw_given(args.seed, gs, args.given_frames, args.given_probability)
    keep = loader.loss_mask(given, args.frames, run.device)  # None: no sample of this step is given frames
    with run.autocast():
        if run.distiller:  # --distill: distill.py's consistency loss on the same data
            loss = run.distiller.loss(run.model, batch, gs, args.seed, run.device)
        else:
            x, t, target, context, y = loader.make_inputs(run.pipe, batch, gs, args.seed, run.device,
                                                          args.timestep_bias, given)
            out = run.model(x, t, context, y).float()
            loss = F.mse_loss(out, target) if keep is None else ((out - target) ** 2 * keep).mean()
    value = loss.detach().clone()  # stays on the device: after_step reads it back only when it reports
    if run.world > 1:
        dist.all_reduce(value)
        value /= run.world
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    if args.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(run.params, args.max_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.step += 1
    return value


def after_step(run, loss):
    """Log the step, print progress, save and validate when due. The losses wait on the device and are read back
    (one wait for the GPU) when a progress line is due, before a validation or a save, and at the end."""
    args, step = run.args, run.step
    run.pending.append((step, loss, round(run.progress.elapsed(), 3) if run.progress else 0))
    sample = args.val_prompt and args.sample_every > 0 and (step % args.sample_every == 0 or step == args.steps)
    save_now = step % args.save_every == 0 or step == args.steps
    show = step % args.log_every == 0 or step in (run.first + 1, args.steps)
    last = report_losses(run) if show or sample or save_now else None
    if run.rank == 0 and show:
        run.progress.show(step, f"loss {last:.4f}  {run.feed.note()}")
    # validation first: a kill inside it leaves a step that the resumed run redoes, GIFs included
    if sample:
        validate(run)
    if save_now:
        if run.rank == 0:
            save(run)
        run.saved = step


def report_losses(run):
    """Read the pending losses back (every rank: one wait for the GPU) and log them (rank 0); stop at the first that
    is not finite, whose update no save has kept (every save reports first). Returns the last loss."""
    pending, run.pending = run.pending, []
    for (step, _, elapsed), value in zip(pending, torch.stack([loss for _, loss, _ in pending]).tolist()):
        if not math.isfinite(value):
            saved = f"the last good checkpoint is {os.path.join(run.args.out, 'adapters.safetensors')} at step " \
                    f"{run.saved}" if run.saved else "nothing saved yet"
            raise FloatingPointError(f"the loss is {value} at step {step}: stopping; {saved}")
        if run.rank == 0:
            run.log.write(json.dumps({"step": step, "loss": value, "lr": run.args.lr, "time": elapsed}) + "\n")
            run.log.flush()
    return value


def save(run):
    """adapters.safetensors (for sample.py) and state.pt (for --resume), each written atomically,
    after the log lines up to this step are on the disk."""
    args = run.args
    os.fsync(run.log.fileno())
    meta = dict(frames=args.frames, stride=args.stride, height=args.height, width=args.width, checkpoint=run.ckpt,
                family=run.pipe.family, prediction=run.pipe.prediction, stage=args.stage, step=run.step)
    if args.video:
        meta.update(prompt=args.prompt, video=args.video)
    if args.data == "shapes":
        meta.update(fps=shapes.FPS)
    if args.given_frames:  # what sample.py --image / --continue need
        meta.update(given_frames=args.given_frames, given_probability=args.given_probability)
    if args.init_from:
        meta.update(init_from=args.init_from)
    if run.distiller:  # what sample.py --sampler lcm needs
        meta.update(distilled=run.config["distill"])
    simda.save_adapters(run.pipe.unet, os.path.join(args.out, "adapters.safetensors"), **meta)
    state = dict(step=run.step, adapters={k: v.cpu() for k, v in adapter_state_dict(run.pipe.unet).items()},
                 optimizer=run.optimizer.state_dict(), scaler=run.scaler.state_dict(),
                 config=run.config, target=run.distiller.state_dict() if run.distiller else {})
    save_torch(state, os.path.join(args.out, "state.pt"))


def load_state(out):
    path = os.path.join(out, "state.pt")
    state = load_torch(path)
    if not isinstance(state, dict) or not {"step", "adapters", "optimizer", "config"} <= state.keys():
        raise CheckpointError(f"{path} is not a training state saved by train.py (found {type(state).__name__})")
    return state


def resume(run, state):
    simda.load_adapters(run.pipe.unet, state["adapters"], os.path.join(run.args.out, "state.pt"))
    run.optimizer.load_state_dict(state["optimizer"])
    if state["scaler"]:  # saved by a float16 run (a disabled scaler ignores it)
        run.scaler.load_state_dict(state["scaler"])
    if changed := [f"{k} {v} -> {run.config.get(k)}" for k, v in state["config"].items() if run.config.get(k) != v]:
        print(f"warning: resuming with other settings ({', '.join(changed)}): the run will not continue exactly",
              file=sys.stderr)
    run.step = run.saved = state["step"]


def start_log(path, step):
    """log.jsonl, rewritten atomically to hold the lines of steps 1..`step` only (a run logs steps
    after its last save, and a kill can tear the last line), then open for appending."""
    kept = []
    if step and os.path.exists(path):
        with open(path) as f:
            for number, line in enumerate(f, 1):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    print(f"warning: {path}: dropped line {number}, which is not complete JSON (torn by a kill?)",
                          file=sys.stderr)
                    continue
                if entry["step"] <= step:
                    kept.append(json.dumps(entry) + "\n")
    write_atomic(path, lambda tmp: Path(tmp).write_text("".join(kept)))
    return open(path, "a")


def validate(run):
    """Sample the validation prompts; every rank takes its share, so none waits long in a collective."""
    args = run.args
    folder = os.path.join(args.out, "samples")
    paths = output_paths(os.path.join(folder, f"step{run.step:06d}.gif"), args.val_prompt)
    mine = list(range(run.rank, len(args.val_prompt), run.world))
    if not mine:
        return
    os.makedirs(folder, exist_ok=True)
    with run.autocast():
        videos = run.pipe([args.val_prompt[i] for i in mine], args.frames, args.height, args.width, args.val_steps,
                          seed=args.seed, progress=False, sampler=args.val_sampler)
    for i, video in zip(mine, videos):
        save_video(video, paths[i])
    print(f"step {run.step}: wrote {len(mine)} validation GIF(s) to {folder}", flush=True)


def finish(run):
    summary = run.feed.close(run.world)  # every rank: the skipped videos are gathered
    if run.rank == 0:
        run.log.close()
        print(f"done: adapters in {os.path.join(run.args.out, 'adapters.safetensors')}; {summary}", flush=True)


def train(args):
    """Train the adapters as `args` (train.py's flags) say; returns the finished Run."""
    run = build_run(args)
    while run.step < run.args.steps:
        after_step(run, train_step(run))
    finish(run)
    return run


def interrupted(args, argv):
    """The one line a Ctrl-C ends with: what is saved, and how to go on."""
    path = os.path.join(args.out, "state.pt")
    try:
        step = load_torch(path)["step"] if os.path.exists(path) else None
    except CheckpointError:
        step = None
    if step is None:
        return f"interrupted before the first save (--save-every {args.save_every}): nothing is saved\n"
    command = "python train.py " + " ".join(shlex.quote(a) for a in argv if a != "--resume") + " --resume"
    return f"interrupted: the last saved step is {step} ({path}); continue with: {command}\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        train(args)
    except KeyboardInterrupt:
        parser.exit(130, interrupted(args, argv) if int(os.environ.get("RANK", 0)) == 0 else "")
    except FloatingPointError as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    except ValueError as e:  # checkpoint.CheckpointError and data.VideoError are ValueErrors
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
