"""Train SimDA's adapters on a frozen Stable Diffusion 1.x: text-to-video on WebVid-style data, or
one-shot tuning on a single clip for video editing (the paper's Sec. 3.4).

    python train.py --data webvid_subset --out out/webvid
    python train.py --data shapes --out out/shapes      # the built-in demo world, on the demo model
    python train.py --video clip.mp4 --prompt "a jeep car is moving on the road" --steps 200 --out out/jeep
    torchrun --nproc_per_node 4 train.py --data webvid_subset --batch-size 8 --out out/webvid

Each step: encode the captions with the frozen CLIP text encoder and the clips with the frozen VAE
(a posterior sample, times LATENT_SCALE), noise the latents at random timesteps (ddim.add_noise) and
regress the noise (epsilon prediction, MSE); AdamW updates the adapters only.

Every random draw of a sample (video, start frame, flip, caption dropout, posterior noise, timestep,
noise) is seeded by (--seed, global sample index), so --resume continues a run exactly and a
torchrun job with N ranks, each taking every N-th sample of the global batch, computes what a single
process with the same --batch-size computes. --out holds adapters.safetensors (the adapters and
their metadata), state.pt (adapters, optimizer and step: what --resume reads), log.jsonl (the loss
of every step) and samples/ (validation GIFs).
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import ddim
import sample
import shapes
import simda
import vae as vae_module
from vae import LATENT_SCALE


def build_parser():
    p = argparse.ArgumentParser(description="Train SimDA adapters on a frozen SD 1.x (text-to-video, or one-shot "
                                            "on one clip for editing). Multi-GPU: torchrun --nproc_per_node N train.py ...")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="WebVid-style CSV (or a folder holding one, videos under videos/), "
                                                   "a folder of videos (.mp4/.webm/.gif) with same-named .txt captions, "
                                                   "or 'shapes': fresh videos of the synthetic world of shapes.py")
    src.add_argument("--video", metavar="CLIP", help="one-shot tuning on this clip (frames from its start); needs --prompt")
    p.add_argument("--prompt", help="--video: the caption of the clip (stored in the adapters' metadata)")
    p.add_argument("--ckpt", metavar="PATH", help=f"SD 1.x checkpoint (file or diffusers folder); default: $SIMDA_CKPT, "
                                                  f"else {simda.DEFAULT_CHECKPOINT}; with --data shapes, the demo "
                                                  f"image model {simda.DEMO_CHECKPOINT}")
    p.add_argument("--out", default="out/train", help="output folder (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out (state.pt) up to --steps")
    p.add_argument("--frames", type=int, help=f"frames per clip (default: 16; with --data shapes {shapes.FRAMES})")
    p.add_argument("--stride", type=int, default=4, help="take every stride-th frame of the video (default: %(default)s)")
    p.add_argument("--size", type=int, help="square frame size in pixels, a multiple of 8 (default: 256; with --data "
                                            f"shapes {shapes.SIZE})")
    p.add_argument("--width", type=int, help="frame width, with --height instead of --size (default: 256)")
    p.add_argument("--height", type=int, help="frame height, with --width instead of --size (default: 256)")
    p.add_argument("--hflip", action="store_true", help="flip half of the clips horizontally")
    p.add_argument("--caption-dropout", type=float, default=0.1,
                   help="fraction of captions replaced by the empty prompt, for guidance (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10000, help="total optimizer steps, counting resumed ones (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="global batch, split evenly over torchrun's processes (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--timestep-bias", type=float, default=0.0,
                   help="draw training timesteps with density ~ (t/1000)^BIAS: 0 is SD's uniform draw; > 0 favours "
                        "the noisiest steps, where motion is decided (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this; 0: off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and of every noise draw (default: %(default)s)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet blocks in backward: less memory, slower")
    p.add_argument("--cache-latents", action="store_true",
                   help="encode every video once up front (one fixed clip per video) instead of at every step")
    p.add_argument("--device", default="auto", help="auto: CUDA, else MPS, else CPU; or a torch device (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="autocast dtype (weights stay float32); auto: bfloat16 on CUDA if supported, else float16 "
                        "with a grad scaler; float32 off CUDA (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=500,
                   help="save adapters and state every N steps, and at the end (default: %(default)s)")
    p.add_argument("--sample-every", type=int, default=500,
                   help="write validation GIFs every N steps and at the end; 0: off (default: %(default)s)")
    p.add_argument("--val-prompt", action="append", default=[],
                   help="validation prompt (repeatable; default: none, no validation)")
    p.add_argument("--val-steps", type=int, default=25, help="DDIM steps of the validation samples (default: %(default)s)")
    p.add_argument("--no-latent-shift", action="store_true", help="ablation: plain per-frame self-attention")
    p.add_argument("--no-temporal-adapters", action="store_true", help="ablation: no TemporalAdapters")
    p.add_argument("--no-spatial-adapters", action="store_true", help="ablation: no SpatialAdapters")
    p.add_argument("--log-every", type=int, default=10, help="print a progress line every N steps (default: %(default)s)")
    return p


def check_args(args):
    if args.video is not None and not args.prompt:
        raise ValueError("--video needs --prompt, the caption of the clip")
    if args.size is not None and (args.width is not None or args.height is not None):
        raise ValueError("give either --size or --width/--height, not both")
    shapes_world = args.data == "shapes"
    args.frames = args.frames if args.frames is not None else shapes.FRAMES if shapes_world else 16
    args.height = args.height or args.size or (shapes.SIZE if shapes_world else 256)
    args.width = args.width or args.size or (shapes.SIZE if shapes_world else 256)
    if shapes_world and args.height != args.width:
        raise ValueError(f"--data shapes makes square videos: use --size, not {args.width}x{args.height}")
    if shapes_world and args.hflip:
        raise ValueError("--hflip would mirror the shapes' motion but not their captions ('moving left'): drop it")
    if shapes_world and args.cache_latents:
        raise ValueError("--cache-latents needs a fixed set of videos; --data shapes makes fresh ones every step")
    sample.check_pixel_size(args.height, args.width)
    for name in ("frames", "stride", "steps", "batch_size", "save_every", "log_every", "val_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.timestep_bias >= 0:
        raise ValueError(f"--timestep-bias must be >= 0, got {args.timestep_bias}")
    if not 0 <= args.caption_dropout <= 1:
        raise ValueError(f"--caption-dropout must be in [0, 1], got {args.caption_dropout}")


def setup(args):
    """(rank, world size, device); under torchrun (RANK/WORLD_SIZE set) also the process group."""
    device = sample.pick_device(args.device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def autocast_dtype(args, device):
    if args.precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtype = getattr(torch, args.precision)
    if dtype != torch.float32 and device.type != "cuda":
        raise ValueError(f"--precision {args.precision} needs CUDA; this run is on {device.type}")
    return dtype


def clock(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


def generator(*parts):
    return torch.Generator().manual_seed(data.sample_seed(*parts))


def draw_timestep(gen, bias=0.0):
    """One training timestep [1]: uniform over 0..999 as in SD's training (bias 0), else with density
    proportional to (t / 1000) ** bias, which favours the noisiest steps, where a sampled video's layout
    and motion are decided and the eps loss weighs errors least."""
    if bias == 0:
        return torch.randint(0, ddim.NUM_TRAIN_TIMESTEPS, (1,), generator=gen)
    u = torch.rand(1, generator=gen, dtype=torch.float64)
    return (u ** (1 / (1 + bias)) * ddim.NUM_TRAIN_TIMESTEPS).long().clamp(max=ddim.NUM_TRAIN_TIMESTEPS - 1)


@torch.no_grad()
def make_inputs(pipe, batch, gs, seed, device, timestep_bias=0.0):
    """(noisy latents, timesteps, noise, text context) for the samples gs: [(clip or (mean, logvar), caption)]."""
    clips, captions = zip(*batch)
    context = pipe.text_encoder(pipe.tokenizer(list(captions)).to(device))
    if isinstance(clips[0], tuple):  # cached posterior moments [F, 4, h, w]
        mean, logvar = (torch.stack(m).to(device) for m in zip(*clips))
    else:
        video = torch.stack(clips).to(device)  # [b, F, 3, H, W]
        mean, logvar = (m.float().unflatten(0, video.shape[:2]) for m in pipe.vae.encode(video.flatten(0, 1)))
    latents = torch.stack([vae_module.sample(m, lv, generator(seed, "posterior", g))
                           for m, lv, g in zip(mean, logvar, gs)]) * LATENT_SCALE
    latents = latents.permute(0, 2, 1, 3, 4)  # b f c h w -> b c f h w
    gens = [generator(seed, "noise", g) for g in gs]
    t = torch.cat([draw_timestep(gen, timestep_bias) for gen in gens])
    noise = torch.stack([torch.randn(latents.shape[1:], generator=gen) for gen in gens]).to(device)
    return ddim.add_noise(latents, noise, t.to(device)), t.to(device), noise, context


@torch.no_grad()
def cache_latents(pipe, dataset, seed, rank, world, device):
    """{video index: (mean, logvar)} of one clip per video; each rank encodes its share, then all swap."""
    cache = {}
    for idx in range(rank, len(dataset), world):
        clip = dataset.read(idx, random.Random(data.sample_seed(seed, "cache", idx))) if idx not in dataset.bad else None
        if clip is not None:
            cache[idx] = tuple(m.float().cpu() for m in pipe.vae.encode(clip.to(device)))
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (cache, dataset.bad))
        for part, bad in parts:
            cache.update(part)
            dataset.bad |= bad
    if not cache:
        raise ValueError(f"none of the {len(dataset)} videos could be encoded (see the warnings above)")
    return cache


def save(args, unet, optimizer, scaler, step, ckpt, config):
    """adapters.safetensors (for sample.py) and state.pt (for --resume), each written atomically."""
    meta = dict(frames=args.frames, stride=args.stride, height=args.height, width=args.width, checkpoint=ckpt, step=step)
    if args.video:
        meta.update(prompt=args.prompt, video=args.video)
    if args.data == "shapes":
        meta.update(fps=shapes.FPS)
    simda.save_adapters(unet, os.path.join(args.out, "adapters.safetensors"), **meta)
    state = dict(step=step, adapters={k: v.cpu() for k, v in simda.adapter_state_dict(unet).items()},
                 optimizer=optimizer.state_dict(), scaler=scaler.state_dict() if scaler else {}, config=config)
    path = os.path.join(args.out, "state.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def resume(args, unet, optimizer, scaler, config):
    path = os.path.join(args.out, "state.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)
    simda.load_adapters(unet, state["adapters"], path)
    optimizer.load_state_dict(state["optimizer"])
    if scaler and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    changed = [f"{k} {v} -> {config.get(k)}" for k, v in state["config"].items() if config.get(k) != v]
    if changed:
        print(f"warning: resuming with other settings ({', '.join(changed)}): the run will not continue exactly",
              file=sys.stderr)
    return state["step"]


def start_log(args, step, rank):
    """log.jsonl, cut back to `step` (a run can log past its last save) or started afresh."""
    path = os.path.join(args.out, "log.jsonl")
    if rank != 0:
        return None
    lines = []
    if step and os.path.exists(path):
        with open(path) as f:
            lines = [l for l in f if l.strip() and json.loads(l)["step"] <= step]
    log = open(path, "w")
    log.writelines(lines)
    return log


def validate(args, pipe, step, autocast):
    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    with autocast():
        videos = sample.generate(pipe, args.val_prompt, args.frames, args.height, args.width, args.val_steps,
                                 seed=args.seed, progress=False)
    for path, video in zip(sample.output_paths(os.path.join(args.out, "samples", f"step{step:06d}.gif"),
                                               args.val_prompt), videos):
        sample.save_video(video, path)
    print(f"step {step}: wrote {len(videos)} validation GIF(s) to {os.path.join(args.out, 'samples')}", flush=True)


def train(args):
    check_args(args)
    rank, world, device = setup(args)
    dtype = autocast_dtype(args, device)
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    ckpt = args.ckpt or (simda.DEMO_CHECKPOINT if args.data == "shapes" else simda.default_checkpoint())
    if not os.path.exists(ckpt):
        raise simda.CheckpointError(f"checkpoint not found: {ckpt}")
    if os.path.exists(os.path.join(args.out, "state.pt")) != bool(args.resume):
        raise ValueError(f"--resume: no saved run in {args.out} (no state.pt)" if args.resume else
                         f"{args.out} already holds a run (state.pt): pass --resume to continue it, or another --out")
    if args.video:  # one-shot: always the same clip, from frame 0, which is what sample.py --edit inverts
        if not os.path.isfile(args.video):
            raise ValueError(f"--video {args.video} does not exist")
        items = [(args.video, args.prompt)]
    if args.data == "shapes":
        dataset = data.ShapesDataset(args.frames, args.height, args.seed, args.caption_dropout)
    else:
        dataset = data.Dataset(items if args.video else data.find_videos(args.data), args.frames, args.stride,
                               args.height, args.width, args.seed, args.caption_dropout, args.hflip,
                               random_start=args.video is None, rank=rank)
    dataset.check_readable()  # before any model is loaded

    torch.manual_seed(args.seed)  # the adapters' initialisation
    simda_config = simda.SimDAConfig(spatial_adapters=not args.no_spatial_adapters,
                                     temporal_adapters=not args.no_temporal_adapters, latent_shift=not args.no_latent_shift)
    pipe = simda.load_pipeline(ckpt, device, torch.float32, simda_config=simda_config)
    sample.check_size(pipe, args.frames, args.height, args.width)
    unet = pipe.unet
    unet.gradient_checkpointing = args.gradient_checkpointing
    params = simda.freeze_for_training(unet)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    config = dict(batch_size=args.batch_size, seed=args.seed, frames=args.frames, stride=args.stride, height=args.height,
                  width=args.width, caption_dropout=args.caption_dropout, hflip=args.hflip, lr=args.lr,
                  timestep_bias=args.timestep_bias, cache_latents=args.cache_latents, data=args.data or args.video,
                  simda_config=dataclasses.asdict(simda_config))
    step = resume(args, unet, optimizer, scaler, config) if args.resume else 0
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        source = "fresh shapes-world videos" if args.data == "shapes" else f"{len(dataset)} videos"
        stride = "" if args.data == "shapes" else f" (stride {args.stride})"
        print(f"{source}, {args.frames} frames of {args.width}x{args.height}{stride}, "
              f"global batch {args.batch_size} on {world} process(es), {device}, precision {str(dtype).removeprefix('torch.')}")
        print(simda.trainable_summary(unet), flush=True)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    cache = cache_latents(pipe, dataset, args.seed, rank, world, device) if args.cache_latents else None
    model = unet
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None)
    log = start_log(args, step, rank)
    first, saved, start_time = step, step, time.perf_counter()
    while step < args.steps:
        gs = [step * args.batch_size + j for j in range(rank, args.batch_size, world)]  # this rank's samples
        with autocast():
            noisy, t, noise, context = make_inputs(pipe, [dataset.sample(g, cache) for g in gs], gs, args.seed, device,
                                                       args.timestep_bias)
            loss = F.mse_loss(model(noisy, t, context).float(), noise)
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        value = value.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"the loss is {value} at step {step + 1}: stopping; the last good checkpoint "
                                     f"is {os.path.join(args.out, 'adapters.safetensors')} at step {saved}"
                                     if saved else f"the loss is {value} at step {step + 1}: stopping (nothing saved yet)")
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        step += 1
        if rank == 0:
            elapsed = time.perf_counter() - start_time
            log.write(json.dumps({"step": step, "loss": value, "lr": args.lr, "time": round(elapsed, 3)}) + "\n")
            log.flush()
            if step % args.log_every == 0 or step in (first + 1, args.steps):
                rate = (step - first) / elapsed
                skipped = f"  skipped {len(dataset.bad)}" if dataset.bad else ""
                print(f"step {step}/{args.steps}  loss {value:.4f}  {rate:.2f} it/s  "
                      f"ETA {clock((args.steps - step) / rate)}{skipped}", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            if rank == 0:
                save(args, unet, optimizer, scaler, step, ckpt, config)
            saved = step
        if rank == 0 and args.val_prompt and args.sample_every > 0 and (step % args.sample_every == 0 or step == args.steps):
            validate(args, pipe, step, autocast)
    finish(args, unet, dataset, rank, world, log)


def finish(args, unet, dataset, rank, world, log):
    bad = [dataset.bad]
    if world > 1:
        bad = [None] * world
        dist.all_gather_object(bad, dataset.bad)
    if os.environ.get("SIMDA_RANK_ADAPTERS"):  # tests: every rank dumps its adapters, to compare the ranks
        os.makedirs(os.environ["SIMDA_RANK_ADAPTERS"], exist_ok=True)
        simda.save_adapters(unet, os.path.join(os.environ["SIMDA_RANK_ADAPTERS"], f"rank{rank}.safetensors"))
    if rank == 0:
        if log:
            log.close()
        skipped = len(set().union(*bad))
        print(f"done: adapters in {os.path.join(args.out, 'adapters.safetensors')}"
              + ("" if args.data == "shapes" else f"; {skipped} of {len(dataset)} videos skipped (unreadable or too short)"),
              flush=True)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        train(args)
    except FloatingPointError as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    except ValueError as e:  # simda.CheckpointError and data.VideoError are ValueErrors
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
