"""Compile the tl FlashAttention kernels (forward, dK/dV, dQ) for Hopper (sm_90) without a GPU, in every config
their pruning keeps at head_dim 128 and 256 with 128-key sparse blocks, and at 256 dense, causal, with key padding
and dropout (whose keep-mask takes shared memory of its own, where 256 has none to spare), and print each one's
shared memory beside the pruning's estimate: run by test_flash_attn in a process of its own, since under
TRITON_INTERPRET=1 (the CPU tests) Triton does not compile. Pointers and strides are declared 16-byte aligned and
last strides 1, as a GPU launch of contiguous tensors specialises them (without that, Triton pipelines less and the
numbers are too low).

    EFFREPRO_AUTOTUNE=1 python tests/flash_attn_offline.py   # JSON: {"_attn_fwd d=128 sparse 128x64 w4 s3": {...}}
"""
import importlib
import json

import torch
import triton
from triton.backends.compiler import GPUTarget

fa = importlib.import_module("effrepro_kernels.flash_attn")  # the package's `flash_attn` is the function
KERNELS = {"_attn_fwd": fa._prune_forward, "_attn_bwd_dkdv": fa._prune_dkdv, "_attn_bwd_dq": fa._prune_dq}
# (name, head_dim, the kernels' other constexprs)
VARIANTS = [("sparse", head_dim, dict(CAUSAL=False, HAS_KPM=False, DROPOUT=False, SPARSE_BLOCK=128))
            for head_dim in (128, 256)]
VARIANTS.append(("dropout", 256, dict(CAUSAL=True, HAS_KPM=True, DROPOUT=True, SPARSE_BLOCK=0)))


def compile_for_hopper(kernel, constants: dict, config):
    names = list(kernel.arg_names)
    first_stride = names.index("stride_qb")
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constants:
            signature[name] = "constexpr"
        elif i < first_stride:
            signature[name] = {"KPM": "*i8", "CNT": "*i32", "IDX": "*i32", "LSE": "*fp32",
                               "DELTA": "*fp32"}.get(name, "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.startswith("stride") and (name.endswith("d") or name == "stride_sm"):
            signature[name], constants = "constexpr", {**constants, name: 1}
        elif name.startswith("stride"):
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name in ("sm_scale", "dropout_p") else "i32"
    source = triton.compiler.ASTSource(kernel, signature, {(names.index(n),): v for n, v in constants.items()}, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def main():
    report = {}
    q = torch.empty(0, dtype=torch.bfloat16)
    for name, prune in KERNELS.items():
        kernel = getattr(fa, name)
        for variant, head_dim, flags in VARIANTS:
            constants = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, **flags)
            for config in prune(kernel.configs, {"Q": q}, **constants):
                compiled = compile_for_hopper(kernel.fn, {**constants, **config.kwargs}, config)
                estimate = fa._shared_bytes(config, head_dim, q.element_size(), prune.keywords["streamed"],
                                            prune.keywords["kept_tiles"], flags["DROPOUT"])
                tiles = f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']} w{config.num_warps} s{config.num_stages}"
                report[f"{name} d={head_dim} {variant} {tiles}"] = dict(shared=compiled.metadata.shared,
                                                                        estimate=estimate)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
