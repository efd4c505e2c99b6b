"""train_image.py, stage 1 of the demo model: a short run writes a VAE and a single-file SD checkpoint
that simda.load_pipeline loads, and a run stopped at a save equals a run of that many steps (the
training does not depend on the total step count), which is how the shipped model was made."""
import math
import shutil

import torch
from safetensors.torch import load_file

import simda
import train_image
import vae as vae_module
from vae import LATENT_SCALE

SMALL = ["--batch-size", "2", "--vae-batch-size", "2", "--log-every", "1", "--warmup", "2"]


def test_a_short_run_writes_a_checkpoint_that_loads_as_sd(tmp_path, capsys):
    train_image.main(["--out", str(tmp_path / "a"), "--vae-steps", "2", "--unet-steps", "3", "--save-every", "2",
                      *SMALL])
    out = capsys.readouterr().out
    assert "vae check on 96 unseen frames" in out and "image check, 48 captions" in out
    path = tmp_path / "a" / "sd-shapes.safetensors"
    sd = load_file(str(path))
    assert all(v.dtype == torch.float16 for v in sd.values())
    pipe = simda.load_pipeline(str(path))
    assert pipe.vae.config == train_image.configs()[0] and pipe.unet.config == train_image.configs()[2]
    assert pipe.text_encoder.config == train_image.configs()[1]

    # a run stopped at its step-2 save (of 3 steps) equals a 2-step run with the same VAE
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("sd-shapes*"))
    saved = {}

    def keep(vae, text_encoder, unet, path, **metadata):
        saved[metadata["step"]] = {k: v.clone() for m in (text_encoder, unet) for k, v in m.state_dict().items()}
        original(vae, text_encoder, unet, path, **metadata)
    original = train_image.save_checkpoint
    train_image.save_checkpoint = keep
    try:
        train_image.main(["--out", str(tmp_path / "b"), "--unet-steps", "3", "--save-every", "2", *SMALL])
        step2 = saved[2]
        train_image.main(["--out", str(tmp_path / "b"), "--unet-steps", "2", *SMALL])
    finally:
        train_image.save_checkpoint = original
    assert all(torch.equal(step2[k], v) for k, v in saved[2].items())
    assert any(not torch.equal(saved[3][k], v) for k, v in saved[2].items())


def test_rescaled_latents_have_unit_variance_and_decode_the_same():
    torch.manual_seed(0)
    vae = vae_module.AutoencoderKL(train_image.configs()[0]).eval().requires_grad_(False)
    x, _ = train_image.frames(0, 8, 0, 32)
    before_mean, before_logvar = vae.encode(x)
    before = vae.decode(before_mean)
    k = train_image.rescale_latents(vae, 0, 32, count=64)
    mean, logvar = vae.encode(x)
    assert torch.allclose(mean, k * before_mean, rtol=1e-4, atol=1e-5)
    assert torch.allclose(logvar, before_logvar + 2 * math.log(k), atol=1e-4)
    assert torch.allclose(vae.decode(mean), before, atol=1e-4)
    held_out, _ = train_image.frames(10 ** 6, 64, 0, 32)
    assert abs((vae.encode(held_out)[0] * LATENT_SCALE).std().item() - 1) < 1e-3


def test_the_upscaler_run_writes_an_x4_checkpoint_that_train_py_tunes(tmp_path, capsys):
    """--upscaler: the x4 upscaler's architecture at a small size, saved in its single-file layout, so that
    simda.load_upscaler loads it and train.py --stage sr --data shapes trains adapters on it."""
    out = tmp_path / "sr"
    train_image.main(["--upscaler", "--size", "8", "--out", str(out), "--vae-steps", "2", "--unet-steps", "2", *SMALL])
    printed = capsys.readouterr().out
    assert "upscaler check, 48 unseen frames 8x8 -> 32x32" in printed and "bicubic" in printed
    path = str(out / "sr-shapes.safetensors")
    pipe = simda.load_upscaler(path)
    vae_config, text_config, unet_config = train_image.configs(upscaler=True)
    assert pipe.is_upscaler and pipe.family == "SD x4 upscaler" and pipe.prediction == "v"
    assert (pipe.vae.config, pipe.text_encoder.config, pipe.unet.config) == (vae_config, text_config, unet_config)
    import train  # here: the other tests of this file do not need it
    train.main(["--stage", "sr", "--data", "shapes", "--ckpt", path, "--size", "32", "--frames", "2", "--steps", "1",
                "--batch-size", "1", "--out", str(tmp_path / "adapters")])
    meta = simda.read_adapters(str(tmp_path / "adapters" / "adapters.safetensors"))[1]
    assert meta["stage"] == "sr" and meta["family"] == "SD x4 upscaler" and meta["height"] == 32


def test_finetune_decoder_changes_the_decoder_alone(tmp_path, capsys):
    """--finetune-decoder trains the VAE decoder of a saved model with the encoder frozen: the encoder,
    the text encoder and the UNet come out bitwise the same, so adapters trained on the model stay valid."""
    train_image.main(["--finetune-decoder", simda.DEMO_CHECKPOINT, "--out", str(tmp_path), "--decoder-steps", "2",
                      "--vae-batch-size", "2", "--log-every", "1"])
    assert "vae check on 96 unseen frames" in capsys.readouterr().out
    before, after = load_file(simda.DEMO_CHECKPOINT), load_file(str(tmp_path / "sd-shapes.safetensors"))
    assert before.keys() == after.keys()
    decoder = ("first_stage_model.decoder.", "first_stage_model.post_quant_conv.")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(decoder) for k in changed)
