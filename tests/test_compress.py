"""Weight compression of Compress-then-Prompt: the per-layer methods against a plain Optimal Brain Surgeon reference
and against their naive baselines, storage and byte counts, the block-by-block driver on tiny random models."""
import math

import pytest
import torch
from conftest import gpu
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from tasks.compress_then_prompt import (CompressedLinear, compress, compress_layer, load_compressed, save_compressed,
                                        weight_bytes)
from tasks.compress_then_prompt.compress import linear_layers, run_block, same_input_groups
from tasks.compress_then_prompt.methods import (dequantize, group_params, keep_mask, obs_sweep, per_column,
                                                quant_params, quantize)
from tasks.compress_then_prompt.storage import pack, unpack


def correlated_inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    """Inputs like an LLM's: X = Z A (+ a little noise) with Z narrower than X, so that features are correlated
    and partly redundant, then scaled per feature by a log-normal factor, so that some features are much larger
    than others. Second-order methods exploit the first, Wanda the second."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width // 4, generator=g) @ torch.randn(width // 4, width, generator=g)
    x = x + 0.1 * x.std() * torch.randn(tokens, width, generator=g)
    return x * torch.randn(width, generator=g).exp()


def layer_case(rows=24, cols=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    w = torch.randn(rows, cols, generator=g)
    x = correlated_inputs(tokens, cols, seed)
    return w, x, 2 * x.T @ x / tokens


def output_error(w, compressed, x) -> float:
    return (x @ w.T - x @ compressed.T).norm().item()


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, **overrides)
    return LlamaForCausalLM(config).eval()


def token_ids(samples=4, seqlen=16, seed=0):
    return torch.randint(0, 96, (samples, seqlen), generator=torch.Generator().manual_seed(seed))


# --- the reference: Optimal Brain Surgeon one column at a time -------------------------------------------------


def lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the `count` lowest entries of each row."""
    pruned = torch.zeros_like(score, dtype=torch.bool)
    return pruned.scatter_(1, score.argsort(dim=1)[:, :count], True)


def reference_obs(w, h, *, bits=None, group_size=None, sparsity=None, n_m=None, blocksize=16, percdamp=0.01):
    """GPTQ / SparseGPT as the papers derive them: fix column k, then move the still-free columns F = k..end by
    -(w_k - q_k) / [H_F⁻¹]_kk · [H_F⁻¹]_k,:, with H_F⁻¹ inverted afresh for every k (no Cholesky, no lazy
    batches). Unstructured masks are chosen per block of `blocksize` columns by w² / [H_F⁻¹]_jj, and a group's
    scale from its columns as they were when its first column's block began (as the reference GPTQ code)."""
    w, h = w.clone(), h.clone()
    rows, cols = w.shape
    dead = h.diagonal() == 0  # as GPTQ's and SparseGPT's code: an input never active weighs nothing, H_jj = 1
    h[dead, dead], w[:, dead] = 1, 0
    h = h + percdamp * h.diagonal().mean() * torch.eye(cols, dtype=h.dtype)
    free_inverse_diagonal = lambda j: torch.linalg.inv(h[j:, j:])[0, 0]  # noqa: E731
    out, keep = torch.zeros_like(w), torch.ones_like(w, dtype=torch.bool)
    group_size = group_size or cols
    for k in range(cols):
        if k % blocksize == 0:
            block_start = w.clone()
        if sparsity is not None and k % blocksize == 0:
            end = min(k + blocksize, cols)
            d = torch.stack([free_inverse_diagonal(j) for j in range(k, end)])
            score = (w[:, k:end] ** 2 / d).reshape(1, -1)
            keep[:, k:end] = ~lowest(score, int(score.numel() * sparsity)).reshape(rows, end - k)
        if n_m is not None and k % n_m[1] == 0:
            d = torch.stack([free_inverse_diagonal(j) for j in range(k, k + n_m[1])])
            keep[:, k:k + n_m[1]] = ~lowest(w[:, k:k + n_m[1]] ** 2 / d, n_m[1] - n_m[0])
        if bits is not None and k % group_size == 0:
            scale, zero = quant_params(block_start[:, k:k + group_size], bits)
        q = w[:, k] * keep[:, k]
        if bits is not None:
            q = dequantize(quantize(q, scale, zero, bits), scale, zero)
        inverse = torch.linalg.inv(h[k:, k:])
        w[:, k:] -= torch.outer((w[:, k] - q) / inverse[0, 0], inverse[0])
        out[:, k] = q
    return out, keep


@pytest.mark.parametrize("case", [
    dict(bits=3, group_size=8),  # gptq, groups within blocks
    dict(bits=2, group_size=32),  # gptq, groups across blocks
    dict(sparsity=0.5),  # sparsegpt
    dict(sparsity=0.6, bits=4, group_size=16),  # sparsegpt joint
    dict(n_m=(2, 4), bits=3, group_size=8),  # sparsegpt N:M joint
])
def test_obs_sweep_matches_the_one_column_at_a_time_reference(case):
    w, _, h = layer_case(rows=7, cols=48, tokens=200, seed=1)
    w, h = w.double(), h.double()
    got = obs_sweep(w, h, blocksize=16, **case)
    want, keep = reference_obs(w, h, blocksize=16, **case)
    torch.testing.assert_close(got.weight, want)
    if "sparsity" in case or "n_m" in case:
        assert torch.equal(got.keep, keep)


@pytest.mark.parametrize("case", [dict(bits=3, group_size=8), dict(sparsity=0.5)])
def test_an_input_never_active_on_the_calibration_data_is_zeroed_as_the_reference_code_does(case):
    """Inputs 0 in every calibration token (H_jj = 0): their weights are set to 0 and H_jj to 1, before the
    damping, which that 1 shifts."""
    w, x, _ = layer_case(rows=7, cols=48, tokens=200, seed=3)
    x[:, [5, 20]] = 0
    w, h = w.double(), (2 * x.T @ x / len(x)).double()
    got = obs_sweep(w, h, blocksize=16, **case)
    want, _ = reference_obs(w, h, blocksize=16, **case)
    assert (got.weight[:, [5, 20]] == 0).all()
    torch.testing.assert_close(got.weight, want)


def test_act_order_sweep_is_the_reference_on_permuted_columns():
    w, _, h = layer_case(rows=9, cols=40, tokens=200, seed=2)
    w, h = w.double(), h.double()
    got = obs_sweep(w, h, bits=3, group_size=None, act_order=True, blocksize=16)
    perm = h.diagonal().argsort(descending=True)
    want, _ = reference_obs(w[:, perm], h[perm][:, perm], bits=3, blocksize=16)
    torch.testing.assert_close(got.weight, want[:, perm.argsort()])


# --- quantizer, masks, packing ---------------------------------------------------------------------------------


def test_a_group_of_zeros_or_of_a_range_below_fp16s_resolution_rounds_to_zero_not_nan():
    """Its scale would be 0 (0/0 codes): it is taken as 1, every weight then code `zero`, dequantized to 0."""
    w = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    w[1, :16] = 0
    w[2, 16:] = torch.linspace(-1e-9, 1e-9, 16)
    scales, zeros = group_params(w, 4, 16)
    scale, zero = per_column(scales, 16, 32), per_column(zeros, 16, 32)
    assert scales[1, 0] == scales[2, 1] == 1
    error = dequantize(quantize(w, scale, zero, 4), scale, zero) - w
    assert (error[1, :16] == 0).all() and (error[2, 16:].abs() <= 1e-9).all() and error.isfinite().all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantizer_codes_are_in_range_and_within_half_a_step(bits):
    w = torch.randn(13, 50, generator=torch.Generator().manual_seed(bits))
    w[0] = w[0].abs()  # a row without negatives: its zero point is code 0
    scales, zeros = group_params(w, bits, 16)
    scale, zero = per_column(scales, 16, 50), per_column(zeros, 16, 50)
    codes = quantize(w, scale, zero, bits)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1 and torch.equal(codes, codes.round())
    error = (dequantize(codes, scale, zero) - w).abs()
    on_grid = (w >= scale * -zero) & (w <= scale * (2**bits - 1 - zero))
    assert (error[on_grid] <= scale[on_grid] / 2 * (1 + 1e-5)).all()
    assert (error <= scale).all()  # past the grid's ends (the zero point is rounded) by less than a step
    assert (dequantize(zeros, scales, zeros) == 0).all()  # zero is exact: pruned weights stay zero
    # the grid spans each group's range widened to 0, to within a step at either end (the zero point is rounded to
    # a code, the scale to fp16): a grid twice as wide, half its codes unused, kept every error within half a step
    lo, hi = (torch.stack([extreme(g, 1) for g in w.split(16, dim=1)], 1) for extreme in (torch.amin, torch.amax))
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    assert ((dequantize(0, scales, zeros) - lo).abs() <= scales).all()
    assert ((dequantize(2**bits - 1, scales, zeros) - hi).abs() <= scales).all()
    assert (zeros[0] == 0).all() and (scales == scales.half().float()).all()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_then_unpack_gives_back_the_integers(bits):
    values = torch.randint(0, 2**bits, (37,), generator=torch.Generator().manual_seed(bits))
    packed = pack(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(37 * bits / 8)
    assert torch.equal(unpack(packed, bits, 37), values)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("n_m", [(2, 4), (1, 4), (4, 8)])
def test_n_m_masks_keep_exactly_n_of_every_m(method, n_m):
    w, _, h = layer_case(rows=11, cols=40, tokens=100)
    result = compress_layer(w, h, method, n_m=n_m)
    n, m = n_m
    assert (result.keep.reshape(11, -1, m).sum(-1) == n).all()
    assert torch.equal(result.weight != 0, result.keep)
    stored = CompressedLinear.from_result(result, bits=None, group_size=None, n_m=n_m, bias=None, dtype=torch.float32)
    assert torch.equal(stored.keep(), result.keep)


def test_wanda_prunes_the_lowest_weight_times_input_norm_of_each_row():
    w, x, h = layer_case(rows=9, cols=37)
    keep = compress_layer(w, h, "wanda", sparsity=0.6).keep
    score = w.abs() * x.norm(dim=0)
    assert (keep.sum(1) == 37 - int(37 * 0.6)).all()
    assert (score.masked_fill(keep, -1).amax(1) <= score.masked_fill(~keep, math.inf).amin(1)).all()


def test_magnitude_prunes_the_smallest_weights_of_the_layer():
    w, _, h = layer_case(rows=9, cols=37)
    keep = keep_mask(w.abs(), sparsity=0.7)
    assert (~keep).sum() == int(9 * 37 * 0.7)
    assert w.abs()[~keep].max() <= w.abs()[keep].min()
    assert torch.equal(compress_layer(w, h, "magnitude", sparsity=0.7).keep, keep)


# --- second-order methods beat their naive baselines -----------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_lower_than_rtn(bits, act_order):
    w, x, h = layer_case()
    gptq = compress_layer(w, h, "gptq", bits=bits, group_size=32, act_order=act_order).weight
    rtn = compress_layer(w, h, "rtn", bits=bits, group_size=32).weight
    assert output_error(w, gptq, x) < 0.7 * output_error(w, rtn, x)


@pytest.mark.parametrize("pruning", [dict(sparsity=0.5), dict(sparsity=0.75), dict(n_m=(2, 4))])
@pytest.mark.parametrize("bits", [None, 4])
def test_sparsegpt_output_error_is_lower_than_magnitude(pruning, bits):
    w, x, h = layer_case()
    sparsegpt = compress_layer(w, h, "sparsegpt", bits=bits, **pruning).weight
    magnitude = compress_layer(w, h, "magnitude", bits=bits, **pruning).weight
    assert output_error(w, sparsegpt, x) < 0.7 * output_error(w, magnitude, x)


@pytest.mark.parametrize("pruning", [dict(sparsity=0.5), dict(n_m=(2, 4))])
def test_wanda_output_error_is_lower_than_magnitude(pruning):
    w, x, h = layer_case()
    wanda = compress_layer(w, h, "wanda", **pruning).weight
    magnitude = compress_layer(w, h, "magnitude", **pruning).weight
    assert output_error(w, wanda, x) < 0.7 * output_error(w, magnitude, x)


# --- joint mode, storage, bytes --------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity, bits", [(0.5, 4), (0.75, 3), (0.5, 2)])
def test_joint_mode_gives_the_exact_sparsity_and_codes_within_range(sparsity, bits):
    w, _, h = layer_case()
    result = compress_layer(w, h, "sparsegpt", bits=bits, sparsity=sparsity, group_size=32)
    assert (~result.keep).sum() == sparsity * w.numel()
    assert (result.weight[~result.keep] == 0).all()
    assert result.codes.min() >= 0 and result.codes.max() <= 2**bits - 1
    assert set(result.codes.unique().tolist()) <= set(range(2**bits))
    stored = CompressedLinear.from_result(result, bits=bits, group_size=32, n_m=None, bias=None, dtype=torch.float32)
    assert torch.equal(stored.keep(), result.keep)
    torch.testing.assert_close(stored.weight, result.weight, rtol=0, atol=0)


@pytest.mark.parametrize("method, options", [
    ("gptq", dict(bits=3, group_size=32, act_order=True)),
    ("rtn", dict(bits=2, group_size=None)),
    ("sparsegpt", dict(bits=8, n_m=(4, 8), group_size=24)),
    ("wanda", dict(n_m=(2, 4))),
])
def test_stored_layer_decodes_to_the_compressed_weight(method, options):
    w, _, h = layer_case(rows=13, cols=48)
    result = compress_layer(w, h, method, **options)
    group_size = options.get("group_size") or 48
    stored = CompressedLinear.from_result(result, bits=options.get("bits"), group_size=group_size,
                                          n_m=options.get("n_m"), bias=None, dtype=torch.float32)
    want = result.weight if "bits" in options else result.weight.half().float()  # unquantized values are fp16
    assert torch.equal(stored.weight, want)


def test_weight_bytes_of_one_layer_match_a_hand_count():
    w, _, h = layer_case(rows=24, cols=64)
    result = compress_layer(w, h, "sparsegpt", bits=4, sparsity=0.5, group_size=32)
    layer = CompressedLinear.from_result(result, bits=4, group_size=32, n_m=None, bias=None, dtype=torch.float16)
    weights, groups = 24 * 64, 24 * 2
    hand = dict(codes=weights // 2 * 4 // 8,  # the 768 kept codes, 4 bits each
                scales=groups * 2,  # fp16
                zeros=groups * 4 // 8,  # 4 bits each
                mask=weights // 8)  # one bit a weight
    assert layer.stored_bytes() == hand
    counted = weight_bytes(nn.Sequential(layer))
    dense = 2 * weights
    assert counted["dense_fp16"] == dense
    assert counted["total"] == sum(hand.values()) == dense / 8 + dense / 16 + groups * 2.5  # 1/8, mask, scales
    assert counted["nominal"] == dense / 8 and counted["nominal_ratio"] == 8
    assert counted["ratio"] == dense / sum(hand.values())


def test_n_m_positions_are_stored_in_log2_m_bits_each():
    w, _, h = layer_case(rows=24, cols=64)
    for (n, m), position_bits in [((2, 4), 2), ((4, 8), 3)]:
        result = compress_layer(w, h, "sparsegpt", bits=3, n_m=(n, m), group_size=64)
        layer = CompressedLinear.from_result(result, bits=3, group_size=64, n_m=(n, m), bias=None,
                                             dtype=torch.float32)
        kept = 24 * 64 * n // m
        assert layer.stored_bytes() == dict(codes=kept * 3 // 8, scales=24 * 2, zeros=24 * 3 // 8,
                                            mask=kept * position_bits // 8)


def test_four_bits_and_half_sparsity_is_eight_times_nominally_on_a_model():
    model = tiny_llama()
    report = compress(model, "sparsegpt", token_ids(), bits=4, sparsity=0.5, group_size=32, progress=False)
    counted = report.bytes
    assert counted["nominal_ratio"] == 8
    weights = counted["dense_fp16"] / 2
    rows = sum(layer.layout["out_features"] for layer in model.modules() if isinstance(layer, CompressedLinear))
    groups = sum(math.ceil(layer.layout["in_features"] / 32) * layer.layout["out_features"]
                 for layer in model.modules() if isinstance(layer, CompressedLinear))
    assert rows == 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    assert counted["total"] == weights / 4 + weights / 8 + groups * 2.5


@pytest.mark.parametrize("case", [
    dict(method="gptq", bits=3, act_order=True),
    dict(method="rtn", bits=8, group_size=None),
    dict(method="sparsegpt", bits=4, n_m=(2, 4)),
    dict(method="wanda", sparsity=0.5),
])
def test_save_and_reload_gives_identical_logits(tmp_path, case):
    ids = token_ids()
    model = tiny_llama(seed=0, tie_word_embeddings=True)
    compress(model, calibration=ids, progress=False, **{"group_size": 16, **case})
    path = tmp_path / "compressed.safetensors"
    save_compressed(model, path)
    fresh = load_compressed(tiny_llama(seed=1, tie_word_embeddings=True), path)
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert weight_bytes(fresh) == weight_bytes(model)


def test_a_bf16_model_computes_in_bf16_and_a_later_cast_leaves_the_stored_bytes_alone():
    ids = token_ids()
    model = tiny_llama().to(torch.bfloat16)
    report = compress(model, "sparsegpt", ids, bits=4, sparsity=0.5, group_size=32, progress=False)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert model(ids).logits.dtype == torch.bfloat16
    model.float()
    assert weight_bytes(model) == report.bytes


@gpu
def test_compress_save_and_reload_on_a_gpu_in_fp16(tmp_path):
    ids = token_ids(samples=8, seqlen=64)
    model = tiny_llama().half().cuda()
    report = compress(model, "sparsegpt", ids, bits=4, sparsity=0.5, group_size=32, progress=False)
    assert report.bytes["nominal_ratio"] == 8 and max(report.layer_errors.values()) < 0.2
    save_compressed(model, tmp_path / "compressed.safetensors")
    fresh = load_compressed(tiny_llama(seed=1).half().cuda(), tmp_path / "compressed.safetensors")
    assert torch.equal(fresh(ids.cuda()).logits, model(ids.cuda()).logits)


def test_load_refuses_a_file_not_written_by_save_compressed(tmp_path):
    from safetensors.torch import save_model
    model = tiny_llama()
    save_model(model, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not written by save_compressed"):
        load_compressed(tiny_llama(), tmp_path / "plain.safetensors")


# --- the block-by-block driver ---------------------------------------------------------------------------------


def test_compress_feeds_each_layer_the_outputs_of_the_compressed_layers_before_it():
    """Every layer's result must be what the method gives on the inputs it sees in the final compressed model,
    which holds only if the calibration tokens went through the compressed blocks and layers before it."""
    ids = token_ids(samples=3, seqlen=24)
    model = tiny_llama()
    original = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    compress(model, "sparsegpt", ids, sparsity=0.5, progress=False)
    seen = {}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, CompressedLinear)}
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(args[0]))
             for name, m in layers.items()]
    for sample in ids:
        model(sample[None])
    for hook in hooks:
        hook.remove()
    assert len(layers) == 14
    for name, layer in layers.items():
        x = torch.cat(seen[name]).reshape(-1, layer.layout["in_features"])
        want = compress_layer(original[name], 2 * x.T @ x / len(x), "sparsegpt", sparsity=0.5)
        assert torch.equal(layer.keep(), want.keep), name
        torch.testing.assert_close(layer.weight, want.weight, rtol=2e-3, atol=2e-3)


def test_layers_reading_the_same_input_are_compressed_together_in_call_order():
    model = tiny_llama()
    block = model.model.layers[0]
    hidden = torch.randn(1, 8, 64)
    position = model.model.rotary_emb(hidden, torch.arange(8)[None])
    groups = same_input_groups(block, linear_layers(block),
                               lambda: run_block(block, hidden, (), dict(position_embeddings=position)))
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def tiny_opt():
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=96, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=64))


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64))


@pytest.mark.parametrize("build, layers_per_block", [(tiny_llama, 7), (tiny_opt, 6), (tiny_gpt2, 4)])
def test_compress_works_on_llama_opt_and_gpt2(build, layers_per_block):
    ids = token_ids()
    model = build().eval()
    before = model(ids).logits
    report = compress(model, "gptq", ids, bits=8, group_size=16, progress=False)
    assert len(report.layer_errors) == 2 * layers_per_block
    assert sum(isinstance(m, CompressedLinear) for m in model.modules()) == 2 * layers_per_block
    assert max(report.layer_errors.values()) < 1e-3
    after = model(ids).logits
    assert (after - before).norm() < 0.01 * before.norm()


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="obc", bits=4), r"method='obc' is not one of \('rtn', 'gptq', 'magnitude', 'wanda', 'sparsegpt'\)"),
    (dict(method="gptq", bits=5), r"bits=5 is not one of \(2, 3, 4, 8\)"),
    (dict(method="rtn"), r"method='rtn' quantizes: give bits"),
    (dict(method="gptq", bits=4, sparsity=0.5), r"method='gptq' does not prune"),
    (dict(method="wanda"), r"give one of sparsity or n_m"),
    (dict(method="wanda", sparsity=0.5, n_m=(2, 4)), r"give one of sparsity or n_m"),
    (dict(method="sparsegpt", sparsity=1.0), r"sparsity=1.0 is outside \[0, 1\)"),
    (dict(method="magnitude", sparsity=-0.1), r"sparsity=-0.1 is outside \[0, 1\)"),
    (dict(method="sparsegpt", n_m=(2, 3)), r"M=3 does not divide the input width 64 of block 0 self_attn.q_proj"),
    (dict(method="sparsegpt", n_m=(4, 4)), r"n_m=\(4, 4\) must be two integers N < M"),
    (dict(method="wanda", sparsity=0.5, act_order=True), r"act_order applies to gptq only"),
    (dict(method="gptq", bits=4, percdamp=0), r"percdamp=0 must be > 0"),
    (dict(method="gptq", bits=4, group_size=0), r"group_size=0 must be a positive"),
])
def test_bad_arguments_are_refused_before_any_layer_changes(kwargs, message):
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        compress(model, calibration=token_ids(samples=4), progress=False, **kwargs)
    assert not any(isinstance(m, CompressedLinear) for m in model.modules())


def test_calibration_must_be_a_matrix_of_token_ids():
    with pytest.raises(ValueError, match=r"calibration must be token ids of shape \(samples, seqlen\)"):
        compress(tiny_llama(), "gptq", torch.rand(4, 16), bits=4, progress=False)
    with pytest.raises(ValueError, match=r"calibration must be token ids"):
        compress(tiny_llama(), "gptq", token_ids()[0], bits=4, progress=False)
    with pytest.raises(ValueError, match=r"with one sample or more, got torch.int64 \(0, 16\)"):
        compress(tiny_llama(), "gptq", token_ids()[:0], bits=4, progress=False)
