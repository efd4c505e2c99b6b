"""Where a run executes and how it reports: the device and dtype choices of every script, the
process group of a torchrun job, and the progress lines (count, rate, ETA) of sampling, training
and evaluation."""
import ctypes
import os
import sys
import time

import torch
import torch.distributed as dist

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(name="auto"):
    """auto: CUDA if present, else Apple MPS, else the CPU. On CUDA also `fast_cuda_kernels`, and on every device
    `return_freed_memory`: every command (train, sample, evaluate) picks its device here."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        device = torch.device(next(kind for kind, ok in available.items() if ok))
    else:
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from e
        if not available.get(device.type, True):
            raise ValueError(f"--device {name}: {device.type} is not available in this torch build or on this machine")
    if device.type == "cuda":
        fast_cuda_kernels()
    return_freed_memory()
    return device


def return_freed_memory(threshold=8 * 2**20):
    """glibc (Linux) only: blocks of `threshold` bytes and more are mapped afresh and unmapped when freed, so that
    the host memory of a run is what it holds. By default glibc raises that threshold (up to 32 MiB) each time a
    mapped block is freed, and from then on serves the UNet's activations from its heap, which keeps the freed
    ones as fragments. sample.py at SD-1.5 size, 16 frames of 256x256: peak 4.17 GiB with glibc's default, 3.52
    GiB with this, for 3% more wall time (docs/benchmarks.md, "Memory"). Returns whether it was set."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: macOS, Windows, musl
        return False
    m_mmap_threshold = -3  # malloc.h's M_MMAP_THRESHOLD
    return libc.mallopt(m_mmap_threshold, threshold) == 1


def fast_cuda_kernels():
    """TF32 for float32 matmuls and convolutions (tensor cores; a 10-bit mantissa in the products, float32
    sums: what SD's float32 parts, the VAE and the timestep embedding, can take) and cudnn.benchmark (the
    fastest convolution algorithm, timed once per shape: a run's shapes are few and fixed). CUDA only: the
    CPU's float32 stays exact, and so does `--precision float32` on the CPU."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def to_device(tensor, device):
    """`tensor` on `device`. From the CPU to CUDA through pinned memory, without waiting: a copy from
    ordinary (pageable) memory first waits for every kernel queued on the GPU, a stall at every step."""
    if torch.device(device).type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def cpu_flags(path="/proc/cpuinfo"):
    """The CPU's feature flags (Linux; an empty set elsewhere)."""
    try:
        with open(path) as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def fast_cpu_bfloat16(flags=None):
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16), where bfloat16 runs the
    UNet about 3x faster than float32; on an AVX2-only CPU bfloat16 is emulated and slower."""
    if flags is None and os.environ.get("SIMDA_CPU_BFLOAT16") in ("0", "1"):  # an override: 1 yes, 0 no
        return os.environ["SIMDA_CPU_BFLOAT16"] == "1"
    return bool((cpu_flags() if flags is None else flags) & {"amx_bf16", "avx512_bf16"})


def pick_dtype(name, device):
    """The weights' dtype for sampling. auto: float16 on CUDA; bfloat16 on a CPU that runs it in
    hardware (fast_cpu_bfloat16), float32 on other CPUs (emulated half types are slow) and on MPS
    (half is fragile there). The pipeline keeps the VAE and the DDIM arithmetic in float32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and fast_cpu_bfloat16() else torch.float32
    return DTYPES[name]


def autocast_dtype(name, device):
    """The autocast dtype for training (the weights stay float32). auto: bfloat16 on CUDA where
    supported, else float16 (with a grad scaler); on the CPU bfloat16 where it runs in hardware,
    else float32."""
    if name == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if fast_cpu_bfloat16() else torch.float32
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if DTYPES[name] == torch.float16 and device.type != "cuda":
        raise ValueError(f"--precision float16 needs CUDA (it needs a grad scaler); this run is on {device.type}: "
                         "use bfloat16")
    if DTYPES[name] == torch.bfloat16 and device.type not in ("cuda", "cpu"):
        raise ValueError(f"--precision bfloat16 runs on CUDA or the CPU; this run is on {device.type}")
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
