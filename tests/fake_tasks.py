"""Tasks that exist only for the engine's tests: what a job does when its points fail, or when it crashes.
Selected with `task.entry=fake_tasks:<name>` where tests/ is on the path (the test process)."""
import os
import signal
import time
from types import SimpleNamespace

import torch

from repro.context import ConfigError
from repro.records import Row


def _rows(statuses):
    for i, status in enumerate(statuses):
        yield Row("p", "x", i, "time", "ms", 1.0 if status == "ok" else None, status=status,
                  message="" if status == "ok" else f"point {i} {status}")


def all_fail(cfg, ctx):
    yield from _rows(["error", "oom", "unsupported"])


def all_oom(cfg, ctx):
    yield from _rows(["oom", "oom", "unsupported"])


def some_fail(cfg, ctx):
    yield from _rows(["ok", "error", "ok"])


def all_ok(cfg, ctx):
    yield from _rows(["ok", "ok"])


def yields_nothing(cfg, ctx):
    yield from _rows([])


def crash(cfg, ctx):
    yield from _rows(["ok"])
    raise RuntimeError("the task crashed half-way")


def crash_at_once(cfg, ctx):
    raise RuntimeError("the task crashed before its first row")
    yield


def bad_input(cfg, ctx):
    raise ConfigError("fake.size=-1 must be an integer >= 1")
    yield


def bad_input_after_a_row(cfg, ctx):
    yield from _rows(["ok"])
    raise ConfigError("fake.texts=['gone'] cannot be loaded")


def saved_after_first_row(cfg, ctx):
    """Yields a row, then looks at what its job folder holds: a job killed outright here keeps that."""
    import json

    yield from _rows(["ok"])
    saved = json.loads((ctx.output_dir / "record.json").read_text())
    yield from _rows(["ok"] * len(saved["rows"]))


def saved_during_a_pause(cfg, ctx):
    """Yields three rows at once, then waits, as a long step would, until its job folder's record holds them (5 s
    at most), and yields a row for each row the record held."""
    import json

    yield from _rows(["ok"] * 3)
    saved, deadline = [], time.monotonic() + 5
    while len(saved) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
        saved = json.loads((ctx.output_dir / "record.json").read_text())["rows"]
    yield from _rows(["ok"] * len(saved))


def ctrl_c(cfg, ctx):
    yield from _rows(["ok"])
    raise KeyboardInterrupt  # as Python raises it for Ctrl-C


def sigterm(cfg, ctx):
    yield from _rows(["ok"])
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)  # the handler runs here


def killed_outright(cfg, ctx):
    """A row, then its process killed outright (SIGKILL, as the kernel's out-of-memory killer does). In a job
    process of its own alone (hydra/launcher=local): run in the test process, it would kill that."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        raise RuntimeError("fake_tasks:killed_outright kills its own process: run it with hydra/launcher=local")
    yield from _rows(["ok"])
    os.kill(os.getpid(), signal.SIGKILL)


class _Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x, y):
        return SimpleNamespace(loss=((self.lin(x).squeeze(-1) - y) ** 2).mean())


def _regression_batches(step, rank, size):
    """A step's batch of `_Regression`, a pure function of (step, rank) as `Trainee.batches` must be."""
    from repro.train import step_generator

    x = torch.randn(4, 4, generator=step_generator(0, step, rank))
    return [{"x": x, "y": x.sum(-1)}]


def _trainee(name, evaluate=lambda model: [], model=_Regression):
    """A `Candidate`'s build: a tiny regression (`model()`, made from seed 0) trained on `_regression_batches`."""
    from repro.train import Trainee

    torch.manual_seed(0)
    return Trainee(name, model(), _regression_batches, evaluate, tokens_per_step=4, flops_per_token=1.0,
                   fingerprint=name)


def trains(cfg, ctx):
    """A candidate unsupported where it is built, then two tiny regressions, through the shared training loop as a
    training task trains its candidates: it joins no process group itself. With FAKE_EVALUATION_OOM_RANK=<rank> in
    the environment, the first regression's evaluation runs out of memory on that rank alone."""
    from repro.bench import Unsupported
    from repro.context import world
    from repro.train import Candidate, TrainSpec, train_all

    oom_rank = int(os.environ.get("FAKE_EVALUATION_OOM_RANK", -1))

    def candidate(name):
        def evaluate(model):
            if name == "a" and world()[0] == oom_rank:
                raise torch.OutOfMemoryError(f"CUDA out of memory (made up, on rank {oom_rank} alone)")
            return [Row(name, "step", 0, "val_loss", "nats", 0.0, n=1)]

        return Candidate(name, {}, lambda: _trainee(name, evaluate))

    def unsupported():
        raise Unsupported("u needs what this machine lacks")

    spec = TrainSpec(steps=4, lr=1e-2, precision="fp32", eval_every=2, log_every=1, timing_skip_steps=0)
    yield from train_all([Candidate("u", {}, unsupported), candidate("a"), candidate("b")], spec, ctx.device, None)


def trains_until_killed(cfg, ctx):
    """Two tiny regressions, a then b, through the shared training loop with checkpoints in FAKE_CHECKPOINTS; with
    FAKE_KILL_AT=<step>, the job is stopped (as by SIGTERM) once b has logged that step."""
    from repro.train import Candidate, TrainSpec, train_all

    def candidate(name):
        return Candidate(name, {}, lambda: _trainee(name))

    kill_at = int(os.environ.get("FAKE_KILL_AT", -1))  # unset: never (as FAKE_EVALUATION_OOM_RANK)
    spec = TrainSpec(steps=4, lr=1e-2, precision="fp32", log_every=1, timing_skip_steps=1, checkpoint_every_s=0.0)
    for row in train_all([candidate("a"), candidate("b")], spec, ctx.device, os.environ["FAKE_CHECKPOINTS"]):
        yield row
        if row.provider == "b" and row.metric == "lr" and row.x_value == kill_at:
            raise KeyboardInterrupt


def draws(cfg, ctx):
    """A tiny regression whose forward draws a random number in each training step (where dropout draws its masks),
    trained through the shared training loop; then every rank's draws, gathered, as a row each."""
    import torch.distributed as dist

    from repro.train import Candidate, TrainSpec, train_all

    drawn = []

    class Drawing(_Regression):
        def forward(self, x, y):
            if self.training:
                drawn.append(torch.rand(()).item())
            return super().forward(x, y)

    spec = TrainSpec(steps=2, lr=1e-2, precision="fp32", timing_skip_steps=0)
    yield from train_all([Candidate("d", {}, lambda: _trainee("d", model=Drawing))], spec, ctx.device, None)
    drawn.append(torch.rand(()).item())  # after training: what a next build would draw
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, drawn)
    for rank, values in enumerate(every):
        yield Row("d", "rank", rank, "draw", "", values[0], n=len(values) - 1,
                  extra={"draws": values[:-1], "after": values[-1]})
