"""sample.py on tiny random-weight models: videos written with the right frames and size, seeding,
grids, several prompts, clear errors, and one-shot editing (DDIM inversion then sampling)."""
import os

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image

import data
import ddim
import dpm_solver
import sample
import simda
from adapters import SimDAConfig
from conftest import perturb_adapters_, rel_err
from video import save_video, stack_clips

PROMPT = "a red ball rolling"
FRAMES, HEIGHT, WIDTH = 3, 16, 24  # the adapters' metadata; the tiny models need multiples of 2 * 4


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_checkpoint):
    """A tiny SD checkpoint and an adapter file for it, with every adapter weight off zero, so that
    the temporal layers do mix frames."""
    folder = tmp_path_factory.mktemp("sample")
    ckpt = tiny_checkpoint
    pipe = simda.load_pipeline(ckpt, simda_config=SimDAConfig())
    perturb_adapters_(pipe.unet, seed=3)
    adapters = str(folder / "adapters.safetensors")
    simda.save_adapters(pipe.unet, adapters, prompt=PROMPT, frames=FRAMES, height=HEIGHT, width=WIDTH, stride=1)
    return ckpt, adapters


@pytest.fixture(scope="module")
def pipe(files):
    return simda.load_pipeline(files[0], adapters=files[1])


def run(files, *argv):
    sample.main([*argv, "--ckpt", files[0], "--adapters", files[1], "--steps", "3"])


def read_frames(path):
    """[F, H, W, 3] uint8 from a GIF or an MP4."""
    return np.stack([np.asarray(f)[..., :3] for f in imageio.mimread(path)])


def expect_error(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "error: " in err and all(f in err for f in fragments), err
    return err


@pytest.mark.parametrize("ext", ["gif", "mp4"])
def test_sample_writes_a_video_with_the_adapters_frames_and_size(tmp_path, files, capsys, ext):
    out = str(tmp_path / f"video.{ext}")
    run(files, PROMPT, "--out", out)
    assert read_frames(out).shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert "sampling 3/3" in capsys.readouterr().err  # the progress line


def test_size_flags_override_the_adapters_metadata(tmp_path, files):
    out = str(tmp_path / "video.mp4")
    run(files, PROMPT, "--out", out, "--frames", "2", "--width", "16", "--height", "8")
    assert read_frames(out).shape == (2, 8, 16, 3)


def test_same_seed_same_video_and_another_seed_another(pipe):
    def video(seed):
        return pipe(PROMPT, frames=2, height=16, width=16, steps=2, seed=seed, progress=False)
    first, again, other = video(0), video(0), video(1)
    assert torch.equal(first, again)
    assert (first.int() - other.int()).abs().float().mean() > 1


def test_generate_returns_uint8_frames_for_each_prompt(pipe):
    # What a notebook calls; guidance 1 runs the cond branch only.
    for guidance in (7.5, 1.0):
        video = pipe(["a cat", "a dog"], frames=2, height=16, width=24, steps=2, guidance=guidance,
                                negative="blurry", progress=False)
        assert video.dtype == torch.uint8 and video.shape == (2, 2, 16, 24, 3)
    first = pipe("a cat", frames=2, height=16, width=24, steps=2, guidance=1.0, progress=False)
    assert torch.equal(first[0], video[0])  # a batch's first video is the single prompt's video


def test_guidance_combines_cond_and_uncond_from_one_batch(pipe):
    context = pipe.text_context(["a cat"])
    uncond = pipe.text_context(["blurry"])
    x = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond_eps, uncond_eps = pipe.unet(x, 501, context), pipe.unet(x, 501, uncond)
        guided = pipe.guided_model(torch.cat([uncond, context]), guidance=7.5)(x, 501)
        plain = pipe.guided_model(context, guidance=1)(x, 501)
    # one batch vs two calls round differently, and guidance scales the difference by 7.5
    assert rel_err(guided, uncond_eps + 7.5 * (cond_eps - uncond_eps)) < 1e-4
    assert rel_err(plain, cond_eps) < 1e-6


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_denoise_is_ddims_sampler(pipe, eta):
    # ddim.sample is checked against diffusers' DDIMScheduler loop (test_ddim.py); denoise adds the
    # progress line and the noise drawn on the CPU, and must walk the same steps.
    context = pipe.text_context(["a cat"])
    x = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = pipe.denoise(x, context, steps=4, guidance=1, eta=eta, generator=torch.Generator().manual_seed(1),
                          progress=False)
    eps = pipe.guided_model(context, guidance=1)
    assert torch.equal(ours, ddim.sample(x, eps, 4, eta=eta, generator=torch.Generator().manual_seed(1)))


def test_denoise_with_dpm_solver_is_dpm_solvers_sampler_at_its_timesteps(pipe):
    context = pipe.text_context(["a cat"])
    x = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    eps = pipe.guided_model(context, guidance=1)
    ours = pipe.denoise(x, context, steps=5, guidance=1, progress=False, sampler="dpm++")
    assert torch.equal(ours, dpm_solver.sample(x, lambda x, t: seen.append(t) or eps(x, t), 5))
    assert seen == dpm_solver.timesteps(5).tolist() and seen != ddim.timesteps(5).tolist()
    assert not torch.equal(ours, pipe.denoise(x, context, steps=5, guidance=1, progress=False))  # ddim's
    with pytest.raises(ValueError, match="dpm\\+\\+ is deterministic"):
        pipe.denoise(x, context, steps=5, eta=0.5, progress=False, sampler="dpm++")
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        pipe.denoise(x, context, steps=5, progress=False, sampler="euler")


def test_sampler_flag_picks_the_sampler_and_the_default_is_sds(tmp_path, files, capsys):
    run(files, PROMPT, "--out", str(tmp_path / "dpm.gif"), "--sampler", "dpm++")
    assert "3 dpm++ steps" in capsys.readouterr().err
    sample.main([PROMPT, "--ckpt", files[0], "--adapters", files[1], "--out", str(tmp_path / "default.gif")])
    sampler, steps = simda.SD_SAMPLING[0], simda.SD_SAMPLING[1][simda.SD_SAMPLING[0]]
    assert f"{steps} {sampler} steps" in capsys.readouterr().err
    run(files, PROMPT, "--out", str(tmp_path / "ddim.gif"), "--sampler", "ddim")
    assert not np.array_equal(read_frames(str(tmp_path / "dpm.gif")), read_frames(str(tmp_path / "ddim.gif")))


def test_editing_refuses_dpm_solver_with_a_sentence_and_eta_needs_ddim(tmp_path, files, capsys):
    clip = write_clip(str(tmp_path / "clip.mp4"))
    expect_error(capsys, [PROMPT, "--ckpt", files[0], "--adapters", files[1], "--edit", clip, "--sampler", "dpm++"],
                 "replay a DDIM inversion", "drop --sampler dpm++")
    expect_error(capsys, [PROMPT, "--ckpt", files[0], "--adapters", files[1], "--eta", "0.5"], "--steps: eta 0.5",
                 "dpm++ is deterministic")


def test_grid_writes_the_frames_as_a_png_strip(tmp_path, files):
    run(files, PROMPT, "--out", str(tmp_path / "video.gif"), "--grid")
    grid = np.asarray(Image.open(tmp_path / "video.png"))
    assert grid.shape == (HEIGHT, FRAMES * WIDTH, 3)


def test_several_prompts_write_one_video_each(tmp_path, files):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a green tree\n\n")
    run(files, "a cat", "a dog!", "--prompts", str(prompts), "--out", str(tmp_path / "out" / "v.gif"))
    assert sorted(os.listdir(tmp_path / "out")) == ["v-00-a-cat.gif", "v-01-a-dog.gif", "v-02-a-green-tree.gif"]


def test_missing_checkpoint_says_where_to_put_the_weights(tmp_path, monkeypatch, capsys):
    howto = ("v1-5-pruned-emaonly.safetensors", "Hugging Face", "checkpoints/")
    monkeypatch.setenv("SIMDA_CKPT", str(tmp_path / "nowhere.safetensors"))
    err = expect_error(capsys, [PROMPT], "SIMDA_CKPT points to", "nowhere.safetensors", *howto)
    monkeypatch.delenv("SIMDA_CKPT")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(simda, "DEMO_CHECKPOINT", str(tmp_path / "no-demo.safetensors"))  # else the demo model runs
    err = expect_error(capsys, [PROMPT], "SIMDA_CKPT is not set", *howto)
    assert os.path.join(str(tmp_path), "checkpoints", "v1-5-pruned-emaonly.safetensors") in err


@pytest.mark.parametrize("argv, fragments", [
    (["--size", "100"], ["100x100", "multiples of 8"]),
    (["--size", "0"], ["0x0", "multiples of 8"]),  # as train.py
    (["--width", "24", "--height", "20"], ["24x20", "multiples of 8"]),
    (["--frames", "0"], ["--frames must be at least 1, got 0"]),
    (["--size", "16", "--width", "16"], ["either --size or --width/--height"]),
    (["--steps", "0"], ["num_inference_steps"]),
    (["--out", "video.avi"], ["video.avi'", ".gif or .mp4"]),
    (["--edit", "missing.mp4"], ["missing.mp4"]),
])
def test_bad_input_is_a_clear_error(tmp_path, files, capsys, argv, fragments):
    argv = [a if a not in ("video.avi", "missing.mp4") else str(tmp_path / a) for a in argv]
    expect_error(capsys, [PROMPT, "--ckpt", files[0], "--adapters", files[1], "--steps", "2", *argv], *fragments)


def test_no_prompt_and_odd_mp4_sizes_are_clear_errors(tmp_path, capsys):
    expect_error(capsys, [], "no prompt given")
    with pytest.raises(ValueError, match="even width and height, got 15x16"):
        save_video(np.zeros((2, 16, 15, 3), np.uint8), str(tmp_path / "odd.mp4"))


def write_clip(path, frames=6, height=16, width=24):
    """A smooth moving pattern, so that the codec keeps it close."""
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    video = [np.stack([np.sin(6 * x + 0.4 * f), np.cos(4 * y - 0.3 * f), x * y], -1) for f in range(frames)]
    video = (np.stack(video) * 0.4 + 0.5).clip(0, 1)
    imageio.mimwrite(path, (video * 255).astype(np.uint8), format="FFMPEG", fps=8, macro_block_size=1)
    return path


def test_editing_inverts_then_reconstructs_the_clips_latents(tmp_path, pipe):
    """With eta 0, the source prompt as the prompt and no guidance, sampling from the DDIM inversion
    gives back the clip's latents. DDIM inversion is exact only where eps does not change along the
    path (a trained model's eps stays close to the one noise it has found); a random UNet's eps swings
    with x, so the round trip through it is off by ~100% (measured: rel. error 1.1 to 4 at 5 to 50
    steps). Scaling its output conv by 1e-3 puts it in the regime inversion is made for, where eps
    still moves the result by ~10% of the latents. Measured there (20 steps, float32, CPU): rel.
    error 6.4e-3 (1.7e-3 at scale 3e-4, 3.4e-3 at 50 steps: it is the inversion's own approximation
    error, shrinking with eps and with the step size). The bound 8e-3 leaves room for other CPUs'
    rounding only. Inverting with 20 steps and sampling with 10 (schedules that do not meet) gives 0.24."""

    clip = data.read_clip(write_clip(str(tmp_path / "clip.mp4")), FRAMES, 1, HEIGHT, WIDTH, start=0)
    out = pipe.unet.out[2]  # out: [0] GroupNorm [1] SiLU [2] conv
    saved = out.weight.clone(), out.bias.clone()
    with torch.no_grad():
        out.weight.mul_(1e-3), out.bias.mul_(1e-3)
    try:
        latents = pipe.encode(stack_clips([clip]))
        inverted = pipe.invert(latents, PROMPT, steps=20, progress=False)
        context = pipe.text_context([PROMPT])
        back = pipe.denoise(inverted, context, steps=20, guidance=1, progress=False)
        mismatched = pipe.denoise(inverted, context, steps=10, guidance=1, progress=False)
        video = pipe(PROMPT, FRAMES, HEIGHT, WIDTH, steps=20, guidance=1, latents=inverted,
                                progress=False)[0]
        direct = pipe.decode(latents)[0]
    finally:
        with torch.no_grad():
            out.weight.copy_(saved[0]), out.bias.copy_(saved[1])
    print(f"reconstruction rel. error {rel_err(back, latents):.2e}, mismatched schedules "
          f"{rel_err(mismatched, latents):.2e}, uint8 max diff {(video.int() - direct.int()).abs().max()}")
    assert rel_err(inverted, latents) > 0.5  # the inversion did move the latents
    assert rel_err(back, latents) < 8e-3
    assert rel_err(mismatched, latents) > 0.1
    assert (video.int() - direct.int()).abs().max() <= 6  # uint8 levels through generate (measured: 4)


def test_edit_saves_the_inverted_latents_and_inverted_reuses_them(tmp_path, files, capsys):
    clip = write_clip(str(tmp_path / "clip.mp4"))
    run(files, "a blue ball rolling", "--edit", clip, "--out", str(tmp_path / "edit.gif"))
    saved = tmp_path / "edit.inverted.safetensors"
    latents, meta = sample.read_inverted(str(saved))
    assert latents.shape == (1, 4, FRAMES, HEIGHT // 2, WIDTH // 2)
    assert meta["source_prompt"] == PROMPT and meta["inversion_steps"] == "3"  # from the adapters' metadata
    run(files, "a blue ball rolling", "--inverted", str(saved), "--out", str(tmp_path / "again.gif"))
    assert np.array_equal(read_frames(str(tmp_path / "edit.gif")), read_frames(str(tmp_path / "again.gif")))
    expect_error(capsys, ["x", "--ckpt", files[0], "--inverted", str(saved), "--frames", "2"],
                 f"latents have shape (1, 4, {FRAMES}, 8, 12), expected (1, 4, 2, 8, 12)")
    expect_error(capsys, ["x", "--ckpt", files[0], "--edit", clip, "--steps", "2"], "--source-prompt")


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    text = capsys.readouterr().out
    for action in sample.build_parser()._actions:
        assert all(flag in text for flag in action.option_strings)
        assert action.help
