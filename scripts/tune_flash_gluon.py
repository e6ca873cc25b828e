"""Probe the Gluon forward's configurations on this GPU (Hopper): consumer warpgroups, keys per tile, stages and the
overlapped softmax (`flash_attn_gluon.CANDIDATES`), each timed against cuDNN through SDPA in the same process.
bf16, B·N = 16K tokens, H·d = 2048 (the `flash_kernel` task's shapes), `triton.testing.do_bench` medians. Before
any timing, every configuration's output is compared with cuDNN's at every point: a configuration that disagrees
is reported and not timed. With --backward, the backward alone instead (autograd of a kept output: ours through
`flash_attn`, its delta kernel and the Gluon backward, at each of BACKWARD_CANDIDATES' ring sizes). With
--key-padding, the configurations for calls with a key padding mask (`KEY_PADDING_CONFIGS`), against our `tl`
forward with the same mask. Prints a table
(what effrepro_kernels/NOTES.md quotes); it writes no record: `repro task=flash_kernel` is the measurement.

    python scripts/tune_flash_gluon.py [--head-dims 64 128] [--seq-lens 2048 4096 8192 16384] [--backward]
                                       [--key-padding]
"""
from __future__ import annotations

import argparse
import importlib

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from effrepro_kernels import flash_attn, flash_attn_gluon
from effrepro_kernels.flash_attn_gluon import CANDIDATES, CAUSAL_PERSISTENT_MAX_KEYS, KEY_PADDING_CONFIGS, config_name
from repro.timing import measure
from tasks.common.sdpa import SDPA_BACKENDS

TOKENS, HIDDEN = 16384, 2048
AGREEMENT = 0.02  # largest difference from cuDNN's output, relative to its largest value (bf16: a few ulps)
BACKWARD_CANDIDATES = (2, 3)  # ring buffers of the backward (flash_attn_gluon.BACKWARD_STAGES)


def forward_flops(batch, heads, seq_len, head_dim, causal):
    return 4 * batch * heads * seq_len**2 * head_dim * (0.5 if causal else 1.0)


def cell(run, error, base_ms: float, flops: float, device) -> str:
    """One configuration's cell: "wrong (error)" where its result disagrees with cuDNN's (`error()` at least
    AGREEMENT), else its TFLOP/s and cuDNN's time over its time."""
    try:
        found = error()
        if not found < AGREEMENT:
            return f"wrong ({found:.3g})"
        ms = measure(run, device, warmup_ms=50, rep_ms=200).p50
        return f"{flops / (ms * 1e-3) / 1e12:.0f} ({base_ms / ms:.3f})"
    except Exception as exc:  # noqa: BLE001 - one configuration failing must not end the probe
        return f"{type(exc).__name__}: {str(exc)[:60]}"


def row(seq_len: int, causal: bool, base_ms: float, flops: float, cells: list[str]) -> str:
    return (f"| {seq_len} | {'causal' if causal else 'dense'} | {flops / (base_ms * 1e-3) / 1e12:.0f} | "
            + " | ".join(cells) + " |")


def rows(head_dim: int, seq_len: int, configs: list[dict], padded: bool = False) -> list[str]:
    """The table's two rows (dense and causal) for one sequence length. `padded`: with the paper's key padding
    (each sequence keeps a random [N - 20, N] of its keys), against our `tl` forward with the same mask, the
    kernel `flash_attn` would otherwise take."""
    cudnn = F.scaled_dot_product_attention  # under cuDNN's backend, which main() sets once
    device = torch.device("cuda")
    batch, heads = max(1, TOKENS // seq_len), HIDDEN // head_dim
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, device=device, dtype=torch.bfloat16) for _ in range(3))
    mask = None
    if padded:
        lengths = torch.randint(max(1, seq_len - 20), seq_len + 1, (batch,), device=device)
        mask = torch.arange(seq_len, device=device)[None, :] < lengths[:, None]
    lines = []
    for causal in (False, True):
        def baseline():
            if padded:
                return flash_attn(q, k, v, causal=causal, key_padding_mask=mask, forward_kernel="tl")
            return cudnn(q, k, v, is_causal=causal)
        flops = forward_flops(batch, heads, seq_len, head_dim, causal)
        want = baseline().float()
        base = measure(baseline, device, warmup_ms=50, rep_ms=200).p50
        cells = []
        for config in configs:
            def ours():
                return flash_attn_gluon.forward(q, k, v, causal, head_dim ** -0.5, config, key_padding_mask=mask)[0]
            cells.append(cell(ours, lambda: ((ours().float() - want).abs().max() / want.abs().max()).item(), base,
                              flops, device))
        lines.append(row(seq_len, causal, base, flops, cells))
    return lines


def backward_rows(head_dim: int, seq_len: int) -> list[str]:
    """The backward's two rows (dense and causal) for one sequence length: cuDNN's, then ours at each ring size."""
    cudnn = F.scaled_dot_product_attention  # under cuDNN's backend, which main() sets once
    device = torch.device("cuda")
    batch, heads = max(1, TOKENS // seq_len), HIDDEN // head_dim
    q, k, v, do = (torch.randn(batch, heads, seq_len, head_dim, device=device, dtype=torch.bfloat16)
                   for _ in range(4))
    inputs = [t.requires_grad_() for t in (q, k, v)]
    module = importlib.import_module("effrepro_kernels.flash_attn")
    module.GLUON = "1"  # the Gluon backward wherever it covers the call, as EFFREPRO_GLUON=1 asks
    lines = []
    for causal in (False, True):
        flops = 2.5 * forward_flops(batch, heads, seq_len, head_dim, causal)
        outputs = {"cudnn": cudnn(*inputs, is_causal=causal), "ours": flash_attn(*inputs, causal=causal)}
        grads = {name: lambda out=out: torch.autograd.grad(out, inputs, do, retain_graph=True)
                 for name, out in outputs.items()}
        want = grads["cudnn"]()
        base = measure(grads["cudnn"], device, warmup_ms=50, rep_ms=200).p50
        cells = []
        for stages in BACKWARD_CANDIDATES:
            flash_attn_gluon.BACKWARD_STAGES = stages
            cells.append(cell(grads["ours"], lambda: max(((g.float() - w.float()).norm() / w.float().norm()).item()
                                                         for g, w in zip(grads["ours"](), want)), base, flops, device))
        lines.append(row(seq_len, causal, base, flops, cells))
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=sorted(CANDIDATES), choices=sorted(CANDIDATES))
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--backward", action="store_true", help="the backward's ring sizes instead")
    parser.add_argument("--key-padding", action="store_true",
                        help="the forward's configurations for calls with a key padding mask instead")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("timing the Gluon kernels' configurations needs a CUDA GPU (Hopper)")
    with sdpa_kernel(SDPA_BACKENDS["sdpa_cudnn"]):  # cuDNN's attention, the baseline, set once for every call
        tables(args)


def tables(args: argparse.Namespace) -> None:
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}: {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {flash_attn_gluon.triton.__version__}")
    if args.backward:
        for head_dim in args.head_dims:
            print(f"\n## head_dim {head_dim}, backward: TFLOP/s (÷ cuDNN's in the same process) by ring buffers")
            print("| N | mask | cuDNN | " + " | ".join(f"{s} stages" for s in BACKWARD_CANDIDATES) + " |\n|" +
                  "---|" * (len(BACKWARD_CANDIDATES) + 3))
            for seq_len in args.seq_lens:
                print("\n".join(backward_rows(head_dim, seq_len)), flush=True)
                torch.cuda.empty_cache()
        return
    for head_dim in args.head_dims:
        configs = (KEY_PADDING_CONFIGS if args.key_padding else CANDIDATES)[head_dim]
        names = [config_name(c) for c in configs]
        baseline = "our tl forward's, with the mask," if args.key_padding else "cuDNN's"
        print(f"\n## head_dim {head_dim}{', key padding' if args.key_padding else ''}: TFLOP/s (÷ {baseline} in the "
              f"same process); {names[0]} is kernel_config's (causal above {CAUSAL_PERSISTENT_MAX_KEYS[head_dim]} "
              f"keys: the same without 'p')")
        print(f"| N | mask | {'tl' if args.key_padding else 'cuDNN'} | " + " | ".join(names) + " |\n|" +
              "---|" * (len(configs) + 3))
        for seq_len in args.seq_lens:
            print("\n".join(rows(head_dim, seq_len, configs, args.key_padding)), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
