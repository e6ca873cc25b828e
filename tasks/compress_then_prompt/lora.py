"""LoRA on a compressed model, the comparison the ICML version of Compress, Then Prompt adds: PEFT's LoRA, whose
trainable low-rank update B·A runs beside each target layer, here a `CompressedLinear` that stays as stored."""
from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear

from .storage import CompressedLinear


class CompressedLoraLinear(LoraLinear):
    """PEFT's LoRA Linear around a `CompressedLinear`: y = base(x) + B(A(dropout(x))) · alpha / r. PEFT needs
    only the layer's shape from it, which it cannot read from a layer type it does not know."""

    def _get_in_out_features(self, module: CompressedLinear) -> tuple[int, int]:
        return module.layout["in_features"], module.layout["out_features"]


def add_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float,
             targets: list[str] | None = None) -> PeftModel:
    """`model` (frozen by PEFT) with trainable LoRA adapters of rank `rank` on the layers named in `targets`
    (None: PEFT's default for the model type, q_proj and v_proj for Llama)."""
    config = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=targets)
    # PEFT's documented hook for layer types it does not know (docs: developer_guides/custom_models)
    config._register_custom_module({CompressedLinear: CompressedLoraLinear})
    return get_peft_model(model, config)
