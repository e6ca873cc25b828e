"""Plain PyTorch references for the kernels of this package: the ground truth of every kernel test, and
"standard attention" (the N×N matrix in memory) as the benchmarks' baseline."""
from __future__ import annotations

import torch


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        softmax_scale: float | None = None, dropout_p: float = 0.0,
                        key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                        dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v over (batch, heads, seq, head_dim) tensors, computed in their dtype, as
    the paper's standard attention computes it: no pass over the N×N matrices beyond its own (the scale is applied
    to q, and fully masked rows are zeroed in the output), so that it stays a fair baseline.

    - `causal`: query i sees keys j ≤ i + (Nk − Nq), aligned to the bottom right as FlashAttention 2 defines it.
    - `key_padding_mask`: bool (batch, Nk), True where a key is real.
    - Grouped-query attention: k and v may have fewer heads than q, a divisor of them.
    - A row with every key masked gives zeros, not NaN.
    - `attn_mask`: bool, broadcastable to (batch, heads, Nq, Nk), True where a query may see a key.
    - `dropout_mask`: bool (batch, heads, Nq, Nk), True where a probability is kept; without it, dropout
      draws its own mask.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    n_q, n_k = q.shape[-2], k.shape[-2]
    keep = None
    if causal:
        rows = torch.arange(n_q, device=q.device)[:, None]
        cols = torch.arange(n_k, device=q.device)[None, :]
        keep = cols <= rows + (n_k - n_q)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :]
        keep = pad if keep is None else keep & pad
    if attn_mask is not None:
        keep = attn_mask if keep is None else keep & attn_mask
    if keep is not None:
        # the dtype's lowest value rather than -inf: a fully masked row then has no NaN to clean up over N×N
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0 and dropout_mask is not None:
        probs = probs.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, v)
    if keep is not None:  # over the boolean mask, broadcast over heads: a small share of a pass over the scores
        out = out.masked_fill(~keep.any(-1, keepdim=True), 0.0)
    return out


_WORD = 0xFFFFFFFF


def _mul32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The high and low 32-bit words of a·b, for 32-bit unsigned a (an int64 tensor) and b, without overflowing
    int64: a is split into 16-bit halves."""
    high_half, low_half = (a >> 16) * b, (a & 0xFFFF) * b
    return (high_half + (low_half >> 16)) >> 16, (((high_half & 0xFFFF) << 16) + low_half) & _WORD


def philox4x32_reference(seed: int, c0: torch.Tensor, c1: torch.Tensor, rounds: int = 10) -> list[torch.Tensor]:
    """Philox-4x32 (Salmon et al., SC 2011) with key (seed's low and high words) and counter (c0, c1, 0, 0), as
    Triton's `tl.philox` computes it: four words of 32 random bits, as int64 tensors."""
    c0, c1 = c0.long() & _WORD, c1.long() & _WORD
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    k0, k1 = seed & _WORD, (seed >> 32) & _WORD
    for _ in range(rounds):
        (hi_b, lo_b), (hi_a, lo_a) = _mul32(c2, 0xCD9E8D57), _mul32(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _WORD, (k1 + 0xBB67AE85) & _WORD
    return [c0, c1, c2, c3]


def dropout_keep_mask_reference(seed: int, batch: int, heads: int, n_q: int, n_k: int, dropout_p: float,
                                device=None) -> torch.Tensor:
    """Which attention probabilities FlashAttention's dropout keeps, bool (batch, heads, n_q, n_k), written from
    the kernels' stated layout rather than their code: one Philox call per four neighbouring keys (counter
    row · ceil(n_k / 4) + key // 4 and batch·heads + head; keys 4j..4j+3 take its words 0, 2, 1, 3), each word a
    uniform number as Triton makes one (its bits as a signed 32-bit integer, folded to non-negative, times
    4.6566127342e-10 in float32), kept where it is at least dropout_p."""
    quads = (n_k + 3) // 4
    position = torch.arange(n_q, device=device)[:, None] * quads + torch.arange(quads, device=device)
    counter0 = position.expand(batch * heads, n_q, quads)
    counter1 = torch.arange(batch * heads, device=device)[:, None, None].expand_as(counter0)
    words = philox4x32_reference(seed, counter0, counter1)
    bits = torch.stack([words[0], words[2], words[1], words[3]], -1).flatten(-2)[..., :n_k]
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    uniform = torch.where(signed < 0, -signed - 1, signed).float() * torch.tensor(4.6566127342e-10)
    return (uniform >= torch.tensor(dropout_p, dtype=torch.float32)).view(batch, heads, n_q, n_k)


def block_mask_to_dense(block_mask: torch.Tensor, n_q: int, n_k: int, block_size: int) -> torch.Tensor:
    """A block-sparse mask of (…, ceil(Nq/b), ceil(Nk/b)) blocks as an element mask of (…, Nq, Nk)."""
    dense = block_mask.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)
    return dense[..., :n_q, :n_k]


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               lengths: torch.Tensor, softmax_scale: float | None = None) -> torch.Tensor:
    """One query per head, (batch, heads, head_dim), over the first `lengths[b]` entries of each cache."""
    keys = torch.arange(k_cache.shape[2], device=k_cache.device)[None, :] < lengths.to(k_cache.device)[:, None]
    out = attention_reference(q[:, :, None, :], k_cache, v_cache, softmax_scale=softmax_scale,
                              key_padding_mask=keys)
    return out[:, :, 0, :]


def decode_scores_reference(q: torch.Tensor, k_cache: torch.Tensor, lengths: torch.Tensor,
                            softmax_scale: float | None = None) -> torch.Tensor:
    """q kᵀ · scale for one query per head, (batch, heads, max_len), −inf at positions ≥ lengths[b]: its softmax
    is each key's attention probability, its logsumexp the decode log-sum-exp."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    keys = k_cache.repeat_interleave(q.shape[1] // k_cache.shape[1], dim=1)
    scores = torch.einsum("bhd,bhnd->bhn", q, keys) * scale
    past_end = torch.arange(k_cache.shape[2], device=q.device) >= lengths.to(q.device)[:, None, None]
    return scores.masked_fill(past_end, float("-inf"))


def _grouped(x: torch.Tensor, group_size: int, axis: str) -> torch.Tensor:
    """x (batch, heads, n, head_dim) with each quantization group along the last dimension: (…, n / g, d, g) for
    groups of tokens per channel, (…, n, d / g, g) for groups of channels per token."""
    b, h, n, d = x.shape
    if axis == "channel":
        return x.reshape(b, h, n // group_size, group_size, d).transpose(-1, -2)
    return x.reshape(b, h, n, d // group_size, group_size)


def _ungrouped(x: torch.Tensor, axis: str) -> torch.Tensor:
    if axis == "channel":
        x = x.transpose(-1, -2)
        return x.reshape(*x.shape[:2], -1, x.shape[-1])
    return x.flatten(-2)


def quantize_kv_reference(x: torch.Tensor, bits: int, group_size: int, axis: str):
    """Group-wise asymmetric quantization (effrepro_kernels/kv_quant.py's docstring): codes (uint8, x's shape, one per
    value, unpacked), scale and zero (x's dtype, one per group)."""
    groups = _grouped(x.float(), group_size, axis)
    lo, hi = groups.amin(-1), groups.amax(-1)
    levels = 2**bits - 1
    scale, zero = ((hi - lo) / levels).to(x.dtype), lo.to(x.dtype)
    s, z = scale.float()[..., None], zero.float()[..., None]
    codes = torch.round((groups - z) / torch.where(s > 0, s, 1.0)).clamp(0, levels)  # ties to even
    return _ungrouped(codes, axis).to(torch.uint8), scale, zero


def dequantize_kv_reference(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                            axis: str) -> torch.Tensor:
    """codes · scale + zero, per group, in the dtype of scale."""
    groups = _grouped(codes.float(), group_size, axis)
    return _ungrouped(groups * scale.float()[..., None] + zero.float()[..., None], axis).to(scale.dtype)


def _word_bits(bits: int, device) -> torch.Tensor:
    """Where kv_quant packs each channel of a 32-bit word: channel 2s + h at bit 16h + s·bits."""
    channel = torch.arange(32 // bits, device=device)
    return (channel % 2) * 16 + (channel // 2) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """kv_quant's packing of codes (uint8, one per channel along the last axis): uint8, 4·⌈channels·bits/32⌉
    bytes per row (whole little-endian words, the padding zero)."""
    per_word = 32 // bits
    padded = torch.nn.functional.pad(codes.long(), (0, -codes.shape[-1] % per_word))
    words = (padded.unflatten(-1, (-1, per_word)) << _word_bits(bits, codes.device)).sum(-1)
    return ((words[..., None] >> torch.arange(0, 32, 8, device=codes.device)) & 255).flatten(-2).to(torch.uint8)


def unpack_codes(data: torch.Tensor, bits: int, channels: int) -> torch.Tensor:
    """kv_quant's packing undone: the first `channels` codes of each row (uint8)."""
    words = (data.long().unflatten(-1, (-1, 4)) << torch.arange(0, 32, 8, device=data.device)).sum(-1)
    codes = (words[..., None] >> _word_bits(bits, data.device)) & (2**bits - 1)
    return codes.flatten(-2)[..., :channels].to(torch.uint8)


# --- the training fusions: GPT-2's LayerNorm, bias + GELU and loss over the vocabulary ----------------------------

def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU (the tanh approximation) of x + bias."""
    return torch.nn.functional.gelu(x + bias, approximate="tanh")


def linear_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weightᵀ over the targets not ignored, every logit in memory."""
    return torch.nn.functional.cross_entropy(h @ weight.T, targets, ignore_index=ignore_index)


def pivotal_counts_reference(probs: torch.Tensor, count: torch.Tensor, history: torch.Tensor, n_visible: int,
                             step: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scissorhands' counts and bit ring after the query at `step` (see pivotal_counts.py), as new tensors."""
    visible = torch.arange(probs.shape[-1], device=probs.device) < n_visible
    pivotal = ((probs > 1.0 / torch.tensor(n_visible, device=probs.device)) & visible).to(torch.uint8)
    byte, bit = divmod(step % window, 8)
    ring = history[..., byte]
    history = history.clone()
    history[..., byte] = (ring & (255 ^ (1 << bit))) | (pivotal << bit)
    return count + pivotal.int() - ((ring >> bit) & 1).int(), history
