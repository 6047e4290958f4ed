"""Fused mixture-of-experts modules as per-expert ``nn.Linear`` layers, and back.

transformers 5 stores all experts of one MoE layer (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, ...)
in one module with 3-D parameters: ``gate_up_proj`` ``(E, 2*I, H)`` and ``down_proj`` ``(E, H, I)``
(``(E, H, 2*I)`` and ``(E, I, H)`` when the ``@use_experts_implementation`` decorator marks the
class ``is_transposed``, e.g. Aria). The compression framework only sees ``nn.Linear`` layers, so
:func:`unfuse_experts` swaps every such module for a :class:`LinearExperts` whose children
``<e>.gate_proj`` / ``<e>.up_proj`` / ``<e>.down_proj`` hold the same weights, and
:func:`fuse_experts` rebuilds the original class for the dense Hugging Face export.

:class:`LinearExperts` always runs the eager loop of the fused class, op for op, so its output is
bit-identical to the fused eager forward on CPU (transposed layouts: to fp32 rounding). Models
whose ``experts_implementation`` is ``grouped_mm`` (the transformers default where available, CPU
included) or ``batched_mm`` differ from their own eager path in rounding; unfused, they run eager.

Refused as "not understood" (``ValueError``): experts without a gate (Nemotron-H), interleaved
gate/up or a custom ``_apply_gate`` (gpt-oss), a post-expert norm, other 3-D layouts (JetMoE).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

_FUSED = ("gate_up_proj", "down_proj")
_BIASES = ("gate_up_proj_bias", "down_proj_bias")
_NAMES = ("gate_proj", "up_proj", "down_proj")


class _Layout(NamedTuple):
    num_experts: int
    hidden: int
    intermediate: int
    transposed: bool
    bias: bool


class ExpertMLP(nn.Module):
    """One gated expert, ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, as three linears.

    ``gate_proj`` / ``up_proj`` are the first / second half of the fused ``gate_up_proj`` rows,
    exactly as ``.chunk(2, dim=-1)`` splits the fused output.

    Args:
        hidden_size: Model width ``H`` (input of gate/up, output of down).
        intermediate_size: Expert width ``I``.
        act_fn: The gate activation (shared with the fused module).
        bias: Whether the three linears carry biases.
        device: Where to create the (uninitialised) parameters; ``dtype``: their dtype.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the expert to ``x`` of shape ``(tokens, H)``.

        gate and up are concatenated and chunked again, as in the fused module: CPU element-wise
        kernels round differently on their vectorised and scalar tails, so ``act_fn`` must see
        the same strided layout for a bit-identical result (the copy costs ``1/H`` of the GEMMs).
        """
        gate, up = torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class LinearExperts(nn.Module):
    """Drop-in replacement of a fused experts module; expert ``e`` is the child named ``str(e)``.

    State-dict keys read ``...experts.<e>.gate_proj.weight``. ``forward(hidden_states,
    top_k_index, top_k_weights)`` is called like the fused module by its sparse-MoE block and
    repeats the fused eager loop op for op. The plain attributes of the fused module
    (``num_experts``, ``config``, ...) are copied; the fused class is remembered (without its
    weights) so that :meth:`to_fused` can rebuild it.

    Attributes:
        stats_min_tokens: Calibration aid, ``0`` = off. When positive, every expert routed fewer
            than this many tokens in a forward call (unrouted experts included) is also run, under
            ``no_grad``, on all tokens of the call and that output is discarded: the forward
            hooks on its linears then see enough inputs for their statistics, while the returned
            tensor is unchanged. Those hooks therefore see tokens the expert was not routed.
        count_tokens: While ``True`` (default), ``tokens_routed`` accumulates per-expert counts.
        tokens_routed: ``int64`` tensor ``(num_experts,)`` of routed tokens summed over forward
            calls (a plain attribute, never in a state dict), or ``None`` before the first count.
        only_observed: count and top up only in calls where forward hooks watch the experts'
            linears (the compression engine's statistics pass; its other passes run too).
        topped_up: experts that ``stats_min_tokens`` fed every token at least once.
    """

    stats_min_tokens: int = 0
    count_tokens: bool = True
    only_observed: bool = False

    def __init__(self, experts: Iterable[ExpertMLP], act_fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        for e, expert in enumerate(experts):
            self.add_module(str(e), expert)
        self.num_experts = len(self._modules)
        self.act_fn = act_fn
        self.transposed = False
        self.tokens_routed: torch.Tensor | None = None
        self.topped_up: set[int] = set()
        self.__dict__["_fused_template"] = None

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, e: int) -> ExpertMLP:
        return self._modules[str(int(e))]  # type: ignore[return-value]

    def __iter__(self) -> Iterator[ExpertMLP]:
        return (self[e] for e in range(self.num_experts))

    @classmethod
    def from_fused(cls, fused: nn.Module, path: str = "") -> LinearExperts:
        """The replacement of ``fused`` (left untouched; ``path`` names it in errors), whose
        linears hold views of its weights; ``ValueError`` if it does not match the pattern."""
        lay = _layout(path, fused)
        if lay is None:
            raise ValueError(_not_understood(path, fused, "no 3-D parameters"))
        p = fused._parameters
        gu, dn = p["gate_up_proj"].detach(), p["down_proj"].detach()
        gub, dnb = (p[n].detach() if lay.bias else None for n in _BIASES)
        if lay.transposed:
            gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
        i, grads = lay.intermediate, (p["gate_up_proj"].requires_grad, p["down_proj"].requires_grad)
        experts = []
        for e in range(lay.num_experts):
            mlp = ExpertMLP(lay.hidden, i, fused.act_fn, bias=lay.bias, device="meta")
            weights = (gu[e, :i], gu[e, i:], dn[e])
            biases = (gub[e, :i], gub[e, i:], dnb[e]) if lay.bias else (None, None, None)
            for lin, w, b, grad in zip(_linears(mlp), weights, biases, (grads[0], *grads)):
                lin.weight = nn.Parameter(w, requires_grad=grad)
                if b is not None:
                    lin.bias = nn.Parameter(b, requires_grad=grad)
            experts.append(mlp)
        new = cls(experts, fused.act_fn)
        for key, value in vars(fused).items():
            if not key.startswith("_") and key != "training" and key not in ("act_fn", "forward"):
                new.__dict__[key] = value
        new.transposed = lay.transposed
        new.__dict__["_fused_template"] = _shallow(fused, dict.fromkeys(fused._parameters))
        new.train(fused.training)
        return new

    def to_fused(self) -> nn.Module:
        """A new module of the original class, 3-D parameters stacked from the linears (its state
        dict equals the one before unfusing); ``TypeError`` unless every expert linear is a plain
        ``nn.Linear`` (dequantise first) and this module was built by :meth:`from_fused`."""
        template = self.__dict__["_fused_template"]
        if template is None:
            raise TypeError("LinearExperts was not built by from_fused: no fused class to rebuild")
        rows: dict[str, list[torch.Tensor]] = {k: [] for k in (*_FUSED, *_BIASES)}
        for e, expert in enumerate(self):
            g, u, d = lins = _linears(expert)
            for name, lin in zip(_NAMES, lins):
                if type(lin) is not nn.Linear:
                    raise TypeError(
                        f"expert {e} {name} is {type(lin).__name__}, not a plain nn.Linear: "
                        "dequantise before fuse_experts"
                    )
            for key, parts in zip(rows, ((g.weight, u.weight), (d.weight,), (g.bias, u.bias))):
                if parts[0] is not None:
                    rows[key].append(torch.cat([t.detach() for t in parts]))
            if d.bias is not None:
                rows["down_proj_bias"].append(d.bias.detach())
        grad = {"gate_up_proj": g.weight.requires_grad, "down_proj": d.weight.requires_grad}
        params = {}
        for key in template._parameters:
            t = torch.stack(rows[key])
            if self.transposed and key in _FUSED:
                t = t.transpose(1, 2).contiguous()
            params[key] = nn.Parameter(t, requires_grad=grad[key.removesuffix("_bias")])
        fused = _shallow(template, params)
        fused.train(self.training)
        return fused

    def reset_counts(self) -> None:
        """Forgets the routed-token counts and the topped-up experts."""
        self.tokens_routed, self.topped_up = None, set()

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Routes tokens through their experts, as the fused eager forward does.

        Args:
            hidden_states: ``(tokens, H)`` inputs.
            top_k_index: ``(tokens, k)`` expert ids chosen by the router.
            top_k_weights: ``(tokens, k)`` routing weights.

        Returns:
            ``(tokens, H)`` weighted sum of the chosen experts' outputs.
        """
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1)
            expert_mask = expert_mask.permute(2, 1, 0)
            routed = expert_mask.sum(dim=(-1, -2))
            expert_hit = torch.greater(routed, 0).nonzero()
            watched = not self.only_observed or self._observed()
            if self.count_tokens and watched:
                self._count(routed[: self.num_experts])
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            if expert_idx == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current = self[int(expert_idx)](hidden_states[token_idx])
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
        if self.stats_min_tokens > 0 and watched:
            with torch.no_grad():
                for e, n in enumerate(routed[: self.num_experts].tolist()):
                    if n < self.stats_min_tokens:
                        self.topped_up.add(e)
                        self[e](hidden_states)  # for the hooks only; output discarded
        return final_hidden_states

    def _observed(self) -> bool:
        """Whether forward hooks watch an expert's linears (the engine's statistics pass)."""
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.modules())

    def _count(self, routed: torch.Tensor) -> None:
        if self.tokens_routed is None:
            self.tokens_routed = torch.zeros_like(routed, dtype=torch.int64)
        self.tokens_routed = self.tokens_routed.to(routed.device) + routed


def _shallow(module: nn.Module, params: dict[str, nn.Parameter | None]) -> nn.Module:
    """A shallow copy of ``module`` with its own registries (hooks, children) and ``params``."""
    new = copy.copy(module)
    for key, value in vars(module).items():
        if isinstance(value, (dict, set)):
            new.__dict__[key] = copy.copy(value)
    new.__dict__["_parameters"] = params
    return new


def _linears(expert: nn.Module) -> list[nn.Module | None]:
    return [getattr(expert, n, None) for n in _NAMES]


def _not_understood(path: str, module: nn.Module, why: str) -> str:
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
    return (
        f"expert module {path or '<root>'} ({type(module).__name__}) not understood: {why}; "
        f"parameter shapes {shapes}"
    )


def _layout(path: str, module: nn.Module) -> _Layout | None:
    """The layout of a fused experts module; ``None`` if ``module`` is not expert-like.

    Expert-like: own 3-D parameters plus a ``num_experts`` attribute or a 3-D parameter named
    ``*proj*`` / ``*expert*`` (so that e.g. ``nn.Conv1d`` weights and ``(1, N, D)`` position
    embeddings are ignored). An expert-like module must match the fused pattern exactly.
    """
    own = dict(module.named_parameters(recurse=False))
    three_d = [n for n, p in own.items() if p.dim() == 3]
    num_experts = getattr(module, "num_experts", None)
    if not three_d or not (
        isinstance(num_experts, int) or any("proj" in n or "expert" in n for n in three_d)
    ):
        return None

    def fail(why: str) -> ValueError:
        return ValueError(_not_understood(path, module, why))

    if not isinstance(num_experts, int):
        raise fail("no integer num_experts attribute")
    if set(own) - {*_FUSED, *_BIASES} or any(n not in own for n in _FUSED):
        raise fail(f"expected parameters {_FUSED} (+ optional {_BIASES})")
    gu, dn = own["gate_up_proj"], own["down_proj"]
    if gu.dim() != 3 or dn.dim() != 3 or gu.shape[0] != num_experts or dn.shape[0] != num_experts:
        raise fail(f"gate_up_proj / down_proj must be 3-D with {num_experts} experts leading")
    transposed = bool(getattr(module, "is_transposed", False))
    two_i, hidden = (gu.shape[2], gu.shape[1]) if transposed else (gu.shape[1], gu.shape[2])
    i = two_i // 2
    want_dn = (num_experts, i, hidden) if transposed else (num_experts, hidden, i)
    if two_i % 2 or tuple(dn.shape) != want_dn:
        raise fail(f"down_proj should be {want_dn} for gate_up_proj {tuple(gu.shape)}")
    biases = {n: tuple(own[n].shape) for n in _BIASES if n in own}
    if biases and biases != dict(zip(_BIASES, [(num_experts, two_i), (num_experts, hidden)])):
        raise fail("biases do not match the weights")
    if not getattr(module, "is_concatenated", True) or not getattr(module, "has_gate", True):
        raise fail("interleaved or gate-less experts")
    if getattr(module, "has_post_expert_norm", False):
        raise fail("post-expert norm")
    gate = getattr(type(module), "_apply_gate", None)  # the decorator's default is chunk + act
    if gate is not None and getattr(gate, "__qualname__", "") != "_default_apply_gate":
        raise fail("custom _apply_gate")
    if not callable(getattr(module, "act_fn", None)) or len(module._buffers):
        raise fail("no act_fn, or buffers")
    return _Layout(num_experts, hidden, i, transposed, bool(biases))


def _verify(path: str, fused: nn.Module, linear: LinearExperts) -> None:
    """Checks ``linear`` against the fused class's eager forward on random tokens and routing.

    Runs in fp32: bf16/fp16 weights are checked on fp32 copies of at most four experts (the
    first, last and two between); fp32/fp64 weights in place, all experts. Every checked expert
    gets tokens. On CPU the result must be bit-identical; on other devices (and for transposed
    layouts, ``x @ W`` vs ``F.linear(x, W.T)``) GEMMs may sum in another order, so
    ``max|diff| <= 64 eps max|ref|`` is required (eps of fp32, or of TF32 when CUDA allows it),
    far below what a wrong layout produces (O(max|ref|)).
    """
    p = fused._parameters["gate_up_proj"]
    device, dtype = p.device, p.dtype
    if dtype not in (torch.float32, torch.float64):
        e = fused.num_experts
        sel = torch.tensor(sorted({0, e // 3, 2 * e // 3, e - 1}))
        params = {
            k: nn.Parameter(v.detach()[sel.to(v.device)].float(), requires_grad=False)
            for k, v in fused._parameters.items()
        }
        fused = _shallow(fused, params)
        fused.__dict__["num_experts"] = len(sel)
        linear = LinearExperts.from_fused(fused, path)
        dtype = torch.float32
    lay = _layout(path, fused)
    assert lay is not None
    n, k = lay.num_experts, min(2, lay.num_experts)
    tokens = max(2 * n, 8)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, lay.hidden, generator=gen, dtype=torch.float64)
    first = torch.arange(tokens) % n
    scores = torch.rand(tokens, n, generator=gen)
    scores[torch.arange(tokens), first] = -1.0
    index = torch.cat([first[:, None], scores.topk(k - 1, dim=-1).indices], dim=1)
    weights = torch.rand(tokens, k, generator=gen, dtype=torch.float64).softmax(-1)
    args = (hidden.to(device, dtype), index.to(device), weights.to(device, dtype))
    eager = getattr(type(fused).forward, "__wrapped__", type(fused).forward)
    saved = linear.count_tokens, linear.stats_min_tokens
    linear.count_tokens, linear.stats_min_tokens = False, 0
    try:
        with torch.no_grad():
            ref, got = eager(fused, *args), linear(*args)
    except Exception as e:  # noqa: BLE001 - another call interface: not the pattern
        raise ValueError(
            f"{path or '<root>'} ({type(fused).__name__}) is not called as (hidden_states, "
            f"top_k_index, top_k_weights) ({type(e).__name__}: {e}): not understood"
        ) from None
    finally:
        linear.count_tokens, linear.stats_min_tokens = saved
    if device.type == "cpu" and not lay.transposed:
        ok = torch.equal(ref, got)
    else:
        tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        eps = 2.0**-10 if tf32 else torch.finfo(torch.float32).eps
        ok = bool((ref - got).abs().max() <= 64 * eps * ref.abs().max())
    if not ok:
        raise ValueError(
            f"unfused experts differ from {path or '<root>'} ({type(fused).__name__}): max |diff| "
            f"{(ref - got).abs().max().item():.3g}; the module is not the gated fused pattern"
        )


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replaces every fused experts module in ``model`` by a :class:`LinearExperts`.

    Fused experts are detected by their parameters, not by class name: 3-D ``gate_up_proj``
    ``(E, 2I, H)`` and ``down_proj`` ``(E, H, I)`` (transposed when the class sets
    ``is_transposed``), optional ``gate_up_proj_bias`` ``(E, 2I)`` and ``down_proj_bias``
    ``(E, H)``, ``E == module.num_experts``, an ``act_fn``. Real (non-meta) weights are checked
    numerically against the class's eager forward first; meta models are converted unchecked
    and get meta linears. All modules are checked before any is replaced, so on error the model
    is unchanged. The new linears then get their own storage (peak extra memory: one layer).
    Idempotent: a second call finds nothing.

    Args:
        model: Any module tree.

    Returns:
        Dotted names of the replaced modules.

    Raises:
        ValueError: If an expert-like module with 3-D parameters does not match the pattern
            (message names path, class and shapes), or its replacement differs numerically.
    """
    found: list[tuple[str, LinearExperts]] = []
    for path, module in model.named_modules():
        if isinstance(module, LinearExperts) or _layout(path, module) is None:
            continue
        if not path:
            raise ValueError("the model itself is fused experts: use LinearExperts.from_fused")
        linear = LinearExperts.from_fused(module, path)
        if not any(t.is_meta for t in module.parameters(recurse=False)):
            _verify(path, module, linear)
        found.append((path, linear))
    for path, linear in found:
        model.set_submodule(path, linear)
        for mod in linear.modules():  # own storage, so the fused tensors are freed
            for name, t in list(mod.named_parameters(recurse=False)):
                own = t.detach().clone(memory_format=torch.contiguous_format)
                mod.register_parameter(name, nn.Parameter(own, requires_grad=t.requires_grad))
    return [path for path, _ in found]


def fuse_experts(model: nn.Module) -> list[str]:
    """Rebuilds the original fused experts modules from every :class:`LinearExperts` in ``model``.

    The inverse of :func:`unfuse_experts` for plain ``nn.Linear`` experts: afterwards
    ``model.state_dict()`` has the original keys and values (for ``save_pretrained``).

    Args:
        model: Any module tree.

    Returns:
        Dotted names of the rebuilt modules.

    Raises:
        TypeError: If an expert linear is not a plain ``nn.Linear`` (dequantise first); the
            model is then unchanged.
    """
    found = [(p, m.to_fused()) for p, m in model.named_modules() if isinstance(m, LinearExperts)]
    for path, fused in found:
        model.set_submodule(path, fused)
    return [path for path, _ in found]


def experts_report(model: nn.Module) -> dict[str, list[int]]:
    """Tokens routed per expert, ``{module path: [count of expert 0, 1, ...]}`` (zeros if none)."""
    return {
        path: (m.tokens_routed.tolist() if m.tokens_routed is not None else [0] * m.num_experts)
        for path, m in model.named_modules()
        if isinstance(m, LinearExperts)
    }
