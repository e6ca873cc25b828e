"""Scissorhands and the other KV-cache policies: each rule against a plain reference on random attention, the
simulation against a plain forward pass, simulation against real eviction during decoding (the same NLL), the
cache's budget and bytes, 4-bit KV, bad input. Generation runs our Triton kernels (in the interpreter on a CPU,
where each decoding step takes a good part of a second): texts of 10 to 14 tokens."""
import functools

import pytest
import torch

from conftest import DEVICE, has_gpu
from effrepro_kernels.kv_quant import dequantize_kv
from effrepro_kernels.reference import decode_scores_reference
from tasks.scissorhands.generate import (REFERENCE, EvictingCache, LayerCache, QuantizedStore, compaction_order,
                                         decode_nll, decode_step, generating)
from tasks.scissorhands.policies import (H2O, TOVA, Full, Scissorhands, ScissorhandsReleased, StreamingLLM,
                                         layer_budgets, make_policy, policy_at_budget)
from tasks.scissorhands.simulate import persistence_ratio, simulate, simulated_nll, simulating

SCHEDULE = "lean" if has_gpu() else "fa2"  # fa2 launches the fewest programs: the fastest in the interpreter


# --- the rules, on random attention, against plain Python -------------------------------------------------------

def run_rule(policy, steps, batch=2, heads=4, kv_heads=2, layer=0, n_layers=1, seed=0):
    """Drive `policy` as a cache would, with random probabilities over the held tokens. Returns the rows of
    probabilities observed and, per step, the held positions of each (batch, KV head) after making room."""
    gen = torch.Generator().manual_seed(seed)
    stats = policy.init_stats(batch, heads, steps, "cpu")
    held = torch.zeros(batch, kv_heads, steps, dtype=torch.bool)
    positions = torch.arange(steps).expand(batch, kv_heads, steps)
    rows, kept = [], []
    for t in range(steps):
        drop = policy.drops(stats, held, positions, t, layer, n_layers)
        if drop is not None:
            held &= ~drop
        kept.append([[set(torch.nonzero(held[b, k]).flatten().tolist()) for k in range(kv_heads)]
                     for b in range(batch)])
        held[:, :, t] = True
        visible = held.repeat_interleave(heads // kv_heads, 1)
        scores = torch.randn(batch, heads, steps, generator=gen) * 2
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        rows.append(probs)
        policy.observe(stats, probs, visible, t)
    return rows, kept


def reference_drops(policy, rows, held, t, b, kv, group):
    """The tokens a head should drop before step t, from the rules as the papers state them."""
    heads = range(kv * group, (kv + 1) * group)
    candidates = sorted(held)

    def pivotal(s, h, j):
        visible = [p for p in rows[s][b, h].tolist() if p > 0]
        if getattr(policy, "threshold", "1/t") == "1/t":
            threshold = 1 / len(visible)
        else:
            threshold = sorted(visible)[int(0.9 * len(visible))]
        return rows[s][b, h, j].item() > threshold

    if isinstance(policy, ScissorhandsReleased):
        if t < policy.start:
            return set()
        window = range(max(0, t - policy.window), t)
        return {j for j in candidates if j < t - policy.recent
                and not any(pivotal(s, h, j) for s in window for h in heads)}
    if len(held) < policy.budget:
        return set()
    if isinstance(policy, Scissorhands):
        window = range(max(0, t - policy.window), t)
        if policy.score == "pivotal":
            score = {j: sum(pivotal(s, h, j) for s in window for h in heads) for j in candidates}
        else:  # the most often not pivotal, for the queries of the window that saw the token (its own, later ones)
            score = {j: -sum(not pivotal(s, h, j) for s in window if s >= j for h in heads) for j in candidates}
        protected, amount = policy.recent, policy.budget // 2
    elif isinstance(policy, H2O):
        score = {j: sum(rows[s][b, h, j].item() for s in range(t) for h in heads) for j in candidates}
        protected, amount = policy.budget // 2, 1
    elif isinstance(policy, TOVA):
        score = {j: rows[t - 1][b, :, j].mean().item() for j in candidates}
        protected, amount = 0, 1
    else:  # streaming: the oldest after the sinks
        score = {j: j for j in candidates if j >= policy.n_sink}
        protected, amount = 0, 1
    unprotected = [j for j in score if j < t - protected]
    return set(sorted(unprotected, key=lambda j: (score[j], j))[:amount])


@pytest.mark.parametrize("policy", [
    Scissorhands(budget=10, recent=3, window=5),  # w < steps: the window slides; not a multiple of 8
    Scissorhands(budget=12, recent=2, window=11),  # two bytes of history
    Scissorhands(budget=12, recent=2, window=11, score="non_pivotal"),  # tokens seen by 3 to 11 queries of w
    Scissorhands(budget=12, recent=2, window=4, score="non_pivotal"),  # tokens seen by more queries than w
    ScissorhandsReleased(recent=2, window=4, layers=(0, 1), start=6),
    H2O(budget=9), TOVA(budget=7), StreamingLLM(budget=8, n_sink=3)], ids=lambda p: p.name)
def test_each_policy_drops_the_tokens_its_rule_names(policy):
    steps, group = 30, 2
    rows, kept = run_rule(policy, steps)
    evicted = 0
    for t in range(1, steps):
        for b in range(2):
            for kv in range(2):
                before, after = kept[t - 1][b][kv] | {t - 1}, kept[t][b][kv]
                assert before - after == reference_drops(policy, rows, before, t, b, kv, group), (t, b, kv)
                evicted += len(before - after)
    assert evicted > 0
    if not isinstance(policy, ScissorhandsReleased):
        assert max(len(k) for step in kept for row in step for k in row) < policy.budget  # room for token t


@pytest.mark.parametrize("policy", [Scissorhands(budget=12, recent=2, window=5), H2O(budget=12),
                                    Scissorhands(budget=12, recent=2, window=5, score="non_pivotal")], ids=str)
def test_what_a_lockstep_cache_knows_on_the_host_changes_nothing(policy):
    """mode=generate tells a policy how many tokens every head holds (n_held), and gives it each key's score and the
    log-sum-exp: the same drops and statistics as from the masks and probabilities (on a GPU, Scissorhands' counts
    then come from the pivotal-count kernel)."""
    batch, heads, slots = 2, 4, 16
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    masks, hints = (policy.init_stats(batch, heads, slots, DEVICE) for _ in range(2))
    positions = torch.arange(slots, device=DEVICE).expand(batch, 2, slots)
    for n in range(1, slots):
        held = (torch.arange(slots, device=DEVICE) < n).expand(batch, 2, slots)
        drop = policy.drops(masks, held, positions, n, 0, 1)
        assert (drop is None) == (n < 12) and (drop is None or drop.sum() == 2 * batch * policy.amount(12))
        hinted = policy.drops(hints, held, positions, n, 0, 1, n_held=n)
        assert (hinted is None and drop is None) or torch.equal(hinted, drop)
        visible = held.repeat_interleave(2, 1)
        scores = torch.randn(batch, heads, slots, device=DEVICE, generator=gen) * 2
        probs = scores.masked_fill(~visible, -1e9).softmax(-1).masked_fill(~visible, 0.0)
        policy.observe(masks, probs, visible, n)
        scores[..., n:] = float("nan")  # undefined past the held slots, as the decode kernel leaves them
        policy.observe_scores(hints, scores, scores[..., :n].logsumexp(-1), n, n)
        for k in masks:
            torch.testing.assert_close(hints[k], masks[k], rtol=1e-5, atol=1e-6)  # counts: exactly


@pytest.mark.parametrize("score, young_kept", [("pivotal", False), ("non_pivotal", True)])
def test_a_young_token_pivotal_for_every_query_that_saw_it_stays_only_when_the_non_pivotal_are_counted(score,
                                                                                                      young_kept):
    """Old tokens 0-11 are pivotal for one query in two, token 16 for each of the 4 queries since it came (it has
    just left the r newest), the others for none. Counting the pivotal ones puts token 16 (4) below the old ones
    (5 to 10), and it goes; counting those not pivotal puts it above every other (0), and it stays."""
    policy = Scissorhands(budget=20, recent=2, window=400, score=score)
    stats = policy.init_stats(1, 1, 21, "cpu")
    held = torch.zeros(1, 1, 21, dtype=torch.bool)
    positions = torch.arange(21).expand(1, 1, 21)
    for t in range(20):
        held[..., t] = True
        pivotal = [j for j in range(min(t, 11) + 1) if (t + j) % 2 == 0] + ([16] if t >= 16 else [])
        probs = torch.zeros(1, 1, 21)
        probs[..., :t + 1] = 0.1 / (t + 1)  # below 1/t
        probs[..., pivotal] += 0.9 / len(pivotal)
        policy.observe(stats, probs, held.clone(), t)
    drop = policy.drops(stats, held, positions, 20, 0, 1)[0, 0]
    assert drop.sum() == 10 and bool(drop[16]) != young_kept


def test_streaming_keeps_the_sinks_and_the_newest():
    _, kept = run_rule(StreamingLLM(budget=8, n_sink=4), steps=20)
    assert all(k == {0, 1, 2, 3, 16, 17, 18} for row in kept[-1] for k in row)


def test_tova_drops_the_same_token_from_every_head_of_a_layer():
    _, kept = run_rule(TOVA(budget=6), steps=15)
    assert all(len({frozenset(k) for k in row}) == 1 for step in kept for row in step)


def test_growing_budgets_keep_the_total_and_grow_with_depth():
    budgets = layer_budgets(100, "growing", 7)
    assert sum(budgets) == 700 and list(budgets) == sorted(budgets) and budgets[0] == 50 and budgets[-1] == 150
    assert Scissorhands(budget=100, budget_schedule="growing").budgets(7) == list(budgets)
    assert layer_budgets(100, "uniform", 3) == (100, 100, 100)


def test_released_preset_compresses_a_middle_band_of_layers():
    preset = make_policy("scissorhands_released")
    assert (preset.threshold, preset.window, preset.recent, preset.start) == ("p90", 100, 10, 100)
    assert [layer for layer in range(64) if preset.compresses(layer, 64)] == list(range(5, 36))


@pytest.mark.parametrize("make, message", [
    (lambda: Scissorhands(budget=10, recent=10), "budget=10 must be larger than recent=10"),
    (lambda: Scissorhands(budget=40, drop=40), r"drop=40 \(m, .*\) must be an integer in \[1, budget\)"),
    (lambda: Scissorhands(budget=40, drop=0), r"drop=0 \(m, .*\) must be an integer in \[1, budget\)"),
    (lambda: Scissorhands(budget=40, drop=35),
     r"drop=35 \(m, the tokens dropped at a time: drop_fraction · B\) must be in \[1, budget - recent\]"),
    (lambda: Scissorhands(budget=40, window=0), r"window=0 \(w"),
    (lambda: Scissorhands(budget=40, threshold="mean"), "threshold='mean' is not one of"),
    (lambda: Scissorhands(budget=0), "budget=0 must be a positive integer"),
    (lambda: Scissorhands(budget=30, budget_schedule="growing").budgets(4),
     r"drop=7 \(m, .*\) must be in \[1, budget - recent\] = \[1, 5\] for budget=15 \(layer 0's, from budget_sch"),
    (lambda: TOVA(budget=1, budget_schedule="growing").budgets(2),
     r"tova: budget=0 \(layer 0's, from budget_schedule='growing'\) must be at least 1 token"),
    (lambda: H2O(budget=8, recent=8), "budget=8 must be larger than recent=8"),
    (lambda: StreamingLLM(budget=4), "budget=4 must be larger than n_sink=4"),
    (lambda: make_policy("snapkv", budget=8), r"unknown KV-cache policy 'snapkv'; valid ones: \['full', 'h2o'"),
    (lambda: make_policy("h2o", budget=8, window=3), r"policy 'h2o' has no parameter 'window'"),
    (lambda: EvictingCache(Full(), 2, 64, kv_bits=3), r"kv_bits=3 is not one of \(2, 4, 8, 16\)"),
    (lambda: EvictingCache(ScissorhandsReleased(), 2, 64), "runs in mode=simulate only"),
    *[(lambda band=band: make_policy("scissorhands_released", layers=band),
       r"layers=.* must be a band \(lo, hi\), 0 <= lo <= hi <= 1") for band in ((0.5,), 0.5, ("a", "b"), (0.6, 0.4))],
])
def test_bad_input_is_refused_naming_the_parameter(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# --- simulation and generation on a tiny model -------------------------------------------------------------------

@functools.cache
def tiny(kind="llama"):
    """2 layers, 4 query and 2 KV heads (Llama) or 4 heads (OPT), weights large enough for peaked attention: the
    pivotal tests are then far from their thresholds, so the two modes' rounding cannot flip them."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2))
    else:
        model = OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                         num_attention_heads=4, word_embed_proj_dim=64, init_std=0.2))
    return model.to(DEVICE).eval()


def text(n, batch=1, seed=1):
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_simulation_without_eviction_is_the_plain_forward_pass(kind):
    model, ids = tiny(kind), text(50, batch=2)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    for policy in (Full(), Scissorhands(budget=50)):
        logits, sim = simulate(model, ids, policy)
        torch.testing.assert_close(logits, expected, rtol=2e-4, atol=2e-4)
        assert sim.keep_ratio == [1.0, 1.0]
    assert model.config._attn_implementation == "sdpa"  # given back


def test_attention_options_our_attention_does_not_apply_are_refused():
    """Gemma-2's logit softcap in either mode, a sliding window the text outgrows in mode=generate (in
    mode=simulate it comes in the mask, and is applied)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM

    small = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)
    gemma = Gemma2ForCausalLM(Gemma2Config(**small, attn_logit_softcapping=50.0)).eval()
    ids = text(6).cpu()
    with pytest.raises(ValueError, match="softcap"):
        simulate(gemma, ids, Full())
    with pytest.raises(ValueError, match="softcap"):
        decode_nll(gemma, ids, Full(), schedule=REFERENCE)
    mistral = MistralForCausalLM(MistralConfig(**small, sliding_window=4)).eval()
    with torch.no_grad():
        expected = mistral(ids, use_cache=False).logits
    torch.testing.assert_close(simulate(mistral, ids, Full())[0], expected, rtol=2e-4, atol=2e-4)
    decode_nll(mistral, ids[:, :4], Full(), schedule=REFERENCE)  # within the window: nothing hidden
    with pytest.raises(ValueError, match="sliding window of 4 tokens"):
        decode_nll(mistral, ids, Full(), schedule=REFERENCE)


@pytest.mark.parametrize("group_size, message", [(0, "positive integer"), (-8, "positive integer"),
                                                 (5, "divide the model's head_dim=16")])
def test_a_quantized_cache_refuses_a_bad_group_size(group_size, message):
    with pytest.raises(ValueError, match=message):
        decode_nll(tiny(), text(6), Full(), kv_bits=4, group_size=group_size, schedule=REFERENCE)


def test_simulation_refuses_padding():
    """A padded slot would take a place of the budget: simulate takes unpadded texts only."""
    model, ids = tiny(), text(20, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with simulating(model, Full()), pytest.raises(ValueError, match="7 padded positions"):
        model(ids, attention_mask=mask, use_cache=False)
    assert model.config._attn_implementation == "sdpa"


def test_simulation_evicts_and_measures_what_it_keeps():
    model, ids = tiny(), text(60)
    full = simulated_nll(model, ids, Full())
    logits, sim = simulate(model, ids, Scissorhands(budget=20, recent=4))
    # a head holds at most 20 of the t+1 keys of row t
    expected = sum(min(t + 1, 20) for t in range(60)) / sum(t + 1 for t in range(60))
    assert sim.keep_ratio[0] <= expected + 1e-9 and sim.mean_keep_ratio < 0.6
    assert simulated_nll(model, ids, Scissorhands(budget=20, recent=4))[0] != pytest.approx(full[0], rel=1e-4)
    _, released = simulate(model, ids, ScissorhandsReleased(recent=4, window=8, layers=(0.5, 1), start=20))
    assert released.keep_ratio[0] == 1.0 and released.keep_ratio[1] < 1.0


def test_persistence_ratio_is_a_fraction_per_layer():
    model, ids = tiny(), text(64, batch=2)
    ratios = persistence_ratio(model, ids)
    assert len(ratios) == 2 and all(0.2 < r <= 1.0 for r in ratios)
    # against plain attention probabilities from the eager implementation
    with torch.no_grad():
        model.set_attn_implementation("eager")
        attentions = model(ids, output_attentions=True, use_cache=False).attentions
        model.set_attn_implementation("sdpa")
    half = 32
    for ratio, probs in zip(ratios, attentions):
        pivotal = probs > 1 / torch.arange(1, 65, device=DEVICE)[:, None]
        first, second = pivotal[:, :, :half].any(2)[..., :half], pivotal[:, :, half:].any(2)[..., :half]
        assert ratio == pytest.approx(((first & second).sum() / second.sum()).item(), abs=1e-6)



def test_persistence_pools_every_chunk_batch_by_batch():
    """The task's persistence covers every chunk, eval.batch_size at a time, the counts summed over the batches
    before the one division: the ratios of all the chunks at once."""
    from omegaconf import OmegaConf

    from tasks.scissorhands.task import Model, persistence_rows
    model, ids = tiny(), text(64, batch=3)
    whole = persistence_ratio(model, ids)
    assert persistence_ratio(model, ids, batch_size=2) == pytest.approx(whole, abs=1e-12)
    rows = list(persistence_rows(OmegaConf.create({"eval": {"batch_size": 2}}), Model(model, None, "tiny", 2), "t",
                                 ids))
    assert [r.p50 for r in rows[:2]] == pytest.approx([100 * r for r in whole], abs=1e-10)
    assert rows[0].extra["chunks"] == 3 and rows[0].n == ids.numel()


# every generate test on our kernels, and on their PyTorch references (what a CPU without the interpreter runs)
SCHEDULES = [SCHEDULE, REFERENCE]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_full_cache_and_a_budget_beyond_the_text_give_the_simulated_nll(kind, schedule):
    model, ids = tiny(kind), text(10)
    expected = simulated_nll(model, ids, Full())
    policies = [Full()] + ([Scissorhands(budget=40, recent=4)] if kind == "llama" else [])
    for policy in policies:
        nll, tokens = decode_nll(model, ids, policy, schedule=schedule)
        assert tokens == expected[1] == ids.shape[1] - 1
        assert nll == pytest.approx(expected[0], rel=1e-5)


@pytest.mark.parametrize("policy", [
    Scissorhands(budget=8, recent=2),
    Scissorhands(budget=8, recent=2, window=3),  # the history window slides within the text
    Scissorhands(budget=8, recent=2, window=3, score="non_pivotal"),
    Scissorhands(budget=8, recent=2, threshold="p90", budget_schedule="growing"),  # budgets differ by layer
    H2O(budget=6), TOVA(budget=6), StreamingLLM(budget=6)],
    ids=lambda p: f"{p.name} w={getattr(p, 'window', '-')} {getattr(p, 'threshold', '')} {getattr(p, 'score', '')} "
                  f"{p.budget_schedule}")
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_real_eviction_gives_the_simulated_nll_and_never_exceeds_the_budget(policy, schedule):
    """The strong check: the simulation is exact, so eviction during decoding matches it on the same text."""
    model, ids = tiny(), text(14)  # two rounds of eviction at these budgets, or one every step
    cache = EvictingCache(policy, 2, ids.shape[1], schedule=schedule)
    budgets = policy.budgets(len(cache.layers))
    nll = 0.0
    with generating(model, cache):
        for t in range(ids.shape[1] - 1):
            logits = decode_step(model, cache, ids[:, t])
            nll += torch.nn.functional.cross_entropy(logits.float(), ids[:, t + 1], reduction="sum").item()
            for layer, budget in zip(cache.layers, budgets):  # every tensor the cache holds: at most B token slots
                assert layer.store.keys.shape[2] <= budget and layer.store.values.shape[2] <= budget
                assert layer.n <= min(t + 1, budget)
                assert layer.positions[0, 0, :layer.n].max().item() == t  # true positions
    assert cache.seen_tokens == ids.shape[1] - 1 and max(cache.held_tokens()) <= max(budgets)
    assert nll == pytest.approx(simulated_nll(model, ids, policy)[0], rel=1e-5)
    assert nll != pytest.approx(simulated_nll(model, ids, Full())[0], rel=1e-4)


def test_the_measured_compression_weighs_every_sequence_alike_in_both_modes():
    """Batches of different sizes and lengths, as multiple choice sends them (a budget per length): real eviction
    measures the compression the simulation measures, each sequence counted once, not each batch."""
    from tasks.scissorhands.task import KVForward, budget

    def policy_for(length):
        return Scissorhands(budget=budget(length, 2), recent=1)
    model, measured = tiny(), []
    for generate in (False, True):
        forward = KVForward(policy_for, generate, schedule=REFERENCE)
        for ids in (text(20, batch=3), text(8, seed=2)):
            forward(model, ids)
        measured.append(forward.compression)
    assert measured[1] == pytest.approx(measured[0], rel=1e-9) and measured[0] > 1


def test_4bit_kv_under_eviction_changes_the_nll_a_little_and_the_same_on_the_references():
    model, ids, policy = tiny(), text(12), Scissorhands(budget=10, recent=2)
    exact = simulated_nll(model, ids, policy)[0]
    nll, _ = decode_nll(model, ids, policy, kv_bits=4, group_size=8, schedule=SCHEDULE)
    assert 1e-3 < abs(nll - exact) / exact < 0.05  # measured: 0.96%
    # the same codes (a rounding apart at most), eviction and attention, in PyTorch
    reference, _ = decode_nll(model, ids, policy, kv_bits=4, group_size=8, schedule=REFERENCE)
    assert reference == pytest.approx(nll, rel=1e-4)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_a_quantized_store_scores_every_key_it_holds(schedule):
    """Before its first whole group (all keys in full precision) and after (both parts), each held key's score is
    q·k·scale of the key as stored; the policies count pivotal tokens from these."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(1, 4, 16, generator=gen, device=DEVICE)
    keys, values = (torch.randn(1, 2, 12, 16, generator=gen, device=DEVICE) for _ in range(2))
    store = QuantizedStore(1, 2, 16, 16, torch.float32, DEVICE, schedule, bits=4, group_size=8)
    for n in range(1, 13):
        store.append(keys[:, :, n - 1], values[:, :, n - 1], n - 1)
        if n in (3, 12):
            _, scores, lse = store.attend(q, n, 0.25, with_scores=True)
            held = keys[:, :, :n].clone()
            held[:, :, :store.n_quantized] = dequantize_kv(store.keys)[:, :, :store.n_quantized]
            expected = decode_scores_reference(q, held, torch.tensor([n], device=DEVICE), 0.25)
            torch.testing.assert_close(scores[..., :n], expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lse, expected.logsumexp(-1), rtol=1e-5, atol=1e-5)
    assert store.n_quantized == 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_cache_holds_bits_per_value_plus_a_scale_and_zero_per_group(bits, dtype):
    """Measured from the tensors: codes of `bits`, an fp16 scale and zero per group of 32, and a full-precision
    window of one group. 4-bit: 3.2x less than fp16 per token, 4x less for the codes alone. Counted with 16-bit
    floats whatever the model's dtype (a CPU run's float32 stands in for the paper's fp16)."""
    b, kv_heads, slots, head_dim, group = 1, 2, 256, 64, 32
    query = torch.zeros(b, 4, 1, head_dim, dtype=dtype, device=DEVICE)
    key = torch.zeros(b, kv_heads, 1, head_dim, dtype=dtype, device=DEVICE)
    caches = {}
    for kv_bits in (16, bits):
        caches[kv_bits] = EvictingCache(Full(), 1, slots, kv_bits=kv_bits, group_size=group)
        caches[kv_bits].layers[0] = LayerCache(caches[kv_bits], 0, query, key)
    fp16 = caches[16].kv_bytes()
    assert fp16 == 2 * b * kv_heads * slots * head_dim * 2
    per_value = bits / 8 + 2 * 2 / group  # codes, and an fp16 scale and zero shared by a group
    window = fp16 * group / slots
    assert caches[bits].kv_bytes() == pytest.approx(fp16 / 2 * per_value + window, rel=1e-9)
    if bits == 4:
        assert (caches[4].kv_bytes() - window) * 3.2 == pytest.approx(fp16)


def test_quantized_eviction_requantizes_only_the_key_groups_that_lose_tokens():
    """Groups of 8 tokens: 4 quantized, 4 tokens in full precision. Head 0 loses a token of group 1 and one of the
    full-precision ones, head 1 one of group 0 and one of group 2."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    keys, values = (torch.randn(1, 2, 36, 16, generator=gen, device=DEVICE) for _ in range(2))
    store = QuantizedStore(1, 2, 40, 16, torch.float32, DEVICE, SCHEDULE, bits=4, group_size=8)
    for i in range(36):
        store.append(keys[:, :, i], values[:, :, i], i)
    assert store.n_quantized == 32
    stored_keys = torch.cat([dequantize_kv(store.keys)[:, :, :32], store.residual.keys[:, :, :4]], 2)
    drop = torch.zeros(1, 2, 40, dtype=torch.bool, device=DEVICE)
    drop[0, 0, [9, 33]] = drop[0, 1, [2, 20]] = True
    held = (torch.arange(40, device=DEVICE) < 36).expand(1, 2, 40)
    order = compaction_order(drop, held, store.loose(drop, 36), 34)
    intact = {0: [0, 2, 3], 1: [1, 3]}  # each head's groups that lose nothing: first, in order
    for head, groups in intact.items():
        first = torch.cat([torch.arange(8 * g, 8 * g + 8) for g in groups]).to(DEVICE)
        assert torch.equal(order[0, head, :len(first)], first)
        assert set(order[0, head].tolist()) == set(range(36)) - set(drop[0, head].nonzero().flatten().tolist())
    store.reorder(order, 36)
    assert store.n_quantized == 32
    now = torch.cat([dequantize_kv(store.keys)[:, :, :32], store.residual.keys[:, :, :2]], 2)
    expected = stored_keys.gather(2, order[..., None].expand(-1, -1, -1, 16))
    for head, groups in intact.items():  # intact groups: the same values; regrouped ones: a second rounding
        torch.testing.assert_close(now[0, head, :8 * len(groups)], expected[0, head, :8 * len(groups)])
    assert 0 < (now - expected).abs().max() < (keys.max() - keys.min()) / 15


@pytest.mark.parametrize("schedule", ["uniform", "growing"])
def test_a_configs_drop_fraction_scales_with_each_layers_budget(schedule):
    policy = policy_at_budget("scissorhands", {"drop_fraction": 0.5, "budget_schedule": schedule}, 100)
    budgets = layer_budgets(100, schedule, 4)
    policy.budgets(4)  # every layer's m fits its budget
    assert all(abs(policy.amount(b) - b / 2) <= 0.5 for b in budgets)
    assert policy_at_budget("scissorhands", {"drop_fraction": 0.25}, 100).amount(100) == 25


@pytest.mark.parametrize("name, fraction, count", [("scissorhands", "drop_fraction", "amount"),
                                                    ("h2o", "recent_fraction", "recent_tokens")])
def test_a_fraction_of_the_budget_rounds_down_at_every_layer_as_at_b(name, fraction, count):
    """Under budget_schedule=growing a layer's share rounds down, as the fraction of B does: rounded to nearest,
    0.5 of layer 1's 83 tokens was 42, not the default half (83 // 2), and 0.3 of it 25."""
    budgets = [50, 83, 117, 150]
    assert list(layer_budgets(100, "growing", 4)) == budgets
    default = make_policy(name, budget=100, budget_schedule="growing")
    for share, expected in ((0.5, [b // 2 for b in budgets]), (0.3, [15, 24, 35, 45])):
        policy = policy_at_budget(name, {fraction: share, "budget_schedule": "growing"}, 100)
        policy.budgets(4)  # every layer's share fits its budget
        assert [getattr(policy, count)(b) for b in budgets] == expected
    assert [getattr(default, count)(b) for b in budgets] == [b // 2 for b in budgets]


@pytest.mark.parametrize("schedule", ["uniform", "growing"])
def test_h2os_recent_fraction_is_a_share_of_each_layers_budget(schedule):
    """recent_fraction=0.5 is half of every layer's budget: a count taken from B would fill layer 0's B/2 with
    recent tokens under budget_schedule=growing (no heavy hitter left), and leave later layers short of half."""
    policy = policy_at_budget("h2o", {"recent_fraction": 0.5, "budget_schedule": schedule}, 100)
    budgets = policy.budgets(4)
    assert budgets == list(layer_budgets(100, schedule, 4))
    assert all(abs(policy.recent_tokens(b) - b / 2) <= 0.5 for b in budgets)
    assert policy_at_budget("h2o", {"recent_fraction": 0.25}, 100).recent_tokens(100) == 25
