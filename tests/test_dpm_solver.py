"""dpm_solver.py against diffusers' DPMSolverMultistepScheduler configured as SD configures it (epsilon and v,
linspace and Karras spacing, SD's schedule and the x4 upscaler's), plus its accuracy against the exact
solution of the diffusion ODE for Gaussian data, next to DDIM's."""
import pytest
import torch

import ddim
import dpm_solver
from bench_unet import sd_dpm_scheduler
from conftest import rel_err

DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction"}  # ddim's name -> diffusers' prediction_type
SCHEDULES = {"sd": (0.00085, 0.012, None), "x4": (0.0001, 0.02, ddim.make_alphas_cumprod(0.0001, 0.02))}
SHAPES = {"image": (2, 4, 8, 8), "video": (1, 4, 3, 8, 8)}  # latents [B, C, h, w] and [B, C, F, h, w]


def diffusers_dpm(prediction="epsilon", karras=False, schedule="sd"):
    """diffusers' DPM-Solver++(2M) as SD's scheduler config builds it, on `schedule`'s betas."""
    return sd_dpm_scheduler(DIFFUSERS_PREDICTION[prediction], karras, SCHEDULES[schedule][:2])


def recording_model(calls, seed=0):
    """A fixed nonlinear model of (x, t) for any latent shape [B, 4, ...]: a random 4x4 channel mix of x,
    scaled by a function of t, plus a per-channel function of t, through tanh. Appends each t to `calls`."""
    g = torch.Generator().manual_seed(seed)
    mix, bias = torch.randn(4, 4, generator=g) / 2, torch.randn(4, generator=g)

    def model_fn(x, t):
        calls.append(t)
        assert type(t) is int
        h = torch.einsum("oc,bc...->bo...", mix, x) * (0.5 + t / 1000)
        return 1.5 * torch.tanh(h + bias.reshape(1, 4, *[1] * (x.dim() - 2)) * torch.cos(torch.tensor(t / 150)))
    return model_fn


def diffusers_loop(scheduler, x_T, model_fn, n):
    scheduler.set_timesteps(n)
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(model_fn(x, int(t)), t, x).prev_sample
    return x


@pytest.mark.parametrize("n", [10, 15, 20, 25, 50])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("karras", [False, True], ids=["linspace", "karras"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_sample_matches_diffusers_scheduler_loop(prediction, karras, schedule, shape, n):
    x_T = torch.randn(SHAPES[shape], generator=torch.Generator().manual_seed(n))
    ours_calls, ref_calls = [], []
    ours = dpm_solver.sample(x_T, recording_model(ours_calls), n, prediction=prediction,
                             alphas=SCHEDULES[schedule][2], karras=karras)
    ref = diffusers_loop(diffusers_dpm(prediction, karras, schedule), x_T, recording_model(ref_calls), n)
    assert ours_calls == ref_calls and len(ours_calls) == n  # the model is called at the same timesteps
    assert ours.shape == x_T.shape and ours.dtype == x_T.dtype
    err = rel_err(ours, ref)
    print(f"\nparity rel_err {err:.1e}")
    assert err <= 1e-4


def test_the_prediction_is_really_used():
    x_T = torch.randn(SHAPES["image"], generator=torch.Generator().manual_seed(1))
    model = recording_model([])
    assert rel_err(dpm_solver.sample(x_T, model, 10, "v"), dpm_solver.sample(x_T, model, 10, "epsilon")) > 0.01


def test_timesteps_20_linspace_are_999_to_50():
    expected = [999, 949, 899, 849, 799, 749, 699, 649, 599, 549, 500, 450, 400, 350, 300, 250, 200, 150, 100, 50]
    assert dpm_solver.timesteps(20).tolist() == expected  # 500, not 499: 499.5 rounds half to even, as numpy
    ref = diffusers_dpm()
    ref.set_timesteps(20)
    assert ref.timesteps.tolist() == expected


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_linspace_timesteps_and_sigmas_match_diffusers_for_every_count(schedule):
    ref, alphas = diffusers_dpm(schedule=schedule), SCHEDULES[schedule][2]
    for n in range(1, 1000):
        ref.set_timesteps(n)
        ts, sigmas = dpm_solver.schedule(n, alphas)
        assert ts.dtype == torch.long and torch.equal(ts, ref.timesteps), n
        assert sigmas.dtype == torch.float32 and sigmas[-1] == 0 and len(sigmas) == n + 1
        # the tables differ by diffusers' float32 cumprod (ddim.py computes it in float64)
        assert ((sigmas[:-1].double() - ref.sigmas[:-1].double()).abs() / ref.sigmas[:-1].double()).max() < 2e-4


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_karras_timesteps_and_sigmas_match_diffusers(schedule):
    # from ~200 steps on, a Karras level can land within 1e-6 of a half timestep, where the tables' 1e-6
    # difference decides the rounding; no one samples that many Karras steps, so we check up to 150
    ref, alphas = diffusers_dpm(karras=True, schedule=schedule), SCHEDULES[schedule][2]
    for n in [*range(1, 101), 150]:
        ref.set_timesteps(n)
        ts, sigmas = dpm_solver.schedule(n, alphas, karras=True)
        assert torch.equal(ts, ref.timesteps), n
        assert rel_err(sigmas, ref.sigmas) < 2e-4, n
    ts, sigmas = dpm_solver.schedule(10, alphas, karras=True)
    a = ddim.alphas_cumprod if alphas is None else alphas
    table = ((1 - a) / a) ** 0.5
    assert ts[0] == 999 and ts[-1] == 0 and sigmas[0] == table[-1] and sigmas[-2] == table[0]  # the table's ends
    assert (sigmas[:-1].diff() < 0).all()


@pytest.mark.parametrize("n", [0, -1, 1000, 2.5, None])
@pytest.mark.parametrize("karras", [False, True])
def test_bad_step_counts_raise(n, karras):
    with pytest.raises(ValueError, match="num_inference_steps"):
        dpm_solver.timesteps(n, karras=karras)
    with pytest.raises(ValueError, match="num_inference_steps"):
        dpm_solver.sample(torch.zeros(SHAPES["image"]), recording_model([]), n, karras=karras)


def test_bad_prediction_raises():
    with pytest.raises(ValueError, match="prediction"):
        dpm_solver.sample(torch.zeros(SHAPES["image"]), recording_model([]), 10, prediction="x")


# ---------------------------------------------------------------------------- accuracy

# The Gaussian data: N(mu, DATA_STD^2) per element, mu a fixed random latent; unit variance, as SD scales its
# latents to. Narrower data (std 0.25) curve the flow near the clean end, where the last, first-order jump from
# t=50 to sigma 0 then dominates, and 10 DDIM steps (which stop at alphas_cumprod[0]) come out ahead.
MU_SEED, DATA_STD = 20, 1.0


def gaussian_data():
    """(mu, eps_fn) for data x0 ~ N(mu, s^2 I): the exact E[eps | x_t] = (x_t - sqrt(a) mu) sqrt(1 - a) /
    (a s^2 + 1 - a), a smooth (affine) model with which only the solver errs."""
    mu = 0.5 * torch.randn(SHAPES["image"], generator=torch.Generator().manual_seed(MU_SEED))

    def eps_fn(x, t):
        a = ddim.alphas_cumprod[t]
        return (x - a**0.5 * mu) * (1 - a) ** 0.5 / (a * DATA_STD**2 + 1 - a)
    return mu, eps_fn


def exact_flow(x, mu, a_from, a_to):
    """The diffusion ODE's exact solution for that data, from alphas_cumprod a_from to a_to: the flow is affine
    and keeps the standardised value (x - sqrt(a) mu) / sqrt(a s^2 + 1 - a) of every element."""
    z = (x.double() - a_from**0.5 * mu) / (a_from * DATA_STD**2 + 1 - a_from) ** 0.5
    return a_to**0.5 * mu + (a_to * DATA_STD**2 + 1 - a_to) ** 0.5 * z


def test_ten_dpm_solver_steps_land_nearer_the_ode_solution_than_ten_ddim_steps():
    mu, eps_fn = gaussian_data()
    a = ddim.alphas_cumprod.double()
    x_T = torch.randn(SHAPES["image"], generator=torch.Generator().manual_seed(21))
    # Each sampler solves the same ODE between its own ends: DPM-Solver++ from t=999 to the clean data (a = 1),
    # ddim.sample from its first timestep (901 for 10 steps) to alphas_cumprod[0]. First the exact solution is
    # checked against the neutral long reference, 999 DDIM steps (999 -> alphas_cumprod[0]).
    long_ddim = ddim.sample(x_T, eps_fn, 999)
    reference_err = rel_err(long_ddim, exact_flow(x_T, mu, a[999], a[0]))
    dpm_err = rel_err(dpm_solver.sample(x_T, eps_fn, 10), exact_flow(x_T, mu, a[999], 1.0))
    ddim_start = ddim.timesteps(10)[0].item()
    ddim_err = rel_err(ddim.sample(x_T, eps_fn, 10), exact_flow(x_T, mu, a[ddim_start], a[0]))
    karras_err = rel_err(dpm_solver.sample(x_T, eps_fn, 10, karras=True), exact_flow(x_T, mu, a[999], 1.0))
    print(f"\n999 DDIM steps vs exact {reference_err:.1e}; 10 steps vs exact: DPM-Solver++ {dpm_err:.1e} "
          f"(karras {karras_err:.1e}), DDIM {ddim_err:.1e}, ratio DDIM / DPM-Solver++ {ddim_err / dpm_err:.1f}")
    assert reference_err <= 3e-3  # measured 1.3e-3: far below the errors compared
    assert ddim_err >= 1.8 * dpm_err  # measured 2.28 (DPM-Solver++ 4.7e-2, DDIM 1.1e-1)
