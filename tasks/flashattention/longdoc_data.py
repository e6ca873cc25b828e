"""Documents for long-document classification (FlashAttention Table 5, task longdoc).

- `ecthr`: LexGLUE's ECtHR-A (European Court of Human Rights cases, 10 articles, multi-label), read with
  `datasets` from the Hub (`coastalcph/lex_glue`, configuration `ecthr_a`).
- `mimic-iii`: MIMIC-III discharge summaries with their ICD-9 codes. MIMIC-III cannot be downloaded without
  credentialed PhysioNet access, so it is read only from local files the user prepares (see `load_mimic`).
- `synthetic`: a generated multi-label corpus, offline. Each label has a word of its own, which no filler uses;
  a document holds, for each of its labels, one run of `evidence_tokens` copies of that word amid random
  filler words. The evidence of "early" labels lies within the first `boundary` tokens, that of "late" labels
  after them, anywhere up to the document's end: a model that reads only the first `boundary` tokens cannot
  know the late labels, one that reads the whole document can. (A run rather than a single word, so that a
  small model trained from scratch for minutes learns to find it: what is measured is how far a model reads,
  not how well it understands.)
  Generation is deterministic by seed: the work is cut into fixed chunks, each seeded from (seed, split, chunk)
  alone, so the result does not depend on the number of worker processes; `load_or_generate` caches a split
  as a `datasets` Arrow folder.

Documents are held as token ids without special tokens; `encode` adds RoBERTa's <s> and </s> and truncates a
document longer than the model's length to its beginning, and `truncated` counts those documents.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from repro.context import available_cores, fingerprint
from repro.generated import cached_dataset, rows_in_chunks

DATASETS = ("synthetic", "ecthr", "mimic-iii")
SPLITS = ("train", "validation", "test")
# RoBERTa's special tokens (roberta-base and RobertaConfig's defaults); the generated words come after them
BOS, PAD, EOS = 0, 1, 2
FIRST_WORD = 4
SPECIAL_TOKENS = 2  # <s> and </s>: a model of length N reads N - 2 document tokens
GENERATOR_VERSION = 1  # bump whenever a change alters what (spec, seed) generates
CHUNK = 64  # documents per seeded chunk; part of what a seed means, so changing it needs a version bump
MIMIC_FILES = {split: f"{split}.jsonl" for split in SPLITS}


@dataclass
class Documents:
    """One split: each document's token ids, its labels as a multi-hot matrix, and, for generated documents,
    where each label's evidence begins (-1 where the label is absent)."""

    name: str
    ids: list[np.ndarray]
    labels: torch.Tensor  # (documents, labels) float 0/1
    label_names: list[str]
    evidence_start: torch.Tensor | None = None  # (documents, labels) long

    def __len__(self) -> int:
        return len(self.ids)


def encode(docs: Documents, picks, seq_len: int) -> dict[str, torch.Tensor]:
    """The batch of documents `picks` at length `seq_len`: <s>, the document's first seq_len - 2 tokens, </s>,
    then padding, and an attention mask where a document is padded. A batch whose documents all fill the length
    carries none: transformers then builds no mask and our kernel runs unmasked; handed a mask of ones it would
    run its masked path, since telling that a mask is all ones takes a read from the device."""
    body = seq_len - SPECIAL_TOKENS
    input_ids = torch.full((len(picks), seq_len), PAD, dtype=torch.long)
    for row, i in enumerate(picks):
        doc = torch.from_numpy(np.asarray(docs.ids[i][:body], dtype=np.int64))
        input_ids[row, 0] = BOS
        input_ids[row, 1:1 + len(doc)] = doc
        input_ids[row, 1 + len(doc)] = EOS
    batch = {"input_ids": input_ids, "labels": docs.labels[list(picks)]}
    real = input_ids != PAD
    if not real.all():
        batch["attention_mask"] = real.long()
    return batch


def truncated(docs: Documents, seq_len: int) -> int:
    """How many documents are longer than a model of length `seq_len` reads (`encode` cuts their ends off)."""
    return sum(len(ids) > seq_len - SPECIAL_TOKENS for ids in docs.ids)


def visible_labels(docs: Documents, seq_len: int) -> torch.Tensor:
    """For generated documents: the labels of which a model of length `seq_len` reads evidence (a word of the
    label's own tells it), as a bool (documents, labels) matrix: what a perfect reader at that length knows."""
    start = docs.evidence_start
    return (start >= 0) & (start < seq_len - SPECIAL_TOKENS)


# ---------------------------------------------------------------------------------------------- the generator

@dataclass(frozen=True)
class SyntheticSpec:
    """What the generated corpus looks like (every field is part of what a seed means, and of its cache key)."""

    labels: int = 4
    late_fraction: float = 0.5  # of the labels, those whose evidence lies after `boundary`
    label_rate: float = 0.3  # the chance that a document has a given label
    evidence_tokens: int = 128  # the length of each label's run of its word
    boundary: int = 510  # document tokens: what a 512-token model reads besides <s> and </s>
    min_tokens: int = 1024  # document lengths are log-uniform in [min_tokens, max_tokens]
    max_tokens: int = 8190
    words: int = 1000  # filler vocabulary

    @property
    def late_labels(self) -> int:
        return math.floor(self.late_fraction * self.labels + 0.5)  # halves up: round() takes 0.5 of 1 label to 0

    @property
    def vocab_size(self) -> int:
        return FIRST_WORD + self.words + self.labels

    def is_late(self, label: int) -> bool:
        """The last `late_labels` labels are the late ones."""
        return label >= self.labels - self.late_labels

    def word(self, label: int) -> int:
        """The token of `label`'s evidence, after the filler words."""
        return FIRST_WORD + self.words + label

    def check(self) -> None:
        """ValueError unless every document can hold every label's evidence in its region."""
        k, late = self.evidence_tokens, self.late_labels
        if min(self.labels, k, self.words, self.boundary) < 1 or not 0 <= self.late_fraction <= 1 \
                or not 0 < self.label_rate <= 1:
            raise ValueError(f"synthetic spec {asdict(self)}: labels, evidence_tokens, words and boundary must be "
                             ">= 1, late_fraction in [0, 1], label_rate in (0, 1]")
        if (self.late_fraction > 0 and late == 0) or (self.late_fraction < 1 and late == self.labels):
            raise ValueError(f"late_fraction={self.late_fraction} of labels={self.labels} gives {late} late labels: "
                             "a fraction strictly between 0 and 1 needs labels on both sides of the boundary")
        if self.boundary < (self.labels - late) * k:
            raise ValueError(f"boundary={self.boundary} cannot hold the evidence of {self.labels - late} early labels "
                             f"of {k} tokens")
        if self.min_tokens - self.boundary < late * k or self.max_tokens < self.min_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} must leave room after boundary={self.boundary} for the "
                             f"evidence of {late} late labels of {k} tokens, and max_tokens={self.max_tokens} must "
                             "be at least min_tokens")


def _starts(rng: np.random.Generator, count: int, lo: int, hi: int, k: int) -> np.ndarray:
    """The starts of `count` non-overlapping runs of k tokens within [lo, hi), uniformly over all such
    placements: distinct sorted picks among the free tokens, each moved past the runs before it."""
    picks = np.sort(rng.choice(hi - lo - count * k + count, size=count, replace=False))
    return lo + picks + np.arange(count) * (k - 1)


def _document(rng: np.random.Generator, spec: SyntheticSpec) -> dict:
    length = int(round(math.exp(rng.uniform(math.log(spec.min_tokens), math.log(spec.max_tokens)))))
    ids = rng.integers(FIRST_WORD, FIRST_WORD + spec.words, length, dtype=np.int32)
    labels = np.flatnonzero(rng.random(spec.labels) < spec.label_rate)
    late = np.array([spec.is_late(j) for j in labels], dtype=bool)
    starts = np.empty(len(labels), dtype=np.int64)
    k = spec.evidence_tokens
    # within each region, the labels take the placements in a random order
    starts[~late] = rng.permutation(_starts(rng, int((~late).sum()), 0, spec.boundary, k))
    starts[late] = rng.permutation(_starts(rng, int(late.sum()), spec.boundary, length, k))
    for label, start in zip(labels, starts):
        ids[start:start + k] = spec.word(label)
    return {"input_ids": ids, "labels": labels.tolist(), "evidence_start": starts.tolist()}


def _chunk(seed: int, split: str, index: int, count: int, spec: SyntheticSpec) -> list[dict]:
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    return [_document(rng, spec) for _ in range(count)]


def generate(n: int, seed: int, spec: SyntheticSpec, split: str = "train", workers: int | None = None) -> list[dict]:
    """`n` generated documents ({input_ids, labels, evidence_start}), chunk by chunk, in `workers` processes
    (default: one per available core)."""
    spec.check()
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    return list(rows_in_chunks(_chunk, n, CHUNK, seed, split, spec, workers, desc=f"longdoc {split}"))


def load_or_generate(split: str, n: int, seed: int, spec: SyntheticSpec, cache_dir: str | os.PathLike,
                     workers: int | None = None) -> Documents:
    """A generated split: from `cache_dir` when made there by this generator version with this seed and spec,
    else generated and saved. The folder is named by a digest of all of that, and its metadata file is written
    last, so that an interrupted save is never taken for a whole one."""
    import datasets as hf

    meta = {"split": split, "n": n, "seed": seed, "spec": asdict(spec), "generator_version": GENERATOR_VERSION}
    names = [f"label{j}{'_late' if spec.is_late(j) else ''}" for j in range(spec.labels)]
    features = hf.Features({"input_ids": hf.List(hf.Value("int32")), "labels": hf.List(hf.ClassLabel(names=names)),
                            "evidence_start": hf.List(hf.Value("int32"))})

    def build(path):
        print(f"[longdoc] generating {n} {split} documents into {path}", flush=True)
        hf.Dataset.from_list(generate(n, seed, spec, split, workers), features=features).save_to_disk(str(path))

    ds = cached_dataset(cache_dir, f"longdoc-{split}-n{n}-{fingerprint(meta)}", meta, build)
    docs = _documents(f"synthetic-{split}", ds, ds.features["labels"].feature.names)
    starts = torch.full((len(ds), spec.labels), -1, dtype=torch.long)
    for i, (labels, where) in enumerate(zip(ds["labels"], ds["evidence_start"])):
        starts[i, labels] = torch.tensor(where, dtype=torch.long)
    docs.evidence_start = starts
    return docs


# ------------------------------------------------------------------------------------------------- real data

def _documents(name: str, ds, label_names: list[str]) -> Documents:
    """Documents from a dataset with `input_ids` and `labels` (lists of label indices)."""
    labels = torch.zeros(len(ds), len(label_names))
    for i, present in enumerate(ds["labels"]):
        labels[i, present] = 1.0
    return Documents(name, list(ds.with_format("numpy")["input_ids"]), labels, list(label_names))


def _tokenize(ds, tokenizer, text_column: str, join: bool):
    """Token ids of whole documents, never truncated here (`encode` truncates, visibly); in parallel."""
    def ids(batch):
        texts = ["\n".join(t) for t in batch[text_column]] if join else batch[text_column]
        return {"input_ids": tokenizer(texts, add_special_tokens=False)["input_ids"]}
    return ds.map(ids, batched=True, num_proc=min(available_cores(), 8) if len(ds) > 1000 else None,
                  remove_columns=[text_column], desc="tokenizing")


def load_ecthr(split: str, tokenizer, limit: int | None = None) -> Documents:
    """LexGLUE ECtHR-A: the facts of a case (a list of paragraphs, joined by newlines), labelled with the
    articles of the Convention found violated (10 labels; a case may have none)."""
    import datasets as hf

    try:
        ds = hf.load_dataset("coastalcph/lex_glue", "ecthr_a", split=split)
    except ConnectionError as exc:
        raise RuntimeError("ECtHR (coastalcph/lex_glue, ecthr_a) is not in the local Hugging Face cache and cannot "
                           f"be downloaded ({exc}); run once with network to fill the cache") from exc
    ds = ds.select(range(min(limit, len(ds)))) if limit else ds
    return _documents(f"ecthr-{split}", _tokenize(ds, tokenizer, "text", join=True),
                      ds.features["labels"].feature.names)


def mimic_files(folder: str | os.PathLike, splits=("train", "validation")) -> dict[str, Path]:
    """The MIMIC-III files of `splits` in `folder`; ValueError naming what is missing."""
    files = {split: Path(folder).expanduser() / MIMIC_FILES[split] for split in splits}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ValueError(f"MIMIC-III: {', '.join(missing)} not found. MIMIC-III cannot be downloaded without "
                         "credentialed PhysioNet access; prepare JSON Lines files (train.jsonl, validation.jsonl, "
                         'optionally test.jsonl) with one {"text": ..., "labels": [ICD-9 codes]} per line')
    return files


def load_mimic(folder: str | os.PathLike, split: str, tokenizer, limit: int | None = None) -> Documents:
    """MIMIC-III from local JSON Lines files (`train.jsonl`, `validation.jsonl`, `test.jsonl` in `folder`), one
    discharge summary per line: {"text": str, "labels": [ICD-9 code, ...]}, e.g. the top-50-code subset
    (MIMIC-III-50) as the usual preprocessing makes it. The label set is the codes of the training file; a code
    seen only in another split cannot be learnt, and is left out there."""
    import datasets as hf

    files = mimic_files(folder, ("train", split))
    train = hf.load_dataset("json", data_files=str(files["train"]), split="train")
    names = sorted({code for codes in train["labels"] for code in codes})
    ds = train if split == "train" else hf.load_dataset("json", data_files=str(files[split]), split="train")
    ds = ds.select(range(min(limit, len(ds)))) if limit else ds
    index = {code: j for j, code in enumerate(names)}
    ds = ds.map(lambda row: {"labels": [index[c] for c in row["labels"] if c in index]})
    return _documents(f"mimic-iii-{split}", _tokenize(ds, tokenizer, "text", join=False), names)
