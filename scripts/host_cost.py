"""The host's time per call of attention from eager PyTorch, ours (packed q, k, v) against SDPA, forward and
forward + backward, at a shape small enough that the device never holds the host back (1 x 128 tokens, 12 heads
of 64, causal, bf16): what a call costs a host-bound training loop. Needs a GPU.

    python scripts/host_cost.py; EFFREPRO_FAST_LAUNCH=0 python scripts/host_cost.py   # without kept launches
"""
import os
import time

import torch
import torch.nn.functional as F

from effrepro_kernels import flash_attn_qkvpacked


def host_us_per_call(call, calls: int = 300) -> float:
    for _ in range(20):  # compile, autotune, keep the launches
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


def main():
    qkv = torch.randn(1, 128, 3, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(1, 128, 12, 64, device="cuda", dtype=torch.bfloat16)  # (batch, seq, heads, head_dim)

    def ours():
        return flash_attn_qkvpacked(qkv, causal=True)

    def sdpa():
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)

    for name, attention in (("ours", ours), ("sdpa", sdpa)):
        with torch.no_grad():
            forward = host_us_per_call(attention)
        both = host_us_per_call(lambda: attention().backward(grad))
        print(f"fast_launch={os.environ.get('EFFREPRO_FAST_LAUNCH', '1')} {name}: forward {forward:.1f} us, "
              f"forward + backward {both:.1f} us")


if __name__ == "__main__":
    main()
