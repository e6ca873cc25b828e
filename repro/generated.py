"""Generated datasets: made in seeded chunks in parallel, and kept on disk as `datasets` Arrow folders beside a
metadata file that names everything they were made from.

A task's generator seeds each chunk from (seed, split, chunk index) alone, so what it makes does not depend on
the number of worker processes; the chunk size is then part of what a seed means.
"""
from __future__ import annotations

import fcntl
import json
import shutil
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm.auto import tqdm

from repro.context import available_cores
from repro.records import build_folder_atomically, write_json_atomic


def rows_in_chunks(make_chunk: Callable[..., list], n: int, chunk: int, seed: int, split: str, settings: Any,
                   workers: int | None = None, desc: str = "") -> Iterator:
    """The rows of `make_chunk(seed, split, index, count, settings)` for each chunk of `chunk` of the `n` rows,
    in order, made in `workers` processes (default: one per available core)."""
    jobs = [(seed, split, i, min(chunk, n - start), settings) for i, start in enumerate(range(0, n, chunk))]
    if not jobs:
        return
    workers = min(available_cores() if workers is None else workers, len(jobs))
    with (ProcessPoolExecutor(workers) if workers > 1 else nullcontext()) as pool:
        chunks = (pool.map if pool else map)(make_chunk, *zip(*jobs))
        for rows in tqdm(chunks, total=len(jobs), desc=desc, unit="chunk", disable=len(jobs) < 2):
            yield from rows


@contextmanager
def cache_lock(path: Path):
    """Held while the cache entry `path` is checked and made: a second job (hydra/launcher=local starts a sweep's
    jobs at once) waits for the first, then finds its result. The lock file beside `path` is left in place: a job
    that removed it would let the next lock a new file while another still holds the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another job to make {path}", flush=True)
            fcntl.flock(file, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def cached_dataset(cache_dir: str | Path, name: str, meta: dict, build: Callable[[Path], None]):
    """The `datasets.Dataset` that `build(path)` saves under `cache_dir/name`: loaded from there when the metadata
    file beside it (`name.json`) holds `meta`, else built anew. It is built in a sibling folder and renamed into
    place, and the metadata is written last, so that neither an interrupted build nor one still running passes
    for a whole one; one job at a time checks and builds it (`cache_lock`)."""
    import datasets as hf

    path = Path(cache_dir) / name
    meta_path = path.with_name(name + ".json")
    meta = json.loads(json.dumps(meta))  # as it reads back from the file (tuples become lists)

    def stored():
        return json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if path.is_dir() and stored() == meta:  # whole already: read without the lock, which a read-only cache refuses
        return hf.load_from_disk(str(path))
    with cache_lock(path):
        if path.is_dir():
            if stored() == meta:  # made by the job this one waited for
                return hf.load_from_disk(str(path))
            print(f"cache {path} was made with {stored() or 'no metadata'}, not {meta}: regenerating", flush=True)
            shutil.rmtree(path)
        meta_path.unlink(missing_ok=True)
        build_folder_atomically(path, build)
        write_json_atomic(meta_path, meta)
        return hf.load_from_disk(str(path))
