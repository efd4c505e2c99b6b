"""Long videos at SD-1.5 size, on random weights: the peak process memory and the time of `sample.py` for each
length, each run in a process of its own (docs/benchmarks.md, "Long videos"). Windows keep the UNet's
activations at one window's, whatever the length:

    python bench_long.py --write /tmp/sd15     # a random SD-1.5 single file and random adapters (16x256x256)
    python bench_long.py --dir /tmp/sd15 --frames 16 64 --size 256 --steps 1 --sampler ddim

Run it alone on the machine (each run holds a full SD-1.5): the memory is the process's peak RSS
(resource.getrusage), which other processes do not change; the time is wall-clock, which they do.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

import clip_text
import simda
import unet as unet_module
import vae as vae_module
from adapters import SimDAConfig, is_adapter_key
from checkpoint import ldm_state_dict, save_safetensors

HERE = os.path.dirname(os.path.abspath(__file__))
# sample.py in this process, then its peak RSS (KiB on Linux) as the last line of stderr
CHILD = ("import resource, runpy, sys; sys.argv = ['sample.py'] + sys.argv[1:]\n"
         "try:\n    runpy.run_path({sample!r}, run_name='__main__')\n"
         "finally:\n    print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")


@torch.no_grad()
def write(folder, frames=16, size=256):
    """A random SD-1.5 (official single-file layout) and random SimDA adapters said to be trained at frames x size x
    size, in `folder`: (checkpoint, adapters)."""
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    text = clip_text.CLIPTextEncoder(clip_text.CLIPTextConfig())
    vae = vae_module.AutoencoderKL(vae_module.VAEConfig())
    unet = unet_module.UNet(unet_module.UNetConfig(), SimDAConfig())
    for name, p in unet.named_parameters():  # adapters off zero, so that the temporal layers mix frames
        if is_adapter_key(name):
            p.add_(0.02 * torch.randn_like(p))
    adapters = os.path.join(folder, "adapters.safetensors")
    simda.save_adapters(unet, adapters, frames=frames, height=size, width=size, fps=8, family="SD 1.x",
                        prediction="epsilon", stage="t2v")
    ckpt = os.path.join(folder, "v1-5-random.safetensors")
    state = {k: v for k, v in ldm_state_dict(text, vae, unet).items() if not is_adapter_key(k)}
    save_safetensors(state, ckpt)
    return ckpt, adapters


def run(folder, frames, size, steps, sampler, extra):
    """(peak GiB, seconds) of one sample.py run in a child process."""
    argv = ["a dog surfing", "--ckpt", os.path.join(folder, "v1-5-random.safetensors"), "--adapters",
            os.path.join(folder, "adapters.safetensors"), "--frames", str(frames), "--size", str(size), "--steps",
            str(steps), "--sampler", sampler, "--dtype", "float32", "--out", os.path.join(folder, f"out-{frames}.gif"),
            *extra]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD.format(sample=os.path.join(HERE, "sample.py")), *argv],
                          capture_output=True, text=True, cwd=HERE)
    seconds = time.perf_counter() - start
    lines = done.stderr.replace("\r", "\n").splitlines()
    peak = next((int(line.split()[1]) for line in reversed(lines) if line.startswith("PEAK_KIB")), None)
    if done.returncode or peak is None:
        raise SystemExit(f"sample.py failed ({done.returncode}):\n" + "\n".join(lines[-15:]))
    print("\n".join(line for line in lines if "windows" in line or "frames of" in line), file=sys.stderr)
    return peak / 2**20, seconds


def main(argv=None):
    p = argparse.ArgumentParser(description="Peak memory and time of long videos at SD-1.5 size (random weights).")
    p.add_argument("--write", metavar="DIR", help="write a random SD-1.5 and random adapters (16 frames) to DIR, then stop")
    p.add_argument("--dir", metavar="DIR", help="where --write put them")
    p.add_argument("--frames", type=int, nargs="+", default=[16, 64], help="lengths, one run each (default: 16 64)")
    p.add_argument("--size", type=int, default=256, help="(default: %(default)s)")
    p.add_argument("--steps", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--sampler", default="ddim", help="(default: %(default)s)")
    p.add_argument("--extra", default="", help="more sample.py flags, e.g. '--overlap 0' or '--window 64' (one pass)")
    args = p.parse_args(argv)
    if args.write:
        print(write(args.write))
        return
    if not args.dir:
        p.error("give --write DIR or --dir DIR")
    rows = []
    for frames in args.frames:
        peak, seconds = run(args.dir, frames, args.size, args.steps, args.sampler, args.extra.split())
        rows.append({"frames": frames, "peak_gib": round(peak, 2), "seconds": round(seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
    print("| frames | peak RSS (GiB) | wall time (s) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['frames']} | {r['peak_gib']} | {r['seconds']} |")


if __name__ == "__main__":
    main()
