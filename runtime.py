"""Where a run executes and how it reports: the device and dtype choices of every script, the
process group of a torchrun job, and the progress lines (count, rate, ETA) of sampling, training
and evaluation."""
import os
import sys
import time

import torch
import torch.distributed as dist

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(name="auto"):
    """auto: CUDA if present, else Apple MPS, else the CPU."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(kind for kind, ok in available.items() if ok))
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from e
    if not available.get(device.type, True):
        raise ValueError(f"--device {name}: {device.type} is not available in this torch build or on this machine")
    return device


def pick_dtype(name, device):
    """The weights' dtype for sampling. auto: float16 on CUDA, float32 elsewhere (CPU half kernels
    are slow, MPS half is fragile)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def autocast_dtype(name, device):
    """The autocast dtype for training (the weights stay float32). auto: bfloat16 on CUDA where
    supported, else float16 (with a grad scaler); float32 off CUDA."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if DTYPES[name] != torch.float32 and device.type != "cuda":
        raise ValueError(f"--precision {name} needs CUDA; this run is on {device.type}")
    return DTYPES[name]


def setup_distributed(device_name="auto"):
    """(rank, world size, device); under torchrun (RANK and WORLD_SIZE set) also the process group,
    NCCL on CUDA (one GPU per local rank), else gloo."""
    device = pick_device(device_name)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def clock(seconds):
    """Seconds as h:mm:ss."""
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


class Progress:
    """`what done/total  [note]  rate it/s  ETA h:mm:ss`, the rate counted from `done` at creation
    (a resumed run's first step). `redraw`: one line on stderr drawn over itself at every `show`
    (a bar, ended with a newline at the last item); else a new line on stdout each time."""

    def __init__(self, what, total, done=0, redraw=True, enabled=True):
        self.what, self.total, self.done, self.redraw, self.enabled = what, total, done, redraw, enabled
        self.first, self.start = done, time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.start

    def show(self, done=None, note=""):
        self.done = self.done if done is None else done
        if not self.enabled:
            return
        rate = (self.done - self.first) / max(self.elapsed(), 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0
        line = f"{self.what} {self.done}/{self.total}  {note + '  ' if note else ''}{rate:.2f} it/s  ETA {clock(eta)}"
        if self.redraw:
            print("\r" + line, end="\n" if self.done == self.total else "", file=sys.stderr, flush=True)
        else:
            print(line, flush=True)

    def tick(self, note=""):
        self.show(self.done + 1, note)
