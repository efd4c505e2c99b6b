"""data.py: decoding clips (mp4, webm, gif), the WebVid CSV and captioned-folder layouts, skipping bad
videos, and the per-sample randomness that resuming and multi-process training rely on."""
import csv
import os
import random

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import data

RED = [25 * i + 10 for i in range(10)]  # frame i's red level: tells which frame a clip took


def write_video(path, frames=10, height=32, width=48):
    """Frame i: red RED[i], green 255 on the left half and 0 on the right, blue 128."""
    video = np.zeros((frames, height, width, 3), np.uint8)
    video[..., 0] = np.array(RED[:frames], np.uint8)[:, None, None]
    video[:, :, : width // 2, 1] = 255
    video[..., 2] = 128
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if path.endswith(".gif"):
        iio.imwrite(path, video, plugin="pillow", duration=125, loop=0)
    else:
        iio.imwrite(path, video, plugin="FFMPEG", fps=8, macro_block_size=1,
                    **({"codec": "libvpx"} if path.endswith(".webm") else {}))
    return path


def write_corrupt(path):
    with open(path, "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20)
    return path


def captioned(folder, name, caption, **kwargs):
    path = write_video(os.path.join(folder, name), **kwargs)
    with open(os.path.splitext(path)[0] + ".txt", "w") as f:
        f.write(caption + "\n")
    return path


def write_folder_with_bad_videos(root):
    """A captioned folder: three good videos (a.mp4, b.mp4, c.gif), a too-short one and a corrupt one."""
    for i, name in enumerate(["a.mp4", "b.mp4", "c.gif"]):
        captioned(root, name, f"video {i}")
    captioned(root, "short.mp4", "too short", frames=3)
    write_corrupt(os.path.join(root, "corrupt.mp4"))
    with open(os.path.join(root, "corrupt.txt"), "w") as f:
        f.write("corrupt")
    return root


def to_level(x):
    """[-1, 1] back to 0..255."""
    return (x + 1) * 127.5


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("videos"))
    return {ext: write_video(os.path.join(folder, f"clip.{ext}")) for ext in ("mp4", "webm", "gif")}


@pytest.mark.parametrize("ext", ["mp4", "webm", "gif"])
def test_read_clip_takes_strided_frames_resized_and_center_cropped(videos, ext):
    clip = data.read_clip(videos[ext], frames=3, stride=3, height=16, width=16, start=1)
    assert clip.shape == (3, 3, 16, 16) and clip.dtype.is_floating_point
    assert clip.min() >= -1 and clip.max() <= 1
    # frames 1, 4, 7 (lossy codecs move levels by a few units)
    np.testing.assert_allclose(to_level(clip[:, 0]).mean((1, 2)).numpy(), [RED[1], RED[4], RED[7]], atol=8)
    # 32x48 -> 16x24 (short side to 16) -> the middle 16 columns: green on the left 8, none on the right 8
    green = to_level(clip[:, 1])
    assert green[:, :, :7].min() > 220 and green[:, :, 9:].max() < 35


def test_read_clip_flips_and_makes_non_square_frames(videos):
    clip = data.read_clip(videos["mp4"], frames=2, stride=1, height=16, width=24, start=0)
    flipped = data.read_clip(videos["mp4"], frames=2, stride=1, height=16, width=24, start=0, flip=True)
    assert clip.shape == (2, 3, 16, 24)
    assert (flipped == clip.flip(-1)).all()
    assert to_level(flipped[:, 1, :, -10:]).min() > 220  # green now on the right


def test_levels_become_minus_one_to_one_exactly_and_the_input_is_left_as_it_was():
    levels = torch.arange(256, dtype=torch.uint8)
    as_float = levels.double()
    expected = (as_float / 127.5 - 1).clamp(-1, 1).float()
    assert torch.allclose(data.levels_to_unit(levels), expected, atol=1e-7, rtol=0)
    assert data.levels_to_unit(levels)[[0, 255]].tolist() == [-1.0, 1.0]
    given = levels.float()
    assert torch.equal(data.to_unit(levels), data.levels_to_unit(given)) and torch.equal(given, levels.float())
    assert data.to_unit(given) is given  # float clips are in [-1, 1] already


def test_random_start_comes_from_the_rng_and_stays_inside_the_video(videos):
    def start(seed):
        clip = data.read_clip(videos["gif"], frames=3, stride=3, height=16, width=16, rng=random.Random(seed))
        return int(np.abs(np.array(RED) - to_level(clip[0, 0]).mean().item()).argmin())
    starts = [start(seed) for seed in range(12)]
    assert starts == [start(seed) for seed in range(12)]
    assert set(starts) <= {0, 1, 2, 3} and len(set(starts)) > 1  # 10 frames, a clip spans 7
    assert data.read_clip(videos["gif"], 3, 3, 16, 16).equal(data.read_clip(videos["gif"], 3, 3, 16, 16, start=0))


def test_short_and_corrupt_videos_raise_video_error(videos, tmp_path):
    with pytest.raises(data.VideoError, match="too short: 10 frames, need 13"):
        data.read_clip(videos["mp4"], frames=4, stride=4, height=16, width=16)
    with pytest.raises(data.VideoError, match="too short.*from frame 5"):
        data.read_clip(videos["gif"], frames=3, stride=3, height=16, width=16, start=5)
    with pytest.raises(data.VideoError, match="cannot decode"):
        data.read_clip(write_corrupt(str(tmp_path / "bad.mp4")), frames=2, stride=1, height=16, width=16)
    assert issubclass(data.VideoError, ValueError)


def test_folder_of_captioned_videos(tmp_path, capsys):
    root = str(tmp_path)
    a = captioned(root, "a.mp4", "a red square")
    b = captioned(root, "b.gif", "a gif")
    c = captioned(os.path.join(root, "sub"), "c.webm", "in a subfolder")
    write_video(os.path.join(root, "uncaptioned.mp4"))
    (tmp_path / "notes.md").write_text("not a video")
    assert data.find_videos(root) == [(a, "a red square"), (b, "a gif"), (c, "in a subfolder")]
    assert "uncaptioned.mp4: no caption file" in capsys.readouterr().err


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, header)
        writer.writeheader()
        writer.writerows(rows)


def test_webvid_csv_in_both_column_orders_and_layouts(tmp_path, capsys):
    root = str(tmp_path)
    # the 2M order, the official downloader's videos/{page_dir}/{videoid}.mp4 layout, one row not downloaded
    nested = write_video(os.path.join(root, "videos", "0001to0050", "1001.mp4"), frames=4)
    write_csv(os.path.join(root, "results_2M_val.csv"), ["videoid", "name", "page_idx", "page_dir", "duration", "contentUrl"], [
        dict(videoid=1001, name="Aerial, a coast", page_idx=1, page_dir="0001to0050", duration="PT00H00M10S", contentUrl="u"),
        dict(videoid=1002, name="not downloaded", page_idx=1, page_dir="0001to0050", duration="PT00H00M10S", contentUrl="u")])
    # the 10M order, flat layouts: DIR/{videoid}.mp4 and DIR/videos/{videoid}.mp4
    flat = write_video(os.path.join(root, "2001.mp4"), frames=4)
    flat_videos = write_video(os.path.join(root, "videos", "2002.mp4"), frames=4)
    write_csv(os.path.join(root, "results_10M_train.csv"), ["videoid", "contentUrl", "duration", "page_dir", "name"], [
        dict(videoid=2001, contentUrl="u", duration="PT00H00M12S", page_dir="elsewhere", name="a dog, running"),
        dict(videoid=2002, contentUrl="u", duration="PT00H00M12S", page_dir="", name="  timelapse  ")])
    assert data.find_videos(root) == [(flat, "a dog, running"), (flat_videos, "timelapse"),
                                      (nested, "Aerial, a coast")]
    assert "1 of 4 CSV rows have no video file" in capsys.readouterr().err
    assert data.find_videos(os.path.join(root, "results_2M_val.csv")) == [(nested, "Aerial, a coast")]


def test_unusable_datasets_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.find_videos(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no usable videos in .*same-named .txt caption"):
        data.find_videos(str(tmp_path))
    write_csv(str(tmp_path / "list.csv"), ["id", "caption"], [dict(id=1, caption="x")])
    with pytest.raises(ValueError, match="not a WebVid CSV.*'videoid' and 'name'"):
        data.find_videos(str(tmp_path))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Two good videos, a corrupt one and a too-short one, each captioned."""
    root = str(tmp_path_factory.mktemp("mixed"))
    captioned(root, "good0.mp4", "first")
    captioned(root, "good1.gif", "second")
    captioned(root, "short.mp4", "short", frames=2)
    write_corrupt(os.path.join(root, "corrupt.mp4"))
    with open(os.path.join(root, "corrupt.txt"), "w") as f:
        f.write("corrupt")
    return data.find_videos(root)


def dataset(items, **kwargs):
    return data.Dataset(items, frames=3, stride=2, height=16, width=16, seed=3, **kwargs)


def test_bad_videos_are_skipped_warned_once_and_counted(mixed, capsys):
    ds = dataset(mixed, caption_dropout=0.0)
    captions = [ds.sample(g)[1] for g in range(3 * len(mixed))]
    assert set(captions) == {"first", "second"}
    assert sorted(os.path.basename(ds.items[i][0]) for i in ds.bad) == ["corrupt.mp4", "short.mp4"]
    err = capsys.readouterr().err.splitlines()
    assert len([l for l in err if "skipping" in l and "corrupt.mp4: cannot decode" in l]) == 1
    assert len([l for l in err if "skipping" in l and "short.mp4: too short" in l]) == 1


def test_a_sample_depends_only_on_its_global_index(mixed):
    """What resuming and torchrun rely on: rank 1 of 2, reading only the odd samples from a fresh
    dataset, gets what one process reading them all gets."""
    ds = dataset(mixed, flip=True)
    everything = [ds.sample(g) for g in range(12)]
    odd = dataset(mixed, flip=True, rank=1)
    for g in range(1, 12, 2):
        clip, caption = odd.sample(g)
        assert clip.equal(everything[g][0]) and caption == everything[g][1]
    # and the draws do vary: clips, flips and dropped captions
    assert len({c.sum().item() for c, _ in everything}) > 2
    assert "" in {caption for _, caption in everything}


def test_caption_dropout_replaces_captions_with_the_empty_prompt(mixed):
    assert {dataset(mixed, caption_dropout=1.0).sample(g)[1] for g in range(4)} == {""}
    assert "" not in {dataset(mixed, caption_dropout=0.0).sample(g)[1] for g in range(4)}


def test_a_dataset_with_no_readable_video_fails_its_check(mixed):
    bad = [item for item in mixed if "good" not in item[0]]
    with pytest.raises(ValueError, match="none of the 2 videos could be used.*at least 5 frames"):
        dataset(bad).check_readable()


def test_shapes_dataset_gives_the_worlds_videos_by_global_index():
    import shapes
    dataset = data.ShapesDataset(frames=4, size=16, seed=5, caption_dropout=0.5)
    clips = [dataset.sample(g) for g in range(40)]
    for g, (clip, caption) in enumerate(clips):
        video, text = shapes.sample(g, 5, 4, 16)
        assert clip.shape == (4, 3, 16, 16) and clip.dtype == torch.uint8  # levels: the device makes them floats
        assert np.array_equal(clip.permute(0, 2, 3, 1).numpy(), video)
        assert caption in (text, "")
        assert dataset.sample(g)[1] == caption  # the dropout draw is the sample's own
    assert 5 < sum(c == "" for _, c in clips) < 35
    assert not dataset.bad
