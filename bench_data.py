"""The training input, measured: decoding WebVid-format clips, and reading them ahead in loader.py's
worker processes, beside a plain sequential decode from frame 0 (the old data.read_frames: imageio's
ffmpeg reader).

    python bench.py --data generate --frames 16 --stride 4 --size 256 --workers 2   # clips made here
    python bench.py --data DIR --workers 4                                         # your clips

`run(args)`: args.data is a folder of videos (the .mp4/.webm files under it), or None for WebVid-format
clips (596x336, 25 fps, 10 s, H.264 by x264's defaults, of ffmpeg's moving test pattern with grain;
args.gop, if given, sets the keyframe interval) made in a temporary folder and removed after. Every
decoder candidate reads the same args.clips clips of args.frames frames args.stride apart from random
starts, and is checked exact (its frames are the ones asked for, matched against a decode of every
frame from the start); those that need a package not installed (decord, opencv) are left out, and a
candidate stops after BUDGET seconds. Then the whole clips (resized to args.size): `N clips/s` and
the seconds per clip of the old data.read_clip one after another, and of data.read_clip read ahead by
loader.Feed with 0, 1, ..., args.workers workers (the faster of ROUNDS rounds), and the workers that
keep a 0.13 s GPU step fed at batch 1 and 8.
"""
import os
import random
import resource
import subprocess
import tempfile
import time

import imageio.v2 as imageio_v2
import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import torch

import data
import loader

STEP = 0.13  # seconds of a SimDA step at 16x256x256 on an H200 (docs/benchmarks.md)
BUDGET = 30.0  # seconds a candidate may take over all clips; a slower one is timed on the clips it read
ROUNDS = 2  # of the whole-clip timings


def make_clips(folder, count, gop=None):
    """`count` WebVid-format clips: 596x336, 25 fps, 10 s, H.264 (x264's defaults), each its own grain."""
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"clip{i:02d}.mp4")
        source = f"testsrc2=size=596x336:rate=25:duration=10,noise=alls=7:allf=t:all_seed={i}"
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "lavfi", "-i", source,
                        "-c:v", "libx264", "-pix_fmt", "yuv420p", *(["-g", str(gop)] if gop else []), path], check=True)
        paths.append(path)
    return paths


def fingerprints(path):
    """Every frame of the video, decoded from the start and counted (no seek), as a small gray thumbnail."""
    import av
    with av.open(path) as container:
        return np.stack([thumb(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)])


def thumb(frame):
    h, w = frame.shape[0] // 8 * 8, frame.shape[1] // 8 * 8
    return frame[:h, :w].astype(np.float32).mean(-1).reshape(h // 8, 8, w // 8, 8).mean((1, 3))


def imageio_from_0(path, start, frames, stride):
    """The old data.read_frames: imageio's ffmpeg reader, every frame from the first converted and piped."""
    kept = []
    with iio.imopen(path, "r", plugin="FFMPEG") as video:
        for i, frame in enumerate(video.iter()):
            if i >= start and (i - start) % stride == 0:
                kept.append(frame)
            if len(kept) == frames:
                break
    return np.stack(kept)


def imageio_seeking(path, start, frames, stride):
    """imageio's ffmpeg reader asked for each frame: it restarts ffmpeg with -ss to seek forward."""
    with imageio_v2.get_reader(path, "ffmpeg") as reader:
        return np.stack([reader.get_data(start + j * stride) for j in range(frames)])


def imageio_pyav(path, start, frames, stride):
    """imageio's pyav plugin, read(index=...) per frame (it seeks to the keyframe and counts from there)."""
    with iio.imopen(path, "r", plugin="pyav") as video:
        return np.stack([video.read(index=start + j * stride) for j in range(frames)])


def pyav(threads, skip, seek=True):
    """PyAV, the frames kept by their timestamps, converted only when kept; `seek`: from the keyframe
    before the clip, else from frame 0; `skip`: frames no other frame refers to are not decoded unless
    kept; `threads`: FFmpeg's frame threads (else one thread)."""
    import av

    def read(path, start, frames, stride):
        wanted = set(range(start, start + frames * stride, stride))
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type, stream.thread_count = ("AUTO", 0) if threads else ("SLICE", 1)
            rate, base, t0 = stream.average_rate, stream.time_base, stream.start_time or 0
            if seek and start:
                container.seek(t0 + round(start / (rate * base)), stream=stream)
            kept, codec = [], stream.codec_context
            for packet in container.demux(stream):
                if skip:
                    codec.skip_frame = "DEFAULT" if packet.pts is None or \
                        round((packet.pts - t0) * base * rate) in wanted else "NONREF"
                for frame in codec.decode(packet):
                    if round((frame.pts - t0) * base * rate) in wanted:
                        kept.append(frame.to_ndarray(format="rgb24"))
                    if len(kept) == frames:
                        return np.stack(kept)
        return np.stack(kept)
    return read


def product(path, start, frames, stride):
    return data.read_frames(path, frames, stride, start)


def decord_batch(path, start, frames, stride):
    import decord
    indices = list(range(start, start + frames * stride, stride))
    return decord.VideoReader(path, num_threads=1).get_batch(indices).asnumpy()


def opencv_seek(path, start, frames, stride):
    import cv2
    capture, kept = cv2.VideoCapture(path), []
    capture.set(cv2.CAP_PROP_POS_FRAMES, start)
    while len(kept) < frames:
        ok, frame = capture.read()
        if not ok:
            break
        kept.append(frame[..., ::-1])
        for _ in range(stride - 1):
            capture.grab()
    capture.release()
    return np.stack(kept)


CANDIDATES = [
    ("imageio ffmpeg from frame 0 (the old read_frames)", imageio_from_0, None),
    ("imageio ffmpeg, seeking (get_data)", imageio_seeking, None),
    ("imageio pyav plugin, read(index=)", imageio_pyav, None),
    ("PyAV from frame 0, keep-only", pyav(threads=False, skip=False, seek=False), None),
    ("PyAV seek + keep-only", pyav(threads=False, skip=False), None),
    ("PyAV seek + keep-only, frame threads", pyav(threads=True, skip=False), None),
    ("PyAV seek + keep-only, skip non-ref", pyav(threads=False, skip=True), None),
    ("PyAV seek + keep-only, skip non-ref, threads", pyav(threads=True, skip=True), None),
    ("data.read_frames (PyAV seek, keep-only, skip non-ref)", product, None),
    ("decord get_batch", decord_batch, "decord"),
    ("opencv seek + grab", opencv_seek, "cv2"),
]


def installed(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def exact(frames, reference, start, stride):
    """Whether each frame is, of all the video's frames, nearest to the one asked for."""
    found = [int(((reference - thumb(f)) ** 2).mean((1, 2)).argmin()) for f in frames]
    return found == list(range(start, start + len(frames) * stride, stride))


def old_read_clip(path, start, frames, stride, size):
    """The old data.read_clip: imageio's ffmpeg reader from frame 0, then a float resize."""
    picked = torch.from_numpy(imageio_from_0(path, start, frames, stride)).permute(0, 3, 1, 2).float()
    return data.resize_crop(picked, size, size)


class Timer:
    """Wall and CPU seconds (this process's threads and its finished children: workers, ffmpeg)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def cpu_seconds():
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def time_candidate(read, clips, references, args):
    """(wall and CPU seconds per clip, clips read, clips exact) of a decoder, to uint8 frames."""
    wall = cpu = 0.0
    done = good = 0
    for path, start in clips:
        with Timer() as timer:
            frames = read(path, start, args.frames, args.stride)
        wall, cpu, done = wall + timer.wall, cpu + timer.cpu, done + 1
        good += len(frames) == args.frames and exact(frames, references[path], start, args.stride)
        if wall > BUDGET:
            break
    return wall / done, cpu / done, done, good


class Clips:
    """The clips as a dataset for loader.Feed: sample g is clip g, from its start."""

    def __init__(self, clips, args):
        self.clips, self.args = clips, args
        self.bad, self.reports, self.quiet = set(), [], False

    def sample(self, g, cache=None):
        path, start = self.clips[g]
        return data.read_clip(path, self.args.frames, self.args.stride, self.args.size, self.args.size, start=start,
                              levels=True), ""  # uint8 levels, as training's workers hand them over


def read_ahead(clips, args, workers):
    """Timer of loader.Feed reading every clip with `workers` workers, and the loop making it floats (loader.pixels);
    its `steady`: the wall seconds a clip from the first clip's arrival on (the workers' start-up, once a run, left
    out)."""
    with Timer() as timer:
        feed = loader.Feed(Clips(clips, args), 1, 0, 1, 0, len(clips), workers, torch.device("cpu"))
        for i in range(len(clips)):
            loader.pixels(feed.next()[1], torch.device("cpu"))
            if i == 0:
                first = time.perf_counter()
        timer.steady = (time.perf_counter() - first) / max(len(clips) - 1, 1)
        feed.close()  # the workers end: their CPU time is counted
    return timer


def one_core(clips, args):
    """data.read_clip on one torch thread, in this process: what a worker costs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Timer() as timer:
            for path, start in clips:
                data.read_clip(path, args.frames, args.stride, args.size, args.size, start=start)
        return timer
    finally:
        torch.set_num_threads(threads)


def line(name, timer, clips, extra=""):
    print(f"{name}: {clips / timer.wall:.2f} clips/s, {timer.wall / clips:.3f} s/clip "
          f"(CPU {timer.cpu / clips:.3f} s/clip){extra}", flush=True)


def report(clips, references, args):
    n, span = len(clips), (args.frames - 1) * args.stride + 1
    print(f"{args.frames} frames at stride {args.stride} to {args.size}x{args.size}, {n} clips of {len(references)} "
          f"videos from random starts (a clip spans {span} frames); {loader.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    header = f"{'':52s} {'s/clip':>8s} {'clips/s':>8s} {'cpu s':>8s}"
    print(f"decoding to uint8 frames, unresized (cpu s: CPU seconds per clip, all threads)\n{header}  exact")
    for name, read, needs in CANDIDATES:
        if needs and not installed(needs):
            print(f"{name:52s} (not installed: pip install {'opencv-python-headless' if needs == 'cv2' else needs})")
            continue
        wall, cpu, done, good = time_candidate(read, clips, references, args)
        print(f"{name:52s} {wall:8.3f} {1 / wall:8.2f} {cpu:8.3f}  {good}/{done}", flush=True)
    print(f"\nwhole clips, decoded and resized to {args.size}x{args.size}, the faster of {ROUNDS} rounds "
          f"(each round times every line once, so a change in the machine's load touches them all)")
    best = {}
    for _ in range(ROUNDS):
        with Timer() as timer:
            for path, start in clips:
                old_read_clip(path, start, args.frames, args.stride, args.size)
        best["old"] = min(best.get("old", timer), timer, key=lambda t: t.wall)
        for workers in range(args.workers + 1):
            timer = read_ahead(clips, args, workers)
            best[workers] = min(best.get(workers, timer), timer, key=lambda t: t.wall)
    line("sequential decode from frame 0 (the old data.read_clip)", best["old"], n)
    for workers in range(args.workers + 1):
        versus = f", {best['old'].wall / best[workers].wall:.2f}x the sequential decode" + \
            (f", {best[workers - 1].wall / best[workers].wall:.2f}x {workers - 1} worker(s)" if workers > 1 else "")
        line(f"--num-workers {workers} (data.read_clip, loader.Feed)", best[workers], n, versus)
    print("the same once the first clip is in (the start-up of the workers, once a run, left out):")
    for workers in range(args.workers + 1):
        steady = best[workers].steady
        versus = f", {best[workers - 1].steady / steady:.2f}x {workers - 1} worker(s)" if workers > 1 else ""
        print(f"--num-workers {workers}: {1 / steady:.2f} clips/s, {steady:.3f} s/clip{versus}", flush=True)
    core = one_core(clips, args)
    line("data.read_clip on one core (one torch thread)", core, n)
    for batch in (1, 8):
        print(f"a {STEP} s step at batch {batch} needs {batch / STEP:.1f} clips/s: "
              f"{int(np.ceil(batch * core.wall / n / STEP))} worker(s) of one core each")


def run(args):
    """Measure as the module docstring says; returns nothing, prints the tables."""
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        if args.data:
            paths = sorted(os.path.join(d, n) for d, _, names in os.walk(args.data) for n in names
                           if n.lower().endswith((".mp4", ".webm")))
            if not paths:
                raise ValueError(f"no .mp4 or .webm files under {args.data}")
        else:
            started = time.perf_counter()
            paths = make_clips(tmp, min(args.clips, 8), getattr(args, "gop", None))
            print(f"made {len(paths)} WebVid-format clips in {time.perf_counter() - started:.1f} s "
                  f"({np.mean([os.path.getsize(p) for p in paths]) * 8 / 10e6:.2f} Mbit/s)")
        paths = paths[:args.clips]
        references = {p: fingerprints(p) for p in paths}
        span = (args.frames - 1) * args.stride + 1
        clips = [(paths[i % len(paths)], None) for i in range(args.clips)]
        clips = [(p, rng.randrange(max(len(references[p]) - span, 0) + 1)) for p, _ in clips]
        report(clips, references, args)
