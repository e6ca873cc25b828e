"""Scissorhands' pivotal-count update kernel against its plain PyTorch reference: exact, as it counts."""
import pytest
import torch

from conftest import DEVICE
from effrepro_kernels import runtime
from effrepro_kernels.pivotal_counts import ring_history, update_pivotal_counts
from effrepro_kernels.reference import pivotal_counts_reference

LOG2E = 1.4426950408889634


@pytest.mark.parametrize("slots,n_visible,window,steps", [(300, 257, 13, [5, 12, 13, 40]), (64, 64, 400, [0, 399]),
                                                          (9, 1, 8, [3])])
@pytest.mark.parametrize("planes", [True, False], ids=["ring_history", "contiguous"])
@pytest.mark.parametrize("given", ["probs", "scores"])
def test_update_matches_reference_exactly(slots, n_visible, window, steps, planes, given):
    """Slots beyond the block and beyond the visible ones, windows not a multiple of 8, steps that wrap the ring;
    the ring byte-plane by byte-plane and slot by slot; probabilities given, or scores and their log-sum-exp
    (undefined scores past the visible slots are never read)."""
    gen = torch.Generator(device=DEVICE).manual_seed(slots)
    b, heads = 2, 3
    count = torch.randint(0, window, (b, heads, slots), device=DEVICE, generator=gen, dtype=torch.int32)
    history = ring_history(b, heads, slots, window, DEVICE) if planes else \
        torch.zeros(b, heads, slots, -(-window // 8), device=DEVICE, dtype=torch.uint8)
    assert history.stride(2) == (1 if planes else history.shape[-1])  # the step from slot to slot
    history.copy_(torch.randint(0, 256, history.shape, device=DEVICE, generator=gen, dtype=torch.uint8))
    for step in steps:
        probs = torch.rand(b, heads, slots, device=DEVICE, generator=gen) * 2 / n_visible  # about half pivotal
        if given == "probs":
            probs[..., 0] = 1.0 / n_visible  # exactly at the threshold: not pivotal
            expected = pivotal_counts_reference(probs, count, history, n_visible, step, window)
            update_pivotal_counts(probs, count, history, n_visible, step, window)
        else:
            lse = torch.randn(b, heads, device=DEVICE, generator=gen) * 5
            scores = probs.log() + lse[..., None]
            scores[..., n_visible:] = float("nan")
            # the probabilities as the kernel makes them, in float32 (an exp2 that rounds differently could move one
            # across the threshold only if it lay within a rounding step of it)
            probs = torch.exp2((scores - lse[..., None]) * LOG2E).nan_to_num(0.0)
            expected = pivotal_counts_reference(probs, count, history, n_visible, step, window)
            update_pivotal_counts(scores, count, history, n_visible, step, window, lse=lse)
        assert torch.equal(count, expected[0]) and torch.equal(history, expected[1])


def test_tensors_on_two_devices_or_where_the_kernel_does_not_run_are_named(monkeypatch):
    def update(device, count_device):
        probs, history = torch.rand(1, 2, 8, device=device), torch.zeros(1, 2, 8, 2, dtype=torch.uint8, device=device)
        count = torch.zeros(1, 2, 8, dtype=torch.int32, device=count_device)
        update_pivotal_counts(probs, count, history, 8, 0, window=16)

    with pytest.raises(ValueError, match="one device; got probs on .*, count on meta"):
        update(DEVICE, "meta")
    monkeypatch.setattr(runtime, "INTERPRET", False)  # as on a machine without the interpreter
    with pytest.raises(ValueError, match="update_pivotal_counts runs on CUDA devices .*; got tensors on cpu"):
        update("cpu", "cpu")


def test_bad_input_is_refused():
    probs, count = torch.rand(1, 2, 8, device=DEVICE), torch.zeros(1, 2, 8, dtype=torch.int32, device=DEVICE)
    history = torch.zeros(1, 2, 8, 2, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="ceil\\(window/8\\) = 1"):
        update_pivotal_counts(probs, count, history, 8, 0, window=8)
    for window in (0, -8, 8.0):
        with pytest.raises(ValueError, match=f"window={window!r} .* must be an integer >= 1"):
            update_pivotal_counts(probs, count, history[..., :0], 8, 0, window=window)
        with pytest.raises(ValueError, match=f"window={window!r}"):
            ring_history(1, 2, 8, window, DEVICE)
    with pytest.raises(ValueError, match="n_visible=9"):
        update_pivotal_counts(probs, count, history, 9, 0, window=16)
    with pytest.raises(ValueError, match="lse float32 \\(batch, heads\\) = \\(1, 2\\)"):
        update_pivotal_counts(probs, count, history, 8, 0, window=16, lse=torch.zeros(2, device=DEVICE))
