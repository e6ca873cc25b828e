"""FlashAttention end to end: GPT-2 (causal LM) and BERT (masked LM) from their transformers configs, trained
with each attention implementation on the same data and seed (tasks flash_gpt2, flash_bert, flash_gpt2_long).

The implementation is the swept variable (`attention=[...]`): `eager` (HuggingFace's own, the paper's baseline),
`sdpa` (PyTorch's fused kernels), `effrepro` (our Triton kernel) and `megatron`, the paper's Megatron-LM baseline:
GPT-2 built by megatron-core (megatron_gpt.py), on GPUs, where it is installed. A transformers attention may take
modifiers: `+fused` swaps in our other training kernels (LayerNorm, bias + GELU, the loss over the vocabulary, and
with our attention, attention on GPT-2's packed q, k, v: effrepro_kernels/hf_gpt2.py; GPT-2 only), `+packed` that
attention alone (`effrepro` only), `+compile` compiles the model with torch.compile (`compile.backend`,
`compile.mode`), and `+graphs` after it with mode reduce-overhead (CUDA graphs), whatever `compile.mode` says;
for example `sdpa+compile`, `effrepro+fused+compile`, `effrepro+packed+compile`, `effrepro+compile+graphs`.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from repro import checks
from repro.bench import require_triton
from repro.checks import as_list, choice
from repro.context import ConfigError, RunContext, fingerprint
from repro.records import Row
from repro.text_data import TokenStream, load_token_stream, windows
from repro.train import (Candidate, Trainee, TrainSpec, final_rows, model_flops_per_token, step_generator,
                         throughput_ratios, train_from_config)

from . import OURS

ATTENTION = ("eager", "sdpa", OURS, "megatron")
MODIFIERS = ("fused", "packed", "compile", "graphs")  # graphs: compiled with mode=reduce-overhead (CUDA graphs)
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# (layers, hidden, heads) of the models the paper trains, and tiny ones for CPU smoke runs
SIZES = {"gpt2": {"tiny": (2, 64, 2), "small": (12, 768, 12), "medium": (24, 1024, 16)},
         "bert": {"tiny": (2, 64, 2), "large": (24, 1024, 16)}}


def parse_implementation(name: str) -> tuple[str, tuple[str, ...]]:
    """'effrepro+fused+compile' -> ('effrepro', ('fused', 'compile'))."""
    attention, *modifiers = str(name).split("+")
    return attention, tuple(modifiers)


def _build_model(spec, tokenizer, seq_len: int, implementation: str, device: torch.device, seed: int,
                 compile_options: dict | None):
    attention, modifiers = parse_implementation(implementation)
    model = _build_transformers_model(spec, tokenizer, seq_len, attention, device, seed)
    if "fused" in modifiers:
        from effrepro_kernels.hf_gpt2 import fuse_gpt2
        model = fuse_gpt2(model)
    if "packed" in modifiers:
        from effrepro_kernels.hf_gpt2 import pack_attention
        model = pack_attention(model)
    if "compile" in modifiers:
        model.compile(**compile_options)  # in place: the module, its parameters' names, its state stay
    return model


def _build_transformers_model(spec, tokenizer, seq_len: int, attention: str, device: torch.device, seed: int):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, GPT2Config

    layers, hidden, heads = SIZES[spec.family][spec.size]
    vocab_size = len(tokenizer)
    positions = spec.positions or seq_len
    if attention == "megatron":
        from .megatron_gpt import build_megatron_gpt2
        return build_megatron_gpt2(device, layers, hidden, heads, vocab_size, positions, spec.dropout, seed)
    if spec.family == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=positions, n_embd=hidden, n_layer=layers,
                            n_head=heads, resid_pdrop=spec.dropout, embd_pdrop=spec.dropout,
                            attn_pdrop=spec.dropout, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=positions,
                        hidden_dropout_prob=spec.dropout, attention_probs_dropout_prob=spec.dropout,
                        pad_token_id=tokenizer.pad_token_id)
    return AutoModelForMaskedLM.from_config(config, attn_implementation=attention)


def _mask_tokens(x: torch.Tensor, tokenizer, gen: torch.Generator, rate: float = 0.15):
    """BERT's masking: `rate` of the positions are predicted; of those 80% become <mask>, 10% a random token,
    10% stay."""
    special = torch.tensor(tokenizer.all_special_ids)
    chosen = (torch.rand(x.shape, generator=gen) < rate) & ~torch.isin(x, special)
    labels = torch.where(chosen, x, -100)
    roll = torch.rand(x.shape, generator=gen)
    x = torch.where(chosen & (roll < 0.8), tokenizer.mask_token_id, x)
    random_tokens = torch.randint(len(tokenizer), x.shape, generator=gen)
    x = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_tokens, x)
    return x, labels


def make_batch(family: str, ids: torch.Tensor, batch: int, seq_len: int, tokenizer, gen: torch.Generator) -> dict:
    if family == "gpt2":
        x = windows(ids, batch, seq_len, gen)
        return {"input_ids": x, "labels": x}  # transformers shifts the labels itself
    body = windows(ids, batch, seq_len - 2, gen)
    cls = torch.full((batch, 1), tokenizer.cls_token_id)
    sep = torch.full((batch, 1), tokenizer.sep_token_id)
    x, labels = _mask_tokens(torch.cat([cls, body, sep], 1), tokenizer, gen)
    return {"input_ids": x, "labels": labels}


def candidates(cfg: DictConfig, ctx: RunContext, data: TokenStream) -> Iterator[Candidate]:
    m, b = cfg.model, cfg.batch
    layers, hidden, _ = SIZES[m.family][m.size]
    for seq_len, attention in itertools.product(as_list(m.seq_len), as_list(cfg.attention)):
        micro = b.tokens // seq_len
        modifiers = parse_implementation(attention)[1]
        compile_options = None
        if "compile" in modifiers:
            compile_options = OmegaConf.to_container(cfg.compile)
            if "graphs" in modifiers:  # replays each compiled graph's launches: no host time per kernel
                compile_options["mode"] = "reduce-overhead"
        compiled = compile_options is not None
        extra = dict(seq_len=seq_len, model=f"{m.family}-{m.size}", series=f"{m.family}-{m.size} N={seq_len}",
                     **({"compile": compile_options} if compiled else {}))

        def build(seq_len=seq_len, attention=attention, micro=micro, extra=extra,
                  compile_options=compile_options) -> Trainee:
            base, modifiers = parse_implementation(attention)
            if base == OURS or "fused" in modifiers:
                require_triton(attention, ctx.device)
            torch.manual_seed(cfg.seed)  # the same initial weights for every transformers implementation
            model = _build_model(m, data.tokenizer, seq_len, attention, ctx.device, cfg.seed, compile_options)
            # the compile options are part of what a checkpoint was trained with
            settings = dict(model=OmegaConf.to_container(m), seq_len=seq_len, micro=micro, data=data.fingerprint,
                            eval=OmegaConf.to_container(cfg.eval), seed=cfg.seed, compile=compile_options)

            def batches(step, rank, world):
                gen = step_generator(cfg.seed, step, rank)
                return [make_batch(m.family, data.train, micro, seq_len, data.tokenizer, gen)
                        for _ in range(cfg.train.grad_accum)]

            def evaluate(model):
                gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same validation batches every time
                loss, hits, weight = 0.0, 0, 0
                for _ in range(cfg.eval.batches):
                    batch = {k: v.to(ctx.device) for k, v in
                             make_batch(m.family, data.val, micro, seq_len, data.tokenizer, gen).items()}
                    out = model(**batch)
                    # MLM batches mask different numbers of tokens: each batch's mean counts by its tokens
                    n = 1
                    if m.family == "bert":
                        mask = batch["labels"] != -100
                        hits += int((out.logits.argmax(-1)[mask] == batch["labels"][mask]).sum())
                        n = int(mask.sum())
                    loss += out.loss.item() * n
                    weight += n
                loss /= max(weight, 1)
                if m.family == "bert":
                    return [Row(attention, "step", 0, "val_loss", "nats", loss, n=1),
                            Row(attention, "step", 0, "val_mlm_accuracy", "%", 100 * hits / max(weight, 1), n=1)]
                return [Row(attention, "step", 0, "val_loss", "nats", loss, n=1),
                        Row(attention, "step", 0, "val_perplexity", "ppl", math.exp(loss), n=1)]

            return Trainee(attention, model, batches, evaluate, micro * seq_len * cfg.train.grad_accum,
                           model_flops_per_token(model, layers, hidden, seq_len), extra, fingerprint(settings))
        yield Candidate(attention, extra, build)


def validate(cfg: DictConfig) -> None:
    m = cfg.model
    if m.family not in SIZES or m.size not in SIZES[m.family]:
        raise ConfigError(f"model.family={m.family!r} model.size={m.size!r}: known are "
                          + "; ".join(f"{f}: {sorted(s)}" for f, s in SIZES.items()))
    for name in checks.axis("attention", cfg.attention):
        attention, modifiers = parse_implementation(name)
        choice("attention", attention, ATTENTION)
        if any(x not in MODIFIERS for x in modifiers) or len(set(modifiers)) < len(modifiers) or \
                (modifiers and attention == "megatron") or ("graphs" in modifiers and "compile" not in modifiers):
            raise ConfigError(f"attention={name!r}: an implementation is one of {list(ATTENTION)}, then optionally "
                              f"+fused, +packed, +compile and +graphs (with +compile), each once (megatron takes "
                              f"none)")
        if "graphs" in modifiers and cfg.compile.mode not in (None, "reduce-overhead"):
            raise ConfigError(f"attention={name!r} compiles with mode reduce-overhead, but compile.mode="
                              f"{cfg.compile.mode!r} is set for every +compile; leave compile.mode null")
        if attention == "megatron" and m.family != "gpt2":  # megatron_gpt.py would build a GPT whatever the family
            raise ConfigError(f"attention={name!r}: our Megatron baseline is a GPT (megatron_gpt.py); "
                              f"model.family={m.family!r}")
        if ("fused" in modifiers or "packed" in modifiers) and m.family != "gpt2":
            raise ConfigError(f"attention={name!r}: +fused and +packed swap GPT-2's modules; "
                              f"model.family={m.family!r}")
        if "packed" in modifiers and (attention != OURS or "fused" in modifiers):
            raise ConfigError(f"attention={name!r}: +packed is our attention on packed q, k, v, for {OURS!r} "
                              f"alone (+fused has it already)")
    choice("compile.mode", cfg.compile.mode, COMPILE_MODES)
    if any("compile" in parse_implementation(name)[1] for name in as_list(cfg.attention)):
        _validate_compile_backend(cfg.compile.backend)
    checks.numbers("model.seq_len", m.seq_len, at_least=2)
    if m.positions is not None:
        checks.number("model.positions", m.positions, at_least=2)
    checks.number("model.dropout", m.dropout, integer=False, at_least=0, below=1)
    checks.number("batch.tokens", cfg.batch.tokens, at_least=1)
    checks.number("eval.batches", cfg.eval.batches, at_least=1)
    TrainSpec.from_config(cfg.train)
    for seq_len in as_list(m.seq_len):
        if m.family == "bert" and seq_len < 3:  # no token to mask: every loss would be nan
            raise ConfigError(f"model.seq_len={seq_len}: a BERT sequence is [CLS] and [SEP] around the tokens it "
                              "masks, so model family bert needs at least 3")
        if m.positions and seq_len > m.positions:
            raise ConfigError(f"model.seq_len={seq_len} is beyond the model's {m.positions} positions "
                              "(model.positions); raise model.positions or shorten the sequence")
        if cfg.batch.tokens < seq_len:
            raise ConfigError(f"batch.tokens={cfg.batch.tokens} is less than one sequence of {seq_len}")
        if cfg.batch.tokens % seq_len:  # a step takes whole sequences: the rest would be dropped at this length
            lengths = as_list(m.seq_len)
            raise ConfigError(f"batch.tokens={cfg.batch.tokens} is not a multiple of model.seq_len={seq_len}, so "
                              f"a step would take {cfg.batch.tokens // seq_len * seq_len} tokens at this length; "
                              f"use a multiple of every length ({math.lcm(*lengths)})")


def _validate_compile_backend(backend) -> None:
    """torch.compile takes the backend's name only when the model is compiled, after the implementations before
    it have trained: a misspelt one is refused here instead. exclude_tags=(): the debug and experimental backends
    (eager, aot_eager) compile too."""
    import torch._dynamo

    choice("compile.backend", backend, torch._dynamo.list_backends(exclude_tags=()))


def unread_keys(cfg: DictConfig) -> dict[str, str]:
    names = as_list(cfg.attention)
    compiled = [name for name in names if "compile" in parse_implementation(name)[1]]
    if not compiled:
        return {"compile": f"only the implementations with +compile read it, and attention={names} has none"}
    if all("graphs" in parse_implementation(name)[1] for name in compiled):
        return {"compile.mode": f"+graphs compiles with mode reduce-overhead, and every +compile of attention={names} "
                                "has +graphs"}
    return {}


def run(cfg: DictConfig, ctx: RunContext) -> Iterator[Row]:
    if any(parse_implementation(name)[0] == OURS for name in as_list(cfg.attention)):
        from effrepro_kernels.hf_attention import register
        register()
    data = load_token_stream(cfg.data, cfg.paths.cache)
    for seq_len in as_list(cfg.model.seq_len):
        data.check_fits(seq_len, "model.seq_len")
    yield from train_from_config(cfg, candidates(cfg, ctx, data), ctx.device, derived_rows)


def same_build_sdpa(provider: str) -> str | None:
    """The SDPA build an implementation of ours compares with: built the same way (compiled, with CUDA graphs;
    packing is ours alone), so that a speedup is the attention's and not the build's. None for the others."""
    name, *options = provider.split("+")
    return "+".join(["sdpa", *(o for o in options if o != "packed")]) if name == OURS else None


def derived_rows(rows: list[Row]) -> Iterator[Row]:
    """Per sequence length: throughput speedups over `eager` (the paper's HuggingFace baseline), over
    `megatron` and over `sdpa`, and over SDPA built as each of ours is (`same_build_sdpa`); every
    implementation's throughput over megatron's at the shortest context (the paper's Table 4 compares longer
    contexts with Megatron at 1K); and per implementation, the final validation perplexity's gain over the
    shortest context."""
    yield from throughput_ratios(rows, "seq_len", "eager", "speedup")
    yield from throughput_ratios(rows, "seq_len", "megatron", "speedup")
    yield from throughput_ratios(rows, "seq_len", "sdpa", "speedup_over_sdpa")
    yield from throughput_ratios(rows, "seq_len", same_build_sdpa, "speedup_over_sdpa_same_build")
    tps = final_rows(rows, "tokens_per_s", "seq_len")
    shortest = min((s for _, s in tps), default=None)
    megatron_shortest = tps.get(("megatron", shortest))
    if megatron_shortest:
        for (provider, seq_len), r in tps.items():
            if seq_len != shortest:
                yield Row(provider, "seq_len", seq_len, "speedup", "x", r.p50 / megatron_shortest.p50, n=1,
                          extra={**r.extra, "baseline": "megatron_at_shortest", "shortest": shortest})
    ppl = final_rows(rows, "val_perplexity", "seq_len")
    shortest = min((s for _, s in ppl), default=None)
    for (provider, seq_len), r in ppl.items():
        if seq_len != shortest and (provider, shortest) in ppl:
            yield Row(provider, "seq_len", seq_len, "val_ppl_gain_vs_shortest", "ppl",
                      ppl[(provider, shortest)].p50 - r.p50, n=1, extra={**r.extra, "shortest": shortest})
