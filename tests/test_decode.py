"""data.read_frames / read_clip on real codecs: PyAV seeks to the keyframe before a clip and takes each
frame's index from its timestamp. Each generated clip writes its frame index into every frame as a
barcode of black and white blocks (which survives H.264 and the resize), so a test reads back which
frames it got: at every start, inside a GOP and on its edges, for a GOP longer than the clip and
short ones, with B-frames, a stream whose first timestamp is not 0, a container whose seeks land
after the frame asked for (MPEG-TS), and a file cut short of what its header says."""
import fractions
import os
import random

import av
import numpy as np
import pytest

import data

BITS, BLOCK, HEIGHT, WIDTH = 8, 16, 48, 128  # 8 blocks of 16 pixels: frame indices 0..255
FRAMES = 60


def barcode(i):
    """Frame i: its index in binary, bit b black (0) or white (1) in the b-th block of the top half; a
    moving ramp in the bottom half, so that the frames differ in more than the code."""
    frame = np.full((HEIGHT, WIDTH, 3), 90, np.uint8)
    frame[HEIGHT // 2:, :, 1] = (np.arange(WIDTH) * 2 + i * 5) % 256
    for b in range(BITS):
        frame[:HEIGHT // 2, b * BLOCK:(b + 1) * BLOCK] = 255 if (i >> b) & 1 else 0
    return frame


def read_code(frame):
    """The index a frame [H, W, 3] (any size with the barcode's aspect, uint8 or in [0, 255]) shows."""
    h, w = frame.shape[:2]
    return sum(1 << b for b in range(BITS) if frame[h // 4, int((b + 0.5) * w / BITS)].mean() > 128)


def write_clip(path, gop, b_frames, offset=0, frames=FRAMES, fps=25, options=None):
    """H.264 with a keyframe every `gop` frames (no scene-cut keyframes), `b_frames` B-frames, and the
    first frame's timestamp `offset` frames after 0; muxed by the container of `path`'s extension."""
    with av.open(path, "w", options=options or {}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.gop_size, stream.codec_context.max_b_frames = gop, b_frames
        stream.codec_context.time_base = fractions.Fraction(1, fps)
        stream.options = {"sc_threshold": "0", "keyint_min": str(gop)}
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(barcode(i), format="rgb24")
            frame.pts = offset + i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def structure(path):
    """(keyframe indices, whether any frame is shown in another order than decoded, first timestamp in s)."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        packets = [p for p in container.demux(stream) if p.size]
        t0 = stream.start_time or 0
        keys = [round((p.pts - t0) * stream.time_base * stream.average_rate) for p in packets if p.is_keyframe]
        reordered = any(p.pts != p.dts for p in packets)
        return keys, reordered, float(t0 * stream.time_base)


CLIPS = {  # name: (write_clip arguments, extension)
    "long gop": (dict(gop=250, b_frames=2), ".mp4"),     # one keyframe: every start decodes from frame 0
    "gop 1": (dict(gop=1, b_frames=0), ".mp4"),           # every frame a keyframe
    "gop 4, b-frames": (dict(gop=4, b_frames=2), ".mp4"),
    "gop 12, b-frames": (dict(gop=12, b_frames=3), ".mp4"),
    "offset timestamps": (dict(gop=10, b_frames=2, offset=50), ".mp4"),  # the first frame shown at 2 s
    "matroska, offset": (dict(gop=10, b_frames=2, offset=50), ".mkv"),
    "mpeg-ts, offset": (dict(gop=10, b_frames=2, offset=50), ".ts"),     # seeks land after the target
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("barcodes")
    return {name: write_clip(str(folder / (name.replace(" ", "-").replace(",", "") + ext)), **kwargs)
            for name, (kwargs, ext) in CLIPS.items()}


def test_the_clips_have_the_structure_they_are_named_for(clips):
    keys, reordered, t0 = structure(clips["long gop"])
    assert keys == [0] and reordered
    assert structure(clips["gop 1"])[0] == list(range(FRAMES))
    keys, reordered, t0 = structure(clips["gop 12, b-frames"])
    assert keys == list(range(0, FRAMES, 12)) and reordered and t0 == 0
    for name in ("offset timestamps", "matroska, offset", "mpeg-ts, offset"):
        keys, reordered, t0 = structure(clips[name])
        assert keys == list(range(0, FRAMES, 10)) and reordered and t0 >= 2.0, name
    # what the barcode reads is what was written
    assert [read_code(barcode(i)) for i in range(256)] == list(range(256))


@pytest.mark.parametrize("name", list(CLIPS))
def test_every_start_gives_exactly_the_frames_asked_for(clips, name):
    """All starts 0..last: inside GOPs, on keyframes and on the frames just before and after them."""
    frames, stride = 4, 3
    span = (frames - 1) * stride + 1
    wrong = {}
    for start in range(FRAMES - span + 1):
        got = [read_code(f) for f in data.read_frames(clips[name], frames, stride, start)]
        if got != list(range(start, start + span, stride)):
            wrong[start] = got
    assert not wrong, f"{len(wrong)} starts read the wrong frames, e.g. {list(wrong.items())[:3]}"


def test_resized_clips_keep_their_frames_and_every_frame_reads_in_order(clips):
    clip = data.read_clip(clips["gop 12, b-frames"], 5, 2, 24, 64, start=13)  # [5, 3, 24, 64] in [-1, 1]
    levels = ((clip + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    assert [read_code(f) for f in levels] == [13, 15, 17, 19, 21]
    every = data.read_frames(clips["offset timestamps"], start=7)  # frames=None: every frame from the start
    assert [read_code(f) for f in every] == list(range(7, FRAMES))


def test_random_starts_come_from_the_rng_and_cover_the_video(clips):
    def first(seed):
        return read_code(data.read_frames(clips["gop 4, b-frames"], 3, 5, rng=random.Random(seed))[0])
    starts = [first(seed) for seed in range(30)]
    assert starts == [first(seed) for seed in range(30)]
    assert min(starts) >= 0 and max(starts) <= FRAMES - 11 and len(set(starts)) > 10


def decodable(path):
    """How many frames decode, from the first, before the data breaks off (and the decoder is drained)."""
    frames = []
    with av.open(path) as container:
        codec = container.streams.video[0].codec_context
        for packet in container.demux(video=0):
            try:
                frames += codec.decode(packet)
            except av.FFmpegError:
                frames += codec.decode(None)
                break
    assert [read_code(f.to_ndarray(format="rgb24")) for f in frames] == list(range(len(frames)))
    return len(frames)


def test_a_file_cut_short_of_its_header_falls_back_to_its_last_frames(clips, tmp_path):
    """The header (moov, written first) says 60 frames; the data breaks off earlier. A random start
    past the break reads the last frames before it, as a GIF shorter than it says would; an explicit
    start there is too short, and not for every start (not `permanent`)."""
    path = write_clip(str(tmp_path / "cut.mp4"), gop=8, b_frames=2, options={"movflags": "faststart"})
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) * 2 // 3)
    with av.open(path) as container:
        assert container.streams.video[0].frames == FRAMES
    count = decodable(path)
    assert 15 < count < FRAMES - 10
    late = next(seed for seed in range(1000) if random.Random(seed).randrange(FRAMES - 9) > count)
    got = [read_code(f) for f in data.read_frames(path, 4, 3, rng=random.Random(late))]
    assert got == list(range(got[0], got[0] + 10, 3)) and count - 14 <= got[0] <= count - 10, (got, count)
    assert [read_code(f) for f in data.read_frames(path, 4, 3, start=count - 12)] == list(range(count - 12, count - 2, 3))
    with pytest.raises(data.VideoError, match=r"too short: \d+ frames, need \d+ .* from frame \d+\); it breaks off") as e:
        data.read_frames(path, 4, 3, start=count)
    assert not e.value.permanent


def test_undecodable_and_too_short_videos_are_video_errors(clips, tmp_path):
    with pytest.raises(data.VideoError, match="too short: 60 frames, need 61") as e:
        data.read_frames(clips["gop 4, b-frames"], 16, 4)
    assert e.value.permanent  # whatever the start
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(5000))
    with pytest.raises(data.VideoError, match="garbage.mp4: cannot decode") as e:
        data.read_frames(str(garbage), 2, 1)
    assert e.value.permanent
