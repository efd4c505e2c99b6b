"""clip_text.py against transformers (CLIPTokenizer, CLIPTextModel) and diffusers' LDM CLIP key converter."""
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from clip_text import (BOS, EOS, VOCAB_DIR, CLIPTextConfig, CLIPTextEncoder, Tokenizer, config_from_state_dict,
                       from_diffusers)
from conftest import perturb_, rel_err
from reference import transformers_clip, transformers_clip_config

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT, trending on ArtStation!!!",
    "the 1990s, pi is 3.14; 42% off -- $5.99 (maybe?)",
    "it's, don't, I'M, we'll, you're, they've, he'd, 'quoted' \"double\", long s: it'ſt",
    "café naïve résumé Zürich",
    "東京タワー 夜景, 한국어, русский текст",
    "🐱🎉 emoji 👩‍🚀 astronaut ❤️",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n  and   runs    of  spaces",
    "",
    "MiXeD CaSe WoRdS and snake_case and camelCase",
    "e\u0301 composed by NFC, <|endoftext|> typed in, <|EndOfText|> in caps",
    " ".join(f"word{i}" if i % 3 else "landscape" for i in range(100)),  # 100 words, truncated
]


@pytest.fixture(scope="module")
def reference_tokenizer():
    from transformers import CLIPTokenizer
    # positional paths: as keywords transformers silently builds a 3-token vocab
    return CLIPTokenizer(os.path.join(VOCAB_DIR, "vocab.json"), os.path.join(VOCAB_DIR, "merges.txt"))


def test_tokenizer_photo_of_a_cat():
    ids = Tokenizer()("a photo of a cat")
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert (ids[0, 7:] == EOS).all()


@pytest.mark.filterwarnings("ignore:prompt .* tokens were dropped:UserWarning")
def test_tokenizer_matches_transformers(reference_tokenizer):
    ours = Tokenizer()(PROMPTS)
    ref = reference_tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
    for prompt, row, ref_row in zip(PROMPTS, ours.tolist(), ref):
        assert row == ref_row, prompt


def test_tokenizer_warns_with_dropped_count(reference_tokenizer):
    prompt = PROMPTS[-1]
    untruncated = reference_tokenizer(prompt)["input_ids"]  # BOS + all tokens + EOS
    dropped = len(untruncated) - 77
    assert dropped > 0
    with pytest.warns(UserWarning, match=f"{dropped} tokens were dropped"):
        ids = Tokenizer()(prompt)
    assert ids[0].tolist() == untruncated[:76] + [EOS]


def test_tokenizer_reads_a_diffusers_tokenizer_folder(tmp_path):
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(VOCAB_DIR, name), folder / name)
    tokenizer = Tokenizer(folder)
    assert os.path.dirname(tokenizer.vocab_file) == str(folder)
    assert torch.equal(tokenizer("a photo of a cat"), Tokenizer()("a photo of a cat"))

    (folder / "merges.txt").unlink()
    with pytest.raises(ValueError, match="merges.txt"):
        Tokenizer(folder)


@torch.no_grad()
def test_text_encoder_matches_transformers(tmp_path):
    from transformers import CLIPTextModel

    cfg = CLIPTextConfig.tiny()
    ours = perturb_(CLIPTextEncoder(cfg), seed=0).eval()
    ids = Tokenizer()(["a photo of a cat", "an astronaut riding a horse on the moon, 4k"])
    out = ours(ids)
    assert out.shape == (2, 77, cfg.width)

    # 1) the official single-file layout, converted by diffusers' own LDM converter, strict load
    ref = transformers_clip(ours)
    ref.set_attn_implementation("eager")  # the plain-math reference (softmax in float32)
    assert rel_err(out, ref(input_ids=ids).last_hidden_state) <= 1e-4

    # 2) a diffusers text_encoder file with `text_model.` keys, loaded by transformers with nothing left over
    save_file({"text_model." + k: v.contiguous() for k, v in ours.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    transformers_clip_config(cfg).save_pretrained(tmp_path)
    ref, info = CLIPTextModel.from_pretrained(tmp_path, output_loading_info=True, attn_implementation="eager")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert rel_err(out, ref.eval()(input_ids=ids).last_hidden_state) <= 1e-4

    # a prompt shorter than 77 (causal: the prefix of the full output)
    assert rel_err(ours(ids[:, :9]), out[:, :9]) <= 1e-5


def test_text_encoder_has_no_position_ids_buffer():
    assert not any("position_ids" in k for k in CLIPTextEncoder(CLIPTextConfig.tiny()).state_dict())


@pytest.mark.parametrize("preset", ["tiny", "sd15"])
def test_config_from_state_dict_round_trips(preset):
    cfg = CLIPTextConfig.tiny() if preset == "tiny" else CLIPTextConfig()
    with torch.device("meta"):
        sd = CLIPTextEncoder(cfg).state_dict()
    assert config_from_state_dict(sd, head_width=64) == cfg
    if preset == "sd15":
        assert cfg == CLIPTextConfig(vocab_size=49408, max_length=77, width=768, layers=12, heads=12)


def test_config_from_state_dict_rejects_other_files():
    with pytest.raises(ValueError, match="token_embedding"):
        config_from_state_dict({"conv_in.weight": torch.zeros(1)}, head_width=64)


@pytest.mark.parametrize("prefix", ["text_model.", ""])
def test_from_diffusers_accepts_both_key_layouts(prefix):
    cfg = CLIPTextConfig.tiny()
    sd = perturb_(CLIPTextEncoder(cfg)).state_dict()
    # transformers-4-era files also store the position_ids buffer
    diffusers_sd = {prefix + k: v for k, v in sd.items()}
    diffusers_sd[prefix + "embeddings.position_ids"] = torch.arange(cfg.max_length)[None]
    converted = from_diffusers(diffusers_sd)
    model = CLIPTextEncoder(cfg)
    model.load_state_dict(converted, strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
