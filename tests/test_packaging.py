"""Our top-level package is called `kernels`, like Hugging Face's kernel hub client: transformers must not
mistake ours for theirs (it would try to fetch hub kernels and fail offline)."""
import importlib.util


def test_transformers_does_not_think_hub_kernels_are_installed():
    assert importlib.util.find_spec("kernels").origin.endswith("kernels/__init__.py")
    from transformers.utils import import_utils

    import_utils.is_kernels_available.cache_clear()
    assert import_utils.is_kernels_available() is False


def test_a_transformers_model_runs_with_our_kernels_package_importable():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import kernels  # noqa: F401

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=50, n_positions=16))
    out = model(torch.randint(0, 50, (2, 16)), labels=torch.randint(0, 50, (2, 16)))
    assert torch.isfinite(out.loss)
