"""A text corpus as one stream of token ids, for language-model tasks: read through `datasets`, tokenised once
and cached.

Offline (the default) the corpus is a local folder of text files, by default the Python standard library's
own source, present on every machine, and the tokenizer a byte-level BPE trained on that corpus with
`tokenizers`. With network, `source` names a hub dataset (`openwebtext`, `wikipedia`) and `tokenizer` a hub
tokenizer (`gpt2`), as the papers used.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import checks
from .context import ConfigError, fingerprint
from .records import replace_atomically, write_json_atomic
from .train import step_generator

CACHE_VERSION = 3  # 2: special tokens' strings in a document are text; 3: BPE trained on the training part only
TOKENIZE_BATCH = 1024  # documents
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
BYTES = 256  # the byte-level BPE's first tokens, one for each byte


def default_corpus() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass
class TokenStream:
    """Token ids of the training and validation parts of a corpus, and the tokenizer that made them."""

    train: torch.Tensor  # int32 (n,)
    val: torch.Tensor
    tokenizer: object  # a transformers PreTrainedTokenizerFast
    fingerprint: str  # the corpus read and the tokenizer settings: what a checkpoint of a run on it must match

    @functools.cached_property
    def content(self) -> str:
        """A hash of the ids of both parts and of the vocabulary that reads them: the same text, split the same
        way, wherever and whenever its files were written (the fingerprint reads their paths, sizes and times).
        The vocabulary too: a tokenizer trained on another text may give it the same ids."""
        digest = hashlib.sha256()
        for part in (self.train, self.val):
            digest.update(part.numpy().tobytes())
            digest.update(b"|")
        digest.update(json.dumps(sorted(self.tokenizer.get_vocab().items())).encode())
        return digest.hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def separator_id(self) -> int:
        """The token between documents in both parts (`document_separator`)."""
        return document_separator(self.tokenizer)

    def check_fits(self, seq_len: int, key: str, data_key: str = "data") -> None:
        """ConfigError, naming the config `key` of the sequence length and the corpus's keys (under `data_key`), where
        either part is too short for `windows` of `seq_len` tokens (or one perplexity chunk of them)."""
        if min(len(self.train), len(self.val)) <= seq_len:
            raise ConfigError(f"the corpus gives {len(self.train)} training and {len(self.val)} validation tokens, "
                              f"too few for sequences of {key}={seq_len}; use a larger corpus ({data_key}.folder, "
                              f"{data_key}.max_files), a larger {data_key}.val_fraction, or a shorter {key}")


def document_separator(tokenizer) -> int | None:
    """The token put between a corpus's documents: the end-of-text token, or for a tokenizer without one (BERT's)
    its separator; None where it has neither."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def windows(ids: torch.Tensor, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """`n` windows of `length` tokens from random places in `ids`, as int64 (n, length): the training tasks'
    sequences. `ids` must be longer than `length` (`TokenStream.check_fits`)."""
    starts = torch.randint(0, len(ids) - length, (n,), generator=generator)
    return torch.stack([ids[s:s + length] for s in starts.tolist()]).long()


def lm_batches(ids: torch.Tensor, sequences: int, seqlen: int, grad_accum: int, seed: int):
    """`Trainee.batches` for a causal LM on `ids`: each step `grad_accum` micro-batches of `sequences` random
    `windows` of `seqlen` tokens, a pure function of (step, rank) so that a resumed run sees the same data."""
    def batches(step: int, rank: int, world: int) -> list[dict]:
        generator = step_generator(seed, step, rank)
        micro = []
        for _ in range(grad_accum):
            x = windows(ids, sequences, seqlen, generator)
            micro.append({"input_ids": x, "labels": x})  # the model shifts the labels itself
        return micro
    return batches


def _local_files(folder: str | None, pattern: str, max_files: int | None, data_key: str = "data") -> list[Path]:
    root = Path(folder).expanduser() if folder else default_corpus()
    if not root.is_dir():
        raise ConfigError(f"{data_key}.folder={str(root)!r} is not a folder; give a folder of text files")
    # the standard library's folder also holds installed packages, and pydoc_data, the source of the `pydoc`
    # evaluation text (repro/evaluation.py), which would otherwise be trained on
    left_out = {"site-packages", "dist-packages"} | ({"pydoc_data"} if not folder else set())
    found = set()
    for directory, subfolders, _ in os.walk(root):
        subfolders[:] = [f for f in subfolders if f not in left_out]  # not even walked: most of the stdlib's files
        found.update(p for p in Path(directory).glob(pattern) if p.is_file() and p.stat().st_size > 0)
    files = sorted(found)
    if max_files:
        files = files[:max_files]
    if not files:
        raise ConfigError(f"{data_key}.folder={str(root)!r} holds no non-empty files matching {pattern!r}; give a "
                          f"folder of text files ({data_key}.pattern sets which)")
    return files


def _corpus(spec, data_key: str) -> tuple[str, Callable[[], list[str]]]:
    """A fingerprint of the corpus, and how to read it as a list of documents (done only when the cache lacks
    the tokenizer or the ids)."""
    if spec.source == "local":
        files = _local_files(spec.folder, spec.pattern, spec.max_files, data_key)

        def read():
            import datasets  # here: its import takes most of a second, and a cached corpus is never read

            # sample_by="document": one row per file, so documents stay whole
            ds = datasets.load_dataset("text", data_files=[str(p) for p in files], split="train",
                                       sample_by="document", encoding_errors="replace")
            return [t for t in ds["text"] if t.strip()]
        return fingerprint([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]), read
    import datasets

    try:
        ds = datasets.load_dataset(spec.source, spec.name, split=spec.split)
    except Exception as exc:  # noqa: BLE001 - offline, or a name the hub does not know
        raise ConfigError(f"{data_key}.source={spec.source!r} could not be loaded ({type(exc).__name__}: {exc}). "
                          f"Offline, use {data_key}.source=local (a folder of text files)") from None
    if spec.max_documents:
        ds = ds.select(range(min(len(ds), spec.max_documents)))
    return f"{spec.source}:{spec.name}:{spec.split}:{spec.text_column}:{len(ds)}", lambda: list(ds[spec.text_column])


def _tokenizer(spec, training_documents: Callable[[], list[str]], cache: Path, data_key: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if spec.tokenizer != "bpe":
        try:
            tok = AutoTokenizer.from_pretrained(spec.tokenizer)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"{data_key}.tokenizer={spec.tokenizer!r} could not be loaded ({exc}); offline, use "
                              f"{data_key}.tokenizer=bpe (trained on the corpus's training documents)") from None
        missing = {k: v for k, v in (("pad_token", "<pad>"), ("mask_token", "<mask>")) if getattr(tok, k) is None}
        tok.add_special_tokens(missing)
        return tok
    path = cache / "tokenizer.json"
    if not path.exists():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        bpe = Tokenizer(models.BPE(unk_token="<unk>"))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        # never on the held-out part: merges fitted to the validation text would flatter its perplexity
        bpe.train_from_iterator(training_documents(), trainer=trainer)
        replace_atomically(path, lambda tmp: bpe.save(str(tmp)))
    return PreTrainedTokenizerFast(tokenizer_file=str(path), pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")


def load_token_stream(spec, cache_root: str | Path, data_key: str = "data") -> TokenStream:
    """Tokenise the corpus once (documents joined by the end-of-text token) and cache the ids; the last
    `val_fraction` of the documents are the validation part. The cache is keyed by what was read, the
    tokenizer settings and CACHE_VERSION, so a changed corpus or setting is tokenised afresh. Errors name the
    settings under `data_key`, the config key `spec` came from (`data`, or `model.data`)."""
    checks.number(f"{data_key}.val_fraction", spec.val_fraction, integer=False, above=0, below=1)
    # null reads the whole corpus; a count out of bounds would quietly read another one (max_files=-3 every file
    # but the last three, 0 every file)
    limit = "max_files" if spec.source == "local" else "max_documents"
    if getattr(spec, limit) is not None:
        checks.number(f"{data_key}.{limit}", getattr(spec, limit), at_least=1)
    if spec.tokenizer == "bpe":
        # the byte-level alphabet and the special tokens are always in the vocabulary: a smaller size is not an
        # error to the trainer, which quietly gives that many
        checks.number(f"{data_key}.vocab_size", spec.vocab_size, at_least=BYTES + len(SPECIAL_TOKENS))
    corpus, read = _corpus(spec, data_key)

    @functools.cache
    def parts() -> tuple[list[str], list[str]]:
        texts = read()
        if len(texts) < 2:  # refused before a tokenizer is trained on it
            folder = str(spec.folder or default_corpus())
            where = (f"{data_key}.folder={folder!r}, {data_key}.pattern={spec.pattern!r}, "
                     f"{data_key}.max_files={spec.max_files}" if spec.source == "local" else
                     f"{data_key}.source={spec.source!r}, {data_key}.max_documents={spec.max_documents}")
            raise ConfigError(f"the corpus ({where}) holds {len(texts)} non-empty document(s): too few to hold out "
                              f"the last {data_key}.val_fraction={spec.val_fraction} of them (one at least) for "
                              "validation and train on the rest; use a larger corpus")
        n_val = max(1, int(len(texts) * spec.val_fraction))
        return texts[:-n_val], texts[-n_val:]
    settings = dict(version=CACHE_VERSION, corpus=corpus, tokenizer=spec.tokenizer, vocab_size=spec.vocab_size,
                    val_fraction=spec.val_fraction)
    key = fingerprint(settings)
    cache = Path(cache_root) / f"tokens-{key}"
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(spec, lambda: parts()[0], cache, data_key)
    ids_path = cache / "ids.pt"
    if ids_path.exists():
        ids = torch.load(ids_path)
    else:
        train, val = parts()
        eos = document_separator(tokenizer)
        if eos is None:
            raise ConfigError(f"{data_key}.tokenizer={spec.tokenizer!r} has neither an end-of-text nor a separator "
                              "token to put between documents")

        def join(docs, part):
            # a batch at a time into int32: the ids of a paper-scale corpus as one Python list would take
            # about 30 bytes a token, seven times the tensor
            pieces = []
            for start in tqdm(range(0, len(docs), TOKENIZE_BATCH), desc=f"tokenising {part}", unit="batch",
                              disable=len(docs) <= TOKENIZE_BATCH):
                batch = []
                # split_special_tokens: a special token's string in a document ('</s>' in a source file) is text
                encoded = tokenizer(docs[start:start + TOKENIZE_BATCH], add_special_tokens=False,
                                    split_special_tokens=True)["input_ids"]
                for enc in encoded:
                    batch += enc + [eos]
                pieces.append(torch.tensor(batch, dtype=torch.int32))
            return torch.cat(pieces)
        ids = {"train": join(train, "train"), "val": join(val, "val")}
        replace_atomically(ids_path, lambda tmp: torch.save(ids, tmp))
        write_json_atomic(cache / "settings.json", settings)
    return TokenStream(ids["train"], ids["val"], tokenizer, key)
