"""Few-shot multiple choice through lm-evaluation-harness, as Scissorhands (HellaSwag, MathQA, PIQA, Winogrande)
and Compress-then-Prompt (OpenBookQA, HellaSwag, PIQA) report it.

lm-eval does the tasks (prompts, few-shot examples, metrics); our model wrapper answers its log-likelihood
requests through a callable `score(model, ids) -> logits`, so whatever a task changes in how the model runs
(a KV-cache policy, compressed weights, a soft prompt) is what lm-eval scores. `lm_tasks/` holds our own small
task, `effrepro_mc`, which runs offline; the papers' tasks are lm-eval's, and need the Hub.
"""
from __future__ import annotations

import functools
import itertools
import logging
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY
from lm_eval.models.utils import has_bos_prefix
from tqdm.auto import tqdm

from .context import ConfigError
from .evaluation import Forward, context_length, first_line, hub_error, model_device, plain_forward
from .records import Row

LOCAL_TASKS = Path(__file__).parent / "lm_tasks"
# Every evaluation (a sweep makes dozens) logged lm-eval's INFO lines and, for our effrepro_mc, its advice on
# `--metadata`, a flag of lm-eval's own CLI (the task reads its questions through a function); its warnings about a
# task stay. evaluate()'s `verbosity` that did this is a no-op since lm-eval 0.4.
METADATA_ADVICE = "Custom kwargs can be passed to `--metadata`"
logging.getLogger("lm_eval").setLevel(logging.WARNING)
logging.getLogger("lm_eval.api.task").addFilter(lambda record: METADATA_ADVICE not in record.getMessage())


class EffreproLM(TemplateLM):
    """lm-eval's view of one of our models. lm-eval splits each (context, continuation) request into tokens
    (TemplateLM); here every batch of sequences goes through `score` (default: a plain forward pass) and a
    continuation's log-likelihood is the sum of its tokens' log-probabilities. `score(model, ids) -> logits`
    gets the ids on the model's device, as `perplexity`'s `forward` does. Only log-likelihood requests are
    served: the multiple-choice tasks the papers report need nothing else.

    A context is tokenized as the tokenizer does by default, as lm-eval's own HF model does: with a BOS where
    the tokenizer adds one (OPT's and Llama's; SmolLM2's and this suite's own add none), as `eval_text` has it,
    and a special token's string read as that token (`eval_text` reads it as text). An empty context is what
    every other context starts with: the BOS where the tokenizer adds one, as lm-eval's HF model has it, else the
    end-of-sequence token (TemplateLM's prefix; SmolLM2's is `<|im_end|>`), where lm-eval's HF model takes a BOS
    the tokenizer has but never adds: this suite's trained models never saw their BOS, as their documents follow
    an end-of-text."""

    def __init__(self, model: torch.nn.Module, tokenizer, score: Forward | None = None, batch_size: int = 8,
                 equal_lengths: bool = False):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.score = score or plain_forward
        self.batch_size = batch_size
        # a score that depends on the sequence's length (a KV budget that is a fraction of it) must not see a
        # batch padded to its longest request: batches then hold requests of one length only
        self.equal_lengths = equal_lengths
        self.max_length = context_length(model) or 2048  # lm-eval's own default where a config does not say
        self._tasks: dict[tuple[str, str], str | None] = {}  # (context, continuation) -> the task that asked

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # what every context begins with: a BOS-adding tokenizer's (Llama's) empty context was its end-of-text
        bos = self.tokenizer.bos_token_id
        adds_bos = bos is not None and self.tokenizer.encode("", add_special_tokens=True)[:1] == [bos]
        return bos if adds_bos else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # as lm-eval's own HF model: unless told, the tokenizer's default (its BOS where it adds one, as
        # `eval_text` has it for perplexity), and no second BOS before a string that starts with one
        if add_special_tokens is None:
            add_special_tokens = not has_bos_prefix(string, self.tokenizer.bos_token)
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # which task asked what, for the error on a request the model cannot score (TemplateLM passes on the text)
        self._tasks = {request.args: request.task_name for request in requests}
        return super().loglikelihood(requests, disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        for (context, continuation), _, target in requests:
            if len(target) > self.max_length:
                raise ConfigError(f"lm-eval task {self._tasks.get((context, continuation))!r} has an answer of "
                                  f"{len(target)} tokens ({continuation[:40]!r}...), more than the model's context "
                                  f"of max_length={self.max_length} tokens can score; use a model with a longer "
                                  "context (its config's max_position_embeddings)")
        # The model reads context + continuation but its last token (kept to its context length, from the left);
        # the continuation's tokens are predicted at the last positions.
        inputs = [(context + continuation)[-(self.max_length + 1):-1] for _, context, continuation in requests]
        targets = [continuation for _, _, continuation in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))  # similar lengths share a batch
        groups = [list(g) for _, g in itertools.groupby(order, key=lambda i: len(inputs[i]))] \
            if self.equal_lengths else [order]
        batches = [g[start:start + self.batch_size] for g in groups for start in range(0, len(g), self.batch_size)]
        device = model_device(self.model)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        with torch.no_grad():
            for batch in tqdm(batches, desc="lm-eval", disable=disable_tqdm or None):
                # padded on the right: in a causal model no real position sees the padding
                ids = torch.full((len(batch), len(inputs[batch[0]])), self.eot_token_id, dtype=torch.long)
                for row, i in enumerate(batch):
                    ids[row, :len(inputs[i])] = torch.tensor(inputs[i])
                log_probs = self.score(self.model, ids.to(device)).float().log_softmax(-1)
                for row, i in enumerate(batch):
                    target = torch.tensor(targets[i], device=log_probs.device)
                    predicted = log_probs[row, len(inputs[i]) - len(target):len(inputs[i])]
                    results[i] = (predicted.gather(-1, target[:, None]).sum().item(),
                                  bool((predicted.argmax(-1) == target).all()))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("EffreproLM serves log-likelihood requests (multiple-choice tasks) only; for a "
                                  "perplexity use repro.evaluation.perplexity")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("EffreproLM serves log-likelihood requests (multiple-choice tasks) only; "
                                  "generation tasks are not supported")


# What EffreproLM serves (log-likelihood requests: these tasks make nothing else) and the metric that
# `evaluate_multiple_choice` reads of every task
SERVED_OUTPUT_TYPES = ("multiple_choice", "loglikelihood")
ROW_METRIC = "acc"


def check_served(tasks: tuple[str, ...], key: str = "tasks") -> None:
    """Every task that `tasks` names (a group's or tag's each) is one EffreproLM serves and that scores acc, as
    lm-eval's index reads it from the task's YAML; else a ConfigError naming `key` and the task, before any work
    (building a task reads its dataset). A task defined in Python says so only when built: `load_tasks` checks
    every task again as it builds it."""
    index = task_manager(tasks, key).task_index
    for asked in tasks:
        for task, config in _task_configs(index, asked, {}):
            named = repr(task) if task == asked else f"{task!r} (of {asked!r})"
            output_type = config.get("output_type", "generate_until")  # lm-eval's TaskConfig default
            try:
                _check_output_type(named, output_type)
                metrics = config.get("metric_list") or [{"metric": m} for m in DEFAULT_METRIC_REGISTRY[output_type]]
                _check_metric(named, [m.get("metric") for m in metrics])
            except ConfigError as exc:
                raise ConfigError(f"{key}: {exc}") from None


def _task_configs(index: dict, name: str, overrides: dict):
    """(task, config) of each task that `name` stands for in a TaskManager's index, as lm-eval builds it: a task
    itself, a tag's or group's each, with what a group sets for its members; a task defined in Python (its class
    says) and a name the index lacks (lm-eval refuses it when loading) give none."""
    entry = index.get(name)
    kind = entry.kind.name if entry else None
    if kind == "TASK":
        yield name, {**entry.cfg, **overrides}
    elif kind == "TAG":
        for task in sorted(entry.tags):
            yield from _task_configs(index, task, overrides)
    elif kind == "GROUP":
        yield from _group_configs(index, entry.cfg, overrides)


def _group_configs(index: dict, group: dict, overrides: dict):
    """`_task_configs` of a group's members: what the caller sets wins over what the group sets, and what a member
    sets wins over both (lm-eval's TaskFactory)."""
    overrides = {**_settings(group), **overrides}
    for member in group.get("task") or []:
        if isinstance(member, str):
            yield from _task_configs(index, member, overrides)
        elif "group" in member and member["group"] not in index:  # a group defined in place
            yield from _group_configs(index, member, overrides)
        elif member.get("group", member.get("task")) in index:
            yield from _task_configs(index, member.get("group", member.get("task")),
                                     {**overrides, **_settings(member)})
        elif "task" in member:  # a task defined in place
            yield member["task"], {**overrides, **member}


def _settings(config: dict) -> dict:
    """What a group, or a group's entry for a member, sets of what `check_served` reads."""
    return {k: config[k] for k in ("output_type", "metric_list") if k in config}


def _check_output_type(task: str, output_type) -> None:
    if output_type not in SERVED_OUTPUT_TYPES:
        raise ConfigError(f"lm-eval task {task} has output_type={output_type!r}, which EffreproLM does not serve: it "
                          f"answers log-likelihood requests only, output_type one of {list(SERVED_OUTPUT_TYPES)} "
                          "(multiple-choice tasks); choose such a task")


def _check_metric(task: str, metrics: list) -> None:
    if ROW_METRIC not in metrics:
        raise ConfigError(f"lm-eval task {task} has no {ROW_METRIC!r} metric (its metrics: {metrics}), and the rows "
                          f"report each task's {ROW_METRIC} (with acc_norm where it has one); choose a task that "
                          f"scores {ROW_METRIC}")


def task_manager(tasks: tuple[str, ...], key: str = "tasks"):
    """A TaskManager that knows `tasks`, or a ConfigError naming `key` for any it does not."""
    try:
        return _task_manager(tuple(tasks))
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None


@functools.lru_cache(maxsize=4)
def check_offline(tasks: tuple[str, ...], key: str = "tasks") -> None:
    """Offline (datasets' HF_HUB_OFFLINE or HF_DATASETS_OFFLINE), a task whose dataset is not in the local cache
    fails the run where it is loaded, after the work before it. lm-eval says which dataset a task reads only by
    building it (groups, tags, Python tasks, custom loaders), so each task is loaded now: seconds from the cache,
    a miss at once. Online nothing is loaded here (the run downloads what it needs). Cached: a sweep's settings,
    checked up front, share their tasks."""
    import datasets

    if not datasets.config.HF_HUB_OFFLINE:
        return
    for task in tasks:  # one by one: the error names the task that is missing
        try:
            load_tasks([task])
        except ConfigError as exc:
            raise ConfigError(f"{key}: {exc}") from None


def load_tasks(tasks: list[str]) -> dict:
    """lm-eval's tasks by name (a group's each), their datasets read; a ConfigError saying why where one cannot be."""
    manager = task_manager(tuple(tasks))
    try:
        loaded = manager.load(tasks)["tasks"]  # reads the tasks' datasets: where the Hub is needed, it fails here
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds offline
        from_hub = [task for task in tasks if task not in _local_task_manager().all_tasks]
        if from_hub:
            raise hub_error(f"lm-eval tasks {from_hub}", exc, "our local task effrepro_mc") from None
        raise ConfigError(f"lm-eval tasks {tasks} (ours, in {LOCAL_TASKS}) could not be loaded: "
                          f"{first_line(exc)}") from None
    for name, task in loaded.items():  # as built: a task defined in Python too (`check_served` reads YAML only)
        _check_output_type(repr(name), task.OUTPUT_TYPE)
        _check_metric(repr(name), list(task.aggregation()))
    return loaded


@functools.cache
def _full_task_manager():
    """lm-eval's own ~15,000 tasks and ours: indexed (about 10 s) only when one of lm-eval's is asked for, and once
    per process, whichever tasks are asked for (the checks before any work, each task's own offline, and the
    evaluations share it)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(LOCAL_TASKS))


@functools.cache
def _local_task_manager():
    """A TaskManager of our own tasks (LOCAL_TASKS) alone: it indexes in milliseconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(LOCAL_TASKS), include_defaults=False)


def _task_manager(tasks: tuple[str, ...]):
    """Our own TaskManager where it knows every one of `tasks`, else the one that knows lm-eval's too."""
    local = _local_task_manager()
    if all(task in local.all_tasks for task in tasks):
        return local
    manager = _full_task_manager()
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"lm-eval tasks {unknown} are unknown; ours: {local.all_tasks}, the papers': "
                          "hellaswag, piqa, winogrande, mathqa, openbookqa (`lm-eval ls tasks` lists all)")
    return manager


def evaluate_multiple_choice(lm: EffreproLM, tasks: list[str], num_fewshot: int = 0, limit: int | None = None
                             ) -> dict[str, dict]:
    """Run lm-eval's `tasks` on `lm`, each with `num_fewshot` examples (the first `limit` questions only, if
    given); as in lm-eval, a task whose config pins num_fewshot to 0 runs zero-shot. Per task (a group's tasks
    one by one): accuracy (acc), accuracy with each choice's log-likelihood per character (acc_norm, None where
    the task has none), the standard error of acc (None where lm-eval has none: of a single question), the number
    of questions scored (n) and of examples shown (num_fewshot)."""
    import lm_eval.evaluator
    from lm_eval.defaults import DEFAULT_OTHER_SEED

    loaded = load_tasks(tasks)
    # what simple_evaluate sets, without its environment report (seconds a call, and a sweep makes many calls):
    # `num_fewshot` for every task but one whose config pins it to 0, which lm-eval never overrides
    for task in loaded.values():
        if task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    results = lm_eval.evaluator.evaluate(lm, loaded, limit=limit, log_samples=False)
    return {task: {"acc": results["results"][task]["acc,none"],
                   "acc_norm": results["results"][task].get("acc_norm,none"),
                   # lm-eval's "N/A" where it has no standard error: a string among a record's numbers
                   "stderr": None if (stderr := results["results"][task]["acc_stderr,none"]) == "N/A" else stderr,
                   "n": results["n-samples"][task]["effective"],
                   "num_fewshot": results["n-shot"][task]}
            for task in loaded}


def multiple_choice_rows(scores: dict[str, dict], provider: str, x_name: str, x_value, extra: dict | None = None
                         ) -> list[Row]:
    """Scores of `evaluate_multiple_choice` as run-record rows: accuracy and accuracy_norm (fractions) per
    task (the `benchmark` extra), n the questions scored, the standard error and the examples shown in the
    extras."""
    rows = []
    for task, s in scores.items():
        more = {**(extra or {}), "benchmark": task, "stderr": s["stderr"], "num_fewshot": s["num_fewshot"]}
        for metric, value in (("accuracy", s["acc"]), ("accuracy_norm", s["acc_norm"])):
            if value is not None:
                rows.append(Row(provider, x_name, x_value, metric, "fraction", value, n=s["n"], extra=more))
    return rows
