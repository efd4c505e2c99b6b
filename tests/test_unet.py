import pytest
import torch

import unet as U
from adapters import SimDAConfig
from conftest import op_log, rel_err, unet_inputs as inputs
from reference import diffusers_unet


@torch.no_grad()
def test_unet_matches_diffusers_frame_by_frame(tiny_unet):
    ours = tiny_unet
    ref = diffusers_unet(ours)
    x, t, ctx = inputs(ours.config)
    eps = ours(x, t, ctx)
    assert eps.shape == x.shape
    for f in range(x.shape[2]):
        expected = ref(x[:, :, f], t, encoder_hidden_states=ctx).sample
        assert rel_err(eps[:, :, f], expected) <= 1e-4


@torch.no_grad()
def test_unet_frames_are_independent_and_batched_like_images(tiny_unet):
    """The inflated SD UNet is a per-frame image model: frame f's output depends on frame f only."""
    ours = tiny_unet
    x, t, ctx = inputs(ours.config, b=1, frames=4)
    eps = ours(x, t, ctx)
    single = ours(x[:, :, 2:3], t, ctx)
    assert rel_err(eps[:, :, 2:3], single) <= 1e-5


@torch.no_grad()
def test_unet_from_diffusers_rename_round_trips(tiny_unet):
    ours = tiny_unet
    ref = diffusers_unet(ours)
    renamed = U.from_diffusers(ref.state_dict())
    expected = ours.state_dict()
    assert sorted(renamed) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(renamed[k], v), k


def test_unet_config_inferred_from_shapes():
    for cfg in (U.UNetConfig.tiny(), U.UNetConfig(), U.UNetConfig(channel_mult=(1, 2), num_res_blocks=3, attention_levels=(1,))):
        with torch.device("meta"):
            sd = U.UNet(cfg).state_dict()
        assert U.config_from_state_dict(sd, num_heads=8) == cfg


def test_unet_gradient_checkpointing_gives_same_gradients(tiny_unet):
    ours = tiny_unet
    x, t, ctx = inputs(ours.config, b=1, frames=2)
    grads = []
    for flag in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = flag
        loss = ours(x, t, ctx).square().mean()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in ours.parameters()]))
    assert rel_err(grads[1], grads[0]) <= 1e-5


@torch.no_grad()
def test_unet_odd_latent_sizes_match_diffusers(tiny_unet):
    """Any latent size works (any multiple of 8 in pixels): an Upsample lands on its skip's size."""
    ours = tiny_unet
    ref = diffusers_unet(ours)
    x, t, ctx = inputs(ours.config, frames=1, h=9, w=6)
    assert rel_err(ours(x, t, ctx)[:, :, 0], ref(x[:, :, 0], t, encoder_hidden_states=ctx).sample) <= 1e-4


def test_unet_rejects_image_shaped_input(tiny_unet):
    ours = tiny_unet
    x, t, ctx = inputs(ours.config)
    with pytest.raises(ValueError, match=r"\[B, C, F, h, w\]"):
        ours(x[:, :, 0], t, ctx)


@torch.no_grad()
def test_unet_forward_copies_nothing_from_the_host_and_fuses_every_attention(tiny_unet):
    """A SimDA forward after the first at a shape: no tensor made from Python data (aten.lift_fresh, a
    host-to-device copy that waits for the GPU: latent shift's index is cached), no read back to the host,
    and every attention (self with latent shift, cross) on SDPA's fused kernel, never its math fallback."""
    model = U.UNet(tiny_unet.config, SimDAConfig()).eval()
    x, t, ctx = inputs(model.config)
    model(x, 999, ctx)  # builds latent shift's index for these shapes
    for step in (999, t):  # a sampler's int, a training batch's tensor
        with op_log() as ops:
            model(x, step, ctx)
        assert not ops["aten.lift_fresh.default"] and not ops["aten._local_scalar_dense.default"], ops
        attentions = sum(isinstance(m, U.Attention) for m in model.modules())
        assert ops["aten._scaled_dot_product_flash_attention_for_cpu.default"] == attentions
        assert not ops["aten._safe_softmax.default"] and not ops["aten.bmm.default"]
