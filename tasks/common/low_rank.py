"""The Low-Rank Transformer (LRT, Greenformers, arXiv 2108.10808) as a model transformation: each linear layer's
weight W (out × in) is replaced by two factors, W ≈ U·V with V: in → r and U: r → out, so a layer costs
r·(in + out) weights instead of in·out.

    report = factorize(model, rank=256)          # every linear layer where a rank-256 factorisation saves weights
    report = factorize(model, rank=0.4)          # per layer, 40% of the largest rank that still saves weights
    report = factorize(bert, 0.2, only=["encoder.layer.1[01].*", "pooler.*"])   # a BertModel: names as its own

Written here rather than taken from the author's `greenformer` package because that package needs
`matrix-fact` and initialises by randomised SVD; this keeps the package's conventions (fractional ranks, which
layers it skips) with an exact truncated SVD, the best rank-r approximation (Eckart-Young).
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from repro.models import count_parameters

INITS = ("svd", "random")


class LowRankLinear(nn.Module):
    """y = U(V x) + b: `down` (V, in → rank, no bias) then `up` (U, rank → out, the layer's bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None,
                 dtype=None):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank={rank} must be between 1 and min(in_features, out_features)="
                             f"{min(in_features, out_features)}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, layer: nn.Linear, rank: int, init: str = "svd") -> "LowRankLinear":
        """The rank-`rank` version of `layer`, keeping its bias. init="svd": the truncated SVD of its weight,
        W ≈ (U_r √S_r)(√S_r V_rᵀ), the singular values split evenly so that both factors have the same scale;
        init="random": the factors' own default initialisation, for a model trained from scratch."""
        if init not in INITS:
            raise ValueError(f"init={init!r} is not one of {INITS}")
        weight = layer.weight
        out = cls(layer.in_features, layer.out_features, rank, bias=layer.bias is not None, device=weight.device,
                  dtype=weight.dtype)
        with torch.no_grad():
            if layer.bias is not None:
                out.up.bias.copy_(layer.bias)
            if init == "svd":
                # at least float32: linalg.svd takes no half precision
                u, s, vh = torch.linalg.svd(weight.to(torch.promote_types(weight.dtype, torch.float32)),
                                            full_matrices=False)
                root = s[:rank].sqrt()
                out.up.weight.copy_(u[:, :rank] * root)
                out.down.weight.copy_(root[:, None] * vh[:rank])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def rank_limit(in_features: int, out_features: int) -> int:
    """in·out/(in+out), rounded down as greenformer rounds it: about where the factors cost as much as W."""
    return in_features * out_features // (in_features + out_features)


def layer_rank(rank: int | float, in_features: int, out_features: int) -> int:
    """The rank a layer gets: `rank` itself if an int; a float in (0, 1) is that fraction (rounded down) of
    the layer's rank_limit (greenformer's convention)."""
    if isinstance(rank, float):
        return math.floor(rank * rank_limit(in_features, out_features))
    return rank


def factorised_at(rank: int, in_features: int, out_features: int) -> bool:
    """Whether a layer is factorised at `rank`: below its rank_limit, so that the factors save weights (where
    greenformer's auto_fact skips a layer, at or above it, this does too)."""
    return 1 <= rank < rank_limit(in_features, out_features)


@dataclass
class FactorizeReport:
    factorised: dict[str, int] = field(default_factory=dict)  # layer name → its rank
    kept: list[str] = field(default_factory=list)  # selected layers left dense (no saving, or a tied weight)
    params_before: int = 0
    params_after: int = 0


def _check_rank(rank) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ValueError(f"rank={rank!r} must be an int >= 1 or a float fraction in (0, 1)")
    if isinstance(rank, int) and rank < 1:
        raise ValueError(f"rank={rank} must be >= 1 (an absolute rank) or a float fraction in (0, 1)")
    if isinstance(rank, float) and not 0.0 < rank < 1.0:
        raise ValueError(f"rank={rank} as a float is a fraction and must lie in (0, 1); give an absolute rank "
                         "as an int")


def _selector(only: Callable[[str], bool] | Sequence[str] | None, names: list[str]) -> Callable[[str], bool]:
    """`only` as a predicate on layer names; a list of fnmatch patterns must each match some linear layer."""
    if only is None:
        return lambda name: True
    if callable(only):
        return only
    patterns = [only] if isinstance(only, str) else list(only)
    unmatched = [p for p in patterns if not fnmatch.filter(names, p)]
    if unmatched:
        raise ValueError(f"only={unmatched} match no linear layer; its names look like {names[:3]}")
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def factorize(model: nn.Module, rank: int | float, *, only: Callable[[str], bool] | Sequence[str] | None = None,
              init: str = "svd") -> FactorizeReport:
    """Replace, in place, every selected nn.Linear of `model` by a LowRankLinear of `rank` (see layer_rank)
    where that saves weights (`factorised_at`); other layers stay dense, as greenformer's auto_fact does.
    A weight shared with another module (an MLM decoder tied to the embeddings) stays too: factorising it
    would untie them. `only`: a predicate on the layer's name, or fnmatch patterns of names
    ("encoder.layer.*.attention.*"). Returns which layers were factorised and the parameter counts."""
    _check_rank(rank)
    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {INITS}")
    # nn.MultiheadAttention reads its out_proj's weight itself, in its functional forward: a LowRankLinear there
    # would break it (its input projection is a bare parameter, never a layer to replace)
    inside_mha = {f"{name}.out_proj".lstrip(".") for name, m in model.named_modules()
                  if isinstance(m, nn.MultiheadAttention)}
    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name and name not in inside_mha}
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear submodule to factorise")
    selected = _selector(only, list(linears))
    uses = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1

    report = FactorizeReport(params_before=count_parameters(model))
    plan = {}
    for name, layer in linears.items():
        if not selected(name):
            continue
        r = layer_rank(rank, layer.in_features, layer.out_features)
        if factorised_at(r, layer.in_features, layer.out_features) and uses[id(layer.weight)] == 1:
            plan[name] = r
        else:
            report.kept.append(name)
    if not plan:
        # the limit itself is named: r·(in+out) < in·out holds at some ranks that greenformer's floor still skips
        layers = {name: f"rank {layer_rank(rank, linears[name].in_features, linears[name].out_features)}, limit "
                        f"{rank_limit(linears[name].in_features, linears[name].out_features)}"
                  for name in report.kept[:4]}
        raise ValueError(f"rank={rank} factorises none of the {len(report.kept)} selected linear layers: a layer is "
                         "factorised at a rank r with 1 <= r < in·out // (in+out), greenformer's limit, and a weight "
                         f"shared with another module never is (here: {layers})")
    for name, r in plan.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LowRankLinear.from_linear(linears[name], r, init))
    report.factorised = plan
    report.params_after = count_parameters(model)
    return report
