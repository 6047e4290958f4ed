"""Fused MoE experts as per-expert linears (``slim_lightning.models.experts``).

Tiny random Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE models built from transformers' config classes
(no download). They use ``experts_implementation="eager"``: the default ``grouped_mm`` path is
not bit-identical to the eager loop that ``LinearExperts`` reproduces.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from slim_lightning.models.experts import (
    ExpertMLP,
    LinearExperts,
    experts_report,
    fuse_experts,
    unfuse_experts,
)

_BASE = {
    "vocab_size": 259,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts_per_tok": 2,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_FAMILIES = {
    "mixtral": {"intermediate_size": 96, "num_local_experts": 4},
    "qwen2_moe": {
        "intermediate_size": 96,
        "num_experts": 4,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
    },
    "qwen3_moe": {
        "intermediate_size": 96,
        "num_experts": 4,
        "moe_intermediate_size": 32,
        "head_dim": 16,
    },
    "olmoe": {"intermediate_size": 32, "num_experts": 4},
}
FAMILIES = list(_FAMILIES)
PATHS = ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
E, TOP_K = 4, 2


def _config(family: str) -> object:
    return AutoConfig.for_model(family, **_BASE, **_FAMILIES[family])


def _model(family: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    cfg = _config(family)
    return AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").to(dtype).eval()


def _ids(batch: int = 2, seq: int = 11) -> torch.Tensor:
    return torch.randint(3, 259, (batch, seq), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_unfuse_keeps_logits_bit_identical(family: str) -> None:
    model = _model(family)
    ids = _ids()
    before = _logits(model, ids)
    assert unfuse_experts(model) == PATHS
    assert torch.equal(_logits(model, ids), before)
    linears = {n: m for n, m in model.named_modules() if ".mlp.experts." in n}
    for path in PATHS:
        assert isinstance(model.get_submodule(path), LinearExperts)
        for e in range(E):
            assert isinstance(linears[f"{path}.{e}"], ExpertMLP)
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert type(linears[f"{path}.{e}.{proj}"]) is nn.Linear
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in model.state_dict()
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == len(list(model.parameters()))  # no views left sharing storage
    assert unfuse_experts(model) == []  # idempotent


@pytest.mark.parametrize("intermediate", [40, 48])
def test_unfuse_bit_identical_when_act_fn_hits_vector_tails(intermediate: int) -> None:
    # the act_fn sees a strided half of the fused gate_up output; with I % 32 != 0 a contiguous
    # input would be split differently between vectorised and scalar SiLU code (1-ulp changes)
    torch.manual_seed(0)
    cfg = _config("mixtral")
    cfg.intermediate_size = intermediate
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").eval()
    ids = _ids(3, 7)
    before = _logits(model, ids)
    assert unfuse_experts(model) == PATHS  # the numeric check inside demands bit-identity
    assert torch.equal(_logits(model, ids), before)


@pytest.mark.parametrize("family", FAMILIES)
def test_fuse_restores_state_dict_and_round_trips(family: str, tmp_path) -> None:
    model = _model(family)
    original = _snapshot(model)
    fused_cls = type(model.get_submodule(PATHS[0]))
    unfuse_experts(model)
    assert fuse_experts(model) == PATHS
    assert type(model.get_submodule(PATHS[0])) is fused_cls
    restored = model.state_dict()
    assert list(restored) == list(original)
    for key, value in original.items():
        assert restored[key].shape == value.shape and torch.equal(restored[key], value), key
    assert fuse_experts(model) == []
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
    assert all(torch.equal(v, original[k]) for k, v in reloaded.state_dict().items())
    assert list(reloaded.state_dict()) == list(original)


def test_fuse_refuses_non_plain_linear() -> None:
    class QuantLinear(nn.Linear):
        pass

    model = _model("mixtral")
    unfuse_experts(model)
    expert = model.get_submodule(PATHS[1])[2]
    expert.up_proj = QuantLinear(64, 96)
    with pytest.raises(TypeError, match="expert 2 up_proj is QuantLinear.*dequantise"):
        fuse_experts(model)
    assert isinstance(model.get_submodule(PATHS[0]), LinearExperts)  # nothing fused


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_see_routed_tokens_and_stats_min_tokens(family: str) -> None:
    model = _model(family)
    unfuse_experts(model)
    experts = model.get_submodule(PATHS[0])
    seen = [0] * E

    def hook(e: int):
        def count(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            seen[e] += args[0].shape[0]

        return count

    for e in range(E):
        experts[e].gate_proj.register_forward_hook(hook(e))
    ids = _ids()
    tokens = ids.numel()
    logits = _logits(model, ids)
    routed = experts.tokens_routed.tolist()
    assert seen == routed and sum(routed) == tokens * TOP_K
    report = experts_report(model)
    assert list(report) == PATHS and report[PATHS[0]] == routed
    assert sum(report[PATHS[1]]) == tokens * TOP_K
    assert not [k for k in model.state_dict() if "tokens_routed" in k]

    threshold = min(routed) + 1  # at least one expert is "rare"
    experts.stats_min_tokens = threshold
    seen[:] = [0] * E
    assert torch.equal(_logits(model, ids), logits)  # output unchanged
    rare = [n < threshold for n in routed]
    assert any(rare)
    assert seen == [n + (tokens if r else 0) for n, r in zip(routed, rare)]
    assert experts.tokens_routed.tolist() == [2 * n for n in routed]  # extra pass not counted

    experts.reset_counts()
    assert experts.tokens_routed is None
    experts.count_tokens = False
    _logits(model, ids)
    assert experts.tokens_routed is None
    assert experts_report(model)[PATHS[0]] == [0] * E


@pytest.mark.parametrize("family", FAMILIES)
def test_meta_model_unfuses_and_loads_by_assign(family: str) -> None:
    real = _model(family)
    unfuse_experts(real)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(_config(family), experts_implementation="eager")
    assert unfuse_experts(meta) == PATHS
    gate = meta.get_submodule(PATHS[0])[1].gate_proj.weight
    assert gate.is_meta and gate.shape == real.get_submodule(PATHS[0])[1].gate_proj.weight.shape
    assert list(meta.state_dict()) == list(real.state_dict())
    meta.load_state_dict(real.state_dict(), assign=True)
    for name, buf in real.named_buffers():  # non-persistent buffers (rotary) are not in state dicts
        parent, _, leaf = name.rpartition(".")
        meta.get_submodule(parent)._buffers[leaf] = buf.clone()
    assert not any(t.is_meta for t in meta.parameters())
    ids = _ids()
    assert torch.equal(_logits(meta.eval(), ids), _logits(real, ids))


def test_meta_fuse_restores_meta_keys() -> None:
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(_config("olmoe"))
    keys = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    unfuse_experts(meta)
    assert fuse_experts(meta) == PATHS
    assert {k: tuple(v.shape) for k, v in meta.state_dict().items()} == keys


class _Foreign(nn.Module):
    """Expert-like (``num_experts``) but one 3-D ``weight``, as in JetMoE."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts = 4
        self.weight = nn.Parameter(torch.zeros(4, 8, 64))


def test_refuses_foreign_pattern_naming_path() -> None:
    model = _model("mixtral")
    model.model.layers[1].mlp.experts = _Foreign()
    with pytest.raises(
        ValueError, match=r"model\.layers\.1\.mlp\.experts \(_Foreign\).*\(4, 8, 64\)"
    ):
        unfuse_experts(model)
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"  # unchanged

    bad = _model("mixtral")
    experts = bad.model.layers[0].mlp.experts
    experts.down_proj = nn.Parameter(torch.zeros(4, 64, 40))  # intermediate 48 expected
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts \(MixtralExperts\)"):
        unfuse_experts(bad)


def test_refuses_numerically_different_module_and_leaves_model_unchanged() -> None:
    model = _model("qwen3_moe")
    experts = model.model.layers[1].mlp.experts
    original_forward = type(experts).forward.__wrapped__

    class Scaled(type(experts)):  # same parameters, different maths
        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return 2 * original_forward(self, *args)

    experts.__class__ = Scaled
    with pytest.raises(ValueError, match=r"differ from model\.layers\.1\.mlp\.experts \(Scaled\)"):
        unfuse_experts(model)
    assert not any(isinstance(m, LinearExperts) for m in model.modules())


def test_ignores_non_expert_3d_parameters() -> None:
    model = nn.Module()
    model.conv = nn.Conv1d(4, 4, 3)
    model.pos = nn.Module()
    model.pos.position_embeddings = nn.Parameter(torch.zeros(1, 5, 8))
    assert unfuse_experts(model) == []


def test_bf16_model_is_checked_in_fp32_and_unfuses() -> None:
    model = _model("mixtral", torch.bfloat16)
    ids = _ids()
    before = _logits(model, ids)
    assert unfuse_experts(model) == PATHS
    assert model.get_submodule(PATHS[0])[0].gate_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)


def test_transposed_layout_round_trips() -> None:
    import inspect

    from transformers.models.aria.modeling_aria import AriaExperts, AriaTextConfig

    if len(inspect.signature(AriaExperts.forward).parameters) != 4:
        pytest.skip("this transformers' AriaExperts is not the fused, routed-call layout")
    cfg = AriaTextConfig(hidden_size=64, intermediate_size=48, moe_num_experts=4)
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    model = nn.Module()
    model.experts = AriaExperts(cfg)
    for p in model.parameters():
        nn.init.normal_(p)
    original = _snapshot(model)
    h = torch.randn(6, 64)
    index = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
    weights = torch.rand(6, 2)
    with torch.no_grad():
        ref = model.experts(h, index, weights)
        assert unfuse_experts(model) == ["experts"]
        assert model.experts[3].down_proj.weight.shape == (64, 48)
        got = model.experts(h, index, weights)
    # not bit-exact: x @ W and F.linear(x, W.T) may sum in another order; 64 fp32 eps of max|ref|
    assert (got - ref).abs().max() <= 64 * torch.finfo(torch.float32).eps * ref.abs().max()
    fuse_experts(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
