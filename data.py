"""Video-caption data for training SimDA: WebVid-style CSVs, a folder of captioned videos, or one clip.

`read_clip` decodes `frames` frames, `stride` apart, from a random start (`read_frames`: imageio's
ffmpeg plugin; pillow for GIFs), resizes them on the short side, center-crops to height x width and scales to
[-1, 1]. `find_videos` lists (video, caption) pairs, `Dataset` hands them out for training;
`ShapesDataset` makes fresh videos of the synthetic shapes world instead (train.py --data shapes);
`cache_latents` encodes one clip per video once (train.py --cache-latents).

Every random choice of a training sample (which video, its first frame, the flip, dropping its
caption) is drawn from a generator seeded by (seed, global sample index), never from a running RNG
state. So a resumed run continues the interrupted one exactly, and N ranks that each take every
N-th sample of the global batch together see exactly what one process would.
"""
import collections
import csv
import math
import os
import random
import sys

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F

import shapes
from video import stack_clips

VIDEO_EXTENSIONS = (".mp4", ".webm", ".gif")


class VideoError(ValueError):
    """A video that cannot be decoded, or is too short for the frames asked for."""


def sample_seed(*parts):
    """A 63-bit seed from a tuple such as (seed, "noise", sample index); the same in every process."""
    return random.Random(":".join(map(str, parts))).getrandbits(63)


def generator(*parts):
    """A torch CPU generator seeded by `sample_seed(*parts)`: the project's one seeding scheme."""
    return torch.Generator().manual_seed(sample_seed(*parts))


def short_reason(e):
    """imageio's ffmpeg errors carry ffmpeg's whole stderr: keep the first and last lines."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip() and l.strip() != "=== stderr ==="]
    reason = lines[0] if lines else type(e).__name__
    return f"{reason} ({lines[-1]})" if len(lines) > 1 else reason


def read_clip(path, frames, stride, height, width, start=None, flip=False, rng=None):
    """`frames` frames of the video at `path`, `stride` frames apart, as a float tensor
    [frames, 3, height, width] in [-1, 1]. start=None: a random start from `rng` (a random.Random),
    or 0 without one; a video shorter than its estimated length falls back to its last frames."""
    picked = read_frames(path, frames, stride, start, rng)
    return resize_crop(torch.from_numpy(picked).permute(0, 3, 1, 2).float(), height, width, flip)


def read_frames(path, frames=None, stride=1, start=None, rng=None):
    """uint8 frames [F, H, W, 3] of the video at `path` as read_clip picks them, unresized; frames=None:
    every frame from `start` (default 0). A .npy file holds the frames themselves (evaluate.py t2v's
    lossless output)."""
    if frames is not None and (frames < 1 or stride < 1):
        raise ValueError(f"need frames >= 1 and stride >= 1, got frames={frames}, stride={stride}")
    if str(path).lower().endswith(".npy"):
        try:
            video = np.load(path, allow_pickle=False)
        except Exception as e:
            raise VideoError(f"{path}: cannot read: {short_reason(e)}") from e
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise VideoError(f"{path}: expected uint8 frames [F, H, W, 3], found {video.dtype} {list(video.shape)}")
        first = start or 0
        picked = video[first::stride][:frames]
        if frames is not None and len(picked) < frames:
            raise VideoError(f"{path}: too short: {len(video)} frames, need {(frames - 1) * stride + 1 + first}")
        return picked
    span = (frames - 1) * stride + 1 if frames is not None else math.inf  # source frames covered by the clip
    window = collections.deque(maxlen=None if frames is None else span)  # the last `span` decoded frames
    count = 0
    try:
        gif = str(path).lower().endswith(".gif")
        with iio.imopen(path, "r", plugin="pillow" if gif else "FFMPEG") as video:
            if gif:
                estimate = video.properties(index=...).shape[0]
            else:
                meta = video.metadata()
                estimate = meta.get("nframes", math.inf)
                if not math.isfinite(estimate):  # ffmpeg often does not know; estimate from duration
                    estimate = meta.get("duration", 0) * meta.get("fps", 0)
                estimate = int(estimate) if math.isfinite(estimate) else 0
            explicit = start is not None or frames is None
            if start is None:
                start = rng.randrange(max(estimate - span, 0) + 1) if rng is not None and frames is not None else 0
            for frame in video.iter():
                count += 1
                if frames is not None or count > start:  # a clip keeps its last `span` frames (the fallback)
                    window.append(frame)
                if count == start + span:
                    break
    except Exception as e:  # any decoder failure makes this one video unusable, nothing more
        raise VideoError(f"{path}: cannot decode: {short_reason(e)}") from e
    if frames is None and not window:
        raise VideoError(f"{path}: no frames" + (f" after frame {start}" if start else ""))
    if frames is not None and (len(window) < span or (explicit and count < start + span)):
        raise VideoError(f"{path}: too short: {count} frames, need {span + (start if explicit else 0)} "
                         f"({frames} frames {stride} apart" + (f" from frame {start})" if explicit else ")"))
    return np.stack([as_rgb(f) for f in list(window)[::stride]])


def as_rgb(frame):
    frame = np.asarray(frame)
    if frame.ndim == 2:  # grayscale
        frame = np.repeat(frame[..., None], 3, axis=-1)
    return frame[..., :3]  # drop alpha


def resize_crop(x, height, width, flip=False):
    """[F, 3, h, w] in [0, 255] -> [F, 3, height, width] in [-1, 1]: resize so that the frame covers
    height x width, then center-crop."""
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    if flip:
        x = x.flip(-1)
    return (x / 127.5 - 1).clamp(-1, 1)


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def find_videos(root):
    """[(video path, caption)] from a WebVid-style CSV (a .csv file, or every .csv in the folder
    `root`) or, without a CSV, from the video files under `root` that have a same-named .txt caption."""
    if not os.path.exists(root):
        raise ValueError(f"--data {root} does not exist")
    if os.path.isfile(root):
        if not root.endswith(".csv"):
            raise ValueError(f"--data {root} is a file but not a .csv: pass a WebVid CSV or a folder of videos")
        folder, csvs = os.path.dirname(root) or ".", [root]
    else:
        folder, csvs = root, sorted(os.path.join(root, n) for n in os.listdir(root) if n.endswith(".csv"))
    items = webvid_items(folder, csvs) if csvs else folder_items(folder)
    if not items:
        raise ValueError(f"no usable videos in {root}: expected a WebVid CSV (columns videoid, name, page_dir, ...) "
                         f"with the videos at {folder}/videos/{{page_dir}}/{{videoid}}.mp4, {folder}/{{videoid}}.mp4 "
                         f"or {folder}/videos/{{videoid}}.mp4, or video files ({', '.join(VIDEO_EXTENSIONS)}) each "
                         "with a same-named .txt caption")
    return items


def webvid_items(folder, csvs):
    items, missing = [], []
    for path in csvs:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not {"videoid", "name"} <= set(reader.fieldnames or ()):
                raise ValueError(f"{path} is not a WebVid CSV: it needs the columns 'videoid' and 'name' "
                                 f"(found {reader.fieldnames})")
            for row in reader:
                vid, page_dir = row["videoid"].strip(), (row.get("page_dir") or "").strip()
                candidates = ([os.path.join(folder, "videos", page_dir, vid + ".mp4")] if page_dir else []) + [
                    os.path.join(folder, vid + ".mp4"), os.path.join(folder, "videos", vid + ".mp4")]
                found = next((c for c in candidates if os.path.exists(c)), None)
                if found:
                    items.append((found, row["name"].strip()))
                else:
                    missing.append(vid)
    if missing:
        warn(f"{len(missing)} of {len(items) + len(missing)} CSV rows have no video file and are skipped "
             f"(first: {missing[0]})")
    return items


def folder_items(folder):
    items = []
    for directory, subdirs, names in os.walk(folder):
        subdirs.sort()
        for name in sorted(names):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in VIDEO_EXTENSIONS:
                continue
            caption = os.path.join(directory, stem + ".txt")
            if not os.path.exists(caption):
                warn(f"{os.path.join(directory, name)}: no caption file {caption}; skipped")
                continue
            with open(caption, encoding="utf-8") as f:
                items.append((os.path.join(directory, name), f.read().strip()))
    return items


class Dataset:
    """Training samples by global sample index g: epoch g // len, in a shuffled order per epoch.
    A video that fails to decode is reported once, skipped from then on, and replaced by the next
    one in that epoch's order."""

    def __init__(self, items, frames, stride, height, width, seed=0, caption_dropout=0.1, flip=False,
                 random_start=True, rank=0):
        self.items, self.frames, self.stride, self.height, self.width = items, frames, stride, height, width
        self.seed, self.caption_dropout, self.flip, self.random_start = seed, caption_dropout, flip, random_start
        self.prefix = f"[rank {rank}] " if rank else ""
        self.bad = set()  # indices of the videos that could not be used
        self._order = (None, None)

    def __len__(self):
        return len(self.items)

    def order(self, epoch):
        if self._order[0] != epoch:
            order = list(range(len(self.items)))
            random.Random(sample_seed(self.seed, "epoch", epoch)).shuffle(order)
            self._order = (epoch, order)
        return self._order[1]

    def read(self, idx, rng):
        """The clip of video idx (start and flip drawn from rng), or None after reporting why not."""
        path = self.items[idx][0]
        flip = self.flip and rng.random() < 0.5
        try:
            return read_clip(path, self.frames, self.stride, self.height, self.width,
                             start=None if self.random_start else 0, flip=flip, rng=rng)
        except VideoError as e:
            warn(f"{self.prefix}skipping {e}")
            self.bad.add(idx)
            return None

    def sample(self, g, cache=None):
        """(clip, caption) of global sample g; with `cache` ({idx: value} of the usable videos), the
        cached value in place of the clip."""
        epoch, position = divmod(g, len(self.items))
        order = self.order(epoch)
        for k in range(len(order)):
            idx = order[(position + k) % len(order)]
            if idx in self.bad or (cache is not None and idx not in cache):
                continue
            clip = cache[idx] if cache is not None else self.read(idx, random.Random(sample_seed(self.seed, g, idx)))
            if clip is not None:
                drop = random.Random(sample_seed(self.seed, "caption", g)).random() < self.caption_dropout
                return clip, "" if drop else self.items[idx][1]
        raise ValueError(f"none of the {len(self.items)} videos could be read (see the warnings above)")

    def check_readable(self):
        """Decode videos in order until one works: an unreadable dataset fails before any model loads."""
        for idx in range(len(self.items)):
            if self.read(idx, random.Random(0)) is not None:
                return
        raise ValueError(f"none of the {len(self.items)} videos could be used (see the warnings above): "
                         f"each must decode and have at least {(self.frames - 1) * self.stride + 1} frames "
                         f"({self.frames} frames {self.stride} apart)")


@torch.no_grad()
def cache_latents(vae, dataset, seed, rank, world, device):
    """train.py --cache-latents: {video index: (mean, logvar)} of one clip per video, encoded once by
    the frozen VAE; each rank encodes its share, then all swap."""
    cache = {}
    for idx in range(rank, len(dataset), world):
        clip = dataset.read(idx, random.Random(sample_seed(seed, "cache", idx))) if idx not in dataset.bad else None
        if clip is not None:
            cache[idx] = tuple(m[0].float().cpu() for m in vae.encode_video(stack_clips([clip]).to(device)))
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, (cache, dataset.bad))
        for part, bad in parts:
            cache.update(part)
            dataset.bad |= bad
    if not cache:
        raise ValueError(f"none of the {len(dataset)} videos could be encoded (see the warnings above)")
    return cache


class ShapesDataset:
    """train.py's data for `--data shapes`: an endless stream of fresh videos of the moving-shapes
    world (shapes.py), drawn from (seed, global sample index), so nothing is read from disk and no
    video is seen twice. It has Dataset's interface; nothing is ever skipped. `render`: draw the
    `size`-pixel scenes with that many pixels (the upscaler's high-res truth; see shapes.make_video)."""

    def __init__(self, frames, size, seed=0, caption_dropout=0.1, render=None):
        self.frames, self.size, self.seed, self.caption_dropout = frames, size, seed, caption_dropout
        self.render = render or size
        self.bad = set()

    def __len__(self):
        return len(shapes.COMBINATIONS)  # the distinct captions; videos are never reused

    def sample(self, g, cache=None):
        video, text = shapes.sample(g, self.seed, self.frames, self.size, self.render)
        clip = resize_crop(torch.from_numpy(video).permute(0, 3, 1, 2).float(), self.render, self.render)
        drop = random.Random(sample_seed(self.seed, "caption", g)).random() < self.caption_dropout
        return clip, "" if drop else text

    def check_readable(self):
        pass  # generated, never unreadable
