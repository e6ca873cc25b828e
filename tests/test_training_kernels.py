"""The training fusions GPT-2 uses (LayerNorm, bias + GELU, linear + cross-entropy over the vocabulary) against
their plain PyTorch references, computed in float64: forward and gradients, odd sizes, ignored targets."""
import importlib
import inspect
import warnings

import pytest
import torch

from conftest import DEVICE, gpu
from effrepro_kernels import flash_attn, runtime
from effrepro_kernels.bias_gelu import bias_gelu
from effrepro_kernels.layer_norm import MAX_FEATURES, layer_norm
from effrepro_kernels.linear_cross_entropy import linear_cross_entropy
from effrepro_kernels.reference import bias_gelu_reference, layer_norm_reference, linear_cross_entropy_reference

DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])  # no bf16 interpreted
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# and ||ours - reference|| / ||reference|| at most this (float32 arithmetic lands far under 1e-3, 16-bit operands at
# 1e-3 to 1e-2): the absolute tolerance above never goes under TOL, so alone it barely checks a gradient of 1e-4
RELATIVE_TOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def random(*shape, dtype, seed, scale=1.0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(*shape, device=DEVICE, generator=gen) * scale).to(dtype).requires_grad_()


def outputs_and_grads(fn, inputs, grad_out=None):
    """fn's output and the gradients of its inputs, in float64 for comparing."""
    out = fn(*inputs)
    out.backward(grad_out if grad_out is not None else torch.ones_like(out))
    results = [out.detach().double()] + [x.grad.double() for x in inputs]
    for x in inputs:
        x.grad = None
    return results


def in_float64(inputs):
    return [x.detach().double().requires_grad_() for x in inputs]


def randomise(module):
    """Every LayerNorm in `module` given random parameters, in place: at their initial ones and zeros, a weight or a
    bias dropped gives the same output."""
    gen = torch.Generator().manual_seed(34)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                for p, centre in ((m.weight, 1.0), (m.bias, 0.0)):
                    if p is not None:
                        p.copy_(centre + 0.5 * torch.randn(p.shape, generator=gen))


def assert_close_all(ours, reference, dtype):
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype] * max(1.0, b.abs().max().item()))
        assert ((a - b).norm() / b.norm()).item() <= RELATIVE_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 72), (4, 768), (2, 1000)])  # 1000 and 72: not powers of two
def test_layer_norm_matches_reference(shape, dtype):
    x = random(*shape, dtype=dtype, seed=1, scale=3.0)
    weight, bias = random(shape[-1], dtype=dtype, seed=2), random(shape[-1], dtype=dtype, seed=3)
    grad_out = torch.randn(shape, device=DEVICE).to(dtype)
    ours = outputs_and_grads(layer_norm, [x, weight, bias], grad_out)
    reference = outputs_and_grads(layer_norm_reference, in_float64([x, weight, bias]), grad_out.double())
    assert_close_all(ours, reference, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("has_weight,has_bias", [(True, False), (False, True), (False, False)])
def test_layer_norm_without_a_weight_or_a_bias(has_weight, has_bias, dtype):
    x = random(5, 72, dtype=dtype, seed=27, scale=3.0)
    params = [random(72, dtype=dtype, seed=seed) for seed, present in ((28, has_weight), (29, has_bias)) if present]
    grad_out = torch.randn(5, 72, device=DEVICE).to(dtype)

    def called(norm):  # norm(x, weight or None, bias or None) of the params there are
        def call(x, *params):
            given = iter(params)
            return norm(x, next(given) if has_weight else None, next(given) if has_bias else None)
        return call
    ours = outputs_and_grads(called(layer_norm), [x, *params], grad_out)
    reference = outputs_and_grads(called(layer_norm_reference), in_float64([x, *params]), grad_out.double())
    assert_close_all(ours, reference, dtype)


@pytest.mark.parametrize("options", [dict(bias=False), dict(elementwise_affine=False)], ids=str)
def test_layer_norm_module_takes_torchs_options_without_a_bias_or_a_weight(options):
    from effrepro_kernels.layer_norm import LayerNorm

    ours, theirs = LayerNorm(72, **options).to(DEVICE), torch.nn.LayerNorm(72, **options).to(DEVICE)
    randomise(ours)  # not ones and zeros, which a dropped weight or bias gives too
    theirs.load_state_dict(ours.state_dict())
    x = random(5, 72, dtype=torch.float32, seed=30)
    torch.testing.assert_close(ours(x), theirs(x))


def test_layer_norm_of_rows_far_from_zero_mean():
    """Rows of mean 1000 and spread 3: a one-pass variance, E[x²] - mean², cancels there (a relative error of 2e-3
    in float32, against 5e-6 from the centred rows)."""
    x = (1000 + random(4, 768, dtype=torch.float32, seed=20, scale=3.0)).detach().requires_grad_()
    weight, bias = random(768, dtype=torch.float32, seed=2), random(768, dtype=torch.float32, seed=3)
    grad_out = torch.randn(4, 768, device=DEVICE)
    ours = outputs_and_grads(layer_norm, [x, weight, bias], grad_out)
    reference = outputs_and_grads(layer_norm_reference, in_float64([x, weight, bias]), grad_out.double())
    assert_close_all(ours, reference, torch.float32)


def test_layer_norm_writes_the_autocast_dtype_and_gives_gradients_in_the_inputs():
    """What autocast does to the next matmul's input, done by the kernel: the output rounded to the lower dtype,
    gradients in the input's float32 (here float16 by hand; autocast's bfloat16 has no interpreter)."""
    x, weight, bias = random(5, 72, dtype=torch.float32, seed=17), random(72, dtype=torch.float32, seed=18), \
        random(72, dtype=torch.float32, seed=19)
    grad_out = torch.randn(5, 72, device=DEVICE).half()
    ours = outputs_and_grads(lambda *a: layer_norm(*a, out_dtype=torch.float16), [x, weight, bias], grad_out)
    reference = outputs_and_grads(lambda *a: layer_norm_reference(*a).half(), in_float64([x, weight, bias]),
                                  grad_out)
    assert_close_all(ours, reference, torch.float16)
    y = layer_norm(x, weight, bias, out_dtype=torch.float16)
    y.backward(grad_out)
    assert y.dtype == torch.float16 and x.grad.dtype == weight.grad.dtype == torch.float32


def test_layer_norm_and_its_module_write_the_autocast_dtype_by_default_under_autocast():
    """No out_dtype given: autocast's dtype inside autocast (what the next matmul casts to), x's outside."""
    from effrepro_kernels.layer_norm import LayerNorm

    x = random(5, 72, dtype=torch.float32, seed=35)
    module = LayerNorm(72).to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.float16):
        inside = [layer_norm(x, module.weight, module.bias), module(x)]
    for y in inside:
        assert y.dtype == torch.float16
        torch.testing.assert_close(y, layer_norm(x, module.weight, module.bias, out_dtype=torch.float16))
    assert module(x).dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 300), (2, 3, 3072)])
def test_bias_gelu_matches_reference(shape, dtype):
    x, bias = random(*shape, dtype=dtype, seed=4, scale=2.0), random(shape[-1], dtype=dtype, seed=5)
    grad_out = torch.randn(shape, device=DEVICE).to(dtype)
    ours = outputs_and_grads(bias_gelu, [x, bias], grad_out)
    reference = outputs_and_grads(bias_gelu_reference, in_float64([x, bias]), grad_out.double())
    assert_close_all(ours, reference, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("upstream", [3.7, 2.0**16])  # 2^16: a GradScaler's default scale, inf in fp16
@pytest.mark.parametrize("tokens,vocab,chunk", [(37, 333, 10), (64, 1000, None), (5, 50, 5)])
def test_linear_cross_entropy_matches_reference(tokens, vocab, chunk, upstream, dtype):
    """Chunks that do not divide the tokens, vocabularies that are not a multiple of the kernel's block, ignored
    targets, which count neither in the loss nor in the mean, and the loss's gradient scaled (as by a GradScaler)."""
    h, weight = random(tokens, 48, dtype=dtype, seed=6), random(vocab, 48, dtype=dtype, seed=7, scale=0.3)
    targets = torch.randint(vocab, (tokens,), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(8))
    targets[::4] = -100
    grad_loss = torch.tensor(upstream, device=DEVICE)
    ours = outputs_and_grads(lambda h, w: linear_cross_entropy(h, w, targets, chunk_rows=chunk), [h, weight],
                             grad_loss)
    reference = outputs_and_grads(lambda h, w: linear_cross_entropy_reference(h, w, targets), in_float64([h, weight]),
                                  grad_loss.double())
    assert_close_all(ours, reference, dtype)


def test_linear_cross_entropy_keeps_the_small_gradients_of_fp16():
    """The weight gradient of the words no token targets, softmax/count summed over tokens: each term was rounded to
    fp16 before being scaled up, so at 64 tokens of 4000 words most were subnormal (relative error 4e-3), and at
    GPT-2's 16K tokens of 50257 most were 0. Scaled by 2^10 as a GradScaler would, so the fp16 result is normal."""
    h, weight = random(64, 32, dtype=torch.float16, seed=24), random(4000, 32, dtype=torch.float16, seed=25, scale=0.05)
    targets = torch.randint(4000, (64,), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(26))
    grad_loss = torch.tensor(2.0**10, device=DEVICE)
    _, _, ours = outputs_and_grads(lambda h, w: linear_cross_entropy(h, w, targets), [h, weight], grad_loss)
    _, _, reference = outputs_and_grads(lambda h, w: linear_cross_entropy_reference(h, w, targets),
                                        in_float64([h, weight]), grad_loss.double())
    untargeted = torch.ones(4000, dtype=torch.bool, device=DEVICE)
    untargeted[targets] = False
    ours, reference = ours[untargeted], reference[untargeted]
    assert ((ours - reference).norm() / reference.norm()).item() <= RELATIVE_TOL[torch.float16]


def test_linear_cross_entropy_of_no_target_is_nan_as_in_torch():
    h, weight = random(6, 16, dtype=torch.float32, seed=9), random(40, 16, dtype=torch.float32, seed=10)
    none = torch.full((6,), -100, device=DEVICE)
    assert linear_cross_entropy(h, weight, none).isnan() and linear_cross_entropy_reference(h, weight, none).isnan()


@gpu
def test_linear_cross_entropy_under_autocast_matches_the_unfused_head():
    """bf16 matmuls under autocast, as the unfused head of a model trained with autocast computes them."""
    h, weight = random(300, 256, dtype=torch.float32, seed=11), random(5000, 256, dtype=torch.float32, seed=12)
    targets = torch.randint(5000, (300,), device=DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = outputs_and_grads(lambda h, w: linear_cross_entropy(h, w, targets, chunk_rows=128), [h, weight])
        unfused = outputs_and_grads(lambda h, w: linear_cross_entropy_reference(h, w, targets).float(), [h, weight])
    assert_close_all(ours, unfused, torch.bfloat16)


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the check is a device-side assert, which (as F.cross_entropy's "
                    "own) leaves the process unable to use the GPU: the CPU shows the same check")
def test_a_target_outside_the_vocabulary_is_an_error_not_a_read_out_of_bounds():
    h, weight = random(4, 16, dtype=torch.float32, seed=9), random(10, 16, dtype=torch.float32, seed=10)
    for bad in (10, -3):
        targets = torch.tensor([1, bad, 2, -100], device=DEVICE)
        with pytest.raises(RuntimeError, match=r"a target is outside \[0, 10\) and is not ignore_index=-100"):
            linear_cross_entropy(h, weight, targets)


def test_linear_cross_entropy_without_gradients_computes_the_loss_alone(monkeypatch):
    """Evaluation (torch.no_grad, or inputs that need no gradient) pays for no gradient buffers or matmuls."""
    module = importlib.import_module("effrepro_kernels.linear_cross_entropy")  # the package's name is the function
    outputs, operator = [], module._linear_cross_entropy_function

    def recorded(*inputs):
        outputs.append(operator(*inputs))
        return outputs[-1]
    monkeypatch.setattr(module, "_linear_cross_entropy_function", recorded)
    h, weight = random(37, 48, dtype=torch.float16, seed=6), random(333, 48, dtype=torch.float16, seed=7, scale=0.3)
    targets = torch.randint(333, (37,), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(8))
    trained = linear_cross_entropy(h, weight, targets, chunk_rows=10)
    with torch.no_grad():
        evaluated = linear_cross_entropy(h, weight, targets, chunk_rows=10)
    frozen = linear_cross_entropy(h.detach(), weight.detach(), targets, chunk_rows=10)
    assert trained.item() == evaluated.item() == frozen.item()
    assert [(grad_h.numel(), grad_w.numel()) for _, grad_h, grad_w, _ in outputs] == [(37 * 48, 333 * 48), (0, 0),
                                                                                       (0, 0)]


@pytest.mark.parametrize("ignore_index", [10, 12, -1])
def test_linear_cross_entropy_ignore_index_may_be_outside_the_vocabulary(ignore_index):
    """As F.cross_entropy takes it: an ignored target is never read, wherever it points."""
    h, weight = random(4, 16, dtype=torch.float32, seed=9), random(10, 16, dtype=torch.float32, seed=10)
    targets = torch.tensor([1, ignore_index, 2, 9], device=DEVICE)
    ours = outputs_and_grads(lambda h, w: linear_cross_entropy(h, w, targets, ignore_index), [h, weight])
    reference = outputs_and_grads(lambda h, w: linear_cross_entropy_reference(h, w, targets, ignore_index),
                                  in_float64([h, weight]))
    assert_close_all(ours, reference, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weights_and_biases_that_are_views_with_a_stride_are_read_as_their_values(dtype):
    """A parameter sliced from a packed one: the kernels read dense vectors."""
    x = random(5, 40, dtype=dtype, seed=13).detach()
    packed = random(40, 3, dtype=dtype, seed=14)  # weight and bias in columns 0 and 1
    grad_out = torch.randn(5, 40, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(15))
    for ours, reference in ((lambda p: layer_norm(x, p[:, 0], p[:, 1]),
                             lambda p: layer_norm_reference(x.double(), p[:, 0], p[:, 1])),
                            (lambda p: bias_gelu(x, p[:, 1]), lambda p: bias_gelu_reference(x.double(), p[:, 1]))):
        assert_close_all(outputs_and_grads(ours, [packed], grad_out.to(dtype)),
                         outputs_and_grads(reference, in_float64([packed]), grad_out.double()), dtype)


@pytest.mark.parametrize("call,message", [
    (lambda: layer_norm(torch.ones(2, 4, dtype=torch.int32), torch.ones(4), torch.ones(4)), "not x of torch.int32"),
    (lambda: layer_norm(torch.ones(2, MAX_FEATURES + 1), torch.ones(MAX_FEATURES + 1), torch.ones(MAX_FEATURES + 1)),
     f"up to {MAX_FEATURES} features"),
    (lambda: layer_norm(torch.ones(3, 0), None, None), "of 1 up to .*x of shape \\(3, 0\\)"),
    (lambda: layer_norm(torch.tensor(1.0), None, None), "x of shape \\(\\)"),
    *[(lambda bad=bad: layer_norm(torch.ones(2, 4), None, None, out_dtype=bad), f"not out_dtype={bad}")
      for bad in (torch.int8, torch.bool, torch.float64)],
    (lambda: layer_norm(torch.ones(2, 4), torch.ones(5), torch.ones(5)), "weight of shape \\(5,\\)"),
    (lambda: layer_norm(torch.ones(2, 4), torch.ones(4), torch.ones(3)), "bias of shape \\(3,\\)"),
    (lambda: layer_norm(torch.ones(2, 4), torch.ones(4, dtype=torch.int64), torch.ones(4)),
     "not weight of torch.int64"),
    (lambda: layer_norm(torch.ones(2, 4), None, torch.ones(4, dtype=torch.bool)), "not bias of torch.bool"),
    (lambda: bias_gelu(torch.ones(2, 4), torch.ones(3)), "bias torch.float32 \\(3,\\)"),
    (lambda: bias_gelu(torch.ones(2, 4), torch.ones(4, dtype=torch.int32)), "bias torch.int32 \\(4,\\)"),
    (lambda: bias_gelu(torch.tensor(1.0), torch.tensor(1.0)), "got x torch.float32 \\(\\), bias torch.float32 \\(\\)"),
    (lambda: bias_gelu(torch.ones(3, 0), torch.ones(0)), "got x torch.float32 \\(3, 0\\)"),
    (lambda: linear_cross_entropy(torch.ones(2, 4), torch.ones(9, 4), torch.zeros(2)),
     "targets of torch.int64 or torch.int32 \\(class indices\\), not torch.float32"),
    (lambda: linear_cross_entropy(torch.ones(2, 4), torch.ones(9, 5), torch.zeros(2, dtype=torch.long)),
     "got \\(2, 4\\), \\(9, 5\\)"),
    (lambda: linear_cross_entropy(torch.ones(2, 4, dtype=torch.float64), torch.ones(9, 4, dtype=torch.float64),
                                  torch.zeros(2, dtype=torch.long)), "not torch.float64"),
    (lambda: linear_cross_entropy(torch.ones(2, 4, dtype=torch.float16), torch.ones(9, 4),
                                  torch.zeros(2, dtype=torch.long)), "torch.float16 and torch.float32"),
    *[(lambda bad=bad: linear_cross_entropy(torch.ones(2, 4), torch.ones(9, 4), torch.zeros(2, dtype=torch.long),
                                            chunk_rows=bad), f"chunk_rows={bad!r}") for bad in (0, -2, 2.5, True)],
])
def test_bad_input_names_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# each kernel's wrapper given tensors made by make(name, *shape, dtype=...)
CALLS = {
    "layer_norm": lambda make: layer_norm(make("x", 2, 4), make("weight", 4), make("bias", 4)),
    "bias_gelu": lambda make: bias_gelu(make("x", 2, 4), make("bias", 4)),
    "linear_cross_entropy": lambda make: linear_cross_entropy(make("h", 2, 4), make("weight", 9, 4),
                                                              make("targets", 2, dtype=torch.int64)),
}


@pytest.mark.parametrize("op,elsewhere", [("layer_norm", "bias"), ("bias_gelu", "bias"),
                                          ("linear_cross_entropy", "weight"), ("linear_cross_entropy", "targets")])
def test_tensors_on_two_devices_or_where_the_kernels_do_not_run_are_named(op, elsewhere, monkeypatch):
    """Triton would fail deep inside the launch ("0 active drivers"), or read one device's pointer on another."""
    def on(device, meta_one=None):
        def make(name, *shape, dtype=torch.float32):
            return torch.ones(*shape, dtype=dtype, device="meta" if name == meta_one else device)
        return make

    with pytest.raises(ValueError, match=f"{op} takes its tensors on one device; got .*{elsewhere} on meta"):
        CALLS[op](on(DEVICE, elsewhere))
    monkeypatch.setattr(runtime, "INTERPRET", False)  # as on a machine without the interpreter
    with pytest.raises(ValueError, match=f"{op} runs on CUDA devices .*; got tensors on cpu"):
        CALLS[op](on("cpu"))


def test_fused_gpt2_gives_transformers_loss_and_gradients_with_the_same_parameters():
    import copy

    from transformers import GPT2Config, GPT2LMHeadModel

    from effrepro_kernels.hf_attention import register
    from effrepro_kernels.hf_gpt2 import FusedMLP, PackedSelfAttention, fuse_gpt2, pack_attention
    from effrepro_kernels.layer_norm import LayerNorm

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_positions=32, n_embd=64, n_layer=1, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    assert not any(isinstance(m, PackedSelfAttention) for m in fuse_gpt2(GPT2LMHeadModel(config)).modules())  # sdpa
    with pytest.raises(ValueError, match="attn_implementation='effrepro'"):
        pack_attention(GPT2LMHeadModel(config))
    model = GPT2LMHeadModel(config).to(DEVICE)
    randomise(model)
    model.set_attn_implementation(register())  # our attention: packed in training
    fused = fuse_gpt2(copy.deepcopy(model))
    modules = list(fused.modules())
    assert sum(isinstance(m, LayerNorm) for m in modules) == 3 and sum(isinstance(m, FusedMLP) for m in modules) == 1
    assert sum(isinstance(m, PackedSelfAttention) for m in modules) == 1
    assert [n for n, _ in fused.named_parameters()] == [f"model.{n}" for n, _ in model.named_parameters()]
    x = torch.randint(300, (2, 16), device=DEVICE)
    labels = x.clone()
    labels[0, :5] = -100
    ours = fused(x, labels=labels).loss
    theirs = model(x, labels=labels).loss
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(fused.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(fused(x).logits, model(x).logits)  # without labels: the model's own forward
    with pytest.raises(ValueError, match="'gelu'"):
        fuse_gpt2(GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=1, activation_function="gelu")))


def test_packed_attention_in_training_fills_a_kv_cache_and_goes_on_from_one():
    """In training transformers gives every layer a KV cache (use_cache defaults to on): the packed attention fills
    it, and a cache that holds a prefix is attended to, as by transformers' module (dropout off: the same logits)."""
    from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

    from effrepro_kernels.hf_attention import register
    from effrepro_kernels.hf_gpt2 import pack_attention

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_positions=32, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).to(DEVICE)
    model.set_attn_implementation(register())
    model = pack_attention(model).train()
    x = torch.randint(97, (2, 12), device=DEVICE)
    full = model(x).logits
    cache = DynamicCache()
    # past_key_values, which transformers 5.25 deprecates for cache
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    prefix = model(x[:, :8], **{name: cache}, use_cache=True).logits
    assert cache.get_seq_length() == 8
    rest = model(x[:, 8:], **{name: cache}, use_cache=True).logits
    assert cache.get_seq_length() == 12
    torch.testing.assert_close(torch.cat([prefix, rest], dim=1), full, rtol=1e-4, atol=1e-5)


def test_packed_attention_in_training_hands_the_kernel_the_models_attention_dropout_and_scale(monkeypatch):
    """GPT-2's attn_pdrop and each layer's own scaling (here by the inverse of its number) reach
    flash_attn_qkvpacked: the tests above run without dropout, at 1/sqrt(head_dim) (the kernel's default), so they
    would pass were either dropped."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from effrepro_kernels import hf_gpt2
    from effrepro_kernels.hf_attention import register

    seen, kernel = [], hf_gpt2.flash_attn_qkvpacked
    monkeypatch.setattr(hf_gpt2, "flash_attn_qkvpacked",
                        lambda *a, **k: seen.append((k["dropout_p"], k["softmax_scale"])) or kernel(*a, **k))
    config = GPT2Config(vocab_size=97, n_positions=32, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.3, scale_attn_by_inverse_layer_idx=True)
    model = GPT2LMHeadModel(config).to(DEVICE)
    model.set_attn_implementation(register())
    hf_gpt2.pack_attention(model).train()(torch.randint(97, (2, 12), device=DEVICE))
    assert seen == [(0.3, 32 ** -0.5), (0.3, 32 ** -0.5 / 2)]


def test_the_kernels_are_pytorch_operators_that_torch_compile_traces_without_a_graph_break():
    """Registered with torch.library: schema and fake (shapes-only) versions pass PyTorch's own checks, and a
    compiled function calling all three, forward and backward (their autograd.Functions), is one graph."""
    x, weight, bias = random(6, 40, dtype=torch.float32, seed=13), random(40, dtype=torch.float32, seed=14), \
        random(40, dtype=torch.float32, seed=15)
    head, targets = random(50, 40, dtype=torch.float32, seed=16), torch.randint(50, (6,), device=DEVICE)
    checks = ("test_schema", "test_faketensor")
    transposed = random(40, 6, dtype=torch.float32, seed=17).T  # dense, not contiguous: outputs are contiguous
    for rows in (x, transposed):
        for params in ((weight, bias), (None, None)):
            torch.library.opcheck(torch.ops.effrepro.layer_norm.default, (rows, *params, 1e-5, torch.float16),
                                  test_utils=checks)
        torch.library.opcheck(torch.ops.effrepro.bias_gelu.default, (rows, bias), test_utils=checks)
    dy = random(6, 40, dtype=torch.float32, seed=18)
    torch.library.opcheck(torch.ops.effrepro.bias_gelu_backward.default, (dy, transposed, bias), test_utils=checks)
    for weight_layout in (head, random(40, 50, dtype=torch.float32, seed=19).T):  # the gradient is contiguous
        for gradients in (True, False):
            torch.library.opcheck(torch.ops.effrepro.linear_cross_entropy.default,
                                  (x, weight_layout, targets, -100, 4, gradients), test_utils=checks)

    def loss(x, weight, bias, head):
        return linear_cross_entropy(bias_gelu(layer_norm(x, weight, bias), bias), head, targets)

    def loss_in_half(*inputs):  # inside compiled graphs operators run with autocast off: the wrappers cast
        with torch.autocast(DEVICE, dtype=torch.float16):
            return loss(*inputs)

    inputs = (x, weight, bias, head)
    for fn in (loss, loss_in_half):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break is an error
        for got, want in zip(torch.autograd.grad(compiled(*inputs), inputs), torch.autograd.grad(fn(*inputs), inputs)):
            torch.testing.assert_close(got, want)
        with torch.no_grad():  # the loss alone, through the operator's fake without gradients
            torch.testing.assert_close(compiled(*inputs), fn(*inputs))


def test_a_dispatch_mode_or_a_jit_trace_sees_the_operators_not_their_launches():
    """make_fx in real mode (as selective checkpointing and DebugMode, a TorchDispatchMode over plain tensors) and
    torch.jit.trace record each kernel as its operator; given the implementation they met Triton's raw launches and
    failed."""
    from torch.fx.experimental.proxy_tensor import make_fx

    assert hasattr(torch._C, "_len_torch_dispatch_stack")  # else every eager call takes the slower operator
    x, weight, bias = random(6, 40, dtype=torch.float32, seed=24), random(40, dtype=torch.float32, seed=25), \
        random(40, dtype=torch.float32, seed=26)

    def gradients(x, weight, bias):
        return torch.autograd.grad(bias_gelu(layer_norm(x, weight, bias), bias).sum(), (x, weight, bias))
    graph = make_fx(gradients, tracing_mode="real")(x, weight, bias)
    targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert {f"effrepro.{op}.default" for op in ("layer_norm", "bias_gelu", "layer_norm_backward",
                                                 "bias_gelu_backward")} <= targets
    for got, want in zip(graph(x, weight, bias), gradients(x, weight, bias), strict=True):
        torch.testing.assert_close(got, want)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the traced wrapper's Python checks
        traced = torch.jit.trace(lambda x, w, b: layer_norm(x, w, b), (x, weight, bias))
        other = 2 * x + 1  # a traced graph given other values computes them
        torch.testing.assert_close(traced(other, weight, bias), layer_norm(other, weight, bias))


@pytest.mark.parametrize("selective", [False, True], ids=["checkpoint", "selective"])
def test_the_kernels_run_under_activation_checkpointing(selective):
    """Non-reentrant checkpointing, plain and selective (whose policy sees the operators): the gradients of the
    unchecked call."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    x, weight, bias = random(6, 40, dtype=torch.float32, seed=31), random(40, dtype=torch.float32, seed=32), \
        random(40, dtype=torch.float32, seed=33)
    seen = []

    def policy(ctx, op, *args, **kwargs):
        seen.append(str(op))
        return CheckpointPolicy.PREFER_RECOMPUTE
    options = dict(context_fn=functools.partial(create_selective_checkpoint_contexts, policy)) if selective else {}

    def block(x):
        return bias_gelu(layer_norm(x, weight, bias), bias)
    want = torch.autograd.grad(block(x).sum(), (x, weight, bias))
    got = torch.autograd.grad(checkpoint(block, x, use_reentrant=False, **options).sum(), (x, weight, bias))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert not selective or {"effrepro.layer_norm.default", "effrepro.bias_gelu.default"} <= set(seen)


def test_a_second_derivative_is_an_error_never_a_silent_zero():
    """The kernels' backwards have no derivative of their own: a gradient penalty through them must fail loudly."""
    x = random(4, 40, dtype=torch.float32, seed=21).requires_grad_()
    weight, bias = random(40, dtype=torch.float32, seed=22), random(40, dtype=torch.float32, seed=23)
    for norm in (layer_norm, lambda *a: torch.ops.effrepro.layer_norm.default(*a, 1e-5, torch.float32)[0]):
        (grad,) = torch.autograd.grad(norm(x, weight, bias).square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):  # the operator itself as the function
            grad.square().sum().backward()


def test_shapes_alone_go_through_the_operators():
    """Meta tensors (shape inference, FLOP counters) take the operator's fake version, not the kernel."""
    from effrepro_kernels.layer_norm import LayerNorm

    q = torch.empty(2, 4, 24, 32, device="meta", dtype=torch.float16)
    out = flash_attn(q, q, q, causal=True)
    assert out.is_meta and out.shape == q.shape
    x, vector = torch.empty(3, 5, 40, device="meta"), torch.empty(40, device="meta")
    for out in (layer_norm(x, vector, vector), bias_gelu(x, vector), LayerNorm(40, device="meta")(x)):
        assert out.is_meta and out.shape == x.shape and out.dtype == x.dtype
