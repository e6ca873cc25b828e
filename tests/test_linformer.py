"""Linformer attention: against a plain reference, exactly standard attention with identity projections,
padding that changes nothing, inside a transformers BERT (forward, backward, against eager), and bad input."""
import pytest
import torch

from effrepro_kernels import attention_reference
from tasks.common.linformer import LinformerAttention, apply_linformer


def qkv(n, batch=3, heads=2, dim=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, dim, generator=gen, dtype=dtype) for _ in range(3)]


def padding(batch, n, lengths):
    real = torch.ones(batch, n, dtype=torch.bool)
    for row, length in lengths.items():
        real[row, length:] = False
    return real


def reference(q, k, v, e, f, real, scale):
    """softmax(Q (E K)ᵀ · scale) (F V) with the keys padded to E's length and padded keys zeroed."""
    n, seq_len = k.shape[-2], e.shape[-1]
    keep = torch.zeros(k.shape[0], 1, seq_len, 1, dtype=k.dtype)
    keep[:, 0, :n, 0] = real.to(k.dtype)
    grow = (0, 0, 0, seq_len - n)
    k, v = torch.nn.functional.pad(k, grow) * keep, torch.nn.functional.pad(v, grow) * keep
    scores = q @ (e @ k).transpose(-1, -2) * scale
    return scores.softmax(-1) @ (f @ v)


@pytest.mark.parametrize("share_kv", [False, True])
@pytest.mark.parametrize("n", [19, 14])  # the built length, and a shorter input
def test_matches_the_plain_reference(share_kv, n):
    attention = LinformerAttention(seq_len=19, k=5, share_kv=share_kv).double()
    q, k, v = qkv(n)
    real = padding(3, n, {1: 9})
    f = attention.e if share_kv else attention.f
    with torch.no_grad():
        expected = reference(q, k, v, attention.e, f, real, scale=0.3)
        torch.testing.assert_close(attention(q, k, v, real, scale=0.3), expected, rtol=1e-10, atol=1e-12)
    assert (attention.f is None) == share_kv


@pytest.mark.parametrize("padded", [False, True])
def test_identity_projections_with_k_equal_n_are_standard_attention(padded):
    attention = LinformerAttention(seq_len=13, k=13).double()
    with torch.no_grad():
        attention.e.copy_(torch.eye(13))
        attention.f.copy_(torch.eye(13))
    q, k, v = qkv(13)
    real = padding(3, 13, {0: 4, 2: 11} if padded else {})
    with torch.no_grad():
        out = attention(q, k, v, real)
    torch.testing.assert_close(out, attention_reference(q, k, v, key_padding_mask=real), rtol=1e-12, atol=1e-12)


def test_padded_keys_change_nothing():
    attention = LinformerAttention(seq_len=17, k=6)
    q, k, v = qkv(17, dtype=torch.float32)
    real = padding(3, 17, {0: 10, 2: 3})
    k2, v2 = k.clone(), v.clone()
    k2[~real[:, None, :, None].expand_as(k)] = 50.0  # new content for every padded key and value
    v2[~real[:, None, :, None].expand_as(v)] = -7.0
    with torch.no_grad():
        torch.testing.assert_close(attention(q, k2, v2, real), attention(q, k, v, real), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(attention(q, k2, v2), attention(q, k, v))  # unmasked, the content matters


def test_bad_lengths_are_errors():
    for k, seq_len in ((0, 8), (-1, 8), (9, 8)):
        with pytest.raises(ValueError, match=f"k={k} must be between 1 and seq_len={seq_len}"):
            LinformerAttention(seq_len, k)
    q, k, v = qkv(9)
    with pytest.raises(ValueError, match="9 tokens but Linformer was built for at most seq_len=8"):
        LinformerAttention(8, 4).double()(q, k, v)


def bert(**overrides):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64, attn_implementation="eager", **overrides)
    return BertModel(config, add_pooling_layer=False).eval()


def batch(n=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (2, n), generator=gen)
    return ids, padding(2, n, {1: 15}).long()


def test_bert_with_linformer_runs_forward_and_backward():
    model = bert()
    names = apply_linformer(model, k=8, seq_len=24, share_kv=True)
    assert names == [f"encoder.layer.{i}.attention.self" for i in range(2)]
    model.train()
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask).last_hidden_state.square().mean().backward()
    for name in names:
        grad = model.get_submodule(name).linformer.e.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model(input_ids=ids[:, :20], attention_mask=mask[:, :20])  # a shorter input is padded to 24
    with pytest.raises(ValueError, match="30 tokens but Linformer was built for at most seq_len=24"):
        model(input_ids=torch.randint(1, 50, (2, 30)))


def test_bert_with_identity_projections_equals_eager_bert_with_padding():
    ids, mask = batch()
    real = mask.bool()
    with torch.no_grad():
        expected = bert()(input_ids=ids, attention_mask=mask).last_hidden_state
        model = bert()
        for name in apply_linformer(model, k=24, seq_len=24):
            projections = model.get_submodule(name).linformer
            projections.e.copy_(torch.eye(24))
            projections.f.copy_(torch.eye(24))
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[real], expected[real], rtol=1e-5, atol=1e-5)


def test_bert_padding_changes_no_real_token():
    model = bert()
    apply_linformer(model, k=8, seq_len=24)
    ids, mask = batch()
    other = ids.clone()
    other[mask == 0] = 7  # other tokens under the padding
    real = mask.bool()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).last_hidden_state
        b = model(input_ids=other, attention_mask=mask).last_hidden_state
        c = model(input_ids=other).last_hidden_state  # the same tokens seen as real
    torch.testing.assert_close(a[real], b[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[real], c[real])


def test_a_mask_other_than_key_padding_is_refused_naming_linformer():
    """It was refused as effrepro's attention, which 'supports causal and key-padding masks'."""
    model = bert()
    apply_linformer(model, k=8, seq_len=24)
    ids, _ = batch()
    causal = torch.ones(24, 24, dtype=torch.bool).tril()[None, None].expand(2, 1, 24, 24)
    with pytest.raises(ValueError, match=r"^linformer takes key-padding masks only \(Linformer has no causal form\), "
                                         r"not this torch.bool \(2, 1, 24, 24\) mask"):
        model(input_ids=ids, attention_mask=causal)


def test_bert_bad_settings_are_errors():
    from transformers import GPT2Config, GPT2Model

    with pytest.raises(ValueError, match="k=32 must be between 1 and seq_len=24"):
        apply_linformer(bert(), k=32, seq_len=24)
    with pytest.raises(ValueError, match="no causal"):
        apply_linformer(bert(is_decoder=True), k=8, seq_len=24)
    with pytest.raises(ValueError, match="GPT2Model is a decoder"):
        apply_linformer(GPT2Model(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32)), k=8, seq_len=24)
