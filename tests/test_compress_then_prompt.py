"""Compress, Then Prompt's task: the soft prompt trains nothing but itself, perplexity with a prompt scores the input
tokens only (held to a hand computation), prompts save and reload for their own model only, LoRA beside compressed
layers, the smoke run end to end with its rows and claims, and bad input refused before any work."""
import json
import math
import re

import pytest
import torch
from conftest import DEVICE, ROOT, check_smoke_record, run_inline
from transformers import LlamaConfig, LlamaForCausalLM

from repro.claims import load_paper
from repro.evaluation import perplexity
from repro.records import Row, RunRecord
from repro.report import claim_value
from repro.text_data import lm_batches, windows
from repro.train import Trainee, TrainSpec, train
from tasks.compress_then_prompt import compress
from tasks.compress_then_prompt.lora import add_lora
from tasks.compress_then_prompt.prompt import (add_soft_prompt, hard_prompt_forward, load_prompt, prompt_embedding,
                                               save_prompt, soft_prompt_forward)
from tasks.compress_then_prompt.task import Level

VOCAB, HIDDEN = 97, 48


def tiny_llama(seed=0, hidden=HIDDEN):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def random_ids(*shape, seed=1):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def compressed_llama():
    model = tiny_llama()
    compress(model, "sparsegpt", random_ids(4, 24), bits=4, sparsity=0.5, group_size=16, progress=False)
    return model


def snapshot(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


IDENTITY = {"model": "tiny-abc", "hidden_size": HIDDEN, "vocab_size": VOCAB}


# --- the soft prompt -------------------------------------------------------------------------------------------


def test_training_a_soft_prompt_changes_and_checkpoints_only_the_prompt(tmp_path):
    model = compressed_llama()
    before = snapshot(model)
    prompted = add_soft_prompt(model, tokens=5)
    start = prompt_embedding(prompted).detach().clone()
    trainee = Trainee("compressed_prompt", prompted, lm_batches(random_ids(400), 2, 16, 1, seed=0),
                      evaluate=lambda m: [], tokens_per_step=32, flops_per_token=1.0)
    spec = TrainSpec(steps=3, lr=1e-2, weight_decay=0.1, precision="fp32", log_every=1)
    rows = list(train(trainee, spec, torch.device("cpu"), tmp_path, progress=False))
    losses = [r.p50 for r in rows if r.metric == "loss"]
    assert len(losses) == 3 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    after = snapshot(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), "a base weight or buffer changed"
    assert not torch.equal(prompt_embedding(prompted), start)
    (checkpoint,) = tmp_path.glob("*.pt")
    saved = torch.load(checkpoint, weights_only=False)["model"]
    assert list(saved) == ["prompt_encoder.default.embedding.weight"]
    assert torch.equal(saved["prompt_encoder.default.embedding.weight"], prompt_embedding(prompted))


def test_the_prompt_starts_from_the_first_rows_of_the_vocabulary_or_from_sampled_ones():
    model = tiny_llama()
    vocabulary = model.get_input_embeddings().weight
    assert torch.equal(prompt_embedding(add_soft_prompt(tiny_llama(), tokens=7)), vocabulary[:7])
    sampled = prompt_embedding(add_soft_prompt(tiny_llama(), tokens=7, init="sample_vocab"))
    assert all((row == vocabulary).all(1).any() for row in sampled)
    assert not torch.equal(sampled, vocabulary[:7])  # drawn, not the first rows
    with pytest.raises(ValueError, match="init='text' is not one of"):
        add_soft_prompt(tiny_llama(), tokens=7, init="text")


def test_perplexity_with_a_soft_prompt_scores_the_same_tokens_as_without_one():
    """By hand: the prompt's vectors, then the chunk's embeddings, through the base model; logits at the prompt's
    positions ignored, and of the chunk's, token t scored from position t-1 (t >= 1), as without a prompt."""
    model = tiny_llama()
    prompted = add_soft_prompt(model, tokens=6)
    with torch.no_grad():
        prompt_embedding(prompted).add_(torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(3)))
    seqlen, ids = 13, random_ids(3 * 13 + 5, seed=4)
    result = perplexity(prompted, ids, seqlen, batch_size=2, forward=soft_prompt_forward(6), progress=False)
    nll, scored = 0.0, 0
    for chunk in ids[:3 * seqlen].view(3, seqlen):
        embeds = torch.cat([prompt_embedding(prompted), model.get_input_embeddings()(chunk)])
        with torch.no_grad():
            log_probs = model(inputs_embeds=embeds[None]).logits[0, 6:].double().log_softmax(-1)
        for t in range(1, seqlen):
            nll -= log_probs[t - 1, chunk[t]].item()
            scored += 1
    assert (result.tokens, result.chunks) == (scored, 3)
    assert result.nll_sum == pytest.approx(nll, rel=1e-5)
    plain = perplexity(model, ids, seqlen, progress=False)
    assert plain.tokens == scored and abs(plain.nll_sum - nll) > 1e-3  # the prompt changes the scores


def test_the_hard_prompt_is_read_before_the_input_and_cut_from_the_logits():
    model = tiny_llama()
    prefix, ids = random_ids(9, seed=5), random_ids(2, 11, seed=6)
    got = hard_prompt_forward(prefix)(model, ids)
    for row in range(2):
        want = model(torch.cat([prefix, ids[row]])[None]).logits[0, 9:]
        torch.testing.assert_close(got[row], want)


def test_a_saved_prompt_reloads_as_it_was_and_only_for_its_own_model(tmp_path):
    model = tiny_llama()
    prompted = add_soft_prompt(model, tokens=4, init="random")
    with torch.no_grad():  # as if trained: a fresh prompt, drawn after the same seeded model, is not this one
        prompt_embedding(prompted).add_(torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(7)))
    save_prompt(prompted, tmp_path, {**IDENTITY, "level": "joint_8x", "tokens": 4})
    ids = random_ids(2, 10)
    again = load_prompt(tiny_llama(), tmp_path, IDENTITY)
    assert torch.equal(again(input_ids=ids).logits, prompted(input_ids=ids).logits)
    with pytest.raises(ValueError, match=r"trained for another model: model 'tiny-abc' \(this one: 'other'\)"):
        load_prompt(tiny_llama(), tmp_path, {**IDENTITY, "model": "other"})
    with pytest.raises(ValueError, match=r"hidden_size 48 \(this one: 64\)"):
        load_prompt(tiny_llama(hidden=64), tmp_path, {**IDENTITY, "hidden_size": 64})
    # a folder mistyped, and the run's prompts/ folder for one of its levels: each named with what to give
    with pytest.raises(ValueError, match=r"missing is no folder here: give the folder of a prompt a run saved, "
                                         r"<its output>/prompts/<level>"):
        load_prompt(tiny_llama(), tmp_path / "missing", IDENTITY)
    save_prompt(prompted, tmp_path / "prompts" / "joint_8x", {**IDENTITY, "level": "joint_8x", "tokens": 4})
    with pytest.raises(ValueError, match=r"it has no effrepro_prompt.json \(it holds the prompts \['joint_8x'\]: "
                                         f"name one, {re.escape(str(tmp_path))}/prompts/joint_8x\\)"):
        load_prompt(tiny_llama(), tmp_path / "prompts", IDENTITY)
    with pytest.raises(ValueError, match=r"must say \['tokens'\]"):
        save_prompt(prompted, tmp_path / "unsaid", {**IDENTITY, "level": "joint_8x"})
    (tmp_path / "adapter_model.safetensors").unlink()  # metadata without the prompt it describes
    with pytest.raises(ValueError, match="lacks PEFT's adapter_model.safetensors or adapter_model.bin"):
        load_prompt(tiny_llama(), tmp_path, IDENTITY)
    metadata = tmp_path / "effrepro_prompt.json"
    for text, message in (("{not json", "is not the JSON save_prompt writes"),
                          ('["joint_8x"]', r"holds list \['joint_8x'\], not the mapping save_prompt writes")):
        metadata.write_text(text)
        with pytest.raises(ValueError, match=f"{metadata}.* {message}"):
            load_prompt(tiny_llama(), tmp_path, IDENTITY)


def test_lora_beside_compressed_layers_starts_as_the_compressed_model_and_trains_only_its_adapters():
    model = compressed_llama()
    ids = random_ids(2, 12)
    reference = model(ids).logits
    leaves = [(m, snapshot(m)) for m in model.modules() if not list(m.children())]  # LoRA wraps, never replaces
    adapted = add_lora(model, rank=4, alpha=8, dropout=0.0)
    assert torch.equal(adapted(input_ids=ids).logits, reference)  # B starts at zero
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 2 * 2  # A and B, on q_proj and v_proj, in each of 2 blocks
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        adapted(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(adapted(input_ids=ids).logits, reference)
    for module, before in leaves:
        assert all(torch.equal(t, before[k]) for k, t in module.state_dict().items())


@pytest.mark.parametrize("level, ratio", [(Level("j", "sparsegpt", bits=4, sparsity=0.5), 8.0),
                                          (Level("g", "gptq", bits=3), 5.333),
                                          (Level("s", "sparsegpt", sparsity=0.75), 4.0),
                                          (Level("n", "wanda", n_m=(2, 4)), 2.0)])
def test_levels_count_compression_as_the_paper_does(level, ratio):
    assert level.ratio == ratio


def test_calibration_windows_are_drawn_as_the_training_windows_are_and_need_a_token_more():
    from repro.context import ConfigError
    from tasks.compress_then_prompt.data import calibration, check_length
    ids = torch.arange(40)
    assert torch.equal(calibration(ids, 5, 8, seed=3), windows(ids, 5, 8, torch.Generator().manual_seed(3)))
    check_length(ids[:32], 4, 8, "cost.batch", drawn=False)  # chunks cut in order: the text may be used up
    with pytest.raises(ConfigError, match="prompt: 4 samples of 8 tokens need 33 tokens, and the training text "
                                          "has 32"):
        check_length(ids[:32], 4, 8, "prompt")


# --- the task end to end ---------------------------------------------------------------------------------------


TINY = ["task=compress_then_prompt", "model=tiny_llama", "logger=none"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smoke")
    code, out, err = run_inline(*TINY, f"hydra.run.dir={folder}", f"paths.outputs={folder}/outputs")
    assert code == 0, err[-3000:]
    record = json.loads((folder / "record.json").read_text())
    check_smoke_record(record, out)  # this file runs the task's smoke run for test_cli.py
    return folder, record


def rows_of(record, provider=None, metric=None, **where):
    return [r for r in record["rows"] if (provider is None or r["provider"] == provider)
            and (metric is None or r["metric"] == metric) and all(r["extra"].get(k) == v for k, v in where.items())]


def test_the_smoke_run_measures_dense_compressed_and_each_recovery_at_each_level(smoke):
    _, record = smoke
    assert record["status"] == "ok"
    assert all(r["status"] == "ok" for r in record["rows"] if r["metric"] != "ppl_gap_closed")
    for level, ratio in (("joint_8x", 8.0), ("gptq_4bit", 4.0)):
        for provider in ("dense", "compressed", "compressed_prompt", "compressed_hard_prompt"):
            (ppl,) = rows_of(record, provider, "perplexity", level=level)
            assert ppl["x_name"] == "compression" and ppl["x_value"] == ratio and ppl["unit"] == "ppl"
            assert rows_of(record, provider, "accuracy", level=level, benchmark="effrepro_mc")
            assert rows_of(record, provider, "time", level=level)
        (gap,) = rows_of(record, "compressed_prompt", "ppl_gap_closed", level=level)
        dense, compressed, prompt = (rows_of(record, p, "perplexity", level=level)[0]["p50"]
                                     for p in ("dense", "compressed", "compressed_prompt"))
        if compressed > dense:
            assert gap["status"] == "ok" and gap["p50"] == pytest.approx((compressed - prompt) / (compressed - dense))
        else:  # a random model may lose nothing to a level: no gap, and no ratio read backwards
            assert gap["status"] == "unsupported" and gap["p50"] is None and "no gap to close" in gap["message"]
        assert gap["extra"]["better_than_compressed"] == (prompt < compressed)
        # the rows the paper's claims read: each model's perplexity over dense's, its accuracy as a share of dense's
        (dense_acc,) = rows_of(record, "dense", "accuracy", level=level, benchmark="effrepro_mc")
        for provider in ("compressed", "compressed_prompt", "compressed_hard_prompt"):
            (ppl,) = rows_of(record, provider, "perplexity", level=level)
            (ratio,) = rows_of(record, provider, "ppl_ratio_to_dense", level=level)
            assert ratio["p50"] == pytest.approx(ppl["p50"] / dense)
            (acc,) = rows_of(record, provider, "accuracy", level=level, benchmark="effrepro_mc")
            recovery = rows_of(record, provider, "accuracy_recovery", level=level, benchmark="effrepro_mc")
            assert [r["p50"] for r in recovery] == \
                ([pytest.approx(100 * acc["p50"] / dense_acc["p50"])] if dense_acc["p50"] else [])
    (ratio,) = rows_of(record, "compressed", "compression_ratio", level="joint_8x")
    assert ratio["p50"] == 8 and 1 < ratio["extra"]["measured_ratio"] < 8  # masks and scales cost bytes
    (count,) = rows_of(record, "compressed_prompt", "trainable_params", level="joint_8x")
    assert count["p50"] == 4 * 64  # tokens x hidden
    assert rows_of(record, "compressed_lora", "perplexity", level="joint_8x")
    assert not rows_of(record, "compressed_lora", "perplexity", level="gptq_4bit")
    assert {r["x_value"] for r in rows_of(record, "compressed_prompt", "loss")} == {1, 2, 3}


def test_the_smoke_run_moves_each_prompt_to_the_other_level_and_the_dense_model(smoke):
    folder, record = smoke
    transfer = {(r["provider"], r["extra"]["level"], r["extra"]["prompt_trained_at"])
                for r in rows_of(record, metric="perplexity", mode="transfer")}
    assert transfer == {("prompt@joint_8x", "gptq_4bit", "joint_8x"), ("prompt@joint_8x", "dense", "joint_8x"),
                        ("prompt@gptq_4bit", "joint_8x", "gptq_4bit"), ("prompt@gptq_4bit", "dense", "gptq_4bit")}
    assert sorted(p.name for p in (folder / "prompts").iterdir()) == ["gptq_4bit", "joint_8x"]
    assert not (folder / "compressed").exists()  # the compressed models were scratch for the transfer


def test_a_saved_prompt_of_an_earlier_run_is_evaluated_at_every_level_its_own_included(smoke, tmp_path):
    folder, _ = smoke
    code, _, err = run_inline(*TINY, f"hydra.run.dir={tmp_path}", f"paths.outputs={tmp_path}/outputs",
                              "experiments=[perplexity,transfer]", "prompt.levels=[]", "hard_prompt=null",
                              "lora.levels=[sparsegpt_50]", f"transfer.prompts=[{folder}/prompts/joint_8x]")
    assert code == 0, err[-3000:]
    record = json.loads((tmp_path / "record.json").read_text())
    rows = rows_of(record, "loaded0_prompt@joint_8x", "perplexity")
    assert {r["extra"]["level"] for r in rows} == {"dense", "gptq_4bit", "joint_8x"}
    assert {(r["extra"]["prompt_trained_at"], r["extra"]["prompt_folder"]) for r in rows} == {
        ("joint_8x", str(folder / "prompts" / "joint_8x"))}
    assert not rows_of(record, "compressed_lora")  # LoRA is asked for at sparsegpt_50 only, which this run leaves out


@pytest.mark.parametrize("targets, in_plus_out", [
    ("q_proj", 64 + 64),  # a list of one name for PEFT, not a regular expression that matches nothing
    # every linear layer of a block, compressed ones included (PEFT's own all-linear finds only nn.Linear):
    # q and o 64 -> 64, k and v 64 -> 32, gate and up 64 -> 128, down 128 -> 64
    ("all-linear", 2 * 128 + 2 * 96 + 3 * 192),
])
def test_lora_on_the_named_layers_trains_them(tmp_path, targets, in_plus_out):
    code, _, err = run_inline(*TINY, f"hydra.run.dir={tmp_path}", f"paths.outputs={tmp_path}/outputs",
                              "experiments=[perplexity]", "compression.levels=[joint_8x]", "prompt.levels=[]",
                              "hard_prompt=null", f"lora.targets={targets}")
    assert code == 0, err[-3000:]
    record = json.loads((tmp_path / "record.json").read_text())
    (lora,) = rows_of(record, "compressed_lora", "perplexity", level="joint_8x")
    (count,) = rows_of(record, "compressed_lora", "trainable_params", level="joint_8x")
    assert lora["status"] == "ok" and count["p50"] == 2 * 32 * in_plus_out  # 2 blocks, rank 32


def test_the_claims_are_read_from_the_rows(smoke):
    _, record = smoke
    _, _, claims = load_paper(ROOT / "results" / "published" / "compress_then_prompt.yaml")
    as_llama = json.loads(json.dumps(record).replace('"model": "tiny_llama"', '"model": "llama-7b"'))
    run = RunRecord.from_json({**as_llama, "scale": "paper"})
    values = {c.id: claim_value(c, run)[0] for c in claims}
    # the paper's count, the kept weights' bits, not the bytes held (masks and scales included: below 8)
    assert values["llama7b_joint_compression_8x"] == 8

    def mean(provider, metric):
        rows = rows_of(as_llama, provider, metric, level="joint_8x")
        return sum(r["p50"] for r in rows) / len(rows)
    assert values["llama7b_8x_soft_prompt_matches_dense_ppl"] == pytest.approx(
        mean("compressed_prompt", "ppl_ratio_to_dense"))
    assert values["llama7b_8x_soft_prompt_matches_dense_accuracy"] == pytest.approx(
        mean("compressed_prompt", "accuracy_recovery"))


@pytest.mark.parametrize("overrides, message", [
    (["compression.catalog.joint_8x.bits=5"], "compression.catalog.joint_8x: bits=5 is not one of (2, 3, 4, 8)"),
    (["compression.catalog.joint_8x.sparsity=1.0"], "compression.catalog.joint_8x: sparsity=1.0 is outside [0, 1)"),
    (["compression.catalog.joint_8x.sparsity=-0.5"], "sparsity=-0.5 is outside [0, 1)"),
    (["prompt.tokens=240"], "prompt.tokens=240 plus prompt.seqlen=32 is 272 positions, more than the model's "
                            "context of 256; use at most 224 prompt tokens"),
    (["eval.seqlen=300"], "eval.seqlen=300 is longer than the model's context of 256"),
    (["lora.levels=[joint8x]"], "lora.levels=['joint8x'] is not one of ['gptq_4bit', "),
    (["experiments=[transfer]"], "experiments: transfer is read against the perplexities"),
    (["compression.percdamp=-1"], "compression.percdamp=-1 must be > 0"),
    (["eval.tasks=[openbokqa]"], "eval.tasks: lm-eval tasks ['openbokqa'] are unknown; ours: ['effrepro_mc']"),
    (["compression.levels=[joint_8x,joint_8x]"], "compression.levels names 'joint_8x' more than once"),
    (["eval.texts=stdlb"], "eval.texts=['stdlb'] is not one of"),
    (["eval.texts=[]"], "eval.texts=[] is empty: every level's perplexity is measured on these texts"),
    (["eval.texts=[stdlib,stdlib]"], "eval.texts names 'stdlib' more than once"),
    (["prompt.levels=[joint_8x,joint_8x]"], "prompt.levels names 'joint_8x' more than once"),
    (["experiments=[perplexity,accuracy]", "eval.tasks=[]"], "eval.tasks=[] is empty, but experiments has accuracy"),
    # a catalog entry that is no mapping, and n_m that is no pair: named, not a traceback
    (["+compression.catalog.bad=5", "compression.levels=[bad]"], "compression.catalog.bad=5 must be a mapping of"),
    (["+compression.catalog.bad=[gptq,4]", "compression.levels=[bad]"], "compression.catalog.bad=['gptq', 4] must be"),
    (["+compression.catalog.nm={method:sparsegpt,n_m:4}", "compression.levels=[nm]"],
     "compression.catalog.nm: n_m=4 must be two integers N < M"),
    (["transfer.prompts=[5]"], "transfer.prompts[0]=5 is not a folder: give the path of a prompt"),
])
def test_bad_input_is_refused(refusal, overrides, message):
    assert message in refusal(*TINY, *overrides)


@pytest.mark.parametrize("overrides, expected", [
    ("experiments=[perplexity,accuracy] cost.rep_ms=50", "cost.rep_ms=50 would have no effect: it is read only for "
                                                         "cost, and experiments=['perplexity', 'accuracy']"),
    ("experiments=[perplexity,cost] eval.num_fewshot=5", "eval.num_fewshot=5 would have no effect: it is read only "
                                                         "for accuracy"),
    ("prompt.levels=[] prompt.tokens=8", "prompt.tokens=8 would have no effect: it shapes what is trained at "
                                         "prompt.levels, and prompt.levels=[] names none of compression.levels="),
    ("compression.levels=[gptq_4bit] lora.rank=8", "lora.rank=8 would have no effect: it shapes what is trained at "
                                                   "lora.levels, and lora.levels=['joint_8x'] names none of"),
])
def test_a_setting_of_what_the_run_does_not_do_is_refused(job_refusal, overrides, expected):
    message = job_refusal(*TINY, *overrides.split())
    assert message.startswith(expected), message


def test_no_saved_prompts_may_be_written_null(compose):
    from types import SimpleNamespace

    from tasks.compress_then_prompt.task import CompressThenPrompt, validate
    cfg = compose(*TINY, "transfer.prompts=null")
    validate(cfg)
    assert CompressThenPrompt.loaded_prompts(SimpleNamespace(cfg=cfg, identity=IDENTITY)) == {}


def test_one_level_named_alone_is_that_level_not_a_string_to_search(compose):
    from tasks.compress_then_prompt.task import levels_at
    cfg = compose(*TINY, "+compression.catalog.gptq_4={method:gptq,bits:4}", "compression.levels=[gptq_4bit,gptq_4]",
                  "prompt.levels=gptq_4bit", "eval.texts=stdlib")
    assert levels_at("prompt.levels", cfg.prompt.levels, cfg) == ["gptq_4bit"]


def test_a_level_named_for_a_prompt_but_not_compressed_is_said(compose, capsys):
    from tasks.compress_then_prompt.task import validate
    validate(compose(*TINY, "prompt.levels=[sparsegpt_50]"))
    assert "prompt.levels names ['sparsegpt_50'], which compression.levels=['joint_8x', 'gptq_4bit'] leaves " \
           "out: nothing is trained there" in capsys.readouterr().out


# what only the loaded model and text can tell, found when the run starts, still before any work
@pytest.mark.parametrize("overrides, message", [
    (["compression.levels=[joint_8x,nm]", "+compression.catalog.nm={method:sparsegpt,n_m:[2,3]}"],
     "compression.catalog.nm: n_m=(2, 3): M=3 does not divide the input width 64 of block 0 self_attn.q_proj"),
    (["compression.calibration.samples=100000"], "compression.calibration: 100000 samples of 32 tokens need"),
    (["lora.targets=[q_proj,qv_proj]"], "lora.targets: ['qv_proj'] name no linear layer of the model; its linear "
                                        "layers are named ['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj',"),
    (["lora.targets=qv_proj"], "lora.targets: ['qv_proj'] name no linear layer"),
    (["cost.batch=100"], "cost.batch: 100 samples of 32 tokens need 3200 tokens, and the evaluation text 'stdlib' "
                         "has 128; ask for fewer or shorter samples, or a longer text (eval.max_chunks)"),
])
def test_bad_input_is_refused_before_any_work(overrides, message, tmp_path):
    code, _, err = run_inline(*TINY, f"hydra.run.dir={tmp_path}", f"paths.outputs={tmp_path}/outputs", *overrides)
    assert code == 2, err[-2000:]
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "outputs" / "checkpoints").exists() and not (tmp_path / "prompts").exists()


def test_a_prompt_is_for_the_weights_not_where_or_how_they_were_made():
    """A prompt trained for `trained` on a GPU is for the same model when a CPU run may train it
    (`model.train_on_cpu`), from another cache, or loaded in another dtype."""
    from hydra import compose, initialize_config_dir

    from tasks.compress_then_prompt.task import model_identity
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        def identity(*overrides):
            return model_identity(compose("model/trained", overrides=["model.cache=/cache", *overrides]).model)
        same = {identity(), identity("model.train_on_cpu=true"), identity("model.cache=/elsewhere"),
                identity("model.dtype=float32")}
        other = identity("model.seed=7")
    assert len(same) == 1 and other not in same


def test_a_prompt_checkpoint_depends_on_the_local_corpus_only_where_it_trains_on_it(compose):
    """C4's training text is the same whatever the local corpus; the local corpus's depends on it."""
    from tasks.compress_then_prompt.task import training_text_identity

    def text(*overrides):
        return training_text_identity(compose("task=compress_then_prompt", *overrides))
    assert text("text.name=c4") == text("text.name=c4", "data.max_files=3") == {"name": "c4"}
    assert text() != text("data.max_files=3")
    assert text() != text("text.max_tokens=1000")


@pytest.mark.parametrize("identity, message", [
    ({"model": "another-0123", "hidden_size": 64}, "model 'another-0123'"),
    (None, "hidden_size 32 (this one: 64)"),
])
def test_a_prompt_trained_for_another_model_or_hidden_size_is_refused(identity, message, tmp_path):
    from hydra import compose, initialize_config_dir

    from tasks.compress_then_prompt.task import model_identity
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        tiny = compose("model/tiny_llama").model
    prompt = tmp_path / "prompt"
    save_prompt(add_soft_prompt(tiny_llama(hidden=32), tokens=3), prompt,
                {"vocab_size": VOCAB, "level": "joint_8x", "tokens": 3,
                 **(identity or {"model": model_identity(tiny), "hidden_size": 32})})
    code, _, err = run_inline(*TINY, f"hydra.run.dir={tmp_path}", f"paths.outputs={tmp_path}/outputs",
                              f"transfer.prompts=[{prompt}]")
    assert code == 2, err[-2000:]
    assert "transfer.prompts[0]: the prompt in" in err and message in err


def test_saved_prompts_are_refused_where_no_transfer_experiment_would_score_them(compose, refusal, tmp_path):
    from tasks.compress_then_prompt.task import model_identity
    save_prompt(add_soft_prompt(tiny_llama(hidden=64), tokens=3), tmp_path, {
        "vocab_size": VOCAB, "level": "joint_8x", "tokens": 3, "model": model_identity(compose(*TINY).model),
        "hidden_size": 64})
    assert f"transfer.prompts=['{tmp_path}'] names saved prompts, but experiments=['perplexity'] has no transfer" \
        in refusal(*TINY, "experiments=[perplexity]", f"transfer.prompts=[{tmp_path}]")


def test_a_prompt_checkpoint_is_for_the_validation_its_rows_measure(tmp_path, monkeypatch):
    """A run resumed with another validation length would mix rows measured on different chunks."""
    from tasks.compress_then_prompt import task

    identities = []

    def first_training(trainee, *args, **kwargs):
        identities.append(trainee.fingerprint)
        raise KeyboardInterrupt
    monkeypatch.setattr(task, "train", first_training)
    for seqlen in (32, 48):  # each run stops at its first training, as a killed one
        run_inline(*TINY, f"hydra.run.dir={tmp_path / str(seqlen)}", f"paths.outputs={tmp_path}/outputs",
                   f"eval.seqlen={seqlen}")
    assert len(identities) == 2 and identities[0] != identities[1]


def test_a_soft_prompt_trains_on_the_tokens_perplexity_scores(tmp_path, monkeypatch):
    """PEFT labels the prompt's positions -100, but its last position still predicts a window's first token, from
    the prompt alone: neither perplexity nor the paper's code scores that token, so training must not either."""
    import torch.nn.functional as F

    from tasks.compress_then_prompt import task

    trainees = []

    def first_training(trainee, *args, **kwargs):
        trainees.append(trainee)
        raise KeyboardInterrupt
    monkeypatch.setattr(task, "train", first_training)
    run_inline(*TINY, f"hydra.run.dir={tmp_path}", f"paths.outputs={tmp_path}/outputs", "experiments=[perplexity]",
               "compression.levels=[joint_8x]", "lora.levels=[]", "hard_prompt=null")
    (trainee,) = trainees
    assert trainee.name == "compressed_prompt"
    (batch,) = trainee.batches(0, 0, 1)
    tokens = trainee.model.peft_config["default"].num_virtual_tokens
    with torch.no_grad():
        loss = trainee.model(**batch).loss
        logits = trainee.model(input_ids=batch["input_ids"]).logits[:, tokens:-1]  # token t from position t-1
    scored = F.cross_entropy(logits.flatten(0, 1), batch["input_ids"][:, 1:].flatten())
    torch.testing.assert_close(loss, scored)


@pytest.mark.parametrize("went_on_from", ["all", "half", 0])
def test_train_time_covers_the_steps_this_job_trained_and_none_for_a_reused_training(tmp_path, monkeypatch,
                                                                                      went_on_from):
    """A finished training reused from its checkpoint ("all": another job's, or this job's before a kill) is not
    trained by this job: its train_time would be the checkpoint's load, and on a GPU its train_memory the job's peak
    before it (train() returns before resetting the peak), compression included. One resumed partway is timed over
    the steps this job ran, and says where it went on from."""
    from tasks.compress_then_prompt import task

    def resumed(trainee, spec, *args, **kwargs):
        start = {"all": spec.steps, "half": spec.steps // 2}.get(went_on_from, went_on_from)
        yield Row(trainee.name, "step", spec.steps, "loss", "nats", 1.0, n=1, extra=dict(trainee.extra))
        return start
    monkeypatch.setattr(task, "train", resumed)
    # on a GPU machine on the GPU, where train_memory is measured
    code, _, err = run_inline(*TINY, f"hydra.run.dir={tmp_path}", f"paths.outputs={tmp_path}/outputs",
                              f"scale.device={DEVICE}", "experiments=[perplexity]", "compression.levels=[joint_8x]",
                              "lora.levels=[]", "hard_prompt=null", "train.steps=6")
    assert code == 0, err[-3000:]
    record = json.loads((tmp_path / "record.json").read_text())
    assert rows_of(record, "compressed_prompt", "loss") and rows_of(record, "compressed_prompt", "trainable_params")
    timed = rows_of(record, "compressed_prompt", "train_time")
    memory = rows_of(record, "compressed_prompt", "train_memory")
    if went_on_from == "all":
        assert not timed + memory
        return
    (row,) = timed
    steps = 3 if went_on_from == "half" else 6
    assert row["n"] == row["extra"]["steps"] == steps and row["extra"].get("resumed_at", 0) == 6 - steps
    assert len(memory) == (DEVICE == "cuda")
