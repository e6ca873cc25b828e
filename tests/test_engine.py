"""The engine's behaviour through the command line, in this process (quick): bad input named before any work,
failed points counted, runs that measured nothing failing, sweeps that run every job and list them all."""
import json
import os
import shlex

import pytest
import torch

from conftest import DEVICE, run_inline

FAKE = "task.entry=fake_tasks:"  # tests/ is on the path of the test process
KERNEL = ["kernel.providers=[standard]", "kernel.seq_len=[48]", "kernel.head_dim=[32]", "kernel.causal=[true]",
          "kernel.mode=[fwd]", "kernel.settings=null"]


def record(folder):
    return json.loads((folder / "record.json").read_text())


# Through the command line: what the command line itself checks (numbers given as text), and one a task's
# validate refuses, with its record
@pytest.mark.parametrize("override, expected", [
    ("kernel.seq_len=-4", "kernel.seq_len=-4 must be an integer >= 1"),
    ("kernel.seq_len=abc", "kernel.seq_len='abc' must be a number"),
    ("task=flash_gpt2 train.steps=abc", "train.steps='abc' must be a number"),
    ("task=flash_gpt2 train.precision=8", "train.precision=8 must be a string"),
    ("seed=1.5", "seed=1.5 must be an integer >= 0"),
])
def test_invalid_numbers_are_named_before_any_work(override, expected, tmp_path):
    code, out, err = run_inline(*override.split(), "logger=none", f"hydra.run.dir={tmp_path}")
    assert code == 2, (out, err)
    assert expected in err, err
    assert "Traceback" not in err
    if (tmp_path / "record.json").exists():  # the job's own record says why; nothing is committed
        assert record(tmp_path)["status"] == "error" and expected.split("=")[0] in record(tmp_path)["error"]


# The tasks' validate, on a composed config (a composition each; the command line composes three times)
@pytest.mark.parametrize("override, expected", [
    ("kernel.seq_len=0", ["kernel.seq_len=0 must be an integer >= 1"]),
    ("kernel.seq_len=[64.5]", ["kernel.seq_len=64.5 must be an integer"]),
    ("kernel.head_dim=[8]", ["kernel.head_dim=8 must be an integer >= 16 and <= 256"]),
    ("kernel.dropout=1.5", ["kernel.dropout=1.5 must be a number >= 0 and < 1"]),
    ("kernel.settings.paper_fig3.seq_len=[0]", ["kernel.settings.paper_fig3.seq_len=0"]),
    ("kernel.rep_ms=fast", ["kernel.rep_ms='fast' must be a number"]),
    ("task=flash_gpt2 train.steps=0", ["train.steps=0 must be an integer >= 1"]),
    ("task=flash_gpt2 train.lr=-1.0", ["train.lr=-1.0 must be a finite number > 0"]),
    ("task=flash_gpt2 batch.tokens=0", ["batch.tokens=0 must be an integer >= 1"]),
    ("task=lean_decode decode.context=0", ["decode.context=0 must be an integer >= 1"]),
    ("task=lean_decode decode.heads=[32/5]", ["decode.heads='32/5'"]),
    ("task=lra_listops lra.n_train=0", ["lra.n_train=0 must be an integer >= 1"]),
    ("task=lra_listops lra.batch=2.5", ["lra.batch=2.5 must be an integer"]),
    ("kernel.providers=[standard,fastest]", ["fastest", "sdpa_flash"]),
    ("kernel.providers=[standard,effrepro,effrepro]", ["kernel.providers names 'effrepro' more than once"]),
    ("kernel.providers=[sdpa_math]", ["kernel.providers=['sdpa_math'] must include 'standard'"]),
    # two densities that give one provider name: said of the densities (was: a provider name never typed)
    ("kernel.sparse_densities=[0.5,0.1234561,0.1234564]",
     ["kernel.sparse_densities has [0.1234561, 0.1234564]", "effrepro_sparse_0.123456"]),
    ("task=longdoc longdoc.synthetic.label_rate=0", ["longdoc.synthetic.label_rate=0 must be a number > 0"]),
    ("kernel.padding_mask=no", ["kernel.padding_mask='no' must be true or false"]),
    ("kernel.causal=[false,0]", ["kernel.causal=[False, 0] must be true or false, or a list of them"]),
    ("kernel.dtype=float8", ["kernel.dtype='float8' is not one of", "bfloat16"]),
    ("kernel.settings.paper_fig3.dtype=float8", ["kernel.settings.paper_fig3.dtype='float8' is not one of"]),
    ("task=flash_gpt2 attention=[sdpa+fast]", ["sdpa+fast", "+fused, +packed, +compile and +graphs"]),
    ("task=flash_gpt2 attention=[megatron+compile]", ["megatron+compile", "megatron takes none"]),
    ("task=flash_gpt2 compile.mode=fast", ["compile.mode='fast'", "max-autotune"]),
    ("task=flash_bert attention=[effrepro+fused]", ["effrepro+fused", "model.family='bert'"]),
    ("task=flash_gpt2 model.seq_len=128 model.positions=64", ["seq_len=128", "64 positions"]),
    ("task=pathx lra.pretrain={task:listops,steps:1}", ["listops", "path64"]),
    # lra.pretrain: null or exactly {task, steps} (a missing key was a traceback, another key ignored)
    ("task=pathx lra.attention=[standard] lra.pretrain={task:path64}",
     ["lra.pretrain={'task': 'path64'} must be null or a mapping of exactly task (one of", "and steps"]),
    ("task=pathx lra.attention=[standard] lra.pretrain=5", ["lra.pretrain=5 must be null or a mapping"]),
    ("task=pathx lra.attention=[standard] lra.pretrain={task:path64,steps:1,lr:3}",
     ["'lr': 3", "another key would be ignored"]),
    ("task=lra_listops lra.micro_batch.listops=3", ["micro_batch.listops=3", "divisor"]),
    ("task=lra_listops lra.micro_batch.listops=abc", ["lra.micro_batch.listops='abc' must be an integer >= 1"]),
    ("task=lra_listops lra.micro_batch.listops=1.0", ["lra.micro_batch.listops=1.0 must be an integer >= 1"]),
    ("task=lra_listops lra.micro_batch=4", ["lra.micro_batch=4 must be a mapping of task to micro-batch"]),
    ("task=lra_text lra.attention=[standard,linformer] lra.model.linformer_k=300",
     ["lra.model.linformer_k=300 is above the 256 tokens of a text example"]),
    ("task=lra_retrieval lra.source=hub", ["lra.source=hub with the retrieval task", "lra.data_dir="]),
    ("task=lra_retrieval lra.source=hub lra.data_dir=/nonexistent", ["lra.data_dir='/nonexistent' lacks",
                                                                    "new_aan_pairs.train.tsv"]),
    ("task=lra_listops lra.model={dim:60,heads:8}", ["dim=60 is not a multiple of heads=8"]),
    ("task=lra_listops lra.model={dim:64,heads:8}", ["heads of 8 dimensions", "16 to 256"]),
    ("task=pathx lra.attention=[standard] train.parallel=fsdp lra.pretrain={task:path64,steps:1}", ["fsdp", "ddp"]),
    # the pre-training stage's own spec (its steps are lra.pretrain.steps): checked before any work, named so
    ("task=pathx lra.attention=[standard] +train.profile=true train.steps=100 train.timing_skip_steps=2 "
     "lra.pretrain={task:path64,steps:2}",
     ["lra.pretrain.steps=2 (the pre-training stage's train.steps)", "train.timing_skip_steps=2"]),
    ("task=flash_gpt2_long batch.tokens=100", ["batch.tokens=100 is not a multiple of model.seq_len=32", "(64)"]),
    ("task=flash_bert attention=[megatron]", ["our Megatron baseline is a GPT", "model.family='bert'"]),
    ("task=longdoc longdoc.datasets=[synthetic,synthetic]", ["longdoc.datasets names 'synthetic' more than once"]),
    ("task=longdoc longdoc.synthetic.labels=1", ["late_fraction=0.5 of labels=1 gives 1 late labels", "both sides"]),
    ("task=longdoc longdoc.attention=[] longdoc.timed=[]", ["longdoc.attention and longdoc.timed are both empty"]),
    ("task=lra_listops lra.tasks=[listops,listops]", ["lra.tasks names 'listops' more than once"]),
    ("task=lra_listops lra.attention=[]", ["lra.attention=[] is empty"]),
    ("task=lra_listops lra.model.heads=0", ["lra.model.heads=0 must be an integer >= 1"]),
    ("task=lra_listops +lra.model.dropout=5", ["lra.model.dropout=5 must be a number >= 0 and < 1"]),
    ("task=lra_listops +lra.model.drop=0.1", ["lra.model.drop is not a setting of the LRA model", "'dropout'"]),
    ("task=lra_listops lra.listops_min_length=64", ["lra (task listops): ListOps", "min_length=64 and max_length"]),
    ("task=lra_listops lra.listops_min_length=10000 lra.listops_max_length=20000",  # possible, but never came
     ["lra (task listops): ListOps", "practically never", "min_length=10000 and max_length=20000"]),
    ("task=lra_listops lra.seed=-1", ["lra.seed=-1 must be an integer >= 0"]),
    ("task=lra_listops +lra.model.block_size=100", ["lra.model.block_size=100 must be a power of two"]),
    ("task=lra_text lra.max_bytes=8192", ["lra.max_bytes=8192 is above the 4096 bytes a text document"]),
    ("task=lra_pathfinder lra.difficulty=medium", ["lra (task pathfinder): Pathfinder difficulty='medium'"]),
    # lra_data: every setting before any is measured (the first one ran before the second was refused)
    ("task=lra_data lra_data.settings=[{task:listops,min_length:20,max_length:200},{task:pathfinder,size:48}]",
     ["lra_data.settings[1]: Pathfinder size=48 is not one of [32, 64, 128, 256]"]),
    ("task=lra_data lra_data.settings=[{task:listops,min_length:abc}]",
     ["lra_data.settings[0]: ListOps min_length='abc' must be an integer"]),
    ("task=lra_data lra_data.settings=[{task:listops},5]",
     ["lra_data.settings[1]=5 must be a mapping of a generator's settings"]),
    ("task=lra_data lra_data.seed=-1", ["lra_data.seed=-1 must be an integer >= 0"]),
    ("task=lra_data lra_data.examples_per_worker=-5", ["lra_data.examples_per_worker=-5 must be an integer >= 1"]),
    ("task=lm_eval model=tiny_llama eval.texts=[novel]", ["novel", "pydoc"]),
    ("kernel.seq_len=[]", ["kernel.seq_len=[] is empty"]),  # was: only the named settings, quietly
    ("task=lean_decode decode.context=[]", ["decode.context=[] is empty"]),
    ("task=flash_gpt2 attention=[]", ["attention=[] is empty"]),
    # a key of one number refuses a list, which a later step would fail on without naming the key
    ("task=compress_then_prompt compression.calibration.samples=[128]",
     ["compression.calibration.samples=[128] must be one value, an integer >= 1, not a list"]),
    ("task=compress_then_prompt prompt.tokens=[100]", ["prompt.tokens=[100] must be one value"]),
    ("task=compress_then_prompt lora.targets=[]", ["lora.targets=[] is empty"]),  # was: an error row from PEFT
    ("task=scissorhands_kv decode.batch=[4]", ["decode.batch=[4] must be one value"]),
    ("task=lean_decode decode.head_dim=[96,96]", ["decode.head_dim names 96 more than once"]),
    # a key of one choice refuses a list (was: a TypeError, unhashable list, from the dtype's lookup)
    ("task=lean_decode decode.dtype=[float16,bfloat16]",
     ["decode.dtype=['float16', 'bfloat16'] must be one value, one of ['float16', 'bfloat16'], not a list"]),
    ("task=lean_decode decode.dtype=float32", ["decode.dtype='float32' is not one of ['float16', 'bfloat16']"]),
    ("task=scissorhands_kv decode.dtype=[float16]", ["decode.dtype=['float16'] must be one value"]),
    ("task=lean_decode decode.heads=[32/8,32/08]", ["decode.heads names '32/8' more than once"]),
    ("task=lean_decode decode.timing=[graph,eager] scale.device=cpu",  # were eager rows labelled mode=graph
     ["decode.timing=['graph', 'eager'] names graph", "use decode.timing=[eager] there"]),
    ("task=lean_decode decode.rep_ms=inf", ["decode.rep_ms=inf must be a finite number >= 0.001"]),  # hung
    ("task=lean_decode decode.warmup_ms=nan", ["decode.warmup_ms=nan must be a finite number >= 0.001"]),
    ("task=compress_then_prompt compression.levels=sparsegpt_2_4 compression.catalog.sparsegpt_2_4.n_m=[2.5,4]",
     ["compression.catalog.sparsegpt_2_4.n_m=2.5 must be an integer"]),
])
def test_a_tasks_validate_names_the_value_and_the_valid_ones(override, expected, refusal):
    message = refusal(*override.split())
    assert all(word in message for word in expected), message


@pytest.mark.parametrize("every", ["inf", "nan", "1e12"])  # stopped the saving thread, or kept it spinning
def test_record_every_s_is_a_finite_interval(compose, every):
    from repro.cli import check_job
    from repro.context import ConfigError
    with pytest.raises(ConfigError, match="record_every_s=.* must be a finite number >= 0 and <= 86400"):
        check_job(compose(f"record_every_s={every}"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_lean_decode_refuses_graph_timing_on_the_device_it_got(tmp_path):
    """scale.device=auto passes validate (which may run where the jobs do not); the run checks the device it got."""
    code, _, err = run_inline("task=lean_decode", "scale=smoke", "scale.device=auto", "decode.timing=[graph]",
                              "logger=none", f"hydra.run.dir={tmp_path}")
    assert code == 2 and "decode.timing=['graph'] names graph" in err, err[-2000:]


def test_overrides_are_checked_before_hydra_runs():
    from repro.cli import check_overrides
    assert check_overrides(["task=nosuch"]).startswith("task='nosuch' is not one of ['compress_then_prompt', ")
    assert check_overrides(["scale=huge"]) == "scale='huge' is not one of ['paper', 'small', 'smoke']"
    assert check_overrides(["flash_kernel"]).startswith("cannot read 'flash_kernel': an override is key=value")
    # overrides on both sides of an option: Hydra's argparse stopped with "unrecognized arguments: scale=small"
    assert check_overrides(["task=greenformers", "--cfg", "job", "scale=small"]) == (
        "'scale=small' comes after --cfg, which follows other overrides: give the overrides together, before the "
        "options, e.g. repro task=greenformers scale=small --cfg job")
    assert check_overrides(["task=pregated_moe", "-m", "moe.new_tokens=2,4"]).endswith(
        "e.g. repro task=pregated_moe moe.new_tokens=2,4 -m")
    # the order given must be one Hydra reads: --info's optional value would take an override put after it
    from hydra._internal.utils import get_args_parser
    refused = check_overrides(["task=greenformers", "--info", "scale=small"])
    assert refused.endswith("e.g. repro task=greenformers scale=small --info")
    get_args_parser().parse_args(shlex.split(refused.split("e.g. repro ")[1]))  # no SystemExit
    assert check_overrides(["task=greenformers", "scale=smoke", "--cfg", "job"]) is None
    assert check_overrides(["paper=scissorhands", "task=flash_kernel"]).startswith(
        "task=flash_kernel is not a task of paper=scissorhands (its tasks: scissorhands_kv)")
    assert check_overrides(["paper=scissorhands", "task=scissorhands_kv", "model=tiny_llama"]) is None
    assert check_overrides(["-m", "paper=lean_attention,greenformers"]) == (  # ran flash_kernel twice
        "'paper=lean_attention,greenformers': a paper is a sweep of its own tasks, and papers are not swept; run one "
        "paper= at a time: repro paper=lean_attention ...; repro paper=greenformers ...")
    assert "e.g. repro -m task=flash_kernel ...)" in check_overrides(["paper=flashattention", "kernel.seq_len=64"])
    assert "paper=flashattention sweeps task=flash_kernel,flash_gpt2," in check_overrides(
        ["paper=flashattention", "train.stepz=3"])
    assert check_overrides(["paper=flashattention", "kernel.seq_lenn=64"]).endswith(  # the tasks with a `kernel`
        "for a task's own keys: repro -m task=flash_kernel ...")
    # Hydra's own refusal says only "not in struct"
    assert check_overrides(["task=greenformers", "greenformers.notebook.batch={train:3}"]) == (
        "unknown config key 'greenformers.notebook.batch.train': greenformers.notebook.batch has no 'train'; its keys "
        "are: inference, fwd_bwd")
    assert check_overrides(["task=greenformers", "greenformers.notebook.batch={inference:3}"]) is None
    # one mapping where a list of them is (Hydra cannot merge it): was a TypeError, unhashable dict
    assert check_overrides(["task=pregated_moe", "moe.runs={models:[tiny-4],batch:[1]}"]) == (
        "moe.runs={'models': ['tiny-4'], 'batch': [1]} must be a list of mappings, in brackets, like its default "
        "[{'models': ['tiny-4', 'tiny-8'], 'batch': [1, 3]}]")
    assert check_overrides(["task=pregated_moe", "moe.runs=[{models:[tiny-4],batch:[1]}]"]) is None
    assert check_overrides(["task=lra_listops", "scale=small", "lra.model.dropout=0.1"]) == (  # an empty mapping
        "lra.model has no keys of its own, so lra.model.dropout is added, with a '+': +lra.model.dropout=0.1")
    # an interpolation that names no key or resolver (Hydra's InterpolationKeyError traceback); one that does is taken
    assert check_overrides(["kernel.seq_len=${foo}"]) == ("kernel.seq_len='${foo}' cannot be resolved: Interpolation "
                                                          "key 'foo' not found")
    assert check_overrides(["kernel.seq_len=${fo:o}"]).endswith("Unsupported interpolation type fo")
    assert check_overrides(["kernel.seq_len=${kernel.tokens}"]) is None
    assert check_overrides(["paths.outputs=${hydra:runtime.cwd}/out"]) is None  # resolved in the job, not here
    assert "Environment variable 'EFFREPRO_NO_SUCH_VARIABLE' not found" in check_overrides(
        ["paths.outputs=${oc.env:EFFREPRO_NO_SUCH_VARIABLE}"])
    assert check_overrides(["-m", "paper=glob(*)"]).startswith("'paper=glob(*)': a paper is a sweep of its own")
    # a `???` key (a value the user must give) takes any value
    assert check_overrides(["task=lm_eval", "model=hf", "model.name=facebook/opt-6.7b"]) is None
    assert "model has no 'nme'" in check_overrides(["task=lm_eval", "model=hf", "model.nme=facebook/opt-6.7b"])
    # a key added where nothing reads it (the engine's own sections, the top level) would be ignored
    assert check_overrides(["task=greenformers", "+record_every=5"]).startswith(
        "+record_every: the top level has no 'record_every', and nothing reads a key added there; its keys are: seed, "
        "record_every_s,")
    assert check_overrides(["+scale.devices=2"]) == ("+scale.devices: scale has no 'devices', and nothing reads a key "
                                                     "added there; its keys are: name, device, commit_records")
    assert check_overrides(["task=lra_listops", "+lra.model.dropout=0.1"]) is None  # a mapping its task checks
    # ... and in a task's own section that its task does not check by name (it ran with the default seq_len)
    assert check_overrides(["task=flash_kernel", "+kernel.seqlen=1024"]) == (
        "+kernel.seqlen: kernel has no 'seqlen', and nothing reads a key added there; its keys are: providers, "
        "sparse_densities, seq_len, head_dim, causal, mode, tokens, hidden, dtype, dropout, padding_mask, warmup_ms, "
        "rep_ms, settings")
    assert check_overrides(["++decode.foo=1", "task=lean_decode"]).startswith("++decode.foo: decode has no 'foo'")
    assert check_overrides(["paper=flashattention", "+train.profile=true"]).startswith(  # not every task trains
        "+train.profile: the top level has no 'train'")
    assert check_overrides(["paper=scissorhands", "model=tiny_llama", "+kv.tova.budget_schedule=growing"]) is None
    # Hydra's refusal was exit status 1
    assert check_overrides(["task=flash_gpt2", "+train.profile=true"]) == (
        "+train.profile: train.profile is there already: set it without the '+', train.profile=true")
    # Hydra would fail on the missing ${task.name} with a traceback
    assert check_overrides(["~task"]).startswith("~task: a config group is not removed; choose one with task=<name> "
                                                 "(compress_then_prompt, ")
    assert check_overrides(["task=lm_eval", "model=null"]).startswith(
        "model=null: a config group is not set to null; choose one with model=<name> (hf, smollm2, ")
    assert check_overrides(["paper=null"]).startswith("paper=null: a config group is not set to null")
    # a hydra key whose default resolves in a job alone (${hydra.job.num}) is one hydra has
    assert check_overrides(["-m", "hydra.sweep.subdir=job-${hydra.job.num}", "seed=0,1"]) is None


@pytest.mark.parametrize("overrides, refused", [
    (["task=pathx", "+train.profil=true"], "unknown train keys ['profil']"),  # the LRA tasks' train has no profile
    (["task=lra_listops", "+lra.model.drop=0.1"], "lra.model.drop is not a setting of the LRA model"),
    (["task=scissorhands_kv", "model=tiny_llama", "+kv.tova.schedule=growing"],
     "kv.tova: 'schedule' is not a parameter of policy 'tova'"),
    (["+kernel.settings.mine={seq_len:[64],causl:true}"], "kernel.settings.mine has unknown keys ['causl']"),
    (["+kernel.settings.mine=1"], "kernel.settings.mine must be a mapping"),  # was a TypeError
    (["task=lra_listops", "+lra.pretrain.task=path64", "+lra.pretrain.stepz=10"],  # null until given
     "must be null or a mapping of exactly task"),
    (["task=compress_then_prompt", "model=tiny_llama", "+compression.catalog.nm={method:sparsegpt,bit:4}",
      "compression.levels=[nm]"], "compression.catalog.nm has unknown keys ['bit']"),
])
def test_a_key_added_to_a_mapping_that_takes_them_is_left_to_its_task_which_checks_it_by_name(overrides, refused,
                                                                                              refusal):
    """The command line lets a '+' add keys to repro.cli.OPEN_MAPPINGS alone: there the task names a mistyped one."""
    from repro.cli import check_overrides
    assert check_overrides(overrides) is None
    assert refused in refusal(*overrides)


@pytest.mark.parametrize("overrides, refused", [
    # each was a traceback at the task's first setting of the block (an AttributeError on None)
    (["task=scissorhands_kv", "eval=null"], "eval=null: eval must be a mapping, as its default is, of texts, seqlen, "
     "max_chunks, batch_size: set those one by one (eval.texts=...), or leave eval out for its default"),
    (["task=flash_gpt2", "compile=null"], "compile=null: compile must be a mapping, as its default is, of backend, "
     "mode:"),
    (["task=scissorhands_kv", "mc=null"], "mc=null: mc must be a mapping, as its default is, of tasks, "),
    (["task=flash_kernel", "paths=null"], "paths=null: paths must be a mapping"),  # the engine's own block
    (["task=longdoc", "longdoc.model=null"], "longdoc.model=null: longdoc.model must be a mapping"),  # a nested one
    (["task=scissorhands_kv", "kv={tova:null}"], "kv.tova=null: kv.tova must be a mapping, as its default {} is"),
    (["task=lm_eval", "model=trained", "model.train=null"], "model.train=null: model.train must be a mapping"),
    # removed, it is not there at all (a ConfigAttributeError): a nullable one is set to null instead
    (["task=scissorhands_kv", "~mc"], "~mc: mc must be a mapping"),
    (["task=lra_listops", "~lra.micro_batch"], "~lra.micro_batch: lra.micro_batch is not removed, but set to null: "
     "lra.micro_batch=null"),
    (["-m", "task=lm_eval,scissorhands_kv", "eval=null"], "eval=null: eval must be a mapping"),
])
def test_a_block_of_settings_set_to_null_or_removed_is_refused_naming_its_keys(overrides, refused):
    from repro.cli import check_overrides
    assert check_overrides(overrides).startswith(refused)


@pytest.mark.parametrize("overrides", [
    ["kernel.settings=null"], ["kernel.settings.long=null"],  # documented
    ["scale=small", "scale.device=cpu", "~kernel.settings.long"],  # a grid (null at smoke scale: refused below)
    ["task=lra_listops", "lra.micro_batch=null"],  # null: each task's whole batch at once
    ["task=pathx", "scale=paper", "scale.device=cpu", "lra.pretrain=null"],  # no pre-training (as at other scales)
    ["task=scissorhands_kv", "task.plot_lines=null"],  # a colour per provider, as other tasks' plots
    # an entry of a catalog, which the task checks where compression.levels chooses it
    ["task=compress_then_prompt", "compression.catalog.rtn_4bit=null"],
    ["task=scissorhands_kv", "eval.max_chunks=null"],  # one setting, not a block
])
def test_a_block_that_may_be_null_is_not_refused(overrides):
    from repro.cli import check_overrides
    assert check_overrides(overrides) is None


@pytest.mark.parametrize("overrides, refused", [
    # each was a traceback (a TypeError in TrainSpec, a ConfigAttributeError where the task reads it) or ran with a
    # library default the config did not choose
    (["task=lra_listops", "~train.steps"], "~train.steps: a setting is not removed; set it (train.steps=3 is its "
     "default), or leave it out for its default"),
    (["task=lra_listops", "~train.weight_decay"], "~train.weight_decay: a setting is not removed; set it "
     "(train.weight_decay=0.0 is its default)"),
    (["task=scissorhands_kv", "~kv.scissorhands.recent"], "~kv.scissorhands.recent: a setting is not removed"),
    (["~seed"], "~seed: a setting is not removed; set it (seed=0 is its default)"),
    (["task=lra_listops", "~lra.pretrain"], "~lra.pretrain: a setting is not removed; set it (lra.pretrain=null "
     "is its default)"),
    # where a setting may be removed, a null one: Hydra said it "does not exist"
    (["task=lra_listops", "~lra.micro_batch.listops"], "~lra.micro_batch.listops: lra.micro_batch.listops is null, "
     "which is what removing it would give: leave it out"),
    (["~kernel.settings.long"], "~kernel.settings.long: kernel.settings.long is null, which is what removing it"),
])
def test_a_setting_removed_is_refused_but_where_its_block_falls_back_to_a_default(overrides, refused):
    from repro.cli import check_overrides
    assert check_overrides(overrides).startswith(refused)


@pytest.mark.parametrize("overrides", [
    ["task=lra_listops", "~lra.micro_batch.retrieval"],  # all of retrieval's batch at once
    ["task=lra_listops", "~lra.model.depth"],  # the LRA repo's depth for the task
    ["~kernel.settings.paper_fig3.heads"],  # the main grid's heads
    ["task=compress_then_prompt", "~compression.catalog.wanda_50"],  # a level not chosen
])
def test_a_setting_whose_block_falls_back_to_a_default_may_be_removed(overrides):
    from repro.cli import check_overrides
    assert check_overrides(overrides) is None


def test_a_block_set_to_null_is_bad_input_before_any_work(tmp_path):
    code, out, err = run_inline("task=scissorhands_kv", "eval=null", "logger=none", f"hydra.run.dir={tmp_path}")
    assert code == 2 and err.startswith("repro: error: eval=null: eval must be a mapping")
    assert "Traceback" not in err + out and not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, refused", [
    ("task=flash_kernel model=tiny_llama", "task=flash_kernel"),
    ("model=tiny_llama", "task=flash_kernel"),  # the default task
    ("-m task=lm_eval,flash_bert model=trained", "task=flash_bert"),  # its own `model:` is its network's shape
    ("task=lm_eval model=tiny_llama", None),
    ("paper=scissorhands model=tiny_llama", None),  # its one task loads a model
    ("paper=flashattention model=trained", "task=flash_kernel (of paper=flashattention)"),
])
def test_a_model_given_to_a_task_that_loads_none_is_refused(args, refused):
    from repro.cli import check_overrides
    message = check_overrides(args.split())
    if refused is None:
        assert message is None
    else:
        assert message.startswith(f"{refused} loads no pretrained model") and "lm_eval, scissorhands_kv" in message


def test_documented_keys_are_accepted_without_a_plus(tmp_path):
    code, _, err = run_inline("task=flash_gpt2", "train.checkpoint_every_s=5", "train.steps=abc", "logger=none",
                              f"hydra.run.dir={tmp_path}")
    assert "unknown config key" not in err and "train.steps='abc'" in err


def test_a_run_whose_points_all_failed_exits_non_zero_and_says_so(tmp_path):
    code, out, err = run_inline(FAKE + "all_fail", "logger=none", f"hydra.run.dir={tmp_path}")
    assert code == 1
    assert "all 3 points failed" in err and record(tmp_path)["status"] == "error"
    assert "all 3 points failed" in record(tmp_path)["error"]
    assert "point 2 unsupported" in err  # why a point could not run is said, as an error's message is
    assert "[repro] error: 3 rows (2 of 3 rows failed: error or oom; 1 unsupported, e.g. point 2 unsupported)" in out


def test_a_run_that_yielded_no_rows_fails_and_says_so(tmp_path):
    code, _, err = run_inline(FAKE + "yields_nothing", "logger=none", "scale.commit_records=true",
                              f"paths.records={tmp_path}/runs", f"hydra.run.dir={tmp_path}/job")
    assert code == 1 and "the task measured nothing (it yielded no rows)" in err, err[-2000:]
    assert record(tmp_path / "job")["status"] == "error" and not (tmp_path / "runs").exists()


def test_a_run_whose_every_failed_point_ran_out_of_memory_is_an_oom_run(tmp_path):
    code, out, err = run_inline(FAKE + "all_oom", "logger=none", f"hydra.run.dir={tmp_path}")
    assert code == 1 and record(tmp_path)["status"] == "oom" and "all 3 points failed" in err


def test_a_run_with_some_failed_points_says_how_many(tmp_path):
    code, out, err = run_inline(FAKE + "some_fail", "logger=none", f"hydra.run.dir={tmp_path}")
    assert code == 0 and "1 of 3 rows failed" in out
    assert record(tmp_path)["status"] == "ok"


def test_a_crash_keeps_its_rows_and_the_error(tmp_path):
    code, _, err = run_inline(FAKE + "crash", "logger=none", f"hydra.run.dir={tmp_path}")
    assert code == 1 and "crashed half-way" in err
    saved = record(tmp_path)
    assert saved["status"] == "error" and "crashed half-way" in saved["error"] and len(saved["rows"]) == 1


@pytest.mark.parametrize("task, said, code", [("ctrl_c", "stopped by SIGINT (Ctrl-C)", 130),
                                              ("sigterm", "stopped by SIGTERM", 143)])
def test_a_stopped_run_says_which_signal_stopped_it(tmp_path, task, said, code):
    status, _, err = run_inline(FAKE + task, "logger=none", f"hydra.run.dir={tmp_path}")
    assert status == code and f"repro: {said}; the record keeps the rows" in err, err[-2000:]  # was 'stopped ()'
    saved = record(tmp_path)
    assert saved["status"] == "killed" and saved["error"] == said and len(saved["rows"]) == 1


def test_a_stopped_sweep_lists_the_jobs_it_began(tmp_path):
    entry = FAKE[len("task.entry="):]
    status, out, err = run_inline("-m", "logger=none", f"hydra.sweep.dir={tmp_path}",
                                  f"{FAKE}all_ok,{entry}ctrl_c,{entry}all_ok")
    assert status == 130 and "stopped by SIGINT" in err
    summary = out[out.index("[repro] stopped after 2 jobs begun"):]  # there was none
    assert "1 not ok" in summary and "killed" in summary and "2_flash_kernel" not in summary


def test_a_run_that_measured_nothing_commits_no_record(tmp_path):
    """Its job folder's record says why; a committed record with no rows would only be noise in results/runs."""
    code, _, err = run_inline(FAKE + "crash_at_once", "logger=none", "scale.commit_records=true",
                              f"paths.records={tmp_path}/runs", f"hydra.run.dir={tmp_path}/job")
    assert code == 1 and "crashed before its first row" in err
    assert record(tmp_path / "job")["status"] == "error" and not (tmp_path / "runs").exists()
    code, _, _ = run_inline(FAKE + "crash", "logger=none", "scale.commit_records=true",
                            f"paths.records={tmp_path}/runs", f"hydra.run.dir={tmp_path}/job2")
    assert code == 1 and len(list((tmp_path / "runs").rglob("*.json"))) == 1  # one row: committed, with its error


def test_bad_input_found_after_a_point_was_measured_fails_the_run_and_keeps_its_rows(tmp_path):
    """As a crash does (exit 1, the record committed with its rows and the error), not as bad input (exit 2)."""
    code, out, err = run_inline(FAKE + "bad_input_after_a_row", "logger=none", "scale.commit_records=true",
                                f"paths.records={tmp_path}/runs", f"hydra.run.dir={tmp_path}/job")
    assert code == 1 and "repro: failed: fake.texts=['gone'] cannot be loaded" in err, err[-2000:]
    committed = list((tmp_path / "runs").rglob("*.json"))
    assert len(committed) == 1 and json.loads(committed[0].read_text()) == record(tmp_path / "job")
    assert record(tmp_path / "job")["status"] == "error" and len(record(tmp_path / "job")["rows"]) == 1


def test_bad_input_starts_no_logger_and_commits_nothing(tmp_path):
    code, _, err = run_inline("kernel.providers=[standard,fastest]", "logger=wandb", "logger.mode=offline",
                              "scale.commit_records=true", f"paths.records={tmp_path}/runs",
                              f"hydra.run.dir={tmp_path}/job")
    assert code == 2 and "fastest" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "job" / "wandb").exists()
    assert record(tmp_path / "job")["error"]


def test_a_mistyped_wandb_mode_stops_the_run_though_wandb_failing_would_not(tmp_path, monkeypatch):
    code, _, err = run_inline("logger=wandb", "logger.mode=onlin", f"hydra.run.dir={tmp_path}")
    assert code == 2 and "logger.mode='onlin' is not one of" in err and "offline" in err
    assert not (tmp_path / "wandb").exists()
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # logger.mode's default: named as what the user set
    code, _, err = run_inline("logger=wandb", f"hydra.run.dir={tmp_path}/env")
    assert code == 2 and "WANDB_MODE='dryrun' (in the environment, read as logger.mode) is not one of" in err, err


@pytest.mark.parametrize("task", ["lm_eval", "scissorhands_kv kv.experiments=[quality]"])
def test_an_evaluation_text_that_cannot_be_loaded_fails_the_run_before_any_text_is_measured(task, tmp_path):
    code, _, err = run_inline(*f"task={task}".split(), "model=tiny_llama", "eval.texts=[stdlib,c4]", "logger=none",
                              f"hydra.run.dir={tmp_path}")
    assert code == 2 and "'c4'" in err and "offline, use stdlib" in err
    assert record(tmp_path)["rows"] == []


@pytest.mark.parametrize("subdir, folder", [(None, "{}_flash_kernel"), ("job-${hydra.job.num}", "job-{}")])
def test_a_sweep_runs_every_job_lists_them_all_and_fails_if_one_did(tmp_path, subdir, folder):
    code, out, err = run_inline("-m", "logger=none", f"hydra.sweep.dir={tmp_path}",
                                *([f"hydra.sweep.subdir={subdir}"] if subdir else []),
                                FAKE + "all_ok," + FAKE[len("task.entry="):] + "bad_input," +
                                FAKE[len("task.entry="):] + "all_fail," + FAKE[len("task.entry="):] + "some_fail")
    assert code == 1
    summary = out[out.index("multirun of 4 jobs"):]
    assert "2 not ok" in summary
    lines = [line.split() for line in summary.splitlines()[1:] if line.strip()]
    assert [(line[0], line[1]) for line in lines] == [(folder.format(0), "ok"), (folder.format(1), "error"),
                                                      (folder.format(2), "error"), (folder.format(3), "ok")]
    # each job named by what it was given that the others were not (the folders are numbered), as Hydra gave it
    assert [line[2] for line in lines] == [f"{FAKE[:-1]}\\:{task}" for task in ("all_ok", "bad_input", "all_fail",
                                                                                "some_fail")]
    assert "fake.size=-1" in summary and "all 3 points failed" in summary
    assert all((tmp_path / folder.format(i) / "record.json").exists() for i in range(4))


def test_a_sweep_into_an_earlier_sweeps_folder_is_refused_before_hydra_writes_there(tmp_path, monkeypatch):
    """Hydra rewrote the earlier jobs' account of themselves (.hydra/) before each job found its folder taken. A sweep
    run again in its SLURM job, requeued, takes its own folders back."""
    entry = FAKE[len("task.entry="):]
    sweep = ("-m", "logger=none", f"hydra.sweep.dir={tmp_path}", f"{FAKE}all_ok,{entry}some_fail")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert run_inline(*sweep)[0] == 0
    code, out, err = run_inline(*sweep)  # requeued
    assert code == 0 and "multirun of 2 jobs, 0 not ok" in out, err[-2000:]
    monkeypatch.delenv("SLURM_JOB_ID")
    earlier = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, _, err = run_inline(*sweep[:-1], f"{FAKE}all_ok", "seed=1")
    assert code == 2 and f"hydra.sweep.dir='{tmp_path}' holds the jobs of an earlier sweep ({tmp_path}/0_flash_kernel" \
        "): give this one a new folder" in err, err[-2000:]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == earlier


@pytest.mark.parametrize("sweep, expected", [
    (["-m", "task=flash_kernel", "kernel.seq_len=64,0"], ["kernel.seq_len=0 must be an integer >= 1 (in the job ",
                                                          "kernel.seq_len=0; no job was run)"]),
    (["paper=greenformers", "seed=-1"], ["seed=-1 must be an integer >= 0 (in the job paper=greenformers",
                                         "task=greenformers seed=-1; no job was run)"]),
    # every value of each key, whatever the other keys sweep: the bad one is not the 301st job of 600
    (["-m", "task=flash_kernel", "kernel.head_dim=64,-1", "kernel.seq_len=range(1,300)"],
     ["kernel.head_dim=-1 must be an integer >= 16", "no job was run"]),
    (["task=flash_kernel", "hydra.mode=MULTIRUN", "seed=0,-1"], ["seed=-1 must be an integer >= 0"]),
])
def test_a_sweep_with_a_job_its_checks_refuse_runs_no_job(sweep, expected, tmp_path):
    """A value out of range is bad input in a sweep too: refused before the first job, not after the others."""
    code, _, err = run_inline(*sweep, "logger=none", f"hydra.sweep.dir={tmp_path}")
    assert code == 2 and all(part in err for part in expected), err[-2000:]
    assert not list(tmp_path.glob("*"))


@pytest.mark.parametrize("args", [["task=lra_listops"], ["-m", "task=lra_pathfinder,lra_listops"]])
def test_a_key_the_job_would_not_read_is_bad_input_saying_why(args, tmp_path):
    """Set up as its other settings say, a job that would not read a key given would run as if it were not:
    refused as one run starts, and in a sweep before any job runs."""
    code, out, err = run_inline(*args, "scale=smoke", "lra.difficulty=easy", "logger=none",
                                f"hydra.run.dir={tmp_path}", f"hydra.sweep.dir={tmp_path}")
    assert code == 2, (out, err[-2000:])
    assert "lra.difficulty='easy' would have no effect: it is read only for pathfinder" in err, err[-2000:]


def test_a_sweep_refused_for_a_key_some_of_its_jobs_read_names_those_to_run_on_their_own():
    """The sweep is refused as a whole, and says which of its jobs read the key: those can run it on their own."""
    from repro.cli import check_overrides
    sweep = ["-m", "scale=smoke", "logger=none", "lra.difficulty=hard"]
    message = check_overrides([*sweep, "task=lra_listops,lra_pathfinder,lra_text"])
    assert message.startswith("lra.difficulty='hard' would have no effect: it is read only for pathfinder"), message
    assert message.endswith("; no job was run). In this sweep, lra.difficulty is read by task=lra_pathfinder, not by "
                            "task=lra_listops, task=lra_text: run task=lra_pathfinder on its own with "
                            "lra.difficulty=hard"), message
    # where none of the jobs reads it, or nothing but the key's own setting tells them apart, nothing to run alone
    for jobs in ("task=lra_listops,lra_text", "task=lra_listops lra.tasks=[listops],[pathfinder]"):
        message = check_overrides([*sweep, *jobs.split()])
        assert message.endswith("; no job was run)") and "on its own" not in message, message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_a_sweep_for_slurm_is_not_refused_for_what_this_machine_lacks(monkeypatch):
    """SLURM runs the jobs on its GPU nodes: a job's checks that ask for the device run there, not here."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from repro.cli import check_overrides
    sweep = ["-m", "task=lm_eval", "model=trained", "scale=small", "eval.seqlen=64,128"]
    assert "needs a CUDA GPU" in check_overrides(sweep)
    monkeypatch.setattr("repro.cli.shutil.which", lambda command: f"/usr/bin/{command}")  # a SLURM login node
    assert check_overrides([*sweep, "hydra/launcher=slurm"]) is None


def test_a_launcher_is_one_of_ours_or_hydras_basic_one():
    from repro.cli import check_overrides
    assert check_overrides(["task=flash_kernel", "hydra/launcher=locl"]) == (  # was Hydra's many lines, exit 1
        "hydra/launcher='locl' is not one of ['basic', 'local', 'slurm', 'submitit_local', 'submitit_slurm']")
    assert check_overrides(["hydra/launcher=basic"]) is None
    assert check_overrides(["-m", "kernel.seq_len=64,128", "hydra/launcher=submitit_local"]) is None  # a plugin's
    if not torch.cuda.is_available():  # the basic launcher runs the jobs here too: this machine's device is checked
        assert "needs a CUDA GPU" in check_overrides(["hydra/launcher=basic", "scale=small"])


def test_a_sweep_for_slurm_from_a_machine_without_slurm_is_refused(monkeypatch):
    """Not submitit's traceback from deep in the launch."""
    from repro.cli import check_overrides
    monkeypatch.setattr("repro.cli.shutil.which", lambda command: None)
    message = check_overrides(["-m", "task=flash_kernel", "kernel.seq_len=64,128", "hydra/launcher=slurm"])
    assert message.startswith("hydra/launcher=slurm submits the jobs through SLURM") and "launcher=local" in message


def test_under_torchrun_rank_0_alone_lists_a_sweep(tmp_path, monkeypatch):
    """Another rank writes no records: it would find rank 0's missing, or half-written, and fail the launch."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, _ = run_inline("-m", "logger=none", f"hydra.sweep.dir={tmp_path}",
                              FAKE + "all_ok," + FAKE[len("task.entry="):] + "some_fail")
    assert code == 0 and "multirun of" not in out
    assert not list(tmp_path.glob("*/record.json"))


def test_a_sweep_of_good_jobs_exits_zero(tmp_path):
    code, out, _ = run_inline("-m", "logger=none", f"hydra.sweep.dir={tmp_path}", *KERNEL[:1],
                              "kernel.seq_len=[32],[40]", *KERNEL[2:])
    assert code == 0 and "multirun of 2 jobs, 0 not ok" in out


@pytest.mark.parametrize("override, expected", [
    ("task=no_such_task", ["no_such_task", "flash_kernel"]),
    ("scale=huge", ["huge", "smoke", "small", "paper"]),
    ("paper=no_such_paper", ["no_such_paper", "flashattention"]),
    ("kernel.no_such_key=1", ["no_such_key", "seq_len", "providers"]),
    ("no_such_key=1", ["no_such_key", "kernel", "scale"]),
    ("task=flash_gpt2 attention=[eager,flash9]", ["flash9", "effrepro"]),
    ("task=flash_gpt2 data.folder=/no/such/folder", ["/no/such/folder", "folder of text files"]),
    ("task=flash_gpt2 data.val_fraction=1.5", ["data.val_fraction=1.5 must be a number > 0 and < 1"]),
    ("task=flash_gpt2 data.val_fraction=0", ["data.val_fraction=0 must be a number > 0 and < 1"]),
    ("task=lra_listops lra.micro_batch.listops2=4", ["listops2", "retrieval"]),
    ("task=lra_data lra_data.settings=[{task:pathfinder,size:48}]", ["size=48", "32, 64, 128, 256"]),
    ("task=lm_eval model=no_such_model", ["no_such_model", "tiny_llama"]),
    ("task=lm_eval model=tiny_llama eval.seqlen=1024", ["1024", "context"]),
    ("record_every_s=-1", ["record_every_s=-1"]),
    ("data.folder=~/texts", ["cannot read the override 'data.folder=~/texts'", "quote"]),
    ("kernel.seq_len=abc --cfg job", ["kernel.seq_len='abc'"]),  # an option's value is not an override
    ("-m task=flash_kernel,no_such_task", ["no_such_task", "lean_decode"]),
    ("-m task=flash_kernel,lean_decode decode.context=[64]", ["'decode.context'", "the job of task=flash_kernel"]),
    ("paper=lean_attention decode.context=[64]", ["'decode.context'", "repro -m task=lean_decode"]),
    ("-m kernel.seq_len=64,128 --cfg job", ["--cfg prints one job's config, not a sweep's"]),  # was a traceback
    ("-m kernel.seq_len=64,128 --cfg=job", ["--cfg prints one job's config, not a sweep's"]),
    ("paper=lean_attention --cfg job", ["repro task=lean_decode ... --cfg job"]),  # printed flash_kernel's
])
def test_bad_input_names_the_value_and_the_valid_ones(override, expected, tmp_path):
    code, out, err = run_inline(*override.split(), "logger=none", f"hydra.run.dir={tmp_path}",
                                f"hydra.sweep.dir={tmp_path}")
    assert code != 0
    for word in expected:
        assert word in err + out, (word, err[-2000:])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_a_gpu_scale_without_a_gpu_fails_before_any_work(tmp_path):
    code, _, err = run_inline("scale=small", "logger=none", f"hydra.run.dir={tmp_path}",
                              f"paths.records={tmp_path}/runs")
    assert code == 2 and "scale.device='cuda' (scale=small) needs a CUDA GPU" in err
    assert "scale.device=cpu (or scale=smoke)" in err  # the README's way to run small on a CPU
    assert not (tmp_path / "runs").exists() and not (tmp_path / "record.json").exists()
    # a paper's sweep too: refused before Hydra makes a job folder each
    code, _, err = run_inline("paper=lean_attention", "scale=small", "logger=none", f"hydra.sweep.dir={tmp_path}/sweep")
    assert code == 2 and "needs a CUDA GPU" in err and not (tmp_path / "sweep").exists()
    code, _, err = run_inline("scale.device=cuda", "logger=none", f"hydra.run.dir={tmp_path}/cuda")
    assert code == 2 and "scale.device='cuda' (scale=smoke) needs" in err and "run scale=smoke" not in err
    code, out, _ = run_inline("scale=small", "logger=none", "--cfg", "job")  # reading its config needs no GPU
    assert code == 0 and "commit_records: true" in out


def test_flash_kernel_smoke_records_speedups_and_unsupported_backends(tmp_path):
    code, _, err = run_inline("logger=none", f"scale.device={DEVICE}", f"hydra.run.dir={tmp_path}",
                              "kernel.providers=[standard,sdpa_math,sdpa_efficient,sdpa_flash,sdpa_cudnn]", *KERNEL[1:])
    assert code == 0, err
    rows = record(tmp_path)["rows"]
    baseline = [r for r in rows if r["metric"] == "speedup" and r["provider"] == "standard"]
    assert baseline and all(abs(r["p50"] - 1.0) < 1e-12 for r in baseline)
    if DEVICE == "cpu":  # the CUDA-only backends decline on a CPU and say so
        cudnn = [r for r in rows if r["provider"] == "sdpa_cudnn"]
        assert cudnn and all(r["status"] == "unsupported" and "declines" in r["message"] for r in cudnn)
    math_rows = [r for r in rows if r["provider"] == "sdpa_math" and r["metric"] == "rel_error"]
    assert math_rows and all(r["extra"]["matches_baseline"] for r in math_rows)  # checked against standard
    times = [r for r in rows if r["metric"] == "time" and r["status"] == "ok"]
    assert all(r["extra"]["clock"] == ("cuda_event" if DEVICE == "cuda" else "wall_clock") for r in times)


def test_our_kernels_run_through_the_interpreter_and_match_the_baseline(tmp_path):
    import effrepro_kernels.runtime
    if not effrepro_kernels.runtime.runs_on(DEVICE):
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    code, _, err = run_inline("logger=none", f"scale.device={DEVICE}", f"hydra.run.dir={tmp_path}",
                              "kernel.providers=[standard,effrepro,effrepro_sparse,effrepro_gluon,effrepro_auto]",
                              "kernel.sparse_densities=[0.5]", "kernel.tokens=48", "kernel.hidden=64", *KERNEL[1:])
    assert code == 0, err
    rows = record(tmp_path)["rows"]
    if DEVICE == "cpu":  # the Gluon path runs on Hopper GPUs only: a row that says so, and the run goes on
        gluon = [r for r in rows if r["provider"] == "effrepro_gluon"]
        assert gluon and all(r["status"] == "unsupported" and "does not cover this call: " in r["message"]
                             for r in gluon)
    for provider in ("effrepro", "effrepro_sparse_0.5", "effrepro_auto"):
        assert [r["status"] for r in rows if r["provider"] == provider and r["metric"] == "time"] == ["ok"]
    assert any(r["metric"] == "speedup_over_effrepro" and r["provider"] == "effrepro_sparse_0.5" for r in rows)
    for provider in ("effrepro", "effrepro_sparse_0.5"):  # block-sparse against standard attention under its mask
        checked = [r for r in rows if r["metric"] == "rel_error" and r["provider"] == provider]
        assert checked and all(r["extra"]["matches_baseline"] for r in checked), provider


def test_wandb_offline_keeps_a_copy_and_a_wandb_that_cannot_start_never_stops_the_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")  # a dependency of the project, but a bare GPU image may lack it
    code, _, err = run_inline("logger=wandb", "logger.mode=offline", f"hydra.run.dir={tmp_path}/a", *KERNEL)
    assert code == 0, err
    assert list((tmp_path / "a").glob("wandb/offline-run-*/files")) and record(tmp_path / "a")["status"] == "ok"

    tries = []

    def unreachable(**kwargs):
        tries.append(kwargs)
        raise wandb.errors.CommError("no route to api.wandb.ai")
    monkeypatch.setattr(wandb, "init", unreachable)
    monkeypatch.setattr("repro.wandb_logger._given_up", None)  # and back after the test
    with pytest.warns(UserWarning, match="W&B did not start .*no route"):
        code, _, err = run_inline("logger=wandb", "logger.mode=online", f"hydra.run.dir={tmp_path}/b", *KERNEL)
    assert code == 0 and record(tmp_path / "b")["status"] == "ok"
    # the next job of the process (a sweep's) does not wait for it again
    with pytest.warns(UserWarning, match="W&B was given up earlier in this process .it did not start: .*no route"):
        code, _, err = run_inline("logger=wandb", "logger.mode=online", f"hydra.run.dir={tmp_path}/c", *KERNEL)
    assert code == 0 and len(tries) == 1


def test_a_wandb_finish_that_hangs_ends_the_job_without_it_and_the_next_jobs_do_without_wandb(monkeypatch):
    """A lost connection would hold each later job of a sweep as long again."""
    import time
    from types import SimpleNamespace

    from repro import wandb_logger

    class Hanging:
        summary = {}

        def finish(self, exit_code):
            time.sleep(30)
    logger = object.__new__(wandb_logger.WandbLogger)
    logger.run, logger.failed = Hanging(), False
    monkeypatch.setattr(wandb_logger, "FINISH_TIMEOUT_S", 0.2)
    started = time.monotonic()
    monkeypatch.setattr(wandb_logger, "_given_up", None)  # and back after the test
    with pytest.warns(UserWarning, match="W&B did not finish within 0.2 s"):
        logger.finish("ok")
    assert time.monotonic() - started < 5
    with pytest.warns(UserWarning, match="W&B was given up earlier in this process .a run did not finish within"):
        assert type(wandb_logger.make_logger(SimpleNamespace(name="wandb"))) is wandb_logger.NullLogger


def test_a_wandb_run_left_unfinished_is_not_finished_by_the_next_jobs_start(tmp_path, monkeypatch):
    """wandb.init(reinit="finish_previous") finished it there, in the job's own thread, with no time limit: a
    finish that gave up waiting on a lost connection (or failed) held the next job of a sweep for as long."""
    import threading
    from types import SimpleNamespace

    pytest.importorskip("wandb")
    from wandb.sdk import wandb_run

    from repro.wandb_logger import WandbLogger

    finished_in, finish = [], wandb_run.Run.finish

    def noted(run, *args, **kwargs):
        finished_in.append(threading.current_thread().name)
        return finish(run, *args, **kwargs)
    monkeypatch.setattr(wandb_run.Run, "finish", noted)
    cfg = SimpleNamespace(project="effrepro", entity=None, mode="offline", init_timeout_s=60)
    first = WandbLogger(cfg, name="a", group=None, job_type="smoke", config={}, output_dir=tmp_path)
    try:
        second = WandbLogger(cfg, name="b", group=None, job_type="smoke", config={}, output_dir=tmp_path)
        assert finished_in == [] and first.run.id != second.run.id
        second.finish("ok")
    finally:
        first.run.finish()


def test_a_wandb_that_fails_mid_run_stops_logging_and_the_run_goes_on():
    from repro.records import Row
    from repro.wandb_logger import WandbLogger

    class Broken:
        calls = 0

        def log(self, data):
            Broken.calls += 1
            raise OSError("the W&B service went away")
    logger = object.__new__(WandbLogger)  # as started, with a run whose log fails
    logger.run, logger.failed = Broken(), False
    row = Row("a", "n", 1, "time", "ms", 1.0, n=1)
    with pytest.warns(UserWarning, match="W&B stopped logging .*the W&B service went away"):
        logger.log_rows([row])
    logger.log_rows([row])  # said once; not tried again
    assert Broken.calls == 1


def test_a_run_whose_only_success_is_its_reference_measured_nothing(tmp_path, monkeypatch):
    """lean_decode on a CPU without the interpreter: every kernel point is unsupported, and the copy bandwidth
    the points are read against (which always runs) does not make the run a success."""
    if DEVICE == "cuda":
        pytest.skip("on a GPU the kernels run")
    monkeypatch.setattr("effrepro_kernels.runtime.INTERPRET", False)
    code, _, err = run_inline("task=lean_decode", "logger=none", "decode.providers=[fa2,split,lean]",
                              "scale.device=cpu", f"hydra.run.dir={tmp_path}")
    assert code == 1 and record(tmp_path)["status"] == "error" and "points failed" in err, err[-2000:]


def test_lean_decode_smoke_checks_every_provider_against_fa2_in_the_interpreter(tmp_path):
    """The smoke scale with our kernels running (in the interpreter on a CPU): split (in two pieces at 333 keys),
    lean and SDPA's math backend each agree with fa2, the baseline, at every point."""
    code, _, err = run_inline("task=lean_decode", "logger=none", f"scale.device={DEVICE}", f"hydra.run.dir={tmp_path}")
    assert code == 0, err[-2000:]
    rows = record(tmp_path)["rows"]
    errors = {(r["provider"], r["x_value"], r["extra"]["heads"]): r for r in rows if r["metric"] == "rel_error"}
    assert sorted(errors) == sorted((p, n, h) for p in ("split", "lean", "sdpa_math") for n in (100, 333)
                                    for h in ("4/4", "4/2"))
    assert all(r["status"] == "ok" and r["p50"] < 1e-2 and r["extra"]["matches_baseline"] for r in errors.values())


def test_rerunning_a_finished_training_run_measures_afresh(tmp_path):
    args = ("task=flash_gpt2", "logger=none", "attention=[eager]", "train.steps=3", f"checkpoint.dir={tmp_path}/ckpt")
    assert run_inline(*args, f"hydra.run.dir={tmp_path}/a")[0] == 0
    code, out, err = run_inline(*args, f"hydra.run.dir={tmp_path}/b")
    assert code == 0, err
    assert "finished run: training afresh" in out and "resumed" not in out
    rows = lambda run, metric: [r["p50"] for r in record(tmp_path / run)["rows"] if r["metric"] == metric]  # noqa: E731
    assert rows("b", "loss") == rows("a", "loss")  # the same training
    assert rows("b", "tokens_per_s") != rows("a", "tokens_per_s")  # timed again, not replayed
    assert run_inline(*args, "data.max_files=30", f"hydra.run.dir={tmp_path}/c")[0] == 0
    assert len(list((tmp_path / "ckpt").glob("*.pt"))) == 2  # another corpus is another run, never a resume


def test_a_run_given_an_earlier_runs_folder_is_refused_before_hydra_writes_there(tmp_path):
    """Hydra's account of the earlier run (.hydra/) was rewritten before the run was refused, for a reason that was
    not the one (another run started in the same second)."""
    code, _, err = run_inline(*KERNEL, "logger=none", f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    first = {p: p.read_text() for p in [tmp_path / "record.json", *(tmp_path / ".hydra").iterdir()]}
    code, _, err = run_inline(*KERNEL, "logger=none", "seed=2", f"hydra.run.dir={tmp_path}")
    assert code == 2 and f"hydra.run.dir='{tmp_path}' is the folder of an earlier run: give this one a new" in err, err
    assert {p: p.read_text() for p in first} == first


def test_a_folder_taken_is_named_for_what_it_holds(tmp_path, monkeypatch):
    """One made from the time holds a run begun in the same second; one given, maybe an earlier run. A SLURM job
    requeued takes its own back, as another rank of a torchrun does not check it (rank 0 may have taken it)."""
    from repro.cli import check_overrides, claim_folder
    from repro.context import ConfigError
    claim_folder(tmp_path)
    with pytest.raises(ConfigError, match="another run started in the same second"):
        claim_folder(tmp_path)
    with pytest.raises(ConfigError, match="holds an earlier run, whose record is left as it is: give this one a new"):
        claim_folder(tmp_path, given=True)
    assert "is the folder of an earlier run" in check_overrides([f"hydra.run.dir={tmp_path}"])
    monkeypatch.setenv("RANK", "1")
    assert check_overrides([f"hydra.run.dir={tmp_path}"]) is None
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (tmp_path / ".repro_job").write_text("slurm job 4242 ")
    assert check_overrides([f"hydra.run.dir={tmp_path}"]) is None


def test_a_sweep_job_is_refused_where_its_folder_was_taken_before_the_multirun_began(tmp_path):
    """Under torchrun every rank rewrites Hydra's account of the job after rank 0 took the folder: the job ran."""
    from repro.cli import _job_outcome, claim_folder

    claim_folder(tmp_path)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "hydra.yaml").write_text("")
    os.utime(tmp_path / ".repro_job", (100, 100))
    os.utime(tmp_path / ".hydra" / "hydra.yaml", (200, 200))  # rank 1's, later
    assert _job_outcome(tmp_path, 0, began=50.0)[0] == "missing"  # its own folder (no record yet)
    assert _job_outcome(tmp_path, 0, began=150.0)[0] == "refused"  # an earlier multirun's folder


def test_a_requeued_slurm_job_takes_its_own_folder_back(tmp_path, monkeypatch):
    from repro.cli import _job_outcome, claim_folder
    from repro.context import ConfigError

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    claim_folder(tmp_path)
    os.utime(tmp_path / ".repro_job", (0, 0))  # taken long ago, before the multirun (requeued) began again
    claim_folder(tmp_path)  # the same job, after a preemption
    assert _job_outcome(tmp_path, 0, began=1.0)[0] == "missing"  # its own folder (no record yet), not refused
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    with pytest.raises(ConfigError, match="another job's folder"):
        claim_folder(tmp_path)


def _clean_tree(monkeypatch) -> None:
    # a tree with uncommitted edits reuses no finished run (repro.train.Job): these tests hold wherever they run
    monkeypatch.setattr("repro.context._dirty", lambda records: False)


def _reused(rows: list[dict], job) -> list[dict]:
    return [{**r, "extra": {**r["extra"], "reused_from": str(job)}} for r in rows]


@pytest.mark.parametrize("requeued", [True, False], ids=["requeued SLURM job, same folder", "by hand, new folder"])
def test_a_job_run_again_after_a_kill_reuses_the_training_runs_the_killed_job_finished(tmp_path, monkeypatch, requeued):
    """Requeued (the same SLURM job, in its own folder) or run again by hand (in a new folder, a new job), it does not
    train again what the killed job finished; another job, once one completed, trains and measures afresh."""
    _clean_tree(monkeypatch)
    if requeued:
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("FAKE_CHECKPOINTS", str(tmp_path / "ckpt"))
    monkeypatch.setenv("FAKE_KILL_AT", "2")
    job = ["logger=none", FAKE + "trains_until_killed"]
    killed_in = tmp_path / "killed"
    rerun_in = killed_in if requeued else tmp_path / "rerun"
    assert run_inline(*job, f"hydra.run.dir={killed_in}")[0] == 130  # killed while training b
    killed = record(killed_in)
    monkeypatch.delenv("FAKE_KILL_AT")
    code, out, err = run_inline(*job, f"hydra.run.dir={rerun_in}")
    assert code == 0, err
    assert "reused the finished run" in out and "training afresh" not in out
    rows = lambda run, provider: [r for r in run["rows"] if r["provider"] == provider]  # noqa: E731
    rerun = record(rerun_in)
    # a's rows as measured, each naming the job that measured them
    assert rows(rerun, "a") == _reused(rows(killed, "a"), killed_in)
    assert any(r["metric"] == "tokens_per_s" for r in rows(rerun, "a"))
    if requeued:  # its own folder: b's rows from before the kill are kept
        assert rows(rerun, "b")[:len(rows(killed, "b"))] == rows(killed, "b")
        monkeypatch.setenv("SLURM_JOB_ID", "4243")
    code, out, err = run_inline(*job, f"hydra.run.dir={tmp_path / 'another job'}")
    assert code == 0 and out.count("finished run: training afresh") == 2, err


def test_an_unwritable_records_folder_is_refused_before_any_work(tmp_path):
    not_a_folder = tmp_path / "records"
    not_a_folder.write_text("a file")
    code, out, err = run_inline(*KERNEL, "logger=none", "scale.commit_records=true", f"paths.records={not_a_folder}",
                                f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and f"paths.records='{not_a_folder}' is not a folder this run can write its record in" in err
    assert record(tmp_path / "run")["rows"] == []  # refused before any point was measured


def test_a_checkpoint_folder_that_cannot_be_made_is_refused_before_any_training(tmp_path):
    not_a_folder = tmp_path / "checkpoints"
    not_a_folder.write_text("a file")
    code, out, err = run_inline("task=flash_gpt2", "logger=none", f"checkpoint.dir={not_a_folder}",
                                f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and f"checkpoint.dir='{not_a_folder}' is not a folder this run can save its checkpoints in (" \
        f"{not_a_folder} is a file)" in err, err
    assert record(tmp_path / "run")["rows"] == []  # refused before any step was trained


@pytest.mark.parametrize("args, key", [(["paths.outputs={}/out"], "paths.outputs"),
                                       (["hydra.run.dir={}/run"], "hydra.run.dir"),
                                       (["-m", "hydra.sweep.dir={}/sweep"], "hydra.sweep.dir")])
def test_a_job_folder_that_cannot_be_made_is_refused_naming_the_key(tmp_path, args, key):
    """Hydra makes the folder before any check of ours: it was a FileNotFoundError's traceback, exit 1."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, err = run_inline(*(a.format(blocker) for a in args), *KERNEL, "logger=none")
    assert code == 2 and f"{key}='{blocker}/" in err and f"({blocker} is a file)" in err, err[-2000:]


def test_a_submitit_job_of_several_tasks_that_are_not_distributed_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.delenv("RANK", raising=False)
    code, _, err = run_inline(*KERNEL, "logger=none", f"hydra.run.dir={tmp_path}")
    assert code == 2 and "hydra.launcher.tasks_per_node=2 starts 2 copies of the job" in err, err
    assert not (tmp_path / "record.json").exists()


def test_the_first_row_is_saved_at_once(tmp_path):
    """Before record_every_s has passed: a job killed outright after it keeps it."""
    code, _, err = run_inline(f"{FAKE}saved_after_first_row", "logger=none", "record_every_s=3600",
                              f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    assert len(record(tmp_path)["rows"]) == 2  # the second yielded once per row the job folder held


def test_rows_that_came_in_a_burst_are_saved_before_the_next_row_comes(tmp_path):
    """Within record_every_s of the last of them, while the task is still at work: a job killed outright in a long
    step after them keeps them."""
    code, _, err = run_inline(f"{FAKE}saved_during_a_pause", "logger=none", "record_every_s=0.2",
                              f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    assert len(record(tmp_path)["rows"]) == 6  # the last three yielded once per row the job folder held


def test_a_sweep_job_that_died_outright_ends_the_sweep_with_its_jobs_listed(tmp_path, monkeypatch):
    """Under submitit, a job killed outright leaves no result: the launcher's collection of results raised, Hydra
    printed the error and exited 1, and no job was listed."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from submitit.core.core import Job

    # submitit waits 15 s for a result file that a dead job never writes: the file system here is no slow one
    monkeypatch.setattr(Job, "_results_timeout_s", 0)
    tests = os.path.dirname(__file__)  # for the jobs' processes, which import fake_tasks
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    entry = FAKE[len("task.entry="):]
    code, out, err = run_inline("-m", "hydra/launcher=local", "logger=none", f"hydra.sweep.dir={tmp_path}",
                                f"{FAKE}all_ok,{entry}killed_outright")
    assert code == 1 and "repro: a job of the sweep ended without finishing (Job " in err, err[-3000:]
    summary = out[out.index("[repro] stopped after 2 jobs begun"):]
    lines = [line.split()[:4] for line in summary.splitlines()[1:] if line.strip()]
    assert lines == [["0_flash_kernel", "ok", f"{FAKE[:-1]}\\:all_ok", "2"],
                     ["1_flash_kernel", "running", f"{FAKE[:-1]}\\:killed_outright", "1"]], summary
    assert "killed outright" in summary


@pytest.mark.parametrize("mode", [[], ["hydra.mode=RUN"]])  # hydra.mode=RUN was taken for a multirun: Hydra's exit 1
def test_a_sweep_without_multirun_is_named_with_what_to_do(tmp_path, mode):
    code, _, err = run_inline(*mode, "kernel.seq_len=64,128", "logger=none", f"hydra.run.dir={tmp_path}")
    assert code == 2 and "'kernel.seq_len=64,128' sweeps kernel.seq_len over several values: add -m" in err, err
    assert "kernel.seq_len=[64,128]" in err and not (tmp_path / "record.json").exists()


def test_a_paper_run_as_one_job_is_refused():
    """paper=X hydra.mode=RUN ran the paper's first task alone, as if it were the paper."""
    from repro.cli import check_overrides
    assert "runs the paper's tasks as a sweep" in check_overrides(["paper=greenformers", "hydra.mode=RUN"])
    assert check_overrides(["paper=greenformers", "hydra.mode=MULTIRUN"]) is None


@pytest.mark.parametrize("key, where, known", [("hydra.sweep.dirr", "hydra.sweep", "dir, subdir"),
                                               ("hydra.nosuch", "hydra", "run, sweep, launcher")])
def test_an_unknown_hydra_key_is_bad_input_naming_the_known_ones(tmp_path, key, where, known):
    """Was Hydra's refusal, many lines without the known keys and exit status 1, a failed run's."""
    code, _, err = run_inline(f"{key}=/x", "logger=none", f"hydra.run.dir={tmp_path}")
    lacking = key.rsplit(".", 1)[1]
    assert code == 2 and f"unknown config key '{key}': {where} has no '{lacking}'; its keys are: {known}" in err, err


def test_a_hydra_key_is_checked_in_the_config_of_the_launcher_chosen():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from repro.cli import check_overrides
    assert "hydra.launcher has no 'partitio'" in check_overrides(["hydra/launcher=slurm", "hydra.launcher.partitio=x"])
    assert check_overrides(["hydra/launcher=local", "hydra.launcher.timeout_min=5"]) is None
    assert check_overrides(["hydra.job.env_set.FOO=1"]) == ("hydra.job.env_set has no keys of its own, so "
                                                            "hydra.job.env_set.FOO is added, with a '+': "
                                                            "+hydra.job.env_set.FOO=1")
