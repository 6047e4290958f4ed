"""engine.streaming: blocks read from safetensors shards one at a time (slim_lightning.compress.streaming).

A tiny LLaMA is saved as a sharded safetensors checkpoint (fp16, several shards, so the index
path and the export-dtype rounding are exercised); streaming and non-streaming runs must write
the same packed tensors and report the same perplexity.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from slim_lightning.app.compress_run import run_compress
from slim_lightning.checkpoint.load import read_weights
from slim_lightning.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def make_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="compress", overrides=["debug=default", *overrides])


def _save_tiny(directory: Path, kind: str = "llama", dtype=torch.float16) -> Path:
    from slim_lightning.models.tiny import tiny_model

    model, tok = tiny_model(kind=kind, seed=0)
    model.to(dtype)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="20KB")
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = _save_tiny(tmp_path_factory.mktemp("tiny_ckpt"))
    assert (d / "model.safetensors.index.json").is_file()
    assert len(list(d.glob("*.safetensors"))) > 2
    return d


def _overrides(path: Path, streaming: bool, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        f"+model.path={path}",
        "model.random_init=false",
        "eval_dense=false",
        f"engine.streaming={str(streaming).lower()}",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(ckpt, tmp_path_factory):
    out = {}
    for streaming in (False, True):
        run_dir = tmp_path_factory.mktemp(f"run_{streaming}")
        report = run_compress(make_cfg(_overrides(ckpt, streaming)), run_dir)
        out[streaming] = (run_dir, report)
    return out


def test_streaming_output_equals_non_streaming(runs):
    (d0, r0), (d1, r1) = runs[False], runs[True]
    assert r1["ppl"] == r0["ppl"] and r1["ppl"]["embedded"] > 1
    a = read_weights(d0 / "packed")
    b = read_weights(d1 / "packed")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert r1["resume"]["fingerprint"] == r0["resume"]["fingerprint"]
    assert r1["config"]["engine"]["streaming"] is True and r1["ppl_dense"] == {}


def test_no_dense_block_weight_left(ckpt, tmp_path):
    """After streaming compression every block linear is packed and nothing dense of it is
    left; blocks are read only when the engine reaches them (the rest stays on meta)."""
    from slim_lightning.compress.pipeline import load_base, load_or_compress
    from slim_lightning.compress.plan import build_plan
    from slim_lightning.nn.linear import SLiMLinear

    plan = build_plan(make_cfg(_overrides(ckpt, True, ("method=wanda_absmax",))))
    assert plan.dense_cache is False and plan.eval_dense is False
    base = load_base(plan)
    blocks = base.model.model.layers
    assert all(p.is_meta for p in blocks.parameters())  # nothing of the blocks read yet
    assert not base.model.model.embed_tokens.weight.is_meta
    real, seen = base.stream, []

    class Spy:
        def __getattr__(self, name):  # park / restore
            return getattr(real, name)

        def block_hook(self, i, block, stage):
            if stage == "load":  # block i is read now; later blocks are still on meta
                later = [p for j in range(i, len(blocks)) for p in blocks[j].parameters()]
                assert all(p.is_meta for p in later)
            real.block_hook(i, block, stage)
            if stage == "done":
                assert not any(type(m) is torch.nn.Linear for m in block.modules())
            seen.append((i, stage))

    base.stream = Spy()
    out = load_or_compress(plan, None, base=base)
    assert seen == [(0, "load"), (0, "done"), (1, "load"), (1, "done")]
    model = out.model
    assert not any(t.is_meta for t in model.state_dict().values())
    for block in model.model.layers:
        lins = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
        assert not lins and sum(isinstance(m, SLiMLinear) for m in block.modules()) == 7
        for m in block.modules():
            if isinstance(m, SLiMLinear):
                assert not m._dense_cache


def test_resume_after_interrupted_streaming_run(ckpt, runs, tmp_path, monkeypatch):
    from slim_lightning.compress import engine as calibration

    run_dir = tmp_path / "run"
    cfg = make_cfg(_overrides(ckpt, True))
    real_save = calibration.BlockStore.save_block

    def boom(self, i, *a, **k):
        real_save(self, i, *a, **k)
        if i == 0:
            raise KeyboardInterrupt("killed after block 0")

    monkeypatch.setattr(calibration.BlockStore, "save_block", boom)
    with pytest.raises(KeyboardInterrupt):
        run_compress(cfg, run_dir)
    monkeypatch.setattr(calibration.BlockStore, "save_block", real_save)
    prog = json.loads((run_dir / "calib_state" / "progress.json").read_text())
    assert prog["next_block"] == 1
    report = run_compress(cfg, run_dir)
    assert report["resumed_blocks"] == 1
    assert report["ppl"] == runs[False][1]["ppl"]
    a = read_weights(runs[False][0] / "packed")
    b = read_weights(run_dir / "packed")
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_checkpoint_without_safetensors_is_refused(tmp_path):
    from slim_lightning.models.tiny import tiny_model

    model, tok = tiny_model(kind="llama", seed=0)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    tok.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="safetensors"):
        run_compress(make_cfg(_overrides(tmp_path, True)), tmp_path / "run")


def test_tied_opt_checkpoint_streams_identically(tmp_path):
    """OPT ties its LM head to the embedding (absent from the checkpoint) and has learned
    positions; fp32 weights, export.dtype=float16 rounding."""
    d = _save_tiny(tmp_path / "opt", kind="opt", dtype=torch.float32)
    extra = ("model.tiny.kind=opt", "export.dtype=float16", "method=wanda_absmax")
    reports = {}
    for streaming in (False, True):
        run_dir = tmp_path / f"run_{streaming}"
        reports[streaming] = run_compress(make_cfg(_overrides(d, streaming, extra)), run_dir)
    assert reports[True]["ppl"] == reports[False]["ppl"]
    a = read_weights(tmp_path / "run_False" / "packed")
    b = read_weights(tmp_path / "run_True" / "packed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the streamed shards drop the tied keys and record the same metadata
    ma, mb = (
        json.loads((tmp_path / f"run_{s}" / "packed" / "slim.json").read_text())
        for s in (False, True)
    )
    assert ma["tied_to"] and all(ma[k] == mb[k] for k in ("tied_to", "layers", "base_sha256"))


def test_random_tiny_model_cannot_stream(tmp_path):
    cfg = make_cfg(["engine.streaming=true", "eval_dense=false"])
    with pytest.raises(ConfigError, match="engine.streaming"):
        run_compress(cfg, tmp_path / "run")


def _no_upcast_hooks(model) -> bool:
    return not any("_slim_upcast_hooks" in m.__dict__ for m in model.modules())


def test_blocks_offloaded_and_read_in_16_bits(ckpt, tmp_path):
    """With a resume state, a committed block goes back to meta ("offload") and the packed
    blocks are re-installed from the state at the end; a block's linears are held in their
    16-bit checkpoint dtype (fp16 here) while it is compressed, and the model ends in fp32
    with no upcast hooks left."""
    from slim_lightning.compress.pipeline import load_base, load_or_compress
    from slim_lightning.compress.plan import build_plan
    from slim_lightning.nn.embedding import PackedEmbedding
    from slim_lightning.nn.linear import SLiMLinear

    plan = build_plan(make_cfg(_overrides(ckpt, True)))
    assert plan.model.dtype == "float32"
    base = load_base(plan)
    blocks = base.model.model.layers
    real, seen = base.stream, []
    emb = base.model.model.embed_tokens
    assert emb.weight.dtype == torch.float16  # vocabulary tables: 16 bits, computing in fp32
    assert base.model.model.embed_tokens(torch.tensor([[1, 2]])).dtype == torch.float32

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def __setattr__(self, name, value):  # compress_model's low_precision_linears
            setattr(real, name, value)

        def block_hook(self, i, block, stage):
            real.block_hook(i, block, stage)
            if stage == "load":
                lins = [m for m in block.modules() if type(m) is torch.nn.Linear]
                assert len(lins) == 7 and all(m.weight.dtype == torch.float16 for m in lins)
                earlier = [p for j in range(i) for p in blocks[j].parameters()]
                assert earlier and all(p.is_meta for p in earlier) if i else True
            if stage == "offload":
                assert all(t.is_meta for t in block.state_dict().values())
            seen.append((i, stage))

    base.stream = Spy()
    out = load_or_compress(plan, tmp_path / "run", base=base)
    assert seen == [(i, s) for i in range(2) for s in ("load", "done", "offload")] + [
        (i, "reload") for i in range(2)
    ]
    assert not list((tmp_path / "run" / "offloaded").iterdir())
    model = out.model
    sd = model.state_dict()
    assert not any(t.is_meta for t in sd.values())
    assert all(t.dtype != torch.float16 for t in sd.values() if t.is_floating_point())
    assert isinstance(model.model.embed_tokens, PackedEmbedding) and _no_upcast_hooks(model)
    assert sum(isinstance(m, SLiMLinear) for m in model.model.layers.modules()) == 14
    assert len(out.calib_result.reports) == 14


@pytest.mark.parametrize(
    "dtype,extra",
    [
        (torch.float16, ("embeddings.bits=null",)),  # 16-bit tables widened at the end
        (torch.float16, ("export.packed=false", "export.hf=true")),  # merged: fp32 linears
        (torch.bfloat16, ("export.dtype=float16",)),  # bf16 linears exact; tables re-rounded
    ],
)
def test_streaming_variants_equal_non_streaming(tmp_path, dtype, extra):
    d = _save_tiny(tmp_path / "ckpt", dtype=dtype)
    extra = ("method=wanda_absmax", *extra)
    reports = {}
    for streaming in (False, True):
        reports[streaming] = run_compress(
            make_cfg(_overrides(d, streaming, extra)), tmp_path / f"run_{streaming}"
        )
    assert reports[True]["ppl"] == reports[False]["ppl"]
    sub = "hf" if "export.packed=false" in extra else "packed"
    a = read_weights(tmp_path / "run_False" / sub)
    b = read_weights(tmp_path / "run_True" / sub)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_dense_perplexity_streams_block_by_block(ckpt, tmp_path):
    """eval_dense with streaming: the dense model is evaluated one block at a time (read,
    run, evicted) and gives the whole-model perplexity exactly."""
    from slim_lightning.compress.pipeline import load_base
    from slim_lightning.compress.plan import build_plan
    from slim_lightning.data.evaluation import make_eval_windows, perplexity, streaming_perplexity

    base_over = [f"+model.path={ckpt}", "model.random_init=false"]
    plan = build_plan(make_cfg([*base_over, "engine.streaming=true"]))
    assert plan.eval_dense is True
    whole = load_base(build_plan(make_cfg(base_over)))
    windows = make_eval_windows(whole.tokenizer, plan.eval)
    want = perplexity(whole.model, windows, batch_size=2, progress=False)
    streamed = load_base(plan)
    model, stream = streamed.model, streamed.stream
    got = streaming_perplexity(model, windows, stream=stream, batch_size=2, progress=False)
    assert got == want
    assert all(t.is_meta for t in model.model.layers.state_dict().values())  # all evicted
    assert model.model.layers is stream.blocks and _no_upcast_hooks(model.model.layers)

    report = run_compress(make_cfg([*base_over, "engine.streaming=true"]), tmp_path / "run")
    one = perplexity(whole.model, windows, batch_size=1, progress=False)  # the run's batches
    assert report["ppl_dense"]["embedded"] == one["ppl"]
    assert report["ppl"]["embedded"] > 1 and "ppl_dense_skipped" not in report


def test_corrupt_block_tensor_is_named(tmp_path):
    """A NaN in a block's weight stops the streaming run when that block is read, naming it."""
    from safetensors.torch import save_file

    d = _save_tiny(tmp_path / "ckpt")
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.1.mlp.up_proj.weight"
    shard = d / index[key]
    tensors = load_file(shard)
    tensors[key][3, 5] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj\.weight .* 1 NaN/Inf"):
        run_compress(make_cfg(_overrides(d, True, ("method=wanda_absmax",))), tmp_path / "run")


def test_blocks_are_offloaded_without_a_resume_state(ckpt, runs, tmp_path, monkeypatch):
    """engine.resume=false: no resume state, but finished blocks still wait on disk."""
    from slim_lightning.compress.streaming import StreamingSource

    seen = []
    real = StreamingSource.offload_block

    def spy(self, i, block):
        real(self, i, block)
        seen.append(i)
        assert all(t.is_meta for t in block.state_dict().values())

    monkeypatch.setattr(StreamingSource, "offload_block", spy)
    run_dir = tmp_path / "run"
    report = run_compress(make_cfg(_overrides(ckpt, True, ("engine.resume=false",))), run_dir)
    assert seen == [0, 1] and not (run_dir / "calib_state").exists()
    assert report["ppl"] == runs[False][1]["ppl"]
    a = read_weights(runs[False][0] / "packed")
    b = read_weights(run_dir / "packed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage", ["truncated", "missing", "index_lists_absent_tensor"])
def test_damaged_shards_are_named_before_any_weights_load(tmp_path, monkeypatch, damage):
    """Streaming reads every shard's header at start: a truncated or missing shard, or an index
    listing a tensor its shard lacks, is refused naming the file and model.path."""
    d = _save_tiny(tmp_path / "ckpt")
    index_file = d / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    key = "model.layers.1.mlp.up_proj.weight"
    shard = d / index["weight_map"][key]
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
        want = rf"{shard.name} is damaged"
    elif damage == "missing":
        shard.unlink()
        want = rf"{shard.name} is listed in .* but missing"
    else:
        index["weight_map"]["model.layers.1.mlp.extra.weight"] = shard.name
        index_file.write_text(json.dumps(index))
        want = rf"{shard.name} lacks 1 of its tensors"

    def refuse(*a, **k):
        raise AssertionError("a block was read before the damaged shard was refused")

    monkeypatch.setattr("slim_lightning.models.shards.ShardReader.read", refuse)
    with pytest.raises(ConfigError, match=r"model\.path") as err:
        run_compress(make_cfg(_overrides(d, True, ("method=wanda_absmax",))), tmp_path / "run")
    assert re.search(want, str(err.value)), str(err.value)
    assert str(d) in str(err.value)
