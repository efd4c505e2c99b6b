"""clip_model.py against transformers' CLIPModel on random weights (both towers, both key layouts,
tiny and full size), its preprocessing against a PIL reference written here, and its loader's
errors. Random CLIP weights attend almost uniformly, which would let a wrong resize or a wrong
attention barely move the scores: every model here has its attention sharpened (q and k scaled)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig as HFConfig, CLIPModel

import clip_model
import clip_text
import metrics
from checkpoint import CheckpointError
from conftest import perturb_, rel_err

TOLERANCE = 1e-4  # relative L2 of the embeddings
CLIPSIM_TOLERANCE = 1e-5  # absolute: with random weights it sits near 0
CAPTIONS = ["a dog surfing a wave", "two red cars racing on a wet road at night", "a cat"]


def transformers_clip(vision_width, vision_layers, patch, image_size, text_width, text_layers, embed_dim, seed=0,
                      sharpen=3.0):
    """A random transformers CLIPModel with 64-wide heads (OpenAI's rule), every parameter moved off its
    init, q and k scaled by `sharpen` so that attention is far from uniform."""
    config = HFConfig(
        text_config=dict(hidden_size=text_width, intermediate_size=4 * text_width, num_hidden_layers=text_layers,
                         num_attention_heads=text_width // 64, max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=vision_width, intermediate_size=4 * vision_width,
                           num_hidden_layers=vision_layers, num_attention_heads=vision_width // 64,
                           image_size=image_size, patch_size=patch),
        projection_dim=embed_dim)
    torch.manual_seed(seed)
    model = perturb_(CLIPModel(config), seed).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".q_proj." in name or ".k_proj." in name:
                p.mul_(sharpen)
    return model


def to_openai(sd):
    """transformers CLIPModel keys -> OpenAI's clip layout (the inverse of what clip_model reads),
    written independently of clip_model.from_openai; with the int entries of OpenAI's TorchScript dicts."""
    out = {"input_resolution": torch.tensor(224), "context_length": torch.tensor(77), "vocab_size": torch.tensor(49408)}
    layer_names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
    tower_names = {
        "text_model.": ("", {"embeddings.token_embedding.weight": "token_embedding.weight",
                             "embeddings.position_embedding.weight": "positional_embedding",
                             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}),
        "vision_model.": ("visual.", {"embeddings.class_embedding": "class_embedding",
                                      "embeddings.patch_embedding.weight": "conv1.weight",
                                      "embeddings.position_embedding.weight": "positional_embedding",
                                      "pre_layrnorm.weight": "ln_pre.weight", "pre_layrnorm.bias": "ln_pre.bias",
                                      "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias"})}
    for tower, (prefix, names) in tower_names.items():
        keys = [k[len(tower):] for k in sd if k.startswith(tower) and not k.endswith("position_ids")]
        for key in keys:
            value = sd[tower + key]
            if key in names:
                out[prefix + names[key]] = value
                continue
            _, _, i, *rest = key.split(".")  # encoder.layers.i.<module>.<kind>
            module, kind = ".".join(rest[:-1]), rest[-1]
            block = f"{prefix}transformer.resblocks.{i}."
            if module == "self_attn.q_proj":
                qkv = [sd[f"{tower}encoder.layers.{i}.self_attn.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
                out[f"{block}attn.in_proj_{kind}"] = torch.cat(qkv)
            elif module not in ("self_attn.k_proj", "self_attn.v_proj"):
                out[f"{block}{layer_names[module]}.{kind}"] = value
    out["visual.proj"] = sd["visual_projection.weight"].t().contiguous()
    out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    out["logit_scale"] = sd["logit_scale"]
    return out


def smooth_frames(n, height, width, seed=0):
    """uint8 frames with structure at several scales (random low-res noise upsampled), not flat noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 8, generator=g)
    fine = torch.rand(n, 3, height // 4 + 1, width // 4 + 1, generator=g)
    x = 0.7 * torch.nn.functional.interpolate(coarse, (height, width), mode="bilinear") + \
        0.3 * torch.nn.functional.interpolate(fine, (height, width), mode="nearest")
    return (x.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def reference_embeddings(hf, pixels, ids):
    with torch.no_grad():
        return (hf.get_image_features(pixel_values=pixels).pooler_output,
                hf.get_text_features(input_ids=ids).pooler_output)


def compare(label, ours, hf, size, frames=None):
    """Image and text embeddings of ours vs transformers' on the same pixels and ids, and CLIPSIM."""
    frames = smooth_frames(6, 48, 64) if frames is None else frames
    pixels, ids = clip_model.preprocess(frames, size), clip_text.Tokenizer()(CAPTIONS)
    with torch.no_grad():
        image, text = ours.encode_image(pixels), ours.encode_text(ids)
    ref_image, ref_text = reference_embeddings(hf, pixels, ids)
    errors = rel_err(image, ref_image), rel_err(text, ref_text)
    as_videos = lambda e: e.view(len(CAPTIONS), -1, e.shape[-1]).double().numpy()  # noqa: E731 (6 frames: 3 videos)
    gap = np.abs(metrics.clipsim(as_videos(image), text.double().numpy()) -
                 metrics.clipsim(as_videos(ref_image), ref_text.double().numpy())).max()
    print(f"{label}: image {errors[0]:.2e}, text {errors[1]:.2e}, CLIPSIM |gap| {gap:.1e}")
    assert errors[0] <= TOLERANCE and errors[1] <= TOLERANCE, f"{label}: {errors}"
    assert gap <= CLIPSIM_TOLERANCE, f"{label}: CLIPSIM differs by {gap}"


@pytest.fixture(scope="module")
def tiny_hf():
    return transformers_clip(128, 2, 8, 32, 128, 2, 32)


@pytest.mark.parametrize("layout", ["transformers folder", "transformers file", "openai .pt", "openai .safetensors"])
def test_clip_matches_transformers_in_every_layout(tiny_hf, layout, tmp_path):
    sd = {k: v.contiguous() for k, v in tiny_hf.state_dict().items()}
    if layout == "transformers folder":
        tiny_hf.save_pretrained(tmp_path / "clip")
        path = tmp_path / "clip"
    elif layout == "transformers file":
        path = tmp_path / "clip.safetensors"
        save_file(sd, path)
    elif layout == "openai .pt":
        path = tmp_path / "ViT-tiny.pt"
        torch.save(to_openai(sd), path)
    else:
        path = tmp_path / "ViT-tiny.safetensors"
        save_file(to_openai(sd), path)
    ours = clip_model.load_clip(str(path))
    assert ours.config == clip_model.CLIPConfig.tiny()
    compare(layout, ours, tiny_hf, 32)


def test_the_comparison_can_fail(tiny_hf):
    """The same comparison catches a model whose image tower attends causally, or whose text is pooled
    at the last token instead of the end-of-text token."""
    sd = {k: v for k, v in tiny_hf.state_dict().items() if not k.endswith("position_ids")}
    ours = clip_model.CLIP(clip_model.config_from_state_dict(sd))
    ours.load_state_dict(sd)
    ours.eval()
    for layer in ours.vision_model.encoder.layers:
        layer.self_attn.causal = True
    with pytest.raises(AssertionError):
        compare("causal image attention", ours, tiny_hf, 32)
    for layer in ours.vision_model.encoder.layers:
        layer.self_attn.causal = False
    compare("fixed", ours, tiny_hf, 32)
    ids = clip_text.Tokenizer()(CAPTIONS)
    with torch.no_grad():
        last = ours.text_projection(ours.text_model(ids)[:, -1])
    assert rel_err(last, reference_embeddings(tiny_hf, clip_model.preprocess(smooth_frames(1, 32, 32), 32), ids)[1]) > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("name, shape", [("ViT-B/32", (768, 12, 32, 224, 512, 12, 512)),
                                         ("ViT-L/14", (1024, 24, 14, 224, 768, 12, 768))])
def test_full_size_clip_matches_transformers(name, shape):
    hf = transformers_clip(*shape, seed=1)
    sd = {k: v for k, v in hf.state_dict().items()}
    frames = smooth_frames(6, 180, 240)
    for layout, converted in (("transformers", {k: v for k, v in sd.items() if not k.endswith("position_ids")}),
                              ("openai", clip_model.from_openai(to_openai(sd)))):
        config = clip_model.config_from_state_dict(converted)
        assert (config.vision.width, config.vision.layers, config.vision.patch_size, config.vision.image_size,
                config.text.width, config.text.layers, config.embed_dim) == shape
        assert clip_model.model_name(config) == name
        ours = clip_model.CLIP(config)
        ours.load_state_dict(converted, strict=True)
        compare(f"{name}, {layout} layout", ours.eval(), hf, 224, frames)
        del ours, converted


# ---------------------------------------------------------------------------- preprocessing

def reference_preprocess(frame, size):
    """OpenAI's preprocess written out step by step with PIL: torchvision's Resize(size, BICUBIC) on a PIL
    image (short side to size, long side int(size * long / short)), CenterCrop(size) (offsets
    int(round(...)), Python's round), ToTensor, Normalize."""
    image = Image.fromarray(frame)
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    x = torch.tensor(np.array(image), dtype=torch.float32).permute(2, 0, 1) / 255
    return (x - torch.tensor(clip_model.MEAN)[:, None, None]) / torch.tensor(clip_model.STD)[:, None, None]


# (height, width): no resize and a crop offset of 1.5 (rounded to 2) or 2.5 (to 2); a resize whose
# long side truncates (298.67 -> 298) and whose offset is 37; portrait 38.5 -> 38; an upscale
SIZES = [(224, 227), (224, 229), (240, 320), (121, 90), (100, 151), (37, 53)]


@pytest.mark.parametrize("height, width", SIZES)
def test_preprocess_is_openais(height, width):
    frames = smooth_frames(2, height, width, seed=height + width)
    ours = clip_model.preprocess(frames, 224)
    reference = torch.stack([reference_preprocess(f, 224) for f in frames])
    assert ours.shape == (2, 3, 224, 224)
    assert torch.equal(ours, reference)


def test_the_frame_sizes_tell_the_rounding_choices_apart():
    """At these sizes floor instead of round for the crop, or rounding the long side instead of
    truncating, gives other pixels: the test above can fail."""
    def crop_offset(new, size):
        return (new - size) // 2

    changed = 0
    for height, width in SIZES:
        new_h, new_w = clip_model.resized_size(height, width, 224)
        rounded = (round(224 * height / width), 224) if height > width else (224, round(224 * width / height))
        changed += crop_offset(new_w, 224) != int(round((new_w - 224) / 2.0)) or (new_h, new_w) != rounded or \
            crop_offset(new_h, 224) != int(round((new_h - 224) / 2.0))
    assert changed >= 3
    assert clip_model.resized_size(240, 320, 224) == (224, 298)  # 298.67 truncated
    assert int(round(1.5)) == 2 and int(round(2.5)) == 2


def test_a_torch_resize_moves_clipsim_beyond_the_tolerance(tiny_hf):
    """Why the preprocessing must be PIL's: resizing with torch (bicubic, antialiased) instead moves the
    scores of the sharpened model by far more than the parity tolerance."""
    sd = {k: v for k, v in tiny_hf.state_dict().items() if not k.endswith("position_ids")}
    ours = clip_model.CLIP(clip_model.config_from_state_dict(sd))
    ours.load_state_dict(sd)
    ours.eval()
    frames = smooth_frames(6, 90, 121)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, (32, 43), mode="bicubic", antialias=True, align_corners=False)
    x = x.round().clamp(0, 255)[..., 6:38] / 255  # the same crop (round(5.5) = 6): only the resize differs
    torch_pixels = (x - torch.tensor(clip_model.MEAN)[:, None, None]) / torch.tensor(clip_model.STD)[:, None, None]
    text = clip_model.embed_texts(ours, clip_text.Tokenizer(), CAPTIONS)
    with torch.no_grad():
        scores = [metrics.clipsim(ours.encode_image(p).double().view(3, 2, -1).numpy(), text)
                  for p in (clip_model.preprocess(frames, 32), torch_pixels)]
    assert np.abs(scores[0] - scores[1]).max() > 10 * CLIPSIM_TOLERANCE


# ---------------------------------------------------------------------------- the scores and bad input

def test_embed_videos_gives_unit_frame_embeddings_in_video_order(tiny_hf, tmp_path):
    save_file({k: v.contiguous() for k, v in tiny_hf.state_dict().items()}, tmp_path / "clip.safetensors")
    ours = clip_model.load_clip(str(tmp_path / "clip.safetensors"))
    videos = smooth_frames(6, 40, 40).reshape(2, 3, 40, 40, 3)
    embeddings = clip_model.embed_videos(ours, videos, batch_size=4)
    assert embeddings.shape == (2, 3, 32) and embeddings.dtype == np.float64
    assert np.allclose(np.linalg.norm(embeddings, axis=-1), 1)
    with torch.no_grad():
        direct = ours.encode_image(clip_model.preprocess(videos[1], 32)).double()
    assert rel_err(torch.from_numpy(embeddings[1]), torch.nn.functional.normalize(direct, dim=-1)) < 1e-6
    with pytest.raises(ValueError, match="uint8"):
        clip_model.preprocess(videos[0].astype(np.float32), 32)


def test_bad_clip_files_get_clear_errors(tmp_path, tiny_checkpoint):
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    scripted.save(str(tmp_path / "ViT-B-32.pt"))
    with pytest.raises(CheckpointError, match="(?s)TorchScript.*torch.jit.load"):
        clip_model.load_clip(str(tmp_path / "ViT-B-32.pt"))
    with pytest.raises(CheckpointError, match="not a CLIP model"):
        clip_model.load_clip(tiny_checkpoint)  # a Stable Diffusion file
    with pytest.raises(CheckpointError, match="not found"):
        clip_model.load_clip(str(tmp_path / "missing.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no .safetensors"):
        clip_model.load_clip(str(tmp_path / "empty"))
    sd = {k: v for k, v in transformers_clip(128, 2, 8, 32, 128, 2, 32).state_dict().items()}
    del sd["vision_model.post_layernorm.bias"]
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match="missing.*post_layernorm.bias"):
        clip_model.load_clip(str(tmp_path / "broken.safetensors"))


def test_clipsim_and_frame_consistency_follow_their_definitions():
    g = np.random.default_rng(0)
    frames, texts = g.normal(size=(4, 5, 16)), g.normal(size=(4, 16))
    unit = lambda x: x / np.linalg.norm(x)  # noqa: E731
    for n in range(4):
        expected = np.mean([unit(frames[n, f]) @ unit(texts[n]) for f in range(5)])
        assert math.isclose(metrics.clipsim(frames, texts)[n], expected, abs_tol=1e-12)
        pairs = [unit(frames[n, i]) @ unit(frames[n, j]) for i in range(5) for j in range(5) if i != j]
        assert math.isclose(metrics.frame_consistency(frames)[n], 100 * np.mean(pairs), abs_tol=1e-10)
    assert np.allclose(metrics.frame_consistency(np.repeat(frames[:, :1], 3, axis=1)), 100)
    with pytest.raises(ValueError, match="4 videos .* 3 captions"):
        metrics.clipsim(frames, texts[:3])
    with pytest.raises(ValueError, match="at least 2 frames"):
        metrics.frame_consistency(frames[:, :1])
