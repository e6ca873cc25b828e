"""The quality of pre-gating, at small scale: one small Switch-shaped language model trained twice on the local
corpus with the shared training loop (`repro.train`), with ordinary gates (`gate`) and with pre-gates (`pregate`),
on the same batches, steps, seed and initial weights; the validation perplexity of both, and the change pre-gating
makes.

The paper keeps pretrained Switch weights and trains the pre-gates while fine-tuning (2,048 steps); its quality
claims (Rouge-1 on Xsum, exact match on QA) need those checkpoints and datasets, and no pre-gate training code of
theirs is public. Here both models train from scratch, so the comparison isolates the one difference: which hidden
state chooses each MoE block's experts, the block's own (gate) or the previous MoE block's input (pregate).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import torch

from repro import checks
from repro.context import ConfigError, RunContext, fingerprint
from repro.records import Row
from repro.text_data import TokenStream, lm_batches, load_token_stream, windows
from repro.train import Candidate, Trainee, TrainSpec, final_rows, model_flops_per_token, train_from_config

from .model import MoEConfig, SwitchLM

MODEL_KEYS = ("d_model", "d_ff", "n_layer", "n_head", "n_experts", "top_k")


def model_config(q, vocab_size: int) -> MoEConfig:
    return MoEConfig(**{k: q[k] for k in MODEL_KEYS}, vocab_size=vocab_size, max_len=q.seq_len)


def pregated_twin(model: SwitchLM) -> SwitchLM:
    """`model` with pre-gates and every weight of `model`: the pre-gate of MoE block N starts as the gate of block
    N+1, so the two differ only in what that gate reads (block N's input instead of block N+1's)."""
    twin = SwitchLM(dataclasses.replace(model.config, pregate=True))
    state = model.state_dict()
    moe_blocks = [b.index for b in model.blocks if b.moe]
    for this, following in zip(moe_blocks, moe_blocks[1:]):
        gate = state.pop(f"blocks.{following}.ffn.gate.classifier.weight")
        state[f"blocks.{this}.ffn.pregate.classifier.weight"] = gate
    twin.load_state_dict(state)  # strict: every weight of the twin is set, none is left over
    return twin


def candidates(cfg, ctx: RunContext, data: TokenStream) -> list[Candidate]:
    q, accumulation = cfg.quality, TrainSpec.from_config(cfg.train).grad_accum
    sequences = q.batch_tokens // q.seq_len
    extra = dict(part="quality", model=f"moe-d{q.d_model}-e{q.n_experts}", seq_len=q.seq_len, series="quality")

    batches = lm_batches(data.train, sequences, q.seq_len, accumulation, cfg.seed)  # the same for both models

    def evaluate(model):
        gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same validation windows every time
        loss = 0.0
        for _ in range(q.eval_batches):
            x = windows(data.val, sequences, q.seq_len, gen).to(ctx.device)
            loss += model(x, labels=x).lm_loss.item() / q.eval_batches  # the language-model loss, without aux
        return [Row("", "step", 0, "val_loss", "nats", loss, n=1),
                Row("", "step", 0, "val_perplexity", "ppl", math.exp(loss), n=1)]

    def candidate(name: str, pregate: bool) -> Candidate:
        def build() -> Trainee:
            torch.manual_seed(cfg.seed)
            model = SwitchLM(model_config(q, data.vocab_size))
            if pregate:
                model = pregated_twin(model)
            settings = dict(model=dataclasses.asdict(model.config), sequences=sequences, data=data.fingerprint,
                            eval_batches=q.eval_batches, seed=cfg.seed)
            return Trainee(name, model, batches, evaluate, sequences * q.seq_len * accumulation,
                           model_flops_per_token(model, q.n_layer, q.d_model, q.seq_len), dict(extra),
                           fingerprint(settings))
        return Candidate(name, dict(extra), build)

    return [candidate("gate", False), candidate("pregate", True)]


def change_rows(rows: list[Row]) -> Iterator[Row]:
    """Pre-gating's change of the final validation perplexity, % of the ordinary gates', where both finished."""
    ppl = final_rows(rows, "val_perplexity", "model")  # of trainees that did not fail
    for (provider, model), r in ppl.items():
        base = ppl.get(("gate", model))
        if provider == "pregate" and base is not None:
            yield Row(provider, r.x_name, r.x_value, "val_perplexity_change", "%", 100 * (r.p50 / base.p50 - 1),
                      n=1, extra={**r.extra, "baseline": "gate"})


def validate(cfg) -> None:
    q = cfg.quality
    for key in ("d_model", "d_ff", "n_head", "n_experts", "top_k", "eval_batches"):
        checks.number(f"quality.{key}", q[key], at_least=1)
    checks.number("quality.n_layer", q.n_layer, at_least=4)  # two MoE blocks (every other layer), or none is pre-gated
    checks.number("quality.seq_len", q.seq_len, at_least=2)
    checks.number("quality.batch_tokens", q.batch_tokens, at_least=1)
    if q.top_k > q.n_experts:
        raise ConfigError(f"quality.top_k={q.top_k} exceeds quality.n_experts={q.n_experts}")
    if q.d_model % q.n_head:
        raise ConfigError(f"quality.d_model={q.d_model} must be a multiple of quality.n_head={q.n_head}")
    if q.batch_tokens % q.seq_len:  # a batch is whole sequences: the rest would be dropped without a word
        raise ConfigError(f"quality.batch_tokens={q.batch_tokens} must be a multiple of quality.seq_len={q.seq_len} "
                          "(a batch is whole sequences)")
    TrainSpec.from_config(cfg.train)
    corpus(cfg)  # tokenised here (and cached), so that a corpus too small is refused before the serving sweep


def corpus(cfg):
    """The training corpus's tokens, with both parts longer than a sequence."""
    data = load_token_stream(cfg.data, cfg.paths.cache)
    data.check_fits(cfg.quality.seq_len, "quality.seq_len")
    return data


def run(cfg, ctx: RunContext) -> Iterator[Row]:
    yield from train_from_config(cfg, candidates(cfg, ctx, corpus(cfg)), ctx.device, change_rows)
