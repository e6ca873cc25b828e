"""How fast the generated LRA datasets can be made (task lra_data): examples per second on one core and on
every core of this machine, per generator setting, and the hours the paper-size sets would take here."""
from __future__ import annotations

from typing import Iterator

from omegaconf import DictConfig, OmegaConf

from repro import checks
from repro.context import ConfigError, RunContext, available_cores
from repro.records import Row

from .data import CHUNK, generation_rate, generator_params

# LRA's generated sets: ListOps 96K training expressions; Pathfinder (and Path-X, Path-256) 200K images in all
# (160K of them training).
FULL_SET = {"listops": 96_000, "pathfinder": 200_000}


def _label(task: str, params: dict) -> str:
    return f"pathfinder-{params['size']}-{params['difficulty']}" if task == "pathfinder" else task


def _setting(key: str, setting) -> tuple[str, dict]:
    """A setting's generator and its parameters, completed with the generator's defaults."""
    checks.mapping(key, setting, "a generator's settings, such as {task: pathfinder, size: 32}")
    params = OmegaConf.to_container(setting)
    task = params.pop("task", None)
    try:
        return task, generator_params(task, params)  # names the bad task, size, difficulty or length
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: {exc}") from None


def validate(cfg: DictConfig) -> None:
    """Every setting, before any is measured: a bad one last in the list was refused only after the others ran."""
    spec = cfg.lra_data
    checks.number("lra_data.seed", spec.seed, at_least=0)
    checks.number("lra_data.examples_per_worker", spec.examples_per_worker, at_least=1)
    for i, setting in enumerate(checks.axis("lra_data.settings", spec.settings)):
        _setting(f"lra_data.settings[{i}]", setting)


def run(cfg: DictConfig, ctx: RunContext) -> Iterator[Row]:
    spec = cfg.lra_data
    for i, setting in enumerate(spec.settings):
        task, params = _setting(f"lra_data.settings[{i}]", setting)
        for workers in sorted({1, available_cores()}):
            n = max(spec.examples_per_worker, CHUNK) * workers  # at least a chunk each, or some workers would idle
            rate = generation_rate(task, n, spec.seed, workers, **params)
            extra = dict(task=task, **params, examples=n, series=task)
            yield Row(_label(task, params), "workers", workers, "examples_per_s", "examples/s", rate, n=1,
                      extra=extra)
            yield Row(_label(task, params), "workers", workers, "hours_for_full_set", "h",
                      FULL_SET[task] / rate / 3600, n=1, extra={**extra, "full_set": FULL_SET[task]})
