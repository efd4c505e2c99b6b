"""The shipped demo model (models/): it loads through simda.load_pipeline like SD; its videos show
the prompted colour and shape, and with the adapters one object moving steadily the prompted way
(scored by the shapes tracker); and sample.py with no SD weights configured uses it, with its own
frame count, size and fps."""
import glob
import os

import imageio.v2 as imageio
import numpy as np

import sample
import shapes
import simda

# each direction four times, every colour and shape
PROMPTS = [
    "a red circle moving left", "a green square moving right", "a blue triangle moving up", "a yellow circle moving down",
    "a blue square moving left", "a yellow triangle moving right", "a red square moving up", "a green circle moving down",
    "a green triangle moving left", "a red triangle moving right", "a yellow square moving up", "a blue circle moving down",
    "a yellow circle moving left", "a blue triangle moving right", "a green circle moving up", "a red square moving down"]
SAMPLER = simda.DEMO_SAMPLING[0]  # sample.py's default sampler and steps for the demo
STEPS, GUIDANCE = simda.DEMO_SAMPLING[1][SAMPLER], 7.5


def scores(adapters):
    pipe = simda.load_pipeline(simda.DEMO_CHECKPOINT, adapters=adapters)
    videos = pipe(PROMPTS, shapes.FRAMES, shapes.SIZE, shapes.SIZE, STEPS, GUIDANCE, seed=0, progress=False,
                  sampler=SAMPLER).numpy()
    return [shapes.score(video, prompt) for video, prompt in zip(videos, PROMPTS)]


def test_demo_videos_move_the_prompted_way_with_the_prompted_colour_and_shape():
    """With SimDA's adapters one object of the prompted colour and shape moves the prompted way,
    steadily; the frozen image model, frame by frame, puts it somewhere new in every frame, so its
    "motion" is near chance (25%) (the tracker's smoothness: 0 = steady motion)."""
    simda_scores, frozen_scores = shapes.summarise(scores(simda.DEMO_ADAPTERS)), shapes.summarise(scores(None))
    print("SimDA", simda_scores, "\nfrozen image model", frozen_scores)
    for summary in (simda_scores, frozen_scores):
        assert summary["colour_correct"] >= 14 / 16 and summary["shape_correct"] >= 12 / 16
        assert summary["present_fraction"] >= 0.9
    assert simda_scores["motion_correct"] >= 12 / 16 and frozen_scores["motion_correct"] <= 8 / 16
    assert simda_scores["smoothness"] < frozen_scores["smoothness"] / 2


def test_sample_py_without_weights_uses_the_demo_model(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SIMDA_CKPT", raising=False)
    monkeypatch.chdir(tmp_path)  # no checkpoints/ here
    sample.main(["a red circle moving right", "--out", "demo.gif"])
    err = capsys.readouterr().err
    notice = [line for line in err.splitlines() if "demo model" in line]
    assert len(notice) == 1 and "--ckpt" in notice[0] and simda.DEFAULT_CHECKPOINT in notice[0]
    reader = imageio.get_reader(str(tmp_path / "demo.gif"))
    frames = np.stack([np.asarray(f)[..., :3] for f in reader])
    assert frames.shape == (8, 32, 32, 3)
    assert abs(reader.get_meta_data()["duration"] - 1000 / 8) <= 10  # ms per frame (GIF: 10 ms units): 8 fps
    assert shapes.track(frames)[0][0]["colour"] == "red"


def test_the_shipped_weights_stay_under_60_mb():
    shipped = glob.glob(os.path.join(simda.MODELS_DIR, "*.safetensors")) + \
        glob.glob(os.path.join(simda.MODELS_DIR, "ablation", "*.safetensors"))  # models/build*/: local rebuilds
    sizes = {path: os.path.getsize(path) for path in shipped}
    for path in (simda.DEMO_CHECKPOINT, simda.DEMO_ADAPTERS, simda.DEMO_LCM_ADAPTERS, simda.DEMO_UPSCALER, simda.DEMO_SR_ADAPTERS):
        assert path in sizes
    assert sum(sizes.values()) < 60 * 10 ** 6, sizes


def test_sample_py_names_the_words_the_demo_world_does_not_know_and_still_samples(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SIMDA_CKPT", raising=False)
    monkeypatch.chdir(tmp_path)
    sample.main(["a dog surfing", "--steps", "2", "--out", "dog.gif"])
    unknown = [line for line in capsys.readouterr().err.splitlines() if "does not know" in line]
    assert len(unknown) == 1 and "'dog', 'surfing'" in unknown[0]
    assert "red|green|blue|yellow" in unknown[0] and "left|right|up|down" in unknown[0]
    assert (tmp_path / "dog.gif").exists()
    sample.main(["a red circle moving right", "--steps", "2", "--out", "red.gif"])
    assert "does not know" not in capsys.readouterr().err


def test_the_distilled_demo_adapters_sample_in_four_lcm_steps_from_sample_py(tmp_path, monkeypatch, capsys):
    """`sample.py PROMPT --sampler lcm --steps 4` with no weights uses models/simda-shapes-lcm.safetensors; its videos,
    4 UNet calls each without a guidance batch, show the prompted colour, and most move the prompted way."""
    monkeypatch.delenv("SIMDA_CKPT", raising=False)
    monkeypatch.chdir(tmp_path)
    sample.main(["a red circle moving right", "--sampler", "lcm", "--steps", "4", "--out", "lcm.gif"])
    assert "4 lcm steps, guidance 1.0" in capsys.readouterr().err
    assert shapes.track(np.stack([np.asarray(f)[..., :3] for f in imageio.mimread("lcm.gif")]))[0][0]["colour"] == "red"
    pipe = simda.load_pipeline(simda.DEMO_CHECKPOINT, adapters=simda.DEMO_LCM_ADAPTERS)
    videos = pipe(PROMPTS, shapes.FRAMES, shapes.SIZE, shapes.SIZE, simda.LCM_STEPS, seed=0, progress=False,
                  sampler="lcm").numpy()
    summary = shapes.summarise([shapes.score(video, prompt) for video, prompt in zip(videos, PROMPTS)])
    print("distilled, 4 lcm steps", summary)
    assert summary["colour_correct"] >= 14 / 16 and summary["present_fraction"] >= 0.9
    assert summary["motion_correct"] >= 12 / 16 and summary["shape_correct"] >= 10 / 16
