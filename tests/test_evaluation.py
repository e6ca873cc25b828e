"""Evaluation text, perplexity by the papers' protocol, and few-shot multiple choice through lm-evaluation-harness:
held to hand computations on a tiny random Llama (fp32, fresh random ids, odd sizes)."""
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CONF, local_corpus, run_inline, run_repro
from hydra import compose, initialize_config_dir
from lm_eval.api.instance import Instance

from repro import lm_harness
from repro.context import ConfigError
from repro.evaluation import PerplexityResult, eval_text, perplexity, perplexity_rows, unigram_perplexity
from repro.lm_harness import LOCAL_TASKS, EffreproLM, evaluate_multiple_choice, multiple_choice_rows
from repro.models import byte_tokenizer, load_model

FIXTURE = LOCAL_TASKS / "effrepro_mc" / "effrepro_mc.jsonl"


@pytest.fixture
def local_task(tmp_path, monkeypatch):
    """A copy of our local task's folder, read in place of repro/lm_tasks/: a test may change it."""
    folder = tmp_path / "lm_tasks"
    shutil.copytree(LOCAL_TASKS, folder)
    monkeypatch.setattr(lm_harness, "LOCAL_TASKS", folder)
    for manager in (lm_harness._local_task_manager, lm_harness._full_task_manager):
        manager.cache_clear()
    yield folder / "effrepro_mc"
    for manager in (lm_harness._local_task_manager, lm_harness._full_task_manager):
        manager.cache_clear()


def task_variant(task: Path, name: str, *replace: tuple[str, str]) -> Path:
    """A copy of the local task's folder `task` beside it, as the task `name`, its YAML changed by `replace`
    ((old, new) pairs)."""
    folder = task.with_name(name)
    shutil.copytree(task, folder)
    config = folder / "effrepro_mc.yaml"
    text = config.read_text().replace("task: effrepro_mc", f"task: {name}")
    for old, new in replace:
        assert old in text, old
        text = text.replace(old, new)
    config.write_text(text)
    return folder


@pytest.fixture(scope="module")
def tiny():
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("model/tiny_llama", overrides=["model.arch.context=320"]).model
    return load_model(cfg, "cpu")


def random_ids(n: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_perplexity_equals_a_hand_computation_over_chunks_and_tokens(tiny):
    model, tok = tiny
    seqlen = 11
    ids = random_ids(5 * seqlen + 7, len(tok))
    result = perplexity(model, ids, seqlen, batch_size=2, progress=False)
    nll, scored = 0.0, 0
    for c in range(5):
        chunk = ids[c * seqlen:(c + 1) * seqlen]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(chunk[None]).logits[0].double(), -1)
        for t in range(1, seqlen):  # the first token of a chunk has no context: not scored
            nll -= log_probs[t - 1, chunk[t]].item()
            scored += 1
    assert (result.chunks, result.tokens, result.dropped) == (5, scored, 7)
    assert result.nll_sum == pytest.approx(nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll / scored), rel=1e-5)


def test_chunks_do_not_overlap_and_a_partial_last_chunk_is_dropped(tiny):
    model, tok = tiny
    ids = random_ids(3 * 8 + 5, len(tok), seed=2)
    seen = []

    def forward(model, chunk_ids):
        seen.append(chunk_ids.cpu())
        return model(input_ids=chunk_ids).logits
    result = perplexity(model, ids, 8, batch_size=2, forward=forward, progress=False)
    assert [tuple(s.shape) for s in seen] == [(2, 8), (1, 8)]
    assert torch.equal(torch.cat(seen).flatten(), ids[:24])
    assert (result.chunks, result.tokens, result.dropped) == (3, 3 * 7, 5)


def test_perplexity_is_that_of_the_substituted_forward(tiny):
    model, _ = tiny
    vocab = 50
    ids = random_ids(4 * 16 + 3, vocab, seed=3)
    uniform = perplexity(model, ids, 16, forward=lambda m, x: torch.zeros(*x.shape, vocab), progress=False)
    assert uniform.ppl == pytest.approx(vocab, rel=1e-6)

    def oracle(model, x):  # all the probability on the true next token
        logits = torch.full((*x.shape, vocab), -1e4)
        logits[:, :-1].scatter_(-1, x[:, 1:, None], 0.0)
        return logits
    assert perplexity(model, ids, 16, forward=oracle, progress=False).ppl == pytest.approx(1.0)


def test_unigram_perplexity_is_add_one_frequencies_on_the_scored_tokens():
    train = torch.tensor([0, 0, 0, 1, 2, 2])  # counts + 1 over a vocabulary of 4: 4, 2, 3, 1 of 10
    ids = torch.tensor([3, 0, 2, 1, 0, 0, 3])  # chunks [3 0 2] [1 0 0], 3 dropped; scored: 0 2 0 0
    result = unigram_perplexity(train, ids, 3, vocab_size=4)
    nll = -(3 * math.log(0.4) + math.log(0.3))
    assert (result.tokens, result.chunks, result.dropped) == (4, 2, 1)
    assert result.nll_sum == pytest.approx(nll)
    assert result.ppl == pytest.approx(math.exp(nll / 4))


def test_a_seqlen_longer_than_the_models_context_is_a_config_error(tiny):
    model, tok = tiny
    with pytest.raises(ConfigError, match=r"eval.seqlen=321 is longer than the model's context of 320 .*eval.seqlen "
                                          r"<= 320"):
        perplexity(model, random_ids(700, len(tok)), 321, progress=False)


def test_an_eval_seqlen_longer_than_a_built_models_context_is_refused_before_loading(refusal):
    assert "eval.seqlen=1000 is longer than the model's context of 256 tokens (model.arch.context)" in refusal(
        "task=lm_eval", "model=tiny_llama", "eval.seqlen=1000")


@pytest.mark.parametrize("given, expected", [
    ("eval.seqlen=128", "eval.seqlen=128 would have no effect: it is how the evaluation texts are cut, and "
                        "eval.texts=[] measures none"),
    ("eval.limit=5", "eval.limit=5 would have no effect: it is how the multiple-choice tasks are asked, and "
                     "eval.tasks=[] runs none"),
])
def test_lm_eval_refuses_a_setting_of_what_it_does_not_measure(job_refusal, given, expected):
    message = job_refusal("task=lm_eval", "model=tiny_llama", "eval.texts=[]", "eval.tasks=[]", given)
    assert message.startswith(expected), message


def test_lm_eval_without_texts_is_not_held_to_their_length(compose):
    """eval.seqlen, unread, could not be set right: the command line refuses it."""
    from repro.cli import check_job
    given = ["task=lm_eval", "model=tiny_llama", "scale=small", "eval.texts=[]", "eval.tasks=[]"]  # seqlen 1024 > 256
    check_job(compose(*given), given)


def test_the_trained_models_own_validation_rows_count_the_tokens_scored(tmp_path):
    code, _, err = run_inline("task=lm_eval", "model=trained_tiny", f"model.cache={tmp_path}", "eval.texts=[]",
                              "eval.tasks=[]", "logger=none", f"hydra.run.dir={tmp_path}/job")
    assert code == 0, err[-2000:]
    record = json.loads((tmp_path / "job" / "record.json").read_text())
    rows = [row for row in record["rows"] if row["x_value"] == "stdlib_val"]
    scored = record["env"]["trained_model"]["scored_tokens"]
    assert len(rows) == 2 and scored > 1000 and all(row["n"] == scored for row in rows)


def test_a_text_shorter_than_one_chunk_is_a_config_error(tiny):
    model, tok = tiny
    with pytest.raises(ConfigError, match=r"has 10 tokens, fewer than one chunk of eval.seqlen=16"):
        perplexity(model, random_ids(10, len(tok)), 16, progress=False)
    with pytest.raises(ConfigError, match=r"seqlen=1 scores nothing"):
        perplexity(model, random_ids(10, len(tok)), 1, progress=False)


def test_pydoc_text_is_pythons_english_prose_tokenized_whole():
    from pydoc_data.topics import topics

    tok = byte_tokenizer()
    ids = eval_text("pydoc", tok)
    text = "\n\n".join(topics.values())
    assert ids.dtype == torch.long and ids.dim() == 1
    assert len(ids) == len(text.encode()) > 400_000  # one token per byte
    assert tok.decode(ids) == text


def test_stdlib_text_is_the_held_out_part_of_the_corpus(tmp_path):
    spec = local_corpus(tmp_path / "corpus", [f"def function_{i}(x):\n    return x + {i}\n" * 5 for i in range(10)])
    tok = byte_tokenizer()
    text = tok.decode(eval_text("stdlib", tok, data=spec, cache=tmp_path / "cache"))
    assert "function_8" in text and "function_9" in text  # the last 20% of the documents
    assert not any(f"function_{i}" in text for i in range(8))


def test_stdlib_text_is_split_into_documents_where_the_corpus_joined_them(tmp_path):
    """A tokenizer without an end-of-text token joins the documents with its separator (BERT's); the text was
    split on the end-of-text token alone, so it was empty."""
    without_eos = byte_tokenizer()
    without_eos.eos_token, without_eos.sep_token = None, "</s>"
    without_eos.save_pretrained(tmp_path / "tokenizer")
    documents = [f"def function_{i}(x):\n    return x + {i}\n" for i in range(4)]
    spec = local_corpus(tmp_path / "corpus", documents, val_fraction=0.5, tokenizer=str(tmp_path / "tokenizer"))
    tok = byte_tokenizer()
    assert tok.decode(eval_text("stdlib", tok, data=spec, cache=tmp_path / "cache")) == "\n\n".join(documents[2:])


def test_a_special_tokens_string_in_an_evaluation_text_is_text(tmp_path):
    documents = [f"html = '<s>{i}</s>'\n" * 3 for i in range(4)]
    spec = local_corpus(tmp_path / "corpus", documents, val_fraction=0.5)
    tok = byte_tokenizer()
    ids = eval_text("stdlib", tok, data=spec, cache=tmp_path / "cache")
    assert tok.decode(ids) == "\n\n".join(documents[2:])  # the held-out documents whole, not cut at '</s>'
    assert not {tok.bos_token_id, tok.eos_token_id} & set(ids.tolist())


def test_an_unknown_evaluation_text_is_a_config_error_naming_the_known_ones():
    with pytest.raises(ConfigError, match=r"'wikitext3' is not one of .*'pydoc'.*'wikitext2'.*'c4'"):
        eval_text("wikitext3", byte_tokenizer())


def test_a_hub_evaluation_text_offline_says_the_hub_is_not_reachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"'wikitext2' .*could not be loaded \(ConnectionError: .*\): the .*Hub "
                                          r"is not reachable.*use stdlib or pydoc"):
        eval_text("wikitext2", byte_tokenizer())


def test_ptb_is_read_from_the_hubs_parquet_conversion(monkeypatch):
    """Its repository is a loading script, which datasets 4 and later refuse to run."""
    import datasets

    asked = []

    def load_dataset(**kwargs):
        asked.append(kwargs)
        return datasets.Dataset.from_dict({"sentence": ["no it was n't black monday", "but while the new york"]})
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    tok = byte_tokenizer()
    assert tok.decode(eval_text("ptb", tok)) == "no it was n't black monday but while the new york"
    assert asked == [dict(path="ptb-text-only/ptb_text_only", revision="refs/convert/parquet", split="test")]


def test_c4_is_the_first_1100_documents_of_one_validation_shard_as_gptq_reads_it(monkeypatch):
    """The number Compress-then-Prompt's C4 perplexity is measured on (GPTQ's datautils): no test held it."""
    import datasets

    asked = []

    def load_dataset(**kwargs):
        asked.append(kwargs)
        return datasets.Dataset.from_dict({"text": [f"doc{i}" for i in range(1200)], "url": ["u"] * 1200})
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    tok = byte_tokenizer()
    assert tok.decode(eval_text("c4", tok)) == " ".join(f"doc{i}" for i in range(1100))
    assert asked == [dict(path="allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                          split="validation")]


def test_a_hub_text_that_fails_otherwise_than_by_the_hub_blames_no_hub(monkeypatch):
    import datasets

    def load_dataset(**kwargs):
        raise RuntimeError("Dataset scripts are no longer supported, but found ptb_text_only.py")
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(ConfigError) as error:
        eval_text("ptb", byte_tokenizer())
    assert str(error.value) == ("evaluation text 'ptb' (ptb-text-only/ptb_text_only) could not be loaded "
                                "(RuntimeError: Dataset scripts are no longer supported, but found ptb_text_only.py); "
                                "use stdlib or pydoc instead")


def test_perplexity_rows_carry_ppl_and_nats_per_token():
    result = PerplexityResult(ppl=math.exp(2.5), nll_sum=25.0, tokens=10, chunks=2, dropped=3)
    rows = perplexity_rows(result, "full_cache", "kv_budget", 0.5, {"text": "pydoc"})
    assert [(r.metric, r.unit) for r in rows] == [("perplexity", "ppl"), ("nll", "nats/token")]
    assert [r.p50 for r in rows] == pytest.approx([math.exp(2.5), 2.5])
    assert all(r.n == 10 and r.x_value == 0.5 and r.extra["text"] == "pydoc" and r.extra["dropped_tokens"] == 3
               for r in rows)


def requests(pairs):
    return [Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


def test_the_lm_eval_wrapper_scores_a_choice_as_a_direct_forward_pass(tiny):
    model, tok = tiny
    pairs = [("Question: what is 2 + 2?\nAnswer:", " 4"), ("The sky is", " blue and wide"), ("A", " b"),
             ("", "no context at all")]
    got = EffreproLM(model, tok, batch_size=3).loglikelihood(requests(pairs), disable_tqdm=True)
    for (context, continuation), (loglikelihood, greedy) in zip(pairs, got):
        prefix = tok.encode(context, add_special_tokens=False) or [tok.eos_token_id]  # lm-eval's empty context
        target = tok.encode(continuation, add_special_tokens=False)
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([prefix + target])).logits[0].double(), -1)
        predicted = log_probs[len(prefix) - 1:len(prefix) - 1 + len(target)]
        assert loglikelihood == pytest.approx(sum(predicted[j, t].item() for j, t in enumerate(target)), rel=1e-5)
        assert greedy == (predicted.argmax(-1).tolist() == target)


def test_a_context_gets_the_bos_its_tokenizer_adds_once_as_in_lm_eval(tiny):
    from tokenizers import processors

    model, tok = tiny
    with_bos = byte_tokenizer()
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", with_bos.bos_token_id)])
    pairs = [("The sky is", " blue"), ("<s>The sky is", " blue")]  # a BOS already there is not doubled
    got = EffreproLM(model, with_bos).loglikelihood(requests(pairs), disable_tqdm=True)
    ids = [tok.bos_token_id] + tok.encode("The sky is blue", add_special_tokens=False)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    expected = sum(log_probs[len(ids) - 6 + j, t].item() for j, t in enumerate(ids[-5:]))
    assert [x for x, _ in got] == pytest.approx([expected, expected], rel=1e-5)


def test_an_empty_context_is_the_bos_where_the_tokenizer_adds_one_else_the_end_of_text(tiny):
    """As every other context begins: with a tokenizer that adds a BOS (Llama's) it was the end-of-text."""
    from tokenizers import processors

    model, tok = tiny
    with_bos = byte_tokenizer()
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", with_bos.bos_token_id)])
    target = tok.encode(" blue sky", add_special_tokens=False)
    for tokenizer, prefix in ((with_bos, tok.bos_token_id), (tok, tok.eos_token_id)):
        (got, _), = EffreproLM(model, tokenizer).loglikelihood(requests([("", " blue sky")]), disable_tqdm=True)
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([[prefix] + target])).logits[0].double(), -1)
        assert got == pytest.approx(sum(log_probs[j, t].item() for j, t in enumerate(target)), rel=1e-5)


def test_with_equal_lengths_a_score_sees_no_padding_and_the_same_answers(tiny):
    """A KV budget taken as a fraction of the batch's length must see each request's own length."""
    model, tok = tiny
    pairs = [("The sky is", " blue"), ("A", " b"), ("The sea is", " green"), ("Question: why?", " Because."),
             ("A", " c"), ("B", " d")]
    seen = []

    def score(m, ids):
        seen.append(ids.clone())
        return m(ids).logits
    lengths = lambda ids: {int((row != tok.eos_token_id).sum()) for row in ids}  # noqa: E731 - no padding: one
    plain = EffreproLM(model, tok, batch_size=4).loglikelihood(requests(pairs), disable_tqdm=True)
    equal = EffreproLM(model, tok, score=score, batch_size=2, equal_lengths=True).loglikelihood(
        requests(pairs), disable_tqdm=True)
    assert all(len(lengths(ids)) == 1 and ids.shape[0] <= 2 for ids in seen)
    assert [x for x, _ in equal] == pytest.approx([x for x, _ in plain], rel=1e-5)
    assert sum(ids.shape[0] for ids in seen) == len(pairs)


def width_recorder():
    """A `score` for EffreproLM that records the width of each batch it scores, and that list."""
    widths = []

    def score(model, ids):
        widths.append(ids.shape[1])
        return model(input_ids=ids).logits
    return score, widths


def test_a_context_longer_than_the_model_takes_is_cut_from_the_left(tiny):
    model, tok = tiny
    score, widths = width_recorder()
    lm = EffreproLM(model, tok, score=score)
    lm.max_length = 16
    context, continuation = "a context longer than sixteen bytes", " answer"
    (loglikelihood, _), = lm.loglikelihood(requests([(context, continuation)]), disable_tqdm=True)
    target = tok.encode(continuation, add_special_tokens=False)
    seen = tok.encode(context + continuation, add_special_tokens=False)[-17:-1]  # the last 16 of the input
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([seen])).logits[0].double(), -1)
    expected = sum(log_probs[16 - len(target) + j, t].item() for j, t in enumerate(target))
    assert widths == [16] and loglikelihood == pytest.approx(expected, rel=1e-5)


def test_an_answer_longer_than_the_models_context_is_a_clear_error(tiny):
    model, tok = tiny
    request = Instance("loglikelihood", doc={}, arguments=("Q:", " x" * 200), idx=0, metadata=("long_task", 0, 1))
    with pytest.raises(ConfigError, match=r"lm-eval task 'long_task' has an answer of 400 tokens \(' x x.*\), more "
                                          r"than the model's context of max_length=320 tokens"):
        EffreproLM(model, tok).loglikelihood([request], disable_tqdm=True)


def test_the_lm_eval_wrapper_scores_through_the_callable_it_is_given(tiny):
    model, tok = tiny
    uniform = EffreproLM(model, tok, score=lambda m, ids: torch.zeros(*ids.shape, len(tok)))
    (loglikelihood, _), = uniform.loglikelihood(requests([("ab", "cde")]), disable_tqdm=True)
    assert loglikelihood == pytest.approx(-3 * math.log(len(tok)))


def test_the_local_task_fixture_has_four_distinct_choices_and_one_answer_each():
    items = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    assert 40 <= len(items) <= 60
    assert len({item["question"] for item in items}) == len(items)
    for item in items:
        assert len(set(item["choices"])) == len(item["choices"]) == 4 and item["answer"] in range(4), item
    positions = [item["answer"] for item in items]
    assert min(positions.count(p) for p in range(4)) >= len(items) // 5  # no answer position dominates


def test_the_local_task_runs_end_to_end_and_scores_every_question(tiny):
    model, tok = tiny
    score, widths = width_recorder()
    scores = evaluate_multiple_choice(EffreproLM(model, tok, score=score), ["effrepro_mc"])["effrepro_mc"]
    items = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    # by hand: a question is right where its answer's log-likelihood after the prompt (acc), or that per
    # character of the answer (acc_norm), is the highest
    asked = [(f"Question: {item['question']}\nAnswer:", f" {choice}") for item in items for choice in item["choices"]]
    scored = [x for x, _ in EffreproLM(model, tok).loglikelihood(requests(asked), disable_tqdm=True)]

    def accuracy(per_choice):
        return sum(max(range(4), key=lambda c: per_choice(4 * i + c, item["choices"][c])) == item["answer"]
                   for i, item in enumerate(items)) / len(items)
    acc = accuracy(lambda k, choice: scored[k])
    assert scores["n"] == len(items) and scores["acc"] == pytest.approx(acc)
    assert scores["acc_norm"] == pytest.approx(accuracy(lambda k, choice: scored[k] / len(choice)))
    assert scores["stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (len(items) - 1)))  # the sample's
    zero_shot = max(widths)
    widths.clear()
    few_shot = evaluate_multiple_choice(EffreproLM(model, tok, score=score), ["effrepro_mc"], num_fewshot=3, limit=4)
    assert (few_shot["effrepro_mc"]["n"], few_shot["effrepro_mc"]["num_fewshot"]) == (4, 3)
    assert max(widths) > zero_shot  # the examples are in the prompt
    rows = multiple_choice_rows(few_shot, "tiny_llama", "num_fewshot", 3)
    assert {(r.metric, r.unit, r.n, r.extra["benchmark"], r.extra["num_fewshot"]) for r in rows} == {
        ("accuracy", "fraction", 4, "effrepro_mc", 3), ("accuracy_norm", "fraction", 4, "effrepro_mc", 3)}



@pytest.mark.slow
def test_offline_an_lm_eval_task_missing_from_the_cache_is_refused_before_any_work(tmp_path, monkeypatch):
    """It measured the perplexity rows, then failed loading the task."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache, whatever this machine's holds
    result = run_repro("task=lm_eval", "model=tiny_llama", "eval.tasks=[hellaswag]", "logger=none",
                       f"paths.cache={tmp_path}/cache", f"hydra.run.dir={tmp_path}/job")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "eval.tasks: lm-eval tasks ['hellaswag'] could not be loaded" in result.stderr
    assert "(offline mode: HF_HUB_OFFLINE=1)" in result.stderr
    assert json.loads((tmp_path / "job" / "record.json").read_text())["rows"] == []


def test_a_local_task_that_cannot_be_loaded_says_why_and_blames_no_hub(tiny, local_task, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    questions = local_task / "effrepro_mc.jsonl"
    questions.write_text(questions.read_text() + '{"question": "a line cut short", "choi\n')
    with pytest.raises(ConfigError) as error:
        evaluate_multiple_choice(EffreproLM(*tiny), ["effrepro_mc"])
    assert "lm-eval tasks ['effrepro_mc'] (ours, in" in str(error.value) and "Hub" not in str(error.value)
    assert "JSON parse error" in str(error.value)  # what datasets said: its exception's cause


def test_an_evaluation_logs_neither_lm_evals_progress_nor_its_advice_on_its_own_cli(tiny, caplog):
    """Each evaluation (dozens in a sweep) logged 'Building contexts ...', 'Running loglikelihood requests' and,
    for effrepro_mc, lm-eval's advice on the `--metadata` flag of its CLI: evaluate()'s verbosity is a no-op."""
    evaluate_multiple_choice(EffreproLM(*tiny), ["effrepro_mc"], limit=1)
    logging.getLogger("lm_eval.api.task").warning("effrepro_mc: a warning about a task still shows")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("lm_eval")] == [
        "effrepro_mc: a warning about a task still shows"]
    assert not logging.getLogger("lm_eval.evaluator").isEnabledFor(logging.INFO)


def test_the_standard_error_of_a_single_question_is_none(tiny):
    """lm-eval gives it as the string 'N/A', which went into the rows' extras."""
    scores = evaluate_multiple_choice(EffreproLM(*tiny), ["effrepro_mc"], limit=1)
    assert scores["effrepro_mc"]["n"] == 1 and scores["effrepro_mc"]["stderr"] is None
    assert all(row.extra["stderr"] is None for row in multiple_choice_rows(scores, "tiny_llama", "shots", 0))


def test_a_task_whose_config_pins_zero_shot_stays_zero_shot_as_in_lm_eval(tiny, local_task):
    config = local_task / "effrepro_mc.yaml"
    config.write_text(config.read_text() + "num_fewshot: 0\n")
    model, tok = tiny
    recorders = {shots: width_recorder() for shots in (0, 3)}
    asked = {shots: evaluate_multiple_choice(EffreproLM(model, tok, score=score), ["effrepro_mc"],
                                             num_fewshot=shots, limit=4)["effrepro_mc"]
             for shots, (score, _) in recorders.items()}
    assert asked[3]["num_fewshot"] == asked[0]["num_fewshot"] == 0 and recorders[3][1] == recorders[0][1]


def test_lm_evals_task_index_is_built_once_a_process(local_task, monkeypatch):
    """Indexing lm-eval's own tasks takes about 10 s; it was done again for each distinct list of tasks asked for
    (the offline check asks for each task alone)."""
    import lm_eval.tasks

    defaults = local_task.parent.parent / "lm_eval_defaults"  # stands in for lm-eval's own tasks
    defaults.mkdir()
    for name in ("alpha_mc", "beta_mc"):
        shutil.move(task_variant(local_task, name), defaults / name)
    built = []

    class Counting(lm_eval.tasks.TaskManager):
        def __init__(self, include_path=None, include_defaults=True, **kwargs):
            built.append(include_defaults)
            paths = [defaults, include_path] if include_defaults else include_path
            super().__init__(include_path=paths, include_defaults=False, **kwargs)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Counting)
    for tasks in (("alpha_mc",), ("beta_mc",), ("alpha_mc", "effrepro_mc"), ("effrepro_mc",)):
        assert set(tasks) <= set(lm_harness.task_manager(tasks).all_tasks)
    assert built.count(True) == 1


@pytest.fixture
def unserved_tasks(local_task):
    """Beside our local task: tasks EffreproLM cannot score (generation, rolling log-likelihood, no acc metric),
    one it can (single log-likelihoods), and groups of them."""
    kind = "output_type: multiple_choice"
    acc, acc_norm = ("  - metric: {}\n    aggregation: mean\n    higher_is_better: true\n".format(m)
                     for m in ("acc", "acc_norm"))
    task_variant(local_task, "effrepro_gen", (kind, "output_type: generate_until"))
    task_variant(local_task, "effrepro_rolling", (kind, "output_type: loglikelihood_rolling"))
    task_variant(local_task, "effrepro_norm", (acc, ""))
    # a tag (lm-eval's name for several tasks that is no group): each of its tasks is checked
    task_variant(local_task, "effrepro_tagged_gen", (kind, "output_type: generate_until"),
                 ("task: effrepro_tagged_gen\n", "task: effrepro_tagged_gen\ntag: effrepro_tag\n"))
    # the right answer's log-likelihood alone (acc: whether it is the greedy continuation)
    task_variant(local_task, "effrepro_single", (kind, "output_type: loglikelihood"), ("doc_to_choice: choices\n", ""),
                 ("doc_to_target: answer", "doc_to_target: \"{{' ' + choices[answer]}}\""), (acc_norm, ""))
    (local_task.parent / "groups.yaml").write_text("group: effrepro_served\ntask: [effrepro_mc, effrepro_single]\n")
    (local_task.parent / "mixed.yaml").write_text("group: effrepro_mixed\ntask: [effrepro_mc, effrepro_gen]\n")
    # a group's entry may set what its member is scored by
    (local_task.parent / "pinned.yaml").write_text(
        "group: effrepro_pinned\ntask:\n  - task: effrepro_mc\n    metric_list: [{metric: acc_norm}]\n")
    return local_task


@pytest.mark.parametrize("tasks, refusal", [
    (["effrepro_gen"], "lm-eval task 'effrepro_gen' has output_type='generate_until', which EffreproLM does not "
                       "serve: it answers log-likelihood requests only, output_type one of ['multiple_choice', "
                       "'loglikelihood']"),
    (["effrepro_mc", "effrepro_rolling"], "lm-eval task 'effrepro_rolling' has output_type='loglikelihood_rolling'"),
    (["effrepro_norm"], "lm-eval task 'effrepro_norm' has no 'acc' metric (its metrics: ['acc_norm'])"),
    (["effrepro_mixed"], "lm-eval task 'effrepro_gen' (of 'effrepro_mixed') has output_type='generate_until'"),
    (["effrepro_pinned"], "lm-eval task 'effrepro_mc' (of 'effrepro_pinned') has no 'acc' metric"),
    (["effrepro_tag"], "lm-eval task 'effrepro_tagged_gen' (of 'effrepro_tag') has output_type='generate_until'"),
])
def test_a_task_the_model_cannot_score_is_refused_before_any_work(unserved_tasks, monkeypatch, tasks, refusal):
    """A generation task passed the checks, then failed the run after every perplexity was measured
    (NotImplementedError); a task without acc failed with a KeyError. Online no task is built before the run: its
    YAML says."""
    import datasets

    from tasks.common.lm_eval import check_tasks

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with pytest.raises(ConfigError) as error:
        check_tasks("eval.tasks", tasks)
    assert str(error.value).startswith(f"eval.tasks: {refusal}")
    check_tasks("eval.tasks", ["effrepro_mc", "effrepro_served"])


@pytest.mark.parametrize("task, refusal", [("effrepro_gen", "output_type='generate_until'"),
                                           ("effrepro_norm", "no 'acc' metric")])
def test_a_task_the_model_cannot_score_is_refused_as_it_is_built(tiny, unserved_tasks, task, refusal):
    score, widths = width_recorder()
    with pytest.raises(ConfigError, match=f"lm-eval task '{task}' has {refusal}"):
        evaluate_multiple_choice(EffreproLM(*tiny, score=score), [task])
    assert widths == []  # refused before any request was scored


def test_a_single_log_likelihood_task_is_served(tiny, unserved_tasks):
    scores = evaluate_multiple_choice(EffreproLM(*tiny), ["effrepro_served"], limit=4)
    assert set(scores) == {"effrepro_mc", "effrepro_single"}
    assert scores["effrepro_single"]["n"] == 4 and scores["effrepro_single"]["acc_norm"] is None


@pytest.mark.parametrize("model, cache", [("trained_tiny", "/models"), ("tiny_llama", "/shared")])
def test_a_trained_models_stdlib_text_is_read_from_the_cache_it_was_trained_with(compose, monkeypatch, model, cache):
    """Read under paths.cache where model.cache is another, its corpus's tokenizer was trained there again. A model
    without a corpus of its own reads data.* under paths.cache."""
    from types import SimpleNamespace

    import tasks.common.lm_eval
    import tasks.scissorhands.task

    class Read(Exception):
        pass

    def eval_text(name, tokenizer, *, data, cache):
        raise Read(name, data.max_files, cache)
    cfg = compose("task=lm_eval", f"model={model}", "paths.cache=/shared", "data.max_files=7", "eval.texts=[stdlib]",
                  *(["model.cache=/models"] if model == "trained_tiny" else []))
    for module in (tasks.common.lm_eval, tasks.scissorhands.task):
        monkeypatch.setattr(module, "eval_text", eval_text)
    files = 40 if model == "trained_tiny" else 7  # model.data's, else data's
    with pytest.raises(Read) as lm_eval_read:
        next(tasks.common.lm_eval.text_rows(cfg, None, None, None, model, {}))
    with pytest.raises(Read) as scissorhands_read:
        tasks.scissorhands.task.evaluation_chunks(cfg, SimpleNamespace(tokenizer=None), "stdlib", "cpu")
    assert lm_eval_read.value.args == scissorhands_read.value.args == ("stdlib", files, cache)
