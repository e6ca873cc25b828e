"""The encoders Greenformers compares, each named by a variant string and built from transformers' BERT:

    base                      the dense model, with the run's attention implementation (`greenformers.attention`)
    lrt_r256                  LRT: every linear layer factorised at rank 256 where that saves weights
    lrt_r0.4                  a fractional rank: 40% of in·out/(in+out) in each layer (greenformer's convention)
    lrt_r0.2_last6            only the last 6 layers and the pooler factorised (the greenformer notebook's model)
    linformer_k128            Linformer: keys and values projected along the sequence to 128 rows
    linformer_k128_sharekv    the same with one projection for keys and values (F = E: half the weights)
    lrt_r256+linformer_k128   both
    base+sdpa, lrt_r256+effrepro, ...   another attention implementation: eager, sdpa or effrepro (our kernel)

Linformer brings its own attention (SDPA over the k projected keys, in tasks/common/linformer.py), so it takes no
attention part.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tasks.common.linformer import apply_linformer
from tasks.common.low_rank import factorize

ATTENTIONS = ("eager", "sdpa", "effrepro")
MODES = ("inference", "fwd_bwd")
GRAMMAR = ("'base', or '+'-joined parts: lrt_r<rank>[_last<layers>] (rank an int, or a fraction such as 0.4), "
           f"linformer_k<k>[_sharekv], and one attention of {list(ATTENTIONS)}; e.g. 'lrt_r256+linformer_k128', "
           "'base+effrepro'")
_PART = re.compile(r"lrt_r(?P<rank>\d+(?:\.\d+)?)(?:_last(?P<last>\d+))?|linformer_k(?P<k>\d+)(?P<share_kv>_sharekv)?"
                   rf"|(?P<attention>{'|'.join(ATTENTIONS)})")


@dataclass(frozen=True)
class Variant:
    name: str
    rank: int | float | None = None  # LRT's rank, a float in (0, 1) being a fraction; None: dense layers
    last: int | None = None  # factorise only the last `last` encoder layers and the pooler; None: all
    k: int | None = None  # Linformer's projected length; None: attention over all keys
    share_kv: bool = False  # Linformer's one projection for keys and values (F = E)
    attention: str | None = None  # the attention implementation; None: the run's default

    @property
    def family(self) -> str:
        return "+".join(part for part, on in (("lrt", self.rank is not None), ("linformer", self.k is not None))
                        if on) or "base"

    def attention_of(self, default_attention: str) -> str:
        """The attention it runs: Linformer's own where it projects the keys, else its own or the run's default."""
        return "linformer" if self.k is not None else self.attention or default_attention

    def extra(self, default_attention: str) -> dict:
        """What every row of this variant says about it."""
        return dict(variant=self.family, rank=self.rank, last_layers=self.last, k=self.k, share_kv=self.share_kv,
                    attention=self.attention_of(default_attention))


def parse_variant(name: str) -> Variant:
    """The variant `name` stands for; a ValueError naming what is wrong, and the grammar, otherwise. Whether a
    rank or k fits the model is checked when it is built."""
    parts = name.split("+")
    if parts[0] == "base":
        parts = parts[1:]
    found: dict[str, str] = {}
    for part in parts:
        match = _PART.fullmatch(part)
        if match is None:
            raise ValueError(f"variant {name!r}: {part!r} is not a part of a variant; a variant is {GRAMMAR}")
        fields = {key: value for key, value in match.groupdict().items() if value is not None}
        if next(iter(fields)) in found:
            raise ValueError(f"variant {name!r} has two {next(iter(fields))} parts; a variant is {GRAMMAR}")
        found.update(fields)
    if "k" in found and "attention" in found:
        raise ValueError(f"variant {name!r}: Linformer computes its own attention, with SDPA over the k projected "
                         "keys (tasks/common/linformer.py has no hook for another kernel); drop the "
                         f"{found['attention']!r} part")
    rank = found.get("rank")
    return Variant(name, rank=None if rank is None else float(rank) if "." in rank else int(rank),
                   last=int(found["last"]) if "last" in found else None,
                   k=int(found["k"]) if "k" in found else None, share_kv="share_kv" in found,
                   attention=found.get("attention"))


def distinct_models(names: list, default_attention: str) -> list[Variant]:
    """The variants `names` stand for, each model once: one naming the run's default attention (`base+eager`
    where that is eager) is the model without it, measured once, under the name without the attention (the one
    claims and derived rows look for), else the first of its names."""
    variants: dict[Variant, Variant] = {}
    for variant in map(parse_variant, map(str, names)):
        same = replace(variant, name="", attention=variant.attention or default_attention)
        kept = variants.setdefault(same, variant)
        if kept is variant:
            continue
        if kept.attention and not variant.attention:
            variants[same], kept, variant = variant, variant, kept  # `variant` is now the name dropped
        print(f"[greenformers] {variant.name} is {kept.name} under greenformers.attention={default_attention}: "
              f"measured once, as {kept.name}", flush=True)
    return list(variants.values())


def _attention(name: str) -> str:
    if name == "effrepro":
        from effrepro_kernels.hf_attention import register
        register()  # our kernel as a transformers attention implementation
    return name


def dense_model(model: dict, positions: int, attention: str) -> nn.Module:
    """BertForSequenceClassification (two classes) of the `model` shape with `positions` positions, random
    weights, on the current default device. `model` holds BertConfig fields and a `name`."""
    from transformers import BertConfig, BertForSequenceClassification

    shape = {key: value for key, value in model.items() if key != "name"}
    # No dropout: the exact implementations then compute the same function, and time only the model's own work.
    config = BertConfig(**shape, max_position_embeddings=positions, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=2, attn_implementation=_attention(attention))
    return BertForSequenceClassification(config)


def _last_layers(layers: int, last: int) -> Callable[[str], bool]:
    """The linear layers of the last `last` encoder layers, and the pooler."""
    if not 1 <= last <= layers:
        raise ValueError(f"_last{last} must be between 1 and the model's {layers} layers")
    in_layer = re.compile(r"bert\.encoder\.layer\.(\d+)\.")

    def chosen(name: str) -> bool:
        match = in_layer.match(name)
        return name.startswith("bert.pooler.") or (match is not None and int(match.group(1)) >= layers - last)
    return chosen


def factorised(model: nn.Module, variant: Variant, init: str = "random") -> nn.Module:
    """`model` with the variant's LRT factorisation, in place (nothing for a dense variant). init="svd" starts
    the factors from the truncated SVD of the model's weights; "random" from scratch."""
    if variant.rank is not None:
        only = _last_layers(model.config.num_hidden_layers, variant.last) if variant.last is not None else None
        factorize(model, variant.rank, only=only, init=init)
    return model


def with_attention(model: nn.Module, variant: Variant, seq_len: int) -> nn.Module:
    """`model` switched, in place, to the variant's attention: Linformer built for inputs of at most `seq_len`
    tokens, or the implementation the variant names (none named: the model keeps its own)."""
    if variant.k is not None:
        apply_linformer(model, variant.k, seq_len, share_kv=variant.share_kv)
    elif variant.attention is not None:
        model.set_attn_implementation(_attention(variant.attention))
    return model


def build(variant: Variant, model: dict, seq_len: int, *, positions: int, attention: str) -> nn.Module:
    """The variant as a BertForSequenceClassification with random weights (the factors' too: trained from
    scratch), for inputs of at most `seq_len` tokens; `attention` is the implementation of variants that name
    none."""
    return with_attention(factorised(dense_model(model, positions, attention), variant), variant, seq_len)


def count_flops(model: nn.Module, batch: int, seq_len: int) -> dict[str, int]:
    """FLOPs of one call of `model` on the meta device, where nothing is computed, per mode: `inference` (a
    forward) and `fwd_bwd` (forward and backward of the classification loss). PyTorch's FlopCounterMode counts
    the matrix products (attention's included; element-wise work is not counted). Our kernel does the products
    eager attention does, so count a variant with eager attention (as `on_meta` builds it)."""
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as forward:
        loss = model(input_ids=ids, labels=torch.zeros(batch, dtype=torch.long, device="meta")).loss
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    return {"inference": forward.get_total_flops(),
            "fwd_bwd": forward.get_total_flops() + backward.get_total_flops()}


def on_meta(variant: Variant, model: dict, seq_len: int, positions: int) -> nn.Module:
    """The variant on the meta device (shapes only: no memory, nothing computed), with eager attention where it
    names another: for checking that it fits the model, and counting it."""
    with torch.device("meta"):
        return build(replace(variant, attention=None), model, seq_len, positions=positions, attention="eager")
