"""Evaluate a pretrained causal LM as it ships (task lm_eval): perplexity on each evaluation text and
accuracy on multiple-choice tasks through lm-evaluation-harness. Its record is the uncompressed row that
Scissorhands and Compress-then-Prompt compare their compressed models against. For the `trained` model it
also records how the model was trained and the unigram perplexity of the same text, the floor a real model
must clear."""
from __future__ import annotations

import time
from typing import Iterator

from omegaconf import DictConfig

from repro import checks
from repro.context import ConfigError, RunContext
from repro.evaluation import TEXTS, eval_text, perplexity, perplexity_rows
from repro.models import count_parameters, load_model, require_model, trained_metadata
from repro.records import Row


def validate(cfg: DictConfig) -> None:
    require_model(cfg, "evaluates a pretrained model")
    validate_eval(cfg.eval)
    if checks.as_list(cfg.eval.texts):  # else eval.seqlen is unread: a run without texts could not set it right
        check_seqlen(cfg)
    check_tasks("eval.tasks", cfg.eval.tasks)


def unread_keys(cfg: DictConfig) -> dict[str, str]:
    unread = {}
    if not checks.as_list(cfg.eval.texts):
        unread.update(dict.fromkeys(["eval.seqlen", "eval.max_chunks"],
                                    "it is how the evaluation texts are cut, and eval.texts=[] measures none"))
    if not checks.as_list(cfg.eval.tasks):
        unread.update(dict.fromkeys(["eval.num_fewshot", "eval.limit"],
                                    "it is how the multiple-choice tasks are asked, and eval.tasks=[] runs none"))
    return unread


def check_seqlen(cfg: DictConfig) -> None:
    """eval.seqlen within the model's context where the model's config says it (model.arch.context: the models
    this suite builds); a Hub or GGUF model's is checked once loaded (repro.evaluation.perplexity)."""
    arch = cfg.model.get("arch")
    if arch is not None and cfg.eval.seqlen > arch.context:
        raise ConfigError(f"eval.seqlen={cfg.eval.seqlen} is longer than the model's context of {arch.context} "
                          f"tokens (model.arch.context); use eval.seqlen <= {arch.context}")


def validate_texts(e: DictConfig) -> None:
    """The perplexity part of the `eval:` block every task evaluating a language model has; `eval.texts=[]`
    measures no perplexity (a task that needs one says so)."""
    checks.choices("eval.texts", e.texts, TEXTS, empty_ok=True)
    checks.number("eval.seqlen", e.seqlen, at_least=2)
    checks.number("eval.batch_size", e.batch_size, at_least=1)
    if e.max_chunks is not None:
        checks.number("eval.max_chunks", e.max_chunks, at_least=1)


def validate_eval(e: DictConfig) -> None:
    """The `eval:` block of the tasks that also run multiple choice from it (texts, chunks, few-shot)."""
    validate_texts(e)
    checks.number("eval.num_fewshot", e.num_fewshot, at_least=0)
    if e.limit is not None:
        checks.number("eval.limit", e.limit, at_least=1)


def check_tasks(key: str, tasks) -> None:
    """Multiple-choice task names are looked up, each task's kind and metrics read from its YAML, and offline their
    datasets read from the local cache, before any work: a misspelt, missing or unscorable one would otherwise fail
    the run only after the experiments that come before it."""
    tasks = tuple(checks.as_list(tasks))
    if not tasks:
        return
    try:
        from repro.lm_harness import check_offline, check_served
    except ImportError as exc:
        raise ConfigError(f"{key}={list(tasks)} needs lm-evaluation-harness ({exc}): pip install -e '.[eval]', or "
                          f"{key}=[] for no multiple choice") from None
    check_served(tasks, key)
    check_offline(tasks, key)


def stdlib_corpus(cfg: DictConfig) -> tuple:
    """(spec, cache root) of the corpus whose held-out part is the `stdlib` text: a model trained by this suite
    brings its own, model.data, cached under model.cache as when the model was trained (under paths.cache its
    tokenizer would be trained again, a second copy); any other model reads data.* under paths.cache."""
    if cfg.model.get("data") is not None:
        return cfg.model.data, cfg.model.cache
    return cfg.data, cfg.paths.cache


def text_rows(cfg: DictConfig, ctx: RunContext, model, tokenizer, provider: str, extra: dict,
              forward=None) -> Iterator[Row]:
    """Perplexity rows of `model` (run through `forward`, if given) on each evaluation text of `cfg.eval`,
    at most `eval.max_chunks` chunks of `eval.seqlen` tokens each."""
    e = cfg.eval
    # every text read before the first is measured: one that cannot be loaded fails the run before its work
    data, cache = stdlib_corpus(cfg)
    texts = {name: eval_text(name, tokenizer, data=data, cache=cache) for name in checks.as_list(e.texts)}
    for name, ids in texts.items():
        if e.max_chunks:
            ids = ids[: e.max_chunks * e.seqlen]
        start = time.perf_counter()
        result = perplexity(model, ids, e.seqlen, batch_size=e.batch_size, forward=forward)
        seconds = time.perf_counter() - start
        yield from perplexity_rows(result, provider, "text", name,
                                   {**extra, "seqlen": e.seqlen, "eval_seconds": round(seconds, 2)})


def run(cfg: DictConfig, ctx: RunContext) -> Iterator[Row]:
    from repro.lm_harness import EffreproLM, evaluate_multiple_choice, multiple_choice_rows

    model, tokenizer = load_model(cfg.model, ctx.device)
    name = cfg.model.name
    extra = {"model": name, "params": count_parameters(model)}
    yield from text_rows(cfg, ctx, model, tokenizer, name, extra)
    if cfg.model.source == "trained":
        meta = trained_metadata(cfg.model)
        ctx.env["trained_model"] = {k: meta[k] for k in meta if k != "rows"}
        for metric in ("val_perplexity", "unigram_val_perplexity"):
            yield Row(name if metric == "val_perplexity" else "unigram", "text", "stdlib_val", "perplexity", "ppl",
                      meta[metric], n=meta["scored_tokens"], extra={**extra, "source": "training's own validation"})
    tasks = checks.as_list(cfg.eval.tasks)
    if tasks:
        lm = EffreproLM(model, tokenizer, batch_size=cfg.eval.batch_size)
        scores = evaluate_multiple_choice(lm, tasks, num_fewshot=cfg.eval.num_fewshot, limit=cfg.eval.limit)
        yield from multiple_choice_rows(scores, name, "shots", cfg.eval.num_fewshot, extra)
