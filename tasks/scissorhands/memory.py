"""What a KV cache weighs: the paper's Table 1 and 2 arithmetic, and the same measured by allocating the caches that
mode=generate allocates (generate.py's stores) until they no longer fit a memory budget.

A head's cache of `slots` tokens in full precision holds K and V: 2 · slots · head_dim values. Quantized (KIVI's
layout, generate.QuantizedStore), its whole groups hold `bits` per value, plus a scale and a zero-point in the
cache's dtype per group of `group_size` (keys: a channel's tokens; values: a token's channels), and the newest
tokens, one group's worth, stay in full precision.
"""
from __future__ import annotations

import gc
import math
from typing import Iterator

import torch

from effrepro_kernels.kv_quant import packed_row_bytes
from repro.bench import Unsupported
from repro.records import Row
from repro.timing import is_out_of_memory

from .generate import FloatStore, QuantizedStore

GIB = 2**30

# The paper's Table 1 models: layers, hidden size, parameters (weights), and their longest sequence (Table 2).
PAPER_MODELS = {
    "opt-175b": dict(layers=96, hidden=12288, params=175e9, max_seq=2048),
    "llama-65b": dict(layers=80, hidden=8192, params=65e9, max_seq=2048),
    "bloom": dict(layers=70, hidden=14336, params=176e9, max_seq=2048),
}
TABLE1 = dict(batch=128, seq_len=2048)
TABLE2 = dict(gpus=8, gpu_gib=80)  # 8x A100-80GB


def bits_compression(bits: int, group_size: int) -> float:
    """How many times fewer bytes a value takes at `bits` than in a 16-bit cache, counting the 16-bit scale and
    zero-point each group shares (4 bits in groups of 32: 16 / (4 + 2·16/32) = 3.2); 1 for a cache that is not
    quantized (bits=16). Always against 16 bits, the paper's fp16 cache: a CPU run's fp32 model stands in for
    it, and its doubled bytes would double the ratio (5.3x) without saving anything more. The full-precision
    window of the newest tokens is left out: it does not grow with the context."""
    return 1.0 if bits == 16 else 16 / (bits + 2 * 16 / group_size)


def check_quantized(tokens: int, bits: int, group_size: int, what: str) -> None:
    """Unsupported where a `bits`-bit cache of at most `tokens` tokens per head quantizes nothing: it quantizes
    whole groups only, and keeps the newest tokens, fewer than a group, in full precision. Below a group it is the
    16-bit cache, and an x times the bits' saving would claim a saving never made. `what`: the setting."""
    if bits < 16 and tokens < group_size:
        raise Unsupported(f"{what}: a head holds at most {tokens} tokens, no whole group of kv.group_size="
                          f"{group_size}, so a {bits}-bit cache quantizes none of them (fewer than a group stay in "
                          "full precision): its x would count a saving it never makes")


def cache_bytes(layers: int, kv_heads: int, head_dim: int, slots: int, dtype_bytes: int, bits: int = 16,
                group_size: int = 32) -> int:
    """Bytes of one sequence's KV cache of `slots` tokens per head, as generate.py's stores allocate it."""
    values = 2 * kv_heads * head_dim  # K and V of one token, over the heads of a layer
    if bits == 16:
        return layers * values * slots * dtype_bytes
    quantized = slots // group_size * group_size
    scales = 2 * values * quantized // group_size * dtype_bytes  # a scale and a zero per group, K and V alike
    residual = values * group_size * dtype_bytes
    codes = 2 * kv_heads * packed_row_bytes(head_dim, bits) * quantized
    return layers * (codes + scales + residual)


def table_rows() -> Iterator[Row]:
    """Table 1: the fp16 KV cache of each model at batch 128 and 2,048 tokens (GB as the paper counts them, 2^30
    bytes: 2 · 96 · 12288 · 128 · 2048 · 2 bytes = 1,152 for OPT-175B). Table 2: the largest batch whose cache
    fits 8 A100-80GB beside the fp16 weights, at the model's longest sequence."""
    for name, m in PAPER_MODELS.items():
        per_token = cache_bytes(m["layers"], 1, m["hidden"], 1, 2)  # all heads of a layer: hidden = heads · head_dim
        extra = {"model": name, "layers": m["layers"], "hidden": m["hidden"], "dtype": "float16",
                 "series": "paper models"}
        yield Row("full", "model", name, "kv_cache_size", "GB", per_token * TABLE1["batch"] * TABLE1["seq_len"] / GIB,
                  n=1, extra={**extra, **TABLE1})
        free = TABLE2["gpus"] * TABLE2["gpu_gib"] * GIB - 2 * m["params"]
        yield Row("full", "model", name, "table2_max_batch", "sequences", math.floor(free / (per_token * m["max_seq"])),
                  n=1, extra={**extra, "seq_len": m["max_seq"], "memory": "8x A100-80GB minus fp16 weights"})


def allocate_caches(batch: int, layers: int, kv_heads: int, head_dim: int, slots: int, dtype: torch.dtype,
                    device: torch.device, bits: int, group_size: int) -> list:
    """The stores mode=generate would allocate for `batch` sequences: one per layer."""
    args = (batch, kv_heads, slots, head_dim, dtype, device, "lean")
    return [FloatStore(*args) if bits == 16 else QuantizedStore(*args, bits, group_size) for _ in range(layers)]


def measured_bytes(make_stores, device: torch.device) -> int:
    """Bytes `make_stores()` takes: as the CUDA allocator counts them (its rounding included), or on the CPU the
    bytes of the stores' tensors."""
    if device.type != "cuda":
        return sum(store.nbytes for store in make_stores())
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    stores = make_stores()
    used = torch.cuda.memory_allocated(device) - before
    del stores
    torch.cuda.empty_cache()
    return used


def largest_batch(fits, guess: int) -> int:
    """The largest batch for which `fits(batch)` holds (0 if none), searched from `guess` one step at a time:
    the analytic guess is right or nearly so."""
    batch = max(1, guess)
    if fits(batch):
        while fits(batch + 1):
            batch += 1
        return batch
    while batch > 1:
        batch -= 1
        if fits(batch):
            return batch
    return 0


def max_batch(budget_bytes: int, layers: int, kv_heads: int, head_dim: int, slots: int, dtype: torch.dtype,
              device: torch.device, bits: int, group_size: int) -> int:
    """The largest batch whose caches, allocated for real, fit in `budget_bytes` (running out of memory on the way
    counts as not fitting)."""
    def fits(batch):
        try:
            return measured_bytes(lambda: allocate_caches(batch, layers, kv_heads, head_dim, slots, dtype, device,
                                                          bits, group_size), device) <= budget_bytes
        except Exception as exc:  # noqa: BLE001 - out of memory is an answer; anything else is an error
            if not is_out_of_memory(exc):
                raise
            gc.collect()  # the exception's traceback holds the stores allocated so far
            torch.cuda.empty_cache()
            return False

    per_sequence = cache_bytes(layers, kv_heads, head_dim, slots, dtype.itemsize, bits, group_size)
    return largest_batch(fits, budget_bytes // per_sequence)
