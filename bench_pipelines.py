"""Benchmarks of whole pipelines: one video from a prompt, ours (SimDA) against diffusers'
AnimateDiffPipeline and StableDiffusionPipeline frame by frame (the cost floor), alternating in one
process (`bench.py --sampling`); and the video upscaler's time and memory per phase (`bench.py
--upscale`). Random weights at SD-1.5 (or the x4 upscaler's) size, or tiny.
"""
import copy
import os
import platform
import sys
import time

import torch

import clip_text
import ddim
import simda
import unet as unet_module
import vae as vae_module
from adapters import SimDAConfig
from bench_unet import (alternate, diffusers_vae_config, machine, ms, peak_memory_gb, peer_unet, report,
                        sd_ddim_scheduler, sd_dpm_scheduler, transformers_clip_config)
from checkpoint import UNET_PREFIX, X4


def random_models(tiny, device, dtype, simda=True):
    """(text encoder, VAE, UNet) of ours with random weights: SD-1.5 size, or tiny."""
    configs = (clip_text.CLIPTextConfig.tiny(), vae_module.VAEConfig.tiny(), unet_module.UNetConfig.tiny()) if tiny \
        else (clip_text.CLIPTextConfig(), vae_module.VAEConfig(), unet_module.UNetConfig())
    torch.manual_seed(0)
    with torch.device(device):
        models = (clip_text.CLIPTextEncoder(configs[0]), vae_module.AutoencoderKL(configs[1]),
                  unet_module.UNet(configs[2], SimDAConfig() if simda else None))
    return [m.to(dtype).eval().requires_grad_(False) for m in models]


def peer_pipelines(text, vae, unet, device, dtype, sampler="ddim"):
    """diffusers' AnimateDiffPipeline (our UNet's weights, plus a MotionAdapter of SD-1.5's shape; DDIM, its
    default) and StableDiffusionPipeline (the same SD, frame by frame, with `sampler`: DDIM or
    DPMSolverMultistepScheduler), random weights of our models' sizes."""
    from diffusers import AnimateDiffPipeline, AutoencoderKL, MotionAdapter, StableDiffusionPipeline, UNetMotionModel
    from transformers import CLIPTextModel, CLIPTokenizer
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
    scheduler = sd_dpm_scheduler() if sampler == "dpm++" else sd_ddim_scheduler()
    per_frame = StableDiffusionPipeline(peer_vae, peer_text, tokenizer, sd_unet.to(device, dtype).eval(),
                                        scheduler, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)
    for pipe in (animatediff, per_frame):
        pipe.set_progress_bar_config(disable=True)
    return animatediff, per_frame


def sampling_calls(args, device, dtype):
    """{contender: a call that makes one video}: ours (SimDA) with --sampler at --steps (default: SD's
    default, simda.SD_SAMPLING), and with --with-ddim50 also at 50 DDIM steps; AnimateDiff at --peer-steps
    (its default 25 DDIM steps) and with --with-ddim50 at 50; SD frame by frame (its batch of --frames
    images: the cost floor) at ours' steps with the same sampler."""
    text, vae, unet = random_models(args.tiny, device, dtype)
    ours = simda.Pipeline(clip_text.Tokenizer(), text, vae, torch.compile(unet) if args.compile else unet)
    prompt, f, size = "a dog surfing a wave", args.frames, args.size
    video = lambda pipe, sampler, steps: lambda: pipe([prompt], f, size, size, steps, 7.5, progress=False,  # noqa: E731
                                                      sampler=sampler)
    calls = {f"SimDA (ours), {args.sampler} {args.steps}" + (", compiled" if args.compile else ""):
             video(ours, args.sampler, args.steps)}
    if args.with_ddim50 and (args.sampler, args.steps) != ("ddim", 50):
        calls["SimDA (ours), ddim 50"] = video(ours, "ddim", 50)
    if args.vs_float32 and dtype != torch.float32:  # what `--dtype auto` gains over float32, in the same run
        full = simda.Pipeline(ours.tokenizer, *(copy.deepcopy(m).float() for m in (text, vae, unet)))
        calls[f"SimDA (ours), {args.sampler} {args.steps}, float32"] = video(full, args.sampler, args.steps)
    if device.type == "cpu" and dtype != torch.float32:
        ours.vae.float()  # as simda.load_pipeline keeps it on the CPU
    try:
        if not args.no_peers:
            animatediff, per_frame = peer_pipelines(text, vae, unet, device, dtype, args.sampler)
            for steps in [args.peer_steps] + ([50] if args.with_ddim50 and args.peer_steps != 50 else []):
                calls[f"AnimateDiff (diffusers), ddim {steps}"] = lambda steps=steps: animatediff(
                    prompt, num_frames=f, height=size, width=size, num_inference_steps=steps, output_type="np")
            calls[f"SD frame by frame (diffusers), {args.sampler} {args.steps}"] = lambda: per_frame(
                prompt, num_images_per_prompt=f, height=size, width=size, num_inference_steps=args.steps,
                output_type="np")
    except ImportError:
        print("diffusers is not installed: timing ours alone", file=sys.stderr)
    return calls


def bench_sampling(args, device, dtype):
    """One video from a prompt: text encoding, the sampler's steps with guidance 7.5, VAE decode; ours vs
    AnimateDiff vs SD frame by frame, alternating in one process (see `sampling_calls`)."""
    args.steps = args.steps or simda.SD_SAMPLING[1][args.sampler]
    calls = sampling_calls(args, device, dtype)
    print(f"machine: {machine(device, dtype)}; {'tiny' if args.tiny else 'SD-1.5-sized'} models, random weights; one "
          f"video of {args.frames} frames at {args.size}x{args.size}, guidance 7.5; median of {args.repeats}, "
          f"alternating")
    times, peaks = alternate(calls, args.repeats, device)
    first = next(iter(calls))
    median = report(times, peaks, first)
    for peer, target in (("AnimateDiff", 0.7), ("SD frame by frame", 1.15)):
        for name in (name for name in median if name.startswith(peer)):
            print(f"{first} / {name}: {median[first] / median[name]:.3f} (target <= {target} at equal quality)")


def bench_upscale(args):
    """Time and peak memory of the video upscaler (SimDA on SD's x4 upscaler, random weights): one
    `upscale` of `--frames` frames of `--size` pixels to 4x, `--sr-steps` DDIM steps with guidance,
    the UNet's ResBlocks on `--frame-chunk` frames at a time, the VAE decoding 2 frames at a time."""
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
        print(f"{phase}: {ms(spent)} ms, peak memory {peak:.3g} GB ({what})")
    print(f"total {ms(seconds)} ms, {ms(seconds / args.frames)} ms per output frame")
