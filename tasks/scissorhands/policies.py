"""KV-cache eviction policies: which cached tokens each attention head keeps.

One interface serves both ways of evaluating a policy (`simulate.py`: one masked forward pass; `generate.py`: a real
cache during decoding), so the two run the same rules. A policy sees one layer's cache as *slots*:

- `held`, `positions`: (batch, kv_heads, slots): which slots hold a token, and that token's position in the text;
- statistics: tensors (batch, heads, slots, ...) per *query* head, made by `init_stats` and updated by `observe`
  from each query's attention probabilities. A policy's score for a KV head sums its query heads' statistics
  (grouped-query attention: the query heads sharing a KV head share its cache; with multi-head attention, as in the
  paper's OPT models, that sum is one head's statistic).

Each step (a query at position t) runs in this order, in both modes:
1. make room: if a head already holds its budget, `drops` picks the tokens it loses, from the statistics of the
   queries before t, so a head never holds more than its budget;
2. append token t (it is always seen by its own query);
3. attend over the held tokens;
4. `observe` that query's probabilities (softmax over the held tokens only, as a real cache computes them);
   mode=generate calls `observe_scores` with what the decode kernel gives (each key's logit and the log-sum-exp),
   which makes the probabilities unless the policy reads the scores as they are (Scissorhands' counts on a GPU).

Positions are explicit, not slot order, because the quantized cache regroups tokens when it evicts (generate.py).
Ties in a score go against the oldest token.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from effrepro_kernels.pivotal_counts import ring_history, update_pivotal_counts

THRESHOLDS = ("1/t", "p90")
BUDGET_SCHEDULES = ("uniform", "growing")
SCORES = ("pivotal", "non_pivotal")  # Scissorhands' two readings of its importance (README)


def per_kv_head(stat: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum a (batch, heads, slots) statistic over the query heads that share each KV head."""
    b, h, n = stat.shape
    return stat.view(b, kv_heads, h // kv_heads, n).sum(2)


def lowest(score: torch.Tensor, candidates: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """The k candidates of lowest score in each (batch, KV head) row, ties going to the oldest, as a bool mask."""
    by_age = positions.argsort(-1)
    ranked = score.float().masked_fill(~candidates, math.inf).gather(-1, by_age).argsort(dim=-1, stable=True)
    order = by_age.gather(-1, ranked)
    return torch.zeros_like(candidates).scatter_(-1, order[..., :k], True) & candidates


@functools.cache
def layer_budgets(budget: int, schedule: str, n_layers: int) -> tuple[int, ...]:
    """Per-layer budgets with the same total: `uniform`, or `growing` linearly with depth from B/2 to 3B/2 (the
    paper gives later layers more, whose importance persists less, Fig. 2). Rounded cumulatively, so they sum to
    exactly n_layers · B."""
    if schedule == "uniform" or n_layers == 1:
        return (budget,) * n_layers
    weights = [0.5 + layer / (n_layers - 1) for layer in range(n_layers)]
    ends = [round(budget * sum(weights[:layer + 1])) for layer in range(n_layers)]
    return tuple(end - start for start, end in zip([0] + ends[:-1], ends))


@dataclass
class Policy:
    """The interface. Subclasses are dataclasses of their parameters, checked when made."""

    name: ClassVar[str]
    needs_probs: ClassVar[bool] = False  # whether `observe` reads attention probabilities
    lockstep: ClassVar[bool] = True  # whether every head of a layer always holds as many tokens as the others
    budget_fraction: ClassVar[str | None] = None  # the config's fraction of the budget that sets a count of tokens

    def budgets(self, n_layers: int) -> list[int | None]:
        """Tokens a head of each layer may hold (None: no limit). Checks them: call it before any work."""
        return [None] * n_layers

    def init_stats(self, batch: int, heads: int, slots: int, device) -> dict[str, torch.Tensor]:
        return {}

    def observe(self, stats: dict[str, torch.Tensor], probs: torch.Tensor, visible: torch.Tensor, step: int) -> None:
        """probs: float32 (batch, heads, slots), 0 where not `visible`; step: the query's position."""

    def observe_scores(self, stats: dict[str, torch.Tensor], scores: torch.Tensor, lse: torch.Tensor, n_visible: int,
                       step: int) -> None:
        """mode=generate's `observe`: scores float32 (batch, heads, slots), each key's logit, undefined after the
        first `n_visible` slots; lse (batch, heads), their log-sum-exp: a key's probability is exp(score − lse)."""
        visible = (torch.arange(scores.shape[-1], device=scores.device) < n_visible).expand_as(scores)
        self.observe(stats, torch.where(visible, torch.exp(scores - lse[..., None]), 0.0), visible, step)

    def drops(self, stats: dict[str, torch.Tensor], held: torch.Tensor, positions: torch.Tensor, step: int,
              layer: int, n_layers: int, n_held: int | None = None) -> torch.Tensor | None:
        """Before token `step` is appended: a (batch, kv_heads, slots) mask of held tokens to drop, or None.
        `n_held`: given when every head holds the first n_held slots (mode=generate), so that whether a head is
        full is known on the host, without waiting for the device every step."""
        return None


@dataclass
class Full(Policy):
    """The whole cache: every token kept."""

    name: ClassVar[str] = "full"


@dataclass
class _Budgeted(Policy):
    """A fixed budget per head, spent as: when a head is full, drop `amount` of its unprotected tokens of lowest
    `importance`."""

    budget: int
    budget_schedule: str = "uniform"

    def __post_init__(self):
        if not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"{self.name}: budget={self.budget!r} must be a positive integer")
        if self.budget_schedule not in BUDGET_SCHEDULES:
            raise ValueError(f"{self.name}: budget_schedule={self.budget_schedule!r} is not one of {BUDGET_SCHEDULES}")
        self.check(self.budget)

    def check(self, budget: int, whose: str = "") -> None:
        """Raise ValueError if the policy's other parameters do not fit `budget` (`whose`: said after it)."""

    def scaled(self, count: int, budget: int) -> int:
        """`count`, set for the policy's budget B, scaled to a layer's `budget`: the same share of it, so that a
        budget_schedule keeps each layer's parameters in proportion to what it holds. Rounded down, as a config's
        fraction of B is (`policy_at_budget`) and the default half (budget // 2): a config's 0.5 is then that half
        at every layer."""
        return count * budget // self.budget

    def budgets(self, n_layers: int) -> list[int | None]:
        budgets = layer_budgets(self.budget, self.budget_schedule, n_layers)
        for layer, budget in enumerate(budgets):
            whose = f" (layer {layer}'s, from budget_schedule={self.budget_schedule!r})"
            if budget < 1:  # growing's rounding leaves a small B's first layers nothing: a head must hold its query
                raise ValueError(f"{self.name}: budget={budget}{whose} must be at least 1 token: use a budget "
                                 f"above {self.budget} (a lower compression) or budget_schedule='uniform'")
            self.check(budget, whose)
        return list(budgets)

    def importance(self, stats: dict[str, torch.Tensor], positions: torch.Tensor, step: int) -> torch.Tensor:
        """Per held slot, (batch, kv_heads, slots), before token `step` is appended: the lowest are dropped."""
        raise NotImplementedError

    def protected(self, positions: torch.Tensor, step: int, budget: int) -> torch.Tensor:
        return torch.zeros_like(positions, dtype=torch.bool)

    def amount(self, budget: int) -> int:
        return 1

    def drops(self, stats, held, positions, step, layer, n_layers, n_held=None):
        budget = layer_budgets(self.budget, self.budget_schedule, n_layers)[layer]
        if n_held is not None:
            if n_held < budget:
                return None
            full = True  # every head
        else:
            full = held.sum(-1, keepdim=True) >= budget
            if not full.any():
                return None
        candidates = held & ~self.protected(positions, step, budget)
        return lowest(self.importance(stats, positions, step), candidates, positions, self.amount(budget)) & full


class _PivotalCounts:
    """Scissorhands' importance: per query head and cached token, how many of the last `window` queries gave the
    token more than the threshold probability ("pivotal"). The bits of those queries are kept in a ring, 8 to a
    byte, so the window slides exactly: each step adds its bit and takes away the one `window` steps old."""

    window: int
    threshold: str

    def check_counting(self):
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"{self.name}: window={self.window!r} (w, the history window) must be an integer >= 1")
        if self.threshold not in THRESHOLDS:
            raise ValueError(f"{self.name}: threshold={self.threshold!r} is not one of {THRESHOLDS}")

    def init_stats(self, batch, heads, slots, device):
        return {"count": torch.zeros(batch, heads, slots, dtype=torch.int32, device=device),
                "history": ring_history(batch, heads, slots, self.window, device)}

    def observe_scores(self, stats, scores, lse, n_visible, step):
        if self.threshold == "1/t" and scores.is_cuda:  # one kernel, not a dozen, and no pass making probabilities
            update_pivotal_counts(scores, stats["count"], stats["history"], n_visible, step, self.window, lse=lse)
        else:
            super().observe_scores(stats, scores, lse, n_visible, step)

    def observe(self, stats, probs, visible, step):
        n_visible = visible.sum(-1, keepdim=True)
        if self.threshold == "1/t":  # the paper: more than the uniform share of the t keys softmaxed over
            threshold = 1.0 / n_visible
        else:  # the 90th percentile of the t visible entries (the authors' script sorts its whole row: README)
            ascending = probs.masked_fill(~visible, -1.0).sort(-1).values
            threshold = ascending.gather(-1, probs.shape[-1] - n_visible + 9 * n_visible // 10)
        pivotal = ((probs > threshold) & visible).to(torch.uint8)
        byte, bit = divmod(step % self.window, 8)
        ring = stats["history"][..., byte]
        stats["count"] += pivotal.int() - ((ring >> bit) & 1).int()
        stats["history"][..., byte] = (ring & (255 ^ (1 << bit))) | (pivotal << bit)

    def kv_counts(self, stats, kv_heads):
        return per_kv_head(stats["count"], kv_heads)


@dataclass
class Scissorhands(_PivotalCounts, _Budgeted):
    """The paper's Algorithm 1-2: budget B per head; when a head is full, drop the m (`drop`, default B/2) tokens
    least often pivotal (probability > 1/t, t the keys the query saw) over the last w (`window`) queries, never one
    of the r (`recent`) newest. Paper: r=10, w=400, m=B/2. That default score counts as the authors' released
    script does (the paper's pseudo-code is garbled); `score="non_pivotal"` reads Algorithm 2 the other way: drop
    the m tokens most often not pivotal for the queries of the window that saw them."""

    name: ClassVar[str] = "scissorhands"
    needs_probs: ClassVar[bool] = True
    budget_fraction: ClassVar[str | None] = "drop_fraction"
    recent: int = 10
    window: int = 400
    drop: int | None = None
    threshold: str = "1/t"
    score: str = "pivotal"

    def __post_init__(self):
        self.check_counting()
        if not isinstance(self.recent, int) or self.recent < 0:
            raise ValueError(f"scissorhands: recent={self.recent!r} (r) must be an integer >= 0")
        if self.score not in SCORES:
            raise ValueError(f"scissorhands: score={self.score!r} is not one of {SCORES}")
        super().__post_init__()

    def amount(self, budget):
        """m, scaled with the layer's budget where budgets differ by layer."""
        return budget // 2 if self.drop is None else max(1, self.scaled(self.drop, budget))

    def check(self, budget, whose=""):
        if budget <= self.recent:
            raise ValueError(f"scissorhands: budget={budget}{whose} must be larger than recent={self.recent} (B > r)")
        if self.drop is not None and (not isinstance(self.drop, int) or not 1 <= self.drop < self.budget):
            raise ValueError(f"scissorhands: drop={self.drop!r} (m, the tokens dropped at a time; in a config "
                             f"drop_fraction · B) must be an integer in [1, budget) = [1, {self.budget})")
        m = self.amount(budget)
        if not 1 <= m <= budget - self.recent:
            raise ValueError(f"scissorhands: drop={m} (m, the tokens dropped at a time: drop_fraction · B) must be "
                             f"in [1, budget - recent] = [1, {budget - self.recent}] for budget={budget}{whose}")

    def protected(self, positions, step, budget):
        return positions >= step - self.recent

    def importance(self, stats, positions, step):
        kv_heads = positions.shape[1]
        pivotal = self.kv_counts(stats, kv_heads)
        if self.score == "pivotal":
            return pivotal
        # minus the non-pivotal observations, seen - pivotal: a token is seen by its own query and each later one,
        # and the counts cover the last w of them; summed, like the counts, over the query heads of a KV head
        seen = (step - positions).clamp(max=self.window)
        return pivotal - stats["count"].shape[1] // kv_heads * seen


@dataclass
class ScissorhandsReleased(_PivotalCounts, Policy):
    """The authors' released evaluation code (`hf_opt_dropkv.py`), which departs from the paper: a token is pivotal
    above its row's 90th percentile; from position `start` on, a head drops every token outside the `recent` window
    that was pivotal for none of the last `window` queries; only layers in the `layers` band (fractions of depth:
    5-35 of OPT-66B's 64) compress. No budget: the compression is adaptive, and measured (the keep ratio).

    Unlike that script, a dropped token stays dropped, the counts come from the probabilities over the tokens
    held, as in a real cache, and the percentile is of the tokens a query sees, not of its whole row with the
    future's zeros; its heads hold different numbers of tokens, so it runs in mode=simulate only."""

    name: ClassVar[str] = "scissorhands_released"
    needs_probs: ClassVar[bool] = True
    lockstep: ClassVar[bool] = False
    recent: int = 10
    window: int = 100
    threshold: str = "p90"
    layers: tuple[float, float] = (5 / 64, 35 / 64)
    start: int = 100

    def __post_init__(self):
        self.check_counting()
        if not isinstance(self.recent, int) or self.recent < 0:
            raise ValueError(f"{self.name}: recent={self.recent!r} (r) must be an integer >= 0")
        band = tuple(self.layers) if isinstance(self.layers, (tuple, list)) else ()
        numbers = len(band) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in band)
        if not numbers or not 0 <= band[0] <= band[1] <= 1:
            raise ValueError(f"{self.name}: layers={self.layers!r} must be a band (lo, hi), 0 <= lo <= hi <= 1, "
                             "of fractions of the model's depth")
        if not isinstance(self.start, int) or self.start < 0:
            raise ValueError(f"{self.name}: start={self.start!r} must be an integer >= 0")

    def compresses(self, layer: int, n_layers: int) -> bool:
        return self.layers[0] * n_layers <= layer <= self.layers[1] * n_layers

    def drops(self, stats, held, positions, step, layer, n_layers, n_held=None):
        if step < self.start or not self.compresses(layer, n_layers):
            return None
        return held & (positions < step - self.recent) & (self.kv_counts(stats, held.shape[1]) == 0)


@dataclass
class H2O(_Budgeted):
    """Heavy-Hitter Oracle (Zhang et al., 2023): keep the `recent` newest tokens (default half the budget; scaled
    with each layer's budget where budgets differ by layer) and the heavy hitters, the tokens of largest attention
    summed over all queries so far; a full head drops one a step."""

    name: ClassVar[str] = "h2o"
    needs_probs: ClassVar[bool] = True
    budget_fraction: ClassVar[str | None] = "recent_fraction"
    recent: int | None = None

    def recent_tokens(self, budget: int) -> int:
        """The window of newest tokens at a layer's `budget`: the same share of it as `recent` is of B (the
        paper's recent ratio), as Scissorhands' m is scaled."""
        return budget // 2 if self.recent is None else self.scaled(self.recent, budget)

    def check(self, budget, whose=""):
        if self.recent is not None and (not isinstance(self.recent, int) or self.recent < 0):
            raise ValueError(f"h2o: recent={self.recent!r} must be an integer >= 0")
        if budget <= self.recent_tokens(budget):
            raise ValueError(f"h2o: budget={budget}{whose} must be larger than recent={self.recent_tokens(budget)}")

    def init_stats(self, batch, heads, slots, device):
        return {"attention": torch.zeros(batch, heads, slots, device=device)}

    def observe(self, stats, probs, visible, step):
        stats["attention"] += probs

    def protected(self, positions, step, budget):
        return positions >= step - self.recent_tokens(budget)

    def importance(self, stats, positions, step):
        return per_kv_head(stats["attention"], positions.shape[1])


@dataclass
class StreamingLLM(_Budgeted):
    """StreamingLLM (Xiao et al., 2024): the first `n_sink` tokens (attention sinks) and the newest ones. Positions
    stay the true ones (the paper re-numbers them inside the cache)."""

    name: ClassVar[str] = "streaming"
    n_sink: int = 4

    def check(self, budget, whose=""):
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"streaming: n_sink={self.n_sink!r} must be an integer >= 0")
        if budget <= self.n_sink:
            raise ValueError(f"streaming: budget={budget}{whose} must be larger than n_sink={self.n_sink}")

    def protected(self, positions, step, budget):
        return positions < self.n_sink

    def importance(self, stats, positions, step):
        return positions  # the oldest goes first


@dataclass
class TOVA(_Budgeted):
    """Token Omission Via Attention (Oren et al., 2024): a full layer drops the token the last query attended to
    least, its probability averaged over all the layer's heads, so every head of a layer keeps the same tokens."""

    name: ClassVar[str] = "tova"
    needs_probs: ClassVar[bool] = True

    def init_stats(self, batch, heads, slots, device):
        return {"last": torch.zeros(batch, heads, slots, device=device)}

    def observe(self, stats, probs, visible, step):
        stats["last"].copy_(probs)

    def importance(self, stats, positions, step):
        return stats["last"].mean(1, keepdim=True).expand_as(positions)


POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in
                                     (Full, Scissorhands, ScissorhandsReleased, H2O, StreamingLLM, TOVA)}


def make_policy(name: str, **params) -> Policy:
    """The policy `name` (one of POLICIES) with its parameters, checked."""
    if name not in POLICIES:
        raise ValueError(f"unknown KV-cache policy {name!r}; valid ones: {sorted(POLICIES)}")
    cls = POLICIES[name]
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"policy {name!r} has no parameter {unknown[0]!r}; its parameters: {allowed}")
    return cls(**params)


# a config's fractions of the budget, so that one setting serves every budget of a sweep: the count each sets, and
# its least value: scissorhands' drop_fraction (m = fraction · B; the paper's m = B/2), h2o's recent_fraction (its
# window of newest tokens)
FRACTIONS_OF_BUDGET = {"drop_fraction": ("drop", 1), "recent_fraction": ("recent", 0)}


def check_config_parameters(name: str, params: dict) -> None:
    """ValueError for what a config may not give policy `name`: a name that is not its parameter, the budget (the
    sweep's), or the count its fraction of the budget sets (`budget_fraction`)."""
    cls = POLICIES[name]
    set_by = {FRACTIONS_OF_BUDGET[cls.budget_fraction][0]: cls.budget_fraction} if cls.budget_fraction else {}
    allowed = sorted({f.name for f in dataclasses.fields(cls)} - {"budget"} - set(set_by) | set(set_by.values()))
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        why = " (a budget comes from the sweep: text length / compression)" if unknown[0] == "budget" else \
            f" ({set_by[unknown[0]]} sets it, as a fraction of each budget)" if unknown[0] in set_by else ""
        raise ValueError(f"{unknown[0]!r} is not a parameter of policy {name!r}{why}; it takes {allowed}")


def policy_at_budget(name: str, params: dict, budget: int | None = None) -> Policy:
    """The policy `name` with the parameters a config gives it (`FRACTIONS_OF_BUDGET` among them), at `budget`
    tokens per head (the policies without a budget, `full` and `scissorhands_released`, take none)."""
    params = dict(params)
    for key, (field, least) in FRACTIONS_OF_BUDGET.items():
        if key in params:
            # rounded down, as the policies' own defaults (m = B // 2) and H2O's released code (int(ratio * n))
            params[field] = max(least, math.floor(params.pop(key) * budget + 1e-9))
    if "layers" in params:
        params["layers"] = tuple(params["layers"])
    if budgeted(name):
        params["budget"] = budget
    return make_policy(name, **params)


def budgeted(name: str) -> bool:
    """Whether policy `name` takes a budget (the others, `full` and `scissorhands_released`, run once each, at
    whatever compression they reach)."""
    return name in POLICIES and issubclass(POLICIES[name], _Budgeted)
