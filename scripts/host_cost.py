"""The host's time per call of attention from eager PyTorch, ours (packed q, k, v) against SDPA, forward and
forward + backward, at a shape small enough that the device never holds the host back (1 x 128 tokens, 12 heads
of 64, causal, bf16): what a call costs a host-bound training loop. On Hopper, also our Gluon kernels in both
passes (forced: `auto` keeps the tl ones at this length), beside the tl ones on the same separate q, k and v
(`ours` is the packed operator, which saves the host some work of its own). Needs a GPU.

    python scripts/host_cost.py [--profile]
    EFFREPRO_FAST_LAUNCH=0 python scripts/host_cost.py   # without kept launches

`--python-only` times our packed operators' Python side on any machine, the CPU included: every launch is stubbed
out, the operators are called as torch.compile's code calls them (torch.ops), at GPT-2 small's shape.
`--profile` adds, for each of our rows, the functions where a forward+backward call spends the host's
time (cProfile, own time, the 20 largest), to say where a path's extra microseconds go.
"""
import argparse
import cProfile
import importlib
import os
import pstats
import sys
import time

import torch
import torch.nn.functional as F

from effrepro_kernels import flash_attn, flash_attn_gluon, flash_attn_qkvpacked


def host_us_per_call(call, calls: int = 300) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(20):  # compile, autotune, keep the launches
        call()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    host = (time.perf_counter() - start) / calls * 1e6
    sync()
    return host


def python_only():
    runtime = importlib.import_module("effrepro_kernels.runtime")
    flash = importlib.import_module("effrepro_kernels.flash_attn")
    runtime.FAST_LAUNCH = True  # as on a GPU: the kept launches' signatures are made
    flash.launch = lambda *args, **kwargs: None
    flash._tuned = lambda kernel, block_size: (kernel, {})
    qkv = torch.randn(16, 1024, 3, 12, 64, dtype=torch.bfloat16)
    out, lse = flash._forward_packed(qkv, None, True, 0.125, 0.0, 0)
    grad = torch.randn_like(out)
    forward = host_us_per_call(
        lambda: torch.ops.effrepro.flash_attn_packed.default(qkv, None, True, 0.125, 0.0, 0), 3000)
    backward = host_us_per_call(lambda: torch.ops.effrepro.flash_attn_backward_packed.default(
        grad, None, qkv, out, lse, None, True, 0.125, 0.0, 0), 3000)
    print(f"python only (launches stubbed): forward operator {forward:.1f} us, backward operator {backward:.1f} us")
    gluon = importlib.import_module("effrepro_kernels.flash_attn_gluon")
    if gluon._GLUON_OK:  # its descriptors and layouts are made on any machine
        gluon.launch, gluon.sm_count = (lambda *args, **kwargs: None), (lambda device: 132)
        q, k, v = (t.transpose(1, 2).contiguous() for t in qkv.unbind(2))
        gluon_forward = host_us_per_call(lambda: gluon.forward(q, k, v, True, 0.125), 3000)
        print(f"python only (launch stubbed): Gluon forward {gluon_forward:.1f} us")


def timed(profile: bool):
    qkv = torch.randn(1, 128, 3, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(1, 128, 12, 64, device="cuda", dtype=torch.bfloat16)  # (batch, seq, heads, head_dim)

    def ours():
        return flash_attn_qkvpacked(qkv, causal=True)

    def sdpa():
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)

    q, k, v = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in qkv.unbind(2))

    def ours_tl_unpacked():  # the tl kernels on the Gluon row's separate q, k and v: what that row compares with
        return flash_attn(q, k, v, causal=True, forward_kernel="tl", backward_kernel="tl")

    def ours_gluon():  # Gluon's kernels in both passes (flash_attn_gluon.py), where they cover the call
        return flash_attn(q, k, v, causal=True, forward_kernel="gluon", backward_kernel="gluon")

    gluon_covers = flash_attn_gluon.refusal(q, k, v) is None
    # the Gluon backward takes a contiguous dO in its output's (batch, heads, seq, head_dim) layout
    unpacked_grad = grad.transpose(1, 2).contiguous()
    grads = {"ours": grad, "ours_tl_unpacked": unpacked_grad, "ours_gluon": unpacked_grad, "sdpa": grad}
    for name, attention in (("ours", ours), ("ours_tl_unpacked", ours_tl_unpacked), ("ours_gluon", ours_gluon),
                            ("sdpa", sdpa)):
        if name == "ours_gluon" and not gluon_covers:
            print(f"ours_gluon: not run ({flash_attn_gluon.refusal(q, k, v)})")
            continue
        with torch.no_grad():
            forward = host_us_per_call(attention)
        both = host_us_per_call(lambda: attention().backward(grads[name]))
        print(f"fast_launch={os.environ.get('EFFREPRO_FAST_LAUNCH', '1')} {name}: forward {forward:.1f} us, "
              f"forward + backward {both:.1f} us")
        if profile and name != "sdpa":
            profiler = cProfile.Profile()
            profiler.runcall(host_us_per_call, lambda: attention().backward(grads[name]))
            print(f"\n{name}, forward + backward, 320 calls: own time by function")
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python-only", action="store_true", help="time the Python side alone, on any machine")
    parser.add_argument("--profile", action="store_true", help="where each of our rows spends the host's time")
    args = parser.parse_args()
    if args.python_only:
        python_only()
    elif not torch.cuda.is_available():
        parser.error("timing the host's cost of a call needs a CUDA GPU; --python-only runs on any machine")
    else:
        timed(profile=args.profile)
