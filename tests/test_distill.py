"""Consistency distillation (distill.py, train.py --distill) and its sampler behind the command lines, on the tiny
random-weight SD: the teacher's guided DDIM step is ddim.py's, the target is the EMA of the student, a few steps
lower the loss, a run saves and resumes bitwise, the distilled file samples with lcm by default, and what cannot
work is refused in one line."""
import json
import os

import pytest
import torch

import ddim
import distill
import sample
import simda
import train
from adapters import SimDAConfig, adapter_state_dict, freeze_for_training
from conftest import op_log, perturb_adapters_, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = ["--frames", "4", "--size", "16"]  # latents 4 x 8x8: the tiny VAE halves, the tiny UNet needs multiples of 4
COMMON = ["--data", "shapes", *SHAPE, "--batch-size", "2", "--lr", "1e-3", "--caption-dropout", "0", "--log-every", "1"]


@pytest.fixture(scope="module")
def teacher(tiny_checkpoint, tmp_path_factory):
    """Trained-looking adapters for the tiny SD (every adapter weight off zero), as train.py writes them."""
    pipe = simda.load_pipeline(tiny_checkpoint, simda_config=SimDAConfig())
    perturb_adapters_(pipe.unet, seed=5)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.safetensors")
    simda.save_adapters(pipe.unet, path, frames=4, height=16, width=16, prediction="epsilon", family=pipe.family)
    return path


def distiller(ckpt, teacher, **settings):
    """A Distiller on a pipeline whose student adapters have moved away from the teacher's."""
    pipe = simda.load_pipeline(ckpt, adapters=teacher)
    optimizer = torch.optim.AdamW(freeze_for_training(pipe.unet), lr=3e-3)
    d = distill.Distiller(pipe, distill.Settings(teacher, **settings), optimizer)
    d.optimizer = optimizer  # the tests' handle on it
    perturb_adapters_(pipe.unet, seed=6, scale=0.02)
    return d


def inputs(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 4, 8, 8, generator=g)
    return x, pipe.text_context(["a red circle moving left", "a blue square moving up", "a green triangle"])


def test_the_teachers_step_is_ddims_step_on_the_guided_output_of_the_teachers_adapters(tiny_checkpoint, teacher):
    d = distiller(tiny_checkpoint, teacher, skip=20)
    reference = simda.load_pipeline(tiny_checkpoint, adapters=teacher)  # the teacher alone, sampled as sample.py does
    x, context = inputs(d.pipe)
    t, w = torch.tensor([19, 500, 999]), torch.tensor([2.0, 4.0, 7.5])  # 19 steps to the clean end
    ours = d.teacher_step(x, t, w, context)
    for i in range(3):
        guided = reference.guided_model(torch.cat([reference.text_context([""]), context[i:i + 1]]), float(w[i]))
        expected = ddim.step(x[i:i + 1], guided(x[i:i + 1], int(t[i])), int(t[i]), int(t[i]) - 20)
        assert rel_err(ours[i:i + 1], expected) < 1e-5, i
    # the step used the teacher's adapters, not the student's the UNet now holds
    student = d.pipe.guided_model(torch.cat([d.uncond, context[2:]]), 7.5)
    assert rel_err(ours[2:], ddim.step(x[2:], student(x[2:], 999), 999, 979)) > 1e-4


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("alphas", [None, ddim.make_alphas_cumprod(0.0001, 0.02)], ids=["sd", "upscaler"])
def test_the_teachers_step_on_timesteps_per_sample_is_the_one_sample_step_bit_for_bit_without_a_read_back(
        prediction, eta, alphas):
    """ddim.step on timesteps [B] (the teacher's t and t - k, on the device in training) gives each sample what
    ddim.step on that sample alone gives, to the bit in float32, the clean end t_prev < 0 included, and reads
    nothing back to the host (no .item() or int() of a timestep: a wait for the GPU per sample)."""
    g = torch.Generator().manual_seed(0)
    x, output, noise = (torch.randn(5, 4, 3, 6, 6, generator=g) for _ in range(3))
    t, t_prev = torch.tensor([999, 500, 19, 0, 260]), torch.tensor([979, 480, -1, -20, 240])
    with op_log() as ops:
        ours = ddim.step(x, output, t, t_prev, eta, noise, prediction, alphas)
    expected = torch.cat([ddim.step(x[i:i + 1], output[i:i + 1], int(t[i]), int(t_prev[i]), eta, noise[i:i + 1],
                                    prediction, alphas) for i in range(5)])
    assert torch.equal(ours, expected)
    assert ops["aten._local_scalar_dense.default"] == 0, ops


@pytest.mark.parametrize("rate", [0.95, 0.0])
def test_the_target_is_the_ema_of_the_student_or_the_student_itself(tiny_checkpoint, teacher, rate):
    d = distiller(tiny_checkpoint, teacher, ema_rate=rate)
    x, context = inputs(d.pipe, 1)
    t = torch.tensor([-1, 259, 999])
    teacher_weights = {k: v.clone() for k, v in d.teacher.items()}
    d.update_target()
    expected_weights = {k: rate * teacher_weights[k] + (1 - rate) * v.detach()
                        for k, v in adapter_state_dict(d.pipe.unet).items()}
    if rate:
        assert all(rel_err(d.target[k], expected_weights[k]) < 1e-6 for k in expected_weights)
    reference = simda.load_pipeline(tiny_checkpoint, adapters=teacher)
    simda.load_adapters(reference.unet, expected_weights)
    with torch.no_grad():
        out = reference.unet(x, t.clamp(min=0), context)
    expected = torch.cat([x[:1], distill.lcm.consistency(x[1:], out[1:], t[1:])])  # t < 0: f(x, 0) = x exactly
    ours = d.target_consistency(x, t, context)
    assert torch.equal(ours[:1], x[:1]) and rel_err(ours, expected) < 1e-5


def test_ema_and_pseudo_huber():
    target, student = {"a": torch.ones(3)}, {"a": torch.full((3,), 3.0, requires_grad=True)}
    distill.ema_(target, student, 0.75)
    assert torch.allclose(target["a"], torch.full((3,), 1.5))
    a, b = torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0])
    assert distill.pseudo_huber(a, b, 0.001).item() == pytest.approx((0 + (1 + 1e-6) ** 0.5 - 0.001) / 2)


def test_a_few_distillation_steps_lower_the_loss_on_a_fixed_batch(tiny_checkpoint, teacher):
    d = distiller(tiny_checkpoint, teacher)
    dataset = distill.data.ShapesDataset(4, 16, seed=0, caption_dropout=0)
    gs = [0, 1, 2, 3]
    batch = [dataset.sample(g) for g in gs]
    optimizer = d.optimizer  # the target follows its steps
    losses, target = [], {k: v.clone() for k, v in d.target.items()}
    for _ in range(6):
        loss = d.loss(d.pipe.unet, batch, gs, 0, torch.device("cpu"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        distill.ema_(target, d.student, 0.95)
        losses.append(loss.item())
    assert all(torch.equal(target[k], d.target[k]) for k in target)  # one EMA update a step, after it
    assert losses[-1] < 0.8 * losses[0], losses


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.fixture(scope="module")
def straight(tiny_checkpoint, teacher, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("distilled"))
    train.main(["--ckpt", tiny_checkpoint, "--distill", teacher, "--out", out, "--steps", 4, *COMMON,
                "--val-prompt", "a red circle moving left"])
    return out


def test_a_distillation_run_saves_a_distilled_file_and_resumes_bitwise(straight, tiny_checkpoint, teacher, tmp_path):
    weights, meta = simda.read_adapters(os.path.join(straight, "adapters.safetensors"))
    assert meta["distilled"] == dict(teacher=teacher, skip=20, guidance=[7.5, 7.5], ema_rate=0.95, huber_c=0.001,
                                     start=None, lora_rank=0, phases=0, solve_phases=False,
                                     sampler="lcm")
    start = simda.read_adapters(teacher)[0]
    assert any(not weights[k].equal(start[k]) for k in weights)  # the student moved off the teacher
    assert os.path.exists(os.path.join(straight, "samples", "step000004.gif"))  # validated with lcm
    state = torch.load(os.path.join(straight, "state.pt"), weights_only=True)
    assert state["target"].keys() == weights.keys() and not state["target"][next(iter(weights))].equal(
        weights[next(iter(weights))])
    out = str(tmp_path)
    train.main(["--ckpt", tiny_checkpoint, "--distill", teacher, "--out", out, "--steps", 2, *COMMON])
    train.main(["--ckpt", tiny_checkpoint, "--distill", teacher, "--out", out, "--steps", 4, "--resume", *COMMON])
    assert losses(out) == losses(straight) and len(losses(out)) == 4
    resumed = torch.load(os.path.join(out, "state.pt"), weights_only=True)
    assert all(resumed["adapters"][k].equal(state["adapters"][k]) for k in weights)
    assert all(resumed["target"][k].equal(state["target"][k]) for k in weights)


def test_distilled_adapters_sample_with_lcm_by_default_deterministically(straight, tiny_checkpoint, tmp_path, capsys):
    adapters = os.path.join(straight, "adapters.safetensors")
    sample.main(["a red circle", "--ckpt", tiny_checkpoint, "--adapters", adapters, "--out", str(tmp_path / "a.gif")])
    assert "4 lcm steps, guidance 1.0" in capsys.readouterr().err
    pipe = simda.load_pipeline(tiny_checkpoint, adapters=adapters)
    calls = []
    unet_forward = pipe.unet.forward
    pipe.unet.forward = lambda x, *a, **k: calls.append(x.shape[0]) or unet_forward(x, *a, **k)
    one, again, other = (pipe("a red circle", 4, 16, 16, 4, seed=s, sampler="lcm", progress=False) for s in (1, 1, 2))
    assert torch.equal(one, again) and not torch.equal(one, other)
    assert calls == [1] * 12  # one UNet call a step, at batch 1: no guidance batch


@pytest.mark.parametrize("argv, message", [
    (["--given-frames", "1"], "--distill distils text-to-video sampling"),
    (["--no-latent-shift"], "drop the --no-* ablation flags"),
    (["--guidance-range", "8,3"], "--guidance-range takes LO or LO,HI"),
    (["--guidance-range", "a"], "--guidance-range takes LO or LO,HI"),
    (["--ema-rate", "1"], "--ema-rate must be in [0, 1)"),
    (["--distill-skip", "0"], "the skip must be an int"),
    (["--lora-rank", "-1"], "--lora-rank >= 0"),
    (["--phases", "51"], "--phases must be in [0, 50] (the timesteps of --distill-skip 20), got 51"),
    (["--phases", "-1"], "--phases must be in [0, 50]"),
    (["--solve-phases"], "--solve-phases solves each phase of a phased distillation: add --phases N"),
])
def test_distillation_refuses_what_it_cannot_do_before_any_model_loads(argv, message, tiny_checkpoint, teacher,
                                                                       tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(simda, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        train.main(["--ckpt", tiny_checkpoint, "--distill", teacher, "--out", str(tmp_path), *COMMON, *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: " in err and message in err and len(err.splitlines()) == 1, err


def test_distillation_refuses_a_missing_or_distilled_teacher_and_lcm_validation_without_it(straight, tiny_checkpoint,
                                                                                         tmp_path, capsys):
    for argv, message in ((["--distill", "missing.safetensors"], "adapter file not found: missing.safetensors"),
                          (["--distill", os.path.join(straight, "adapters.safetensors")], "holds distilled adapters"),
                          (["--val-sampler", "lcm"], "--val-sampler lcm samples distilled adapters")):
        with pytest.raises(SystemExit) as e:
            train.main(["--ckpt", tiny_checkpoint, "--out", str(tmp_path), *COMMON, *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "error: " in err and message in err, err


def test_lcm_is_refused_for_adapters_not_distilled_with_editing_and_with_guidance(straight, tiny_checkpoint, teacher,
                                                                                  tmp_path, capsys):
    distilled = os.path.join(straight, "adapters.safetensors")
    out = ["--out", str(tmp_path / "v.gif"), "--ckpt", tiny_checkpoint]
    for argv, message in ((["--adapters", teacher, "--sampler", "lcm"], "lcm samples distilled adapters"),
                          (["--adapters", distilled, "--sampler", "lcm", "--edit", teacher], "drop --sampler lcm"),
                          (["--adapters", distilled, "--guidance", "5"], "--guidance: lcm samples the guidance")):
        with pytest.raises(SystemExit) as e:
            sample.main(["a red circle", *out, *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "error: " in err and message in err and "Traceback" not in err, err
    pipe = simda.load_pipeline(tiny_checkpoint, adapters=teacher)
    with pytest.raises(ValueError, match="these adapters were not distilled"):
        pipe("a red circle", 4, 16, 16, 4, sampler="lcm")


def test_a_distillation_goes_on_from_distilled_adapters_with_its_teacher_kept(straight, tiny_checkpoint, teacher,
                                                                            tmp_path, capsys):
    start = os.path.join(straight, "adapters.safetensors")
    base = ["--ckpt", tiny_checkpoint, "--distill", teacher, "--steps", "1", *COMMON]
    run = train.build_run(train.build_parser().parse_args(base + ["--out", str(tmp_path / "more"), "--init-from", start]))
    started, teacher_weights = simda.read_adapters(start)[0], simda.read_adapters(teacher)[0]
    student = adapter_state_dict(run.pipe.unet)
    assert all(student[k].equal(started[k]) and run.distiller.target[k].equal(started[k]) for k in started)
    assert all(run.distiller.teacher[k].equal(teacher_weights[k]) for k in started)
    assert not all(started[k].equal(teacher_weights[k]) for k in started)
    for more, message in ((["--init-from", teacher], "adapters that were not distilled"),
                          (["--init-from", start, "--distill-skip", "50"], "distilled with --distill-skip 20 --lora-rank 0 --phases 0, not "
                                                                         "--distill-skip 50 --lora-rank 0")):
        with pytest.raises(SystemExit) as e:
            train.main(base + ["--out", str(tmp_path / "refused"), *more])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err


def test_a_distillation_with_a_lora_starts_as_the_teacher_then_trains_saves_resumes_and_samples_it(
        tiny_checkpoint, teacher, tmp_path, capsys):
    base = ["--ckpt", tiny_checkpoint, "--distill", teacher, "--lora-rank", "2", *COMMON]
    run = train.build_run(train.build_parser().parse_args(base + ["--steps", "1", "--out", str(tmp_path / "built")]))
    lora = [k for k in run.distiller.student if "lora." in k]
    assert lora and all(k in run.distiller.teacher for k in lora)  # a LoRA beside the attention and the ResBlocks
    assert {k.split("lora.")[1].split(".")[0] for k in lora} == {"to_q", "to_k", "to_v", "to_out", "conv_in", "conv_out"}
    x, context = inputs(run.pipe)
    t = torch.tensor([999, 500, 19])
    with torch.no_grad():
        with_lora = run.pipe.unet(x, t, context)
        for m in [m for m in run.pipe.unet.modules() if getattr(m, "lora", None) is not None]:
            m.lora = None
        assert torch.equal(with_lora, run.pipe.unet(x, t, context))  # the fresh LoRA changes nothing
    straight, out = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.main(base + ["--steps", "2", "--out", straight])
    train.main(base + ["--steps", "1", "--out", out])
    train.main(base + ["--steps", "2", "--out", out, "--resume"])
    assert losses(out) == losses(straight)
    with pytest.raises(SystemExit):  # the LoRA forgotten on a resume: said, not a key mismatch
        train.main(["--ckpt", tiny_checkpoint, "--distill", teacher, *COMMON, "--steps", "3", "--out", out, "--resume"])
    assert "saved by a run with --lora-rank 2: resume it with --lora-rank 2" in capsys.readouterr().err
    weights, meta = simda.read_adapters(os.path.join(out, "adapters.safetensors"))
    assert meta["simda_config"]["lora_rank"] == 2 and meta["distilled"]["lora_rank"] == 2
    assert all(weights[k].equal(w) for k, w in simda.read_adapters(os.path.join(straight, "adapters.safetensors"))[0].items())
    assert all(weights[k].abs().max() > 0 for k in lora if ".up." in k)  # the LoRA trained
    sample.main(["a red circle", "--ckpt", tiny_checkpoint, "--adapters", os.path.join(out, "adapters.safetensors"),
                 "--out", str(tmp_path / "v.gif")])
    assert "4 lcm steps" in capsys.readouterr().err and os.path.exists(tmp_path / "v.gif")
    for more, message in ((["--init-from", os.path.join(out, "adapters.safetensors"), "--lora-rank", "0"],
                           "--lora-rank 2 --phases 0, not --distill-skip 20 --lora-rank 0 --phases 0"),
                          (["--distill", ""], "--lora-rank adds a LoRA to a distillation's student")):
        with pytest.raises(SystemExit) as e:
            train.main(base + ["--steps", "1", "--out", str(tmp_path / "refused"), *more])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err


def test_a_phased_target_is_the_targets_ddim_step_to_the_students_phase_end_or_the_teachers_step_at_it(
        tiny_checkpoint, teacher):
    d = distiller(tiny_checkpoint, teacher, phases=4)  # skip 20: the phases end at 759, 499, 259 and the clean end
    x, context = inputs(d.pipe, 2)
    t = torch.tensor([999, 519, 279])  # t - 20: inside its phase, inside, at its end
    end = distill.lcm.phase_ends(t, 4, 20)
    assert end.tolist() == [759, 499, 259]
    ours = d.target_consistency(x, t - 20, context, end)
    with torch.no_grad():
        out = distill.functional_call(d.pipe.unet, d.target, (x, t - 20, context))
    assert torch.equal(ours[2], x[2])  # at the phase's end the target is the teacher's step itself
    for i in range(2):
        expected = ddim.step(x[i:i + 1], out[i:i + 1], int(t[i]) - 20, int(end[i]))
        assert rel_err(ours[i:i + 1], expected) < 1e-5, i


def test_a_phased_distillation_saves_its_phases_and_samples_them_without_step_noise(tiny_checkpoint, teacher,
                                                                                    tmp_path, capsys):
    base = ["--ckpt", tiny_checkpoint, "--distill", teacher, "--phases", "4", *COMMON]
    out = str(tmp_path / "phased")
    train.main(base + ["--steps", "2", "--out", out])
    adapters = os.path.join(out, "adapters.safetensors")
    assert simda.read_adapters(adapters)[1]["distilled"]["phases"] == 4
    with pytest.raises(SystemExit):  # a resume must keep the objective
        train.main(["--ckpt", tiny_checkpoint, "--distill", teacher, *COMMON, "--steps", "3", "--out", out, "--resume"])
    assert "saved by a run with --phases 4: resume it with --phases 4" in capsys.readouterr().err
    sample.main(["a red circle", "--ckpt", tiny_checkpoint, "--adapters", adapters, "--out", str(tmp_path / "v.gif")])
    assert "4 lcm steps" in capsys.readouterr().err
    pipe = simda.load_pipeline(tiny_checkpoint, adapters=adapters)
    draws = []
    randn = torch.randn
    torch.randn = lambda *a, **k: draws.append(a) or randn(*a, **k)
    try:
        phased = pipe("a red circle", 4, 16, 16, 4, seed=1, sampler="lcm", progress=False)
        assert len(draws) == 1  # the starting noise, none between the steps
        pipe.distilled = {**pipe.distilled, "phases": 0}
        assert not torch.equal(phased, pipe("a red circle", 4, 16, 16, 4, seed=1, sampler="lcm", progress=False))
        assert len(draws) == 5  # LCM: the starting noise and 3 between its 4 steps
    finally:
        torch.randn = randn


def test_a_solved_phase_is_the_teachers_ddim_steps_to_its_end_and_the_students_whole_target(tiny_checkpoint, teacher):
    d = distiller(tiny_checkpoint, teacher, phases=4, solve_phases=True)  # skip 20: ends 759, 499, 259, clean
    assert d.target is None  # no target network: the teacher's own end is the target
    x, context = inputs(d.pipe, 3)
    t, w = torch.tensor([799, 519, 19]), torch.tensor([7.5, 3.0, 7.5])
    end = distill.lcm.phase_ends(t, 4, 20)
    ours = d.teacher_to_end(x, t, w, context, end)
    for i, steps in enumerate((2, 1, 1)):  # 799 -> 779 -> 759; 519 -> 499; 19 -> the clean end
        expected, now = x[i:i + 1], t[i:i + 1]
        for _ in range(steps):
            expected = d.teacher_step(expected, now, w[i:i + 1], context[i:i + 1])
            now = now - 20
        assert rel_err(ours[i:i + 1], expected) < 1e-5, i
    assert ours[2].sub(x[2]).abs().max() > 0.01  # the clean end reached, the input left as it was
    g = [0, 1, 2]
    calls = []
    target = d.teacher_to_end
    d.teacher_to_end = lambda *a: calls.append(a) or target(*a)
    loss = d.consistency_loss(d.pipe.unet, torch.randn(3, 4, 4, 8, 8), context, g, 0)
    loss.backward()
    assert len(calls) == 1 and loss.item() > 0
