"""The prompts of Compress, Then Prompt: the learned soft prompt, the paper's hand-written hard prompt, and how a
model runs with either for perplexity and lm-eval.

The hard prompt is a text (the paper's is in the task's config) whose tokens go before every input. The soft
prompt is PEFT's prompt tuning (`PromptTuningConfig`): `tokens` trainable vectors placed before the input
embeddings of the frozen model, whose positions PEFT labels -100; training leaves each sequence's first token
unscored too (`prompt_batches`), so that it scores the tokens perplexity scores, as the paper's code does. Its
initialisation (`init`):
- `first_vocab`, the paper's: the first `tokens` rows of the vocabulary embedding table. PEFT has no such option
  (it offers RANDOM, SAMPLE_VOCAB and TEXT), so the prompt is made RANDOM and those rows copied in;
- `sample_vocab`: PEFT's SAMPLE_VOCAB, rows of randomly drawn tokens;
- `random`: PEFT's RANDOM, a normal draw, which may lie far from every token's embedding.

A prompt is saved with PEFT's `save_pretrained` plus `effrepro_prompt.json`, which names the model it was trained
for; `load_prompt` refuses it on another model or hidden size, where its vectors mean nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from repro.evaluation import Forward
from repro.records import write_json_atomic

INITS = ("first_vocab", "sample_vocab", "random")
PEFT_INITS = {"first_vocab": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "random": "RANDOM"}
METADATA = "effrepro_prompt.json"
# What must match for a saved prompt to mean anything on a model (the rest of its metadata says how it was trained).
SAME_MODEL_KEYS = ("model", "hidden_size", "vocab_size")
REQUIRED_KEYS = (*SAME_MODEL_KEYS, "level", "tokens")  # and the level it was trained at, and its length
PEFT_FILES = ("adapter_config.json", ("adapter_model.safetensors", "adapter_model.bin"))  # each: one of them


def check_fits(context: int | None, prompt_tokens: int, seqlen: int, what: str) -> None:
    """Raise ValueError when a prompt of `prompt_tokens` plus `seqlen` tokens (`what` says which, for the message)
    is longer than a model's `context` (None: the model does not say)."""
    if context is not None and prompt_tokens + seqlen > context:
        raise ValueError(f"{what} is {prompt_tokens + seqlen} positions, more than the model's context of {context}; "
                         f"use at most {context - seqlen} prompt tokens or a shorter seqlen")


def add_soft_prompt(model: torch.nn.Module, tokens: int, init: str = "first_vocab"):
    """`model` (frozen by PEFT) behind a trainable soft prompt of `tokens` vectors, initialised by `init`: a
    PeftModel."""
    from peft import PromptTuningConfig, get_peft_model  # seconds to import: only when a prompt is made

    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {INITS}")
    vocabulary = model.get_input_embeddings().weight
    if tokens < 1 or (init == "first_vocab" and tokens > len(vocabulary)):
        raise ValueError(f"tokens={tokens} must be between 1 and the vocabulary's {len(vocabulary)} for "
                         f"init={init!r}")
    prompted = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens,
                                                        prompt_tuning_init=PEFT_INITS[init]))
    if init == "first_vocab":
        with torch.no_grad():
            prompt_embedding(prompted).copy_(vocabulary[:tokens])
    return prompted


def prompt_batches(batches):
    """`Trainee.batches` for a soft prompt: those of `batches` (input_ids and labels) with each sequence's first
    label -100. PEFT labels the prompt's positions -100, but the model shifts the labels by one, so that the
    prompt's last position is still scored on the first token, predicted from the prompt alone: a token that
    `perplexity` never scores, nor the paper's code (it ignores every position whose input is the prompt's)."""
    def unscored_first_token(step: int, rank: int, world: int) -> list[dict]:
        micro = batches(step, rank, world)
        for batch in micro:
            batch["labels"] = batch["labels"].clone()  # it may be the input_ids tensor itself
            batch["labels"][:, 0] = -100
        return micro
    return unscored_first_token


def prompt_embedding(prompted) -> torch.nn.Parameter:
    """The soft prompt's vectors, (tokens, hidden)."""
    return prompted.prompt_encoder[prompted.active_adapter].embedding.weight


def soft_prompt_forward(tokens: int) -> Forward:
    """Logits of a PEFT-prompted model over the input ids only: PEFT puts the prompt first, and its positions are
    cut, so that exactly the tokens scored without a prompt are scored (perplexity's first token of a chunk
    included: it stays unscored, although the prompt would give it a context)."""
    def forward(model, ids):
        return model(input_ids=ids).logits[:, tokens:]
    return forward


def hard_prompt_forward(prefix: torch.Tensor) -> Forward:
    """Logits over the input ids of a model that reads the token ids `prefix` before them."""
    def forward(model, ids):
        before = prefix.to(ids.device).expand(len(ids), -1)
        return model(input_ids=torch.cat([before, ids], dim=1)).logits[:, len(prefix):]
    return forward


def save_prompt(prompted, folder: str | Path, metadata: dict) -> None:
    """The prompt (PEFT's files) and `metadata`, which must say REQUIRED_KEYS."""
    missing = [k for k in REQUIRED_KEYS if k not in metadata]
    if missing:
        raise ValueError(f"a saved prompt's metadata must say {missing}")
    prompted.save_pretrained(str(folder))
    write_json_atomic(Path(folder) / METADATA, metadata)


def read_prompt_metadata(folder: str | Path) -> dict:
    """The metadata `save_prompt` wrote into `folder`; ValueError if there is none, if it lacks a key, or if
    PEFT's files beside it are missing (before a run compresses anything, not when it comes to load them)."""
    path = Path(folder) / METADATA
    if not Path(folder).is_dir():
        raise ValueError(f"{folder} is no folder here: give the folder of a prompt a run saved, "
                         "<its output>/prompts/<level>")
    if not path.is_file():
        saved = sorted(p.parent.name for p in Path(folder).glob(f"*/{METADATA}"))
        within = f" (it holds the prompts {saved}: name one, {Path(folder) / saved[0]})" if saved else ""
        raise ValueError(f"{folder} is not a prompt saved by this suite: it has no {METADATA}{within}")
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not the JSON save_prompt writes ({exc})") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{path} holds {type(metadata).__name__} {metadata!r:.60}, not the mapping save_prompt "
                         "writes")
    missing = [k for k in REQUIRED_KEYS if k not in metadata]
    if missing:
        raise ValueError(f"{path} does not say {missing}, which a saved prompt's metadata must")
    for names in PEFT_FILES:
        names = (names,) if isinstance(names, str) else names
        if not any((Path(folder) / name).is_file() for name in names):
            raise ValueError(f"{folder} lacks PEFT's {' or '.join(names)}: the prompt itself was not saved there")
    return metadata


def check_same_model(saved: dict, model: dict, folder: str | Path) -> None:
    """Raise ValueError unless a saved prompt's metadata names the model described by `model` (SAME_MODEL_KEYS;
    a key `model` leaves out is not compared)."""
    differ = [k for k in SAME_MODEL_KEYS if model.get(k) is not None and saved.get(k) != model[k]]
    if differ:
        what = ", ".join(f"{k} {saved.get(k)!r} (this one: {model[k]!r})" for k in differ)
        raise ValueError(f"the prompt in {folder} was trained for another model: {what}. A soft prompt is a "
                         "sequence of one model's input embeddings; train one for this model")


def load_prompt(model: torch.nn.Module, folder: str | Path, identity: dict):
    """The prompt saved in `folder` put before `model`, which `identity` describes (SAME_MODEL_KEYS), for
    inference: a PeftModel."""
    from peft import PeftModel

    check_same_model(read_prompt_metadata(folder), identity, folder)
    return PeftModel.from_pretrained(model, str(folder))


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
