"""Task pregated_moe: the paper's serving comparison (serving.py: four strategies of fetching experts from host
memory, over model sizes, expert counts and batches) and the quality of pre-gating at small scale (quality.py: the
same small MoE language model trained with ordinary gates and with pre-gates). `parts` chooses which run."""
from __future__ import annotations

from typing import Iterator

from repro import checks
from repro.checks import as_list
from repro.context import RunContext
from repro.records import Row

from . import quality, serving

PARTS = ("serving", "quality")


def validate(cfg) -> None:
    parts = checks.choices("parts", cfg.parts, PARTS)
    if "serving" in parts:
        serving.validate(cfg.moe)
    if "quality" in parts:
        quality.validate(cfg)


def unread_keys(cfg) -> dict[str, str]:
    parts = as_list(cfg.parts)
    return checks.unread_unless_chosen({"moe": ["serving"], "quality": ["quality"], "train": ["quality"],
                                        "data": ["quality"]}, parts, f"parts={parts}")


def run(cfg, ctx: RunContext) -> Iterator[Row]:
    parts = list(as_list(cfg.parts))
    if "serving" in parts:
        yield from serving.run(cfg.moe, ctx, cfg.seed)
    if "quality" in parts:
        yield from quality.run(cfg, ctx)
