"""The real command line in a subprocess: every task's smoke run once, as a user types it. Launchers and
signals are in test_launchers.py (a file of their own, so that the two spread over the test workers); the
engine's other behaviour is tested in this process (test_engine.py), which is much quicker."""
import json
from pathlib import Path

import pytest

from conftest import TASKS, check_smoke_record, run_repro

pytestmark = pytest.mark.slow
MODEL_TASKS = ["lm_eval", "scissorhands_kv"]  # they take model=tiny_llama here
# Their own test files (test_greenformers.py, test_compress_then_prompt.py) run this same smoke run in their
# process and check it with check_smoke_record: running it here again would only repeat the work.
SMOKE_ELSEWHERE = ["greenformers", "compress_then_prompt"]


def load(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Every other task's smoke run through the real command line, as multiruns: one process for the tasks that
    take a pretrained model (with model=tiny_llama), one for the rest, so the start-up is paid twice, not per task."""
    records = {}
    others = [t for t in TASKS if t not in MODEL_TASKS and t not in SMOKE_ELSEWHERE]
    for group, tasks, extra in (("models", MODEL_TASKS, ["model=tiny_llama"]), ("others", others, [])):
        folder = tmp_path_factory.mktemp(group)
        out = run_repro("-m", f"task={','.join(tasks)}", "logger=none", f"hydra.sweep.dir={folder}",
                        f"paths.records={folder}/runs", f"paths.outputs={folder}/outputs", *extra, timeout=900)
        for path in folder.glob("*/record.json"):
            record = load(path)
            records[record["task"]] = (record, out, folder)
    return records


@pytest.mark.parametrize("task", [t for t in TASKS if t not in SMOKE_ELSEWHERE])
def test_smoke_run_of_every_task_writes_an_ok_record(task, smoke_runs):
    assert task in smoke_runs, "no record"
    record, out, folder = smoke_runs[task]
    check_smoke_record(record, out.stdout)
    assert not (folder / "runs").exists(), "smoke runs must not write records to commit"

