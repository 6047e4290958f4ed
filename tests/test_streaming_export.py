"""Streaming exports (engine.streaming): the packed checkpoint and the ``hf/`` model are written
one decoder block at a time as sharded safetensors (slim_lightning.checkpoint.stream_save,
slim_lightning.app.stream_export) and hold what the whole-model writers write.

One tiny LLaMA (fp16 shards, 8-bit vocabulary tables, a packed LM head, 4-bit adapters) is
compressed twice with ``export.hf=true``: whole and streaming.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_streaming import _overrides, _save_tiny, make_cfg

from slim_lightning import load_compressed
from slim_lightning.app.compress_run import run_compress
from slim_lightning.checkpoint.load import read_weights
from slim_lightning.checkpoint.stream_save import save_streaming
from slim_lightning.errors import CheckpointError, ConfigError
from slim_lightning.io import file_sha256

IDS = torch.tensor([[1, 5, 9, 200, 3, 17, 42, 8]])
N_BLOCKS = 2  # the tiny model's


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """``{streaming: run_dir}``; the streaming run also records how many blocks were
    materialised at once while the exports ran (at most one)."""
    from slim_lightning.compress import streaming

    root = tmp_path_factory.mktemp("stream_export")
    ckpt = _save_tiny(root / "ckpt")
    from slim_lightning.checkpoint import stream_save

    original = streaming.StreamingSource.opened
    original_read = stream_save.FileBlock.read
    seen: list[int] = []
    reads: list[list[str]] = []

    def read(self, keys):
        reads.append(list(keys))
        return original_read(self, keys)

    @contextmanager
    def opened(self, i):
        with original(self, i) as block:
            seen.append(sum(any(not t.is_meta for t in b.parameters()) for b in self.blocks))
            yield block

    out = {}
    for s in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(streaming.StreamingSource, "opened", opened)
            mp.setattr(stream_save.FileBlock, "read", read)
            run_compress(make_cfg(_overrides(ckpt, s, ("export.hf=true",))), root / f"run_{s}")
        out[s] = root / f"run_{s}"
    out["opened"], out["reads"] = seen, reads
    return out


def _shards(n: int) -> list[str]:
    return [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


def _same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].reshape(-1).view(torch.uint8).equal(b[k].reshape(-1).view(torch.uint8)), k


def test_packed_shards_hold_the_whole_model_checkpoint(pair):
    whole, streamed = pair[False] / "packed", pair[True] / "packed"
    n = N_BLOCKS + 1
    assert not (streamed / "model.safetensors").exists()
    assert sorted(p.name for p in streamed.glob("*.safetensors")) == _shards(n)
    assert not list(whole.glob("model-*"))  # the whole-model path: one file, no index
    assert not (whole / "model.safetensors.index.json").exists()
    _same_tensors(load_file(whole / "model.safetensors"), read_weights(streamed))
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    per_shard = {name: load_file(streamed / name) for name in _shards(n)}
    assert index["weight_map"] == {k: f for f, ts in per_shard.items() for k in ts}
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for ts in per_shard.values() for t in ts.values()
    )
    for i in range(N_BLOCKS):  # shard i + 2 holds block i and nothing else
        assert {k.split(".")[2] for k in per_shard[_shards(n)[i + 1]]} == {str(i)}
    assert not any(k.startswith("model.layers.") for k in per_shard[_shards(n)[0]])
    assert pair["opened"] and max(pair["opened"]) == 1  # never a second block in memory
    # the packed writer reads one layer (or one tensor) of a block at a time
    assert pair["reads"] and all(len({k.rpartition(".")[0] for k in r}) == 1 for r in pair["reads"])


def test_slim_json_and_config_equal_the_whole_model_ones(pair):
    from slim_lightning.nn.adapters import state_hashes

    whole, streamed = pair[False] / "packed", pair[True] / "packed"
    a = json.loads((whole / "slim.json").read_text())
    b = json.loads((streamed / "slim.json").read_text())
    header = {"checkpoint_bytes", "checkpoint_ratio_vs_fp16"}  # each shard has its own header
    assert {k: v for k, v in a["size"].items() if k not in header} == {
        k: v for k, v in b["size"].items() if k not in header
    }
    shards = [streamed / s for s in _shards(N_BLOCKS + 1)]
    assert b["size"]["checkpoint_bytes"] == sum(f.stat().st_size for f in shards)
    for key in set(a) | set(b):
        if key not in ("files", "size"):
            assert a[key] == b[key], key
    assert list(a["layers"]) == list(b["layers"])  # the same order too
    assert b["base_sha256"] == state_hashes(load_compressed(whole)[0])["base"]
    assert b["files"] == {
        f.name: file_sha256(f) for f in sorted(streamed.iterdir()) if f.name != "slim.json"
    }
    for name in ("config.json", "generation_config.json"):
        assert json.loads((whole / name).read_text()) == json.loads((streamed / name).read_text())


def test_sharded_checkpoint_loads_to_the_same_logits(pair):
    from transformers import AutoModelForCausalLM

    whole, streamed = pair[False] / "packed", pair[True] / "packed"
    with torch.no_grad():
        ref = load_compressed(whole)[0](IDS).logits
        assert torch.equal(load_compressed(streamed)[0](IDS).logits, ref)
        hf_ref = AutoModelForCausalLM.from_pretrained(whole).eval()(IDS).logits
        hf = AutoModelForCausalLM.from_pretrained(streamed).eval()(IDS).logits
    assert torch.equal(hf, hf_ref) and torch.equal(hf, ref)


def test_hf_export_is_streamed_with_the_same_tensors(pair):
    from transformers import AutoModelForCausalLM

    whole, streamed = pair[False] / "hf", pair[True] / "hf"
    assert sorted(p.name for p in streamed.glob("*.safetensors")) == _shards(N_BLOCKS + 1)
    _same_tensors(load_file(whole / "model.safetensors"), read_weights(streamed))
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert json.loads((whole / name).read_text()) == json.loads((streamed / name).read_text())
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(whole).eval()(IDS).logits
        b = AutoModelForCausalLM.from_pretrained(streamed).eval()(IDS).logits
    assert torch.equal(a, b)
    assert not list((pair[True] / "offloaded").glob("*.safetensors"))  # emptied once written


@pytest.mark.parametrize("damage", ["corrupt", "missing", "extra"])
@pytest.mark.parametrize("door", ["load_compressed", "from_pretrained"])
def test_damaged_shards_are_refused_naming_the_file(pair, tmp_path, damage, door):
    from transformers import AutoModelForCausalLM

    d = tmp_path / "packed"
    shutil.copytree(pair[True] / "packed", d)
    name = _shards(N_BLOCKS + 1)[1]
    if damage == "corrupt":  # one byte of a tensor (a header edit would not parse)
        raw = bytearray((d / name).read_bytes())
        raw[-3] ^= 0xFF
        (d / name).write_bytes(bytes(raw))
    elif damage == "missing":
        (d / name).unlink()
    else:
        name = "model-00004-of-00004.safetensors"
        save_file({"x": torch.zeros(2)}, str(d / name))
    with pytest.raises(CheckpointError, match=name):
        if door == "load_compressed":
            load_compressed(d)
        else:
            AutoModelForCausalLM.from_pretrained(d)
    if damage != "corrupt":  # structural: refused without the digests too
        with pytest.raises(CheckpointError, match=name):
            load_compressed(d, verify=False)


def test_write_safetensors_writes_the_bytes_save_file_writes(tmp_path):
    from slim_lightning.checkpoint.shards_out import write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {
        "w.codes": torch.randint(0, 255, (7, 5), generator=g, dtype=torch.uint8),
        "w.scale": torch.randn(7, 1, generator=g).half(),
        "a.bf": torch.randn(3, generator=g).bfloat16(),
        "b.mask": torch.rand(4, 4, generator=g) > 0.5,
        "c.idx": torch.arange(6, dtype=torch.int64).reshape(2, 3).t(),  # not contiguous
        "d.i8": torch.randint(-8, 7, (9,), generator=g, dtype=torch.int8),
        "e.i32": torch.arange(3, dtype=torch.int32),
        "f.i16": torch.arange(2, dtype=torch.int16),
        "g.f32": torch.randn(2, 3, generator=g),
        "g.scalar": torch.tensor(1.5),
        "h.empty": torch.zeros(0, 4),
    }
    ref = tmp_path / "ref.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(ref), metadata={"format": "pt"})
    sha, size = write_safetensors(tmp_path / "mine.safetensors", tensors, {"format": "pt"})
    assert (tmp_path / "mine.safetensors").read_bytes() == ref.read_bytes()
    assert sha == file_sha256(ref) and size == ref.stat().st_size


def test_whole_model_file_is_what_the_shard_writer_writes(pair, tmp_path):
    """The one-file path (still ``safetensors.save_file``) and the shard writer give the same
    bytes for the same tensors, so both layouts are the standard format."""
    from slim_lightning.checkpoint.shards_out import write_safetensors

    f = pair[False] / "packed" / "model.safetensors"
    write_safetensors(tmp_path / "again.safetensors", load_file(f), {"format": "slim-lightning"})
    assert (tmp_path / "again.safetensors").read_bytes() == f.read_bytes()


def _blocks_on_disk(model, directory: Path):
    """``model``'s blocks as a streaming run leaves them: each block's state dict in a file of
    its own with its layers' metadata (``open`` yields a fresh copy of the block)."""
    import copy

    from slim_lightning.checkpoint.stream_save import FileBlock, OffloadedBlocks
    from slim_lightning.nn.linear import SLiMLinear

    layers = copy.deepcopy(model.model.layers)
    directory.mkdir()
    files = []
    for i, block in enumerate(layers):
        save_file(
            {k: v.contiguous() for k, v in block.state_dict().items()},
            str(directory / f"{i}.safetensors"),
        )
        metas = {n: m.meta() for n, m in block.named_modules() if isinstance(m, SLiMLinear)}
        files.append(FileBlock(directory / f"{i}.safetensors", metas))
    return OffloadedBlocks(
        "model.layers",
        len(layers),
        lambda i: nullcontext(copy.deepcopy(layers[i])),
        files.__getitem__,
    )


def test_a_failed_shard_write_leaves_no_output(pair, tmp_path, monkeypatch):

    model, tok, _ = load_compressed(pair[False] / "packed")
    blocks = _blocks_on_disk(model, tmp_path / "offloaded")
    out = tmp_path / "packed"
    monkeypatch.setenv("SLIM_FAULT", "enospc:write packed/model-00003-of-00003.safetensors")
    with pytest.raises(OSError, match="No space"):
        save_streaming(model, blocks, tok, out, dtype="float16")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["offloaded"]
    monkeypatch.delenv("SLIM_FAULT")
    save_streaming(model, blocks, tok, out, dtype="float16")
    _same_tensors(read_weights(out), read_weights(pair[True] / "packed"))


def test_off_grid_adapters_are_requantised_in_both_streamed_exports(pair, tmp_path):
    """Adapters moved off their 4-bit grid (as training leaves them) are snapped back before
    they are packed, and the streamed ``hf/`` merges the snapped values, as the whole-model
    exports do; the blocks are read from files, as a streaming run's are."""
    from slim_lightning.app.export import write_hf
    from slim_lightning.app.stream_export import write_hf_streaming
    from slim_lightning.checkpoint import save_compressed

    def off_grid():
        model, tok, _ = load_compressed(pair[False] / "packed")
        layer = model.model.layers[1].mlp.down_proj
        with torch.no_grad():
            layer.lora_l.add_(1e-3)
        assert not layer.adapters_on_grid()
        return model, tok

    model, tok = off_grid()
    save_compressed(model, tok, tmp_path / "p_whole", dtype="float16")
    write_hf(model, tok, tmp_path / "h_whole", packed=True)
    model, tok = off_grid()
    blocks = _blocks_on_disk(model, tmp_path / "offloaded")
    save_streaming(model, blocks, tok, tmp_path / "p", dtype="float16")
    write_hf_streaming(model, blocks, tok, tmp_path / "h", packed=True, requantize=True)
    _same_tensors(read_weights(tmp_path / "p_whole"), read_weights(tmp_path / "p"))
    _same_tensors(read_weights(tmp_path / "h_whole"), read_weights(tmp_path / "h"))
    a = json.loads((tmp_path / "p_whole" / "slim.json").read_text())
    b = json.loads((tmp_path / "p" / "slim.json").read_text())
    assert a["base_sha256"] == b["base_sha256"] and a["layers"] == b["layers"]


def test_size_estimate_from_the_offloaded_metadata(pair):
    from slim_lightning.checkpoint.layout import linear_sizes
    from slim_lightning.nn.linear import SLiMLinear

    model = load_compressed(pair[False] / "packed")[0]
    whole = linear_sizes(model)
    metas = {}
    for name, m in list(model.model.layers.named_modules()):
        if isinstance(m, SLiMLinear):
            metas[f"model.layers.{name}"] = m.meta()
            with torch.device("meta"):
                model.model.layers.set_submodule(
                    name, torch.nn.Linear(m.in_features, m.out_features)
                )
    assert linear_sizes(model, metas) == whole and whole["packed_bytes"] > 0


def test_servable_export_is_refused_with_streaming_before_loading(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the run was refused")

    monkeypatch.setattr("slim_lightning.compress.pipeline.load_base", refuse)
    ckpt = _save_tiny(tmp_path / "ckpt")
    cfg = make_cfg(_overrides(ckpt, True, ("export.servable=true",)))
    with pytest.raises(ConfigError, match=r"export\.servable.*engine\.streaming"):
        run_compress(cfg, tmp_path / "run")
