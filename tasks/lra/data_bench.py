"""How fast the generated LRA datasets can be made (task lra_data): examples per second on one core and on
every core of this machine, per generator setting, and the hours the paper-size sets would take here."""
from __future__ import annotations

from typing import Iterator

from omegaconf import DictConfig, OmegaConf

from repro.context import ConfigError, RunContext, available_cores
from repro.records import Row

from .data import CHUNK, generation_rate, generator_params

# LRA's generated sets: ListOps 96K training expressions; Pathfinder (and Path-X, Path-256) 200K images in all
# (160K of them training).
FULL_SET = {"listops": 96_000, "pathfinder": 200_000}


def _label(task: str, params: dict) -> str:
    return f"pathfinder-{params['size']}-{params['difficulty']}" if task == "pathfinder" else task


def run(cfg: DictConfig, ctx: RunContext) -> Iterator[Row]:
    spec = cfg.lra_data
    settings = [OmegaConf.to_container(s) for s in spec.settings]
    for setting in settings:
        task = setting.pop("task", None)
        try:
            params = generator_params(task, setting)  # names the bad task, size or difficulty
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"lra_data.settings: {exc}") from exc
        for workers in sorted({1, available_cores()}):
            n = max(spec.examples_per_worker, CHUNK) * workers  # at least a chunk each, or some workers would idle
            rate = generation_rate(task, n, spec.seed, workers, **params)
            extra = dict(task=task, **params, examples=n, series=task)
            yield Row(_label(task, params), "workers", workers, "examples_per_s", "examples/s", rate, n=1,
                      extra=extra)
            yield Row(_label(task, params), "workers", workers, "hours_for_full_set", "h",
                      FULL_SET[task] / rate / 3600, n=1, extra={**extra, "full_set": FULL_SET[task]})
