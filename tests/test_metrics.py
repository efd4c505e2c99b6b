"""metrics.py: PSNR, SSIM and flicker of videos against their truth, each checked against a formula
written out here independently (SSIM through scipy's Gaussian filter), and on cases with known answers."""
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

import metrics


def videos(seed=0, shape=(2, 3, 24, 20, 3)):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 256, shape).astype(np.uint8)
    noisy = np.clip(truth + rng.normal(0, 12, shape), 0, 255).astype(np.uint8)
    return noisy, truth


def ssim_reference(x, y):
    """SSIM of one grey image pair: Gaussian statistics (sigma 1.5, 11 taps), kept where the window fits."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    blur = lambda z: gaussian_filter(z, 1.5, truncate=3.5, mode="constant")[5:-5, 5:-5]  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean()


def test_psnr_is_the_formula_per_video():
    noisy, truth = videos()
    for i in range(2):
        mse = ((noisy[i].astype(np.float64) - truth[i]) ** 2).mean()
        assert metrics.psnr(noisy, truth)[i] == pytest.approx(10 * np.log10(255 ** 2 / mse), rel=1e-12)


def test_ssim_matches_the_gaussian_filter_formula_per_channel_and_frame():
    noisy, truth = videos()
    got = metrics.ssim(noisy, truth)
    for i in range(2):
        want = np.mean([ssim_reference(noisy[i, f, :, :, c], truth[i, f, :, :, c]) for f in range(3) for c in range(3)])
        assert got[i] == pytest.approx(want, abs=1e-10)
    assert metrics.ssim(truth, truth) == pytest.approx([1.0, 1.0])
    noisier = np.clip(truth + np.random.default_rng(1).normal(0, 40, truth.shape), 0, 255).astype(np.uint8)
    assert (metrics.ssim(noisier, truth) < got).all() and (got < 1).all()  # more noise, less similar


def test_flicker_counts_changes_between_frames_that_the_truth_does_not_make():
    noisy, truth = videos()
    assert metrics.flicker(truth, truth) == pytest.approx([0, 0])
    # the same error in every frame: a steady video, however wrong
    truth = (truth // 2 + 60).astype(np.uint8)  # 60..187: room for the error
    steady = truth.copy()
    steady[:, :, :10] += 60
    assert metrics.flicker(steady, truth) == pytest.approx([0, 0])
    assert (metrics.psnr(steady, truth) < 20).all()
    # an error that changes from frame to frame: flicker of its mean change
    jitter = truth.astype(np.int64)
    jitter[:, 1] = np.clip(jitter[:, 1] + 10, 0, 255)
    want = np.abs(np.diff(jitter[0].astype(float), axis=0) - np.diff(truth[0].astype(float), axis=0)).mean()
    assert metrics.flicker(jitter.astype(np.uint8), truth)[0] == pytest.approx(want)
    assert want > 5


def test_bad_shapes_are_clear_errors():
    noisy, truth = videos()
    with pytest.raises(ValueError, match="one shape"):
        metrics.psnr(noisy[:, :2], truth)
    with pytest.raises(ValueError, match="at least 2 frames"):
        metrics.flicker(noisy[:, :1], truth[:, :1])


def frechet_by_svd(a, b):
    """The Frechet distance written another way: tr sqrt(S1^1/2 S2 S1^1/2) is the nuclear norm (the sum of
    singular values) of S1^1/2 S2^1/2, each root from an SVD of the symmetric covariance."""
    def root(s):
        u, values, _ = np.linalg.svd(s)
        return (u * np.sqrt(values)) @ u.T

    ca, cb = np.cov(a.T), np.cov(b.T)
    nuclear = np.linalg.svd(root(ca) @ root(cb), compute_uv=False).sum()
    return ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * nuclear


def test_frechet_distance_matches_a_direct_formula():
    g = np.random.default_rng(0)
    mix = g.normal(size=(24, 24))
    a = g.normal(size=(300, 24)) @ mix
    b = 0.8 * g.normal(size=(200, 24)) @ (mix + 0.3 * g.normal(size=(24, 24))) + 0.5
    ours, direct = metrics.frechet_distance(a, b), frechet_by_svd(a, b)
    assert abs(ours - direct) <= 1e-9 * direct
    assert abs(metrics.frechet_distance(a, a)) < 1e-8 * np.trace(np.cov(a.T))
    # fewer videos than features: singular covariances, still real and finite
    assert np.isfinite(metrics.frechet_distance(a[:10], b[:12]))
    assert abs(metrics.frechet_distance(a[:10], b[:12]) - frechet_by_svd(a[:10], b[:12])) < 1e-6 * frechet_by_svd(a[:10], b[:12])


def test_frechet_distance_of_diagonal_gaussians_has_its_closed_form():
    """Sets whose sample covariances are exactly diagonal: FD = |mu1 - mu2|^2 + sum (sigma1 - sigma2)^2."""
    g = np.random.default_rng(1)
    n, d = 64, 5

    def white(seed_matrix):  # n samples of d features: mean exactly 0, unbiased covariance exactly I
        centred = seed_matrix - seed_matrix.mean(0)
        return np.linalg.qr(centred)[0] * np.sqrt(n - 1)

    sa, sb = np.array([1.0, 2.0, 0.5, 3.0, 1.5]), np.array([2.0, 1.0, 0.5, 1.0, 4.0])
    ma, mb = g.normal(size=d), g.normal(size=d)
    a, b = white(g.normal(size=(n, d))) * sa + ma, white(g.normal(size=(n, d))) * sb + mb
    assert np.allclose(np.cov(a.T), np.diag(sa ** 2)) and np.allclose(np.cov(b.T), np.diag(sb ** 2))
    expected = ((ma - mb) ** 2).sum() + ((sa - sb) ** 2).sum()
    assert abs(metrics.frechet_distance(a, b) - expected) < 1e-9


def test_frechet_distance_refuses_sets_without_a_covariance():
    with pytest.raises(ValueError, match="at least 2 videos"):
        metrics.frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="one width"):
        metrics.frechet_distance(np.zeros((3, 4)), np.zeros((3, 5)))
