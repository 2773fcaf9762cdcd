"""A real MLflow registry holding tiny random-init classifiers, registered in seconds (no training).

Serving and monitoring tests use it: the candidates go through the same
`log_candidate_model` / `register` path as the lifecycle's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow import MlflowClient
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from llmops import registry
from llmops.candidate_folder import META_FILE, CandidateMeta, save_hf_candidate
from llmops.checkpoints import packaged_model_path
from llmops.classification.modeling import label_maps
from llmops.config import RegistryConfig

LABELS = ["negative", "neutral", "positive"]
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def build_tiny_candidate(directory: Path, seed: int) -> Path:
    """A random-init 2-layer BERT with the packaged MiniLM tokenizer; `seed` makes versions answer differently."""
    checkpoint = packaged_model_path()
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(checkpoint, **TINY, **label_maps(LABELS))
    model = AutoModelForSequenceClassification.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return save_hf_candidate(model, tokenizer, CandidateMeta("student", LABELS, max_length=32), directory)


def break_candidate(directory: Path) -> Path:
    """Claims to be torch-int8 but has no int8 weights: loading it fails, as a corrupt upload would."""
    meta = json.loads((directory / META_FILE).read_text())
    meta |= {"kind": "int8", "recipe": {"quantization": {"per_channel": True, "skip_modules": ["classifier"]}}}
    (directory / META_FILE).write_text(json.dumps(meta))
    return directory


def _log_reference(reference: pd.DataFrame, path: Path) -> dict[str, object]:
    """The reference rows logged to the active run under `data/`; the lineage tag monitoring reads."""
    reference.to_parquet(path, index=False)
    mlflow.log_artifact(str(path), artifact_path="data")
    run_id = mlflow.active_run().info.run_id  # type: ignore[union-attr]
    return {"reference_data": f"runs:/{run_id}/data/{path.name}"}


def register_versions(
    root: Path, name: str, seeds: list[int], broken: set[int] = frozenset(), reference: pd.DataFrame | None = None
) -> str:
    """Register one version per seed (version i+1 for seeds[i]) in a SQLite store under `root`; returns its URI.

    Versions whose seed is in `broken` are registered but cannot load. With `reference` (text, label, topic
    rows), each version carries the lineage tags monitoring reads, as the lifecycle's versions do.
    """
    uri = f"sqlite:///{root / 'mlflow.db'}"
    registry.setup_tracking(
        RegistryConfig(tracking_uri=uri, experiment="serving-tests", artifact_location=str(root / "mlartifacts"))
    )
    for seed in seeds:
        candidate = build_tiny_candidate(root / f"candidate-{seed}", seed)
        if seed in broken:
            break_candidate(candidate)
        with mlflow.start_run(run_name=f"tiny-{seed}"):
            mlflow.log_metric("test_macro_f1", 0.5 + seed / 100)
            model_uri = registry.log_candidate_model(candidate, LABELS, ["an example tweet"])
            tags: dict[str, object] = {"candidate": "student", "seed": seed}
            if reference is not None:
                tags |= {"labels": LABELS, "test_macro_f1": "0.600000"} | _log_reference(
                    reference, root / "reference.parquet"
                )
            registry.register(name, model_uri, tags)
    return uri


def set_alias(uri: str, name: str, alias: str, version: str) -> None:
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(name, alias, version)


TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 8192,  # long answers for the back-pressure tests (Llama has no position weights)
}


TINY_T5 = {"model_type": "t5", "d_model": 64, "d_ff": 128, "d_kv": 32, "num_layers": 2, "num_heads": 2}


def build_tiny_generator(directory: Path, seed: int, task: str = "causal-lm") -> Path:
    """A random-init 2-layer Llama (or, for `seq2seq-lm`, T5) speaking the packaged MiniLM tokenizer, saved as a
    generator candidate."""
    from llmops.config import ModelConfig
    from llmops.generation.modeling import load_base_model, load_tokenizer

    cfg = ModelConfig(random_init=TINY_T5 if task == "seq2seq-lm" else TINY_LLAMA, max_length=64)
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(seed)
    model = load_base_model(cfg, task, tokenizer)
    meta = CandidateMeta("student", [], max_length=64, task=task)
    return save_hf_candidate(model, tokenizer, meta, directory)


def register_generators(
    root: Path,
    name: str,
    seeds: list[int],
    uri: str | None = None,
    reference: pd.DataFrame | None = None,
    broken: set[int] = frozenset(),
    build: Callable[[Path, int], Path] = build_tiny_generator,
) -> str:
    """Register one tiny generator version per seed (version i+1 for seeds[i]) in the SQLite store under `root`
    (or `uri`), through the lifecycle's own `log_generator_model`; returns the store's URI. With `reference`
    (generative rows: prompt, messages, completion, ...), each version carries the lineage tags monitoring reads.
    Versions whose seed is in `broken` are registered but cannot load. `build` makes each version's folder."""
    uri = uri or f"sqlite:///{root / 'mlflow.db'}"
    registry.setup_tracking(
        RegistryConfig(tracking_uri=uri, experiment="serving-tests", artifact_location=str(root / "mlartifacts"))
    )
    for seed in seeds:
        candidate = build(root / f"generator-{seed}", seed)
        if seed in broken:
            break_candidate(candidate)
        with mlflow.start_run(run_name=f"tiny-generator-{seed}"):
            model_uri = registry.log_generator_model(candidate, ["write a positive tweet about coachella"])
            tags: dict[str, object] = {"task": "causal-lm", "candidate": "student", "seed": seed, "labels": []}
            if reference is not None:
                tags |= _log_reference(reference, root / "generation-reference.parquet")
            registry.register(name, model_uri, tags)
    return uri


TINY_BERT_DECODER = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def prefer_ending(model: torch.nn.Module, tokenizer: object) -> torch.nn.Module:
    """Bias a BERT decoder's output layer so that its first choice is always the end token and its next are
    WordPiece continuation pieces (`##...`): a model that would answer nothing, or start in the middle of a word."""
    from llmops.generation.vocabulary import Vocabulary

    vocabulary = Vocabulary(tokenizer)  # type: ignore[arg-type]
    head = model.cls.predictions  # type: ignore[union-attr]
    with torch.no_grad():  # the head's bias and its output layer's, whether or not transformers tied them
        for bias in {id(b): b for b in (head.bias, head.decoder.bias)}.values():
            bias[list(vocabulary.not_first)] = 40.0
            bias[vocabulary.eos_id] = 100.0  # first at any temperature up to 2, against 5,800 pieces at 40
    return model


def build_eager_ender(directory: Path, seed: int = 0) -> Path:
    """A tiny BERT-decoder generator that would answer every prompt with nothing (see `prefer_ending`)."""
    from llmops.config import ModelConfig
    from llmops.generation.modeling import load_base_model, load_tokenizer

    cfg = ModelConfig(random_init=TINY_BERT_DECODER, max_length=64)
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(seed)
    model = prefer_ending(load_base_model(cfg, "causal-lm", tokenizer), tokenizer)
    meta = CandidateMeta("student", LABELS, max_length=64, task="causal-lm", recipe={"prompt_format": "chat"})
    return save_hf_candidate(model, tokenizer, meta, directory)


def random_lora(model: Any, config: Any, seed: int) -> Any:
    """`model` under peft LoRA adapters of `config` whose factors are all random (peft starts B at zero: such an
    adapter would change nothing)."""
    import peft

    adapted = peft.get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.3)
    return adapted


def register_adapter(uri: str, name: str, base_dir: Path, base: str, base_version: str, folder: Path, seed: int) -> str:
    """A peft LoRA adapter with random factors over the torch model in `base_dir`, saved as an adapter candidate of
    `base` version `base_version` (`train.lora.adapter_of`'s layout) and registered as a new version of `name`."""
    import peft

    from llmops.generation.candidate import Generator

    generator = Generator(base_dir)
    random_lora(generator.model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed).save_pretrained(
        folder
    )
    generator.tokenizer.save_pretrained(folder)
    recipe = {"adapter_of": {"model": base, "version": base_version}, "base": str(base_dir), "prompt_format": "plain"}
    CandidateMeta("teacher", [], max_length=64, recipe=recipe, task="causal-lm").save(folder)
    artifacts = str(folder.parent / "mlartifacts")
    registry.setup_tracking(RegistryConfig(tracking_uri=uri, experiment="adapters", artifact_location=artifacts))
    with mlflow.start_run(run_name=f"{name}-{seed}"):
        model_uri = registry.log_generator_model(folder, ["write a positive tweet about coachella"])
        return registry.register(name, model_uri, {"task": "causal-lm", "candidate": "teacher"})


def register_pair(root: Path, classifier: str, generator: str, seed: int) -> str:
    """A classifier and a generator, one version each, both `champion`, in one store under `root`; its URI."""
    uri = register_versions(root, classifier, seeds=[seed])
    register_generators(root, generator, seeds=[seed], uri=uri)
    set_alias(uri, classifier, "champion", "1")
    set_alias(uri, generator, "champion", "1")
    return uri
