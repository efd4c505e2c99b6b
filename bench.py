"""Speed and memory, against the peers where they are installed: the command line of the benchmarks.

    python bench.py --forward                # the SD-1.5 UNet forward vs diffusers', FLOP utilisation
    python bench.py --cases simda_train,animatediff_train   # one training step, SimDA vs AnimateDiff
    python bench.py --sampling               # one video from a prompt: ours vs AnimateDiff vs SD per frame
    python bench.py --upscale                # the video upscaler: 16 frames, 256x256 -> 1024x1024
    python bench.py --data DIR --workers 2   # training input: clips/s of the data pipeline
    python bench.py --memory                 # a training step's CUDA peak, estimated on fake tensors, vs AnimateDiff
    python bench.py --tiny --repeats 1       # a quick smoke run of the cases on the tiny config

Each job lives in the module of its kind: bench_unet.py (the UNet and one training step),
bench_pipelines.py (whole pipelines: sampling, the upscaler), bench_data.py (decoding clips for
training), bench_memory.py (memory estimates without a GPU). Every printout names the machine, torch and the precision; times are milliseconds, the
median of several runs with their spread, contenders alternating in one process.
"""
import argparse

import torch

import bench_data
import bench_memory
import bench_pipelines
import bench_unet


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    job = p.add_argument_group("what to time (default: --cases)")
    job.add_argument("--forward", action="store_true", help="the UNet forward vs diffusers', alternating in one "
                     "process, in each of --dtypes, with FLOP utilisation")
    job.add_argument("--cases", default=",".join(bench_unet.CASES),
                     help=f"comma-separated subset of {bench_unet.CASES}, each in a child process (default: all)")
    job.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    job.add_argument("--sampling", action="store_true", help="end to end: one video from a prompt, ours vs "
                     "AnimateDiff vs SD frame by frame, alternating in one process (--steps, --repeats)")
    job.add_argument("--upscale", action="store_true", help="the video upscaler instead (--frames, --size: the "
                     "low-res input)")
    job.add_argument("--data", metavar="DIR", help="the training input pipeline on the clips in DIR ('generate': "
                     "WebVid-format clips made in a temporary folder) with --workers, beside a sequential decode")
    job.add_argument("--memory", action="store_true", help="the CUDA peak of one train.py step, estimated on fake "
                     "tensors (no GPU): ours vs AnimateDiff's trainer, at --memory-batches, in --memory-dtypes, with "
                     "and without gradient checkpointing")
    p.add_argument("--memory-batches", default="1,8", help="--memory: batch sizes (default: %(default)s)")
    p.add_argument("--memory-dtypes", default="bfloat16", help="--memory: precisions, e.g. bfloat16,float16 (the "
                                                                "same bytes; default: %(default)s)")
    p.add_argument("--old-case", action="store_true", help="--memory: also the old --cases simda_train (the whole "
                                                           "UNet float16, AdamW on float16 adapters)")
    p.add_argument("--frames", type=int, default=16, help="video frames (default: %(default)s)")
    p.add_argument("--size", type=int, default=256, help="video height and width in pixels (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats after one warm-up (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if present, else cpu")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float16 on cuda, float32 on cpu)")
    p.add_argument("--batch-size", type=int, default=1, help="--cases: videos per training step (default: %(default)s)")
    p.add_argument("--tiny", action="store_true", help="the tiny configs instead of SD-1.5's (a smoke run)")
    p.add_argument("--sampler", choices=["ddim", "dpm++"], default="dpm++", help="--sampling: ours' sampler, and the "
                   "per-frame floor's (default: %(default)s, SD's default in sample.py)")
    p.add_argument("--steps", type=int, help="--sampling: ours' steps (default: sample.py's for SD: 25 with dpm++, 50 "
                                             "with ddim)")
    p.add_argument("--peer-steps", type=int, default=25, help="--sampling: AnimateDiff's DDIM steps (default: "
                                                              "%(default)s, its pipeline's default)")
    p.add_argument("--with-ddim50", action="store_true", help="--sampling: also ours and AnimateDiff at 50 DDIM steps")
    p.add_argument("--dtypes", default="float32,bfloat16", help="--forward: dtypes (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="--sampling: torch.compile our UNet")
    p.add_argument("--vs-float32", action="store_true", help="--sampling: also time ours in float32")
    p.add_argument("--no-peers", action="store_true", help="--sampling: ours only (no diffusers pipelines)")
    p.add_argument("--sr-steps", type=int, default=75, help="--upscale: DDIM steps (default: %(default)s)")
    p.add_argument("--frame-chunk", type=int, default=0, help="--upscale: ResBlocks on this many frames at a "
                                                              "time, 0: all (default: %(default)s)")
    p.add_argument("--stride", type=int, default=4, help="--data: take every stride-th frame (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="--data: time 0, 1, ..., this many worker processes "
                                                          "(default: %(default)s)")
    p.add_argument("--clips", type=int, default=24, help="--data: clips per timed pass (default: %(default)s)")
    p.add_argument("--gop", type=int, help="--data generate: the generated clips' keyframe interval (default: x264's, "
                                           "250)")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    if args.data:
        args.data = None if args.data == "generate" else args.data
        return bench_data.run(args)
    if args.upscale:
        return bench_pipelines.bench_upscale(args)
    if args.memory:
        return bench_memory.run(args)
    if args.sampling or args.forward:
        torch.set_grad_enabled(False)
        device = torch.device(args.device)
        if args.sampling:
            return bench_pipelines.bench_sampling(args, device, getattr(torch, args.dtype))
        return bench_unet.bench_forward(args, device)
    if args.size % 64:
        parser.error(f"--size must be a multiple of 64 (8 for the VAE times 8 for the UNet's levels), got {args.size}")
    if args.case:
        return bench_unet.print_case(args)
    bench_unet.bench_cases(args)


if __name__ == "__main__":
    main()
