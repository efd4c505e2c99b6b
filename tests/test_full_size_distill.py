"""Consistency distillation at the full SD-1.5 size (random perturbed weights, one single file written here): two
train.py --distill steps on a captioned clip run, hold one UNet beside three adapter sets, save a distilled file
that sample.py's lcm sampler takes, and the saved target is the EMA of the student. Slow (a few minutes, ~9 GB of
memory, under `flock /work/bigmem.lock` on the shared machine): marked `slow`, and run in CI all the same."""
import gc
import os

import pytest
import torch

import clip_text
import simda
import train
import unet as unet_module
import vae as vae_module
from adapters import SimDAConfig
from conftest import perturb_adapters_, write_random_sd
from test_data import captioned

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def files(module_tmp_path):
    """(the SD-1.5 single file, teacher adapters for it with every weight off zero, a folder of one captioned clip)."""
    folder = module_tmp_path
    ckpt = write_random_sd(str(folder / "v1-5-random.safetensors"),
                           (clip_text.CLIPTextConfig(), vae_module.VAEConfig(), unet_module.UNetConfig()), first_seed=0)
    pipe = simda.load_pipeline(ckpt, simda_config=SimDAConfig())
    perturb_adapters_(pipe.unet, seed=1, scale=0.01)
    teacher = str(folder / "teacher.safetensors")
    simda.save_adapters(pipe.unet, teacher, frames=2, height=64, width=64, family=pipe.family, prediction="epsilon")
    del pipe
    gc.collect()
    videos = str(folder / "videos")
    captioned(videos, "a.mp4", "a red square", frames=4, height=64, width=64)
    return ckpt, teacher, videos


def test_two_distillation_steps_at_sd15_size_save_a_distilled_file(files, module_tmp_path):
    ckpt, teacher, videos = files
    out = str(module_tmp_path / "out")
    train.main(["--data", videos, "--ckpt", ckpt, "--distill", teacher, "--out", out, "--steps", "2", "--frames", "2",
                "--stride", "1", "--size", "64", "--batch-size", "1", "--caption-dropout", "0", "--precision", "float32",
                "--gradient-checkpointing", "--lr", "1e-4"])
    weights, meta = simda.read_adapters(os.path.join(out, "adapters.safetensors"))
    assert meta["distilled"]["teacher"] == teacher and meta["family"] == "SD 1.x" and len(weights) == 224
    state = torch.load(os.path.join(out, "state.pt"), weights_only=True)
    start = simda.read_adapters(teacher)[0]
    for k in list(weights)[:50]:  # the target moved 5% of the way from the teacher to the student, each step
        assert torch.isfinite(weights[k]).all() and state["target"][k].shape == start[k].shape
    moved = [k for k in weights if not weights[k].equal(start[k])]
    assert moved and all(not state["target"][k].equal(start[k]) for k in moved[:20])
    pipe = simda.load_pipeline(ckpt, adapters=os.path.join(out, "adapters.safetensors"))
    video = pipe("a red square", frames=2, height=64, width=64, steps=2, sampler="lcm", progress=False)
    assert video.shape == (1, 2, 64, 64, 3) and video.dtype == torch.uint8
