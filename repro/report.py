"""Compare run records with the published claims; write REPORT.md, a CSV of all rows, plots, and the
README's summary table. `repro-report` rebuilds all of it from the committed records."""
from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import fnmatch
import functools
import gzip
import io
import json
import math
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .claims import Claim, load_published, load_yaml
from .context import DEFAULT_RECORDS, PROJECT_ROOT
from .records import (FAILED_ROW_STATUSES, PACK_ABOVE_BYTES, Row, RunRecord, largest_x_within, load_records,
                      pack_records, replace_atomically)

REPRODUCED = "reproduced"
WITHIN = "within tolerance"
NOT_REPRODUCED = "not reproduced"
NOT_COMPARABLE = "not comparable at this scale"
OTHER_HARDWARE = "not comparable (other hardware)"
NOT_RUN = "not yet run"
SCALE_ORDER = {"smoke": 0, "small": 1, "paper": 2}
# A killed run's rows, those of a run ended by running out of memory, and those of a record still saying
# "running" (its job killed outright, by SIGKILL or with its machine, before it could say so; the engine saves rows
# only once measured) were each complete when written: used only where no whole run is. A run ended by an error is
# not used, and the report lists it: the error may be in the code that measured.
USABLE = ("ok", "killed", "oom", "running")

# Dense bf16/fp16 tensor-core peaks (TFLOP/s, datasheets), for claims stated as a fraction of peak.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "V100": 125.0}
GPU_FAMILIES = ("H200", "H100", "A100", "A10", "V100", "T4", "RTX 3090", "RTX 4090", "MI250", "MI300")


@dataclass
class Outcome:
    claim: Claim
    status: str
    value: float | None = None
    gpu: str | None = None
    scale: str | None = None
    record: Path | None = None
    detail: str = ""
    unit: str = ""
    record_status: str = "ok"  # another: the value comes from a run stopped before its end (`cut_short`)
    made: str = ""  # the record's date, commit and model: another card's row may differ in more than the card


def cut_short(status: str) -> str:
    """How the rows of a run that did not end whole are marked: "killed run", "oom run", or for a record still
    saying running, "unfinished run"."""
    return f"{'unfinished' if status == 'running' else status} run"


def gpu_family(name: str | None) -> str | None:
    name = (name or "").upper()
    return next((f for f in GPU_FAMILIES if f.upper() in name), None)


def same_gpu_family(claimed: str | None, gpu_name: str | None) -> bool:
    """Whether a record's GPU is of the claim's family; never where either is unknown ("GPU not stated", a card
    outside `GPU_FAMILIES`)."""
    family = gpu_family(claimed)
    return family is not None and family == gpu_family(gpu_name)


def peak_tflops(gpu_name: str | None) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k.upper() in (gpu_name or "").upper()), None)


def _matches(row, where: dict) -> bool:
    for key, wanted in where.items():
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if row.get(key) not in allowed:
            return False
    return True


def _matches_failure(row: Row, where: dict) -> bool:
    """Whether a failed row is at the claim's `where`, on the keys that it has: a failure is written on the measured
    metric (time, memory, a score) before anything is derived from it, so it lacks the keys that only derived rows
    carry (a ratio's `baseline`), and a setting that failed before any benchmark was scored lacks the benchmark."""
    return _matches(row, {key: wanted for key, wanted in where.items() if row.get(key) is not None})


def _aggregate(values: list[float], how: str) -> float:
    return {"mean": lambda v: sum(v) / len(v), "max": max, "min": min, "last": lambda v: v[-1]}[how](values)


def _claim_rows(claim: Claim, record: RunRecord) -> tuple[str, list, list] | None:
    """The rows `claim`'s value comes from in `record`: those of the first of its metrics, then the first of its
    providers, that the record has (with the provider, and all of that metric's rows, for a quality reference).
    Where no provider has one, the first provider that failed at the claim's points (`_failed_points`) or measured
    them and found no value (`_valueless`), with no rows: the record measured the claim, and the claim did not hold
    there."""
    cmp = claim.compare
    for metric in cmp.metrics:
        # a provider whose output differed from the baseline's measured something else: a failed point, no value
        rows = [r for r in record.rows if r.metric == metric and r.status == "ok" and r.p50 is not None
                and r.extra.get("matches_baseline") is not False and _matches(r, cmp.where)]
        for provider in cmp.providers:
            mine = [r for r in rows if r.provider == provider]
            if mine:
                return provider, mine, rows
    failed = next((p for p in cmp.providers if _failed_points(claim, record, p) or _valueless(claim, record, p)),
                  None)
    return None if failed is None else (failed, [], [])


def _valueless(claim: Claim, record: RunRecord, provider: str) -> list[Row]:
    """The claim's rows of `provider` in which the task measured and found no value to give, each saying why in its
    message (greenformers' crossover where Linformer never gets ahead): the claim did not hold there. Not for
    `largest_x_within`, whose rows without a value are points never tried."""
    cmp = claim.compare
    if cmp.aggregate == "largest_x_within":
        return []
    return [r for r in record.rows if r.provider == provider and r.metric in cmp.metrics and r.status == "ok"
            and r.p50 is None and _matches(r, cmp.where)]


def _failed_points(claim: Claim, record: RunRecord, provider: str) -> dict[tuple, bool]:
    """The points of the claim at which `provider` failed in `record`, each True where its output differed from
    the baseline's (it measured another function) and False where it ran out of memory or raised an error (a
    failure written on the measured metric, time or memory, not on the ratios derived from it); only where
    another provider measured the point: one at which every provider failed (out of memory on this card, the
    baselines too) says nothing of the claim."""
    def point(r):
        return r.x_name, r.x_value, r.extra.get("series")
    measured = {point(r) for r in record.rows if r.provider != provider and r.status == "ok"
                and _matches(r, claim.compare.where)}
    failed = {}
    for r in record.rows:
        if r.provider == provider and _matches_failure(r, claim.compare.where) and point(r) in measured:
            if r.extra.get("matches_baseline") is False:
                failed[point(r)] = True
            elif r.status in FAILED_ROW_STATUSES:
                failed.setdefault(point(r), False)
    return failed


def _how_failed(failed: dict[tuple, bool]) -> str:
    """How the points of `_failed_points` failed, in words."""
    wrong = sum(failed.values())
    if not wrong:
        return "out of memory or an error"
    others = len(failed) - wrong
    return f"{wrong} with output unlike the baseline's" + (f", {others} out of memory or an error" if others else "")


def _group_of(claim: Claim, row: Row) -> tuple:
    """For `largest_x_within`: where the claim allows several values of a key (texts, models, benchmarks), each is
    judged against its own reference, and the claim holds as far as it holds for all of them."""
    return tuple(row.get(k) for k, wanted in claim.compare.where.items() if isinstance(wanted, list))


def _points(claim: Claim, record: RunRecord) -> tuple[int, int]:
    """How well `record` measured the claim: the priority of the provider it has (the claim's first provider is
    the highest, the number of providers minus 1), and how many distinct points of it, failed ones included;
    (0, 0) where it cannot judge the claim (no rows, or for `largest_x_within` no rows of the quality reference)."""
    found = _claim_rows(claim, record)
    if found is None:
        return 0, 0
    provider, mine, rows = found
    if mine and claim.compare.aggregate == "largest_x_within":
        referenced = {_group_of(claim, r) for r in rows if r.provider == claim.compare.quality["reference"]}
        if not any(_group_of(claim, r) in referenced for r in mine):
            return 0, 0
    # the same point may be measured under two settings of one sweep (rows that differ only in `extra`)
    distinct = {(r.x_name, r.x_value, r.p50) for r in mine}
    return (len(claim.compare.providers) - claim.compare.providers.index(provider) - 1,
            len(distinct) + len(_failed_points(claim, record, provider)) + len(_valueless(claim, record, provider)))


def claim_value(claim: Claim, record: RunRecord) -> tuple[float | None, str, str]:
    """The reproduced value of `claim` in `record`, its unit, and which provider and how many points gave it
    (`_claim_rows`)."""
    cmp = claim.compare
    found = _claim_rows(claim, record)
    if found is None:
        return None, "", f"no rows of {'/'.join(cmp.metrics)} for {list(cmp.providers)} where {cmp.where}"
    provider, mine, rows = found
    failed = _failed_points(claim, record, provider)
    if not mine:
        if not failed:
            return None, "", "; ".join(r.message or f"{provider} measured, with no value"
                                       for r in _valueless(claim, record, provider))
        return None, "", f"{provider} failed at all {len(failed)} of the claim's points ({_how_failed(failed)})"
    if cmp.aggregate != "largest_x_within":
        if cmp.aggregate == "last" and all(isinstance(r.x_value, (int, float)) for r in mine):
            mine = sorted(mine, key=lambda r: r.x_value)  # the last step, whatever order the rows were written in
        # an absolute value is read in the claim's unit, which older records left out of their rows
        unit = mine[0].unit or (claim.unit if cmp.kind == "absolute" else "")
        more = f"; {len(failed)} more failed" if failed else ""
        if any(failed.values()):
            more += f" ({_how_failed(failed)})"
        return _aggregate([r.p50 for r in mine], cmp.aggregate), unit, \
            f"{provider}, {cmp.aggregate} of {len(mine)}{more}"
    quality = cmp.quality
    # a point the provider failed at (out of memory, an error) ends its run of points within tolerance; a failed
    # row may lack a key of the groups (a multiple-choice setting fails before any benchmark is scored): it is
    # then a failure in each of them
    failures = [r for r in record.rows if r.provider == provider and r.status in FAILED_ROW_STATUSES
                and r.metric == mine[0].metric and r.x_name == mine[0].x_name and _matches_failure(r, cmp.where)]
    values, unjudged = [], []
    for group in sorted({_group_of(claim, r) for r in mine}, key=str):
        reference = [r.p50 for r in rows if r.provider == quality["reference"] and _group_of(claim, r) == group]
        if not reference:  # nothing to hold it to: the group is not judged, rather than failed
            unjudged.append("/".join(map(str, group)))
            continue
        points = [r for r in mine if _group_of(claim, r) == group] + \
            [r for r in failures if all(v is None or v == g for v, g in zip(_group_of(claim, r), group))]
        values.append(largest_x_within(points, sum(reference) / len(reference),
                                       quality["tolerance"], quality["higher_is_better"]))
    named = ", ".join(group for group in unjudged if group)  # a claim with no list of settings has one, unnamed
    without = f"; not judged, with no {quality['reference']} row" + (f": {named}" if named else "") if unjudged else ""
    value = None if not values or None in values else min(values)
    if value is None:
        return None, "", f"no {provider} row of {mine[0].metric} within {quality['tolerance']:.0%} of " \
                         f"{quality['reference']}'s" + without
    points = f"{len(mine)} point" + ("s" if len(mine) > 1 else "")
    return value, claim.unit, f"{provider}, largest {mine[0].x_name} within {quality['tolerance']:.0%} of " \
                              f"{quality['reference']} ({points})" + without


def _made(record: RunRecord) -> str:
    model = record.config.get("model")
    return ", ".join(part for part in (record.started[:10], (record.env.get("git_sha") or "")[:7],
                                       model.get("name") if isinstance(model, dict) else None) if part)


def judge(claim: Claim, value: float) -> str:
    published = claim.value
    close = abs(value - published) <= claim.compare.tolerance * abs(published)
    better = value >= published if claim.higher_is_better else value <= published
    if better:
        return REPRODUCED if close or not claim.compare.two_sided else NOT_REPRODUCED
    return WITHIN if close else NOT_REPRODUCED


def preference(record: RunRecord, comparable: tuple[str, ...] = (), points: tuple[int, int] = (0, 0),
               hardware: str | None = None) -> tuple:
    """How a record ranks as the source of a claim: a comparable scale first, then one on the claim's own GPU
    family (`hardware`, for a claim only that card can judge), then the larger scale, then a whole run before one
    cut short (killed, out of memory, unfinished), then the one that measured the claim's preferred provider
    (`_points`), then the one with more of the claim's points (a run narrowed by overrides to a few settings does
    not stand for the task's average), then the newest."""
    same_card = hardware is not None and same_gpu_family(hardware, record.env.get("gpu_name"))
    return (record.scale in comparable, same_card, SCALE_ORDER.get(record.scale, -1), record.status == "ok", points,
            record.started)


def evaluate(claim: Claim, records: list[tuple[Path, RunRecord]]) -> Outcome:
    """Judge a claim by the best record of its task (see `preference`) that measured what the claim needs. A
    claim measured on some hardware (one whose `hardware` is not "n/a": a speed, a memory) is judged from GPU
    records only; a CPU run tells the model's quality and the arithmetic, not the speed of a kernel."""
    mine = [(p, r) for p, r in records if r.task == claim.task and r.status in USABLE
            and (claim.hardware == "n/a" or r.gpu_name != "cpu")]
    if not mine:
        return Outcome(claim, NOT_RUN)
    comparable = claim.compare.comparable_at

    points = {id(r): _points(claim, r) for _, r in mine}
    if not any(n for _, n in points.values()):  # the task ran, but not the provider or setting the claim needs
        # what the best of them lacks (the oldest may lack what a newer one has since measured: a reference row)
        _, best = max(mine, key=lambda pr: preference(pr[1], comparable))
        return Outcome(claim, NOT_RUN, detail=claim_value(claim, best)[2])
    # the best record that measured the claim decides it, a failure included: an older one never overrules it
    card_bound = claim.compare.kind == "absolute" and claim.hardware != "n/a"  # judged on its own card only
    path, record = max((pr for pr in mine if points[id(pr[1])][1]),
                       key=lambda pr: preference(pr[1], comparable, points[id(pr[1])],
                                                 claim.hardware if card_bound else None))
    value, unit, detail = claim_value(claim, record)
    found = dict(value=value, gpu=record.gpu_name, scale=record.scale, record=path, detail=detail, unit=unit,
                 record_status=record.status, made=_made(record))
    if record.scale not in comparable:
        return Outcome(claim, NOT_COMPARABLE, **found)
    # another card's failure says no more of the claim than another card's value does
    if card_bound and not same_gpu_family(claim.hardware, record.env.get("gpu_name")):
        return Outcome(claim, OTHER_HARDWARE, **found)
    if value is None:  # measured, and no point within the claim's quality tolerance, or none with a value
        return Outcome(claim, NOT_REPRODUCED, **found)
    if claim.compare.kind == "peak_fraction":
        peak = peak_tflops(record.env.get("gpu_name"))
        if peak is None:  # a card whose peak is not known: its fraction of peak is unknown, whatever the scale
            return Outcome(claim, OTHER_HARDWARE, **{**found, "detail": f"{detail}; no known peak for this GPU"})
        value = 100.0 * value / peak
        found.update(value=value, unit="%")
    return Outcome(claim, judge(claim, value), **found)


def evaluate_by_card(claim: Claim, records: list[tuple[Path, RunRecord]]) -> list[Outcome]:
    """The claim judged on each card that measured it beyond smoke scale, each from that card's best record:
    first the card `evaluate` chooses among all (the one the README shows), then the others by name."""
    best = evaluate(claim, records)
    beyond_smoke = [pr for pr in records if pr[1].scale != "smoke"]
    cards = {r.gpu_name for _, r in beyond_smoke if r.task == claim.task and r.status in USABLE}
    others = [evaluate(claim, [pr for pr in beyond_smoke if pr[1].gpu_name == card])
              for card in sorted(cards - {best.gpu})]
    return [best] + [o for o in others if o.status != NOT_RUN]


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    text = f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{text}{unit if unit in ('x', '%') else ' ' + unit if unit else ''}"


def _link(path: Path, links_from: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), links_from.resolve())).as_posix()


def claims_table(outcomes: list[Outcome], links_from: Path) -> str:
    """A row per outcome; a claim's further outcomes (on other cards) follow it under a short label. Links to the
    records are relative to `links_from`, the folder of the file the table goes into."""
    lines = ["| Claim | Published | Published on | Reproduced | Reproduced on | Status |",
             "|---|---|---|---|---|---|"]
    previous = None
    for o in outcomes:
        c = o.claim
        unverified = "" if c.verified else " (unverified)"
        # another card's best record may differ in model and settings too, not only in the card
        other_card = f"↳ the same claim, another card's record <br><sub>{c.paper}:{c.id}</sub>"
        label = other_card if c is previous else f"{c.claim} <br><sub>{c.paper}:{c.id}, {c.source}{unverified}</sub>"
        previous = c
        where = f"{o.gpu}, {o.scale}" + (f", **{cut_short(o.record_status)}**" if o.record_status != "ok" else "") \
            + (f" <br><sub>{o.made}</sub>" if o.made else "") if o.scale else "—"
        if o.record is not None:
            where += f" ([record]({_link(o.record, links_from)}))"
        how = f" <br><sub>{o.detail}</sub>" if o.detail else ""
        lines.append(f"| {label} | {_fmt(c.value, c.unit)} | {c.hardware} | {_fmt(o.value, o.unit)}{how} | {where} "
                     f"| {o.status} |")
    return "\n".join(lines)


def console_table(outcomes: list[Outcome]) -> str:
    """A plain table for the terminal, one line per claim, its columns as wide as their widest cell (a claim's
    whole id, which names it in results/published/)."""
    cells = [(o.claim.id, _fmt(o.claim.value, o.claim.unit), _fmt(o.value, o.unit)) for o in outcomes]
    widths = [max(len(cell) for cell in column) for column in zip(("claim", "published", "reproduced"), *cells)]
    head = f"{'claim':{widths[0]}} {'published':>{widths[1]}} {'reproduced':>{widths[2]}}  status"
    lines = [head, "-" * len(head)]
    for o, (claim, published, reproduced) in zip(outcomes, cells):
        # a claim measured and not held with no value to show (no point within tolerance, all failed) says why
        how = f"  [{o.detail}]" if o.value is not None or o.status == NOT_REPRODUCED else ""
        killed = f" ({cut_short(o.record_status)})" if o.record_status != "ok" else ""
        lines.append(f"{claim:{widths[0]}} {published:>{widths[1]}} {reproduced:>{widths[2]}}  {o.status}{killed}{how}")
    return "\n".join(lines)


def write_csv(records: list[tuple[Path, RunRecord]], path: Path) -> None:
    """Every row of every record, with its run's status (a run that ended in an error keeps the rows it wrote,
    which the report does not use: filter on record_status) and commit."""
    columns = ["paper", "task", "scale", "gpu_name", "record", "record_status", "git_sha", "provider", "x_name",
               "x_value", "metric", "unit", "p50", "p20", "p80", "n", "status", "message", "extra"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for rec_path, rec in records:
        for r in rec.rows:
            writer.writerow([rec.paper, rec.task, rec.scale, rec.gpu_name, rec_path.name, rec.status,
                             rec.env.get("git_sha"), r.provider, r.x_name, r.x_value, r.metric, r.unit, r.p50, r.p20,
                             r.p80, r.n, r.status, r.message, json.dumps(r.extra, sort_keys=True)])
    # compressed (a tenth of the size; pandas and `zcat` read it as it is), with no timestamp inside, so that
    # the same rows give the same bytes and the file changes in git only when its rows do
    replace_atomically(path, lambda tmp: tmp.write_bytes(gzip.compress(buf.getvalue().encode(), mtime=0)))


def rows_to_plot(records: list[tuple[Path, RunRecord]]) -> dict[tuple[str, str], tuple[list, list[RunRecord]]]:
    """Per task and card, the rows to plot. Each panel (a row's `series` and `mode` extras, the plots' rows and
    columns) is drawn from that card's best record that has it: a whole run before one cut short, then the newest
    of those with at least half the points of the fullest (a run narrowed to one length does not hide a sweep).
    Each line of the panel (a provider's rows of a metric, over one baseline for a ratio) comes whole from the
    best of that record and the newer ones that have it: a sweep whose rows of a provider were retracted hides no
    later run's rows of it, while an older run's lines (a provider since renamed) stay out. So a run that measured
    only some providers, settings or modes hides none of the others, and one card's run never hides another
    card's. Also the records used, newest first."""
    panels: dict[tuple, list[tuple[RunRecord, list]]] = collections.defaultdict(list)
    lines: dict[tuple, list[tuple[RunRecord, list]]] = collections.defaultdict(list)
    for _, rec in records:
        if rec.status not in USABLE or rec.scale == "smoke":
            continue
        by_line = collections.defaultdict(list)
        for row in rec.rows:
            if row.status == "ok" and row.p50 is not None:  # a record whose rows of a line all failed lacks it
                by_line[_panel(row), row.metric, str(row.extra.get("baseline", "")), row.provider].append(row)
        for panel in {line[0] for line in by_line}:
            panels[rec.task, rec.gpu_name, panel].append((rec, [r for line, rows in by_line.items()
                                                                if line[0] == panel for r in rows]))
        for line, rows in by_line.items():
            lines[rec.task, rec.gpu_name, line].append((rec, rows))
    since = {key: _fullest_then_newest(found)[0].started for key, found in panels.items()}
    best = {}
    for (task, card, line), found in lines.items():
        newer = [(rec, rows) for rec, rows in found if rec.started >= since[task, card, line[0]]]
        if newer:
            best[task, card, line] = _fullest_then_newest(newer)
    with_modes = {(task, card, series) for task, card, ((series, mode), *_) in best if mode}
    out: dict[tuple[str, str], tuple[list, list[RunRecord]]] = {}
    for (task, card, ((series, mode), *_)), (rec, rows) in sorted(best.items(), key=lambda kv: kv[1][0].started,
                                                                   reverse=True):
        if not mode and (task, card, series) in with_modes:
            continue  # rows from before the task timed several modes: the newer records' modes stand for them
        plotted, used = out.setdefault((task, card), ([], []))
        plotted += rows
        if all(u is not rec for u in used):
            used.append(rec)
    return out


def _panel(row: Row) -> tuple[str, str]:
    return str(row.extra.get("series", "")), str(row.extra.get("mode", ""))


def _fullest_then_newest(found: list[tuple[RunRecord, list]]) -> tuple[RunRecord, list]:
    whole = [f for f in found if f[0].status == "ok"] or found
    counted = [(rec, rows, len({r.x_value for r in rows})) for rec, rows in whole]
    most = max(points for _, _, points in counted)
    rec, rows, _ = max((c for c in counted if 2 * c[2] >= most), key=lambda c: c[0].started)
    return rec, rows


def card_slug(gpu_name: str) -> str:
    """A file-name part for a card: "NVIDIA H100 80GB HBM3" -> "h100_80gb_hbm3"."""
    return re.sub(r"[^a-z0-9]+", "_", gpu_name.lower().removeprefix("nvidia ")).strip("_")


def plotted_metrics(record: RunRecord) -> list[str]:
    """The metrics a task declares worth a plot (`task.plot` in its config)."""
    return list(_task_setting(record, "plot") or ())


def plotted_lines(record: RunRecord) -> dict[str, str]:
    """The row extras that a task's plots draw a line's colour and dash from (`task.plot_lines`, e.g. a KV-cache
    policy and its bits), rather than a colour per provider."""
    return dict(_task_setting(record, "plot_lines") or {})


def _task_setting(record: RunRecord, key: str):
    """A setting of the task's config as the record has it, or, for records made before the task had it, as the
    task's config composes now."""
    task_config = record.config.get("task") or {}
    return task_config[key] if key in task_config else _declared(record.task, key)


@functools.cache
def _declared(task: str, key: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("repro_root", lambda: str(PROJECT_ROOT), replace=True)
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
            return OmegaConf.to_container(compose("config", overrides=[f"task={task}"]).task).get(key)
    except Exception:  # noqa: BLE001 - a task that no longer exists: nothing to plot
        return None


def plot_rows(task: str, rows: list, title: str, out_dir: Path, metrics: list[str], card: str = "",
              lines: dict[str, str] | None = None) -> list[Path]:
    """One PNG per metric: p50 against x, a line per provider, columns by mode, rows by series. A ratio taken
    over several baselines (a row's `baseline` extra) gets one PNG per baseline, never an average of them.
    `card`, where given, ends each file's name (a task measured on several cards gets a set of plots each).
    `lines` names the row extras that give a line its colour (`hue`) and dash (`style`), where each pair of
    them still tells the providers apart: four policies at two bit widths read better as four colours, each
    solid and dashed, than as eight colours."""
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd
    import seaborn as sns

    ok = [r for r in rows if r.status == "ok" and r.p50 is not None and r.metric in metrics]
    if not ok:
        return []
    hue, style = (lines or {}).get("hue"), (lines or {}).get("style")
    df = pd.DataFrame([{"provider": r.provider, "x": r.x_value, "x_name": r.x_name, "metric": r.metric,
                        "unit": r.unit, "p50": r.p50,
                        "mode": str(r.extra.get("mode", "")), "series": str(r.extra.get("series", "")),
                        "baseline": str(r.extra.get("baseline", "")),
                        "hue": str(r.extra[hue]) if hue in r.extra else None, "style": str(r.extra.get(style, ""))}
                       for r in ok])
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (metric, baseline), part in df.groupby(["metric", "baseline"]):
        several = df[df["metric"] == metric]["baseline"].nunique() > 1
        by_mode = "mode" if (part["mode"] != "").any() else None  # no empty "mode =" column for tasks without
        x_name = part["x_name"].iloc[0]
        x = pd.to_numeric(part["x"], errors="coerce")
        facets = dict(hue="provider", col=by_mode, row="series", height=2.6, aspect=1.3)
        panels = {"sharey": False}  # a title above each panel: titles at the grid's edge run under its legend
        with warnings.catch_warnings():  # a tall grid's tight layout gives up; savefig's bbox_inches="tight" fits it
            warnings.filterwarnings("ignore", "Tight layout not applied")
            if x.isna().any():  # named points (tasks, models): bars side by side
                grid = sns.catplot(data=part, x="x", y="p50", kind="bar", sharex=False, **facets, **panels)
            else:
                part = part.assign(x=x)
                if hue and part["hue"].notna().all() and \
                        (part.groupby(["series", "mode", "hue", "style"])["provider"].nunique() == 1).all():
                    part = part.assign(**{hue: part["hue"]})
                    facets["hue"] = hue
                    if style and (part["style"] != "").any():
                        part = part.assign(**{style: part["style"]})
                        facets["style"] = style
                points = dict(marker="o")
                if "style" not in facets and part[facets["hue"]].nunique() > len(sns.color_palette()):
                    # more lines than the palette has colours, whose neighbours then look alike: a marker each too
                    facets["style"], points = facets["hue"], dict(markers=True, dashes=False)
                grid = sns.relplot(data=part, x="x", y="p50", kind="line", **points, **facets, facet_kws=panels)
                # sizes span decades (log axis); training steps, and values a log axis cannot show, evenly
                if x_name != "step" and (x > 0).all():
                    _log_x_axis(grid, sorted(set(x)))
        # the values alone: "series = ... | mode = ..." runs into the next panel's title
        named = [name for name, used in (("{row_name}", (part["series"] != "").any()), ("{col_name}", by_mode)) if used]
        grid.set_titles(" · ".join(named))
        over = f" over {baseline}" if baseline else ""
        unit = part["unit"].iloc[0]
        y_label = f"{metric}{over}" + (f" ({unit})" if unit else "")  # older records' rows may lack one
        if grid.axes.shape[0] > 1:  # one label for the grid: a panel's own, longer than the panel, runs into the next
            grid.set(xlabel=x_name, ylabel="")
            grid.figure.supylabel(y_label)
        else:
            grid.set(xlabel=x_name, ylabel=y_label)
        if metric == "peak_memory":
            grid.set(yscale="log")
        grid.figure.suptitle(f"{task} · {metric}{over} · {title}", y=1.02)
        stem = f"{task}_{metric}_vs_{baseline}" if several and baseline else f"{task}_{metric}"
        path = out_dir / (f"{stem}_{card}.png" if card else f"{stem}.png")
        grid.savefig(path, dpi=90, bbox_inches="tight")
        matplotlib.pyplot.close(grid.figure)
        paths.append(path)
    return paths


def _log_x_axis(grid, points: list[float]) -> None:
    """A log x axis labelled as 4K or 1.5, not 4x10^3: as many ticks per decade as fit beside each other, and
    within a decade at the points themselves."""
    import matplotlib.ticker

    grid.set(xscale="log")
    decades = math.log10(points[-1] / points[0])
    locator = (matplotlib.ticker.FixedLocator(points[::math.ceil(len(points) / 5)]) if decades < 1
               else matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0) if decades <= 1.2 else
                                                 (1.0, 3.0) if decades <= 2.2 else (1.0,)))
    for ax in grid.axes.flat:
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_tick_label))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _tick_label(value: float, _position=None) -> str:
    for size, suffix in ((10**6, "M"), (10**3, "K")):
        if value >= size and value % size == 0:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


README_START, README_END = "<!-- results-table:start -->", "<!-- results-table:end -->"


def summary_table(by_paper: dict[str, list[Outcome]], links_from: Path) -> str:
    statuses = [REPRODUCED, WITHIN, NOT_REPRODUCED, NOT_COMPARABLE, OTHER_HARDWARE, NOT_RUN]
    lines = ["| Paper | Claims | " + " | ".join(statuses) + " |", "|---" * (len(statuses) + 2) + "|"]
    for paper, outcomes in by_paper.items():
        counts = [sum(o.status == s for o in outcomes) for s in statuses]
        lines.append(f"| {paper} | {len(outcomes)} | " + " | ".join(str(c) for c in counts) + " |")
    run = [o for outcomes in by_paper.values() for o in outcomes if o.status != NOT_RUN]
    if run:
        lines += ["", claims_table(run, links_from)]
    return "\n".join(lines)


def update_readme(readme: Path, table: str) -> bool:
    text = readme.read_text()
    pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        return False
    updated = pattern.sub(lambda _: f"{README_START}\n{table}\n{README_END}", text)
    replace_atomically(readme, lambda tmp: tmp.write_text(updated))
    return True


RETRACTED = "retracted.yaml"


Retraction = tuple[list[str] | None, dict, str]  # the metrics retracted (None: all), where (rows matching), why


def load_retracted(runs: Path) -> dict[str, list[Retraction]]:
    """RUNS/retracted.yaml: the records that a later fix showed to hold wrong rows, each with why. They stay in the
    repository as history; the report uses none of their rows (or, where an entry names `metrics`, none of those
    metrics' rows, and with `where` too, only those of its rows that match it; a list of such entries retracts
    each) and lists them. Keys are paths under RUNS, written without a packed record's `.gz`, or shell patterns
    of them (`flash_kernel/202611*`): a fix that touches every record made before it retracts them all in one
    entry. A record matched by several keys has the entries of each."""
    path = runs / RETRACTED
    if not path.is_file():
        return {}
    entries = load_yaml(path) or {}

    def parsed(value) -> Retraction | None:
        if isinstance(value, str) and value.strip():
            return None, {}, value
        if isinstance(value, dict) and {"metrics", "why"} <= set(value) <= {"metrics", "where", "why"} and \
                isinstance(value["why"], str) and isinstance(value.get("where", {}), dict) and \
                isinstance(value["metrics"], list) and value["metrics"] and all(isinstance(m, str)
                                                                                 for m in value["metrics"]):
            return value["metrics"], value.get("where", {}), value["why"]
        return None
    found = {key: [parsed(v) for v in (value if isinstance(value, list) else [value])]
             for key, value in entries.items()} if isinstance(entries, dict) else {}
    # each entry parsed; in a list of them, none retracts the whole record (that one stands alone)
    if not isinstance(entries, dict) or not all(isinstance(k, str) and v and all(v) and
                                                (len(v) == 1 or all(e[0] for e in v)) for k, v in found.items()):
        raise ValueError(f"{_rel(path)}: expected lines 'path/of/record.json: why it is retracted', or for some of "
                         "its rows 'path/of/record.json: {metrics: [metric, ...], where: {key: value}, why: ...}' "
                         "(where: optional), or a list of those")
    twice = sorted({key.removesuffix(".gz") for key in found if key.endswith(".gz") and key[:-3] in found})
    if twice:  # one would silently replace the other's entries
        raise ValueError(f"{_rel(path)} names {twice} both with and without .gz: give each record once, without .gz")
    return {key.removesuffix(".gz"): entry for key, entry in found.items()}


def _split_retracted(records: list[tuple[Path, RunRecord]], runs: Path, links_from: Path) \
        -> tuple[list, list[str], list[str]]:
    """(the records to use, one line per retraction for the report, the retraction list's problems: names that
    are no record, and entries that retract no row of any record their name matches, a typo in a metric or
    `where` as likely as not; a pattern's entry may well match no row of some of its records)."""
    # the list of the folder a report of one paper's or one task's subfolder is part of, which names its records
    # by their paths under that folder
    root = next((folder for folder in (runs, *runs.parents) if (folder / RETRACTED).is_file()), runs)
    retracted = load_retracted(root)
    keep, listed, seen, used = [], [], set(), set()
    for path, record in records:
        key = _record_key(path, root)
        matched = [name for name in retracted if fnmatch.fnmatchcase(key, name)]
        if not matched:
            keep.append((path, record))
            continue
        seen.update(matched)
        rows = record.rows
        for name in matched:
            for i, (metrics, where, why) in enumerate(retracted[name]):
                which = _retracted_rows(metrics, where) if metrics else "the whole record"
                listed.append(f"{_record_item(path, key, record, links_from)}, {which}: {why.strip()}")
                # against the record's own rows: another entry may have retracted the same rows first
                if not metrics or any(r.metric in metrics and _matches(r, where) for r in record.rows):
                    used.add((name, i))
                rows = [r for r in rows if metrics and (r.metric not in metrics or not _matches(r, where))]
        if rows:
            keep.append((path, dataclasses.replace(record, rows=rows)))
    under = runs.relative_to(root).as_posix()
    problems = [f"{RETRACTED} names {key}, which is no record under {_rel(root)}" for key in retracted
                if key not in seen and (under == "." or key.startswith(under + "/"))]
    problems += [f"{RETRACTED}: the entry of {key} for {_retracted_rows(metrics, where)} retracts no row of any "
                 "record it names" for key, entries in retracted.items() if key in seen
                 for i, (metrics, where, _) in enumerate(entries) if (key, i) not in used]
    return keep, listed, problems


def _retracted_rows(metrics: list[str], where: dict) -> str:
    return f"its rows of {', '.join(metrics)}" + "".join(f", {k}={v}" for k, v in where.items())


def build_report(runs: Path, published: Path, out: Path, readme: Path | None) -> tuple[str, list[str]]:
    """Write REPORT.md, the CSV of every row, the plots and the README's table; return the report and the
    problems met (files skipped, with why), as repository-relative messages."""
    papers = load_published(published)
    records, skipped = load_records(runs)
    records, retracted, unretracted = _split_retracted(records, runs, out)
    problems = [f"skipped {_rel(path)}: {why}" for path, why in skipped] + unretracted
    usable = [(path, record) for path, record in records if record.status in USABLE]
    unused = [_unused_line(path, record, runs, out) for path, record in records if record.status not in USABLE]
    by_card = {name: [evaluate_by_card(c, records) for c in claims] for name, (_, claims) in papers.items()}
    by_paper = {name: [outcomes[0] for outcomes in claims] for name, claims in by_card.items()}
    # the records' own dates, not the clock: the same records make the same report, so a rebuild changes nothing
    newest = max((r.started for _, r in usable), default="none")
    not_used = f" ({len(unused)} more not used, listed below)" if unused else ""
    parts = [f"# Published vs reproduced\n\nGenerated by `repro-report` from {len(usable)} run record(s) under "
             f"`{_rel(runs)}`{not_used}, the newest started {newest}. Ratios are measured against a baseline in the "
             "same run; absolute numbers are compared only on the same hardware, and a CPU record judges only the "
             "claims that name no hardware. Each claim is judged on each card that ran its task (first the card of "
             "the best record overall, which the README shows) from one record: the best scale, then a whole run "
             "before one cut short (killed, out of memory or unfinished: marked), then the claim's first provider, "
             "then the most of its points (failed ones included), then the newest; that record decides, a failure "
             "included.\n"]
    for name, claims in by_card.items():
        header = papers[name][0]
        parts.append(f"## {header.get('title', name)}\n\n`{name}` · {header.get('source', '')}\n\n"
                     f"{claims_table([o for outcomes in claims for o in outcomes], out)}\n")
    if retracted:
        parts.append(f"## Retracted records\n\nKept as history; what each line names is used for nothing above or "
                     f"below (`{_rel(runs / RETRACTED)}`):\n\n" + "\n".join(retracted) + "\n")
    if unused:
        parts.append("## Records not used\n\nRuns that ended in an error, which may be in the code that measured: "
                     "none of their rows is used above or below (the CSV keeps them, with their record_status):\n\n"
                     + "\n".join(unused) + "\n")
    if problems:
        parts.append("## Problems (files and entries not used)\n\n" + "\n".join(f"- {p}" for p in problems) + "\n")
    plots = []
    # drawn beside the old plots, moved in before the report that shows them is written, and the old ones that it
    # no longer shows removed only after: whatever step fails, the report on disk has all of its plots
    plots_dir = out / "report" / "plots"
    drawing = plots_dir.with_name("plots.drawing")
    shutil.rmtree(drawing, ignore_errors=True)
    to_plot = rows_to_plot(records)
    # disable=None: a bar on a terminal only, not in CI's log
    for (task, gpu_name), (rows, used) in tqdm(sorted(to_plot.items()), desc="plots", unit="task", disable=None):
        title = ", ".join(sorted({f"{r.gpu_name} {r.scale}" + (f" ({cut_short(r.status)})" if r.status != "ok" else "")
                                  for r in used}))
        metrics = sorted({m for r in used for m in plotted_metrics(r)})
        several_cards = sum(t == task for t, _ in to_plot) > 1
        plots += plot_rows(task, rows, title, drawing, metrics,
                           card=card_slug(gpu_name) if several_cards else "", lines=plotted_lines(used[0]))
    if plots:
        parts.append("## Plots\n\n" + "\n".join(f"![{p.stem}](report/plots/{p.name})" for p in plots) + "\n")
    report = "\n".join(parts)
    plots_dir.mkdir(parents=True, exist_ok=True)
    for plot in plots:
        plot.replace(plots_dir / plot.name)
    replace_atomically(out / "REPORT.md", lambda tmp: tmp.write_text(report))
    write_csv(records, out / "report" / "rows.csv.gz")
    if readme is not None and not update_readme(readme, summary_table(by_paper, readme.parent)):
        problems.append(f"{_rel(readme)} has no {README_START} … {README_END} markers; its table was not updated")
    drawn = {plot.name for plot in plots}
    for stale in plots_dir.glob("*.png"):
        if stale.name not in drawn:
            stale.unlink()
    shutil.rmtree(drawing, ignore_errors=True)
    return report, problems


def _record_key(path: Path, runs: Path) -> str:
    """A record's name in the report and the retraction list: its path under `runs`, without a packed record's .gz."""
    return path.relative_to(runs).as_posix().removesuffix(".gz")


def _record_item(path: Path, key: str, record: RunRecord, links_from: Path) -> str:
    """A list item naming a record: its `_record_key`, linked to `path`, card, scale."""
    return f"- [`{key}`]({_link(path, links_from)}) ({record.gpu_name}, {record.scale})"


def _unused_line(path: Path, record: RunRecord, runs: Path, links_from: Path) -> str:
    error = (record.error or "").strip().splitlines() or ["no error recorded"]
    why = error[0] if len(error[0]) <= 200 else error[0][:200] + "…"
    return f"{_record_item(path, _record_key(path, runs), record, links_from)}, ended in {record.status}: {why}"


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="repro-report", description=__doc__)
    parser.add_argument("--runs", type=Path, default=DEFAULT_RECORDS,
                        help="folder of run records (searched recursively)")
    parser.add_argument("--published", type=Path, default=PROJECT_ROOT / "results" / "published")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "results",
                        help="where REPORT.md, report/rows.csv.gz and report/plots/ go")
    parser.add_argument("--readme", default=None,
                        help="README whose results table is refreshed (default: the project's, when --runs and --out "
                             "are the defaults; else none); --readme '' leaves it alone")
    parser.add_argument("--allow-skipped", action="store_true",
                        help="exit 0 even when some records could not be used (they are still listed)")
    parser.add_argument("--pack-above-mb", type=float, default=None,
                        help="first gzip the records larger than this (NAME.json.gz); 0 packs none (default: "
                             f"{PACK_ABOVE_BYTES // 2**20} MB under the project's results/runs, whose records are "
                             "committed; none elsewhere, where a job's folder keeps its record.json)")
    args = parser.parse_args(argv)
    if args.readme is None:  # the project's table shows the committed records alone, not a report built elsewhere
        own = all(getattr(args, key).resolve() == parser.get_default(key) for key in ("runs", "out"))
        args.readme = str(PROJECT_ROOT / "README.md") if own else ""
    readme = Path(args.readme) if args.readme else None
    if args.pack_above_mb is None:
        # a packed record.json in outputs/ would no longer mark its job's folder as taken, nor be found by the summary
        # of its sweep
        committed = DEFAULT_RECORDS in (args.runs.resolve(), *args.runs.resolve().parents)
        args.pack_above_mb = PACK_ABOVE_BYTES / 2**20 if committed else 0
    try:
        load_published(args.published)  # a claims file that fails to load stops the build before records move
        if args.pack_above_mb > 0:
            for path in pack_records(args.runs, int(args.pack_above_mb * 2**20)):
                print(f"packed {_rel(path)}")
        _, problems = build_report(args.runs, args.published, args.out, readme)
    except (OSError, ValueError) as exc:
        print(f"repro-report: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"repro-report: {problem}", file=sys.stderr)
    plots = args.out / "report" / "plots"
    drawn = len(list(plots.glob("*.png")))  # what this build drew: it removes the plots it did not draw again
    # none drawn: records of smoke scale alone, or of tasks that name no metric to plot (`task.plot`), or whose
    # rows of those metrics all failed; this says which records count rather than guess which of these it was
    none = "no plots (drawn from small and paper records alone, of the metrics their task.plot names: none here)"
    print(f"wrote {_rel(args.out / 'REPORT.md')}, {_rel(args.out / 'report' / 'rows.csv.gz')}, "
          + (f"{drawn} plots in {_rel(plots)}" if drawn else none)
          + (f" and the table of {_rel(readme)}" if readme else ""))
    if problems and not args.allow_skipped:
        print(f"repro-report: {len(problems)} problem(s) above; --allow-skipped to accept them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
