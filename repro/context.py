"""What a job knows about where it runs: device, seed, environment, output folder."""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import platform
import random
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECORDS = PROJECT_ROOT / "results" / "runs"  # conf/config.yaml's paths.records


class ConfigError(ValueError):
    """Bad input from the user, reported as one clear line and a non-zero exit."""


@dataclass
class RunContext:
    device: torch.device
    scale: str
    seed: int
    output_dir: Path
    env: dict[str, Any]


def world() -> tuple[int, int]:
    """(rank, world size): torchrun sets RANK and WORLD_SIZE; a plain run is rank 0 of 1."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def fingerprint(settings: Any) -> str:
    """A short stable digest of JSON-able settings: for cache keys and for matching checkpoints to runs."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _head() -> str | None:
    """The commit of the project's own git repository; None where it has none (a copy of the tree, even one that
    lies inside another repository)."""
    found = _git("rev-parse", "--show-toplevel", "HEAD")
    if found is None:
        return None
    top, _, commit = found.partition("\n")
    return commit if Path(top).resolve() == PROJECT_ROOT.resolve() else None


def code_version() -> str | None:
    """The commit the code runs from: git's, or where the tree has no git of its own (a copy of it on a lent GPU
    machine), the one REPRO_GIT_SHA names. A REPRO_GIT_SHA that git contradicts is left over from elsewhere (an
    exported variable): git's commit is taken, with a warning."""
    told, commit = os.environ.get("REPRO_GIT_SHA") or None, _head()
    if commit is None:
        return told
    if told and not commit.startswith(told):
        warnings.warn(f"REPRO_GIT_SHA={told} is not the commit of this checkout, {commit}, which is recorded "
                      "instead; REPRO_GIT_SHA is for a copy of the tree without git", stacklevel=2)
    return commit


RECORDED_PACKAGES = ("transformers", "peft", "accelerate", "datasets", "lm_eval", "hydra-core", "flash-attn",
                     "megatron-core")


def _package_versions() -> dict[str, str]:
    """The installed versions of the libraries a task may measure against or run on (baselines, loaders)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in RECORDED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def _dirty(records: Path) -> bool | None:
    """Whether the tree differs from its commit (None where it has no git of its own to tell): an untracked file
    (a new task module) is code the commit lacks. The records folder is left out: the records a sweep's earlier
    jobs wrote there are not code, and would mark its later jobs dirty."""
    if _head() is None:
        return None
    paths = ["."]
    with contextlib.suppress(ValueError):  # (a records folder outside the tree is not seen anyway)
        paths.append(f":(exclude){records.resolve().relative_to(PROJECT_ROOT)}")
    status = _git("status", "--porcelain", "--", *paths)
    return None if status is None else bool(status)


def capture_environment(on_gpu: bool = True, records: Path = DEFAULT_RECORDS) -> dict[str, Any]:
    """The code, versions and machine of a run; the GPU's name and properties only where the run uses it (a CPU
    run on a GPU machine is a CPU record, named and reported as one). `records` is where run records are
    written (`paths.records`)."""
    import triton

    env: dict[str, Any] = {
        "git_sha": code_version(),
        "git_dirty": _dirty(records),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "packages": _package_versions(),
        "argv": sys.argv[1:],  # the whole command: launcher and sweep choices too, which the overrides leave out
        "world_size": world()[1],
        "gpu_name": None,
        "gpu_count": 0,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "time": utc_now(),
        # the suite's switches (EFFREPRO_GLUON, EFFREPRO_AUTOTUNE, ...) change which kernels run
        "switches": {name: value for name, value in sorted(os.environ.items()) if name.startswith("EFFREPRO_")},
    }
    if on_gpu and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu_name=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            gpu_sm_count=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
        )
    return env


def available_cores() -> int:
    """The cores this process may run on (a cgroup or SLURM limit included, where the OS tells)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_device(scale_cfg) -> None:
    """The scale's device is one this machine has."""
    if scale_cfg.device not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"scale.device={scale_cfg.device!r} is not one of: cpu, cuda, auto")
    if scale_cfg.device == "cuda" and not torch.cuda.is_available():
        # the device is the scale's own (small, paper) or the user's choice (smoke's is the CPU)
        smoke = "" if scale_cfg.name == "smoke" else " (or scale=smoke)"
        raise ConfigError(f"scale.device='cuda' (scale={scale_cfg.name}) needs a CUDA GPU and this machine has none; "
                          f"run on the CPU here with scale.device=cpu{smoke}, or launch on a GPU machine")


def resolve_device(scale_cfg) -> torch.device:
    """The scale's device; a GPU-only scale on a machine without one fails here, before any work."""
    check_device(scale_cfg)
    wanted, has_gpu = scale_cfg.device, torch.cuda.is_available()
    if wanted == "auto":
        wanted = "cuda" if has_gpu else "cpu"
    if wanted == "cuda" and world()[1] > 1:  # under torchrun: this rank's own GPU
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        index = local_rank if local_rank < torch.cuda.device_count() else 0  # a GPU a rank, by CUDA_VISIBLE_DEVICES
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(wanted)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def reset_device_memory(device: torch.device) -> None:
    """Hydra's default launcher runs every job of a sweep in one process: start each from a clean slate so
    that peak-memory numbers belong to this job alone."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
