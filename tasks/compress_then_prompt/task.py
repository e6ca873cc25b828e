"""Task compress_then_prompt: a pretrained LM compressed at each level of `compression.levels` (GPTQ, SparseGPT,
both at once: 4-bit + 50% is the paper's "8x"), then a soft prompt trained on the compressed model to win back the
dense model's quality, against the paper's hand-written hard prompt and LoRA trained for the same steps.

Experiments (`experiments`), each level's rows on the axis x = `compression`, the level's nominal ratio (dense: 1):
- perplexity: dense, compressed, and each recovery (providers `compressed_prompt`, `compressed_hard_prompt`,
  `compressed_lora`) on every evaluation text; ppl_ratio_to_dense, and ppl_gap_closed, the share of the
  compressed model's perplexity gap to dense that a recovery wins back;
- accuracy: the same models on lm-eval's multiple-choice tasks, and accuracy_recovery (100 * acc / dense acc);
- transfer: every prompt trained here (provider `prompt@<level>`) on the dense model and at every other level,
  and every prompt of `transfer.prompts` (`loaded<i>_prompt@<level>`) on the dense model and at every level, its
  own included; extras `prompt_trained_at` (its level) and `prompt_folder`;
- cost: inference time with and without each prompt (the repro.bench harness; compressed layers compute with
  their decoded weights, so this times the prompt, not a sparse or low-bit kernel). Always recorded: weight bytes
  (measured and nominal), the compression ratio, prompt and LoRA training time, step time and peak memory, and
  trainable parameters.

The dense model is measured once; its rows are repeated at each level, so that each level's rows stand alone.
"""
from __future__ import annotations

import copy
import shutil
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from repro import checks
from repro.bench import Call, Point, Provider, run_benchmark, status_of
from repro.context import ConfigError, RunContext, fingerprint
from repro.evaluation import context_length, eval_text, perplexity, perplexity_rows, plain_forward
from repro.models import load_model, require_model, trained_metadata, weight_settings
from repro.records import Row
from repro.text_data import lm_batches
from repro.train import Trainee, TrainSpec, model_flops_per_token, train

from tasks.common.lm_eval import check_tasks, stdlib_corpus, validate_eval

from .compress import LINEAR_LAYERS, check_arguments, check_n_m_fits, compress
from .data import TRAIN_TEXTS, calibration, check_length, training_ids
from .prompt import (INITS, add_soft_prompt, check_fits, check_same_model, hard_prompt_forward, load_prompt,
                     prompt_batches, read_prompt_metadata, save_prompt, soft_prompt_forward, trainable_parameters)
from .storage import STORED, load_compressed, save_compressed

EXPERIMENTS = ("perplexity", "accuracy", "transfer", "cost")
DENSE, COMPRESSED = "dense", "compressed"
PROMPT, HARD_PROMPT, LORA = "compressed_prompt", "compressed_hard_prompt", "compressed_lora"
X = "compression"
LEVEL_KEYS = ("method", "bits", "sparsity", "n_m")


@dataclass(frozen=True)
class Level:
    """One compression setting of `compression.catalog`, by name."""

    name: str
    method: str
    bits: int | None = None
    sparsity: float | None = None
    n_m: tuple[int, int] | None = None

    @property
    def ratio(self) -> float:
        """The compression as the paper counts it: 16 bits over the bits of a weight, kept weights only (4-bit +
        50% sparsity: 8x)."""
        kept = 1 - self.sparsity if self.sparsity is not None else self.n_m[0] / self.n_m[1] if self.n_m else 1
        return round(16 / ((self.bits or 16) * kept), 3)

    def extra(self) -> dict:
        joint = self.bits is not None and (self.sparsity is not None or self.n_m is not None)
        return dict(level=self.name, method=self.method, bits=self.bits, sparsity=self.sparsity,
                    n_m=list(self.n_m) if self.n_m else None, compression=self.ratio,
                    mode="joint" if joint else self.method)  # mode: the plot's columns


@dataclass
class LevelState:
    """What the rows of one level share: its x and extras, the compressed model's bytes, and each model of the
    level (dense, compressed, prompted, ...) with how it runs, for the cost benchmark."""

    level: Level
    extra: dict
    bytes: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)  # provider -> (model, forward)

    @property
    def x(self) -> float:
        return self.level.ratio


DENSE_EXTRA = dict(level=DENSE, method=None, bits=None, sparsity=None, n_m=None, compression=1.0)


def levels_from_config(cfg: DictConfig) -> list[Level]:
    """The levels `compression.levels` names, each checked (ConfigError naming its catalog entry)."""
    c = cfg.compression
    names = checks.choices("compression.levels", c.levels, list(c.catalog))
    levels = []
    for name in names:
        key = f"compression.catalog.{name}"
        checks.mapping(key, c.catalog[name], f"{list(LEVEL_KEYS)}")
        spec = OmegaConf.to_container(c.catalog[name])
        unknown = set(spec) - set(LEVEL_KEYS)
        if unknown:
            raise ConfigError(f"{key} has unknown keys {sorted(unknown)}; a level has {list(LEVEL_KEYS)}")
        for setting, integer in (("bits", True), ("sparsity", False)):
            if spec.get(setting) is not None:
                checks.number(f"{key}.{setting}", spec[setting], integer=integer)
        for n in checks.as_list(spec.get("n_m") or []):  # how many there are, check_arguments checks
            checks.number(f"{key}.n_m", n)
        try:
            n_m = check_arguments(spec.get("method"), spec.get("bits"), c.group_size, spec.get("sparsity"),
                                  spec.get("n_m"), c.act_order and spec.get("method") == "gptq", c.percdamp)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        levels.append(Level(name, spec["method"], spec.get("bits"), spec.get("sparsity"), n_m))
    return levels


def levels_at(key: str, value, cfg: DictConfig) -> list[str]:
    """Of the levels the run compresses, those `key` (prompt.levels, lora.levels: names from the catalog; null:
    all) asks for."""
    compressed = checks.as_list(cfg.compression.levels)
    if value is None:
        return compressed
    # one name alone is a list of one, not a string to search; [] none
    wanted = checks.choices(key, value, list(cfg.compression.catalog), empty_ok=True)
    return [name for name in compressed if name in wanted]


def say_left_out(key: str, value, cfg: DictConfig) -> None:
    """Say once (from validate) which levels `key` names that the run does not compress, so trains nothing at."""
    compressed = checks.as_list(cfg.compression.levels)
    left_out = [name for name in checks.as_list(value) if name not in compressed] if value is not None else []
    if left_out:
        print(f"[compress_then_prompt] {key} names {left_out}, which compression.levels={compressed} leaves out: "
              "nothing is trained there", flush=True)


def transfer_prompts(cfg: DictConfig) -> list[str]:
    """The folders of `transfer.prompts`, prompts an earlier run saved; null, as [], names none. ConfigError on
    one that is not a path."""
    folders = [] if cfg.transfer.prompts is None else checks.as_list(cfg.transfer.prompts)
    for i, folder in enumerate(folders):
        if not isinstance(folder, str) or not folder:
            raise ConfigError(f"transfer.prompts[{i}]={folder!r} is not a folder: give the path of a prompt an "
                              "earlier run saved (<its output>/prompts/<level>)")
    return folders


def model_identity(model_cfg: DictConfig) -> str:
    """The model a prompt is trained for: its name and a digest of what shapes its weights (architecture, seed,
    corpus; `repro.models.weight_settings`)."""
    return f"{model_cfg.name}-{fingerprint(weight_settings(model_cfg))}"


def check_context(cfg: DictConfig, context: int | None, hard_prompt_tokens: int = 0,
                  loaded_prompt_tokens: list[int] = ()) -> None:
    """Every sequence the run makes fits the model's context: prompts included (ConfigError naming the key)."""
    c, p, e = cfg.compression, cfg.prompt, cfg.eval
    seqlens = {"eval.seqlen": e.seqlen, "prompt.seqlen": p.seqlen,
               "compression.calibration.seqlen": c.calibration.seqlen}
    for key, seqlen in seqlens.items():
        if context is not None and seqlen > context:
            raise ConfigError(f"{key}={seqlen} is longer than the model's context of {context} positions")
    try:
        if levels_at("prompt.levels", p.levels, cfg):
            for key in ("prompt.seqlen", "eval.seqlen"):
                check_fits(context, p.tokens, seqlens[key], f"prompt.tokens={p.tokens} plus {key}={seqlens[key]}")
        check_fits(context, hard_prompt_tokens, e.seqlen, f"hard_prompt ({hard_prompt_tokens} tokens) plus "
                                                          f"eval.seqlen={e.seqlen}")
        for i, tokens in enumerate(loaded_prompt_tokens):
            check_fits(context, tokens, e.seqlen,
                       f"transfer.prompts[{i}] ({tokens} tokens) plus eval.seqlen={e.seqlen}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def validate(cfg: DictConfig) -> None:
    require_model(cfg, "compresses a pretrained model")
    experiments = checks.choices("experiments", cfg.experiments, EXPERIMENTS)
    if "transfer" in experiments and "perplexity" not in experiments:
        raise ConfigError("experiments: transfer is read against the perplexities of the dense and compressed "
                          "models: add perplexity")
    c = cfg.compression
    if c.group_size is not None:
        checks.number("compression.group_size", c.group_size, at_least=1)
    checks.flag("compression.act_order", c.act_order)
    checks.number("compression.percdamp", c.percdamp, integer=False)
    if not c.percdamp > 0:  # checked here, before the levels, whose checks would name a level
        raise ConfigError(f"compression.percdamp={c.percdamp} must be > 0 (the papers use 0.01)")
    checks.number("compression.calibration.samples", c.calibration.samples, at_least=1)
    checks.number("compression.calibration.seqlen", c.calibration.seqlen, at_least=2)
    levels_from_config(cfg)
    checks.choice("text.name", cfg.text.name, TRAIN_TEXTS)
    if cfg.text.max_tokens is not None:
        checks.number("text.max_tokens", cfg.text.max_tokens, at_least=1)
    p = cfg.prompt
    checks.number("prompt.tokens", p.tokens, at_least=1)
    checks.choice("prompt.init", p.init, INITS)
    checks.number("prompt.seqlen", p.seqlen, at_least=2)
    checks.number("prompt.batch", p.batch, at_least=1)
    checks.number("prompt.val_chunks", p.val_chunks, at_least=1)
    levels_at("prompt.levels", p.levels, cfg)
    say_left_out("prompt.levels", p.levels, cfg)
    if cfg.hard_prompt is not None and (not isinstance(cfg.hard_prompt, str) or not cfg.hard_prompt.strip()):
        raise ConfigError(f"hard_prompt={cfg.hard_prompt!r} must be a text, or null for no hard-prompt rows")
    lora = cfg.lora
    levels_at("lora.levels", lora.levels, cfg)
    say_left_out("lora.levels", lora.levels, cfg)
    checks.number("lora.rank", lora.rank, at_least=1)
    checks.number("lora.alpha", lora.alpha, integer=False)
    if lora.alpha <= 0:
        raise ConfigError(f"lora.alpha={lora.alpha} must be > 0 (the update is scaled by alpha / rank)")
    checks.number("lora.dropout", lora.dropout, integer=False, at_least=0, below=1)
    if lora.targets is not None and not all(isinstance(t, str) for t in checks.axis("lora.targets", lora.targets)):
        raise ConfigError(f"lora.targets={lora.targets!r} must be module names (q_proj, v_proj, ...) or null")
    prompts = transfer_prompts(cfg)
    if prompts and "transfer" not in experiments:
        raise ConfigError(f"transfer.prompts={prompts} names saved prompts, but experiments={experiments} has no "
                          "transfer, the experiment that scores them: add transfer, or set transfer.prompts=[]")
    identity = {"model": model_identity(cfg.model), "hidden_size": OmegaConf.select(cfg.model, "arch.hidden")}
    for i, folder in enumerate(prompts):
        try:
            check_same_model(read_prompt_metadata(folder), identity, folder)
        except ValueError as exc:
            raise ConfigError(f"transfer.prompts[{i}]: {exc}") from None
    checks.number("cost.batch", cfg.cost.batch, at_least=1)
    checks.number("cost.warmup_ms", cfg.cost.warmup_ms, integer=False, at_least=0)
    checks.number("cost.rep_ms", cfg.cost.rep_ms, integer=False, at_least=1)
    validate_eval(cfg.eval)
    if not checks.as_list(cfg.eval.texts):  # the prompt's validation chunks and the cost's calls come from the first
        raise ConfigError("eval.texts=[] is empty: every level's perplexity is measured on these texts; name one "
                          "or more (stdlib, pydoc; wikitext2, ptb, c4 from the Hub)")
    if "accuracy" in experiments:
        if not checks.as_list(cfg.eval.tasks):
            raise ConfigError("eval.tasks=[] is empty, but experiments has accuracy: name the multiple-choice "
                              "tasks (e.g. effrepro_mc), or leave accuracy out of experiments")
        check_tasks("eval.tasks", cfg.eval.tasks)
    TrainSpec.from_config(cfg.train)
    context = OmegaConf.select(cfg.model, "arch.context")
    if context is not None:  # a model built from the config; the others are checked once loaded
        check_context(cfg, context)


def unread_keys(cfg: DictConfig) -> dict[str, str]:
    experiments = checks.as_list(cfg.experiments)
    read_by = {"cost": ["cost"], **dict.fromkeys(["eval.tasks", "eval.num_fewshot", "eval.limit"], ["accuracy"])}
    unread = checks.unread_unless_chosen(read_by, experiments, f"experiments={experiments}")
    # the settings of what is trained: the hard prompt and the transfer read neither
    for block, keys in (("prompt", ["tokens", "init"]), ("lora", ["rank", "alpha", "dropout", "targets"])):
        levels = cfg[block].levels
        if not levels_at(f"{block}.levels", levels, cfg):
            unread.update(dict.fromkeys([f"{block}.{key}" for key in keys], (
                f"it shapes what is trained at {block}.levels, and {block}.levels="
                f"{None if levels is None else checks.as_list(levels)} names none of compression.levels="
                f"{checks.as_list(cfg.compression.levels)}")))
    return unread


def gap_closed_row(provider: str, x: float, extra: dict, result, dense: float, compressed: float) -> Row:
    """The share of the compressed model's perplexity gap to dense that a recovery (`result`) won back: 0 none,
    1 all of it, above 1 better than dense. Where compression cost nothing (compressed no worse than dense) there
    is no gap, and the ratio would read backwards: the row says so instead (status unsupported)."""
    extra = {**extra, "dense_ppl": dense, "compressed_ppl": compressed,
             "better_than_compressed": result.ppl < compressed,
             "closer_to_dense": abs(result.ppl - dense) < abs(compressed - dense)}
    if compressed <= dense:
        return Row(provider, X, x, "ppl_gap_closed", "fraction", status="unsupported", extra=extra,
                   message=f"no gap to close: the compressed model's perplexity {compressed:.4g} is not above "
                           f"dense's {dense:.4g}")
    return Row(provider, X, x, "ppl_gap_closed", "fraction", (compressed - result.ppl) / (compressed - dense),
               n=result.tokens, extra=extra)


def lora_targets(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """`lora.targets` as PEFT is to get them, each checked to name linear layers of the model (PEFT matches the
    end of a layer's name, and would find out only once a level is compressed, failing its row). PEFT's
    "all-linear" becomes the names of every linear layer but the output head, as PEFT means it: its own
    expansion looks for nn.Linear, which the compressed layers no longer are."""
    linears = {name: module for name, module in model.named_modules() if isinstance(module, LINEAR_LAYERS)}
    if targets == ["all-linear"]:
        head = model.get_output_embeddings()
        return sorted({name.rsplit(".", 1)[-1] for name, module in linears.items() if module is not head})
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in linears)]
    if missing:
        ends = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise ConfigError(f"lora.targets: {missing} name no linear layer of the model; its linear layers are "
                          f"named {ends}")
    return targets


def guarded(provider: str, x: float, extra: dict, work: Callable[[], Iterator[Row]]) -> Iterator[Row]:
    """The rows of `work`; what stops it (out of memory, an error) becomes one more row and the run goes on. Bad
    input is not caught: it stops the run."""
    try:
        yield from work()
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - one level or provider must not end the others
        status, message = status_of(exc)
        print(f"[compress_then_prompt] {provider} at {extra.get('level')}: {status}: {message}", flush=True)
        yield Row(provider, X, x, "perplexity", "ppl", status=status, message=message, extra=dict(extra))


def training_text_identity(cfg: DictConfig) -> dict:
    """What decides the training text's tokens, for a checkpoint's fingerprint: C4's are fixed; the local corpus's
    depend on which corpus (a trained model's own) and how much of it."""
    text = OmegaConf.to_container(cfg.text, resolve=True)
    if text["name"] == "c4":
        return {"name": "c4"}
    corpus, _ = stdlib_corpus(cfg)  # the corpus train_ids is read from; its cache root decides no token
    return {**text, "corpus": OmegaConf.to_container(corpus, resolve=True)}


class CompressThenPrompt:
    """One run: the dense model, the texts and the dense measurements, shared by every level. Everything the
    run needs is read and checked here, before any model is compressed or trained."""

    def __init__(self, cfg: DictConfig, ctx: RunContext, model, tokenizer):
        self.cfg, self.ctx, self.dense, self.tokenizer = cfg, ctx, model, tokenizer
        self.experiments = set(checks.as_list(cfg.experiments))
        self.levels = levels_from_config(cfg)
        self.prompt_levels = set(levels_at("prompt.levels", cfg.prompt.levels, cfg))
        self.lora_levels = set(levels_at("lora.levels", cfg.lora.levels, cfg))
        self.spec = TrainSpec.from_config(cfg.train)
        config = model.config
        self.identity = {"model": model_identity(cfg.model), "hidden_size": config.hidden_size,
                         "vocab_size": config.vocab_size}
        self.extra = {"model": cfg.model.name.split("/")[-1].lower()}  # huggyllama/llama-7b -> llama-7b
        self.hard_prefix = None if cfg.hard_prompt is None else torch.tensor(
            tokenizer(cfg.hard_prompt, add_special_tokens=False)["input_ids"], dtype=torch.long)
        self.loaded = self.loaded_prompts()
        check_context(cfg, context_length(model), 0 if self.hard_prefix is None else len(self.hard_prefix),
                      [saved["tokens"] for _, saved in self.loaded.values()])
        # one name is a list of one for PEFT, not the regular expression it reads a lone string as
        self.lora_targets = None if cfg.lora.targets is None or not self.lora_levels else \
            lora_targets(model, checks.as_list(cfg.lora.targets))
        for level in self.levels:
            if level.n_m is not None:
                try:
                    check_n_m_fits(model, level.n_m)
                except ValueError as exc:
                    raise ConfigError(f"compression.catalog.{level.name}: {exc}") from None
        self.read_texts()
        self.dense_ppl, self.dense_acc = {}, {}
        self.compressed_ppl: dict[str, dict[str, float]] = {}  # level -> text -> ppl: the gap a recovery closes
        self.prompts: dict[str, Path] = {}  # level -> its trained prompt
        self.files: dict[str, Path] = {}  # level -> its compressed model, for the transfer
        self.scratch = ctx.output_dir / "compressed"

    def loaded_prompts(self) -> dict[str, tuple[Path, dict]]:
        """The prompts of `transfer.prompts` by provider name, each with its metadata, all for this model."""
        loaded = {}
        for i, folder in enumerate(transfer_prompts(self.cfg)):
            try:
                saved = read_prompt_metadata(folder)
                check_same_model(saved, self.identity, folder)
            except ValueError as exc:
                raise ConfigError(f"transfer.prompts[{i}]: {exc}") from None
            loaded[f"loaded{i}_prompt@{saved['level']}"] = (Path(folder), saved)
        return loaded

    def read_texts(self) -> None:
        """The training text and its calibration windows, the evaluation texts, the batch timed for cost: each
        long enough for what is asked of it (ConfigError otherwise)."""
        cfg = self.cfg
        c, p, e = cfg.compression, cfg.prompt, cfg.eval
        data, cache = stdlib_corpus(cfg)  # a trained model's own corpus, where it has one
        self.train_ids = training_ids(cfg.text.name, self.tokenizer, data=data, cache=cache,
                                      max_tokens=cfg.text.max_tokens, same_tokenizer=cfg.model.source == "trained")
        check_length(self.train_ids, c.calibration.samples, c.calibration.seqlen, "compression.calibration")
        check_length(self.train_ids, p.batch, p.seqlen, "prompt")
        self.calibration = calibration(self.train_ids, c.calibration.samples, c.calibration.seqlen, cfg.seed)
        self.texts = {}
        for name in checks.as_list(e.texts):
            ids = eval_text(name, self.tokenizer, data=data, cache=cache)
            self.texts[name] = ids[:e.max_chunks * e.seqlen] if e.max_chunks else ids
        name, first = next(iter(self.texts.items()))
        check_length(first, cfg.cost.batch, e.seqlen, "cost.batch", f"the evaluation text {name!r}",
                     "eval.max_chunks" if e.max_chunks else "a longer one first in eval.texts", drawn=False)
        self.cost_ids = first[:cfg.cost.batch * e.seqlen].view(cfg.cost.batch, e.seqlen)

    # --- measurements ---------------------------------------------------------------------------------------

    def perplexities(self, model, forward=None) -> dict:
        if "perplexity" not in self.experiments:
            return {}
        e = self.cfg.eval
        return {name: perplexity(model, ids, e.seqlen, batch_size=e.batch_size, forward=forward)
                for name, ids in self.texts.items()}

    def accuracies(self, model, forward=None, prompt_tokens: int = 0) -> dict:
        e = self.cfg.eval
        tasks = checks.as_list(e.tasks)
        if "accuracy" not in self.experiments or not tasks:
            return {}
        from repro.lm_harness import EffreproLM, evaluate_multiple_choice  # lm-eval: seconds to import
        lm = EffreproLM(model, self.tokenizer, score=forward, batch_size=e.batch_size)
        lm.max_length -= prompt_tokens  # the prompt takes its positions
        return evaluate_multiple_choice(lm, tasks, num_fewshot=e.num_fewshot, limit=e.limit)

    def quality_rows(self, provider: str, x: float, extra: dict, ppl: dict, acc: dict,
                     compressed_ppl: dict | None = None) -> list[Row]:
        """Perplexity and accuracy rows of one provider, each against dense; with `compressed_ppl` (by text, of
        the compressed model this provider tries to recover) also the share of its gap to dense won back."""
        rows = []
        for text, result in ppl.items():
            more = {**extra, "text": text, "series": text, "seqlen": self.cfg.eval.seqlen}
            rows += perplexity_rows(result, provider, X, x, more)
            dense = self.dense_ppl[text].ppl
            if provider != DENSE:
                rows.append(Row(provider, X, x, "ppl_ratio_to_dense", "x", result.ppl / dense, n=result.tokens,
                                extra={**more, "baseline": DENSE, "dense_ppl": dense}))
            if compressed_ppl:
                rows.append(gap_closed_row(provider, x, more, result, dense, compressed_ppl[text]))
        if acc:
            from repro.lm_harness import multiple_choice_rows
            rows += multiple_choice_rows(acc, provider, X, x, extra)
        for task, scores in acc.items():
            dense = self.dense_acc[task]["acc"]
            if provider != DENSE and dense:
                rows.append(Row(provider, X, x, "accuracy_recovery", "%", 100 * scores["acc"] / dense, n=scores["n"],
                                extra={**extra, "benchmark": task, "series": task, "baseline": DENSE,
                                       "dense_accuracy": dense}))
        return rows

    def validation_rows(self, forward) -> Callable:
        """A trainee's evaluation: perplexity on the first `prompt.val_chunks` chunks of the first eval text."""
        name, ids = next(iter(self.texts.items()))
        e, chunks = self.cfg.eval, self.cfg.prompt.val_chunks

        def evaluate(model) -> list[Row]:
            result = perplexity(model, ids[:chunks * e.seqlen], e.seqlen, batch_size=e.batch_size, forward=forward,
                                progress=False)
            return [Row("", "step", None, "val_perplexity", "ppl", result.ppl, n=result.tokens, extra={"text": name})]
        return evaluate

    def fit(self, provider: str, model, state: LevelState, forward, settings: dict) -> Iterator[Row]:
        """Train what trains in `model` (a prompt, LoRA adapters) with the suite's loop on the training text: its
        count, the loop's rows (loss, validation perplexity, step time, peak memory), then the wall time it took.
        Returns the extras of the trained model's rows."""
        c, p, arch = self.cfg.compression, self.cfg.prompt, self.dense.config
        extra = {**state.extra, "trainable_params": trainable_parameters(model)}
        # a soft prompt's positions go through the model beside each sequence's text tokens, which are counted
        positions = p.seqlen + (p.tokens if provider == PROMPT else 0)
        flops_per_token = model_flops_per_token(self.dense, arch.num_hidden_layers, arch.hidden_size, positions,
                                                frozen=True) * positions / p.seqlen
        yield Row(provider, X, state.x, "trainable_params", "params", extra["trainable_params"], n=1, extra=extra)
        # lm_batches draws its windows as the calibration's are drawn (repro.text_data.windows, GPTQ's draw)
        batches = lm_batches(self.train_ids, p.batch, p.seqlen, self.spec.grad_accum, self.cfg.seed)
        trainee = Trainee(
            provider, model, prompt_batches(batches) if provider == PROMPT else batches,
            self.validation_rows(forward), tokens_per_step=p.batch * p.seqlen * self.spec.grad_accum,
            flops_per_token=flops_per_token, extra=extra,
            fingerprint=fingerprint(dict(model=self.identity, level=state.level.extra(), provider=provider,
                                         compression=[c.group_size, c.act_order, c.percdamp, c.calibration.samples,
                                                      c.calibration.seqlen],
                                         text=training_text_identity(self.cfg),
                                         batch=[p.batch, p.seqlen],
                                         # what its validation rows measure, which a resumed run's rows must share
                                         validation=[next(iter(self.texts)), self.cfg.eval.seqlen, p.val_chunks],
                                         seed=self.cfg.seed, **settings)))
        checkpoints = Path(self.cfg.checkpoint.dir) if self.cfg.checkpoint.dir else None
        device = self.ctx.device
        resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        start = time.monotonic()
        went_on_from = yield from train(trainee, self.spec, device, checkpoints, self.cfg.checkpoint.resume)
        # a training resumed after a kill is timed over the steps this job ran; one finished and reused (another
        # job's, or this job's before a kill) took this job only the checkpoint's load, and train() returned before
        # resetting the device's peak, which is the job's so far (compression included): neither is its training's
        steps = self.spec.steps - went_on_from
        if steps:
            resumed = {"resumed_at": went_on_from} if went_on_from else {}
            yield Row(provider, X, state.x, "train_time", "s", time.monotonic() - start, n=steps,
                      extra={**extra, "steps": steps, **resumed})
            if device.type == "cuda":  # the loop's peak_memory counts every model the run holds; this, training's own
                added = (torch.cuda.max_memory_allocated(device) - resident) / 2**20
                yield Row(provider, X, state.x, "train_memory", "MB", added, n=1,
                          extra={**extra, "what": "peak while training minus the memory held before it"})
        model.eval()
        return extra

    # --- the experiments ------------------------------------------------------------------------------------

    def rows(self) -> Iterator[Row]:
        self.dense_ppl = self.perplexities(self.dense)
        self.dense_acc = self.accuracies(self.dense)
        for level in self.levels:
            yield from self.level_rows(level)
        if "transfer" in self.experiments:
            yield from self.transfer_rows()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def level_rows(self, level: Level) -> Iterator[Row]:
        state = LevelState(level, {**self.extra, **level.extra()})
        yield from guarded(COMPRESSED, state.x, state.extra, lambda: self.compressed_rows(state))
        if COMPRESSED not in state.models:
            return
        if self.hard_prefix is not None:
            yield from guarded(HARD_PROMPT, state.x, state.extra, lambda: self.hard_prompt_rows(state))
        if level.name in self.lora_levels:  # before the soft prompt, which PEFT wraps around the compressed model
            yield from guarded(LORA, state.x, state.extra, lambda: self.lora_rows(state))
        if level.name in self.prompt_levels:
            yield from guarded(PROMPT, state.x, state.extra, lambda: self.soft_prompt_rows(state))
        if "cost" in self.experiments:
            yield from self.cost_rows(state)
        state.models.clear()
        if self.ctx.device.type == "cuda":
            torch.cuda.empty_cache()

    def compressed_rows(self, state: LevelState) -> Iterator[Row]:
        level, x, extra, c = state.level, state.x, state.extra, self.cfg.compression
        model = copy.deepcopy(self.dense)
        report = compress(model, level.method, self.calibration, bits=level.bits, group_size=c.group_size,
                          sparsity=level.sparsity, n_m=level.n_m, act_order=c.act_order and level.method == "gptq",
                          percdamp=c.percdamp)
        if "transfer" in self.experiments:
            self.scratch.mkdir(parents=True, exist_ok=True)
            self.files[level.name] = self.scratch / f"{level.name}.safetensors"
            save_compressed(model, self.files[level.name])
        b = state.bytes = report.bytes
        errors = list(report.layer_errors.values())
        yield Row(DENSE, X, x, "weight_bytes", "bytes", b["dense_fp16"], n=1,
                  extra={**extra, "nominal": b["dense_fp16"]})
        yield Row(COMPRESSED, X, x, "weight_bytes", "bytes", b["total"], n=1,
                  extra={**extra, "nominal": b["nominal"], **{k: b[k] for k in STORED}})
        yield Row(COMPRESSED, X, x, "compression_ratio", "x", b["nominal_ratio"], n=1,
                  extra={**extra, "measured_ratio": b["ratio"], "counted": "nominal: bits of the kept weights"})
        yield Row(COMPRESSED, X, x, "stored_compression_ratio", "x", b["ratio"], n=1,
                  extra={**extra, "counted": "bytes held: codes, scales, zero-points and masks"})
        yield Row(COMPRESSED, X, x, "compress_time", "s", report.seconds, n=1, extra=extra)
        yield Row(COMPRESSED, X, x, "layer_error", "fraction", statistics.mean(errors), n=len(errors),
                  extra={**extra, "max": max(errors), "what": "||WX - W'X||^2 / ||WX||^2 on calibration"})
        yield from self.quality_rows(DENSE, x, extra, self.dense_ppl, self.dense_acc)
        ppl = self.perplexities(model)
        self.compressed_ppl[level.name] = {text: r.ppl for text, r in ppl.items()}
        yield from self.quality_rows(COMPRESSED, x, extra, ppl, self.accuracies(model))
        state.models[DENSE] = (self.dense, plain_forward)
        state.models[COMPRESSED] = (model, plain_forward)

    def hard_prompt_rows(self, state: LevelState) -> Iterator[Row]:
        compressed, forward = state.models[COMPRESSED][0], hard_prompt_forward(self.hard_prefix)
        tokens = len(self.hard_prefix)
        yield from self.quality_rows(HARD_PROMPT, state.x, {**state.extra, "prompt_tokens": tokens},
                                     self.perplexities(compressed, forward),
                                     self.accuracies(compressed, forward, tokens),
                                     self.compressed_ppl.get(state.level.name))
        state.models[HARD_PROMPT] = (compressed, forward)

    def lora_rows(self, state: LevelState) -> Iterator[Row]:
        from .lora import add_lora  # PEFT: seconds to import

        settings = OmegaConf.to_container(self.cfg.lora, resolve=True)
        model = add_lora(copy.deepcopy(state.models[COMPRESSED][0]), settings["rank"], settings["alpha"],
                         settings["dropout"], self.lora_targets)
        extra = yield from self.fit(LORA, model, state, plain_forward, {"lora": settings})
        yield from self.recovered_rows(LORA, model, plain_forward, 0, state, extra)

    def soft_prompt_rows(self, state: LevelState) -> Iterator[Row]:
        p, level = self.cfg.prompt, state.level
        prompted = add_soft_prompt(state.models[COMPRESSED][0], p.tokens, p.init)
        forward = soft_prompt_forward(p.tokens)
        extra = yield from self.fit(PROMPT, prompted, state, forward, {"prompt": [p.tokens, p.init]})
        folder = self.ctx.output_dir / "prompts" / level.name
        save_prompt(prompted, folder, {**self.identity, "tokens": p.tokens, "init": p.init, "level": level.name,
                                       "level_spec": level.extra(), "text": self.cfg.text.name,
                                       "steps": self.spec.steps, "seqlen": p.seqlen})
        self.prompts[level.name] = folder
        yield from self.recovered_rows(PROMPT, prompted, forward, p.tokens, state, extra)

    def recovered_rows(self, provider: str, model, forward, prompt_tokens: int, state: LevelState, extra: dict
                       ) -> Iterator[Row]:
        """A trained recovery's quality against dense and the compressed model's, and its bytes."""
        count = extra["trainable_params"]
        yield Row(provider, X, state.x, "weight_bytes", "bytes", state.bytes["total"] + 2 * count, n=1,
                  extra={**extra, "nominal": state.bytes["nominal"] + 2 * count, "adapter_bytes": 2 * count})
        yield from self.quality_rows(provider, state.x, extra, self.perplexities(model, forward),
                                     self.accuracies(model, forward, prompt_tokens),
                                     self.compressed_ppl.get(state.level.name))
        state.models[provider] = (model, forward)

    def cost_rows(self, state: LevelState) -> Iterator[Row]:
        """Inference time of a batch of `cost.batch` eval chunks, and peak memory, by each model of the level."""
        ids = self.cost_ids.to(self.ctx.device)

        def provider(name, model, forward):
            def build(point):
                def fn():
                    with torch.no_grad():
                        return forward(model, ids)
                return Call(fn)
            return Provider(name, build, baseline=name == DENSE)

        point = Point(X, state.x, {**state.extra, "batch": self.cfg.cost.batch, "seqlen": self.cfg.eval.seqlen,
                                   "dtype": str(self.dense.dtype).removeprefix("torch.")})
        providers = [provider(name, model, forward) for name, (model, forward) in state.models.items()]
        yield from run_benchmark([point], providers, self.ctx.device, warmup_ms=self.cfg.cost.warmup_ms,
                                 rep_ms=self.cfg.cost.rep_ms, progress=False, compare_to=[COMPRESSED])

    def transfer_rows(self) -> Iterator[Row]:
        """Each prompt on the dense model and at every level: the run's own at every level but the one it was
        trained at (that is compressed_prompt), a loaded one at its own level too (the earlier run's compressed
        model there, or its texts, need not be this run's)."""
        sources = {f"prompt@{level}": (folder, level, True) for level, folder in self.prompts.items()}
        sources.update({name: (folder, saved["level"], False) for name, (folder, saved) in self.loaded.items()})
        targets = [(None, 1.0, {**self.extra, **DENSE_EXTRA})]
        targets += [(level, level.ratio, {**self.extra, **level.extra()}) for level in self.levels
                    if level.name in self.files]
        for target, x, extra in targets:
            base = {}  # the target model, loaded once, by the first source that needs it

            def evaluate(provider, folder, more, target=target, x=x, base=base):
                if not base:
                    base["model"] = self.dense if target is None else \
                        load_compressed(copy.deepcopy(self.dense), self.files[target.name])
                prompted = load_prompt(base["model"], folder, self.identity)
                ppl = self.perplexities(prompted, soft_prompt_forward(read_prompt_metadata(folder)["tokens"]))
                compressed = None if target is None else self.compressed_ppl.get(target.name)
                yield from self.quality_rows(provider, x, more, ppl, {}, compressed)

            for provider, (folder, trained_at, own) in sources.items():
                if own and target is not None and trained_at == target.name:
                    continue  # the diagonal: that is compressed_prompt
                more = {**extra, "mode": "transfer", "prompt_trained_at": trained_at, "prompt_folder": str(folder)}
                yield from guarded(provider, x, more, partial(evaluate, provider, folder, more))


def run(cfg: DictConfig, ctx: RunContext) -> Iterator[Row]:
    model, tokenizer = load_model(cfg.model, ctx.device)
    if cfg.model.source == "trained":
        meta = trained_metadata(cfg.model)
        ctx.env["trained_model"] = {k: meta[k] for k in meta if k != "rows"}
    yield from CompressThenPrompt(cfg, ctx, model, tokenizer).rows()
