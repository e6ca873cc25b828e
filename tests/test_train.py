"""The shared training loop: resume after a kill, never from a finished run, refusing foreign or corrupt
checkpoints, training only what trains, stages, failures as rows; and the text corpus it is usually fed from."""
import math
import re
import time
from dataclasses import replace as dataclass_replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import local_corpus
from repro.bench import Unsupported
from repro.context import ConfigError
from repro.records import Row
from repro.timing import kernel_family, kernel_time_by_family
from repro.train import Candidate, Stage, StepClock, Trainee, TrainSpec, running_job, train, train_all

SPEC = TrainSpec(steps=8, lr=1e-2, warmup_steps=2, precision="fp32", log_every=1, eval_every=4,
                 checkpoint_every_s=0.0)


class Regressor(torch.nn.Module):
    """With dropout, as the paper's models train: a resumed run must draw the masks an unbroken one would."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.drop = torch.nn.Dropout(0.25)

    def forward(self, x, y):
        return SimpleNamespace(loss=((self.lin(self.drop(x)) - y) ** 2).mean())


def trainee(fingerprint="f1"):
    torch.manual_seed(0)

    def batches(step, rank, world):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(2, 8, 4, generator=gen)
        return [dict(x=x[i], y=x[i].sum(-1, keepdim=True)) for i in range(2)]

    return Trainee("lin", Regressor(), batches, lambda model: [Row("lin", "step", 0, "val_loss", "nats", 0.5, n=1)],
                   16, 6 * 5.0, extra={"series": "s"}, fingerprint=fingerprint)


def drain(training):
    """The rows of a `train` call, and what it returns."""
    rows = []
    while True:
        try:
            rows.append(next(training))
        except StopIteration as stop:
            return rows, stop.value


def test_a_killed_run_resumes_where_it_stopped_and_ends_as_an_unbroken_one(tmp_path):
    whole = trainee()
    unbroken, went_on_from = drain(train(whole, SPEC, torch.device("cpu"), None, progress=False))
    assert went_on_from == 0

    first = trainee()
    for row in train(first, SPEC, torch.device("cpu"), tmp_path, progress=False):
        if row.metric == "loss" and row.x_value == 5:
            break  # killed: the checkpoint of step 4 is on disk, step 5's is not
    resumed = trainee()
    rows, went_on_from = drain(train(resumed, SPEC, torch.device("cpu"), tmp_path, progress=False))
    assert went_on_from == 4  # for a caller that times the training: this call trained steps 5-8
    assert drain(train(trainee(), SPEC, torch.device("cpu"), tmp_path, progress=False, reuse_finished=True))[1] == 8
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    losses = lambda rs: [(r.x_value, r.p50) for r in rs if r.metric == "loss"]  # noqa: E731
    assert losses(rows) == losses(unbroken)
    assert [r.metric for r in rows if r.metric in ("tokens_per_s", "model_tflops", "val_loss")] == \
        ["val_loss", "val_loss", "tokens_per_s", "model_tflops"]


def test_a_loss_gone_to_nan_between_logged_steps_never_replaces_the_last_good_checkpoint(tmp_path):
    """Step 3's batch makes the loss, and with it the weights, nan; the loss is logged at step 4 alone. The
    checkpoint due at step 3 is not written: step 2's, the last good state, stays."""
    broken = trainee()
    draw = broken.batches
    broken.batches = lambda step, rank, world: [dict(b, x=b["x"] * (math.nan if step == 2 else 1.0))
                                                for b in draw(step, rank, world)]
    with pytest.raises(FloatingPointError, match="lin: loss is nan at step 3"):
        list(train(broken, dataclass_replace(SPEC, log_every=4), torch.device("cpu"), tmp_path, progress=False))
    (path,) = tmp_path.glob("lin-*.pt")
    saved = torch.load(path, weights_only=False)
    assert saved["step"] == 2 and all(t.isfinite().all() for t in saved["model"].values())


@pytest.mark.parametrize("killed_at, timed_steps", [(5, 4), (7, 4), (3, 4), (2, 5)])
def test_a_resumed_run_times_only_steps_after_each_process_warmed_up(tmp_path, killed_at, timed_steps):
    """Each process's first `timing_skip_steps` (2) steps compile and autotune; the times of the steps after
    them travel in the checkpoint, so a run resumed with only untimed steps left still reports warm ones.
    Killed at step 5 (its checkpoint is step 4's), steps 3-4 and 7-8 are timed; at 7, steps 3-6; at 3, steps
    5-8; at 2, steps 4-8 (the first process timed nothing)."""
    for row in train(trainee(), SPEC, torch.device("cpu"), tmp_path, progress=False):
        if row.metric == "loss" and row.x_value == killed_at:
            break
    rows = list(train(trainee(), SPEC, torch.device("cpu"), tmp_path, progress=False))
    (tps,) = [r for r in rows if r.metric == "tokens_per_s"]
    assert tps.extra["timed_steps"] == tps.n == timed_steps


def test_no_throughput_rows_when_no_step_follows_the_untimed_ones(capsys):
    rows = list(train(trainee(), dataclass_replace(SPEC, steps=2), torch.device("cpu"), None, progress=False))
    assert not [r for r in rows if r.metric in ("tokens_per_s", "step_time")]
    assert "no step ran after the 2 untimed ones" in capsys.readouterr().out


def test_the_logged_loss_is_the_mean_over_a_steps_micro_batches_and_the_lr_the_steps_own():
    """The first step's loss, on the initial weights, by hand; the rows of resumed runs were only ever compared with
    other runs of the same loop."""
    t = trainee()
    t.model.drop.p = 0.0  # no masks to draw: the loss is a function of the weights and the batch alone
    with torch.no_grad():  # before training changes the weights
        by_hand = sum(t.model(**b).loss.item() for b in t.batches(0, 0, 1)) / 2  # two micro-batches
    rows = list(train(t, dataclass_replace(SPEC, steps=3), torch.device("cpu"), None, progress=False))
    logged = {(r.metric, r.x_value): r.p50 for r in rows if r.metric in ("loss", "lr")}
    assert logged["loss", 1] == pytest.approx(by_hand, rel=1e-6)
    assert [logged["lr", s] for s in (1, 2, 3)] == pytest.approx([5e-3, 1e-2, 1e-2])  # warm-up of 2, then cosine


def test_throughput_rows_are_a_steps_tokens_and_flops_over_its_timed_seconds(monkeypatch):
    """No other test read the values: tokens/s and TFLOP/s are the claims' numbers. Two ranks: tokens/s is the
    job's, TFLOP/s one GPU's. The 20th percentile of a rate is that of the slow steps (the 80th of the times)."""
    from repro.train import throughput_rows

    monkeypatch.setattr("repro.train.world", lambda: (0, 2))
    clock = StepClock(torch.device("cpu"), skip=2, earlier={"step": [0.5], "host": [0.5]})  # a resumed run's
    clock.host = [9.0, 9.0, 0.1, 0.2, 0.4, 0.8]  # its first two steps untimed
    # timed: 0.1 0.2 0.4 0.5 0.8 s; median 0.4, 20th 0.1 + 0.8 * 0.1 = 0.18, 80th 0.5 + 0.2 * 0.3 = 0.56
    rows = {r.metric: r for r in throughput_rows(trainee(), clock, SPEC, torch.device("cpu"))}
    assert set(rows) == {"tokens_per_s", "model_tflops", "step_time"}
    tokens = 16 * 2  # tokens_per_step on each of two ranks
    expected = {"tokens_per_s": [tokens / s for s in (0.4, 0.56, 0.18)],
                "model_tflops": [16 * 30.0 / 1e12 / s for s in (0.4, 0.56, 0.18)],
                "step_time": [400.0, 180.0, 560.0]}
    for metric, values in expected.items():
        assert [rows[metric].p50, rows[metric].p20, rows[metric].p80] == pytest.approx(values, rel=1e-9), metric
        assert rows[metric].n == 5 and (rows[metric].x_value, rows[metric].extra["series"]) == (8, "s")
    assert rows["tokens_per_s"].extra["timed_steps"] == 5 and rows["tokens_per_s"].extra["world_size"] == 2


def test_a_profiled_run_profiles_its_last_untimed_step_once_and_trains_as_an_unprofiled_one(monkeypatch):
    profiled_steps = []

    def fake_profile(step, device):  # as on a GPU: the step's result, and its kernel time by family
        profiled_steps.append(step)
        return step(), {"matmul": (2.0, [["gemm", 2.0]]), "all": (3.0, [["gemm", 2.0]])}
    monkeypatch.setattr("repro.train.kernel_time_by_family", fake_profile)
    plain = list(train(trainee(), SPEC, torch.device("cpu"), None, progress=False))
    spec = dataclass_replace(SPEC, profile=True, timing_skip_steps=3)
    rows = list(train(trainee(), spec, torch.device("cpu"), None, progress=False))
    assert len(profiled_steps) == 1
    kernel_rows = [r for r in rows if r.metric == "kernel_time"]
    assert [(r.x_value, r.p50, r.extra["step"]) for r in kernel_rows] == [("matmul", 2.0, 3), ("all", 3.0, 3)]
    losses = lambda rs: [(r.x_value, r.p50) for r in rs if r.metric == "loss"]  # noqa: E731
    assert losses(rows) == losses(plain)


def test_rows_say_the_precision_that_ran():
    """bf16 asked on the CPU runs (and is recorded) as fp32; fp32 asked is fp32 too."""
    for asked in ("bf16", "fp32"):
        rows = list(train(trainee(), dataclass_replace(SPEC, precision=asked), torch.device("cpu"), None,
                          progress=False))
        assert rows and {r.extra["precision"] for r in rows} == {"fp32"}


def test_a_finished_run_is_never_resumed_a_rerun_measures_afresh(tmp_path, capsys):
    first = list(train(trainee(), SPEC, torch.device("cpu"), tmp_path, progress=False))
    again = list(train(trainee(), SPEC, torch.device("cpu"), tmp_path, progress=False))
    assert "finished run: training afresh" in capsys.readouterr().out
    losses = lambda rs: [(r.x_value, r.p50) for r in rs if r.metric == "loss"]  # noqa: E731
    assert losses(again) == losses(first)  # the same training, done again
    tps = lambda rs: [r for r in rs if r.metric == "tokens_per_s"]  # noqa: E731
    assert len(tps(again)) == 1 and tps(again)[0].p50 != tps(first)[0].p50  # timed again, not replayed


def test_the_checkpoint_identity_covers_the_data_the_settings_and_the_frozen_weights(tmp_path):
    from repro.train import run_identity
    cpu = torch.device("cpu")
    base = run_identity(trainee("f1"), SPEC, cpu)
    assert run_identity(trainee("f2"), SPEC, cpu) != base  # another model or data setting
    assert run_identity(trainee("f1"), dataclass_replace(SPEC, lr=0.5), cpu) != base
    assert run_identity(trainee("f1"), dataclass_replace(SPEC, checkpoint_every_s=99.0), cpu) == base
    frozen = trainee("f1")
    frozen.model.lin.bias.requires_grad_(False)
    other = trainee("f1")
    other.model.lin.bias.requires_grad_(False)
    with torch.no_grad():
        other.model.lin.bias.add_(1.0)
    assert run_identity(frozen, SPEC, cpu) != run_identity(other, SPEC, cpu)  # the frozen base differs
    # weights stored as buffers of a layer without trainable parameters (a compressed layer's codes)
    coded, recoded = trainee("f1"), trainee("f1")
    for t, codes in ((coded, torch.arange(6)), (recoded, torch.arange(6).flip(0))):
        t.model.codes = torch.nn.Module()
        t.model.codes.register_buffer("values", codes)
    assert run_identity(coded, SPEC, cpu) != run_identity(recoded, SPEC, cpu)


def test_a_checkpoint_of_another_identity_or_a_corrupt_one_is_refused(tmp_path):
    list(train(trainee("f1"), dataclass_replace(SPEC, steps=3, checkpoint_every_s=1e9), torch.device("cpu"), tmp_path,
               progress=False))
    (path,) = tmp_path.glob("*.pt")
    state = torch.load(path, weights_only=False)
    state["finished"] = False
    torch.save(state, path)
    other = trainee("f2")
    from repro.train import run_identity
    path.rename(tmp_path / f"lin-{run_identity(other, SPEC, torch.device('cpu'))}.pt")
    with pytest.raises(ConfigError, match="another model, setting"):
        next(iter(train(other, SPEC, torch.device("cpu"), tmp_path, progress=False)))
    (tmp_path / f"lin-{run_identity(other, SPEC, torch.device('cpu'))}.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read"):
        next(iter(train(other, SPEC, torch.device("cpu"), tmp_path, progress=False)))


def test_only_trainable_parameters_are_optimised_and_checkpointed(tmp_path):
    t = trainee()
    t.model.lin.weight.requires_grad_(False)
    frozen = t.model.lin.weight.detach().clone()
    run = dataclass_replace(SPEC, checkpoint_every_s=0.0)
    for row in train(t, run, torch.device("cpu"), tmp_path, progress=False):
        if row.metric == "loss" and row.x_value == 5:
            break
    assert torch.equal(t.model.lin.weight, frozen)
    (path,) = tmp_path.glob("*.pt")
    assert set(torch.load(path, weights_only=False)["model"]) == {"lin.bias"}
    resumed = trainee()
    resumed.model.lin.weight.requires_grad_(False)
    rows = list(train(resumed, run, torch.device("cpu"), tmp_path, progress=False))
    assert any(r.metric == "tokens_per_s" for r in rows)


def test_a_model_with_nothing_to_train_is_refused_before_any_step():
    frozen = trainee()
    frozen.model.requires_grad_(False)
    with pytest.raises(ConfigError, match="the model has no parameter that requires gradients: nothing to train"):
        next(iter(train(frozen, SPEC, torch.device("cpu"), None, progress=False)))


def test_a_stage_starts_from_the_model_the_stage_before_trained():
    seen = []

    def grow(previous):
        seen.append(previous.model.lin.weight.detach().clone())
        nxt = trainee("stage2")
        nxt.model.load_state_dict(previous.model.state_dict())
        return nxt

    first = dataclass_replace(SPEC, steps=3)
    rows = list(train_all([Candidate("lin", {}, trainee, spec=first, then=[Stage(grow)])], SPEC, torch.device("cpu"),
                          None))
    untrained = trainee().model.lin.weight
    assert len(seen) == 1 and not torch.equal(seen[0], untrained)  # stage 2 got the trained model
    assert [r.x_value for r in rows if r.metric == "tokens_per_s"] == [3, 8]  # each stage with its own steps


def test_a_rerun_after_a_kill_in_a_later_stage_reuses_the_earlier_stages_trained_model(tmp_path, capsys):
    steps = []  # (fingerprint, step) of every training step taken

    def counted(fingerprint):
        made = trainee(fingerprint)
        batches = made.batches
        made.batches = lambda step, rank, world: steps.append((fingerprint, step)) or batches(step, rank, world)
        return made

    def grow(previous):
        nxt = counted("stage2")
        nxt.model.load_state_dict(previous.model.state_dict())
        return nxt
    first = dataclass_replace(SPEC, steps=3)

    def candidates():
        return [Candidate("lin", {}, lambda: counted("f1"), spec=first, then=[Stage(grow)])]
    unbroken = list(train_all(candidates(), SPEC, torch.device("cpu"), None))
    steps.clear()
    for row in train_all(candidates(), SPEC, torch.device("cpu"), tmp_path):
        if row.metric == "loss" and row.x_value == 5 and row.extra.get("series") == "s" and \
                any(f == "stage2" for f, _ in steps):
            break  # killed in stage 2
    steps.clear()
    rows = list(train_all(candidates(), SPEC, torch.device("cpu"), tmp_path))
    assert not any(f == "f1" for f, _ in steps)  # stage 1 not trained again
    assert "reused the finished run" in capsys.readouterr().out
    losses = lambda rs: [(r.x_value, r.p50) for r in rs if r.metric == "loss"]  # noqa: E731
    assert losses(rows) == losses(unbroken)
    assert [r.x_value for r in rows if r.metric == "tokens_per_s"] == [3, 8]
    # the last stage, finished, is never reused: a rerun measures afresh
    steps.clear()
    list(train_all(candidates(), SPEC, torch.device("cpu"), tmp_path))
    assert {f for f, _ in steps} == {"stage2"}


def _counted_candidates(steps: list) -> list[Candidate]:
    """Candidates A and B, each step they train appended to `steps` by name."""
    def counted(name):
        made = trainee(name)
        made.name, batches = name, made.batches
        made.batches = lambda step, rank, world: steps.append(name) or batches(step, rank, world)
        return made
    return [Candidate(name, {}, lambda name=name: counted(name)) for name in ("A", "B")]


def test_a_rerun_after_a_kill_reuses_the_candidates_the_killed_job_had_finished(tmp_path, capsys):
    """A job killed while training its second candidate, run again (as a new job, in a new folder, or the same
    one requeued), gives the record the first candidate's rows as they were, without training it again."""
    steps, cpu = [], torch.device("cpu")
    with running_job(tmp_path / "job"):
        killed = []
        for row in train_all(_counted_candidates(steps), SPEC, cpu, tmp_path / "ckpt"):
            if row.provider == "B" and row.metric == "loss" and row.x_value == 5:
                break  # killed in B: B's checkpoint of step 4 is on disk
            killed.append(row)
    steps.clear()
    with running_job(tmp_path / "the rerun"):
        resumed = list(train_all(_counted_candidates(steps), SPEC, cpu, tmp_path / "ckpt"))
    assert {name: steps.count(name) for name in ("A", "B")} == {"A": 0, "B": 4}
    assert "reused the finished run" in capsys.readouterr().out
    a_rows = [r for r in killed if r.provider == "A"]
    assert any(r.metric == "tokens_per_s" for r in a_rows)
    # A's rows as measured, its timing too, each saying which job measured them
    assert [r for r in resumed if r.provider == "A"] == _reused(a_rows, tmp_path / "job")
    assert [r for r in resumed if r.provider == "B"][:len(killed) - len(a_rows)] == killed[len(a_rows):]


def test_once_a_job_completed_a_rerun_trains_and_measures_its_candidates_afresh(tmp_path, capsys):
    steps, cpu = [], torch.device("cpu")
    with running_job(tmp_path / "ended with an error"):  # its candidates finished, but the job did not complete
        first = list(train_all(_counted_candidates(steps), SPEC, cpu, tmp_path / "ckpt"))
    steps.clear()
    with running_job(tmp_path / "completed") as job:
        again = list(train_all(_counted_candidates(steps), SPEC, cpu, tmp_path / "ckpt"))
    assert steps == [] and again == _reused(first, tmp_path / "ended with an error")  # reused, as after a kill
    job.spend()  # what the command line does once the job's record is saved, its status ok
    with running_job(tmp_path / "a new run"):
        afresh = list(train_all(_counted_candidates(steps), SPEC, cpu, tmp_path / "ckpt"))
    assert {name: steps.count(name) for name in ("A", "B")} == {"A": 8, "B": 8}
    assert capsys.readouterr().out.count("finished run: training afresh (its job completed)") == 2
    tps = lambda rs: [r.p50 for r in rs if r.metric == "tokens_per_s"]  # noqa: E731
    assert len(tps(afresh)) == 2 and tps(afresh) != tps(first)  # timed again, not replayed


def _reused(rows: list, job: Path) -> list:
    return [dataclass_replace(r, extra={**r.extra, "reused_from": str(job)}) for r in rows]


@pytest.mark.parametrize("dirty", ["finisher", "rerun"])
def test_a_finished_run_is_not_reused_where_either_job_ran_from_a_tree_with_uncommitted_edits(tmp_path, capsys,
                                                                                              dirty):
    """The run's identity names the commit alone: "kill, edit without committing, rerun" must not replay rows of
    the code before the edit. An unfinished run still resumes."""
    steps, cpu = [], torch.device("cpu")
    a, b = _counted_candidates(steps)
    with running_job(tmp_path / "killed", dirty=dirty == "finisher"):
        for row in train_all([a, b], SPEC, cpu, tmp_path / "ckpt"):
            if row.provider == "B" and row.metric == "loss" and row.x_value == 5:
                break  # killed in B: B's checkpoint of step 4 is on disk
    steps.clear()
    with running_job(tmp_path / "the rerun", dirty=dirty == "rerun"):
        list(train_all([a, b], SPEC, cpu, tmp_path / "ckpt"))
    assert {name: steps.count(name) for name in ("A", "B")} == {"A": 8, "B": 4}
    assert "uncommitted edits" in capsys.readouterr().out


def test_a_completed_job_marks_only_the_runs_it_finished_or_reused(tmp_path):
    """Jobs of a sweep share one checkpoint folder: one that completes leaves another's finished runs reusable."""
    steps, cpu = [], torch.device("cpu")
    a, b = _counted_candidates(steps)
    with running_job(tmp_path / "killed"):
        list(train_all([a], SPEC, cpu, tmp_path / "ckpt"))
    with running_job(tmp_path / "completed") as job:
        list(train_all([b], SPEC, cpu, tmp_path / "ckpt"))
    job.spend()
    steps.clear()
    with running_job(tmp_path / "a new run"):
        list(train_all([a, b], SPEC, cpu, tmp_path / "ckpt"))
    assert steps == ["B"] * 8


def test_a_job_requeued_into_its_own_folder_reuses_what_it_finished_after_an_earlier_completion(tmp_path):
    """The same folder completes, runs again (training afresh), is killed, and is requeued: the marker of the first
    completion must not make it train a third time."""
    steps, cpu = [], torch.device("cpu")
    for completes in (True, False):
        with running_job(tmp_path / "job") as job:
            list(train_all(_counted_candidates(steps), SPEC, cpu, tmp_path / "ckpt"))
        if completes:
            job.spend()
    assert steps == ["A"] * 8 + ["B"] * 8 + ["A"] * 8 + ["B"] * 8
    steps.clear()
    with running_job(tmp_path / "job"):  # requeued after the kill
        list(train_all(_counted_candidates(steps), SPEC, cpu, tmp_path / "ckpt"))
    assert steps == []


def test_an_unreadable_spent_marker_is_taken_as_spent(tmp_path, capsys):
    steps, cpu = [], torch.device("cpu")
    a, _ = _counted_candidates(steps)
    with running_job(tmp_path / "killed"):
        list(train_all([a], SPEC, cpu, tmp_path / "ckpt"))
    (checkpoint,) = (tmp_path / "ckpt").glob("*.pt")
    checkpoint.with_name(checkpoint.name + ".spent").write_bytes(b"\xff\xfe")  # not text
    steps.clear()
    with running_job(tmp_path / "the rerun"):
        list(train_all([a], SPEC, cpu, tmp_path / "ckpt"))
    assert steps == ["A"] * 8 and "cannot be read (UnicodeDecodeError" in capsys.readouterr().out


def test_a_completed_job_does_not_make_again_a_checkpoint_folder_deleted_since(tmp_path):
    import shutil

    with running_job(tmp_path / "completed") as job:
        list(train_all(_counted_candidates([]), SPEC, torch.device("cpu"), tmp_path / "ckpt"))
    shutil.rmtree(tmp_path / "ckpt")  # as a cached trained model's checkpoints are removed
    job.spend()
    assert not (tmp_path / "ckpt").exists()


def _sharded_saves(rank: int, folder: Path) -> None:
    """One of two gloo processes training `trainee` under FSDP with a checkpoint due at every step; rank 0 writes
    the steps saved at to folder/saved.json."""
    import json
    import os

    import torch.distributed as dist

    from repro.train import Checkpoint

    os.environ.update(RANK=str(rank), WORLD_SIZE="2")  # what torchrun sets
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    saved, save = [], Checkpoint.save
    Checkpoint.save = lambda self, step, *args, **kwargs: saved.append(step) or save(self, step, *args, **kwargs)
    spec = dataclass_replace(SPEC, parallel="fsdp", log_every=3, eval_every=0)
    list(train(trainee(), spec, torch.device("cpu"), folder / "ckpt", progress=False))
    if rank == 0:
        (folder / "saved.json").write_text(json.dumps(saved))
    dist.destroy_process_group()


def test_sharded_ranks_agree_on_a_checkpoint_only_at_logged_steps(tmp_path):
    """Under FSDP the ranks agree on saving (a collective the host waits for, and the device with it) only where a
    logged step's loss read has waited already: at every step, the host could never queue the next step ahead."""
    import json

    torch.multiprocessing.spawn(_sharded_saves, args=(tmp_path,), nprocs=2)
    assert json.loads((tmp_path / "saved.json").read_text()) == [1, 3, 6, 8]  # steps 1, 3, 6 mid-run; 8 the end


def test_unsupported_and_out_of_memory_candidates_become_rows_and_the_rest_run():
    def unsupported():
        raise Unsupported("needs a GPU")

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    rows = list(train_all([Candidate("a", {}, unsupported), Candidate("b", {}, oom), Candidate("lin", {}, trainee)],
                          SPEC, torch.device("cpu"), None))
    assert [(r.provider, r.status) for r in rows[:2]] == [("a", "unsupported"), ("b", "oom")]
    assert any(r.provider == "lin" and r.metric == "tokens_per_s" for r in rows)


def test_train_spec_names_unknown_keys_bad_precision_and_a_profile_with_no_untimed_step():
    with pytest.raises(ConfigError, match="stepz"):
        TrainSpec.from_config({"steps": 1, "lr": 1.0, "stepz": 2})
    with pytest.raises(ConfigError, match="fp8"):
        TrainSpec.from_config({"steps": 1, "lr": 1.0, "precision": "fp8"})
    for skipped in (0, 4):  # none untimed; or every step, when the throughput would fall back to all of them
        with pytest.raises(ConfigError, match=f"timing_skip_steps={skipped}"):
            TrainSpec.from_config({"steps": 4, "lr": 1.0, "profile": True, "timing_skip_steps": skipped})


@pytest.mark.parametrize("setting, expected", [
    ({"min_lr_ratio": "0.1"}, "train.min_lr_ratio='0.1' must be a finite number >= 0 and <= 1"),
    ({"min_lr_ratio": math.nan}, "train.min_lr_ratio=nan must be a finite number >= 0 and <= 1"),
    ({"lr": math.nan}, "train.lr=nan must be a finite number > 0"),
    ({"grad_clip": math.nan}, "train.grad_clip=nan must be a finite number >= 0"),
    ({"checkpoint_every_s": math.nan}, "train.checkpoint_every_s=nan must be a number >= 0"),
    ({"profile": "yes"}, "train.profile='yes' must be true or false"),
    ({"precision": ["bf16"]},
     "train.precision=['bf16'] must be one value, one of ['bf16', 'fp16', 'fp32'], not a list"),
])
def test_train_settings_of_the_wrong_kind_are_refused_by_name(setting, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        TrainSpec.from_config({"steps": 4, "lr": 1.0, **setting})


def test_checkpoint_every_s_may_be_inf():  # no checkpoint but the final one
    assert TrainSpec.from_config({"steps": 4, "lr": 1.0, "checkpoint_every_s": math.inf}).checkpoint_every_s == math.inf


def test_a_spec_made_from_another_is_checked_as_one_from_a_config():
    """Tasks give a candidate or a stage its own steps with dataclasses.replace: a profile needs an untimed step
    before the timed ones there too."""
    spec = TrainSpec.from_config({"steps": 8, "lr": 1.0, "profile": True, "timing_skip_steps": 2})
    with pytest.raises(ConfigError, match=re.escape("train.timing_skip_steps=2 must be between 1 and train.steps - 1 "
                                                    "= 1")):
        dataclass_replace(spec, steps=2)


def test_grad_clip_0_trains_unclipped():
    unclipped = trainee()
    start = [p.detach().clone() for p in unclipped.model.parameters()]
    spec = dataclass_replace(SPEC, grad_clip=0.0, weight_decay=0.0)  # no decay: only the gradients move a weight
    list(train(unclipped, spec, torch.device("cpu"), None, progress=False))
    assert all(not torch.equal(a, b) for a, b in zip(start, unclipped.model.parameters(), strict=True))


def test_grad_clip_bounds_the_gradients_norm():
    """Clipped to a norm far below Adam's eps, each step is about a tenth of an unclipped one (g / (|g| + eps))."""
    moved = []
    for grad_clip in (0.0, 1e-9):
        model = trainee()
        start = [p.detach().clone() for p in model.model.parameters()]
        spec = dataclass_replace(SPEC, grad_clip=grad_clip, weight_decay=0.0, eval_every=0)
        list(train(model, spec, torch.device("cpu"), None, progress=False))
        moved.append(sum((a - b).norm() for a, b in zip(start, model.model.parameters(), strict=True)))
    assert moved[1] < 0.5 * moved[0]


@pytest.mark.parametrize("betas", [0.9, "0.9", [0.9], [0.9, 1.0]])
def test_betas_other_than_two_numbers_below_one_are_refused_by_name(betas):
    with pytest.raises(ConfigError, match=r"train\.betas=.*0\.9.* must be two numbers in \[0, 1\)"):
        TrainSpec.from_config({"steps": 1, "lr": 1.0, "betas": betas})


def test_betas_as_a_list_are_valid_built_directly_as_from_a_config():
    TrainSpec(steps=1, lr=1.0, betas=[0.9, 0.98]).validate()
    assert TrainSpec.from_config({"steps": 1, "lr": 1.0, "betas": [0.9, 0.98]}).betas == (0.9, 0.98)


@pytest.mark.parametrize("schedule, halfway", [("cosine", 0.55), ("linear", 0.55), ("rsqrt", (10 / 60) ** 0.5)])
def test_the_learning_rate_warms_up_then_decays_to_its_floor_by_the_schedule(schedule, halfway):
    from repro.train import _lr_at
    spec = TrainSpec.from_config({"steps": 110, "lr": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1,
                                  "schedule": schedule})
    assert [_lr_at(s, spec) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert _lr_at(60, spec) == pytest.approx(halfway)
    if schedule == "rsqrt":  # LRA's: no floor, 1/sqrt(step) from the end of the warm-up
        assert _lr_at(110, spec) == pytest.approx((10 / 110) ** 0.5)
        return
    assert _lr_at(110, spec) == pytest.approx(0.1)
    quarter = 0.1 + 0.9 * (0.5 * (1 + math.cos(math.pi / 4)) if schedule == "cosine" else 0.75)
    assert _lr_at(35, spec) == pytest.approx(quarter)
    with pytest.raises(ConfigError, match=r"train.schedule='step' is not one of \['cosine', 'linear', 'rsqrt'\]"):
        TrainSpec.from_config({"steps": 1, "lr": 1.0, "schedule": "step"})


@pytest.mark.parametrize("weight_decay", [0.01, 0.0])
def test_lamb_leaves_the_trust_ratio_out_for_the_tensors_exempt_from_weight_decay(weight_decay):
    """As MLPerf's BERT reference: biases and LayerNorm's weights (the vectors) take Adam's step as it is; the
    matrices are rescaled, whatever the rate of their decay."""
    from repro.train import _optimizer
    layer = torch.nn.Linear(4, 4)
    torch.nn.init.constant_(layer.weight, 2.0)
    torch.nn.init.constant_(layer.bias, 2.0)
    spec = TrainSpec(steps=1, lr=0.1, weight_decay=weight_decay, betas=(0.9, 0.999), optimizer="lamb")
    optimizer = _optimizer(layer, spec, torch.device("cpu"))
    layer.weight.grad, layer.bias.grad = torch.ones(4, 4), torch.ones(4)
    optimizer.step()  # Adam's first step is 1 per element
    torch.testing.assert_close(layer.bias.detach(), torch.full((4,), 1.9), rtol=0, atol=1e-5)
    # the trust ratio makes the step's norm the tensor's own times lr: the weights shrink by a tenth
    torch.testing.assert_close(layer.weight.detach(), torch.full((4, 4), 1.8), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernel, family", [
    ("_attn_fwd", "attention"), ("flash_fwd_kernel", "attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"), ("nvjet_tst_128x256_64x4", "matmul"),
    ("_layer_norm_bwd", "layer_norm"), ("triton_red_fused_native_layer_norm_backward_3", "layer_norm"),
    ("_bias_gelu_kernel", "gelu"), ("triton_poi_fused__to_copy_add_mul_pow_tanh_view_13", "gelu"),
    ("_loss_and_gradient", "loss"), ("triton_tem_fused_addmm_gelu_tanh_2", "matmul"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<LogSoftMaxForwardEpilogue>", "loss"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("Memcpy HtoD (Pageable -> Device)", "copy"), ("triton_poi_fused_add_mul_0", "elementwise"),
    ("some_new_kernel", "other")])
def test_kernels_are_grouped_by_family_from_their_names(kernel, family):
    assert kernel_family(kernel) == family


def test_profiling_a_step_off_the_gpu_gives_the_step_and_no_times():
    assert kernel_time_by_family(lambda: 7, torch.device("cpu")) == (7, {})


def test_corpus_from_a_local_folder_is_tokenised_once_and_cached(tmp_path, monkeypatch):
    import datasets

    from repro.text_data import load_token_stream

    spec = local_corpus(tmp_path / "corpus", [f"def f{i}(x):\n    return x * {i} + sum(range({i}))\n" * 20
                                              for i in range(6)])
    first = load_token_stream(spec, tmp_path / "cache")
    assert first.train.dtype == torch.int32 and len(first.train) > len(first.val) > 0
    assert "return x" in first.tokenizer.decode(first.train[:40].tolist())
    (cached,) = (tmp_path / "cache").glob("tokens-*/ids.pt")
    stamp = cached.stat().st_mtime_ns
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("a cached corpus was read again"))
    again = load_token_stream(spec, tmp_path / "cache")
    assert torch.equal(again.train, first.train) and cached.stat().st_mtime_ns == stamp


def test_a_hub_corpus_read_from_another_text_column_is_tokenised_afresh(tmp_path, monkeypatch):
    import datasets

    from repro.text_data import load_token_stream

    rows = {"text": [f"body of document {i}\n" * 5 for i in range(6)], "title": [f"title {i}" for i in range(6)]}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict(rows))
    spec = SimpleNamespace(source="some/hub_set", name=None, split="train", text_column="text", max_documents=None,
                           tokenizer="bpe", vocab_size=300, val_fraction=0.2)
    body = load_token_stream(spec, tmp_path / "cache")
    titles = load_token_stream(SimpleNamespace(**{**vars(spec), "text_column": "title"}), tmp_path / "cache")
    assert body.tokenizer.decode(body.train.tolist()).startswith("body of document 0")
    assert titles.tokenizer.decode(titles.train.tolist()).startswith("title 0</s>title 1")
    assert titles.fingerprint != body.fingerprint
    # data.max_documents: the first documents alone (no test had read a hub corpus cut short)
    first = load_token_stream(SimpleNamespace(**{**vars(spec), "max_documents": 3}), tmp_path / "cache")
    text = first.tokenizer.decode(torch.cat([first.train, first.val]).tolist())
    assert [f"body of document {i}" in text for i in range(6)] == [True] * 3 + [False] * 3
    assert first.fingerprint != body.fingerprint


def test_documents_are_separated_by_the_separator_where_the_tokenizer_has_no_end_of_text(tmp_path, monkeypatch):
    """BERT's tokenizer has [SEP] and no end-of-text token."""
    from repro import text_data

    spec = local_corpus(tmp_path / "corpus", [f"text number {i}\n" * 10 for i in range(4)], val_fraction=0.25)
    make = text_data._tokenizer

    def no_eos(*args):
        tok = make(*args)
        tok.eos_token = None
        return tok
    monkeypatch.setattr(text_data, "_tokenizer", no_eos)
    stream = text_data.load_token_stream(spec, tmp_path / "cache")
    sep = stream.tokenizer.sep_token_id
    assert stream.tokenizer.eos_token_id is None and (stream.train == sep).sum() == 3 and stream.val[-1] == sep


def test_a_special_tokens_string_in_a_document_is_text_not_that_token(tmp_path):
    from repro.text_data import load_token_stream

    documents = [f"html = '<s>{i}</s>'\n" * 5 for i in range(5)]
    spec = local_corpus(tmp_path / "corpus", documents)
    stream = load_token_stream(spec, tmp_path / "cache")
    tok = stream.tokenizer
    assert (stream.train == tok.eos_token_id).sum() == 4 and (stream.val == tok.eos_token_id).sum() == 1
    assert not (stream.train == tok.bos_token_id).any()
    assert tok.decode(stream.train.tolist()) == "".join(d + "</s>" for d in documents[:4])


def test_the_bpe_tokenizer_learns_no_merge_from_the_held_out_documents(tmp_path):
    from repro.text_data import load_token_stream

    held_out_word = "qzxjvk"
    documents = [f"line {i} of a training document\n" * 20 for i in range(4)] + [f"{held_out_word} " * 200]
    spec = local_corpus(tmp_path / "corpus", documents, val_fraction=0.2)
    tok = load_token_stream(spec, tmp_path / "cache").tokenizer
    assert len(tok.tokenize(" training")) == 1  # the trainer did merge what the training part repeats
    assert len(tok.tokenize(held_out_word)) == len(held_out_word)


def test_a_corpus_tokenised_in_batches_gives_the_ids_of_one_pass(tmp_path, monkeypatch):
    from repro import text_data

    spec = local_corpus(tmp_path / "corpus", [f"line {i} of a document\n" * (i + 3) for i in range(7)],
                        val_fraction=0.3)
    whole = text_data.load_token_stream(spec, tmp_path / "whole")
    monkeypatch.setattr(text_data, "TOKENIZE_BATCH", 2)
    batched = text_data.load_token_stream(spec, tmp_path / "batched")
    eos = whole.tokenizer.eos_token_id
    assert (whole.train == eos).sum() == 5 and (whole.val == eos).sum() == 2
    assert torch.equal(batched.train, whole.train) and torch.equal(batched.val, whole.val)


def test_an_empty_corpus_folder_is_a_clear_error(tmp_path):
    from repro.text_data import load_token_stream

    spec = local_corpus(tmp_path, [])
    with pytest.raises(ConfigError, match="no non-empty files"):
        load_token_stream(spec, tmp_path / "cache")


@pytest.mark.parametrize("files, max_files", [(1, None), (3, 1)])
def test_a_corpus_of_one_document_is_refused_before_a_tokenizer_is_trained(tmp_path, files, max_files):
    from repro.text_data import load_token_stream

    corpus = tmp_path / "corpus"
    spec = local_corpus(corpus, [f"text number {i}\n" * 10 for i in range(files)], max_files=max_files,
                        val_fraction=0.1)
    with pytest.raises(ConfigError, match=rf"data.folder='{corpus}', data.pattern='\*.txt', data.max_files="
                                          rf"{max_files}\) holds 1 non-empty document.*data.val_fraction=0.1"):
        load_token_stream(spec, tmp_path / "cache")
    assert not list(tmp_path.glob("cache/*/tokenizer.json"))


@pytest.mark.parametrize("setting, expected", [
    (dict(max_files=-3), "data.max_files=-3 must be an integer >= 1"),  # was every file but the last three
    (dict(max_files=0), "data.max_files=0 must be an integer >= 1"),  # was every file
    (dict(vocab_size=0), "data.vocab_size=0 must be an integer >= 261"),  # was 261 tokens, quietly
    (dict(vocab_size=12.5), "data.vocab_size=12.5 must be an integer >= 261"),  # was a TypeError
    (dict(source="some/hub_set", max_documents=-1), "data.max_documents=-1 must be an integer >= 1"),
])
def test_corpus_sizes_out_of_bounds_are_refused_by_name_before_any_reading(tmp_path, setting, expected):
    from repro.text_data import load_token_stream

    spec = local_corpus(tmp_path / "corpus", [f"text number {i}\n" * 10 for i in range(4)], **setting)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_token_stream(spec, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_local_corpus_is_every_matching_file_below_the_folder_but_installed_packages(tmp_path):
    from repro.text_data import _local_files

    for name in ("a.py", "sub/b.py", "sub/deeper/c.py", "site-packages/pkg/d.py", "sub/dist-packages/e.py", "f.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    (tmp_path / "empty.py").touch()
    files = [p.relative_to(tmp_path).as_posix() for p in _local_files(str(tmp_path), "*.py", None)]
    assert files == ["a.py", "sub/b.py", "sub/deeper/c.py"]
    assert len(_local_files(str(tmp_path), "*.py", 2)) == 2


def test_the_default_corpus_leaves_out_the_pydoc_evaluation_texts_source(tmp_path):
    from repro.text_data import _local_files, default_corpus

    assert (default_corpus() / "pydoc_data" / "topics.py").is_file()
    assert not [p for p in _local_files(None, "*.py", None) if "pydoc_data" in p.parts]
    (tmp_path / "pydoc_data").mkdir()
    (tmp_path / "pydoc_data" / "mine.py").write_text("x = 1\n")  # a folder of one's own is read as it is
    assert len(_local_files(str(tmp_path), "*.py", None)) == 1


def test_lamb_takes_adams_step_scaled_by_the_trust_ratio():
    from repro.train import Lamb
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ‖w‖ = 5
    opt = Lamb([w], lr=0.1, betas=(0.9, 0.999), eps=0.0, weight_decay=0.0)
    w.grad = torch.tensor([1.0, -2.0])
    opt.step()
    adam = torch.tensor([1.0, -1.0])  # the first bias-corrected Adam step is sign(g)
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0]) - 0.1 * adam * 5 / adam.norm())
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = Lamb([w], lr=0.1, betas=(0.9, 0.999), eps=0.0, weight_decay=0.5)  # decay turns the step, not only scales it
    w.grad = torch.tensor([1.0, -2.0])
    opt.step()
    step = adam + 0.5 * torch.tensor([3.0, 4.0])
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0]) - 0.1 * step * 5 / step.norm())
    run = dataclass_replace(SPEC, optimizer="lamb", steps=30, lr=0.05)
    rows = list(train(trainee(), run, torch.device("cpu"), None, progress=False))
    losses = [r.p50 for r in rows if r.metric == "loss"]
    assert losses[-1] < losses[0]


def test_model_flops_count_weights_outside_embeddings_and_attention():
    from repro.train import model_flops_per_token

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))  # 20 weights outside
    assert model_flops_per_token(model, layers=2, width=4, seq_len=8) == 6 * 20 + 12 * 2 * 4 * 8
    # frozen weights (a prompt or adapters train): no weight gradients, attention's backward still runs
    assert model_flops_per_token(model, layers=2, width=4, seq_len=8, frozen=True) == 4 * 20 + 12 * 2 * 4 * 8
    model.non_embedding_params = lambda: 7  # a model that counts its own (megatron-core's embeddings)
    assert model_flops_per_token(model, layers=1, width=1, seq_len=1) == 6 * 7 + 12


def test_model_flops_are_the_matrix_products_of_a_training_step():
    """Against PyTorch's own count of a GPT-2 step (forward and backward), whose output layer is tied to the
    token embedding: only the biases and the norms' weights (added or scaled, not multiplied) set the two apart."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import GPT2Config, GPT2LMHeadModel

    from repro.train import model_flops_per_token
    config = GPT2Config(vocab_size=300, n_positions=32, n_embd=48, n_layer=2, n_head=4, attn_implementation="eager",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(300, (2, 32))
    with FlopCounterMode(display=False) as counted:
        model(input_ids=ids, labels=ids).loss.backward()
    per_token = model_flops_per_token(model, layers=2, width=48, seq_len=32)
    vectors = sum(p.numel() for p in model.parameters() if p.dim() == 1)  # biases, the norms' scales and shifts
    assert counted.get_total_flops() / ids.numel() == per_token - 6 * vectors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_profiling_a_step_on_the_gpu_times_its_kernels_by_family():
    a = torch.randn(2048, 2048, device="cuda")
    out, families = kernel_time_by_family(lambda: a @ a, torch.device("cuda"))
    (ms, top), (all_ms, _) = families["matmul"], families["all"]
    assert out.shape == a.shape and 0 < ms <= all_ms and len(top) == 1 and top[0][1] == ms


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_step_is_timed_on_the_device_and_the_hosts_own_time_beside_it():
    # each step keeps the device busy for ~20 ms whose launch takes the host microseconds: the step time must see
    # the device's 20 ms (events, no synchronisation between steps), the host time only its launches
    clock = StepClock(torch.device("cuda"), skip=1)
    for _ in range(4):
        with clock.step():
            torch.cuda._sleep(40_000_000)  # cycles: ~20 ms at 2 GHz
    timed = clock.timed()
    device, host = timed["step"], timed["host"]
    assert len(device) == len(host) == 3
    assert min(device) > 0.005 and max(host) < min(device) / 2, (device, host)


def test_off_the_gpu_a_step_is_timed_by_the_wall_clock():
    clock = StepClock(torch.device("cpu"), skip=0)
    with clock.step():
        time.sleep(0.01)
    timed = clock.timed()
    assert timed["step"] == timed["host"] and 0.01 <= timed["host"][0] < 1.0


def test_final_rows_leave_out_a_trainee_that_failed_after_an_evaluation_or_an_earlier_stage():
    """What a failed trainee left (an evaluation before it ran out of memory, a finished stage's throughput) is
    not its final model's: no ratio, average or change may read it."""
    from repro.train import failure_row, final_rows

    def row(provider, metric, value, length):
        return Row(provider, "step", 100, metric, "x", value, extra={"seq_len": length})
    def out_of_memory(provider):
        return failure_row(provider, {"seq_len": 512}, torch.cuda.OutOfMemoryError("CUDA out of memory"))
    rows = [row("a", "val_perplexity", 9.0, 512), row("a", "tokens_per_s", 5.0, 512),
            row("b", "val_perplexity", 8.0, 512), out_of_memory("b"),  # evaluated, then out of memory
            row("c", "tokens_per_s", 6.0, 512), out_of_memory("c")]  # its first stage finished, its second did not
    assert list(final_rows(rows, "val_perplexity", "seq_len")) == [("a", 512)]
    assert list(final_rows(rows, "tokens_per_s", "seq_len")) == [("a", 512)]


@pytest.mark.parametrize("block, task", [("train", "task=lra_listops"),
                                         ("model.train", "task=lm_eval model=trained_tiny")])
def test_a_floor_given_to_the_rsqrt_schedule_which_has_none_is_refused(job_refusal, compose, block, task):
    """min_lr_ratio is where the cosine and linear schedules end; rsqrt would take it and decay as before."""
    from repro.cli import check_job
    given = [*task.split(), "scale=smoke", f"++{block}.min_lr_ratio=0.2"]  # ++: set, or add where it is left out
    message = job_refusal(*given, f"++{block}.schedule=rsqrt")
    assert message.startswith(f"{block}.min_lr_ratio=0.2 would have no effect: {block}.schedule=rsqrt decays"), message
    check_job(compose(*given, f"++{block}.schedule=linear"), given)
