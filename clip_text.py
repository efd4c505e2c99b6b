"""CLIP text side of Stable Diffusion 1.x: the BPE tokenizer and the text transformer.

SD-1.x conditions its UNet on the last hidden state of OpenAI's CLIP ViT-L/14 text model
(`cond_stage_model.transformer.text_model.*` in the single-file checkpoints). A prompt becomes
77 token ids (<|startoftext|>, BPE tokens, <|endoftext|>, then <|endoftext|> as padding), and the
encoder turns them into a [B, 77, 768] context for cross-attention. No attention mask is used:
the padding tokens are attended to (causally), exactly as SD-1.x was trained.

Parameter names are the official checkpoint keys with `cond_stage_model.transformer.text_model.`
stripped, so loading a checkpoint is a prefix strip and a strict `load_state_dict`.
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
EOS = 49407  # <|endoftext|>, also the padding token in SD-1.x
BOS_TEXT, EOS_TEXT = "<|startoftext|>", "<|endoftext|>"
VOCAB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_vocab")


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    max_length: int = 77  # number of position embeddings = tokens per prompt
    width: int = 768
    layers: int = 12
    heads: int = 12

    @classmethod
    def tiny(cls):
        return cls(width=128, layers=2, heads=2)


def config_from_state_dict(sd, head_width) -> CLIPTextConfig:
    """Infer the config from tensor shapes (keys without the `...text_model.` prefix); the heads are
    `head_width` channels wide, the model family's rule (checkpoint.py), as no shape holds it."""
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
                          layers=len(layer_ids), heads=width // head_width)


def from_diffusers(sd):
    """diffusers `text_encoder/` (transformers CLIPTextModel) keys -> ours. Older files carry a
    `text_model.` prefix, transformers 5 files do not; `position_ids` is a buffer we do not keep."""
    return {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}


# ----------------------------------------------------------------------------- tokenizer

# CLIP's word split: the special tokens, English contractions, letter runs, single digits, and
# runs of other non-space symbols. Text is lowercased before the split, so no case flag is needed
# (adding (?i) would change ids for case-folding oddities such as "'ſ", unlike transformers).
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class Tokenizer:
    """CLIP BPE tokenizer: prompt(s) -> LongTensor [B, max_length] of ids, as SD-1.x feeds them."""

    def __init__(self, vocab_dir=None, max_length: int = 77):
        vocab_dir = VOCAB_DIR if vocab_dir is None else os.fspath(vocab_dir)
        vocab, merges = os.path.join(vocab_dir, "vocab.json"), os.path.join(vocab_dir, "merges.txt")
        missing = [p for p in (vocab, merges) if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"CLIP tokenizer files not found: {missing} (expected vocab.json and merges.txt "
                             f"in {vocab_dir!r}, e.g. a diffusers folder's tokenizer/ directory)")
        self.vocab_file, self.merges_file, self.max_length = vocab, merges, max_length
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
        ids = torch.full((len(prompts), self.max_length), EOS, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            tokens = self.encode(prompt)
            if len(tokens) > room:
                short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                warnings.warn(f"prompt {short!r} has {len(tokens)} tokens, more than the {room} that fit in "
                              f"{self.max_length}: {len(tokens) - room} tokens were dropped", UserWarning, stacklevel=2)
                tokens = tokens[:room]
            ids[i, 0] = BOS
            ids[i, 1:len(tokens) + 1] = torch.tensor(tokens, dtype=torch.long)
        return ids


# ----------------------------------------------------------------------------- text transformer

class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        B, L, C = x.shape
        # [B, L, C] -> [B, heads, L, C / heads]
        q, k, v = (proj(x).view(B, L, self.heads, C // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # a token sees itself and the tokens before it
        return self.out_proj(y.transpose(1, 2).reshape(B, L, C))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, 4 * cfg.width)
        self.fc2 = nn.Linear(4 * cfg.width, cfg.width)

    def forward(self, x):
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick-GELU, what CLIP was trained with


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.self_attn = CLIPAttention(cfg)
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
