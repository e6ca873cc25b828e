"""How a compressed Linear is held, saved and counted.

A `CompressedLinear` keeps only what a compressed file would: the codes of the kept weights packed at `bits`
bits each (or their fp16 values when not quantized), fp16 scales and `bits`-bit zero points per row and group,
and the sparsity pattern: a bitmask (1 bit a weight) for unstructured sparsity, or for N:M the positions of the
N kept weights in each run of M, ceil(log2 M) bits each (the 2:4 metadata of sparse tensor cores). For speed it
also holds the weight decoded to the compute dtype, as a buffer that is neither saved nor counted.
"""
from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from .methods import LayerResult, dequantize, per_column

STORED = ("codes", "values", "scales", "zeros", "mask")
LAYOUTS_KEY = "compressed_layers"


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(bits, dtype=torch.uint8, device=device)


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers in [0, 2^bits) into bytes, `bits` bits each, least significant first."""
    bitstream = ((values.reshape(-1, 1).to(torch.uint8) >> _shifts(bits, values.device)) & 1).flatten()
    bitstream = F.pad(bitstream, (0, -bitstream.numel() % 8)).reshape(-1, 8)
    return (bitstream << _shifts(8, values.device)).sum(1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` integers of `pack(values, bits)`, as int64."""
    bitstream = ((packed.reshape(-1, 1) >> _shifts(8, packed.device)) & 1).flatten()[: count * bits]
    return (bitstream.reshape(-1, bits) << _shifts(bits, packed.device)).sum(1)


def fp16_bits(t: torch.Tensor) -> torch.Tensor:
    # Stored as the int16 bit pattern of fp16, so that a later model.to(dtype) cannot re-round them.
    return t.half().view(torch.int16)


class CompressedLinear(nn.Module):
    """A Linear layer held compressed (see the module docstring). `layout` is a JSON-able dict: out_features,
    in_features, bits (None: not quantized), group_size, mask ("none", "bitmask" or "n:m") and n_m."""

    def __init__(self, layout: dict, stored: dict[str, torch.Tensor], bias: torch.Tensor | None,
                 dtype: torch.dtype):
        super().__init__()
        self.layout = layout
        for name, tensor in stored.items():
            self.register_buffer(name, tensor)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_buffer("weight", self.decode().to(dtype), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh())

    @classmethod
    def from_result(cls, result: LayerResult, *, bits: int | None, group_size: int | None, n_m: tuple[int, int] | None,
                    bias: torch.Tensor | None, dtype: torch.dtype) -> CompressedLinear:
        out_features, in_features = result.weight.shape
        keep = result.keep
        mask = "none" if keep is None else "n:m" if n_m is not None else "bitmask"
        layout = dict(out_features=out_features, in_features=in_features, bits=bits,
                      group_size=None if bits is None else group_size, mask=mask,
                      n_m=None if n_m is None else list(n_m))
        stored = {}
        if bits is None:
            stored["values"] = fp16_bits(result.weight[keep])
        else:
            codes = result.codes if keep is None else result.codes[keep]
            stored.update(codes=pack(codes, bits), scales=fp16_bits(result.scales), zeros=pack(result.zeros, bits))
        if mask == "bitmask":
            stored["mask"] = pack(keep, 1)
        elif mask == "n:m":
            positions = keep.reshape(-1, n_m[1]).nonzero()[:, 1]  # row-major: each run's N positions, in order
            stored["mask"] = pack(positions, math.ceil(math.log2(n_m[1])))
        return cls(layout, stored, bias, dtype)

    def keep(self) -> torch.Tensor | None:
        """The kept weights, bool (out, in); None when nothing is pruned."""
        rows, cols = self.layout["out_features"], self.layout["in_features"]
        if self.layout["mask"] == "bitmask":
            return unpack(self.mask, 1, rows * cols).bool().reshape(rows, cols)
        if self.layout["mask"] == "n:m":
            n, m = self.layout["n_m"]
            positions = unpack(self.mask, math.ceil(math.log2(m)), rows * cols // m * n).reshape(-1, n)
            runs = torch.zeros(rows * cols // m, m, dtype=torch.bool, device=self.mask.device)
            return runs.scatter_(1, positions, True).reshape(rows, cols)
        return None

    def decode(self) -> torch.Tensor:
        """The weight, float32 (out, in)."""
        rows, cols, bits = self.layout["out_features"], self.layout["in_features"], self.layout["bits"]
        keep = self.keep()
        if keep is None:
            keep = torch.ones(rows, cols, dtype=torch.bool, device=self.codes.device)  # dense: always quantized
        weight = torch.zeros(rows, cols, device=keep.device)
        if bits is None:
            weight[keep] = self.values.view(torch.float16).float()
            return weight
        group_size = self.layout["group_size"]
        scale = per_column(self.scales.view(torch.float16).float(), group_size, cols)
        zero = per_column(unpack(self.zeros, bits, self.scales.numel()).reshape(rows, -1), group_size, cols)
        codes = unpack(self.codes, bits, int(keep.sum()))
        weight[keep] = dequantize(codes.float(), scale[keep], zero[keep].float())
        return weight

    def refresh(self) -> None:
        self.weight = self.decode().to(self.weight.dtype)

    def stored_bytes(self) -> dict[str, int]:
        return {name: buf.numel() * buf.element_size() for name, buf in self.named_buffers() if name in STORED}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.layout.items())


def compressed_layers(model: nn.Module) -> dict[str, CompressedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, CompressedLinear)}


def weight_bytes(model: nn.Module) -> dict[str, float]:
    """Bytes held by the compressed Linear layers, per kind of buffer (codes, values, scales, zeros, mask) and in
    all (`total`); `dense_fp16`, the same weights as fp16; `ratio` = dense_fp16 / total. `nominal` counts as
    the papers do, bits per kept weight and nothing else (4-bit + 50% sparsity: 8x); `nominal_ratio` likewise.
    Biases, embeddings, norms and the LM head are not compressed and not counted."""
    counts = dict.fromkeys(STORED, 0)
    dense = nominal = 0
    for layer in compressed_layers(model).values():
        for name, nbytes in layer.stored_bytes().items():
            counts[name] += nbytes
        size = layer.layout["out_features"] * layer.layout["in_features"]
        keep = layer.keep()
        kept = size if keep is None else int(keep.sum())
        dense += 2 * size
        nominal += kept * (layer.layout["bits"] or 16) / 8
    total = sum(counts.values())
    return {**counts, "total": total, "dense_fp16": dense, "ratio": dense / total if total else float("nan"),
            "nominal": nominal, "nominal_ratio": dense / nominal if nominal else float("nan")}


def save_compressed(model: nn.Module, path: str) -> None:
    """The whole model's state (the compressed layers as stored, everything else as is) as one safetensors file,
    with each compressed layer's layout in its metadata."""
    layouts = {name: layer.layout for name, layer in compressed_layers(model).items()}
    save_model(model, str(path), metadata={LAYOUTS_KEY: json.dumps(layouts)})


def load_compressed(model: nn.Module, path: str) -> nn.Module:
    """Load a `save_compressed` file into `model`, a freshly built model of the same config: its Linear layers
    named in the file become `CompressedLinear`s. Returns the model."""
    device = next(model.parameters()).device
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        metadata, keys = f.metadata() or {}, set(f.keys())
        if LAYOUTS_KEY not in metadata:
            raise ValueError(f"{path} was not written by save_compressed: its metadata has no {LAYOUTS_KEY!r}")
        for name, layout in json.loads(metadata[LAYOUTS_KEY]).items():
            dense = model.get_submodule(name)
            stored = {key: f.get_tensor(f"{name}.{key}") for key in STORED if f"{name}.{key}" in keys}
            model.set_submodule(name, CompressedLinear(layout, stored, dense.bias, dense.weight.dtype))
    load_model(model, str(path), device=str(device))
    return model
