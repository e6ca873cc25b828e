"""The plain PyTorch attention every kernel is checked against, checked itself against first principles."""
import math

import pytest
import torch
import torch.nn.functional as F

from effrepro_kernels import attention_reference


def naive(q, k, v, causal, mask):
    """Row by row, in float64: the definition, with nothing clever."""
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    out = torch.zeros(b, h, n_q, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(n_q):
                keys = [j for j in range(n_k) if (not causal or j <= i + n_k - n_q) and (mask is None or mask[bi, j])]
                if not keys:
                    continue
                s = torch.stack([q[bi, hi, i] @ k[bi, hi, j] for j in keys]) / math.sqrt(d)
                p = torch.softmax(s, 0)
                out[bi, hi, i] = sum(p[t] * v[bi, hi, j] for t, j in enumerate(keys))
    return out


@pytest.mark.parametrize("n_q, n_k", [(5, 5), (3, 7), (7, 3), (1, 9)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_the_definition(n_q, n_k, causal, padded):
    g = torch.Generator().manual_seed(n_q * 100 + n_k)
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64, generator=g) for n in (n_q, n_k, n_k))
    mask = torch.rand(2, n_k, generator=g) > 0.3 if padded else None
    got = attention_reference(q, k, v, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(got, naive(q, k, v, causal, mask), rtol=1e-10, atol=1e-10)


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.tensor([[False, False, False, False]])
    out = attention_reference(q, k, v, key_padding_mask=mask)
    assert not out.isnan().any() and (out == 0).all()
    # causal with more queries than keys: the first rows see nothing
    out = attention_reference(torch.randn(1, 1, 6, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8), causal=True)
    assert (out[0, 0, :4] == 0).all() and (out[0, 0, 4:] != 0).any()


def test_grouped_query_attention_repeats_kv_heads():
    q = torch.randn(2, 8, 5, 16, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 5, 16, dtype=torch.float64) for _ in range(2))
    got = attention_reference(q, k, v, causal=True)
    want = attention_reference(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), causal=True)
    torch.testing.assert_close(got, want)


def test_agrees_with_sdpa_and_its_gradients():
    q, k, v = (torch.randn(2, 4, 33, 64, dtype=torch.float64, requires_grad=True) for _ in range(3))
    dout = torch.randn(2, 4, 33, 64, dtype=torch.float64)
    grads = []
    for fn in (lambda: attention_reference(q, k, v, causal=True),
               lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)):
        grads.append(torch.autograd.grad(fn(), (q, k, v), dout))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_dropout_keeps_the_expectation():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 16, 8, dtype=torch.float64) for _ in range(3))
    mean = torch.stack([attention_reference(q, k, v, dropout_p=0.3) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, attention_reference(q, k, v), rtol=0, atol=0.05)
