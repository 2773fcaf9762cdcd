"""Several LoRA adapters over one copy of a base model, each row of a batch with its own (or none).

A run with `train.lora.adapter_of` keeps its adapter unmerged: the candidate folder holds peft's
`adapter_config.json` and `adapter_model.safetensors` beside the tokenizer, and `candidate.json`'s recipe names
the registered base version it was trained on (`adapter_of`). Serving attaches such a version to the base's
running model instead of loading a second copy of it.

How a batch mixes adapters (S-LoRA's and punica's idea, in plain torch): every adapted layer of the base is
wrapped once; it keeps every attached adapter's factors stacked, A as (slots x r, in) and B*scale as
(out, slots x r), one block of r per slot, slot 0 all zeros (rows that ask for no adapter). Before a forward pass
the running batch names each row's adapter (`Adapters.routed`). With several adapters in the batch, the layer
computes every slot's down-projection at once (`x @ A.T`, slots x r columns), zeroes in each row the columns of
the other slots' blocks, and adds `@ B.T` to the base's output: two matmuls per layer whatever the mix, nothing
copied per row (gathering each row's A and B cost 3-7% of a decoding step of the quickstart's decoder at 16 rows
of four adapters; this, a step within 0.96-1.06x of the base's). With one adapter for the whole batch, its
blocks alone. Ranks may differ (the smaller ones are padded with zeros). Attaching or detaching rebuilds the
stacks; the engine does it between two steps, so a pass never sees half an adapter.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
UNSUPPORTED = {
    "use_dora": "DoRA",
    "modules_to_save": "modules trained in full (modules_to_save)",
    "alpha_pattern": "per-module alpha (alpha_pattern)",
    "trainable_token_indices": "trained token embeddings",
    "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA",
}


class AdapterError(ValueError):
    """An adapter that cannot run over this base: the message says which part does not fit."""


@dataclass(frozen=True)
class BaseRef:
    """The registered base version an adapter was trained on."""

    model: str
    version: str

    def __str__(self) -> str:
        return f"'{self.model}' version {self.version}"


def adapter_of(recipe: dict[str, Any]) -> BaseRef | None:
    """The base a candidate is an adapter of (its recipe's `adapter_of`); None for a whole model."""
    base = recipe.get("adapter_of")
    return None if not base else BaseRef(str(base["model"]), str(base["version"]))


@dataclass(frozen=True)
class LoraWeights:
    """One adapter's factors by module name (relative to the base model): A (r, in) and B*scale (out, r)."""

    key: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def load(cls, folder: str | Path, key: str) -> LoraWeights:
        """peft's saved adapter (`save_pretrained` of a `PeftModel`); an `AdapterError` for what it cannot run."""
        folder = Path(folder)
        config_file, weights_file = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
        if not config_file.is_file() or not weights_file.is_file():
            raise AdapterError(f"{folder}: no LoRA adapter here ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} expected)")
        config = json.loads(config_file.read_text())
        if config.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"{folder}: a {config['peft_type']} adapter; only LoRA adapters are served")
        used = [what for option, what in UNSUPPORTED.items() if config.get(option)]
        if config.get("bias", "none") != "none" or config.get("lora_bias"):
            used.append("trained biases")
        if used:
            raise AdapterError(f"{folder}: the adapter uses {', '.join(used)}, which llmops does not serve")
        alpha = float(config["lora_alpha"])
        tensors = load_file(weights_file)
        factors = {}
        for name, a in tensors.items():
            if not name.endswith(".lora_A.weight"):
                continue
            module = name.removesuffix(".lora_A.weight").removeprefix(PEFT_PREFIX)
            b = tensors.get(name.replace(".lora_A.", ".lora_B."))
            if b is None or a.dim() != 2:
                raise AdapterError(f"{folder}: {name} is not the A factor of a LoRA pair over a linear layer")
            rank = a.shape[0]
            scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
            factors[module] = (a.float(), b.float() * scale)
        if not factors:
            raise AdapterError(f"{folder}: {ADAPTER_WEIGHTS} holds no LoRA factors")
        return cls(key, factors)


def _in_out(module: torch.nn.Module) -> tuple[int, int] | None:
    """A linear layer's input and output widths (torch Linear, its dynamic-int8 form, GPT-2's Conv1D)."""
    widths: Any = (getattr(module, "in_features", None), getattr(module, "out_features", None))
    if type(module).__name__ == "Conv1D":
        widths = (getattr(module, "nx", None), getattr(module, "nf", None))
    return (int(widths[0]), int(widths[1])) if None not in widths else None


class _Adapted(torch.nn.Module):
    """A base layer plus, per row, its adapter's low-rank update (see the module docstring)."""

    def __init__(self, base: torch.nn.Module, bank: Adapters):
        super().__init__()
        self.base = base
        self.bank = [bank]  # in a list: not a submodule
        self.a: torch.Tensor | None = None
        """(slots * rank, in): every slot's A, one block of `rank` rows each."""
        self.b: torch.Tensor | None = None
        """(out, slots * rank): every slot's B times its scale, one block of `rank` columns each."""
        self.rank = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        route = self.bank[0].route
        if route is None or self.a is None or self.b is None:
            return y
        if isinstance(route, int):  # one adapter for every row: its blocks alone
            block = slice(route * self.rank, (route + 1) * self.rank)
            return y + (x @ self.a[block].T) @ self.b[:, block].T
        # rows of several adapters: every slot's down-projection at once, each row keeping its own block's columns
        down = x @ self.a.T
        down = down * (route.unsqueeze(1) if down.dim() == 3 else route).to(down.dtype)
        return y + down @ self.b.T


class Adapters:
    """The adapters attached to one base model, and which rows of the next forward pass use which."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.route: int | torch.Tensor | None = None
        """For the pass under way: None (no adapter), a slot (every row), or each row's slot."""
        self._resting: int | None = None
        """The route outside `routed` blocks: None, or the slot of the adapter this model always runs (`fix`)."""
        self._slots: list[str | None] = [None]
        self._rank = 0
        """The largest rank attached: each slot's block in the stacks is this wide."""
        self._weights: dict[str, LoraWeights] = {}
        self._layers: dict[str, _Adapted] = {}

    @property
    def keys(self) -> set[str]:
        return set(self._weights)

    def check(self, weights: LoraWeights) -> None:
        """An `AdapterError` unless every factor fits a linear layer of this base."""
        modules = dict(self.model.named_modules())
        for name, (a, b) in weights.factors.items():
            layer = self._layers.get(name)
            module = layer.base if layer is not None else modules.get(name)
            if module is None:
                raise AdapterError(f"adapter {weights.key}: the base has no layer '{name}' (another architecture?)")
            shape = _in_out(module)
            if shape is None:
                raise AdapterError(f"adapter {weights.key}: '{name}' is a {type(module).__name__}, not a linear layer")
            if (a.shape[1], b.shape[0]) != shape:
                raise AdapterError(
                    f"adapter {weights.key}: '{name}' maps {a.shape[1]} -> {b.shape[0]} features, the base's layer "
                    f"{shape[0]} -> {shape[1]} (an adapter of another base)"
                )

    def attach(self, weights: LoraWeights) -> None:
        """Make `weights` routable under its key (between passes)."""
        self.check(weights)
        for name in weights.factors:
            if name not in self._layers:
                parent, _, child = name.rpartition(".")
                owner = self.model.get_submodule(parent) if parent else self.model
                layer = _Adapted(getattr(owner, child), self)
                setattr(owner, child, layer)
                self._layers[name] = layer
        if weights.key not in self._weights:
            free = [slot for slot, key in enumerate(self._slots) if slot and key is None]
            if free:
                self._slots[free[0]] = weights.key
            else:
                self._slots.append(weights.key)
        self._weights[weights.key] = weights
        self._rebuild()

    def detach(self, key: str) -> None:
        """Drop an adapter no row uses any more (between passes)."""
        if self._weights.pop(key, None) is not None:
            self._slots[self._slots.index(key)] = None
            self._rebuild()

    def _rebuild(self) -> None:
        rank = max((a.shape[0] for w in self._weights.values() for a, _ in w.factors.values()), default=0)
        self._rank = rank
        for name, layer in self._layers.items():
            width_in, width_out = _in_out(layer.base)  # type: ignore[misc]
            a = torch.zeros(len(self._slots) * rank, width_in)
            b = torch.zeros(width_out, len(self._slots) * rank)
            for slot, key in enumerate(self._slots):
                pair = self._weights[key].factors.get(name) if key is not None else None
                if pair is not None:
                    a[slot * rank : slot * rank + pair[0].shape[0]] = pair[0]
                    b[:, slot * rank : slot * rank + pair[1].shape[1]] = pair[1]
            layer.a, layer.b = (a, b) if any(self._slots[1:]) else (None, None)
            layer.rank = rank

    def slot(self, key: str) -> int:
        """Where an attached adapter's factors are in the stacks."""
        if key not in self._weights:
            raise AdapterError(f"adapter {key} is not attached")
        return self._slots.index(key)

    def routing(self, keys: Sequence[str | None]) -> int | torch.Tensor | None:
        """The route for rows asking for `keys`: None (the base alone), one slot (every row the same adapter), or
        for each row the columns of its slot's block (rows, slots * rank; 1 in its block, 0 elsewhere)."""
        if not any(keys):
            return self._resting
        slots = [self.slot(key) if key is not None else self._resting or 0 for key in keys]
        if len(set(slots)) == 1:
            return slots[0]
        columns = torch.arange(len(self._slots) * self._rank) // max(self._rank, 1)
        return (columns[None, :] == torch.tensor(slots)[:, None]).float()

    @contextmanager
    def routed(self, keys: Sequence[str | None] | None) -> Iterator[None]:
        """Forward passes inside the block give each row its adapter (`keys` in row order; None: no adapter)."""
        self.route = self.routing(keys) if keys else self._resting
        try:
            yield
        finally:
            self.route = self._resting

    def fix(self, weights: LoraWeights) -> None:
        """Attach `weights` and run every pass with them (an adapter candidate loaded on its own)."""
        self.attach(weights)
        self._resting = self.route = self._slots.index(weights.key)


def parse_base(spec: str) -> tuple[str, str | None, str | None]:
    """`train.lora.adapter_of` as (model, alias, version): `name` is its champion."""
    if "/" in spec:
        model, version = spec.split("/")
        return model, None, version
    model, _, alias = spec.partition("@")
    return model, alias or "champion", None


def resolve_base(spec: str, tracking_uri: str, cache: Path) -> tuple[BaseRef, Path]:
    """The registered version `spec` names, and its candidate folder (downloaded once into `cache`). A base that
    is missing, or not a float torch candidate, is a `ConfigError` naming what was found."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from llmops.candidate_folder import CandidateMeta
    from llmops.config import ConfigError
    from llmops.registry import alias_version, fetch_version

    model, alias, version = parse_base(spec)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        version = version or alias_version(client, model, alias or "champion")
        if version is not None:
            client.get_model_version(model, version)
    except MlflowException:
        version = None
    if version is None:
        raise ConfigError(f"train.lora.adapter_of: the registry ({tracking_uri}) has no model version '{spec}'")
    ref = BaseRef(model, version)
    folder = fetch_version(tracking_uri, model, version, cache)
    meta = CandidateMeta.load(folder)
    if adapter_of(meta.recipe) is not None or meta.task != "causal-lm" or not (folder / "model.safetensors").is_file():
        what = "an adapter itself" if adapter_of(meta.recipe) else f"a {meta.task} {meta.kind} candidate"
        raise ConfigError(
            f"train.lora.adapter_of: {ref} is {what}; an adapter trains over a float torch causal-lm candidate "
            "(`teacher` or `fp32`)"
        )
    return ref, folder


def base_folder(directory: Path, meta: Any, ref: BaseRef) -> Path:
    """Where an adapter candidate's base is: the folder it was trained from when it is still there, else its
    registered version, downloaded from the current MLflow registry into `~/.cache/llmops/bases`."""
    local = meta.recipe.get("base")
    if local and (Path(local) / "candidate.json").is_file():
        return Path(local)
    import mlflow

    cache = Path(os.environ.get("LLMOPS_BASE_CACHE", Path.home() / ".cache" / "llmops" / "bases"))
    return resolve_base(f"{ref.model}/{ref.version}", mlflow.get_tracking_uri(), cache)[1]
