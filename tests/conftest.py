import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (numpy, on the CPU). It must be chosen before any
# kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("EFFREPRO_AUTOTUNE", "0")  # correctness tests need no tuning, and every shape would get it
if not torch.cuda.is_available():
    # the tests' models and matrices are tiny: on a CPU a second thread only adds waiting, most of all when other
    # work shares the cores (measured several times slower on this project's two-core machines). The same holds
    # for the subprocesses the tests start (the CLI, torchrun, submitit's jobs): they read it from the environment.
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# Tests never reach a network or a hub, and never upload.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def option_names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


TASKS = option_names("task")
SCALES = option_names("scale")
PAPERS = option_names("paper")


@pytest.fixture
def compose():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import repro.cli  # noqa: F401 - registers the ${repro_root:} resolver

    def _compose(*overrides: str):
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            return hydra_compose("config", overrides=list(overrides), return_hydra_config=True)

    return _compose


@pytest.fixture
def refusal(compose):
    """The error a task's `validate` refuses a configuration with: what the command line prints, with exit status
    2, before any work. Many bad settings are checked so, a composition each (a run costs three): each task's
    tests still refuse one through the command line."""
    from repro.cli import load_task
    from repro.context import ConfigError

    def _refusal(*overrides: str) -> str:
        cfg = compose(*overrides)
        _, validate, _ = load_task(cfg.task.entry)
        with pytest.raises(ConfigError) as error:
            validate(cfg)
        return str(error.value)

    return _refusal


@pytest.fixture
def job_refusal(compose):
    """The error a job's checks (repro.cli.check_job: its task's validate, then the keys the job would not read)
    refuse the command line's `overrides` with, on a composed config: what the command line prints, exit status 2."""
    from repro.cli import check_job
    from repro.context import ConfigError

    def _job_refusal(*overrides: str) -> str:
        with pytest.raises(ConfigError) as error:
            check_job(compose(*overrides), overrides)
        return str(error.value)

    return _job_refusal


def run_repro(*args: str, timeout: float = 300, interpret: bool = False, fake_tasks: bool = False
              ) -> subprocess.CompletedProcess:
    """The real command line, in a subprocess, as a user would run it. Triton kernels are left out on a CPU
    (recorded as unsupported) unless `interpret`: the interpreter takes seconds per call. `fake_tasks` puts
    tests/ on the path, for `task.entry=fake_tasks:<name>`."""
    env = {**repro_env(fake_tasks), "PYTHONUNBUFFERED": "1"}
    if not interpret:
        env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "repro.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def repro_env(fake_tasks: bool = False) -> dict[str, str]:
    """This process's environment for a repro subprocess; `fake_tasks` puts tests/ on the path, for
    `task.entry=fake_tasks:<name>`."""
    env = dict(os.environ)
    if fake_tasks:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "tests"), env.get("PYTHONPATH")) if p)
    return env


def check_smoke_record(record: dict, out: str) -> None:
    """What every task's smoke run must give, whichever test runs it: an ok record at smoke scale with rows, a unit
    on every row, the environment, and the task's claims table on stdout (or a line saying it has none)."""
    from repro.claims import claims_for_task, load_published

    assert record["status"] == "ok" and record["scale"] == "smoke", record.get("error")
    assert record["rows"] and any(r["status"] == "ok" for r in record["rows"])
    assert all(r["unit"] is not None for r in record["rows"])
    assert record["env"]["torch"] and "git_sha" in record["env"]
    if claims_for_task(load_published(ROOT / "results" / "published"), record["task"]):
        assert record["claim_ids"] and "published" in out  # the claims table
    else:
        assert f"{record['task']} has no published claims" in out


def local_corpus(folder: Path, documents: list[str], **spec) -> SimpleNamespace:
    """`documents` written as folder/doc{i}.txt, and the data settings of a local corpus that reads them (a BPE
    tokenizer of 300 tokens, a fifth of the documents held out, unless `spec` says otherwise)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, document in enumerate(documents):
        (folder / f"doc{i}.txt").write_text(document)
    return SimpleNamespace(**{"source": "local", "folder": str(folder), "pattern": "*.txt", "max_files": None,
                              "tokenizer": "bpe", "vocab_size": 300, "val_fraction": 0.2, **spec})


def has_gpu() -> bool:
    return torch.cuda.is_available()


gpu = pytest.mark.skipif(not has_gpu(), reason="needs a CUDA GPU")
# Where the tests run our Triton kernels: the GPU where there is one, else the CPU (under TRITON_INTERPRET=1).
# A smoke run takes it as `scale.device=`, since the smoke scale runs on the CPU.
DEVICE = "cuda" if has_gpu() else "cpu"
# `rel_err` an attention kernel may have against the float64 reference (gradients: twice that), by dtype where the
# kernels run. The interpreter computes float32 in float32 (errors near 1e-7) and float16 near 3e-4; on a GPU
# flash_attn's float32 dot is tf32 (METHOD.md: near 3e-4, more over long reductions), and bf16 keeps 8 bits.
ATTENTION_TOL = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2} if DEVICE == "cuda" else \
    {torch.float32: 1e-5, torch.float16: 1.5e-3}
# decode_attention's (and over a quantized cache): its float32 products are float32 on a GPU too (input_precision
# "ieee"), so float32's bound is the interpreter's there as well, which a fallback to tf32 (near 3e-4) fails
DECODE_TOL = {**ATTENTION_TOL, torch.float32: 1e-5}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖, in float64 (`want` is the float64 reference)."""
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def run_inline(*args: str):
    """The command line in this process (no interpreter start-up, no Triton kernels unless TRITON_INTERPRET):
    for the engine's own behaviour, quickly. Returns (exit status, stdout, stderr)."""
    import contextlib
    import io

    import repro.cli

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["repro", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            repro.cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()
