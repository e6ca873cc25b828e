"""PyTorch's scaled-dot-product attention as benchmark providers, one per backend, for every task that times
attention against it: the backends by provider name (a provider sets its backend once around its calls, with
`sdpa_kernel`, as its Call's context), and the first call that tells a point a backend declines."""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch.nn.attention import SDPBackend

from repro.bench import Unsupported

SDPA_BACKENDS = {
    "sdpa_math": SDPBackend.MATH,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
}


def declined(exc: BaseException) -> bool:
    """SDPA refusing a shape under the chosen backend ("No available kernel" on CUDA, "No viable backend" on
    the CPU): a provider that cannot run the point, not a failure."""
    return isinstance(exc, RuntimeError) and ("No available kernel" in str(exc) or "No viable backend" in str(exc))


def first_call(name: str, run: Callable[[], torch.Tensor], why: str) -> torch.Tensor:
    """Run an SDPA provider once, outside the timed calls; a backend that declines the point is Unsupported,
    with `why` (the point's settings) in the message."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SDPA warns once per reason a backend declines
            return run()
    except RuntimeError as exc:
        if declined(exc):
            raise Unsupported(f"{name} declines {why}") from None
        raise
