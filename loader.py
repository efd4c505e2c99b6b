"""train.py's input: the samples of every step, read ahead of the training loop.

`make_dataset` builds what train.py's flags name (data.Dataset, or data.ShapesDataset for --data
shapes). `Feed` hands the loop this rank's samples of each step from the run's first step on (a
resumed run's too): with --num-workers N, N worker processes (torch's DataLoader, each worker
reading whole steps; pinned memory on CUDA) read up to 2N steps ahead; with 0, the training process
reads each step when it comes. A sample is the dataset's `sample(g)`, a pure function of (seed, global
sample index) and the files (data.py), so a run is the same whatever N is. The videos that failed in
a worker come back with its step: the training process warns once per video and counts them. `Feed`
also times how long the loop waited for data (the progress line's `data wait`); the summary that
`close` returns says which --num-workers would keep the steps fed. `cache_latents` encodes one clip per video once
(--cache-latents, on the disk under --out; such a run reads its samples in the training process). `make_inputs`
turns a step's samples into what the UNet sees and what it must output; with --given-frames, `draw_given` picks the
samples whose first frames stay clean (at t = 0: image-to-video and continuation), and `loss_mask`
leaves those frames out of the loss. `check_flags` checks the flags of all this before any model loads.
"""
import gc
import math
import os
import random
import time

import torch
from safetensors.torch import load_file

import data
import ddim
import simda
import vae as vae_module
from checkpoint import save_safetensors
from runtime import to_device
from video import resample, stack_clips


def draw_given(seed, gs, given_frames, probability):
    """How many first frames of each sample gs stay clean (train.py --given-frames K, --given-probability P):
    with probability P from 1 to K (uniform), else 0, plain text-to-video. Drawn from their own generators
    (seed, "given", g), so that no other draw of a run changes, and none at all when P is 0."""
    if not given_frames or not probability:
        return [0] * len(gs)
    given = []
    for g in gs:
        gen = data.generator(seed, "given", g)
        chosen = torch.rand(1, generator=gen, dtype=torch.float64).item() < probability
        count = int(torch.randint(1, given_frames + 1, (1,), generator=gen))
        given.append(count if chosen else 0)
    return given


def loss_mask(given, frames, device):
    """[B, 1, F, 1, 1]: 1 where the loss counts, 0 on each sample's given frames; None when none is given.
    The loss is the mean over every element, the given ones counting 0, as F.mse_loss's over all of them:
    so the ranks of a torchrun job still average to what one process computes."""
    if not any(given):
        return None
    keep = torch.ones(len(given), 1, frames, 1, 1, device=device)
    for i, count in enumerate(given):
        keep[i, :, :count] = 0
    return keep


@torch.no_grad()
def clean_latents(pipe, batch, gs, seed, device):
    """(scaled latents [B, 4, F, h, w]: a posterior sample of each clip, text context [B, 77, D]) of the samples gs:
    [(clip or cached (mean, logvar), caption)]."""
    clips, captions = zip(*batch)
    context = pipe.text_context(list(captions))
    if isinstance(clips[0], tuple):  # cached posterior moments, each [4, F, h, w]
        mean, logvar = (to_device(torch.stack(m), device) for m in zip(*clips))
    else:
        mean, logvar = (m.float() for m in pipe.vae.encode_video(pixels(batch, device)))
    # each sample's noise from its own generator, on the CPU; one copy to the device for the batch
    noise = torch.stack([torch.randn(m.shape, generator=data.generator(seed, "posterior", g))
                         for m, g in zip(mean, gs)])
    return vae_module.sample(mean, logvar, noise=to_device(noise, device)) * pipe.latent_scale, context


def pixels(batch, device):
    """The clips of [(clip, caption)] as one batch [B, 3, F, H, W] in [-1, 1] on `device`: uint8 levels cross to it
    (a quarter of float32's bytes) and become floats there."""
    return data.to_unit(to_device(stack_clips([clip for clip, _ in batch]), device))


@torch.no_grad()
def make_inputs(pipe, batch, gs, seed, device, timestep_bias=0.0, given=None):
    """(UNet input, timesteps, target, text context, class labels) for the samples gs: [(clip or (mean, logvar),
    caption)]. The input is the noisy latents; the target what the UNet should output, the noise or v (the
    pipeline's prediction). For the upscaler, the input also holds the clip downscaled x4 and noised to a
    random level (the class label); else the labels are None. `given` (draw_given's counts): those first frames
    of a sample are its clean latents at timestep 0, and the timesteps are then per frame [B, F]."""
    latents, context = clean_latents(pipe, batch, gs, seed, device)
    gens = [data.generator(seed, "noise", g) for g in gs]
    # drawn on the CPU (t stays there for the schedule's lookups) and sent without waiting for the GPU (to_device)
    t = torch.cat([ddim.draw_timestep(gen, timestep_bias) for gen in gens])
    noise = to_device(torch.stack([torch.randn(latents.shape[1:], generator=gen) for gen in gens]), device)
    x, levels = ddim.add_noise(latents, noise, t, pipe.alphas), None
    target = ddim.target(latents, noise, t, pipe.prediction, pipe.alphas)
    if given is not None and any(given):
        t = t[:, None].repeat(1, latents.shape[2])  # [B] -> [B, F]
        for i, count in enumerate(given):
            x[i, :, :count], t[i, :count] = latents[i, :, :count], 0
    if pipe.is_upscaler:
        # x4-upscaling.yaml's training: the low-res image at a noise level drawn uniformly from 0..349
        low_res = resample(pixels(batch, device), 1 / simda.UPSCALE)
        gens = [data.generator(seed, "low-res", g) for g in gs]
        levels = torch.cat([torch.randint(0, simda.MAX_NOISE_LEVEL, (1,), generator=gen) for gen in gens])
        low_noise = to_device(torch.stack([torch.randn(low_res.shape[1:], generator=gen) for gen in gens]), device)
        x = torch.cat([x, ddim.add_noise(low_res, low_noise, levels, pipe.alphas)], dim=1)
        levels = to_device(levels, device)
    return x, to_device(t, device), target, context, levels


def add_flags(p):
    """train.py's flags of its input, checked by check_flags."""
    g = p.add_argument_group("the clips, their captions and timesteps, given frames (loader.py)")
    g.add_argument("--stride", type=int, default=4, help="take every stride-th frame of the video (default: %(default)s)")
    g.add_argument("--hflip", action="store_true", help="flip half of the clips horizontally")
    g.add_argument("--caption-dropout", type=float, default=0.1,
                   help="fraction of captions replaced by the empty prompt, for guidance (default: %(default)s)")
    g.add_argument("--timestep-bias", type=float, default=0.0,
                   help="draw training timesteps with density ~ (t/1000)^BIAS: 0 is SD's uniform draw; > 0 favours "
                        "the noisiest steps, where motion is decided (default: %(default)s)")
    g.add_argument("--given-frames", type=int, default=0, metavar="K",
                   help="also train image-to-video and continuation: a sample's first 1 to K frames (uniform) stay "
                        "clean, at timestep 0, out of the loss (default: %(default)s, text-to-video only)")
    g.add_argument("--given-probability", type=float, default=0.5, metavar="P",
                   help="with --given-frames: the share of samples given frames (default: %(default)s)")
    g.add_argument("--cache-latents", action="store_true",
                   help="encode every video once up front (one fixed clip per video, to --out/latent-cache) instead of at every step")
    g.add_argument("--num-workers", type=int, help="processes reading clips ahead of the loop, per process; 0: the loop "
                                                  "reads them (default: on a GPU its CPU cores less one, up to 16; CPU: 0)")


def check_flags(args, frames):
    """train.py's flags of its input (the clips, their captions, given frames and timesteps, the workers that read
    them), checked before any model loads; `frames`: the clips' frame count, resolved."""
    if args.num_workers is not None and args.num_workers < 0:
        raise ValueError(f"--num-workers must be at least 0, got {args.num_workers}")
    if not args.timestep_bias >= 0:
        raise ValueError(f"--timestep-bias must be >= 0, got {args.timestep_bias}")
    if args.given_frames and not 0 < args.given_frames < frames:
        raise ValueError(f"--given-frames must leave frames to predict: 1 to {frames - 1} of {frames}, got "
                         f"{args.given_frames}")
    if args.given_frames and args.stage == "sr":
        raise ValueError("--given-frames trains image-to-video and continuation, not the upscaler: drop it")
    if not 0 <= args.given_probability <= 1:
        raise ValueError(f"--given-probability must be in [0, 1], got {args.given_probability}")
    if not 0 <= args.caption_dropout <= 1:
        raise ValueError(f"--caption-dropout must be in [0, 1], got {args.caption_dropout}")
    if args.video is not None and not os.path.isfile(args.video):
        raise ValueError(f"--video {args.video} does not exist")


def make_dataset(args, rank):
    """The samples of train.py's flags `args` (checked) for process `rank`, found to have at least one
    readable video (data.Dataset.check_readable)."""
    if args.data == "shapes":  # sr: scenes of the low-res size, drawn at the training size (their exact truth)
        size = args.height // simda.UPSCALE if args.stage == "sr" else args.height
        return data.ShapesDataset(args.frames, size, args.seed, args.caption_dropout, render=args.height)
    # one-shot: always the same clip, from frame 0, which is what sample.py --edit inverts
    items = [(args.video, args.prompt)] if args.video else data.find_videos(args.data)
    dataset = data.Dataset(items, args.frames, args.stride, args.height, args.width, args.seed, args.caption_dropout,
                           args.hflip, random_start=args.video is None, rank=rank)
    dataset.check_readable()
    return dataset


def cpu_count():
    """The CPU cores this process may use, shared by the processes of this machine (torchrun's local ranks)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def default_workers(device):
    """--num-workers' default: on an accelerator this process's cores less one for the loop (1 to 16);
    on the CPU 0, since the step itself keeps every core busy."""
    return 0 if device.type == "cpu" else max(1, min(16, cpu_count() - 1))


def start_worker(worker_id):
    """A worker's copy of the dataset queues its failures for the training process to report."""
    torch.utils.data.get_worker_info().dataset.dataset.quiet = True


class Steps(torch.utils.data.Dataset):
    """steps[gs]: the samples gs of one step, the videos that failed while reading them, and the
    seconds it took."""

    def __init__(self, dataset, cache=None):
        self.dataset, self.cache = dataset, cache

    def __getitem__(self, gs):
        start, error, batch = time.perf_counter(), None, []
        try:
            batch = [self.dataset.sample(g, self.cache) for g in gs]
        except ValueError as e:  # no usable video left: the training process raises it, as one line
            error = str(e)
        reports, self.dataset.reports = self.dataset.reports, []
        return dict(gs=gs, batch=batch, reports=reports, error=error, seconds=time.perf_counter() - start)


class Feed:
    """This rank's samples of steps `first` to `steps` - 1, read by `workers` processes (0: here; None:
    default_workers). With a `cache` of latents, the loop reads them itself."""

    def __init__(self, dataset, batch_size, rank, world, first, steps, workers, device, cache=None):
        self.default = workers is None and cache is None
        workers = 0 if cache is not None else default_workers(device) if workers is None else workers
        self.dataset, self.device, self.workers, self.cached = dataset, device, workers, cache is not None
        indices = [[step * batch_size + j for j in range(rank, batch_size, world)] for step in range(first, steps)]
        source = Steps(dataset, cache)
        if workers:
            gc.collect()  # a worker must not inherit, then free, a decoder whose threads it does not have
            self.items = iter(torch.utils.data.DataLoader(
                source, sampler=indices, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                worker_init_fn=start_worker))
        else:
            self.items = (source[gs] for gs in indices)
        self.start, self.waited, self.read, self.steps = time.perf_counter(), 0.0, 0.0, 0

    def next(self):
        """(gs, [(clip, caption)]) of the next step, the clips (uint8 levels: `pixels`) on the run's device."""
        start = time.perf_counter()
        item = next(self.items)
        if self.steps:  # the first step waits whatever the workers: from then on, the loop should not
            self.waited += time.perf_counter() - start
        else:
            self.start = time.perf_counter()
        self.read, self.steps = self.read + item["seconds"], self.steps + 1
        for idx, reason, permanent in item["reports"]:
            self.dataset.failed(idx, reason, permanent)
        if item["error"]:
            raise ValueError(item["error"])
        batch = [(to_device(clip, self.device) if torch.is_tensor(clip) else clip, caption)
                 for clip, caption in item["batch"]]
        return item["gs"], batch

    def describe(self):
        """The run's first lines say where its input comes from."""
        where = "cached latents" if self.cached else f"{self.workers} worker process(es)" if self.workers else \
            "read by the training loop"
        return f"input: {where}" + (f" (--num-workers' default on {self.device.type} with {cpu_count()} CPU cores)"
                                    if self.default else "")

    def note(self):
        """The progress line's: the videos skipped so far and the share of the time spent waiting for data."""
        skipped = f"skipped {len(self.dataset.bad)}  " if self.dataset.bad else ""
        return f"{skipped}data wait {self.wait_share():.0%}"

    def wait_share(self):
        """The share of the time since the first step's samples came that the loop waited for data."""
        return self.waited / max(time.perf_counter() - self.start, 1e-9)

    def close(self, world=1):
        """End the workers; the run's summary: the videos skipped (gathered from the `world` ranks, a
        collective) and the waits for data."""
        self.items = None
        bad = [self.dataset.bad]
        if world > 1:
            bad = [None] * world
            torch.distributed.all_gather_object(bad, self.dataset.bad)
        parts = [self.waits()]
        if isinstance(self.dataset, data.Dataset):
            skipped = f"{len(set().union(*bad))} of {len(self.dataset)} videos skipped (unreadable or too short)"
            if self.dataset.left_out:
                skipped += f", {self.dataset.left_out} more left out when listing them (no caption, or cut off)"
            parts.insert(0, skipped)
        return "; ".join(parts)

    def waits(self):
        """How long the loop waited for data and, if that was long, which --num-workers would keep it fed."""
        share = self.wait_share()
        text = f"the loop waited for data {share:.0%} of the time"
        if share < 0.1 or self.steps < 2:
            return text
        read = self.read / self.steps  # one process's seconds for a step's samples
        step = max(time.perf_counter() - self.start - self.waited, 1e-9) / self.steps
        needed = math.ceil(read / step)
        if needed <= self.workers:
            return text + f" (input-bound, though {self.workers} workers should keep up: are the CPU cores busy?)"
        text += (f" (input-bound: one process reads a step's clips in {read:.3g} s, a step takes {step:.3g} s; "
                 f"--num-workers {needed} would keep up, this run had {self.workers}")
        if needed > cpu_count():
            text += f", but that is more than this process's {cpu_count()} CPU cores: try --cache-latents"
        return text + ")"


@torch.no_grad()
def cache_latents(vae, dataset, seed, rank, world, device, out):
    """train.py --cache-latents: the (mean, logvar) of one clip per video, encoded once by the frozen VAE, as a
    LatentCache. Each rank encodes its share and writes each video's to `out`/latent-cache as it goes; the
    ranks then swap only which videos they cached, and every rank reads any video's moments from the disk when
    a step takes it: no process holds the whole cache (about 50 GB at 100k videos of 16x256x256)."""
    folder = os.path.join(out, "latent-cache")
    os.makedirs(folder, exist_ok=True)
    cached = []
    for idx in range(rank, len(dataset), world):
        clip = dataset.read(idx, random.Random(data.sample_seed(seed, "cache", idx))) \
            if idx not in dataset.unusable else None
        if clip is not None:
            mean, logvar = vae.encode_video(pixels([(clip, "")], device))
            save_safetensors({"mean": mean[0].float(), "logvar": logvar[0].float()}, LatentCache.path(folder, idx))
            cached.append(idx)
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, (cached, dataset.bad))  # video indices: small
        cached = [idx for part, _ in parts for idx in part]
        for _, bad in parts:
            dataset.bad |= bad
    if not cached:
        raise ValueError(f"none of the {len(dataset)} videos could be encoded (see the warnings above)")
    return LatentCache(folder, cached)


class LatentCache:
    """{video index: (mean, logvar)} read from cache_latents' files on demand (each [4, F, h, w], float32)."""

    def __init__(self, folder, indices):
        self.folder, self.indices = folder, set(indices)

    @staticmethod
    def path(folder, idx):
        return os.path.join(folder, f"{idx}.safetensors")

    def __contains__(self, idx):
        return idx in self.indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, idx):
        moments = load_file(self.path(self.folder, idx))
        return moments["mean"], moments["logvar"]
