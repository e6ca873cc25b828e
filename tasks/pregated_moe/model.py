"""A Switch-shaped mixture-of-experts language model in plain PyTorch, for the Pre-gated MoE reproduction.

Decoder-only causal LM: pre-norm blocks of causal self-attention and a feed-forward layer; the feed-forward of
every `moe_every`-th block is a mixture of experts (Switch Transformers put one in every other layer, and so does
the paper's artifact). Routing is Switch's: a softmax gate sends each token to its top-k experts, each chosen
expert's output is scaled by its gate probability (which is what trains the gate), and an auxiliary loss balances
the load. There is no expert capacity: no token is ever dropped, so routing is the same at any batch size.

With `pregate=True` the gate of MoE block N, reading block N's input, chooses the experts of MoE block N+1 (the
paper's pre-gate), so that block N+1's experts are known one block early and can be copied to the GPU while block
N computes. The first MoE block also has an ordinary gate for itself; the last has no pre-gate.

Written here rather than taken from transformers: transformers' Switch model is an encoder-decoder whose MoE layer
gives no hook between routing and expert compute, which is where the offloading runtime (offload.py) steps in.
`load_switch_weights` brings a transformers Switch model's expert and router weights over.
"""
from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

# d_model, d_ff, layers, heads. The expert sizes are Switch's; layers and heads those of its T5 stacks.
SIZES = {
    "tiny": (32, 64, 4, 2),
    "switch-base": (768, 3072, 12, 12),
    "switch-large": (1024, 4096, 24, 16),
}


@dataclass
class MoEConfig:
    d_model: int = 32
    d_ff: int = 64
    n_layer: int = 4
    n_head: int = 2
    n_experts: int = 8
    top_k: int = 1
    pregate: bool = False
    moe_every: int = 2  # blocks moe_every-1, 2*moe_every-1, ... have experts (Switch: 1, 3, 5, ...)
    vocab_size: int = 32128  # Switch's (T5's) vocabulary
    max_len: int = 1024
    aux_loss_coef: float = 0.01  # Switch's alpha, per gate

    def __post_init__(self):
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")
        if not 1 <= self.moe_every <= self.n_layer:
            raise ValueError(f"moe_every={self.moe_every} must be between 1 and n_layer={self.n_layer}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_head={self.n_head}")

    @property
    def moe_blocks(self) -> list[int]:
        """The indices of the blocks with experts."""
        return [i for i in range(self.n_layer) if i % self.moe_every == self.moe_every - 1]

    @classmethod
    def of_size(cls, size: str, **overrides) -> "MoEConfig":
        if size not in SIZES:
            raise ValueError(f"size={size!r} is not one of {list(SIZES)}")
        d_model, d_ff, n_layer, n_head = SIZES[size]
        return cls(**{**dict(d_model=d_model, d_ff=d_ff, n_layer=n_layer, n_head=n_head), **overrides})


@dataclass
class Routing:
    """One gate's decision for a batch of tokens. The host needs to know which experts it uses (to pick or copy
    their weights); that read is started as soon as the routing exists (`start_read`) and waited for only when the
    experts are needed (`active_experts`), so that a routing chosen a block early (a pre-gate's) reaches the host
    while the device computes, and no block waits for it."""

    experts: torch.Tensor  # (tokens, top_k) chosen expert ids
    weights: torch.Tensor  # (tokens, top_k) their gate probabilities, which scale the experts' outputs
    aux_loss: torch.Tensor | float  # the gate's load-balancing loss; 0.0 out of training, where nothing uses it
    n_experts: int
    _ids: torch.Tensor | None = None  # the chosen expert ids, flat, on the host (or on their way there)
    _arrived: torch.cuda.Event | None = None
    _counts: list[int] | None = None

    def start_read(self) -> None:
        """Copy the chosen ids to the host without waiting for them: one small copy and no kernel (counting them
        on the device would take three launches, or a wait: `unique` and `bincount` read sizes back)."""
        if self._ids is not None:
            return
        ids = self.experts.flatten()
        if ids.is_cuda:
            self._ids = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True).copy_(ids, non_blocking=True)
            self._arrived = torch.cuda.Event()
            self._arrived.record()
        else:
            self._ids = ids

    def read_done(self) -> bool:
        """Whether `counts` would not wait."""
        return self._ids is not None and (self._arrived is None or self._arrived.query())

    def counts(self) -> list[int]:
        """How many (token, choice) pairs each expert takes."""
        if self._counts is None:
            self.start_read()
            if self._arrived is not None:
                self._arrived.synchronize()
            self._counts = torch.bincount(self._ids, minlength=self.n_experts).tolist()
        return self._counts


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch's auxiliary loss, n_experts · Σ_i f_i · P_i: f_i the fraction of routing choices that went to expert
    i, P_i the mean gate probability of expert i. 1 when balanced. With top_k > 1, f counts all k choices of
    each token and still sums to 1, so the loss keeps its scale."""
    n_experts = probs.shape[-1]
    f = F.one_hot(experts, n_experts).float().mean((0, 1))
    return n_experts * (f * probs.mean(0)).sum()


class Gate(nn.Module):
    def __init__(self, d_model: int, n_experts: int, top_k: int):
        super().__init__()
        self.classifier = nn.Linear(d_model, n_experts, bias=False)  # the name transformers' Switch router uses
        self.top_k = top_k

    def forward(self, h: torch.Tensor) -> Routing:
        # float32, as Switch keeps its router: under autocast the product would run in bf16. Autocast is turned off
        # only where on: entering the context would cost the host time in every MoE block of a timed step.
        fp32 = torch.autocast(h.device.type, enabled=False) if torch.is_autocast_enabled(h.device.type) \
            else nullcontext()
        with fp32:
            probs = F.linear(h.float(), self.classifier.weight.float()).softmax(-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        aux_loss = load_balancing_loss(probs, experts) if self.training else 0.0
        return Routing(experts, weights, aux_loss, probs.shape[-1])


def active_experts(routing: Routing) -> list[int]:
    """The experts a routing uses, ascending (waiting for its read to the host, the first time)."""
    return [e for e, n in enumerate(routing.counts()) if n]


def expert_ffn(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    return F.linear(F.relu(F.linear(x, w_in)), w_out)  # Switch's expert: wi, ReLU, wo, no biases


class ExpertStack:
    """One MoE block's experts, all resident on one device and stacked: expert e is `w_in[e]`, `w_out[e]`. Called
    with an expert id on the host it gives views of them, as any `weights_of` in `mix_experts`; `pick` takes an id
    still on the device."""

    def __init__(self, w_in: torch.Tensor, w_out: torch.Tensor):
        self.w_in, self.w_out = w_in, w_out

    def __call__(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w_in[e], self.w_out[e]

    def pick(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert `e`, a one-element tensor on the experts' device: a copy of its weights gathered there, so that
        the host need not read `e`."""
        return self.w_in.index_select(0, e)[0], self.w_out.index_select(0, e)[0]


def mix_experts(h: torch.Tensor, routing: Routing, weights_of) -> torch.Tensor:
    """Σ over each token's chosen experts of gate probability × expert output. `weights_of(e)` gives expert e's
    (w_in, w_out) wherever they are (the model's own tensors or an offloading slot); the experts go in ascending
    order whatever the source, one addition each, so every strategy adds in the same order and gives the same
    bits. Resident experts (an `ExpertStack`) serve a routing of one (token, choice) without reading it to the
    host: the expert is picked on the device, the same weights in the same product."""
    if routing.experts.numel() == 1 and isinstance(weights_of, ExpertStack):
        return (expert_ffn(h, *weights_of.pick(routing.experts.view(1))) * routing.weights).to(h.dtype)
    active, top_k = active_experts(routing), routing.experts.shape[1]
    if len(active) == 1 and top_k == 1:  # every token to one expert (batch 1): no gather, no scatter
        return (expert_ffn(h, *weights_of(active[0])) * routing.weights).to(h.dtype)
    order = routing.experts.flatten().argsort(stable=True)  # the (token, choice) pairs by expert, then by token
    tokens = order // top_k
    inputs, weights = h[tokens], routing.weights.flatten()[order, None]
    counts = routing.counts()
    out, start = torch.zeros_like(h), 0
    for e in active:
        n = counts[e]
        part = slice(start, start + n)
        y = expert_ffn(inputs[part], *weights_of(e)) * weights[part]
        out.index_add_(0, tokens[part], y.to(out.dtype))  # a token at most once per expert: no racing additions
        start += n
    return out


def span(offload, kind: str, index: int):
    """The offloading runtime's timing span (see offload.py), or nothing when running without one."""
    return nullcontext() if offload is None else offload.span(kind, index)


class SwitchFFN(nn.Module):
    """The experts of one MoE block and the gates it runs. The experts of a block are two stacked tensors, so that
    one expert is one slice of each: what the offloading runtime copies."""

    def __init__(self, cfg: MoEConfig, moe_index: int, n_moe: int):
        super().__init__()
        self.moe_index = moe_index
        self.w_in = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_ff, cfg.d_model))
        self.w_out = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, cfg.d_ff))
        self.gate = Gate(cfg.d_model, cfg.n_experts, cfg.top_k) if not cfg.pregate or moe_index == 0 else None
        self.pregate = Gate(cfg.d_model, cfg.n_experts, cfg.top_k) if cfg.pregate and moe_index < n_moe - 1 else None

    def expert_weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w_in[e], self.w_out[e]

    def forward(self, h: torch.Tensor, carried: Routing | None, offload=None):
        """h: (tokens, d_model). `carried`: this block's routing, chosen by the previous MoE block's pre-gate.
        Returns the output, the routing of the next MoE block (None without a pre-gate) and the gates' aux loss."""
        routing = self.gate(h) if self.gate is not None else carried
        next_routing = self.pregate(h) if self.pregate is not None else None
        if offload is not None:  # which starts the next routing's read where its strategy reads routings
            weights_of = offload.fetch(self.moe_index, routing, next_routing)
        else:
            if next_routing is not None:
                next_routing.start_read()  # on its way to the host while this block computes
            weights_of = self.expert_weights
        # The loss of each gate run here; a carried routing's was counted by the block whose pre-gate chose it.
        ran = ([routing] if self.gate is not None else []) + ([next_routing] if next_routing is not None else [])
        aux = sum(r.aux_loss for r in ran)
        return mix_experts(h, routing, weights_of), next_routing, aux


class KVCache:
    """Keys and values of every attention layer for the positions seen so far, in buffers allocated once."""

    def __init__(self, cfg: MoEConfig, batch: int, max_len: int, device, dtype: torch.dtype):
        if max_len > cfg.max_len:
            raise ValueError(f"a cache of {max_len} positions exceeds the model's max_len={cfg.max_len}")
        shape = (cfg.n_layer, batch, cfg.n_head, max_len, cfg.d_model // cfg.n_head)
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled; the model advances it after each forward

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.length + k.shape[2]
        if end > self.keys.shape[3]:
            raise ValueError(f"the cache holds {self.keys.shape[3]} positions; {end} were asked for")
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: MoEConfig, index: int):
        super().__init__()
        self.index, self.n_head = index, cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.update(self.index, k, v)
        n = k.shape[2]
        # New queries see every cached key and the new keys up to their own position.
        mask = None if t == 1 or t == n else torch.ones(t, n, dtype=torch.bool, device=x.device).tril(n - t)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=t > 1 and t == n)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: MoEConfig, index: int, moe_index: int | None, n_moe: int):
        super().__init__()
        self.index = index
        self.norm1, self.norm2 = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg, index)
        self.moe = moe_index is not None
        self.ffn = SwitchFFN(cfg, moe_index, n_moe) if self.moe else nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_ff, bias=False), nn.ReLU(), nn.Linear(cfg.d_ff, cfg.d_model, bias=False))

    def forward(self, x, carried, cache, offload):
        x = x + self.attn(self.norm1(x), cache)
        h = self.norm2(x)
        if not self.moe:
            return x + self.ffn(h), carried, 0.0
        with span(offload, "moe", self.ffn.moe_index):
            y, carried, aux = self.ffn(h.flatten(0, 1), carried, offload)
        return x + y.view_as(x), carried, aux


class SwitchLM(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.config = cfg
        moe_blocks = cfg.moe_blocks
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg, i, moe_blocks.index(i) if i in moe_blocks else None, len(moe_blocks))
            for i in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight
        for p in self.parameters():
            if p.dim() > 1:  # norms keep their ones
                nn.init.normal_(p, std=0.02)

    @property
    def moe_layers(self) -> list[SwitchFFN]:
        return [b.ffn for b in self.blocks if b.moe]

    def non_embedding_params(self) -> int:
        """The weights one token multiplies (what `repro.train.model_flops_per_token` counts): all but the
        position table, with only top_k of the n_experts experts of each MoE block. The token embedding stays: it
        is the tied output layer's weight too, a product every token pays for (as the rule counts it for a model
        without this method)."""
        cfg = self.config
        experts = sum(f.w_in.numel() + f.w_out.numel() for f in self.moe_layers)
        total = sum(p.numel() for p in self.parameters())  # the tied embedding once
        return total - self.position.weight.numel() - experts + experts * cfg.top_k // cfg.n_experts

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, cache: KVCache | None = None,
                offload=None) -> SimpleNamespace:
        """Logits of every position; with `labels` (the input ids themselves: they are shifted here) the loss,
        next-token cross-entropy plus aux_loss_coef × the gates' load-balancing losses. `offload`: the runtime
        that supplies expert weights at inference (offload.py)."""
        t = input_ids.shape[1]
        start = 0 if cache is None else cache.length
        if start + t > self.config.max_len:
            raise ValueError(f"positions up to {start + t} exceed max_len={self.config.max_len}")
        x = self.embed(input_ids) + self.position(torch.arange(start, start + t, device=input_ids.device))
        carried, aux_loss = None, 0.0
        for block in self.blocks:
            with span(offload, "block", block.index):
                x, carried, aux = block(x, carried, cache, offload)
            aux_loss = aux_loss + aux
        if cache is not None:
            cache.length += t
        logits = self.lm_head(self.norm(x))
        out = SimpleNamespace(logits=logits, aux_loss=aux_loss, loss=None, lm_loss=None)
        if labels is not None:
            out.lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
            out.loss = out.lm_loss + self.config.aux_loss_coef * aux_loss
        return out


def _copy_weight(dst: torch.Tensor, state_dict: dict, name: str) -> None:
    if name not in state_dict:
        raise ValueError(f"{name!r} is missing from the state dict")
    src = state_dict[name]
    if src.shape != dst.shape:
        raise ValueError(f"{name!r} has shape {tuple(src.shape)}; the model expects {tuple(dst.shape)}")
    dst.copy_(src)


@torch.no_grad()
def load_switch_weights(model: SwitchLM, state_dict: dict, stack: str = "decoder") -> None:
    """Copy the expert and router weights of one stack of a transformers `SwitchTransformersForConditionalGeneration`
    (names `{stack}.block.{i}.layer.{j}.mlp.router.classifier.weight` and `...mlp.experts.expert_{e}.{wi,wo}.weight`,
    any prefix) into `model`'s MoE blocks, in order. Attention, norms and dense feed-forwards are not mapped.

    A pre-gated model gets the artifact's emulation of pre-gating: the pre-gate of MoE block N is Switch's router of
    block N, so block N's own routing decision is used for block N+1; the first block's gate is its own router too.
    """
    if stack not in ("encoder", "decoder"):
        raise ValueError(f"stack={stack!r} is not 'encoder' or 'decoder'")
    pattern = re.compile(rf"(?:^|\.){stack}\.block\.(\d+)\.layer\.\d+\.mlp\.router\.classifier\.weight$")
    routers = sorted((int(m[1]), name) for name in state_dict if (m := pattern.search(name)))
    layers, cfg = model.moe_layers, model.config
    if not routers:
        raise ValueError(f"no {stack} router weights in the state dict (names like "
                         f"'{stack}.block.1.layer.1.mlp.router.classifier.weight')")
    if len(routers) != len(layers):
        raise ValueError(f"the state dict's {stack} has {len(routers)} MoE blocks; the model has {len(layers)}")
    n_experts = state_dict[routers[0][1]].shape[0]
    if n_experts != cfg.n_experts:
        raise ValueError(f"the state dict has {n_experts} experts per MoE block; the model has "
                         f"n_experts={cfg.n_experts}")
    for ffn, (_, router) in zip(layers, routers):
        prefix = router.removesuffix("router.classifier.weight")
        for e in range(n_experts):
            _copy_weight(ffn.w_in[e], state_dict, f"{prefix}experts.expert_{e}.wi.weight")
            _copy_weight(ffn.w_out[e], state_dict, f"{prefix}experts.expert_{e}.wo.weight")
        for gate in (ffn.gate, ffn.pregate):
            if gate is not None:
                _copy_weight(gate.classifier.weight, state_dict, router)
