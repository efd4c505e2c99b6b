"""The image models of the built-in demo, trained from scratch on single frames of the moving-shapes
world (shapes.py): a tiny Stable Diffusion (32x32 frames), and with --upscaler a tiny x4 upscaler
(32x32 -> 128x128). SimDA's adapters on each are train.py's job (--data shapes, with --stage sr).

    python train_image.py --out models/build          # the VAE, then the UNet
    python train.py --data shapes --ckpt models/sd-shapes.safetensors ...   # see docs/demo.md
    python train_image.py --upscaler --out models/build-sr                  # the second stage

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
   motions apart, the part of CLIP's pretraining that SimDA relies on (docs/demo.md: "What it took").
Each stage saves its result atomically under --out; a stage whose file exists is not run again.
At the end of each stage a check is printed: the tracker's scores on VAE reconstructions, and on
images sampled from the captions.

The upscaler (--upscaler) has the x4 upscaler's architecture at a small size (checkpoint.X4's family:
a 3-level VAE that downsamples by 4, a UNet that takes the latents and the 3-channel low-res frame,
with its noise level as a class label, an exact-GELU text tower) and its training: frames of the
shapes world drawn at 128x128 (the same scenes as the 32x32 world, see shapes.make_video) are the
target; the input is the frame downscaled x4 and noised to a level drawn from 0..349 on its noise
schedule; the UNet predicts v. Its check compares upscaled frames with the truth and with bicubic.
"""
import argparse
import copy
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import clip_text
import data
import ddim
import metrics
import shapes
import simda
import unet as unet_module
import vae as vae_module
from checkpoint import SD1, TEXT_ONLY_LEVELS_KEY, X4, ldm_state_dict, save_safetensors
from runtime import Progress
from video import check_shape, resample, to_frames, to_uint8


def configs(upscaler=False):
    """(VAE, text encoder, UNet) configurations of the demo model (about 11 million parameters), or of its
    upscaler (about 8.7 million): the x4 upscaler's architecture with fewer channels and one level less."""
    if upscaler:
        return (vae_module.VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1),
                clip_text.CLIPTextConfig(width=64, layers=2, heads=1, hidden_act=X4.hidden_act),
                unet_module.UNetConfig(in_channels=7, model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1,
                                       attention_levels=(1, 2), num_heads=X4.unet_heads, use_linear_in_transformer=True,
                                       upcast_attention=True, context_dim=64, num_classes=1000,
                                       disable_self_attentions=(1,)))
    return (vae_module.VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1),
            clip_text.CLIPTextConfig(width=64, layers=2, heads=1),
            unet_module.UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                                   attention_levels=(0, 1, 2), context_dim=64))


def frames(start, count, seed, size, render=None):
    """Frames start..start+count-1 of the shapes world as [count, 3, render, render] in [-1, 1] (render:
    default `size`, see shapes.make_video), and captions."""
    render = render or size
    images, captions = zip(*(shapes.sample_frame(i, seed, size, render) for i in range(start, start + count)))
    return data.resize_crop(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float(), render, render), list(captions)


def train_vae(args):
    config = configs(args.upscaler)[0]
    vae = vae_module.AutoencoderKL(config).to(args.device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    progress = Progress("vae step", args.vae_steps, redraw=False)
    for step in range(1, args.vae_steps + 1):
        x, _ = frames((step - 1) * args.vae_batch_size, args.vae_batch_size, args.seed, args.size, args.render)
        mean, logvar = vae.encode(x.to(args.device))
        recon = vae.decode(vae_module.sample(mean, logvar))
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        loss = F.l1_loss(recon, x.to(args.device)) + F.mse_loss(recon, x.to(args.device)) + args.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == args.vae_steps:
            progress.show(step, f"loss {loss.item():.4f}")
        if args.max_minutes and progress.elapsed() > 60 * args.max_minutes:
            print(f"vae: stopped at step {step} of {args.vae_steps}: --max-minutes {args.max_minutes} reached", flush=True)
            break
    vae.eval().requires_grad_(False)
    scale = rescale_latents(vae, args.seed, args.size, args.render, args.family.latent_scale)
    print(f"vae: latents rescaled by {scale:.4f} so that the latent scale {args.family.latent_scale} gives them unit variance; "
          f"{progress.elapsed():.0f} s", flush=True)
    return vae.cpu()


def finetune_decoder(args):
    """--finetune-decoder CKPT: train the VAE's decoder (and post_quant_conv) of a saved checkpoint on
    fresh frames, the encoder frozen, so the latent space, and the UNet and adapters trained on it,
    stay valid; the text encoder and UNet are saved unchanged (float16 both ways). The first demo VAE
    (1000 steps) drew faint smudges of other hues beside the shapes; this removes them (docs/demo.md), as Stability's ft-MSE decoder improved SD's without touching its encoder."""
    pipe = simda.load_pipeline(args.finetune_decoder)
    vae = pipe.vae.float().to(args.device)
    vae.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    progress = Progress("decoder step", args.decoder_steps, redraw=False)
    for step in range(1, args.decoder_steps + 1):
        x, _ = frames((step - 1) * args.vae_batch_size + 5 * 10 ** 6, args.vae_batch_size, args.seed, args.size)
        x = x.to(args.device)
        with torch.no_grad():
            z = vae_module.sample(*vae.encode(x), data.generator(args.seed, "decoder step", step))
        recon = vae.decode(z)
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.log_every == 0 or step == args.decoder_steps:
            progress.show(step, f"loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    return vae.cpu(), pipe.text_encoder, pipe.unet


@torch.no_grad()
def rescale_latents(vae, seed, size, render=None, latent_scale=SD1.latent_scale, count=512):
    """Make latent_scale * latents unit-variance by an exact reparametrisation: the posterior mean
    (quant_conv's first half) is multiplied by k, its log-variance raised by 2 log k, and
    post_quant_conv divides by k again, so decode(encode(x)) is unchanged. SD files carry no
    scale factor, so the tiny VAE adopts its family's (SD 1.x's 0.18215, the upscaler's 0.08333)."""
    x, _ = frames(10 ** 6, count, seed, size, render)  # frames the training did not see
    device = vae.quant_conv.weight.device
    std = torch.cat([vae.encode(x[i:i + 64].to(device))[0] for i in range(0, count, 64)]).std().item()
    k = 1.0 / (latent_scale * std)
    c = vae.config.latent_channels
    vae.quant_conv.weight[:c] *= k
    vae.quant_conv.bias[:c] *= k
    vae.quant_conv.bias[c:] += 2 * math.log(k)
    vae.post_quant_conv.weight /= k
    return k


@torch.no_grad()
def check_vae(vae, seed, size, render, count=96):
    """Tracker scores (colour, shape, position, stray blobs) of reconstructions of frames the training
    did not see."""
    x, captions = frames(2 * 10 ** 6, count, seed, size, render)
    recon = torch.cat([vae.decode(vae.encode(x[i:i + 32])[0]) for i in range(0, count, 32)])
    originals, recons = (to_uint8(t).permute(0, 2, 3, 1).numpy() for t in (x, recon))
    colour = shape = moved = stray = 0
    for original, image, text in zip(originals, recons, captions):
        stray += shapes.stray_blobs(image[None], shapes.parse_caption(text)[0])[0] > 0
        got, want = shapes.track(image[None])[0], shapes.track(original[None])[0][0]
        colour += bool(got) and got[0]["colour"] == want["colour"]
        shape += bool(got) and got[0]["shape"] == want["shape"]
        moved += bool(got) and np.hypot(*np.subtract(got[0]["centroid"], want["centroid"])) > 1
    print(f"vae check on {count} unseen frames: colour {colour / count:.0%}, shape {shape / count:.0%}, "
          f"centroid off by > 1 px {moved / count:.0%}, stray blob {stray / count:.0%}; "
          f"L1 {F.l1_loss(recon, x).item():.4f}", flush=True)


def train_unet(args, vae, out_file):
    """The UNet (and with --train-text-encoder the text encoder) on captioned single frames; returns
    the EMA copies of both. The upscaler's UNet also sees the frame downscaled x4 and noised to a random
    level (the class label), and predicts v on its own schedule."""
    _, text_config, unet_config = configs(args.upscaler)
    family, device = args.family, args.device
    alphas = ddim.make_alphas_cumprod(*family.betas).to(device)
    torch.manual_seed(args.seed)
    text_encoder, unet = clip_text.CLIPTextEncoder(text_config), unet_module.UNet(unet_config)
    tokenizer = clip_text.Tokenizer(pad_id=family.pad_id)
    models = torch.nn.ModuleDict({"text": text_encoder, "unet": unet}).to(device)
    vae = vae.to(device)
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
        x, captions = frames(first, args.batch_size, args.seed + 1, args.size, args.render)
        x = x.to(device)
        g = data.generator(args.seed, "unet step", step)
        captions = ["" if r < args.caption_dropout else c for r, c in zip(torch.rand(len(captions), generator=g), captions)]
        with torch.no_grad():
            latents = vae_module.sample(*vae.encode(x), g) * family.latent_scale
        latents = latents[:, :, None]  # b c h w -> b c f h w, one frame
        t = torch.randint(0, ddim.NUM_TRAIN_TIMESTEPS, (len(x),), generator=g).to(device)
        noise = torch.randn(latents.shape, generator=g).to(device)
        noisy, levels = ddim.add_noise(latents, noise, t, alphas), None
        if args.upscaler:  # x4-upscaling.yaml: the low-res frame at a noise level drawn from 0..349
            low_res = resample(x[:, :, None], 1 / simda.UPSCALE)
            levels = torch.randint(0, simda.MAX_NOISE_LEVEL, (len(x),), generator=g).to(device)
            low_noise = torch.randn(low_res.shape, generator=g).to(device)
            noisy = torch.cat([noisy, ddim.add_noise(low_res, low_noise, levels, alphas)], dim=1)
        context = text_encoder(tokenizer(captions).to(device))
        target = ddim.target(latents, noise, t, family.predictions, alphas)
        loss = F.mse_loss(unet(noisy, t, context, levels), target)
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
        if args.max_minutes and progress.elapsed() > 60 * args.max_minutes:
            print(f"unet: stopped at step {step} of {args.unet_steps}: --max-minutes {args.max_minutes} reached", flush=True)
            break
    print(f"unet: {step} steps, {progress.elapsed():.0f} s", flush=True)
    return ema["text"].cpu(), ema["unet"].cpu(), step


def save_checkpoint(vae, text_encoder, unet, path, **metadata):
    """One file in the official single-file layout of the family (SD 1.x, or the x4 upscaler's when the
    text encoder uses the exact GELU), float16 (docs/demo.md says what that costs)."""
    tensors = {k: v.half() for k, v in ldm_state_dict(text_encoder, vae, unet).items()}
    metadata[TEXT_ONLY_LEVELS_KEY] = ",".join(map(str, unet.config.disable_self_attentions))
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


@torch.no_grad()
def check_upscaler(path, seed, size, steps=20, guidance=1.0, count=48):
    """PSNR against the truth of unseen frames upscaled from their exact x4 downscale, beside bicubic's."""
    pipe = simda.load_upscaler(path)
    truth, captions = frames(3 * 10 ** 6, count, seed, size, size * simda.UPSCALE)
    truth = truth[:, :, None]  # b c h w -> b c f h w, one frame
    low_res = resample(truth, 1 / simda.UPSCALE)
    upscaled = torch.cat([pipe.upscale(low_res[i:i + 16], captions[i:i + 16], steps, guidance, seed=seed,
                                       progress=False) for i in range(0, count, 16)])
    ours, bicubic = (metrics.psnr(to_frames(v), to_frames(truth)) for v in (upscaled, resample(low_res, simda.UPSCALE)))
    print(f"upscaler check, {count} unseen frames {size}x{size} -> {size * simda.UPSCALE}x{size * simda.UPSCALE}, "
          f"{steps} DDIM steps, guidance {guidance}: PSNR {ours.mean():.2f} dB (bicubic {bicubic.mean():.2f} dB)", flush=True)


def build_parser():
    p = argparse.ArgumentParser(description="The demo's image models: train a tiny SD, or with --upscaler a tiny x4 "
                                            "upscaler (the VAE, then the UNet; the text encoder stays random unless "
                                            "asked) from scratch on frames of the shapes world.")
    p.add_argument("--upscaler", action="store_true",
                   help="train the x4 upscaler (--size -> 4 x --size) instead of the text-to-image model")
    p.add_argument("--out", default="models/build", help="folder for vae.safetensors and sd-shapes.safetensors "
                                                         "(sr-shapes.safetensors with --upscaler) (default: %(default)s)")
    p.add_argument("--size", type=int, default=shapes.SIZE,
                   help="frame size in pixels; with --upscaler the low-res size (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto: CUDA if available, else CPU; or a torch device (default: %(default)s)")
    p.add_argument("--finetune-decoder", metavar="CKPT",
                   help="instead of training: fine-tune the VAE decoder of this demo checkpoint (encoder frozen) and "
                        "write it with the decoder replaced to --out")
    p.add_argument("--decoder-steps", type=int, default=600, help="--finetune-decoder: steps (default: %(default)s)")
    p.add_argument("--decoder-lr", type=float, default=3e-4, help="--finetune-decoder: (default: %(default)s)")
    p.add_argument("--max-minutes", type=float, default=0,
                   help="end each stage (the VAE, the UNet) early after this many minutes, saving what it has; 0: no "
                        "limit (default: %(default)s)")
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
    return p


def vae_of(args, vae_path):
    """The VAE: the one already in --out (a rerun trains only the UNet), else trained now and saved there."""
    if os.path.exists(vae_path):
        print(f"vae: using {vae_path} (delete it to train the VAE again)", flush=True)
        vae = vae_module.AutoencoderKL(configs(args.upscaler)[0])
        vae.load_state_dict(load_file(vae_path))
        return vae.eval().requires_grad_(False)
    vae = train_vae(args)
    os.makedirs(args.out, exist_ok=True)
    save_safetensors(vae.state_dict(), vae_path)
    return vae


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    try:
        check_shape(1, args.size, args.size)  # the rule of every script
    except ValueError as e:
        p.error(str(e))
    if args.finetune_decoder and args.upscaler:
        p.error("--finetune-decoder takes the text-to-image demo model, not --upscaler")
    for name in ("vae_steps", "unet_steps", "batch_size", "vae_batch_size", "warmup", "save_every", "log_every",
                 "decoder_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    args.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    args.family, args.render = (X4, args.size * simda.UPSCALE) if args.upscaler else (SD1, args.size)
    torch.manual_seed(args.seed)
    name = "sr-shapes.safetensors" if args.upscaler else "sd-shapes.safetensors"
    vae_path, out_file = os.path.join(args.out, "vae.safetensors"), os.path.join(args.out, name)
    if args.finetune_decoder:
        vae, text_encoder, unet = finetune_decoder(args)
        check_vae(vae, args.seed, args.size, args.render)
        os.makedirs(args.out, exist_ok=True)
        save_checkpoint(vae, text_encoder, unet, out_file, decoder_steps=args.decoder_steps)
        print(f"wrote {out_file}", flush=True)
        return
    vae = vae_of(args, vae_path)
    check_vae(vae, args.seed, args.size, args.render)
    text_encoder, unet, steps = train_unet(args, vae, out_file)
    save_checkpoint(vae.cpu(), text_encoder, unet, out_file, step=steps)
    print(f"wrote {out_file}", flush=True)
    if args.upscaler:
        check_upscaler(out_file, args.seed, args.size)
    else:
        check_images(out_file, args.seed, args.size)


if __name__ == "__main__":
    main()
