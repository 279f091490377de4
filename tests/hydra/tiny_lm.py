"""A tiny random Llama with a byte-level tokenizer, saved as a local Hugging Face folder.

Nothing is downloaded: the tokenizer is a byte-level BPE without merges (one token per byte),
built with the ``tokenizers`` library, so any text encodes and " " + attribute has a first token.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

WORDS = ["Paris", "Rome", "Tokyo", "Berlin", "Madrid", "Oslo", "Lima", "Cairo", "Delhi", "Seoul"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def save_tiny_llama(folder: Path, n_layers: int = 3, seed: int = 0) -> Path:
    """Write a seeded tiny Llama (vocab 256, d 32, 4 heads / 2 kv heads) and its tokenizer."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=256,
        max_position_embeddings=128,
        initializer_range=0.2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


#: Tiny random models of the other families (vocab 256, d 32, 3 layers), for sweeps from a folder.
OTHER_FAMILIES = {
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=256, n_positions=128)
    ),
    "gpt_neox": lambda: GPTNeoXForCausalLM(
        GPTNeoXConfig(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=256,
            max_position_embeddings=128,
            rotary_pct=0.5,
        )
    ),
    "gptj": lambda: GPTJForCausalLM(
        GPTJConfig(n_embd=32, n_layer=3, n_head=4, rotary_dim=4, vocab_size=256, n_positions=128)
    ),
    "gemma3_text": lambda: Gemma3ForCausalLM(
        Gemma3TextConfig(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=64,
            vocab_size=256,
            max_position_embeddings=128,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=8,
            initializer_range=0.2,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
        )
    ),
}


def save_tiny(folder: Path, family: str, seed: int = 0) -> Path:
    """Write a seeded tiny model of ``family`` (a key of OTHER_FAMILIES) and its tokenizer."""
    torch.manual_seed(seed)
    OTHER_FAMILIES[family]().eval().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def write_prompts(path: Path, n: int) -> Path:
    """A JSONL prompt file of ``n`` short factual-style prompts with attributes."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            subject = WORDS[i % len(WORDS)]
            record = {
                "id": i,
                "prompt": f"{subject} {i} is the capital of",
                "attribute": WORDS[(i + 3) % len(WORDS)],
            }
            f.write(json.dumps(record) + "\n")
    return path
