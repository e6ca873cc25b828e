"""The plain PyTorch attention every kernel is checked against, checked itself against first principles."""
import math

import pytest
import torch
import torch.nn.functional as F

from effrepro_kernels import attention_reference


def naive(q, k, v, causal, mask, attn_mask=None, keep=None, dropout_p=0.0, scale=None):
    """Row by row, in float64: the definition, with nothing clever. Query head hi reads KV head hi // (h / kv_heads);
    `attn_mask` (1|b, 1|h, n_q, n_k) says which keys a query may see; `keep` (b, h, n_q, n_k) which probabilities
    dropout keeps, each kept one scaled by 1 / (1 - dropout_p)."""
    b, h, n_q, d = q.shape
    n_k, group = k.shape[2], h // k.shape[1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(b, h, n_q, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kv = hi // group
            for i in range(n_q):
                keys = [j for j in range(n_k) if (not causal or j <= i + n_k - n_q) and (mask is None or mask[bi, j])
                        and (attn_mask is None or attn_mask[bi % attn_mask.shape[0], hi % attn_mask.shape[1], i, j])]
                if not keys:
                    continue
                s = torch.stack([q[bi, hi, i] @ k[bi, kv, j] for j in keys]) * scale
                p = torch.softmax(s, 0)
                if keep is not None:
                    p = p * torch.stack([keep[bi, hi, i, j] for j in keys]) / (1 - dropout_p)
                out[bi, hi, i] = sum(p[t] * v[bi, kv, j] for t, j in enumerate(keys))
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_fully_masked_rows_pass_no_gradient_and_no_nan(dtype):
    """One sequence all padding beside one half padded: the first's rows give q, k and v nothing, the second's
    gradients are the definition's."""
    q, k, v = (torch.randn(2, 2, 5, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[False] * 5, [True, True, True, False, False]])
    grad = torch.randn(2, 2, 5, 8, dtype=dtype)
    attention_reference(q, k, v, key_padding_mask=mask).backward(grad)
    for t in (q, k, v):
        assert t.grad.isfinite().all() and (t.grad[0] == 0).all()
    wide = [t.detach()[1:].double().requires_grad_() for t in (q, k, v)]
    naive(*wide, False, mask[1:]).backward(grad[1:].double())
    for t, want in zip((q, k, v), wide):
        torch.testing.assert_close(t.grad[1:].double(), want.grad, rtol=0,
                                   atol=2e-2 if dtype == torch.float16 else 1e-5)


def test_grouped_heads_a_mask_per_query_a_scale_and_a_given_dropout_mask_match_the_definition():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(2, 2, 7, 8, dtype=torch.float64, generator=g) for _ in range(2))
    padding = torch.rand(2, 7, generator=g) > 0.2
    attn_mask = torch.rand(1, 4, 5, 7, generator=g) > 0.4
    keep = torch.rand(2, 4, 5, 7, generator=g) > 0.3
    got = attention_reference(q, k, v, causal=True, key_padding_mask=padding, attn_mask=attn_mask, softmax_scale=0.3,
                              dropout_p=0.3, dropout_mask=keep)
    want = naive(q, k, v, True, padding, attn_mask=attn_mask, keep=keep, dropout_p=0.3, scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


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


def test_the_decode_references_are_one_query_over_each_sequences_first_keys():
    from effrepro_kernels.reference import decode_attention_reference, decode_scores_reference

    g = torch.Generator().manual_seed(4)
    q = torch.randn(3, 4, 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(3, 2, 9, 8, dtype=torch.float64, generator=g) for _ in range(2))
    lengths = torch.tensor([9, 1, 5])
    held = torch.arange(9)[None, :] < lengths[:, None]
    want = naive(q[:, :, None], k, v, False, held, scale=0.25)[:, :, 0]
    torch.testing.assert_close(decode_attention_reference(q, k, v, lengths, 0.25), want, rtol=1e-10, atol=1e-10)
    scores = decode_scores_reference(q, k, lengths, 0.25)
    for bi, n in enumerate(lengths.tolist()):
        for hi in range(4):
            want_scores = torch.stack([q[bi, hi] @ k[bi, hi // 2, j] * 0.25 for j in range(n)])
            torch.testing.assert_close(scores[bi, hi, :n], want_scores, rtol=1e-12, atol=1e-12)
            assert (scores[bi, hi, n:] == float("-inf")).all()
