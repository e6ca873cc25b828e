"""LRA data: ListOps and Pathfinder generators (labels, bounds, determinism), the dataset cache, and the real-data
loaders' offline behaviour. CPU only, a few seconds."""
import json

import numpy as np
import pytest

from tasks.lra import data


def reachable(lit: np.ndarray, start: tuple[int, int], step: int) -> np.ndarray:
    """Lit pixels reached from `start` by hops of at most `step` pixels (Chebyshev) between lit pixels."""
    seen = np.zeros_like(lit)
    seen[start] = True
    todo = [start]
    while todo:
        y, x = todo.pop()
        y0, x0 = max(y - step, 0), max(x - step, 0)
        window = lit[y0:y + step + 1, x0:x + step + 1] & ~seen[y0:y + step + 1, x0:x + step + 1]
        for dy, dx in zip(*np.nonzero(window)):
            seen[y0 + dy, x0 + dx] = True
            todo.append((y0 + dy, x0 + dx))
    return seen


def markers(image: np.ndarray) -> list[tuple[int, int]]:
    """A pixel of each marker: the only white blobs where paths are dimmer than white (32 to 128 px)."""
    white, found = image == 255, []
    while white.any():
        found.append(tuple(np.argwhere(white)[0]))
        white &= ~reachable(white, found[-1], 1)
    return found


def check_connectivity(images: np.ndarray, labels: np.ndarray, size: int) -> None:
    step = data.PATHFINDER_SIZES[size].bridge
    for image, label in zip(images, labels):
        a, b = markers(image)
        assert reachable(image > 0, a, step)[b] == bool(label)


# ---------------------------------------------------------------------------------------------------- ListOps

def test_listops_labels_lengths_and_structure():
    rows = data.generate_listops(40, 0, workers=1)
    for source, label in rows:
        tokens = source.split()
        assert 500 < len(tokens) < 2000
        assert 0 <= label <= 9 and label == data.evaluate_listops(source)
        assert data.encode_listops(source) == [data.LISTOPS_VOCAB.index(t) for t in tokens]
        arguments = []  # per open operator, its arguments so far
        for token in tokens:
            if token == "]":
                assert 2 <= arguments.pop() <= 10
                continue
            if arguments:
                arguments[-1] += 1
            if token in data.OPERATORS:
                arguments.append(0)
                assert len(arguments) < 10  # operators at depths 1-9, so leaves at most at 10
    assert len({label for _, label in rows}) > 5


def test_evaluator_on_known_expressions():
    assert data.evaluate_listops("[MAX 2 9 [MIN 4 7 ] 0 ]") == 9
    assert data.evaluate_listops("[MED 1 2 3 4 ]") == 2  # median 2.5 rounds down, as LRA's int(np.median)
    assert data.evaluate_listops("[MED 3 [SM 5 7 ] 9 ]") == 3
    assert data.evaluate_listops("[SM 5 7 [MIN 9 8 ] ]") == 0
    assert data.evaluate_listops(["7"]) == 7


def test_listops_deterministic_by_seed_whatever_the_workers():
    short = dict(min_length=20, max_length=200)
    rows = data.generate_listops(70, 1, workers=1, **short)  # three chunks
    assert rows == data.generate_listops(70, 1, workers=2, **short)
    assert rows != data.generate_listops(70, 2, workers=1, **short)
    assert rows != data.generate_listops(70, 1, split="val", workers=1, **short)
    assert all(20 < len(source.split()) < 200 for source, _ in rows)


def test_listops_rejects_impossible_lengths():
    with pytest.raises(ValueError, match="min_length=5"):
        data.generate_listops(1, 0, max_depth=1, min_length=5)
    # a tree has 1 token or at least 4: none lies strictly between 2 and 4 (rejection sampling would never end)
    with pytest.raises(ValueError, match="min_length=2 and max_length=4"):
        data.generate_listops(1, 0, min_length=2, max_length=4)
    # with two arguments an operator adds 3k tokens: 1, 4, 7, 10, ... and nothing between 4 and 7
    with pytest.raises(ValueError, match="min_length=4 and max_length=7"):
        data.generate_listops(1, 0, max_depth=3, max_args=2, min_length=4, max_length=7)
    assert [len(s.split()) for s, _ in data.generate_listops(3, 0, min_length=2, max_length=5, workers=1)] == [4] * 3


def test_listops_refuses_a_window_trees_practically_never_reach(monkeypatch):
    # possible (ten levels of ten arguments can be that long) but out of reach in practice: generation hung
    far = dict(min_length=10000, max_length=20000)
    with pytest.raises(ValueError, match=r"practically never .*min_length=10000 and max_length=20000.*longest below "
                                         r"max_length had \d+ tokens"):
        data.generate_listops(1, 0, **far)
    # a window the fixed sample reached once but a chunk then does not: the chunk fails instead of hanging
    monkeypatch.setattr(data, "MAX_REJECTIONS", 100)
    with pytest.raises(ValueError, match="100 trees in a row had no length strictly between min_length=10000"):
        data._listops_chunk(0, "train", 0, 1, dict(max_depth=10, max_args=10, **far))


# ------------------------------------------------------------------------------------------------- Pathfinder

@pytest.fixture(scope="module")
def pathfinder32():
    return data.generate_pathfinder(64, 0, size=32, workers=2)


def test_pathfinder_shapes_and_balance(pathfinder32):
    images, labels = pathfinder32
    assert images.shape == (64, 32, 32) and images.dtype == np.uint8
    assert labels.shape == (64,) and set(labels) == {0, 1} and labels.sum() == 32


def test_pathfinder_label_is_connectivity(pathfinder32):
    check_connectivity(*pathfinder32, size=32)


def test_pathfinder_deterministic_whatever_the_workers(pathfinder32):
    images, labels = data.generate_pathfinder(32, 0, size=32, workers=1)  # the first chunk alone, in-process
    assert np.array_equal(images, pathfinder32[0][:32]) and np.array_equal(labels, pathfinder32[1][:32])
    assert not np.array_equal(data.generate_pathfinder(2, 1, workers=1)[0], data.generate_pathfinder(2, 0)[0])


@pytest.mark.parametrize("size", [64, 128])
def test_path_x_sizes(size):
    images, labels = data.generate_pathfinder(2, 0, size=size, workers=1)
    assert images.shape == (2, size, size) and images.dtype == np.uint8 and sorted(labels) == [0, 1]
    check_connectivity(images, labels, size)


def test_path_256_and_difficulties():
    images, labels = data.generate_pathfinder(2, 0, size=256, difficulty="intermediate", workers=1)
    assert images.shape == (2, 256, 256) and sorted(labels) == [0, 1]
    easy, _ = data.generate_pathfinder(4, 0, difficulty="easy", workers=1)
    hard, _ = data.generate_pathfinder(4, 0, difficulty="hard", workers=1)
    assert (easy > 0).sum() < (hard > 0).sum()  # shorter paths, fewer pixels


@pytest.mark.parametrize("size, difficulty, n", [(32, "hard", 64), (32, "easy", 32), (64, "hard", 32),
                                                (128, "hard", 64), (256, "hard", 8)])
def test_every_snake_has_its_full_length(monkeypatch, size, difficulty, n):
    # A snake that backtracked at a dead end used to end a paddle short for each take-back (at 128 px hard, 1 target
    # snake in 40 had its 14), and the end marker went on the shortened snake.
    drawn, render = [], data._Canvas.render
    monkeypatch.setattr(data._Canvas, "render", lambda canvas: drawn.append(canvas) or render(canvas))
    data.generate_pathfinder(n, 0, size=size, difficulty=difficulty, workers=1)  # in this process
    length = data.PATHFINDER_DIFFICULTIES[difficulty]
    assert len(drawn) == n
    for canvas in drawn:
        assert len(canvas.strokes[0]) == len(canvas.strokes[1]) == length
        assert all(len(canvas.strokes[obj]) == length // 3 for obj in canvas.strokes if obj >= 2)  # distractors
        (start, end) = canvas.markers
        assert start[1] == 0 and end[1] == length - 1  # on a target's origin and on a target's last paddle


def test_pathfinder_image_gives_up_after_its_trials(monkeypatch):
    tries = []
    monkeypatch.setattr(data._Canvas, "targets", lambda *args: tries.append(args) and False)
    monkeypatch.setattr(data, "IMAGE_TRIALS", 5)
    with pytest.raises(RuntimeError, match="size=32: two target snakes of 14 paddles .* in 5 fresh images"):
        data.generate_pathfinder(1, 0, workers=1)
    assert len(tries) == 5


def test_pathfinder_rejects_bad_size_and_difficulty():
    with pytest.raises(ValueError, match=r"size=48 .*\[32, 64, 128, 256\]"):
        data.generate_pathfinder(1, 0, size=48)
    with pytest.raises(ValueError, match=r"difficulty='medium' .*'easy', 'intermediate', 'hard'"):
        data.generate_pathfinder(1, 0, difficulty="medium")
    with pytest.raises(ValueError, match="split='dev'"):
        data.generate_pathfinder(1, 0, split="dev")


# ------------------------------------------------------------------------------------------------------ cache

def test_cache_reuses_only_an_identical_build(tmp_path, capsys, monkeypatch):
    short = dict(min_length=10, max_length=60)

    def load(seed):
        ds = data.load_or_generate("listops", "train", 40, seed, tmp_path, workers=1, **short)
        return ds["source"], capsys.readouterr().out

    first, out = load(0)
    assert "Generating" in out
    again, out = load(0)
    assert again == first and "Generating" not in out
    other, out = load(1)
    assert other != first and "Generating" in out

    version = data.GENERATOR_VERSION
    meta_path = next(tmp_path.glob(f"listops-*seed0-v{version}.json"))
    meta = json.loads(meta_path.read_text())
    assert meta["seed"] == 0 and meta["generator_version"] == data.GENERATOR_VERSION
    assert meta["params"] == {"max_depth": 10, "max_args": 10, **short}
    meta_path.write_text(json.dumps({**meta, "generator_version": version - 1}))
    rebuilt, out = load(0)
    assert "regenerating" in out and rebuilt == first

    monkeypatch.setattr(data, "GENERATOR_VERSION", version + 1)
    _, out = load(0)
    assert "Generating" in out and any(tmp_path.glob(f"listops-*seed0-v{version + 1}.json"))


def test_cached_pathfinder_is_an_image_dataset(tmp_path):
    ds = data.load_or_generate("pathfinder", "val", 4, 0, tmp_path, workers=1, difficulty="easy")
    assert ds.features["image"].dtype == "uint8"
    images = ds.with_format("numpy", dtype=np.uint8)[:]["image"]
    assert images.shape == (4, 32, 32)
    assert np.array_equal(images, data.generate_pathfinder(4, 0, difficulty="easy", split="val")[0])
    with pytest.raises(TypeError, match="'colour'"):
        data.load_or_generate("pathfinder", "val", 4, 0, tmp_path, colour=1)


def test_generation_rate_is_examples_over_the_seconds_they_took_the_check_before_the_clock(monkeypatch):
    events = []
    clock = iter([10.0, 12.5])

    def tick():
        events.append("clock")
        return next(clock)

    def rows(task, n, seed, split, workers, params):
        events.append(("rows", task, n, seed, split, workers, params["max_length"], params["max_depth"]))
        yield from range(n)
    monkeypatch.setitem(data._CHECKS, "listops", lambda params: events.append("check"))  # ListOps' samples trees
    monkeypatch.setattr(data, "_rows", rows)
    monkeypatch.setattr(data.time, "perf_counter", tick)
    assert data.generation_rate("listops", n=8, seed=3, workers=2, max_length=60) == 8 / 2.5
    assert events == ["check", "clock", ("rows", "listops", 8, 3, "train", 2, 60, 10), "clock"]


# ------------------------------------------------------------------------------------------------- real data

@pytest.mark.parametrize("task", ["text", "image"])
def test_hub_offline_error_says_what_to_do(task):
    import datasets

    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("would download: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is off")
    from repro.context import ConfigError

    for call in (lambda: data.check_hub_reachable(task), lambda: data.load_lra_hub(task, "train")):
        with pytest.raises(ConfigError, match="lra.source=hub.*could not be loaded.*offline, use lra.source=fixture"):
            call()


@pytest.mark.parametrize("task", ["text", "image"])
def test_any_hub_failure_is_a_config_error(task, monkeypatch):
    """Not only a lost connection: a dataset the hub does not have (HTTP 404) was a traceback."""
    import datasets

    from repro.context import ConfigError

    def missing(*args, **kwargs):
        raise FileNotFoundError(f"{args[0]} doesn't exist on the Hub or cannot be accessed (404)")

    monkeypatch.setattr(datasets, "load_dataset_builder", missing)
    monkeypatch.setattr(datasets, "load_dataset", missing)
    for call in (lambda: data.check_hub_reachable(task), lambda: data.load_lra_hub(task, "train")):
        with pytest.raises(ConfigError, match=f"LRA {task}'s hub dataset '{data.HUB[task]}' could not be loaded "
                                              r"\(FileNotFoundError: .*404\).*lra.source=fixture"):
            call()


def test_retrieval_needs_lra_release_files(tmp_path):
    with pytest.raises(ValueError, match="not on the Hugging Face hub.*data_dir"):
        data.load_lra_hub("retrieval", "train")
    (tmp_path / "new_aan_pairs.eval.tsv").write_text("1.0\ta\tb\tsome text\tother text\n0.0\tc\td\tx\ty\n")
    ds = data.load_lra_hub("retrieval", "val", data_dir=tmp_path)
    assert ds["label"] == [1, 0] and ds[0]["input_ids"] == [b + 1 for b in b"some text"]


def test_tiny_fixtures():
    text = data.tiny_fixture("text", 4, seed=0)
    assert len(text) == 4 and all(1 <= i <= 256 for ids in text["input_ids"] for i in ids)
    assert text["input_ids"] == data.tiny_fixture("text", 4, seed=0)["input_ids"]
    pairs = data.tiny_fixture("retrieval", 3)
    assert set(pairs.column_names) == {"input_ids", "input_ids2", "label"} and set(pairs["label"]) <= {0, 1}
    images = data.tiny_fixture("image", 5)
    assert images.features["image"].dtype == "uint8"
    assert np.asarray(images["image"]).shape == (5, 32, 32) and set(images["label"]) <= set(range(10))
