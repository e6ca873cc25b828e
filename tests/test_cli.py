"""The real command line in a subprocess: every task's smoke run once, as a user types it. Launchers and
signals are in test_launchers.py (a file of their own, so that the two spread over the test workers); the
engine's other behaviour is tested in this process (test_engine.py), which is much quicker."""
import json
from pathlib import Path

import pytest

from conftest import ROOT, TASKS, run_repro
from repro.claims import claims_for_task, load_published

pytestmark = pytest.mark.slow
MODEL_TASKS = ["lm_eval", "scissorhands_kv", "compress_then_prompt"]  # they take model=tiny_llama here


def load(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Every task's smoke run through the real command line, as multiruns: one process for the tasks that take
    a pretrained model (with model=tiny_llama), one for the rest, so the start-up is paid twice, not per task."""
    records = {}
    for group, tasks, extra in (("models", MODEL_TASKS, ["model=tiny_llama"]),
                                ("others", [t for t in TASKS if t not in MODEL_TASKS], [])):
        folder = tmp_path_factory.mktemp(group)
        out = run_repro("-m", f"task={','.join(tasks)}", "logger=none", f"hydra.sweep.dir={folder}",
                        f"paths.records={folder}/runs", f"paths.outputs={folder}/outputs", *extra, timeout=900)
        for path in folder.glob("*/record.json"):
            record = load(path)
            records[record["task"]] = (record, out, folder)
    return records


@pytest.mark.parametrize("task", TASKS)
def test_smoke_run_of_every_task_writes_an_ok_record(task, smoke_runs):
    assert task in smoke_runs, "no record"
    record, out, folder = smoke_runs[task]
    assert record["status"] == "ok" and record["scale"] == "smoke", record.get("error")
    assert record["rows"] and any(r["status"] == "ok" for r in record["rows"])
    assert all(r["unit"] is not None for r in record["rows"])
    assert record["env"]["torch"] and "git_sha" in record["env"]
    assert not (folder / "runs").exists(), "smoke runs must not write records to commit"
    if claims_for_task(load_published(ROOT / "results" / "published"), task):
        assert record["claim_ids"] and "published" in out.stdout  # the claims table
    else:
        assert f"{task} has no published claims" in out.stdout
