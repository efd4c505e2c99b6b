"""Video-caption data for training SimDA: WebVid-style CSVs, a folder of captioned videos,
video2dataset's webdataset shards (shards.py), or one clip.

`read_clip` decodes `frames` frames, `stride` apart, from a random start (`read_frames`, decode.py:
PyAV, which seeks to the keyframe before the clip and takes each frame's index from its timestamp;
pillow for GIFs), resizes them on the short side, center-crops to height x width and scales to [-1, 1].
`find_videos` lists (video, caption) pairs, `Dataset` hands them out for training; `ShapesDataset`
makes fresh videos of the synthetic shapes world instead (train.py --data shapes); loader.py
reads them ahead of the training loop, in worker processes.

Every random choice of a training sample (which video, its first frame, the flip, dropping its
caption) is drawn from a generator seeded by (seed, global sample index), never from a running RNG
state, and a video that cannot be used is replaced by a pure function of the same (the next usable
one in that epoch's order). So a resumed run continues the interrupted one exactly, N ranks that each
take every N-th sample of the global batch together see exactly what one process would, and so do
any number of worker processes.
"""
import csv
import os
import random
import sys

import torch
import torch.nn.functional as F

import shapes
import shards
from decode import VideoError, read_frames  # noqa: F401 (data.VideoError, data.read_frames: what callers use)

VIDEO_EXTENSIONS = shards.VIDEO_EXTENSIONS


def sample_seed(*parts):
    """A 63-bit seed from a tuple such as (seed, "noise", sample index); the same in every process."""
    return random.Random(":".join(map(str, parts))).getrandbits(63)


def generator(*parts):
    """A torch CPU generator seeded by `sample_seed(*parts)`: the project's one seeding scheme."""
    return torch.Generator().manual_seed(sample_seed(*parts))


def read_clip(path, frames, stride, height, width, start=None, flip=False, rng=None, levels=False):
    """`frames` frames of the video at `path`, `stride` frames apart, as a float tensor
    [frames, 3, height, width] in [-1, 1] (`levels`: uint8 levels, see resize_crop). start=None: a random
    start from `rng` (a random.Random), or 0 without one; a video shorter than its estimated length falls
    back to its last frames."""
    picked = read_frames(path, frames, stride, start, rng)
    return resize_crop(torch.from_numpy(picked).permute(0, 3, 1, 2), height, width, flip, levels)


def to_unit(clips):
    """Training's clips on the device: uint8 levels (the workers' `levels`) -> float in [-1, 1]; float clips are
    in [-1, 1] already and pass unchanged."""
    return clips if clips.is_floating_point() else levels_to_unit(clips)


def levels_to_unit(x):
    """Levels 0..255 (any dtype) -> float in [-1, 1]."""
    # (x / 127.5 - 1).clamp(-1, 1) in one new tensor (a float x is copied, never changed)
    return x.to(torch.float32, copy=True).div_(127.5).sub_(1).clamp_(-1, 1)


def resize_crop(x, height, width, flip=False, levels=False):
    """[F, 3, h, w] levels 0..255 -> [F, 3, height, width] in [-1, 1]: resize so that the frame covers
    height x width (bilinear, antialiased), then center-crop. uint8 frames are resized as uint8 (rounded
    to levels): for frames laid out channels last, as decoded, that is torch's fast path, ten times
    the float one. `levels`: keep them levels (uint8 for uint8 frames: what training's workers hand over,
    a quarter of float32's bytes; `to_unit` on the device makes them the float clip)."""
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    if flip:
        x = x.flip(-1)
    if levels:  # contiguous: a view would carry the uncropped frames through a worker's shared memory
        return x.contiguous()
    return levels_to_unit(x)


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


class Videos(list):
    """find_videos' [(video, caption)]; `left_out`: how many videos it found but could not list (no
    caption, or cut off in a truncated shard)."""
    left_out = 0


def find_videos(root):
    """[(video, caption)] from a WebVid-style CSV (a .csv file, or every .csv in the folder `root`),
    from video2dataset's webdataset shards (a .tar file, or the .tar files in `root`: shards.py, the
    videos then being shards.Member), or else from the video files under `root` that have a same-named
    .txt caption."""
    if not os.path.exists(root):
        raise ValueError(f"--data {root} does not exist")
    if os.path.isfile(root):
        if not root.endswith((".csv", ".tar")):
            raise ValueError(f"--data {root} is a file but not a .csv or .tar: pass a WebVid CSV, a video2dataset "
                             "shard or a folder of videos")
        folder, names = os.path.dirname(root) or ".", [os.path.basename(root)]
    else:
        folder, names = root, sorted(os.listdir(root))
    csvs, tars = ([os.path.join(folder, n) for n in names if n.endswith(ext)] for ext in (".csv", ".tar"))
    items, left_out = webvid_items(folder, csvs) if csvs else tar_items(tars) if tars else folder_items(folder)
    if not items:
        raise ValueError(f"no usable videos in {root}: expected a WebVid CSV (columns videoid, name, page_dir, ...) "
                         f"with the videos at {folder}/videos/{{page_dir}}/{{videoid}}.mp4, {folder}/{{videoid}}.mp4 "
                         f"or {folder}/videos/{{videoid}}.mp4, video2dataset's .tar shards ({{key}}.mp4 with "
                         f"{{key}}.txt), or video files ({', '.join(VIDEO_EXTENSIONS)}) each with a same-named "
                         ".txt caption")
    items = Videos(items)
    items.left_out = left_out
    return items


def tar_items(tars):
    items, notes, left_out = shards.shard_items(tars)
    for note in notes[:10]:
        warn(note)
    if len(notes) > 10:
        warn(f"... and {len(notes) - 10} more such notes about the shards")
    return items, left_out


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
    return items, 0  # rows without a file are videos not downloaded, not videos left out


def folder_items(folder):
    items, left_out = [], 0
    for directory, subdirs, names in os.walk(folder):
        subdirs.sort()
        for name in sorted(names):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in VIDEO_EXTENSIONS:
                continue
            caption = os.path.join(directory, stem + ".txt")
            if not os.path.exists(caption):
                warn(f"{os.path.join(directory, name)}: no caption file {caption}; skipped")
                left_out += 1
                continue
            with open(caption, encoding="utf-8") as f:
                items.append((os.path.join(directory, name), f.read().strip()))
    return items, left_out


class Dataset:
    """Training samples by global sample index g: epoch g // len, in a shuffled order per epoch. A video
    that gives no clip is replaced by the next one in that epoch's order that does: a pure function of
    (seed, g) and the files, whichever process reads it. Each failing video is reported once and
    counted in `bad`; one that fails whatever its start (`unusable`) is not tried again."""

    def __init__(self, items, frames, stride, height, width, seed=0, caption_dropout=0.1, flip=False,
                 random_start=True, rank=0):
        self.items, self.frames, self.stride, self.height, self.width = items, frames, stride, height, width
        self.seed, self.caption_dropout, self.flip, self.random_start = seed, caption_dropout, flip, random_start
        self.prefix = f"[rank {rank}] " if rank else ""
        self.left_out = getattr(items, "left_out", 0)  # find_videos' count of videos it could not list
        self.bad = set()  # indices of the videos that failed to give a clip
        self.unusable = set()  # of those, the ones that fail at any start
        self.quiet, self.reports = False, []  # a loader worker's copy: failures queued for the main process
        self._order = (None, None)

    def failed(self, idx, reason, permanent=True):
        """Count a video that gave no clip, and warn the first time (in a loader worker: queue it)."""
        if permanent:
            self.unusable.add(idx)
        if idx not in self.bad:
            self.bad.add(idx)
            if self.quiet:
                self.reports.append((idx, reason, permanent))
            else:
                warn(f"{self.prefix}skipping {reason}")

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
                             start=None if self.random_start else 0, flip=flip, rng=rng, levels=True)
        except VideoError as e:
            self.failed(idx, str(e), e.permanent)
            return None

    def sample(self, g, cache=None):
        """(clip: uint8 levels [F, 3, H, W], caption) of global sample g; with `cache` ({idx: value} of the
        usable videos), the cached value in place of the clip."""
        epoch, position = divmod(g, len(self.items))
        order = self.order(epoch)
        for k in range(len(order)):
            idx = order[(position + k) % len(order)]
            if idx in self.unusable or (cache is not None and idx not in cache):
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


class ShapesDataset:
    """train.py's data for `--data shapes`: an endless stream of fresh videos of the moving-shapes
    world (shapes.py), drawn from (seed, global sample index), so nothing is read from disk and no
    video is seen twice. It has Dataset's interface; nothing is ever skipped. `render`: draw the
    `size`-pixel scenes with that many pixels (the upscaler's high-res truth; see shapes.make_video)."""

    def __init__(self, frames, size, seed=0, caption_dropout=0.1, render=None):
        self.frames, self.size, self.seed, self.caption_dropout = frames, size, seed, caption_dropout
        self.render = render or size
        self.bad, self.left_out, self.quiet, self.reports = set(), 0, False, []  # Dataset's, never filled

    def __len__(self):
        return len(shapes.COMBINATIONS)  # the distinct captions; videos are never reused

    def sample(self, g, cache=None):
        video, text = shapes.sample(g, self.seed, self.frames, self.size, self.render)
        clip = resize_crop(torch.from_numpy(video).permute(0, 3, 1, 2), self.render, self.render, levels=True)
        drop = random.Random(sample_seed(self.seed, "caption", g)).random() < self.caption_dropout
        return clip, "" if drop else text

    def check_readable(self):
        pass  # generated, never unreadable
