"""Block masks for block-sparse FlashAttention: True blocks are computed, False blocks skipped."""
from __future__ import annotations

import numbers

import torch


def _check_block_counts(n_q_blocks: int, n_k_blocks: int) -> None:
    for name, n in (("n_q_blocks", n_q_blocks), ("n_k_blocks", n_k_blocks)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"{name}={n!r} must be an integer >= 1")


def butterfly_block_mask(n_q_blocks: int, n_k_blocks: int, device=None) -> torch.Tensor:
    """The fixed "flat butterfly" pattern of Pixelated Butterfly, which block-sparse FlashAttention uses:
    block (i, j) is kept when i == j or when i and j differ in exactly one bit, so each row keeps about
    1 + log2(n) blocks. Shape (1, 1, n_q_blocks, n_k_blocks)."""
    _check_block_counts(n_q_blocks, n_k_blocks)
    i = torch.arange(n_q_blocks, device=device)[:, None]
    j = torch.arange(n_k_blocks, device=device)[None, :]
    x = i ^ j
    return ((x & (x - 1)) == 0)[None, None]  # x == 0 or x a power of two


def random_block_mask(n_q_blocks: int, n_k_blocks: int, density: float, *, generator=None,
                      device=None) -> torch.Tensor:
    """Each query block row keeps the same number of key blocks, round(density · n_k_blocks) (at least one,
    its diagonal block among them), chosen at random: equal work per row, so time tracks density. Where query
    blocks outnumber key blocks, the rows past the last key block take that last key block as their diagonal.
    Shape (1, 1, n_q_blocks, n_k_blocks)."""
    _check_block_counts(n_q_blocks, n_k_blocks)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density} must be in (0, 1]")
    per_row = max(1, round(density * n_k_blocks))
    scores = torch.rand(n_q_blocks, n_k_blocks, generator=generator).to(device)
    rows = torch.arange(n_q_blocks, device=device)
    scores[rows, rows.clamp(max=n_k_blocks - 1)] = 2.0  # the diagonal is always kept
    keep = scores.topk(per_row, dim=-1).indices
    mask = torch.zeros(n_q_blocks, n_k_blocks, dtype=torch.bool, device=device)
    mask.scatter_(1, keep, True)
    return mask[None, None]
