"""Parity at the full SD-2.1 size (866M UNet with 64-channel heads, linear projections and upcast
attention; 340M OpenCLIP text encoder, 23 of its 24 layers run; 84M VAE), from one single-file
768-v checkpoint written here with random perturbed weights in the official layout (OpenCLIP text
keys) and loaded through simda.load_pipeline, and once more from a diffusers-folder copy of the same
weights with a v-prediction scheduler config. The references are transformers' CLIPTextModel and
CLIPTokenizer (pad_token="!", as SD 2.x's tokenizer/ config says), and diffusers' UNet, VAE and
StableDiffusionPipeline with a v-prediction DDIMScheduler for a 4-step guided sampling.

As in test_full_size.py, the tests share nothing but module-scoped fixtures, so each passes alone and
in any order, and each big model is built once per module: `checkpoint` (the file), `ours` (our
pipeline's outputs), `references` (the reference models' outputs and the diffusers folder they are
saved to). The three models are 5.2 GB in any form, so each fixture frees them as soon as it has what
it needs: at most two copies are alive at once (a state dict and the models built from it); the
references are built from the file one model at a time, which keeps them under that.
Slow (97 s and a peak of 10.6 GB resident memory on 2 CPU cores, under `/usr/bin/time -v python -m
pytest -q -s tests/test_full_size_sd2.py`): marked `slow`, like test_full_size.py."""
import gc
import os

import pytest
import torch
from safetensors import safe_open

import adapters
import clip_text
import simda
import unet as unet_module
import vae as vae_module
from checkpoint import OPEN_CLIP_PREFIX, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from conftest import check_parity, rel_err, write_random_sd
from reference import diffusers_unet, diffusers_vae, save_diffusers_folder, sd_ddim_scheduler, transformers_clip
from video import batch_to_frames, frames_to_batch

pytestmark = pytest.mark.slow
CONFIGS = (clip_text.CLIPTextConfig.sd2(), vae_module.VAEConfig(), unet_module.UNetConfig.sd2())
# No "!" in a prompt: transformers' CLIPTokenizer(pad_token="!") would turn it into the pad id 0.
PROMPTS = ["a dog surfing", "a red circle moving right, oil painting, 4k"]
PROMPT, NEGATIVE = "a corgi running on the beach, golden hour", "blurry, low quality"
TOKENIZED = PROMPTS + [PROMPT, NEGATIVE, ""]
STEPS, GUIDANCE = 4, 7.5


@pytest.fixture(scope="module")
def checkpoint(module_tmp_path):
    """Path of the three SD-2.1 models, every parameter perturbed, as one single file in the official
    layout; named as Stability names its 768-v files, which is how the loader knows they predict v.
    The state dict is not kept: alive beside the references and a pipeline, it would add 5.2 GB."""
    return write_random_sd(str(module_tmp_path / "v2-1_768-random.safetensors"), CONFIGS,
                           first_seed=20)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(images=torch.rand(2, 3, 64, 48, generator=g) * 2 - 1, latents=torch.randn(2, 4, 8, 6, generator=g),
                video=torch.randn(2, 4, 2, 8, 8, generator=g), t=torch.tensor([621, 38]),
                context=torch.randn(2, 77, 1024, generator=g),
                noise=torch.randn(1, 4, 1, 8, 8, generator=g))  # the sampling's start: 1 frame of 64x64 pixels


@torch.no_grad()
def outputs(pipe, inputs):
    ids = pipe.tokenizer(TOKENIZED)
    mean, logvar = pipe.vae.encode(inputs["images"])
    context = torch.cat([pipe.text_context([NEGATIVE]), pipe.text_context([PROMPT])])
    return dict(ids=ids, context=pipe.text_encoder(ids), mean=mean, logvar=logvar,
                decoded=pipe.vae.decode(inputs["latents"]),
                eps=pipe.unet(inputs["video"], inputs["t"], inputs["context"]),
                sampled=pipe.denoise(inputs["noise"], context, steps=STEPS, guidance=GUIDANCE, progress=False))


def facts(pipe):
    models = (pipe.text_encoder, pipe.vae, pipe.unet)
    return dict(configs=[m.config for m in models], counts=[sum(p.numel() for p in m.parameters()) for m in models],
                family=pipe.family, prediction=pipe.prediction, prediction_source=pipe.prediction_source)


@pytest.fixture(scope="module")
def ours(checkpoint, inputs):
    """Our pipeline loaded from the single file: what it inferred, and its outputs. The pipeline is
    freed here, so it is never alive beside the references."""
    pipe = simda.load_pipeline(checkpoint)
    result = dict(**facts(pipe), **outputs(pipe, inputs))
    del pipe
    gc.collect()
    return result


def read_part(path, prefix):
    """The tensors of a single file whose keys start with `prefix`: one model's share of it."""
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


@torch.no_grad()
def reference_outputs(tokenizer, text_encoder, vae, unet, inputs):
    """The references' outputs on `inputs`: the text encoder's on transformers' ids, the UNet's with
    the frames folded into the batch and each video's text and timestep repeated per frame (as
    diffusers' video pipelines do), and diffusers' own guided v-prediction DDIM sampling."""
    from diffusers import StableDiffusionPipeline
    ids = tokenizer(TOKENIZED, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    posterior = vae.encode(inputs["images"]).latent_dist
    video, t, frames = inputs["video"], inputs["t"], inputs["video"].shape[2]
    eps = unet(frames_to_batch(video), t.repeat_interleave(frames),
               encoder_hidden_states=inputs["context"].repeat_interleave(frames, 0)).sample
    scheduler = sd_ddim_scheduler("v_prediction")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    sampled = pipe(PROMPT, negative_prompt=NEGATIVE, height=64, width=64, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, latents=inputs["noise"][:, :, 0].clone(), output_type="latent").images
    return dict(ids=ids, context=text_encoder(input_ids=ids).last_hidden_state, mean=posterior.mean,
                logvar=posterior.logvar, decoded=vae.decode(inputs["latents"]).sample,
                eps=batch_to_frames(eps, frames), sampled=sampled[:, :, None]), scheduler


@pytest.fixture(scope="module")
def references(checkpoint, inputs, module_tmp_path):
    """transformers' CLIPTokenizer and CLIP text model, diffusers' VAE and UNet, holding the file's
    weights as diffusers' own single-file converters read them (the text encoder through its OpenCLIP
    converter); their outputs on `inputs`, their parameter counts, and a diffusers folder (with a
    v-prediction scheduler config) they are saved to. Each model is built from its share of the file,
    and all are freed here: alive while a pipeline loads, they would add 5.2 GB."""
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer(os.path.join(clip_text.VOCAB_DIR, "vocab.json"),
                              os.path.join(clip_text.VOCAB_DIR, "merges.txt"), pad_token="!",
                              model_max_length=77)  # what SD's tokenizer_config.json says; diffusers pads to it
    text_config, vae_config, unet_config = CONFIGS
    models = []
    for prefix, build, config in ((OPEN_CLIP_PREFIX, transformers_clip, text_config),
                                  (VAE_PREFIX, diffusers_vae, vae_config), (UNET_PREFIX, diffusers_unet, unet_config)):
        part = read_part(checkpoint, prefix)
        models.append(build(ldm=part, config=config))
        del part
        gc.collect()
    folder = str(module_tmp_path / "diffusers")
    save_diffusers_folder(folder, *models)
    expected, scheduler = reference_outputs(tokenizer, *models, inputs)
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    result = dict(expected=expected, folder=folder, counts=[sum(p.numel() for p in m.parameters()) for m in models])
    del models
    gc.collect()
    return result


@pytest.fixture(scope="module")
def expected(references):
    return references["expected"]


def test_sd21_file_holds_openclip_keys(checkpoint):
    """The text encoder is written as SD 2.x files hold it: OpenCLIP names, all 24 resblocks (the last,
    which SD never runs, as zeros), q/k/v stacked in in_proj_weight, text_projection and logit_scale."""
    with safe_open(checkpoint, framework="pt") as f:
        keys = list(f.keys())
        blocks = {int(k.split(".")[4]) for k in keys if k.startswith(OPEN_CLIP_PREFIX + "transformer.resblocks.")}
        assert blocks == set(range(24))
        assert f.get_slice(OPEN_CLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight").get_shape() == [3072, 1024]
        assert f.get_slice(OPEN_CLIP_PREFIX + "text_projection").get_shape() == [1024, 1024]
        assert not f.get_tensor(OPEN_CLIP_PREFIX + "transformer.resblocks.23.attn.in_proj_weight").any()
        assert OPEN_CLIP_PREFIX + "logit_scale" in keys
    assert not any(k.startswith(TEXT_PREFIX) for k in keys)


def test_sd21_configs_inferred(ours, references):
    text_config, vae_config, unet_config = ours["configs"]
    assert (text_config, vae_config, unet_config) == CONFIGS
    assert (text_config.layers, text_config.heads, text_config.hidden_act) == (23, 16, "gelu")
    assert (unet_config.num_head_channels, unet_config.use_linear_in_transformer, unet_config.upcast_attention,
            unet_config.context_dim) == (64, True, True, 1024)
    assert (ours["family"], ours["prediction"]) == ("SD 2.x", "v"), ours["prediction_source"]
    assert "768" in ours["prediction_source"]
    print(f"\nSD-2.1 parameters (text, VAE, UNet): ours {ours['counts']}, references {references['counts']}")
    assert ours["counts"] == references["counts"]


def test_sd21_simda_trainable_parameters(ours):
    """SimDA's adapters at the SD-2.1 size, counted on a UNet built on the meta device, as the loader
    builds it before copying the weights in (no memory, no weights needed)."""
    with torch.device("meta"):
        model = unet_module.UNet(unet_module.UNetConfig.sd2(), simda_config=adapters.SimDAConfig())
    trainable = sum(p.numel() for p in adapters.freeze_for_training(model))
    print(f"\nSD-2.1 SimDA: {adapters.trainable_summary(model)}")
    assert sum(p.numel() for p in model.parameters()) - trainable == ours["counts"][2]
    assert 0 < trainable < 0.05 * ours["counts"][2]


def test_sd21_tokenizer_matches_transformers(ours, expected):
    """Padded with 0 after <|endoftext|>, as OpenCLIP pads and diffusers' SD 2.x tokenizer does."""
    assert torch.equal(ours["ids"], expected["ids"])
    assert (ours["ids"][:, -1] == 0).all()


def test_sd21_text_encoder_matches_transformers(ours, expected):
    check_parity("SD-2.1 text encoder", ours, expected, "context")


def test_sd21_vae_matches_diffusers(ours, expected):
    check_parity("SD-2.1 VAE", ours, expected, "mean", "logvar", "decoded")


def test_sd21_unet_matches_diffusers(ours, expected):
    check_parity("SD-2.1 UNet", ours, expected, "eps")


def test_sd21_v_sampling_matches_diffusers_pipeline(ours, expected):
    """4 DDIM steps of v-prediction with classifier-free guidance 7.5, from the same starting latents."""
    check_parity(f"SD-2.1 {STEPS}-step guided v sampling", ours, expected, "sampled")


def test_sd21_diffusers_folder_loads_the_same_model(inputs, ours, references):
    """The same weights, renamed by diffusers and transformers, through the same code on the same CPU:
    the outputs are bit for bit the single file's. The prediction comes from the scheduler config
    (the folder's name says nothing). The pipeline is a temporary, freed once its outputs are computed."""
    pipe = simda.load_pipeline(references["folder"])
    theirs = dict(**facts(pipe), **outputs(pipe, inputs))
    del pipe
    gc.collect()
    assert theirs["configs"] == ours["configs"]
    assert (theirs["family"], theirs["prediction"]) == ("SD 2.x", "v")
    assert theirs["prediction_source"].startswith("scheduler/scheduler_config.json"), theirs["prediction_source"]
    for name, value in ours.items():
        if isinstance(value, torch.Tensor):
            print(f"\nSD-2.1 from the diffusers folder: {name} rel_err {rel_err(theirs[name], value):.1e}")
            assert torch.equal(theirs[name], value), name
