"""Attention forward, backward and forward+backward: each provider timed against standard attention, the
paper's baseline, on the FA2/FA3 benchmark grid and on the paper's own Figure-3 setting."""
from __future__ import annotations

import contextlib
import functools
import itertools
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.nn.attention import sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from effrepro_kernels import BlockSparseLayout, attention_reference, block_mask_to_dense, flash_attn, random_block_mask
from repro import checks
from repro.bench import DTYPES, Call, Point, Provider, Unsupported, run_benchmark
from repro.checks import as_list
from repro.context import ConfigError, RunContext
from repro.records import Row
from tasks.common.sdpa import SDPA_BACKENDS, first_call

from . import OURS

MODES = ("fwd", "bwd", "fwd_bwd")
# FLOPs of one call relative to the forward (FlashAttention's convention: the backward is 2.5 forwards).
MODE_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
FLEX = "flex"  # PyTorch's FlexAttention, compiled: the baseline block-sparse kernels are held to (issue 21)
AttentionFn = Callable[..., torch.Tensor]
GRID_KEYS = ("seq_len", "head_dim", "causal", "mode")
SPEC_KEYS = GRID_KEYS + ("tokens", "hidden", "batch", "heads", "dtype", "dropout", "padding_mask")


def attention_flops(batch: int, heads: int, seq_len: int, head_dim: int, causal: bool, mode: str) -> float:
    """4·B·H·N²·d for the forward (two N×N×d matrix products), halved when causal, ×2.5 for the backward."""
    return 4.0 * batch * heads * seq_len**2 * head_dim * (0.5 if causal else 1.0) * MODE_FLOPS[mode]


def grid(kernel: DictConfig) -> list[Point]:
    """The main grid ("sweep") and each named setting, as benchmark points over seq_len."""
    kernel = OmegaConf.to_container(kernel, resolve=True)
    base = {k: kernel.get(k) for k in SPEC_KEYS}
    settings = {"sweep": {}, **(kernel.get("settings") or {})}
    points = []
    for name, overrides in settings.items():
        if overrides is None:  # `kernel.settings.<name>=null` drops one setting
            continue
        if not isinstance(overrides, dict):
            raise ConfigError(f"kernel.settings.{name} must be a mapping of {SPEC_KEYS} to values (or null to drop "
                              f"it), got {overrides!r}")
        unknown = set(overrides) - set(SPEC_KEYS)
        if unknown:
            raise ConfigError(f"kernel.settings.{name} has unknown keys {sorted(unknown)}; allowed: {SPEC_KEYS}")
        spec = {**base, **overrides}

        def key(field: str) -> str:
            """Where a value was given: the setting's own key, or the kernel.* one it takes."""
            return f"kernel.settings.{name}.{field}" if field in overrides else f"kernel.{field}"

        checks.choice(key("dtype"), spec["dtype"], DTYPES)
        checks.choices(key("mode"), spec["mode"], MODES)
        for field in ("tokens", "hidden", *(k for k in ("batch", "heads") if spec[k] is not None)):
            checks.number(key(field), spec[field], at_least=1)
        checks.numbers(key("seq_len"), spec["seq_len"], at_least=1)
        checks.numbers(key("head_dim"), spec["head_dim"], at_least=16, at_most=256)
        checks.number(key("dropout"), spec["dropout"], integer=False, at_least=0, below=1)
        checks.flag(key("causal"), spec["causal"], many=True)
        checks.flag(key("padding_mask"), spec["padding_mask"])
        axes = [checks.axis(key(k), spec[k]) for k in GRID_KEYS]
        _check_heads_divide(spec, head_dims=axes[1], key=key)
        # a mask or dropout the setting takes from kernel.* (not its own) is named, so that such a run is plotted
        # beside the plain one, not in its place
        variant = (" padded" if spec["padding_mask"] and "padding_mask" not in overrides else "") + \
            (f" dropout {spec['dropout']:g}" if spec["dropout"] and "dropout" not in overrides else "")
        for seq_len, head_dim, causal, mode in itertools.product(*axes):
            batch = spec["batch"] or max(1, spec["tokens"] // seq_len)
            heads = spec["heads"] or spec["hidden"] // head_dim
            extra = dict(setting=name, mode=mode, causal=bool(causal), head_dim=head_dim, batch=batch, heads=heads,
                         dtype=spec["dtype"], dropout=spec["dropout"], padding_mask=bool(spec["padding_mask"]),
                         series=f"{name} d={head_dim}" + (" causal" if causal else "") + variant)
            points.append(Point("seq_len", seq_len, extra,
                                flops=attention_flops(batch, heads, seq_len, head_dim, causal, mode)))
    return points


def _check_heads_divide(spec: dict, head_dims: list, key: Callable[[str], str]) -> None:
    """heads = hidden / head_dim, where heads are not given, must come out whole: rounded down, a point would
    measure a narrower model than asked (hidden 2048 in heads of 96 is 21 heads, 2016 wide). batch = tokens /
    seq_len may round down (a length that does not divide the tokens, as a user's 3000 of 16384 does): each row
    records its batch."""
    if spec["heads"] is None:
        for head_dim in head_dims:
            if spec["hidden"] % head_dim:
                raise ConfigError(f"{key('hidden')}={spec['hidden']} is not a multiple of {key('head_dim')}="
                                  f"{head_dim}: heads = hidden / head_dim would be {spec['hidden'] // head_dim}, "
                                  f"{spec['hidden'] // head_dim * head_dim} wide; give a width that every head_dim "
                                  f"divides, or set {key('heads')}")


def sdpa_mask(key_padding_mask: torch.Tensor | None, causal: bool, n_q: int, n_k: int) -> torch.Tensor | None:
    """The one boolean mask SDPA takes for a point with key padding, causality (aligned bottom-right, as in
    flash_attn) folded into it: (batch, 1, 1 or n_q, n_k). None without padding, where `is_causal` says it all."""
    if key_padding_mask is None:
        return None
    mask = key_padding_mask[:, None, None, :]
    if causal:
        mask = mask & torch.ones(n_q, n_k, dtype=torch.bool, device=mask.device).tril(n_k - n_q)
    return mask


def sdpa_attention(q, k, v, *, causal, dropout_p, attn_mask):
    """SDPA on the backend that `provider` sets around its calls, with the mask `sdpa_mask` made for the point."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=causal and attn_mask is None)


def standard(q, k, v, *, causal, dropout_p, key_padding_mask):
    return attention_reference(q, k, v, causal=causal, dropout_p=dropout_p, key_padding_mask=key_padding_mask)


def ours(kernel: str) -> AttentionFn:
    """Our FlashAttention with both passes on `kernel`, flash_attn's forward_kernel and backward_kernel:
    - "tl": our tl kernels, on every GPU (the default dispatch takes Gluon's on Hopper where they measured faster:
      each point is one of these two providers);
    - "gluon": our Gluon kernels for Hopper (flash_attn_gluon.py); a point the forward does not cover is
      unsupported, with flash_attn's reason. At this task's shapes the backward covers what the forward does; a
      backward that refused would be an error row, with its reason (it refuses during `backward()`);
    - "auto": flash_attn as a user calls it, each pass on the kernel its default dispatch takes, so that a record
      shows what the dispatch gives beside both."""
    def attend(q, k, v, *, causal, dropout_p, key_padding_mask):
        try:
            return flash_attn(q, k, v, causal=causal, dropout_p=dropout_p, key_padding_mask=key_padding_mask,
                              forward_kernel=kernel, backward_kernel=kernel)
        except ValueError as exc:
            if kernel != "gluon":
                raise
            raise Unsupported(f"{OURS}_gluon: {exc}") from None
    return attend


SPARSE_BLOCK = 128


def sparse_block_mask(n_q: int, n_k: int, density: float, device) -> torch.Tensor:
    """The random block mask of a block-sparse point: `density` of the 128 x 128 blocks, the same count in every
    block row, the same blocks for every provider (a fixed seed). (1, 1, query blocks, key blocks) bool."""
    blocks = [-(-n // SPARSE_BLOCK) for n in (n_q, n_k)]
    return random_block_mask(*blocks, density, generator=torch.Generator().manual_seed(0), device=device)


@functools.cache
def sparse_flops_fraction(n_q: int, n_k: int, density: float, causal: bool) -> float:
    """The share of a dense point's (query, key) pairs, causal ones where causal, in the blocks that
    `sparse_block_mask` keeps: the share of the point's flops a block-sparse provider does. Not `density`
    itself: a row keeps round(density x blocks) blocks, at least one."""
    blocks = sparse_block_mask(n_q, n_k, density, "cpu")[0, 0]
    queries = torch.arange(n_q)
    last = queries + (n_k - n_q) if causal else torch.full_like(queries, n_k - 1)  # each query's last key
    starts = torch.arange(blocks.shape[1]) * SPARSE_BLOCK
    ends = (starts + SPARSE_BLOCK).clamp(max=n_k)
    pairs = (torch.minimum(ends, last[:, None] + 1) - starts).clamp(min=0).double()  # (queries, key blocks)
    per_block = torch.zeros(blocks.shape, dtype=torch.float64).index_add_(0, queries // SPARSE_BLOCK, pairs)
    return float((per_block * blocks).sum() / per_block.sum())  # every query keeps a key: the sum is never 0


def ours_sparse(density: float) -> AttentionFn:
    """Block-sparse FlashAttention keeping `density` of the blocks (the same count in every block row)."""
    layouts: dict[tuple, BlockSparseLayout] = {}

    def attend(q, k, v, *, causal, dropout_p, key_padding_mask):
        key = (q.shape, k.shape, q.device)
        if key not in layouts:  # prepared once per shape, outside the timed calls
            mask = sparse_block_mask(q.shape[2], k.shape[2], density, q.device)
            layouts[key] = BlockSparseLayout(mask, q.shape[0], q.shape[1], SPARSE_BLOCK)
        return flash_attn(q, k, v, causal=causal, dropout_p=dropout_p, key_padding_mask=key_padding_mask,
                          block_mask=layouts[key])
    return attend


def masked_standard(density: float) -> AttentionFn:
    """Standard attention under `sparse_block_mask(density)`'s blocks, as a mask of (query, key) pairs: what a
    block-sparse provider of that density computes."""
    def attend(q, k, v, *, causal, dropout_p, key_padding_mask):
        n_q, n_k = q.shape[2], k.shape[2]
        pairs = block_mask_to_dense(sparse_block_mask(n_q, n_k, density, q.device), n_q, n_k, SPARSE_BLOCK)
        return attention_reference(q, k, v, causal=causal, dropout_p=dropout_p, key_padding_mask=key_padding_mask,
                                   attn_mask=pairs)
    return attend


def flex_block_mask(n_q: int, n_k: int, causal: bool, density: float | None, device):
    """FlexAttention's BlockMask for what flash_attn computes: `sparse_block_mask(density)`'s blocks (None:
    dense), causality aligned bottom-right as in flash_attn; None where nothing is masked."""
    if density is None and not causal:
        return None
    blocks = None if density is None else sparse_block_mask(n_q, n_k, density, device)[0, 0]

    def mask_mod(b, h, q_idx, kv_idx):
        keep = kv_idx >= 0
        if blocks is not None:
            keep = keep & blocks[q_idx // SPARSE_BLOCK, kv_idx // SPARSE_BLOCK]
        if causal:
            keep = keep & (kv_idx <= q_idx + (n_k - n_q))
        return keep
    # compiled on a GPU, where a long sequence's mask would not fit as N x N booleans
    return create_block_mask(mask_mod, None, None, n_q, n_k, device=device, BLOCK_SIZE=SPARSE_BLOCK,
                             _compile=torch.device(device).type == "cuda")


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def flex(density: float | None) -> AttentionFn:
    """PyTorch's FlexAttention under torch.compile, dense or on the same block mask as `ours_sparse(density)`.
    Timed on a GPU only: on the CPU it would time Inductor's C++ code, not the kernel compared."""
    block_masks: dict[tuple, object] = {}

    def attend(q, k, v, *, causal, dropout_p, key_padding_mask):
        if q.device.type != "cuda":
            raise Unsupported(f"{FLEX}: compiled FlexAttention is timed on a GPU only")
        if dropout_p or key_padding_mask is not None:
            raise Unsupported(f"{FLEX}: dropout and key padding are not part of this comparison")
        key = (q.shape, k.shape, q.device, causal)
        if key not in block_masks:  # prepared once per shape, outside the timed calls
            # compiled afresh for each shape: past torch._dynamo's recompile_limit (8)
            # shapes of one function, flex_attention runs uncompiled, materialising every score
            torch.compiler.reset()
            block_masks[key] = flex_block_mask(q.shape[2], k.shape[2], causal, density, q.device)
        return _compiled_flex_attention()(q, k, v, block_mask=block_masks[key])
    return attend


def make_inputs(point: Point, device: torch.device, seed: int):
    e = point.extra
    gen = torch.Generator(device=device).manual_seed(seed + point.x_value)
    shape = (e["batch"], e["heads"], point.x_value, e["head_dim"])
    q, k, v = (torch.randn(shape, device=device, dtype=DTYPES[e["dtype"]], generator=gen).requires_grad_()
               for _ in range(3))
    mask = None
    if e["padding_mask"]:  # the paper's padding: each sequence keeps a random length in [N-20, N]
        n = point.x_value
        lengths = torch.randint(max(1, n - 20), n + 1, (e["batch"],), device=device, generator=gen)
        mask = torch.arange(n, device=device)[None, :] < lengths[:, None]
    return q, k, v, mask


def provider(name: str, attend: AttentionFn, ctx: RunContext, seed: int, density: float | None = None) -> Provider:
    """`attend` timed in the point's mode, and checked on the point's inputs without dropout (each implementation
    draws its own dropout mask): its output, or its gradients in the backward modes, against the baseline's; a
    block-sparse one's (`density`) against standard attention under the same block mask. `attend` is handed the
    point's key padding mask, or, for the SDPA providers (`sdpa_attention`), the mask `sdpa_mask` makes of it."""
    backend = SDPA_BACKENDS.get(name)

    def context():
        """An SDPA provider's backend, set around its calls (the first and, as the Call's context, the timed ones
        together), so that no timed call pays for setting it, which no other provider does."""
        return sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()

    def build(point: Point) -> Call:
        q, k, v, mask = make_inputs(point, ctx.device, seed)
        e = point.extra
        # SDPA's mask is made here, once for the point, not inside its timed calls
        masks = dict(key_padding_mask=mask) if backend is None else \
            dict(attn_mask=sdpa_mask(mask, e["causal"], q.shape[2], k.shape[2]))

        def call(fn, dropout_p):
            return fn(q, k, v, causal=e["causal"], dropout_p=dropout_p, **masks)
        run = functools.partial(call, attend, e["dropout"])
        with context():
            out = first_call(name, run, f"dtype={e['dtype']} head_dim={e['head_dim']} mask={e['padding_mask']} "
                                        f"dropout={e['dropout']} on {ctx.device.type}")
        # the same output gradient for every provider, so that their gradients can be compared
        dout = torch.randn(out.shape, device=out.device, dtype=out.dtype,
                           generator=torch.Generator(device=out.device).manual_seed(seed + 1))

        def computed(fn=attend):
            if e["mode"] == "fwd":
                return call(fn, 0.0)
            for t in (q, k, v):
                t.grad = None
            call(fn, 0.0).backward(dout)
            return torch.cat([t.grad.flatten() for t in (q, k, v)])
        checked = dict(result=computed, context=context())
        if density is not None:
            checked.update(reference=functools.partial(computed, masked_standard(density)),
                           flops_fraction=sparse_flops_fraction(q.shape[2], k.shape[2], density, e["causal"]))
        if e["mode"] == "fwd":
            return Call(run, **checked)
        if e["mode"] == "bwd":
            return Call(lambda: out.backward(dout, retain_graph=True), grad_to_none=(q, k, v), **checked)
        return Call(lambda: run().backward(dout), grad_to_none=(q, k, v), **checked)

    return Provider(name, build, baseline=(name == "standard"), needs_triton=name.startswith(OURS))


def dense_providers() -> dict[str, AttentionFn]:
    """Every provider but the block-sparse ones, by name."""
    return {"standard": standard, **{n: sdpa_attention for n in SDPA_BACKENDS}, OURS: ours("tl"),
            f"{OURS}_gluon": ours("gluon"), f"{OURS}_auto": ours("auto"), FLEX: flex(None)}


def sparse_name(family: str, density: float) -> str:
    """The provider `family`_sparse (ours or FlexAttention's) at one of kernel.sparse_densities."""
    return f"{family}_sparse_{density:g}"


def providers(kernel: DictConfig, ctx: RunContext, seed: int) -> list[Provider]:
    known = {name: (attend, None) for name, attend in dense_providers().items()}
    for d in as_list(kernel.sparse_densities):
        known.update({sparse_name(OURS, d): (ours_sparse(d), d), sparse_name(FLEX, d): (flex(d), d)})
    return [provider(n, known[n][0], ctx, seed, density=known[n][1]) for n in provider_names(kernel)]


def validate(cfg: DictConfig) -> None:
    kernel = cfg.kernel
    grid(kernel)
    checks.numbers("kernel.sparse_densities", kernel.sparse_densities, integer=False, at_least=1e-9, at_most=1)
    for key in ("warmup_ms", "rep_ms"):
        checks.number(f"kernel.{key}", kernel[key], integer=False, at_least=1e-3)
    provider_names(kernel)


def unread_keys(cfg: DictConfig) -> dict[str, str]:
    given = as_list(OmegaConf.to_container(cfg.kernel.providers))
    sparse = (f"{OURS}_sparse", f"{FLEX}_sparse")  # each alone, or at one density: effrepro_sparse_0.5
    if any(name.startswith(sparse) for name in given):
        return {}
    return {"kernel.sparse_densities": f"only the block-sparse providers ({', '.join(sparse)}) read it, and "
                                      f"kernel.providers={given} has none"}


def provider_names(kernel: DictConfig) -> list[str]:
    """The providers asked for, `effrepro_sparse` and `flex_sparse` each expanded to one per density; unknown
    ones are an error."""
    given = as_list(OmegaConf.to_container(kernel.providers))
    names = list(given)
    densities = as_list(OmegaConf.to_container(kernel.sparse_densities))
    ours_per_density = [sparse_name(OURS, d) for d in densities]
    alike = [d for d, name in zip(densities, ours_per_density) if ours_per_density.count(name) > 1]
    if alike:  # else a provider the user never typed would be named twice
        raise ConfigError(f"kernel.sparse_densities has {alike}, which name the same provider, "
                          f"{sparse_name(OURS, alike[0])} (a name keeps 6 significant digits); make them differ "
                          "within those digits")
    sparse = []
    for family in (OURS, FLEX):
        per_density = [sparse_name(family, d) for d in densities]
        sparse += per_density
        if f"{family}_sparse" in names:
            at = names.index(f"{family}_sparse")
            names[at:at + 1] = per_density
    checks.axis("kernel.providers", names)  # none twice: a provider named twice would be measured twice
    known = list(dense_providers())
    unknown = [n for n in names if n not in known + sparse]
    if unknown:
        raise ConfigError(f"kernel.providers has unknown {unknown}; known providers: {known}, {OURS}_sparse and "
                          f"{FLEX}_sparse (one per kernel.sparse_densities)")
    if "standard" not in names:
        raise ConfigError(f"kernel.providers={given} must include 'standard', the baseline every speedup is "
                          "measured against")
    return names


def run(cfg: DictConfig, ctx: RunContext) -> Iterator[Row]:
    kernel = cfg.kernel
    # block-sparse against our dense kernel too: time should fall in proportion to density
    compare_to = [OURS] if OURS in provider_names(kernel) else []
    yield from run_benchmark(grid(kernel), providers(kernel, ctx, cfg.seed), ctx.device,
                             warmup_ms=kernel.warmup_ms, rep_ms=kernel.rep_ms, compare_to=compare_to)
