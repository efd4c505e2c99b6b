"""Parity at the full size of SD's x4 upscaler (Stability's x4-upscaling.yaml: a 473M UNet with 7
input channels, 8 heads, linear projections, cross-attention-only levels 1 and 2 and the low-res
image's noise level as one of 1000 class labels; the 340M OpenCLIP text encoder of SD 2.x, 23 of its
24 layers run; a 55M 3-level VAE that downsamples by 4), from one single file written here with random
perturbed weights in the official layout (OpenCLIP text keys, plus the 12 DDPM schedule buffers and
the 8 `low_scale_model.*` noise-augmentation buffers that the real x4-upscaler-ema file holds) and
loaded through simda.load_upscaler, and once more from a diffusers-folder copy of the same weights
with the upscaler's scheduler configs. The references are transformers' CLIPTextModel and
CLIPTokenizer (pad_token="!"), and diffusers' UNet, VAE and StableDiffusionUpscalePipeline for a
4-step guided v-prediction upscale.

As in test_full_size_sd2.py, the tests share nothing but module-scoped fixtures, so each passes alone
and in any order, and each big model is built once per module: `checkpoint` (the file), `ours` (our
pipeline's outputs), `references` (the reference models' outputs and the diffusers folder they are
saved to). The three models are 3.5 GB in any form, so each fixture frees them as soon as it has
what it needs: at most two copies are alive at once (a state dict and the models built from it, or
the models' tensors and safetensors' bytes of them while the file is written); the references are
built from the file one model at a time.
Slow (92 s and a peak of 7.4 GB resident memory on 2 CPU cores, under `/usr/bin/time -v
python -m pytest -q -s tests/test_full_size_x4.py`): marked `slow`, like test_full_size.py."""
import gc
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import adapters
import clip_text
import simda
import unet as unet_module
import vae as vae_module
from checkpoint import (DDPM_BUFFERS, LOW_SCALE_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, X4,
                        ldm_state_dict)
from conftest import check_parity, perturb_, rel_err
from reference import diffusers_unet, diffusers_vae, save_diffusers_folder, transformers_clip
from video import batch_to_frames, frames_to_batch

pytestmark = pytest.mark.slow
# Stability's x4-upscaling.yaml (and diffusers' stable-diffusion-x4-upscaler configs): the VAE is 128/256/512
# wide with 2 res blocks per level; the UNet's attention_resolutions [2, 4, 8] are levels 1..3, and its
# disable_self_attentions [True, True, True, False] touch levels 1 and 2 (level 0 has no attention).
CONFIGS = (clip_text.CLIPTextConfig.sd2(), vae_module.VAEConfig(channel_mult=(1, 2, 4)),
           unet_module.UNetConfig(in_channels=7, out_channels=4, model_channels=256, channel_mult=(1, 2, 2, 4),
                                  num_res_blocks=2, attention_levels=(1, 2, 3), num_heads=8, num_head_channels=-1,
                                  use_linear_in_transformer=True, upcast_attention=True, context_dim=1024,
                                  num_classes=1000, disable_self_attentions=(1, 2)))
LATENT_SCALE = 0.08333  # x4-upscaling.yaml's scale_factor
BETAS = (0.0001, 0.02)  # its linear_start, linear_end (the model's schedule and the low-res augmentation's)
# No "!" in a prompt: transformers' CLIPTokenizer(pad_token="!") would turn it into the pad id 0.
PROMPTS = ["a dog surfing", "a red circle moving right, oil painting, 4k"]
PROMPT, NEGATIVE = "a corgi running on the beach, golden hour", "blurry, low quality"
TOKENIZED = PROMPTS + [PROMPT, NEGATIVE, ""]
STEPS, GUIDANCE, NOISE_LEVEL = 4, 9.0, 20
AUGMENTATION_SEED = 3  # the low-res image's noise: diffusers draws it first from its generator


def ldm_schedule_buffers(prefix, names, timesteps=1000):
    """The schedule buffers LDM's DDPM (and the upscaler's low_scale_model) register, as LDM computes them
    (make_beta_schedule "linear": betas the squares of a linspace of the square roots, in float64; stored
    as float32): the extras a real x4-upscaler file holds besides the three models."""
    betas = torch.linspace(BETAS[0] ** 0.5, BETAS[1] ** 0.5, timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1 - prev) / (1 - alphas_cumprod)
    all_buffers = dict(
        betas=betas, alphas_cumprod=alphas_cumprod, alphas_cumprod_prev=prev,
        sqrt_alphas_cumprod=alphas_cumprod.sqrt(), sqrt_one_minus_alphas_cumprod=(1 - alphas_cumprod).sqrt(),
        log_one_minus_alphas_cumprod=(1 - alphas_cumprod).log(), sqrt_recip_alphas_cumprod=(1 / alphas_cumprod).sqrt(),
        sqrt_recipm1_alphas_cumprod=(1 / alphas_cumprod - 1).sqrt(),
        posterior_variance=posterior_variance, posterior_log_variance_clipped=posterior_variance.clamp(min=1e-20).log(),
        posterior_mean_coef1=betas * prev.sqrt() / (1 - alphas_cumprod),
        posterior_mean_coef2=(1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod))
    return {prefix + name: all_buffers[name].float() for name in names}


LOW_SCALE_BUFFERS = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod"]


@pytest.fixture(scope="module")
def checkpoint(module_tmp_path):
    """Path of the x4 upscaler's three models, every parameter perturbed, as one single file in the official
    layout with the real file's schedule buffers. The models are freed before the file is written (the
    state dict holds their tensors), and the state dict once it is: neither outlives this fixture."""
    path = str(module_tmp_path / "x4-upscaler-random.safetensors")
    models = []
    for i, (model_class, config) in enumerate(zip((clip_text.CLIPTextEncoder, vae_module.AutoencoderKL,
                                                   unet_module.UNet), CONFIGS)):
        torch.manual_seed(30 + i)
        models.append(perturb_(model_class(config), 30 + i))
    sd = ldm_state_dict(*models)
    del models
    gc.collect()
    sd.update(ldm_schedule_buffers("", sorted(DDPM_BUFFERS)))
    sd.update(ldm_schedule_buffers(LOW_SCALE_PREFIX, LOW_SCALE_BUFFERS))
    save_file(sd, path)
    del sd
    gc.collect()
    return path


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(images=torch.rand(2, 3, 64, 48, generator=g) * 2 - 1, latents=torch.randn(2, 4, 16, 12, generator=g),
                video=torch.randn(2, 7, 2, 16, 16, generator=g), t=torch.tensor([621, 38]),
                context=torch.randn(2, 77, 1024, generator=g), labels=torch.tensor([20, 300]),
                low_res=torch.rand(1, 3, 1, 32, 32, generator=g) * 2 - 1,  # 1 frame of 32x32 pixels, to 128x128
                start=torch.randn(1, 4, 1, 32, 32, generator=g),  # the upscale's starting latents
                noise=torch.randn([1, 3, 32, 32],
                                  generator=torch.Generator().manual_seed(AUGMENTATION_SEED))[:, :, None])


@torch.no_grad()
def outputs(pipe, inputs):
    ids = pipe.tokenizer(TOKENIZED)
    mean, logvar = pipe.vae.encode(inputs["images"])
    return dict(ids=ids, context=pipe.text_encoder(ids), mean=mean, logvar=logvar,
                decoded=pipe.vae.decode(inputs["latents"]),
                out=pipe.unet(inputs["video"], inputs["t"], inputs["context"], inputs["labels"]),
                upscaled=pipe.upscale(inputs["low_res"], PROMPT, steps=STEPS, guidance=GUIDANCE,
                                      noise_level=NOISE_LEVEL, negative=NEGATIVE, latents=inputs["start"],
                                      noise=inputs["noise"], progress=False))


def facts(pipe):
    models = (pipe.text_encoder, pipe.vae, pipe.unet)
    return dict(configs=[m.config for m in models], counts=[sum(p.numel() for p in m.parameters()) for m in models],
                family=pipe.family, prediction=pipe.prediction, prediction_source=pipe.prediction_source,
                latent_scale=pipe.latent_scale, factor=pipe.vae.config.downsample_factor, alphas=pipe.alphas)


@pytest.fixture(scope="module")
def ours(checkpoint, inputs):
    """Our upscaler loaded from the single file: what it inferred, and its outputs. The pipeline is freed
    here, so it is never alive beside the references."""
    pipe = simda.load_upscaler(checkpoint)
    result = dict(**facts(pipe), **outputs(pipe, inputs))
    del pipe
    gc.collect()
    return result


def read_part(path, prefix):
    """The tensors of a single file whose keys start with `prefix`: one model's share of it."""
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def reference_schedulers():
    """diffusers' stable-diffusion-x4-upscaler scheduler configs: DDIM on the upscaler's schedule,
    predicting v, and DDPM on the same schedule for the low-res image's noise augmentation."""
    from diffusers import DDIMScheduler, DDPMScheduler
    scheduler = DDIMScheduler(beta_start=BETAS[0], beta_end=BETAS[1], beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                              prediction_type="v_prediction")
    return scheduler, DDPMScheduler(beta_start=BETAS[0], beta_end=BETAS[1], beta_schedule="scaled_linear")


@torch.no_grad()
def reference_outputs(tokenizer, text_encoder, vae, unet, inputs):
    """The references' outputs on `inputs`: the text encoder's on transformers' ids, the UNet's with the
    frames folded into the batch and each video's text, timestep and class label repeated per frame, and
    diffusers' own guided upscale (its latents decoded by its VAE, as output_type="pil" would before
    post-processing)."""
    from diffusers import StableDiffusionUpscalePipeline
    ids = tokenizer(TOKENIZED, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    posterior = vae.encode(inputs["images"]).latent_dist
    video, t, frames = inputs["video"], inputs["t"], inputs["video"].shape[2]
    out = unet(frames_to_batch(video), t.repeat_interleave(frames),
               encoder_hidden_states=inputs["context"].repeat_interleave(frames, 0),
               class_labels=inputs["labels"].repeat_interleave(frames)).sample
    vae.register_to_config(scaling_factor=LATENT_SCALE)  # what the Hub's vae/config.json says
    scheduler, low_res_scheduler = reference_schedulers()
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          low_res_scheduler=low_res_scheduler, scheduler=scheduler, max_noise_level=350)
    pipe.set_progress_bar_config(disable=True)
    image = (inputs["low_res"][:, :, 0] + 1) / 2  # in [0, 1], as the pipeline wants tensors (it maps them to [-1, 1])
    latents = pipe(PROMPT, image=image, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   noise_level=NOISE_LEVEL, negative_prompt=NEGATIVE,
                   generator=torch.Generator().manual_seed(AUGMENTATION_SEED), latents=inputs["start"][:, :, 0].clone(),
                   output_type="latent").images
    upscaled = vae.decode(latents / vae.config.scaling_factor).sample
    return dict(ids=ids, context=text_encoder(input_ids=ids).last_hidden_state, mean=posterior.mean,
                logvar=posterior.logvar, decoded=vae.decode(inputs["latents"]).sample,
                out=batch_to_frames(out, frames), upscaled=upscaled[:, :, None]), (scheduler, low_res_scheduler)


@pytest.fixture(scope="module")
def references(checkpoint, inputs, module_tmp_path):
    """transformers' CLIPTokenizer and CLIP text model, diffusers' VAE and UNet, holding the file's weights
    as diffusers' own single-file converters read them (the text encoder through its OpenCLIP converter);
    their outputs on `inputs`, their parameter counts, and a diffusers folder (with the upscaler's
    scheduler/ and low_res_scheduler/ configs) they are saved to. Each model is built from its share of
    the file, and all are freed here: alive while a pipeline loads, they would add 3.5 GB."""
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer(os.path.join(clip_text.VOCAB_DIR, "vocab.json"),
                              os.path.join(clip_text.VOCAB_DIR, "merges.txt"), pad_token="!",
                              model_max_length=77)  # what the upscaler's tokenizer_config.json says
    text_config, vae_config, unet_config = CONFIGS
    models = []
    for prefix, build, config in ((OPEN_CLIP_PREFIX, transformers_clip, text_config),
                                  (VAE_PREFIX, diffusers_vae, vae_config), (UNET_PREFIX, diffusers_unet, unet_config)):
        part = read_part(checkpoint, prefix)
        models.append(build(ldm=part, config=config))
        del part
        gc.collect()
    counts = [sum(p.numel() for p in m.parameters()) for m in models]
    expected, (scheduler, low_res_scheduler) = reference_outputs(tokenizer, *models, inputs)
    folder = str(module_tmp_path / "diffusers")
    save_diffusers_folder(folder, *models)  # after the pipeline: the VAE's config now says scaling_factor 0.08333
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    low_res_scheduler.save_pretrained(os.path.join(folder, "low_res_scheduler"))
    result = dict(expected=expected, folder=folder, counts=counts)
    del models
    gc.collect()
    return result


@pytest.fixture(scope="module")
def expected(references):
    return references["expected"]


def test_x4_file_holds_the_official_layout(checkpoint):
    """OpenCLIP text keys (all 24 resblocks, the last as zeros), the UNet's noise-level embedding and 7
    input channels, and the real file's extras: 12 DDPM buffers at the top level, 8 low_scale_model.*."""
    with safe_open(checkpoint, framework="pt") as f:
        keys = set(f.keys())
        blocks = {int(k.split(".")[4]) for k in keys if k.startswith(OPEN_CLIP_PREFIX + "transformer.resblocks.")}
        assert blocks == set(range(24))
        assert f.get_slice(UNET_PREFIX + "label_emb.weight").get_shape() == [1000, 1024]
        assert f.get_slice(UNET_PREFIX + "input_blocks.0.0.weight").get_shape() == [256, 7, 3, 3]
        assert f.get_slice(VAE_PREFIX + "encoder.conv_out.weight").get_shape() == [8, 512, 3, 3]
    assert DDPM_BUFFERS <= keys and len(DDPM_BUFFERS) == 12
    assert {LOW_SCALE_PREFIX + name for name in LOW_SCALE_BUFFERS} <= keys
    assert not any(k.startswith(VAE_PREFIX + "encoder.down.3") for k in keys)  # 3 levels: x4, not x8


def test_x4_configs_inferred(ours, references):
    text_config, vae_config, unet_config = ours["configs"]
    assert (text_config, vae_config, unet_config) == CONFIGS
    assert (ours["family"], ours["prediction"]) == (X4.name, "v") == ("SD x4 upscaler", "v"), ours["prediction_source"]
    assert ours["latent_scale"] == LATENT_SCALE and ours["factor"] == 4
    print(f"\nx4 parameters (text, VAE, UNet): ours {ours['counts']}, references {references['counts']}")
    assert ours["counts"] == references["counts"]


def test_x4_schedule_is_the_files(checkpoint, ours):
    """The schedule we recompute is the one LDM's rule writes into the file (which we never read)."""
    stored = read_part(checkpoint, LOW_SCALE_PREFIX + "alphas_cumprod")[LOW_SCALE_PREFIX + "alphas_cumprod"]
    err = rel_err(ours["alphas"], stored)
    print(f"\nx4 alphas_cumprod vs the file's low_scale_model.alphas_cumprod: rel_err {err:.1e}")
    assert err <= 1e-6


def test_x4_simda_trainable_parameters(ours):
    """SimDA's adapters on the x4 UNet (the video upscaler), counted on the meta device."""
    with torch.device("meta"):
        model = unet_module.UNet(CONFIGS[2], simda_config=adapters.SimDAConfig())
    trainable = sum(p.numel() for p in adapters.freeze_for_training(model))
    print(f"\nx4 SimDA: {adapters.trainable_summary(model)}")
    assert sum(p.numel() for p in model.parameters()) - trainable == ours["counts"][2]
    assert 0 < trainable < 0.05 * ours["counts"][2]


def test_x4_tokenizer_matches_transformers(ours, expected):
    assert torch.equal(ours["ids"], expected["ids"])
    assert (ours["ids"][:, -1] == 0).all()


def test_x4_text_encoder_matches_transformers(ours, expected):
    check_parity("x4 text encoder", ours, expected, "context")


def test_x4_vae_matches_diffusers(ours, expected):
    check_parity("x4 VAE", ours, expected, "mean", "logvar", "decoded")


def test_x4_unet_with_noise_levels_matches_diffusers(ours, expected):
    """2 frames of 16x16 latents (plus the 3 low-res channels), class labels 20 and 300."""
    check_parity("x4 UNet", ours, expected, "out")


def test_x4_upscale_matches_diffusers_pipeline(ours, expected):
    """4 DDIM steps of v-prediction with guidance 9 and a negative prompt, from the same starting latents
    and augmentation noise (level 20), 32x32 -> 128x128, decoded by each side's VAE."""
    assert ours["upscaled"].shape == (1, 3, 1, 128, 128)
    check_parity(f"x4 {STEPS}-step guided upscale", ours, expected, "upscaled")


def test_x4_diffusers_folder_loads_the_same_model(inputs, ours, references):
    """The same weights, renamed by diffusers and transformers, through the same code on the same CPU: the
    outputs are bit for bit the single file's. The family is told by the UNet's class embedding, the
    prediction by the scheduler config. The pipeline is a temporary, freed once its outputs are computed."""
    pipe = simda.load_upscaler(references["folder"])
    theirs = dict(**facts(pipe), **outputs(pipe, inputs))
    del pipe
    gc.collect()
    assert theirs["configs"] == ours["configs"]
    assert (theirs["family"], theirs["prediction"]) == ("SD x4 upscaler", "v")
    assert theirs["latent_scale"] == LATENT_SCALE
    assert theirs["prediction_source"].startswith("scheduler/scheduler_config.json"), theirs["prediction_source"]
    for name, value in ours.items():
        if isinstance(value, torch.Tensor):
            print(f"\nx4 from the diffusers folder: {name} rel_err {rel_err(theirs[name], value):.1e}")
            assert torch.equal(theirs[name], value), name
