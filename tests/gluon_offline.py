"""Compile the Gluon kernels (forward, backward) for Hopper (sm_90) without a GPU and print, per variant, what its
PTX holds and what ptxas says it spills: run by test_flash_attn_gluon in a process of its own, since under
TRITON_INTERPRET=1 (the CPU tests) Gluon cannot compile. A Triton whose Gluon API moved fails here, on the CPU,
before any GPU run. Every forward configuration in `CANDIDATES` is compiled (without and with the causal mask for
kernel_config's choice), and the backward's kernels with and without it.

    python tests/gluon_offline.py   # JSON: {"forward d=128 2x128s2o causal": {"wgmma": ..., "spilled_bytes": ...}, ...}
"""
import itertools
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from effrepro_kernels import flash_attn_gluon as fa


def descriptor_type(desc) -> str:
    """The signature type Triton's launcher gives a descriptor (`__mangle__` from Triton 3.9; the same string
    made in C++ before)."""
    if hasattr(desc, "__mangle__"):
        return desc.__mangle__()
    return f"tensordesc<bf16[{','.join(map(str, desc.block_shape))}],{desc.layout!r}>"


def compile_for_hopper(kernel, descriptors: dict, constants: dict):
    """`kernel` compiled for sm_90 with `descriptors` (argument name: (block shape, head_dim)) as bf16 TMA
    descriptors, the pointers float32 (the key padding mask int8), the floats named *scale float32, the other
    arguments int32."""
    dtype = fa.gl.bfloat16
    types = {}
    for name, block in descriptors.items():
        x = torch.empty(4, 1024, block[-1], dtype=torch.bfloat16)
        types[name] = descriptor_type(TensorDescriptor.from_tensor(x, block, fa.smem_layout(block, dtype)))
    names = list(kernel.arg_names)
    signature = {n: "constexpr" if n in constants else types.get(n) or
                 ("*i32" if n.startswith("block_") else "*i8" if n == "kpm_ptr" else "*fp32" if n.endswith("_ptr") else
                  "fp32" if n.endswith("scale") else "i32") for n in names}
    source = GluonASTSource(kernel, signature, {(names.index(n),): v for n, v in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


def forward_kernels(head_dim: int) -> list[dict]:
    """The distinct forward kernels among the candidates (a persistent grid launches the same one)."""
    kernels = []
    for config in fa.CANDIDATES[head_dim]:
        if fa.kernel_constants(config) not in kernels:
            kernels.append(fa.kernel_constants(config))
    return kernels


def variants():
    """(name, compiled kernel) for every kernel, head_dim and mask."""
    for head_dim in fa.GLUON_HEAD_DIMS:
        rows, bwd = ([1, n, head_dim] for n in (fa.ROWS_PER_WARPGROUP, fa.BWD_BLOCK_M))
        for constants in forward_kernels(head_dim):
            keys = [1, constants["BLOCK_N"], head_dim]
            name = fa.config_name(dict(constants, PERSISTENT=False))
            chosen = constants == fa.kernel_constants(fa.kernel_config(head_dim, False, 4096))
            for causal in (False, True) if chosen else (False, ):
                yield f"forward d={head_dim} {name} {'causal' if causal else 'dense'}", \
                    compile_for_hopper(fa._attn_fwd, dict(q_desc=rows, o_desc=rows, k_desc=keys, v_desc=keys),
                                       dict(CAUSAL=causal, KEY_PADDING=False, SPARSE_BLOCK=0, **constants))
        for padded, sparse in ((True, 0), (False, fa.SPARSE_BLOCK)):  # each in its own configuration
            constants = fa.kernel_constants(fa.kernel_config(head_dim, False, 4096, padded, sparse > 0))
            keys = [1, constants["BLOCK_N"], head_dim]
            name = fa.config_name(dict(constants, PERSISTENT=False))
            for causal in (False, True):
                mask = ("causal" if causal else "dense") + (" key padding" if padded else " block-sparse")
                yield f"forward d={head_dim} {name} {mask}", \
                    compile_for_hopper(fa._attn_fwd, dict(q_desc=rows, o_desc=rows, k_desc=keys, v_desc=keys),
                                       dict(CAUSAL=causal, KEY_PADDING=padded, SPARSE_BLOCK=sparse, **constants))
        for causal, sparse, padded in itertools.product((False, True), (0, fa.SPARSE_BLOCK), (False, True)):
            mask = ("causal" if causal else "dense") + (" block-sparse" if sparse else "") + \
                (" key padding" if padded else "")
            backward = dict(NUM_STAGES=fa.BACKWARD_STAGES, CAUSAL=causal, CONSUMER_REGS=240, SPARSE_BLOCK=sparse,
                            KEY_PADDING=padded)
            yield f"dk dv d={head_dim} {mask}", compile_for_hopper(
                fa._attn_bwd_dkdv, dict(q_desc=bwd, do_desc=bwd, k_desc=rows, v_desc=rows, dk_desc=rows, dv_desc=rows),
                backward)
            yield f"dq d={head_dim} {mask}", compile_for_hopper(
                fa._attn_bwd_dq, dict(q_desc=bwd, do_desc=bwd, dq_desc=bwd, k_desc=rows, v_desc=rows), backward)


def spilled_bytes(ptx: str) -> int:
    """Bytes of spill stores ptxas reports for the kernel (Triton's compile does not keep its verbose output)."""
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        for ptxas in ("ptxas", "ptxas-blackwell"):  # Triton 3.9's newer PTX needs the second
            done = subprocess.run([os.path.join(tools, ptxas), "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", done.stderr))
    raise RuntimeError(f"ptxas could not assemble the kernel: {done.stderr[-2000:]}")


if __name__ == "__main__":
    report = {}
    for name, kernel in variants():
        ptx = kernel.asm["ptx"]
        report[name] = dict(wgmma=ptx.count("wgmma.mma_async"), tma_copies=ptx.count("cp.async.bulk.tensor"),
                            shared=kernel.metadata.shared, spilled_bytes=spilled_bytes(ptx))
    print(json.dumps(report))
