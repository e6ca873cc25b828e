"""The real command line: every task's smoke run once, as a user types it. Launchers and signals are in
test_launchers.py (a file of their own, so that the two spread over the test workers); the engine's other
behaviour is tested in this process (test_engine.py), which is much quicker."""
import json
from pathlib import Path

import pytest

from conftest import TASKS, check_smoke_record, run_inline, run_repro

pytestmark = pytest.mark.slow
MODEL_TASKS = ["lm_eval", "scissorhands_kv"]  # they take model=tiny_llama here
# Their own test files (test_greenformers.py, test_compress_then_prompt.py) run this same smoke run in their
# process and check it with check_smoke_record: running it here again would only repeat the work.
SMOKE_ELSEWHERE = ["greenformers", "compress_then_prompt"]


def load(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Every other task's smoke run as a multirun: through the real command line in a subprocess, but for the
    tasks that take a pretrained model (with model=tiny_llama), which run in this process: a second interpreter
    start-up would cost more than they do. Our kernels are left out in both, as on a CPU without TRITON_INTERPRET."""
    def sweep(group, tasks, *extra):
        folder = tmp_path_factory.mktemp(group)
        return folder, ["-m", f"task={','.join(tasks)}", "logger=none", f"hydra.sweep.dir={folder}",
                        f"paths.records={folder}/runs", f"paths.outputs={folder}/outputs", *extra]

    folder, args = sweep("others", [t for t in TASKS if t not in MODEL_TASKS and t not in SMOKE_ELSEWHERE])
    runs = [(folder, run_repro(*args, timeout=900).stdout)]
    folder, args = sweep("models", MODEL_TASKS, "model=tiny_llama")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("effrepro_kernels.runtime.INTERPRET", False)
        runs.append((folder, run_inline(*args)[1]))
    return {load(path)["task"]: (load(path), out, folder)
            for folder, out in runs for path in folder.glob("*/record.json")}


@pytest.mark.parametrize("task", [t for t in TASKS if t not in SMOKE_ELSEWHERE])
def test_smoke_run_of_every_task_writes_an_ok_record(task, smoke_runs):
    assert task in smoke_runs, "no record"
    record, out, folder = smoke_runs[task]
    check_smoke_record(record, out)
    assert not (folder / "runs").exists(), "smoke runs must not write records to commit"
