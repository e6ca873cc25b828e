"""Every `repro` command the READMEs and `repro --help` show composes, each value of a sweep too, and where it needs
neither the Hub nor a GPU, passes its job's checks: a renamed key or group would otherwise leave the guide's
commands broken."""
import itertools
import os
import re
import shlex
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import CONF, ROOT

READMES = [ROOT / "README.md", *sorted((ROOT / "tasks").glob("*/README.md"))]
# what a validate refuses on a machine without a GPU or the Hub, which the tests run on
NEEDS_GPU_OR_HUB = {"scale=paper", "model=hf", "model=trained"}


def readme_commands(readme: Path) -> list[list[str]]:
    """The overrides of each `repro` (or `torchrun ... -m repro.cli`) line of the README's bash blocks."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), re.S):
        for line in block.splitlines():
            words = shlex.split(os.path.expandvars(line), comments=True)
            if "repro.cli" in words:
                words = words[words.index("repro.cli"):]
            if words and words[0] in ("repro", "repro.cli"):
                commands.append([word for word in words[1:] if "=" in word])  # not -m, --cfg job or `...`
    return commands


def help_commands() -> list[list[str]]:
    """The overrides of each example of `repro --help` (conf/config.yaml) that has no <placeholder>."""
    template = OmegaConf.load(CONF / "config.yaml").hydra.help.template
    examples = [re.split(r"\s{2,}", line.strip())[0] for line in template.splitlines()]  # less its description
    return [[word for word in shlex.split(example)[1:] if "=" in word] for example in examples
            if example.startswith("repro ") and "<" not in example]


def jobs(overrides: list[str]) -> list[list[str]]:
    """A sweep's jobs, as Hydra's basic sweeper makes them: one per combination of the swept values."""
    choices = [[f"{o.key_or_group}={value}" for value in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in OverridesParser.create().parse_overrides(overrides)]
    return [list(job) for job in itertools.product(*choices)]


COMMANDS = [(readme.relative_to(ROOT).as_posix(), overrides) for readme in READMES
            for overrides in readme_commands(readme)] + [("repro --help", o) for o in help_commands()]


def test_the_readmes_show_commands():
    assert sum(readme == "README.md" for readme, _ in COMMANDS) >= 8, COMMANDS
    assert any(readme == "repro --help" for readme, _ in COMMANDS), COMMANDS


@pytest.mark.parametrize("overrides", [o for _, o in COMMANDS], ids=[f"{r}: {' '.join(o)}" for r, o in COMMANDS])
def test_a_readme_command_composes_and_passes_validate(compose, overrides):
    from repro.cli import check_job
    for job in jobs(overrides):
        cfg = compose(*job)
        if not NEEDS_GPU_OR_HUB & set(job):
            check_job(cfg, job)  # its task's validate, and no key given that the job would not read
