"""loader.Feed, train.py's input: the same steps, bitwise, whatever the number of worker processes (a
folder of videos and video2dataset shards, each with bad videos); a resumed run and a second rank get
their own samples; the videos skipped in workers are warned once and counted in the training
process; a dataset with nothing left to read is one clear error; the time spent waiting for data,
and the hint of which --num-workers would keep up."""
import os
import random
import time

import pytest
import torch

import data
import loader
from test_data import write_folder_with_bad_videos
from test_shards import sample, write_shard

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A captioned folder: three good videos, a corrupt one and a too-short one."""
    return write_folder_with_bad_videos(str(tmp_path_factory.mktemp("videos")))


@pytest.fixture(scope="module")
def shard_folder(videos, tmp_path_factory):
    """The same videos as two shards."""
    root = tmp_path_factory.mktemp("shards")
    samples = []
    for name in ["a.mp4", "b.mp4", "short.mp4", "corrupt.mp4"]:
        with open(os.path.join(videos, name), "rb") as f:
            samples.append(sample(name[:-4], f.read(), f"caption {name}"))
    write_shard(root / "00000.tar", samples[:2])
    write_shard(root / "00001.tar", samples[2:])
    return str(root)


def dataset(root):
    return data.Dataset(data.find_videos(root), frames=3, stride=2, height=16, width=16, seed=4, caption_dropout=0.3,
                        flip=True)


def feed_all(ds, workers, first=0, steps=8, rank=0, world=1, batch_size=3):
    feed = loader.Feed(ds, batch_size, rank, world, first, steps, workers, CPU)
    steps = [feed.next() for _ in range(first, steps)]
    summary = feed.close()
    return steps, summary


def assert_same_steps(ours, theirs):
    assert len(ours) == len(theirs)
    for (gs, batch), (their_gs, their_batch) in zip(ours, theirs):
        assert gs == their_gs and [c for _, c in batch] == [c for _, c in their_batch]
        assert all(a.equal(b) for (a, _), (b, _) in zip(batch, their_batch))


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_zero_one_and_two_workers_feed_bitwise_the_same_steps(source, videos, shard_folder, capsys):
    root = videos if source == "folder" else shard_folder
    capsys.readouterr()
    runs = {}
    for workers in (0, 1, 2):
        ds = dataset(root)
        steps, summary = feed_all(ds, workers)
        err = capsys.readouterr().err
        runs[workers] = steps
        # the bad videos are warned once each, by the training process, and counted
        expected = ["corrupt.mp4", "short.mp4"] if source == "folder" else ["00001.tar:corrupt.mp4", "00001.tar:short.mp4"]
        assert sorted(os.path.basename(str(ds.items[i][0])) for i in ds.bad) == expected
        assert err.count("corrupt.mp4: cannot decode") == 1 and err.count("short.mp4: too short") == 1, err
        assert f"2 of {len(ds)} videos skipped" in summary
    assert_same_steps(runs[1], runs[0])
    assert_same_steps(runs[2], runs[0])
    clips = [clip for _, batch in runs[0] for clip, _ in batch]
    assert len({c.sum().item() for c in clips}) > 3 and {""} < {cap for _, b in runs[0] for _, cap in b}


def test_workers_hand_over_uint8_levels_which_become_the_float_clips_on_the_device(videos):
    """A quarter of float32's bytes through the workers' shared memory; `pixels` makes them exactly the float
    clip in [-1, 1] that data.read_clip reads."""
    good = [item for item in data.find_videos(videos) if "corrupt" not in item[0] and "short" not in item[0]]
    ds = data.Dataset(good, frames=3, stride=2, height=16, width=16, seed=4, flip=True)
    (gs, batch), = feed_all(ds, 1, steps=1)[0]
    assert all(clip.dtype == torch.uint8 and clip.shape == (3, 3, 16, 16) for clip, _ in batch)
    clips = loader.pixels(batch, CPU)
    assert clips.dtype == torch.float32 and clips.shape == (3, 3, 3, 16, 16)
    for i, g in enumerate(gs):
        idx = ds.order(0)[g]  # every video is good: the sample's own pick
        rng = random.Random(data.sample_seed(ds.seed, g, idx))
        flip = rng.random() < 0.5
        expected = data.read_clip(ds.items[idx][0], 3, 2, 16, 16, flip=flip, rng=rng)
        assert expected.dtype == torch.float32 and clips[i].transpose(0, 1).equal(expected)


def test_a_resumed_run_and_a_second_rank_get_their_own_samples(videos):
    whole, _ = feed_all(dataset(videos), 0)
    resumed, _ = feed_all(dataset(videos), 2, first=5)
    assert_same_steps(resumed, whole[5:])
    odd, _ = feed_all(dataset(videos), 2, rank=1, world=2, batch_size=2)
    pairs, _ = feed_all(dataset(videos), 0, batch_size=2)
    assert [gs for gs, _ in odd] == [[2 * step + 1] for step in range(8)]
    assert all(clip.equal(pair[1][1][0]) for (_, [(clip, _)]), pair in zip(odd, pairs))


def test_a_dataset_with_nothing_left_to_read_is_one_clear_error_from_a_worker(videos):
    items = [item for item in data.find_videos(videos) if "corrupt" in item[0]]
    feed = loader.Feed(data.Dataset(items, 3, 2, 16, 16), 1, 0, 1, 0, 2, 1, CPU)
    with pytest.raises(ValueError, match=r"^none of the 1 videos could be read \(see the warnings above\)$"):
        feed.next()
    feed.close()


class Slow:
    """A dataset whose samples take `seconds` to read."""

    def __init__(self, seconds):
        self.seconds, self.bad, self.reports, self.quiet = seconds, set(), [], False

    def sample(self, g, cache=None):
        time.sleep(self.seconds)
        return torch.zeros(1), "caption"


def test_the_wait_for_data_is_measured_and_an_input_bound_run_is_told_which_workers_to_try():
    feed = loader.Feed(Slow(0.1), 1, 0, 1, 0, 4, 0, CPU)
    for _ in range(4):
        feed.next()
        time.sleep(0.02)  # the step
    assert feed.wait_share() > 0.5 and "data wait" in feed.note()
    summary = feed.close()
    assert "input-bound: one process reads a step's clips in" in summary
    needed = int(summary.split("--num-workers ")[1].split()[0])
    assert 2 <= needed <= 6 and "this run had 0" in summary
    feed = loader.Feed(Slow(0.0), 1, 0, 1, 0, 3, 0, CPU)
    for _ in range(3):
        feed.next()
        time.sleep(0.05)
    assert feed.close().startswith("the loop waited for data") and "input-bound" not in feed.waits()


def test_the_default_workers_are_none_on_the_cpu_and_the_cores_less_one_on_a_gpu(monkeypatch):
    assert loader.default_workers(CPU) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    cores = loader.cpu_count()
    assert loader.default_workers(torch.device("cuda")) == max(1, min(16, cores - 1))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))  # more ranks than cores: still one worker each
    assert loader.default_workers(torch.device("cuda")) == 1
