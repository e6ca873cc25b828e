"""How our attention functions take the place of a transformers model's own, for the duration of a block.

transformers looks a layer's attention function up by the model's `attn_implementation` name at every forward pass
and passes it the attention module (which knows its `layer_idx`), the queries, keys and values after the rotary
embedding, and the mask. So any Llama- or OPT-style model runs our eviction without a fork of its code. The state
of the block (a simulation's statistics, a generation's cache) travels in a context variable: lm-evaluation-harness
and other callers can then run their own forward passes inside the block.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, TypeVar

from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

_ACTIVE: ContextVar[object] = ContextVar("scissorhands_active")
State = TypeVar("State")


@contextmanager
def attention_replaced(model: PreTrainedModel, name: str, function: Callable, state: State,
                       mask_function: Callable | None = None) -> Iterator[State]:
    """Inside the block, every attention layer of `model` calls `function`, which finds `state` with `active`,
    and gets the mask `mask_function` makes (transformers' `sdpa_mask`: boolean (batch, 1, q, k), or None where
    causality is all there is); without one, transformers passes no mask at all."""
    AttentionInterface.register(name, function)
    if mask_function is not None:
        AttentionMaskInterface.register(name, mask_function)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:  # transformers only logs a warning
        model.set_attn_implementation(previous)
        raise ValueError(f"{type(model).__name__} runs attention code of its own rather than looking it up in "
                         "transformers' AttentionInterface, so no KV-cache policy would see its attention: use a "
                         "model that does (Llama, Qwen, OPT, GPT-2 and most others)")
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        model.set_attn_implementation(previous)
        _ACTIVE.reset(token)


UNSUPPORTED_OPTIONS = ("softcap", "s_aux")  # Gemma-2's logit softcap, gpt-oss's attention sinks


def refuse_options(kwargs: dict, where: str) -> None:
    """A ValueError for an attention option of the model that `where` does not apply (UNSUPPORTED_OPTIONS):
    dropped, it would leave the scores another model's."""
    given = {name: kwargs[name] for name in UNSUPPORTED_OPTIONS if kwargs.get(name) is not None}
    if given:
        raise ValueError(f"{where} does not apply the model's attention options {given}: use a model without them "
                         f"(it supports none of {list(UNSUPPORTED_OPTIONS)})")


def check_replaceable(model: PreTrainedModel) -> None:
    """A ValueError, before any work, unless `attention_replaced` can take `model`'s attention."""
    with attention_replaced(model, "effrepro_probe", _never_called, None):
        pass


def _never_called(*args, **kwargs):
    raise RuntimeError("the attention probe of check_replaceable is never run")


def active(kind: type[State], block: str) -> State:
    """The state of the enclosing `attention_replaced` block, which must be a `kind`."""
    state = _ACTIVE.get(None)
    if not isinstance(state, kind):
        raise RuntimeError(f"this attention implementation runs only inside `{block}`")
    return state
