"""Long Range Arena data.

ListOps and Pathfinder (Path-X is Pathfinder at 128 px, Path-256 at 256 px) are generated here, written from
the published algorithms: LRA's ListOps generator (`lra_benchmarks/data/listops.py`) and the snake generator of
Linsley et al. (2018, `drewlinsley/pathfinder`) with LRA's settings per resolution
(`lra_benchmarks/data/pathfinder.py`). Generation is deterministic by seed: the work is cut into fixed chunks,
each seeded from (seed, split, chunk index) alone, so the result does not depend on the number of worker
processes. `load_or_generate` caches a split as a Hugging Face `datasets` Arrow dataset.

Text (IMDb bytes), Retrieval (AAN byte pairs) and Image (CIFAR-10 grey) are real data: `load_lra_hub` reads
them (network, or a filled Hugging Face cache, needed); `tiny_fixture` fakes a few examples in the same format.
"""
from __future__ import annotations

import cmath
import csv
import functools
import inspect
import math
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from repro import checks
from repro.context import ConfigError
from repro.evaluation import hub_error
from repro.generated import cached_dataset, rows_in_chunks

# Bump whenever a change alters what (task, params, seed) generates: caches of another version are regenerated.
GENERATOR_VERSION = 2  # 2: a snake that backtracked still reaches its full length
SPLITS = ("train", "val", "test")
CHUNK = 32  # examples per seeded chunk; part of what a seed means, so changing it needs a version bump

# ------------------------------------------------------------------------------------------------------ ListOps

OPERATORS = {
    "[MIN": min,
    "[MAX": max,
    "[MED": lambda args: int(statistics.median(args)),  # LRA takes int(np.median): a half rounds down
    "[SM": lambda args: sum(args) % 10,
}
OPS = tuple(OPERATORS)
LISTOPS_VOCAB = ("<pad>", *OPS, "]", *map(str, range(10)))
LISTOPS_IDS = {token: i for i, token in enumerate(LISTOPS_VOCAB)}
LEAF_P = 0.75  # LRA's VALUE_P = 0.25 is the chance that a node below max_depth is an operator
# A length window is refused unless some of SAMPLED_TREES trees (a fixed sample, about 0.2 s) fall in it. A chunk
# gives up after MAX_REJECTIONS trees in a row outside it: far more than a window that passed needs (at a rate of
# 1 in 10,000 the chance is e^-100), and a minute or two where it is never reached.
SAMPLED_TREES = 2000
MAX_REJECTIONS = 1_000_000


def encode_listops(source: str) -> list[int]:
    """Token ids of a ListOps expression; id 0 is padding."""
    return [LISTOPS_IDS[token] for token in source.split()]


def evaluate_listops(source: str | list[str]) -> int:
    """The value of a ListOps expression such as `[MAX 2 9 [MIN 4 7 ] 0 ]`: the reference for its label."""
    stack = [[]]
    for token in source.split() if isinstance(source, str) else source:
        if token in OPERATORS:
            stack.append([token])
        elif token == "]":
            op, *args = stack.pop()
            stack[-1].append(OPERATORS[op](args))
        else:
            stack[-1].append(int(token))
    (value,) = stack[0]
    return value


class _TooLong(Exception):
    pass


def _listops_tree(r: random.Random, depth: int, max_depth: int, max_args: int, tokens: list[str],
                  max_length: int) -> int:
    """Appends a random subtree's tokens and returns its value. The value comes from the tree, not from parsing
    the tokens, so that `evaluate_listops` is an independent check of it."""
    if depth >= max_depth or r.random() < LEAF_P:
        value = r.randrange(10)
        tokens.append(str(value))
        return value
    op = r.choice(OPS)
    tokens.append(op)
    args = [_listops_tree(r, depth + 1, max_depth, max_args, tokens, max_length)
            for _ in range(r.randint(2, max_args))]
    tokens.append("]")
    if len(tokens) >= max_length:  # rejected anyway; giving up early saves most of the time
        raise _TooLong
    return OPERATORS[op](args)


def _listops_draw(r: random.Random, params: dict) -> tuple[list[str], int | None]:
    """A random tree's tokens and value; the value is None where the tree reached max_length (its tokens cut)."""
    tokens = []
    try:
        return tokens, _listops_tree(r, 1, params["max_depth"], params["max_args"], tokens, params["max_length"])
    except _TooLong:
        return tokens, None


def _listops_chunk(seed: int, split: str, index: int, count: int, params: dict) -> list[dict]:
    r = random.Random(_chunk_seed(seed, split, index))
    rows, rejected, longest = [], 0, 0
    while len(rows) < count:
        tokens, label = _listops_draw(r, params)
        # LRA also drops duplicates; trees of hundreds of tokens do not repeat in practice, so we keep chunks
        # independent instead.
        if label is not None and len(tokens) > params["min_length"]:
            rows.append({"source": " ".join(tokens), "label": label})
            rejected = 0
            continue
        rejected += 1
        if label is not None:
            longest = max(longest, len(tokens))
        if rejected == MAX_REJECTIONS:  # a window _check_listops let through by a narrow chance: fail, not hang
            raise ValueError(f"ListOps: {rejected} trees in a row had no length strictly between "
                             f"min_length={params['min_length']} and max_length={params['max_length']} "
                             f"(max_depth={params['max_depth']}, max_args={params['max_args']}); the longest "
                             f"below max_length had {longest} tokens. Choose a window such trees reach")
    return rows


def _listops_lengths(max_depth: int, max_args: int, cap: int) -> int:
    """The token counts a tree can have, up to `cap`, as a bit mask (bit n: n tokens): a digit is 1 token, an
    operator 2 (itself and "]") plus its 2 to max_args arguments, each a tree one level deeper."""
    keep = (1 << (cap + 1)) - 1
    lengths = 1 << 1
    for _ in range(max_depth - 1):
        sizes = [n for n in range(cap + 1) if lengths >> n & 1]
        sums, operators = lengths, 0
        for _ in range(2, max_args + 1):  # one more argument: every sum plus every subtree's size
            more = 0
            for n in sizes:
                more |= sums << n
            sums = more & keep
            operators |= sums
        lengths = (1 << 1) | ((operators << 2) & keep)
    return lengths


@functools.lru_cache(maxsize=32)
def _sampled_lengths(max_depth: int, max_args: int, min_length: int, max_length: int) -> tuple[int, ...]:
    """The lengths of the trees below max_length in a fixed sample of SAMPLED_TREES: a pure function of the
    settings, kept, since a setting is checked again at every split and worker count."""
    r, p = random.Random(0), dict(max_depth=max_depth, max_args=max_args, min_length=min_length, max_length=max_length)
    return tuple(len(tokens) for tokens, label in (_listops_draw(r, p) for _ in range(SAMPLED_TREES))
                 if label is not None)


def _check_listops(p: dict) -> None:
    for key in ("max_depth", "max_args", "min_length", "max_length"):
        checks.number(f"ListOps {key}", p[key])  # the bounds together, below
    ok = p["max_depth"] >= 1 and p["max_args"] >= 2 and 0 <= p["min_length"] < p["max_length"]
    window = ((1 << p["max_length"]) - 1) & ~((1 << (p["min_length"] + 1)) - 1) if ok else 0
    if not ok or not _listops_lengths(p["max_depth"], p["max_args"], p["max_length"] - 1) & window:
        raise ValueError(f"ListOps max_depth={p['max_depth']}, max_args={p['max_args']} cannot give lengths "
                         f"strictly between min_length={p['min_length']} and max_length={p['max_length']}")
    # Possible is not enough: long trees are rare (of 20,000 with LRA's settings the longest had 5,229 tokens), and
    # rejection sampling might never reach the window. A fixed sample: a window is always refused, or never.
    below = _sampled_lengths(p["max_depth"], p["max_args"], p["min_length"], p["max_length"])
    if not any(length > p["min_length"] for length in below):
        raise ValueError(f"ListOps max_depth={p['max_depth']}, max_args={p['max_args']} practically never gives "
                         f"lengths strictly between min_length={p['min_length']} and max_length={p['max_length']}: "
                         f"none of {SAMPLED_TREES} sampled trees did; the longest below max_length had "
                         f"{max(below, default=0)} tokens, {SAMPLED_TREES - len(below)} reached max_length")


def generate_listops(n: int, seed: int, *, max_depth: int = 10, max_args: int = 10, min_length: int = 500,
                     max_length: int = 2000, split: str = "train", workers: int | None = None) -> list[tuple[str, int]]:
    """`n` (expression, value) pairs as LRA generates them: nested MIN/MAX/MED/SM (sum mod 10) over digits,
    rejection-sampled to lengths (in tokens) strictly between min_length and max_length. The value, 0-9, is the
    class; `encode_listops` gives token ids."""
    params = dict(max_depth=max_depth, max_args=max_args, min_length=min_length, max_length=max_length)
    _check_listops(params)
    return [(row["source"], row["label"]) for row in _rows("listops", n, seed, split, workers, params)]


# --------------------------------------------------------------------------------------------------- Pathfinder

@dataclass(frozen=True)
class PathfinderSpec:
    """How one resolution is drawn, in output pixels: LRA's settings of the snake generator."""
    paddle_length: float
    paddle_width: float  # "paddle_thickness"
    margins: tuple[int, ...]  # "paddle_margin_list", one drawn per image: dashes are 2·margin apart
    marker_radius: float
    seed_distance: float  # between the origins of the two target snakes
    continuity: float  # a turn t between paddles has weight cos²(min(t·continuity, 90°))
    distractor_budget: int  # LRA draws distractor_budget // distractor_length distractor snakes
    contrast: float  # paddle brightness relative to the markers
    padding: int  # border left empty

    @property
    def bridge(self) -> int:
        """Consecutive dashes of a path come within this many pixels (Chebyshev) of each other, and different
        objects stay further apart: the label is connectivity under a flood fill that steps this far."""
        return 2 * max(self.margins) - 1

    def gap(self, margin: int) -> float:
        """Distance between consecutive dashes: 2·margin, or less where that could not stay within the bridge
        (lit pixels reach width/2 + 1/2 past a dash's end)."""
        return min(2 * margin, self.bridge + self.paddle_width)


# Where LRA is silent we keep the generator's defaults: paddle_length 5 at 64 px and up, padding 22 and
# seed_distance 27 at 256 px. Other assumptions:
# - 32 px multiplies snake (2) and paddle (0.75) contrasts; above the markers' 1 that only saturates, so 1.
# - No single-paddle distractors: the published wrapper turns them off.
# - Antialiasing is pixel coverage from the distance to the stroke at the output resolution, not drawing at 2x
#   and Lanczos-downsampling: no ringing, and the lit pixels, which collision tests use, are exact.
# - The original keeps objects apart with dilated occupancy masks, about 2·margin between strokes. We keep them
#   exactly more than `bridge` apart, and consecutive dashes within it (at 32 px the dash gap shrinks from 2 to
#   1.5 for that), so that "connected" is checkable by a flood fill.
# - At a dead end a snake backtracks instead of the image starting over (see `_Canvas.extend`).
PATHFINDER_SIZES = {
    32: PathfinderSpec(2, 0.5, (1,), 1.5, 7, 1.0, 20, 1.0, 1),
    64: PathfinderSpec(5, 1.0, (1,), 2.5, 12, 1.8, 22, 0.8, 1),
    128: PathfinderSpec(5, 1.5, (2, 3), 3.0, 20, 1.8, 35, 0.9, 1),  # Path-X
    256: PathfinderSpec(5, 2.0, (3,), 5.0, 27, 1.8, 30, 1.0, 22),  # Path-256
}
# LRA's splits: easy = curv_baseline, intermediate = curv_contour_length_9, hard = curv_contour_length_14
PATHFINDER_DIFFICULTIES = {"easy": 6, "intermediate": 9, "hard": 14}
SEED_TRIALS = 16  # placements tried for a snake's first paddle before giving up
BACKTRACKS = 2  # per paddle of a snake's length
DISTRACTOR_TRIALS = 4  # as the original's max_distractor_contour_retrial: then the distractor is left out
# Images started over before the two target snakes fit. With LRA's settings at most 27 were needed (Path-64 hard,
# 300 images, a mean of 3.2; others need fewer): a run this long means the settings leave no room, not bad luck.
IMAGE_TRIALS = 1000


def _turns(continuity: float) -> tuple[np.ndarray, np.ndarray]:
    """Turns between paddles on a 5° grid, with the original's weight cos²(min(turn·continuity, 90°)); those of
    weight 0 left out."""
    turns = np.radians(np.arange(-180, 181, 5))
    turns = turns[np.abs(turns) * continuity < math.pi / 2]
    return turns, np.cos(turns * continuity) ** 2


@dataclass
class _Snake:
    obj: int
    origin: complex
    path: list  # per paddle placed: its far end, its direction, and the untried turns for the next one
    backtracks: int  # left to spend on dead ends


class _Canvas:
    """One image being drawn: its strokes, and an owner map (object, paddle) for the collision tests. Points are
    complex numbers x + iy, and an angle turns from +x towards +y, as the original's coordinates."""

    def __init__(self, size: int, spec: PathfinderSpec, rng: np.random.Generator):
        self.size, self.spec, self.rng, self.k = size, spec, rng, spec.bridge
        dy, dx = np.mgrid[: 2 * self.k + 1, : 2 * self.k + 1]
        self.dy, self.dx = dy.ravel(), dx.ravel()
        # padded by k so that neighbourhood look-ups never leave the array
        self.obj = np.full((size + 2 * self.k,) * 2, -1, np.int16)
        self.seg = np.zeros_like(self.obj)
        self.strokes: dict[int, list] = {}  # paddles of each object, in order
        self.markers = []  # (object, part, stroke)
        self.turns, self.weights = _turns(spec.continuity)

    def stroke(self, a: complex, b: complex, radius: float, value: float):
        """Pixels within about `radius` of the segment a-b as (ys, xs, values), or None if any falls in the
        padding or outside."""
        r = radius + 0.5
        lo, hi = self.spec.padding, self.size - self.spec.padding
        if not all(lo <= round(v) < hi for v in (a.real, a.imag, b.real, b.imag)):
            return None  # cheap and exact: the pixels nearest the two ends are always lit (r > 1/√2)
        y0, x0 = math.floor(min(a.imag, b.imag) - r), math.floor(min(a.real, b.real) - r)
        y1, x1 = math.ceil(max(a.imag, b.imag) + r), math.ceil(max(a.real, b.real) + r)
        ys = np.arange(y0 - a.imag, y1 + 1 - a.imag)[:, None]  # pixel centres relative to a
        xs = np.arange(x0 - a.real, x1 + 1 - a.real)[None, :]
        ab = b - a
        t = np.minimum(np.maximum((ys * ab.imag + xs * ab.real) / max(abs(ab) ** 2, 1e-9), 0), 1)
        values = np.rint(np.minimum(r - np.hypot(ys - t * ab.imag, xs - t * ab.real), 1) * value)
        lit = values > 0
        ys, xs = np.nonzero(lit)
        ys += y0
        xs += x0
        if min(ys.min(), xs.min()) < lo or max(ys.max(), xs.max()) >= hi:
            return None
        return ys, xs, values[lit].astype(np.uint8)

    def place(self, obj: int, seg: int, stroke, linked: bool) -> bool:
        """Stamps a stroke as part `seg` of object `obj` if it keeps clear of other objects and of the object's
        parts older than seg - 1 and, if `linked`, comes within the bridge of part seg - 1."""
        if stroke is None:
            return False
        ys, xs, _ = stroke
        o = self.obj[ys[:, None] + self.dy, xs[:, None] + self.dx]
        s = self.seg[ys[:, None] + self.dy, xs[:, None] + self.dx]
        near = o >= 0
        if (near & ((o != obj) | (s < seg - 1))).any() or linked and not (near & (o == obj) & (s == seg - 1)).any():
            return False
        self.obj[ys + self.k, xs + self.k] = obj
        self.seg[ys + self.k, xs + self.k] = seg
        return True

    def erase(self, obj: int) -> None:
        for ys, xs, _ in self.strokes.pop(obj, []):
            self.obj[ys + self.k, xs + self.k] = -1

    def unplace(self, obj: int) -> None:
        """Takes back the last paddle of `obj`, and stamps again what it may have overlapped: the previous paddle
        and the markers."""
        ys, xs, _ = self.strokes[obj].pop()
        self.obj[ys + self.k, xs + self.k] = -1
        for owner, seg, (ys, xs, _) in [(obj, len(self.strokes[obj]) - 1, self.strokes[obj][-1]), *self.markers]:
            self.obj[ys + self.k, xs + self.k] = owner
            self.seg[ys + self.k, xs + self.k] = seg

    def options(self) -> list[float]:
        """The turns for a next paddle, to be popped in a random order weighted by continuity (an exponential
        race): taking the first that fits draws the turn by weight among those that fit, as the original does."""
        return list(self.turns[np.argsort(self.rng.exponential(size=len(self.turns)) / self.weights)[::-1]])

    def paddle(self, obj: int, seg: int, start: complex, angle: float) -> complex | None:
        """The far end of a paddle placed from `start` in direction `angle`, or None."""
        end = start + cmath.rect(self.spec.paddle_length, angle)
        stroke = self.stroke(start, end, self.spec.paddle_width / 2, 255 * self.spec.contrast)
        if not self.place(obj, seg, stroke, linked=seg > 0):
            return None
        self.strokes.setdefault(obj, []).append(stroke)
        return end

    def marker(self, obj: int, seg: int, center: complex) -> bool:
        """A marker at an end of paddle `seg` of `obj`: clear of all else, the object's other marker included."""
        stroke = self.stroke(center, center, self.spec.marker_radius, 255)
        if not self.place(obj, seg, stroke, linked=False):
            return False
        self.markers.append((obj, seg, stroke))
        return True

    def seed(self, obj: int, length: int, origin: complex | None = None) -> _Snake | None:
        """A snake's first paddle, from `origin` (anywhere, if None) in a random direction."""
        for _ in range(SEED_TRIALS):
            start = complex(*self.rng.uniform(0, self.size, 2)) if origin is None else origin
            angle = self.rng.uniform(-math.pi, math.pi)
            end = self.paddle(obj, 0, start, angle)
            if end is not None:
                return _Snake(obj, start, [(end, angle, self.options())], BACKTRACKS * length)
        return None

    def extend(self, snake: _Snake, margin: int, count: int, marked: bool = False) -> bool:
        """Paddles past gaps until the snake has `count`, each turning at its gap's middle as the original's pivots;
        if `marked`, the paddle at index count - 1 only where a marker fits at its end. At a dead end the original
        starts the image over; we take back paddles instead (depth first), a bounded number of times: most snakes
        long enough for Path-X would otherwise run into the border. Placing goes on after a take-back, so that a
        snake that backtracked still reaches `count` paddles."""
        half = self.spec.gap(margin) / 2
        while len(snake.path) < count:
            end, angle, options = snake.path[-1]
            pivot = end + cmath.rect(half, angle)
            seg = len(snake.path)
            while options:
                turned = angle + options.pop()
                new_end = self.paddle(snake.obj, seg, pivot + cmath.rect(half, turned), turned)
                if new_end is None:
                    continue
                if marked and seg == count - 1 and not self.marker(snake.obj, seg, new_end):
                    self.unplace(snake.obj)
                    continue
                snake.path.append((new_end, turned, self.options()))
                break
            else:  # no turn fits: a dead end
                if len(snake.path) == 1 or snake.backtracks == 0:
                    return False
                snake.backtracks -= 1
                snake.path.pop()
                self.unplace(snake.obj)
        return True

    def targets(self, length: int, margin: int, label: int) -> bool:
        """Two snakes of `length` paddles with origins a seed distance apart; a marker on one's origin and one on
        an end: the same snake's (label 1) or the other's (label 0)."""
        sd = self.spec.seed_distance
        origin = complex(*self.rng.uniform(2 * sd, self.size - 2 * sd, 2))  # the original keeps 2 sd clear
        snakes = [self.seed(0, length, origin),
                  self.seed(1, length, origin + cmath.rect(sd, self.rng.uniform(-math.pi, math.pi)))]
        if None in snakes:
            return False
        first = snakes[self.rng.integers(2)]
        last = first if label else snakes[1 - first.obj]
        # Markers go in as soon as their place is known, so that the rest grows around them.
        if not self.marker(first.obj, 0, first.origin):
            return False
        # grown in turns, paddle by paddle, so that neither walls the other in
        return all(self.extend(s, margin, count, marked=s is last and count == length)
                   for count in range(2, length + 1) for s in snakes)

    def distractor(self, obj: int, length: int, margin: int) -> None:
        for _ in range(DISTRACTOR_TRIALS):
            snake = self.seed(obj, length)
            if snake is not None and self.extend(snake, margin, length):
                return
            self.erase(obj)

    def render(self) -> np.ndarray:
        image = np.zeros((self.size, self.size), np.uint8)
        paddles = [stroke for strokes in self.strokes.values() for stroke in strokes]
        for ys, xs, values in paddles + [stroke for _, _, stroke in self.markers]:
            image[ys, xs] = np.maximum(image[ys, xs], values)
        return image


def _pathfinder_image(rng: np.random.Generator, size: int, length: int, label: int) -> np.ndarray:
    """Two target snakes and their markers (see `_Canvas.targets`), then distractor snakes a third as long."""
    spec = PATHFINDER_SIZES[size]
    margin = int(rng.choice(spec.margins))
    for _ in range(IMAGE_TRIALS):  # as the original, start over until they fit
        canvas = _Canvas(size, spec, rng)
        if canvas.targets(length, margin, label):
            break
    else:
        raise RuntimeError(f"Pathfinder size={size}: two target snakes of {length} paddles (margin {margin}) did not "
                           f"fit in {IMAGE_TRIALS} fresh images")
    for i in range(spec.distractor_budget // (length // 3)):
        canvas.distractor(2 + i, length // 3, margin)
    return canvas.render()


def _pathfinder_chunk(seed: int, split: str, index: int, count: int, params: dict) -> list[dict]:
    rng = np.random.default_rng(_chunk_seed(seed, split, index))
    labels = rng.permutation(np.arange(count) % 2)  # balanced classes
    length = PATHFINDER_DIFFICULTIES[params["difficulty"]]
    return [{"image": _pathfinder_image(rng, params["size"], length, label), "label": int(label)} for label in labels]


def _check_pathfinder(p: dict) -> None:
    if p["size"] not in PATHFINDER_SIZES:
        raise ValueError(f"Pathfinder size={p['size']!r} is not one of {list(PATHFINDER_SIZES)} "
                         "(32: Pathfinder, 64: pretraining for Path-X, 128: Path-X, 256: Path-256)")
    if p["difficulty"] not in PATHFINDER_DIFFICULTIES:
        raise ValueError(f"Pathfinder difficulty={p['difficulty']!r} is not one of {list(PATHFINDER_DIFFICULTIES)} "
                         "(paths of 6, 9 and 14 dashes)")


def generate_pathfinder(n: int, seed: int, *, size: int = 32, difficulty: str = "hard", split: str = "train",
                        workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`n` Pathfinder images, uint8 (n, size, size), and labels (n,): 1 where the two markers lie on one path.
    Labels are balanced within each chunk."""
    params = dict(size=size, difficulty=difficulty)
    _check_pathfinder(params)
    rows = list(_rows("pathfinder", n, seed, split, workers, params))
    images = np.stack([row["image"] for row in rows]) if rows else np.zeros((0, size, size), np.uint8)
    return images, np.array([row["label"] for row in rows], np.int64)


# ----------------------------------------------------------------------------------------- generation, caching

GENERATORS = {"listops": generate_listops, "pathfinder": generate_pathfinder}
_CHUNKS = {"listops": _listops_chunk, "pathfinder": _pathfinder_chunk}
_CHECKS = {"listops": _check_listops, "pathfinder": _check_pathfinder}


def _chunk_seed(seed: int, split: str, index: int) -> int:
    return int(np.random.SeedSequence([seed, SPLITS.index(split), index]).generate_state(1, np.uint64)[0])


def _rows(task: str, n: int, seed: int, split: str, workers: int | None, params: dict):
    """The examples of `task`, chunk by chunk in order, in `workers` processes (default: one per CPU)."""
    _check_split(split)
    yield from rows_in_chunks(_CHUNKS[task], n, CHUNK, seed, split, params, workers, desc=f"{task} {split}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")


def generator_params(task: str, params: dict) -> dict:
    """`params` completed with the generator's defaults, so that naming a default changes nothing."""
    if task not in GENERATORS:
        raise ValueError(f"task={task!r}: the generated LRA tasks are {list(GENERATORS)}")
    defaults = {name: p.default for name, p in inspect.signature(GENERATORS[task]).parameters.items()
                if p.kind is p.KEYWORD_ONLY and name not in ("split", "workers")}
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise TypeError(f"{task} takes the parameters {sorted(defaults)}, not {unknown}")
    params = {**defaults, **params}
    _CHECKS[task](params)
    return params


def _features(task: str, params: dict):
    import datasets as hf

    if task == "listops":
        return hf.Features({"source": hf.Value("string"), "label": hf.ClassLabel(num_classes=10)})
    return hf.Features({"image": hf.Array2D((params["size"],) * 2, "uint8"),
                        "label": hf.ClassLabel(names=["disconnected", "connected"])})


def load_or_generate(task: str, split: str, n: int, seed: int, cache_dir: str | os.PathLike, *,
                     workers: int | None = None, **params):
    """A generated task's split as a `datasets.Dataset`: from `cache_dir` when the cache there was made by this
    generator version with this seed and these parameters, else generated (and saved) anew. Pathfinder images
    are stored as uint8; `ds.with_format("numpy", dtype=np.uint8)` keeps them so (numpy's default is int64)."""
    import datasets as hf

    _check_split(split)
    params = generator_params(task, params)
    meta = {"task": task, "split": split, "n": n, "seed": seed, "params": params,
            "generator_version": GENERATOR_VERSION}
    name = "-".join([task, split, f"n{n}", *(f"{k}{v}" for k, v in sorted(params.items())), f"seed{seed}",
                     f"v{GENERATOR_VERSION}"])

    def build(path):
        print(f"Generating LRA {name}")
        start = time.perf_counter()
        # from_generator streams the examples to disk (Path-256 does not fit in memory); its own cache goes in a
        # fresh folder so that it can never hand back an older build.
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            hf.Dataset.from_generator(_rows, features=_features(task, params), cache_dir=tmp,
                                      gen_kwargs=dict(task=task, n=n, seed=seed, split=split, workers=workers,
                                                      params=params)).save_to_disk(str(path))
        seconds = time.perf_counter() - start
        print(f"Generated {n} examples in {seconds:.1f} s ({n / seconds:.1f}/s)")

    return cached_dataset(cache_dir, name, meta, build)


def generation_rate(task: str, n: int = 64, seed: int = 0, workers: int = 1, **params) -> float:
    """Examples generated per second by `workers` processes (one: a set of N takes about N / (rate · cores)). The
    settings are checked before the clock starts: ListOps' check samples trees of its own."""
    params = generator_params(task, params)
    start = time.perf_counter()
    for _ in _rows(task, n, seed, "train", workers, params):
        pass
    return n / (time.perf_counter() - start)


# ------------------------------------------------------------------------------ Text, Retrieval, Image (real data)

DATA_TASKS = ("text", "retrieval", "image")
HUB = {"text": "stanfordnlp/imdb", "image": "uoft-cs/cifar10"}
HUB_SPLITS = {
    "text": {"train": "train", "val": "test", "test": "test"},  # LRA validates on IMDb's test set
    "image": {"train": "train[:90%]", "val": "train[90%:]", "test": "test"},
}
# AAN is not redistributed, so not on the hub: LRA ships only these files in lra_release's tsv_data folder.
AAN_FILES = {"train": "new_aan_pairs.train.tsv", "val": "new_aan_pairs.eval.tsv", "test": "new_aan_pairs.test.tsv"}
AAN_COLUMNS = ["label", "id1", "id2", "text1", "text2"]
# Bytes kept per document: Text 4K as in the paper and S4 (LRA's config says 1000), Retrieval 4000 as its config.
MAX_BYTES = {"text": 4096, "retrieval": 4000}
_WORDS = ("the", "a", "film", "movie", "plot", "actor", "was", "is", "not", "great", "awful", "paper", "we",
          "propose", "model", "attention", "results", "show", "and", "of")


def _byte_ids(text: str, task: str) -> list[int]:
    return [b + 1 for b in text.encode()[: MAX_BYTES[task]]]  # as tfds's ByteTextEncoder: byte + 1, 0 pads


def _lra_features(task: str):
    import datasets as hf

    ids = hf.List(hf.Value("int16"))
    return hf.Features({
        "text": {"input_ids": ids, "label": hf.ClassLabel(names=["neg", "pos"])},
        "retrieval": {"input_ids": ids, "input_ids2": ids, "label": hf.ClassLabel(num_classes=2)},
        "image": {"image": hf.Array2D((32, 32), "uint8"), "label": hf.ClassLabel(num_classes=10)},
    }[task])


def _to_lra(task: str, row: dict) -> dict:
    if task == "text":
        return {"input_ids": _byte_ids(row["text"], task), "label": row["label"]}
    if task == "retrieval":
        return {"input_ids": _byte_ids(row["text1"], task), "input_ids2": _byte_ids(row["text2"], task),
                "label": int(float(row["label"]))}
    # grey as ITU-R 601 luma, the weights of LRA's tf.image.rgb_to_grayscale
    return {"image": np.asarray(row["img"].convert("L")), "label": row["label"]}


def _unreachable(task: str, exc: Exception) -> ConfigError:
    return hub_error(f"lra.source=hub: LRA {task}'s hub dataset {HUB[task]!r}", exc,
                     "lra.source=fixture (generated stand-ins, no download)")


def check_hub_reachable(task: str) -> None:
    """Before any work: the hub dataset of a Text or Image run is cached or can be downloaded (a builder reads
    only its metadata)."""
    import datasets as hf

    if task in HUB:
        try:
            hf.load_dataset_builder(HUB[task])
        except Exception as exc:  # noqa: BLE001 - offline, no network, or the Hub moved it
            raise _unreachable(task, exc) from None


def load_lra_hub(task: str, split: str, *, data_dir: str | os.PathLike | None = None):
    """LRA's Text (IMDb as byte ids), Retrieval (AAN pairs of byte ids) or Image (CIFAR-10 grey, 32x32 uint8)
    split as a `datasets.Dataset`, read with `datasets.load_dataset`. Retrieval reads LRA's AAN files from
    `data_dir`. Offline, only what the Hugging Face cache already holds can be read."""
    import datasets as hf

    _check_split(split)
    if task == "retrieval":
        if data_dir is None:
            raise ValueError("LRA Retrieval (AAN) is not on the Hugging Face hub: its text is not redistributed. "
                             "Download LRA's lra_release (https://storage.googleapis.com/long-range-arena/"
                             "lra_release.gz) and pass data_dir=<its tsv_data folder>")
        raw = hf.load_dataset("csv", data_files=str(Path(data_dir) / AAN_FILES[split]), split="train",
                              delimiter="\t", column_names=AAN_COLUMNS, quoting=csv.QUOTE_NONE)
    elif task in HUB:
        try:
            raw = hf.load_dataset(HUB[task], split=HUB_SPLITS[task][split])
        except Exception as exc:  # noqa: BLE001 - offline, no network, or the Hub moved it
            raise _unreachable(task, exc) from None
    else:
        raise ValueError(f"task={task!r}: the LRA tasks read from data are {list(DATA_TASKS)}")
    return raw.map(lambda row: _to_lra(task, row), remove_columns=raw.column_names, features=_lra_features(task))


def tiny_fixture(task: str, n: int = 8, seed: int = 0):
    """`n` random examples in `load_lra_hub`'s format, for tests that must not need the real data."""
    import datasets as hf

    if task not in DATA_TASKS:
        raise ValueError(f"task={task!r}: the LRA tasks read from data are {list(DATA_TASKS)}")
    rng = np.random.default_rng([seed, DATA_TASKS.index(task)])

    def text() -> str:
        return " ".join(rng.choice(_WORDS, rng.integers(10, 60)))

    if task == "text":
        rows = {"input_ids": [_byte_ids(text(), task) for _ in range(n)], "label": rng.integers(0, 2, n)}
    elif task == "retrieval":
        rows = {"input_ids": [_byte_ids(text(), task) for _ in range(n)],
                "input_ids2": [_byte_ids(text(), task) for _ in range(n)], "label": rng.integers(0, 2, n)}
    else:
        rows = {"image": rng.integers(0, 256, (n, 32, 32), dtype=np.uint8), "label": rng.integers(0, 10, n)}
    return hf.Dataset.from_dict(rows, features=_lra_features(task))
