"""evaluate.py videos / t2v: the paper's metrics of a folder of videos, and the MSR-VTT protocol
(sample one video per caption, resumably, then score), on a random tiny CLIP and a random I3D. The
numbers are checked against the same formulas applied directly to the frames; bad input gets a
clear error."""
import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import clip_model
import clip_text
import data
import evaluate
import i3d
import metrics
import shapes
from video import save_video

FRAMES, SIZE = 16, 32


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    """Paths of a random tiny CLIP (transformers layout) and a random I3D (i3d_pretrained_400.pt layout)."""
    folder = tmp_path_factory.mktemp("scorers")
    torch.manual_seed(0)
    clip = clip_model.CLIP(clip_model.CLIPConfig.tiny())
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, folder / "clip.safetensors")
    torch.save(i3d.I3D().state_dict(), folder / "i3d_pretrained_400.pt")
    return str(folder / "clip.safetensors"), str(folder / "i3d_pretrained_400.pt")


def write_videos(folder, seeds, ext=".npy", size=SIZE, frames=FRAMES):
    """Shapes videos, one per seed, as `<ext>` files named clip-<seed>; returns {name: caption}."""
    folder.mkdir(exist_ok=True)
    captions = {}
    for seed in seeds:
        video, caption = shapes.sample(seed, 0, frames, size)
        name = f"clip-{seed}"
        if ext == ".npy":
            np.save(folder / f"{name}.npy", video)
        else:
            save_video(video, str(folder / f"{name}{ext}"))
        captions[name] = caption
    return captions


def write_csv(path, captions, header=("video_id", "caption")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(captions.items())
    return str(path)


def test_videos_scores_are_the_metrics_of_the_frames(scorers, tmp_path, capsys):
    clip_path, i3d_path = scorers
    captions = write_videos(tmp_path / "gen", range(4))
    write_videos(tmp_path / "real", range(10, 14), ext=".gif")
    prompts = write_csv(tmp_path / "captions.csv", dict(reversed(captions.items())))  # matched by id, not order
    out = tmp_path / "scores.json"
    evaluate.main(["videos", "--videos", str(tmp_path / "gen"), "--prompts", prompts, "--clip", clip_path,
                   "--i3d", i3d_path, "--real", str(tmp_path / "real"), "--out", str(out), "--device", "cpu"])
    table = capsys.readouterr().out
    assert "CLIPSIM" in table and "FVD" in table and "protocol: videos 4" in table and "stride 1" in table
    scores = json.loads(out.read_text())

    clip, detector = clip_model.load_clip(clip_path), i3d.load_i3d(i3d_path)
    videos = np.stack([np.load(tmp_path / "gen" / f"clip-{s}.npy") for s in range(4)])
    real = np.stack([data.read_frames(str(tmp_path / "real" / f"clip-{s}.gif")) for s in range(10, 14)])
    frames = clip_model.embed_videos(clip, videos)
    text = clip_model.embed_texts(clip, clip_text.Tokenizer(), [captions[f"clip-{s}"] for s in range(4)])
    assert np.allclose([v["clipsim"] for v in scores["videos"]], metrics.clipsim(frames, text), atol=1e-6)
    assert np.allclose(scores["summary"]["frame_consistency"], metrics.frame_consistency(frames).mean(), atol=1e-6)
    fvd = metrics.frechet_distance(i3d.features(detector, videos), i3d.features(detector, real))
    assert scores["summary"]["fvd"] == pytest.approx(fvd, rel=1e-6)
    assert fvd > 0


def test_t2v_samples_one_video_per_caption_and_resumes(tiny_checkpoint, scorers, tmp_path, capsys):
    clip_path, _ = scorers
    prompts = tmp_path / "captions.txt"
    prompts.write_text("a red circle\na dog surfing\na blue square\n")
    common = ["t2v", "--ckpt", tiny_checkpoint, "--prompts", str(prompts), "--clip", clip_path, "--frames", "2",
              "--size", "16", "--steps", "2", "--batch-size", "2", "--device", "cpu", "--format", "gif"]
    evaluate.main(common + ["--out-dir", str(tmp_path / "once")])
    evaluate.main(common + ["--out-dir", str(tmp_path / "resumed"), "--limit", "1"])  # a run stopped after one video
    first = (tmp_path / "resumed" / "features" / "00000.npz").stat().st_mtime_ns
    capsys.readouterr()
    evaluate.main(common + ["--out-dir", str(tmp_path / "resumed")])
    assert (tmp_path / "resumed" / "features" / "00000.npz").stat().st_mtime_ns == first  # not sampled again
    assert sorted(p.name for p in (tmp_path / "once").glob("*.gif")) == ["00000.gif", "00001.gif", "00002.gif"]
    for name in ("00000", "00001", "00002"):
        with np.load(tmp_path / "once" / "features" / f"{name}.npz") as a, \
                np.load(tmp_path / "resumed" / "features" / f"{name}.npz") as b:
            # each video's noise is drawn for its caption's index, not its place in a batch: the same videos
            # (to float32 kernels' rounding) whether sampled in [0, 1], [2] or [0], [1, 2]
            assert a["clip"].shape == (2, 32) and np.abs(a["clip"] - b["clip"]).max() < 1e-3
    once = json.loads((tmp_path / "once" / "scores.json").read_text())
    assert len(once["videos"]) == 3 and -1 <= once["summary"]["clipsim"] <= 1
    with pytest.raises(SystemExit):  # the same folder with other settings
        evaluate.main(common + ["--out-dir", str(tmp_path / "resumed"), "--steps", "3"])
    assert "other settings (steps: 2 then, 3 now)" in capsys.readouterr().err


def bad(argv, capsys, message):
    with pytest.raises(SystemExit):
        evaluate.main(argv)
    err = capsys.readouterr().err
    assert message in err, err


def test_bad_input_gets_a_clear_error(scorers, tmp_path, capsys):
    clip_path, i3d_path = scorers
    captions = write_videos(tmp_path / "gen", range(3))
    write_videos(tmp_path / "real", range(10, 11))
    base = ["videos", "--videos", str(tmp_path / "gen"), "--clip", clip_path, "--device", "cpu",
            "--out", str(tmp_path / "s.json")]
    good = write_csv(tmp_path / "good.csv", captions)
    bad(base + ["--prompts", write_csv(tmp_path / "few.csv", dict(list(captions.items())[:2]))], capsys,
        "1 videos have no caption")
    bad(base + ["--prompts", write_csv(tmp_path / "more.csv", {**captions, "clip-99": "extra"})], capsys,
        "1 captions in")
    bad(base + ["--prompts", write_csv(tmp_path / "noid.csv", {"x": "a", "y": "b"}, header=("n", "caption"))], capsys,
        "has 2 captions and no video id column, but there are 3 videos")
    bad(base + ["--prompts", write_csv(tmp_path / "nocap.csv", captions, header=("video_id", "label"))], capsys,
        "no caption column")
    bad(base + ["--prompts", good, "--i3d", i3d_path, "--real", str(tmp_path / "real")], capsys,
        "FVD needs at least 2 real videos, got 1")
    bad(base + ["--prompts", good, "--i3d", i3d_path], capsys, "needs both --i3d")
    bad(["videos", "--videos", str(tmp_path / "gen"), "--prompts", good, "--clip", i3d_path], capsys,
        "not a CLIP model")
    np.save(tmp_path / "gen" / "clip-2.npy", np.zeros((FRAMES, 24, 24, 3), np.uint8))
    bad(base + ["--prompts", good], capsys, "clip-2.npy is 24x24 but the generated videos before it are 32x32")
    (tmp_path / "gen" / "clip-2.npy").write_bytes(b"not a video")  # a corrupt video is skipped and counted
    evaluate.main(base + ["--prompts", good])
    assert "skipped 1" in capsys.readouterr().out
