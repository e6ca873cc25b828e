"""Launchers and signals through the real command line, in subprocesses: a multirun through submitit,
training under torchrun with two processes (DDP and FSDP, and a resume), and a run stopped by SIGTERM."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, repro_env, run_repro

pytestmark = pytest.mark.slow
KERNEL = ["kernel.head_dim=[32]", "kernel.causal=[true]", "kernel.settings=null", "kernel.mode=[fwd]"]


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_multirun_through_submitit_local_runs_every_job_and_lists_them(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = run_repro("-m", "hydra/launcher=local", f"hydra.sweep.dir={tmp_path}", "logger=none",
                    "task.entry=fake_tasks:crash,fake_tasks:all_ok", timeout=600, fake_tasks=True)
    assert out.returncode == 1, out.stderr[-3000:]  # one job crashed; the other still ran
    records = sorted(tmp_path.glob("*/record.json"))
    assert [load(p)["status"] for p in records] == ["error", "ok"]
    assert [len(load(p)["rows"]) for p in records] == [1, 2]  # the crashed job's record keeps its row
    assert list(tmp_path.glob(".submitit/*")), "jobs did not go through submitit"
    summary = out.stdout[out.stdout.index("multirun of 2 jobs"):]  # read back from the jobs' records
    assert "1 not ok" in summary and "the task crashed half-way" in summary and "record.json" in summary


def test_a_submitit_job_stopped_by_sigterm_is_recorded_as_killed_and_the_sweep_goes_on(tmp_path):
    """submitit ignores SIGTERM (scancel, a time limit): the job ran on as if nothing had come, to SIGKILL."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = run_repro("-m", "hydra/launcher=local", f"hydra.sweep.dir={tmp_path}", "logger=none",
                    "task.entry=fake_tasks:sigterm,fake_tasks:all_ok", timeout=600, fake_tasks=True)
    assert out.returncode == 1, out.stderr[-3000:]
    stopped = load(tmp_path / "0_flash_kernel" / "record.json")
    assert stopped["status"] == "killed" and stopped["error"] == "stopped by SIGTERM" and len(stopped["rows"]) == 1
    summary = out.stdout[out.stdout.index("multirun of 2 jobs, 1 not ok"):]
    assert [line.split()[1] for line in summary.splitlines()[1:] if line.strip()] == ["killed", "ok"], summary


def test_lm_training_under_torchrun_with_two_gloo_processes_ddp_and_fsdp(tmp_path):
    def torchrun(*overrides):
        # --standalone: the rendezvous on a free port (recent torch does so on one node anyway; older torch takes the
        # fixed 29500, which another test run's torchrun may hold)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "repro.cli", *overrides, "task=flash_gpt2", "logger=none", "attention=[eager]", "train.steps=4",
               f"checkpoint.dir={tmp_path}/ckpt"]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]

    rows = lambda folder: load(folder / "record.json")["rows"]  # noqa: E731
    torchrun("-m", f"hydra.sweep.dir={tmp_path}/sweep", "train.parallel=ddp,fsdp")  # both in one launch
    (ddp,), (fsdp,) = (list((tmp_path / "sweep").glob(f"{n}_*")) for n in (0, 1))
    (tps,) = [r for r in rows(ddp) if r["metric"] == "tokens_per_s"]
    assert tps["extra"]["world_size"] == 2
    losses = lambda rows: [r["p50"] for r in rows if r["metric"] in ("loss", "val_loss")]  # noqa: E731
    assert losses(rows(fsdp)) == pytest.approx(losses(rows(ddp)), rel=1e-4)  # the same training, sharded
    # A run killed after its last step resumes there: rank 0 reads the checkpoint and scatters it to the
    # shards, and the end of the run gathers and saves it again, which must give back the same weights and moments.
    import torch
    path = max((tmp_path / "ckpt").glob("*.pt"), key=lambda p: p.stat().st_mtime)  # the FSDP job's, saved last
    saved = torch.load(path, weights_only=False)
    torch.save({**saved, "finished": False}, path)
    torchrun(f"hydra.run.dir={tmp_path}/again", "train.parallel=fsdp")
    assert losses(rows(tmp_path / "again")) == losses(rows(fsdp))
    again = torch.load(path, weights_only=False)
    assert saved["model"].keys() == again["model"].keys()
    assert all(torch.equal(saved["model"][k], again["model"][k]) for k in saved["model"])
    moments = lambda state: [t for s in state["optimizer"]["state"].values() for t in s.values()]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(moments(saved), moments(again), strict=True))


def torchrun_trains(folder: Path, task: str = "trains", **env: str) -> int:
    """`fake_tasks:<task>` under torchrun, two gloo processes, with `env` added to the environment; its exit status.
    A job still running after two minutes is hung: all of its processes are killed, and the test fails."""
    env = {**repro_env(fake_tasks=True), **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "repro.cli",
           f"task.entry=fake_tasks:{task}", "logger=none", f"hydra.run.dir={folder}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        import psutil

        torchrun = psutil.Process(proc.pid)
        for process in [*torchrun.children(recursive=True), torchrun]:  # the workers are in sessions of their own
            process.kill()
        proc.communicate()
        pytest.fail("the job hung")
    print(err[-3000:])
    return proc.returncode


def test_a_task_that_trains_under_torchrun_joins_the_process_group_through_the_training_loop(tmp_path):
    assert torchrun_trains(tmp_path) == 0
    rows = load(tmp_path / "record.json")["rows"]
    assert rows[0]["provider"] == "u" and rows[0]["status"] == "unsupported"  # every rank's, and a row
    assert [(r["provider"], r["extra"]["world_size"]) for r in rows if r["metric"] == "tokens_per_s"] == \
        [("a", 2), ("b", 2)]


def test_each_rank_draws_its_own_random_numbers_in_training(tmp_path):
    """Every rank is seeded alike (for the same initial weights), but GPUs of a real run draw dropout masks of their
    own: ranks drawing the same would make their gradients less independent."""
    assert torchrun_trains(tmp_path, "draws") == 0
    rows = {r["x_value"]: r["extra"] for r in load(tmp_path / "record.json")["rows"] if r["metric"] == "draw"}
    assert len(rows[0]["draws"]) == len(rows[1]["draws"]) == 2  # a draw a step
    assert not set(rows[0]["draws"]) & set(rows[1]["draws"])
    # after training the ranks draw alike again: a model built next (unsharded under FSDP) starts the same on each
    assert rows[0]["after"] == rows[1]["after"]


def test_a_failure_on_one_rank_ends_a_torchrun_job_rather_than_hanging_it(tmp_path):
    """Under DDP rank 0 alone evaluates: its out of memory there, made a row while the other rank trained on, left
    the ranks in different candidates' collectives."""
    assert torchrun_trains(tmp_path, FAKE_EVALUATION_OOM_RANK="0") != 0
    record = load(tmp_path / "record.json")
    assert record["status"] == "oom" and "made up, on rank 0 alone" in record["error"]
    assert {r["provider"] for r in record["rows"]} == {"u", "a"}  # a's rows before the failure; b never ran


def test_a_run_stopped_by_sigterm_keeps_its_rows_as_killed_and_says_so_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "-m", "repro.cli", "task=flash_gpt2", "logger=none", "attention=[eager]",
                             "checkpoint.dir=null", "train.steps=100000", "train.log_every=1", "record_every_s=0.2",
                             f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "record.json"  # saved every record_every_s while the run goes on
    deadline = time.time() + 120
    while time.time() < deadline and not (partial.exists() and '"loss"' in partial.read_text()):
        time.sleep(0.2)
    saved_while_running = partial.exists() and '"loss"' in partial.read_text()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    record = load(tmp_path / "record.json")
    assert record["status"] == "killed" and any(r["metric"] == "loss" for r in record["rows"])
    assert record["error"] == "stopped by SIGTERM"
    assert proc.returncode == 143 and "Traceback" not in err and "repro: stopped by SIGTERM;" in err
    assert saved_while_running  # the record of a run that dies without a word (SIGKILL) still holds its rows


FINALIZER_GETS_SIGTERM = """
import os, signal, time
from repro.cli import Stopped, stop_on_sigterm

class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100_000):  # the handler runs here, in the finalizer, which Python lets raise nothing
            pass

stop_on_sigterm()
try:
    Finalized()
    for _ in range(100):
        time.sleep(0.05)
    print("went on")
except Stopped as exc:
    print(exc)
"""


def test_a_sigterm_that_comes_during_a_finalizer_still_stops_the_run():
    out = subprocess.run([sys.executable, "-c", FINALIZER_GETS_SIGTERM], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "stopped by SIGTERM" and "Traceback" not in out.stderr, (out.stdout, out.stderr)


@pytest.mark.parametrize("submitit_does", ["give up", "requeue"])
def test_a_submitit_time_limit_stops_the_job_past_every_point_guard(monkeypatch, submitit_does):
    """submitit's handler of SLURM's warning raises an Exception (timed out, not checkpointable) or requeues and
    exits: either way what it raises passes every per-point guard as an interrupt that carries it (run_job
    writes the record as killed, then raises it for submitit), and the handler is wrapped once."""
    from repro.cli import SubmititStop, stop_after_submitit_signal

    raised = RuntimeError("Job not requeued because: timed-out and not checkpointable.") \
        if submitit_does == "give up" else SystemExit(-1)

    def submitits(signum, frame):
        raise raised
    previous = signal.signal(signal.SIGUSR2, submitits)
    try:
        stop_after_submitit_signal()
        stop_after_submitit_signal()  # a second job in the process wraps nothing more
        with pytest.raises(SubmititStop) as stop:
            try:
                os.kill(os.getpid(), signal.SIGUSR2)
                time.sleep(1)  # the handler runs here
            except Exception:  # noqa: BLE001 - a point's guard, as in repro.bench
                pytest.fail("the signal reached a per-point guard as an Exception")
        assert stop.value.original is raised and isinstance(stop.value, KeyboardInterrupt)
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_sigterm_stops_a_submitit_job_unless_submitits_signal_follows_it(monkeypatch):
    """SLURM sends a preemption's SIGTERM just before the signal on which submitit requeues the job: stopped on the
    SIGTERM, the job would never be requeued. After that signal SIGTERM is ignored again (SLURM ends a job it
    requeued with one, while run_job writes its record)."""
    from repro import cli

    monkeypatch.setattr(cli, "SUBMITIT_SIGNAL_WAIT_S", 1)
    ignored = []

    def submitits(signum, frame):
        raise SystemExit(-1)  # requeued
    handlers = {number: signal.getsignal(number) for number in (signal.SIGUSR2, signal.SIGTERM, signal.SIGALRM)}
    try:
        for then_submitits in (True, False):
            signal.signal(signal.SIGUSR2, submitits)
            signal.signal(signal.SIGTERM, lambda signum, frame: ignored.append(signum))  # as submitit does
            cli.stop_after_submitit_signal()
            expected = cli.SubmititStop if then_submitits else cli.Stopped
            with pytest.raises(expected) as stop:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
                if then_submitits:
                    os.kill(os.getpid(), signal.SIGUSR2)
                time.sleep(2)  # past the wait
            if then_submitits:
                os.kill(os.getpid(), signal.SIGTERM)  # SLURM's, after the requeue
                time.sleep(1.5)  # neither it nor the first one stops the job now
            else:
                assert str(stop.value) == "stopped by SIGTERM"
        assert len(ignored) == 3  # each logged by submitit's handler
    finally:
        signal.alarm(0)
        for number, handler in handlers.items():
            signal.signal(number, handler)
