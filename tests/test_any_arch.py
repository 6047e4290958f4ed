"""Any decoder: blocks and linears found from the model itself, each block replayed with its own
arguments, and the whole pipeline (compress, pack, reload) on tiny random models of every family
transformers builds offline from its own config classes.
"""

from __future__ import annotations

import pytest
import torch

from slim_lightning.models.arch import (
    block_kwargs,
    block_output,
    capture_block_inputs,
    get_arch,
    get_blocks,
)
from slim_lightning.models.tiny import TINY_KINDS, tiny_model

MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def _ids(n: int = 4, t: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (n, t), generator=g)


def _own_last_block_outputs(model, blocks, ids, bs):
    outs = []
    hook = blocks[-1].register_forward_hook(lambda _m, _a, o: outs.append(block_output(o)))
    try:
        with torch.no_grad():
            for s in range(0, ids.shape[0], bs):
                model(input_ids=ids[s : s + bs], use_cache=False)
    finally:
        hook.remove()
    return outs


def _replay(blocks, hidden, kwargs, per_block=True):
    with torch.no_grad():
        for i, block in enumerate(blocks):
            kws = block_kwargs(kwargs, i) if per_block else kwargs
            hidden = [block_output(block(x, **kw)) for x, kw in zip(hidden, kws)]
    return hidden


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_dense_replay_is_the_models_own_forward(kind):
    """Block by block, each with the arguments the model's own forward hands it, gives the
    model's own last-block output exactly (what ``method=dense`` through the engine computes)."""
    model, _ = tiny_model(kind, num_hidden_layers=3 if kind != "gemma3_text" else 2)
    arch = get_arch(model)
    blocks = get_blocks(model, arch)
    assert arch.linear_names, kind
    ids = _ids()
    ref = _own_last_block_outputs(model, blocks, ids, 2)
    hidden, kwargs = capture_block_inputs(model, blocks, ids, 2)
    assert len(kwargs) == 2 and all(len(kw) == len(blocks) for kw in kwargs)
    got = _replay(blocks, hidden, kwargs)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text"])
def test_alternating_layers_need_their_own_arguments(kind):
    """Sliding-window and global layers get different masks (and, in Gemma 3, rotary tables):
    replaying every block with block 0's arguments, the old engine's way, is measurably wrong."""
    model, _ = tiny_model(kind)
    blocks = get_blocks(model, get_arch(model))
    ids = _ids(t=32)
    ref = _own_last_block_outputs(model, blocks, ids, 2)
    h0, kw0 = capture_block_inputs(model, blocks[0], ids, 2)  # block 0's arguments only
    wrong = _replay(blocks, h0, kw0, per_block=False)
    assert max((a - b).abs().max().item() for a, b in zip(wrong, ref)) > 1e-3
    hidden, kwargs = capture_block_inputs(model, blocks, ids, 2)
    assert kwargs[0][0] is not kwargs[0][1]  # the two layer types' arguments differ
    for a, b in zip(_replay(blocks, hidden, kwargs), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", MOE)
def test_experts_are_linears_of_the_blocks_and_routers_stay_dense(kind):
    model, _ = tiny_model(kind)
    arch = get_arch(model)
    names = arch.linear_names
    assert any(".experts.3." in n for n in names), names
    assert not any(n.endswith("gate") or "router" in n for n in names), names
    assert all(
        isinstance(model.get_submodule(f"{arch.blocks_path}.0.{n}"), torch.nn.Linear) for n in names
    )


def test_discovery_refuses_what_it_does_not_understand():
    from torch import nn

    from slim_lightning.models.discover import UnsupportedArchitecture

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "odd"})()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)), nn.Identity()])

    with pytest.raises(UnsupportedArchitecture, match="no decoder block list"):
        get_arch(Odd())

    class Blk(nn.Module):
        def __init__(self, k):
            super().__init__()
            self.a = nn.Linear(4, 4)
            if k:
                self.b = nn.Linear(4, 4)

    class Mixed(nn.Module):
        _no_split_modules = ["Blk"]

        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Blk(0), Blk(1)])

    with pytest.raises(UnsupportedArchitecture, match="blocks differ"):
        get_arch(Mixed())


def _compress(kind: str, method: str, run_dir, extra=()):
    from conftest import compose_config

    from slim_lightning.app.compress_run import run_compress

    cfg = compose_config(
        "compress",
        [
            "debug=default",
            f"model.tiny.kind={kind}",
            f"method={method}",
            "eval_dense=false",
            *extra,
        ],
    )
    return cfg, run_compress(cfg, run_dir)


@pytest.mark.parametrize("method", ["slim_q", "slim_q_fast"])
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_compress_pack_and_reload_every_family(kind, method, tmp_path):
    """The default method and slim_q_fast compress every family; the packed checkpoint loads
    through ``load_compressed`` and ``from_pretrained`` to the run's own perplexity and equal
    logits."""
    from transformers import AutoModelForCausalLM

    import slim_lightning  # noqa: F401 - registers the quantizer with transformers
    from slim_lightning import load_compressed
    from slim_lightning.compress.plan import build_plan
    from slim_lightning.data.evaluation import make_eval_windows, perplexity
    from slim_lightning.nn.linear import SLiMLinear

    cfg, report = _compress(kind, method, tmp_path)
    model, tok, meta = load_compressed(tmp_path / "packed")
    arch = get_arch(model)
    n_blocks = len(get_blocks(model, arch))
    packed = [n for n, m in model.named_modules() if isinstance(m, SLiMLinear)]
    assert len([n for n in packed if n.startswith(arch.blocks_path + ".")]) == n_blocks * len(
        arch.linear_names
    )
    assert len(report["layers"]) == n_blocks * len(arch.linear_names)
    windows = make_eval_windows(tok, build_plan(cfg).eval)
    ppl = perplexity(model, windows, progress=False)["ppl"]
    assert ppl == pytest.approx(report["ppl"]["embedded"], rel=1e-5)
    import transformers

    from slim_lightning.deploy.hf_quantizer import MOE_FROM, _major_minor
    from slim_lightning.errors import CheckpointError

    if kind in MOE and _major_minor(transformers.__version__) < MOE_FROM:
        with pytest.raises(CheckpointError, match="load_compressed"):
            AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
        return
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "packed").eval()
    with torch.no_grad():
        a = model(input_ids=windows[:2]).logits
        b = hf(input_ids=windows[:2]).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_peft_trains_five_steps_on_every_family(kind, tmp_path):
    """``train.py +peft=true`` on each family: 5 steps, only adapters move, the result packs."""
    from conftest import compose_config
    from safetensors.torch import load_file

    from slim_lightning.app.train_run import run_train

    cfg = compose_config(
        "train",
        [
            "debug=train",
            "logger=none",
            "engine.progress=false",
            "+peft=true",
            f"model.tiny.kind={kind}",
            "trainer.max_steps=5",
            "train.eval_before=false",
            "train.val_every_n_steps=0",
            "eval.max_windows=1",
        ],
    )
    rep = run_train(cfg, tmp_path)
    assert rep["train"]["steps"] == 5
    before = load_file(tmp_path / "compressed" / "model.safetensors")
    after = load_file(tmp_path / "packed" / "model.safetensors")
    assert before.keys() == after.keys()
    lora = [k for k in after if ".adapter_" in k]
    assert lora and any(not torch.equal(before[k], after[k]) for k in lora)
    assert all(torch.equal(before[k], after[k]) for k in after if ".weight_" in k)


#: torchrun in the default run for one family of each structure (alternating layers, fused
#: projections, parallel attention + MLP, experts); every family with ``-m slow``
TORCHRUN_DEFAULT = ("gemma3_text", "phi3", "gpt_neox", "mixtral")


@pytest.mark.parametrize(
    "kind",
    [k if k in TORCHRUN_DEFAULT else pytest.param(k, marks=pytest.mark.slow) for k in TINY_KINDS],
)
def test_torchrun_two_processes_equal_one_on_every_family(kind, tmp_path):
    import json

    from test_distributed import two_processes_equal_one

    a, b = tmp_path / "A", tmp_path / "B"
    cmd = ["compress.py", "debug=default", f"model.tiny.kind={kind}", "eval_dense=false"]
    two_processes_equal_one(cmd, a, b)
    ra = json.loads((a / "report.json").read_text())
    assert ra["world_size"] == 2 and ra["status"] == "done"


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_dense_export_is_the_familys_own_layout(kind, tmp_path):
    """``export.hf=true`` stacks the expert linears back into the fused tensors transformers
    loads; a fresh ``from_pretrained`` computes the compressed model (up to the order of the
    experts' sums: transformers' grouped kernels); report.json counts tokens per expert."""
    import json

    from transformers import AutoModelForCausalLM

    from slim_lightning import load_compressed

    _compress(kind, "slim_q_fast", tmp_path, ["export.hf=true"])
    model, _, _ = load_compressed(tmp_path / "packed")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert any(p.dim() == 3 for p in hf.parameters())  # the family's own fused experts
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(
            hf(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )
    rep = json.loads((tmp_path / "report.json").read_text())
    routed = rep["experts"]["layers"]
    assert len(routed) == 2 and all(len(v["tokens"]) == 4 for v in routed.values())
    # debug calibration: 8 x 32 tokens, each routed to 2 of the 4 experts
    assert all(sum(v["tokens"]) == 8 * 32 * 2 for v in routed.values())


def test_unsupported_structure_is_refused_before_any_weight_loads(tmp_path):
    """A GPT-2 directory (transformers' Conv1D, weights stored transposed) with no weight file
    at all: refused at config time, naming model.path and what was not understood."""
    from transformers import GPT2Config

    from slim_lightning.errors import ConfigError
    from slim_lightning.models.load import load_config
    from slim_lightning.models.source import ModelConfig

    GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=259).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"model\.path.*Conv1D"):
        load_config(ModelConfig(path=str(tmp_path)))


def test_model_ignore_keeps_named_linears_dense(tmp_path):
    """``model.ignore`` patterns leave those linears uncompressed (exported as they were)."""
    from slim_lightning import load_compressed
    from slim_lightning.errors import ConfigError
    from slim_lightning.models.source import ModelConfig
    from slim_lightning.nn.linear import SLiMLinear

    _, report = _compress("llama", "slim_q_fast", tmp_path, ["+model.ignore=[mlp.down_proj]"])
    assert len(report["layers"]) == 2 * 6
    model, _, _ = load_compressed(tmp_path / "packed")
    down = model.get_submodule("model.layers.0.mlp.down_proj")
    assert type(down) is torch.nn.Linear
    assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), SLiMLinear)
    with pytest.raises(ConfigError, match="model.ignore"):
        ModelConfig(random_init=True, ignore=[""])
    from slim_lightning.models.discover import UnsupportedArchitecture

    with pytest.raises(UnsupportedArchitecture, match=r"model\.ignore"):
        get_arch(tiny_model("llama")[0], ignore=("*",))


def test_tied_large_vocabulary_is_packed_once(tmp_path):
    """A Gemma 3 shape in miniature: the head tied to a 262144-row embedding (most of the
    parameters). embeddings.bits packs the table once; the head reads the same codes; the
    checkpoint holds it once and the packed model computes the same as after the run."""
    import json

    from safetensors.torch import load_file

    from slim_lightning import load_compressed
    from slim_lightning.nn.embedding import PackedEmbedding
    from slim_lightning.nn.linear import SLiMLinear

    _, report = _compress("gemma3_text", "slim_q_fast", tmp_path, ["+model.tiny.vocab_size=262144"])
    emb = report["embeddings"]
    assert emb["tied"] and emb["packed"]
    model, _, meta = load_compressed(tmp_path / "packed")
    e, h = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(e, PackedEmbedding) and isinstance(h, SLiMLinear)
    assert h.weight_values is e.weight_values  # one table in memory
    sd = load_file(tmp_path / "packed" / "model.safetensors")
    table = [k for k, v in sd.items() if v.shape[0] == 262144]
    assert len([k for k in table if k.endswith("_values")]) == 1, table
    # 8-bit codes of a 262144 x 64 table: the checkpoint is dominated by it, once
    size = (tmp_path / "packed" / "model.safetensors").stat().st_size
    assert 262144 * 64 <= size < 2 * 262144 * 64
    assert json.loads((tmp_path / "report.json").read_text())["embeddings"]["tied"]


def test_scaled_embedding_keeps_its_factor_when_packed():
    """Gemma multiplies its lookup by sqrt(hidden): the packed embedding (and its dense
    export) apply the same factor, so 8-bit tables change the logits only by rounding."""
    from slim_lightning.nn.embedding import (
        PackedEmbedding,
        ScaledEmbedding,
        dequantize_embeddings,
        quantize_embeddings,
    )

    model, _ = tiny_model("gemma")
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        rep = quantize_embeddings(model, 8, 16, packed=True)
        assert isinstance(model.get_input_embeddings(), PackedEmbedding) and rep["tied"]
        assert model.get_input_embeddings().embed_scale == pytest.approx(64**0.5)
        packed = model(input_ids=ids).logits
        rel = (packed - ref).norm() / ref.norm()
        assert rel < 0.02, rel
        dequantize_embeddings(model)
        assert isinstance(model.get_input_embeddings(), ScaledEmbedding)
        torch.testing.assert_close(model(input_ids=ids).logits, packed, rtol=0, atol=1e-5)


def test_multimodal_gemma3_compresses_only_its_language_decoder():
    """``AutoModelForCausalLM`` of a Gemma 3 checkpoint is the image-text model: the blocks are
    found inside ``get_decoder()`` (the vision tower's layers are left alone) and replay
    exactly."""
    from transformers import AutoModelForCausalLM, Gemma3Config

    text = {
        **dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2),
        **dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8),
        "layer_types": ["sliding_attention", "full_attention"],
    }
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    cfg = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=299,
        boi_token_index=297,
        eoi_token_index=298,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    arch = get_arch(model)
    assert arch.blocks_path == "model.language_model.layers"
    blocks = get_blocks(model, arch)
    ids = _ids(2, 16)
    ref = _own_last_block_outputs(model, blocks, ids, 2)
    hidden, kwargs = capture_block_inputs(model, blocks, ids, 2)
    torch.testing.assert_close(_replay(blocks, hidden, kwargs)[0], ref[0], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["gemma3_text", "phi3"])
def test_streaming_equals_the_whole_model_on_other_families(kind, tmp_path):
    """``engine.streaming=true`` (blocks read from the shards, captured on the meta device with
    their own arguments) writes the same checkpoint as loading the whole model."""
    from test_streaming import _overrides, _save_tiny, make_cfg

    from slim_lightning.app.compress_run import run_compress
    from slim_lightning.checkpoint.load import read_weights

    ckpt = _save_tiny(tmp_path / "ckpt", kind=kind)
    out = {}
    for streaming in (False, True):
        run = tmp_path / f"run_{streaming}"
        extra = ("method=slim_q_fast",)
        rep = run_compress(make_cfg(_overrides(ckpt, streaming, extra)), run)
        out[streaming] = (read_weights(run / "packed"), rep)  # (streaming: sharded)
    (a, ra), (b, rb) = out[False], out[True]
    assert a.keys() == b.keys() and ra["ppl"] == rb["ppl"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_streaming_refuses_fused_experts_before_loading(tmp_path):
    from test_streaming import _overrides, _save_tiny, make_cfg

    from slim_lightning.app.compress_run import run_compress
    from slim_lightning.errors import ConfigError

    ckpt = _save_tiny(tmp_path / "ckpt", kind="mixtral")
    with pytest.raises(ConfigError, match="engine.streaming.*fused"):
        run_compress(make_cfg(_overrides(ckpt, True)), tmp_path / "run")
