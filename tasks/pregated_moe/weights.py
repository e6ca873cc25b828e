"""Weights for the serving benchmark's models: random ones, drawn on the device, or the experts and routers of a
transformers Switch checkpoint (a Hub name or a local folder), read a tensor at a time.

Why draw on the device: a switch-large-128 holds 51 GB of experts in fp32. `SwitchLM` initialises itself on the
CPU, and on this project's two-core CPU `normal_` runs at about 1.5 s a GB (plus about 1 s a GB to touch fresh
memory): more than a minute per large model, where a GPU draws them in a fraction of a second and the host only
receives the copies.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from .model import MoEConfig, SwitchLM

CHUNK = 1 << 26  # numbers drawn on the device at a time (256 MB of fp32)


def random_switch(cfg: MoEConfig, seed: int, device, experts: bool = True) -> SwitchLM:
    """A `SwitchLM` in host memory, initialised as `SwitchLM` initialises itself (matrices normal with std 0.02,
    norms one) but with its numbers drawn on `device`, a chunk at a time. `experts=False` leaves the experts
    uninitialised, for a checkpoint's to fill: they are nearly all of a large model's numbers."""
    with torch.device("meta"):
        model = SwitchLM(cfg)  # shapes only: no memory, no initialisation
    model.to_empty(device="cpu")
    model.lm_head.weight = model.embed.weight  # to_empty gives every module its own tensor: tie them again
    generator = torch.Generator(device).manual_seed(seed)
    left = set() if experts else {id(p) for f in model.moe_layers for p in (f.w_in, f.w_out)}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) in left:
                continue
            if p.dim() == 1:
                p.fill_(1.0)
                continue
            for chunk in p.view(-1).split(CHUNK):
                chunk.copy_(torch.empty(chunk.shape, device=device).normal_(0.0, 0.02, generator=generator))
    return model


def switch_config(path: str):
    """The transformers config of a Switch checkpoint (OSError, or a Hub error, when it cannot be read)."""
    from transformers import SwitchTransformersConfig

    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():  # else read as the defaults
        raise OSError(f"checkpoint folder {path!r} has no config.json (save_pretrained writes one beside the weights)")
    return SwitchTransformersConfig.from_pretrained(path)


def decoder_moe_blocks(config) -> int:
    """How many decoder blocks of a transformers Switch config have experts, counted as its decoder is built:
    every `decoder_sparse_step`-th block from the second (every block with a step of 1, none with 0)."""
    step = config.decoder_sparse_step
    return sum(i % step == 1 or step == 1 for i in range(config.num_decoder_layers)) if step > 0 else 0


def check_switch_config(config, path: str, name: str, cfg: MoEConfig) -> None:
    """A checkpoint of another model (expert count, widths, number of decoder MoE blocks, or experts and routers
    other than `SwitchLM`'s: its experts are ReLU, its routers have no bias) is refused with a ValueError naming
    both."""
    found = {"num_experts": config.num_experts, "d_model": config.d_model, "d_ff": config.d_ff,
             "dense_act_fn": config.dense_act_fn, "router_bias": config.router_bias}
    wanted = {"num_experts": cfg.n_experts, "d_model": cfg.d_model, "d_ff": cfg.d_ff, "dense_act_fn": "relu",
              "router_bias": False}  # else the loaded experts would compute, and the routers route, otherwise
    wrong = [f"{key}={found[key]!r} where {name} has {wanted[key]!r}" for key in found if found[key] != wanted[key]]
    blocks, wanted_blocks = decoder_moe_blocks(config), len(cfg.moe_blocks)
    if blocks != wanted_blocks:  # else every row would fail when the weights are copied in
        wrong.append(f"{blocks} decoder MoE blocks (num_decoder_layers={config.num_decoder_layers}, "
                     f"decoder_sparse_step={config.decoder_sparse_step}) where {name} has {wanted_blocks}")
    if wrong:
        raise ValueError(f"checkpoint {path!r} is not a {name}: {', '.join(wrong)}")


class LazyTensors(Mapping):
    """The tensors of safetensors files by name, each read from its memory-mapped file when asked for: copying a
    switch-large-128's decoder experts into the model never holds more than one of them twice."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.file_of = {}
        for file in files:
            with safe_open(file, "pt") as f:
                self.file_of.update(dict.fromkeys(f.keys(), file))

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.file_of[name], "pt") as f:
            return f.get_tensor(name)

    def __contains__(self, name) -> bool:  # Mapping's would read the tensor to find it there
        return name in self.file_of

    def __iter__(self):
        return iter(self.file_of)

    def __len__(self) -> int:
        return len(self.file_of)


def switch_state_dict(path: str) -> Mapping[str, torch.Tensor]:
    """The weights of a Switch checkpoint, a local folder or a Hub name (then downloaded: safetensors if it has
    them, else its .bin files), without reading them into memory: memory-mapped either way."""
    folder = Path(path)
    if not folder.is_dir():
        from huggingface_hub import list_repo_files, snapshot_download

        files = list_repo_files(path)
        weights = [f for f in files if f.endswith(".safetensors")] or [f for f in files if f.endswith(".bin")]
        folder = Path(snapshot_download(path, allow_patterns=weights))
    files = weight_files(folder)
    if files[0].suffix == ".safetensors":
        return LazyTensors(files)
    state = {}
    for file in files:
        state.update(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
    return state


def weight_files(folder: Path) -> list[Path]:
    """A checkpoint folder's weight files: its .safetensors files, else its .bin files; a ValueError if none."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise ValueError(f"checkpoint folder {str(folder)!r} has no .safetensors or .bin weight files")
    return files
