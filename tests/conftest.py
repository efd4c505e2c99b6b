"""What the tests share: the project root on sys.path, weight perturbation (of whole models or of
the adapters only), relative error, one thread for a module, a folder for a module's big files
(removed with the module), a random full-size SD written as one single file, the one tiny SD
(models, single-file checkpoint and UNet inputs) that the tests run on, and a log of the aten ops a
call dispatches (`op_log`)."""
import collections
import copy
import dataclasses
import gc
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the suite compares float32 results on every machine: `auto` stays float32 even on a bfloat16 CPU
# (tests/test_precision.py checks the bfloat16 choice itself); child processes inherit it
os.environ["SIMDA_CPU_BFLOAT16"] = "0"
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import clip_text  # noqa: E402
import unet as unet_module  # noqa: E402
import vae as vae_module  # noqa: E402
from adapters import is_adapter_key  # noqa: E402
from checkpoint import ldm_state_dict, save_safetensors  # noqa: E402


@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter (norm gains and biases included) away from its default init, so that a
    wiring bug (swapped norms, a missing bias, k/v swapped) cannot hide behind ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        spread = p.float().std().item() if p.numel() > 1 else 0.0
        scale = 0.5 * spread if spread > 0 else 0.1
        p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
    return module


@torch.no_grad()
def perturb_adapters_(unet: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add scale * N(0, 1) to every adapter parameter (is_adapter_key), in named_parameters order from
    one generator seeded `seed`: fresh adapters (zero-initialised outputs) then do mix frames."""
    g = torch.Generator().manual_seed(seed)
    for name, p in unet.named_parameters():
        if is_adapter_key(name):
            p.add_(scale * torch.randn(p.shape, generator=g))
    return unet


def write_random_sd(path, configs, first_seed):
    """Write (text encoder, VAE, UNet) of `configs` (text, VAE, UNet configs), model i built after
    torch.manual_seed(first_seed + i) and perturbed with seed first_seed + i, to `path` as one single
    file in the official layout (checkpoint.ldm_state_dict); return `path`. Neither the models nor the
    state dict outlive the call: at full size each is gigabytes."""
    models = []
    for i, (model_class, config) in enumerate(zip((clip_text.CLIPTextEncoder, vae_module.AutoencoderKL,
                                                   unet_module.UNet), configs)):
        torch.manual_seed(first_seed + i)
        models.append(perturb_(model_class(config), first_seed + i))
    save_file(ldm_state_dict(*models), path)
    del models
    gc.collect()
    return path


class op_log(TorchDispatchMode):
    """`with op_log() as ops:` counts every aten op dispatched inside, by name (`ops["aten.bmm.default"]`).
    What the GPU path cares about, seen on the CPU: `aten.lift_fresh` is a tensor made from Python data (a
    host-to-device copy on CUDA), `aten._local_scalar_dense` a read back to the host (`.item()`: a sync);
    `aten._scaled_dot_product_flash_attention_for_cpu` is SDPA's fused CPU kernel, while `aten._safe_softmax`
    and `aten.bmm` are its math fallback, which holds the whole score matrix."""

    def __enter__(self):
        self.counts = collections.Counter()
        super().__enter__()
        return self.counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref||, computed in float64."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return ((ours - ref).norm() / ref.norm()).item()


def check_parity(label, ours, expected, *keys, tolerance=1e-4):
    """For each key, rel_err(ours[key], expected[key]) printed (pytest -s shows it) and within `tolerance`."""
    for key in keys:
        err = rel_err(ours[key], expected[key])
        print(f"\n{label} {key} rel_err {err:.1e}")
        assert err <= tolerance, f"{label} {key}: rel_err {err:.2e} > {tolerance}"


@pytest.fixture(scope="module")
def module_tmp_path(request, tmp_path_factory):
    """A fresh folder for one module's big files (full-size checkpoints and references, training runs),
    removed when the module is done, passed or failed: they are gigabytes that a rerun writes again, and
    pytest would keep them with its last three runs' temporary folders (pytest.ini drops a passed
    test's `tmp_path`, and a passed run's whole folder, but a failed run's stays)."""
    path = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    yield path
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def one_thread():
    """One thread for a whole module (use with pytestmark = pytest.mark.usefixtures("one_thread")), as
    each torchrun process gets: faster on a shared machine, and the same numerics."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unet_inputs(config, b=2, frames=3, h=8, w=16, seed=1):
    """(latents [b, C, frames, h, w], timesteps [b], text context [b, 77, D]) for a UNet of `config`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, config.in_channels, frames, h, w, generator=g)
    return x, torch.tensor([999, 37])[:b], torch.randn(b, 77, config.context_dim, generator=g)


@pytest.fixture(scope="session")
def tiny_models():
    """(CLIP text encoder, VAE, UNet) at their tiny() configs, in eval mode, every parameter moved off
    its default init. Shared by every test: copy a model before changing it (see `tiny_unet`)."""
    torch.manual_seed(0)
    models = (clip_text.CLIPTextEncoder(clip_text.CLIPTextConfig.tiny()),
              vae_module.AutoencoderKL(vae_module.VAEConfig.tiny()), unet_module.UNet(unet_module.UNetConfig.tiny()))
    return tuple(perturb_(m, seed).eval() for seed, m in enumerate(models))


def tiny_sd2_configs():
    """(text, VAE, UNet) configs of a tiny SD 2.x: OpenCLIP-style text encoder (exact GELU, 64-channel
    heads), 64-channel UNet heads with linear projections and upcast attention, 128-wide context."""
    text = dataclasses.replace(clip_text.CLIPTextConfig.sd2(), width=128, layers=2, heads=2)
    unet = dataclasses.replace(unet_module.UNetConfig.sd2(), model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                               attention_levels=(0, 1), context_dim=128)
    return text, vae_module.VAEConfig.tiny(), unet


@pytest.fixture(scope="session")
def tiny_sd2_models():
    """(text encoder, VAE, UNet) of a tiny SD 2.x, eval mode, every parameter moved off its default init."""
    torch.manual_seed(0)
    text, vae, unet = tiny_sd2_configs()
    models = (clip_text.CLIPTextEncoder(text), vae_module.AutoencoderKL(vae), unet_module.UNet(unet))
    return tuple(perturb_(m, 10 + seed).eval() for seed, m in enumerate(models))


@pytest.fixture(scope="session")
def tiny_sd2_checkpoint(tiny_sd2_models, tmp_path_factory):
    """The tiny SD 2.x as one single file in the official layout (OpenCLIP text keys, written by
    checkpoint.ldm_state_dict). Its name says nothing about the prediction, so it loads as v."""
    path = str(tmp_path_factory.mktemp("tiny-sd2") / "tiny-sd2.safetensors")
    save_safetensors(ldm_state_dict(*tiny_sd2_models), path)
    return path


@pytest.fixture
def tiny_unet(tiny_models):
    """A fresh copy of the tiny SD UNet (no adapters), for a test to change."""
    return copy.deepcopy(tiny_models[2])


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_models, tmp_path_factory):
    """The tiny models as one single-file SD-1.x checkpoint in the official key layout: its path. The
    VAE downsamples by 2 and the UNet takes latent sides divisible by 4, so pixel sides of 8k work."""
    path = str(tmp_path_factory.mktemp("tiny") / "tiny.safetensors")
    save_safetensors(ldm_state_dict(*tiny_models), path)
    return path


@pytest.fixture(scope="module")
def given_frames_pipe(tiny_checkpoint):
    """The tiny SD with adapters off zero (the temporal layers mix frames), said to be trained with 2 given frames:
    a fresh one a module (tests/test_i2v.py, tests/test_long_video.py)."""
    import simda
    from adapters import SimDAConfig
    pipe = simda.load_pipeline(tiny_checkpoint, simda_config=SimDAConfig())
    perturb_adapters_(pipe.unet, seed=5)
    pipe.given_frames = 2
    return pipe
