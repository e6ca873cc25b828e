"""What the variants cost in accuracy, at small scale: each trained from scratch on the same generated
classification set with the shared training loop (same steps, data and seed), its validation accuracy in the
record; then the trained dense model factorised by truncated SVD at falling ranks, without further training:
how far its outputs move from the dense model's, and its accuracy.

The set is generated here, offline and at any size, so that the task needs no download. LRA's ListOps
generator (tasks/lra/data.py) would be the paper-like choice, but a paper's package may not import another's.
"""
from __future__ import annotations

import copy
from typing import Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from repro.bench import failure, require_triton
from repro.checks import as_list
from repro.context import RunContext, fingerprint
from repro.models import count_parameters
from repro.records import Row
from repro.timing import free_device_memory
from repro.train import Candidate, Trainee, step_generator, train_from_config
from tasks.common.low_rank import LowRankLinear

from .variants import Variant, build, count_flops, distinct_models, factorised, on_meta

CLS, MARKERS = 1, (2, 3)  # 0 is BERT's padding id; filler tokens follow the markers
FIRST_FILLER = 4


def counting_set(n: int, seq_len: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """`n` examples: [CLS], then random filler tokens among which two marker tokens are scattered, one 1/2 to 9/10
    as often as the other; the label says which marker is the more frequent (0: the first, 1: the second).
    Counting over the whole sequence asks each variant's attention to gather every marker into [CLS]."""
    if vocab <= FIRST_FILLER or seq_len < 9:
        raise ValueError(f"vocab={vocab} must exceed {FIRST_FILLER} and seq_len={seq_len} be at least 9")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_FILLER, vocab, (n, seq_len), generator=gen)
    ids[:, 0] = CLS
    labels = torch.randint(0, 2, (n,), generator=gen)
    body = seq_len - 1
    more = torch.randint(2, max(2, body // 8) + 1, (n,), generator=gen)
    fewer = (more * (0.5 + 0.4 * torch.rand(n, generator=gen))).long()
    frequent = torch.tensor(MARKERS)[labels]
    rare = sum(MARKERS) - frequent
    slot = torch.arange(body)
    markers = torch.where(slot < more[:, None], frequent[:, None],
                          torch.where(slot < (more + fewer)[:, None], rare[:, None], -1))
    positions = torch.rand(n, body, generator=gen).argsort(dim=1) + 1  # the markers' places, after [CLS]
    ids.scatter_(1, positions, torch.where(markers >= 0, markers, ids.gather(1, positions)))
    return {"input_ids": ids, "labels": labels}


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: dict[str, torch.Tensor], batch: int) -> float:
    """Percent of `data` classified right."""
    device = next(model.parameters()).device
    hits = 0
    for start in range(0, len(data["labels"]), batch):
        logits = model(input_ids=data["input_ids"][start:start + batch].to(device)).logits
        hits += int((logits.argmax(-1).cpu() == data["labels"][start:start + batch]).sum())
    return 100.0 * hits / len(data["labels"])


def _trainee(variant: Variant, cfg: DictConfig, ctx: RunContext, data: dict) -> Trainee:
    spec = cfg.greenformers.quality
    model_cfg = OmegaConf.to_container(spec.model)
    if variant.attention_of(cfg.greenformers.attention) == "effrepro":
        require_triton(variant.name, ctx.device)
    torch.manual_seed(cfg.seed)
    model = build(variant, model_cfg, spec.seq_len, positions=spec.seq_len, attention=cfg.greenformers.attention)
    train_set, n_train = data["train"], len(data["train"]["labels"])
    accum = cfg.train.grad_accum

    def batches(step, rank, world):
        """`train.grad_accum` micro-batches of `greenformers.quality.batch` examples a step."""
        picks = torch.randint(0, n_train, (accum * spec.batch,), generator=step_generator(cfg.seed, step, rank))
        return [{key: value[micro] for key, value in train_set.items()} for micro in picks.split(spec.batch)]

    def evaluate(model):
        return [Row(variant.name, "step", 0, "val_accuracy", "%", accuracy(model, data["val"], spec.batch), n=1)]

    tokens = spec.batch * spec.seq_len
    flops = count_flops(on_meta(variant, model_cfg, spec.seq_len, spec.seq_len), spec.batch, spec.seq_len)["fwd_bwd"]
    extra = dict(setting="quality", model=model_cfg["name"], seq_len=spec.seq_len, series="quality",
                 **variant.extra(cfg.greenformers.attention))
    settings = dict(variant=variant.name, attention=cfg.greenformers.attention, seed=cfg.seed,
                    quality=OmegaConf.to_container(spec))
    return Trainee(variant.name, model, batches, evaluate, accum * tokens, flops / tokens, extra, fingerprint(settings))


def svd_rows(dense: torch.nn.Module, ranks: list[int], data: dict, batch: int, extra: dict) -> Iterator[Row]:
    """The trained dense model factorised by truncated SVD at each rank, highest first, not trained further:
    the relative (Frobenius) error of its encoder's last hidden states against the dense model's on `data`, its
    accuracy and its encoder's parameters. A layer stays dense where the rank saves no weights in it (at or above
    in·out/(in+out)), so a high rank may factorise only some layers: the rows say how many (`factorised_layers`).
    A rank whose copy runs out of memory is an `oom` row, as a training run's is, and the next rank is tried."""
    dense.eval()
    device = next(dense.parameters()).device
    for rank in sorted(ranks, reverse=True):
        try:
            rows = _factorised_rows(dense, rank, data, batch, extra)
        except Exception as exc:  # noqa: BLE001
            found = failure(exc)
            if found is None:
                raise
            rows = [Row("lrt_svd", "rank", rank, "output_rel_error", "fraction", status=found[0], message=found[1],
                        extra={**extra, "rank": rank, "init": "svd"})]
        if rows[0].status != "ok":
            free_device_memory(device, failed=True)  # the failure's traceback held the factorised copy
        yield from rows


@torch.no_grad()
def _factorised_rows(dense: torch.nn.Module, rank: int, data: dict, batch: int, extra: dict) -> list[Row]:
    """`svd_rows` at one rank."""
    device = next(dense.parameters()).device
    low = factorised(copy.deepcopy(dense), Variant(f"lrt_r{rank}", rank=rank), init="svd")
    error = reference = 0.0
    for start in range(0, len(data["labels"]), batch):
        ids = data["input_ids"][start:start + batch].to(device)
        want = dense.bert(input_ids=ids).last_hidden_state.double()
        error += float((low.bert(input_ids=ids).last_hidden_state.double() - want).square().sum())
        reference += float(want.square().sum())
    factorised_layers = [m for m in low.bert.modules() if isinstance(m, LowRankLinear)]
    factors = sum(isinstance(m, torch.nn.Linear) for f in factorised_layers for m in f.modules())
    dense_layers = sum(isinstance(m, torch.nn.Linear) for m in low.bert.modules()) - factors
    tags = {**extra, "rank": rank, "init": "svd", "linear_layers": len(factorised_layers) + dense_layers,
            "factorised_layers": len(factorised_layers)}
    return [Row("lrt_svd", "rank", rank, "output_rel_error", "fraction", (error / reference) ** 0.5, n=1, extra=tags),
            Row("lrt_svd", "rank", rank, "val_accuracy", "%", accuracy(low, data, batch), n=1, extra=tags),
            Row("lrt_svd", "rank", rank, "params", "count", count_parameters(low.bert), n=1, extra=tags)]


def run_quality(cfg: DictConfig, ctx: RunContext) -> Iterator[Row]:
    """Train every quality variant; right after base, factorise its trained model at each of `svd_ranks`."""
    spec = cfg.greenformers.quality
    vocab = spec.model.vocab_size
    data = {"train": counting_set(spec.n_train, spec.seq_len, vocab, cfg.seed),
            "val": counting_set(spec.n_val, spec.seq_len, vocab, cfg.seed + 1)}
    ranks = as_list(spec.svd_ranks)
    trained: list[Trainee] = []  # base alone, while its trained weights are factorised below

    def candidate(variant: Variant) -> Candidate:
        def make() -> Trainee:
            trainee = _trainee(variant, cfg, ctx, data)
            if variant.name == "base" and ranks:
                trained.append(trainee)
            return trainee
        return Candidate(variant.name, dict(setting="quality", series="quality"), make)

    # one variant at a time, so that trained base is let go before the next one trains: alive on the device, it
    # would count in that one's peak memory
    for variant in distinct_models(as_list(spec.variants), cfg.greenformers.attention):
        ok = True
        for row in train_from_config(cfg, [candidate(variant)], ctx.device):
            ok = ok and row.status == "ok"  # an untrained model's factorisation says nothing
            yield row
        if trained:
            if ok:
                extra = dict(setting="quality_svd", model=spec.model.name, seq_len=spec.seq_len, series="quality")
                yield from svd_rows(trained[0].model, ranks, data["val"], spec.batch, extra)
            trained.clear()
            free_device_memory(ctx.device, failed=False)
