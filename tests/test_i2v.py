"""Given frames: per-frame timesteps in the UNet, training with clean first frames (train.py --given-frames),
sampling after given frames (Pipeline.extend, .animate, .continue_video) and sample.py --image / --continue
on the demo, from an empty folder."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import loader
import sample
import shapes
import simda
import train
import unet as unet_module
from adapters import SimDAConfig
from conftest import perturb_, perturb_adapters_, unet_inputs

PROMPT = "a red circle moving right"
# conftest's one_thread: faster on a shared machine, the same numerics
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(given_frames_pipe):
    return given_frames_pipe  # conftest's: the tiny SD with moved adapters, said to be trained with 2 given frames


@pytest.mark.parametrize("num_classes", [0, 10])
def test_per_frame_timesteps_equal_the_per_video_path_when_all_frames_share_one(num_classes):
    torch.manual_seed(0)
    config = unet_module.UNetConfig(**{**vars(unet_module.UNetConfig.tiny()), "num_classes": num_classes})
    model = perturb_adapters_(perturb_(unet_module.UNet(config, SimDAConfig())), seed=1).eval()
    x, t, context = unet_inputs(config, b=2, frames=3)
    y = torch.tensor([3, 7]) if num_classes else None
    with torch.no_grad():
        shared = model(x, t, context, y)
        per_frame = model(x, t[:, None].expand(2, 3), context, y)
        one_row = model(x, torch.full((1, 3), 500), context, y)  # [1, F]: every video alike
        scalar = model(x, 500, context, y)
        mixed = model(x, torch.tensor([[0, 999, 999], [0, 37, 37]]), context, y)
    torch.testing.assert_close(per_frame, shared, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one_row, scalar, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed, shared, atol=1e-3)  # frame 0 at t = 0 changes what the UNet says
    with pytest.raises(ValueError, match=r"per-frame timesteps must be \[B, F\]"):
        model(x, torch.zeros(2, 4, dtype=torch.long), context, y)


@pytest.mark.parametrize("sampler, guidance, eta", [("ddim", 7.5, 0.0), ("ddim", 1.0, 0.5), ("dpm++", 7.5, 0.0)])
def test_a_given_frame_stays_exactly_what_was_given_through_sampling(pipe, sampler, guidance, eta, monkeypatch):
    given = torch.randn(2, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    calls, forward = [], pipe.unet.forward

    def spy(x, t, context, y=None):  # what the UNet sees at every step
        calls.append((x[:, :, :2].clone(), t.clone()))
        return forward(x, t, context, y)
    monkeypatch.setattr(pipe.unet, "forward", spy)
    latents = pipe.extend(given, ["a", "b"], 5, steps=4, guidance=guidance, eta=eta, sampler=sampler, progress=False)
    assert latents.shape == (2, 4, 5, 4, 4) and torch.equal(latents[:, :, :2], given)
    assert len(calls) == 4
    for x, t in calls:  # the clean latents at timestep 0, in both halves of a guided batch
        assert torch.equal(x, given.repeat(2 if guidance != 1 else 1, 1, 1, 1, 1))
        assert t.shape == (1, 5) and (t[0, :2] == 0).all() and (t[0, 2:] > 0).all()


def test_animate_keeps_the_images_round_trip_and_continue_video_goes_on_from_the_clip(pipe):
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    video = pipe.animate(image, ["a", "b"], frames=4, steps=3, progress=False)
    round_trip = pipe.decode(pipe.encode(image[None, :, None]))[0, 0]
    assert video.shape == (2, 4, 8, 8, 3) and video.dtype == torch.uint8
    assert torch.equal(video[0, 0], round_trip) and torch.equal(video[1, 0], round_trip)
    clip = video[:1].permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # b f H W 3 -> b 3 f H W
    new = pipe.continue_video(clip, "a", frames=3, steps=3, progress=False)
    assert new.shape == (1, 3, 8, 8, 3)
    # the continuation only sees the clip's last 2 frames (the given frames)
    other = torch.cat([torch.zeros_like(clip[:, :, :2]), clip[:, :, 2:]], dim=2)
    assert torch.equal(pipe.continue_video(other, "a", frames=3, steps=3, progress=False), new)
    with pytest.raises(ValueError, match="the clip has 1 frame"):
        pipe.continue_video(clip[:, :, :1], "a", frames=3)
    with pytest.raises(ValueError, match="leave none of 1 to sample"):
        pipe.extend(pipe.encode(clip[:, :, :1]), "a", frames=1)


def test_continue_video_needs_adapters_trained_with_given_frames(tiny_checkpoint):
    plain = simda.load_pipeline(tiny_checkpoint, simda_config=SimDAConfig())
    with pytest.raises(ValueError, match="not trained with given frames"):
        plain.continue_video(torch.zeros(1, 3, 4, 8, 8), "a", frames=2)


def test_draw_given_is_seeded_per_sample_and_draws_nothing_at_probability_zero():
    gs = list(range(400))
    assert loader.draw_given(0, gs, 2, 0.0) == [0] * 400 and loader.draw_given(0, gs, 0, 1.0) == [0] * 400
    given = loader.draw_given(0, gs, 3, 0.3)
    assert given == loader.draw_given(0, gs, 3, 0.3) and given[7:9] == loader.draw_given(0, [7, 8], 3, 0.3)
    assert set(given) == {0, 1, 2, 3} and 0.2 < np.mean([k > 0 for k in given]) < 0.4
    assert set(loader.draw_given(0, gs, 2, 1.0)) == {1, 2}
    keep = loader.loss_mask([2, 0], 4, "cpu")
    assert keep.shape == (2, 1, 4, 1, 1) and keep.flatten().tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    assert loader.loss_mask([0, 0], 4, "cpu") is None


def test_make_inputs_keeps_the_given_frames_clean_at_timestep_zero(pipe):
    batch = [(torch.rand(4, 3, 8, 8) * 2 - 1, "a"), (torch.rand(4, 3, 8, 8) * 2 - 1, "b")]
    x, t, target, _, _ = loader.make_inputs(pipe, batch, [5, 6], 0, torch.device("cpu"))
    xg, tg, target_g, _, _ = loader.make_inputs(pipe, batch, [5, 6], 0, torch.device("cpu"), given=[1, 0])
    assert t.shape == (2,) and tg.shape == (2, 4) and torch.equal(target_g, target)
    assert tg[0].tolist() == [0] + [t[0].item()] * 3 and tg[1].tolist() == [t[1].item()] * 4
    assert torch.equal(xg[:, :, 1:], x[:, :, 1:]) and torch.equal(xg[1], x[1])
    a = pipe.alphas[t[0]]
    clean = (x[0, :, 0] - (1 - a) ** 0.5 * target[0, :, 0]) / a ** 0.5  # the latents make_inputs noised
    torch.testing.assert_close(xg[0, :, 0], clean, rtol=1e-4, atol=1e-4)


SHAPES_RUN = ["--data", "shapes", "--size", "16", "--frames", "4", "--batch-size", "2", "--steps", "2", "--lr", "1e-3",
              "--sample-every", "0"]


def test_training_at_given_probability_zero_is_bitwise_the_text_to_video_run(tiny_checkpoint, tmp_path, capsys):
    plain, zero, given = (str(tmp_path / name) for name in ("plain", "zero", "given"))
    train.main(["--ckpt", tiny_checkpoint, "--out", plain, *SHAPES_RUN])
    train.main(["--ckpt", tiny_checkpoint, "--out", zero, *SHAPES_RUN, "--given-frames", "2",
                "--given-probability", "0"])
    train.main(["--ckpt", tiny_checkpoint, "--out", given, *SHAPES_RUN, "--given-frames", "2",
                "--given-probability", "1"])
    read = [simda.read_adapters(os.path.join(out, "adapters.safetensors")) for out in (plain, zero, given)]
    assert read[0][0].keys() == read[1][0].keys()
    assert all(torch.equal(read[0][0][k], read[1][0][k]) for k in read[0][0])
    assert not all(torch.equal(read[0][0][k], read[2][0][k]) for k in read[0][0])
    assert "given_frames" not in read[0][1] and read[2][1]["given_frames"] == 2
    assert read[2][1]["given_probability"] == 1.0
    logs = [open(os.path.join(out, "log.jsonl")).read().splitlines() for out in (plain, zero)]
    assert [line.split('"time"')[0] for line in logs[0]] == [line.split('"time"')[0] for line in logs[1]]


@pytest.mark.parametrize("argv, message", [
    (["--given-frames", "4"], "--given-frames must leave frames to predict: 1 to 3 of 4"),
    (["--given-frames", "1", "--given-probability", "1.5"], "--given-probability must be in [0, 1]"),
    (["--given-frames", "1", "--stage", "sr"], "--given-frames trains image-to-video and continuation, not the"),
])
def test_training_rejects_given_frames_it_cannot_use(argv, message, tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--ckpt", tiny_checkpoint, "--out", str(tmp_path / "out"), *SHAPES_RUN, *argv])
    assert e.value.code == 2 and f"error: {message}" in capsys.readouterr().err


@pytest.fixture
def demo_folder(tmp_path, monkeypatch):
    """An empty working folder, no SD weights named: sample.py falls back to the demo; a drawn first frame in it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SIMDA_CKPT", raising=False)
    video, _ = shapes.sample(5, seed=4321, frames=8, size=32)
    Image.fromarray(video[0]).save("first.png")
    return video


@pytest.mark.skipif(not os.path.exists(simda.DEMO_ADAPTERS), reason="the demo adapters are not in models/")
def test_image_then_continue_from_an_empty_folder_on_the_demo(demo_folder, capsys):
    sample.main([PROMPT, "--image", "first.png", "--out", "a.gif", "--steps", "1"])
    err = capsys.readouterr().err
    assert "built-in demo model" in err and "frame 0: its VAE round trip" in err
    animated = data.read_frames("a.gif")
    assert animated.shape == (8, 32, 32, 3)
    assert np.abs(animated[0].astype(int) - demo_folder[0]).mean() < 3  # the round trip of the image
    sample.main([PROMPT, "--continue", "a.gif", "--out", "b.gif", "--steps", "1", "--sampler", "ddim"])
    assert "6 more frames after the last 2 of a.gif" in capsys.readouterr().err
    longer = data.read_frames("b.gif")
    assert longer.shape == (14, 32, 32, 3) and np.array_equal(longer[:8], animated)
    sample.main([PROMPT, "--continue", "b.gif", "--out", "c.gif", "--steps", "1", "--frames", "3"])
    assert data.read_frames("c.gif").shape == (17, 32, 32, 3)


@pytest.mark.parametrize("argv, fragments", [
    (["--image", "missing.png"], ["--image missing.png does not exist"]),
    (["--image", "bad.png"], ["--image bad.png cannot be read as an image"]),
    (["--image", "odd.png"], ["odd.png is 20x12, not a multiple of 8 a side: pass --size"]),
    (["--continue", "first.png"], ["--continue first.png has 1 frame(s), fewer than the 2"]),
    (["--continue", "missing.gif"], ["--continue missing.gif does not exist"]),
    (["--image", "first.png", "--adapters", os.path.join(simda.MODELS_DIR, "ablation", "simda-750-steps.safetensors")],
     ["--image needs adapters trained with given frames (train.py --given-frames)"]),
    (["--image", "first.png", "--upscale-video", "first.png"], ["--upscale-video upscales a given clip"]),
])
@pytest.mark.skipif(not os.path.exists(simda.DEMO_ADAPTERS), reason="the demo adapters are not in models/")
def test_bad_given_frames_are_one_line_errors_before_any_model_loads(demo_folder, argv, fragments, capsys):
    Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save("odd.png")
    with open("bad.png", "w") as f:
        f.write("not an image")
    with pytest.raises(SystemExit) as e:
        sample.main([PROMPT, *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and "loading" not in err
    assert all(f in err for f in fragments), err


def test_image_with_edit_is_refused_by_the_flags(demo_folder, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main([PROMPT, "--image", "first.png", "--edit", "clip.mp4"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
