import json
import os
import subprocess
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from repro.records import (Row, RunRecord, committed_copy, load_record, load_records, pack_records, save_new_record,
                           save_record, write_json_atomic)


def make_record(**changes) -> RunRecord:
    fields = dict(task="flash_kernel", paper="flashattention", scale="small", claim_ids=["c1"],
                  config={"kernel": {"seq_len": [1024]}}, overrides=["scale=small"],
                  env={"gpu_name": "NVIDIA H100 80GB HBM3", "torch": "2.11.0"}, started="2026-11-26T10:00:00+00:00",
                  status="ok", rows=[Row("standard", "seq_len", 1024, "time", "ms", 2.0, 1.9, 2.1, 50,
                                         extra={"mode": "fwd"}),
                                     Row("sdpa_flash", "seq_len", 1024, "time", "ms", status="oom", message="OOM")])
    fields.update(changes)
    return RunRecord(**fields)


def test_round_trip(tmp_path):
    record = make_record()
    save_record(record, tmp_path / "r.json")
    assert load_record(tmp_path / "r.json") == record
    assert oct((tmp_path / "r.json").stat().st_mode & 0o777) == oct(0o644)


def test_a_run_that_began_in_the_same_second_as_another_gets_a_record_of_its_own(tmp_path):
    """Two runs of one task, scale and card started in the same second (two GPUs of one node, say) would share a
    committed record's name: the second takes the first free name, past packed records too, never the first's."""
    path = tmp_path / "paper" / "task" / "20261126T100000_small_nvidia-h100.json"
    first, second = make_record(status="ok"), make_record(status="killed", overrides=["scale=small", "seed=2"])
    assert save_new_record(first, path) == path
    (path.parent / "20261126T100000_small_nvidia-h100_dup2.json.gz").write_bytes(b"")  # _dup2 was packed
    assert save_new_record(second, path) == path.parent / "20261126T100000_small_nvidia-h100_dup3.json"
    assert load_record(path).status == "ok"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    # a sweep's summary finds each run's own record among them
    assert committed_copy(first, path) == path
    assert committed_copy(second, path) == path.parent / "20261126T100000_small_nvidia-h100_dup3.json"
    assert committed_copy(make_record(started="2026-11-26T10:00:01+00:00"), path) is None


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_name_taken_after_it_was_seen_free_is_not_written_over(tmp_path, monkeypatch, hard_links):
    """Two runs ending together both find the name free; the one that takes it second must take the next (the
    test above never reaches the taking: the name is seen taken first)."""
    if not hard_links:
        monkeypatch.setattr(os, "link", lambda source, target: (_ for _ in ()).throw(OSError(95, "not supported")))
    monkeypatch.setattr("repro.records._taken", lambda target: False)  # another run took it since the look
    path = tmp_path / "r.json"
    assert save_new_record(make_record(status="ok"), path) == path
    assert save_new_record(make_record(status="killed"), path) == tmp_path / "r_dup2.json"
    assert load_record(path).status == "ok" and load_record(tmp_path / "r_dup2.json").status == "killed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r_dup2.json"]  # no temporary file left


def test_a_record_is_saved_where_the_filesystem_has_no_hard_links(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(95, "Operation not supported")
    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "r.json"
    assert save_new_record(make_record(), path) == path and load_record(path) == make_record()
    assert save_new_record(make_record(), path) == tmp_path / "r_dup2.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r_dup2.json"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


@pytest.mark.parametrize("killed_in", ["fsync", "replace"])  # writing the temporary file, or renaming it
def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch, killed_in):
    path = tmp_path / "r.json"
    save_record(make_record(), path)
    before = path.read_text()

    def crash(*_):
        raise KeyboardInterrupt  # the run is killed in the middle of writing

    monkeypatch.setattr(os, killed_in, crash)
    with pytest.raises(KeyboardInterrupt):
        save_record(make_record(status="error"), path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"], "temporary file left behind"


def test_rows_reject_unknown_status_and_non_finite_values():
    with pytest.raises(ValueError, match="status"):
        Row("p", "x", 1, "time", "ms", status="maybe")
    with pytest.raises(ValueError, match="finite"):
        Row("p", "x", 1, "time", "ms", p50=float("nan"))


def test_load_records_skips_corrupt_and_foreign_files_by_name(tmp_path):
    save_record(make_record(), tmp_path / "good.json")
    (tmp_path / "truncated.json").write_text('{"schema_version": 1, "task": ')
    write_json_atomic(tmp_path / "foreign.json", {"hello": "world"})
    write_json_atomic(tmp_path / "future.json", {**make_record().to_json(), "schema_version": 99})
    good = make_record().to_json()
    write_json_atomic(tmp_path / "unknown_row_key.json", {**good, "rows": [{**good["rows"][0], "colour": "red"}]})
    write_json_atomic(tmp_path / "rows_not_objects.json", {**good, "rows": [1, 2]})
    write_json_atomic(tmp_path / "started_null.json", {**good, "started": None})
    write_json_atomic(tmp_path / "text_p50.json", {**good, "rows": [{**good["rows"][0], "p50": "fast"}]})
    write_json_atomic(tmp_path / "extra_list.json", {**good, "rows": [{**good["rows"][0], "extra": [1]}]})
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    # fields the report groups or names rows by, each refused naming it (they stopped the report with a traceback)
    nested = {"x_list.json": ({"x_value": [1024, 2048]}, "rows[0].x_value=[1024, 2048]"),
              "series_list.json": ({"extra": {"series": ["a"]}}, "rows[0].extra.series=['a']"),
              "mode_object.json": ({"extra": {"mode": {"fwd": 1}}}, "rows[0].extra.mode={'fwd': 1}"),
              "provider_number.json": ({"provider": 7}, "rows[0].provider is int")}
    for name, (change, _) in nested.items():
        write_json_atomic(tmp_path / name, {**good, "rows": [{**good["rows"][0], **change}]})
    write_json_atomic(tmp_path / "gpu_number.json", {**good, "env": {"gpu_name": 7}})
    nested["gpu_number.json"] = ({}, "env.gpu_name=7")
    # a point named among numbers of one x_name, which the report sorts; the config's parts that the report reads
    named = {**good["rows"][0], "x_value": "full"}
    write_json_atomic(tmp_path / "x_mixed.json", {**good, "rows": [good["rows"][0], named]})
    nested["x_mixed.json"] = ({}, "rows[1].x_value='full' is text, where rows[0].x_value of x_name 'seq_len' is "
                                  "a number")
    write_json_atomic(tmp_path / "task_text.json", {**good, "config": {"task": "bench"}})
    nested["task_text.json"] = ({}, "config.task is str, not an object or null")
    write_json_atomic(tmp_path / "model_name_number.json", {**good, "config": {"model": {"name": 7}}})
    nested["model_name_number.json"] = ({}, "config.model.name=7 is not a string or null")
    # the report reads a failed record's error as text (an int was an AttributeError), and orders records by scale
    fields = {"error_number.json": ({"error": 3}, "error is int, not str or null"),
              "finished_list.json": ({"finished": ["today"]}, "finished is list, not str or null"),
              "status_unknown.json": ({"status": "done"}, "run status 'done' is not one of"),
              "scale_unknown.json": ({"scale": "huge"}, "run scale 'huge' is not one of ('smoke', 'small', 'paper')")}
    for name, (change, _) in fields.items():
        write_json_atomic(tmp_path / name, {**good, **change})
    nested.update(fields)
    records, problems = load_records(tmp_path)
    assert [p.name for p, _ in records] == ["good.json"]
    skipped = sorted(path.name for path, why in problems)
    assert skipped == sorted(["truncated.json", "foreign.json", "future.json", "unknown_row_key.json",
                              "rows_not_objects.json", "started_null.json", "text_p50.json", "extra_list.json",
                              "binary.json", *nested])
    assert all(why for _, why in problems)
    why = {path.name: why for path, why in problems}
    assert all(field in why[name] for name, (_, field) in nested.items())


def test_load_records_takes_an_outputs_folder_whose_jobs_saved_files_beside_their_records(tmp_path):
    """A job folder's subfolders hold what the job saved (compress_then_prompt's prompts: PEFT's adapter_config.json
    and effrepro_prompt.json), which a report of `outputs/` named as problems and exited 1 for."""
    job = tmp_path / "compress_then_prompt" / "smoke" / "2026-12-07_21-23-37"
    save_record(make_record(), job / "record.json")
    write_json_atomic(job / "prompts" / "joint_8x" / "adapter_config.json", {"peft_type": "PROMPT_TUNING"})
    write_json_atomic(tmp_path / "stray.json", {"hello": "world"})  # beside no record: still named
    write_json_atomic(job / "foreign.json", {"hello": "world"})  # in the job's own folder too
    records, problems = load_records(tmp_path)
    assert [p.relative_to(tmp_path) for p, _ in records] == [job.relative_to(tmp_path) / "record.json"]
    assert sorted(p.name for p, _ in problems) == ["foreign.json", "stray.json"]
    # a report packs a record over its threshold (`pack_records`): the job's files are still its own
    assert pack_records(tmp_path, above_bytes=0) == [job / "record.json.gz"]
    records, problems = load_records(tmp_path)
    assert [p.name for p, _ in records] == ["record.json.gz"]
    assert sorted(p.name for p, _ in problems) == ["foreign.json", "stray.json"]


def test_large_records_are_packed_and_still_load(tmp_path):
    """`pack_records` gzips the records above its size beside themselves and removes the plain files; it leaves
    the small ones and files that are not records; `load_records` reads both kinds."""
    rows = [Row("lean", "context", n, "time", "ms", 1.0 + n, 1.0, 2.0, 5) for n in range(2000)]
    big, small = make_record(rows=rows, started="2026-11-27T10:00:00+00:00"), make_record()
    save_record(big, tmp_path / "paper" / "task" / "big.json")
    save_record(small, tmp_path / "paper" / "task" / "small.json")
    (tmp_path / "paper" / "foreign.json").write_text("x" * 200_000)
    packed = pack_records(tmp_path, above_bytes=100_000)
    assert [p.relative_to(tmp_path).as_posix() for p in packed] == ["paper/task/big.json.gz"]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["big.json.gz", "foreign.json", "small.json"]
    records, problems = load_records(tmp_path)
    assert [r for _, r in records] == [small, big] and [p.name for p, _ in problems] == ["foreign.json"]
    assert pack_records(tmp_path, above_bytes=100_000) == []  # packed once
    # a packing stopped after writing the .gz, before removing the plain file: the record is read once
    save_record(big, tmp_path / "paper" / "task" / "big.json")
    assert [r for _, r in load_records(tmp_path)[0]] == [small, big]


def test_records_are_compact_and_one_row_per_line(tmp_path):
    save_record(make_record(), tmp_path / "r.json")
    lines = (tmp_path / "r.json").read_text().splitlines()
    assert sum(line.lstrip().startswith('{"provider"') for line in lines) == 2
    json.loads((tmp_path / "r.json").read_text())


TOLD = "69dc6e6f33fa6e125c63f4b8be7e277b8d0cba8c"


@pytest.mark.parametrize("where", ["no git", "inside another repository"])
def test_a_copy_of_the_tree_without_git_records_the_commit_told_through_the_environment(where, tmp_path, monkeypatch):
    """As on a lent GPU machine: whether the copy was edited is not known. A repository the copy lies in is not
    its own, and says nothing of it."""
    from repro.context import capture_environment
    copy = (git_project(tmp_path) if where == "inside another repository" else tmp_path) / "copy"
    copy.mkdir()
    monkeypatch.setattr("repro.context.PROJECT_ROOT", copy)
    monkeypatch.setenv("REPRO_GIT_SHA", TOLD)
    env = capture_environment(records=copy / "results" / "runs")
    assert env["git_sha"] == TOLD and env["git_dirty"] is None


def test_a_commit_told_through_the_environment_that_git_contradicts_is_not_recorded(tmp_path, monkeypatch):
    """A stale exported REPRO_GIT_SHA mislabelled every record of a checkout with its git."""
    from repro.context import capture_environment
    project = git_project(tmp_path)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr("repro.context.PROJECT_ROOT", project)
    monkeypatch.setenv("REPRO_GIT_SHA", TOLD)
    with pytest.warns(UserWarning, match=f"REPRO_GIT_SHA={TOLD} is not the commit of this checkout, {head}"):
        env = capture_environment(records=project / "results" / "runs")
    assert env["git_sha"] == head and env["git_dirty"] is False
    monkeypatch.setenv("REPRO_GIT_SHA", head[:7])  # the same commit, abbreviated: nothing to warn of
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert capture_environment(records=project / "results" / "runs")["git_sha"] == head


def git_project(folder: Path) -> Path:
    """A project of one committed file, in a git repository of its own."""
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=folder, check=True,
                       capture_output=True)
    git("init", "-q")
    (folder / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-qm", "code")
    return folder


def test_the_records_folder_does_not_make_the_tree_dirty(tmp_path, monkeypatch):
    """A sweep's records, written into the tree as it goes, are not code: they marked its later jobs dirty."""
    from repro.context import capture_environment
    project = git_project(tmp_path)
    monkeypatch.setattr("repro.context.PROJECT_ROOT", project)
    monkeypatch.delenv("REPRO_GIT_SHA", raising=False)
    save_record(make_record(), project / "results" / "runs" / "paper" / "task" / "a.json")
    assert capture_environment(records=project / "results" / "runs")["git_dirty"] is False
    save_record(make_record(), project / "mine" / "a.json")  # paths.records=mine
    assert capture_environment(records=project / "mine")["git_dirty"] is True  # results/runs is not it now
    (project / "results" / "runs" / "paper" / "task" / "a.json").unlink()
    assert capture_environment(records=project / "mine")["git_dirty"] is False
    (project / "code.py").write_text("x = 2\n")
    assert capture_environment(records=project / "mine")["git_dirty"] is True


def test_the_environment_names_the_command_and_the_libraries_measured_against(monkeypatch):
    import transformers

    from repro.context import capture_environment
    monkeypatch.setattr("sys.argv", ["repro", "-m", "hydra/launcher=local", "seed=1,2"])
    env = capture_environment(on_gpu=False)
    assert env["argv"] == ["-m", "hydra/launcher=local", "seed=1,2"] and env["world_size"] == 1
    assert env["packages"]["transformers"] == transformers.__version__


def test_a_cpu_run_on_a_gpu_machine_records_no_gpu(monkeypatch):
    from repro.context import capture_environment
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.get_device_properties", lambda index: SimpleNamespace(
        name="NVIDIA H200", total_memory=141 * 2**30, multi_processor_count=132))
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    assert capture_environment(on_gpu=True)["gpu_name"] == "NVIDIA H200"
    env = capture_environment(on_gpu=False)
    assert env["gpu_name"] is None and env["gpu_count"] == 0 and "gpu_memory_gb" not in env


def test_the_suites_switches_are_recorded(monkeypatch):
    from repro.context import capture_environment
    monkeypatch.setenv("EFFREPRO_GLUON", "1")
    monkeypatch.setenv("UNRELATED_SETTING", "x")
    switches = capture_environment()["switches"]
    assert switches["EFFREPRO_GLUON"] == "1" and "UNRELATED_SETTING" not in switches
