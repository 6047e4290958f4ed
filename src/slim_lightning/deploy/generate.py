"""Text generation from a packed checkpoint: ``python -m slim_lightning.generate RUN/packed``.

Loads the checkpoint with :func:`slim_lightning.checkpoint.load_compressed` (no original weights
needed), streams the new text to stdout as it is generated (the prompt is not echoed) and ends
with one statistics line on stderr: new tokens, generation wall time, tokens/s (new tokens /
wall time, prefill included), peak RSS and, on CUDA, peak allocated GPU memory.

Examples::

    python -m slim_lightning.generate runs/default_smollm2/packed --prompt "What is Python?"
    echo "def fib(n):" | python -m slim_lightning.generate RUN/packed --prompt - --no-chat
    python -m slim_lightning.generate RUN/packed --prompt "Hi" --temperature 0 --dense-cache

On a CPU, ``--dense-cache`` (a dense copy of every layer: ~3x faster, dense-model memory) and
``--threads 1`` on a machine whose cores are busy (intra-op threads spin-wait) help most.

The chat template is applied when the tokenizer has one (``--no-chat`` feeds the prompt as
plain text). ``--temperature 0`` is greedy decoding; otherwise sampling with ``--top-p`` /
``--top-k``. Generation uses the KV cache. Bad input exits with a one-line ``error:`` message
and status 2 (1 for a failure while generating).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any

_DTYPES = ("float32", "float16", "bfloat16")
_BACKENDS = ("auto", "reference", "triton")
_DEVICES = ("auto", "cpu", "cuda")


def _int_at_least(lo: int) -> Any:
    """argparse type: an integer >= ``lo``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _temperature(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return v


def _top_p(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m slim_lightning.generate",
        description="Generate text with a packed slim-lightning checkpoint (RUN_DIR/packed).",
    )
    p.add_argument("checkpoint", help="packed checkpoint directory written by compress.py")
    p.add_argument("--prompt", required=True, help='prompt text; "-" reads it from stdin')
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, metavar="N")
    p.add_argument(
        "--temperature",
        type=_temperature,
        default=0.7,
        help="sampling temperature; 0 = greedy decoding (default 0.7)",
    )
    p.add_argument("--top-p", type=_top_p, default=1.0, help="nucleus sampling (default 1: off)")
    p.add_argument("--top-k", type=_non_negative_int, default=50, help="0 = off (default 50)")
    p.add_argument("--seed", type=_non_negative_int, default=None, help="sampling seed")
    p.add_argument("--device", choices=_DEVICES, default="auto")
    p.add_argument(
        "--dtype",
        choices=_DTYPES,
        default=None,
        help="activation dtype (default: the dtype the compression run computed in)",
    )
    p.add_argument(
        "--backend", choices=_BACKENDS, default="auto", help="SLiMLinear backend (default auto)"
    )
    p.add_argument(
        "--no-chat",
        action="store_true",
        help="feed the prompt as plain text even if the tokenizer has a chat template",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: torch's choice; 1 is often fastest on a busy machine)",
    )
    p.add_argument(
        "--dense-cache",
        action="store_true",
        help="cache dense weights per layer: ~3x faster on CPU, dense-model memory",
    )
    return p


def _fail(parser: argparse.ArgumentParser, msg: str) -> None:
    parser.exit(2, f"{parser.prog}: error: {msg}\n")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if text else type(e).__name__


def _resolve_device(parser: argparse.ArgumentParser, name: str) -> str:
    from ..device import resolve_device
    from ..errors import ConfigError

    try:
        return resolve_device(name, key="--device")
    except ConfigError as e:
        _fail(parser, str(e))


def prompt_ids(tokenizer: Any, prompt: str, chat: bool) -> tuple[Any, Any]:
    """``(input_ids, attention_mask)`` of ``prompt`` (chat-templated when ``chat`` and the
    tokenizer has a template)."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    return enc["input_ids"], enc.get("attention_mask")


def generation_kwargs(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """The ``model.generate`` keyword arguments the options ask for (KV cache on)."""
    kw: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "use_cache": True}
    if args.temperature == 0:
        kw["do_sample"] = False
        # neutral values: the model's generation config may carry sampling defaults
        kw.update(temperature=None, top_p=None, top_k=None)
    else:
        kw.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        kw["pad_token_id"] = pad
    return kw


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss``: KiB on Linux, bytes on
    macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def _max_positions(path: Path) -> int | None:
    """The model's position limit from ``config.json`` (None when it has none, e.g. ALiBi)."""
    import json

    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # load_compressed names the damaged file
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = cfg.get(key) if isinstance(cfg, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    path = Path(args.checkpoint).expanduser()
    if not path.exists():
        _fail(parser, f"checkpoint {path}: no such directory")
    if not path.is_dir():
        _fail(parser, f"checkpoint {path}: not a directory (pass RUN_DIR/packed)")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        _fail(parser, "--prompt: the prompt is empty" + (" (stdin)" if args.prompt == "-" else ""))
    device = _resolve_device(parser, args.device)
    positions = _max_positions(path)
    if positions is not None and args.max_new_tokens >= positions:
        _fail(
            parser,
            f"--max-new-tokens: got {args.max_new_tokens}; allowed: fewer than the model's "
            f"{positions} positions (config.json), prompt included",
        )

    import torch
    from transformers import TextStreamer

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from ..checkpoint import load_compressed
    from ..nn.backend import set_dense_cache

    try:
        model, tokenizer, _meta = load_compressed(
            path, device=device, dtype=args.dtype, backend=args.backend
        )
    except Exception as e:  # noqa: BLE001 - CheckpointError, backend errors: one line, no trace
        _fail(parser, f"cannot load {path}: {_one_line(e)}")
    if tokenizer is None:
        _fail(parser, f"checkpoint {path}: no tokenizer was saved with it")
    if args.dense_cache:
        set_dense_cache(model, True)
    model.config.use_cache = True  # (checkpoints of older versions were saved with it off)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True

    ids, mask = prompt_ids(tokenizer, prompt, chat=not args.no_chat)
    if positions is not None and ids.shape[1] + args.max_new_tokens > positions:
        _fail(
            parser,
            f"--max-new-tokens: got {args.max_new_tokens}; allowed: at most "
            f"{max(positions - ids.shape[1], 0)} (the prompt takes {ids.shape[1]} of the model's "
            f"{positions} positions)",
        )
    ids = ids.to(device)
    mask = mask.to(device) if mask is not None else None
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                streamer=streamer,
                **generation_kwargs(args, tokenizer),
            )
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    except KeyboardInterrupt:
        print(file=sys.stdout, flush=True)
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: one line, no trace
        print(f"\n{parser.prog}: error: generation failed: {_one_line(e)}", file=sys.stderr)
        return 1
    n_new = int(out.shape[1] - ids.shape[1])
    stats = (
        f"[{n_new} new tokens in {wall:.2f} s: {n_new / max(wall, 1e-9):.2f} tok/s | "
        f"prompt {ids.shape[1]} tokens | peak RSS {peak_rss_mib():.0f} MiB"
    )
    if device == "cuda":
        stats += f" | peak CUDA allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    print(stats + "]", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
