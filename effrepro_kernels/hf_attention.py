"""Our FlashAttention as a Hugging Face transformers attention implementation:

    from effrepro_kernels.hf_attention import register
    register()                      # once per process
    model = AutoModel.from_config(config, attn_implementation="effrepro")

Where causality and key padding are all a model's mask holds (a sequence attending over itself, no window, no
cache offset), the mask hook (`attention_mask`) hands the attention the (batch, keys) padding mask itself, which
the kernel takes as it is: no (batch, 1, queries, keys) mask is built and nothing is read back from the device.
Any other mask (a cross-attention's, one over a cache, ...) is built as for `sdpa`, then checked and mapped onto
the kernel's causal flag and key padding mask, with one device sync per forward pass (`key_padding_mask_of`).
A mask the kernel cannot express (sliding windows, packed sequences, custom patterns) is an error, never a silent
change of result; so is an argument it cannot honour (a logit softcap, attention sinks, a position bias:
`HARMLESS` lists those it may ignore), and a request for the attention weights.
"""
from __future__ import annotations

import weakref

import torch

from .flash_attn import flash_attn

# Not "...flash...": transformers takes any implementation name containing "flash" for a flash-attn kernel
# to be fetched from the hub.
NAME = "effrepro"


# The bytes of the boolean temporaries one block of a mask's rows is checked with.
CHECK_BYTES = 1 << 24
# The mask last read, by weak reference, with its version counter and result: a model's layers are handed the same
# mask in one forward pass, and it is read (one device sync) once, not once per layer.
_last_read: tuple | None = None


def key_padding_mask_of(mask: torch.Tensor, causal: bool) -> torch.Tensor | None:
    """The (batch, Nk) key mask behind a model's mask: a (batch, Nk) mask is that already (the kernel checks its
    type and shape); a (batch, 1, Nq, Nk) boolean one is read after checking that causality and key padding are
    all it holds: in blocks of rows (no batch × Nq × Nk temporary), with one device sync."""
    global _last_read
    if mask.dim() == 2:
        return mask
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"{NAME} takes (batch, k) key-padding masks or boolean (batch, 1, q, k) masks, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    # inference tensors keep no version counter, and under compile the check is traced: neither is cached
    cached = not torch.compiler.is_compiling() and not mask.is_inference()
    last = _last_read  # read once: another thread may replace it
    if cached and last is not None and last[0]() is mask and last[1:3] == (mask._version, causal):
        return last[3]
    batch, _, n_q, n_k = mask.shape
    keys = mask[:, 0].any(dim=-2)  # a key any query may see is a real key
    rows = max(1, CHECK_BYTES // max(1, batch * n_k))
    wrong = torch.zeros((), dtype=torch.bool, device=mask.device)
    for r0 in range(0, n_q, rows):
        block = mask[:, 0, r0:r0 + rows]
        expected = keys[:, None, :]
        if causal:
            expected = expected & (torch.arange(n_k, device=mask.device)[None, :] <=
                                   torch.arange(r0, r0 + block.shape[1], device=mask.device)[:, None] + n_k - n_q)
        # rows that see no key at all (left padding under a causal mask) come out as zeros here: they are padding
        wrong |= (expected & block.any(dim=-1, keepdim=True) != block).any()
    wrong, padded = torch.stack([wrong, ~keys.all()]).tolist()
    if wrong:
        raise ValueError(f"{NAME} supports causal and key-padding masks only; this mask has another pattern")
    result = keys if padded else None
    if cached:
        _last_read = (weakref.ref(mask), mask._version, causal, result)
    return result


# What models hand an attention function besides q, k, v, the mask, the scale and dropout, that leaves its result as it
# is: positions already applied to q and k, cache and output bookkeeping, what the mask itself carries (a sliding
# window, packed sequences, both checked in `key_padding_mask_of`), and a determinism the kernel always has (its
# backward uses no atomics). transformers' sdpa ignores them too. Any other argument given a value (softcap,
# attention sinks as s_aux or sinks, position_bias, sparse indices, ...) changes the attention, or asks for what the
# kernel does not give, and is refused.
HARMLESS = frozenset({"position_ids", "cache_position", "use_cache", "sliding_window", "cu_seq_lens_q", "cu_seq_lens_k",
                      "max_length_q", "max_length_k", "seq_idx", "output_hidden_states", "output_router_logits",
                      "num_items_in_batch", "encoder_hidden_states", "deterministic"})


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      is_causal: bool | None = None, **kwargs):
    """transformers' attention signature: (batch, heads, seq, head_dim) in, (batch, seq, heads, head_dim) out."""
    # popped, so the check of the rest below need not name it: falsy (False, None, 0) it is off, truthy refused
    if kwargs.pop("output_attentions", None):
        raise ValueError(f"{NAME} attention computes no attention weights (output_attentions=True): build the model "
                         f"with attn_implementation='eager' for them")
    for name, given in kwargs.items():
        # False and None are how models say a feature is off (softcap=None, a flag passed as False)
        if name not in HARMLESS and given is not None and given is not False:
            raise ValueError(f"{NAME} attention does not support {name}={_brief(given)}: the kernel takes q, k, v, "
                             f"a causal or key-padding mask, scaling, dropout and is_causal (and ignores "
                             f"{', '.join(sorted(HARMLESS))})")
    # a module without an is_causal attribute is causal, as in transformers' sdpa: the same model, the same result
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and query.shape[2] > 1
    kpm = key_padding_mask_of(attention_mask, causal) if attention_mask is not None else None
    out = flash_attn(query, key, value, causal=causal, softmax_scale=scaling, dropout_p=dropout,
                     key_padding_mask=kpm)
    return out.transpose(1, 2).contiguous(), None


def _brief(value) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)


def attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask: torch.Tensor | None = None, local_size: int | None = None,
                   allow_is_causal_skip: bool = True, allow_is_bidirectional_skip: bool = False, **kwargs):
    """transformers' mask hook. Where the mask would hold causality or full attention of a sequence over itself
    and nothing else but key padding (no window, no cache offset) and the caller lets it be skipped: no mask
    without an attention mask (the kernel's causal flag says it all), else the (batch, kv_length) padding mask
    as it is, for the kernel to take. Neither builds a (batch, 1, q, k) mask or reads the device: transformers'
    sdpa mask builds one whenever a batch is padded, and would need reading back (one sync every forward pass),
    and under torch.compile on torch < 2.14 it is built even unpadded, where reading it would break the graph in
    every layer. Any other mask is sdpa's boolean one, which `attention_forward` checks and reads. An attention
    mask of all ones still reaches the kernel as a mask (telling would read the device), and takes its masked
    path: leave it out for an unpadded batch, as longdoc does."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    own_keys = local_size is None and q_length == kv_length and _is_zero(q_offset) and _is_zero(kv_offset)
    skippable = (mask_function is causal_mask_function and allow_is_causal_skip) or \
        (mask_function is bidirectional_mask_function and allow_is_bidirectional_skip)
    if own_keys and skippable:
        if attention_mask is None:
            return None
        if attention_mask.shape == (batch_size, kv_length):  # made boolean, on the model's device, by transformers
            return attention_mask
    return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     mask_function=mask_function or causal_mask_function, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=allow_is_causal_skip,
                     allow_is_bidirectional_skip=allow_is_bidirectional_skip, **kwargs)


def _is_zero(offset) -> bool:
    """An offset known to be 0 without reading the device (a cache may give a tensor)."""
    return isinstance(offset, int) and offset == 0


def register(name: str = NAME) -> str:
    """Make `attn_implementation=name` available to every transformers model in this process."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, attention_mask)
    return name
