"""Stage 1 of the built-in demo model: a tiny Stable Diffusion trained from scratch, on the CPU, on
single frames of the moving-shapes world (shapes.py). Stage 2 (SimDA) is train.py --data shapes.

    python train_image.py --out models/build          # the VAE, then the UNet
    python train.py --data shapes --ckpt models/sd-shapes.safetensors ...   # see the README

The models are the real SD classes (vae.py, clip_text.py, unet.py) at a small size, and the result
is one safetensors file in the official single-file key layout, which simda.load_pipeline loads like
the SD-1.5 checkpoint:
1. the VAE (reconstruction L1 + MSE, and a small KL term, as LDM's autoencoder without its LPIPS and
   GAN losses). Its latents are then rescaled, exactly, so that LATENT_SCALE (SD's 0.18215) maps
   them to unit variance, as the diffusion model expects (see `rescale_latents`).
2. the UNet, with the VAE frozen: epsilon prediction at random timesteps of ddim.py's schedule,
   captions dropped 10% of the time (for guidance), and an EMA of the weights, which is what is
   saved. Each frame keeps its video's caption, motion words included.
   The CLIP text encoder keeps its seeded random initialisation unless --train-text-encoder is
   given: a random encoder mixes every word into every later state, so the text already tells the
   motions apart, the part of CLIP's pretraining that SimDA relies on (README: "What it took").
Each stage saves its result atomically under --out; a stage whose file exists is not run again.
At the end of each stage a check is printed: the tracker's scores on VAE reconstructions, and on
images sampled from the captions.
"""
import argparse
import copy
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import clip_text
import data
import ddim
import shapes
import simda
import unet as unet_module
import vae as vae_module
from checkpoint import ldm_state_dict, save_safetensors
from runtime import Progress
from vae import LATENT_SCALE
from video import check_shape, to_uint8


def configs():
    """(VAE, text encoder, UNet) configurations of the demo model: about 11 million parameters."""
    return (vae_module.VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1),
            clip_text.CLIPTextConfig(width=64, layers=2, heads=1),
            unet_module.UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                                   attention_levels=(0, 1, 2), context_dim=64))


def frames(start, count, seed, size):
    """Frames start..start+count-1 of the shapes world as [count, 3, size, size] in [-1, 1], and captions."""
    images, captions = zip(*(shapes.sample_frame(i, seed, size) for i in range(start, start + count)))
    return data.resize_crop(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float(), size, size), list(captions)


def train_vae(args):
    config = configs()[0]
    vae = vae_module.AutoencoderKL(config)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    progress = Progress("vae step", args.vae_steps, redraw=False)
    for step in range(1, args.vae_steps + 1):
        x, _ = frames((step - 1) * args.vae_batch_size, args.vae_batch_size, args.seed, args.size)
        mean, logvar = vae.encode(x)
        recon = vae.decode(vae_module.sample(mean, logvar))
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + args.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == args.vae_steps:
            progress.show(step, f"loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    scale = rescale_latents(vae, args.seed, args.size)
    print(f"vae: latents rescaled by {scale:.4f} so that LATENT_SCALE gives them unit variance; "
          f"{progress.elapsed():.0f} s", flush=True)
    return vae


@torch.no_grad()
def rescale_latents(vae, seed, size, count=512):
    """Make LATENT_SCALE * latents unit-variance by an exact reparametrisation: the posterior mean
    (quant_conv's first half) is multiplied by k, its log-variance raised by 2 log k, and
    post_quant_conv divides by k again, so decode(encode(x)) is unchanged. SD-1.x files carry no
    scale factor, so the tiny VAE adopts SD's instead."""
    x, _ = frames(10 ** 6, count, seed, size)  # frames the training did not see
    std = vae.encode(x)[0].std().item()
    k = 1.0 / (LATENT_SCALE * std)
    c = vae.config.latent_channels
    vae.quant_conv.weight[:c] *= k
    vae.quant_conv.bias[:c] *= k
    vae.quant_conv.bias[c:] += 2 * math.log(k)
    vae.post_quant_conv.weight /= k
    return k


@torch.no_grad()
def check_vae(vae, seed, size, count=96):
    """Tracker scores (colour, shape, position) of reconstructions of frames the training did not see."""
    x, captions = frames(2 * 10 ** 6, count, seed, size)
    recon = vae.decode(vae.encode(x)[0])
    originals, recons = (to_uint8(t).permute(0, 2, 3, 1).numpy() for t in (x, recon))
    colour = shape = moved = 0
    for original, image, text in zip(originals, recons, captions):
        got, want = shapes.track(image[None])[0], shapes.track(original[None])[0][0]
        colour += bool(got) and got[0]["colour"] == want["colour"]
        shape += bool(got) and got[0]["shape"] == want["shape"]
        moved += bool(got) and np.hypot(*np.subtract(got[0]["centroid"], want["centroid"])) > 1
    print(f"vae check on {count} unseen frames: colour {colour / count:.0%}, shape {shape / count:.0%}, "
          f"centroid off by > 1 px {moved / count:.0%}; L1 {F.l1_loss(recon, x).item():.4f}", flush=True)


def train_unet(args, vae, out_file):
    """The UNet (and with --train-text-encoder the text encoder) on captioned single frames; returns
    the EMA copies of both."""
    _, text_config, unet_config = configs()
    torch.manual_seed(args.seed)
    text_encoder, unet = clip_text.CLIPTextEncoder(text_config), unet_module.UNet(unet_config)
    tokenizer = clip_text.Tokenizer()
    models = torch.nn.ModuleDict({"text": text_encoder, "unet": unet})
    if not args.train_text_encoder:
        text_encoder.requires_grad_(False)
    ema = copy.deepcopy(models).requires_grad_(False)
    params = [p for p in models.parameters() if p.requires_grad]
    ema_params = [e for e, p in zip(ema.parameters(), models.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    print(f"text encoder {sum(p.numel() for p in text_encoder.parameters()):,} parameters, "
          f"UNet {sum(p.numel() for p in unet.parameters()):,}", flush=True)
    progress = Progress("unet step", args.unet_steps, redraw=False)
    for step in range(1, args.unet_steps + 1):
        first = (step - 1) * args.batch_size
        x, captions = frames(first, args.batch_size, args.seed + 1, args.size)
        g = data.generator(args.seed, "unet step", step)
        captions = ["" if r < args.caption_dropout else c for r, c in zip(torch.rand(len(captions), generator=g), captions)]
        with torch.no_grad():
            latents = vae_module.sample(*vae.encode(x), g) * LATENT_SCALE
        latents = latents[:, :, None]  # b c h w -> b c f h w, one frame
        t = torch.randint(0, ddim.NUM_TRAIN_TIMESTEPS, (len(x),), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        context = text_encoder(tokenizer(captions))
        loss = F.mse_loss(unet(ddim.add_noise(latents, noise, t), t, context), noise)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, step / args.warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for e, p in zip(ema_params, params):
                e.lerp_(p, 1 - decay)
        if step % args.log_every == 0 or step == args.unet_steps:
            progress.show(step, f"loss {loss.item():.4f}")
        if step % args.save_every == 0 and step < args.unet_steps:
            save_checkpoint(vae, ema["text"], ema["unet"], out_file, step=step)
    print(f"unet: {progress.elapsed():.0f} s", flush=True)
    return ema["text"], ema["unet"]


def save_checkpoint(vae, text_encoder, unet, path, **metadata):
    """One file in the official SD-1.x single-file layout, float16 (see the README for what that costs)."""
    tensors = {k: v.half() for k, v in ldm_state_dict(text_encoder, vae, unet).items()}
    save_safetensors(tensors, path, {k: str(v) for k, v in metadata.items()})


@torch.no_grad()
def check_images(path, seed, size, steps=20, guidance=4.0):
    """Tracker scores of one image per combination of the world, sampled from the saved checkpoint."""
    pipe = simda.load_pipeline(path)
    prompts = [shapes.caption(*c) for c in shapes.COMBINATIONS]
    images = pipe(prompts, 1, size, size, steps, guidance, seed=seed, progress=False).numpy()
    scores = shapes.summarise([shapes.score(image, text) for image, text in zip(images, prompts)])
    # the motion words: is the trail drawn behind the shape?
    trail = np.mean([shapes.direction_from_trail(image[0], colour) == direction
                     for image, (colour, _, direction) in zip(images, shapes.COMBINATIONS)])
    print(f"image check, {len(prompts)} captions, {steps} DDIM steps, guidance {guidance}: colour "
          f"{scores['colour_correct']:.0%}, shape {scores['shape_correct']:.0%}, "
          f"one object {scores['present_fraction']:.0%}, trail behind the shape {trail:.0%}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description="Stage 1 of the demo model: train a tiny SD (the VAE, then the UNet; "
                                            "the text encoder stays random unless asked) from scratch on frames of "
                                            "the shapes world.")
    p.add_argument("--out", default="models/build", help="folder for vae.safetensors and sd-shapes.safetensors "
                                                         "(default: %(default)s)")
    p.add_argument("--size", type=int, default=shapes.SIZE, help="frame size in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the initialisation (default: %(default)s)")
    p.add_argument("--vae-steps", type=int, default=1000, help="VAE optimizer steps (default: %(default)s)")
    p.add_argument("--vae-batch-size", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--vae-lr", type=float, default=1e-3, help="(default: %(default)s)")
    p.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the VAE's KL term (default: %(default)s)")
    p.add_argument("--unet-steps", type=int, default=1500, help="UNet optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="frames per UNet step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate after warmup (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps (default: %(default)s)")
    p.add_argument("--ema", type=float, default=0.998, help="EMA decay of the saved weights (default: %(default)s)")
    p.add_argument("--train-text-encoder", action="store_true",
                   help="train the text encoder with the UNet (default: keep its seeded random initialisation; see above)")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="(default: %(default)s)")
    p.add_argument("--save-every", type=int, default=250, help="save the EMA weights every N steps (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=50, help="(default: %(default)s)")
    args = p.parse_args(argv)
    try:
        check_shape(1, args.size, args.size)  # the rule of every script
    except ValueError as e:
        p.error(str(e))
    for name in ("vae_steps", "unet_steps", "batch_size", "vae_batch_size", "warmup", "save_every", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    torch.manual_seed(args.seed)
    vae_path, out_file = os.path.join(args.out, "vae.safetensors"), os.path.join(args.out, "sd-shapes.safetensors")
    if os.path.exists(vae_path):
        print(f"vae: using {vae_path} (delete it to train the VAE again)", flush=True)
        vae = vae_module.AutoencoderKL(configs()[0])
        vae.load_state_dict(load_file(vae_path))
        vae.eval().requires_grad_(False)
    else:
        vae = train_vae(args)
        os.makedirs(args.out, exist_ok=True)
        save_safetensors(vae.state_dict(), vae_path)
    check_vae(vae, args.seed, args.size)
    text_encoder, unet = train_unet(args, vae, out_file)
    save_checkpoint(vae, text_encoder, unet, out_file, step=args.unet_steps)
    print(f"wrote {out_file}", flush=True)
    check_images(out_file, args.seed, args.size)


if __name__ == "__main__":
    main()
