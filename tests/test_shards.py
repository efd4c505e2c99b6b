"""video2dataset's webdataset shards as --data (shards.py, data.find_videos): samples listed from the tar
headers and read in place by offset; a clip without a caption, a member cut off by a truncated shard
and a file that is not a tar are left out, said and counted; a corrupt clip is skipped and counted
when it fails to decode, like any unreadable video."""
import io
import json
import os
import tarfile

import pytest

import data
import shards
from test_decode import read_code, write_clip

GOOD = [f"{i:09d}" for i in range(3)]


def write_shard(path, samples):
    """A tar of `samples` [(key, {extension: bytes})], each field one member `{key}{extension}`."""
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for ext, payload in fields.items():
                info = tarfile.TarInfo(key + ext)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def sample(key, clip, caption=None):
    fields = {".mp4": clip, ".json": json.dumps({"key": key, "status": "success"}).encode()}
    if caption is not None:
        fields[".txt"] = caption.encode()
    return key, fields


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = write_clip(str(tmp_path_factory.mktemp("clip") / "clip.mp4"), gop=8, b_frames=2)
    with open(path, "rb") as f:
        return path, f.read()


@pytest.fixture(scope="module")
def folder(clip, tmp_path_factory):
    """video2dataset's output: two good shards (with the stats and parquet files beside), a shard with
    a corrupt clip and a clip without a caption, one cut off inside its last clip, and one not a tar."""
    root = tmp_path_factory.mktemp("webvid_subset")
    _, video = clip
    write_shard(root / "00000.tar", [sample(key, video, f"caption {key}") for key in GOOD])
    write_shard(root / "00001.tar", [sample("000010000", video, "caption 000010000")])
    (root / "00000_stats.json").write_text("{}")
    (root / "00000.parquet").write_bytes(b"PAR1")
    write_shard(root / "00002.tar", [sample("000020000", b"\x00\x00\x00\x18ftypmp42 not a video" * 50, "corrupt"),
                                     sample("000020001", video),  # no caption
                                     sample("000020002", video, "caption 000020002")])
    cut = write_shard(root / "00003.tar", [sample("000030000", video, "caption 000030000"),
                                           sample("000030001", video, "cut off")])
    with tarfile.open(cut) as tar:
        last = tar.getmember("000030001.mp4")
    os.truncate(cut, last.offset_data + last.size // 2)
    (root / "00004.tar").write_bytes(b"this is not a tar file" * 100)
    return str(root)


def test_the_samples_of_every_shard_are_listed_in_order_from_the_headers(folder, capsys):
    items = data.find_videos(folder)
    assert [caption for _, caption in items] == [f"caption {key}" for key in GOOD] + [
        "caption 000010000", "corrupt", "caption 000020002", "caption 000030000"]
    member = items[0][0]
    assert isinstance(member, shards.Member) and str(member) == os.path.join(folder, "00000.tar") + ":000000000.mp4"
    err = capsys.readouterr().err
    assert "00002.tar:000020001.mp4: no caption (.txt); left out" in err
    assert "00003.tar:000030001.mp4: cut off by the end of the shard; left out" in err
    assert "00003.tar: truncated or damaged" in err
    assert "00004.tar: not a readable tar" in err
    assert items.left_out == 2  # the clips: the one without a caption and the cut one


def test_a_clip_read_from_its_shard_is_the_clip_read_from_its_file(folder, clip):
    path, video = clip
    member = data.find_videos(folder)[1][0]
    assert member.read() == video  # the member's bytes, found by offset
    for start in (0, 7, 8, 20):
        assert data.read_clip(member, 4, 3, 24, 64, start=start).equal(data.read_clip(path, 4, 3, 24, 64, start=start))
    assert [read_code(f) for f in data.read_frames(member, 3, 5, start=9)] == [9, 14, 19]


def test_a_single_shard_is_data_too(folder):
    items = data.find_videos(os.path.join(folder, "00001.tar"))
    assert [caption for _, caption in items] == ["caption 000010000"]


def test_a_corrupt_clip_in_a_shard_is_skipped_and_counted(folder, capsys):
    items = data.find_videos(folder)
    dataset = data.Dataset(items, frames=4, stride=3, height=24, width=64, seed=1, caption_dropout=0.0)
    captions = {dataset.sample(g)[1] for g in range(2 * len(items))}
    assert "corrupt" not in captions and len(captions) == len(items) - 1
    assert [str(items[i][0]).rsplit(":", 1)[1] for i in dataset.bad] == ["000020000.mp4"]
    assert capsys.readouterr().err.count("00002.tar:000020000.mp4: cannot decode") == 1


def test_a_folder_of_only_bad_shards_is_a_clear_error(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"not a tar")
    with pytest.raises(ValueError, match="no usable videos in .*video2dataset's .tar shards"):
        data.find_videos(str(tmp_path))
