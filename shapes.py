"""The moving-shapes world: a synthetic captioned video data set, and a tracker that scores videos.

A video shows ONE shape (circle, square, triangle) of one pure colour on a plain mid-grey
background, moving left, right, up or down at a steady speed, captioned "a red circle moving left".
Everything is drawn from the seed: start position, speed (pixels per frame) and size, always such
that the whole shape stays inside the frame for the whole clip. Behind the shape fades a trail,
three faint copies of it (as a long exposure leaves), so that one frame shows which way the shape
moves, as a photo shows which way a runner faces: it gives the motion words something to mean to an
image model trained on single frames (docs/demo.md: "What it took"). The trail stays nearer the
background than the tracker's NEAR_BACKGROUND, so it never counts as the object. Edges are anti-aliased (each pixel's colour is the shape's coverage of a 4x4
grid of sub-pixel samples), so sub-pixel speeds move the centroid smoothly. `sample(i)` goes
through all 48 combinations in each block of 48;
`sample_frame(i)` is a single frame with its video's caption, for the image-model stage;
`write_webvid` writes a WebVid-style folder (CSV + mp4) for data.find_videos. `render=` draws the
same scene with more pixels: a 32x32 clip's exact 128x128 truth, for super-resolution.

The tracker (numpy only) gives each pixel far from the background its nearest palette colour,
groups same-colour pixels into 4-connected components, drops components smaller than 1/256 of the
frame, and names a component's shape by the ideal circle, square or triangle of the same area and
centroid that overlaps it best. `stray_blobs` counts what the colour labels miss: faint blobs of
another hue beside the object. `score` compares what it finds with a caption; `summarise` averages;
`direction_from_trail` reads the way a single frame's shape moves from its trail.
Image coordinates: x grows to the right, y grows downwards, so "up" means y decreases.
"""
import csv
import os
import re

import numpy as np

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy) per frame
BACKGROUND = (128, 128, 128)  # mid-grey: 0 in the model's [-1, 1] scale, equally far from every colour
COMBINATIONS = [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]  # 4 x 3 x 4 = 48
SUPERSAMPLE = 4  # anti-aliasing: sub-pixel samples per pixel side
FPS = 8  # frames per second, of write_webvid's files and of the demo model's videos
FRAMES, SIZE = 8, 32  # the demo model's clips: 8 frames of 32x32 (train.py --data shapes, evaluate.py)
TRAIL = (0.2, 0.13, 0.07)  # the trail's copies: opacity of the k-th copy, each 0.6 half-widths further back


def caption(colour, shape, direction):
    """('red', 'circle', 'left') -> 'a red circle moving left'."""
    parse_caption(f"a {colour} {shape} moving {direction}")  # raises outside the world
    return f"a {colour} {shape} moving {direction}"


def parse_caption(text):
    """'a red circle moving left' -> ('red', 'circle', 'left'); case and extra spaces do not matter."""
    m = re.fullmatch(r"an? (\w+) (\w+) moving (\w+)", " ".join(str(text).lower().split()))
    if not m or m[1] not in COLOURS or m[2] not in SHAPES or m[3] not in DIRECTIONS:
        raise ValueError(f"caption {text!r} is outside the shapes world: expected 'a COLOUR SHAPE moving "
                         f"DIRECTION' with COLOUR in {list(COLOURS)}, SHAPE in {list(SHAPES)}, "
                         f"DIRECTION in {list(DIRECTIONS)}")
    return m[1], m[2], m[3]


def unknown_words(prompt):
    """The words of `prompt` that the world's captions never use (e.g. 'dog', 'surfing'), in order."""
    known = {"a", "an", "moving", *COLOURS, *SHAPES, *DIRECTIONS}
    return [w for w in re.findall(r"[a-z']+", str(prompt).lower()) if w not in known]


def unknown_notice(prompts):
    """A line naming the words of `prompts` the world does not know and the words it knows; '' if none."""
    unknown = sorted({w for prompt in prompts for w in unknown_words(prompt)})
    return f"the demo model does not know the word(s) {', '.join(map(repr, unknown))}: it knows 'a COLOUR SHAPE " \
        f"moving DIRECTION' with COLOUR {'|'.join(COLOURS)}, SHAPE {'|'.join(SHAPES)}, DIRECTION " \
        f"{'|'.join(DIRECTIONS)}" if unknown else ""


def coverage(shape, cx, cy, r, width, height):
    """Fraction [height, width] of each pixel covered by the shape of half-width r centred at (cx, cy);
    pixel (x, y) spans [x, x + 1) x [y, y + 1). Only the pixels of the shape's bounding box are
    sampled (the rest are 0), which keeps 128-pixel renders cheap."""
    cover = np.zeros((height, width))
    x0, x1 = max(int(np.floor(cx - r)) - 1, 0), min(int(np.ceil(cx + r)) + 1, width)
    y0, y1 = max(int(np.floor(cy - r)) - 1, 0), min(int(np.ceil(cy + r)) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return cover
    dx = (np.arange(x0 * SUPERSAMPLE, x1 * SUPERSAMPLE) + 0.5)[None, :] / SUPERSAMPLE - cx  # sub-pixel samples
    dy = (np.arange(y0 * SUPERSAMPLE, y1 * SUPERSAMPLE) + 0.5)[:, None] / SUPERSAMPLE - cy
    if shape == "circle":
        inside = dx ** 2 + dy ** 2 <= r ** 2
    elif shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    else:  # triangle pointing up, apex (cx, cy - r), base from cx - r to cx + r at cy + r
        inside = (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2)
    cover[y0:y1, x0:x1] = inside.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
    return cover


def make_video(colour, shape, direction, frames=8, size=64, seed=0, render=None):
    """uint8 [frames, render, render, 3]: the shape moving `direction` at a steady speed. The scene
    (position, size, speed, trail) is drawn for a `size`-pixel frame; `render` (default `size`) draws
    that same scene with more (or fewer) pixels, every length scaled by render / size, so a 32-pixel
    clip has its 128-pixel truth (the demo's super-resolution stage)."""
    parse_caption(f"a {colour} {shape} moving {direction}")  # raises outside the world
    render = size if render is None else render
    if frames < 1 or size < 8 or render < 1:
        raise ValueError(f"need frames >= 1, size >= 8 and render >= 1, got frames={frames}, size={size}, "
                         f"render={render}")
    rng = np.random.default_rng(seed)
    r = rng.uniform(0.11, 0.16) * size  # half-width: 7 to 10 pixels at size 64
    lo, hi = r + 1, size - r - 1  # the centre's range that keeps the shape (and a 1-pixel margin) inside
    speed = min(rng.uniform(1.0, 2.5) * size / 64, (hi - lo) / max(frames - 1, 1))  # pixels per frame
    travel = speed * (frames - 1)
    (ux, uy), start = DIRECTIONS[direction], rng.uniform(lo, hi, size=2)
    along = 0 if ux else 1  # along the motion axis, start where the whole travel fits
    start[along] = lo + rng.random() * max(hi - lo - travel, 0) + (travel if ux + uy < 0 else 0)
    background, ink = np.array(BACKGROUND, np.float64), np.array(COLOURS[colour], np.float64)
    video = np.empty((frames, render, render, 3), np.uint8)
    k = render / size  # render pixels per scene pixel
    for t in range(frames):
        x, y = start[0] + ux * speed * t, start[1] + uy * speed * t
        cover = coverage(shape, k * x, k * y, k * r, render, render)
        for n, opacity in enumerate(TRAIL, 1):
            back = 0.6 * r * n
            cover = np.maximum(cover, opacity * coverage(shape, k * (x - ux * back), k * (y - uy * back), k * r,
                                                         render, render))
        video[t] = np.round(background + cover[..., None] * (ink - background))
    return video


def sample(index, seed=0, frames=8, size=64, render=None):
    """(video, caption) number `index`. Indices 0-47 show every combination once, in an order drawn
    from the seed, and so do 48-95 and each later block of 48; so even a few samples vary. `render`:
    the same video drawn with that many pixels a side (see make_video)."""
    block, position = divmod(index, len(COMBINATIONS))
    order = np.random.default_rng([seed, block]).permutation(len(COMBINATIONS))
    colour, shape, direction = COMBINATIONS[order[position]]
    video_seed = np.random.SeedSequence([seed, index]).generate_state(1)[0]
    return make_video(colour, shape, direction, frames, size, video_seed, render), caption(colour, shape, direction)


def sample_frame(index, seed=0, size=64, render=None):
    """(frame uint8 [render, render, 3], caption): a one-frame video, so the shape may be anywhere in the
    frame; it keeps its video's caption, motion words included, so the text encoder learns them.
    `render` (default `size`): see make_video."""
    video, text = sample(index, seed, frames=1, size=size, render=render)
    return video[0], text


def write_webvid(folder, count, seed=0, frames=8, size=64, fps=FPS):
    """Write videos 0..count-1 as `folder`/videos/{page_dir}/{videoid}.mp4 with a WebVid-10M-style
    CSV `folder`/shapes.csv; returns the CSV's path. H.264 (yuv420p) is lossy: expect levels a few
    units off, more at the shapes' edges where the colour is subsampled."""
    import imageio.v3 as iio  # only needed here

    if size % 2:
        raise ValueError(f"mp4 (yuv420p) needs an even frame size, got size={size}")
    path = os.path.join(folder, "shapes.csv")
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        for i in range(count):
            video, text = sample(i, seed, frames, size)
            videoid, page_dir = str(i), f"{i // 1000:03d}"
            relative = f"videos/{page_dir}/{videoid}.mp4"
            os.makedirs(os.path.join(folder, "videos", page_dir), exist_ok=True)
            iio.imwrite(os.path.join(folder, relative), video, plugin="FFMPEG", fps=fps, codec="libx264",
                        quality=8, macro_block_size=1)  # quality 8: x264 crf 10
            seconds = int(np.ceil(frames / fps))
            writer.writerow([videoid, relative, f"PT00H{seconds // 60:02d}M{seconds % 60:02d}S", page_dir, text])
    return path


# ---- the tracker ------------------------------------------------------------------------------

PALETTE = np.array([BACKGROUND] + list(COLOURS.values()), np.float32)  # 0 = background
NEAR_BACKGROUND = 64  # closer than this to the background: background (every colour is ~220 away)
MAX_DISTANCE = 128  # further than this from its nearest colour: no colour (noise, other hues)
FILL_SIDE = 24  # objects at least this many pixels across are named by their bounding-box fill (shape_of)
IDEAL_FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
STRAY_LEVEL = 16  # a tint this far from the mid-grey background is plain to see (the trail's faintest copy: 15)


def label_pixels(video):
    """[F, H, W] int: 0 background/unknown, k >= 1 the k-th colour of COLOURS. A pixel far from the
    background takes its nearest colour: mp4's 2x2 chroma subsampling leaves edge pixels between
    the shape's colour and the background, and they stay with the shape."""
    pixels = video.astype(np.float32)
    squared = (pixels ** 2).sum(-1, keepdims=True) - 2 * pixels @ PALETTE.T + (PALETTE ** 2).sum(-1)  # [F, H, W, 5]
    labels = squared[..., 1:].argmin(-1) + 1
    labels[(squared[..., 0] < NEAR_BACKGROUND ** 2) | (squared[..., 1:].min(-1) > MAX_DISTANCE ** 2)] = 0
    return labels


def components(labels):
    """4-connected components of equal non-zero labels in [F, H, W], as [F, H, W] ids (0 for
    unlabelled pixels). Each pixel starts with its own id and repeatedly takes the smallest id across
    its same-label neighbours, then the id its id's pixel holds (pointer jumping), until stable."""
    index = np.arange(1, labels.size + 1).reshape(labels.shape)  # pixel ids, 0 is "no pixel"
    right = (labels[:, :, 1:] == labels[:, :, :-1]) & (labels[:, :, 1:] > 0)  # same label as the left pixel
    down = (labels[:, 1:] == labels[:, :-1]) & (labels[:, 1:] > 0)  # same label as the pixel above
    a = np.concatenate([index[:, :, 1:][right], index[:, 1:][down]])
    b = np.concatenate([index[:, :, :-1][right], index[:, :-1][down]])
    ids = np.concatenate([[0], np.where(labels.ravel() > 0, index.ravel(), 0)])
    while True:
        old = ids.copy()
        smallest = np.minimum(ids[a], ids[b])
        np.minimum.at(ids, a, smallest)
        np.minimum.at(ids, b, smallest)
        ids = ids[ids]
        if np.array_equal(ids, old):
            return ids[1:].reshape(labels.shape)


def shape_by_fill(fill):
    """The shape whose ideal bounding-box fill (IDEAL_FILL) is nearest `fill`: a square reads as one from 0.89 up,
    a triangle up to 0.64, so rounded corners and a blurred outline are misread at every size."""
    return min(IDEAL_FILL, key=lambda shape: abs(IDEAL_FILL[shape] - fill))


def shape_of(x, y):
    """The shape of the component with pixels (x, y). Under FILL_SIDE pixels across: the shape whose ideal
    drawing best overlaps it (intersection over union), each drawn with the component's area and
    centroid, which is robust down to a few pixels, where pixelation blurs the bounding-box fill
    (drawn circles fill 0.69 to 0.94 of their box at 32x32). From FILL_SIDE up, the fill decides, as
    it does for a viewer: the shape whose ideal fill (square 1, circle pi/4, triangle 1/2) is nearest
    (drawn shapes at 128x128: squares >= 0.995, circles 0.74 to 0.81, triangles 0.50 to 0.55), so a
    square with rounded corners (0.8) is no square, although it overlaps an ideal square well."""
    if min(x.max() - x.min(), y.max() - y.min()) + 1 >= FILL_SIDE:
        return shape_by_fill(len(x) / ((x.max() - x.min() + 1) * (y.max() - y.min() + 1)))
    x0, y0 = x.min() - 2, y.min() - 2
    mask = np.zeros((y.max() - y0 + 3, x.max() - x0 + 3))
    mask[y - y0, x - x0] = 1
    area, cx, cy = len(x), x.mean() - x0 + 0.5, y.mean() - y0 + 0.5
    best = {}
    for shape, r in (("circle", np.sqrt(area / np.pi)), ("square", np.sqrt(area) / 2), ("triangle", np.sqrt(area / 2))):
        # a triangle's centroid lies r/3 below its bounding-box centre
        ideal = coverage(shape, cx, cy - (r / 3 if shape == "triangle" else 0), r, *mask.shape[::-1])
        best[shape] = np.minimum(mask, ideal).sum() / np.maximum(mask, ideal).sum()
    return max(best, key=best.get)


def track(video, min_area=None):
    """Per frame, a list of the objects found (largest first), each a dict: colour, area (pixels),
    centroid (x, y), bbox (x0, y0, x1, y1; inclusive), fill (area / bbox area) and shape."""
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"track needs a uint8 video [F, H, W, 3], got {video.dtype} {list(video.shape)}")
    frames, height, width = video.shape[:3]
    # 16 pixels at 64x64: a drawn shape has ~100 or more, specks of noise or compression artefacts fewer
    min_area = max(4, height * width // 256) if min_area is None else min_area
    labels = label_pixels(video)
    ids = components(labels)
    areas = np.bincount(ids.ravel())
    areas[0] = 0  # id 0: the unlabelled pixels
    names, found = list(COLOURS), [[] for _ in range(frames)]
    for i in np.flatnonzero(areas >= min_area):
        t, y, x = np.nonzero(ids == i)
        x0, x1, y0, y1 = x.min(), x.max(), y.min(), y.max()
        fill = len(x) / ((x1 - x0 + 1) * (y1 - y0 + 1))
        found[t[0]].append({"colour": names[labels[t[0], y[0], x[0]] - 1], "area": int(len(x)),
                            "centroid": (float(x.mean()), float(y.mean())),
                            "bbox": (int(x0), int(y0), int(x1), int(y1)), "fill": float(fill),
                            "shape": shape_of(x, y)})
    return [sorted(objects, key=lambda o: -o["area"]) for objects in found]


def stray_blobs(video, colour, min_area=None):
    """Per frame, how many stray blobs a viewer sees beside the object of `colour`: 4-connected groups
    of at least `min_area` pixels (track's default) that differ from the background by STRAY_LEVEL or
    more in a way the object cannot explain. The object, its trail, its anti-aliased edges and any
    blur of them lie between the background and the colour (background + a * (colour - background),
    0 <= a, to within STRAY_LEVEL); other hues, and the colour's opposite (a < 0: a complementary
    smudge or halo), do not. The tracker's colour labels miss such tints, which stay nearer the
    background than NEAR_BACKGROUND; a drawn video has none."""
    video = np.asarray(video)
    min_area = max(4, video.shape[1] * video.shape[2] // 256) if min_area is None else min_area
    background = np.array(BACKGROUND, np.float64)
    ink = np.array(COLOURS[colour], np.float64) - background
    offset = video.astype(np.float64) - background
    a = (offset @ ink) / (ink @ ink)  # how far along the way to the colour
    unexplained = np.linalg.norm(offset - a[..., None] * ink, axis=-1) >= STRAY_LEVEL
    stray = (np.linalg.norm(offset, axis=-1) >= STRAY_LEVEL) & ((a < 0) | unexplained)
    ids = components(stray.astype(np.int64))
    return [int((np.bincount(frame.ravel())[1:] >= min_area).sum()) for frame in ids]


def direction_of(displacement, min_motion):
    """The caption word for a centroid displacement (dx, dy), or 'none' if it moved < min_motion."""
    dx, dy = displacement
    if np.hypot(dx, dy) < min_motion:
        return "none"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def direction_from_trail(image, colour):
    """The way the shape of `colour` in one frame (uint8 [H, W, 3]) moves, read from its trail: the
    faint pixels of that colour lie behind the shape. 'none' if there is no shape or no trail."""
    ink, background = np.array(COLOURS[colour], np.float64), np.array(BACKGROUND, np.float64)
    weight = ((np.asarray(image, np.float64) - background) / (ink - background)).mean(-1).clip(0, 1)
    body = weight >= 0.5
    faint = np.where((weight > 0.03) & ~body, weight, 0)
    if not body.any() or not faint.any():
        return "none"
    y, x = np.mgrid[:weight.shape[0], :weight.shape[1]]
    faint_centre = np.array([(x * faint).sum(), (y * faint).sum()]) / faint.sum()
    return direction_of(np.array([x[body].mean(), y[body].mean()]) - faint_centre, 0.5)


def score(video, text, eps=0.5):
    """How well `video` (uint8 [F, H, W, 3]) shows `text`. The object is, in each frame, the largest
    component of the prompted colour (frames without one are skipped; without two such frames the
    motion counts as wrong). Keys:
      motion_correct   1 if the object's centroid moved from its first to its last frame in the
                       prompted direction (dominant axis and sign), by at least size/32 pixels
      colour_correct   1 if the largest object in the first frame has the prompted colour
      shape_correct    1 if the largest object in the first frame has the prompted shape
      shape_by_fill    1 if that object's bounding-box fill names the prompted shape (shape_by_fill) at
                       any size: stricter on small blurred objects, where shape_correct overlaps ideal
                       drawings; nearer an independent tracker's published scores (docs/demo.md);
                       drawn 32x32 clips read 93-96% (pixelated triangles)
      present_fraction fraction of frames with exactly one object of the prompted colour
      area_variation   std / mean of the object's area over the frames it is in
      smoothness       mean |step - mean step| / (|mean step| + eps) over the per-frame centroid steps
                       (vectors, in pixels; eps = 0.5 px): 0 = perfectly steady motion, 1 = jitter
                       as large as the motion itself
      stray_fraction   fraction of frames with a stray blob beside the object (`stray_blobs`): a
                       smudge or halo of another hue, which the colour labels above do not see
      clean_fraction   fraction of frames that show the one object and nothing else: no second
                       object of any colour, no stray blob (what a viewer looking at the whole
                       frame checks)
      colour_clean     1 if colour_correct and every frame is clean: the whole video shows an object
                       of the prompted colour and nothing else
    plus direction/colour/shape: what was found (strings)."""
    colour, shape, direction = parse_caption(text)
    video = np.asarray(video)
    objects = track(video)
    first = objects[0][0] if objects[0] else {"colour": "none", "shape": "none", "fill": 0.0}
    mine = [[o for o in frame if o["colour"] == colour] for frame in objects]
    times = [t for t, frame in enumerate(mine) if frame]
    centroids = np.array([mine[t][0]["centroid"] for t in times]).reshape(-1, 2)
    areas = np.array([mine[t][0]["area"] for t in times], np.float64)
    found = "none"
    smoothness = area_variation = float("nan")
    if len(times) >= 2:
        found = direction_of(centroids[-1] - centroids[0], max(video.shape[1:3]) / 32)
        steps = np.diff(centroids, axis=0) / np.diff(times)[:, None]  # per frame, across skipped frames
        mean = steps.mean(0)
        smoothness = float(np.linalg.norm(steps - mean, axis=1).mean() / (np.linalg.norm(mean) + eps))
    if len(times):
        area_variation = float(areas.std() / areas.mean())
    strays = stray_blobs(video, colour)
    clean = [len(frame) == 1 and n == 0 for frame, n in zip(objects, strays)]
    return {"motion_correct": float(found == direction), "colour_correct": float(first["colour"] == colour),
            "shape_correct": float(first["shape"] == shape), "shape_by_fill": float(shape_by_fill(first["fill"]) == shape),
            "present_fraction": float(np.mean([len(frame) == 1 for frame in mine])),
            "area_variation": area_variation, "smoothness": smoothness,
            "stray_fraction": float(np.mean([n > 0 for n in strays])), "clean_fraction": float(np.mean(clean)),
            "colour_clean": float(first["colour"] == colour and all(clean)),
            "direction": found, "colour": first["colour"], "shape": first["shape"]}


def summarise(scores):
    """Means of the numeric entries over a list of score dicts (NaNs, e.g. no object found, skipped)."""
    if not scores:
        raise ValueError("summarise needs at least one score dict, got none")
    keys = [k for k, v in scores[0].items() if isinstance(v, float)]
    means = {}
    for k in keys:
        values = np.array([s[k] for s in scores], np.float64)
        means[k] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return {**means, "videos": len(scores)}
