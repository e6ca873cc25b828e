"""The paper's Megatron-LM baseline: GPT-2 built by megatron-core (`pip install megatron-core`, the `megatron`
extra), behind the same call the training loop makes of a transformers model: `model(input_ids=, labels=)`
returning an object with `.loss`.

What is measured is megatron-core's "local" layer spec, the one that needs neither Transformer Engine nor apex:
Megatron's own attention (`DotProductAttention`: batched matmuls into a preallocated buffer, scale, causal
mask and softmax, dropout, matmul), its fused QKV projection and MLP. Megatron's fused scale-mask-softmax
CUDA extension, which the paper's Megatron baseline used, is not published on PyPI, so the softmax is
PyTorch's. megatron-core allocates its attention buffers on CUDA: the baseline runs on GPUs only.
"""
from __future__ import annotations

import atexit
from types import SimpleNamespace

import torch
import torch.distributed as dist

from repro.bench import Unsupported


def _require(device: torch.device) -> None:
    if device.type != "cuda":
        raise Unsupported("megatron: megatron-core's attention allocates its buffers on CUDA; no GPU here")
    try:
        import megatron.core  # noqa: F401
    except ImportError as exc:
        raise Unsupported(f"megatron: megatron-core is not installed ({exc}); pip install 'effrepro[megatron]'")


def _init_parallel_state(seed: int) -> None:
    """megatron-core wants its process groups even on one GPU: tensor and pipeline parallel size 1, and every
    rank of a torchrun world as data parallel (our loop wraps the model in DDP or FSDP, as the others)."""
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():  # a plain single-process run: a world of one
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
        atexit.register(dist.destroy_process_group)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)  # dropout and weight init draw from its RNG tracker


class MegatronGPT(torch.nn.Module):
    def __init__(self, gpt: torch.nn.Module):
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        # megatron-core scores each position against the label given there; transformers shifts the labels
        # itself. Shift them here and drop the last position, so both losses average the same predictions.
        per_token = self.gpt(input_ids, positions, None, labels=labels.roll(-1, dims=1))
        return SimpleNamespace(loss=per_token[:, :-1].float().mean(), logits=None)

    def non_embedding_params(self) -> int:
        """Parameters less the position table: the word embedding is the tied output layer's weight too (its
        `output_layer` holds none of its own), a matrix product every token pays for, as `model_flops_per_token`
        counts it for transformers' GPT-2."""
        return sum(p.numel() for p in self.parameters()) - self.gpt.embedding.position_embeddings.weight.numel()


def build_megatron_gpt2(device: torch.device, layers: int, hidden: int, heads: int, vocab_size: int, positions: int,
                        dropout: float, seed: int) -> MegatronGPT:
    """GPT-2's shape (pre-LayerNorm, learned absolute positions, 4x MLP, tied input and output embeddings,
    init std 0.02) in megatron-core. (train_lm refuses megatron for any other model family.)"""
    _require(device)
    _init_parallel_state(seed)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, ffn_hidden_size=4 * hidden,
        hidden_dropout=dropout, attention_dropout=dropout, init_method_std=0.02, layernorm_epsilon=1e-5,
        # the fusions below need apex or Megatron's own CUDA extensions, which PyPI does not carry
        masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        gradient_accumulation_fusion=False, apply_rope_fusion=False, persist_layer_norm=False)
    gpt = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=vocab_size,
                   max_sequence_length=positions, position_embedding_type="learned_absolute",
                   share_embeddings_and_output_weights=True)
    return MegatronGPT(gpt).to(device)
