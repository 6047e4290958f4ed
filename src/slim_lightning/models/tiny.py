"""Tiny random models: a LLaMA, an OPT or any family of ``FAMILIES`` (hidden 64, 2 layers,
vocab 259) and the offline byte-level tokenizer they share (built in-process: no files, no network).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import check_choice


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable-char map (what the ByteLevel pre-tokenizer emits)
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_VOCAB_SPECIALS = ("<pad>", "<s>", "</s>")


def byte_tokenizer() -> Any:
    """An offline byte-level tokenizer: ids 0-2 are ``<pad> <s> </s>``, 3-258 the 256 bytes.

    Built in-process with ``tokenizers`` (no files, no network); lossless on any UTF-8 text and
    it round-trips through ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(_BYTE_VOCAB_SPECIALS)
    vocab = {s: i for i, s in enumerate(specials)}
    for _b, ch in sorted(_bytes_to_unicode().items()):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        name_or_path="slim_lightning/byte-tokenizer",
    )


#: per family, what a tiny random model of it needs beyond the common fields (transformers'
#: own config classes; no download): heads of 16 wide, sliding windows shorter than the test
#: windows, both Gemma 3 layer types, 4 experts (top 2) for the mixtures of experts
FAMILIES: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": 16},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 8},
    "gemma3_text": {
        "head_dim": 16,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "phi3": {},
    "phi": {},
    "olmo2": {},
    "granite": {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "logits_scaling": 2.0},
    "gpt_neox": {},
    "starcoder2": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
    },
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "head_dim": 16,
    },
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
}
TINY_KINDS: tuple[str, ...] = ("llama", "opt", *FAMILIES)


def tiny_config(kind: str = "llama", **overrides: Any) -> Any:
    """The Hugging Face config of :func:`tiny_model` (hidden 64, 2 layers, vocab 259)."""
    from transformers import AutoConfig, LlamaConfig, OPTConfig

    check_choice("model.tiny.kind", kind, TINY_KINDS)
    common = dict(
        vocab_size=len(_BYTE_VOCAB_SPECIALS) + 256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        use_cache=False,
    )
    if kind == "llama":
        return LlamaConfig(
            **{
                **common,
                "intermediate_size": 128,
                "num_key_value_heads": 2,
                "tie_word_embeddings": False,
                **overrides,
            }
        )
    if kind == "opt":
        return OPTConfig(**{**common, "ffn_dim": 128, "word_embed_proj_dim": 64, **overrides})
    family = {"intermediate_size": 128, "num_key_value_heads": 2, **FAMILIES[kind]}
    return AutoConfig.for_model(kind, **{**common, **family, **overrides})


def tiny_model(kind: str = "llama", seed: int = 0, **overrides: Any) -> tuple[nn.Module, Any]:
    """A tiny random decoder (hidden 64, 2 layers, vocab 259) and a byte-level tokenizer.

    Args:
        kind: ``llama``, ``opt`` or a family of ``FAMILIES`` (``TINY_KINDS``).
        seed: initialisation seed (the global RNG state is left untouched).
        **overrides: config fields to change (e.g. ``num_hidden_layers=3``).

    Returns:
        ``(model, tokenizer)``; the model is fp32, in eval mode, ``use_cache`` off.
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM, OPTForCausalLM

    config = tiny_config(kind, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind in ("llama", "opt"):
            model = (LlamaForCausalLM if kind == "llama" else OPTForCausalLM)(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model, byte_tokenizer()
