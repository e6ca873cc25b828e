"""Long-document classification (FlashAttention Table 5, task longdoc): does reading more of a document raise
micro-F1? A RoBERTa-shaped encoder with a multi-label head (transformers' RobertaForSequenceClassification,
binary cross-entropy) is trained at each sequence length on the same documents, with the same steps, for each
seed, with the implementations of `longdoc.attention` (by default `effrepro`, our kernel), and evaluated. The
implementations of `longdoc.timed` (by default `sdpa` and `eager`, HuggingFace's standard attention) train
`timed_steps` steps of the same run at each length, for step time and memory: training them to the end would
give the same F1 up to rounding, at several times the cost. A length or implementation that runs out of memory
becomes a row and the sweep goes on.

The paper fine-tunes a pretrained RoBERTa whose 512 learned positions are copied to fill the longer table (as
Longformer does); `model.pretrained` does that here. Without it the model is trained from scratch with a table
as long as the longest length, the same initial weights at every length. Documents come from
longdoc_data.py: ECtHR, MIMIC-III (local files only) or the generated corpus.

Rows: per run, the training loop's loss, validation micro/macro-F1, step time and memory; then per data set,
implementation and length, F1 over the seeds (median, 20th and 80th percentiles), step time, peak memory and
the speedup over eager; the micro-F1 lift of the best length over the shortest (Table 5's "lift"); how many
documents each length truncates; and, on generated data, the F1 of a reader of the evidence each length shows.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import statistics
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from repro import checks
from repro.bench import require_triton
from repro.checks import as_list
from repro.context import ConfigError, RunContext, fingerprint
from repro.records import Row
from repro.timing import median_p20_p80
from repro.train import Candidate, Trainee, TrainSpec, model_flops_per_token, step_generator, train_from_config
from effrepro_kernels.runtime import MAX_HEAD_DIM, MIN_HEAD_DIM

from . import OURS
from . import longdoc_data as data

ATTENTION = (OURS, "sdpa", "eager")
# on generated data: the reader that predicts exactly the labels whose evidence a length shows
EVIDENCE_READER = "evidence_reader"
MODEL_SIZES = ("layers", "hidden", "heads", "intermediate")  # of a model from scratch
PAPER_DATASETS = ("ecthr", "mimic-iii")  # Table 5's: their mean lift is the abstract's "6.4 points"
# per-run metrics summarised per length over the seeds: (the run's metric, the summary's, unit)
SUMMARIES = (("val_micro_f1", "micro_f1", "%"), ("val_macro_f1", "macro_f1", "%"),
             ("step_time", "train_step_time", "ms"), ("peak_memory", "train_peak_memory", "MB"))


# ------------------------------------------------------------------------------------------------- metrics

def f1_scores(predicted: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """Micro- and macro-F1 of bool (documents, labels) predictions, as fractions. Micro: 2TP / (2TP + FP + FN)
    over all decisions pooled; macro: the mean over labels of each label's F1, a label with no positives and no
    predictions counting 0 (scikit-learn's zero_division=0). Written here from the definitions: scikit-learn,
    which the tests compare it with, is not a dependency of the suite."""
    predicted, truth = predicted.bool(), truth.bool()
    tp = (predicted & truth).sum(0).double()
    errors = (predicted ^ truth).sum(0).double()  # false positives + false negatives

    def f1(tp, errors):  # counts are whole numbers: clamping at 1 only spares the 0 / 0 that is then taken as 0
        return 2 * tp / (2 * tp + errors).clamp(min=1)
    return float(f1(tp.sum(), errors.sum())), float(f1(tp, errors).mean())


# --------------------------------------------------------------------------------------------------- model

def extend_position_table(model, length: int) -> None:
    """Grow a RoBERTa model's learned position table to `length` positions by copying the learned rows over
    and over (Longformer's initialisation, which FlashAttention's Table 5 follows), so that each stretch of the
    longer sequence starts from what the model knows of the first. RoBERTa numbers positions from
    padding_idx + 1: the rows before are kept as they are."""
    embeddings = model.base_model.embeddings
    old = embeddings.position_embeddings.weight.detach()
    offset = embeddings.padding_idx + 1
    learned = old[offset:]
    repeats = -(-length // len(learned))
    table = torch.cat([old[:offset], learned.repeat(repeats, 1)[:length]])
    embeddings.position_embeddings = torch.nn.Embedding.from_pretrained(table, freeze=False,
                                                                        padding_idx=embeddings.padding_idx)
    ids = torch.arange(length + offset, device=old.device)[None]
    embeddings.register_buffer("position_ids", ids, persistent=False)
    embeddings.register_buffer("token_type_ids", torch.zeros_like(ids), persistent=False)
    model.config.max_position_embeddings = length + offset


def build_classifier(spec, labels: int, vocab_size: int, positions: int, seq_len: int, attention: str):
    """A multi-label RoBERTa classifier: pretrained (`spec.pretrained`) or from scratch with a table of
    `positions`; its table grown to `seq_len` by copying where it is shorter (validate checks that this was
    asked for)."""
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    task = dict(num_labels=labels, problem_type="multi_label_classification", hidden_dropout_prob=spec.dropout,
                attention_probs_dropout_prob=spec.dropout)
    if spec.pretrained:
        model = AutoModelForSequenceClassification.from_pretrained(spec.pretrained, attn_implementation=attention,
                                                                   **task)
    else:
        config = RobertaConfig(vocab_size=vocab_size, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                               num_attention_heads=spec.heads, intermediate_size=spec.intermediate,
                               max_position_embeddings=positions + data.PAD + 1, type_vocab_size=1,
                               pad_token_id=data.PAD, bos_token_id=data.BOS, eos_token_id=data.EOS, **task)
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attention)
    if seq_len > _table(model.config):
        extend_position_table(model, seq_len)
    return model


def _table(config) -> int:
    """The positions a RoBERTa config can number (its table less the rows before padding_idx + 1)."""
    return config.max_position_embeddings - config.pad_token_id - 1


def _pretrained_positions(name: str) -> int:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"longdoc.model.pretrained={name!r} cannot be loaded ({exc})") from None
    if config.model_type != "roberta":
        raise ConfigError(f"longdoc.model.pretrained={name!r} is a {config.model_type} model; the position table "
                          "is grown the RoBERTa way, so it must be a RoBERTa checkpoint (e.g. roberta-base)")
    return _table(config)


# ------------------------------------------------------------------------------------------------- the task

def load_documents(spec: DictConfig, dataset: str, cache: Path) -> tuple[data.Documents, data.Documents]:
    """The training and evaluation documents of `dataset`."""
    if dataset == "synthetic":
        synthetic = _synthetic(spec)
        return (data.load_or_generate("train", spec.n_train, spec.synthetic.seed, synthetic, cache),
                data.load_or_generate(spec.eval_split, spec.n_val, spec.synthetic.seed, synthetic, cache))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.model.pretrained)
    if dataset == "ecthr":
        return (data.load_ecthr("train", tokenizer, spec.n_train),
                data.load_ecthr(spec.eval_split, tokenizer, spec.n_val))
    return (data.load_mimic(spec.mimic_path, "train", tokenizer, spec.n_train),
            data.load_mimic(spec.mimic_path, spec.eval_split, tokenizer, spec.n_val))


def _synthetic(spec: DictConfig) -> data.SyntheticSpec:
    return data.SyntheticSpec(**{k: v for k, v in OmegaConf.to_container(spec.synthetic).items() if k != "seed"})


def _micro(spec: DictConfig, seq_len: int) -> int:
    """Documents per forward/backward at `seq_len`: as many as `micro_tokens` allows, at least one."""
    return max(1, min(spec.batch, spec.micro_tokens // seq_len))


def data_rows(dataset: str, train: data.Documents, val: data.Documents, lengths: list[int]) -> Iterator[Row]:
    """Document lengths, how many documents each length truncates (also said on the console: a document cut
    short is never a silent change), and on generated data the F1 of `EVIDENCE_READER`. That reader is a yardstick
    of what a length shows, not the best F1 a model of that length can reach: F1 rewards guessing unseen labels
    (on the small set at 512, predicting every late label besides the visible ones scores macro-F1 72.4 against
    the reader's 50.0)."""
    for docs in (train, val):
        tokens = [float(len(ids)) for ids in docs.ids]
        p50, p20, p80 = median_p20_p80(tokens)
        yield Row("data", "split", docs.name, "document_tokens", "tokens", p50, p20, p80, n=len(tokens),
                  extra=dict(dataset=dataset, mean=statistics.mean(tokens), max=max(tokens), series=dataset))
        for seq_len in lengths:
            cut = data.truncated(docs, seq_len)
            if cut:
                print(f"[longdoc] {docs.name}: {cut} of {len(docs)} documents are longer than the "
                      f"{seq_len - data.SPECIAL_TOKENS} tokens a {seq_len}-token model reads; they are truncated",
                      flush=True)
            yield Row("data", "seq_len", seq_len, "truncated_documents", "documents", cut, n=len(docs),
                      extra=dict(dataset=dataset, split=docs.name, fraction=cut / len(docs), series=dataset))
    if val.evidence_start is not None:
        for seq_len in lengths:
            micro, macro = f1_scores(data.visible_labels(val, seq_len), val.labels)
            for metric, value in (("micro_f1", micro), ("macro_f1", macro)):
                yield Row(EVIDENCE_READER, "seq_len", seq_len, metric, "%", 100 * value, n=1,
                          extra=dict(dataset=dataset, series=dataset,
                                     meaning="predicts exactly the labels whose evidence lies within the first "
                                             "seq_len tokens; not an upper bound on F1"))


def _trainee(cfg: DictConfig, ctx: RunContext, dataset: str, train: data.Documents, val: data.Documents,
             seq_len: int, attention: str, seed: int, extra: dict, timed_only: bool) -> Trainee:
    """The classifier at `seq_len` with `attention`, fed the same documents at every length; a `timed_only`
    one is not evaluated (it trains too few steps for its F1 to mean anything)."""
    spec = cfg.longdoc
    if attention == OURS:
        require_triton(attention, ctx.device)
    vocab = _synthetic(spec).vocab_size if dataset == "synthetic" else None
    torch.manual_seed(seed)  # the same initial weights at every length and for every implementation
    model = build_classifier(spec.model, train.labels.shape[1], vocab, _positions(spec), seq_len, attention)
    micro = _micro(spec, seq_len)

    def batches(step, rank, world):
        picks = torch.randint(0, len(train), (spec.batch,), generator=step_generator(seed, step, rank))
        return [data.encode(train, part.tolist(), seq_len) for part in picks.split(micro)]

    def evaluate(model):
        logits, loss = [], 0.0
        for start in range(0, len(val), micro):
            batch = {k: v.to(ctx.device) for k, v in data.encode(val, range(start, min(start + micro, len(val))),
                                                                  seq_len).items()}
            out = model(**batch)
            logits.append(out.logits.float().cpu())
            loss += out.loss.item() * len(batch["labels"])
        micro_f1, macro_f1 = f1_scores(torch.cat(logits) > 0, val.labels)
        return [Row(attention, "step", 0, "val_loss", "nats", loss / len(val), n=1),
                Row(attention, "step", 0, "val_micro_f1", "%", 100 * micro_f1, n=1),
                Row(attention, "step", 0, "val_macro_f1", "%", 100 * macro_f1, n=1)]

    hidden = model.config.hidden_size
    settings = dict(dataset=dataset, docs=[train.name, len(train), val.name, len(val)], seq_len=seq_len,
                    attention=attention, seed=seed, longdoc=OmegaConf.to_container(spec, resolve=True))
    return Trainee(attention, model, batches, (lambda model: []) if timed_only else evaluate, spec.batch * seq_len,
                   model_flops_per_token(model, model.config.num_hidden_layers, hidden, seq_len), extra,
                   fingerprint(settings))


def _positions(spec: DictConfig) -> int:
    """The position table a model from scratch is built with: `model.positions`, or the longest length."""
    return spec.model.positions or max(as_list(spec.seq_len))


def candidates(cfg: DictConfig, ctx: RunContext, documents: dict) -> Iterator[Candidate]:
    """Per data set and seed, every length with every implementation of `attention`, trained and evaluated:
    one seed's whole curve comes first. With the first seed, each implementation of `timed` also trains
    `timed_steps` steps at each length, for its step time and memory only."""
    spec = cfg.longdoc
    train_spec = TrainSpec.from_config(cfg.train)
    timed = as_list(spec.timed)
    # with nothing timed, timed_steps is unread: validate leaves it unchecked and the command line lets a null through
    timed_spec = dataclasses.replace(train_spec, steps=spec.timed_steps, eval_every=0,
                                     log_every=min(train_spec.log_every, spec.timed_steps)) if timed else None
    first_seed = as_list(spec.seeds)[0]
    for dataset, seed, seq_len in itertools.product(as_list(spec.datasets), as_list(spec.seeds),
                                                    as_list(spec.seq_len)):
        runs = [(attention, False) for attention in as_list(spec.attention)]
        runs += [(attention, True) for attention in timed if seed == first_seed]
        for attention, timed_only in runs:
            steps = (timed_spec if timed_only else train_spec).steps
            extra = dict(dataset=dataset, seq_len=seq_len, seed=seed, steps=steps,
                         series=f"{dataset} N={seq_len} seed={seed}")

            def build(dataset=dataset, seq_len=seq_len, attention=attention, seed=seed, extra=extra,
                      timed_only=timed_only) -> Trainee:
                train, val = documents[dataset]
                return _trainee(cfg, ctx, dataset, train, val, seq_len, attention, seed, extra, timed_only)
            yield Candidate(attention, extra, build, spec=timed_spec if timed_only else None)


def derived_rows(rows: list[Row], first_seed: int) -> Iterator[Row]:
    """Per data set, implementation and length, over the seeds: final micro- and macro-F1 (median, 20th and
    80th percentiles, each seed's value in `values`), step time and peak memory; and the step-time speedup over
    eager at `first_seed`. A length that failed for every seed (out of memory) gets a step-time row of that
    status. Then per data set and implementation the micro-F1 lift of the best length over the shortest, and,
    where a run covers both of Table 5's data sets, their mean: the abstract's figure."""
    last_step = max((r.x_value for r in rows if r.metric == "val_micro_f1"), default=None)
    groups: dict[tuple, dict[str, dict[int, Row]]] = {}
    for r in rows:
        if "seed" not in r.extra:
            continue
        metric = r.metric if r.status == "ok" else "failed"
        if metric in ("val_micro_f1", "val_macro_f1") and r.x_value != last_step:
            continue
        key = (r.extra["dataset"], r.provider, r.extra["seq_len"])
        groups.setdefault(key, {}).setdefault(metric, {})[r.extra["seed"]] = r
    summary: dict[tuple, Row] = {}
    for (dataset, provider, seq_len), by_metric in sorted(groups.items()):
        extra = dict(dataset=dataset, series=dataset)
        for source, metric, unit in SUMMARIES:
            per_seed = by_metric.get(source, {})
            if per_seed:
                seeds = sorted(per_seed)
                values = [per_seed[s].p50 for s in seeds]
                row = Row(provider, "seq_len", seq_len, metric, unit, *median_p20_p80(values), n=len(values),
                          extra=dict(extra, seeds=seeds, values=values))
                summary[(dataset, provider, seq_len, metric)] = row
                yield row
            elif "failed" in by_metric and source == "step_time":
                failed = next(iter(by_metric["failed"].values()))
                yield Row(provider, "seq_len", seq_len, metric, unit, status=failed.status, message=failed.message,
                          extra=extra)
    # Both step times from the first seed, every implementation's: the timed ones (eager among them by default)
    # run that seed alone, and a trained one's median over the seeds would set other seeds against it.
    for (dataset, provider, seq_len), by_metric in sorted(groups.items()):
        timed = by_metric.get("step_time", {}).get(first_seed)
        eager = groups.get((dataset, "eager", seq_len), {}).get("step_time", {}).get(first_seed)
        if timed is not None and eager is not None:
            yield Row(provider, "seq_len", seq_len, "speedup", "x", eager.p50 / timed.p50, n=1,
                      extra=dict(dataset=dataset, series=dataset, baseline="eager", seeds=[first_seed]))
    yield from _lift_rows(summary)


def _lift_rows(summary: dict[tuple, Row]) -> Iterator[Row]:
    """Per data set and implementation: micro-F1 at the best length less that at the shortest, seed by seed."""
    curves: dict[tuple[str, str], dict[int, Row]] = {}
    for (dataset, provider, seq_len, metric), row in summary.items():
        if metric == "micro_f1":
            curves.setdefault((dataset, provider), {})[seq_len] = row
    lifts: dict[str, dict[str, float]] = {}
    for (dataset, provider), curve in curves.items():
        shortest, best = min(curve), max(curve, key=lambda n: curve[n].p50)
        first = dict(zip(curve[shortest].extra["seeds"], curve[shortest].extra["values"]))
        per_seed = [v - first[s] for s, v in zip(curve[best].extra["seeds"], curve[best].extra["values"])
                    if s in first]
        if not per_seed:  # no seed ran both lengths
            continue
        row = Row(provider, "seq_len", best, "f1_lift", "points", *median_p20_p80(per_seed), n=len(per_seed),
                  extra=dict(dataset=dataset, shortest=shortest, best=best, series=dataset))
        lifts.setdefault(provider, {})[dataset] = row.p50
        yield row
    for provider, by_dataset in lifts.items():
        if all(d in by_dataset for d in PAPER_DATASETS):
            yield Row(provider, "datasets", len(PAPER_DATASETS), "f1_lift", "points",
                      statistics.mean(by_dataset[d] for d in PAPER_DATASETS), n=len(PAPER_DATASETS),
                      extra=dict(dataset="+".join(PAPER_DATASETS)))


def validate(cfg: DictConfig) -> None:
    spec, model = cfg.longdoc, cfg.longdoc.model
    datasets = checks.choices("longdoc.datasets", spec.datasets, data.DATASETS)
    trained = checks.choices("longdoc.attention", spec.attention, ATTENTION, empty_ok=True)
    timed = checks.choices("longdoc.timed", spec.timed, ATTENTION, empty_ok=True)
    if not trained and not timed:
        raise ConfigError(f"longdoc.attention and longdoc.timed are both empty: name an implementation to train "
                          f"(of {list(ATTENTION)})")
    both = set(trained) & set(timed)
    if both:
        raise ConfigError(f"longdoc.timed={sorted(both)} are already trained (longdoc.attention); time each "
                          "implementation once")
    checks.choice("longdoc.eval_split", spec.eval_split, ("validation", "test"))
    checks.numbers("longdoc.seq_len", spec.seq_len, at_least=data.SPECIAL_TOKENS + 1)
    checks.numbers("longdoc.seeds", spec.seeds, at_least=0)
    for key in ("batch", "micro_tokens"):
        checks.number(f"longdoc.{key}", spec[key], at_least=1)
    for key in ("n_train", "n_val"):
        if spec[key] is not None or "synthetic" in datasets:
            checks.number(f"longdoc.{key}", spec[key], at_least=1)
    for key in MODEL_SIZES:
        checks.number(f"longdoc.model.{key}", model[key], at_least=1)
    checks.number("longdoc.model.dropout", model.dropout, integer=False, at_least=0, below=1)
    training = TrainSpec.from_config(cfg.train)
    if cfg.train.grad_accum != 1:
        raise ConfigError(f"train.grad_accum={cfg.train.grad_accum!r}: longdoc makes each step of longdoc.batch "
                          "documents (in forwards of longdoc.micro_tokens); set the step's size there, not here")
    if timed:  # else unread: a run without it could not set it right (unread_keys)
        checks.number("longdoc.timed_steps", spec.timed_steps, at_least=training.timing_skip_steps + 1)
    for seq_len in as_list(spec.seq_len):
        if spec.batch % _micro(spec, seq_len):
            raise ConfigError(f"longdoc.micro_tokens={spec.micro_tokens} gives {_micro(spec, seq_len)} documents per "
                              f"forward at seq_len={seq_len}, which does not divide longdoc.batch={spec.batch}; "
                              "use powers of two, so that every document of a step weighs the same")
    _validate_data(spec, datasets)
    _validate_model(spec, datasets)


def _validate_data(spec: DictConfig, datasets: list[str]) -> None:
    if "mimic-iii" in datasets:
        if not spec.mimic_path:
            raise ConfigError("longdoc.datasets has mimic-iii but longdoc.mimic_path is not set. MIMIC-III cannot be "
                              "downloaded without credentialed PhysioNet access: prepare it locally and give "
                              "longdoc.mimic_path=<folder with train.jsonl and validation.jsonl>")
        try:
            data.mimic_files(spec.mimic_path, ("train", spec.eval_split))
        except ValueError as exc:
            raise ConfigError(f"longdoc.mimic_path={spec.mimic_path!r}: {exc}") from None
    if "synthetic" in datasets:
        for key in ("seed", "labels", "evidence_tokens", "boundary", "min_tokens", "max_tokens", "words"):
            checks.number(f"longdoc.synthetic.{key}", spec.synthetic[key], at_least=0 if key == "seed" else 1)
        checks.number("longdoc.synthetic.late_fraction", spec.synthetic.late_fraction, integer=False, at_least=0,
                      at_most=1)
        # a rate of 0 would give documents without labels: nothing to learn or score
        checks.number("longdoc.synthetic.label_rate", spec.synthetic.label_rate, integer=False, above=0, at_most=1)
        try:
            _synthetic(spec).check()
        except ValueError as exc:
            raise ConfigError(f"longdoc.synthetic: {exc}") from None


def _validate_model(spec: DictConfig, datasets: list[str]) -> None:
    model = spec.model
    real = [d for d in datasets if d != "synthetic"]
    if real and not model.pretrained:
        raise ConfigError(f"longdoc.datasets={real} are text: they need a pretrained model's tokenizer "
                          "(longdoc.model.pretrained, e.g. roberta-base)")
    if model.pretrained and "synthetic" in datasets:
        raise ConfigError("longdoc.datasets has synthetic, whose words are its own: a pretrained model "
                          f"(longdoc.model.pretrained={model.pretrained!r}) knows nothing of them; set it to null")
    if model.pretrained and model.positions is not None:
        raise ConfigError(f"longdoc.model.positions={model.positions} applies to a model from scratch; a "
                          f"pretrained model's table is its checkpoint's")
    if model.positions is not None:
        checks.number("longdoc.model.positions", model.positions, at_least=1)
    if not model.pretrained and model.hidden % model.heads:
        raise ConfigError(f"longdoc.model.hidden={model.hidden} is not a multiple of longdoc.model.heads="
                          f"{model.heads}: each head takes an equal share of the width")
    if OURS in as_list(spec.attention) + as_list(spec.timed) and not model.pretrained and \
            not MIN_HEAD_DIM <= model.hidden // model.heads <= MAX_HEAD_DIM:
        raise ConfigError(f"longdoc.model.hidden={model.hidden} over heads={model.heads} must give heads of "
                          f"{MIN_HEAD_DIM} to {MAX_HEAD_DIM} dimensions for {OURS}")
    table = _pretrained_positions(model.pretrained) if model.pretrained else _positions(spec)
    too_long = [n for n in as_list(spec.seq_len) if n > table]
    if too_long and not model.extend_positions:
        raise ConfigError(f"longdoc.seq_len={too_long} is beyond the model's {table} positions and "
                          "longdoc.model.extend_positions=false; set it true to grow the table by copying, or "
                          "shorten the sequences")


def unread_keys(cfg: DictConfig) -> dict[str, str]:
    spec = cfg.longdoc
    datasets = as_list(spec.datasets)
    unread = checks.unread_unless_chosen({"longdoc.mimic_path": ["mimic-iii"], "longdoc.synthetic": ["synthetic"]},
                                         datasets, f"longdoc.datasets={datasets}")
    if spec.model.pretrained:
        unread.update({f"longdoc.model.{key}": f"it sizes a model from scratch, and longdoc.model.pretrained="
                       f"{spec.model.pretrained!r} is the checkpoint's size" for key in MODEL_SIZES})
    if not as_list(spec.timed):
        unread["longdoc.timed_steps"] = "it is how long the implementations of longdoc.timed train, and it is []"
    return unread


def run(cfg: DictConfig, ctx: RunContext) -> Iterator[Row]:
    spec = cfg.longdoc
    if OURS in as_list(spec.attention) + as_list(spec.timed):
        from effrepro_kernels.hf_attention import register
        register()
    documents = {}
    for dataset in as_list(spec.datasets):
        documents[dataset] = load_documents(spec, dataset, Path(cfg.paths.cache) / "longdoc")
        yield from data_rows(dataset, *documents[dataset], as_list(spec.seq_len))
    yield from train_from_config(cfg, candidates(cfg, ctx, documents), ctx.device,
                                 functools.partial(derived_rows, first_seed=as_list(spec.seeds)[0]))
