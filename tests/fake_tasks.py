"""Tasks that exist only for the engine's tests: what a job does when its points fail, or when it crashes.
Selected with `task.entry=fake_tasks:<name>` where tests/ is on the path (the test process)."""
import os
import signal
import time

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


def crash(cfg, ctx):
    yield from _rows(["ok"])
    raise RuntimeError("the task crashed half-way")


def crash_at_once(cfg, ctx):
    raise RuntimeError("the task crashed before its first row")
    yield


def bad_input(cfg, ctx):
    raise ConfigError("fake.size=-1 must be an integer >= 1")
    yield


def saved_after_first_row(cfg, ctx):
    """Yields a row, then looks at what its job folder holds: a job killed outright here keeps that."""
    import json

    yield from _rows(["ok"])
    saved = json.loads((ctx.output_dir / "record.json").read_text())
    yield from _rows(["ok"] * len(saved["rows"]))


def ctrl_c(cfg, ctx):
    yield from _rows(["ok"])
    raise KeyboardInterrupt  # as Python raises it for Ctrl-C


def sigterm(cfg, ctx):
    yield from _rows(["ok"])
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)  # the handler runs here
