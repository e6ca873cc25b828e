"""Our kernel inside transformers models: logits and gradients against `eager`, with causal and padding masks."""
import pytest
import torch

from conftest import DEVICE
from effrepro_kernels.hf_attention import NAME, register


def build(kind: str, implementation: str, attention_dropout: float = 0.0, **config_options):
    """As a user builds one: `attn_implementation=` at construction (which also checks the name). Without dropout
    unless `attention_dropout` (the attention's alone), so that in training mode too ours and eager give the same
    numbers; `config_options` for the kind's config."""
    from transformers import AutoModel, AutoModelForCausalLM, BertConfig, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=97, n_positions=64, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=attention_dropout, **config_options)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    elif kind == "bert":
        config = BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=64, intermediate_size=128,
                            vocab_size=97, max_position_embeddings=64, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=attention_dropout, **config_options)
        model = AutoModel.from_config(config, attn_implementation=implementation, add_pooling_layer=False)
    else:
        config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=128,
                             intermediate_size=128, vocab_size=97, max_position_embeddings=64,
                             attention_dropout=attention_dropout, **config_options)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    assert model.config._attn_implementation == implementation
    return model.to(DEVICE).eval()


def outputs(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask)
    hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
    real = mask.bool()
    loss = hidden[real].square().mean()
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    return hidden[real], grads


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_matches_eager_with_padding(kind, side, training):
    """Padding on either side (under a causal mask, left padding leaves rows that see no key), in eval and in
    training mode (where models hand the attention their dropout, here 0)."""
    register()
    ids = torch.randint(0, 97, (2, 21), device=DEVICE)
    mask = torch.ones(2, 21, dtype=torch.long, device=DEVICE)
    mask[1, slice(15, None) if side == "right" else slice(None, 6)] = 0  # the second sequence is padded
    ours, ours_grads = outputs(build(kind, NAME).train(training), ids, mask)
    ref, ref_grads = outputs(build(kind, "eager").train(training), ids, mask)
    torch.testing.assert_close(ours, ref, rtol=2e-3, atol=2e-3)
    for a, b in zip(ours_grads, ref_grads):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=5e-3, atol=5e-4)


def test_a_models_own_softmax_scale_is_the_kernels():
    """GPT-2 unscaled (scale_attn_weights=False) and scaled by the inverse of the layer's number hands the attention
    scalings of 1 and 1/2; every model above scales by 1/sqrt(head_dim), the kernel's default, so they would pass
    were `scaling` dropped."""
    register()
    ids = torch.randint(0, 97, (2, 21), device=DEVICE)
    mask = torch.ones(2, 21, dtype=torch.long, device=DEVICE)
    mask[1, :6] = 0
    options = dict(scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True)
    (ours, ours_grads), (ref, ref_grads) = (outputs(build("gpt2", implementation, **options), ids, mask)
                                            for implementation in (NAME, "eager"))
    torch.testing.assert_close(ours, ref, rtol=2e-3, atol=2e-3)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=5e-3, atol=5e-4)


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_a_models_attention_dropout_reaches_the_kernel_in_training_and_none_in_eval(kind, monkeypatch):
    """transformers hands the attention its dropout probability in training and 0 in eval; the comparisons above run
    without dropout, so they would pass were it dropped on the way to the kernel."""
    from effrepro_kernels import hf_attention

    seen, kernel = [], hf_attention.flash_attn
    monkeypatch.setattr(hf_attention, "flash_attn", lambda *a, **k: seen.append(k["dropout_p"]) or kernel(*a, **k))
    register()
    model = build(kind, NAME, attention_dropout=0.3)
    ids = torch.randint(0, 97, (2, 21), device=DEVICE)
    for training, expected in ((True, 0.3), (False, 0.0)):
        seen.clear()
        model.train(training)(input_ids=ids)
        assert seen == [expected] * 2, (training, seen)  # each of the two layers


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generation_with_a_kv_cache_matches_eager(kind):
    """Batched greedy generation, left-padded: the prompt's causal and padding mask, then one query a step over the
    cache's keys, padding included."""
    register()
    ids = torch.randint(1, 97, (2, 9), device=DEVICE)
    mask = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    mask[1, :4] = 0
    generated = [build(kind, implementation).generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=True,
        return_dict_in_generate=True, output_scores=True) for implementation in (NAME, "eager")]
    ours, ref = generated
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def test_an_unsupported_mask_pattern_is_an_error():
    from effrepro_kernels.hf_attention import key_padding_mask_of

    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    mask[0, 0, 5, 0] = False  # a sliding window, which the kernel does not do
    with pytest.raises(ValueError, match="causal and key-padding"):
        key_padding_mask_of(mask, causal=True)
    assert key_padding_mask_of(torch.ones(1, 1, 6, 6, dtype=torch.bool).tril(), causal=True) is None


def test_a_mask_is_checked_in_blocks_of_rows_and_read_once_for_all_layers(monkeypatch):
    from effrepro_kernels import hf_attention

    monkeypatch.setattr(hf_attention, "CHECK_BYTES", 2 * 9)  # blocks of one row of 2 x 9 keys
    mask = torch.ones(2, 1, 7, 9, dtype=torch.bool).tril(2)
    mask[1, ..., 7:] = False  # the second sequence's last two keys are padding
    keys = hf_attention.key_padding_mask_of(mask, causal=True)
    assert keys.tolist() == [[True] * 9, [True] * 7 + [False] * 2]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "stack", lambda *a, **k: pytest.fail("the same mask was read again"))
        assert hf_attention.key_padding_mask_of(mask, causal=True) is keys  # the next layer's call
    mask[0, 0, 6, 0] = False  # changed in place (the last row, the last block): read again, and refused
    with pytest.raises(ValueError, match="causal and key-padding"):
        hf_attention.key_padding_mask_of(mask, causal=True)
    with torch.inference_mode():  # inference tensors keep no version counter: read every time
        inference_mask = torch.ones(2, 1, 7, 9, dtype=torch.bool).tril(2)
        assert hf_attention.key_padding_mask_of(inference_mask, causal=True) is None
        assert hf_attention.key_padding_mask_of(inference_mask, causal=True) is None


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_without_padding_no_mask_is_read_and_the_model_compiles_as_one_graph(kind, monkeypatch):
    # as torch < 2.14 answers inside torch.compile, which makes transformers build the sdpa mask (older
    # transformers build it under compile anyway, and lack the name)
    monkeypatch.setattr("transformers.masking_utils.is_torchdynamo_exporting", lambda: True, raising=False)
    register()
    ids = torch.randint(0, 97, (2, 21), device=DEVICE)
    compiled = torch.compile(build(kind, NAME), fullgraph=True, backend="eager")  # a graph break is an error
    ours, ref = compiled(input_ids=ids), build(kind, "eager")(input_ids=ids)
    for name in ("logits", "last_hidden_state"):
        if hasattr(ref, name):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_a_padded_batch_gives_the_kernel_its_padding_mask_without_a_dense_mask_or_a_device_read(kind, side,
                                                                                                monkeypatch):
    """A causal and a bidirectional model over an odd length, one sequence padded: no (batch, 1, q, k) mask is
    built (transformers' sdpa_mask is never called) and nothing is read back from the device (a read breaks the
    compiled graph, an error with fullgraph); eager's and sdpa's results at every real position."""
    register()
    ids = torch.randint(0, 97, (3, 21), device=DEVICE)
    mask = torch.ones(3, 21, dtype=torch.long, device=DEVICE)
    mask[1, slice(15, None) if side == "right" else slice(None, 6)] = 0
    mask[2, slice(20, None) if side == "right" else slice(None, 1)] = 0
    real = mask.bool()

    def hidden(model):
        out = model(input_ids=ids, attention_mask=mask)
        return (out.logits if hasattr(out, "logits") else out.last_hidden_state)[real]
    refs = {implementation: hidden(build(kind, implementation)) for implementation in ("eager", "sdpa")}
    monkeypatch.setattr("transformers.masking_utils.sdpa_mask", lambda *a, **k: pytest.fail("a dense mask was built"))
    ours = hidden(torch.compile(build(kind, NAME), fullgraph=True, backend="eager"))
    for ref in refs.values():
        torch.testing.assert_close(ours, ref, rtol=2e-3, atol=2e-3)


def qkv(seq: int = 5):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    return [torch.randn(2, 2, seq, 16, device=DEVICE, generator=gen) for _ in range(3)]


@pytest.mark.parametrize("name,given", [("softcap", 50.0), ("s_aux", torch.zeros(2)), ("sinks", torch.zeros(2)),
                                        ("position_bias", torch.zeros(1, 2, 5, 5)), ("indices", torch.zeros(2, 5))])
def test_arguments_that_change_the_attention_are_refused_by_name(name, given):
    """Gemma 2's logit softcap, gpt-oss's attention sinks, T5's position bias, sparse indices: dropped, the model
    would run and give another result (transformers' sdpa refuses the softcap alone)."""
    from effrepro_kernels.hf_attention import attention_forward

    with pytest.raises(ValueError, match=f"does not support {name}="):
        attention_forward(torch.nn.Module(), *qkv(), None, **{name: given})


def test_attention_weights_asked_for_are_refused():
    """The kernel computes no weights: a model asked for them gets an error, not a tuple of Nones."""
    register()
    ids = torch.randint(0, 97, (2, 9), device=DEVICE)
    with pytest.raises(ValueError, match="output_attentions=True"):
        build("llama", NAME)(input_ids=ids, output_attentions=True)


def test_arguments_that_leave_the_attention_as_it_is_are_taken_and_a_module_is_causal_unless_it_says_not():
    """What models pass every layer (positions, cache settings, the window the mask carries), features off (None,
    False), and no `is_causal` on the module: the result transformers' sdpa gives."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from effrepro_kernels.hf_attention import attention_forward

    q, k, v = qkv()
    module = torch.nn.Module()
    harmless = dict(position_ids=torch.arange(5)[None], use_cache=True, sliding_window=4096, deterministic=True,
                    softcap=None, s_aux=None, output_attentions=False)
    ours, weights = attention_forward(module, q, k, v, None, **harmless)
    assert torch.equal(ours, attention_forward(module, q, k, v, None)[0]) and weights is None  # ignored, all of them
    # fp32 on a GPU: the kernel's products are TF32, as the tolerance of this file's other tests allows
    torch.testing.assert_close(ours, sdpa_attention_forward(module, q, k, v, None)[0], rtol=2e-3, atol=2e-3)
    module.is_causal = False
    torch.testing.assert_close(attention_forward(module, q, k, v, None)[0],
                               sdpa_attention_forward(module, q, k, v, None)[0], rtol=2e-3, atol=2e-3)
