"""SD's x4 upscaler, at a tiny configuration, against diffusers; and SimDA's video upscaler on it.

First the pieces the shared modules hold: a UNet with a class-label (noise-level) embedding and
cross-attention-only upper levels, and DDIM on the upscaler's own noise schedule. Then the upscaler
itself (simda.load_upscaler, Pipeline.upscale): its three models and its noise augmentation against
transformers / diffusers, 4 steps of guided v-prediction upscaling against diffusers'
StableDiffusionUpscalePipeline from our single file and from a diffusers folder, the single file as a
real one holds it (DDPM buffers of the model and of its `low_scale_model`), the errors that keep the
upscaler and the text-to-image models apart, and bad inputs. Then the video upscaler (SimDA's adapters
on the upscaler's UNet): fresh adapters start as the image upscaler frame by frame, the exact temporal
receptive field of perturbed ones, frame chunking, and the count of SimDA's trainable parameters on
the full-size x4 UNet. Relative errors are printed (run with -s to see them)."""
import dataclasses
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

import adapters
import bench_unet
import clip_text
import ddim
import simda
import unet as unet_module
import vae as vae_module
from adapters import SimDAConfig
from checkpoint import (DDPM_BUFFERS, LOW_SCALE_PREFIX, UNET_PREFIX, X4, CheckpointError, ldm_state_dict,
                        save_safetensors)
from conftest import perturb_, perturb_adapters_, rel_err
from reference import diffusers_unet, diffusers_vae, save_diffusers_folder, transformers_clip
from video import batch_to_frames, frames_to_batch

pytestmark = pytest.mark.usefixtures("one_thread")  # faster on a shared machine (conftest)

# The x4 upscaler's UNet in miniature: 7 input channels (4 latents + the 3-channel low-res image), no
# attention at level 0, attn1 attending to the text at level 1 (x4-upscaling.yaml's
# disable_self_attentions), real self-attention at level 2 and in the middle, 8 heads, linear
# projections, 1000 noise levels as classes.
CONFIG = unet_module.UNetConfig(in_channels=7, model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1,
                                attention_levels=(1, 2), num_heads=8, use_linear_in_transformer=True,
                                context_dim=96, num_classes=1000, disable_self_attentions=(1,))


@pytest.fixture(scope="module")
def upscaler_unet():
    torch.manual_seed(0)
    return perturb_(unet_module.UNet(CONFIG), seed=5).eval()


def inputs(frames=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 7, frames, 8, 12, generator=g), torch.tensor([999, 37]),
            torch.randn(2, 77, CONFIG.context_dim, generator=g), torch.tensor([20, 349]))


@torch.no_grad()
def test_upscaler_unet_matches_diffusers(upscaler_unet):
    peer = diffusers_unet(upscaler_unet)
    assert peer.config.num_class_embeds == 1000 and list(peer.config.only_cross_attention) == [False, True, False]
    x, t, context, y = inputs()
    frames = x.shape[2]
    ours = upscaler_unet(x, t, context, y)
    ref = peer(frames_to_batch(x), t.repeat_interleave(frames), context.repeat_interleave(frames, 0),
               class_labels=y.repeat_interleave(frames)).sample
    err = rel_err(ours, batch_to_frames(ref, frames))
    print(f"x4-style UNet rel_err {err:.1e}")
    assert err <= 1e-4
    # the noise level matters, and the cross-attention-only level really attends to the text there
    assert rel_err(upscaler_unet(x, t, context, torch.tensor([0, 0])), ours) > 1e-3


def test_upscaler_config_is_read_from_the_weights(upscaler_unet):
    config = unet_module.config_from_state_dict(upscaler_unet.state_dict(), num_heads=8)
    assert config == CONFIG
    level1 = upscaler_unet.input_blocks[3][1].transformer_blocks[0]  # level 1's first transformer
    assert level1.attn1.to_k.weight.shape == (64, CONFIG.context_dim)


def test_class_labels_are_required_exactly_when_the_unet_has_classes(upscaler_unet, tiny_unet):
    x, t, context, y = inputs(frames=1)
    with pytest.raises(ValueError, match="1000 classes: y .* must be given"):
        upscaler_unet(x, t, context)
    with pytest.raises(ValueError, match="must be None"):
        tiny_unet(torch.randn(1, 4, 1, 8, 8), t[:1], torch.randn(1, 77, 128), y[:1])


@torch.no_grad()
def test_simda_on_the_upscaler_unet_shifts_only_where_attn1_is_self_attention(upscaler_unet):
    video = unet_module.UNet(CONFIG, simda_config=SimDAConfig())
    video.load_state_dict(upscaler_unet.state_dict(), strict=False)
    video.eval()
    blocks = {name: m for name, m in video.named_modules() if isinstance(m, unet_module.TransformerBlock)}
    cross_only = {name for name, m in blocks.items() if m.disable_self_attn}
    # level 1: input block 3, output blocks 2 and 3 (one ResBlock per level on the way down, two up)
    assert cross_only == {f"{b}.1.transformer_blocks.0" for b in ("input_blocks.3", "output_blocks.2", "output_blocks.3")}
    assert {name for name, m in blocks.items() if m.latent_shift} == blocks.keys() - cross_only
    x, t, context, y = inputs()
    plain = upscaler_unet(x, t, context, y)
    out = video(x, t, context, y)
    assert rel_err(out[:, :, 0], plain[:, :, 0]) <= 1e-5  # zero-init adapters; frame 0 has no earlier frame
    assert rel_err(out[:, :, 1:], plain[:, :, 1:]) > 1e-4  # later frames look back
    no_shift = unet_module.UNet(CONFIG, simda_config=dataclasses.replace(SimDAConfig(), latent_shift=False))
    no_shift.load_state_dict(upscaler_unet.state_dict(), strict=False)
    assert rel_err(no_shift.eval()(x, t, context, y), plain) <= 1e-5


def test_ddim_on_the_upscaler_schedule_matches_diffusers():
    from diffusers import DDIMScheduler
    ref = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    alphas = ddim.make_alphas_cumprod(0.0001, 0.02)
    assert rel_err(alphas, ref.alphas_cumprod) <= 1e-6
    assert rel_err(alphas, ddim.alphas_cumprod) > 1e-2  # not SD's schedule
    ref.set_timesteps(20)
    g = torch.Generator().manual_seed(2)
    x = x_ref = torch.randn(1, 4, 2, 8, 8, generator=g)
    ts = ddim.timesteps(20).tolist()
    assert ts == ref.timesteps.tolist()
    for i, t in enumerate(ts):
        noise = torch.randn(x.shape, generator=g)
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(t)) + 0.1 * x
        v_ref = torch.randn(x.shape, generator=torch.Generator().manual_seed(t)) + 0.1 * x_ref
        x = ddim.step(x, v, t, ts[i + 1] if i + 1 < len(ts) else -1, eta=0.5, noise=noise, prediction="v", alphas=alphas)
        x_ref = ref.step(v_ref, t, x_ref, eta=0.5, variance_noise=noise).prev_sample
        assert rel_err(x, x_ref) <= 1e-5, f"step {i} (t={t})"
    # the low-res image's noise augmentation: add_noise on the same schedule, against diffusers'
    image, noise, level = torch.rand(2, 3, 2, 8, 8) * 2 - 1, torch.randn(2, 3, 2, 8, 8), torch.tensor([20, 349])
    assert rel_err(ddim.add_noise(image, noise, level, alphas), ref.add_noise(image, noise, level)) <= 1e-6
    velocity = ddim.target(image, noise, level, "v", alphas)
    assert rel_err(velocity, ref.get_velocity(image, noise, level)) <= 1e-6


# ---------------------------------------------------------------------------- the tiny x4 upscaler

TOL = 1e-4
VOCAB = os.path.join(clip_text.VOCAB_DIR, "vocab.json")
MERGES = os.path.join(clip_text.VOCAB_DIR, "merges.txt")
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on mars, oil painting, 4k"]
NEGATIVE = "blurry, low quality"
# Low-res sides: multiples of 4, which diffusers' image processor (vae_scale_factor 4) would resize to;
# the UNet's latents are 8x12 too, 2x3 at its deepest level. The upscaled frames are 32x48.
LOW_RES = (8, 12)
# LDM's DDPM.register_schedule buffers; the noise augmentation (low_scale_model) registers the first 8
LOW_SCALE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod")


def x4_configs():
    """(text, VAE, UNet) configs of a tiny x4 upscaler: SD 2.x's text tower (exact GELU, 64-channel heads)
    128 wide; a 3-level VAE that downsamples by 4, as the upscaler's; the UNet above (CONFIG) with the
    X4 family's upcast attention and the text's 128-wide context."""
    text = dataclasses.replace(clip_text.CLIPTextConfig.sd2(), width=128, layers=2, heads=2)
    vae = vae_module.VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1)
    return text, vae, dataclasses.replace(CONFIG, upcast_attention=True, context_dim=128)


def x4_models(seed=20):
    """(text encoder, VAE, UNet) of the tiny x4 upscaler, eval mode, every parameter off its default init."""
    torch.manual_seed(seed)
    text, vae, unet = x4_configs()
    models = (clip_text.CLIPTextEncoder(text), vae_module.AutoencoderKL(vae), unet_module.UNet(unet))
    return tuple(perturb_(m, seed + i).eval() for i, m in enumerate(models))


def schedule_buffers(beta_start=0.0001, beta_end=0.02):
    """The 12 buffers LDM's DDPM.register_schedule stores (float32 [1000]), on the x4 upscaler's schedule."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, 1000, dtype=torch.float64) ** 2
    alphas = 1 - betas
    ac = torch.cumprod(alphas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    variance = betas * (1 - prev) / (1 - ac)
    buffers = dict(betas=betas, alphas_cumprod=ac, alphas_cumprod_prev=prev, sqrt_alphas_cumprod=ac.sqrt(),
                   sqrt_one_minus_alphas_cumprod=(1 - ac).sqrt(), log_one_minus_alphas_cumprod=(1 - ac).log(),
                   sqrt_recip_alphas_cumprod=(1 / ac).sqrt(), sqrt_recipm1_alphas_cumprod=(1 / ac - 1).sqrt(),
                   posterior_variance=variance, posterior_log_variance_clipped=variance.clamp(min=1e-20).log(),
                   posterior_mean_coef1=betas * prev.sqrt() / (1 - ac),
                   posterior_mean_coef2=(1 - prev) * alphas.sqrt() / (1 - ac))
    return {k: v.float() for k, v in buffers.items()}


def real_file_extras():
    """What x4-upscaler-ema.safetensors holds besides the three models: LatentUpscaleDiffusion's 12 DDPM
    buffers (top level) and the 8 of its noise augmentation (`low_scale_model.*`)."""
    buffers = schedule_buffers()
    return {**buffers, **{LOW_SCALE_PREFIX + k: buffers[k].clone() for k in LOW_SCALE_BUFFERS}}


def reference_schedulers():
    """(low_res_scheduler, scheduler) as stabilityai/stable-diffusion-x4-upscaler configures them."""
    from diffusers import DDIMScheduler, DDPMScheduler
    return (DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear"),
            DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                          prediction_type="v_prediction"))


def hf_tokenizer():
    from transformers import CLIPTokenizer
    return CLIPTokenizer(VOCAB, MERGES, pad_token="!", model_max_length=77)  # paths positional (see test_sd2)


@pytest.fixture(scope="module")
def x4():
    return x4_models()


@pytest.fixture(scope="module")
def x4_file(x4, tmp_path_factory):
    """The tiny upscaler as one single file, as a real one holds it: our converter's keys plus the buffers."""
    path = str(tmp_path_factory.mktemp("x4") / "tiny-x4-upscaler.safetensors")
    save_safetensors({**ldm_state_dict(*x4), **real_file_extras()}, path)
    return path


@pytest.fixture(scope="module")
def x4_pipe(x4_file):
    return simda.load_upscaler(x4_file)


@pytest.fixture(scope="module")
def x4_references(x4):
    """(transformers CLIPTextModel, diffusers AutoencoderKL with the upscaler's scaling factor, diffusers
    UNet2DConditionModel with num_class_embeds) holding the tiny upscaler's weights."""
    text_encoder, vae, unet = x4
    ref_vae = diffusers_vae(vae)
    ref_vae.register_to_config(scaling_factor=X4.latent_scale)
    return transformers_clip(text_encoder), ref_vae, diffusers_unet(unet)


@pytest.fixture(scope="module")
def diffusers_upscaler(x4_references):
    from diffusers import StableDiffusionUpscalePipeline
    text_encoder, vae, unet = x4_references
    low_res_scheduler, scheduler = reference_schedulers()
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=text_encoder, tokenizer=hf_tokenizer(), unet=unet,
                                          low_res_scheduler=low_res_scheduler, scheduler=scheduler,
                                          max_noise_level=simda.MAX_NOISE_LEVEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def x4_folder(x4_references, tmp_path_factory):
    """The reference models saved as the Hub lays the x4 upscaler out, with both schedulers' configs."""
    folder = tmp_path_factory.mktemp("x4-folder") / "tiny-x4-upscaler-diffusers"
    save_diffusers_folder(str(folder), *x4_references)
    low_res_scheduler, scheduler = reference_schedulers()
    scheduler.save_pretrained(str(folder / "scheduler"))
    low_res_scheduler.save_pretrained(str(folder / "low_res_scheduler"))
    return folder


def low_res_videos(b=2, frames=1, seed=3):
    return torch.rand(b, 3, frames, *LOW_RES, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def our_upscale(pipe, low_res, noise_level=20, eta=0.0, seed=0, latents=None, noise=None, steps=4, guidance=9.0):
    return pipe.upscale(low_res, PROMPTS[:low_res.shape[0]], steps=steps, guidance=guidance, noise_level=noise_level,
                        negative=NEGATIVE, eta=eta, seed=seed, latents=latents, noise=noise, progress=False)


@torch.no_grad()
def their_upscale(pipe, low_res, noise_level=20, eta=0.0, seed=0, latents=None, guidance=9.0):
    """diffusers' upscaler on frame 0 of `low_res`, its latents decoded by its VAE: [B, 3, 1, 4H, 4W]."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a [-1, 1] tensor: diffusers says it will not normalise it again
        latents = pipe(PROMPTS[:low_res.shape[0]], image=low_res[:, :, 0], num_inference_steps=4,
                       guidance_scale=guidance, noise_level=noise_level, negative_prompt=[NEGATIVE] * low_res.shape[0],
                       eta=eta, generator=torch.Generator().manual_seed(seed),
                       latents=None if latents is None else latents[:, :, 0].clone(), output_type="latent").images
    return pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample[:, :, None]


def all_tensors(pipe):
    return {f"{name}.{k}": v for name, m in (("text", pipe.text_encoder), ("vae", pipe.vae), ("unet", pipe.unet))
            for k, v in m.state_dict().items()}


# ---------------------------------------------------------------------------- 1. parity with diffusers

@torch.no_grad()
def test_x4_text_encoder_and_vae_match_the_references(x4_pipe, x4_references):
    text_ref, vae_ref, _ = x4_references
    assert (x4_pipe.family, x4_pipe.prediction, x4_pipe.is_upscaler) == (X4.name, "v", True)
    assert (x4_pipe.latent_scale, x4_pipe.tokenizer.pad_id, x4_pipe.vae.chunk_size) == (0.08333, 0, 2)
    assert x4_pipe.vae.config.downsample_factor == 4 and len(vae_ref.config.block_out_channels) == 3
    prompts = PROMPTS + [NEGATIVE, ""]
    ids = x4_pipe.tokenizer(prompts)
    hf_ids = hf_tokenizer()(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ids, hf_ids.input_ids)
    err = rel_err(x4_pipe.text_encoder(ids), text_ref(input_ids=ids).last_hidden_state)
    print(f"\nx4 text encoder vs transformers: rel_err {err:.1e}")
    assert err <= TOL

    g = torch.Generator().manual_seed(4)
    images = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    mean, logvar = x4_pipe.vae.encode(images)
    dist = vae_ref.encode(images).latent_dist
    assert mean.shape == (2, 4, 8, 12)
    errs = {"mean": rel_err(mean, dist.mean), "logvar": rel_err(logvar, dist.logvar)}
    z = torch.randn(2, 4, 1, 8, 12, generator=g)  # scaled latents, as the sampler ends with them
    pixels = x4_pipe.decode_pixels(z)
    assert pixels.shape == (2, 3, 1, 32, 48)
    errs["decode"] = rel_err(pixels[:, :, 0], vae_ref.decode(z[:, :, 0] / vae_ref.config.scaling_factor).sample)
    print("x4 VAE (3 levels, x4) vs diffusers: " + ", ".join(f"{k} rel_err {v:.1e}" for k, v in errs.items()))
    assert max(errs.values()) <= TOL


def test_x4_noise_augmentation_matches_diffusers_low_res_scheduler(x4_pipe):
    low_res_scheduler, _ = reference_schedulers()
    assert rel_err(x4_pipe.alphas, low_res_scheduler.alphas_cumprod) <= 1e-6
    g = torch.Generator().manual_seed(5)
    image, noise = low_res_videos(frames=1), torch.randn(2, 3, 1, *LOW_RES, generator=g)
    for levels in ([0, 0], [20, 20], [349, 349], [20, 349]):
        levels = torch.tensor(levels)
        ours = ddim.add_noise(image, noise, levels, x4_pipe.alphas)
        theirs = low_res_scheduler.add_noise(image[:, :, 0], noise[:, :, 0], levels)
        err = rel_err(ours[:, :, 0], theirs)
        assert err <= 1e-6, levels
    assert rel_err(ddim.add_noise(image, noise, levels), ours) > 1e-2  # SD's schedule is another one


# (noise level, eta, whether the latents and the augmentation noise are given or drawn from the seed, guidance)
CASES = [(20, 0.0, True, 9.0), (250, 0.0, True, 9.0), (20, 0.5, False, 9.0), (349, 0.0, True, 1.0)]


@pytest.mark.parametrize("noise_level, eta, given, guidance", CASES)
def test_x4_upscale_matches_diffusers(x4_pipe, diffusers_upscaler, noise_level, eta, given, guidance):
    """4 DDIM steps of v-prediction CFG at 9 with a negative prompt (and once unguided). diffusers draws
    the augmentation noise first from its generator, then the latents (unless given), then the step noise when eta > 0;
    `upscale` draws them from its seed in the same order and shapes (F = 1), so without `latents` and
    `noise` the same seed gives the same draws."""
    low_res = low_res_videos()
    seed = 9
    latents = noise = None
    if given:
        latents = torch.randn(2, 4, 1, *LOW_RES, generator=torch.Generator().manual_seed(11))
        noise = torch.randn(2, 3, *LOW_RES, generator=torch.Generator().manual_seed(seed))[:, :, None]
    ours = our_upscale(x4_pipe, low_res, noise_level, eta, seed, latents, noise, guidance=guidance)
    theirs = their_upscale(diffusers_upscaler, low_res, noise_level, eta, seed, latents, guidance)
    assert ours.shape == theirs.shape == (2, 3, 1, 32, 48) and ours.dtype == torch.float32
    err = rel_err(ours, theirs)
    print(f"\nx4 upscale vs StableDiffusionUpscalePipeline (4 steps, CFG {guidance}, noise level {noise_level}, "
          f"eta {eta}, {'given' if given else 'seeded'} latents/noise): rel_err {err:.1e}")
    assert err <= TOL
    # what was matched matters: the noise level (the UNet's class label and the augmentation) ...
    other = our_upscale(x4_pipe, low_res, 100, eta, seed, latents, noise, guidance=guidance)
    assert rel_err(other, ours) > 1e-3
    if eta:  # ... and the step noise
        assert rel_err(our_upscale(x4_pipe, low_res, noise_level, 0.0, seed, latents, noise), ours) > 1e-3


@torch.no_grad()
def test_x4_upscale_mutations_exceed_the_tolerance(x4_pipe, diffusers_upscaler):
    """The parity can fail: SD's noise schedule instead of the upscaler's, or SD's latent scale, each
    move 4 steps of upscaling far past 1e-4."""
    low_res = low_res_videos()
    latents = torch.randn(2, 4, 1, *LOW_RES, generator=torch.Generator().manual_seed(11))
    noise = torch.randn(2, 3, 1, *LOW_RES, generator=torch.Generator().manual_seed(9))
    theirs = their_upscale(diffusers_upscaler, low_res, seed=9, latents=latents)
    for what, change in (("SD's schedule", dict(alphas=ddim.alphas_cumprod)),
                         ("SD's latent scale", dict(latent_scale=0.18215))):
        mutant = dataclasses.replace(x4_pipe, **change)
        err = rel_err(our_upscale(mutant, low_res, latents=latents, noise=noise), theirs)
        print(f"\nx4 upscale with {what}: rel_err {err:.1e}")
        assert err > 1e-3


@torch.no_grad()
def test_x4_diffusers_folder_loads_as_the_same_upscaler(x4_file, x4_folder, x4_pipe, diffusers_upscaler):
    import json
    with open(x4_folder / "unet" / "config.json") as f:
        unet_config = json.load(f)
    assert unet_config["num_class_embeds"] == 1000 and unet_config["only_cross_attention"] == [False, True, False]
    assert os.path.isdir(x4_folder / "low_res_scheduler")
    folder_pipe = simda.load_upscaler(x4_folder)
    assert (folder_pipe.family, folder_pipe.prediction, folder_pipe.latent_scale) == (X4.name, "v", 0.08333)
    assert folder_pipe.prediction_source == "scheduler/scheduler_config.json says v_prediction"
    assert folder_pipe.tokenizer.vocab_file == str(x4_folder / "tokenizer" / "vocab.json")
    assert folder_pipe.tokenizer.pad_id == 0 and folder_pipe.vae.chunk_size == 2
    assert folder_pipe.unet.config == x4_pipe.unet.config == x4_configs()[2]
    assert torch.equal(folder_pipe.alphas, x4_pipe.alphas)
    folder_tensors, file_tensors = all_tensors(folder_pipe), all_tensors(x4_pipe)
    assert folder_tensors.keys() == file_tensors.keys()
    assert all(torch.equal(folder_tensors[k], file_tensors[k]) for k in folder_tensors)
    low_res = low_res_videos()
    out = our_upscale(folder_pipe, low_res, seed=9)
    assert torch.equal(out, our_upscale(x4_pipe, low_res, seed=9))
    err = rel_err(out, their_upscale(diffusers_upscaler, low_res, seed=9))
    print(f"\nx4 upscale from the diffusers folder vs diffusers: rel_err {err:.1e}")
    assert err <= TOL


@torch.no_grad()
def test_x4_in_float16_keeps_its_vae_in_float32(x4_file, x4_pipe):
    """load_upscaler(dtype=float16) runs the text encoder and the UNet in float16 and the VAE in float32
    (the full-size decoder overflows in float16); the result stays near float32's."""
    half = simda.load_upscaler(x4_file, dtype=torch.float16)
    assert half.dtype == torch.float16 and next(half.text_encoder.parameters()).dtype == torch.float16
    assert next(half.vae.parameters()).dtype == torch.float32
    low_res = low_res_videos()
    out = our_upscale(half, low_res, seed=9)
    err = rel_err(out, our_upscale(x4_pipe, low_res, seed=9))
    print(f"\nx4 upscale in float16 (VAE float32) vs float32: rel_err {err:.1e}")
    assert out.dtype == torch.float32 and err <= 3e-2


# ---------------------------------------------------------------------------- 2. the single file

@torch.no_grad()
def test_x4_single_file_as_a_real_one_loads_with_every_model_key_consumed(tmp_path, x4, x4_file, x4_pipe):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    sd = load_file(x4_file)
    extras = real_file_extras()
    assert len(extras) == 20 and DDPM_BUFFERS <= sd.keys() and extras.keys() <= sd.keys()
    assert sum(k.startswith(LOW_SCALE_PREFIX) for k in sd) == 8
    written = {k: v for k, v in sd.items() if k not in extras}
    again = ldm_state_dict(x4_pipe.text_encoder, x4_pipe.vae, x4_pipe.unet)
    assert again.keys() == written.keys()
    assert all(torch.equal(again[k], written[k]) for k in written)
    assert again.keys() == ldm_state_dict(*x4).keys()  # ... the keys our converter wrote from the models
    assert torch.equal(x4_pipe.unet.label_emb.weight, x4[2].label_emb.weight)
    # the schedule we recompute is the file's (the low-res augmentation's and the diffusion's)
    for prefix in ("", LOW_SCALE_PREFIX):
        assert rel_err(x4_pipe.alphas, sd[prefix + "alphas_cumprod"]) <= 1e-7
    # only those buffers are ignored: anything else beside the models is refused
    stray = str(tmp_path / "stray.safetensors")
    save_safetensors({**sd, LOW_SCALE_PREFIX + "max_noise_level": torch.tensor(350)}, stray)
    with pytest.raises(CheckpointError, match="1 unexpected keys: low_scale_model.max_noise_level"):
        simda.load_upscaler(stray)

    # diffusers' converter reads our label_emb as its class_embedding (its model-type guess needs the
    # full-size layout, input_blocks.10: see the full-size test)
    config = bench_unet.diffusers_unet_config(x4_pipe.unet.config)
    converted = convert_ldm_unet_checkpoint(sd, config)
    assert torch.equal(converted["class_embedding.weight"], x4_pipe.unet.label_emb.weight)
    peer = diffusers_unet(ldm=sd, config=x4_pipe.unet.config)
    assert peer.class_embedding.weight.shape == (1000, 4 * x4_pipe.unet.config.model_channels)
    assert torch.equal(peer.class_embedding.weight, x4_pipe.unet.label_emb.weight)


# ---------------------------------------------------------------------------- 3. errors

def test_x4_and_text_to_image_checkpoints_refuse_each_other(x4_file, x4_folder, x4_pipe, tiny_sd2_checkpoint,
                                                            tiny_checkpoint):
    for path in (x4_file, x4_folder):
        with pytest.raises(CheckpointError, match="SD's x4 upscaler, the super-resolution stage: pass it as --sr-ckpt"):
            simda.load_pipeline(path)
    for path, family in ((tiny_sd2_checkpoint, "SD 2.x"), (tiny_checkpoint, "SD 1.x")):
        with pytest.raises(CheckpointError, match=f"is an {family} text-to-image checkpoint, not SD's x4 upscaler"):
            simda.load_upscaler(path, simda_config=SimDAConfig())
    t2v = simda.load_pipeline(tiny_checkpoint, simda_config=SimDAConfig())
    assert not t2v.is_upscaler
    with pytest.raises(ValueError, match="this pipeline is SD 1.x, not an upscaler: load one with simda.load_upscaler"):
        t2v.upscale(low_res_videos(), PROMPTS)
    with pytest.raises(ValueError, match=r"this pipeline is SD x4 upscaler: call \.upscale\(low_res, prompts\)"):
        x4_pipe(PROMPTS, frames=1, height=32, width=32)


GOOD = dict(low_res=low_res_videos(), prompts=PROMPTS)
BAD_INPUTS = [
    ("an image, not a video", dict(low_res=low_res_videos()[:, :, 0]),
     r"low_res must be videos \[B, 3, F, H, W\] with B = 2 prompt\(s\), got shape \(2, 3, 8, 12\)"),
    ("4 channels", dict(low_res=torch.randn(2, 4, 1, *LOW_RES)), r"got shape \(2, 4, 1, 8, 12\)"),
    ("one video for two prompts", dict(low_res=low_res_videos(b=1)),
     r"B = 2 prompt\(s\), got shape \(1, 3, 1, 8, 12\)"),
    ("noise level 350", dict(noise_level=350), "noise_level must be in 0..349, got 350"),
    ("noise level -1", dict(noise_level=-1), "noise_level must be in 0..349, got -1"),
    ("latents at the output size", dict(latents=torch.randn(2, 4, 1, 32, 48)),
     r"latents have shape \(2, 4, 1, 32, 48\), expected \(2, 4, 1, 8, 12\) "
     r"for low-res videos of shape \(2, 3, 1, 8, 12\)"),
    ("latents of another frame count", dict(latents=torch.randn(2, 4, 3, *LOW_RES)),
     r"latents have shape \(2, 4, 3, 8, 12\), expected \(2, 4, 1, 8, 12\)"),
]


@pytest.mark.parametrize("what, change, message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_upscale_refuses_bad_inputs(x4_pipe, what, change, message):
    arguments = {**GOOD, **change}
    with pytest.raises(ValueError, match=message):
        x4_pipe.upscale(arguments.pop("low_res"), arguments.pop("prompts"), steps=1, progress=False, **arguments)


BAD_NOISE = [("an image's noise", torch.randn(2, 3, *LOW_RES)),
             ("one video's noise for two", torch.randn(1, 3, 1, *LOW_RES)),
             ("noise of another frame count", torch.randn(2, 3, 3, *LOW_RES))]


@pytest.mark.parametrize("what, noise", BAD_NOISE, ids=[case[0] for case in BAD_NOISE])
def test_upscale_refuses_noise_of_the_wrong_shape(x4_pipe, what, noise):
    """`noise` is the augmentation noise [B, 3, F, H, W], shaped like low_res; like `latents`, a wrong
    shape must be refused by name, not broadcast (one video's noise silently used for both) or fail
    deep inside with a RuntimeError."""
    with pytest.raises(ValueError, match=r"noise .*\(2, 3, 1, 8, 12\)"):
        x4_pipe.upscale(low_res_videos(), PROMPTS, steps=1, noise=noise, progress=False)


# ---------------------------------------------------------------------------- 4. the video upscaler

def video_inputs(frames, seed=7):
    """(low-res video [1, 3, F, 8, 12], latents [1, 4, F, 8, 12], augmentation noise [1, 3, F, 8, 12])."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, 3, frames, *LOW_RES, generator=g) * 2 - 1, torch.randn(1, 4, frames, *LOW_RES, generator=g),
            torch.randn(1, 3, frames, *LOW_RES, generator=g))


def video_upscale(pipe, low_res, latents, noise):
    return our_upscale(pipe, low_res, latents=latents, noise=noise, steps=2)


def frame_by_frame(pipe, low_res, latents, noise):
    """The image upscaler on each frame alone, with that frame's latents and noise."""
    return torch.cat([video_upscale(pipe, low_res[:, :, f:f + 1], latents[:, :, f:f + 1], noise[:, :, f:f + 1])
                      for f in range(low_res.shape[2])], dim=2)


def frame_errors(a, b):
    return [rel_err(a[:, :, f], b[:, :, f]) for f in range(a.shape[2])]


@torch.no_grad()
def test_fresh_video_upscaler_starts_as_the_image_upscaler_frame_by_frame(x4_file, x4_pipe):
    """Fresh adapters output zero, so what is left of SimDA is latent shift. Frame 0 has no earlier frame
    (its shifted tokens are its own): it is the image upscaler's. In a video of identical frames every
    shifted token equals the frame's own token at that position, so each frame's attention sees its own
    keys and values twice, which the softmax weighs exactly as once: every frame is the image upscaler's
    output, up to rounding. Without latent shift every frame is. With latent shift and frames that
    differ, later frames look back and differ from it. "Up to rounding": the UNet runs 2F frames at once
    instead of 2, and guidance 9 amplifies that rounding, to 6e-6 (measured) with or without the shift."""
    identity = 3e-5
    video = simda.load_upscaler(x4_file, simda_config=SimDAConfig())
    assert video.is_upscaler and adapters.adapter_state_dict(video.unet)
    assert all(torch.equal(v, x4_pipe.unet.state_dict()[k]) for k, v in video.unet.state_dict().items()
               if not adapters.is_adapter_key(k))
    inputs = video_inputs(frames=4)
    expected = frame_by_frame(x4_pipe, *inputs)
    out = video_upscale(video, *inputs)
    assert out.shape == (1, 3, 4, 32, 48)
    errs = frame_errors(out, expected)
    print("\nfresh video upscaler vs the image upscaler per frame, latent shift on: rel_err per frame "
          + ", ".join(f"{e:.1e}" for e in errs))
    assert errs[0] <= identity
    assert min(errs[1:]) > 1e-3  # frame 1 too: at the 2x3 deepest level one token is shifted by 1

    same = tuple(t[:, :, :1].expand(-1, -1, 4, -1, -1).contiguous() for t in inputs)
    errs = frame_errors(video_upscale(video, *same), expected[:, :, :1].expand(-1, -1, 4, -1, -1))
    print("identical frames: rel_err per frame vs the image upscaler's frame " + ", ".join(f"{e:.1e}" for e in errs))
    assert max(errs) <= identity

    no_shift = simda.load_upscaler(x4_file, simda_config=SimDAConfig(latent_shift=False))
    err = rel_err(video_upscale(no_shift, *inputs), expected)
    print(f"no latent shift, every frame: rel_err {err:.1e}")
    assert err <= identity


def perturbed_video_upscaler(path, seed=4, **simda_options):
    pipe = simda.load_upscaler(path, simda_config=SimDAConfig(**simda_options))
    perturb_adapters_(pipe.unet, seed=seed)
    return pipe


def changed_frames(a, b):
    """The frames where the videos a and b differ at all."""
    return [f for f in range(a.shape[2]) if not torch.equal(a[:, :, f], b[:, :, f])]


@torch.no_grad()
def test_perturbed_video_upscaler_mixes_frames_exactly_within_its_receptive_field(x4_file):
    """Only the temporal adapters (a 3-tap convolution over time at the entry of every SpatialTransformer)
    let a frame see later frames, one frame per adapter; latent shift only looks back. The tiny UNet's main
    path runs through 7 SpatialTransformers (2 down, the middle one, 4 up), so one UNet call lets frame f
    see frames up to f + 7, and no further: in float64, a change in frame 9 of 10 moves output frames
    2..9 and leaves 0 and 1 bit for bit. Without temporal adapters the UNet is causal: a change in frame
    5 moves frames 5..9 (frame 6 through latent shift) and no earlier one. Frame-independent processing
    would move frame 9 (resp. 5) alone."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 7, 10, *LOW_RES, generator=g, dtype=torch.float64)
    context = torch.randn(1, 77, 128, generator=g, dtype=torch.float64)
    t, y = torch.tensor([500]), torch.tensor([20])
    for options, k, moved in ((dict(), 9, list(range(2, 10))), (dict(temporal_adapters=False), 5, list(range(5, 10)))):
        unet = perturbed_video_upscaler(x4_file, **options).unet.double()
        changed = x.clone()
        changed[:, :, k] += torch.randn(changed[:, :, k].shape, generator=g, dtype=torch.float64)
        a, b = unet(x, t, context, y), unet(changed, t, context, y)
        errs = frame_errors(b, a)
        print(f"\nUNet {options or 'SimDAConfig()'}: input frame {k} changed, output frames moved by "
              + ", ".join(f"{e:.0e}" for e in errs))
        assert changed_frames(a, b) == moved
        assert min(errs[f] for f in moved) > 1e-10

    # the pipeline (float32, 2 DDIM steps: a reach of 14 frames): a change in the last of 5 low-res frames
    # moves frame 0 too; without temporal adapters, a change in frame 3 moves frames 3 and 4 only
    inputs = video_inputs(frames=5)
    for options, k, moved in ((dict(), 4, [0, 1, 2, 3, 4]), (dict(temporal_adapters=False), 3, [3, 4])):
        pipe = perturbed_video_upscaler(x4_file, **options)
        low_res = inputs[0].clone()
        low_res[:, :, k] = low_res[:, :, k].flip(-1)
        a, b = video_upscale(pipe, *inputs), video_upscale(pipe, low_res, *inputs[1:])
        errs = frame_errors(b, a)
        print(f"upscale {options or 'SimDAConfig()'}: low-res frame {k} changed, output frames moved by "
              + ", ".join(f"{e:.0e}" for e in errs))
        assert changed_frames(a, b) == moved
        assert min(errs[f] for f in moved) > 1e-6


# ---------------------------------------------------------------------------- 5. chunks of frames

@torch.no_grad()
def test_frame_chunks_change_nothing_but_rounding(x4_file):
    pipe = perturbed_video_upscaler(x4_file)
    unet = pipe.unet
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 7, 5, *LOW_RES, generator=g)
    context, t, y = torch.randn(2, 77, 128, generator=g), torch.tensor([999, 37]), torch.tensor([20, 349])
    assert unet.frame_chunk == 0
    full = unet(x, t, context, y)
    for chunk in (1, 2, 3):  # 3: chunks of the 10 (video, frame) pairs that straddle the two videos
        unet.frame_chunk = chunk
        err = rel_err(unet(x, t, context, y), full)
        print(f"\nvideo upscaler UNet with frame_chunk {chunk} vs 0: rel_err {err:.1e}")
        assert err <= 1e-5
    inputs = video_inputs(frames=3)
    unet.frame_chunk = 1
    chunked = video_upscale(pipe, *inputs)
    unet.frame_chunk = 0
    assert rel_err(chunked, video_upscale(pipe, *inputs)) <= 1e-5

    z = torch.randn(2, 4, 5, *LOW_RES, generator=g)
    decoded = {}
    for size in (1, 8):
        pipe.vae.chunk_size = size
        decoded[size] = pipe.vae.decode_video(z)
    pipe.vae.chunk_size = 2
    err = rel_err(decoded[1], decoded[8])
    print(f"vae.decode_video, chunk_size 1 vs 8: rel_err {err:.1e}")
    assert err <= 1e-5  # not bitwise: the convolutions' kernels depend on the batch size


# ---------------------------------------------------------------------------- 6. full size

FULL_X4 = unet_module.UNetConfig(in_channels=7, out_channels=4, model_channels=256, channel_mult=(1, 2, 2, 4),
                                 num_res_blocks=2, attention_levels=(1, 2, 3), num_heads=8,
                                 use_linear_in_transformer=True, upcast_attention=True, context_dim=1024,
                                 num_classes=1000, disable_self_attentions=(1, 2))
# Stability's configs/stable-diffusion/x4-upscaling.yaml: unet_config.params, and the VAE's ch_mult
X4_YAML = {"model": {"params": {
    "unet_config": {"params": dict(
        use_checkpoint=True, num_classes=1000, image_size=128, in_channels=7, out_channels=4, model_channels=256,
        attention_resolutions=[2, 4, 8], num_res_blocks=2, channel_mult=[1, 2, 2, 4],
        disable_self_attentions=[True, True, True, False], disable_middle_self_attn=False, num_heads=8,
        use_spatial_transformer=True, transformer_depth=1, context_dim=1024, legacy=False,
        use_linear_in_transformer=True)},
    "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4]}}}}}}


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_full_size_x4_unet_parameters_and_simda_trainable_count():
    """On the meta device: our full x4 UNet has as many parameters as diffusers' UNet2DConditionModel built
    from our config (bench_unet.diffusers_unet_config) and from the official yaml by diffusers' own single-file
    config builder; its weights' shapes give back the config; SimDA trains 17.9M parameters on it."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm, infer_diffusers_model_type
    with torch.device("meta"):
        ours = unet_module.UNet(FULL_X4)
        video = unet_module.UNet(FULL_X4, simda_config=SimDAConfig())
    ldm = {UNET_PREFIX + k: v for k, v in ours.state_dict().items()}
    assert infer_diffusers_model_type(ldm) == "upscale"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        official = create_unet_diffusers_config_from_ldm(X4_YAML, ldm)
    with torch.device("meta"):
        peer = UNet2DConditionModel(**bench_unet.diffusers_unet_config(FULL_X4))
        from_yaml = UNet2DConditionModel(**official)
    assert unet_module.config_from_state_dict(ours.state_dict(), X4.unet_heads, X4.unet_head_channels,
                                              X4.upcast_attention) == FULL_X4
    trainable = sum(p.numel() for p in adapters.freeze_for_training(video))
    print(f"\nfull x4 UNet: ours {count(ours):,}, diffusers (our config) {count(peer):,}, "
          f"diffusers (x4-upscaling.yaml) {count(from_yaml):,} parameters")
    print(f"full x4 UNet with SimDA: {adapters.trainable_summary(video)}")
    assert count(ours) == count(peer) == count(from_yaml) == 473_398_020
    assert trainable == 17_893_376 and count(video) == count(ours) + trainable
