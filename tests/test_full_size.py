"""Parity at the full SD-1.5 size (860M UNet, 84M VAE, 123M text encoder), from one single-file
checkpoint written here with random perturbed weights in the official layout and loaded through
simda.load_pipeline, and once more from a diffusers-folder copy of the same weights.
Slow (a few minutes, ~14 GB of memory): marked `slow`, and run in CI all the same."""
import gc

import pytest
import torch
from safetensors.torch import save_file

import clip_text
import simda
import unet as unet_module
import vae as vae_module
from conftest import perturb_, rel_err
from reference import diffusers_unet, diffusers_vae, save_diffusers_folder, transformers_clip

pytestmark = pytest.mark.slow
PROMPTS = ["a dog surfing", "a red circle moving right, oil painting, 4k"]


def full_size_checkpoint():
    """The three SD-1.5 models with every parameter perturbed, as one state dict in the official
    layout; built one model at a time to keep memory down."""
    sd = {}
    for seed, (prefix, model_class, config) in enumerate([
            (simda.TEXT_PREFIX, clip_text.CLIPTextEncoder, clip_text.CLIPTextConfig()),
            (simda.VAE_PREFIX, vae_module.AutoencoderKL, vae_module.VAEConfig()),
            (simda.UNET_PREFIX, unet_module.UNet, unet_module.UNetConfig())]):
        torch.manual_seed(seed)
        model = perturb_(model_class(config), seed)
        sd.update({prefix + k: v for k, v in model.state_dict().items()})
        del model
    return sd


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd15")
    sd = full_size_checkpoint()
    path = str(folder / "v1-5-random.safetensors")
    save_file(sd, path)
    g = torch.Generator().manual_seed(0)
    inputs = dict(images=torch.rand(2, 3, 64, 48, generator=g) * 2 - 1, latents=torch.randn(2, 4, 8, 6, generator=g),
                  video=torch.randn(1, 4, 2, 8, 8, generator=g), t=torch.tensor([621]))
    yield dict(sd=sd, path=path, folder=folder, pipe=simda.load_pipeline(path), inputs=inputs, expected={})


@torch.no_grad()
def outputs(pipe, inputs):
    ids = pipe.tokenizer(PROMPTS)
    context = pipe.text_encoder(ids)
    mean, logvar = pipe.vae.encode(inputs["images"])
    eps = pipe.unet(inputs["video"], inputs["t"], context[:1])
    return dict(ids=ids, context=context, mean=mean, logvar=logvar, decoded=pipe.vae.decode(inputs["latents"]), eps=eps)


def test_full_size_configs_inferred(state):
    pipe = state["pipe"]
    assert pipe.unet.config == unet_module.UNetConfig()
    assert pipe.vae.config == vae_module.VAEConfig()
    assert pipe.text_encoder.config == clip_text.CLIPTextConfig()
    counts = [sum(p.numel() for p in m.parameters()) for m in (pipe.unet, pipe.vae, pipe.text_encoder)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]
    state["ours"] = outputs(pipe, state["inputs"])


@torch.no_grad()
def test_full_size_text_encoder_matches_transformers(state):
    ref = transformers_clip(ldm=state["sd"], config=clip_text.CLIPTextConfig())
    context = ref(input_ids=state["ours"]["ids"]).last_hidden_state
    state["expected"]["context"] = context
    print(f"\nSD-1.5 text encoder rel_err {rel_err(state['ours']['context'], context):.1e}")
    assert rel_err(state["ours"]["context"], context) <= 1e-4


@torch.no_grad()
def test_full_size_vae_matches_diffusers(state):
    ref = diffusers_vae(ldm=state["sd"], config=vae_module.VAEConfig())
    posterior = ref.encode(state["inputs"]["images"]).latent_dist
    decoded = ref.decode(state["inputs"]["latents"]).sample
    state["expected"].update(mean=posterior.mean, logvar=posterior.logvar, decoded=decoded)
    for name in ("mean", "logvar", "decoded"):
        print(f"\nSD-1.5 VAE {name} rel_err {rel_err(state['ours'][name], state['expected'][name]):.1e}")
        assert rel_err(state["ours"][name], state["expected"][name]) <= 1e-4, name


@torch.no_grad()
def test_full_size_unet_matches_diffusers(state):
    ref = diffusers_unet(ldm=state["sd"], config=unet_module.UNetConfig())
    video, t, context = state["inputs"]["video"], state["inputs"]["t"], state["expected"]["context"][:1]
    eps = torch.stack([ref(video[:, :, f], t, encoder_hidden_states=context).sample for f in range(video.shape[2])], 2)
    state["expected"]["eps"] = eps
    print(f"\nSD-1.5 UNet rel_err {rel_err(state['ours']['eps'], eps):.1e}")
    assert rel_err(state["ours"]["eps"], eps) <= 1e-4
    state["references"] = (transformers_clip(ldm=state["sd"], config=clip_text.CLIPTextConfig()),
                           diffusers_vae(ldm=state["sd"], config=vae_module.VAEConfig()), ref)


def test_full_size_diffusers_folder_loads_the_same_model(state):
    folder = state["folder"] / "diffusers"
    save_diffusers_folder(str(folder), *state.pop("references"))
    del state["pipe"]
    gc.collect()
    ours = outputs(simda.load_pipeline(folder), state["inputs"])
    for name, expected in state["expected"].items():
        print(f"\nSD-1.5 from the diffusers folder: {name} rel_err {rel_err(ours[name], expected):.1e}")
        assert rel_err(ours[name], expected) <= 1e-4, name
