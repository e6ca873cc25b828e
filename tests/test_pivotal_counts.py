"""Scissorhands' pivotal-count update kernel against its plain PyTorch reference: exact, as it counts."""
import pytest
import torch

from conftest import DEVICE
from effrepro_kernels.pivotal_counts import ring_history, update_pivotal_counts
from effrepro_kernels.reference import pivotal_counts_reference


@pytest.mark.parametrize("slots,n_visible,window,steps", [(300, 257, 13, [5, 12, 13, 40]), (64, 64, 400, [0, 399]),
                                                          (9, 1, 8, [3])])
@pytest.mark.parametrize("planes", [True, False], ids=["ring_history", "contiguous"])
def test_update_matches_reference_exactly(slots, n_visible, window, steps, planes):
    """Slots beyond the block and beyond the visible ones, windows not a multiple of 8, steps that wrap the ring;
    the ring byte-plane by byte-plane and slot by slot."""
    gen = torch.Generator(device=DEVICE).manual_seed(slots)
    b, heads = 2, 3
    count = torch.randint(0, window, (b, heads, slots), device=DEVICE, generator=gen, dtype=torch.int32)
    history = ring_history(b, heads, slots, window, DEVICE) if planes else \
        torch.zeros(b, heads, slots, -(-window // 8), device=DEVICE, dtype=torch.uint8)
    assert history.stride(2) == (1 if planes else history.shape[-1])  # the step from slot to slot
    history.copy_(torch.randint(0, 256, history.shape, device=DEVICE, generator=gen, dtype=torch.uint8))
    for step in steps:
        probs = torch.rand(b, heads, slots, device=DEVICE, generator=gen) * 2 / n_visible  # about half pivotal
        probs[..., 0] = 1.0 / n_visible  # exactly at the threshold: not pivotal
        expected = pivotal_counts_reference(probs, count, history, n_visible, step, window)
        update_pivotal_counts(probs, count, history, n_visible, step, window)
        assert torch.equal(count, expected[0]) and torch.equal(history, expected[1])


def test_bad_input_is_refused():
    probs, count = torch.rand(1, 2, 8, device=DEVICE), torch.zeros(1, 2, 8, dtype=torch.int32, device=DEVICE)
    history = torch.zeros(1, 2, 8, 2, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="ceil\\(window/8\\) = 1"):
        update_pivotal_counts(probs, count, history, 8, 0, window=8)
    with pytest.raises(ValueError, match="n_visible=9"):
        update_pivotal_counts(probs, count, history, 9, 0, window=16)
