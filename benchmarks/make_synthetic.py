"""Writes a synthetic LLaMA-width checkpoint for the streaming benchmark (``engine.streaming``).

LLaMA-7B widths (hidden 4096, intermediate 11008, 32 heads) with ``--layers`` blocks, vocab 32000,
untied LM head, weights ~ N(0, 0.02) in fp16 (norms = 1), ``--kv-heads`` key-value heads (GQA;
default: as many as ``--heads``), sharded safetensors of about
``--shard-gb`` GB each with ``model.safetensors.index.json``, ``config.json`` and the project's
offline byte-level tokenizer (ids < 259 < vocab). 8 blocks: 1.88 B parameters, 3.76 GB.

Tensors are generated one at a time and each shard is written as soon as it is full, so this
script holds about one shard in memory.

    python benchmarks/make_synthetic.py /tmp/synth_llama --layers 8
    # TinyLlama-1.1B's shape (22 blocks, GQA with 4 key-value heads): 1.10 B parameters
    python benchmarks/make_synthetic.py /tmp/synth22 --layers 22 --hidden 2048 \
        --intermediate 5632 --heads 32 --kv-heads 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def tensor_specs(
    layers: int, hidden: int, inter: int, vocab: int, kv: int | None = None
) -> list[tuple[str, tuple]]:
    kv = hidden if kv is None else kv  # rows of k_proj / v_proj: kv heads x head_dim
    specs = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    specs += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return specs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from slim_lightning.models.tiny import byte_tokenizer

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    kv_heads = args.heads if args.kv_heads is None else args.kv_heads
    if args.hidden % args.heads or args.heads % kv_heads:
        raise SystemExit(
            f"--hidden {args.hidden} must split into --heads {args.heads}, and --heads into "
            f"--kv-heads {kv_heads}"
        )
    kv = kv_heads * (args.hidden // args.heads)
    specs = tensor_specs(args.layers, args.hidden, args.intermediate, args.vocab, kv)
    limit = int(args.shard_gb * 1e9)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, total, weight_map, names = 0, 0, {}, []

    def flush() -> None:
        nonlocal size
        if shards[-1]:
            name = f"model-{len(names) + 1:05d}.safetensors"
            save_file(shards[-1], str(out / name), metadata={"format": "pt"})
            names.append(name)
            for k in shards[-1]:
                weight_map[k] = name
            shards[-1] = {}
            size = 0

    for key, shape in specs:
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.float16)
        else:
            t = (torch.randn(shape, generator=g) * 0.02).to(torch.float16)
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > limit:
            flush()
        shards[-1][key] = t
        size += nbytes
        total += nbytes
    flush()
    n = len(names)
    final = {}
    for i, old in enumerate(names):  # the HF naming: model-0000i-of-0000n.safetensors
        new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (out / old).rename(out / new)
        final[old] = new
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: final[v] for k, v in weight_map.items()},
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config.dtype = "float16"
    config.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    params = sum(torch.Size(s).numel() for _, s in specs)
    print(json.dumps({"dir": str(out), "params": params, "fp16_bytes": total, "shards": n}))


if __name__ == "__main__":
    main()
