"""The training text of Compress, Then Prompt, in the model's own tokens: what calibrates the compression and what
the prompt (and LoRA) train on. The paper uses C4 for both (the first 5,000 documents of its first training shard;
128 random windows for calibration); offline the suite uses the training part of its local corpus, whose
held-out part is the `stdlib` evaluation text."""
from __future__ import annotations

import torch

from repro.context import ConfigError
from repro.evaluation import hub_error, text_ids
from repro.text_data import load_token_stream, windows

TRAIN_TEXTS = ("stdlib", "c4")
C4_TRAIN = dict(path="allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
C4_DOCUMENTS = 5000


def _c4_documents() -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(**C4_TRAIN)
    except Exception as exc:  # noqa: BLE001 - offline, no network, or the Hub moved it
        raise hub_error("training text 'c4' (allenai/c4)", exc, "text.name=stdlib") from None
    return list(ds.select(range(min(C4_DOCUMENTS, len(ds))))["text"])


def _corpus_documents(stream, max_tokens: int | None) -> list[str]:
    """The first `max_tokens` tokens of the corpus's training part, as its documents' text."""
    ids = stream.train[:max_tokens].tolist()
    documents, current = [], []
    for token in ids:  # documents are joined by the end-of-text token
        if token == stream.tokenizer.eos_token_id:
            documents.append(current)
            current = []
        else:
            current.append(token)
    return stream.tokenizer.batch_decode(documents + [current])


def training_ids(name: str, tokenizer, *, data, cache, max_tokens: int | None = None,
                 same_tokenizer: bool = False) -> torch.Tensor:
    """Token ids (1-d LongTensor) of training text `name` for `tokenizer`. `stdlib`: the local corpus `data`
    (cached under `cache`), at most its first `max_tokens` tokens; with `same_tokenizer` (a model trained on that
    corpus) its ids as they are, otherwise decoded and tokenized again. `c4`: the paper's, from the Hub."""
    if name == "c4":
        documents = _c4_documents()
    elif name == "stdlib":
        stream = load_token_stream(data, cache)
        if same_tokenizer:
            return stream.train[:max_tokens].long()
        documents = _corpus_documents(stream, max_tokens)
    else:
        raise ConfigError(f"text.name={name!r} is not one of {list(TRAIN_TEXTS)}")
    return text_ids(tokenizer, "\n\n".join(documents))


def check_length(ids: torch.Tensor, samples: int, seqlen: int, what: str, text: str = "the training text",
                 longer: str = "text.max_tokens", drawn: bool = True) -> None:
    """A text must hold `samples` windows of `seqlen` tokens without overlap, and a token more where they are
    `drawn` at random (`repro.text_data.windows`, as GPTQ, never starts at the last full window): ConfigError
    naming `what`, the `text` and the key that makes it `longer`."""
    need = samples * seqlen + (1 if drawn else 0)
    if len(ids) < need:
        raise ConfigError(f"{what}: {samples} samples of {seqlen} tokens need {need} tokens, and {text} has "
                          f"{len(ids)}; ask for fewer or shorter samples, or a longer text ({longer})")


def calibration(ids: torch.Tensor, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`samples` windows of `seqlen` tokens at random places in `ids`, as GPTQ draws its calibration samples."""
    return windows(ids, samples, seqlen, torch.Generator().manual_seed(seed))
