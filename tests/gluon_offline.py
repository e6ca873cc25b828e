"""Compile the Gluon forward for Hopper (sm_90) without a GPU and print, per variant, what its PTX holds and
what ptxas says it spills: run by test_flash_attn_gluon in a process of its own, since under TRITON_INTERPRET=1
(the CPU tests) Gluon cannot compile. A Triton whose Gluon API moved fails here, on the CPU, before any GPU run.
Every configuration in `CANDIDATES` is compiled (without and with the causal mask for kernel_config's choice).

    python tests/gluon_offline.py   # JSON: {"d=128 2x128s2o causal": {"wgmma": ..., "spilled_bytes": ...}, ...}
"""
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


def compile_forward(head_dim: int, causal: bool, config: dict):
    dtype = fa.gl.bfloat16
    x = torch.empty(4, 1024, head_dim, dtype=torch.bfloat16)
    q_block, kv_block = [1, fa.ROWS_PER_WARPGROUP, head_dim], [1, config["BLOCK_N"], head_dim]
    q_type = descriptor_type(TensorDescriptor.from_tensor(x, q_block, fa.smem_layout(q_block, dtype)))
    kv_type = descriptor_type(TensorDescriptor.from_tensor(x, kv_block, fa.smem_layout(kv_block, dtype)))
    constants = dict(CAUSAL=causal, **config)
    names = list(fa._attn_fwd.arg_names)
    types = dict(q_desc=q_type, o_desc=q_type, k_desc=kv_type, v_desc=kv_type, lse_ptr="*fp32", qk_scale="fp32")
    signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in names}
    source = GluonASTSource(fa._attn_fwd, signature, {(names.index(n),): v for n, v in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


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
    for head_dim in fa.GLUON_HEAD_DIMS:
        for config in fa.CANDIDATES[head_dim]:
            for causal in (False, True) if config == fa.kernel_config(head_dim) else (False, ):
                kernel = compile_forward(head_dim, causal, config)
                ptx = kernel.asm["ptx"]
                report[f"d={head_dim} {fa.config_name(config)} {'causal' if causal else 'dense'}"] = dict(
                    wgmma=ptx.count("wgmma.mma_async"), tma_copies=ptx.count("cp.async.bulk.tensor"),
                    shared=kernel.metadata.shared, spilled_bytes=spilled_bytes(ptx))
    print(json.dumps(report))
