"""SLiMLinear: forward vs the compressed layer, exact merged weight, checkpoints, STE, bytes."""

import dataclasses
import json

import pytest
import torch

from slim_lightning.core.compress import compress_linear
from slim_lightning.core.lowrank import quantize_adapters
from slim_lightning.core.quant import absmax_quant, quantize_per_tensor
from slim_lightning.core.types import (
    CompressedLinear,
    CompressSpec,
    LayerStats,
    LowRankSpec,
    QuantSpec,
    SparsitySpec,
)
from slim_lightning.nn.backend import set_backend
from slim_lightning.nn.linear import SLiMLinear

pytestmark = pytest.mark.usefixtures("one_thread")


SPECS = {
    "slim_q": CompressSpec(),
    "slim_fp_adapters": CompressSpec(lowrank=LowRankSpec(quant_bits=None)),
    "absmax_no_lr": CompressSpec(quant=QuantSpec("absmax"), lowrank=LowRankSpec(method="none")),
    "unstructured": CompressSpec(sparsity=SparsitySpec("unstructured", ratio=0.5)),
    "dense_q_outliers": CompressSpec(
        quant=QuantSpec(outlier_ratio=0.02), sparsity=SparsitySpec("dense")
    ),
    "unquantised": CompressSpec(quant=QuantSpec("none"), lowrank=LowRankSpec(quant_bits=None)),
    "adapter_group_64": CompressSpec(lowrank=LowRankSpec(quant_group_size=64, rank_ratio=0.25)),
    "adapter_in_scale": CompressSpec(lowrank=LowRankSpec(quant_in_scale=True)),
}


def _compressed(spec, d_out=48, d_in=576, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, d_in, generator=g) * (torch.rand(d_in, generator=g) + 0.1)
    w = torch.randn(d_out, d_in, generator=g) * 0.02
    stats = LayerStats(sq_sum=(x**2).sum(0), abs_sum=x.abs().sum(0), n_tokens=128)
    return compress_linear(w, stats, spec)


@pytest.fixture(scope="module")
def layers():
    return {k: _compressed(v) for k, v in SPECS.items()}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_matches_effective_weight(layers, name, with_bias):
    c = layers[name]
    bias = torch.randn(48) if with_bias else None
    mod = SLiMLinear.from_compressed(c, bias)
    assert (mod.in_features, mod.out_features, mod.backend) == (576, 48, "reference")
    assert [n for n, _ in mod.named_parameters()] == (["lora_l", "lora_r"] if c.rank else [])
    assert torch.equal(mod.dense_weight(), c.weight)
    assert torch.equal(mod.merged_weight(), c.effective_weight())
    x = torch.randn(2, 3, 576)  # (batch, seq, d_in)
    ref = x @ c.effective_weight().T + (0 if bias is None else bias)
    y = mod(x)
    assert y.shape == (2, 3, 48) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(mod(x), y)  # inference path == training path values


@pytest.mark.parametrize(
    "name", ["slim_q", "unstructured", "unquantised", "absmax_no_lr", "adapter_in_scale"]
)
def test_state_dict_round_trip_via_meta(layers, name, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    mod = SLiMLinear.from_compressed(layers[name], torch.randn(48))
    path = tmp_path / "layer.safetensors"
    safetensors.save_file(mod.state_dict(), str(path))
    meta = json.loads(json.dumps(mod.meta()))
    back = SLiMLinear.from_meta(meta)
    back.load_state_dict(safetensors.load_file(str(path)))
    for k, v in mod.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = torch.randn(4, 576)
    assert torch.equal(back(x), mod(x))
    assert back.meta() == mod.meta() and back.packed_nbytes() == mod.packed_nbytes()
    # the checkpoint loader builds on the meta device and assigns the loaded tensors
    lazy = SLiMLinear.from_meta(meta, device="meta")
    lazy.load_state_dict(safetensors.load_file(str(path)), assign=True)
    assert torch.equal(lazy(x), mod(x))


def test_meta_fields(layers):
    meta = SLiMLinear.from_compressed(layers["slim_q"], None).meta()
    assert meta["weight"]["format"] == "nm" and (meta["weight"]["n"], meta["weight"]["m"]) == (2, 4)
    assert meta["weight"]["bits"] == 4 and meta["rank"] == layers["slim_q"].rank
    assert meta["adapter_bits"] == 4
    assert meta["adapter_group_size_l"] == 128 and meta["adapter_group_size_r"] == meta["rank"]
    assert meta["has_bias"] is False
    assert meta["adapter_in_scale"] is False
    meta = SLiMLinear.from_compressed(layers["adapter_in_scale"], None).meta()
    assert meta["adapter_in_scale"] is True
    assert meta["adapter_l"]["dtypes"] == {"scale": "float16", "in_scale": "float16"}


def test_load_state_dict_invalidates_dense_cache(layers):
    a = SLiMLinear.from_compressed(layers["slim_q"], None)
    b = SLiMLinear.from_compressed(_compressed(SPECS["slim_q"], seed=1), None)
    a.cache_dense = True  # the opt-in cache must not serve a stale weight
    x = torch.randn(3, 576)
    ya, yb = a(x), b(x)
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), yb) and not torch.equal(ya, yb)


def test_dtype_casts_do_not_touch_packed_buffers(layers):
    c = layers["dense_q_outliers"]
    mod = SLiMLinear.from_compressed(c, torch.randn(48))
    mod.to(torch.float16)
    assert torch.equal(mod.dense_weight(), c.weight)  # scales are stored as integer bit patterns
    y = mod(torch.randn(2, 576, dtype=torch.float16))
    assert y.dtype == torch.float16 and mod.bias.dtype == torch.float16


def test_ste_gradient_equals_gradient_at_quantised_values(layers):
    c = layers["slim_q"]
    q_mod = SLiMLinear.from_compressed(c, None)
    with torch.no_grad():  # move the params off the grid: forward must snap them back
        q_mod.lora_l.add_(1e-3 * torch.randn_like(q_mod.lora_l))
        q_mod.lora_r.add_(1e-3 * torch.randn_like(q_mod.lora_r))
    left, right = (t.detach().clone() for t in q_mod.adapters())
    fp_mod = SLiMLinear.from_compressed(
        dataclasses.replace(c, lora_l=left, lora_r=right, lora_l_q=None, lora_r_q=None), None
    )
    x = torch.randn(5, 576)
    target = torch.randn(5, 48)
    losses = [((m(x) - target) ** 2).sum() for m in (q_mod, fp_mod)]
    assert torch.equal(losses[0], losses[1])  # same forward values
    for loss in losses:
        loss.backward()
    assert torch.equal(q_mod.lora_l.grad, fp_mod.lora_l.grad)
    assert torch.equal(q_mod.lora_r.grad, fp_mod.lora_r.grad)
    assert q_mod.lora_l.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["adapter_group_64", "adapter_in_scale"])
def test_requantize_adapters_snaps_params_and_updates_buffers(layers, name):
    c = layers[name]
    mod = SLiMLinear.from_compressed(c, None)
    x = torch.randn(3, 576)
    opt = torch.optim.SGD(mod.parameters(), lr=1e-2)
    ((mod(x) - 1) ** 2).mean().backward()
    opt.step()
    with torch.no_grad():
        y_train = mod(x)
    mod.requantize_adapters()
    ins = None if c.lora_l_q.in_scale is None else (c.lora_l_q.in_scale, c.lora_r_q.in_scale)
    lq, rq = quantize_adapters(mod.lora_l, mod.lora_r, 4, c.lora_l_q.group_size, ins)
    assert torch.equal(mod.lora_l, lq.dequantize().T) and torch.equal(mod.lora_r, rq.dequantize().T)
    assert torch.equal(mod.packed_adapter("l").to_dense(), lq.dequantize())
    assert torch.equal(mod.packed_adapter("r").to_dense(), rq.dequantize())
    assert torch.equal(mod(x), y_train)  # snapping is exactly what the forward already did


def test_packed_nbytes_2of4_4bit_with_4bit_adapters_at_4096():
    d, r = 4096, 410  # rank 10%
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(d, d // 4, 4, dtype=torch.bool)
    mask[..., :2] = True  # a fixed 2:4 pattern is enough to count bytes
    mask = mask.reshape(d, d)
    q = torch.randint(-8, 8, (d, d), generator=g, dtype=torch.int8) * mask
    qt = quantize_per_tensor(torch.zeros(1, d), 1.0, 4)
    qt.q = q
    lq = absmax_quant(torch.randn(r, d, generator=g), 4, 128)
    rq = absmax_quant(torch.randn(d, r, generator=g), 4, 128)
    c = CompressedLinear(
        weight=torch.zeros(d, d),  # the packed weight is built from weight_q
        weight_q=qt,
        mask=mask,
        lora_l=lq.dequantize().T,
        lora_r=rq.dequantize().T,
        lora_l_q=lq,
        lora_r_q=rq,
    )
    mod = SLiMLinear.from_compressed(c, None)
    ratio = mod.packed_nbytes() / (2 * d * d)
    # 3 bits/weight for values + metadata, ~0.8 bits/weight of adapters, scales
    assert 0.23 < ratio <= 0.30, ratio


def test_backend_validation(layers):
    mod = SLiMLinear.from_compressed(layers["slim_q"], None)
    with pytest.raises(ValueError, match="allowed: reference, triton"):
        set_backend(mod, "cuda")
    mod.backend = "bogus"
    with pytest.raises(ValueError, match="allowed: reference, triton"):
        mod(torch.randn(1, 576))
    assert set_backend(torch.nn.Sequential(mod), "reference") == 1
    with pytest.raises(ValueError, match="input last dim"):
        mod(torch.randn(1, 5))


def test_module_built_under_inference_mode_runs_outside_it(layers):
    """Packed buffers created under ``torch.inference_mode`` (e.g. a checkpoint loaded inside a
    Lightning evaluation loop) have no version counter; the dense cache must still work."""
    c = layers["slim_q"]
    with torch.inference_mode():
        mod = SLiMLinear.from_compressed(c, None)
    mod.cache_dense = True
    x = torch.randn(2, 576)
    with torch.no_grad():
        y = mod(x)
        torch.testing.assert_close(y, x @ c.effective_weight().T, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        assert torch.equal(mod(x), y)


# -- lean runtime: only packed bytes stay resident ------------------------------------------------
@pytest.mark.parametrize("name", ["slim_q", "slim_fp_adapters", "unstructured", "adapter_in_scale"])
def test_lean_path_gradients_equal_the_dense_reference(layers, name):
    """The just-in-time path (default) gives the dense-cache path's outputs and gradients (input
    and adapters) to fp32 round-off, and keeps nothing dense afterwards."""
    c = layers[name]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 576, generator=g)
    up = torch.randn(4, 48, generator=g)
    grads = {}
    for cached in (True, False):
        mod = SLiMLinear.from_compressed(c, torch.randn(48, generator=torch.Generator()))
        mod.cache_dense = cached
        xi = x.clone().requires_grad_(True)
        y = mod(xi)
        (y * up).sum().backward()
        grads[cached] = (y.detach(), xi.grad, *(p.grad for p in mod.parameters()))
        if not cached:
            assert mod._dense_cache == {} and mod._adapter_cache == {}
    for a, b in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lean_path_saves_no_dense_tensor_for_backward(layers):
    mod = SLiMLinear.from_compressed(layers["slim_q"], None)
    dense_numel = mod.in_features * mod.out_features
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = torch.randn(2, 576, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mod(x).sum().backward()
    assert saved and max(saved) < dense_numel  # activations and adapters, never a dense weight


def test_lean_path_works_with_gradient_checkpointing(layers):
    from torch.utils.checkpoint import checkpoint

    mod = SLiMLinear.from_compressed(layers["slim_q"], None)
    x = torch.randn(3, 576, requires_grad=True)
    checkpoint(mod, x, use_reentrant=False).pow(2).sum().backward()
    g1 = (x.grad.clone(), mod.lora_l.grad.clone())
    x.grad = None
    mod.zero_grad()
    mod(x).pow(2).sum().backward()
    torch.testing.assert_close(g1[0], x.grad)
    torch.testing.assert_close(g1[1], mod.lora_l.grad)


def test_set_dense_cache_and_auto_backend(layers):
    from slim_lightning.nn.backend import set_dense_cache

    model = torch.nn.Sequential(SLiMLinear.from_compressed(layers["slim_q"], None))
    assert set_dense_cache(model, True) == 1 and model[0].cache_dense
    model[0](torch.randn(1, 576))
    assert model[0]._dense_cache
    set_dense_cache(model, False)
    assert model[0]._dense_cache == {} and not model[0].cache_dense
    assert set_backend(model, "auto") == 0 and model[0].backend == "reference"  # CPU
