"""Videos of any length and prompt travel (long_video.py): windows blended per frame, per-frame text contexts,
the travel schedule's parser, continuation by windows, the chunked decode, and sample.py's flags on the demo."""
import os

import numpy as np
import pytest
import torch

import data
import long_video
import sample
import simda
from conftest import unet_inputs
from long_video import Long

PROMPT = "a red circle moving right"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(given_frames_pipe):
    return given_frames_pipe  # conftest's: the tiny SD with moved adapters, said to be trained with 2 given frames


@pytest.mark.parametrize("sampler, frames, guidance", [("ddim", 4, 7.5), ("dpm++", 6, 1.0)])
def test_one_window_is_bitwise_todays_one_pass_sampling(pipe, sampler, frames, guidance):
    today = pipe(PROMPT, frames, 16, 16, steps=2, guidance=guidance, seed=3, sampler=sampler, progress=False)
    schedule = [(0, PROMPT)]
    for long in (None, Long(frames, 2), Long(frames + 4, 1, "continue", given=2)):
        video = long_video.sample(pipe, [schedule], frames, 16, 16, long, 2, guidance, seed=3, sampler=sampler,
                                  progress=False)
        assert torch.equal(video, today), long
    # the windowed UNet with one window, handed to the sampler in the UNet's place, is the UNet
    x = torch.randn(1, 4, frames, 8, 8, generator=torch.Generator().manual_seed(1))
    context = pipe.guided_context([PROMPT], "", 7.5)
    plain = pipe.denoise(x, context, 2, progress=False)
    windowed = pipe.denoise(x, context, 2, progress=False, unet=lambda *a: long_video.run_windows(pipe.unet, Long(8, 4), *a))
    assert torch.equal(plain, windowed)


@pytest.mark.parametrize("frames, size, overlap", [(32, 8, 4), (32, 8, 2), (30, 8, 4), (17, 16, 8), (9, 8, 0), (5, 8, 4)])
@pytest.mark.parametrize("weighting", long_video.WEIGHTINGS)
def test_blending_weights_sum_to_one_per_frame_and_stay_inside_their_windows(frames, size, overlap, weighting):
    starts = long_video.window_starts(frames, size, overlap)
    weights = long_video.blend_weights(frames, size, overlap, weighting)
    assert weights.shape == (len(starts), frames) and starts[0] == 0 and starts[-1] + min(size, frames) == frames
    assert torch.allclose(weights.sum(0), torch.ones(frames, dtype=torch.float64), atol=1e-12)
    assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap frames
    for k, s in enumerate(starts):
        inside = torch.zeros(frames, dtype=torch.bool)
        inside[s:s + size] = True
        assert (weights[k, ~inside] == 0).all() and (weights[k, inside] > 0).all()


def test_windows_of_a_frame_by_frame_model_give_its_frame_by_frame_output():
    x = torch.randn(2, 4, 21, 4, 4)
    calls = []

    def frame_wise(x, t, context, y=None):  # no frame sees another: windows must not change anything
        calls.append((x.shape[2], tuple(t.shape), tuple(context.shape)))
        return 2 * x + t[:, None, :, None, None].float()

    t = torch.arange(21)[None].expand(2, 21)
    out = long_video.run_windows(frame_wise, Long(8, 4), x, t, torch.zeros(2, 21, 77, 8))
    torch.testing.assert_close(out, 2 * x + t[:, None, :, None, None].float(), rtol=1e-6, atol=1e-5)
    assert calls == [(8, (2, 8), (2, 8, 77, 8))] * 5  # windows at 0, 4, 8, 12 and 13: per-frame t and context cut


def test_per_frame_contexts_equal_todays_when_every_frame_has_the_same_prompt(pipe):
    x, t, context = unet_inputs(pipe.unet.config, b=2, frames=5)
    today = pipe.unet(x, t, context)
    assert torch.equal(pipe.unet(x, t, context[:, None].expand(-1, 5, -1, -1)), today)
    travel = long_video.travel_context(pipe, [[(0, PROMPT)]], 5, "no", 7.5)
    assert torch.equal(travel, pipe.guided_context([PROMPT], "no", 7.5)[:, None].expand(-1, 5, -1, -1))
    with pytest.raises(ValueError, match="per-frame contexts must be"):
        pipe.unet(x, t, context[:, None].expand(-1, 4, -1, -1))


def test_travel_gives_each_frame_its_segments_prompt_and_blends_at_the_boundaries(pipe):
    schedule = [(0, "a red circle moving right"), (3, "a red circle moving down")]
    states = pipe.text_context([p for _, p in schedule])
    cut = long_video.travel_context(pipe, [schedule], 6, guidance=1)[0]
    assert all(torch.equal(cut[f], states[0 if f < 3 else 1]) for f in range(6))
    weights = long_video.frame_weights(schedule, 6, blend=4)
    assert torch.allclose(weights.sum(1), torch.ones(6, dtype=torch.float64))
    assert weights[:, 1].tolist() == [0, 0.125, 0.375, 0.625, 0.875, 1]
    blended = long_video.travel_context(pipe, [schedule], 6, guidance=1, blend=4)[0]
    torch.testing.assert_close(blended[2], 0.625 * states[0] + 0.375 * states[1])


@pytest.mark.parametrize("spec, message", [
    ("0: a; 8: b; 4: c", "frame 4 comes after frame 8: frames must increase"),
    ("0: a; 4: b; 4: c", "frame 4 comes after frame 4"),
    ("-2: a", "frame -2 is negative"),
    ("0: a; 16: b", "frame 16 is past the video's last frame (15 of 16)"),
    ("0: a; 8:  ", "frame 8 has an empty prompt"),
    ("4: a; 8: b", "must start at frame 0 (it starts at 4)"),
    ("0 a red circle", "expected 'FRAME: PROMPT' items"),
    ("x: a", "expected 'FRAME: PROMPT' items"),
    (" ; ", "the schedule is empty"),
])
def test_the_travel_parser_refuses_bad_schedules_in_one_line(spec, message):
    with pytest.raises(ValueError) as e:
        long_video.parse_travel(spec, 16)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_travel_parser_reads_items_and_lines(tmp_path):
    expected = [(0, "a red circle moving right"), (8, "a red circle moving down")]
    assert long_video.parse_travel(" 0: a red circle moving right ;8:a red circle moving down;", 16) == expected
    (tmp_path / "travel.txt").write_text("0: a red circle moving right\n\n8: a red circle moving down\n")
    assert long_video.read_travel(str(tmp_path / "travel.txt"), 16) == expected


@pytest.mark.parametrize("long", [Long(4, 2, freenoise=False), Long(4, 1), Long(4, 0, "continue", given=2)])
def test_a_long_video_has_its_frame_count_and_its_travel_changes_what_it_shows(pipe, long):
    one = long_video.sample(pipe, [[(0, PROMPT)]], 11, 16, 16, long, 1, 7.5, seed=2, progress=False)
    travel = long_video.sample(pipe, [[(0, PROMPT), (5, "a blue square moving up")]], 11, 16, 16, long, 1, 7.5, seed=2,
                               progress=False)
    assert one.shape == travel.shape == (1, 11, 16, 16, 3) and one.dtype == torch.uint8
    assert not torch.equal(one[:, 5:], travel[:, 5:])
    assert long_video.sample(pipe, [[(0, PROMPT)]] * 2, 11, 16, 16, long, 1, 7.5, progress=False).shape[:2] == (2, 11)


def test_freenoise_repeats_the_first_windows_noise_shuffled():
    noise = torch.randn(1, 4, 19, 2, 2)
    out = long_video.freenoise(noise, 8, 4, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :, :8], noise[:, :, :8])
    for s in range(8, 19, 4):  # each block of 4 is the block 8 frames before, in another order
        block, source = out[0, :, s:s + 4], out[0, :, s - 8:s - 4]
        found = sorted(next(j for j in range(source.shape[1]) if torch.equal(block[:, i], source[:, j]))
                       for i in range(block.shape[1]))
        assert len(set(found)) == block.shape[1]  # distinct frames of the source block


def test_the_chunked_decode_equals_the_unchunked_one(pipe):
    latents = torch.randn(2, 4, 11, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = pipe.decode(latents)
    assert torch.equal(long_video.decode_chunks(pipe, latents[:1]), whole[:1])  # the VAE's own chunks of frames
    for chunk in (1, 3):
        assert (long_video.decode_chunks(pipe, latents, chunk).int() - whole.int()).abs().max() <= 1


@pytest.mark.skipif(not os.path.exists(simda.DEMO_ADAPTERS), reason="the demo adapters are not in models/")
def test_sample_travel_on_the_demo_writes_every_frame(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SIMDA_CKPT", raising=False)
    (tmp_path / "travel.txt").write_text("0: a red circle moving right\n6: a red circle moving down\n")
    sample.main(["--travel-file", "travel.txt", "--frames", "12", "--steps", "1", "--travel-blend", "2"])
    err = capsys.readouterr().err
    # the demo's adapters were trained with given frames: continuation is their default
    assert "(continue, 8-frame windows after 2 given frames)" in err and "0: a red circle moving right; 6:" in err
    assert data.read_frames("out.gif").shape == (12, 32, 32, 3)
    sample.main(["--travel-file", "travel.txt", "--frames", "12", "--steps", "1", "--long-method", "windows"])
    assert "(windows, 8-frame windows overlapping by 6, FreeNoise)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        sample.main(["--travel", "0: a red circle moving right; 12: a red circle moving up", "--frames", "12"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "frame 12 is past the video's last frame" in err and "Traceback" not in err
    no_given = os.path.join(simda.MODELS_DIR, "ablation", "simda-750-steps.safetensors")
    sample.main([PROMPT, "--frames", "12", "--steps", "1", "--adapters", no_given])  # windows: their default
    assert "(windows, 8-frame windows overlapping by 6, FreeNoise)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main([PROMPT, "--frames", "12", "--long-method", "continue", "--adapters", no_given])
    assert "--long-method continue needs adapters trained with given frames" in capsys.readouterr().err
