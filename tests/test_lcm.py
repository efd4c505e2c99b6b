"""lcm.py against diffusers' LCMScheduler configured with SD's schedule (epsilon and v, images and videos, the
distillation grids of skips 20, 50 and 100): its timesteps, its boundary conditions and the noise it adds between
steps, on an analytic model function, as tests/test_dpm_solver.py does for DPM-Solver++."""
import pytest
import torch

import ddim
import lcm
from conftest import rel_err
from test_dpm_solver import DIFFUSERS_PREDICTION, SHAPES, recording_model


def diffusers_lcm(prediction="epsilon", skip=lcm.SKIP):
    """diffusers' LCMScheduler on SD's schedule, for adapters distilled on the grid of `skip`."""
    from diffusers import LCMScheduler
    return LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False, original_inference_steps=1000 // skip, timestep_scaling=10.0,
                        prediction_type=DIFFUSERS_PREDICTION[prediction])


def diffusers_loop(scheduler, x_T, model_fn, n, generator):
    scheduler.set_timesteps(n)
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(model_fn(x, int(t)), t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("skip", [20, 50, 100])
def test_timesteps_match_diffusers_for_every_count(skip):
    ref = diffusers_lcm(skip=skip)
    for n in range(1, 1000 // skip + 1):
        ref.set_timesteps(n)
        assert torch.equal(lcm.timesteps(n, skip), ref.timesteps), n
    assert lcm.timesteps(4).tolist() == [999, 759, 499, 259]
    assert lcm.grid(skip)[0] == skip - 1 and lcm.grid(skip)[-1] == 999


def test_boundary_conditions_match_diffusers_and_make_f_the_identity_at_zero():
    ref = diffusers_lcm()
    for t in [0, 1, 19, 259, 999]:
        c_skip, c_out = lcm.boundary(t)
        assert (c_skip, c_out) == pytest.approx(ref.get_scalings_for_boundary_condition_discrete(t), rel=1e-12)
    assert lcm.boundary(0) == (1.0, 0.0)
    c_skip, c_out = lcm.boundary(19)  # the grid's smallest timestep: f is the x0 prediction there already
    assert c_skip < 1e-5 and c_out > 1 - 1e-5
    x, out = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 3, 8, 8)
    assert torch.equal(lcm.consistency(x, out, 0), x)  # c_skip -> 1, c_out -> 0: f(x, 0) = x whatever the model says
    assert torch.equal(lcm.consistency(x, out, torch.tensor([-1, 0])), x)  # the clean end of a DDIM step, per sample


def test_per_sample_timesteps_give_each_sample_its_own_consistency():
    x, out = torch.randn(3, 4, 2, 8, 8), torch.randn(3, 4, 2, 8, 8)
    ts = torch.tensor([19, 500, 999])
    for prediction in DIFFUSERS_PREDICTION:
        batched = lcm.consistency(x, out, ts, prediction)
        alone = torch.cat([lcm.consistency(x[i:i + 1], out[i:i + 1], int(t), prediction) for i, t in enumerate(ts)])
        assert rel_err(batched, alone) < 1e-6


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("skip", [20, 50])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_sample_matches_diffusers_scheduler_loop_with_the_same_step_noise(prediction, skip, shape, n):
    x_T = torch.randn(SHAPES[shape], generator=torch.Generator().manual_seed(n))
    ours_calls, ref_calls = [], []
    ours = lcm.sample(x_T, recording_model(ours_calls), n, torch.Generator().manual_seed(7), skip, prediction)
    ref = diffusers_loop(diffusers_lcm(prediction, skip), x_T, recording_model(ref_calls), n,
                         torch.Generator().manual_seed(7))
    assert ours_calls == ref_calls and len(ours_calls) == n  # the model is called at the same timesteps
    assert ours.shape == x_T.shape and ours.dtype == x_T.dtype
    err = rel_err(ours, ref)
    print(f"\nparity rel_err {err:.1e}")
    assert err <= 1e-4


def test_the_noise_between_steps_comes_from_the_generator_and_one_step_adds_none():
    x_T, model = torch.randn(SHAPES["video"], generator=torch.Generator().manual_seed(0)), recording_model([])
    run = lambda n, seed: lcm.sample(x_T, model, n, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(4, 1), run(4, 1))
    assert rel_err(run(4, 1), run(4, 2)) > 0.01  # other step noise, another sample
    assert torch.equal(run(1, 1), run(1, 2))  # one step: f(x_T, 999), no noise drawn


@pytest.mark.parametrize("n", [0, -1, 51, 2.5, None, True])
def test_bad_step_counts_raise(n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        lcm.timesteps(n)
    with pytest.raises(ValueError, match="num_inference_steps"):
        lcm.sample(torch.zeros(SHAPES["image"]), recording_model([]), n)
    with pytest.raises(ValueError, match="skip"):
        lcm.grid(0)


@pytest.mark.parametrize("skip, phases", [(50, 4), (20, 4), (20, 1), (100, 3)])
def test_each_timestep_of_the_grid_ends_its_phase_at_the_next_sampling_timestep_below_it(skip, phases):
    grid, stops = lcm.grid(skip), lcm.timesteps(phases, skip).tolist()
    ends = lcm.phase_ends(grid, phases, skip)
    for t, end in zip(grid.tolist(), ends.tolist()):
        assert end == max([s for s in stops[1:] + [-1] if s < t])
        assert t - skip >= end  # a step of the grid never passes its phase's end
    if (skip, phases) == (50, 4):
        assert lcm.phase_ends(torch.tensor([999, 750, 749, 500, 249, 49, 0]), 4, 50).tolist() == [
            749, 749, 499, 499, -1, -1, -1]


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_phased_consistency_is_the_ddim_step_to_the_phase_end_and_the_identity_at_the_end(prediction):
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(4, 4, 3, 6, 6, generator=g), torch.randn(4, 4, 3, 6, 6, generator=g)
    t, end = torch.tensor([999, 600, 249, -1]), torch.tensor([749, 499, -1, -1])
    f = lcm.phased_consistency(x, out, t, end, prediction)
    for i in range(3):
        expected = ddim.step(x[i:i + 1], out[i:i + 1], int(t[i]), int(end[i]), prediction=prediction)
        assert rel_err(f[i:i + 1], expected) < 1e-6
    assert torch.equal(f[3], x[3])  # at its end f is x itself
    assert torch.equal(lcm.phased_consistency(x, out, end, end, prediction)[:2], x[:2])


@pytest.mark.parametrize("n", [1, 4, 8])
def test_phased_sampling_is_deterministic_ddim_between_the_timesteps_with_no_noise_drawn(n):
    x_T = torch.randn(SHAPES["video"], generator=torch.Generator().manual_seed(0))
    calls, generator = [], torch.Generator().manual_seed(3)
    ours = lcm.sample(x_T, recording_model(calls), n, generator, 50, phased=True)
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(3).get_state())
    ts = lcm.timesteps(n, 50).tolist()
    x, model = x_T, recording_model([])
    for i, t in enumerate(ts):
        x = ddim.step(x, model(x, t), t, ts[i + 1] if i + 1 < n else -1)
    assert calls == ts and torch.equal(ours, x)
    if n == 4:  # as many steps as phases: each step is f from a phase's start to its end
        assert lcm.phase_ends(torch.tensor(ts), 4, 50).tolist() == ts[1:] + [-1]
