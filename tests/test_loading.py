"""simda.load_pipeline: the official single-file layout, .ckpt pickles, diffusers folders, and the
errors a user sees for a checkpoint that is missing, of another family, or does not fit."""
import copy

import pytest
import torch
from safetensors.torch import save_file

import checkpoint
import simda
from checkpoint import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, CheckpointError, ldm_state_dict as ldm_checkpoint
from reference import diffusers_unet, diffusers_vae, save_diffusers_folder, transformers_clip

DDPM_BUFFERS = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2"]


def real_file_extras(sd):
    """What real SD-1.x files hold besides the three models: an EMA copy, DDPM buffers, position_ids."""
    extras = {name: torch.rand(1000) for name in DDPM_BUFFERS}
    extras["model_ema.decay"] = torch.tensor(0.9999)
    extras.update({"model_ema.diffusion_model" + k[len(UNET_PREFIX):].replace(".", ""): v
                   for k, v in list(sd.items())[:5] if k.startswith(UNET_PREFIX)})
    extras[TEXT_PREFIX + "embeddings.position_ids"] = torch.arange(77)[None]
    return {**sd, **extras}


@torch.no_grad()
def outputs(text_encoder, vae, unet):
    # both sides run frozen, as a loaded pipeline is: on an AMX CPU the UNet's kernels differ with the
    # weights' requires_grad (by 1.3e-6 on the tiny SD 2.x), which would hide nothing but fail torch.equal
    text_encoder, vae, unet = (copy.deepcopy(m).requires_grad_(False) for m in (text_encoder, vae, unet))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    images = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    x = torch.randn(1, 4, 2, 8, 8, generator=g)
    ctx = torch.randn(1, 77, unet.config.context_dim, generator=g)
    return [text_encoder(ids), *vae.encode(images), vae.decode(x[:, :, 0]), unet(x, torch.tensor([500]), ctx)]


def test_single_file_checkpoint_consumes_every_key(tmp_path, tiny_models):
    sd = ldm_checkpoint(*tiny_models)
    path = str(tmp_path / "tiny.safetensors")
    save_file(real_file_extras(sd), path)
    pipe = simda.load_pipeline(path)
    loaded = ldm_checkpoint(pipe.text_encoder, pipe.vae, pipe.unet)
    assert sorted(loaded) == sorted(sd)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert pipe.unet.config == tiny_models[2].config and pipe.vae.config == tiny_models[1].config
    assert pipe.text_encoder.config == tiny_models[0].config
    for ours, expected in zip(outputs(pipe.text_encoder, pipe.vae, pipe.unet), outputs(*tiny_models)):
        assert torch.equal(ours, expected)
    assert not any(p.requires_grad for m in (pipe.text_encoder, pipe.vae, pipe.unet) for p in m.parameters())
    assert pipe.tokenizer(["a photo of a cat"])[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_a_checkpoint_is_read_one_tensor_at_a_time_in_the_model_dtype_and_held_without_a_copy(tmp_path, tiny_models,
                                                                                           monkeypatch):
    """Each tensor is cast as it is read (the UNet and text encoder in bfloat16, the VAE float32, the EMA copy not
    read), the file is reopened every READ_BYTES, and the models hold the very tensors that were read."""
    sd = ldm_checkpoint(*tiny_models)
    path = str(tmp_path / "tiny.safetensors")
    save_file(real_file_extras(sd), path)
    monkeypatch.setattr(checkpoint, "READ_BYTES", 2**14)  # dozens of reopenings of this 1 MB file
    read, read_tensors = {}, checkpoint.read_tensors
    monkeypatch.setattr(checkpoint, "read_tensors", lambda *args: read.update(read_tensors(*args)) or dict(read))
    pipe = simda.load_pipeline(path, dtype=torch.bfloat16)
    assert not any(k.startswith("model_ema.") for k in read)
    assert {v.dtype for k, v in read.items() if k.startswith(VAE_PREFIX)} == {torch.float32}
    assert {v.dtype for k, v in read.items() if k.startswith((UNET_PREFIX, TEXT_PREFIX)) and v.is_floating_point()} \
        == {torch.bfloat16}
    pointers = {v.data_ptr() for v in read.values()}
    models = (pipe.text_encoder, pipe.vae, pipe.unet)
    assert all(p.data_ptr() in pointers for m in models for p in m.parameters())  # no copy
    loaded = ldm_checkpoint(*models)
    assert all(torch.equal(loaded[k], sd[k].to(loaded[k].dtype)) for k in sd)


@pytest.mark.parametrize("wrapped", [True, False])
def test_ckpt_pickle_loads_weights_only(tmp_path, tiny_models, wrapped):
    sd = ldm_checkpoint(*tiny_models)
    path = str(tmp_path / "tiny.ckpt")
    torch.save({"state_dict": sd, "global_step": 470000} if wrapped else sd, path)
    pipe = simda.load_pipeline(path, dtype=torch.float16)
    assert pipe.unet.out[2].weight.dtype == torch.float16
    assert torch.equal(pipe.unet.out[2].weight, tiny_models[2].out[2].weight.half())


def test_diffusers_folder_loads_the_same_weights(tmp_path, tiny_models):
    text_encoder, vae, unet = tiny_models
    save_diffusers_folder(str(tmp_path), transformers_clip(text_encoder), diffusers_vae(vae), diffusers_unet(unet))
    pipe = simda.load_pipeline(tmp_path)
    assert pipe.tokenizer.vocab_file == str(tmp_path / "tokenizer" / "vocab.json")
    for ours, expected in zip(outputs(pipe.text_encoder, pipe.vae, pipe.unet), outputs(*tiny_models)):
        assert torch.equal(ours, expected)


def expect_error(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        simda.load_pipeline(path)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_missing_and_unreadable_files_are_named(tmp_path):
    expect_error(tmp_path / "nope.safetensors", "checkpoint not found", "nope.safetensors")
    bad = tmp_path / "notes.ckpt"
    bad.write_text("not a checkpoint")
    expect_error(bad, "is not a readable checkpoint", "notes.ckpt")
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 64)
    expect_error(bad, "is not a readable checkpoint")
    expect_error(tmp_path, "has no unet/ weights")


def test_other_model_families_are_recognised(tmp_path):
    path = str(tmp_path / "other.safetensors")
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(2)}, path)
    expect_error(path, "SDXL is not supported")
    save_file({"encoder.layers.0.weight": torch.zeros(2)}, path)
    expect_error(path, "not a Stable Diffusion checkpoint")


def test_missing_unexpected_and_misshapen_keys_are_listed(tmp_path, tiny_models):
    sd = ldm_checkpoint(*tiny_models)
    path = str(tmp_path / "bad.safetensors")
    dropped = [k for k in sd if k.startswith(UNET_PREFIX + "output_blocks.")][:12]
    save_file({k: v for k, v in sd.items() if k not in dropped}, path)
    expect_error(path, "12 missing keys", dropped[0][len(UNET_PREFIX):], "and 2 more")

    save_file({**sd, "cond_stage_model.extra.weight": torch.zeros(1)}, path)
    expect_error(path, "1 unexpected keys: cond_stage_model.extra.weight")

    save_file({**sd, UNET_PREFIX + "middle_block.3.weight": torch.zeros(1)}, path)
    expect_error(path, "UNet weights do not fit", "1 unexpected keys: middle_block.3.weight")

    key = VAE_PREFIX + "quant_conv.bias"
    save_file({**sd, key: torch.zeros(5)}, path)
    expect_error(path, "shape mismatch at quant_conv.bias: expected (8,), found (5,)")


def test_head_counts_come_from_the_family_and_are_checked_against_the_widths(tmp_path, tiny_models):
    """No weight's shape holds a head count: SD 1.x fixes 8 UNet heads and 64-channel CLIP heads
    (12 at CLIP-L's width 768). A width those do not divide is a clear error, not a silent misload."""
    import clip_text
    import unet as unet_module
    from checkpoint import SD1

    assert (SD1.unet_heads, SD1.text_head_width) == (8, 64)
    with torch.device("meta"):
        sd = unet_module.UNet(unet_module.UNetConfig()).state_dict()
        assert unet_module.config_from_state_dict(sd, SD1.unet_heads).num_heads == 8
        with pytest.raises(ValueError, match=r"\[320, 640, 1280\] channels wide, which 12 heads do not divide"):
            unet_module.config_from_state_dict(sd, 12)
        text = clip_text.CLIPTextEncoder(clip_text.CLIPTextConfig()).state_dict()
        assert clip_text.config_from_state_dict(text, SD1.text_head_width).heads == 12
    odd = clip_text.CLIPTextEncoder(clip_text.CLIPTextConfig(width=96, layers=1, heads=1))
    path = str(tmp_path / "odd.safetensors")
    save_file(ldm_checkpoint(odd, *tiny_models[1:]), path)
    expect_error(path, "cannot infer the text encoder configuration", "96 wide, which 64-channel heads do not divide")
