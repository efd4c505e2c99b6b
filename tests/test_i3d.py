"""i3d.py against an independent implementation, cd-fvd's copy of the VideoGPT/TATS `InceptionI3d`
(installed test-only with `pip install --no-deps cd-fvd==0.1.1`; its loaders, which unpickle and
download, are never called), on random weights in the layout of i3d_pretrained_400.pt; the FVD
preprocessing against a reference written here; the loader's strictness and errors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import i3d
from checkpoint import CheckpointError
from conftest import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")
oracle = pytest.importorskip("cdfvd.third_party.i3d.pytorch_i3d", reason="pip install --no-deps cd-fvd==0.1.1")
TOLERANCE = 1e-4


def smooth_videos(n=2, frames=16, seed=1):
    """[n, 3, frames, 224, 224] in [-1, 1]: noise upsampled from 8x8, so that the features depend on
    structure over many pixels, as with real videos."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n * frames, 3, 8, 8, generator=g)
    x = F.interpolate(coarse, (224, 224), mode="bilinear", align_corners=False) * 2 - 1
    return x.view(n, frames, 3, 224, 224).transpose(1, 2).contiguous()


def random_state_dict(seed=0):
    """Random I3D weights whose BatchNorm statistics are those of the activations they normalise (set
    by one training-mode forward with momentum 1 on random videos), as in a trained network: the
    features neither vanish nor explode over the 20-odd layers, and channels of small variance make
    the epsilon matter. Gains ~U(0.5, 1.5) and biases ~N(0, 0.1), so that no parameter stays at its init."""
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
        model.train()(smooth_videos(n=2, frames=16, seed=seed + 100))
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def weights():
    return random_state_dict()


@pytest.fixture(scope="module")
def ours(weights):
    model = i3d.I3D()
    model.load_state_dict(weights)
    return model.eval()


def test_i3d_matches_cd_fvd_inception_i3d_and_the_check_can_fail(weights, ours, monkeypatch):
    theirs = oracle.InceptionI3d(400, in_channels=3)
    theirs.load_state_dict(weights)
    x = smooth_videos()
    with torch.no_grad():
        expected, got = theirs.eval()(x), ours(x)
    error = rel_err(got, expected)
    print(f"\nI3D features, 2 videos of 16 frames at 224: relative L2 {error:.1e}, std {expected.std():.3g}")
    assert got.shape == (2, 400) and got.dtype == torch.float32
    assert 0.05 < expected.std() < 50  # the random weights neither vanish nor explode
    assert error <= TOLERANCE
    # 25 frames: odd lengths in time ("SAME" pads them otherwise) and 3 time steps left to average
    long_video = smooth_videos(n=1, frames=25, seed=2)
    with torch.no_grad():
        error_25 = rel_err(ours(long_video), theirs(long_video))
    print(f"1 video of 25 frames: relative L2 {error_25:.1e}")
    assert error_25 <= TOLERANCE
    # the comparison can fail: TF's BatchNorm epsilon (1e-3) instead of the conversion's (1e-5) ...
    wrong_eps = i3d.I3D()
    wrong_eps.load_state_dict(weights)
    for module in wrong_eps.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.eps = 1e-3
    with torch.no_grad():
        moved_eps = rel_err(wrong_eps.eval()(x), expected)
    # ... or "SAME" padding with the odd pixel on the near side instead of the far side
    far_side_padding = i3d.pad_same

    def near_side_padding(x, kernel, stride):
        padded = far_side_padding(x, kernel, stride)
        extra = [s - o for s, o in zip(padded.shape[2:], x.shape[2:])]
        return F.pad(x, [p for total in reversed(extra) for p in (total - total // 2, total // 2)])
    monkeypatch.setattr(i3d, "pad_same", near_side_padding)
    with torch.no_grad():
        moved_padding = rel_err(ours(x), expected)
    print(f"with BatchNorm eps 1e-3: {moved_eps:.1e}; with the odd padding pixel first: {moved_padding:.1e}")
    assert moved_eps > 100 * TOLERANCE and moved_padding > 100 * TOLERANCE


def test_state_dict_names_and_shapes_are_cd_fvds():
    ours, theirs = i3d.I3D().state_dict(), oracle.InceptionI3d(400, in_channels=3).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert len(ours) == len(theirs) and "Mixed_4f.b3b.bn.num_batches_tracked" in ours


@pytest.mark.parametrize("height, width", [(240, 320), (333, 250), (90, 400)])
def test_preprocess_stretches_every_frame_to_224_as_cd_fvd(height, width):
    """As TATS's fvd.preprocess and cd-fvd's preprocess_i3d (the oracle, when its module imports): every
    frame to 224x224, non-square ones stretched; and as a frame-by-frame reference written here."""
    videos = np.random.default_rng(height).integers(0, 256, (2, 3, height, width, 3), dtype=np.uint8)
    expected = torch.empty(2, 3, 3, 224, 224)
    for b in range(2):
        for f in range(3):
            frame = torch.tensor(videos[b, f], dtype=torch.float32).permute(2, 0, 1)[None]
            expected[b, :, f] = F.interpolate(frame, (224, 224), mode="bilinear", align_corners=False)[0] * 2 / 255 - 1
    got = i3d.preprocess(videos)
    assert got.shape == (2, 3, 3, 224, 224) and got.dtype == torch.float32
    assert (got - expected).abs().max() <= 1e-5
    assert torch.equal(i3d.preprocess(torch.from_numpy(videos)), got)
    utils = pytest.importorskip("cdfvd.third_party.i3d.utils", reason="cd-fvd's utils import requests and tqdm")
    assert (got - utils.preprocess_i3d(videos)).abs().max() <= 1e-5


@pytest.mark.parametrize("side", [64, 100])
def test_preprocess_of_a_square_video_is_a_plain_resize_to_224(side):
    videos = np.random.default_rng(side).integers(0, 256, (1, 2, side, side, 3), dtype=np.uint8)
    frames = torch.from_numpy(videos[0]).permute(0, 3, 1, 2).float()
    expected = F.interpolate(frames, (224, 224), mode="bilinear", align_corners=False) / 255 * 2 - 1
    assert (i3d.preprocess(videos)[0].transpose(0, 1) - expected).abs().max() <= 1e-6


def test_preprocess_maps_0_and_255_to_the_ends_of_minus_1_to_1():
    videos = np.zeros((2, 1, 30, 40, 3), np.uint8)
    videos[1] = 255
    got = i3d.preprocess(videos)  # the resize's weights may sum to 1 - 1 ulp
    assert torch.allclose(got[0], torch.tensor(-1.0), atol=1e-6)
    assert torch.allclose(got[1], torch.tensor(1.0), atol=1e-6)


def test_preprocess_refuses_what_is_not_uint8_videos_with_3_channels():
    for bad in (np.zeros((1, 16, 32, 32, 3), np.float32), np.zeros((16, 32, 32, 3), np.uint8),
                np.zeros((1, 16, 3, 32, 32), np.uint8)):
        with pytest.raises(ValueError, match=r"uint8 videos \[B, F, H, W, 3\]"):
            i3d.preprocess(bad)


def test_forward_refuses_fewer_than_9_frames_and_sizes_other_than_224():
    model = i3d.I3D().eval()
    with pytest.raises(ValueError, match="at least 9 frames"):
        model(torch.zeros(1, 3, 8, 224, 224))
    with pytest.raises(ValueError, match=r"\[B, 3, F, 224, 224\]"):
        model(torch.zeros(1, 3, 16, 112, 112))


def test_features_in_batches_equal_one_forward_of_all(ours):
    videos = np.random.default_rng(0).integers(0, 256, (3, 9, 40, 48, 3), dtype=np.uint8)
    with torch.no_grad():
        direct = ours(i3d.preprocess(videos)).double().numpy()

    class Shown:
        def __init__(self):
            self.counts = []

        def show(self, done):
            self.counts.append(done)

    shown = Shown()
    one_by_one, all_at_once = i3d.features(ours, videos, batch_size=1, progress=shown), i3d.features(ours, videos, 3)
    assert one_by_one.shape == (3, 400) and one_by_one.dtype == np.float64 and shown.counts == [1, 2, 3]
    scale = np.abs(direct).max()
    assert np.abs(all_at_once - direct).max() <= 1e-6 * scale
    assert np.abs(one_by_one - direct).max() <= 1e-5 * scale  # float32 kernels vary with the batch size


def test_load_i3d_loads_safetensors_and_torch_files_strictly(weights, tmp_path):
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp_path / "i3d.safetensors")
    torch.save(weights, tmp_path / "i3d_pretrained_400.pt")
    for name in ("i3d.safetensors", "i3d_pretrained_400.pt"):
        loaded = i3d.load_i3d(str(tmp_path / name), dtype=torch.float64)
        assert not loaded.training and loaded.logits.conv3d.weight.dtype == torch.float64
        assert all(torch.equal(loaded.state_dict()[k].float(), v.float()) for k, v in weights.items())
    ten_classes = dict(weights, **{"logits.conv3d.weight": torch.randn(10, 1024, 1, 1, 1),
                                   "logits.conv3d.bias": torch.randn(10)})
    torch.save(ten_classes, tmp_path / "ten.pt")
    assert i3d.load_i3d(str(tmp_path / "ten.pt")).logits.conv3d.out_channels == 10


def test_load_i3d_takes_files_without_the_batch_norm_counters_but_nothing_else_missing(weights, tmp_path):
    counters = [k for k in weights if k.endswith(".num_batches_tracked")]
    assert len(counters) == 57
    torch.save({k: v for k, v in weights.items() if k not in counters}, tmp_path / "old.pt")  # a pre-0.4.1 file
    loaded = i3d.load_i3d(str(tmp_path / "old.pt"))
    assert all(torch.equal(loaded.state_dict()[k].float(), v.float()) for k, v in weights.items() if k not in counters)
    x = torch.rand(1, 3, 9, i3d.SIZE, i3d.SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.save(weights, tmp_path / "full.pt")
    full = i3d.load_i3d(str(tmp_path / "full.pt"))
    with torch.no_grad():
        assert torch.equal(loaded(x), full(x))
    without_a_statistic = {k: v for k, v in weights.items() if k not in counters and k != "Mixed_3b.b0.bn.running_mean"}
    torch.save(without_a_statistic, tmp_path / "torn.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: Mixed_3b.b0.bn.running_mean$"):
        i3d.load_i3d(str(tmp_path / "torn.pt"))


def test_load_i3d_lists_what_another_models_weights_lack(weights, tmp_path):
    save_file({"a.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError,
                       match=r"i3d_pretrained_400.pt.*missing keys: Conv3d_1a_7x7.*unexpected keys: a.weight"):
        i3d.load_i3d(str(tmp_path / "other.safetensors"))
    wrong = dict(weights, **{"Mixed_5c.b0.conv3d.weight": torch.zeros(384, 831, 1, 1, 1)})
    del wrong["Mixed_4b.b1a.bn.running_var"]
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: Mixed_4b.b1a.bn.running_var.*shape mismatch at "
                                              r"Mixed_5c.b0.conv3d.weight"):
        i3d.load_i3d(str(tmp_path / "wrong.pt"))


class NotATensor:
    pass


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_load_i3d_refuses_pickled_objects_and_torchscript(tmp_path):
    torch.save({"logits.conv3d.bias": torch.zeros(400), "hook": NotATensor()}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):  # weights_only refuses the class
        i3d.load_i3d(str(tmp_path / "pickled.pt"))
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "i3d_torchscript.pt"))
    with pytest.raises(CheckpointError, match="TorchScript archive, not the expected layout: need the I3D state dict "
                                              "i3d_pretrained_400.pt"):
        i3d.load_i3d(str(tmp_path / "i3d_torchscript.pt"))
