"""SimDA (adapters.py, wired into unet.py; adapter files in simda.py): zero-initialised adapters start as the SD UNet, latent-shift
attention (LSA) against slow references written here, the temporal reach of LSA and of the temporal
adapter, what trains (and its gradients, with and without gradient checkpointing), and saving and
loading the adapters on their own and through load_pipeline."""
import dataclasses
import math
import os

import pytest
import torch
from safetensors.torch import save_file

import adapters
import simda
import unet as U
from checkpoint import CheckpointError
from conftest import op_log, perturb_, rel_err, unet_inputs

ADAPTERS = (adapters.SpatialAdapter, adapters.TemporalAdapter)


def simda_unet(sd, config=None, seed=1):
    """A SimDA UNet holding the SD UNet's weights, its adapters at their fresh init. The key sets
    prove that the adapters, and only they, are what SimDA adds."""
    torch.manual_seed(seed)
    model = U.UNet(sd.config, config or adapters.SimDAConfig()).eval()
    result = model.load_state_dict(sd.state_dict(), strict=False)
    adapter_keys = set(adapters.adapter_state_dict(model))
    assert adapter_keys and all(adapters.is_adapter_key(k) for k in adapter_keys)
    assert not result.unexpected_keys
    assert set(result.missing_keys) == adapter_keys == set(model.state_dict()) - set(sd.state_dict())
    return model


def perturb_adapters_(model, seed=5):
    for i, m in enumerate(m for m in model.modules() if isinstance(m, ADAPTERS)):
        perturb_(m, seed + i)
    return model


def per_frame(model, x, t, ctx):
    return torch.cat([model(x[:, :, f:f + 1], t, ctx) for f in range(x.shape[2])], dim=2)


# 1. Zero-init identity

@torch.no_grad()
def test_fresh_adapters_on_one_frame_equal_the_sd_unet(tiny_unet):
    sd = tiny_unet
    model = simda_unet(sd)
    assert sum(isinstance(m, adapters.TemporalAdapter) for m in model.modules()) == 7  # one per SpatialTransformer
    assert sum(isinstance(m, adapters.SpatialAdapter) for m in model.modules()) == 14  # two per TransformerBlock
    x, t, ctx = unet_inputs(sd.config, w=12, frames=1)
    # one frame: LSA attends over [x, x], which is attention over x
    assert rel_err(model(x, t, ctx), sd(x, t, ctx)) <= 1e-5


@torch.no_grad()
def test_fresh_adapters_without_latent_shift_equal_the_sd_unet_per_frame(tiny_unet):
    sd = tiny_unet
    model = simda_unet(sd, adapters.SimDAConfig(latent_shift=False))
    x, t, ctx = unet_inputs(sd.config, w=12, frames=4)
    assert rel_err(model(x, t, ctx), per_frame(sd, x, t, ctx)) <= 1e-5


@torch.no_grad()
def test_latent_shift_makes_later_frames_differ_from_per_frame(tiny_unet):
    sd = tiny_unet
    model = simda_unet(sd)
    x, t, ctx = unet_inputs(sd.config, w=12, frames=4)
    eps, expected = model(x, t, ctx), per_frame(sd, x, t, ctx)
    # frame 0 has no earlier frames: its shifted tokens are its own
    assert rel_err(eps[:, :, 0], expected[:, :, 0]) <= 1e-5
    for f in range(1, 4):
        assert rel_err(eps[:, :, f], expected[:, :, f]) > 1e-2, f


# 2. Latent shift and LSA against slow references

def slow_shift(tokens, frames, height, width):
    """Token (i, j) of frame f comes from frame f - SHIFT_TABLE[i % 4][j % 4], or f itself when that is < 0."""
    out = torch.empty_like(tokens)
    for b in range(tokens.shape[0] // frames):
        for f in range(frames):
            for i in range(height):
                for j in range(width):
                    source = f - adapters.SHIFT_TABLE[i % 4][j % 4]
                    source = source if source >= 0 else f
                    out[b * frames + f, i * width + j] = tokens[b * frames + source, i * width + j]
    return out


@pytest.mark.parametrize("height,width", [(5, 7), (4, 6), (8, 8)])
@pytest.mark.parametrize("frames", [1, 2, 3, 6])
def test_latent_shift_matches_slow_reference(frames, height, width):
    b, c = 2, 3
    # every value names its batch, frame, position and channel
    tokens = torch.arange(b * frames * height * width * c, dtype=torch.float32).reshape(b * frames, height * width, c)
    shifted = adapters.latent_shift(tokens, frames, height, width)
    assert torch.equal(shifted, slow_shift(tokens, frames, height, width))
    if frames > 1:
        assert not torch.equal(shifted, tokens)


def slow_lsa_attention(attn, h, frames, height, width):
    """Per frame: queries from the frame's tokens; keys and values from the frame's tokens and their
    latent shift; multi-head softmax attention written out, in float64."""
    w = {k: v.double() for k, v in attn.state_dict().items()}
    h = h.double()
    shifted = slow_shift(h, frames, height, width)
    d = h.shape[-1] // attn.heads
    out = torch.empty_like(h)
    for bf in range(h.shape[0]):
        keys = torch.cat([h[bf], shifted[bf]])
        q, k, v = h[bf] @ w["to_q.weight"].T, keys @ w["to_k.weight"].T, keys @ w["to_v.weight"].T
        heads = []
        for head in range(attn.heads):
            part = slice(head * d, (head + 1) * d)
            scores = q[:, part] @ k[:, part].T / math.sqrt(d)
            weights = (scores - scores.max(-1, keepdim=True).values).exp()
            heads.append(weights / weights.sum(-1, keepdim=True) @ v[:, part])
        out[bf] = torch.cat(heads, -1) @ w["to_out.0.weight"].T + w["to_out.0.bias"]
    return out


@torch.no_grad()
def test_lsa_attention_matches_slow_reference():
    torch.manual_seed(0)
    block = perturb_(U.TransformerBlock(16, 2, 8, adapters.SimDAConfig(spatial_adapters=False))).eval()
    frames, height, width = 3, 2, 3
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2 * frames, height * width, 16, generator=g), torch.randn(2 * frames, 5, 8, generator=g)
    captured = []
    handle = block.attn1.register_forward_hook(lambda module, args, output: captured.append(output))
    block(x, ctx, frames, height, width)
    handle.remove()
    expected = slow_lsa_attention(block.attn1, block.norm1(x), frames, height, width)
    assert rel_err(captured[0], expected) <= 1e-5


# 3. Temporal causality and reach

def changed_frames(run, x, k, frame_dim):
    """The frames of run(x) that change when frame k of x changes."""
    g = torch.Generator().manual_seed(k)
    y = x.clone()
    y.select(frame_dim, k).add_(torch.randn(y.select(frame_dim, k).shape, generator=g))
    a, b = run(x), run(y)
    return [f for f in range(x.shape[frame_dim]) if not torch.equal(a.select(frame_dim, f), b.select(frame_dim, f))]


@torch.no_grad()
def test_latent_shift_block_is_causal_and_reaches_four_frames_back():
    torch.manual_seed(0)
    config = adapters.SimDAConfig(spatial_adapters=False, temporal_adapters=False)
    block = perturb_(U.TransformerBlock(16, 2, 8, config)).eval()
    assert block.attn_adapter is None and block.ffn_adapter is None and block.latent_shift
    frames, height, width = 7, 4, 4  # 4x4 holds every entry of the shift table
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(frames, height * width, 16, generator=g), torch.randn(frames, 5, 8, generator=g)
    tokens = x.reshape(1, frames, height * width, 16)

    def run(tokens):
        return block(tokens.reshape(frames, height * width, 16), ctx, frames, height, width).reshape(tokens.shape)

    for k in (0, 1, 3, 6):
        # frame f sees frames f-4 .. f (the largest shift is 4): a change in frame k reaches k .. k+4
        assert changed_frames(run, tokens, k, 1) == list(range(k, min(k + 5, frames))), k


@torch.no_grad()
def test_temporal_adapter_reaches_one_frame_each_side():
    torch.manual_seed(0)
    adapter = perturb_(adapters.TemporalAdapter(32, 0.5))
    assert adapter.up.weight.abs().min() > 0
    x = torch.randn(2, 32, 7, 3, 5, generator=torch.Generator().manual_seed(1))
    for k in (0, 1, 3, 6):
        assert changed_frames(adapter, x, k, 2) == [f for f in (k - 1, k, k + 1) if 0 <= f < 7], k


# 4. Gradients

def adapter_grads(model, x, t, ctx):
    model.zero_grad(set_to_none=True)
    loss = model(x, t, ctx).square().mean()
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if adapters.is_adapter_key(name)}


def test_only_adapters_get_gradients_and_every_adapter_does(tiny_unet):
    model = perturb_adapters_(simda_unet(tiny_unet)).train()
    adapters.freeze_for_training(model)
    x, t, ctx = unet_inputs(model.config, w=12, b=1, frames=3)
    adapter_grads(model, x, t, ctx)
    for name, p in model.named_parameters():
        if adapters.is_adapter_key(name):
            assert p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert p.grad is None, name


def test_at_init_only_the_up_projections_get_gradients(tiny_unet):
    """Zero-initialised up-projections block the gradient to everything below them: training
    starts by moving `up`, and `down` / `conv` follow from the next step on."""
    model = simda_unet(tiny_unet).train()
    adapters.freeze_for_training(model)
    x, t, ctx = unet_inputs(model.config, w=12, b=1, frames=3)
    _, grads = adapter_grads(model, x, t, ctx)
    for name, grad in grads.items():
        if ".up." in name:
            assert grad.abs().max() > 0, name
        else:
            assert torch.count_nonzero(grad) == 0, name


def test_gradient_checkpointing_gives_the_same_adapter_gradients(tiny_unet):
    model = perturb_adapters_(simda_unet(tiny_unet)).train()
    adapters.freeze_for_training(model)
    x, t, ctx = unet_inputs(model.config, w=12, b=1, frames=3)
    runs = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        runs.append(adapter_grads(model, x, t, ctx))
    (loss, grads), (loss_ckpt, grads_ckpt) = runs
    assert rel_err(loss_ckpt, loss) <= 1e-5
    # the official code's checkpointed path skipped the temporal adapters: check them by name
    temporal = [k for k in grads if "temporal_adapter." in k]
    assert len(temporal) == 7 * 6
    for name in grads:
        assert grads_ckpt[name] is not None, name
        assert rel_err(grads_ckpt[name], grads[name]) <= 1e-5, name


# 5. freeze_for_training

def expected_adapter_parameters(model, config):
    """The adapters' size from the paper's definitions, per SpatialTransformer of width d: two
    linear bottlenecks d -> d*spatial_ratio -> d, and 1x1x1 conv d -> h, depth-wise 3x1x1 conv over
    time, 1x1x1 conv h -> d with h = d*temporal_ratio (all with biases)."""
    count = 0
    for m in model.modules():
        if isinstance(m, U.SpatialTransformer):
            d = m.proj_in.in_channels
            s, h = int(d * config.spatial_ratio), int(d * config.temporal_ratio)
            count += 2 * (d * s + s + s * d + d) + (d * h + h) + (3 * h + h) + (h * d + d)
    return count


def test_freeze_for_training_trains_exactly_the_adapters(capsys, tiny_unet):
    config = adapters.SimDAConfig()
    model = simda_unet(tiny_unet, config)
    trainable = adapters.freeze_for_training(model)
    assert capsys.readouterr() == ("", "")
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in trainable) == sorted(adapters.adapter_state_dict(model))
    for name, p in model.named_parameters():
        assert p.requires_grad == adapters.is_adapter_key(name), name
    assert sum(p.numel() for p in trainable) == expected_adapter_parameters(model, config)
    assert len(trainable) == 7 * 6 + 14 * 4
    with pytest.raises(ValueError, match="no adapters to train"):
        adapters.freeze_for_training(tiny_unet)


def test_sd15_size_trains_about_24m_parameters():
    config = adapters.SimDAConfig()
    with torch.device("meta"):
        model = U.UNet(U.UNetConfig(), config)
    count = sum(p.numel() for p in adapters.freeze_for_training(model))
    total = sum(p.numel() for p in model.parameters())
    print(f"\nSimDA at SD-1.5 size: {count:,} trainable of {total:,} UNet parameters")
    assert count == expected_adapter_parameters(model, config)
    assert 20e6 <= count <= 30e6  # the paper: ~24M


# 6. Saving and loading the adapters

def test_adapters_round_trip_with_metadata(tmp_path, tiny_unet):
    sd = tiny_unet
    config = adapters.SimDAConfig(spatial_ratio=0.5, temporal_ratio=0.25)
    source = perturb_adapters_(simda_unet(sd, config))
    path = str(tmp_path / "adapters.safetensors")
    simda.save_adapters(source, path, prompt="a dog surfing, 4k", frames=8, size=[256, 384], base="v1-5.safetensors")
    assert os.listdir(tmp_path) == ["adapters.safetensors"]  # the temporary file is gone
    weights, meta = simda.read_adapters(path)
    assert meta == {"simda_config": dataclasses.asdict(config), "prompt": "a dog surfing, 4k", "frames": 8,
                    "size": [256, 384], "base": "v1-5.safetensors"}
    fresh = simda_unet(sd, adapters.SimDAConfig(**meta["simda_config"]), seed=7)
    simda.load_adapters(fresh, weights, path)
    expected = adapters.adapter_state_dict(source)
    loaded = adapters.adapter_state_dict(fresh)
    assert sorted(loaded) == sorted(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    x, t, ctx = unet_inputs(sd.config, w=12, frames=3)
    with torch.no_grad():
        assert torch.equal(fresh(x, t, ctx), source(x, t, ctx))


@pytest.fixture
def checkpoint(tiny_checkpoint, tiny_models):
    """The tiny SD-1.x single-file checkpoint and its plain UNet."""
    return tiny_checkpoint, tiny_models[2]


@pytest.mark.parametrize("config", [adapters.SimDAConfig(spatial_ratio=0.5),
                                    adapters.SimDAConfig(temporal_adapters=False, latent_shift=False)])
def test_load_pipeline_takes_the_adapter_files_config(tmp_path, checkpoint, config):
    path, sd = checkpoint
    source = perturb_adapters_(simda_unet(sd, config))
    adapter_file = str(tmp_path / "adapters.safetensors")
    simda.save_adapters(source, adapter_file, prompt="a cat", frames=4)
    pipe = simda.load_pipeline(path, adapters=adapter_file)
    assert pipe.unet.simda_config == config
    expected, loaded = source.state_dict(), pipe.unet.state_dict()
    assert sorted(loaded) == sorted(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    x, t, ctx = unet_inputs(sd.config, w=12, frames=3)
    with torch.no_grad():  # not bitwise: frozen weights take another CPU kernel path
        assert rel_err(pipe.unet(x, t, ctx), source(x, t, ctx)) <= 1e-5


def test_sd_weights_load_into_a_simda_pipeline_with_adapters_at_init(checkpoint):
    path, sd = checkpoint
    pipe = simda.load_pipeline(path, simda_config=adapters.SimDAConfig())
    loaded, expected = pipe.unet.state_dict(), sd.state_dict()
    assert {k for k in loaded if not adapters.is_adapter_key(k)} == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    modules = [m for m in pipe.unet.modules() if isinstance(m, ADAPTERS)]
    assert len(modules) == 21
    for m in modules:
        assert not m.up.weight.any() and not m.up.bias.any()
        for layer in [m.down] + ([m.conv] if isinstance(m, adapters.TemporalAdapter) else []):
            # the default init, not whatever the meta -> empty allocation left there
            bound = 1 / math.sqrt(layer.weight[0].numel())
            assert 0 < layer.weight.std() and layer.weight.abs().max() <= bound
    x, t, ctx = unet_inputs(sd.config, w=12, frames=1)
    with torch.no_grad():
        assert rel_err(pipe.unet(x, t, ctx), sd(x, t, ctx)) <= 1e-5


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_the_sampling_loop_hands_the_unet_tensor_timesteps_and_copies_nothing_from_the_host(checkpoint, sampler,
                                                                                             monkeypatch):
    """The timestep reaches the UNet as a tensor (torch.compile takes a Python int for a constant: every step
    compiled the whole UNet again), and the loop makes no tensor from Python data and reads nothing back."""
    pipe = simda.load_pipeline(checkpoint[0], simda_config=adapters.SimDAConfig())
    seen, forward = [], pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda x, t, *args: seen.append(t) or forward(x, t, *args))
    context, x = pipe.guided_context(["a cat"], "", 7.5), torch.randn(1, 4, 3, 8, 8)
    pipe.denoise(x, context, 2, progress=False, sampler=sampler)  # builds latent shift's index for these shapes
    with op_log() as ops:
        pipe.denoise(x, context, 3, progress=False, sampler=sampler)
    assert len(seen) == 5 and all(torch.is_tensor(t) and t.dtype == torch.long and t.shape == (2,) for t in seen)
    assert not ops["aten.lift_fresh.default"] and not ops["aten._local_scalar_dense.default"], ops


def save_other(tmp_path, name, unet_config, config):
    """An adapter file from a SimDA UNet of another shape."""
    torch.manual_seed(0)
    path = str(tmp_path / name)
    simda.save_adapters(U.UNet(unet_config, config), path)
    return path


def expect_error(call, *fragments):
    with pytest.raises(CheckpointError) as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_adapters_that_do_not_fit_are_listed(tmp_path, checkpoint):
    path, sd = checkpoint
    tiny = U.UNetConfig.tiny()
    model = simda_unet(sd)

    wide = save_other(tmp_path, "wide.safetensors", dataclasses.replace(tiny, model_channels=64), adapters.SimDAConfig())
    weights, _ = simda.read_adapters(wide)
    expect_error(lambda: simda.load_adapters(model, weights, wide), "wide.safetensors does not fit this UNet",
                 "shape mismatch at input_blocks.1.1.temporal_adapter.down.weight: expected (16, 32, 1, 1, 1), "
                 "found (32, 64, 1, 1, 1)")
    # through load_pipeline the UNet's config comes from the checkpoint, the SimDA config from the file
    expect_error(lambda: simda.load_pipeline(path, adapters=wide), "does not fit this UNet", "shape mismatch")

    spatial_only = save_other(tmp_path, "spatial.safetensors", tiny, adapters.SimDAConfig(temporal_adapters=False))
    weights, _ = simda.read_adapters(spatial_only)
    expect_error(lambda: simda.load_adapters(model, weights, spatial_only), "42 missing keys", "temporal_adapter")

    plain_spatial = simda_unet(sd, adapters.SimDAConfig(temporal_adapters=False))
    weights, _ = simda.read_adapters(save_other(tmp_path, "all.safetensors", tiny, adapters.SimDAConfig()))
    expect_error(lambda: simda.load_adapters(plain_spatial, weights), "42 unexpected keys", "temporal_adapter")


def test_missing_and_foreign_adapter_files_are_named(tmp_path, checkpoint):
    path, _ = checkpoint
    missing = str(tmp_path / "nope.safetensors")
    expect_error(lambda: simda.read_adapters(missing), "adapter file not found", "nope.safetensors")
    expect_error(lambda: simda.load_pipeline(path, adapters=missing), "adapter file not found")
    foreign = str(tmp_path / "lora.safetensors")
    save_file({"lora_unet_down.weight": torch.zeros(2)}, foreign)
    expect_error(lambda: simda.read_adapters(foreign), "lora.safetensors is not a SimDA adapter file")
    expect_error(lambda: simda.load_pipeline(path, adapters=foreign), "not a SimDA adapter file")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    expect_error(lambda: simda.read_adapters(str(broken)), "is not a readable adapter file")
