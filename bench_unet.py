"""Benchmarks of the UNet against diffusers: the forward (`bench.py --forward`, alternating in one
process, with FLOP utilisation) and one training step, SimDA's adapters against AnimateDiff's motion
modules (`bench.py --cases ...`, each case in a child process of its own, so that its peak memory is
its own); also the diffusers peers built from our configs and weights (tests/reference.py uses them
as the oracles), and the timing tools of every benchmark (`machine`, `alternate`, `report`).

Weights are random (the same seed for ours and the peer's copy): a forward's speed does not depend on
the values. The cases:
  sd_forward         our SD UNet, frame by frame (no SimDA), forward
  diffusers_forward  diffusers' UNet2DConditionModel with the same weights, forward
  simda_forward      the SimDA video UNet (adapters + latent-shift attention), forward
  simda_train        one adapter-only training step (forward + backward, AdamW) of the model train.py builds
                     (train.build_run on a random SD-1.5: the frozen SD in --dtype, the adapters float32,
                     autocast, float16's grad scaler), gradient checkpointing on
  simda_distill      one consistency distillation step of the adapters (train.py --distill: the teacher's
                     guided pass, the target's, the student's forward + backward; distill.py) on the same UNet
  animatediff_train  the same step for diffusers' AnimateDiff (UNetMotionModel + MotionAdapter,
                     only the motion modules trainable), gradient checkpointing on
"""
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace
from unittest import mock

import torch

import checkpoint
import clip_text
import distill
import runtime
import train
import unet as unet_module
import vae as vae_module
from adapters import SimDAConfig, freeze_for_training
from checkpoint import UNET_PREFIX
from video import frames_to_batch

CASES = ["sd_forward", "diffusers_forward", "simda_forward", "simda_train", "simda_distill", "animatediff_train"]


def diffusers_unet_config(c):
    """diffusers' UNet2DConditionModel arguments for our UNetConfig. diffusers' `attention_head_dim` is
    the number of heads (per level where SD 2.x's 64-channel heads make it vary)."""
    levels = len(c.channel_mult)
    heads = [c.heads(c.model_channels * m) for m in c.channel_mult]
    return dict(
        sample_size=32, in_channels=c.in_channels, out_channels=c.out_channels,
        block_out_channels=[c.model_channels * m for m in c.channel_mult],
        layers_per_block=c.num_res_blocks, attention_head_dim=heads if c.num_head_channels != -1 else c.num_heads,
        cross_attention_dim=c.context_dim, use_linear_projection=c.use_linear_in_transformer,
        upcast_attention=c.upcast_attention, num_class_embeds=c.num_classes or None,
        only_cross_attention=[i in c.disable_self_attentions for i in range(levels)],
        down_block_types=["CrossAttnDownBlock2D" if i in c.attention_levels else "DownBlock2D" for i in range(levels)],
        up_block_types=["CrossAttnUpBlock2D" if i in c.attention_levels else "UpBlock2D" for i in reversed(range(levels))],
        norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)


def diffusers_vae_config(c):
    """diffusers' AutoencoderKL arguments for our VAEConfig."""
    n = len(c.channel_mult)
    return dict(in_channels=c.image_channels, out_channels=c.image_channels, latent_channels=c.latent_channels,
                block_out_channels=[c.base_channels * m for m in c.channel_mult], layers_per_block=c.num_res_blocks,
                norm_num_groups=32, down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)


def transformers_clip_config(c):
    """transformers' CLIPTextConfig for our CLIPTextConfig."""
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=c.vocab_size, max_position_embeddings=c.max_length, hidden_size=c.width,
                          intermediate_size=4 * c.width, num_hidden_layers=c.layers, num_attention_heads=c.heads,
                          hidden_act=c.hidden_act, layer_norm_eps=1e-5)


def sd_ddim_scheduler(prediction_type="epsilon"):
    """diffusers' DDIMScheduler as SD's scheduler configs set it ("epsilon" for SD 1.x and 2.x-base,
    "v_prediction" for SD 2.x 768-v). timestep_spacing="leading" is diffusers' default, said here so
    that the reference does not move if that default does."""
    from diffusers import DDIMScheduler
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                         prediction_type=prediction_type)


def sd_dpm_scheduler(prediction_type="epsilon", karras=False, betas=(0.00085, 0.012)):
    """diffusers' DPMSolverMultistepScheduler as it is built from SD's scheduler config (what users get
    when they swap the scheduler): DPM-Solver++ of order 2, "linspace" timesteps, a first-order last step
    to sigma 0; `karras`: Karras et al.'s sigmas; `betas`: another scaled-linear schedule (the x4 upscaler's)."""
    from diffusers import DPMSolverMultistepScheduler
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=betas[0], beta_end=betas[1], beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", timestep_spacing="linspace",
        lower_order_final=True, final_sigmas_type="zero", thresholding=False, use_karras_sigmas=karras,
        prediction_type=prediction_type)


def peer_unet(config, ldm):
    """diffusers' UNet2DConditionModel for our UNetConfig, holding the weights of an LDM state dict
    (`model.diffusion_model.*` keys) as diffusers' own converter reads them."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    arguments = diffusers_unet_config(config)
    model = UNet2DConditionModel(**arguments)
    model.load_state_dict(convert_ldm_unet_checkpoint(ldm, arguments), strict=True)
    return model.eval()


def peer_of(unet):
    """The diffusers peer holding our UNet's weights."""
    return peer_unet(unet.config, {UNET_PREFIX + k: v for k, v in unet.state_dict().items()})


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def timed(fn, repeats, device):
    """Seconds per call: one warm-up call, then the best of `repeats`."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def machine(device, dtype):
    """The card (and its driver) or the CPU, the torch version and the precision, for every printout."""
    if device.type == "cuda":
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True).stdout.split()[0]
        except (OSError, IndexError):
            driver = "unknown"
        where = f"{torch.cuda.get_device_name(device)}, driver {driver}"
    else:
        flags = runtime.cpu_flags()
        isa = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else \
            "AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "?"
        where = f"{platform.machine()} CPU ({isa}), {torch.get_num_threads()} threads"
    return f"{where}; torch {torch.__version__}; {str(dtype).removeprefix('torch.')}"


def alternate(calls, repeats, device):
    """{name: [seconds per run]}: one warm-up call each, then `repeats` rounds calling each in turn, so
    that a machine's drift (heat, other load) falls on every contender alike. On CUDA also the peak
    memory of each contender's last run."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for call in calls.values():
        call()
    times, peaks = {name: [] for name in calls}, {}
    for _ in range(repeats):
        for name, call in calls.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            start = time.perf_counter()
            call()
            sync()
            times[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30
    return times, peaks


def ms(seconds):
    """Seconds as milliseconds with at least three significant digits, never in e-notation."""
    return f"{1000 * seconds:.3g}" if seconds < 0.1 else f"{1000 * seconds:.0f}"


def report(times, peaks, reference):
    """Median (and the spread: min..max) in ms, three significant digits, and the ratio to `reference`."""
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{'contender':<34}{'median ms':>12}{'min..max ms':>22}{'peak GB':>9}{'/ ' + reference:>24}")
    for name, t in times.items():
        spread = f"{ms(min(t))}..{ms(max(t))}"
        peak = f"{peaks[name]:.3g}" if name in peaks else "n/a"
        print(f"{name:<34}{ms(median[name]):>12}{spread:>22}{peak:>9}{median[name] / median[reference]:>24.3f}")
    return median


# ---------------------------------------------------------------------------- the UNet forward, alternating

def matmul_peak(device, dtype, n=4096, repeats=3):
    """FLOP/s of an n^3 matmul in `dtype`: the machine's practical peak, measured in the same run."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    times, _ = alternate({"matmul": lambda: a @ b}, repeats, device)
    return 2 * n ** 3 / min(times["matmul"])


# dense bfloat16 peaks from the vendors' data sheets (FLOP/s), by a piece of torch.cuda.get_device_name()
CARD_BF16_PEAKS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def unet_flops(model, *inputs):
    """The FLOPs of one forward, from torch's flop counter (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(*inputs)
    return counter.get_total_flops()


def bench_forward(args, device):
    """Our UNet forward vs diffusers' UNet2DConditionModel (same weights), alternating in one process,
    in float32 and in bfloat16 (--dtypes), with the FLOP utilisation against a matmul measured here."""
    config = unet_module.UNetConfig.tiny() if args.tiny else unet_module.UNetConfig()
    g = torch.Generator().manual_seed(1)
    h = args.size // 8
    print(f"machine: {machine(device, torch.float32)}; {'tiny' if args.tiny else 'SD-1.5'} UNet forward, "
          f"{args.frames} frames of {h}x{h} latents; median of {args.repeats}, alternating")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        torch.manual_seed(0)
        ours = unet_module.UNet(config).to(device, dtype).eval()
        peer = peer_of(ours).to(device, dtype)
        x = torch.randn(1, config.in_channels, args.frames, h, h, generator=g).to(device, dtype)
        context = torch.randn(1, 77, config.context_dim, generator=g).to(device, dtype)
        t = torch.tensor([500], device=device)
        frames, per_frame = frames_to_batch(x), context.repeat_interleave(args.frames, 0)
        with torch.inference_mode():
            times, peaks = alternate({f"ours, {name}": lambda: ours(x, t, context),
                                      f"diffusers, {name}": lambda: peer(frames, t, encoder_hidden_states=per_frame)},
                                     args.repeats, device)
        print()
        median = report(times, peaks, f"diffusers, {name}")
        flops, peak = unet_flops(ours, x, t, context), matmul_peak(device, dtype)
        print(f"ours / diffusers: {median[f'ours, {name}'] / median[f'diffusers, {name}']:.3f} (target <= 0.95); "
              f"{flops / 1e9:.4g} GFLOP a forward, {flops / median[f'ours, {name}'] / 1e9:.4g} GFLOP/s = "
              f"{100 * flops / median[f'ours, {name}'] / peak:.3g}% of a 4096^3 {name} matmul's "
              f"{peak / 1e9:.4g} GFLOP/s")
        card = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        spec = next((p for key, p in CARD_BF16_PEAKS if key in card), None)
        if spec and dtype in (torch.bfloat16, torch.float16):
            print(f"MFU: {100 * flops / median[f'ours, {name}'] / spec:.3g}% of the {card}'s dense 16-bit peak "
                  f"{spec / 1e12:.0f} TFLOP/s (target >= 40%)")


# ---------------------------------------------------------------------------- cases, one child process each

TINY = (clip_text.CLIPTextConfig.tiny(), vae_module.VAEConfig.tiny(), unet_module.UNetConfig.tiny())


@contextlib.contextmanager
def random_sd(configs=None):
    """checkpoint.read_tensors hands out random tensors of an SD-1.5 single file (the official layout, each
    in the dtype the loader asks for; fake ones under FakeTensorMode) for whatever path it is given."""
    configs = configs or (clip_text.CLIPTextConfig(), vae_module.VAEConfig(), unet_module.UNetConfig())
    with torch.device("meta"):
        models = (clip_text.CLIPTextEncoder(configs[0]), vae_module.AutoencoderKL(configs[1]),
                  unet_module.UNet(configs[2]))
    layout = {k: (v.shape, v.dtype) for k, v in checkpoint.ldm_state_dict(*models).items()}

    def read_tensors(path, dtype_of=None, device="cpu"):
        out = {}
        for key, (shape, dtype) in layout.items():
            dtype = dtype if dtype_of is None else dtype_of(key)
            if dtype is not None:
                out[key] = torch.randn(shape, dtype=dtype, device=device) * 0.02
        return out
    with mock.patch.object(checkpoint, "read_tensors", read_tensors):
        yield


def build_run(folder, frames, size, batch, precision, checkpointing, device="cpu"):
    """train.build_run on the random SD (`random_sd`), shapes-world clips of frames x size x size: the run a
    user starts with these flags. The precision is CUDA's (float16 is refused on the CPU)."""
    placeholder = os.path.join(folder, "sd15-random.ckpt")  # never read: random_sd answers for it
    open(placeholder, "wb").close()
    argv = ["--data", "shapes", "--ckpt", placeholder, "--out", os.path.join(folder, "out"), "--frames", str(frames),
            "--size", str(size), "--batch-size", str(batch), "--precision", precision, "--device", device,
            "--num-workers", "0", "--steps", "2", "--sample-every", "0"]
    args = train.build_parser().parse_args(argv + (["--gradient-checkpointing"] if checkpointing else []))
    with mock.patch.object(train, "autocast_dtype", lambda name, device: runtime.DTYPES[name]), \
            contextlib.redirect_stdout(open(os.devnull, "w")):
        return train.build_run(args)


def animatediff_unet(unet, device, dtype):
    """AnimateDiff's UNetMotionModel (diffusers) on the peer of `unet`, as its training runs: motion modules of
    the UNet's widths and depth, the 2D UNet frozen, gradient checkpointing on."""
    from diffusers import MotionAdapter, UNetMotionModel
    config = unet.config
    motion_adapter = MotionAdapter(block_out_channels=[config.model_channels * m for m in config.channel_mult],
                                   motion_layers_per_block=config.num_res_blocks, motion_norm_num_groups=32,
                                   motion_num_attention_heads=config.num_heads, motion_max_seq_length=32)
    model = UNetMotionModel.from_unet2d(peer_of(unet), motion_adapter).to(device, dtype)
    model.freeze_unet2d_params()
    model.enable_gradient_checkpointing()
    return model.train()


def training_step(loss, optimizer, scaler=None):
    """A whole training step as a closure: backward of `loss()` (through the grad scaler for float16), the
    optimizer's update, the gradients cleared."""
    def step():
        if scaler:
            scaler.scale(loss()).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss().backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def run_case(case, args):
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = unet_module.UNetConfig.tiny() if args.tiny else unet_module.UNetConfig()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    h = w = args.size // 8
    b = args.batch_size if case.endswith(("train", "distill")) else 1  # the training steps' batch
    x = torch.randn(b, config.in_channels, args.frames, h, w, generator=g).to(device, dtype)
    t = torch.full((b,), 500, device=device)
    context = torch.randn(b, 77, config.context_dim, generator=g).to(device, dtype)
    simda_config = SimDAConfig() if case.startswith("simda") else None
    model = unet_module.UNet(config, simda_config)

    if case == "diffusers_forward":
        model = peer_of(model).to(device, dtype)
        frames = frames_to_batch(x)
        step = lambda: model(frames, t, encoder_hidden_states=context.repeat_interleave(args.frames, 0))  # noqa: E731
    elif case == "animatediff_train":
        model = animatediff_unet(model, device, dtype)
        context_per_frame = context.repeat_interleave(args.frames, 0)  # AnimateDiff wants [B*F, 77, D]
        loss = lambda: model(x, t, encoder_hidden_states=context_per_frame).sample.float().square().mean()  # noqa: E731
    elif case == "simda_train":  # train.py's model, precision, optimizer and scaler (train.build_run)
        with tempfile.TemporaryDirectory() as folder, random_sd(TINY if args.tiny else None):
            run = build_run(folder, args.frames, args.size, b, args.dtype, True, args.device)
        model, x = run.model, x.float()  # the latents are float32, the text the text encoder's dtype

        def loss():
            with run.autocast():
                return model(x, t, context).float().square().mean()
    elif case == "simda_distill":
        model = model.to(device, dtype)
        freeze_for_training(model)
        model.gradient_checkpointing = True
        model.train()
        # x stands for clean latents; the empty prompt's text is zeros
        pipe = SimpleNamespace(unet=model, prediction="epsilon", alphas=None,
                               text_context=lambda prompts: torch.zeros_like(context[:1]))
        loss = lambda: distiller.consistency_loss(model, x, context, list(range(b)), 0)  # noqa: E731
    else:
        model = model.to(device, dtype)
        step = lambda: model(x, t, context)  # noqa: E731

    trains = case.endswith(("train", "distill"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if trains else 0
    if trains:  # a whole training step: forward, backward, AdamW update
        optimizer = run.optimizer if case == "simda_train" else \
            torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        scaler = run.scaler if case == "simda_train" else None  # float16: train.py's grad scaler
        if case == "simda_distill":  # its target follows the optimizer's steps
            distiller = distill.Distiller(pipe, distill.Settings("random adapters"), optimizer)
        step = training_step(loss, optimizer, scaler)
    if case.endswith("forward"):
        model.eval()
        with torch.inference_mode():
            seconds = timed(step, args.repeats, device)
    else:
        seconds = timed(step, args.repeats, device)
    return dict(case=case, seconds=seconds, peak_gb=peak_memory_gb(device), trainable=trainable, batch=b,
                params=sum(p.numel() for p in model.parameters()))


def print_case(args):
    """`bench.py --case NAME`: one case in this process, its result as one JSON line."""
    print(json.dumps(run_case(args.case, args)))


def bench_cases(args):
    """Each of `args.cases` in a child process (`bench.py --case NAME`), then one table and the ratios."""
    try:
        import diffusers  # noqa: F401
        peer = True
    except ImportError:
        peer = False
    cases = [c for c in args.cases.split(",") if peer or c not in ("diffusers_forward", "animatediff_train")]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")
    results = {}
    for case in cases:
        print(f"running {case} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, script, "--case", case, "--frames", str(args.frames), "--size", str(args.size),
               "--repeats", str(args.repeats), "--device", args.device, "--dtype", args.dtype,
               "--batch-size", str(args.batch_size)] + (["--tiny"] if args.tiny else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{case} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        results[case] = json.loads(out.stdout.strip().splitlines()[-1])

    device = torch.device(args.device)
    print(f"\nmachine: {machine(device, getattr(torch, args.dtype))}; {'tiny' if args.tiny else 'SD-1.5'} UNet; "
          f"{args.frames} frames x {args.size}x{args.size}; best of {args.repeats}")
    print(f"{'case':<20}{'ms':>10}{'videos/s':>10}{'peak GB':>10}{'trainable':>14}")
    for r in results.values():
        print(f"{r['case']:<20}{ms(r['seconds']):>10}{r['batch'] / r['seconds']:>10.3g}{r['peak_gb']:>10.3g}"
              f"{r['trainable']:>14,}")

    def ratio(a, b, key, target):
        if a in results and b in results:
            print(f"{a} / {b} ({key}): {results[a][key] / results[b][key]:.3f}  (target <= {target})")
    print()
    ratio("sd_forward", "diffusers_forward", "seconds", 1.0)
    ratio("simda_forward", "sd_forward", "seconds", 1.3)
    ratio("simda_train", "animatediff_train", "seconds", round(1 / 1.5, 3))  # throughput >= 1.5x AnimateDiff's
    ratio("simda_train", "animatediff_train", "peak_gb", 0.8)
    ratio("simda_distill", "simda_train", "seconds", 2.5)  # three passes without gradient beside the student's step
    ratio("simda_distill", "simda_train", "peak_gb", 1.2)  # the memory of a normal run: one UNet, three adapter sets
    if "simda_train" in results:
        print(f"simda_train peak memory: {results['simda_train']['peak_gb']:.3g} GB at batch {args.batch_size} "
              f"(the paper: under 8 GB at batch 1, 16x256x256)")
