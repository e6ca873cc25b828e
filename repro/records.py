"""Run records: one JSON file per job, schema-versioned, written atomically."""
from __future__ import annotations

import gzip
import itertools
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .claims import SCALES

SCHEMA_VERSION = 1
ROW_STATUSES = ("ok", "oom", "unsupported", "error")
FAILED_ROW_STATUSES = ("oom", "error")  # tried and failed; "unsupported" was never tried
RUN_STATUSES = ("running", "ok", "oom", "error", "killed")  # killed: stopped by a signal; its rows stand


@dataclass
class Row:
    """One measured value, in long format (Liger-Kernel style): one row per provider, point and metric."""

    provider: str
    x_name: str
    x_value: Any
    metric: str
    unit: str
    p50: float | None = None
    p20: float | None = None
    p80: float | None = None
    n: int = 0
    status: str = "ok"
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.status not in ROW_STATUSES:
            raise ValueError(f"row status {self.status!r} is not one of {ROW_STATUSES}")
        for name in ("p50", "p20", "p80"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ValueError(f"row {self.provider}/{self.metric}: {name}={value!r} is not a finite number")
        if not isinstance(self.extra, dict):
            raise ValueError(f"row {self.provider}/{self.metric}: extra is {type(self.extra).__name__}, not an object")

    def get(self, key: str) -> Any:
        """A row's value by name, looking in its own fields, then `x_name`, then `extra`."""
        if key in ("provider", "metric", "unit", "status", "x_name", "x_value"):
            return getattr(self, key)
        if key == self.x_name:
            return self.x_value
        return self.extra.get(key)


def largest_x_within(rows: list[Row], reference: float, tolerance: float, higher_is_better: bool) -> float | None:
    """The largest x up to which every row, at that x and at every smaller one, stays within `tolerance`
    (relative) of `reference`; None where the smallest x already does not. "Up to 5x without loss" means at
    every compression below 5x too: a lucky point beyond a failed one does not count, nor beyond a point that
    failed to run (a row of FAILED_ROW_STATUSES: out of memory, an error). A point never tried (no value) is
    passed over."""
    slack = tolerance * abs(reference)

    def within(r: Row) -> bool:
        if r.status in FAILED_ROW_STATUSES:
            return False
        return r.p50 >= reference - slack if higher_is_better else r.p50 <= reference + slack

    rows = [r for r in rows if r.x_value is not None and (r.p50 is not None or r.status in FAILED_ROW_STATUSES)]
    largest = None
    for x in sorted({r.x_value for r in rows}):
        if not all(within(r) for r in rows if r.x_value == x):
            break
        largest = x
    return largest


@dataclass
class RunRecord:
    task: str
    paper: str
    scale: str
    claim_ids: list[str]
    config: dict[str, Any]
    overrides: list[str]
    env: dict[str, Any]
    started: str
    finished: str | None = None
    status: str = "running"
    error: str | None = None
    rows: list[Row] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunRecord":
        """A record from its JSON; ValueError naming what is wrong with it, whatever that is."""
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            found = data.get("schema_version") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not an effrepro run record of schema {SCHEMA_VERSION} (found {found!r})")
        _check_types(data, _FIELD_TYPES)
        for key in ("gpu_name", "git_sha"):  # the report names cards and commits by them
            value = data.get("env", {}).get(key)
            if not isinstance(value, (str, type(None))):
                raise ValueError(f"malformed run record: env.{key}={value!r} is not a string or null")
        rows = data.get("rows", [])
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(f"malformed run record: rows[{i}] is {type(row).__name__}, not an object")
            _check_row(f"rows[{i}]", row)
        _check_points(rows)
        _check_config(data.get("config", {}))
        try:
            record = cls(**{**data, "rows": [Row(**row) for row in rows]})
        except TypeError as exc:
            raise ValueError(f"malformed run record: {exc}") from None
        if record.status not in RUN_STATUSES:
            raise ValueError(f"run status {record.status!r} is not one of {RUN_STATUSES}")
        if record.scale not in SCALES:
            raise ValueError(f"run scale {record.scale!r} is not one of {SCALES}")
        return record

    @property
    def gpu_name(self) -> str:
        return self.env.get("gpu_name") or "cpu"


_FIELD_TYPES = {"task": str, "paper": str, "scale": str, "claim_ids": list, "config": dict, "overrides": list,
                "env": dict, "started": str, "finished": (str, type(None)), "status": str, "error": (str, type(None)),
                "rows": list}
_ROW_FIELD_TYPES = {"provider": str, "x_name": str, "metric": str, "unit": str, "message": str}
_SCALARS = (str, int, float, bool, type(None))


def _check_types(data: dict[str, Any], types: dict[str, type | tuple[type, ...]], where: str = "") -> None:
    for key, kind in types.items():
        if key in data and not isinstance(data[key], kind):
            allowed = " or ".join("null" if k is type(None) else k.__name__ for k in
                                  (kind if isinstance(kind, tuple) else (kind,)))
            raise ValueError(f"malformed run record: {where}{key} is {type(data[key]).__name__}, not {allowed}")


def _check_row(where: str, row: dict[str, Any]) -> None:
    """A row's names are strings, and its point (x_value) and panel (the series and mode extras) single values:
    the report groups rows by them, and a list or an object there would stop it with a traceback."""
    _check_types(row, _ROW_FIELD_TYPES, f"{where}.")
    if not isinstance(row.get("x_value"), _SCALARS):
        raise ValueError(f"malformed run record: {where}.x_value={row['x_value']!r} is not a single value")
    extra = row.get("extra")
    for key in ("series", "mode"):
        if isinstance(extra, dict) and not isinstance(extra.get(key), _SCALARS):
            raise ValueError(f"malformed run record: {where}.extra.{key}={extra[key]!r} is not a single value")


def _check_points(rows: list[dict[str, Any]]) -> None:
    """The points (x_value) of one x_name are all numbers or all names: the report sorts them (the last step, the
    largest compression within a quality tolerance), and a name among numbers stopped it with a TypeError."""
    first: dict[str, tuple[str, int]] = {}
    for i, row in enumerate(rows):
        if row.get("x_value") is None:
            continue
        kind = "text" if isinstance(row["x_value"], str) else "a number"
        seen, where = first.setdefault(row.get("x_name"), (kind, i))
        if kind != seen:
            raise ValueError(f"malformed run record: rows[{i}].x_value={row['x_value']!r} is {kind}, where "
                             f"rows[{where}].x_value of x_name {row.get('x_name')!r} is {seen}")


def _check_config(config: dict[str, Any]) -> None:
    """The parts of the config that the report reads: the task's section (the metrics it plots) and the model's
    name (which a claim's source names); another type there stopped the report with a TypeError."""
    task, model = config.get("task"), config.get("model")
    if not isinstance(task, (dict, type(None))):
        raise ValueError(f"malformed run record: config.task is {type(task).__name__}, not an object or null")
    if isinstance(model, dict) and not isinstance(model.get("name"), (str, type(None))):
        raise ValueError(f"malformed run record: config.model.name={model['name']!r} is not a string or null")


def _dumps(data: Any) -> str:
    """Indented JSON, except a record's rows: one compact line each, so records stay small and diffable."""
    if not (isinstance(data, dict) and isinstance(data.get("rows"), list) and data["rows"]):
        return json.dumps(data, indent=1, default=str) + "\n"
    head = json.dumps({k: v for k, v in data.items() if k != "rows"}, indent=1, default=str)
    rows = ",\n".join("  " + json.dumps(r, separators=(",", ":"), default=str) for r in data["rows"])
    return head[:-2] + ',\n "rows": [\n' + rows + "\n ]\n}\n"


def _written_beside(path: Path, write: Callable[[Path], None]) -> Path:
    """A temporary file beside `path`, written by `write` and flushed to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; results and caches are meant to be shared
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _sync_directory(directory: Path) -> None:
    """Flush a folder's entries, so that a rename into it outlives a crash of the machine, not only of the run.
    Best effort: some platforms and filesystems cannot open or sync a folder."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write` a temporary file beside `path`, flush it to disk, then rename it over `path`: a reader (or a
    killed run) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = _written_beside(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def build_folder_atomically(folder: Path, build: Callable[[Path], None]) -> None:
    """`build` a folder beside `folder` (`<name>.partial`, what an interrupted build left there removed first),
    then rename it into `folder`'s place: a reader finds the old folder, none, or the new one whole."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    build(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)  # atomic: both are in one folder


def _json_writer(data: Any) -> Callable[[Path], None]:
    return lambda file: file.write_text(_dumps(data))


def write_json_atomic(path: Path, data: Any) -> None:
    replace_atomically(path, _json_writer(data))


def save_record(record: RunRecord, path: Path) -> None:
    write_json_atomic(path, record.to_json())


def _same_name_records(path: Path):
    """`path` (name.json), then name_dup2.json, name_dup3.json, ...: where records of runs that began in the same
    second as one another go (`save_new_record`)."""
    yield path
    for n in itertools.count(2):
        yield path.with_name(f"{path.name.removesuffix('.json')}_dup{n}.json")


def _taken(target: Path) -> bool:
    return target.exists() or target.with_name(target.name + ".gz").exists()  # as written, or packed


def save_new_record(record: RunRecord, path: Path) -> Path:
    """Save `record` at `path` (`name.json`), or where a record is there already, packed or not (another run of
    the same task, scale and card that began in the same second), at name_dup2.json, name_dup3.json, ...: the
    first free. The name is taken by a hard link to the finished file, which fails where it exists, so that two
    runs ending together never write one file and a reader never sees half of one. Returns where it went."""
    path = Path(path)
    tmp = _written_beside(path, _json_writer(record.to_json()))
    try:
        for target in _same_name_records(path):
            if _taken(target):
                continue
            try:
                os.link(tmp, target)
            except FileExistsError:
                continue
            except OSError:  # a filesystem without hard links: take the name with an empty file, then fill it
                try:
                    open(target, "x").close()
                except FileExistsError:
                    continue
                os.replace(tmp, target)
            # (`pack_records` writes name.json.gz before it removes name.json: a name being packed is never free)
            _sync_directory(target.parent)
            return target
    finally:
        tmp.unlink(missing_ok=True)


def committed_copy(record: RunRecord, path: Path) -> Path | None:
    """Where `save_new_record(record, path)` put `record`: the first of `path`'s same-name records whose run it
    is (None where there is none)."""
    for candidate in _same_name_records(Path(path)):
        if not _taken(candidate):
            return None
        stored = candidate if candidate.exists() else candidate.with_name(candidate.name + ".gz")
        try:
            found = load_record(stored)
        except (OSError, ValueError):
            continue
        if (found.started, found.finished, found.overrides, found.env) == \
                (record.started, record.finished, record.overrides, record.env):
            return stored


RECORD_SUFFIXES = (".json", ".json.gz")  # a record as written, or packed (`pack_records`)
JOB_RECORD = "record.json"  # a job's record in its Hydra folder (`repro.cli`)
PACK_ABOVE_BYTES = 1 << 20


def load_record(path: Path) -> RunRecord:
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rt") as fh:
        data = json.load(fh)
    return RunRecord.from_json(data)


def load_records(root: Path) -> tuple[list[tuple[Path, RunRecord]], list[tuple[Path, str]]]:
    """All run records under `root` (`RECORD_SUFFIXES`), oldest first, and (file, why) for each file that could
    not be used. Below a job's folder (one holding its `JOB_RECORD`) the files are what the job wrote beside its
    record (a saved prompt's PEFT config, W&B's), not records: a report of an outputs folder does not name them."""
    root = Path(root)
    records, problems = [], []
    for path in sorted(p for p in root.rglob("*") if p.name.endswith(RECORD_SUFFIXES) and p.is_file()):
        if path.with_name(path.name + ".gz").is_file():  # packed (`pack_records`), the plain copy not yet removed
            continue
        if any((folder / name).is_file() for folder in path.parents[1:] if folder.is_relative_to(root)
               for name in (JOB_RECORD, JOB_RECORD + ".gz")):  # a record as written, or packed by an earlier report
            continue
        try:
            records.append((path, load_record(path)))
        except (OSError, ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
            problems.append((path, str(exc)))
    records.sort(key=lambda item: item[1].started)
    return records, problems


def pack_records(root: Path, above_bytes: int = PACK_ABOVE_BYTES) -> list[Path]:
    """Gzip each record under `root` larger than `above_bytes` into NAME.json.gz beside it, and remove the plain
    file; return the packed files. Committed records must travel with the tree to a lent GPU machine, which takes
    64 MiB at most, and a long sweep's record is megabytes of text (lean_decode's: 2.8 MB, a tenth of that packed).
    A file that does not load as a record is left as it is."""
    packed = []
    for path in sorted(Path(root).rglob("*.json")):
        if path.stat().st_size <= above_bytes:
            continue
        try:
            load_record(path)
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        target = path.with_name(path.name + ".gz")
        raw = path.read_bytes()
        replace_atomically(target, lambda tmp: tmp.write_bytes(gzip.compress(raw, mtime=0)))
        path.unlink()
        packed.append(target)
    return packed
