"""Compile the decode kernel offline for Hopper (sm_90, or another `--sm`) and count the SASS instructions of each
of its loops, by opcode: what a thread executes per tile of keys, without a GPU (Triton's own ptxas and nvdisasm
do the work).
Prints tables (what effrepro_kernels/NOTES.md quotes); the measurement of speed is `repro task=lean_decode` or
`task=scissorhands_kv` on a GPU.

    python scripts/sass_loop.py [--bits 4] [--dtype bf16] [--block-n 128] [--warps 4] [--stages 3] [--sm 90]
                                [--head-dim 128] [--scores] [--max-registers 168]

--bits 0 is the full-precision cache; --head-dim takes the lanes `head_dim_chunks` gives it (80: 64 + 32); --scores
is the variant that stores each key's score (Scissorhands' counting). 4 query heads per KV head, KIVI groups of 32
tokens (keys) and 32 channels (values); pointers and strides are taken as 16-byte aligned, as the launches
specialise them.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from effrepro_kernels.decode_attention import _decode, head_dim_chunks, padded_head_dim

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^\s*\.L_x_(\d+):")
BRANCH_TO = re.compile(r"BRA.*\.L_x_(\d+)")


def compile_decode(bits: int, dtype: str, block_n: int, warps: int, stages: int, sm: int = 90,
                   head_dim: int = 128, scores: bool = False, max_registers: int | None = None):
    names = list(_decode.arg_names)
    cache = "*u8" if bits else f"*{dtype}"
    pointers = dict(Q=f"*{dtype}", K=cache, V=cache, KS=f"*{dtype}", KZ=f"*{dtype}", VS=f"*{dtype}",
                    VZ=f"*{dtype}", WORK="*i32", ARRIVED="*i32", WO="*fp32", WL="*fp32", OUT=f"*{dtype}",
                    LSE="*fp32", SCORES="*fp32")
    block_d, block_e = head_dim_chunks(head_dim, quantized=bits > 0)
    constants = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_E=block_e, WO_D=padded_head_dim(head_dim), BLOCK_G=16,
                     BLOCK_N=block_n, GROUP=4, BLOCK_P=1, K_BITS=bits, K_GROUP=32 if bits else 0, V_BITS=bits,
                     V_GROUP=32 if bits else 0, PRECISION="ieee" if dtype == "fp32" else "tf32", STORE_SCORES=scores)
    signature = {n: "constexpr" if n in constants else pointers.get(n, "fp32" if n == "sm_scale" else "i32")
                 for n in names}
    # the values' statistics have 4 groups a token: their row stride is the one not divisible by 16; the scores'
    # rows are whole tiles
    aligned = [n for n in names if n in pointers or n == "SCORES_ROW" or (n.startswith("stride") and n != "stride_vsn")]
    source = ASTSource(_decode, signature, constexprs={(names.index(n),): v for n, v in constants.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    options = dict(num_warps=warps, num_stages=stages, maxnreg=max_registers)
    return triton.compile(source, target=GPUTarget("cuda", sm, 32), options=options)


def loops(cubin: bytes) -> list[list[str]]:
    """The instructions of each loop (a backward branch and the code between its target and it)."""
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", "-hex", f.name], capture_output=True, text=True, check=True).stdout
    instructions, labels, pending = [], {}, None
    for line in sass.splitlines():
        if m := LABEL.match(line):
            pending = int(m.group(1))
        elif m := INSTRUCTION.search(line):
            address = int(m.group(1), 16)
            if pending is not None:
                labels[pending], pending = address, None
            instructions.append((address, m.group(2)))
    spans = sorted({(labels[int(m.group(1))], address) for address, text in instructions
                    if (m := BRANCH_TO.search(text)) and labels.get(int(m.group(1)), address) < address})
    return [[text for address, text in instructions if lo <= address <= hi] for lo, hi in spans]


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]  # without predicate and modifiers


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4, choices=(0, 2, 4, 8))
    parser.add_argument("--dtype", default="bf16", choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--block-n", type=int, default=128)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--scores", action="store_true", help="the variant that stores each key's score")
    parser.add_argument("--max-registers", type=int, help="a cap on registers a thread (DecodeSchedule's)")
    parser.add_argument("--sm", type=int, default=90, help="compute capability, as 80 for an A100")
    args = parser.parse_args()
    kernel = compile_decode(args.bits, args.dtype, args.block_n, args.warps, args.stages, args.sm,
                            args.head_dim, args.scores, args.max_registers)
    print(f"triton {triton.__version__}, sm_{args.sm}, head_dim {args.head_dim}, {args.bits or 16}-bit {args.dtype} "
          f"cache, {args.block_n}-key tiles, {args.warps} warps, {args.stages} stages: "
          f"{kernel.metadata.shared} bytes of shared memory")
    print("| loop | instructions | conversions (I2F, F2F, F2I) | spills (LDL, STL) | most frequent |\n"
          "|---|---|---|---|---|")
    for i, body in enumerate(loops(kernel.asm["cubin"])):
        counts = collections.Counter(map(opcode, body))
        conversions = sum(c for op, c in counts.items() if op.startswith(("I2F", "F2F", "F2I")))
        common = ", ".join(f"{op} {c}" for op, c in counts.most_common(12))
        spills = counts["LDL"] + counts["STL"]
        print(f"| {i} | {len(body)} | {conversions} | {spills} | {common} |")


if __name__ == "__main__":
    main()
