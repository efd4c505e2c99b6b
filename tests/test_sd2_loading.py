"""Stable Diffusion 2.x: telling the family of a checkpoint (single file or diffusers folder) and
refusing the ones we do not support, choosing what the UNet predicts (epsilon or v) and saying why,
refusing adapters trained on another family, and training and sampling an SD 2.x end to end with
the v target."""
import contextlib
import dataclasses
import io
import json
import os
import shutil

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import checkpoint
import data
import ddim
import loader
import sample
import simda
import train
import unet as unet_module
import vae as vae_module
from adapters import SimDAConfig, is_adapter_key
from checkpoint import SD1, SD2, CheckpointError, choose_prediction, folder_family, ldm_state_dict
from conftest import perturb_adapters_, rel_err
from reference import diffusers_unet, diffusers_vae, save_diffusers_folder, transformers_clip
from test_data import captioned
from test_loading import outputs
from vae import LATENT_SCALE
from video import stack_clips

NO_CLUE = ("assuming v", "--prediction epsilon")  # what the reason says when nothing tells the prediction
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: one thread, as test_train.py runs


@pytest.fixture(scope="module")
def sd2_state_dict(tiny_sd2_checkpoint):
    return checkpoint.read_state_dict(tiny_sd2_checkpoint)


@pytest.fixture(scope="module")
def sd2_pipe(tiny_sd2_checkpoint):
    return simda.load_pipeline(tiny_sd2_checkpoint)


def linked(source, folder, name):
    """`source` under another name (a hard link, else a copy): the same weights, another file name."""
    path = os.path.join(str(folder), name)
    try:
        os.link(source, path)
    except OSError:
        shutil.copy(source, path)
    return path


def expect_error(path, *fragments, error=CheckpointError, **kwargs):
    with pytest.raises(error) as info:
        simda.load_pipeline(path, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    return str(info.value)


# ---------------------------------------------------------------------------- the family of a single file

def test_sd1_file_loads_as_sd1_predicting_epsilon(tiny_checkpoint, tiny_models):
    pipe = simda.load_pipeline(tiny_checkpoint)
    assert (pipe.family, pipe.prediction, pipe.prediction_source) == ("SD 1.x", "epsilon", "as SD 1.x models do")
    assert pipe.tokenizer.pad_id == 49407 and pipe.text_encoder.config.hidden_act == "quick_gelu"
    assert not pipe.unet.config.use_linear_in_transformer and not pipe.unet.config.upcast_attention
    assert pipe.unet.config.num_heads == 8 and pipe.unet.config.num_head_channels == -1


def test_sd2_file_loads_with_the_sd2_rules(sd2_pipe, tiny_sd2_models, tiny_sd2_checkpoint, sd2_state_dict):
    pipe = sd2_pipe
    assert pipe.family == "SD 2.x" == SD2.name
    assert pipe.prediction == "v"  # tiny-sd2.safetensors says nothing
    assert all(fragment in pipe.prediction_source for fragment in NO_CLUE), pipe.prediction_source
    # what no weight's shape tells: OpenCLIP pads with 0 and uses the exact GELU; 64-channel UNet heads,
    # linear projections (that one is in the shapes) and attention upcast to float32
    assert pipe.tokenizer.pad_id == 0
    ids = pipe.tokenizer(["a photo of a cat"])[0]
    assert ids[:8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0] and (ids[7:] == 0).all()
    assert pipe.text_encoder.config.hidden_act == "gelu"
    assert pipe.text_encoder.config == tiny_sd2_models[0].config
    assert pipe.unet.config.use_linear_in_transformer and pipe.unet.config.upcast_attention
    assert (pipe.unet.config.num_heads, pipe.unet.config.num_head_channels) == (-1, 64)
    assert pipe.unet.config == tiny_sd2_models[2].config and pipe.vae.config == tiny_sd2_models[1].config
    # every key of the file is consumed (OpenCLIP's unused last layer and projection aside) and round-trips
    assert ldm_state_dict(pipe.text_encoder, pipe.vae, pipe.unet).keys() == sd2_state_dict.keys()
    for ours, expected in zip(outputs(pipe.text_encoder, pipe.vae, pipe.unet), outputs(*tiny_sd2_models)):
        assert torch.equal(ours, expected)


def test_sdxl_file_is_refused_before_its_tensors_are_read(tmp_path, monkeypatch):
    path = str(tmp_path / "sd_xl_base_1.0.safetensors")
    save_file({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 2),
               "conditioner.embedders.1.model.token_embedding.weight": torch.zeros(4, 2),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3),
               "model.diffusion_model.out.2.bias": torch.zeros(4),
               "first_stage_model.quant_conv.bias": torch.zeros(8)}, path)

    def no_reading(*args, **kwargs):
        raise AssertionError("the tensors were read")
    monkeypatch.setattr(checkpoint, "read_tensors", no_reading)
    monkeypatch.setattr(checkpoint.torch, "load", no_reading)
    expect_error(path, "SDXL", "not supported", "sd_xl_base_1.0.safetensors")


def test_sdxl_pickle_is_refused_too(tmp_path):
    path = str(tmp_path / "sdxl.ckpt")
    torch.save({"state_dict": {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(2),
                               "model.diffusion_model.out.2.bias": torch.zeros(4)}}, path)
    expect_error(path, "SDXL", "not supported")


def test_a_state_dict_of_something_else_is_not_a_stable_diffusion_checkpoint(tmp_path, tiny_sd2_models):
    path = str(tmp_path / "random.safetensors")
    save_file({"encoder.layers.0.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, path)
    message = expect_error(path, "not a Stable Diffusion checkpoint")
    assert checkpoint.TEXT_PREFIX in message and checkpoint.OPEN_CLIP_PREFIX in message
    # a UNet alone has no text encoder to tell its family
    save_file({checkpoint.UNET_PREFIX + k: v for k, v in tiny_sd2_models[2].state_dict().items()}, path)
    expect_error(path, "not a Stable Diffusion checkpoint")


@pytest.mark.parametrize("text_family", ["SD 2.x", "SD 1.x"])
def test_a_text_encoder_and_unet_of_different_widths_are_refused_before_the_unet_is_built(
        tmp_path, monkeypatch, tiny_models, tiny_sd2_models, text_family):
    """An SD 2.x text encoder (OpenCLIP keys) with an SD 1.x UNet, or the other way round: the UNet
    attends to text states of another width. Said plainly, before the UNet is allocated."""
    if text_family == "SD 2.x":
        text, vae = tiny_sd2_models[0], tiny_sd2_models[1]
        config = dataclasses.replace(unet_module.UNetConfig.tiny(), context_dim=96)  # an SD 1.x UNet
    else:
        text, vae = tiny_models[0], tiny_models[1]
        config = dataclasses.replace(tiny_sd2_models[2].config, context_dim=96)  # an SD 2.x UNet
    other_unet = unet_module.UNet(config)
    assert text.config.width == 128
    path = str(tmp_path / "mixed.safetensors")
    save_file(ldm_state_dict(text, vae, other_unet), path)
    assert checkpoint.family_of(checkpoint.safetensors_header(path)[0], path).name == text_family

    def no_unet(*args, **kwargs):
        raise AssertionError("the UNet was allocated")
    monkeypatch.setattr(unet_module.UNet, "__init__", no_unet)
    expect_error(path, f"its {text_family} text encoder is 128 wide", "96-wide text states", "not one model")


# ---------------------------------------------------------------------------- diffusers folders

@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory, tiny_sd2_models):
    """The tiny SD 2.x as a Hub folder written by diffusers and transformers (no scheduler/ yet)."""
    folder = str(tmp_path_factory.mktemp("sd2-folder"))
    text_encoder, vae, unet = tiny_sd2_models
    save_diffusers_folder(folder, transformers_clip(text_encoder), diffusers_vae(vae), diffusers_unet(unet))
    return folder


def folder_with_scheduler(sd2_folder, where, scheduler):
    """A folder whose model parts are sd2_folder's (links) and whose scheduler config is `scheduler`."""
    folder = os.path.join(str(where), "sd2")
    os.makedirs(os.path.join(folder, "scheduler"))
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        os.symlink(os.path.join(sd2_folder, part), os.path.join(folder, part))
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", **scheduler}, f)
    return folder


def test_sd2_diffusers_folder_is_sd2(sd2_folder, tiny_sd2_models):
    with open(os.path.join(sd2_folder, "text_encoder", "config.json")) as f:
        assert json.load(f)["hidden_act"] == "gelu"
    assert folder_family(sd2_folder) is SD2
    pipe = simda.load_pipeline(sd2_folder)
    assert (pipe.family, pipe.prediction) == ("SD 2.x", "v")
    assert all(fragment in pipe.prediction_source for fragment in NO_CLUE), pipe.prediction_source
    assert pipe.tokenizer.pad_id == 0 and pipe.text_encoder.config.hidden_act == "gelu"
    assert pipe.unet.config.use_linear_in_transformer and pipe.unet.config.upcast_attention
    for ours, expected in zip(outputs(pipe.text_encoder, pipe.vae, pipe.unet), outputs(*tiny_sd2_models)):
        assert torch.equal(ours, expected)


def test_sd1_diffusers_folder_is_sd1(tmp_path, tiny_models):
    text_encoder, vae, unet = tiny_models
    save_diffusers_folder(str(tmp_path), transformers_clip(text_encoder), diffusers_vae(vae), diffusers_unet(unet))
    assert folder_family(str(tmp_path)) is SD1
    pipe = simda.load_pipeline(tmp_path)
    assert (pipe.family, pipe.prediction, pipe.tokenizer.pad_id) == ("SD 1.x", "epsilon", 49407)


def test_folder_with_a_second_text_encoder_is_sdxl(tmp_path, sd2_folder):
    folder = folder_with_scheduler(sd2_folder, tmp_path, {"prediction_type": "epsilon"})
    os.symlink(os.path.join(sd2_folder, "text_encoder"), os.path.join(folder, "text_encoder_2"))
    with pytest.raises(CheckpointError, match="SDXL folder .*text_encoder_2/.*SDXL is not supported"):
        folder_family(folder)
    expect_error(folder, "SDXL", "text_encoder_2/")


@pytest.mark.parametrize("said, prediction", [("v_prediction", "v"), ("epsilon", "epsilon")])
def test_folder_scheduler_config_says_the_prediction(tmp_path, sd2_folder, said, prediction):
    pipe = simda.load_pipeline(folder_with_scheduler(sd2_folder, tmp_path, {"prediction_type": said}))
    assert (pipe.family, pipe.prediction) == ("SD 2.x", prediction)
    assert pipe.prediction_source == f"scheduler/scheduler_config.json says {said}"
    # the user's word beats the folder's
    other = {"v": "epsilon", "epsilon": "v"}[prediction]
    pipe = simda.load_pipeline(os.path.join(str(tmp_path), "sd2"), prediction=other)
    assert (pipe.prediction, pipe.prediction_source) == (other, "as asked")


def test_folder_scheduler_with_an_unsupported_prediction_is_refused(tmp_path, sd2_folder):
    folder = folder_with_scheduler(sd2_folder, tmp_path, {"prediction_type": "sample"})
    expect_error(folder, "scheduler/scheduler_config.json", "'sample'", "--prediction")


# ---------------------------------------------------------------------------- choosing the prediction

@pytest.mark.parametrize("path, family, facts, expected, why", [
    # the checkpoint's own word
    ("stable-diffusion-2-1", SD2, {"scheduler_config": {"prediction_type": "v_prediction"}}, "v",
     "scheduler/scheduler_config.json says v_prediction"),
    ("stable-diffusion-2-1-base", SD2, {"scheduler_config": {"prediction_type": "epsilon"}}, "epsilon",
     "scheduler/scheduler_config.json says epsilon"),
    ("v2-1_768-ema-pruned.safetensors", SD2, {"metadata": {"modelspec.prediction_type": "epsilon"}}, "epsilon",
     "the file's metadata (modelspec.prediction_type) says epsilon"),
    ("512-base-ema.safetensors", SD2, {"metadata": {"modelspec.prediction_type": "v"}}, "v", "metadata"),
    ("model.safetensors", SD2, {"metadata": {"ss_v_parameterization": "true"}}, "v", "ss_v_parameterization"),
    ("model.safetensors", SD2, {"scheduler_config": {"prediction_type": "epsilon"},
                                "metadata": {"modelspec.prediction_type": "v"}}, "epsilon", "scheduler_config.json"),
    ("sd1-v.safetensors", SD1, {"metadata": {"modelspec.prediction_type": "v"}}, "v", "says v"),
    # the official SD 2.x file names
    ("v2-1_768-ema-pruned.safetensors", SD2, {"metadata": {}}, "v", "768"),
    ("/checkpoints/768-v-ema.ckpt", SD2, {}, "v", "768"),
    ("v2-1_512-ema-pruned.safetensors", SD2, {"metadata": {}}, "epsilon", "512"),
    ("512-base-ema.safetensors", SD2, {"metadata": {}}, "epsilon", "512"),
    ("stable-diffusion-2-1-base", SD2, {}, "epsilon", "base"),
    # SD 2.0-base's step count
    ("model.ckpt", SD2, {"global_step": 875000}, "epsilon", "875000"),
    # nothing: v, saying how to override
    ("model.ckpt", SD2, {"global_step": 140000}, "v", "--prediction epsilon"),
    ("tiny.safetensors", SD2, {"metadata": {"format": "pt"}}, "v", "--prediction epsilon"),
    # SD 1.x is epsilon whatever its name
    ("v2-1_768-ema-pruned.safetensors", SD1, {"metadata": {}}, "epsilon", "SD 1.x"),
    ("768-v-ema.ckpt", SD1, {"global_step": 1}, "epsilon", "SD 1.x"),
])
def test_choose_prediction(path, family, facts, expected, why):
    prediction, reason = choose_prediction(path, family, facts)
    assert prediction == expected and why in reason, reason


def test_choose_prediction_the_users_word_wins_and_is_checked():
    said = {"scheduler_config": {"prediction_type": "v_prediction"}, "metadata": {"modelspec.prediction_type": "v"}}
    assert choose_prediction("v2-1_768-ema-pruned.safetensors", SD2, said, "epsilon") == ("epsilon", "as asked")
    assert choose_prediction("v1-5.safetensors", SD1, {}, "v") == ("v", "as asked")
    for bad in ("x", "v_prediction", "eps"):
        with pytest.raises(ValueError, match=r"prediction must be one of \('epsilon', 'v'\)"):
            choose_prediction("model.safetensors", SD2, {}, bad)


@pytest.mark.parametrize("facts, source", [
    ({"scheduler_config": {"prediction_type": "sample"}}, "scheduler/scheduler_config.json"),
    ({"metadata": {"modelspec.prediction_type": "flow"}}, "modelspec.prediction_type"),
])
def test_choose_prediction_refuses_what_we_do_not_support(facts, source):
    with pytest.raises(CheckpointError) as info:
        choose_prediction("model.safetensors", SD2, facts)
    assert source in str(info.value) and "--prediction" in str(info.value)
    assert choose_prediction("model.safetensors", SD2, facts, "v") == ("v", "as asked")  # unless overridden


@pytest.mark.parametrize("name, expected", [
    ("v2-1_768-ema-pruned.safetensors", "v"),
    ("v2-1_512-ema-pruned.safetensors", "epsilon"),
    ("512-base-ema.safetensors", "epsilon"),
])
def test_sd2_file_names_tell_the_prediction(tmp_path, tiny_sd2_checkpoint, name, expected):
    pipe = simda.load_pipeline(linked(tiny_sd2_checkpoint, tmp_path, name))
    assert (pipe.family, pipe.prediction) == ("SD 2.x", expected)
    assert "named" in pipe.prediction_source


def test_sd2_metadata_and_step_count_tell_the_prediction(tmp_path, sd2_state_dict):
    path = str(tmp_path / "v2-1_768-ema-pruned.safetensors")  # the metadata beats the name
    save_file(sd2_state_dict, path, metadata={"modelspec.prediction_type": "epsilon"})
    assert checkpoint.read_checkpoint(path)[1]["metadata"] == {"modelspec.prediction_type": "epsilon"}
    pipe = simda.load_pipeline(path)
    assert (pipe.prediction, pipe.prediction_source) == \
        ("epsilon", "the file's metadata (modelspec.prediction_type) says epsilon")

    path = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": sd2_state_dict, "global_step": 875000}, path)
    assert checkpoint.read_checkpoint(path)[1] == {"global_step": 875000}
    pipe = simda.load_pipeline(path)
    assert (pipe.family, pipe.prediction) == ("SD 2.x", "epsilon") and "875000" in pipe.prediction_source


def test_sd2_override_and_bad_prediction(tiny_sd2_checkpoint):
    pipe = simda.load_pipeline(tiny_sd2_checkpoint, prediction="epsilon")
    assert (pipe.family, pipe.prediction, pipe.prediction_source) == ("SD 2.x", "epsilon", "as asked")
    with pytest.raises(ValueError, match=r"prediction must be one of \('epsilon', 'v'\), got 'x'"):
        simda.load_pipeline(tiny_sd2_checkpoint, prediction="x")


def test_sd1_files_predict_epsilon_whatever_their_name(tmp_path, tiny_checkpoint):
    pipe = simda.load_pipeline(linked(tiny_checkpoint, tmp_path, "v2-1_768-ema-pruned.safetensors"))
    assert (pipe.family, pipe.prediction) == ("SD 1.x", "epsilon")


# ---------------------------------------------------------------------------- adapters of one family only

@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory, tiny_checkpoint, tiny_sd2_checkpoint):
    """{family: adapter file} for each tiny model, saved as train.py saves them (family and prediction
    in the metadata), every adapter weight off zero; and "old": SD 1.x adapters without a family."""
    folder = tmp_path_factory.mktemp("adapters")
    files = {}
    for family, ckpt in (("SD 1.x", tiny_checkpoint), ("SD 2.x", tiny_sd2_checkpoint)):
        pipe = simda.load_pipeline(ckpt, simda_config=SimDAConfig())
        perturb_adapters_(pipe.unet, seed=4)
        files[family] = str(folder / f"{family[3]}.safetensors")
        simda.save_adapters(pipe.unet, files[family], family=family, prediction=pipe.prediction, checkpoint=ckpt,
                            frames=2, height=16, width=16)
        if family == "SD 1.x":
            files["old"] = str(folder / "old.safetensors")
            simda.save_adapters(pipe.unet, files["old"], checkpoint=ckpt)
    return files


def test_adapters_load_onto_their_own_family(adapter_files, tiny_checkpoint, tiny_sd2_checkpoint):
    for family, ckpt in (("SD 1.x", tiny_checkpoint), ("SD 2.x", tiny_sd2_checkpoint), ("old", tiny_checkpoint)):
        weights, meta = simda.read_adapters(adapter_files[family])
        assert meta.get("family") == (None if family == "old" else family)
        pipe = simda.load_pipeline(ckpt, adapters=adapter_files[family])
        loaded = {k: v for k, v in pipe.unet.state_dict().items() if is_adapter_key(k)}
        assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)


@pytest.mark.parametrize("adapters_family, ckpt_family", [("SD 2.x", "SD 1.x"), ("SD 1.x", "SD 2.x")])
def test_adapters_of_another_family_are_refused(adapter_files, tiny_checkpoint, tiny_sd2_checkpoint,
                                                adapters_family, ckpt_family):
    ckpt = tiny_checkpoint if ckpt_family == "SD 1.x" else tiny_sd2_checkpoint
    message = expect_error(ckpt, f"trained on {adapters_family}", f"is {ckpt_family}",
                           adapters=adapter_files[adapters_family])
    assert adapter_files[adapters_family] in message and ckpt in message


# ---------------------------------------------------------------------------- training and sampling SD 2.x

def test_make_inputs_regresses_v_on_a_v_model_and_the_noise_on_an_epsilon_model(tiny_sd2_checkpoint):
    pipe = simda.load_pipeline(tiny_sd2_checkpoint, simda_config=SimDAConfig())
    assert pipe.prediction == "v"
    clip = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1  # [F, C, H, W]
    batch, gs, seed = [(clip, "a dog")], [3], 7
    noisy, t, target, context, labels = loader.make_inputs(pipe, batch, gs, seed, torch.device("cpu"))
    assert labels is None  # a text-to-video model has no class labels
    # the same draws as make_inputs makes: the posterior sample, then the timestep and the noise
    with torch.no_grad():
        mean, logvar = pipe.vae.encode_video(stack_clips([clip]))
    latents = vae_module.sample(mean[0], logvar[0], data.generator(seed, "posterior", 3))[None] * LATENT_SCALE
    gen = data.generator(seed, "noise", 3)
    assert torch.equal(t, ddim.draw_timestep(gen))
    noise = torch.randn(latents.shape[1:], generator=gen)[None]
    assert rel_err(noisy, ddim.add_noise(latents, noise, t)) <= 1e-6
    assert rel_err(target, ddim.target(latents, noise, t, "v")) <= 1e-6
    assert rel_err(target, noise) > 0.01  # v is not the noise
    assert context.shape == (1, 77, 128)

    pipe.prediction = "epsilon"  # as --prediction epsilon loads it
    noisy_eps, t_eps, target_eps, _, _ = loader.make_inputs(pipe, batch, gs, seed, torch.device("cpu"))
    assert torch.equal(noisy_eps, noisy) and torch.equal(t_eps, t)
    assert torch.equal(target_eps, noise)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Two captioned 10-frame videos."""
    root = str(tmp_path_factory.mktemp("sd2-videos"))
    captioned(root, "a.mp4", "a red square")
    captioned(root, "b.gif", "a green square")
    return root


def train_sd2(ckpt, videos, out, *extra):
    """Two tiny training steps on the SD 2.x; (stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()  # module fixtures cannot use capsys
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        train.main(["--data", videos, "--ckpt", ckpt, "--out", out, "--size", "16", "--frames", "2", "--stride", "2",
                    "--steps", "2", "--log-every", "1", *extra])
    return stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def sd2_trained(tiny_sd2_checkpoint, videos, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sd2-train"))
    return out, *train_sd2(tiny_sd2_checkpoint, videos, out)


def test_training_on_sd2_records_the_family_and_the_v_prediction(sd2_trained, tiny_sd2_checkpoint):
    out, stdout, stderr = sd2_trained
    weights, meta = simda.read_adapters(os.path.join(out, "adapters.safetensors"))
    assert (meta["family"], meta["prediction"], meta["checkpoint"], meta["step"]) == \
        ("SD 2.x", "v", tiny_sd2_checkpoint, 2)
    assert (meta["frames"], meta["height"], meta["width"]) == (2, 16, 16)
    assert f"SD 2.x checkpoint {tiny_sd2_checkpoint}, predicts v (" in stdout and "--prediction epsilon" in stdout
    state = torch.load(os.path.join(out, "state.pt"), weights_only=True)
    assert state["config"]["prediction"] == "v"
    with open(os.path.join(out, "log.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]


def test_training_on_sd2_with_prediction_epsilon_records_epsilon(tiny_sd2_checkpoint, videos, tmp_path):
    stdout, _ = train_sd2(tiny_sd2_checkpoint, videos, str(tmp_path), "--prediction", "epsilon")
    meta = simda.read_adapters(str(tmp_path / "adapters.safetensors"))[1]
    assert (meta["family"], meta["prediction"]) == ("SD 2.x", "epsilon")
    assert "SD 2.x checkpoint" in stdout and "predicts epsilon (as asked)" in stdout


def test_sampling_sd2_adapters_writes_a_video_and_says_the_prediction(sd2_trained, tiny_sd2_checkpoint, tmp_path,
                                                                     capsys):
    out = str(tmp_path / "dog.gif")
    adapters = os.path.join(sd2_trained[0], "adapters.safetensors")
    sample.main(["a dog", "--ckpt", tiny_sd2_checkpoint, "--adapters", adapters, "--steps", "2", "--out", out])
    err = capsys.readouterr().err
    assert "SD 2.x checkpoint, predicts v (" in err, err
    frames = np.stack([np.asarray(f)[..., :3] for f in imageio.mimread(out)])
    assert frames.shape == (2, 16, 16, 3)  # the adapters' metadata


def test_sampling_sd2_adapters_on_an_sd1_checkpoint_is_a_clear_error(sd2_trained, tiny_checkpoint, tmp_path, capsys):
    adapters = os.path.join(sd2_trained[0], "adapters.safetensors")
    out = str(tmp_path / "dog.gif")
    with pytest.raises(SystemExit) as e:
        sample.main(["a dog", "--ckpt", tiny_checkpoint, "--adapters", adapters, "--steps", "2", "--out", out])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "trained on SD 2.x" in err and "is SD 1.x" in err, err
    assert not os.path.exists(out)


def test_adapters_trained_as_epsilon_are_not_sampled_as_v(adapter_files, tiny_sd2_checkpoint, tmp_path):
    """Adapters record the prediction they were trained with (train.py --prediction epsilon on a file
    that says nothing); sampling them later without --prediction must not silently read the UNet's
    output as v, which the adapters were never trained for: either the adapters' record is the
    default, or the mismatch is refused."""
    weights, meta = simda.read_adapters(adapter_files["SD 2.x"])
    path = str(tmp_path / "eps.safetensors")
    pipe = simda.load_pipeline(tiny_sd2_checkpoint, simda_config=SimDAConfig())
    simda.load_adapters(pipe.unet, weights)
    simda.save_adapters(pipe.unet, path, **{**{k: v for k, v in meta.items() if k != "simda_config"},
                                            "prediction": "epsilon"})
    assert pipe.prediction == "v"  # what the checkpoint alone suggests
    try:
        loaded = simda.load_pipeline(tiny_sd2_checkpoint, adapters=path)
    except CheckpointError as e:
        assert "epsilon" in str(e) and "--prediction" in str(e), str(e)
    else:
        assert loaded.prediction == "epsilon", loaded.prediction_source
    # asked for explicitly, the user's word stands
    assert simda.load_pipeline(tiny_sd2_checkpoint, adapters=path, prediction="epsilon").prediction == "epsilon"
