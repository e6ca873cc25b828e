"""FlashAttention forward and backward for Hopper (sm_90) in Gluon: TMA loads, wgmma, warp specialisation.

The structure of FlashAttention-3 and cuDNN: a program takes (query tile, batch·head) pairs, one, or in turn a
program an SM (a persistent grid: without a mask, and causal up to `CAUSAL_PERSISTENT_MAX_KEYS`), a query tile
being CONSUMERS (2 or 3) blocks of 64 rows. A one-warp producer partition loads each tile's Q blocks once, and K
and V tiles of BLOCK_N keys into a ring of NUM_STAGES shared-memory buffers with TMA, signalling mbarriers with
the bytes it expects. Each consumer warpgroup (the default partition, and four-warp workers) owns one block of 64
query rows: S = Q·Kᵀ with wgmma, the online softmax in registers (base 2, the scale folded into the exponent),
O += P·V with P from registers; each releases a stage's K with an mbarrier arrive once its Q·Kᵀ has read it, and
its V once its P·V has. At head_dim 128 a consumer overlaps each tile's softmax with the previous tile's P·V
(FlashAttention-3's intra-warpgroup pipelining). The backward (below `backward`) has the same parts: a dK/dV
kernel a program per key tile, a dQ kernel a program per query tile, block-sparse with 128-key blocks.

Conventions follow flash_attn.py: q (batch, heads, seq_q, head_dim), k and v (batch, kv_heads, seq_k, head_dim)
with kv_heads dividing heads; causal is bottom-right aligned (query i sees keys j <= i + seq_k - seq_q); the
log-sum-exp is float32 (batch, heads, seq_q) in base 2, as flash_attn's kernels keep it for their backward; a row
that sees no key gives zeros and an LSE of +inf (so that the backward's exp2(s - lse) gives zeros).

Gluon's API moved between Triton 3.6 and 3.9 (effrepro_kernels/NOTES.md, "Gluon on Hopper"): the renamed calls
are bridged by aliases chosen from what the installed Triton has, and without a Gluon this file knows (or on a
Triton outside `TRITON_VERSIONS`), importing still works and `refusal` says so. Compiled offline for sm_90 with
Triton 3.6 to 3.9, run and measured on an H200 and an H100 with 3.6 (NOTES.md, "The Gluon forward overlapped", "A
persistent forward", "Causal grids persistent up to 2K keys" and "The H200 at 67c6102"): faster than the `tl`
forward on dense calls from 512 keys at d = 128 and 1K at 64, and on causal ones from 1K at d = 128 and 2K at 64;
slower on shorter causal ones, where `flash_attn` keeps the `tl` one (`_use_gluon`).

Both passes take a key padding mask (int8 a key): the forward's and the dQ kernel's consumers read a tile's bytes
with its scores (every key tile is masked then; the forward in configurations of its own, `KEY_PADDING_CONFIGS`),
the dK/dV kernel zeroes the padded keys' rows once at the end. Both are block-sparse with 128-key blocks (the
forward in `SPARSE_CONFIGS`, where a query tile's key tiles are its list of kept blocks). Both have passed their GPU
tests (H200, 2026-12-06). The padded and the sparse forward, timed on an H100, beat the `tl` one at head_dim 128
(the padded one lost at 64, where the sparse one is untimed), so `flash_attn`'s "auto" takes them at 128 only.
"""
from __future__ import annotations

import functools
import inspect
import math
from types import SimpleNamespace

import torch
import triton

from .runtime import INTERPRET, MAX_GRID_Y, KeptLaunches, capability, cdiv, int8_mask, launch, sm_count

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # TMA copies are async_copy_global_to_shared / async_copy_shared_to_global up to 3.7, async_load /
    # async_store from 3.8 (the old names raise in 3.9); the CTA barrier is thread_barrier in 3.6, barrier later.
    _tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
    _tma_store = tma.async_store if hasattr(tma, "async_store") else tma.async_copy_shared_to_global
    _cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier
    # 3.6 onwards take a list of (function, args) with the default partition first; older releases differ
    _GLUON_OK = next(iter(inspect.signature(gl.warp_specialize).parameters)) == "functions_and_args"
except Exception:  # noqa: BLE001 - any Triton whose Gluon differs must leave `import effrepro_kernels` working
    _GLUON_OK = False
    # stand-ins so that the kernel definitions below still evaluate (to plain functions never called)
    gluon = gl = SimpleNamespace(jit=lambda fn: fn, constexpr_function=lambda fn: fn, constexpr=None)

# the Triton releases whose Gluon these kernels were compiled with (tests/gluon_offline.py); another may have moved
# the API in a way the aliases above do not see
TRITON_VERSIONS = ("3.6.", "3.7.", "3.8.", "3.9.")
GLUON_DTYPES = (torch.float16, torch.bfloat16)
GLUON_HEAD_DIMS = (64, 128)
ROWS_PER_WARPGROUP = 64  # a consumer warpgroup's share of the 128-row query tile
LOG2E = 1.4426950408889634


@gluon.constexpr_function
def _wgmma_layout(columns):
    """Registers of a wgmma result held by one warpgroup: 64 rows by `columns`."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, columns, 16])


@gluon.jit
def _query_tile(index, count, CAUSAL: gl.constexpr):
    """Which of a head's `count` query tiles the `index`-th program (or persistent step) of that head takes.
    Causal tiles see more keys the later they are: the first programs take the last tiles, so the short ones fill
    the last wave instead of a long one running alone (FlashAttention 2 and 3 order their causal tiles the same
    way)."""
    if CAUSAL:
        return count - 1 - index
    return index


@gluon.jit
def _key_tiles(row0, rows, N_Q, N_K, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """How many key tiles rows row0 .. row0 + rows - 1 see: causal rows stop at the diagonal (the clamp first,
    as integer division truncates toward zero)."""
    n = gl.cdiv(N_K, BLOCK_N)
    if CAUSAL:
        n = gl.minimum(n, gl.cdiv(gl.maximum(row0 + rows + N_K - N_Q, 0), BLOCK_N))
    return n


@gluon.jit
def _whole_key_tiles(row0, N_Q, N_K, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, KEY_PADDING: gl.constexpr):
    """How many key tiles from the first every row from row0 on sees whole: no key past N_K, none past the
    diagonal of row0 (the first row, which sees least); none where a key padding mask may leave keys out."""
    n = N_K // BLOCK_N
    if CAUSAL:
        n = gl.minimum(n, gl.maximum(row0 + N_K - N_Q + 1, 0) // BLOCK_N)
    if KEY_PADDING:
        n = 0
    return n


@gluon.jit
def _forward_key_tiles(block_cnt_ptr, bh, pid_m, row0, rows, N_Q, N_K, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                       SPARSE_BLOCK: gl.constexpr):
    """The key tiles that rows row0 .. row0 + rows - 1 of query tile pid_m of head bh see: (where their list starts,
    how many). Dense: tiles 0, 1, ... up to the end of the keys or the diagonal. Block-sparse (a query tile and a key
    tile are each one sparse block): the kept blocks of the tile's list, every one masked by element."""
    if SPARSE_BLOCK:
        return _block_list(block_cnt_ptr, bh, pid_m, N_Q, BLOCK_N, SPARSE_BLOCK)
    return 0, _key_tiles(row0, rows, N_Q, N_K, BLOCK_N, CAUSAL)


@gluon.jit
def _key_tile(block_idx_ptr, first, i, SPARSE_BLOCK: gl.constexpr):
    """The i-th key tile of a list that `_forward_key_tiles` gave (a forward tile is one sparse block)."""
    if SPARSE_BLOCK:
        return _list_step(block_idx_ptr, first, i, SPARSE_BLOCK, SPARSE_BLOCK)[0]
    return i


@gluon.jit
def _forward_tile(t, m_tiles, CAUSAL: gl.constexpr):
    """Query tile t of the forward's m_tiles · batch·heads: (tile of the head, batch·head). A head's tiles are
    consecutive, so programs running together share its K and V in L2."""
    return _query_tile(t % m_tiles, m_tiles, CAUSAL), t // m_tiles


@gluon.jit
def _q_phase(t):
    """The phase of the Q barriers for this program's query tile t: one for each tile it has taken."""
    return ((t - gl.program_id(0)) // gl.num_programs(0)) & 1


@gluon.jit
def _load_ring(desc, smem, ready, empty, kv_bh, key_tile, ring, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr):
    """Key tile `key_tile` of K or V into the ring's `ring`-th buffer, once every consumer has released what it
    held there."""
    s = ring % NUM_STAGES
    # a fresh barrier counts as having completed the phase before phase 0, so the first round passes
    mbarrier.wait(empty.index(s), ((ring // NUM_STAGES) & 1) ^ 1)
    mbarrier.expect(ready.index(s), desc.block_type.nbytes)
    _tma_load(desc, [kv_bh, key_tile * BLOCK_N, 0], ready.index(s), smem.index(s))


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty,
              block_cnt_ptr, block_idx_ptr, H, KV_GROUPS, BH, N_Q, N_K, BLOCK_N: gl.constexpr,
              NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, CONSUMERS: gl.constexpr, SPARSE_BLOCK: gl.constexpr):
    ROWS: gl.constexpr = q_desc.block_type.shape[1]
    m_tiles = gl.cdiv(N_Q, CONSUMERS * ROWS)
    ring = 0  # K/V tiles loaded so far: the ring runs on from one query tile to the next
    for t in range(gl.program_id(0), m_tiles * BH, gl.num_programs(0)):
        pid_m, bh = _forward_tile(t, m_tiles, CAUSAL)
        kv_bh = (bh // H) * (H // KV_GROUPS) + (bh % H) // KV_GROUPS
        # the warpgroups together see exactly the tiles of the whole query tile
        first, n_tiles = _forward_key_tiles(block_cnt_ptr, bh, pid_m, pid_m * CONSUMERS * ROWS, CONSUMERS * ROWS, N_Q,
                                            N_K, BLOCK_N, CAUSAL, SPARSE_BLOCK)
        # The first product needs K's first tile and Q, and nothing else: they go first. K's first tile waits
        # only for the previous query tile's products, so in a persistent program it is fetched while they
        # run; Q waits for the previous tile's products to end. The loads after Q's never wait for this
        # tile's products before Q's is issued, so the consumers never wait for a load that waits for them.
        if n_tiles > 0:
            _load_ring(k_desc, k_smem, k_ready, k_empty, kv_bh, _key_tile(block_idx_ptr, first, 0, SPARSE_BLOCK), ring,
                       BLOCK_N, NUM_STAGES)
        for wg in gl.static_range(CONSUMERS):
            mbarrier.wait(q_empty.index(wg), _q_phase(t) ^ 1)
            mbarrier.expect(q_ready.index(wg), q_desc.block_type.nbytes)
            _tma_load(q_desc, [bh, (pid_m * CONSUMERS + wg) * ROWS, 0], q_ready.index(wg), q_smem.index(wg))
        for i in range(1, n_tiles):
            _load_ring(v_desc, v_smem, v_ready, v_empty, kv_bh, _key_tile(block_idx_ptr, first, i - 1, SPARSE_BLOCK),
                       ring + i - 1, BLOCK_N, NUM_STAGES)
            _load_ring(k_desc, k_smem, k_ready, k_empty, kv_bh, _key_tile(block_idx_ptr, first, i, SPARSE_BLOCK),
                       ring + i, BLOCK_N, NUM_STAGES)
        if n_tiles > 0:
            _load_ring(v_desc, v_smem, v_ready, v_empty, kv_bh,
                       _key_tile(block_idx_ptr, first, n_tiles - 1, SPARSE_BLOCK), ring + n_tiles - 1, BLOCK_N,
                       NUM_STAGES)
        ring += n_tiles


@gluon.jit
def _softmax(qk, m_i, l_i, key_tile, row0, N_Q, N_K, qk_scale, kpm_row, o_layout: gl.constexpr,
             MASK: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr, KEY_PADDING: gl.constexpr):
    """Key tile `key_tile`'s scores into the running (m_i, l_i): P for the P·V product and the factor that rescales the
    output accumulated so far. MASK for the tiles that cross the diagonal or the end of the keys, and every tile
    under KEY_PADDING (kpm_row: this batch's int8 mask of the keys, 0 for padding)."""
    ROWS: gl.constexpr = qk.shape[0]
    s_layout: gl.constexpr = qk.type.layout
    if MASK:
        cols = key_tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        valid = cols[None, :] < N_K  # TMA filled the keys past the end with zeros, not -inf
        if CAUSAL:
            rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
            valid = valid & (cols[None, :] <= rows[:, None] + (N_K - N_Q))
        if KEY_PADDING:
            valid = valid & (gl.load(kpm_row + cols, mask=cols < N_K, other=0) != 0)[None, :]
        qk = gl.where(valid, qk, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)  # qk_scale > 0, so max commutes with it
    if MASK:  # a row with no visible key yet: keep exp2 away from inf - inf
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = gl.exp2(qk * qk_scale - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None], m_new, l_i


@gluon.jit
def _attend(q, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, acc, m_i, l_i, lo, hi, ring, row0, N_Q, N_K,
            qk_scale, kpm_row, block_idx_ptr, first, MASK: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr,
            NUM_STAGES: gl.constexpr, OVERLAP: gl.constexpr, KEY_PADDING: gl.constexpr,
            SPARSE_BLOCK: gl.constexpr):
    """Key tiles lo .. hi - 1 into the running (acc, m_i, l_i) of one warpgroup's rows. With OVERLAP, software-
    pipelined as in FlashAttention-3: tile i's Q·Kᵀ and tile i - 1's P·V are issued together, and tile i's
    softmax runs while the tensor cores do that P·V. Key tile i sits in the ring's (ring + i)-th buffer; a stage's K
    is released once its Q·Kᵀ is done, its V once its P·V is. A block-sparse tile's entry of the list is read
    before the waits, so that its load is under them rather than in front of the softmax."""
    ROWS: gl.constexpr = q.shape[0]
    HEAD_DIM: gl.constexpr = q.shape[1]
    s_layout: gl.constexpr = _wgmma_layout(BLOCK_N)
    o_layout: gl.constexpr = acc.type.layout
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    if not OVERLAP:
        for i in range(lo, hi):
            key_tile = _key_tile(block_idx_ptr, first, i, SPARSE_BLOCK)
            s = (ring + i) % NUM_STAGES
            phase = ((ring + i) // NUM_STAGES) & 1
            mbarrier.wait(k_ready.index(s), phase)
            qk = warpgroup_mma(q, k_smem.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                               gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
            qk = warpgroup_mma_wait(0, deps=(qk,))
            mbarrier.arrive(k_empty.index(s))
            p, alpha, m_i, l_i = _softmax(qk, m_i, l_i, key_tile, row0, N_Q, N_K, qk_scale, kpm_row, o_layout, MASK,
                                          CAUSAL, BLOCK_N, KEY_PADDING)
            acc = acc * alpha
            mbarrier.wait(v_ready.index(s), phase)
            acc = warpgroup_mma(gl.convert_layout(p.to(q.dtype), p_layout),
                                v_smem.index(s).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            mbarrier.arrive(v_empty.index(s))
    elif lo < hi:
        key_tile = _key_tile(block_idx_ptr, first, lo, SPARSE_BLOCK)
        s = (ring + lo) % NUM_STAGES
        mbarrier.wait(k_ready.index(s), ((ring + lo) // NUM_STAGES) & 1)
        qk = warpgroup_mma(q, k_smem.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                           gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        qk = warpgroup_mma_wait(0, deps=(qk,))
        mbarrier.arrive(k_empty.index(s))
        p, alpha, m_i, l_i = _softmax(qk, m_i, l_i, key_tile, row0, N_Q, N_K, qk_scale, kpm_row, o_layout, MASK,
                                      CAUSAL, BLOCK_N, KEY_PADDING)
        p = gl.convert_layout(p.to(q.dtype), p_layout)
        acc = acc * alpha
        for i in range(lo + 1, hi):
            key_tile = _key_tile(block_idx_ptr, first, i, SPARSE_BLOCK)
            s = (ring + i) % NUM_STAGES
            before = (ring + i - 1) % NUM_STAGES
            mbarrier.wait(k_ready.index(s), ((ring + i) // NUM_STAGES) & 1)
            qk = warpgroup_mma(q, k_smem.index(s).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                               gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(before), ((ring + i - 1) // NUM_STAGES) & 1)
            acc = warpgroup_mma(p, v_smem.index(before).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
            qk = warpgroup_mma_wait(1, deps=(qk,))  # Q·Kᵀ done; P·V may still run
            mbarrier.arrive(k_empty.index(s))
            p, alpha, m_i, l_i = _softmax(qk, m_i, l_i, key_tile, row0, N_Q, N_K, qk_scale, kpm_row, o_layout, MASK,
                                          CAUSAL, BLOCK_N, KEY_PADDING)
            p = gl.convert_layout(p.to(q.dtype), p_layout)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            mbarrier.arrive(v_empty.index(before))
            acc = acc * alpha
        last = (ring + hi - 1) % NUM_STAGES
        mbarrier.wait(v_ready.index(last), ((ring + hi - 1) // NUM_STAGES) & 1)
        acc = warpgroup_mma(p, v_smem.index(last).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(v_empty.index(last))
    return acc, m_i, l_i


@gluon.jit
def _consumer(WG: gl.constexpr, o_desc, lse_ptr, kpm_ptr, q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready,
              v_ready, k_empty, v_empty, block_cnt_ptr, block_idx_ptr, H, BH, N_Q, N_K, qk_scale,
              BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, OVERLAP: gl.constexpr,
              CONSUMERS: gl.constexpr, KEY_PADDING: gl.constexpr, SPARSE_BLOCK: gl.constexpr):
    """Warpgroup WG (0 .. CONSUMERS - 1): rows WG·64 .. WG·64 + 63 of each query tile this program takes."""
    ROWS: gl.constexpr = o_desc.block_type.shape[1]
    HEAD_DIM: gl.constexpr = o_desc.block_type.shape[2]
    s_layout: gl.constexpr = _wgmma_layout(BLOCK_N)
    o_layout: gl.constexpr = _wgmma_layout(HEAD_DIM)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_buf = o_smem.index(WG)
    m_tiles = gl.cdiv(N_Q, CONSUMERS * ROWS)
    ring = 0  # as the producer counts them
    for t in range(gl.program_id(0), m_tiles * BH, gl.num_programs(0)):
        pid_m, bh = _forward_tile(t, m_tiles, CAUSAL)
        tile0 = pid_m * CONSUMERS * ROWS
        row0 = tile0 + WG * ROWS
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
        m_i = gl.full([ROWS], float("-inf"), gl.float32, row_layout)
        l_i = gl.zeros([ROWS], gl.float32, row_layout)
        kpm_row = kpm_ptr + (bh // H).to(gl.int64) * N_K  # read under KEY_PADDING only

        # tiles every row here sees whole need no mask; the rest (diagonal, end of the keys, padding) do. A
        # block-sparse tile's list is both warpgroups' (the mask by element keeps each to its diagonal).
        first, hi = _forward_key_tiles(block_cnt_ptr, bh, pid_m, row0, ROWS, N_Q, N_K, BLOCK_N, CAUSAL, SPARSE_BLOCK)
        full = _whole_key_tiles(row0, N_Q, N_K, BLOCK_N, CAUSAL, KEY_PADDING or SPARSE_BLOCK > 0)
        q = q_smem.index(WG).reshape([ROWS, HEAD_DIM])
        mbarrier.wait(q_ready.index(WG), _q_phase(t))  # even with no key tile, so that the phases stay in step
        acc, m_i, l_i = _attend(q, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, acc, m_i, l_i, 0, full, ring,
                                row0, N_Q, N_K, qk_scale, kpm_row, block_idx_ptr, first, False, CAUSAL, BLOCK_N,
                                NUM_STAGES, OVERLAP, KEY_PADDING, SPARSE_BLOCK)
        acc, m_i, l_i = _attend(q, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, acc, m_i, l_i, full, hi,
                                ring, row0, N_Q, N_K, qk_scale, kpm_row, block_idx_ptr, first, True, CAUSAL, BLOCK_N,
                                NUM_STAGES, OVERLAP, KEY_PADDING, SPARSE_BLOCK)
        mbarrier.arrive(q_empty.index(WG))  # the products reading Q have completed
        # Causal: the lower rows' last tiles lie above this warpgroup's diagonal. It still releases them, after
        # they have arrived (so its arrival counts toward the phase of that load, not of the one before).
        n_tiles = hi if SPARSE_BLOCK else _key_tiles(tile0, CONSUMERS * ROWS, N_Q, N_K, BLOCK_N, CAUSAL)
        for i in range(hi, n_tiles):
            s = (ring + i) % NUM_STAGES
            phase = ((ring + i) // NUM_STAGES) & 1
            mbarrier.wait(k_ready.index(s), phase)
            mbarrier.arrive(k_empty.index(s))
            mbarrier.wait(v_ready.index(s), phase)
            mbarrier.arrive(v_empty.index(s))
        ring += n_tiles

        seen = l_i > 0  # a row that saw no key at all gives zeros, and an infinite LSE
        l_safe = gl.where(seen, l_i, 1.0)
        out = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
        lse = gl.where(seen, m_i + gl.log2(l_safe), float("inf"))
        rows = row0 + gl.arange(0, ROWS, layout=row_layout)
        gl.store(lse_ptr + bh.to(gl.int64) * N_Q + rows, lse, mask=rows < N_Q)
        # O leaves through a buffer of its own, while the producer loads the next tile's Q; the previous tile's
        # store must have read the buffer first. The 3-D descriptor clips rows past seq_q, so they never reach
        # the next head's rows.
        tma.store_wait(0)
        o_buf.reshape([ROWS, HEAD_DIM]).store(out.to(o_desc.dtype))
        fence_async_shared()
        _tma_store(o_desc, [bh, row0, 0], o_buf)
    tma.store_wait(0)


@gluon.jit
def _attn_fwd(q_desc, k_desc, v_desc, o_desc, lse_ptr, kpm_ptr, block_cnt_ptr, block_idx_ptr, H, KV_GROUPS, BH, N_Q,
              N_K, qk_scale, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr,
              OVERLAP: gl.constexpr, CONSUMERS: gl.constexpr, KEY_PADDING: gl.constexpr, SPARSE_BLOCK: gl.constexpr):
    """Query tiles pid, pid + programs, ... of the m_tiles · BH: one each where the grid has a program per tile,
    several where it is persistent (a program an SM), and a tile's loads then overlap the previous one's end."""
    # the register file (64K) shared out by warpgroup: 32 a thread to the producer's (its loop over query tiles
    # spilled in 24), the rest to the consumers' in multiples of 8 (setmaxnreg's step): 240 each for two, 160 for
    # three, as with 24
    CONSUMER_REGS: gl.constexpr = (65536 // 128 - 32) // CONSUMERS // 8 * 8
    dtype: gl.constexpr = q_desc.dtype
    ROWS: gl.constexpr = q_desc.block_type.shape[1]
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[2]
    q_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, 1, ROWS, HEAD_DIM], q_desc.layout)
    o_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, 1, ROWS, HEAD_DIM], o_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for wg in gl.static_range(CONSUMERS):
        mbarrier.init(q_ready.index(wg), count=1)  # the producer's expect is the one arrival
        mbarrier.init(q_empty.index(wg), count=1)  # and its warpgroup's the one that frees it
    for s in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=CONSUMERS)  # one arrival from each consumer warpgroup
        mbarrier.init(v_empty.index(s), count=CONSUMERS)
    fence_async_shared()  # the inits, before TMA (the async proxy) touches the barriers
    _cta_barrier()
    # the default partition is consumer 0; the other consumers are four-warp workers beside the one-warp producer
    # (each partition's arguments written out: a tuple built once and reused loses its constants' constexpr-ness)
    if CONSUMERS == 2:
        gl.warp_specialize([
            (_consumer, (0, o_desc, lse_ptr, kpm_ptr, q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready,
                         v_ready, k_empty, v_empty, block_cnt_ptr, block_idx_ptr, H, BH, N_Q, N_K, qk_scale, BLOCK_N,
                         NUM_STAGES, CAUSAL, OVERLAP, CONSUMERS, KEY_PADDING, SPARSE_BLOCK)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready, k_empty,
                         v_empty, block_cnt_ptr, block_idx_ptr, H, KV_GROUPS, BH, N_Q, N_K, BLOCK_N, NUM_STAGES, CAUSAL,
                         CONSUMERS, SPARSE_BLOCK)),
            (_consumer, (1, o_desc, lse_ptr, kpm_ptr, q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready,
                         v_ready, k_empty, v_empty, block_cnt_ptr, block_idx_ptr, H, BH, N_Q, N_K, qk_scale, BLOCK_N,
                         NUM_STAGES, CAUSAL, OVERLAP, CONSUMERS, KEY_PADDING, SPARSE_BLOCK)),
        ], [1, 4], [32, CONSUMER_REGS])
    else:
        gl.warp_specialize([
            (_consumer, (0, o_desc, lse_ptr, kpm_ptr, q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready,
                         v_ready, k_empty, v_empty, block_cnt_ptr, block_idx_ptr, H, BH, N_Q, N_K, qk_scale, BLOCK_N,
                         NUM_STAGES, CAUSAL, OVERLAP, CONSUMERS, KEY_PADDING, SPARSE_BLOCK)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready, k_empty,
                         v_empty, block_cnt_ptr, block_idx_ptr, H, KV_GROUPS, BH, N_Q, N_K, BLOCK_N, NUM_STAGES, CAUSAL,
                         CONSUMERS, SPARSE_BLOCK)),
            (_consumer, (1, o_desc, lse_ptr, kpm_ptr, q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready,
                         v_ready, k_empty, v_empty, block_cnt_ptr, block_idx_ptr, H, BH, N_Q, N_K, qk_scale, BLOCK_N,
                         NUM_STAGES, CAUSAL, OVERLAP, CONSUMERS, KEY_PADDING, SPARSE_BLOCK)),
            (_consumer, (2, o_desc, lse_ptr, kpm_ptr, q_smem, o_smem, k_smem, v_smem, q_ready, q_empty, k_ready,
                         v_ready, k_empty, v_empty, block_cnt_ptr, block_idx_ptr, H, BH, N_Q, N_K, qk_scale, BLOCK_N,
                         NUM_STAGES, CAUSAL, OVERLAP, CONSUMERS, KEY_PADDING, SPARSE_BLOCK)),
        ], [1, 4, 4], [32, CONSUMER_REGS, CONSUMER_REGS])
    for wg in gl.static_range(CONSUMERS):
        mbarrier.invalidate(q_ready.index(wg))
        mbarrier.invalidate(q_empty.index(wg))
    for s in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(k_ready.index(s))
        mbarrier.invalidate(v_ready.index(s))
        mbarrier.invalidate(k_empty.index(s))
        mbarrier.invalidate(v_empty.index(s))


# ----------------------------------------------------------------------------------------------------- host side
# Causal grids are persistent up to this many keys (by the candidates' head_dim), a program a tile beyond:
# persistent ÷ a program a tile at 2K / 4K / 8K keys, d = 128: 1.11 / 0.98 / 0.84 (H100), 1.14 / 0.99 / 0.87 (H200);
# d = 64: 1.11 / 1.03 / 0.95 (H100), 1.12 / 1.06 / 0.94 (H200) (`tune_flash_gluon.py` at 67c6102; NOTES.md,
# "Causal persistence by head size").
CAUSAL_PERSISTENT_MAX_KEYS = {64: 4096, 128: 2048}


def kernel_config(head_dim: int, causal: bool, n_keys: int, padded: bool = False, sparse: bool = False) -> dict:
    """The kernel's configuration for a head_dim, mask and key length, as measured on an H200 (NOTES.md, "The
    Gluon forward overlapped"): at head_dim 128 the softmax overlapped with the P·V product (0.93-0.97 of cuDNN's
    time without, 1.01-1.06 with, from 4K keys), in two K/V stages of 128 keys (three fit, and were no faster); at
    64, whose P·V product is too short to hide a softmax, no overlap (1-6% faster without), three stages, and
    three consumer warpgroups of 64 rows (1.04-1.10 of cuDNN from 4K keys, against two's 0.91-0.96; NOTES.md,
    "Three consumer warpgroups"). Dense grids are persistent (0.69 -> 0.87 of cuDNN at 512 keys, d = 64, on an
    H100; NOTES.md, "A persistent forward"), causal ones up to CAUSAL_PERSISTENT_MAX_KEYS: beyond, a program a
    tile lets the GPU hand the next tile to whichever SM is free, where a persistent program's fixed share of
    long and short tiles leaves some SMs with more work than others. With a key padding mask (`padded`), the
    configuration of KEY_PADDING_CONFIGS; block-sparse (`sparse`), that of SPARSE_CONFIGS."""
    candidates = 128 if head_dim > 64 else 64
    if sparse:
        return dict(SPARSE_CONFIGS[candidates][0])
    persistent = not causal or n_keys <= CAUSAL_PERSISTENT_MAX_KEYS[candidates]
    return dict((KEY_PADDING_CONFIGS if padded else CANDIDATES)[candidates][0], PERSISTENT=persistent)


# The configurations worth timing: kernel_config's choice first, then the others that fit shared memory and
# compile for sm_90 without spilling under Triton 3.6 and 3.9 (NOTES.md, "Three consumer warpgroups").
# `scripts/tune_flash_gluon.py` times each against cuDNN; the GPU tests run each against the reference.
# FlashAttention-3 takes 192 query rows (three consumers) at head_dim 64; 192-key tiles, its other choice there,
# are not a power of two, which Gluon's tiles must be. PERSISTENT is the host's alone: a grid of one program an
# SM, each taking query tiles in turn, rather than one program a tile (the kernel is the same).
CANDIDATES = {
    64: [dict(CONSUMERS=3, BLOCK_N=128, NUM_STAGES=3, OVERLAP=False, PERSISTENT=True),
         dict(CONSUMERS=3, BLOCK_N=128, NUM_STAGES=3, OVERLAP=False, PERSISTENT=False),
         dict(CONSUMERS=2, BLOCK_N=128, NUM_STAGES=3, OVERLAP=False, PERSISTENT=False),
         dict(CONSUMERS=3, BLOCK_N=128, NUM_STAGES=4, OVERLAP=False, PERSISTENT=False),
         dict(CONSUMERS=2, BLOCK_N=256, NUM_STAGES=2, OVERLAP=False, PERSISTENT=False),
         dict(CONSUMERS=2, BLOCK_N=256, NUM_STAGES=3, OVERLAP=False, PERSISTENT=False)],
    128: [dict(CONSUMERS=2, BLOCK_N=128, NUM_STAGES=2, OVERLAP=True, PERSISTENT=True),
          dict(CONSUMERS=2, BLOCK_N=128, NUM_STAGES=2, OVERLAP=True, PERSISTENT=False)],
}


# With a key padding mask each consumer thread holds a key tile's mask bytes beside its scores, and the unpadded
# configurations spilled (`tests/gluon_offline.py`: d = 64 three consumers 52-72 bytes under Triton 3.6 and
# 136-484 under 3.9; d = 128, 128-key tiles with the overlap, 0-16 and 112-224). These compile without spills under
# both: at d = 64 two consumers, at 128 the overlap kept on 64-key tiles. The first of each list is kernel_config's,
# the rest the alternatives `scripts/tune_flash_gluon.py --key-padding` times (the unpadded configuration, spills
# and all, and at d = 128 128-key tiles without the overlap, which spill nothing). On an H100 (NOTES.md, "Key
# padding timed") the first was the fastest at 128 in five points of six; at 64 none reached the tl forward.
KEY_PADDING_CONFIGS = {
    64: [dict(CONSUMERS=2, BLOCK_N=128, NUM_STAGES=3, OVERLAP=False, PERSISTENT=True), CANDIDATES[64][0]],
    128: [dict(CONSUMERS=2, BLOCK_N=64, NUM_STAGES=3, OVERLAP=True, PERSISTENT=True),
          dict(CONSUMERS=2, BLOCK_N=128, NUM_STAGES=2, OVERLAP=False, PERSISTENT=True), CANDIDATES[128][0]],
}


# Block-sparse: a query tile and a key tile are each one sparse block (SPARSE_BLOCK, 128 keys), so that a tile's
# list of kept blocks is its list of key tiles: two consumers at both head sizes, otherwise as CANDIDATES', and a
# program a tile (the lists' lengths differ, which the GPU's own scheduling balances). Timed at d = 128 only (H100,
# 16K keys: 1.23-1.51x the tl forward's speed on the same mask).
SPARSE_CONFIGS = {
    64: [dict(CONSUMERS=2, BLOCK_N=128, NUM_STAGES=3, OVERLAP=False, PERSISTENT=False)],
    128: [dict(CONSUMERS=2, BLOCK_N=128, NUM_STAGES=2, OVERLAP=True, PERSISTENT=False)],
}


def config_name(config: dict) -> str:
    """A short name for a configuration: consumers x keys per tile, stages, 'o' where the softmax overlaps, 'p'
    where the grid is persistent."""
    return (f"{config['CONSUMERS']}x{config['BLOCK_N']}s{config['NUM_STAGES']}" + ("o" if config["OVERLAP"] else "")
            + ("p" if config["PERSISTENT"] else ""))


def kernel_constants(config: dict) -> dict:
    """A configuration's constexprs of `_attn_fwd` (all of it but the host's choice of grid; the call gives the
    mask's, CAUSAL, KEY_PADDING and SPARSE_BLOCK)."""
    return {name: value for name, value in config.items() if name != "PERSISTENT"}


def persistent_programs(m_tiles: int, tiles: int, sms: int, causal: bool) -> int:
    """A persistent grid's size: a program an SM. A program takes tiles t, t + P, ... of a head's m_tiles in
    turn; where P is a multiple of m_tiles (132 SMs and 3, 6, 11 or 22 tiles a head, at 512 to 4K keys), every
    program would take the same tile of each head, so causal programs would each see the same length every time,
    some the longest and some the shortest. Causal grids take the most SMs whose count shares no factor with
    m_tiles: each program then takes each tile of a head in turn."""
    programs = min(tiles, sms)
    while causal and math.gcd(programs, m_tiles) > 1:
        programs -= 1
    return programs


def smem_layout(block_shape, dtype):
    """The swizzled shared-memory layout of a TMA tile; `dtype` is a Gluon dtype."""
    return _smem_layout(tuple(block_shape), dtype)


@functools.cache
def _smem_layout(block_shape: tuple, dtype):
    # made once per tile: Gluon computes a layout in Python, which cost the host about 10 µs a descriptor on every
    # call (a third of the forward's host time, on the CI machine)
    return gl.NVMMASharedLayout.get_default_for(list(block_shape), dtype)


def refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why `forward` does not cover these inputs, or None where it does: it takes fp16 or bf16, head_dim 64 or
    128, contiguous (batch, heads, seq, head_dim) tensors of matching shapes on a Hopper GPU, with a Gluon this
    file knows. The checks of the tensors come first, so that the CPU tests reach them."""
    tensors = (q, k, v)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in tensors):
        return "q, k and v must be 4-D tensors"
    if not (q.dtype == k.dtype == v.dtype and q.dtype in GLUON_DTYPES):
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: it takes one of {GLUON_DTYPES} for all three"
    b, h, n_q, d = q.shape
    if d not in GLUON_HEAD_DIMS:
        return f"head_dim {d}: it takes {GLUON_HEAD_DIMS}"
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or h % k.shape[1]:
        return (f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: k and v alike, of q's batch and "
                f"head_dim, with kv_heads dividing heads")
    if not all(t.is_contiguous() for t in tensors):
        return "q, k and v must be contiguous (batch, heads, seq, head_dim) tensors"
    if min(n_q, k.shape[2], b * h) == 0:
        return "an empty input"
    if b * h > MAX_GRID_Y:
        return f"batch·heads {b * h} > {MAX_GRID_Y} (the grid's second dimension)"
    if not _GLUON_OK or not triton.__version__.startswith(TRITON_VERSIONS):
        return (f"Triton {triton.__version__} has no Gluon that this kernel knows (it was written for "
                f"{', '.join(v.rstrip('.') for v in TRITON_VERSIONS)})")
    if INTERPRET:
        return "Gluon does not run under TRITON_INTERPRET=1"
    if not (q.is_cuda and q.device == k.device == v.device):
        return f"devices {q.device}, {k.device}, {v.device}: it needs all three on one CUDA GPU"
    if any(t.data_ptr() % 16 for t in tensors):
        return "a tensor whose storage does not start on 16 bytes (TMA needs that)"
    major, minor = capability(q.device)
    if major != 9:
        return f"compute capability {major}.{minor}: it is written for Hopper (9.x)"
    return None


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float,
            config: dict | None = None, key_padding_mask: torch.Tensor | None = None,
            block_lists: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ · softmax_scale) v and the base-2 LSE (float32, (batch, heads, seq_q)) for inputs that
    `refusal` accepts; softmax_scale > 0 (the kernel takes the row maximum before scaling). `config`
    replaces `kernel_config(head_dim, causal, seq_k, padded)` (`scripts/tune_flash_gluon.py` compares them).
    key_padding_mask: (batch, seq_k), nonzero for the keys to attend to (bool or int8, as flash_attn checks it);
    a row that sees no key gives zeros and an LSE of +inf. block_lists: block-sparse, the CSR lists (offsets,
    indices) of kept blocks of SPARSE_BLOCK keys per (batch · head, query block), as `BlockSparseLayout.by_query`
    holds them (not with a key padding mask)."""
    b, h, n_q, d = q.shape
    kv_h, n_k = k.shape[1], k.shape[2]
    padded, sparse = key_padding_mask is not None, block_lists is not None
    if sparse and padded:
        raise ValueError("the Gluon forward takes a key padding mask or block-sparse lists, not both")
    if sparse:
        offsets, indices = block_lists
        rows = b * h * cdiv(n_q, SPARSE_BLOCK) + 1
        if not (offsets.shape == (rows,) and offsets.dtype == indices.dtype == torch.int32
                and offsets.device == indices.device == q.device):
            raise ValueError(f"block_lists must be int32 (offsets, indices) on {q.device} with {rows} offsets, a list "
                             f"per (batch · head, {SPARSE_BLOCK}-row query block) as BlockSparseLayout.by_query "
                             f"holds them; got {offsets.dtype} {tuple(offsets.shape)} on {offsets.device}")
    cfg = config or kernel_config(d, causal, n_k, padded, sparse)
    if sparse and not cfg["BLOCK_N"] == cfg["CONSUMERS"] * ROWS_PER_WARPGROUP == SPARSE_BLOCK:
        raise ValueError(f"a block-sparse forward takes query and key tiles of one {SPARSE_BLOCK}-key block; "
                         f"{config_name(cfg)} has others")
    out = torch.empty_like(q)
    lse = torch.empty(b, h, n_q, device=q.device, dtype=torch.float32)
    kpm = int8_mask(key_padding_mask, lse)
    by_query = block_lists if sparse else (lse, lse)  # placeholders the kernel never reads when dense
    dtype = gl.float16 if q.dtype == torch.float16 else gl.bfloat16
    q_block, kv_block = [1, ROWS_PER_WARPGROUP, d], [1, cfg["BLOCK_N"], d]
    # 3-D views (batch·heads, seq, head_dim): a tile never runs into the next head's rows, as TMA fills
    # reads past seq with zeros and clips stores there
    q_desc = TensorDescriptor.from_tensor(q.view(b * h, n_q, d), q_block, smem_layout(q_block, dtype))
    o_desc = TensorDescriptor.from_tensor(out.view(b * h, n_q, d), q_block, smem_layout(q_block, dtype))
    kv_layout = smem_layout(kv_block, dtype)
    k_desc = TensorDescriptor.from_tensor(k.view(b * kv_h, n_k, d), kv_block, kv_layout)
    v_desc = TensorDescriptor.from_tensor(v.view(b * kv_h, n_k, d), kv_block, kv_layout)
    m_tiles = cdiv(n_q, cfg["CONSUMERS"] * ROWS_PER_WARPGROUP)
    tiles = m_tiles * b * h
    grid = (persistent_programs(m_tiles, tiles, sm_count(q.device), causal) if cfg["PERSISTENT"] else tiles, )
    args = (q_desc, k_desc, v_desc, o_desc, lse, kpm, *by_query, h, h // kv_h, b * h, n_q, n_k,
            float(softmax_scale * LOG2E))
    constants = dict(CAUSAL=causal, KEY_PADDING=padded, SPARSE_BLOCK=SPARSE_BLOCK if sparse else 0, num_warps=4,
                     **kernel_constants(cfg))
    launch(_attn_fwd, grid, args, constants, _kept((q, k, v, kpm, *by_query), causal, config_name(cfg)), "forward")
    return out, lse


# one compiled kernel per signature of the tensors a pass is given and its settings: later calls skip the JIT's
# binding of the descriptors (the forward's and the backward's keys differ in their tensors)
_kept = KeptLaunches()


# ------------------------------------------------------------------------------------------------ backward: dK, dV
@gluon.jit
def _query_blocks(n0, N_Q, N_K, BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr):
    """The query blocks that see any of the keys from n0 on: causal rows before n0's diagonal see none."""
    lo = 0
    if CAUSAL:
        lo = gl.maximum(n0 - (N_K - N_Q), 0) // BLOCK_M
    return lo, gl.cdiv(N_Q, BLOCK_M)


@gluon.jit
def _block_list(block_cnt_ptr, head, block, N, STEP: gl.constexpr, SPARSE_BLOCK: gl.constexpr):
    """Where the CSR list of sparse block `block` (of N rows or keys) of `head` (batch · head, or batch · KV head
    for `kv_head_lists`) starts, and how many steps of STEP rows or keys its entries make."""
    row = head * gl.cdiv(N, SPARSE_BLOCK) + block
    first = gl.load(block_cnt_ptr + row)
    return first, (gl.load(block_cnt_ptr + row + 1) - first) * (SPARSE_BLOCK // STEP)


@gluon.jit
def _list_step(block_idx_ptr, first, j, STEP: gl.constexpr, SPARSE_BLOCK: gl.constexpr):
    """The j-th step of a list (`_block_list`): its entry, and the step's offset within the entry's block."""
    SUBS: gl.constexpr = SPARSE_BLOCK // STEP  # steps per sparse block
    return gl.load(block_idx_ptr + first + j // SUBS), (j % SUBS) * STEP


@gluon.jit
def _load_q_do(q_desc, do_desc, q_smem, do_smem, q_ready, do_ready, qdo_empty, lse_ptr, delta_ptr, lse_smem,
               delta_smem, bh, row0, j, N_Q, NUM_STAGES: gl.constexpr):
    """The j-th query block of the dK/dV loop (rows row0.. of head bh) into stage j % NUM_STAGES of the ring: Q
    and dO by TMA, then, while they are copied, the rows' LSE and delta by this warp's loads and stores, with a
    second arrival on Q's barrier (so the consumers, once Q is there, read them from shared memory: no load from
    global memory in their loop)."""
    s = j % NUM_STAGES
    mbarrier.wait(qdo_empty.index(s), ((j // NUM_STAGES) & 1) ^ 1)
    mbarrier.expect(q_ready.index(s), q_desc.block_type.nbytes)
    _tma_load(q_desc, [bh, row0, 0], q_ready.index(s), q_smem.index(s))
    mbarrier.expect(do_ready.index(s), do_desc.block_type.nbytes)
    _tma_load(do_desc, [bh, row0, 0], do_ready.index(s), do_smem.index(s))
    BLOCK_M: gl.constexpr = lse_smem.type.shape[1]
    rows = row0 + gl.arange(0, BLOCK_M, layout=gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0]))
    at = bh.to(gl.int64) * N_Q + rows
    # rows past the end: an infinite LSE gives them P = 0; both loads issued before either store waits on one
    lse = gl.load(lse_ptr + at, mask=rows < N_Q, other=float("inf"))
    delta = gl.load(delta_ptr + at, mask=rows < N_Q, other=0.0)
    lse_smem.index(s).store(lse)
    delta_smem.index(s).store(delta)
    _cta_barrier()  # every lane's stores before the one lane's arrive (its release orders its own alone)
    mbarrier.arrive(q_ready.index(s))


@gluon.jit
def _bwd_producer(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_ready, q_ready, do_ready,
                  qdo_empty, lse_ptr, delta_ptr, lse_smem, delta_smem, block_cnt_ptr, block_idx_ptr, H, KV_GROUPS,
                  N_Q, N_K, NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, SPARSE_BLOCK: gl.constexpr):
    """K and V of the 128-key tile once (a 64-key half per consumer), then Q, dO and the rows' LSE and delta of
    every query block of every query head of the KV head that sees them (block-sparse: those of the kept blocks, in
    one list for all the query heads, `kv_head_lists`: nested loops over heads and blocks spilled registers), into
    a ring of NUM_STAGES buffers."""
    ROWS: gl.constexpr = k_desc.block_type.shape[1]
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[1]
    pid_n, bhk = gl.program_id(0), gl.program_id(1)
    kv_heads = H // KV_GROUPS
    b, hk = bhk // kv_heads, bhk % kv_heads
    mbarrier.expect(kv_ready, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
    for wg in gl.static_range(2):
        _tma_load(k_desc, [bhk, pid_n * 2 * ROWS + wg * ROWS, 0], kv_ready, k_smem.index(wg))
        _tma_load(v_desc, [bhk, pid_n * 2 * ROWS + wg * ROWS, 0], kv_ready, v_smem.index(wg))
    if SPARSE_BLOCK:
        first, steps = _block_list(block_cnt_ptr, bhk, pid_n, N_K, BLOCK_M, SPARSE_BLOCK)
        q_blocks = gl.cdiv(N_Q, SPARSE_BLOCK)
        for j in range(steps):
            entry, offset = _list_step(block_idx_ptr, first, j, BLOCK_M, SPARSE_BLOCK)  # group · q_blocks + block
            bh, row0 = b * H + hk * KV_GROUPS + entry // q_blocks, (entry % q_blocks) * SPARSE_BLOCK + offset
            _load_q_do(q_desc, do_desc, q_smem, do_smem, q_ready, do_ready, qdo_empty, lse_ptr, delta_ptr, lse_smem,
                       delta_smem, bh, row0, j, N_Q, NUM_STAGES)
    else:
        lo, hi = _query_blocks(pid_n * 2 * ROWS, N_Q, N_K, BLOCK_M, CAUSAL)
        blocks = hi - lo
        for j in range(KV_GROUPS * blocks):
            _load_q_do(q_desc, do_desc, q_smem, do_smem, q_ready, do_ready, qdo_empty, lse_ptr, delta_ptr, lse_smem,
                       delta_smem, b * H + hk * KV_GROUPS + j // blocks, (lo + j % blocks) * BLOCK_M, j, N_Q,
                       NUM_STAGES)


@gluon.jit
def _dkdv_step(k, v, n0, dk, dv, q_smem, do_smem, q_ready, do_ready, qdo_empty, lse_smem, delta_smem, row0, j,
               N_Q, N_K, qk_scale, NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr):
    """dK and dV of a consumer's keys (n0..) plus the j-th query block's share (rows row0..), as the `tl` kernel
    sums them (`_attn_bwd_dkdv`): Pᵀ = exp2(K·Qᵀ · scale - lse), dV += Pᵀ·dO, dPᵀ = V·dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ - delta),
    dK += dSᵀ·Q; Pᵀ and dSᵀ go to the products from registers, the rows' LSE and delta come from the ring
    (`_load_q_do`)."""
    ROWS: gl.constexpr = k.type.shape[0]
    HEAD_DIM: gl.constexpr = k.type.shape[1]
    BLOCK_M: gl.constexpr = q_smem.type.shape[2]
    dtype: gl.constexpr = k.dtype
    st_layout: gl.constexpr = _wgmma_layout(BLOCK_M)
    acc_layout: gl.constexpr = _wgmma_layout(HEAD_DIM)
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    by_row: gl.constexpr = gl.SliceLayout(0, st_layout)
    s = j % NUM_STAGES
    phase = (j // NUM_STAGES) & 1
    mbarrier.wait(q_ready.index(s), phase)
    q = q_smem.index(s).reshape([BLOCK_M, HEAD_DIM])
    s_t = warpgroup_mma(k, q.permute((1, 0)), gl.zeros([ROWS, BLOCK_M], gl.float32, st_layout), use_acc=False,
                        is_async=True)
    mbarrier.wait(do_ready.index(s), phase)
    do = do_smem.index(s).reshape([BLOCK_M, HEAD_DIM])
    dp_t = warpgroup_mma(v, do.permute((1, 0)), gl.zeros([ROWS, BLOCK_M], gl.float32, st_layout),
                         use_acc=False, is_async=True)
    lse = lse_smem.index(s).load(by_row)
    s_t = warpgroup_mma_wait(1, deps=(s_t,))  # K·Qᵀ done; V·dOᵀ may still run under the exponentials
    p_t = gl.exp2(s_t * qk_scale - lse[None, :])
    if CAUSAL:
        if row0 + (N_K - N_Q) < n0 + ROWS - 1:  # the block's first row sees not all the keys: the rest skip this
            keys = n0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, st_layout))
            rows = row0 + gl.arange(0, BLOCK_M, layout=by_row)
            p_t = gl.where(keys[:, None] <= rows[None, :] + (N_K - N_Q), p_t, 0.0)
    dv = warpgroup_mma(gl.convert_layout(p_t.to(dtype), op_layout), do, dv, is_async=True)
    dp_t = warpgroup_mma_wait(1, deps=(dp_t,))  # V·dOᵀ done; Pᵀ·dO may still run under dSᵀ
    ds_t = p_t * (dp_t - delta_smem.index(s).load(by_row)[None, :])
    dk = warpgroup_mma(gl.convert_layout(ds_t.to(dtype), op_layout), q, dk, is_async=True)
    dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
    mbarrier.arrive(qdo_empty.index(s))
    return dk, dv


@gluon.jit
def _bwd_consumer(WG: gl.constexpr, dk_desc, dv_desc, lse_smem, delta_smem, q_smem, do_smem, k_smem, v_smem,
                  kv_ready, q_ready, do_ready, qdo_empty, block_cnt_ptr, block_idx_ptr, kpm_ptr, H, KV_GROUPS, N_Q,
                  N_K, sm_scale, qk_scale, NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                  SPARSE_BLOCK: gl.constexpr, KEY_PADDING: gl.constexpr):
    """Warpgroup WG (0 or 1): dK and dV of keys WG·64 .. WG·64 + 63 of the tile, over the query blocks the
    producer loads, in its order (`_dkdv_step`). Under KEY_PADDING the padded keys' gradients are set to zero at
    the end: a key's rows of Pᵀ and dSᵀ reach its own rows of dV and dK alone, so the loop need not mask them."""
    ROWS: gl.constexpr = dk_desc.block_type.shape[1]
    HEAD_DIM: gl.constexpr = dk_desc.block_type.shape[2]
    BLOCK_M: gl.constexpr = q_smem.type.shape[2]
    dtype: gl.constexpr = dk_desc.dtype
    acc_layout: gl.constexpr = _wgmma_layout(HEAD_DIM)
    pid_n, bhk = gl.program_id(0), gl.program_id(1)
    n0 = pid_n * 2 * ROWS + WG * ROWS
    dk = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
    k_buf = k_smem.index(WG)
    v_buf = v_smem.index(WG)
    k = k_buf.reshape([ROWS, HEAD_DIM])
    v = v_buf.reshape([ROWS, HEAD_DIM])
    mbarrier.wait(kv_ready, 0)
    if SPARSE_BLOCK:
        first, steps = _block_list(block_cnt_ptr, bhk, pid_n, N_K, BLOCK_M, SPARSE_BLOCK)
        q_blocks = gl.cdiv(N_Q, SPARSE_BLOCK)
        for j in range(steps):
            entry, offset = _list_step(block_idx_ptr, first, j, BLOCK_M, SPARSE_BLOCK)
            row0 = (entry % q_blocks) * SPARSE_BLOCK + offset
            dk, dv = _dkdv_step(k, v, n0, dk, dv, q_smem, do_smem, q_ready, do_ready, qdo_empty, lse_smem,
                                delta_smem, row0, j, N_Q, N_K, qk_scale, NUM_STAGES, CAUSAL)
    else:
        lo, hi = _query_blocks(pid_n * 2 * ROWS, N_Q, N_K, BLOCK_M, CAUSAL)
        blocks = hi - lo
        for j in range(KV_GROUPS * blocks):
            dk, dv = _dkdv_step(k, v, n0, dk, dv, q_smem, do_smem, q_ready, do_ready, qdo_empty, lse_smem,
                                delta_smem, (lo + j % blocks) * BLOCK_M, j, N_Q, N_K, qk_scale, NUM_STAGES, CAUSAL)
    if KEY_PADDING:
        keys = n0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, acc_layout))
        batch = bhk // (H // KV_GROUPS)
        kept = gl.load(kpm_ptr + batch.to(gl.int64) * N_K + keys, mask=keys < N_K, other=0) != 0
        dk = gl.where(kept[:, None], dk, 0.0)
        dv = gl.where(kept[:, None], dv, 0.0)
    # out through K's and V's buffers (their last products have completed); the descriptors clip keys past N_K
    k.store((dk * sm_scale).to(dtype))
    v.store(dv.to(dtype))
    fence_async_shared()
    _tma_store(dk_desc, [bhk, n0, 0], k_buf)
    _tma_store(dv_desc, [bhk, n0, 0], v_buf)
    tma.store_wait(0)


@gluon.jit
def _attn_bwd_dkdv(q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc, lse_ptr, delta_ptr, kpm_ptr, block_cnt_ptr,
                   block_idx_ptr, H, KV_GROUPS, N_Q, N_K, sm_scale, qk_scale, NUM_STAGES: gl.constexpr,
                   CAUSAL: gl.constexpr, CONSUMER_REGS: gl.constexpr, SPARSE_BLOCK: gl.constexpr,
                   KEY_PADDING: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    ROWS: gl.constexpr = k_desc.block_type.shape[1]
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[1]
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[2]
    q_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, BLOCK_M, HEAD_DIM], do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [2, 1, ROWS, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, 1, ROWS, HEAD_DIM], v_desc.layout)
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    qdo_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    by_row: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])  # of a stage's rows
    lse_smem = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, BLOCK_M], by_row)
    delta_smem = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, BLOCK_M], by_row)
    mbarrier.init(kv_ready, count=1)
    for s in gl.static_range(NUM_STAGES):
        mbarrier.init(q_ready.index(s), count=2)  # Q's copy, and the rows' LSE and delta stored
        mbarrier.init(do_ready.index(s), count=1)
        mbarrier.init(qdo_empty.index(s), count=2)  # one arrival from each consumer warpgroup
    fence_async_shared()
    _cta_barrier()
    gl.warp_specialize([
        (_bwd_consumer, (0, dk_desc, dv_desc, lse_smem, delta_smem, q_smem, do_smem, k_smem, v_smem, kv_ready,
                         q_ready, do_ready, qdo_empty, block_cnt_ptr, block_idx_ptr, kpm_ptr, H, KV_GROUPS, N_Q,
                         N_K, sm_scale, qk_scale, NUM_STAGES, CAUSAL, SPARSE_BLOCK, KEY_PADDING)),
        (_bwd_producer, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_ready, q_ready,
                         do_ready, qdo_empty, lse_ptr, delta_ptr, lse_smem, delta_smem, block_cnt_ptr,
                         block_idx_ptr, H, KV_GROUPS, N_Q, N_K, NUM_STAGES, CAUSAL, SPARSE_BLOCK)),
        (_bwd_consumer, (1, dk_desc, dv_desc, lse_smem, delta_smem, q_smem, do_smem, k_smem, v_smem, kv_ready,
                         q_ready, do_ready, qdo_empty, block_cnt_ptr, block_idx_ptr, kpm_ptr, H, KV_GROUPS, N_Q,
                         N_K, sm_scale, qk_scale, NUM_STAGES, CAUSAL, SPARSE_BLOCK, KEY_PADDING)),
    ], [1, 4], [24, CONSUMER_REGS])
    mbarrier.invalidate(kv_ready)
    for s in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(q_ready.index(s))
        mbarrier.invalidate(do_ready.index(s))
        mbarrier.invalidate(qdo_empty.index(s))


# ------------------------------------------------------------------------------------------------ backward: dQ
@gluon.jit
def _load_k_v(k_desc, v_desc, k_smem, v_smem, kv_ready, kv_empty, kv_bh, key0, i, NUM_STAGES: gl.constexpr):
    """The i-th key tile of the dQ loop (keys key0.. of KV head kv_bh) into stage i % NUM_STAGES of the ring."""
    s = i % NUM_STAGES
    mbarrier.wait(kv_empty.index(s), ((i // NUM_STAGES) & 1) ^ 1)
    mbarrier.expect(kv_ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    _tma_load(k_desc, [kv_bh, key0, 0], kv_ready.index(s), k_smem.index(s))
    _tma_load(v_desc, [kv_bh, key0, 0], kv_ready.index(s), v_smem.index(s))


@gluon.jit
def _dq_producer(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, q_ready, kv_ready, kv_empty,
                 block_cnt_ptr, block_idx_ptr, H, KV_GROUPS, N_Q, N_K, NUM_STAGES: gl.constexpr,
                 CAUSAL: gl.constexpr, SPARSE_BLOCK: gl.constexpr):
    """Q and dO of the 128-row query tile once (a 64-row half per consumer), then K and V tiles into the ring
    (block-sparse: those of the kept blocks)."""
    ROWS: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[1]
    pid_m, bh = _query_tile(gl.program_id(0), gl.num_programs(0), CAUSAL), gl.program_id(1)
    kv_bh = (bh // H) * (H // KV_GROUPS) + (bh % H) // KV_GROUPS
    mbarrier.expect(q_ready, 2 * q_desc.block_type.nbytes + 2 * do_desc.block_type.nbytes)
    for wg in gl.static_range(2):
        _tma_load(q_desc, [bh, pid_m * 2 * ROWS + wg * ROWS, 0], q_ready, q_smem.index(wg))
        _tma_load(do_desc, [bh, pid_m * 2 * ROWS + wg * ROWS, 0], q_ready, do_smem.index(wg))
    if SPARSE_BLOCK:
        first, steps = _block_list(block_cnt_ptr, bh, pid_m, N_Q, BLOCK_N, SPARSE_BLOCK)  # this query block's
        for i in range(steps):
            key_block, offset = _list_step(block_idx_ptr, first, i, BLOCK_N, SPARSE_BLOCK)
            key0 = key_block * SPARSE_BLOCK + offset
            _load_k_v(k_desc, v_desc, k_smem, v_smem, kv_ready, kv_empty, kv_bh, key0, i, NUM_STAGES)
    else:
        for i in range(_key_tiles(pid_m * 2 * ROWS, 2 * ROWS, N_Q, N_K, BLOCK_N, CAUSAL)):
            _load_k_v(k_desc, v_desc, k_smem, v_smem, kv_ready, kv_empty, kv_bh, i * BLOCK_N, i, NUM_STAGES)


@gluon.jit
def _dq_step(q, do, rows, lse, delta, dq, k_smem, v_smem, kv_ready, kv_empty, key0, i, N_Q, N_K, qk_scale, kpm_row,
             NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, MASK: gl.constexpr, KEY_PADDING: gl.constexpr):
    """dQ of a consumer's rows plus the i-th key tile's share (keys key0..), as `_attn_bwd_dq` sums it:
    P = exp2(Q·Kᵀ · scale - lse), dP = dO·Vᵀ, dS = P ∘ (dP - delta), dQ += dS·K, dS from registers. MASK: the
    tile holds keys past N_K or, causal, past a row's diagonal (`_whole_key_tiles`), or padded keys (KEY_PADDING:
    kpm_row is this batch's int8 mask of the keys)."""
    ROWS: gl.constexpr = q.type.shape[0]
    HEAD_DIM: gl.constexpr = q.type.shape[1]
    BLOCK_N: gl.constexpr = k_smem.type.shape[2]
    dtype: gl.constexpr = q.dtype
    s_layout: gl.constexpr = _wgmma_layout(BLOCK_N)
    acc_layout: gl.constexpr = _wgmma_layout(HEAD_DIM)
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    s = i % NUM_STAGES
    mbarrier.wait(kv_ready.index(s), (i // NUM_STAGES) & 1)
    k = k_smem.index(s).reshape([BLOCK_N, HEAD_DIM])
    v = v_smem.index(s).reshape([BLOCK_N, HEAD_DIM])
    qk = warpgroup_mma(q, k.permute((1, 0)), gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False,
                       is_async=True)
    dp = warpgroup_mma(do, v.permute((1, 0)), gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False,
                       is_async=True)
    qk = warpgroup_mma_wait(1, deps=(qk,))  # Q·Kᵀ done; dO·Vᵀ may still run under the exponentials
    p = gl.exp2(qk * qk_scale - lse[:, None])
    if MASK:
        # keys past the end: TMA read their K as zeros, but exp2(-lse) may overflow (bf16: lse < -128; fp16: the
        # cast of dS), and inf · 0 in dS·K would be NaN
        cols = key0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        visible = cols[None, :] < N_K
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + (N_K - N_Q))
        if KEY_PADDING:
            visible = visible & (gl.load(kpm_row + cols, mask=cols < N_K, other=0) != 0)[None, :]
        p = gl.where(visible, p, 0.0)
    dp = warpgroup_mma_wait(0, deps=(dp,))
    ds = p * (dp - delta[:, None])
    dq = warpgroup_mma(gl.convert_layout(ds.to(dtype), op_layout), k, dq, is_async=True)
    dq = warpgroup_mma_wait(0, deps=(dq,))
    mbarrier.arrive(kv_empty.index(s))
    return dq


@gluon.jit
def _dq_consumer(WG: gl.constexpr, dq_desc, lse_ptr, delta_ptr, q_smem, do_smem, k_smem, v_smem, q_ready, kv_ready,
                 kv_empty, block_cnt_ptr, block_idx_ptr, kpm_ptr, H, N_Q, N_K, sm_scale, qk_scale,
                 NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, SPARSE_BLOCK: gl.constexpr,
                 KEY_PADDING: gl.constexpr):
    """Warpgroup WG (0 or 1): dQ of rows WG·64 .. WG·64 + 63 of the query tile, over the key tiles the producer
    loads, in its order (`_dq_step`)."""
    ROWS: gl.constexpr = dq_desc.block_type.shape[1]
    HEAD_DIM: gl.constexpr = dq_desc.block_type.shape[2]
    BLOCK_N: gl.constexpr = k_smem.type.shape[2]
    dtype: gl.constexpr = dq_desc.dtype
    s_layout: gl.constexpr = _wgmma_layout(BLOCK_N)
    acc_layout: gl.constexpr = _wgmma_layout(HEAD_DIM)
    pid_m, bh = _query_tile(gl.program_id(0), gl.num_programs(0), CAUSAL), gl.program_id(1)
    tile0 = pid_m * 2 * ROWS
    row0 = tile0 + WG * ROWS
    rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
    at = bh.to(gl.int64) * N_Q + rows
    lse = gl.load(lse_ptr + at, mask=rows < N_Q, other=float("inf"))  # rows past the end, or seeing no key: P = 0
    delta = gl.load(delta_ptr + at, mask=rows < N_Q, other=0.0)
    q_buf = q_smem.index(WG)
    q = q_buf.reshape([ROWS, HEAD_DIM])
    do = do_smem.index(WG).reshape([ROWS, HEAD_DIM])
    dq = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
    kpm_row = kpm_ptr + (bh // H).to(gl.int64) * N_K  # read under KEY_PADDING only
    mbarrier.wait(q_ready, 0)
    if SPARSE_BLOCK:  # both warpgroups take every tile of the list; the causal mask is applied per element
        first, steps = _block_list(block_cnt_ptr, bh, pid_m, N_Q, BLOCK_N, SPARSE_BLOCK)
        for i in range(steps):
            key_block, offset = _list_step(block_idx_ptr, first, i, BLOCK_N, SPARSE_BLOCK)
            dq = _dq_step(q, do, rows, lse, delta, dq, k_smem, v_smem, kv_ready, kv_empty,
                          key_block * SPARSE_BLOCK + offset, i, N_Q, N_K, qk_scale, kpm_row, NUM_STAGES, CAUSAL, True,
                          KEY_PADDING)
    else:
        hi = _key_tiles(row0, ROWS, N_Q, N_K, BLOCK_N, CAUSAL)
        whole = gl.minimum(_whole_key_tiles(row0, N_Q, N_K, BLOCK_N, CAUSAL, KEY_PADDING), hi)
        for i in range(whole):  # no key past the end, a diagonal or padded: no mask
            dq = _dq_step(q, do, rows, lse, delta, dq, k_smem, v_smem, kv_ready, kv_empty, i * BLOCK_N, i, N_Q, N_K,
                          qk_scale, kpm_row, NUM_STAGES, CAUSAL, False, KEY_PADDING)
        for i in range(whole, hi):
            dq = _dq_step(q, do, rows, lse, delta, dq, k_smem, v_smem, kv_ready, kv_empty, i * BLOCK_N, i, N_Q, N_K,
                          qk_scale, kpm_row, NUM_STAGES, CAUSAL, True, KEY_PADDING)
        # causal: the other warpgroup's last tile lies past this one's diagonal; released once it has arrived
        for i in range(hi, _key_tiles(tile0, 2 * ROWS, N_Q, N_K, BLOCK_N, CAUSAL)):
            s = i % NUM_STAGES
            mbarrier.wait(kv_ready.index(s), (i // NUM_STAGES) & 1)
            mbarrier.arrive(kv_empty.index(s))
    # out through Q's buffer (its last product has completed); the descriptor clips rows past N_Q
    q.store((dq * sm_scale).to(dtype))
    fence_async_shared()
    _tma_store(dq_desc, [bh, row0, 0], q_buf)
    tma.store_wait(0)


@gluon.jit
def _attn_bwd_dq(q_desc, do_desc, k_desc, v_desc, dq_desc, lse_ptr, delta_ptr, kpm_ptr, block_cnt_ptr, block_idx_ptr,
                 H, KV_GROUPS, N_Q, N_K, sm_scale, qk_scale, NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                 CONSUMER_REGS: gl.constexpr, SPARSE_BLOCK: gl.constexpr, KEY_PADDING: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    ROWS: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[1]
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[2]
    q_smem = gl.allocate_shared_memory(dtype, [2, 1, ROWS, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [2, 1, ROWS, HEAD_DIM], do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    for s in gl.static_range(NUM_STAGES):
        mbarrier.init(kv_ready.index(s), count=1)
        mbarrier.init(kv_empty.index(s), count=2)  # one arrival from each consumer warpgroup
    fence_async_shared()
    _cta_barrier()
    gl.warp_specialize([
        (_dq_consumer, (0, dq_desc, lse_ptr, delta_ptr, q_smem, do_smem, k_smem, v_smem, q_ready, kv_ready, kv_empty,
                        block_cnt_ptr, block_idx_ptr, kpm_ptr, H, N_Q, N_K, sm_scale, qk_scale, NUM_STAGES, CAUSAL,
                        SPARSE_BLOCK, KEY_PADDING)),
        (_dq_producer, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, q_ready, kv_ready,
                        kv_empty, block_cnt_ptr, block_idx_ptr, H, KV_GROUPS, N_Q, N_K, NUM_STAGES, CAUSAL,
                        SPARSE_BLOCK)),
        (_dq_consumer, (1, dq_desc, lse_ptr, delta_ptr, q_smem, do_smem, k_smem, v_smem, q_ready, kv_ready, kv_empty,
                        block_cnt_ptr, block_idx_ptr, kpm_ptr, H, N_Q, N_K, sm_scale, qk_scale, NUM_STAGES, CAUSAL,
                        SPARSE_BLOCK, KEY_PADDING)),
    ], [1, 4], [24, CONSUMER_REGS])
    mbarrier.invalidate(q_ready)
    for s in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(kv_ready.index(s))
        mbarrier.invalidate(kv_empty.index(s))


BWD_BLOCK_M = 64  # query rows per block of the dK/dV loop, and keys per tile of the dQ loop
SPARSE_BLOCK = 2 * ROWS_PER_WARPGROUP  # the block size of a block-sparse backward: a dK/dV or dQ tile
# buffers in the backward's rings (Q and dO for dK/dV, K and V for dQ): the measured setting; 3 fit (160 KB at
# d = 128) and compile with no more spills (`scripts/tune_flash_gluon.py --backward` compares them)
BACKWARD_STAGES = 2


def kv_head_lists(by_key: tuple[torch.Tensor, torch.Tensor], batch: int, kv_heads: int, groups: int,
                  n_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dK/dV kernel's block lists: per (batch · KV head, key block), the query blocks of all `groups` query
    heads of the KV head that see it, each as group · query blocks + query block, from `BlockSparseLayout`'s lists
    per (batch · head, key block) (offsets, indices). With one query head per KV head they are those lists. Made
    on the device without a sync."""
    if groups == 1:
        return by_key
    offsets, indices = by_key
    counts = offsets.diff()  # rows in (batch, KV head, group, key block) order
    k_blocks = counts.numel() // (batch * kv_heads * groups)
    # each entry's row (an empty layout's one placeholder entry gets a row past the end, and is never read)
    entry = torch.arange(indices.numel(), device=offsets.device, dtype=offsets.dtype)
    row = torch.searchsorted(offsets, entry, right=True) - 1
    group, key_block, kv = (row // k_blocks) % groups, row % k_blocks, row // (k_blocks * groups)
    # the rows of one key block's groups made consecutive, each list kept in its order (a stable sort)
    order = torch.sort((kv * k_blocks + key_block) * groups + group, stable=True).indices
    merged = offsets.new_zeros(batch * kv_heads * k_blocks + 1)
    merged[1:] = counts.view(batch * kv_heads, groups, k_blocks).sum(1).flatten().cumsum(0)
    return merged, (group * cdiv(n_q, SPARSE_BLOCK) + indices)[order].to(torch.int32)


def backward_refusal(q, k, v, do, lse, dq, dk, dv) -> str | None:
    """Why `backward` does not cover these, or None where it does: what `refusal` asks of q, k and v, and
    contiguous do (of q's shape), gradients and LSE."""
    reason = refusal(q, k, v)
    if reason is None and not (do.shape == q.shape and lse.is_contiguous() and
                               all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (do, dq, dk, dv))):
        reason = "do, dq, dk, dv and the LSE must be contiguous, with storage starting on 16 bytes"
    return reason


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
             delta: torch.Tensor, causal: bool, softmax_scale: float, dq: torch.Tensor | None = None,
             dk: torch.Tensor | None = None, dv: torch.Tensor | None = None, block_lists=None,
             key_padding_mask: torch.Tensor | None = None):
    """dQ, dK and dV of attention, written into dq, dk and dv (new tensors where None), for what
    `backward_refusal` accepts; lse the forward's base-2 LSE (batch, heads, seq_q) and delta (batch · heads, seq_q) the
    `tl` backward's rowsum(dO ∘ O). Block-sparse where `block_lists` is given: the CSR lists (offsets, indices)
    of kept blocks of SPARSE_BLOCK keys per (batch · head, query block), then per (batch · head, key block), as
    `BlockSparseLayout` holds them. key_padding_mask as `forward` takes it."""
    b, h, n_q, d = q.shape
    kv_h, n_k = k.shape[1], k.shape[2]
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    dtype = gl.float16 if q.dtype == torch.float16 else gl.bfloat16
    q_block, kv_block = [1, BWD_BLOCK_M, d], [1, ROWS_PER_WARPGROUP, d]
    q_layout, kv_layout = smem_layout(q_block, dtype), smem_layout(kv_block, dtype)
    q_desc, do_desc, dq_desc = (TensorDescriptor.from_tensor(t.view(b * h, n_q, d), q_block, q_layout)
                                for t in (q, do, dq))
    k_desc, v_desc, dk_desc, dv_desc = (TensorDescriptor.from_tensor(t.view(b * kv_h, n_k, d), kv_block, kv_layout)
                                        for t in (k, v, dk, dv))
    # floats as floats: a kept launch was compiled for the types of the first
    scalars = (h, h // kv_h, n_q, n_k, float(softmax_scale), float(softmax_scale * LOG2E))
    padded = key_padding_mask is not None
    kpm = int8_mask(key_padding_mask, lse)
    options = dict(NUM_STAGES=BACKWARD_STAGES, CAUSAL=causal, CONSUMER_REGS=240, num_warps=4,
                   SPARSE_BLOCK=SPARSE_BLOCK if block_lists else 0, KEY_PADDING=padded)
    by_query, by_key = block_lists or ((lse, lse), (lse, lse))  # not read when dense
    if block_lists:
        by_key = kv_head_lists(by_key, b, kv_h, h // kv_h, n_q)
    kept = _kept((q, k, v, do, lse, delta, dq, dk, dv, kpm, *by_query, *by_key), causal, options["SPARSE_BLOCK"])
    launch(_attn_bwd_dkdv, (cdiv(n_k, 2 * ROWS_PER_WARPGROUP), b * kv_h),
           (q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc, lse, delta, kpm, *by_key, *scalars), options, kept,
           "dkdv")
    launch(_attn_bwd_dq, (cdiv(n_q, 2 * ROWS_PER_WARPGROUP), b * h),
           (q_desc, do_desc, k_desc, v_desc, dq_desc, lse, delta, kpm, *by_query, *scalars), options, kept, "dq")
    return dq, dk, dv
