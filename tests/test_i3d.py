"""i3d.py against an independent implementation: cd-fvd's copy of the VideoGPT/TATS `InceptionI3d`
(installed test-only with --no-deps; its loaders, which unpickle and download, are never called),
on random weights in the layout of i3d_pretrained_400.pt; the FVD preprocessing against a reference
written here; and the loader's errors."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import i3d
from checkpoint import CheckpointError
from conftest import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")
oracle = pytest.importorskip("cdfvd.third_party.i3d.pytorch_i3d", reason="pip install --no-deps cd-fvd==0.1.1")


def random_videos(n=2, frames=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n * frames, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(coarse, (224, 224), mode="bilinear") * 2 - 1
    return x.view(n, frames, 3, 224, 224).transpose(1, 2)


def random_state_dict(seed=0):
    """Random I3D weights whose BatchNorm statistics are those of the activations they normalise (one
    forward in training mode with momentum 1 on random videos), as in a trained network: the features
    neither vanish nor explode over the 20-odd layers, and low-variance channels make the epsilon matter."""
    torch.manual_seed(seed)
    model = i3d.I3D()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bn.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.momentum = 1.0
    with torch.no_grad():
        model.train()(random_videos(n=2, frames=16, seed=seed + 100))
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def weights():
    return random_state_dict()


def test_i3d_matches_the_videogpt_inception_i3d(weights):
    theirs = oracle.InceptionI3d(400, in_channels=3)
    theirs.load_state_dict(weights)
    ours = i3d.I3D()
    ours.load_state_dict(weights)
    x = random_videos()
    with torch.no_grad():
        expected, got = theirs.eval()(x), ours.eval()(x)
    error = rel_err(got, expected)
    print(f"I3D features, 2 videos of 16 frames at 224: relative L2 {error:.1e}, std {expected.std():.3g}")
    assert got.shape == (2, 400) and 0.01 < expected.std() < 1e4
    assert error <= 1e-4
    # the check can fail: TF's BatchNorm epsilon instead of the conversion's
    for module in ours.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.eps = 1e-3
    with torch.no_grad():
        moved = rel_err(ours(x), expected)
    print(f"the same with BatchNorm eps 1e-3: {moved:.1e}")
    assert moved > 100 * 1e-4


def test_state_dict_is_the_videogpt_layout():
    ours, theirs = i3d.I3D().state_dict(), oracle.InceptionI3d(400, in_channels=3).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.parametrize("height, width", [(240, 320), (64, 64), (333, 250)])
def test_preprocess_is_tats_resize_to_224(height, width):
    """As TATS's fvd.preprocess (and cd-fvd's preprocess_i3d): every frame stretched to 224x224."""
    video = np.random.default_rng(height).integers(0, 256, (2, 3, height, width, 3), dtype=np.uint8)
    got = i3d.preprocess(video)
    assert got.shape == (2, 3, 3, 224, 224) and got.dtype == torch.float32
    assert -1 <= got.min() and got.max() <= 1
    utils = pytest.importorskip("cdfvd.third_party.i3d.utils", reason="cd-fvd's preprocess_i3d needs requests, tqdm")
    assert torch.allclose(got, utils.preprocess_i3d(video), atol=1e-6)


def test_features_in_batches_equal_one_call(weights):
    model = i3d.I3D()
    model.load_state_dict(weights)
    model.eval()
    videos = np.random.default_rng(0).integers(0, 256, (3, 9, 40, 40, 3), dtype=np.uint8)
    one, batched = i3d.features(model, videos, batch_size=3), i3d.features(model, videos, batch_size=1)
    assert one.shape == (3, 400) and one.dtype == np.float64
    assert np.abs(one - batched).max() <= 1e-5 * np.abs(one).max()  # float32 kernels per batch size


def test_bad_input_and_files_get_clear_errors(weights, tmp_path):
    model = i3d.I3D().eval()
    with pytest.raises(ValueError, match="at least 9 frames"):
        model(torch.zeros(1, 3, 8, 224, 224))
    with pytest.raises(ValueError, match="224, 224"):
        model(torch.zeros(1, 3, 16, 112, 112))
    with pytest.raises(ValueError, match="uint8"):
        i3d.preprocess(np.zeros((1, 16, 32, 32, 3), np.float32))
    save_file({"a.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not the I3D"):
        i3d.load_i3d(str(tmp_path / "other.safetensors"))
    broken = {k: v for k, v in weights.items() if not k.startswith("Mixed_5c.b0.")}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="missing.*Mixed_5c.b0"):
        i3d.load_i3d(str(tmp_path / "broken.pt"))
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # a pickled module, not tensors
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        i3d.load_i3d(str(tmp_path / "pickled.pt"))
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp_path / "i3d.safetensors")
    loaded = i3d.load_i3d(str(tmp_path / "i3d.safetensors"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in weights.items())
