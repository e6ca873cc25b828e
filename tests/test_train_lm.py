"""The language-model training task's own pieces: the speedups it derives, and the Megatron-LM baseline
(megatron-core's GPT-2, GPU only)."""
from types import SimpleNamespace

import pytest
import torch

from repro.bench import Unsupported
from repro.context import ConfigError
from repro.records import Row
from tasks.flashattention.megatron_gpt import MegatronGPT, build_megatron_gpt2
from tasks.flashattention.train_lm import derived_rows


def tokens_per_s(provider, seq_len, value):
    return Row(provider, "step", 10, "tokens_per_s", "tokens/s", value, extra={"seq_len": seq_len})


def test_speedups_over_eager_megatron_sdpa_and_megatron_at_the_shortest_context():
    rows = [tokens_per_s("eager", 1024, 100.0), tokens_per_s("sdpa", 1024, 300.0),
            tokens_per_s("megatron", 1024, 150.0), tokens_per_s("effrepro", 1024, 330.0),
            tokens_per_s("megatron", 4096, 60.0), tokens_per_s("effrepro", 4096, 240.0)]
    got = {(r.provider, r.x_value, r.extra["baseline"]): r.p50 for r in derived_rows(rows)}
    assert got[("effrepro", 1024, "eager")] == pytest.approx(3.3)
    assert got[("effrepro", 1024, "megatron")] == pytest.approx(2.2)
    assert got[("effrepro", 4096, "megatron")] == pytest.approx(4.0)
    assert got[("effrepro", 1024, "sdpa")] == pytest.approx(1.1)
    assert got[("effrepro", 4096, "megatron_at_shortest")] == pytest.approx(1.6)
    assert got[("megatron", 4096, "megatron_at_shortest")] == pytest.approx(0.4)
    assert ("effrepro", 1024, "megatron_at_shortest") not in got  # the shortest context is the baseline itself


def test_each_of_our_builds_is_compared_with_sdpa_built_the_same_way():
    rows = [tokens_per_s("sdpa", 512, 100.0), tokens_per_s("sdpa+compile", 512, 120.0),
            tokens_per_s("sdpa+compile+graphs", 512, 150.0), tokens_per_s("effrepro", 512, 110.0),
            tokens_per_s("effrepro+compile+graphs", 512, 180.0), tokens_per_s("effrepro+packed+compile+graphs", 512,
                                                                             195.0)]
    got = {(r.provider, r.extra["baseline"]): r.p50 for r in derived_rows(rows)
           if r.metric == "speedup_over_sdpa_same_build"}
    assert got == {("effrepro", "sdpa"): pytest.approx(1.1), ("effrepro+compile+graphs", "sdpa+compile+graphs"):
                   pytest.approx(1.2), ("effrepro+packed+compile+graphs", "sdpa+compile+graphs"): pytest.approx(1.3)}


@pytest.mark.parametrize("scale", ["smoke", "small", "paper"])
@pytest.mark.parametrize("task", ["flash_gpt2", "flash_gpt2_long", "flash_bert"])
def test_each_of_our_builds_in_a_tasks_list_has_its_same_build_sdpa_there(compose, task, scale):
    from tasks.flashattention.train_lm import same_build_sdpa

    implementations = list(compose(f"task={task}", f"scale={scale}").attention)
    missing = {name: same_build_sdpa(name) for name in implementations
               if same_build_sdpa(name) not in (None, *implementations)}
    assert not missing, missing


@pytest.mark.skipif(torch.cuda.is_available(), reason="says why it cannot run where there is no GPU")
def test_megatron_says_why_it_cannot_run_without_a_gpu():
    with pytest.raises(Unsupported, match="no GPU"):
        build_megatron_gpt2(torch.device("cpu"), 2, 64, 2, 100, 32, 0.0, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="megatron-core's attention runs on CUDA only")
def test_megatron_gpt2_loss_is_next_token_cross_entropy_and_it_learns():
    pytest.importorskip("megatron.core")
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_megatron_gpt2(device, 2, 64, 2, 97, 48, 0.0, 0)
    x = torch.randint(0, 97, (3, 48), device=device)
    loss = model(input_ids=x, labels=x).loss
    positions = torch.arange(48, device=device).expand_as(x)
    logits = model.gpt(x, positions, None)  # (batch, seq, vocab) when no labels are given
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97).float(), x[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    assert model.non_embedding_params() < sum(p.numel() for p in model.parameters())
    changed = x.clone()
    changed[:, -1] = (x[:, -1] + 1) % 97  # a later token must not reach the logits of earlier positions
    later = model.gpt(changed, positions, None)
    torch.testing.assert_close(later[:, :-1], logits[:, :-1])
    assert not torch.allclose(later[:, -1], logits[:, -1])

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = loss.item()
    for _ in range(30):  # memorise one batch
        optimizer.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
    assert model(input_ids=x, labels=x).loss.item() < 0.5 * first


def test_a_compiled_implementation_names_its_compile_options_in_its_rows(compose):
    from tasks.flashattention.train_lm import candidates

    cfg = compose("task=flash_gpt2", "attention=[sdpa,sdpa+compile]", "compile.mode=max-autotune")
    plain, compiled = candidates(cfg, ctx=None, data=None)  # nothing built: the data and device come at build
    assert "compile" not in plain.extra
    assert compiled.extra["compile"] == {"backend": "inductor", "mode": "max-autotune"}


def test_graphs_compiles_with_cuda_graphs_and_needs_compile(compose):
    from tasks.flashattention.train_lm import candidates, validate

    cfg = compose("task=flash_gpt2", "attention=[sdpa+compile,sdpa+compile+graphs]")
    plain, graphed = candidates(cfg, ctx=None, data=None)
    assert plain.extra["compile"]["mode"] is None and graphed.extra["compile"]["mode"] == "reduce-overhead"
    with pytest.raises(ConfigError, match=r"\+graphs \(with \+compile\)"):
        validate(compose("task=flash_gpt2", "attention=[sdpa+graphs]"))
    with pytest.raises(ConfigError, match="leave compile.mode null"):
        validate(compose("task=flash_gpt2", "attention=[sdpa+compile+graphs]", "compile.mode=max-autotune"))


@pytest.mark.parametrize("implementation", ["effrepro", "effrepro+fused", "effrepro+packed"])
def test_the_gpt2_it_trains_compiles_as_one_graph_with_our_attention(monkeypatch, implementation):
    """The model flash_gpt2 builds, in training (train mode), traced by torch.compile without a graph break. Built
    with use_cache=False it was not: transformers then looks for packed sequences in the position ids and builds a
    mask that the attention must read in every layer."""
    from types import SimpleNamespace

    from conftest import DEVICE
    from effrepro_kernels.hf_attention import register
    from tasks.flashattention.train_lm import _build_model

    # as torch < 2.14 answers inside torch.compile (see test_hf_attention)
    monkeypatch.setattr("transformers.masking_utils.is_torchdynamo_exporting", lambda: True, raising=False)
    register()
    spec = SimpleNamespace(family="gpt2", size="tiny", positions=None, dropout=0.0)
    tokenizer = type("Tokenizer", (), {"__len__": lambda self: 97, "bos_token_id": 0, "eos_token_id": 0})()
    model = _build_model(spec, tokenizer, 24, implementation, DEVICE, 0, None).float().train()
    ids = torch.randint(0, 97, (2, 24), device=DEVICE)
    # the transformer, without the loss (whose one warning breaks the graph once, not per layer)
    transformer = getattr(model, "model", model).transformer  # fused: inside FusedLossLM
    compiled = torch.compile(transformer, fullgraph=True, backend="eager")  # a graph break is an error
    compiled(input_ids=ids).last_hidden_state.square().mean().backward()
    if implementation == "effrepro+fused":  # and FusedLossLM's own call of the transformer, the loss with it
        torch.compile(model, fullgraph=True, backend="eager")(input_ids=ids, labels=ids).loss.backward()


def test_a_bert_sequence_too_short_to_hold_a_masked_token_is_refused(refusal, compose):
    from tasks.flashattention.train_lm import validate

    error = refusal("task=flash_bert", "scale=smoke", "model.seq_len=[2,64]")
    assert "model.seq_len=2" in error and "at least 3" in error, error
    validate(compose("task=flash_bert", "scale=smoke", "model.seq_len=[3,64]", "batch.tokens=192"))
    validate(compose("task=flash_gpt2", "scale=smoke", "model.seq_len=[2,64]"))  # GPT-2 predicts from 2 tokens


def test_a_misspelt_compile_backend_is_refused_before_any_implementation_trains(refusal, compose):
    from tasks.flashattention.train_lm import validate

    error = refusal("task=flash_gpt2", "scale=smoke", "attention=[sdpa,sdpa+compile]", "compile.backend=inductr")
    assert "compile.backend='inductr'" in error and "'inductor'" in error and "'aot_eager'" in error
    validate(compose("task=flash_gpt2", "scale=smoke", "attention=[sdpa+compile]", "compile.backend=aot_eager"))
    validate(compose("task=flash_gpt2", "scale=smoke", "attention=[sdpa]", "compile.backend=inductr"))  # unused


@pytest.mark.parametrize("attention, given, expected", [
    ("[sdpa,effrepro]", "compile.backend=aot_eager", "compile.backend='aot_eager' would have no effect: only the "
                                                     "implementations with +compile read it"),
    ("[sdpa,sdpa+compile+graphs]", "compile.mode=reduce-overhead",
     "compile.mode='reduce-overhead' would have no effect: +graphs compiles with mode reduce-overhead"),
])
def test_a_compile_setting_no_implementation_reads_is_refused(job_refusal, compose, attention, given, expected):
    from repro.cli import check_job
    message = job_refusal("task=flash_gpt2", "scale=smoke", f"attention={attention}", given)
    assert message.startswith(expected), message
    taken = ["task=flash_gpt2", "scale=smoke", "attention=[sdpa,sdpa+compile,sdpa+compile+graphs]", given]
    check_job(compose(*taken), taken)


def test_the_bert_paper_recipe_decays_the_learning_rate_linearly_to_zero_as_mlperfs(compose):
    from repro.train import TrainSpec, _lr_at

    spec = TrainSpec.from_config(compose("task=flash_bert", "scale=paper").train)
    assert spec.optimizer == "lamb"
    decay = spec.steps - spec.warmup_steps
    for left in (1.0, 0.75, 0.5, 0.0):
        assert _lr_at(spec.steps - round(left * decay), spec) == pytest.approx(left * spec.lr)


def test_packed_is_our_attention_alone_on_gpt2(compose):
    from tasks.flashattention.train_lm import validate

    validate(compose("task=flash_gpt2", "attention=[effrepro+packed+compile]"))
    for attention, message in (("sdpa+packed", "for 'effrepro' alone"), ("effrepro+fused+packed", "has it already"),
                               ("effrepro+packed+packed", "each once")):
        with pytest.raises(ConfigError, match=message):
            validate(compose("task=flash_gpt2", f"attention=[{attention}]"))
    with pytest.raises(ConfigError, match="swap GPT-2's modules"):
        validate(compose("task=flash_bert", "attention=[effrepro+packed]"))


def test_bert_masking_predicts_15_percent_and_replaces_them_80_10_10():
    """BERT's recipe, on enough tokens that the shares are tight: special tokens are never chosen; of the chosen,
    80% become <mask>, 10% a random token (which may by chance be the same one) and 10% stay."""
    from tasks.flashattention.train_lm import _mask_tokens
    tokenizer = type("Tokenizer", (), dict(all_special_ids=[0, 1, 2], mask_token_id=2, __len__=lambda self: 1000))()
    x = torch.randint(3, 1000, (400, 500))
    x[:, 0] = 0  # a special token in every row
    masked, labels = _mask_tokens(x, tokenizer, torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert not chosen[:, 0].any() and torch.equal(labels[chosen], x[chosen])
    assert chosen[:, 1:].float().mean().item() == pytest.approx(0.15, abs=0.003)
    as_mask = (masked[chosen] == 2).float().mean().item()
    kept = (masked[chosen] == x[chosen]).float().mean().item()
    assert as_mask == pytest.approx(0.8, abs=0.01) and kept == pytest.approx(0.1 + 0.1 / 997, abs=0.01)
    assert torch.equal(masked[~chosen], x[~chosen])


def test_evaluation_reads_the_validation_part_not_the_training_part(compose, monkeypatch):
    """The training batches come from data.train and the evaluation batches from data.val (ids apart here)."""
    from tasks.flashattention import train_lm

    drawn = []
    real = train_lm.make_batch

    def spy(family, ids, batch, seq_len, tokenizer, gen):
        drawn.append(int(ids[0]))
        return real(family, ids, batch, seq_len, tokenizer, gen)
    monkeypatch.setattr(train_lm, "make_batch", spy)

    class Model(torch.nn.Module):  # what evaluate asks of a model: a loss
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids, labels):
            return SimpleNamespace(loss=self.w + 1.0)
    monkeypatch.setattr(train_lm, "_build_model", lambda *args: Model())
    cfg = compose("task=flash_gpt2", "attention=[eager]")
    data = SimpleNamespace(train=torch.full((5000,), 7, dtype=torch.int32),
                           val=torch.full((5000,), 9, dtype=torch.int32), tokenizer=None, fingerprint="")
    (candidate,) = list(train_lm.candidates(cfg, SimpleNamespace(device=torch.device("cpu")), data))
    trainee = candidate.build()
    trainee.batches(0, 0, 1)
    assert drawn == [7] * cfg.train.grad_accum
    drawn.clear()
    trainee.evaluate(trainee.model)
    assert drawn and set(drawn) == {9}


def test_mlm_validation_loss_is_the_mean_over_masked_tokens_not_over_batches(compose, monkeypatch):
    from tasks.flashattention import train_lm

    counts = []

    class Model(torch.nn.Module):  # a batch's mean loss is the number of tokens it masked
        def forward(self, input_ids, labels, **rest):
            n = int((labels != -100).sum())
            counts.append(n)
            return SimpleNamespace(loss=torch.tensor(float(n)), logits=torch.zeros(*labels.shape, 2))
    monkeypatch.setattr(train_lm, "_build_model", lambda *args: Model())
    cfg = compose("task=flash_bert", "attention=[eager]", "model.size=tiny", "model.seq_len=64", "batch.tokens=64",
                  "eval.batches=6")
    tokenizer = type("Tokenizer", (), dict(all_special_ids=[0, 1, 2], cls_token_id=0, sep_token_id=1, mask_token_id=2,
                                           __len__=lambda self: 1000))()
    data = SimpleNamespace(train=torch.randint(3, 1000, (5000,), dtype=torch.int32),
                           val=torch.randint(3, 1000, (5000,), dtype=torch.int32), tokenizer=tokenizer,
                           fingerprint="")
    (candidate,) = list(train_lm.candidates(cfg, SimpleNamespace(device=torch.device("cpu")), data))
    trainee = candidate.build()
    rows = {r.metric: r.p50 for r in trainee.evaluate(trainee.model)}
    assert len(counts) == 6 and len(set(counts)) > 1
    assert rows["val_loss"] == pytest.approx(sum(n * n for n in counts) / sum(counts))


class _FakeMegatronGPT(torch.nn.Module):
    """megatron-core's GPTModel as MegatronGPT calls it: a per-token score against the label at each position
    (here 1 where the label equals the input there), and an embedding with word and position tables."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Module()
        self.embedding.word_embeddings = torch.nn.Embedding(11, 4)
        self.embedding.position_embeddings = torch.nn.Embedding(8, 4)
        self.decoder = torch.nn.Linear(4, 4)

    def forward(self, input_ids, positions, mask, labels):
        return (labels == input_ids).float()


def test_megatron_wrapper_scores_each_token_against_the_next_and_counts_the_tied_vocabulary_product():
    model = MegatronGPT(_FakeMegatronGPT())
    x = torch.tensor([[1, 1, 2, 2, 3]])
    assert model(input_ids=x, labels=x).loss.item() == 0.5  # (1,1) (1,2) (2,2) (2,3): the last has no next token
    total = sum(p.numel() for p in model.parameters())
    assert model.non_embedding_params() == total - 8 * 4  # the word table is the output layer's weight too
