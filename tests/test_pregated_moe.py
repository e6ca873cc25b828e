"""Pre-gated MoE: the Switch-shaped model (routing, pre-gate, load-balancing loss, KV cache, training, loading
transformers' Switch weights) and the offloading runtime (every strategy gives gpu_only's bits, the cache's
policies, slot checks, what is recorded, copies on a side stream on a GPU)."""
from contextlib import contextmanager

import pytest
import torch
from conftest import DEVICE, gpu

from tasks.pregated_moe.model import (ExpertStack, Gate, KVCache, MoEConfig, Routing, SwitchLM, active_experts,
                                      expert_ffn, load_balancing_loss, load_switch_weights, mix_experts)
from tasks.pregated_moe.offload import (CACHE_POLICIES, ExpertOffload, Marker, SlotCache, Span, copy_time_hidden,
                                        generate, min_slots)

VOCAB, EXPERTS = 97, 16


def build(**overrides) -> SwitchLM:
    """Six blocks, so three MoE blocks of 16 experts: 48 (block, expert) pairs, more than the slot pools below."""
    torch.manual_seed(0)
    return SwitchLM(MoEConfig(**{**dict(n_layer=6, n_experts=EXPERTS, vocab_size=VOCAB, max_len=64), **overrides}))


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- the model ---------------------------------------------------------------------------------------------------

def test_load_balancing_loss_matches_a_hand_computation():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.3, 0.2], [0.25, 0.15, 0.6]])
    # top-1 picks 0, 1, 0, 2: f = (1/2, 1/4, 1/4); P = column means (0.3875, 0.3125, 0.3)
    top1 = probs.topk(1, -1).indices
    assert load_balancing_loss(probs, top1).item() == pytest.approx(3 * (0.5 * 0.3875 + 0.25 * 0.3125 + 0.25 * 0.3))
    # top-2 picks {0,1}, {1,2}, {0,1}, {2,0}: f = (3/8, 3/8, 2/8)
    top2 = probs.topk(2, -1).indices
    assert load_balancing_loss(probs, top2).item() == pytest.approx(3 * (3 / 8 * 0.3875 + 3 / 8 * 0.3125 + 2 / 8 * 0.3))


def test_load_balancing_loss_matches_transformers_switch_for_top1():
    from transformers.models.switch_transformers.modeling_switch_transformers import load_balancing_loss_func

    probs = torch.randn(37, 7).softmax(-1)
    experts = probs.argmax(-1)
    ours = load_balancing_loss(probs, experts[:, None])
    torch.testing.assert_close(ours, load_balancing_loss_func(probs[None], experts[None]), rtol=1e-5, atol=1e-6)


def test_load_balancing_loss_trains_the_gate_as_transformers_switch_does():
    """Its gradient reaches the gate through the mean probabilities P, as Switch's does (f is a count)."""
    from transformers.models.switch_transformers.modeling_switch_transformers import load_balancing_loss_func

    logits = torch.randn(37, 7, requires_grad=True)
    experts = logits.argmax(-1)
    ours, = torch.autograd.grad(load_balancing_loss(logits.softmax(-1), experts[:, None]), logits)
    theirs, = torch.autograd.grad(load_balancing_loss_func(logits.softmax(-1)[None], experts[None]), logits)
    assert ours.abs().sum() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("pregate", [False, True])
def test_the_aux_loss_counts_each_gate_that_ran_once(pregate):
    """A pre-gate's routing is carried to the next MoE block: its loss counts where it was chosen, not again there."""
    model = build(pregate=pregate).train()
    gates = [g for f in model.moe_layers for g in (f.gate, f.pregate) if g is not None]
    losses = []
    for g in gates:
        g.register_forward_hook(lambda module, args, routing: losses.append(routing.aux_loss))
    out = model(tokens(3, 10), labels=tokens(3, 10))
    assert len(losses) == len(gates) == 3  # gate, gate, gate; or gate + pre-gate, pre-gate, none
    torch.testing.assert_close(out.aux_loss, sum(losses))


@pytest.mark.parametrize("top_k, n_experts", [(2, 5), (1, 5), (1, 1)])  # (1, 1): every token to one expert
def test_mixing_experts_matches_a_dense_reference(top_k, n_experts):
    torch.manual_seed(2)
    d, f = 7, 11
    h, w_in, w_out = torch.randn(13, d), torch.randn(n_experts, f, d), torch.randn(n_experts, d, f)
    weights, experts = torch.randn(13, n_experts).softmax(-1).topk(top_k, -1)
    routing = Routing(experts, weights, aux_loss=0.0, n_experts=n_experts)
    every = torch.stack([torch.relu(h @ w_in[e].T) @ w_out[e].T for e in range(n_experts)])  # (experts, tokens, d)
    reference = sum(weights[:, j, None] * every[experts[:, j], torch.arange(13)] for j in range(top_k))
    out = mix_experts(h, routing, lambda e: (w_in[e], w_out[e]))
    torch.testing.assert_close(out, reference, rtol=2e-5, atol=2e-5)
    assert active_experts(routing) == sorted(set(experts.flatten().tolist()))
    assert sum(routing.counts()) == 13 * top_k


def unread(routing):
    raise AssertionError("a routing was read to the host")


@pytest.fixture
def forbid_routing_reads(monkeypatch):
    """Called (once the reference is computed), any read of a routing to the host fails the test."""
    def forbid():
        monkeypatch.setattr(Routing, "start_read", unread)
        monkeypatch.setattr(Routing, "counts", unread)
    return forbid


def test_resident_experts_serve_one_token_without_reading_its_routing_and_give_the_same_bits(forbid_routing_reads):
    torch.manual_seed(2)
    h, w_in, w_out = torch.randn(1, 7), torch.randn(5, 11, 7), torch.randn(5, 7, 11)
    weights, experts = torch.randn(1, 5).softmax(-1).topk(1, -1)
    read = mix_experts(h, Routing(experts, weights, 0.0, 5), lambda e: (w_in[e], w_out[e]))
    forbid_routing_reads()
    assert torch.equal(mix_experts(h, Routing(experts, weights, 0.0, 5), ExpertStack(w_in, w_out)), read)


def test_the_router_computes_in_float32_under_autocast():
    gate = Gate(32, 8, top_k=2)
    h = torch.randn(5, 32)
    plain = gate(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = gate(h)
    assert mixed.weights.dtype == torch.float32
    assert torch.equal(mixed.weights, plain.weights) and torch.equal(mixed.experts, plain.experts)


def test_the_pregate_of_a_block_chooses_the_next_blocks_experts():
    model = build(pregate=True, n_experts=4)
    first, second, last = model.moe_layers
    assert second.gate is None and last.gate is None and last.pregate is None  # only the first has its own gate
    with torch.no_grad():  # each gate favours one expert for inputs with positive entries
        for gate, favourite in ((first.gate, 1), (first.pregate, 2), (second.pregate, 3)):
            gate.classifier.weight.zero_()
            gate.classifier.weight[favourite] = 1.0
    h = torch.rand(5, 32) + 0.1
    y, next_routing, _ = first(h, None)
    assert (next_routing.experts == 2).all()
    torch.testing.assert_close(next_routing.weights[:, 0], (h @ first.pregate.classifier.weight.T).softmax(-1)[:, 2])
    own = (h @ first.gate.classifier.weight.T).softmax(-1)[:, 1:2]
    torch.testing.assert_close(y, expert_ffn(h, *first.expert_weights(1)) * own)
    h2 = torch.rand(5, 32) + 0.1  # the next block computes with the experts the first block's pre-gate chose
    y2, after, _ = second(h2, next_routing)
    torch.testing.assert_close(y2, expert_ffn(h2, *second.expert_weights(2)) * next_routing.weights)
    assert (after.experts == 3).all()


def test_the_model_hands_each_pregate_routing_to_the_next_moe_block():
    model = build(pregate=True)
    seen = {}
    for ffn in model.moe_layers:
        ffn.register_forward_hook(lambda m, args, out: seen.__setitem__(m.moe_index, (args, out)))
    model(tokens(2, 5))
    for i in (1, 2):
        (h_before, _, _), (_, chosen, _) = seen[i - 1]
        (_, carried, _), _ = seen[i]
        assert carried is chosen
        assert torch.equal(carried.experts, model.moe_layers[i - 1].pregate(h_before).experts)


def test_the_kv_cache_gives_the_logits_of_a_full_forward():
    model = build().eval()
    prompt, more = tokens(3, 5), tokens(3, 2, seed=2)
    cache = KVCache(model.config, 3, 9, "cpu", torch.float32)
    with torch.no_grad():
        model(prompt, cache=cache)
        cached = model(more, cache=cache).logits
        full = model(torch.cat([prompt, more], 1)).logits[:, -2:]
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_greedy_generation_with_the_cache_matches_recomputing_everything():
    runtime = ExpertOffload(build(), "gpu_only", "cpu")
    prompt = tokens(2, 4)
    generated = generate(runtime, prompt, 6)
    sequence = prompt
    for _ in range(6):
        sequence = torch.cat([sequence, runtime(sequence)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, sequence)


@pytest.mark.parametrize("pregate", [False, True])
def test_a_few_training_steps_lower_the_loss(pregate):
    model = build(pregate=pregate, n_layer=4, n_experts=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    losses = []
    for step in range(25):
        x = (torch.randint(0, VOCAB, (8, 1), generator=gen) + torch.arange(12)) % VOCAB  # next token = this + 1
        out = model(x, labels=x)
        out.loss.backward()
        if step == 0:
            gates = [g for f in model.moe_layers for g in (f.gate, f.pregate) if g is not None]
            assert all(g.classifier.weight.grad.abs().sum() > 0 for g in gates)  # routing carries gradients
            assert out.aux_loss > 0
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.lm_loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_active_params_count_top_k_of_the_experts_and_the_tied_output_layer():
    model = build(top_k=2)
    one_expert = model.moe_layers[0].w_in[0].numel() + model.moe_layers[0].w_out[0].numel()
    dense = sum(p.numel() for n, p in model.named_parameters() if "w_in" not in n and "w_out" not in n)
    # the tied embedding is the output layer's weight, a product every token pays for, as model_flops_per_token
    # counts it for a model without the method: only the position table is left out
    assert model.non_embedding_params() == dense - model.position.weight.numel() + 3 * 2 * one_expert


# --- loading transformers' Switch weights --------------------------------------------------------------------------

def hf_switch(num_experts: int):
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    torch.manual_seed(4)
    config = SwitchTransformersConfig(vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=4,
                                      num_decoder_layers=4, num_experts=num_experts, encoder_sparse_step=2,
                                      decoder_sparse_step=2)
    return SwitchTransformersForConditionalGeneration(config).eval()


@pytest.mark.parametrize("stack", ["decoder", "encoder"])
@pytest.mark.parametrize("pregate", [False, True])
def test_switch_weights_load_and_route_as_transformers_does(stack, pregate):
    hf = hf_switch(EXPERTS)
    model = build(n_layer=4, pregate=pregate)
    load_switch_weights(model, hf.state_dict(), stack)
    h = torch.randn(1, 9, 32)
    for ffn, block in zip(model.moe_layers, (1, 3)):  # Switch's MoE blocks are the odd ones, like ours
        mlp = getattr(hf, stack).block[block].layer[-1].mlp
        for e in range(EXPERTS):
            assert torch.equal(ffn.w_in[e], mlp.experts[f"expert_{e}"].wi.weight)
            assert torch.equal(ffn.w_out[e], mlp.experts[f"expert_{e}"].wo.weight)
        gates = [g for g in (ffn.gate, ffn.pregate) if g is not None]  # pre-gated: block N's router, for N+1
        assert len(gates) == (1 if not pregate else 2 if block == 1 else 0)
        for gate in gates:
            assert torch.equal(gate.classifier.weight, mlp.router.classifier.weight)
            routing = gate(h[0])
            ours = mix_experts(h[0], routing, ffn.expert_weights)
            with torch.no_grad():
                torch.testing.assert_close(ours, mlp(h)[0], rtol=1e-5, atol=1e-6)


# --- the offloading runtime --------------------------------------------------------------------------------------

CASES = [(False, "on_demand", 1), (False, "prefetch_all", 1), (True, "on_demand", 1), (True, "prefetch_all", 1),
         (True, "pregated", 1), (True, "pregated", 2)]


@pytest.mark.parametrize("policy", CACHE_POLICIES)
@pytest.mark.parametrize("pregate,strategy,top_k", CASES)
def test_every_strategy_gives_gpu_only_outputs_bit_for_bit(pregate, strategy, top_k, policy):
    prompt = tokens(3, 4)
    reference = ExpertOffload(build(pregate=pregate, top_k=top_k), "gpu_only", "cpu")
    slots = min_slots(strategy, EXPERTS, top_k, prompt.numel())
    runtime = ExpertOffload(build(pregate=pregate, top_k=top_k), strategy, "cpu", slots=slots, cache=policy)
    assert torch.equal(runtime(prompt), reference(prompt))
    assert torch.equal(generate(runtime, prompt, 5), generate(reference, prompt, 5))
    summary = runtime.summary()
    assert summary["copies"] > slots  # slots were reused: experts were evicted
    assert summary["cache_misses"] == summary["copies"]
    assert summary["bytes_copied"] == summary["copies"] * runtime.expert_bytes
    assert summary["tokens"] == 12 + 12 + 4 * 3  # the forward, the generation's prompt, 4 more steps of 3 tokens
    assert summary["bytes_per_token"] == summary["bytes_copied"] / summary["tokens"]


def test_gpu_only_serves_batch_1_without_reading_a_routing_and_gives_the_offloading_strategies_tokens(
        forbid_routing_reads):
    """As FasterTransformer's GPU-only: at one (token, choice) a step its host never waits for a gate."""
    prompt = tokens(1, 1)
    pregated = ExpertOffload(build(pregate=True), "pregated", "cpu")
    expected, logits = generate(pregated, prompt, 6), pregated(prompt)
    forbid_routing_reads()
    runtime = ExpertOffload(build(pregate=True), "gpu_only", "cpu")
    assert torch.equal(generate(runtime, prompt, 6), expected) and torch.equal(runtime(prompt), logits)
    summary = runtime.summary()
    assert summary["mean_active_experts"] == summary["max_active_experts"] == 1
    assert not [s for s in runtime.stats.spans if s.kind == "stall"]  # nothing waited for


def test_strategies_take_turns_on_one_model_as_gpu_only_leaves_its_experts_on_the_host():
    model, prompt = build(pregate=True), tokens(4, 3)
    expected = ExpertOffload(model, "gpu_only", DEVICE)(prompt)
    assert all(f.w_in.device.type == "cpu" for f in model.moe_layers)
    for strategy in ("pregated", "on_demand", "gpu_only"):
        runtime = ExpertOffload(model, strategy, DEVICE, slots=min_slots("pregated", EXPERTS, 1, 12))
        assert torch.equal(runtime(prompt), expected), strategy


@pytest.mark.parametrize("policy", ["lru", "none"])
def test_a_pool_holding_every_expert_copies_each_once_as_a_cache_and_every_time_without(policy):
    runtime = ExpertOffload(build(), "on_demand", "cpu", slots=3 * EXPERTS, cache=policy)
    prompt = tokens(4, 6)
    runtime(prompt)
    first = runtime.summary()
    runtime.reset_stats()
    runtime(prompt)
    again = runtime.summary()
    assert first["copies"] == first["cache_misses"] > 0
    if policy == "lru":
        assert again["copies"] == 0 and again["cache_hits"] == first["copies"] and again["hit_rate"] == 1.0
    else:  # cache="none", the paper's default runs: every forward copies the experts it uses
        assert again["copies"] == first["copies"] and again["cache_hits"] == 0
    assert ExpertOffload(build(), "gpu_only", "cpu").summary()["copies"] == 0


@pytest.mark.parametrize("strategy,lead", [("on_demand", 0), ("prefetch_all", 1), ("pregated", 1)])
def test_copies_are_issued_in_the_block_the_strategy_says(strategy, lead):
    runtime = ExpertOffload(build(pregate=True), strategy, "cpu", slots=2 * EXPERTS)
    runtime(tokens(2, 3))
    copies = [s for s in runtime.stats.spans if s.kind == "copy"]
    assert {s.index for s in copies} == {0, 1, 2}
    for s in copies:  # the first MoE block always fetches on demand
        assert s.issued_during == (s.index if s.index == 0 else s.index - lead)
    # and when they started (on a CPU, in program order): a prefetch after the MoE block before the one it serves
    # began, and before the transformer block after that one's began (so that it overlaps every block up to the
    # one it serves); a fetch on demand inside the MoE block that needs it
    moe = {s.index: s for s in runtime.stats.spans if s.kind == "moe"}
    issue = {s.index: s for s in runtime.stats.spans if s.kind == "issue"}
    blocks = sorted(s.start.time for s in runtime.stats.spans if s.kind == "block")
    assert set(issue) == ({1, 2} if strategy == "pregated" else set())
    for s in copies:
        issued = moe[s.issued_during].start.time
        if s.issued_during == s.index:
            assert issued <= s.start.time <= moe[s.index].end.time
        else:
            next_block = min(t for t in blocks if t > issued)
            assert issued <= s.start.time < next_block
        # the host's work of issuing it counts in an MoE block's time: it lies inside an MoE block, or (pregated's,
        # at a block start) in an issue span of the block it serves, which the rows add to that block
        around = list(moe.values()) + ([issue[s.index]] if s.index in issue else [])
        assert any(a.start.time <= s.start.time and s.end.time <= a.end.time for a in around)


@pytest.mark.parametrize("policy", ["none", "lru"])
@pytest.mark.parametrize("strategy", ["on_demand", "prefetch_all", "pregated"])
def test_a_copy_waits_for_the_blocks_that_read_its_slot_and_for_nothing_else(monkeypatch, strategy, policy):
    """The copy stream waits, before copying into a slot, for the end of the MoE block that last read it (or for
    the pool's allocation), not for all the compute queued: pregated's prefetch for block N+1 overwrites block
    N-1's slots and does not wait for block N's experts. Followed here in program order, as a CPU runs it."""
    from tasks.pregated_moe import offload
    runtime = ExpertOffload(build(pregate=True), strategy, "cpu", slots=min_slots(strategy, EXPERTS, 1, 6),
                            cache=policy)
    events, allocated = [], runtime.released[0]
    monkeypatch.setattr(offload.Marker, "wait", lambda marker: events.append(("wait", marker)))
    request, fetch, span = runtime.cache.request, runtime.fetch, runtime.span

    def logged_request(key, in_use):
        slot, hit = request(key, in_use)
        events.append(("hit" if hit else "copy", slot))
        return slot, hit

    def logged_fetch(layer, routing, next_routing):
        weights_of = fetch(layer, routing, next_routing)
        return lambda e: events.append(("read", runtime.cache.slot_of[layer, e])) or weights_of(e)

    @contextmanager
    def logged_span(kind, index):
        with span(kind, index):
            yield
            read = list(runtime.reading)
        if kind == "moe" and read:
            events.append(("computed", runtime.released[read[0]]))
    monkeypatch.setattr(runtime.cache, "request", logged_request)
    monkeypatch.setattr(runtime, "fetch", logged_fetch)
    monkeypatch.setattr(runtime, "span", logged_span)
    for _ in range(2):
        runtime(tokens(2, 3))
    ready = {id(s.end) for s in runtime.stats.spans if s.kind == "copy"}  # what blocks wait for, not copies
    released, reading, requests = dict.fromkeys(range(runtime.n_slots), allocated), set(), []
    for (kind, value), (before, _) in zip(events, [("", None)] + events):
        if kind == "read":
            reading.add(value)
        elif kind == "computed":
            released.update(dict.fromkeys(reading, value))
            reading = set()
        elif kind == "copy":
            if before != "copy":
                requests.append(({}, {}))
            requests[-1][0][id(released[value])] = value  # the marker it must wait for
        elif kind == "wait" and id(value) not in ready:
            requests[-1][1][id(value)] = value
    assert requests and all(expected.keys() == waited.keys() for expected, waited in requests)
    assert {key for _, waited in requests for key in waited} - {id(allocated)}  # slots that blocks had read


@pytest.mark.parametrize("strategy, waits, prefetched", [
    ("on_demand", 3, 0.0), ("prefetch_all", 0, 1.0), ("pregated", 0, 1.0), ("gpu_only", 0, None)])
def test_only_on_demand_waits_for_its_gate_and_only_prefetches_count_as_such(monkeypatch, strategy, waits,
                                                                              prefetched):
    from tasks.pregated_moe import offload
    reached = []
    monkeypatch.setattr(offload.Marker, "reached", lambda marker: reached.append(marker))
    runtime = ExpertOffload(build(pregate=True), strategy, "cpu", slots=2 * EXPERTS)
    runtime(tokens(2, 3))
    assert len(reached) == waits  # at each of the 3 MoE blocks: the device must get there before the host copies
    assert runtime.summary()["prefetched_fraction"] == prefetched


def test_a_pregated_prefetch_whose_ids_come_late_goes_out_on_demand_and_says_so(monkeypatch):
    from tasks.pregated_moe import model
    reference = ExpertOffload(build(pregate=True), "gpu_only", "cpu")(tokens(2, 3))
    monkeypatch.setattr(model.Routing, "read_done", lambda routing: False)  # a device lagging the host
    runtime = ExpertOffload(build(pregate=True), "pregated", "cpu", slots=2 * EXPERTS)
    assert torch.equal(runtime(tokens(2, 3)), reference)
    assert runtime.summary()["prefetched_fraction"] == 0.0


def test_the_runtime_records_blocks_moe_blocks_stalls_and_copies():
    runtime = ExpertOffload(build(pregate=True), "pregated", "cpu", slots=2 * EXPERTS)
    used = []  # the routings of the three MoE blocks, in order: the first block's gate, then each pre-gate's
    for ffn in runtime.model.moe_layers:
        for gate in (ffn.gate, ffn.pregate):
            if gate is not None:
                gate.register_forward_hook(lambda module, args, routing: used.append(len(active_experts(routing))))
    runtime(tokens(2, 3))
    kinds = [s.kind for s in runtime.stats.spans]
    assert kinds.count("block") == 6 and kinds.count("moe") == 3 and kinds.count("stall") == 3
    assert kinds.count("issue") == 2  # the prefetches of the second and third MoE blocks
    assert all(s.ms() >= 0 for s in runtime.stats.spans)
    summary = runtime.summary()
    assert summary["hidden_copy_ms"] == pytest.approx(0.0, abs=1e-9)  # one stream on a CPU: nothing overlaps
    assert summary["copy_ms"] > 0
    assert len(used) == 3 and summary["mean_active_experts"] == sum(used) / 3
    assert summary["max_active_experts"] == max(used) <= 6  # 6 tokens, top-1


def test_copy_time_hidden_counts_only_overlap_with_compute_not_stalls():
    def at(ms):
        marker = Marker(torch.device("cpu"))
        marker.time = ms / 1e3
        return marker

    spans = [Span("block", 0, 0, at(0), at(10)), Span("stall", 0, 0, at(4), at(6)),
             Span("copy", 1, 0, at(3), at(5)),  # 1 ms computing, 1 ms stalled
             Span("copy", 1, 0, at(5), at(12)), Span("block", 1, 0, at(11), at(20))]  # 4 + 1 computing, 1 stalled
    copy_ms, hidden_ms = copy_time_hidden(spans)
    assert copy_ms == pytest.approx(9.0) and hidden_ms == pytest.approx(6.0)


@pytest.mark.parametrize("policy,expected", [
    ("lru", [False, True, True, False, False, False, False, True]),  # D evicts A (least recent), so A misses
    # D evicts B: A was asked for three times, B and C once each, and B less recently, so C stays
    ("lfu", [False, True, True, False, False, False, True, True]),
])
def test_the_cache_policy_decides_the_hits(policy, expected):
    a, b, c, d = (0, 0), (0, 1), (0, 2), (1, 0)
    cache = SlotCache(3, policy)
    assert [cache.request(key, in_use=set())[1] for key in (a, a, a, b, c, d, a, c)] == expected
    assert (cache.hits, cache.misses) == (sum(expected), len(expected) - sum(expected))


def test_without_a_cache_nothing_is_found_resident():
    """cache="none" (the paper's default runs): an expert is copied every time it is asked for, into the slot
    it held if that still holds it."""
    a, b = (0, 0), (0, 1)
    cache = SlotCache(2, "none")
    slot, hit = cache.request(a, in_use={a})  # as the runtime asks: the key among those in use
    assert not hit and cache.request(a, in_use={a}) == (slot, False)  # copied again, where it was
    assert not cache.request(b, in_use={b})[1] and (cache.hits, cache.misses) == (0, 3)
    assert cache.holder.count(a) == 1 and cache.slot_of == {a: slot, b: 1 - slot}


def test_the_cache_never_evicts_an_expert_in_use():
    cache = SlotCache(2, "lru")
    cache.request((0, 0), set())
    cache.request((0, 1), set())
    cache.request((1, 0), in_use={(0, 0)})  # (0, 0) is the least recent but in use
    assert (0, 0) in cache.slot_of and (0, 1) not in cache.slot_of
    with pytest.raises(ValueError, match="in use"):
        cache.request((1, 1), in_use={(0, 0), (1, 0)})


def test_bad_settings_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="top_k=9 must be between 1 and n_experts=8"):
        MoEConfig(n_experts=8, top_k=9)
    with pytest.raises(ValueError, match="size='switch-xxl'"):
        MoEConfig.of_size("switch-xxl")
    with pytest.raises(ValueError, match="strategy='offload_all' is not one of"):
        ExpertOffload(build(), "offload_all", "cpu")
    with pytest.raises(ValueError, match="cache='fifo' is not one of"):
        ExpertOffload(build(), "on_demand", "cpu", cache="fifo")
    with pytest.raises(ValueError, match="needs a model built with pregate=True"):
        ExpertOffload(build(), "pregated", "cpu")
    with pytest.raises(ValueError, match="0 expert slots are too few .* it needs 1"):
        ExpertOffload(build(), "on_demand", "cpu", slots=0)
    with pytest.raises(ValueError, match="31 expert slots are too few for strategy 'prefetch_all'.* it needs 32"):
        ExpertOffload(build(), "prefetch_all", "cpu", slots=31)
    runtime = ExpertOffload(build(pregate=True), "pregated", "cpu")  # sized for one token
    with pytest.raises(ValueError, match="2 expert slots are too few .* with 6 tokens .* it needs 12"):
        runtime(tokens(2, 3))


def test_loading_switch_weights_with_another_expert_count_is_refused():
    with pytest.raises(ValueError, match="state dict has 8 experts per MoE block; the model has n_experts=16"):
        load_switch_weights(build(n_layer=4), hf_switch(8).state_dict())
    with pytest.raises(ValueError, match="decoder has 2 MoE blocks; the model has 3"):
        load_switch_weights(build(), hf_switch(EXPERTS).state_dict())
    with pytest.raises(ValueError, match="stack='middle'"):
        load_switch_weights(build(n_layer=4), {}, "middle")


# --- on a GPU ----------------------------------------------------------------------------------------------------

@gpu
def test_experts_that_could_not_be_pinned_in_place_stay_where_they_are():
    """Not copied into pinned memory beside the originals (twice the host memory), and the rows say pageable."""
    model = build(pregate=True)
    where = [f.w_in.data_ptr() for f in model.moe_layers]
    runtime = ExpertOffload(model, "on_demand", "cuda", slots=min_slots("on_demand", EXPERTS, 1, 6),
                            pin_warning="pinning the experts failed (test)")
    assert [f.w_in.data_ptr() for f in runtime.layers] == where and not runtime.layers[0].w_in.is_pinned()
    assert runtime.summary()["host_memory"] == "pageable" and runtime.summary()["pin_warning"].endswith("(test)")
    torch.testing.assert_close(runtime(tokens(2, 3)), ExpertOffload(build(pregate=True), "gpu_only", "cuda")(
        tokens(2, 3)), rtol=1e-5, atol=1e-5)


@gpu
def test_pregated_copies_run_on_a_side_stream():
    prompt = tokens(4, 3)
    reference = ExpertOffload(build(pregate=True), "gpu_only", "cuda")
    runtime = ExpertOffload(build(pregate=True), "pregated", "cuda", slots=min_slots("pregated", EXPERTS, 1, 12))
    torch.testing.assert_close(runtime(prompt), reference(prompt), rtol=1e-5, atol=1e-5)
    summary = runtime.summary()
    compute = torch.cuda.current_stream()
    copies = [s for s in runtime.stats.spans if s.kind == "copy"]
    assert copies and runtime.copy_stream != compute
    assert all(s.start.stream == runtime.copy_stream and s.end.stream == runtime.copy_stream for s in copies)
    assert all(s.start.stream == compute for s in runtime.stats.spans if s.kind != "copy")
    assert runtime.host_memory == "pinned" and all(f.w_in.is_pinned() for f in runtime.layers)
    assert 0 <= summary["hidden_copy_ms"] <= summary["copy_ms"] + 1e-3


@gpu
@pytest.mark.parametrize("strategy", ["on_demand", "pregated"])
def test_the_copy_stream_waits_on_events_that_record_no_time(monkeypatch, strategy):
    """Waiting on timed events halved the offloading strategies' tokens/s (H100, switch-large-128)."""
    waited = []
    wait_event = torch.cuda.Stream.wait_event
    runtime = ExpertOffload(build(pregate=True), strategy, "cuda", slots=min_slots(strategy, EXPERTS, 1, 3))

    def logged(stream, event):
        if stream == runtime.copy_stream:
            waited.append(event)
        return wait_event(stream, event)
    monkeypatch.setattr(torch.cuda.Stream, "wait_event", logged)
    runtime(tokens(1, 3))
    torch.cuda.synchronize()
    assert waited
    for event in waited:
        # what an event without timing answers (ValueError in torch 2.11; RuntimeError also taken, as other builds
        # may raise it from C++)
        with pytest.raises((RuntimeError, ValueError), match="enable_timing"):
            event.elapsed_time(event)


@gpu
def test_pregated_prefetches_every_later_block_and_hides_copy_time_when_its_ids_arrive_in_time(monkeypatch):
    """Where each pre-gate's ids reach the host by the next block start (forced here), every copy after the first
    MoE block is a prefetch, under compute; on_demand's are not."""
    from tasks.pregated_moe.model import Routing

    read_done = Routing.read_done

    def arrived(routing):
        if routing._arrived is not None:
            routing._arrived.synchronize()
        return read_done(routing)
    monkeypatch.setattr(Routing, "read_done", arrived)
    summaries = {}
    for strategy in ("pregated", "on_demand"):
        runtime = ExpertOffload(build(pregate=True, d_model=512, d_ff=2048), strategy, "cuda",
                                slots=min_slots(strategy, EXPERTS, 1, 4))
        runtime(tokens(4, 1))
        summaries[strategy] = runtime.summary()
    assert summaries["pregated"]["prefetched_fraction"] == 1.0 and summaries["on_demand"]["prefetched_fraction"] == 0
    assert summaries["pregated"]["hidden_copy_ms"] > summaries["on_demand"]["hidden_copy_ms"]


@gpu
def test_experts_stay_pageable_with_a_warning_when_pinning_fails(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise RuntimeError("no pinned memory left")

    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    with pytest.warns(UserWarning, match="pinning the experts failed"):
        runtime = ExpertOffload(build(), "on_demand", "cuda")
    assert runtime.host_memory == "pageable" and "no pinned memory left" in runtime.summary()["pin_warning"]
    assert runtime(tokens(1, 1)).isfinite().all()
