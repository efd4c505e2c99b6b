"""Speed and memory of the SimDA UNet, with diffusers as the peer where it is installed.

    python bench.py                      # SD-1.5 size, 16 frames of 32x32 latents (16x256x256 video)
    python bench.py --tiny --repeats 1   # a quick smoke run on the tiny config
    python bench.py --upscale            # the video upscaler: 16 frames, 256x256 -> 1024x1024

Each measurement runs in a fresh child process, so that its peak memory (max RSS on CPU, peak
allocated on CUDA) is its own. Weights are random (the same seed for ours and the peer's copy);
the speed of a forward pass does not depend on the values.
Rows:
  sd_forward         our SD UNet, frame by frame (no SimDA), forward
  diffusers_forward  diffusers' UNet2DConditionModel with the same weights, forward
  simda_forward      the SimDA video UNet (adapters + latent-shift attention), forward
  simda_train        one adapter-only training step (forward + backward), gradient checkpointing on
  animatediff_train  the same step for diffusers' AnimateDiff (UNetMotionModel + MotionAdapter,
                     only the motion modules trainable), gradient checkpointing on
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

import runtime
import unet as unet_module
from adapters import SimDAConfig, freeze_for_training
from checkpoint import UNET_PREFIX
from video import frames_to_batch

CASES = ["sd_forward", "diffusers_forward", "simda_forward", "simda_train", "animatediff_train"]


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


def run_case(case, args):
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = unet_module.UNetConfig.tiny() if args.tiny else unet_module.UNetConfig()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    h = w = args.size // 8
    b = args.batch_size if case.endswith("train") else 1
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
        from diffusers import MotionAdapter, UNetMotionModel
        motion_adapter = MotionAdapter(block_out_channels=[config.model_channels * m for m in config.channel_mult],
                                       motion_layers_per_block=config.num_res_blocks, motion_norm_num_groups=32,
                                       motion_num_attention_heads=config.num_heads, motion_max_seq_length=32)
        model = UNetMotionModel.from_unet2d(peer_of(model), motion_adapter).to(device, dtype)
        model.freeze_unet2d_params()
        model.enable_gradient_checkpointing()
        model.train()
        context_per_frame = context.repeat_interleave(args.frames, 0)  # AnimateDiff wants [B*F, 77, D]
        loss = lambda: model(x, t, encoder_hidden_states=context_per_frame).sample.float().square().mean()  # noqa: E731
    elif case == "simda_train":
        model = model.to(device, dtype)
        freeze_for_training(model)
        model.gradient_checkpointing = True
        model.train()
        loss = lambda: model(x, t, context).float().square().mean()  # noqa: E731
    else:
        model = model.to(device, dtype)
        step = lambda: model(x, t, context)  # noqa: E731

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if case.endswith("train") else 0
    if case.endswith("train"):  # a whole training step: forward, backward, AdamW update
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def train_step():
            loss().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step = train_step
    if case.endswith("forward"):
        model.eval()
        with torch.inference_mode():
            seconds = timed(step, args.repeats, device)
    else:
        seconds = timed(step, args.repeats, device)
    return dict(case=case, seconds=seconds, peak_gb=peak_memory_gb(device), trainable=trainable, batch=b,
                params=sum(p.numel() for p in model.parameters()))


def bench_upscale(args):
    """Time and peak memory of the video upscaler (SimDA on SD's x4 upscaler, random weights): one
    `upscale` of `--frames` frames of `--size` pixels to 4x, `--sr-steps` DDIM steps with guidance,
    the UNet's ResBlocks on `--frame-chunk` frames at a time, the VAE decoding 2 frames at a time."""
    import clip_text
    import ddim
    import simda
    import vae as vae_module
    from checkpoint import X4
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.tiny:
        text = clip_text.CLIPTextConfig(width=128, layers=2, heads=2, hidden_act="gelu")
        configs = (text, vae_module.VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1),
                   unet_module.UNetConfig(in_channels=7, model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1,
                                          attention_levels=(1, 2), use_linear_in_transformer=True, context_dim=128,
                                          num_classes=1000, disable_self_attentions=(1,)))
    else:
        configs = (clip_text.CLIPTextConfig.sd2(), vae_module.VAEConfig.x4_upscaler(), unet_module.UNetConfig.x4_upscaler())
    torch.manual_seed(0)
    with torch.device(device):
        models = [clip_text.CLIPTextEncoder(configs[0]), vae_module.AutoencoderKL(configs[1]),
                  unet_module.UNet(configs[2], SimDAConfig())]
    models = [m.to(dtype).eval().requires_grad_(False) for m in models]
    if dtype == torch.float16:
        models[1].float()  # as load_upscaler keeps it
    pipe = simda.Pipeline(clip_text.Tokenizer(pad_id=X4.pad_id), *models, X4.name, "v", "bench", X4.latent_scale,
                          ddim.make_alphas_cumprod(*X4.betas))
    pipe.vae.chunk_size = 2
    pipe.unet.frame_chunk = args.frame_chunk
    low_res = torch.rand(1, 3, args.frames, args.size, args.size, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    phases, decode = {}, pipe.decode_pixels

    def timed_decode(latents):  # the text encoder and the UNet's steps come before, the VAE decode after
        sync()
        phases["text + UNet"] = (time.perf_counter() - start, peak_memory_gb(device))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        begin = time.perf_counter()
        out = decode(latents)
        sync()
        phases["VAE decode"] = (time.perf_counter() - begin, peak_memory_gb(device))
        return out
    pipe.decode_pixels = timed_decode
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = pipe.upscale(low_res, ["a dog surfing"], steps=args.sr_steps, progress=False)
    sync()
    seconds = time.perf_counter() - start
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"machine: {where}; torch {torch.__version__}; {args.dtype}; {'tiny' if args.tiny else 'full-size'} video "
          f"upscaler; {args.frames} frames {args.size}x{args.size} -> {tuple(out.shape[-2:])}; {args.sr_steps} steps, "
          f"guidance 9; frame chunk {args.frame_chunk or 'off'}")
    what = "allocated on the GPU" if device.type == "cuda" else "process max RSS, so far"
    for phase, (spent, peak) in phases.items():
        print(f"{phase}: {spent * 1000:.4g} ms, peak memory {peak:.3g} GB ({what})")
    print(f"total {seconds * 1000:.4g} ms, {seconds / args.frames * 1000:.4g} ms per output frame")


# ---------------------------------------------------------------------------- end to end, alternating in one process

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


def report(times, peaks, reference):
    """Median (and the spread: min..max) in ms, three significant digits, and the ratio to `reference`."""
    median = {name: statistics.median(t) for name, t in times.items()}

    def ms(seconds):  # at least three significant digits, never in e-notation
        return f"{1000 * seconds:.4g}" if seconds < 1 else f"{1000 * seconds:.0f}"
    print(f"{'contender':<34}{'median ms':>12}{'min..max ms':>22}{'peak GB':>9}{'/ ' + reference:>24}")
    for name, t in times.items():
        spread = f"{ms(min(t))}..{ms(max(t))}"
        peak = f"{peaks[name]:.3g}" if name in peaks else "n/a"
        print(f"{name:<34}{ms(median[name]):>12}{spread:>22}{peak:>9}{median[name] / median[reference]:>24.3f}")
    return median


def random_models(tiny, device, dtype, simda=True):
    """(text encoder, VAE, UNet) of ours with random weights: SD-1.5 size, or tiny."""
    import clip_text
    import vae as vae_module
    configs = (clip_text.CLIPTextConfig.tiny(), vae_module.VAEConfig.tiny(), unet_module.UNetConfig.tiny()) if tiny \
        else (clip_text.CLIPTextConfig(), vae_module.VAEConfig(), unet_module.UNetConfig())
    torch.manual_seed(0)
    with torch.device(device):
        models = (clip_text.CLIPTextEncoder(configs[0]), vae_module.AutoencoderKL(configs[1]),
                  unet_module.UNet(configs[2], SimDAConfig() if simda else None))
    return [m.to(dtype).eval().requires_grad_(False) for m in models]


def peer_pipelines(text, vae, unet, device, dtype):
    """diffusers' AnimateDiffPipeline (our UNet's weights, plus a MotionAdapter of SD-1.5's shape) and
    StableDiffusionPipeline (the same SD, frame by frame), random weights of our models' sizes."""
    from diffusers import AnimateDiffPipeline, AutoencoderKL, MotionAdapter, StableDiffusionPipeline, UNetMotionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    import clip_text
    tokenizer = CLIPTokenizer(os.path.join(clip_text.VOCAB_DIR, "vocab.json"), os.path.join(clip_text.VOCAB_DIR, "merges.txt"),
                              model_max_length=77)
    peer_text = CLIPTextModel(transformers_clip_config(text.config)).to(device, dtype).eval()
    peer_vae = AutoencoderKL(**diffusers_vae_config(vae.config)).to(device, dtype).eval()
    config = unet.config
    sd_unet = peer_unet(config, {UNET_PREFIX + k: v for k, v in unet.state_dict().items() if "adapter" not in k})
    motion = MotionAdapter(block_out_channels=[config.model_channels * m for m in config.channel_mult],
                           motion_layers_per_block=config.num_res_blocks, motion_norm_num_groups=32,
                           motion_num_attention_heads=config.num_heads, motion_max_seq_length=32)
    motion_unet = UNetMotionModel.from_unet2d(sd_unet, motion)
    animatediff = AnimateDiffPipeline(peer_vae, peer_text, tokenizer, motion_unet.to(device, dtype).eval(),
                                      motion.to(device, dtype), sd_ddim_scheduler())
    per_frame = StableDiffusionPipeline(peer_vae, peer_text, tokenizer, sd_unet.to(device, dtype).eval(),
                                        sd_ddim_scheduler(), safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)
    for pipe in (animatediff, per_frame):
        pipe.set_progress_bar_config(disable=True)
    return animatediff, per_frame


def bench_sampling(args, device, dtype):
    """One video from a prompt: text encoding, `--steps` DDIM steps with guidance 7.5, VAE decode; ours
    (SimDA) vs AnimateDiff vs SD frame by frame (its batch of --frames images: the cost floor)."""
    import clip_text
    import simda
    text, vae, unet = random_models(args.tiny, device, dtype)
    ours = simda.Pipeline(clip_text.Tokenizer(), text, vae, torch.compile(unet) if args.compile else unet)
    prompt, steps, f, size = "a dog surfing a wave", args.steps, args.frames, args.size
    calls = {"SimDA (ours)" + (", compiled" if args.compile else ""):
             lambda: ours([prompt], f, size, size, steps, 7.5, progress=False)}
    if args.vs_float32 and dtype != torch.float32:  # what `--dtype auto` gains over float32, in the same run
        import copy
        full = simda.Pipeline(ours.tokenizer, *(copy.deepcopy(m).float() for m in (text, vae, unet)))
        calls["SimDA (ours), float32"] = lambda: full([prompt], f, size, size, steps, 7.5, progress=False)
    if device.type == "cpu" and dtype != torch.float32:
        ours.vae.float()  # as simda.load_pipeline keeps it on the CPU
    try:
        if not args.no_peers:
            animatediff, per_frame = peer_pipelines(text, vae, unet, device, dtype)
            calls["AnimateDiff (diffusers)"] = lambda: animatediff(prompt, num_frames=f, height=size, width=size,
                                                                   num_inference_steps=steps, output_type="np")
            calls["SD frame by frame (diffusers)"] = lambda: per_frame(prompt, num_images_per_prompt=f, height=size,
                                                                       width=size, num_inference_steps=steps,
                                                                       output_type="np")
    except ImportError:
        print("diffusers is not installed: timing ours alone", file=sys.stderr)
    print(f"machine: {machine(device, dtype)}; {'tiny' if args.tiny else 'SD-1.5-sized'} models, random weights; one "
          f"video of {f} frames at {size}x{size}, {steps} DDIM steps, guidance 7.5; median of {args.repeats}, "
          f"alternating")
    times, peaks = alternate(calls, args.repeats, device)
    median = report(times, peaks, next(iter(calls)))
    first = next(iter(calls))
    for peer, target in (("AnimateDiff (diffusers)", 0.7), ("SD frame by frame (diffusers)", 1.15)):
        if peer in median:
            print(f"ours / {peer}: {median[first] / median[peer]:.3f} (target <= {target})")


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=16, help="video frames (default: 16)")
    parser.add_argument("--size", type=int, default=256, help="video height and width in pixels (default: 256)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats after one warm-up; the best counts (default: 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if present, else cpu")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float16 on cuda, float32 on cpu)")
    parser.add_argument("--batch-size", type=int, default=1, help="videos per training step (default: 1)")
    parser.add_argument("--tiny", action="store_true", help="the tiny UNet config instead of SD-1.5 (a smoke run)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {CASES}")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--upscale", action="store_true", help="time the video upscaler instead (--frames, --size: "
                                                               "the low-res input)")
    parser.add_argument("--sr-steps", type=int, default=75, help="--upscale: DDIM steps (default: %(default)s)")
    parser.add_argument("--sampling", action="store_true", help="end to end: one video from a prompt, ours vs "
                        "AnimateDiff vs SD frame by frame, alternating in one process (--steps, --repeats)")
    parser.add_argument("--forward", action="store_true", help="the UNet forward vs diffusers', alternating in one "
                        "process, in each of --dtypes, with FLOP utilisation")
    parser.add_argument("--steps", type=int, default=50, help="--sampling: DDIM steps (default: %(default)s)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="--forward: dtypes (default: %(default)s)")
    parser.add_argument("--compile", action="store_true", help="--sampling: torch.compile our UNet")
    parser.add_argument("--vs-float32", action="store_true", help="--sampling: also time ours in float32")
    parser.add_argument("--no-peers", action="store_true", help="--sampling: ours only (no diffusers pipelines)")
    parser.add_argument("--frame-chunk", type=int, default=0, help="--upscale: ResBlocks on this many frames at a "
                                                                   "time, 0: all (default: %(default)s)")
    args = parser.parse_args()
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    if args.upscale:
        return bench_upscale(args)
    if args.sampling or args.forward:
        torch.set_grad_enabled(False)
        device = torch.device(args.device)
        return bench_sampling(args, device, getattr(torch, args.dtype)) if args.sampling else bench_forward(args, device)
    if args.size % 64:
        parser.error(f"--size must be a multiple of 64 (8 for the VAE times 8 for the UNet's levels), got {args.size}")
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return

    try:
        import diffusers  # noqa: F401
        peer = True
    except ImportError:
        peer = False
    cases = [c for c in args.cases.split(",") if peer or c not in ("diffusers_forward", "animatediff_train")]
    results = {}
    for case in cases:
        print(f"running {case} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--case", case, "--frames", str(args.frames), "--size", str(args.size),
               "--repeats", str(args.repeats), "--device", args.device, "--dtype", args.dtype,
               "--batch-size", str(args.batch_size)] + (["--tiny"] if args.tiny else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{case} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        results[case] = json.loads(out.stdout.strip().splitlines()[-1])

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"\nmachine: {device}; torch {torch.__version__}; {args.dtype}; {'tiny' if args.tiny else 'SD-1.5'} UNet; "
          f"{args.frames} frames x {args.size}x{args.size}; best of {args.repeats}")
    print(f"{'case':<20}{'ms':>10}{'videos/s':>10}{'peak GB':>10}{'trainable':>14}")
    for r in results.values():
        print(f"{r['case']:<20}{1000 * r['seconds']:>10.{4 if r['seconds'] < 1 else 0}f}{r['batch'] / r['seconds']:>10.4g}{r['peak_gb']:>10.3g}"
              f"{r['trainable']:>14,}")

    def ratio(a, b, key, target):
        if a in results and b in results:
            value = results[a][key] / results[b][key]
            print(f"{a} / {b} ({key}): {value:.3f}  (target <= {target})")
    print()
    ratio("sd_forward", "diffusers_forward", "seconds", 1.0)
    ratio("simda_forward", "sd_forward", "seconds", 1.3)
    ratio("simda_train", "animatediff_train", "seconds", round(1 / 1.5, 3))  # throughput >= 1.5x AnimateDiff's
    ratio("simda_train", "animatediff_train", "peak_gb", 0.8)
    if "simda_train" in results:
        print(f"simda_train peak memory: {results['simda_train']['peak_gb']:.3g} GB at batch {args.batch_size} "
              f"(target <= 4 at batch 1, 16x256x256)")


if __name__ == "__main__":
    main()
