"""ddim.py against diffusers' DDIMScheduler configured as SD uses it (epsilon as SD 1.x, v as SD 2.x 768-v), plus
the inversion round trip."""
import pytest
import torch

import ddim
from conftest import rel_err
from reference import sd_ddim_scheduler

SHAPE = (2, 4, 3, 8, 8)  # video latents [B, C, F, h, w]
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction"}  # ddim's name -> diffusers' prediction_type


def sd_scheduler(prediction="epsilon"):
    """diffusers' DDIM as SD uses it, predicting `prediction` (ddim's names: "epsilon" or "v")."""
    return sd_ddim_scheduler(DIFFUSERS_PREDICTION[prediction])


def random_eps_fn(seed=0):
    """A fixed random noise prediction per timestep plus a mild dependence on x."""
    def eps_fn(x, t):
        g = torch.Generator().manual_seed(seed * 1000 + int(t))
        return torch.randn(x.shape, generator=g) + 0.1 * x
    return eps_fn


@pytest.mark.parametrize("n", [1, 3, 10, 25, 50, 999])
def test_timesteps_match_diffusers_leading_spacing(n):
    ref = sd_scheduler()
    ref.set_timesteps(n)
    ours = ddim.timesteps(n)
    assert ours.dtype == torch.long
    assert torch.equal(ours, ref.timesteps)


def test_timesteps_50_are_981_to_1():
    assert ddim.timesteps(50).tolist() == list(range(981, 0, -20))


@pytest.mark.parametrize("n", [0, -1, 1000])
def test_timesteps_rejects_out_of_range_counts(n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        ddim.timesteps(n)


def test_alphas_cumprod_match_diffusers():
    ref = sd_scheduler().alphas_cumprod
    assert ddim.alphas_cumprod.dtype == torch.float32 and ddim.alphas_cumprod.shape == (1000,)
    assert rel_err(ddim.alphas_cumprod, ref) < 1e-6
    assert ((ddim.alphas_cumprod.double() - ref.double()).abs() / ref.double()).max() < 2e-6


# Per prediction, the seeds of the model's fixed random part, of the start and of the step noise:
# v (SD 2.x 768-v) draws other values than epsilon, so that the two really are separate cases.
TRAJECTORY_SEEDS = {"epsilon": (0, 1), "v": (8, 9)}  # (model, start and step noise)
SAMPLE_SEEDS = {"epsilon": (2, 3, 4), "v": (10, 11, 12)}  # (model, start, step noise)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("n", [10, 25, 50])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_step_trajectory_matches_diffusers(n, eta, prediction):
    ref = sd_scheduler(prediction)
    ref.set_timesteps(n)
    ts = ddim.timesteps(n).tolist()
    assert ts == ref.timesteps.tolist()
    model_seed, noise_seed = TRAJECTORY_SEEDS[prediction]
    model_fn = random_eps_fn(seed=model_seed)  # eps or v: a fixed random part per timestep plus 0.1 * x
    g = torch.Generator().manual_seed(noise_seed)
    x = x_ref = torch.randn(SHAPE, generator=g)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1  # -1: the final step, to alphas_cumprod[0]
        noise = torch.randn(SHAPE, generator=g)
        x = ddim.step(x, model_fn(x, t), t, t_prev, eta=eta, noise=noise, prediction=prediction)
        x_ref = ref.step(model_fn(x_ref, t), t, x_ref, eta=eta, variance_noise=noise).prev_sample
        assert rel_err(x, x_ref) <= 1e-5, f"step {i} (t={t})"
    if prediction == "v":
        # ... and reading the v output as eps gives another trajectory: the prediction is really used
        eps_read = ddim.step(x_ref, model_fn(x_ref, 981), 981, 961)
        assert rel_err(eps_read, ddim.step(x_ref, model_fn(x_ref, 981), 981, 961, prediction="v")) > 0.01


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sample_matches_diffusers_loop(eta, prediction):
    ref = sd_scheduler(prediction)
    ref.set_timesteps(25)
    model_seed, start_seed, noise_seed = SAMPLE_SEEDS[prediction]
    model_fn = random_eps_fn(seed=model_seed)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(start_seed))
    x_ref, g = x_T, torch.Generator().manual_seed(noise_seed)
    for t in ref.timesteps:
        x_ref = ref.step(model_fn(x_ref, t), t, x_ref, eta=eta, generator=g).prev_sample
    ours = ddim.sample(x_T, model_fn, 25, eta=eta, generator=torch.Generator().manual_seed(noise_seed),
                       prediction=prediction)
    assert rel_err(ours, x_ref) <= 1e-5


def test_step_with_eta_needs_noise():
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="noise"):
        ddim.step(x, x, 981, 961, eta=0.5)


def test_add_noise_matches_diffusers():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = torch.tensor([0, 999])
    assert rel_err(ddim.add_noise(x0, noise, t), sd_scheduler().add_noise(x0, noise, t)) <= 1e-6
    t = torch.randint(0, 1000, (2,), generator=g)
    assert rel_err(ddim.add_noise(x0, noise, t), sd_scheduler().add_noise(x0, noise, t)) <= 1e-6


@pytest.mark.parametrize("n", [10, 50])
def test_invert_then_sample_reconstructs_for_x_independent_eps(n):
    c = {t: torch.randn(SHAPE, generator=torch.Generator().manual_seed(t)) for t in ddim.timesteps(n).tolist()}
    eps_fn = lambda x, t: c[t]  # noqa: E731
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    x_T = ddim.invert(x0, eps_fn, n)
    assert rel_err(x_T, x0) > 0.5  # inversion really moved it to the noisy end
    assert rel_err(ddim.sample(x_T, eps_fn, n), x0) <= 1e-5


def test_invert_then_sample_nearly_reconstructs_for_mildly_x_dependent_eps():
    eps_fn = random_eps_fn(seed=6)  # eps = c(t) + 0.1 * x
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    assert rel_err(ddim.sample(ddim.invert(x0, eps_fn, 50), eps_fn, 50), x0) <= 0.05


def test_timestep_bias_favours_the_noisiest_steps_and_zero_keeps_sds_uniform_draw():
    def draws(bias, n=4000):
        g = torch.Generator().manual_seed(0)
        return torch.cat([ddim.draw_timestep(g, bias) for _ in range(n)])
    g = torch.Generator().manual_seed(0)
    assert torch.equal(draws(0, 50), torch.cat([torch.randint(0, 1000, (1,), generator=g) for _ in range(50)]))
    uniform, biased = draws(0), draws(2.0)
    assert biased.min() >= 0 and biased.max() <= 999
    # density ~ (t / 1000)^2: P(t >= 800) = 1 - 0.8^3 = 0.488, against 0.2 for the uniform draw
    assert abs((biased >= 800).float().mean() - 0.488) < 0.03, (biased >= 800).float().mean()
    assert abs((uniform >= 800).float().mean() - 0.2) < 0.03


# ---------------------------------------------------------------------------- v-prediction (SD 2.x 768-v)

def constant_eps_as_v(c):
    """The v-model equivalent to the x-independent eps model eps(x, t) = c[t]: the v of the (eps, x0)
    that x at t splits into under that eps."""
    def v_fn(x, t):
        a = ddim.alphas_cumprod[t]
        x0 = (x - (1 - a) ** 0.5 * c[t]) / a**0.5
        return a**0.5 * c[t] - (1 - a) ** 0.5 * x0
    return v_fn


def test_v_target_is_diffusers_velocity_and_epsilon_target_is_the_noise():
    g = torch.Generator().manual_seed(13)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    for t in (torch.tensor([0, 999]), torch.tensor([500, 1]), torch.randint(0, 1000, (2,), generator=g)):
        v = ddim.target(x0, noise, t, "v")
        assert v.shape == x0.shape
        assert rel_err(v, sd_scheduler("v").get_velocity(x0, noise, t)) <= 1e-6
        assert torch.equal(ddim.target(x0, noise, t, "epsilon"), noise)
        assert torch.equal(ddim.target(x0, noise, t), noise)  # the default
    # the two samples of a batch get their own timestep's alpha
    t = torch.tensor([10, 900])
    v = ddim.target(x0, noise, t, "v")
    for i in range(2):
        assert torch.allclose(v[i:i + 1], ddim.target(x0[i:i + 1], noise[i:i + 1], t[i:i + 1], "v"))


@pytest.mark.parametrize("t", [0, 1, 500, 981, 999])
def test_split_inverts_the_v_rotation(t):
    g = torch.Generator().manual_seed(14)
    x0, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    x_t = ddim.add_noise(x0, eps, torch.tensor([t, t]))
    v = ddim.target(x0, eps, torch.tensor([t, t]), "v")
    a = ddim.alphas_cumprod[t]
    got_eps, got_x0 = ddim.split(x_t, v, a, "v")
    assert rel_err(got_eps, eps) <= 1e-5 and rel_err(got_x0, x0) <= 1e-5
    # epsilon: the output is eps itself, and x0 follows from x_t (ill-conditioned near t=999: alpha is tiny)
    got_eps, got_x0 = ddim.split(x_t, eps, a, "epsilon")
    assert torch.equal(got_eps, eps)
    assert rel_err(got_x0, x0) <= (1e-5 if t <= 500 else 1e-3)


@pytest.mark.parametrize("n", [10, 50])
def test_v_invert_then_sample_reconstructs_for_a_constant_eps_v_model(n):
    c = {t: torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + t)) for t in ddim.timesteps(n).tolist()}
    v_fn, eps_fn = constant_eps_as_v(c), lambda x, t: c[t]
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(15))
    x_T = ddim.invert(x0, v_fn, n, prediction="v")
    assert rel_err(x_T, x0) > 0.5
    assert rel_err(x_T, ddim.invert(x0, eps_fn, n)) <= 1e-5  # both predictions invert alike
    assert rel_err(ddim.sample(x_T, v_fn, n, prediction="v"), x0) <= 1e-5
    # the sampler, too, cannot tell the v model from the eps model it is equivalent to
    assert rel_err(ddim.sample(x_T, v_fn, n, prediction="v"), ddim.sample(x_T, eps_fn, n)) <= 1e-5


@pytest.mark.parametrize("call", [
    lambda x: ddim.split(x, x, ddim.alphas_cumprod[500], "x"),
    lambda x: ddim.step(x, x, 981, 961, prediction="v_prediction"),
    lambda x: ddim.step(x, x, 981, 961, eta=0.5, noise=x, prediction="sample"),
    lambda x: ddim.invert_step(x, x, -1, 1, "eps"),
    lambda x: ddim.invert(x, lambda y, t: y, 3, prediction="x"),
    lambda x: ddim.sample(x, lambda y, t: y, 3, prediction="x"),
    lambda x: ddim.target(x, x, torch.tensor([1, 2]), "x"),
    lambda x: ddim.check_prediction("V"),
])
def test_unknown_prediction_is_a_value_error_naming_the_choices(call):
    with pytest.raises(ValueError, match=r"prediction must be one of \('epsilon', 'v'\)"):
        call(torch.randn(SHAPE))
    assert ddim.PREDICTIONS == ("epsilon", "v")


def test_old_positional_step_call_keeps_the_epsilon_default():
    eps_fn = random_eps_fn(seed=16)
    ref = sd_scheduler()
    ref.set_timesteps(10)
    ts = ddim.timesteps(10).tolist()
    x = x_ref = torch.randn(SHAPE, generator=torch.Generator().manual_seed(17))
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        eps = eps_fn(x, t)
        old = ddim.step(x, eps, t, t_prev)
        assert torch.equal(old, ddim.step(x, eps, t, t_prev, 0.0, None, "epsilon"))
        x_ref = ref.step(eps_fn(x_ref, t), t, x_ref).prev_sample
        x = old
        assert rel_err(x, x_ref) <= 1e-5, f"step {i} (t={t})"
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(18))
    assert torch.equal(ddim.invert(x0, eps_fn, 5), ddim.invert(x0, eps_fn, 5, prediction="epsilon"))
    assert torch.equal(ddim.sample(x0, eps_fn, 5), ddim.sample(x0, eps_fn, 5, prediction="epsilon"))
    eps = eps_fn(x0, 21)
    assert torch.equal(ddim.invert_step(x0, eps, 1, 21), ddim.invert_step(x0, eps, 1, 21, "epsilon"))
