"""mode=generate: real eviction during token-by-token decoding.

Each layer's cache holds, per KV head, at most its policy's budget of tokens: preallocated tensors of that many
slots, so the memory a policy saves is what its tensors hold (`EvictingCache.kv_bytes`). Attention over them runs
on our decode kernel (`effrepro_kernels.decode_attention`), which also returns each cached key's score and the
log-sum-exp; the policy's statistics come from those (never an N x N matrix). A step runs the order policies.py
describes: make room, append, attend, observe.

With `kv_bits` < 16 the cache is KIVI's: keys quantized per channel in groups of `group_size` consecutive tokens,
values per token in groups of `group_size` channels, and the newest tokens (fewer than a group) in full precision;
attention runs over the quantized part (`decode_attention_quantized`) and the full-precision part and is merged
through the log-sum-exps. Where the kernels cannot run (a CPU without TRITON_INTERPRET=1), schedule `REFERENCE`
does the same in PyTorch with the kernels' references. Eviction composes with it: a key group that loses a token
is regrouped with the other loose tokens and quantized afresh (its survivors pick up a second rounding), while the
groups that lose nothing come first, keep their members, and quantize back to themselves, to within a rounding of
their scales (values, per token, always do).

How it plugs into transformers. The model is called on one token at a time, with `use_cache=False` and the token's
true position id; our attention function (hooks.py) receives that token's key and value, after the rotary
embedding, puts them in our cache and attends over it. Positions stay the true ones after eviction because they
come from the caller, never from the cache: the cache's `seen_tokens` is the text's length so far, its tensors hold
the tokens kept. We do not subclass `transformers.Cache`: between transformers 5.17 and 5.24 the model's argument
was renamed (`past_key_values` to `cache`) and `Cache.update` and its layer classes changed signature, while the
attention interface and `position_ids` stayed put. Multi-token prompts are fed token by token (a prefill would
attend before evicting, which is what mode=simulate is for).
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from effrepro_kernels.decode_attention import (DecodeSchedule, decode_attention, decode_attention_quantized,
                                               make_schedule, merge_attention)
from effrepro_kernels.kv_quant import QuantizedKV, dequantize_kv, packed_row_bytes, quantize_kv, stats_shape
from effrepro_kernels.reference import (decode_scores_reference, dequantize_kv_reference, pack_codes,
                                        quantize_kv_reference, unpack_codes)

from .hooks import active, attention_replaced, refuse_options
from .policies import Policy

NAME = "effrepro_kv_generate"
KV_BITS = (2, 4, 8, 16)
# The schedule that runs no kernel: attention and quantization in PyTorch (effrepro_kernels.reference), the same
# computation, for a CPU, where the Triton kernels run only in the interpreter (hours for a 512-token text).
REFERENCE = "reference"


def _reference_attention(q, keys, values, n, scale, return_lse=False, return_scores=False):
    """What decode_attention returns, for one query per head over the first n slots of keys and values."""
    scores = decode_scores_reference(q.float(), keys.float(), torch.full((q.shape[0],), n), scale)
    lse = scores.logsumexp(-1)
    group = q.shape[1] // keys.shape[1]
    out = torch.einsum("bhn,bhnd->bhd", (scores - lse[..., None]).exp(),
                       values.float().repeat_interleave(group, 1)).to(q.dtype)
    return (out, lse, scores) if return_scores else (out, lse) if return_lse else out


def _quantized(x: torch.Tensor, bits: int, group_size: int, axis: str, schedule: str) -> QuantizedKV:
    if schedule != REFERENCE:
        return quantize_kv(x, bits, group_size, axis)
    codes, scale, zero = quantize_kv_reference(x, bits, group_size, axis)
    return QuantizedKV(pack_codes(codes, bits), scale, zero, bits, group_size, axis, tuple(x.shape))


def _dequantized(qkv: QuantizedKV, schedule: str) -> torch.Tensor:
    if schedule != REFERENCE:
        return dequantize_kv(qkv)
    codes = unpack_codes(qkv.data, qkv.bits, qkv.shape[3])
    return dequantize_kv_reference(codes, qkv.scale, qkv.zero, qkv.group_size, qkv.axis)


@functools.lru_cache(maxsize=4096)
def prepared_schedule(kind: str, batch: int, kv_heads: int, n: int, head_dim: int, dtype: torch.dtype,
                      device: torch.device, quantized: bool = False) -> DecodeSchedule:
    """The decode kernel's schedule for `batch` caches of `n` tokens (full precision or `quantized`), built once
    and reused by every layer and step at that length: building one is host work that takes longer than the
    kernel at these sizes."""
    return make_schedule(kind, [n] * batch, kv_heads, head_dim=head_dim, dtype=dtype, device=device,
                         quantized=quantized)


def _gather_slots(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x[b, h, order[b, h, i], ...]: order (batch, heads, n) picks slots of x (batch, heads, slots, ...)."""
    index = order.view(*order.shape, *[1] * (x.dim() - 3)).expand(*order.shape, *x.shape[3:])
    return x.gather(2, index)


class FloatStore:
    """Keys and values in the model's dtype: (batch, kv_heads, slots, head_dim) each."""

    def __init__(self, batch, kv_heads, slots, head_dim, dtype, device, schedule):
        self.keys = torch.zeros(batch, kv_heads, slots, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.schedule = schedule

    @property
    def nbytes(self) -> int:
        return self.bytes_as(self.keys.element_size())

    def bytes_as(self, float_bytes: int) -> int:
        """Bytes held were each float `float_bytes` long."""
        return (self.keys.numel() + self.values.numel()) * float_bytes

    def append(self, key: torch.Tensor, value: torch.Tensor, n: int) -> None:
        self.keys[:, :, n] = key
        self.values[:, :, n] = value

    def attention(self, q, n, scale, **returns):
        """decode_attention of q (batch, heads, head_dim) over the first n slots (`returns`: its return_ flags)."""
        if self.schedule == REFERENCE:
            return _reference_attention(q, self.keys, self.values, n, scale, **returns)
        schedule = prepared_schedule(self.schedule, q.shape[0], self.keys.shape[1], n, q.shape[2], q.dtype, q.device)
        return decode_attention(q, self.keys, self.values, schedule=schedule, softmax_scale=scale, **returns)

    def attend(self, q, n, scale, with_scores):
        """Attention of q (batch, heads, head_dim) over the first n slots: out, and, `with_scores`, each key's
        score (batch, heads, slots) and their log-sum-exp (batch, heads) (else None, None)."""
        if not with_scores:
            return self.attention(q, n, scale), None, None
        out, lse, scores = self.attention(q, n, scale, return_lse=True, return_scores=True)
        return out, scores, lse

    def loose(self, drop: torch.Tensor, n: int) -> torch.Tensor:
        """Slots whose tokens must be stored anew after `drop`: none here."""
        return torch.zeros_like(drop)

    def reorder(self, order: torch.Tensor, n: int) -> None:
        """Slot i takes the token of slot order[..., i], for i < order.shape[-1]."""
        kept = order.shape[-1]
        self.keys[:, :, :kept] = _gather_slots(self.keys, order)
        self.values[:, :, :kept] = _gather_slots(self.values, order)


def _write(dst: QuantizedKV, src: QuantizedKV, start: int) -> None:
    """Copy the tokens of src into dst from token `start` on (start a multiple of the group size)."""
    n = src.shape[2]
    rows = (start, start + n) if dst.axis == "token" else (start // dst.group_size, (start + n) // dst.group_size)
    dst.data[:, :, start:start + n] = src.data
    dst.scale[:, :, rows[0]:rows[1]] = src.scale
    dst.zero[:, :, rows[0]:rows[1]] = src.zero


def _zeros_quantized(shape: tuple[int, ...], dtype, device, bits: int, group_size: int, axis: str) -> QuantizedKV:
    """What quantize_kv makes of zeros (codes, scales and zero-points all 0, in its layout), without running it."""
    b, h, n, d = shape
    stats = stats_shape(shape, group_size, axis)
    return QuantizedKV(torch.zeros(b, h, n, packed_row_bytes(d, bits), dtype=torch.uint8, device=device),
                       torch.zeros(stats, dtype=dtype, device=device), torch.zeros(stats, dtype=dtype, device=device),
                       bits, group_size, axis, shape)


class QuantizedStore:
    """KIVI's cache: the oldest whole groups quantized (slots 0..n_quantized-1), the rest (fewer than a group) in
    full precision (slots n_quantized..n-1, held by `residual` from its row 0)."""

    def __init__(self, batch, kv_heads, slots, head_dim, dtype, device, schedule, bits, group_size):
        self.bits, self.group_size, self.slots = bits, group_size, slots
        shape = (batch, kv_heads, slots // group_size * group_size, head_dim)
        self.keys, self.values = (_zeros_quantized(shape, dtype, device, bits, group_size, axis) if shape[2] else None
                                  for axis in ("channel", "token"))
        self.residual = FloatStore(batch, kv_heads, group_size, head_dim, dtype, device, schedule)
        self.n_quantized, self.schedule = 0, schedule

    @property
    def nbytes(self) -> int:
        return self.bytes_as(self.residual.keys.element_size())

    def bytes_as(self, float_bytes: int) -> int:
        """Bytes held (codes, scales and zero-points, the full-precision part) were each float `float_bytes` long."""
        quantized = sum(q.data.nbytes + (q.scale.numel() + q.zero.numel()) * float_bytes
                        for q in (self.keys, self.values) if q is not None)
        return quantized + self.residual.bytes_as(float_bytes)

    def _quantize(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        _write(self.keys, _quantized(keys, self.bits, self.group_size, "channel", self.schedule), start)
        _write(self.values, _quantized(values, self.bits, self.group_size, "token", self.schedule), start)

    def append(self, key, value, n):
        self.residual.append(key, value, n - self.n_quantized)
        if n + 1 - self.n_quantized == self.group_size:  # a whole group: quantize it
            self._quantize(self.residual.keys, self.residual.values, self.n_quantized)
            self.n_quantized += self.group_size

    def attend(self, q, n, scale, with_scores):
        b, heads = q.shape[:2]
        parts = []  # (first slot, last slot, out, lse[, scores]) of the quantized and of the full-precision part
        returns = dict(return_lse=True, return_scores=with_scores)
        if self.n_quantized:
            parts.append((0, self.n_quantized, *self._quantized_attention(q, scale, returns)))
        if n > self.n_quantized:
            parts.append((self.n_quantized, n, *self.residual.attention(q, n - self.n_quantized, scale, **returns)))
        out, lse = merge_attention([part[2] for part in parts], [part[3] for part in parts])
        if not with_scores:
            return out, None, None
        scores = torch.empty(b, heads, self.slots, device=q.device)  # a key's score is the same in either part
        for first, last, _, _, part_scores in parts:
            scores[..., first:last] = part_scores[..., :last - first]
        return out, scores, lse

    def _quantized_attention(self, q, scale, returns: dict):
        """decode_attention_quantized over the quantized slots (`returns`: its return_ flags)."""
        if self.schedule == REFERENCE:
            keys, values = (_dequantized(x, REFERENCE) for x in (self.keys, self.values))
            return _reference_attention(q, keys, values, self.n_quantized, scale, **returns)
        schedule = prepared_schedule(self.schedule, q.shape[0], self.keys.shape[1], self.n_quantized, q.shape[2],
                                     q.dtype, q.device, quantized=True)
        return decode_attention_quantized(q, self.keys, self.values, schedule=schedule, softmax_scale=scale,
                                          **returns)

    def loose(self, drop, n):
        """The full-precision tokens, and the survivors of every key group that loses a token."""
        q = self.n_quantized
        loose = torch.ones_like(drop)
        damaged = drop[..., :q].unflatten(-1, (q // self.group_size, self.group_size)).any(-1, keepdim=True)
        loose[..., :q] = damaged.expand(-1, -1, -1, self.group_size).flatten(-2)
        return loose

    def reorder(self, order, n):
        q = self.n_quantized
        keys, values = self.residual.keys[:, :, :n - q], self.residual.values[:, :, :n - q]
        if q:
            keys = torch.cat([_dequantized(self.keys, self.schedule)[:, :, :q], keys], 2)
            values = torch.cat([_dequantized(self.values, self.schedule)[:, :, :q], values], 2)
        keys, values = _gather_slots(keys, order), _gather_slots(values, order)
        kept = order.shape[-1]
        self.n_quantized = kept // self.group_size * self.group_size
        if self.n_quantized:
            self._quantize(keys[:, :, :self.n_quantized].contiguous(), values[:, :, :self.n_quantized].contiguous(), 0)
        self.residual.keys[:, :, :kept - self.n_quantized] = keys[:, :, self.n_quantized:]
        self.residual.values[:, :, :kept - self.n_quantized] = values[:, :, self.n_quantized:]


def compaction_order(drop: torch.Tensor, held: torch.Tensor, loose: torch.Tensor, kept: int) -> torch.Tensor:
    """The slots of the `kept` tokens that stay, (batch, kv_heads, kept), in their new order: first those the store
    keeps as they are, then the `loose` ones, each in slot order."""
    rank = torch.where(held & ~drop, loose.long(), 2)  # 2: gone
    return (rank * drop.shape[-1] + torch.arange(drop.shape[-1], device=drop.device)).argsort(-1)[..., :kept]


class LayerCache:
    """One layer: its store, each slot's position, the policy's statistics, and `n`, the tokens each head holds
    (the same for all: the policies that run here drop as many tokens from every head)."""

    def __init__(self, cache: "EvictingCache", layer: int, query: torch.Tensor, key: torch.Tensor):
        b, heads, _, head_dim = query.shape
        kv_heads = key.shape[1]
        if cache.kv_bits < 16 and head_dim % cache.group_size:
            raise ValueError(f"group_size={cache.group_size} must divide the model's head_dim={head_dim}: a value "
                             "token is quantized in groups of its channels")
        self.policy, self.layer, self.n_layers = cache.policy, layer, len(cache.layers)
        budget = cache.budgets[layer]
        self.slots = cache.max_len if budget is None else min(budget, cache.max_len)
        args = (b, kv_heads, self.slots, head_dim, key.dtype, key.device, cache.schedule)
        self.store = FloatStore(*args) if cache.kv_bits == 16 else QuantizedStore(*args, cache.kv_bits,
                                                                                   cache.group_size)
        self.positions = torch.zeros(b, kv_heads, self.slots, dtype=torch.long, device=key.device)
        self.stats = self.policy.init_stats(b, heads, self.slots, key.device)
        self.group = heads // kv_heads  # query heads per KV head
        self.position_values = 2 * b * kv_heads * head_dim  # K and V of a position
        self.slot_index = torch.arange(self.slots, device=key.device)
        self.n = 0

    def step(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, position: int, scale: float):
        """query (batch, heads, head_dim), key and value (batch, kv_heads, head_dim) of the token at `position`:
        make room, append, attend, observe. Returns the attention output (batch, heads, head_dim)."""
        held = (self.slot_index < self.n).expand_as(self.positions)
        drop = self.policy.drops(self.stats, held, self.positions, position, self.layer, self.n_layers, n_held=self.n)
        if drop is not None and drop.any():
            self._evict(drop, held)
        if self.n == self.slots:
            raise ValueError(f"layer {self.layer} holds {self.slots} tokens, its most (max_len or budget), and the "
                             f"policy dropped none before position {position}")
        self.store.append(key, value, self.n)
        self.positions[:, :, self.n] = position
        for stat in self.stats.values():
            stat[:, :, self.n] = 0
        self.n += 1
        out, scores, lse = self.store.attend(query, self.n, scale, self.policy.needs_probs)
        if scores is not None:
            self.policy.observe_scores(self.stats, scores, lse, self.n, position)
        return out

    def _evict(self, drop: torch.Tensor, held: torch.Tensor) -> None:
        """Drop the `drop` tokens and compact the rest into the first slots."""
        dropped = drop.sum(-1)
        kept = self.n - int(dropped.max())
        if kept != self.n - int(dropped.min()):
            raise ValueError(f"{self.policy.name} dropped different numbers of tokens from the heads of layer "
                             f"{self.layer}; mode=generate needs a policy that keeps them equal (use mode=simulate)")
        order = compaction_order(drop, held, self.store.loose(drop, self.n), kept)
        self.store.reorder(order, self.n)
        self.positions[:, :, :kept] = _gather_slots(self.positions, order)
        per_query_head = order.repeat_interleave(self.group, 1)
        for stat in self.stats.values():
            stat[:, :, :kept] = _gather_slots(stat, per_query_head)
        self.n = kept


class EvictingCache:
    """The KV cache of a whole model under `policy`, for texts of at most `max_len` tokens. `seen_tokens` is the
    logical length (tokens fed so far), each layer's `n` the tokens it holds. Layers are made at their first token,
    when their heads, dtype and device are known."""

    def __init__(self, policy: Policy, n_layers: int, max_len: int, kv_bits: int = 16, group_size: int = 32,
                 schedule: str = "lean"):
        if kv_bits not in KV_BITS:
            raise ValueError(f"kv_bits={kv_bits!r} is not one of {KV_BITS}")
        if not policy.lockstep:
            raise ValueError(f"policy {policy.name!r} lets the heads of a layer hold different numbers of tokens; "
                             "it runs in mode=simulate only")
        if max_len < 1:
            raise ValueError(f"max_len={max_len} must be at least 1")
        if kv_bits < 16 and (not isinstance(group_size, int) or group_size < 1):
            raise ValueError(f"group_size={group_size!r} must be a positive integer (the quantization groups' size)")
        self.policy, self.max_len, self.kv_bits, self.group_size, self.schedule = (policy, max_len, kv_bits,
                                                                                   group_size, schedule)
        self.budgets = policy.budgets(n_layers)
        self.layers: list[LayerCache | None] = [None] * n_layers
        self.seen_tokens = 0
        # for the keep ratio, as Simulation measures it: tokens a head held after each step, summed over steps,
        # layers and sequences (so that a batch of 3 weighs 3 times one of 1), and those a full cache would have held
        self.kept = 0
        self.causal = 0

    def kv_bytes(self) -> int:
        """Bytes of the keys and values held (codes, scales, full-precision part), counted from the tensors with
        16-bit floats: the paper's fp16 cache, for which a CPU run's float32 model stands in."""
        return sum(layer.store.bytes_as(2) for layer in self.layers if layer is not None)

    def full_cache_bytes(self) -> int:
        """Bytes a full fp16 cache would take for the tokens seen: what kv_bytes() saves on."""
        return sum(2 * layer.position_values * self.seen_tokens for layer in self.layers if layer is not None)

    def held_tokens(self) -> list[int]:
        """Tokens each head of each layer holds now."""
        return [layer.n if layer is not None else 0 for layer in self.layers]


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention signature, for one new token; (batch, 1, heads, head_dim) out."""
    cache = active(EvictingCache, "generating(model, cache)")
    refuse_options(kwargs, "mode=generate")
    window = kwargs.get("sliding_window")
    if window is not None and cache.seen_tokens >= window:  # before then, the window hides nothing
        raise ValueError(f"mode=generate does not apply the model's sliding window of {window} tokens, which the "
                         f"text's {cache.seen_tokens + 1} tokens exceed: use mode=simulate or shorter texts")
    if query.shape[2] != 1 or key.shape[2] != 1:
        raise ValueError(f"mode=generate feeds one token per step (use_cache=False); got {query.shape[2]} queries and "
                         f"{key.shape[2]} keys")
    layer = module.layer_idx
    if cache.layers[layer] is None:
        cache.layers[layer] = LayerCache(cache, layer, query, key)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = cache.layers[layer].step(query[:, :, 0], key[:, :, 0], value[:, :, 0], cache.seen_tokens, scale)
    return out[:, None], None


@contextmanager
def generating(model: PreTrainedModel, cache: EvictingCache) -> Iterator[EvictingCache]:
    """Inside the block, `decode_step(model, cache, ...)` runs the model on `cache`."""
    with attention_replaced(model, NAME, _attention, cache):
        yield cache


@torch.no_grad()
def decode_step(model: PreTrainedModel, cache: EvictingCache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed `tokens` (batch,), the next token of each text, at position `cache.seen_tokens`; returns the logits
    (batch, vocab) for the token after. Call inside `generating(model, cache)`."""
    if cache.seen_tokens >= cache.max_len:
        raise ValueError(f"the cache was made for max_len={cache.max_len} tokens; all are fed")
    position = torch.full((tokens.shape[0], 1), cache.seen_tokens, dtype=torch.long, device=tokens.device)
    logits = model(tokens[:, None], position_ids=position, use_cache=False).logits[:, -1]
    cache.seen_tokens += 1
    batch = tokens.shape[0]
    cache.kept += sum(cache.held_tokens()) * batch
    cache.causal += cache.seen_tokens * len(cache.layers) * batch
    return logits


def decode_logits(model: PreTrainedModel, ids: torch.Tensor, policy: Policy, kv_bits: int = 16,
                  group_size: int = 32, schedule: str = "lean") -> tuple[torch.Tensor, EvictingCache]:
    """Teacher-forced decoding of `ids` (batch, n) one token at a time under `policy`: the logits (batch, n, vocab)
    a forward pass would give, and the cache (what it kept, its bytes)."""
    cache = EvictingCache(policy, model.config.num_hidden_layers, ids.shape[1], kv_bits, group_size, schedule)
    with generating(model, cache):
        logits = torch.stack([decode_step(model, cache, ids[:, t]) for t in range(ids.shape[1])], 1)
    return logits, cache


def decode_nll(model: PreTrainedModel, ids: torch.Tensor, policy: Policy, kv_bits: int = 16, group_size: int = 32,
               schedule: str = "lean") -> tuple[float, int]:
    """The summed negative log-likelihood of each next token of `ids` (batch, n) under teacher-forced decoding,
    and the tokens scored (the first of each row is not): the same quantity as simulate.simulated_nll."""
    logits, _ = decode_logits(model, ids[:, :-1], policy, kv_bits, group_size, schedule)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
    return nll.item(), ids[:, 1:].numel()
