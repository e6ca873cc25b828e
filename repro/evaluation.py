"""Evaluation text and perplexity, by the protocol of the compression papers (Scissorhands, Compress-then-Prompt,
after GPTQ): the text is tokenized once, cut into non-overlapping chunks of `seqlen` tokens, and the perplexity
is exp of the mean next-token negative log-likelihood over every chunk. Each chunk starts afresh, so its first
token has no context and is not scored; a last chunk shorter than `seqlen` is dropped.

How the model runs is the caller's: `forward(model, ids) -> logits` may apply a KV-cache policy or a soft prompt,
and the perplexity is that of the model so changed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .context import ConfigError
from .records import Row

Forward = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]  # (model, ids (batch, seq)) -> logits


@dataclass(frozen=True)
class HubText:
    """An evaluation set of the papers on the Hugging Face Hub, and how their scripts make one text of it."""

    load: dict  # datasets.load_dataset arguments
    column: str
    joiner: str
    documents: int | None = None  # the first N documents only


# wikitext-2 and PTB: their test splits; C4: the first 1,100 documents of one validation shard (GPTQ's datautils,
# which Compress-then-Prompt's evaluation reuses). PTB's repository is a loading script, which datasets 4 and later
# refuse to run: the Hub's parquet conversion of it (its refs/convert/parquet branch) is read instead.
HUB_TEXTS = {
    "wikitext2": HubText(dict(path="Salesforce/wikitext", name="wikitext-2-raw-v1", split="test"), "text", "\n\n"),
    "ptb": HubText(dict(path="ptb-text-only/ptb_text_only", revision="refs/convert/parquet", split="test"), "sentence",
                   " "),
    "c4": HubText(dict(path="allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                       split="validation"), "text", " ", documents=1100),
}
TEXTS = ("stdlib", "pydoc", *HUB_TEXTS)


def first_line(exc: BaseException) -> str:
    """An exception in one line: its type and the first line of its message, then those of the exception it was
    raised from (`datasets` wraps the informative one)."""
    lines = str(exc).splitlines()
    line = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return line if exc.__cause__ is None else f"{line} (from {first_line(exc.__cause__)})"


def hub_error(what: str, exc: Exception, offline_choices: str) -> ConfigError:
    """Something could not be fetched from the Hugging Face Hub: say so, with the exception (it may be another
    fault than the Hub), and what works offline instead. A RuntimeError is said as it is, with no word of the Hub:
    the Hub's and the cache's faults are OSErrors, and datasets refuses a dataset that needs a loading script with
    a RuntimeError, found on the Hub."""
    if isinstance(exc, RuntimeError):
        return ConfigError(f"{what} could not be loaded ({first_line(exc)}); use {offline_choices} instead")
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
               if os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")]
    reason = (f"the Hugging Face Hub is not reachable (offline mode: {offline[0]}=1)" if offline
              else "the Hugging Face Hub is not reachable or does not have it")
    return ConfigError(f"{what} could not be loaded ({first_line(exc)}): {reason}, and it is not in the local "
                       f"cache; offline, use {offline_choices}")


def _held_out_documents(data, cache: str | Path) -> list[str]:
    """The validation documents of the local corpus, exactly those that `repro.text_data` holds out of training
    (a model trained on that corpus never saw them), as text for any tokenizer."""
    from .text_data import load_token_stream

    stream = load_token_stream(data, cache)
    separator = stream.separator_id
    documents, current = [], []
    for token in stream.val.tolist():
        if token == separator:
            documents.append(current)
            current = []
        else:
            current.append(token)
    return stream.tokenizer.batch_decode(documents)


def _hub_documents(name: str) -> list[str]:
    import datasets

    spec = HUB_TEXTS[name]
    try:
        ds = datasets.load_dataset(**spec.load)
    except Exception as exc:  # noqa: BLE001 - offline, no network, or the Hub moved it
        raise hub_error(f"evaluation text {name!r} ({spec.load['path']})", exc, "stdlib or pydoc") from None
    if spec.documents:
        ds = ds.select(range(min(spec.documents, len(ds))))
    return list(ds[spec.column])


def eval_text(name: str, tokenizer, *, data=None, cache: str | Path | None = None) -> torch.Tensor:
    """The token ids (1-d LongTensor) of an evaluation text, tokenized at once as the papers do.

    `stdlib`: the held-out part of the local corpus (`data`: its lm_data spec, `cache`: the cache root; give a
    trained model the spec it was trained with). `pydoc`: the English prose that ships with Python
    (`pydoc_data.topics`, about 465k characters). `wikitext2`, `ptb`, `c4`: the papers' sets, from the Hub."""
    if name == "stdlib":
        if data is None or cache is None:
            raise ValueError("eval_text('stdlib') needs the corpus spec (data=) and the cache root (cache=)")
        documents = _held_out_documents(data, cache)
        joiner = "\n\n"
    elif name == "pydoc":
        from pydoc_data.topics import topics

        documents, joiner = list(topics.values()), "\n\n"
    elif name in HUB_TEXTS:
        documents, joiner = _hub_documents(name), HUB_TEXTS[name].joiner
    else:
        raise ConfigError(f"evaluation text {name!r} is not one of {list(TEXTS)}")
    return text_ids(tokenizer, joiner.join(documents))


def text_ids(tokenizer, text: str) -> torch.Tensor:
    """The token ids (1-d LongTensor) of a raw text, tokenized at once. A special token's string in the text
    ('</s>' in a source file) is text, not that token: an end-of-text inside a document would not be one."""
    # verbose=False: the text is longer than the model's context on purpose; it is cut into chunks or windows
    ids = tokenizer(text, verbose=False, split_special_tokens=True)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class PerplexityResult:
    ppl: float
    nll_sum: float  # nats, over every scored token
    tokens: int  # tokens scored: chunks * (seqlen - 1)
    chunks: int
    dropped: int = 0  # tokens of the last, partial chunk, left out

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood, nats per token."""
        return self.nll_sum / self.tokens


def plain_forward(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model run as it is: one forward pass over the whole sequence."""
    return model(input_ids=ids).logits


def context_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model takes (its position table), or None where its config does not say."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _chunks(ids: torch.Tensor, seqlen: int) -> tuple[torch.Tensor, int]:
    """(chunks, seqlen) non-overlapping chunks of `ids`, and how many tokens of a partial last chunk are left out."""
    if seqlen < 2:
        raise ConfigError(f"eval.seqlen={seqlen} scores nothing (the first token of a chunk is not scored); use 2 "
                          "or more")
    count = len(ids) // seqlen
    if count == 0:
        raise ConfigError(f"the evaluation text has {len(ids)} tokens, fewer than one chunk of eval.seqlen={seqlen}; "
                          "use a shorter eval.seqlen or a longer text")
    return ids[:count * seqlen].view(count, seqlen), len(ids) - count * seqlen


def _result(nll_sum: float, chunks: torch.Tensor, dropped: int) -> PerplexityResult:
    tokens = chunks.shape[0] * (chunks.shape[1] - 1)
    return PerplexityResult(float(torch.tensor(nll_sum / tokens).exp()), nll_sum, tokens, chunks.shape[0], dropped)


def perplexity(model: torch.nn.Module, ids: torch.Tensor, seqlen: int, *, batch_size: int = 4,
               forward: Forward | None = None, progress: bool = True) -> PerplexityResult:
    """Perplexity of `model` on `ids` by the papers' protocol (module docstring): chunks of `seqlen` tokens,
    `batch_size` at a time, each run through `forward(model, chunk_ids) -> logits` (a plain forward pass by
    default; the ids arrive on the model's device). `seqlen` (the tasks' eval.seqlen, as errors name it) may not
    exceed the model's context."""
    limit = context_length(model)
    if limit is not None and seqlen > limit:
        raise ConfigError(f"eval.seqlen={seqlen} is longer than the model's context of {limit} positions "
                          f"(config.max_position_embeddings); use eval.seqlen <= {limit}")
    chunks, dropped = _chunks(ids, seqlen)
    forward = forward or plain_forward
    device = model_device(model)
    nll_sum = 0.0
    with torch.no_grad():
        for batch in tqdm(chunks.split(batch_size), desc="perplexity", disable=None if progress else True):
            batch = batch.to(device)
            logits = forward(model, batch)
            targets = batch[:, 1:].to(logits.device)  # a model spread over devices ends on another one
            nll_sum += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
    return _result(nll_sum, chunks, dropped)


def unigram_perplexity(train_ids: torch.Tensor, ids: torch.Tensor, seqlen: int, vocab_size: int) -> PerplexityResult:
    """The baseline a language model must beat: each token's frequency in `train_ids`, ignoring all context,
    scored on exactly the tokens `perplexity` scores. Counts start at one, so that a token never seen in
    training still has a probability."""
    counts = torch.bincount(train_ids.long(), minlength=vocab_size).double() + 1
    log_p = (counts / counts.sum()).log()
    chunks, dropped = _chunks(ids, seqlen)
    return _result(-log_p[chunks[:, 1:]].sum().item(), chunks, dropped)


def perplexity_rows(result: PerplexityResult, provider: str, x_name: str, x_value, extra: dict | None = None
                    ) -> list[Row]:
    """A result as run-record rows: perplexity (ppl) and mean NLL (nats/token); n is the number of tokens
    scored, and the extras say how many chunks and how many left-out tokens it came from."""
    extra = {**(extra or {}), "chunks": result.chunks, "scored_tokens": result.tokens,
             "dropped_tokens": result.dropped}
    return [Row(provider, x_name, x_value, metric, unit, value, n=result.tokens, extra=extra)
            for metric, unit, value in (("perplexity", "ppl", result.ppl), ("nll", "nats/token", result.nll))]
