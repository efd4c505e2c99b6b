"""Parity at the full SD-1.5 size (860M UNet, 84M VAE, 123M text encoder), from one single-file
checkpoint written here with random perturbed weights in the official layout and loaded through
simda.load_pipeline, and once more from a diffusers-folder copy of the same weights.

The tests share nothing but module-scoped fixtures, so each passes alone and in any order, and each
big model is built once per module: `checkpoint` (the file), `ours` (our pipeline's outputs), and
`references` (transformers' and diffusers' models of the same weights), which gives `expected` (their
outputs) and `diffusers_folder` (them, saved as the Hub lays SD out). The three models are 4.3 GB
in any form, so each fixture frees them as soon as it has what it needs: at most two copies are
alive at once (a state dict and the models built from it).
Slow (a few minutes, ~9 GB of memory): marked `slow`, and run in CI all the same."""
import gc

import pytest
import torch
from safetensors.torch import load_file

import clip_text
import simda
import unet as unet_module
import vae as vae_module
from conftest import check_parity, rel_err, write_random_sd
from reference import diffusers_unet, diffusers_vae, save_diffusers_folder, transformers_clip

pytestmark = pytest.mark.slow
PROMPTS = ["a dog surfing", "a red circle moving right, oil painting, 4k"]


@pytest.fixture(scope="module")
def checkpoint(module_tmp_path):
    """Path of the three SD-1.5 models, every parameter perturbed, as one single file in the official
    layout. The state dict is not kept: alive beside the references and a pipeline, it would add 4.3 GB."""
    return write_random_sd(str(module_tmp_path / "v1-5-random.safetensors"),
                           (clip_text.CLIPTextConfig(), vae_module.VAEConfig(), unet_module.UNetConfig()), first_seed=0)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(images=torch.rand(2, 3, 64, 48, generator=g) * 2 - 1, latents=torch.randn(2, 4, 8, 6, generator=g),
                video=torch.randn(1, 4, 2, 8, 8, generator=g), t=torch.tensor([621]))


@torch.no_grad()
def outputs(pipe, inputs):
    ids = pipe.tokenizer(PROMPTS)
    context = pipe.text_encoder(ids)
    mean, logvar = pipe.vae.encode(inputs["images"])
    eps = pipe.unet(inputs["video"], inputs["t"], context[:1])
    return dict(ids=ids, context=context, mean=mean, logvar=logvar, decoded=pipe.vae.decode(inputs["latents"]), eps=eps)


@pytest.fixture(scope="module")
def ours(checkpoint, inputs):
    """Our pipeline loaded from the single file: its models' configs and parameter counts, and its
    outputs. The pipeline is freed here, so it is never alive beside the references."""
    pipe = simda.load_pipeline(checkpoint)
    models = (pipe.unet, pipe.vae, pipe.text_encoder)
    result = dict(configs=[m.config for m in models], counts=[sum(p.numel() for p in m.parameters()) for m in models],
                  **outputs(pipe, inputs))
    del pipe, models
    gc.collect()
    return result


@torch.no_grad()
def reference_outputs(text_encoder, vae, unet, inputs):
    """The references' outputs on `inputs`; the UNet's frame by frame, on the reference text context."""
    # The ids our pipeline feeds: its tokenizer is this one (clip_text's, with the shipped vocab).
    context = text_encoder(input_ids=clip_text.Tokenizer()(PROMPTS)).last_hidden_state
    posterior = vae.encode(inputs["images"]).latent_dist
    video, t = inputs["video"], inputs["t"]
    eps = torch.stack([unet(video[:, :, f], t, encoder_hidden_states=context[:1]).sample
                       for f in range(video.shape[2])], 2)
    return dict(context=context, mean=posterior.mean, logvar=posterior.logvar,
                decoded=vae.decode(inputs["latents"]).sample, eps=eps)


@pytest.fixture(scope="module")
def references(checkpoint, inputs, module_tmp_path):
    """transformers' CLIP text model and diffusers' VAE and UNet, holding the checkpoint's weights as
    those libraries' own LDM converters read them: their outputs on `inputs`, and a diffusers folder
    they are saved to. The models are freed here: alive while a pipeline loads, they would add 4.3 GB."""
    sd = load_file(checkpoint)
    models = (transformers_clip(ldm=sd, config=clip_text.CLIPTextConfig()),
              diffusers_vae(ldm=sd, config=vae_module.VAEConfig()),
              diffusers_unet(ldm=sd, config=unet_module.UNetConfig()))
    del sd
    gc.collect()
    folder = str(module_tmp_path / "diffusers")
    save_diffusers_folder(folder, *models)
    result = dict(expected=reference_outputs(*models, inputs), folder=folder)
    del models
    gc.collect()
    return result


@pytest.fixture(scope="module")
def expected(references):
    return references["expected"]


@pytest.fixture(scope="module")
def diffusers_folder(references):
    return references["folder"]


def test_full_size_configs_inferred(ours):
    unet_config, vae_config, text_config = ours["configs"]
    assert unet_config == unet_module.UNetConfig()
    assert vae_config == vae_module.VAEConfig()
    assert text_config == clip_text.CLIPTextConfig()
    assert ours["counts"] == [859_520_964, 83_653_863, 123_060_480]


def test_full_size_text_encoder_matches_transformers(ours, expected):
    check_parity("SD-1.5 text encoder", ours, expected, "context")


def test_full_size_vae_matches_diffusers(ours, expected):
    check_parity("SD-1.5 VAE", ours, expected, "mean", "logvar", "decoded")


def test_full_size_unet_matches_diffusers(ours, expected):
    check_parity("SD-1.5 UNet", ours, expected, "eps")


def test_full_size_diffusers_folder_loads_the_same_model(inputs, expected, diffusers_folder):
    # The pipeline is a temporary: freed as soon as its outputs are computed.
    ours = outputs(simda.load_pipeline(diffusers_folder), inputs)
    for name, value in expected.items():
        print(f"\nSD-1.5 from the diffusers folder: {name} rel_err {rel_err(ours[name], value):.1e}")
        assert rel_err(ours[name], value) <= 1e-4, name
