"""The VAE matches diffusers' AutoencoderKL, loads diffusers files, and handles chunks and odd sizes."""
import pytest
import torch

from conftest import op_log, perturb_, rel_err
from reference import diffusers_vae
from vae import AutoencoderKL, VAEConfig, config_from_state_dict, from_diffusers, sample


def tiny_pair(seed=0):
    """Our tiny VAE (perturbed, chunk size 2) and the diffusers VAE loaded from its converted weights."""
    torch.manual_seed(seed)
    ours = perturb_(AutoencoderKL(VAEConfig.tiny(), chunk_size=2), seed).eval()
    return ours, diffusers_vae(ours)


def images(n=3, h=32, w=32, seed=1):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def test_vae_encode_matches_diffusers():
    ours, ref = tiny_pair()
    x = images()
    mean, logvar = ours.encode(x)
    posterior = ref.encode(x).latent_dist
    assert mean.shape == (3, 4, 16, 16)
    assert rel_err(mean, posterior.mean) <= 1e-4
    assert rel_err(logvar, posterior.logvar) <= 1e-4


@torch.no_grad()
def test_vae_decode_matches_diffusers():
    ours, ref = tiny_pair()
    z = torch.randn(3, 4, 16, 12, generator=torch.Generator().manual_seed(2))
    out = ours.decode(z)
    assert out.shape == (3, 3, 32, 24)
    assert rel_err(out, ref.decode(z).sample) <= 1e-4


@torch.no_grad()
def test_from_diffusers_round_trips_the_reference_weights():
    ours, ref = tiny_pair()
    loaded = AutoencoderKL(VAEConfig.tiny(), chunk_size=2).eval()
    loaded.load_state_dict(from_diffusers(ref.state_dict()), strict=True)
    x = images()
    for a, b in zip(loaded.encode(x), ours.encode(x)):
        assert torch.equal(a, b)
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded.decode(z), ours.decode(z))


def test_from_diffusers_accepts_old_attention_names():
    _, ref = tiny_pair()
    new = ref.state_dict()
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in new.items():
        for a, b in old_names.items():
            k = k.replace(f"attentions.0.{a}.", f"attentions.0.{b}.")
        old[k] = v
    assert any(".proj_attn." in k for k in old)
    converted_new, converted_old = from_diffusers(new), from_diffusers(old)
    assert converted_new.keys() == converted_old.keys()
    assert converted_old["decoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)


@torch.no_grad()
def test_vae_non_square_and_chunked_encode_equals_unchunked():
    ours, ref = tiny_pair()
    x = images(h=48, w=32)
    mean, logvar = ours.encode(x)  # chunks of 2 + 1
    assert mean.shape == (3, 4, 24, 16)
    mean_all, logvar_all = ours.encode(x, chunk_size=8)
    torch.testing.assert_close(mean, mean_all)
    torch.testing.assert_close(logvar, logvar_all)
    assert rel_err(mean, ref.encode(x).latent_dist.mean) <= 1e-4
    torch.testing.assert_close(ours.decode(mean), ours.decode(mean, chunk_size=8))
    z = sample(mean, logvar, generator=torch.Generator().manual_seed(0))
    assert z.shape == mean.shape and not torch.equal(z, mean)


def test_vae_rejects_size_not_divisible_by_the_downsampling_factor():
    ours = AutoencoderKL(VAEConfig.tiny())  # factor 2
    with pytest.raises(ValueError, match="divisible by 2"):
        ours.encode(images(n=1, h=32, w=33))
    with torch.device("meta"):
        sd15 = AutoencoderKL(VAEConfig())  # factor 8
    with pytest.raises(ValueError, match="divisible by 8, got 36x64"):
        sd15.encode(torch.zeros(1, 3, 36, 64, device="meta"))


@pytest.mark.parametrize("cfg", [VAEConfig.tiny(), VAEConfig()], ids=["tiny", "sd15"])
def test_config_from_state_dict_round_trips(cfg):
    with torch.device("meta"):
        m = AutoencoderKL(cfg)
    assert config_from_state_dict(m.state_dict()) == cfg


@torch.no_grad()
def test_video_encode_and_decode_are_the_image_ones_frame_by_frame():
    ours, _ = tiny_pair()
    video = torch.rand(2, 3, 3, 16, 24, generator=torch.Generator().manual_seed(4)) * 2 - 1  # [B, C, F, H, W]
    mean, logvar = ours.encode_video(video)
    assert mean.shape == logvar.shape == (2, 4, 3, 8, 12)
    for f in range(3):
        frame_mean, frame_logvar = ours.encode(video[:, :, f])
        assert torch.allclose(mean[:, :, f], frame_mean, atol=1e-6) and torch.allclose(logvar[:, :, f], frame_logvar, atol=1e-6)
    decoded = ours.decode_video(mean)
    assert decoded.shape == video.shape
    assert torch.allclose(decoded[:, :, 1], ours.decode(mean[:, :, 1]), atol=1e-6)
    with pytest.raises(ValueError, match=r"a video \[B, C, F, H, W\]"):
        ours.encode_video(video[:, :, 0])


FUSED = "aten._scaled_dot_product_flash_attention_for_cpu.default"
MATH = ("aten._safe_softmax.default", "aten.bmm.default")  # SDPA's math fallback: the whole score matrix


@torch.no_grad()
def test_vae_attention_runs_the_fused_kernel():
    """The middle attention of the encoder and of the decoder (one head as wide as the channels) hands SDPA
    contiguous q/k/v: the fused kernel, never the math fallback that holds [h*w, h*w] scores."""
    ours, _ = tiny_pair()
    with op_log() as ops:
        ours.decode(ours.encode(torch.rand(1, 3, 16, 24) * 2 - 1)[0])
    assert ops[FUSED] == 2 and not any(ops[op] for op in MATH), ops
