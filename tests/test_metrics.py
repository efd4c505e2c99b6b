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
