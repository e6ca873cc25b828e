import pytest

from repro.generated import cached_dataset, rows_in_chunks


def _chunk(seed, split, index, count, settings):
    return [(seed, split, index, settings)] * count


def test_rows_come_in_chunk_order_whatever_the_number_of_workers():
    one = list(rows_in_chunks(_chunk, 7, 3, 5, "train", "x", workers=1))
    assert one == list(rows_in_chunks(_chunk, 7, 3, 5, "train", "x", workers=2))
    assert [row[2] for row in one] == [0, 0, 0, 1, 1, 1, 2]
    assert list(rows_in_chunks(_chunk, 0, 3, 5, "train", "x")) == []


def test_an_interrupted_build_is_built_again_and_other_metadata_rebuilds(tmp_path, capsys):
    import datasets as hf

    built = []

    def build(path, fail=False):
        built.append(path.name)
        hf.Dataset.from_list([{"a": len(built)}]).save_to_disk(str(path))
        if fail:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_dataset(tmp_path, "set", {"seed": (1, 2)}, lambda path: build(path, fail=True))
    assert not (tmp_path / "set.json").exists() and not (tmp_path / "set").exists()
    assert cached_dataset(tmp_path, "set", {"seed": (1, 2)}, build)["a"] == [2]
    assert cached_dataset(tmp_path, "set", {"seed": (1, 2)}, build)["a"] == [2] and len(built) == 2
    assert cached_dataset(tmp_path, "set", {"seed": (1, 3)}, build)["a"] == [3]
    assert "regenerating" in capsys.readouterr().out


def test_a_second_job_waits_for_the_build_under_way_and_uses_it(tmp_path, capsys):
    """Two jobs of a sweep (hydra/launcher=local starts them at once) on one cache: the second saw the first's
    folder before its metadata, said 'regenerating' and deleted it while the first was still building."""
    import threading
    import time

    import datasets as hf

    built, started = [], threading.Event()

    def build(path):
        built.append(path)
        hf.Dataset.from_list([{"a": 1}]).save_to_disk(str(path))
        started.set()
        time.sleep(0.5)  # the rest of a long build: the second job starts meanwhile

    loaded = {}

    def job(name):
        loaded[name] = cached_dataset(tmp_path, "set", {"seed": 1}, build)["a"]

    first = threading.Thread(target=job, args=("first",))
    first.start()
    assert started.wait(30)
    job("second")
    first.join()
    assert loaded == {"first": [1], "second": [1]} and len(built) == 1
    out = capsys.readouterr().out
    assert "regenerating" not in out and f"waiting for another job to make {tmp_path / 'set'}" in out


def test_a_whole_cache_in_a_folder_this_job_cannot_write_is_read(tmp_path, monkeypatch):
    """A cache shared read-only (the lock file beside it cannot be made there) still serves what it holds."""
    import datasets as hf

    import repro.generated

    def build(path):
        hf.Dataset.from_list([{"a": 1}]).save_to_disk(str(path))
    cached_dataset(tmp_path, "set", {"seed": 1}, build)

    def read_only(path):
        raise PermissionError(13, "Permission denied", str(path) + ".lock")
    monkeypatch.setattr(repro.generated, "cache_lock", read_only)
    assert cached_dataset(tmp_path, "set", {"seed": 1}, lambda path: pytest.fail("built again"))["a"] == [1]
    with pytest.raises(PermissionError):  # what it lacks it must make, and cannot
        cached_dataset(tmp_path, "set", {"seed": 2}, build)
