"""Compressing a transformers causal LM the way GPTQ and SparseGPT do: block by block, each block's Linear layers
from the Hessians of the inputs they see when the calibration tokens run through the already-compressed blocks
before them. Within a block, layers that read the same input (q, k, v; gate, up) are compressed together and
before the layers after them, whose inputs then come through the compressed ones ("true sequential").

Why the methods are written here rather than taken from a library (checked 2026-12, offline, on a CPU):
- gptqmodel 7.7 needs torch>=2.14.1 and transformers>=5.20.2 (neither of our two machines has both), is an sdist
  that builds C++/CUDA extensions, and does not prune;
- llmcompressor 0.14 pins transformers<=5.17 (it did run on CPU with 5.24 installed without its dependencies),
  wants a tokenizer and a model saved on disk even for token ids, and runs SparseGPT then GPTQ as two passes, not
  the papers' joint sweep (50% SparseGPT then 4-bit GPTQ left 49.9% zeros in our trial); it gives fake-quantized
  weights with scales, not codes and masks to count;
- torchao 0.18's GPTQ asserts CUDA and does int4/int8/nvfp4 only (no 2/3-bit); it has Wanda but no SparseGPT.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .methods import METHODS, PRUNERS, QUANTIZERS, compress_layer, relative_output_error
from .storage import CompressedLinear, weight_bytes

BITS = (2, 3, 4, 8)


@dataclass
class CompressionReport:
    method: str
    bits: int | None
    group_size: int | None
    sparsity: float | None
    n_m: tuple[int, int] | None
    layer_errors: dict[str, float] = field(default_factory=dict)  # ||WX - W'X||² / ||WX||² per layer, calibration
    bytes: dict[str, float] = field(default_factory=dict)  # weight_bytes(model) afterwards
    seconds: float = 0.0


def check_arguments(method: str, bits: int | None, group_size: int | None, sparsity: float | None,
                    n_m: tuple[int, int] | None, act_order: bool, percdamp: float) -> tuple[int, int] | None:
    """Raise ValueError on a bad combination; return n_m as a tuple of two ints (or None)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if bits is not None and bits not in BITS:
        raise ValueError(f"bits={bits!r} is not one of {BITS}")
    if method in QUANTIZERS:
        if bits is None:
            raise ValueError(f"method={method!r} quantizes: give bits, one of {BITS}")
        if sparsity is not None or n_m is not None:
            raise ValueError(f"method={method!r} does not prune (got sparsity={sparsity}, n_m={n_m}); "
                             f"pruning methods are {PRUNERS}")
    elif (sparsity is None) == (n_m is None):
        raise ValueError(f"method={method!r} prunes: give one of sparsity or n_m (got sparsity={sparsity}, "
                         f"n_m={n_m})")
    if sparsity is not None and not 0 <= sparsity < 1:
        raise ValueError(f"sparsity={sparsity} is outside [0, 1)")
    if n_m is not None:
        if not isinstance(n_m, (list, tuple)) or len(n_m) != 2 or not 0 < int(n_m[0]) < int(n_m[1]):
            raise ValueError(f"n_m={n_m!r} must be two integers N < M: keep N weights of every M, e.g. (2, 4)")
        n_m = (int(n_m[0]), int(n_m[1]))
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size={group_size} must be a positive number of input columns, or None (per row)")
    if act_order and method != "gptq":
        raise ValueError(f"act_order applies to gptq only, not method={method!r}")
    if not percdamp > 0:
        raise ValueError(f"percdamp={percdamp} must be > 0 (the papers use 0.01)")
    return n_m


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and list of the decoder blocks (model.layers, model.decoder.layers, transformer.h, ...): the
    first ModuleList with config.num_hidden_layers entries."""
    count = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return name, module
    raise ValueError(f"{type(model).__name__} has no ModuleList of its {count} blocks")


LINEAR_LAYERS = (nn.Linear, Conv1D)  # GPT-2's Conv1D is a Linear with its weight stored transposed


def linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in block.named_modules() if isinstance(m, LINEAR_LAYERS)}


def dense_weight(layer: nn.Module) -> torch.Tensor:
    return (layer.weight.T if isinstance(layer, Conv1D) else layer.weight).float()


def input_width(layer: nn.Module) -> int:
    return layer.weight.shape[0 if isinstance(layer, Conv1D) else 1]


def check_n_m_fits(model: nn.Module, n_m: tuple[int, int]) -> None:
    """Raise ValueError unless M divides the input width of every layer `compress` would prune: checked for every
    layer before any is changed."""
    for i, block in enumerate(transformer_blocks(model)[1]):
        for name, layer in linear_layers(block).items():
            width = input_width(layer)
            if width % n_m[1]:
                raise ValueError(f"n_m={tuple(n_m)}: M={n_m[1]} does not divide the input width {width} of "
                                 f"block {i} {name}")


class _Captured(Exception):
    pass


def first_block_inputs(model: nn.Module, block: nn.Module, calibration: torch.Tensor):
    """Each sample's hidden states entering `block`, and the other arguments the model passes to it (masks,
    position embeddings: the same for every sample, all being of one length)."""
    inputs, call = [], {}

    def capture(module, args, kwargs):
        kwargs = dict(kwargs)
        inputs.append(args[0] if args else kwargs.pop("hidden_states"))
        call.update(args=args[1:], kwargs=kwargs)
        raise _Captured  # the rest of the model is not needed

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for ids in calibration:
            try:
                model(ids[None], use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return inputs, call["args"], call["kwargs"]


def run_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def same_input_groups(block: nn.Module, layers: dict[str, nn.Module], run) -> list[list[str]]:
    """The layers in the order the block calls them, consecutive ones that read the same tensor grouped."""
    calls = []
    handles = [layer.register_forward_pre_hook(lambda m, args, name=name: calls.append((name, args[0])))
               for name, layer in layers.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    groups = []
    for i, (name, x) in enumerate(calls):
        if i and x is calls[i - 1][1]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def hessians(layers: dict[str, nn.Module], inputs: list[torch.Tensor], run) -> dict[str, torch.Tensor]:
    """H = 2 X Xᵀ / N of each layer's inputs over all calibration tokens, float32."""
    sums, tokens = {}, {}

    def accumulate(module, args, name):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        sums[name] = sums.get(name, 0) + x.T @ x
        tokens[name] = tokens.get(name, 0) + x.shape[0]

    handles = [layer.register_forward_pre_hook(partial(accumulate, name=name)) for name, layer in layers.items()]
    try:
        for hidden in inputs:
            run(hidden)
    finally:
        for h in handles:
            h.remove()
    return {name: 2 * sums[name] / tokens[name] for name in layers}


@torch.no_grad()
def compress(model: nn.Module, method: str, calibration: torch.Tensor, *, bits: int | None = None,
             group_size: int | None = 128, sparsity: float | None = None, n_m: tuple[int, int] | None = None,
             act_order: bool = False, percdamp: float = 0.01, progress: bool = True) -> CompressionReport:
    """Compress every Linear of every transformer block of `model` in place (they become `CompressedLinear`s).

    method: rtn, gptq (need `bits`), magnitude, wanda, sparsegpt (need `sparsity` or `n_m` = (N, M), N kept of
    every M consecutive inputs; optional `bits` quantizes the kept weights). `calibration`: token ids
    (samples, seqlen), one sample or more. `group_size` None: one scale per row. `act_order` (gptq): columns in
    decreasing order of H_jj. `percdamp`: damping of H, times its mean diagonal. A block's layers are compressed
    in the order their inputs are made (q, k, v; then o; ...), each group from the inputs the already compressed
    layers give, as GPTQ's and SparseGPT's --true-sequential.
    """
    n_m = check_arguments(method, bits, group_size, sparsity, n_m, act_order, percdamp)
    if calibration.ndim != 2 or not len(calibration) or calibration.dtype.is_floating_point \
            or calibration.dtype == torch.bool:
        raise ValueError(f"calibration must be token ids of shape (samples, seqlen) with one sample or more, got "
                         f"{calibration.dtype} {tuple(calibration.shape)}")
    blocks_name, blocks = transformer_blocks(model)
    if n_m is not None:
        check_n_m_fits(model, n_m)

    start, was_training = time.perf_counter(), model.training
    model.eval()
    device = next(model.parameters()).device
    report = CompressionReport(method, bits, group_size, sparsity, n_m)
    inputs, args, kwargs = first_block_inputs(model, blocks[0], calibration.to(device))
    for i, block in enumerate(tqdm(blocks, desc=f"{method} blocks", disable=not progress)):
        run = partial(run_block, block, args=args, kwargs=kwargs)
        layers = linear_layers(block)
        for group in same_input_groups(block, layers, partial(run, inputs[0])):
            for name, h in hessians({name: layers[name] for name in group}, inputs, run).items():
                layer = layers[name]
                w = dense_weight(layer)
                result = compress_layer(w, h, method, bits=bits, group_size=group_size, sparsity=sparsity,
                                        n_m=n_m, act_order=act_order, percdamp=percdamp)
                report.layer_errors[f"{blocks_name}.{i}.{name}"] = relative_output_error(w, result.weight, h)
                layers[name] = CompressedLinear.from_result(result, bits=bits, group_size=group_size or w.shape[1],
                                                            n_m=n_m, bias=layer.bias, dtype=layer.weight.dtype)
                block.set_submodule(name, layers[name])
        inputs = [run(hidden) for hidden in inputs]
    model.train(was_training)
    report.bytes = weight_bytes(model)
    report.seconds = time.perf_counter() - start
    return report
