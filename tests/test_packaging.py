"""transformers depends on Hugging Face's kernel-hub client, a top-level package called `kernels`: our kernels
live under a name of their own, and both import side by side. And what pyproject.toml installs is what the code
imports."""
import importlib.metadata
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_our_kernels_package_is_the_one_in_this_repository():
    origin = Path(importlib.util.find_spec("effrepro_kernels").origin).resolve()
    assert origin == ROOT / "effrepro_kernels" / "__init__.py"


def test_a_transformers_model_runs_beside_our_kernels_and_the_hub_client():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from effrepro_kernels import flash_attn  # noqa: F401

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=50, n_positions=16))
    out = model(torch.randint(0, 50, (2, 16)), labels=torch.randint(0, 50, (2, 16)))
    assert torch.isfinite(out.loss)


def test_every_runtime_dependency_is_imported_by_the_installed_packages():
    """pytest-benchmark was installed with the project from its first commit and never used."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    imported = {name for package in ("repro", "tasks", "effrepro_kernels") for path in (ROOT / package).rglob("*.py")
                for name in re.findall(r"^\s*(?:import|from)\s+(\w+)", path.read_text(), re.M)}
    modules_of = {}  # a distribution's name, as pyproject spells it, to the top-level modules it installs
    for module, distributions in importlib.metadata.packages_distributions().items():
        for distribution in distributions:
            modules_of.setdefault(re.sub(r"[-_.]+", "-", distribution).lower(), set()).add(module)
    unused = [requirement for requirement in declared
              if not modules_of.get(re.match(r"[\w.-]+", requirement)[0].lower(), set()) & imported]
    assert not unused, f"declared in pyproject.toml but imported nowhere in the packages: {unused}"
