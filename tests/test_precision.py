"""The dtype choices: `auto` picks bfloat16 on a CPU that multiplies it in hardware (AMX or
AVX512-BF16) and float32 on other CPUs; the pipeline then keeps the VAE in float32; bfloat16
sampling and training stay close to float32; a sampler's integer timestep needs no host-to-device
copy and gives the UNet exactly what a tensor timestep gives. Training holds the frozen SD in the compute
dtype and the adapters (and AdamW's state) in float32; --precision float32 is bitwise the float32 build."""
import json
import os

import numpy as np
import pytest
import torch

import runtime
from adapters import SimDAConfig, adapter_state_dict, freeze_for_training, is_adapter_key
import simda
import train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_cpu_flags_decide_bfloat16(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert runtime.fast_cpu_bfloat16(runtime.cpu_flags(str(info)))
    assert runtime.fast_cpu_bfloat16({"avx512f", "avx512_bf16"})
    assert not runtime.fast_cpu_bfloat16({"fpu", "avx2", "fma"})  # this project's 2-core machine
    assert runtime.cpu_flags(str(tmp_path / "missing")) == set()
    cpu = torch.device("cpu")
    for fast, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(runtime, "fast_cpu_bfloat16", lambda flags=None, fast=fast: fast)
        assert runtime.pick_dtype("auto", cpu) == dtype
        assert runtime.autocast_dtype("auto", cpu) == dtype
        assert runtime.pick_dtype("float32", cpu) == torch.float32
    assert runtime.autocast_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="float16 needs CUDA"):
        runtime.autocast_dtype("float16", cpu)


def test_bfloat16_sampling_keeps_the_vae_float32_and_stays_close(tiny_checkpoint):
    full = simda.load_pipeline(tiny_checkpoint)
    half = simda.load_pipeline(tiny_checkpoint, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and next(half.text_encoder.parameters()).dtype == torch.bfloat16
    assert half.vae_dtype == torch.float32
    args = (["a red circle moving left", "a dog"], 3, 16, 16, 4, 7.5)
    a, b = full(*args, progress=False).float(), half(*args, progress=False).float()
    difference = (a - b).abs().mean().item()
    print(f"bfloat16 vs float32, tiny SD, 4 guided steps: mean |difference| {difference:.2f} levels")
    other = full(*args, seed=1, progress=False).float()  # what a real change (other noise) does
    print(f"float32 with another seed: {(a - other).abs().mean().item():.2f} levels")
    assert difference < 2 and (a - other).abs().mean().item() > 5 * difference


def test_an_integer_timestep_equals_a_tensor_timestep(tiny_models):
    unet = tiny_models[2]
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 77, 128, generator=g)
    with torch.no_grad():
        assert torch.equal(unet(x, 500, context), unet(x, torch.tensor([500, 500]), context))


def test_training_runs_under_cpu_bfloat16_autocast(tiny_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "out")
    train.main(["--data", "shapes", "--ckpt", tiny_checkpoint, "--out", out, "--steps", "2", "--size", "16",
                "--frames", "4", "--batch-size", "2", "--lr", "1e-3", "--precision", "bfloat16", "--device", "cpu"])
    assert "precision bfloat16" in capsys.readouterr().out
    with open(os.path.join(out, "log.jsonl")) as f:
        loss = [json.loads(line)["loss"] for line in f]
    assert len(loss) == 2 and np.isfinite(loss).all()
    weights, _ = simda.read_adapters(os.path.join(out, "adapters.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())  # autocast: the weights stay float32


def shapes_run(ckpt, out, precision):
    args = train.build_parser().parse_args(["--data", "shapes", "--ckpt", ckpt, "--out", str(out), "--size", "16",
                                            "--frames", "4", "--batch-size", "2", "--lr", "1e-3", "--steps", "2",
                                            "--precision", precision, "--device", "cpu"])
    return train.build_run(args)


def test_training_holds_the_frozen_sd_in_the_compute_dtype_and_the_adapters_in_float32(tiny_checkpoint, tmp_path):
    for precision in ("bfloat16", "float32"):
        run = shapes_run(tiny_checkpoint, tmp_path / precision, precision)
        frozen = getattr(torch, precision)
        for name, p in run.pipe.unet.named_parameters():
            assert p.dtype == (torch.float32 if is_adapter_key(name) else frozen), name
            assert p.requires_grad == is_adapter_key(name), name
        assert {p.dtype for p in run.pipe.text_encoder.parameters()} == {frozen}
        assert {p.dtype for p in run.pipe.vae.parameters()} == {torch.float32}
        assert run.params and all(p.dtype == torch.float32 for p in run.params)
        assert np.isfinite(train.train_step(run))
        assert {s.dtype for p in run.params for s in run.optimizer.state[p].values() if s.dim()} == {torch.float32}
        train.finish(run)


def test_float32_training_is_bitwise_the_run_of_a_float32_build(tiny_checkpoint, tmp_path):
    """--precision float32: the run before the frozen weights took the compute dtype, every model loaded in
    float32 (load_pipeline's default), adapters seeded as build_run seeds them, the same steps."""
    run, ref = (shapes_run(tiny_checkpoint, tmp_path / name, "float32") for name in ("run", "ref"))
    torch.manual_seed(ref.args.seed)
    ref.pipe = simda.load_pipeline(tiny_checkpoint, simda_config=SimDAConfig())
    ref.model, ref.params = ref.pipe.unet, freeze_for_training(ref.pipe.unet)
    ref.optimizer = torch.optim.AdamW(ref.params, lr=ref.args.lr, weight_decay=ref.args.weight_decay)
    assert [train.train_step(run) for _ in range(2)] == [train.train_step(ref) for _ in range(2)]
    ours, theirs = adapter_state_dict(run.pipe.unet), adapter_state_dict(ref.pipe.unet)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(v.abs().sum() > 0 for k, v in ours.items() if k.endswith("up.weight"))  # zero at the start: trained
