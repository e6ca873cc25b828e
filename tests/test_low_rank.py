"""The Low-Rank Transformer's factorisation: the layer is U·V applied, SVD is exact at full rank and improves
with rank, the BERT-base parameter counts of the author's notebook, which layers it touches, and bad input."""
import pytest
import torch
from torch import nn

from repro.models import count_parameters
from tasks.common import low_rank
from tasks.common.low_rank import LowRankLinear, factorize


def linear(n_in, n_out, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, dtype=dtype)


def test_a_factorised_layer_is_its_two_factors_applied():
    layer = LowRankLinear.from_linear(linear(13, 7), rank=3)
    x = torch.randn(5, 13)
    product = layer.up.weight @ layer.down.weight  # U·V, (7, 13)
    assert layer.down.weight.shape == (3, 13) and layer.up.weight.shape == (7, 3)
    torch.testing.assert_close(layer(x), x @ product.T + layer.up.bias, rtol=1e-5, atol=1e-6)


def test_full_rank_svd_reproduces_the_dense_layer():
    dense = linear(11, 6, torch.float64)
    low = LowRankLinear.from_linear(dense, rank=6)
    x = torch.randn(4, 11, dtype=torch.float64)
    torch.testing.assert_close(low(x), dense(x), rtol=1e-12, atol=1e-12)


def test_svd_error_is_the_discarded_singular_values_and_falls_with_rank():
    dense = linear(23, 17, torch.float64)
    singular = torch.linalg.svdvals(dense.weight.detach())
    errors = []
    for rank in range(1, 18):
        low = LowRankLinear.from_linear(dense, rank)
        error = torch.linalg.matrix_norm(low.up.weight @ low.down.weight - dense.weight).item()
        # Eckart-Young: the best rank-r approximation misses exactly the singular values beyond r
        assert error == pytest.approx(singular[rank:].square().sum().sqrt().item(), rel=1e-9, abs=1e-12)
        errors.append(error)
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-12


def test_factorize_replaces_only_layers_where_it_saves_weights_with_the_truncated_svd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 3)).double()
    u, s, vh = torch.linalg.svd(model[0].weight.detach())
    best = (u[:, :20] * s[:20]) @ vh[:20]  # the reference: the best rank-20 weight
    x = torch.randn(6, 64, dtype=torch.float64)
    expected = model[2](model[1](x @ best.T + model[0].bias))
    report = factorize(model, rank=20)  # 20·(64+48) < 64·48 saves; 20·(48+3) >= 48·3 does not
    assert report.factorised == {"0": 20} and report.kept == ["2"]
    assert isinstance(model[0], LowRankLinear) and isinstance(model[2], nn.Linear)
    assert report.params_before - report.params_after == 64 * 48 - 20 * (64 + 48)
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
    model(x).sum().backward()
    assert model[0].down.weight.grad is not None and model[0].up.weight.grad is not None


@pytest.mark.parametrize("rank, n_in, n_out, factorised_rank", [
    (614, 768, 3072, None),  # in·out/(in+out) = 614.4, which greenformer rounds down to 614 and skips at
    (613, 768, 3072, 613),
    (0.9, 256, 1024, 183),   # 0.9 of the rounded-down 204, not of 204.8
    (0.75, 768, 2, None),    # a 2-class head: 0.75 of 1 is rank 0, left dense
])
def test_ranks_and_skipped_layers_follow_greenformers_auto_fact(rank, n_in, n_out, factorised_rank):
    model = nn.Sequential(linear(n_in, n_in), linear(n_in, n_out))
    if factorised_rank is None:
        with pytest.raises(ValueError, match="factorises none"):
            factorize(model, rank, only=["1"])
    else:
        assert factorize(model, rank, only=["1"]).factorised == {"1": factorised_rank}


def test_a_tied_weight_stays_dense():
    embed = nn.Embedding(40, 24)
    decoder = nn.Linear(24, 40, bias=False)
    decoder.weight = embed.weight  # an MLM decoder tied to the embeddings
    model = nn.ModuleDict(dict(embed=embed, decoder=decoder, hidden=nn.Linear(24, 24)))
    report = factorize(model, rank=4, init="random")
    assert report.factorised == {"hidden": 4} and report.kept == ["decoder"]
    assert model["decoder"].weight is model["embed"].weight


def test_a_torch_transformer_factorises_its_feed_forward_and_still_runs():
    """nn.MultiheadAttention reads its out_proj's weight itself: that layer stays dense."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=128, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    report = factorize(model, rank=4, init="random")
    assert sorted(report.factorised) == [f"layers.{i}.linear{j}" for i in range(2) for j in (1, 2)]
    assert model(torch.randn(2, 5, 32)).shape == (2, 5, 32)
    with pytest.raises(ValueError, match="no nn.Linear submodule"):  # one bare attention: nothing it may factorise
        factorize(nn.MultiheadAttention(32, 4), rank=4)


def bert_base():
    """BERT-base as in the greenformer notebook, built on the meta device: shapes only, no memory, no download."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)
    with torch.device("meta"):
        return BertModel(config)


@pytest.mark.parametrize("rank, only, params", [
    (256, None, 66_818_304),
    (0.4, None, 58_052_352),
    # the notebook's partial model: rank 0.2 on the last 6 layers and the pooler
    (0.2, ["encoder.layer.[6-9].*", "encoder.layer.1[01].*", "pooler.*"], 74_965_248),
])
def test_bert_base_parameter_counts_match_the_greenformer_notebook(rank, only, params):
    model = bert_base()
    report = factorize(model, rank, only=only, init="random")
    assert report.params_before == 109_482_240
    assert report.params_after == params
    # every linear layer of the encoder and the pooler is factorised (only selected ones with `only`)
    assert len(report.factorised) == (73 if only is None else 37) and report.kept == []


def test_only_takes_a_predicate():
    model = bert_base()
    report = factorize(model, 64, only=lambda name: name.endswith("attention.self.query"), init="random")
    assert sorted(report.factorised) == sorted(f"encoder.layer.{i}.attention.self.query" for i in range(12))


@pytest.mark.parametrize("rank, only, message", [
    (0, None, "must be >= 1"),
    (-3, None, "must be >= 1"),
    (1.0, None, r"in \(0, 1\)"),
    (1.5, None, r"in \(0, 1\)"),
    (0.0, None, r"in \(0, 1\)"),
    (True, None, "must be an int"),
    (25, None, "factorises none"),  # above min(in, out) = 24 of every layer
    (4, ["encoder.*"], "match no linear layer"),
])
def test_bad_input_is_an_error_naming_it(rank, only, message):
    model = nn.Sequential(nn.Linear(24, 30), nn.Linear(30, 24))
    with pytest.raises(ValueError, match=message):
        factorize(model, rank, only=only)
    assert all(isinstance(m, nn.Linear) for m in model)  # nothing was changed


def test_a_rank_at_the_limit_is_refused_naming_the_limit_not_a_weight_saving_it_would_make():
    """Linear(3, 5) at rank 1 saves weights (8 < 15) but sits at greenformer's limit, 15 // 8 = 1: the error said a
    factorisation needs r·(in+out) < in·out, which rank 1 meets."""
    with pytest.raises(ValueError, match=r"1 <= r < in·out // \(in\+out\).*\(here: \{'0': 'rank 1, limit 1'\}\)"):
        factorize(nn.Sequential(nn.Linear(3, 5)), 1)


def test_an_unknown_init_or_a_rank_above_the_layer_is_an_error():
    with pytest.raises(ValueError, match="init='nmf'"):
        factorize(nn.Sequential(nn.Linear(24, 30)), 4, init="nmf")
    with pytest.raises(ValueError, match="between 1 and min"):
        LowRankLinear.from_linear(nn.Linear(5, 3), rank=4)


def test_parameters_are_counted_by_the_engines_count():
    assert low_rank.count_parameters is count_parameters  # one copy, in repro.models
