"""Where a generation step of the Pre-gated MoE serving benchmark spends its time, per strategy: the mean of the
runtime's own spans (MoE block, its stall, expert copies) and the host's busiest calls from torch.profiler. A probe
for tuning tasks/pregated_moe, not a run record; it prints Markdown.

    python scripts/profile_moe.py --model switch-base-64 --batch 1 --steps 8
"""
import argparse
import platform
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from repro.context import code_version  # noqa: E402
from tasks.pregated_moe.model import MoEConfig  # noqa: E402
from tasks.pregated_moe.offload import STRATEGIES, pinned_in_place  # noqa: E402
from tasks.pregated_moe.serving import parse_model, per_step, start_point  # noqa: E402
from tasks.pregated_moe.weights import random_switch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="switch-base-64")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=12, help="host calls listed per strategy")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("profiling the MoE serving step needs a CUDA GPU")
    device = torch.device("cuda")
    size, experts = parse_model(args.model)
    cfg = MoEConfig.of_size(size, n_experts=experts, pregate=True, max_len=2 * args.steps + 4)
    model = random_switch(cfg, 0, device)
    # the task's settings that start a point: the fewest slots for the batch, warm-up steps, then those profiled
    spec = SimpleNamespace(slots=None, cache="none", warmup_tokens=args.steps, new_tokens=args.steps)
    print(f"# MoE step profile: {args.model}, batch {args.batch}, {args.steps} steps\n\n"
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Python {platform.python_version()}, "
          f"commit {code_version() or 'unknown'}; `python {' '.join(sys.argv)}`\n")
    host = [t for ffn in model.moe_layers for t in (ffn.w_in.data, ffn.w_out.data)]
    with pinned_in_place(host, device):
        for strategy in STRATEGIES:
            runtime, decoder = start_point(model, strategy, args.batch, spec, device, seed=0)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(args.steps):
                    decoder.step()
                end.record()
                torch.cuda.synchronize()
            s = runtime.summary()
            spans = runtime.stats.spans
            moe_blocks = {b.index for b in model.blocks if b.moe}
            mean = {k: statistics.fmean(per_step(runtime, k) or [0.0]) for k in ("moe", "stall")}  # as the rows
            mean["copy"] = statistics.fmean([x.ms() for x in spans if x.kind == "copy"] or [0.0])
            dense = statistics.fmean(x.ms() for x in spans if x.kind == "block" and x.index not in moe_blocks)
            print(f"## {strategy}\n\nstep {start.elapsed_time(end) / args.steps:.3f} ms; a block without experts "
                  f"{dense:.3f} ms; MoE block {mean['moe']:.3f} ms, of which stalled {mean['stall']:.3f}; a copy "
                  f"request {mean['copy']:.3f} ms; hidden copy fraction {s['hidden_copy_fraction'] or 0:.2f}\n")
            last = [x for x in spans if x.forward == spans[-1].forward and x.kind != "block"]  # one step's timeline
            origin = min(last, key=lambda x: x.start.ms_since(spans[0].start)).start
            print("| span | block | from ms | to ms |\n|---|---|---|---|")
            for x in sorted(last, key=lambda x: x.start.ms_since(origin)):
                print(f"| {x.kind} | {x.index} | {x.start.ms_since(origin):.3f} | {x.end.ms_since(origin):.3f} |")
            print("\n| host call | calls/step | µs/step |\n|---|---|---|")
            top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:args.rows]
            for e in top:
                print(f"| {e.key[:60]} | {e.count / args.steps:.1f} | {e.self_cpu_time_total / args.steps:.0f} |")
            print()


if __name__ == "__main__":
    main()
