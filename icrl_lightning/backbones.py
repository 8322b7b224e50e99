"""Backbones: (causal LM, tokenizer) pairs. The ``tiny`` tier is a Llama built from a
``LlamaConfig`` with a word-level tokenizer made in code for the chosen format; nothing is
downloaded."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from icrl_lightning.serialize import FORMATS, format_vocabulary


def build_tokenizer(format: str, max_tiles: int = 64) -> PreTrainedTokenizerFast:
    """A word-level tokenizer holding ``format``'s special tokens and one id per field value."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: choose one of {sorted(FORMATS)}")
    fmt = FORMATS[format]
    specials, words = format_vocabulary(fmt, max_tiles)
    vocab = {tok: i for i, tok in enumerate(["<unk>", *specials, *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token=fmt.pad)


@dataclass
class TinyLlama:
    """A Llama trained from scratch (all weights train). Sizes are YAML options.

    Args:
        format: serialization, ``compact`` (one token per field) or ``llama3`` (the paper's).
        hidden_size: model width.
        num_layers: decoder layers.
        num_heads: attention heads (``hidden_size`` must divide by it).
        intermediate_size: MLP width.
        max_position_embeddings: longest context the model is built for.
        max_tiles: largest map (tiles) the tokenizer can write.
        attn_implementation: ``sdpa`` or ``eager``.
    """

    format: str = "compact"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 2048
    max_tiles: int = 64
    attn_implementation: str = "sdpa"

    def build(self) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}")
        tokenizer = build_tokenizer(self.format, self.max_tiles)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            eos_token_id=None,
            tie_word_embeddings=False,
        )
        config._attn_implementation = self.attn_implementation
        model = LlamaForCausalLM(config)
        return model, tokenizer

    @property
    def max_context(self) -> int:
        return self.max_position_embeddings
