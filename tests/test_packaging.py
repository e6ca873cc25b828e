"""transformers depends on Hugging Face's kernel-hub client, a top-level package called `kernels`: our kernels
live under a name of their own, and both import side by side."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_our_kernels_package_is_the_one_in_this_repository():
    origin = Path(importlib.util.find_spec("effrepro_kernels").origin).resolve()
    assert origin == ROOT / "effrepro_kernels" / "__init__.py"


def test_a_transformers_model_runs_beside_our_kernels_and_the_hub_client():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from effrepro_kernels import flash_attn  # noqa: F401

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=50, n_positions=16))
    out = model(torch.randint(0, 50, (2, 16)), labels=torch.randint(0, 50, (2, 16)))
    assert torch.isfinite(out.loss)
