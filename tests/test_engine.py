"""The engine's behaviour through the command line, in this process (quick): bad input named before any work,
failed points counted, runs that measured nothing failing, sweeps that run every job and list them all."""
import json

import pytest

from conftest import run_inline

FAKE = "task.entry=fake_tasks:"  # tests/ is on the path of the test process
KERNEL = ["kernel.providers=[standard]", "kernel.seq_len=[48]", "kernel.head_dim=[32]", "kernel.causal=[true]",
          "kernel.mode=[fwd]", "kernel.settings=null"]


def record(folder):
    return json.loads((folder / "record.json").read_text())


@pytest.mark.parametrize("override, expected", [
    ("kernel.seq_len=-4", "kernel.seq_len=-4 must be an integer >= 1"),
    ("kernel.seq_len=0", "kernel.seq_len=0 must be an integer >= 1"),
    ("kernel.seq_len=abc", "kernel.seq_len='abc' must be a number"),
    ("kernel.seq_len=[64.5]", "kernel.seq_len=64.5 must be an integer"),
    ("kernel.head_dim=[8]", "kernel.head_dim=8 must be an integer >= 16 <= 256"),
    ("kernel.dropout=1.5", "kernel.dropout=1.5 must be a number >= 0 < 1"),
    ("kernel.settings.long.seq_len=[0]", "kernel.settings.long.seq_len=0"),
    ("kernel.rep_ms=fast", "kernel.rep_ms='fast' must be a number"),
    ("task=flash_gpt2 train.steps=abc", "train.steps='abc' must be a number"),
    ("task=flash_gpt2 train.precision=8", "train.precision=8 must be a string"),
    ("task=flash_gpt2 train.steps=0", "train.steps=0 must be an integer > 0"),
    ("task=flash_gpt2 train.lr=-1.0", "train.lr=-1.0 must be a number > 0"),
    ("task=flash_gpt2 batch.tokens=0", "batch.tokens=0 must be an integer >= 1"),
    ("task=lean_decode decode.context=0", "decode.context=0 must be an integer >= 1"),
    ("task=lean_decode decode.heads=[32/5]", "decode.heads='32/5'"),
    ("task=lra_listops lra.n_train=0", "lra.n_train=0 must be an integer >= 1"),
    ("task=lra_listops lra.batch=2.5", "lra.batch=2.5 must be an integer"),
])
def test_invalid_numbers_are_named_before_any_work(override, expected, tmp_path):
    code, out, err = run_inline(*override.split(), "logger=none", f"hydra.run.dir={tmp_path}")
    assert code == 2, (out, err)
    assert expected in err, err
    assert "Traceback" not in err
    if (tmp_path / "record.json").exists():  # the job's own record says why; nothing is committed
        assert record(tmp_path)["status"] == "error" and expected.split("=")[0] in record(tmp_path)["error"]


def test_documented_keys_are_accepted_without_a_plus(tmp_path):
    code, _, err = run_inline("task=flash_gpt2", "train.checkpoint_every_s=5", "train.steps=abc", "logger=none",
                              f"hydra.run.dir={tmp_path}")
    assert "unknown config key" not in err and "train.steps='abc'" in err


def test_a_run_whose_points_all_failed_exits_non_zero_and_says_so(tmp_path):
    code, out, err = run_inline(FAKE + "all_fail", "logger=none", f"hydra.run.dir={tmp_path}")
    assert code == 1
    assert "all 3 points failed" in err and record(tmp_path)["status"] == "error"
    assert "all 3 points failed" in record(tmp_path)["error"]


def test_a_run_with_some_failed_points_says_how_many(tmp_path):
    code, out, err = run_inline(FAKE + "some_fail", "logger=none", f"hydra.run.dir={tmp_path}")
    assert code == 0 and "1 of 3 rows failed" in out
    assert record(tmp_path)["status"] == "ok"


def test_a_crash_keeps_its_rows_and_the_error(tmp_path):
    code, _, err = run_inline(FAKE + "crash", "logger=none", f"hydra.run.dir={tmp_path}")
    assert code == 1 and "crashed half-way" in err
    saved = record(tmp_path)
    assert saved["status"] == "error" and "crashed half-way" in saved["error"] and len(saved["rows"]) == 1


def test_bad_input_starts_no_logger_and_commits_nothing(tmp_path):
    code, _, err = run_inline("kernel.providers=[standard,fastest]", "logger=wandb", "logger.mode=offline",
                              "scale.commit_records=true", f"paths.records={tmp_path}/runs", f"hydra.run.dir={tmp_path}/job")
    assert code == 2 and "fastest" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "job" / "wandb").exists()
    assert record(tmp_path / "job")["error"]


def test_a_sweep_runs_every_job_lists_them_all_and_fails_if_one_did(tmp_path):
    code, out, err = run_inline("-m", "logger=none", f"hydra.sweep.dir={tmp_path}",
                                FAKE + "all_ok," + FAKE[len("task.entry="):] + "bad_input," +
                                FAKE[len("task.entry="):] + "all_fail," + FAKE[len("task.entry="):] + "some_fail")
    assert code == 1
    summary = out[out.index("multirun of 4 jobs"):]
    assert "2 not ok" in summary
    lines = [line.split() for line in summary.splitlines()[1:] if line.strip()]
    assert [(line[0], line[1]) for line in lines] == [("0_flash_kernel", "ok"), ("1_flash_kernel", "error"),
                                                      ("2_flash_kernel", "error"), ("3_flash_kernel", "ok")]
    assert "fake.size=-1" in summary and "all 3 points failed" in summary
    assert all((tmp_path / f"{i}_flash_kernel" / "record.json").exists() for i in range(4))


def test_a_sweep_of_good_jobs_exits_zero(tmp_path):
    code, out, _ = run_inline("-m", "logger=none", f"hydra.sweep.dir={tmp_path}", *KERNEL[:1],
                              "kernel.seq_len=[32],[40]", *KERNEL[2:])
    assert code == 0 and "multirun of 2 jobs, 0 not ok" in out
