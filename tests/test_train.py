"""train.py on a tiny random-weight SD: a run writes adapters, state and log; --resume continues a run
exactly; two torchrun processes (gloo) equal one process with the same global batch, and so does a
run whose clips are read by two worker processes; bad input fails clearly, before any model is loaded."""
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import simda
import train
from adapters import SimDAConfig, adapter_state_dict
from conftest import ROOT, rel_err
from test_data import captioned, write_corrupt, write_folder_with_bad_videos
from test_shards import sample, write_shard

# conftest's one_thread: one thread, as each torchrun process gets (faster on a shared machine, the same numerics)
pytestmark = pytest.mark.usefixtures("one_thread")

# 4 frames of 16x16 (latents 8x8: the tiny VAE halves, the tiny UNet needs multiples of 4), global batch 2
COMMON = ["--frames", "4", "--stride", "2", "--size", "16", "--batch-size", "2", "--lr", "1e-3", "--log-every", "1"]
STEPS = 4


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Three captioned 10-frame videos, a corrupt one and a too-short one."""
    return write_folder_with_bad_videos(str(tmp_path_factory.mktemp("videos")))


def run(*argv):
    train.main([str(a) for a in argv])


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.fixture(scope="module")
def straight(ckpt, videos, tmp_path_factory):
    """STEPS steps in one go, with a validation GIF at the end; (out folder, stdout, stderr)."""
    out = str(tmp_path_factory.mktemp("straight"))
    stdout, stderr = io.StringIO(), io.StringIO()  # module fixtures cannot use capsys
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        run("--data", videos, "--ckpt", ckpt, "--out", out, "--steps", STEPS, *COMMON,
            "--val-prompt", "a red square", "--val-steps", 2)
    return out, stdout.getvalue(), stderr.getvalue()


def test_a_run_writes_adapters_state_log_and_validation_gif(straight, ckpt):
    out, stdout, stderr = straight
    weights, meta = simda.read_adapters(os.path.join(out, "adapters.safetensors"))
    assert {k: meta[k] for k in ("frames", "stride", "height", "width", "checkpoint", "step")} == \
        dict(frames=4, stride=2, height=16, width=16, checkpoint=ckpt, step=STEPS)
    assert all(weights[k].abs().max() > 0 for k in weights if ".up." in k)  # zero-initialised, now trained
    state = torch.load(os.path.join(out, "state.pt"), weights_only=True)
    assert state["step"] == STEPS and state["optimizer"]["state"]
    assert all(state["adapters"][k].equal(weights[k]) for k in weights)
    assert len(losses(out)) == STEPS and all(0 < loss < 10 for loss in losses(out))
    with Image.open(os.path.join(out, "samples", f"step{STEPS:06d}.gif")) as gif:
        assert gif.n_frames == 4 and gif.size == (16, 16)
    assert "trainable parameters of" in stdout and f"step {STEPS}/{STEPS}  loss" in stdout and "it/s  ETA" in stdout
    assert "2 of 5 videos skipped" in stdout
    assert stderr.count("corrupt.mp4: cannot decode") == 1 and stderr.count("short.mp4: too short") == 1
    assert "input: read by the training loop (--num-workers' default on cpu" in stdout
    assert "data wait" in stdout and "the loop waited for data" in stdout.splitlines()[-1]


def test_two_worker_processes_train_bitwise_what_the_loop_reading_itself_trains(straight, ckpt, videos, tmp_path,
                                                                               capsys):
    run("--data", videos, "--ckpt", ckpt, "--out", tmp_path, "--steps", STEPS, "--num-workers", 2, *COMMON)
    assert losses(str(tmp_path)) == losses(straight[0])
    ours = simda.read_adapters(str(tmp_path / "adapters.safetensors"))[0]
    theirs = simda.read_adapters(os.path.join(straight[0], "adapters.safetensors"))[0]
    assert all(ours[k].equal(theirs[k]) for k in theirs)
    stdout, stderr = capsys.readouterr()
    assert "input: 2 worker process(es)" in stdout and "2 of 5 videos skipped" in stdout
    assert stderr.count("corrupt.mp4: cannot decode") == 1 and stderr.count("short.mp4: too short") == 1


def test_resume_continues_the_run_exactly(straight, ckpt, videos, tmp_path):
    out = str(tmp_path)
    run("--data", videos, "--ckpt", ckpt, "--out", out, "--steps", STEPS // 2, *COMMON)
    with open(os.path.join(out, "log.jsonl"), "a") as f:  # a run may log steps after its last save
        f.write(json.dumps({"step": STEPS // 2 + 1, "loss": 123.0}) + "\n")
    run("--data", videos, "--ckpt", ckpt, "--out", out, "--steps", STEPS, "--resume", *COMMON)
    assert losses(out) == losses(straight[0])
    resumed = simda.read_adapters(os.path.join(out, "adapters.safetensors"))[0]
    whole = simda.read_adapters(os.path.join(straight[0], "adapters.safetensors"))[0]
    assert all(resumed[k].equal(whole[k]) for k in whole)


def test_init_from_starts_a_run_from_saved_adapters_with_a_fresh_optimizer(straight, ckpt, videos, tmp_path, capsys):
    saved = os.path.join(straight[0], "adapters.safetensors")
    argv = ["--data", videos, "--ckpt", ckpt, "--steps", 1, *COMMON, "--init-from", saved]
    start = train.build_run(train.build_parser().parse_args([str(a) for a in argv + ["--out", tmp_path / "a"]]))
    weights = simda.read_adapters(saved)[0]
    ours = adapter_state_dict(start.pipe.unet)
    assert ours.keys() == weights.keys() and all(ours[k].equal(weights[k]) for k in weights)
    assert start.step == 0 and not start.optimizer.state_dict()["state"]
    run(*argv, "--out", tmp_path / "b")
    trained, meta = simda.read_adapters(str(tmp_path / "b" / "adapters.safetensors"))
    assert meta["init_from"] == saved and meta["step"] == 1 and not all(trained[k].equal(weights[k]) for k in weights)
    capsys.readouterr()
    distilled = str(tmp_path / "distilled.safetensors")
    simda.save_adapters(start.pipe.unet, distilled, frames=4, distilled={"teacher": "T.safetensors", "skip": 20})
    for more, message in ((["--init-from", distilled], "holds distilled adapters: go on distilling them with "
                                                        "--distill T.safetensors"),
                          (["--init-from", saved, "--no-latent-shift"], "holds adapters with latent_shift True"),
                          (["--init-from", saved, "--stage", "sr"], "holds adapters of --stage t2v, not sr"),
                          (["--init-from", str(tmp_path / "none.safetensors")], "adapter file not found")):
        with pytest.raises(SystemExit) as e:
            train.main([str(a) for a in argv[:-2] + ["--out", tmp_path / "c", *more]])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err


def test_a_folder_of_video2dataset_shards_trains_and_counts_its_bad_samples(ckpt, videos, tmp_path, capsys):
    shard_folder = tmp_path / "webvid_subset"
    shard_folder.mkdir()
    samples = []
    for name in ["a.mp4", "b.mp4", "c.gif", "short.mp4", "corrupt.mp4"]:  # b.mp4 without its caption
        with open(os.path.join(videos, name), "rb") as f:
            samples.append(sample(name[:-4], f.read(), None if name == "b.mp4" else name))
    write_shard(shard_folder / "00000.tar", samples)
    run("--data", shard_folder, "--ckpt", ckpt, "--out", tmp_path / "out", "--steps", 2, "--num-workers", 1, *COMMON)
    stdout, stderr = capsys.readouterr()
    assert "4 videos, 4 frames of 16x16" in stdout and "00000.tar:b.mp4: no caption (.txt); left out" in stderr
    assert "2 of 4 videos skipped (unreadable or too short), 1 more left out when listing them" in stdout
    assert len(losses(str(tmp_path / "out"))) == 2


def test_one_shot_tuning_on_one_clip_with_cached_latents(ckpt, videos, tmp_path, capsys):
    clip = os.path.join(videos, "a.mp4")
    run("--video", clip, "--prompt", "a red square", "--ckpt", ckpt, "--out", tmp_path, "--steps", 3,
        "--cache-latents", *COMMON[:-4])
    weights, meta = simda.read_adapters(str(tmp_path / "adapters.safetensors"))
    assert meta["prompt"] == "a red square" and meta["video"] == clip and meta["step"] == 3
    assert len(losses(str(tmp_path))) == 3
    assert "0 of 1 videos skipped" in capsys.readouterr().out


@pytest.mark.parametrize("log_every", [1, 10])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(ckpt, videos, tmp_path, monkeypatch, capsys, log_every):
    """Every step's loss checked (--log-every 1), or read back from the device only at the reports (10): either
    way the run stops at the step whose loss is NaN before any save after it."""
    mse, calls = torch.nn.functional.mse_loss, []

    def nan_at_third_step(*args, **kwargs):
        calls.append(1)
        return mse(*args, **kwargs) * (float("nan") if len(calls) == 3 else 1.0)
    monkeypatch.setattr(train.F, "mse_loss", nan_at_third_step)
    with pytest.raises(SystemExit) as e:
        run("--data", videos, "--ckpt", ckpt, "--out", tmp_path, "--steps", 5, "--save-every", 2, *COMMON,
            "--log-every", log_every)
    assert e.value.code == 1
    assert "the loss is nan at step 3: stopping; the last good checkpoint is" in capsys.readouterr().err
    assert simda.read_adapters(str(tmp_path / "adapters.safetensors"))[1]["step"] == 2
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 2
    with open(tmp_path / "log.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]  # step 3's line never written


def test_two_torchrun_processes_share_cached_latents_through_the_disk(ckpt, videos, tmp_path):
    """--cache-latents under torchrun: each rank writes its share under --out/latent-cache and reads the other's
    from there (nothing gathered over the network), and the run computes what one process computes."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = ["--data", videos, "--ckpt", ckpt, "--steps", 2, "--cache-latents", *COMMON]
    run(*args, "--out", one)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join("tests", "ddp_launcher.py"), str(tmp_path / "ranks"), "--out", two,
                             *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(two, "latent-cache"))) == ["0.safetensors", "1.safetensors", "2.safetensors"]
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)


def test_two_torchrun_processes_equal_one_process(straight, ckpt, videos, tmp_path):
    out, ranks = str(tmp_path / "out"), str(tmp_path / "ranks")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join("tests", "ddp_launcher.py"), ranks, "--data", videos, "--ckpt", ckpt,
                             "--out", out, "--steps", str(STEPS), *COMMON],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "global batch 2 on 2 process(es)" in result.stdout
    rank0 = simda.read_adapters(os.path.join(ranks, "rank0.safetensors"))[0]
    rank1 = simda.read_adapters(os.path.join(ranks, "rank1.safetensors"))[0]
    saved = simda.read_adapters(os.path.join(out, "adapters.safetensors"))[0]
    assert all(rank0[k].equal(rank1[k]) and rank0[k].equal(saved[k]) for k in rank0)

    single = simda.read_adapters(os.path.join(straight[0], "adapters.safetensors"))[0]
    assert losses(out) == pytest.approx(losses(straight[0]), rel=1e-5)
    # At this tiny width the last output block has one channel per GroupNorm group, so these two
    # biases add a per-channel constant that the UNet's final GroupNorm removes: their gradient is
    # zero up to float noise, which Adam scales to steps of up to lr. They do not change the model.
    inert = ("output_blocks.5.1.temporal_adapter.up.bias", "output_blocks.5.1.transformer_blocks.0.ffn_adapter.up.bias")
    for k in single:
        tolerance = 2 * 1e-3 * STEPS if k in inert else 2e-5
        assert (single[k] - saved[k]).abs().max() <= tolerance, k
    # ... and the two UNets compute the same function
    pipe = simda.load_pipeline(ckpt, simda_config=SimDAConfig())
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 4, 8, 8, generator=g), torch.randn(1, 77, 128, generator=g)
    outputs = []
    for weights in (single, saved):
        simda.load_adapters(pipe.unet, weights)
        with torch.no_grad():
            outputs.append(pipe.unet(x, torch.tensor([500]), context))
    assert rel_err(outputs[1], outputs[0]) < 1e-5


@pytest.mark.parametrize("changes, message", [
    ({"--size": "100"}, "video size 100x100 (width x height): both must be positive multiples of 8"),
    ({"--size": "0"}, "video size 0x0 (width x height): both must be positive multiples of 8"),  # as sample.py
    ({"--width": "24", "--height": "12"}, "video size 24x12 (width x height)"),
    ({"--frames": "0"}, "--frames must be at least 1, got 0"),
    ({"--ckpt": "missing.safetensors"}, "checkpoint not found: missing.safetensors"),
    ({"--ckpt": None}, "no Stable Diffusion checkpoint found"),  # nothing in $SIMDA_CKPT or checkpoints/
    ({"--data": "EMPTY"}, "no usable videos in EMPTY"),
    ({"--data": "BAD"}, "none of the 2 videos could be used"),
    ({"--data": None, "--video": "clip.mp4"}, "--video needs --prompt"),
    ({"--resume": ""}, "--resume: no saved run in"),
    ({"--timestep-bias": "-1"}, "--timestep-bias must be >= 0, got -1.0"),
    ({"--num-workers": "-1"}, "--num-workers must be at least 0, got -1"),
])
def test_bad_input_is_a_clear_error_before_any_model_loads(changes, message, ckpt, videos, tmp_path, monkeypatch,
                                                           capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(simda, "load_pipeline", no_loading)
    monkeypatch.delenv("SIMDA_CKPT", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EMPTY").mkdir()
    captioned(str(tmp_path / "BAD"), "short.mp4", "too short", frames=2)
    write_corrupt(str(tmp_path / "BAD" / "corrupt.mp4"))
    (tmp_path / "BAD" / "corrupt.txt").write_text("corrupt")
    options = {"--data": videos, "--ckpt": ckpt, "--out": "out", "--steps": "2", **changes}
    argv = [a for flag, value in options.items() if value is not None for a in (flag, value) if a != ""]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("ablation, absent", [
    ([], None),
    (["--no-latent-shift"], None),
    (["--no-temporal-adapters"], "temporal_adapter."),
    (["--no-spatial-adapters"], "attn_adapter."),
])
def test_data_shapes_trains_on_the_shapes_world_with_the_ablation_flags(ablation, absent, ckpt, tmp_path, capsys):
    out = str(tmp_path / "out")
    run("--data", "shapes", "--ckpt", ckpt, "--out", out, "--steps", 2, "--size", 16, "--frames", 4,
        "--batch-size", 2, "--lr", "1e-3", *ablation)
    assert "fresh shapes-world videos, 4 frames of 16x16" in capsys.readouterr().out
    weights, meta = simda.read_adapters(os.path.join(out, "adapters.safetensors"))
    assert meta["fps"] == 8 and meta["frames"] == 4 and meta["height"] == 16
    config = meta["simda_config"]
    assert config["latent_shift"] == ("--no-latent-shift" not in ablation)
    assert config["temporal_adapters"] == ("--no-temporal-adapters" not in ablation)
    assert config["spatial_adapters"] == ("--no-spatial-adapters" not in ablation)
    if absent:
        assert weights and not any(absent in k for k in weights)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if ".up." in k)  # trained off zero
    assert len(losses(out)) == 2


@pytest.mark.parametrize("argv, message", [
    (["--width", "16", "--height", "24"], "--data shapes makes square videos"),
    (["--hflip"], "--hflip would mirror the shapes' motion"),
    (["--cache-latents"], "--cache-latents needs a fixed set of videos"),
])
def test_data_shapes_rejects_what_the_world_cannot_do(argv, message, ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--data", "shapes", "--ckpt", ckpt, "--out", str(tmp_path / "out"), *argv])
    assert e.value.code == 2 and f"error: {message}" in capsys.readouterr().err
