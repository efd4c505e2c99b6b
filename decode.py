"""Decoding a video into frames: `read_frames`, the one way the project reads a video file (data.py,
evaluate.py and sample.py call it as data.read_frames), and `VideoError`, what it raises when a
video cannot give the frames asked for.

Videos go through PyAV (FFmpeg's libraries, in-process): seek to the keyframe at or before the first
frame wanted and decode from there, skipping the frames that no other frame refers to unless they
are wanted, and convert only the frames kept. A frame's index is its timestamp's, (pts - the
stream's start time) x its average frame rate, never a count of frames after a seek, so a clip is
exactly frames start, start + stride, ... whatever the keyframe interval, B-frames or first
timestamp. GIFs go through pillow from their first frame; a .npy file holds the frames themselves.
"""
import collections
import math
import sys

import av
import imageio.v3 as iio
import numpy as np

import shards


class VideoError(ValueError):
    """A video that cannot be decoded, or is too short for the frames asked for. `permanent`: it fails
    whatever the start (so a Dataset need not try it again); else only some starts may fail."""

    def __init__(self, message, permanent=True):
        super().__init__(message)
        self.permanent = permanent


def short_reason(e):
    """Decoder errors can carry a tool's whole stderr: keep the first and last lines."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip() and l.strip() != "=== stderr ==="]
    reason = lines[0] if lines else type(e).__name__
    return f"{reason} ({lines[-1]})" if len(lines) > 1 else reason


def read_frames(path, frames=None, stride=1, start=None, rng=None):
    """uint8 frames [F, H, W, 3] of the video at `path` (a file or a shards.Member) as read_clip picks
    them, unresized; frames=None: every frame from `start` (default 0). Videos go through PyAV
    (read_video), GIFs through pillow; a .npy file holds the frames themselves (evaluate.py t2v's
    lossless output)."""
    if frames is not None and (frames < 1 or stride < 1):
        raise ValueError(f"need frames >= 1 and stride >= 1, got frames={frames}, stride={stride}")
    name = str(path).lower()
    if name.endswith(".npy"):
        return read_npy(path, frames, stride, start)
    return (read_gif if name.endswith(".gif") else read_video)(path, frames, stride, start, rng)


def source(path):
    """What a decoder opens: the file's name, or a shard member's bytes as a file object."""
    return path.open() if isinstance(path, shards.Member) else path


def read_npy(path, frames, stride, start):
    try:
        video = np.load(source(path), allow_pickle=False)
    except Exception as e:
        raise VideoError(f"{path}: cannot read: {short_reason(e)}") from e
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise VideoError(f"{path}: expected uint8 frames [F, H, W, 3], found {video.dtype} {list(video.shape)}")
    first = start or 0
    picked = video[first::stride][:frames]
    if frames is not None and len(picked) < frames:
        raise VideoError(f"{path}: too short: {len(video)} frames, need {(frames - 1) * stride + 1 + first}")
    return picked


def too_short(path, count, frames, stride, start, explicit, broken=None):
    span = (frames - 1) * stride + 1
    return VideoError(f"{path}: too short: {count} frames, need {span + (start if explicit else 0)} "
                      f"({frames} frames {stride} apart" + (f" from frame {start})" if explicit else ")")
                      + (f"; it breaks off there: {broken}" if broken else ""), permanent=not broken)


def read_gif(path, frames, stride, start, rng):
    """Pillow decodes from the first frame; a clip keeps the last `span` frames decoded (the fallback
    for a GIF shorter than it says)."""
    span = (frames - 1) * stride + 1 if frames is not None else math.inf  # source frames covered by the clip
    window = collections.deque(maxlen=None if frames is None else span)  # the last `span` decoded frames
    count = 0
    try:
        with iio.imopen(source(path), "r", plugin="pillow", extension=".gif") as video:
            estimate = video.properties(index=...).shape[0]
            explicit = start is not None or frames is None
            if start is None:
                start = rng.randrange(max(estimate - span, 0) + 1) if rng is not None and frames is not None else 0
            for frame in video.iter():
                count += 1
                if frames is not None or count > start:
                    window.append(frame)
                if count == start + span:
                    break
    except Exception as e:  # any decoder failure makes this one video unusable, nothing more
        raise VideoError(f"{path}: cannot decode: {short_reason(e)}") from e
    if frames is None and not window:
        raise VideoError(f"{path}: no frames" + (f" after frame {start}" if start else ""))
    if frames is not None and (len(window) < span or (explicit and count < start + span)):
        raise too_short(path, count, frames, stride, start, explicit)
    return np.stack([as_rgb(f) for f in list(window)[::stride]])


def read_video(path, frames, stride, start, rng):
    """read_frames through PyAV, as the module docstring says. A random start is drawn within the
    container's frame count (or its duration's); a video that ends before that reads its last frames.
    Frames decode one after another (FFmpeg's frame threads would report a broken packet late, so what
    a clip holds would depend on the threads): worker processes (loader.py) read clips in parallel."""
    explicit, span = start is not None or frames is None, (frames - 1) * stride + 1 if frames is not None else 1
    try:
        container = av.open(source(path), metadata_errors="ignore")
    except Exception as e:
        raise VideoError(f"{path}: cannot decode: {short_reason(e)}") from e
    with container:
        if not container.streams.video:
            raise VideoError(f"{path}: no video stream")
        stream, clock = container.streams.video[0], Clock(container.streams.video[0], container)
        if not clock.rate:
            raise VideoError(f"{path}: no frame rate")
        stream.thread_count = 1  # no thread pool: nor would one survive a fork (loader.py's workers)
        if start is None:
            start = rng.randrange(max(clock.estimate - span, 0) + 1) if rng is not None and frames is not None else 0
        try:
            picked, count, broken = read_from(path, container, stream, clock, start, frames, stride, seek=start > 0)
            if frames is not None and len(picked) < frames and not explicit and count >= span:
                start = count - span  # shorter than its metadata says: its last frames, as a GIF's
                picked, count, broken = read_from(path, container, stream, clock, start, frames, stride, seek=True)
        except VideoError:
            raise
        except Exception as e:  # e.g. a failed seek: perhaps only from some starts
            raise VideoError(f"{path}: cannot decode: {short_reason(e)}", permanent=False) from e
    if frames is None and not picked:
        raise VideoError(f"{path}: no frames" + (f" after frame {start}" if start else "")
                         + (f"; it breaks off there: {broken}" if broken else ""), permanent=not broken)
    if frames is not None and len(picked) < frames:
        raise too_short(path, count, frames, stride, start, explicit, broken)
    return np.stack(picked)


class Clock:
    """A stream's frame index <-> timestamp, from its start time and average frame rate."""

    def __init__(self, stream, container):
        self.rate = stream.average_rate or stream.guessed_rate
        self.base, self.t0 = stream.time_base, stream.start_time or 0
        seconds = (stream.duration * self.base if stream.duration else
                   container.duration / av.time_base if container.duration else 0)
        self.estimate = stream.frames or int(seconds * self.rate)  # the container's frame count, or its duration's

    def index(self, pts):
        return round((pts - self.t0) * self.base * self.rate)

    def pts(self, index):
        return self.t0 + round(index / (self.rate * self.base))


def read_from(path, container, stream, clock, start, frames, stride, seek):
    """([kept frames as uint8 RGB], the frame count if the video ended before the last frame wanted,
    why it broke off if a packet failed). Where a seek lands after the first frame wanted (a container
    without an index, such as MPEG-TS), seek earlier."""
    wanted = range(start, start + frames * stride, stride) if frames is not None else range(start, sys.maxsize)
    back = 0
    while True:
        if seek:  # backward: to the keyframe at or before; where that is a frame after it, seek earlier
            container.seek(clock.pts(start - back), stream=stream)
        picked, first, count, broken = scan(path, container, stream, clock, wanted)
        if not seek or (first is not None and first <= start) or start - back < 0:
            break
        back = max(2 * back, int(clock.rate))  # one second, two, four, ... and once before the first frame
    if first is not None and first > start:
        raise VideoError(f"{path}: decoding starts at frame {first}, after frame {start}", permanent=False)
    return picked, count, broken


def scan(path, container, stream, clock, wanted):
    """Decode until every frame of `wanted` is kept: (kept frames, the first index decoded, how many
    frames the video holds if it ended first, why decoding broke off or None). The frames held are
    counted by the packets' timestamps (decoded or not); where a packet fails to decode, the video
    ends with the last frame decoded before it. A frame missing from a variable-rate stream is the
    last one before it."""
    codec, kept, count = stream.codec_context, Kept(path, clock, wanted), 0
    skip, broken = None, None
    try:
        for packet in container.demux(stream):
            index = None if packet.pts is None else clock.index(packet.pts)
            count = count if index is None else max(count, index + 1)
            # a frame that no other frame refers to (most B-frames) need not be decoded unless it is wanted
            needed = index is None or index in wanted
            if skip is not needed:
                codec.skip_frame, skip = ("DEFAULT" if needed else "NONREF"), needed
            if kept.add(codec.decode(packet)):
                return kept.frames, kept.first, count, None
    except av.FFmpegError as e:  # corrupt or cut-off data: the frames decoded before it are still good
        broken = short_reason(e)
        try:
            kept.add(codec.decode(None))
        except av.FFmpegError:
            pass
        count = kept.last + 1 if kept.last is not None else 0
    return kept.frames, kept.first, count, broken


class Kept:
    """The frames of `wanted` from decoded frames in presentation order, by their timestamps."""

    def __init__(self, path, clock, wanted):
        self.path, self.clock, self.wanted = path, clock, wanted
        self.frames, self.first, self.last, self.prev = [], None, None, None

    def add(self, frames):
        """Take the frames that are wanted; whether all are there."""
        for frame in frames:
            if frame.pts is None:
                raise VideoError(f"{self.path}: frames without timestamps")
            k = self.clock.index(frame.pts)
            self.first = k if self.first is None else self.first
            while self.prev is not None and self.missing() and self.wanted[len(self.frames)] < k:
                self.frames.append(self.prev.to_ndarray(format="rgb24"))
            if self.missing() and self.wanted[len(self.frames)] == k:
                self.frames.append(frame.to_ndarray(format="rgb24"))
            self.prev, self.last = frame, k
            if not self.missing():
                return True
        return False

    def missing(self):
        return len(self.frames) < len(self.wanted)


def as_rgb(frame):
    frame = np.asarray(frame)
    if frame.ndim == 2:  # grayscale
        frame = np.repeat(frame[..., None], 3, axis=-1)
    return frame[..., :3]  # drop alpha
