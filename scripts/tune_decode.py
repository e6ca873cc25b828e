"""Probe the launch levers of decode attention on this GPU: keys per tile, warps, pipeline stages and lean
programs per SM, at a few shapes, each timed from CUDA graphs against the copy bandwidth of the same run; then
head sizes at the default levers, and the host cost of one call from eager PyTorch. Prints tables (what
effrepro_kernels/NOTES.md quotes); it writes no record: `repro task=lean_decode` is the measurement.

    python scripts/tune_decode.py [--quick] [--head-dims | --quantized | --short]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import time

import torch

from effrepro_kernels import decode_attention, make_schedule
from effrepro_kernels.decode_attention import head_dim_chunks, lean_programs, pipeline_bytes, pipeline_smem
from repro.bench import copy_bandwidth
from repro.timing import measure

ROTATE_BYTES = 512 << 20  # KV copies per shape, together beyond any L2


def inputs(batch, hq, hkv, context, head_dim, dtype=torch.float16):
    kv_bytes = 2 * batch * hkv * context * head_dim * 2
    copies = []
    for _ in range(max(1, math.ceil(ROTATE_BYTES / kv_bytes))):
        q = torch.randn(batch, hq, head_dim, device="cuda", dtype=dtype)
        k, v = (torch.randn(batch, hkv, context, head_dim, device="cuda", dtype=dtype) for _ in range(2))
        copies.append((q, k, v))
    return copies, torch.full((batch,), context, device="cuda", dtype=torch.int32), kv_bytes


def rotating(copies, fn):
    turn = itertools.cycle(copies)
    return lambda: fn(*next(turn))


def gb_s(kv_bytes, timing):
    return kv_bytes / (timing.p50 * 1e-3) / 1e9


def levers(shapes, copy_gb_s, quick):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    grid = dict(block_n=[32, 64, 128], num_warps=[2, 4, 8], num_stages=[2, 3, 4, 5], per_sm=[1, 2])
    if quick:
        grid = dict(block_n=[64, 128], num_warps=[4], num_stages=[3, 4], per_sm=[1])
    print(f"\n## lean levers (fraction of copy bandwidth {copy_gb_s:.0f} GB/s; graph-timed)")
    print("| shape | " + " | ".join(grid) + " | GB/s | fraction |\n|" + "---|" * (len(grid) + 3))
    for batch, hq, hkv, context in shapes:
        copies, lengths, kv_bytes = inputs(batch, hq, hkv, context, 128)
        results = []
        for block_n, warps, stages, per_sm in itertools.product(*grid.values()):
            if pipeline_bytes(block_n, 128, torch.float16) * stages / 2 > pipeline_smem() * 1.4:
                continue
            tiles = [math.ceil(context / block_n)] * (batch * hkv)
            schedule = make_schedule("lean", lengths, hkv, block_n=block_n,
                                     num_programs=lean_programs(tiles, sms) * per_sm, device="cuda")
            schedule = dataclasses.replace(schedule, num_warps=warps, num_stages=stages)
            try:
                t = measure(rotating(copies, lambda q, k, v: decode_attention(q, k, v, schedule=schedule)),
                            torch.device("cuda"), warmup_ms=5, rep_ms=30, back_to_back="graph")
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
                print(f"<!-- {block_n} {warps} {stages} {per_sm}: {type(exc).__name__} -->")
                continue
            results.append(((block_n, warps, stages, per_sm), gb_s(kv_bytes, t)))
        results.sort(key=lambda r: -r[1])
        for config, rate in results[:4]:
            print(f"| B={batch} {hq}/{hkv} L={context} | " + " | ".join(map(str, config)) +
                  f" | {rate:.0f} | {rate / copy_gb_s:.3f} |")
        default = make_schedule("lean", lengths, hkv, device="cuda")
        t = measure(rotating(copies, lambda q, k, v: decode_attention(q, k, v, schedule=default)),
                    torch.device("cuda"), warmup_ms=5, rep_ms=30, back_to_back="graph")
        print(f"| B={batch} {hq}/{hkv} L={context} default | {default.block_n} | {default.num_warps} | "
              f"{default.num_stages} | {default.num_programs} progs | {gb_s(kv_bytes, t):.0f} | "
              f"{gb_s(kv_bytes, t) / copy_gb_s:.3f} |")
        del copies
        torch.cuda.empty_cache()


def head_dims(copy_gb_s, quick):
    """Head sizes at 64K: the default levers, then keys per tile, stages, lean programs per SM and warps, as the
    head's lanes (`head_dim_chunks`) leave room for them in shared memory. Two programs per SM are the lever for
    a two-chunk head (80, 96: 64 + 32 lanes), whose tile costs nearly the instructions of a 128-lane one for
    fewer bytes (`scripts/sass_loop.py --head-dim`), so one program per SM may wait on its own chain of
    instructions rather than on memory; its 105 KB of shared memory at 128 keys leaves room for a second."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print("\n## head sizes (32/8, 64K; graph-timed): default levers, then keys per tile, stages, programs per SM, "
          "warps")
    print("| head_dim | lanes | B | block_n | stages | per SM | warps | GB/s | fraction |\n"
          "|---|---|---|---|---|---|---|---|---|")
    grid = dict(block_n=[64, 128, 256], num_stages=[3, 4], per_sm=[1, 2], num_warps=[4, 8])
    if quick:
        grid = dict(block_n=[128], num_stages=[3], per_sm=[1, 2], num_warps=[4, 8])
    for head_dim, batch in itertools.product((64, 80, 96, 128), (1, 4)):
        copies, lengths, kv_bytes = inputs(batch, 32, 8, 65536, head_dim)
        lanes = "+".join(str(c) for c in head_dim_chunks(head_dim) if c)
        default = make_schedule("lean", lengths, 8, head_dim=head_dim, device="cuda")
        tried = [("default", default)]
        for block_n, stages, per_sm, warps in itertools.product(*grid.values()):
            tiles = [math.ceil(65536 / block_n)] * (batch * 8)
            schedule = make_schedule("lean", lengths, 8, head_dim=head_dim, block_n=block_n, device="cuda",
                                     num_programs=lean_programs(tiles, sms) * per_sm)
            tried.append(("", dataclasses.replace(schedule, num_stages=stages, num_warps=warps)))
        for label, schedule in tried:
            per_sm = round(schedule.num_programs / sms)
            config = f"{schedule.block_n} | {schedule.num_stages} | {per_sm} | {schedule.num_warps}"
            try:
                t = measure(rotating(copies, lambda q, k, v: decode_attention(q, k, v, schedule=schedule)),
                            torch.device("cuda"), warmup_ms=5, rep_ms=30, back_to_back="graph")
            except Exception as exc:  # noqa: BLE001 - a config that does not fit or compile is skipped
                print(f"<!-- {head_dim} B={batch} {config}: {type(exc).__name__} -->")
                continue
            print(f"| {head_dim} | {lanes} | {batch} | {label} {config} | {gb_s(kv_bytes, t):.0f} | "
                  f"{gb_s(kv_bytes, t) / copy_gb_s:.3f} |")
        del copies
        torch.cuda.empty_cache()


def quantized_levers(quick):
    """Attention over a KIVI-quantized cache (keys per channel, values per token, groups of 32), bf16, 32/8 heads:
    keys per tile, stages, lean programs per SM and a cap on registers (more programs can then share an SM), against
    the 16-bit cache's default schedule in the same run."""
    from effrepro_kernels.decode_attention import decode_attention_quantized
    from effrepro_kernels.kv_quant import quantize_kv

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    grid = dict(bits=[4], block_n=[64, 128], num_stages=[2, 3, 4], per_sm=[2, 3, 4], max_registers=[None, 168, 128])
    if quick:
        grid = dict(bits=[4], block_n=[64, 128], num_stages=[3], per_sm=[2, 3], max_registers=[None, 168])
    print("\n## quantized cache (32/8, bf16, groups of 32; graph-timed): µs, and the 16-bit cache's time over it")
    print("| shape | " + " | ".join(grid) + " | µs | x 16-bit |\n|" + "---|" * (len(grid) + 3))
    for batch, context in ((1, 32768), (4, 32768), (4, 131072)):
        copies, lengths, _ = inputs(batch, 32, 8, context, 128, torch.bfloat16)
        packed = [{bits: (quantize_kv(k, bits, 32, "channel"), quantize_kv(v, bits, 32, "token"))
                   for bits in grid["bits"]} for _, k, v in copies]
        default = make_schedule("lean", lengths, 8, dtype=torch.bfloat16, device="cuda")
        full = measure(rotating(copies, lambda q, k, v: decode_attention(q, k, v, schedule=default)),
                       torch.device("cuda"), warmup_ms=5, rep_ms=30, back_to_back="graph").p50
        for bits, block_n, stages, per_sm, max_registers in itertools.product(*grid.values()):
            tiles = [math.ceil(context / block_n)] * (batch * 8)
            schedule = make_schedule("lean", lengths, 8, block_n=block_n, dtype=torch.bfloat16, device="cuda",
                                     num_programs=lean_programs(tiles, sms) * per_sm, quantized=True)
            schedule = dataclasses.replace(schedule, num_stages=stages, max_registers=max_registers)
            turn = itertools.cycle(range(len(copies)))

            def attend():
                i = next(turn)
                return decode_attention_quantized(copies[i][0], *packed[i][bits], schedule=schedule)
            try:
                t = measure(attend, torch.device("cuda"), warmup_ms=5, rep_ms=20, back_to_back="graph").p50
            except Exception as exc:  # noqa: BLE001 - a config that does not fit or compile is skipped
                print(f"<!-- {bits} {block_n} {stages} {per_sm} {max_registers}: {type(exc).__name__} -->")
                continue
            print(f"| B={batch} L={context} | {bits} | {block_n} | {stages} | {per_sm} | {max_registers} | "
                  f"{t * 1e3:.1f} | {full / t:.2f} |")


def short_contexts(quick):
    """B = 1 at 1K-8K keys, where a call is a chain of latencies more than a stream of bytes (issue 20: lean
    behind cuDNN by up to 1.7 µs there): pieces per head (lean programs = 8 KV heads x pieces), keys per tile and
    stages, graph-timed, against cuDNN through SDPA timed the same way in the same run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cudnn(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)

    grid = dict(pieces=[2, 4, 8, 16], block_n=[64, 128], num_stages=[2, 3])
    if quick:
        grid = dict(pieces=[4, 8, 16], block_n=[64, 128], num_stages=[3])
    print("\n## short contexts (B=1; graph-timed): µs, and cuDNN's time over ours")
    print("| heads | context | " + " | ".join(grid) + " | µs | x cuDNN |\n|" + "---|" * (len(grid) + 4))
    for hq, context in itertools.product((32, 64), (1024, 2048, 4096, 8192)):
        copies, lengths, _ = inputs(1, hq, 8, context, 128)
        base = measure(rotating(copies, cudnn), torch.device("cuda"), warmup_ms=5, rep_ms=30,
                       back_to_back="graph").p50
        default = make_schedule("lean", lengths, 8, device="cuda")
        t = measure(rotating(copies, lambda q, k, v: decode_attention(q, k, v, schedule=default)),
                    torch.device("cuda"), warmup_ms=5, rep_ms=30, back_to_back="graph").p50
        print(f"| {hq}/8 | {context} | default {default.max_pieces} | {default.block_n} | {default.num_stages} | "
              f"{t * 1e3:.1f} | {base / t:.3f} |")
        for pieces, block_n, stages in itertools.product(*grid.values()):
            if pieces * block_n > context:
                continue
            schedule = dataclasses.replace(make_schedule("lean", lengths, 8, block_n=block_n, device="cuda",
                                                         num_programs=8 * pieces), num_stages=stages)
            t = measure(rotating(copies, lambda q, k, v: decode_attention(q, k, v, schedule=schedule)),
                        torch.device("cuda"), warmup_ms=5, rep_ms=30, back_to_back="graph").p50
            print(f"| {hq}/8 | {context} | {pieces} | {block_n} | {stages} | {t * 1e3:.1f} | {base / t:.3f} |")
        del copies
        torch.cuda.empty_cache()


def per_call_us(call) -> tuple[float, float]:
    """The host's time to issue one call (wall clock over 2000 calls, no sync) and the device's time per call
    in back-to-back loops issued from Python (`measure`'s eager loops), in microseconds."""
    for _ in range(50):
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(2000):
        call()
    host = (time.perf_counter() - start) / 2000 * 1e6
    torch.cuda.synchronize()
    return host, measure(call, torch.device("cuda"), warmup_ms=5, rep_ms=30, back_to_back="eager").p50 * 1e3


def host_cost():
    """One call from eager PyTorch: ours whole, its checks alone and its launch alone; cuDNN through SDPA with
    its backend chosen per call and once around the loop (as the benchmark, and a server, do)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from effrepro_kernels.decode_attention import _attend, _prepare

    def attend(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)

    def cudnn(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return attend(q, k, v)

    print("\n## one call from eager PyTorch (B=1, 32/8 heads, head_dim 128)")
    print("| context | provider | host us/call | loop us/call |\n|---|---|---|---|")
    for context in (8192, 32768):
        copies, lengths, _ = inputs(1, 32, 8, context, 128)
        schedule = make_schedule("lean", lengths, 8, device="cuda")
        prepared = _prepare(*copies[0], None, schedule)
        from effrepro_kernels import runtime
        through_jit = make_schedule("lean", lengths, 8, device="cuda")

        def jit_launch(q, k, v):
            fast, runtime.FAST_LAUNCH = runtime.FAST_LAUNCH, False  # this schedule keeps no compiled kernel
            try:
                return decode_attention(q, k, v, schedule=through_jit)
            finally:
                runtime.FAST_LAUNCH = fast
        for name, fn in (("lean", lambda q, k, v: decode_attention(q, k, v, schedule=schedule)),
                         ("lean, every launch through Triton's JIT", jit_launch),
                         ("lean: checks only", lambda q, k, v: _prepare(q, k, v, None, schedule)),
                         ("lean: launch only", lambda q, k, v: _attend(q, k, v, *prepared, None, False, False)),
                         ("sdpa_cudnn", cudnn)):
            print(f"| {context} | {name} | " + " | ".join(f"{t:.1f}" for t in per_call_us(rotating(copies, fn))) + " |")
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            times = per_call_us(rotating(copies, attend))
        print(f"| {context} | sdpa_cudnn, backend chosen once | {times[0]:.1f} | {times[1]:.1f} |")
        del copies
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few levers only")
    parser.add_argument("--head-dims", action="store_true", help="only the head sizes and their levers")
    parser.add_argument("--quantized", action="store_true", help="only the levers over a quantized cache")
    parser.add_argument("--short", action="store_true", help="only B = 1 at short contexts, against cuDNN")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("timing decode attention's launch levers needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}: {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MB, "
          f"shared memory per block {getattr(props, 'shared_memory_per_block_optin', 0) >> 10} KB")
    if args.quantized:
        return quantized_levers(args.quick)
    if args.short:
        return short_contexts(args.quick)
    copy = copy_bandwidth(torch.device("cuda"), 4 << 30)
    if copy.status != "ok":  # the fractions of the tables below are of this copy's bandwidth
        raise SystemExit(f"the 4 GiB device copy could not run ({copy.status}): {copy.message}")
    copy_gb_s = copy.p50
    if not args.head_dims:
        host_cost()
        shapes = [(1, 32, 8, 65536), (1, 64, 8, 65536), (1, 32, 8, 262144), (4, 32, 8, 65536),
                  (16, 32, 32, 65536), (1, 32, 8, 8192), (16, 32, 8, 8192)]
        levers(shapes, copy_gb_s, args.quick)
    head_dims(copy_gb_s, args.quick)


if __name__ == "__main__":
    main()
