"""Model names both services understand: named random-init shapes, or any from_pretrained path.

Only configs and tokenizers here (no torch import): the scheduler tokenizes and validates with
them; the worker builds the weights (worker_svc/engine/loader.py).
"""
from __future__ import annotations

import functools
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerFast

DEFAULT_MODEL = "tiny-random-llama"

# Byte-level vocabulary: 256 byte symbols, then the specials.
BYTE_SPECIALS = ("<s>", "</s>", "<pad>")

_LLAMA_1B = dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256,
                 max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                 tie_word_embeddings=True)

# Randomly initialised models of real architectures (no download needed). Same cost to run as the
# trained models of the same shape; their output is gibberish. The tiny ones use a wide init
# (initializer_range 0.2) so greedy output varies with context: with the default 0.02 a random
# model repeats one token, and tests comparing outputs would prove nothing.
NAMED_SHAPES: dict[str, dict] = {
    "tiny-random-llama": dict(model_type="llama", hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                              vocab_size=260, max_position_embeddings=2048, tie_word_embeddings=True,
                              initializer_range=0.2),
    "tiny-random-qwen3": dict(model_type="qwen3", hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              intermediate_size=128, vocab_size=260, max_position_embeddings=2048,
                              tie_word_embeddings=True, initializer_range=0.2),
    "llama-3.2-1b-shape": _LLAMA_1B,
    "llama-3.1-8b-shape": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                               intermediate_size=14336, vocab_size=128256,
                               max_position_embeddings=131072, rms_norm_eps=1e-5,
                               rope_theta=500000.0, tie_word_embeddings=False),
}


def is_named(model: str) -> bool:
    return model in NAMED_SHAPES


@functools.lru_cache(maxsize=16)
def load_config(model: str) -> PretrainedConfig:
    """The architecture config of a named shape, or AutoConfig.from_pretrained(path or name)."""
    if model in NAMED_SHAPES:
        spec = dict(NAMED_SHAPES[model])
        cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 256, 257, 258
        return cfg
    return AutoConfig.from_pretrained(model)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A real (HF fast) byte-level tokenizer: every byte is one token, ids 0-255, then specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    for i, tok in enumerate(BYTE_SPECIALS):
        vocab[tok] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable mapping of the 256 bytes (what the ByteLevel pre-tokenizer emits)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


@functools.lru_cache(maxsize=16)
def load_tokenizer(model: str):
    """The model's tokenizer; named shapes and checkpoints without tokenizer files get bytes."""
    if model in NAMED_SHAPES:
        return byte_tokenizer()
    path = Path(model)
    has_files = path.is_dir() and any((path / f).exists() for f in
                                      ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    if path.is_dir() and not has_files:
        return byte_tokenizer()
    return AutoTokenizer.from_pretrained(model)


def max_model_len(config: PretrainedConfig) -> int:
    """Longest prompt + output the model accepts."""
    return int(getattr(config, "max_position_embeddings", 0) or 2048)


def eos_token_ids(config: PretrainedConfig) -> tuple[int, ...]:
    eos = config.eos_token_id
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
