"""CLIP text side of Stable Diffusion: the BPE tokenizer and the text transformer.

SD 1.x conditions its UNet on the last hidden state of OpenAI's CLIP ViT-L/14 text model
(`cond_stage_model.transformer.text_model.*` in the single-file checkpoints). A prompt becomes
77 token ids (<|startoftext|>, BPE tokens, <|endoftext|>, then <|endoftext|> as padding), and the
encoder turns them into a [B, 77, 768] context for cross-attention. No attention mask is used:
the padding tokens are attended to (causally), exactly as SD 1.x was trained.

SD 2.x uses OpenCLIP's ViT-H/14 text tower instead: 1024 wide, exact GELU, padding with id 0, and
the output of its penultimate layer (then the final LayerNorm), so our model holds 23 of its 24
layers. Its single-file keys are OpenCLIP's (`cond_stage_model.model.*`, q/k/v stacked in
`in_proj_weight`); `from_open_clip` renames them by rule to the names used here.

Parameter names are the official SD 1.x keys with `cond_stage_model.transformer.text_model.`
stripped, so loading a checkpoint is a prefix strip (and for SD 2.x a rename) and a strict load.
"""
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import tokenizers
from tokenizers import Regex, models, normalizers, pre_tokenizers

BOS = 49406  # <|startoftext|>
EOS = 49407  # <|endoftext|>, also the padding token in SD 1.x
OPEN_CLIP_PAD = 0  # SD 2.x pads with id 0 ("!"), as OpenCLIP's tokenizer does
BOS_TEXT, EOS_TEXT = "<|startoftext|>", "<|endoftext|>"
VOCAB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_vocab")


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    max_length: int = 77  # number of position embeddings = tokens per prompt
    width: int = 768
    layers: int = 12
    heads: int = 12
    hidden_act: str = "quick_gelu"  # OpenAI CLIP's; OpenCLIP (SD 2.x) uses the exact "gelu"

    @classmethod
    def tiny(cls):
        return cls(width=128, layers=2, heads=2)

    @classmethod
    def sd2(cls):
        """OpenCLIP ViT-H/14's text tower as SD 2.x runs it: 23 of its 24 layers (the penultimate output)."""
        return cls(width=1024, layers=23, heads=16, hidden_act="gelu")


def config_from_state_dict(sd, head_width, hidden_act="quick_gelu") -> CLIPTextConfig:
    """Infer the config from tensor shapes (keys without the `...text_model.` prefix); the heads are
    `head_width` channels wide and the activation is `hidden_act`: the model family's rules
    (checkpoint.py), as no shape holds them."""
    for key in ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight"):
        if key not in sd:
            raise ValueError(f"CLIP text state dict has no {key!r}; found keys like {list(sd)[:3]}")
    vocab_size, width = sd["embeddings.token_embedding.weight"].shape
    max_length = sd["embeddings.position_embedding.weight"].shape[0]
    layer_ids = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")}
    if not layer_ids or layer_ids != set(range(len(layer_ids))):
        raise ValueError(f"expected encoder.layers.0..N-1 in the CLIP text state dict, found indices {sorted(layer_ids)}")
    fc1 = sd["encoder.layers.0.mlp.fc1.weight"].shape
    if tuple(fc1) != (4 * width, width):
        raise ValueError(f"expected mlp.fc1 of shape {(4 * width, width)} (MLP width 4*width), found {tuple(fc1)}")
    if width % head_width:
        raise ValueError(f"the text encoder is {width} wide, which {head_width}-channel heads do not divide: "
                         "not the model family these weights were taken for")
    return CLIPTextConfig(vocab_size=vocab_size, max_length=max_length, width=width,
                          layers=len(layer_ids), heads=width // head_width, hidden_act=hidden_act)


def from_diffusers(sd):
    """diffusers `text_encoder/` (transformers CLIPTextModel) keys -> ours. Older files carry a
    `text_model.` prefix, transformers 5 files do not; `position_ids` is a buffer we do not keep."""
    return {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}


# OpenCLIP names -> ours, per layer and outside the layers. q/k/v are stacked in `attn.in_proj_*`.
OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "attn.out_proj": "self_attn.out_proj", "ln_2": "layer_norm2",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
OPEN_CLIP_OTHER = {"token_embedding.weight": "embeddings.token_embedding.weight",
                   "positional_embedding": "embeddings.position_embedding.weight",
                   "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
# What SD 2.x never runs: the pooled-output projection and CLIP's temperature (the last layer is
# dropped by number, as SD takes the penultimate layer's output).
OPEN_CLIP_UNUSED = ("text_projection", "logit_scale")


def rename_open_clip_layers(sd):
    """OpenCLIP/OpenAI `transformer.resblocks.N.*` keys -> our `encoder.layers.N.*`, q/k/v unstacked from
    `attn.in_proj_*`; other keys unchanged. Shared by both towers (clip_model.py reads the image one)."""
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if not (key.startswith("transformer.resblocks.") and len(parts) >= 5):
            out[key] = value
            continue
        layer, name = f"encoder.layers.{parts[2]}.", ".".join(parts[3:])
        if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = name.rsplit("_", 1)[1]  # weight or bias
            for proj, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{layer}self_attn.{proj}.{kind}"] = chunk
        else:
            module, kind = name.rsplit(".", 1)
            out[layer + f"{OPEN_CLIP_LAYER.get(module, module)}.{kind}"] = value
    return out


def from_open_clip(sd, all_layers=False):
    """OpenCLIP (or OpenAI CLIP) text-tower keys (without `cond_stage_model.model.`) -> ours, keeping the
    layers SD 2.x runs: all but the last (`all_layers`: every layer, as CLIP itself runs them; the
    projection and temperature are the caller's). Keys we do not know keep their names, for the strict
    load to report."""
    last = max((int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks.")), default=-1)
    kept = {k: v for k, v in sd.items() if k not in OPEN_CLIP_UNUSED and
            (all_layers or not k.startswith(f"transformer.resblocks.{last}."))}
    return {OPEN_CLIP_OTHER.get(k, k): v for k, v in rename_open_clip_layers(kept).items()}


def to_open_clip(sd):
    """Ours -> OpenCLIP text-tower keys, as SD 2.x files hold them: our layers, then the last layer that
    SD never runs, with `text_projection` and `logit_scale`, as zeros (they do not change what SD
    computes)."""
    back = {ours: theirs for theirs, ours in OPEN_CLIP_OTHER.items()}
    layer_back = {ours: theirs for theirs, ours in OPEN_CLIP_LAYER.items()}
    out, layers = {}, 0
    for key, value in sd.items():
        if key in back:
            out[back[key]] = value
            continue
        parts = key.split(".")  # encoder.layers.N.<module...>.<weight|bias>
        layers = max(layers, int(parts[2]) + 1)
        prefix, module, kind = f"transformer.resblocks.{parts[2]}.", ".".join(parts[3:-1]), parts[-1]
        if module == "self_attn.q_proj":
            stacked = [sd[f"encoder.layers.{parts[2]}.self_attn.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
            out[f"{prefix}attn.in_proj_{kind}"] = torch.cat(stacked)
        elif module not in ("self_attn.k_proj", "self_attn.v_proj"):
            out[f"{prefix}{layer_back[module]}.{kind}"] = value
    width = sd["embeddings.token_embedding.weight"].shape[1]
    unused = {k.replace(f"resblocks.{layers - 1}.", f"resblocks.{layers}."): torch.zeros_like(v) for k, v in out.items()
              if k.startswith(f"transformer.resblocks.{layers - 1}.")}
    return {**out, **unused, "text_projection": torch.zeros(width, width), "logit_scale": torch.zeros(())}


# ----------------------------------------------------------------------------- tokenizer

# CLIP's word split: the special tokens, English contractions, letter runs, single digits, and
# runs of other non-space symbols. Text is lowercased before the split, so no case flag is needed
# (adding (?i) would change ids for case-folding oddities such as "'ſ", unlike transformers).
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class Tokenizer:
    """CLIP BPE tokenizer: prompt(s) -> LongTensor [B, max_length] of ids, as SD feeds them: BOS, the
    tokens, EOS, then `pad_id` (SD 1.x: EOS again; SD 2.x: 0, as OpenCLIP pads). A "!" in a prompt
    stays the BPE token it is, as in OpenCLIP's tokenizer (transformers' CLIPTokenizer(pad_token="!"),
    which diffusers uses for SD 2.x, turns each "!" into the pad token 0 instead)."""

    def __init__(self, vocab_dir=None, max_length: int = 77, pad_id: int = EOS):
        vocab_dir = VOCAB_DIR if vocab_dir is None else os.fspath(vocab_dir)
        vocab, merges = os.path.join(vocab_dir, "vocab.json"), os.path.join(vocab_dir, "merges.txt")
        missing = [p for p in (vocab, merges) if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"CLIP tokenizer files not found: {missing} (expected vocab.json and merges.txt "
                             f"in {vocab_dir!r}, e.g. a diffusers folder's tokenizer/ directory)")
        self.vocab_file, self.merges_file, self.max_length, self.pad_id = vocab, merges, max_length, pad_id
        # Word-final pieces carry "</w>" (so "cat" at the end of a word differs from "cat" inside one).
        bpe = models.BPE.from_file(vocab, merges, end_of_word_suffix="</w>", continuing_subword_prefix="",
                                   unk_token=EOS_TEXT, fuse_unk=False)
        tok = tokenizers.Tokenizer(bpe)
        # CLIP's text cleanup: NFC, runs of whitespace -> one space, strip, lowercase.
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Strip(), normalizers.Lowercase()])
        # Keep only the regex matches (whitespace is dropped), then map bytes to printable unicode
        # characters as the vocab is written. ByteLevel's own GPT-2 regex only splits further inside
        # a lowercased "<|endoftext|>" typed in another case, which is what transformers does too.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        # The two special tokens typed literally in a prompt map to their ids, not to BPE pieces.
        tok.add_special_tokens([BOS_TEXT, EOS_TEXT])
        if tok.token_to_id(BOS_TEXT) != BOS or tok.token_to_id(EOS_TEXT) != EOS:
            raise ValueError(f"{vocab} is not the CLIP vocab: expected {BOS_TEXT}={BOS} and {EOS_TEXT}={EOS}, "
                             f"found {tok.token_to_id(BOS_TEXT)} and {tok.token_to_id(EOS_TEXT)}")
        self.tokenizer = tok

    def encode(self, prompt: str) -> list:
        """BPE ids of one prompt, without BOS/EOS and without truncation."""
        return self.tokenizer.encode(prompt, add_special_tokens=False).ids

    def __call__(self, prompts) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        room = self.max_length - 2  # BOS and EOS always stay
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            tokens = self.encode(prompt)
            if len(tokens) > room:
                short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                warnings.warn(f"prompt {short!r} has {len(tokens)} tokens, more than the {room} that fit in "
                              f"{self.max_length}: {len(tokens) - room} tokens were dropped", UserWarning, stacklevel=2)
                tokens = tokens[:room]
            ids[i, 0] = BOS
            ids[i, 1:len(tokens) + 1] = torch.tensor(tokens, dtype=torch.long)
            ids[i, len(tokens) + 1] = EOS
        return ids


# ----------------------------------------------------------------------------- text transformer

class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, causal=True):
        super().__init__()
        self.heads, self.causal = cfg.heads, causal
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        B, L, C = x.shape
        # [B, L, C] -> [B, heads, L, C / heads]
        q, k, v = (proj(x).view(B, L, self.heads, C // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        # text: a token sees itself and the tokens before it; image patches (clip_model.py) see each other
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, C))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        if cfg.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"hidden_act must be 'quick_gelu' or 'gelu', got {cfg.hidden_act!r}")
        self.hidden_act = cfg.hidden_act
        self.fc1 = nn.Linear(cfg.width, 4 * cfg.width)
        self.fc2 = nn.Linear(4 * cfg.width, cfg.width)

    def forward(self, x):
        x = self.fc1(x)
        if self.hidden_act == "gelu":  # OpenCLIP (SD 2.x)
            return self.fc2(F.gelu(x))
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick-GELU, what OpenAI's CLIP was trained with


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, causal=True):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.self_attn = CLIPAttention(cfg, causal)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEncoder(nn.Module):
    """Token ids [B, L] -> last hidden state [B, L, width] (after final_layer_norm)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = nn.ModuleDict(dict(
            token_embedding=nn.Embedding(cfg.vocab_size, cfg.width),
            position_embedding=nn.Embedding(cfg.max_length, cfg.width),
        ))
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))))
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=1e-5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[1] > self.config.max_length:
            raise ValueError(f"expected token ids [B, L] with L <= {self.config.max_length}, found {tuple(ids.shape)}")
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.embeddings.token_embedding(ids) + self.embeddings.position_embedding(positions)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)
