"""mode=simulate: the authors' protocol, one forward pass in which each layer's attention expresses the eviction as
a mask (the released Scissorhands and H2O code evaluate this way).

It is exact, so that it agrees with real generation (generate.py): query row t sees the keys the policy would hold
in its cache at step t, and the probabilities that update the policy's statistics are the softmax over those keys.
Each layer therefore scans its rows in order (vectorised over batch and heads): make room, add key t, softmax row t
over the held keys, let the policy observe it. A layer's eviction depends only on its own probabilities, and row t
of every layer sees exactly what step t of a real generation sees, since causal attention makes a layer's inputs at
positions <= t independent of anything later. A few hundred to 2K tokens take seconds per layer on a CPU.

Also here: the measured keep ratio (the cache's average size relative to the full cache's), and the persistence of
importance of §3.2 (Fig. 2).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.masking_utils import sdpa_mask

from .hooks import active, attention_replaced, refuse_options
from .policies import Full, Policy

NAME = "effrepro_kv_simulate"


@dataclass
class Simulation:
    """The state of a `simulating` block: the policy, and per layer what the block's forward passes measured."""

    policy: Policy
    n_layers: int
    kept: list[float] = field(init=False)  # keys seen by all queries, per layer
    causal: list[float] = field(init=False)  # keys a full cache would have shown them
    stats: list[dict[str, torch.Tensor]] = field(init=False)  # the policy's statistics, of the last pass

    def __post_init__(self):
        self.kept = [0.0] * self.n_layers
        self.causal = [0.0] * self.n_layers
        self.stats = [{} for _ in range(self.n_layers)]

    @property
    def keep_ratio(self) -> list[float]:
        """Per layer: keys attended to over keys a full cache holds, summed over queries (the average cache size
        relative to the full cache's; 1.0 for a layer that never evicts)."""
        return [k / c if c else 1.0 for k, c in zip(self.kept, self.causal)]

    @property
    def mean_keep_ratio(self) -> float:
        return sum(self.kept) / sum(self.causal)


def scan(policy: Policy, layer: int, n_layers: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
         mask: torch.Tensor | None, scale: float):
    """Attention of one layer under `policy`, row by row. query (batch, heads, n, head_dim); key, value (batch,
    kv_heads, n, head_dim); mask: bool (batch, n, n), the keys each query may see at all (the model's own mask,
    such as a sliding window), or None.
    Returns the output (batch, heads, n, head_dim), the keys seen and the keys a full cache would show (summed over
    rows and heads), and the statistics."""
    b, heads, n, d = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    q = query.float().view(b, kv_heads, group, n, d)
    k, v = key.float(), value.float()
    stats = policy.init_stats(b, heads, n, query.device)
    held = torch.zeros(b, kv_heads, n, dtype=torch.bool, device=query.device)
    positions = torch.arange(n, device=query.device).expand(b, kv_heads, n)
    out = torch.empty(b, kv_heads, group, n, d, device=query.device)
    seen = torch.zeros((), device=query.device)
    causal = torch.zeros((), device=query.device)
    for t in range(n):
        drop = policy.drops(stats, held, positions, t, layer, n_layers)
        if drop is not None:
            held &= ~drop
        held[:, :, t] = True
        visible = held.clone()
        if mask is not None:
            visible &= mask[:, None, t]
            visible[:, :, t] = True  # as the causal and sliding masks have it: never an empty softmax
            causal += (mask[:, t, :t].sum() + b) * kv_heads
        scores = torch.einsum("bkgd,bknd->bkgn", q[:, :, :, t], k) * scale
        probs = scores.masked_fill(~visible[:, :, None], float("-inf")).softmax(-1)
        out[:, :, :, t] = probs @ v
        policy.observe(stats, probs.reshape(b, heads, n), visible[:, :, None].expand(-1, -1, group, -1)
                       .reshape(b, heads, n), t)
        seen += visible.sum()
    if mask is None:
        causal += b * kv_heads * n * (n + 1) // 2
    return out.view(b, heads, n, d), seen.item(), causal.item(), stats


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention signature; (batch, n, heads, head_dim) out."""
    sim = active(Simulation, "simulating(model, policy)")
    refuse_options(kwargs, "mode=simulate")  # a sliding window comes in the mask
    b, _, n, d = query.shape
    if key.shape[2] != n:
        raise ValueError(f"simulate needs the whole text in one pass without a cache: {n} queries, {key.shape[2]} "
                         "keys (call the model with use_cache=False)")
    if attention_mask is not None and (attention_mask.dtype != torch.bool or attention_mask.dim() != 4):
        raise ValueError(f"simulate takes sdpa's boolean (batch, 1, q, k) masks, got {attention_mask.dtype} "
                         f"{tuple(attention_mask.shape)}")
    mask = None if attention_mask is None else attention_mask[:, 0].expand(b, n, n)
    if mask is not None and not mask.any(1).all():
        # a policy's budget counts cache slots, and its positions and steps count from the first slot: a padded
        # slot would take a place of the budget, and become a StreamingLLM sink
        raise ValueError(f"simulate takes texts without padding ({(~mask.any(1)).sum().item()} padded positions "
                         "in this batch): batch texts of equal length")
    out, seen, causal, stats = scan(sim.policy, module.layer_idx, sim.n_layers, query, key, value, mask,
                                    d ** -0.5 if scaling is None else scaling)
    sim.kept[module.layer_idx] += seen
    sim.causal[module.layer_idx] += causal
    sim.stats[module.layer_idx] = stats
    return out.transpose(1, 2).to(query.dtype), None


@contextmanager
def simulating(model: PreTrainedModel, policy: Policy) -> Iterator[Simulation]:
    """Every forward pass of `model` inside the block evicts under `policy` (call it with use_cache=False); the
    yielded Simulation gathers the keep ratio over them."""
    n_layers = model.config.num_hidden_layers
    policy.budgets(n_layers)  # bad budgets fail here, before any work
    with attention_replaced(model, NAME, _attention, Simulation(policy, n_layers), sdpa_mask) as sim:
        yield sim


@torch.no_grad()
def simulate(model: PreTrainedModel, ids: torch.Tensor, policy: Policy) -> tuple[torch.Tensor, Simulation]:
    """Logits (batch, n, vocab) of `ids` (batch, n: texts of equal length, unpadded) under `policy`, and the
    Simulation (keep ratio, statistics)."""
    with simulating(model, policy) as sim:
        logits = model(ids, use_cache=False).logits
    return logits, sim


def simulated_nll(model: PreTrainedModel, ids: torch.Tensor, policy: Policy) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of `ids` (batch, n) under `policy`, and the tokens scored (the
    first of each row is not): the same quantity as generate.decode_nll."""
    logits, _ = simulate(model, ids, policy)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
    return nll.item(), ids[:, 1:].numel()


@dataclass
class PivotalSets(Full):
    """The full cache, recording per query head which tokens were pivotal (probability > 1/t) for some query of the
    first `half` rows, and which for some later query."""

    name: ClassVar[str] = "pivotal_sets"
    half: int = 0

    def init_stats(self, batch, heads, slots, device):
        return {part: torch.zeros(batch, heads, slots, dtype=torch.bool, device=device) for part in ("first", "second")}

    def observe(self, stats, probs, visible, step):
        stats["first" if step < self.half else "second"] |= probs > 1.0 / visible.sum(-1, keepdim=True)


def persistence_ratio(model: PreTrainedModel, ids: torch.Tensor, batch_size: int | None = None) -> list[float]:
    """§3.2 of the paper (Fig. 2), per layer: of the tokens of the first half of each text that are pivotal for some
    query of the second half, the fraction that were already pivotal for some query of the first half, pooled over
    the texts of `ids` (batch, n) and the heads. The texts are run `batch_size` at a time (None: all at once), and
    the counts summed over the batches before the one division. Paper: above 95% in most layers of OPT."""
    half = ids.shape[1] // 2
    n_layers = model.config.num_hidden_layers
    both, later = [0] * n_layers, [0] * n_layers
    for start in range(0, len(ids), batch_size or len(ids)):
        _, sim = simulate(model, ids[start:start + (batch_size or len(ids))], PivotalSets(half=half))
        for layer, stats in enumerate(sim.stats):
            second = stats["second"][..., :half]
            both[layer] += (second & stats["first"][..., :half]).sum().item()
            later[layer] += second.sum().item()
    return [b / max(1, n) for b, n in zip(both, later)]
