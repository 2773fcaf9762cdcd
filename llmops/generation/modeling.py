"""Checkpoints and tokenizers for generative tasks, and LoRA adapters.

The offline default is the packaged all-MiniLM-L6-v2 warm-starting a decoder: its BERT weights load into
`BertLMHeadModel` with a causal mask (`is_decoder`), and its tied word embeddings become the output layer (the
BERT-initialised decoders of Rothe et al. 2020). Any causal LM (GPT-2, Llama, Qwen, SmolLM) or seq2seq model (T5)
from the hub or a local folder loads the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)

from llmops.checkpoints import AUTO_CLASS, ModelLoadError, resolve_checkpoint
from llmops.config import ConfigError, LoraConfig, ModelConfig
from llmops.generation.data import DEFAULT_CHAT_TEMPLATE

_SUPPORTED = {
    "causal-lm": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "seq2seq-lm": MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
}
_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice")


def _architecture_config(cfg: ModelConfig, task: str, tokenizer: PreTrainedTokenizerBase) -> Any:
    """The config the model is built from: the checkpoint's, or a random-init architecture of `model_type`."""
    overrides = dict(cfg.random_init or {})
    model_type = overrides.pop("model_type", None)
    # the special tokens the tokenizer was given (BERT's [CLS] and [SEP] as start and end): the config agrees
    specials = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if model_type is None:
        config = AutoConfig.from_pretrained(resolve_checkpoint(cfg.name_or_path), **overrides)
        for key, value in specials.items():
            setattr(config, key, value)
    else:  # a fresh architecture speaking the checkpoint's tokenizer (tests build tiny Llama / GPT-2 / T5 so)
        specials["vocab_size"] = len(tokenizer)
        if task == "seq2seq-lm":
            specials["decoder_start_token_id"] = tokenizer.pad_token_id
        config = AutoConfig.for_model(model_type, **{**specials, **overrides})
    if task == "causal-lm" and hasattr(config, "is_decoder"):
        config.is_decoder = True  # encoder checkpoints (BERT) become decoders with a causal mask
    return config


def check_checkpoint(cfg: ModelConfig, task: str) -> None:
    """Fail before any data work if the checkpoint cannot be a `task` model: a classifier, or another family."""
    checkpoint = resolve_checkpoint(cfg.name_or_path)
    try:
        config = AutoConfig.from_pretrained(checkpoint)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"model.name_or_path: cannot load '{cfg.name_or_path}': {error}") from None
    heads = [a for a in (config.architectures or []) if a.endswith(_HEADS)]
    if heads and cfg.random_init is None:
        raise ModelLoadError(
            f"model.name_or_path: '{cfg.name_or_path}' is a {heads[0]} checkpoint (a classifier); task {task} needs "
            "a base or generative checkpoint"
        )
    model_type = (cfg.random_init or {}).get("model_type", config.model_type)
    if model_type not in _SUPPORTED[task]:
        raise ModelLoadError(f"model.name_or_path: a '{model_type}' model cannot be a {task} model")
    if tokenizer.eos_token is None and tokenizer.sep_token is None:
        raise ModelLoadError(f"model.name_or_path: the tokenizer of '{cfg.name_or_path}' has no end-of-text token")


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, made ready to generate: an end-of-text token (BERT's [SEP]), a start token
    (BERT's [CLS]), a padding token (the end token where there is none), and a chat template."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(cfg.name_or_path))
    if tokenizer.eos_token is None:
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.bos_token is None and tokenizer.cls_token is not None:
        tokenizer.bos_token = tokenizer.cls_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = cfg.chat_template or DEFAULT_CHAT_TEMPLATE
    return tokenizer


def load_base_model(
    cfg: ModelConfig, task: str, tokenizer: PreTrainedTokenizerBase, quantization_config: Any = None
) -> PreTrainedModel:
    """The teacher's starting point: pretrained weights (a new LM head where the checkpoint has none), or
    random init."""
    config = _architecture_config(cfg, task, tokenizer)
    auto = AUTO_CLASS[task]
    if cfg.random_init is not None:
        model = auto.from_config(config)
    else:
        extra = {"quantization_config": quantization_config, "device_map": "auto"} if quantization_config else {}
        model = auto.from_pretrained(resolve_checkpoint(cfg.name_or_path), config=config, **extra)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if task == "seq2seq-lm" and model.config.decoder_start_token_id is None:
        model.config.decoder_start_token_id = tokenizer.pad_token_id
    return model


def freeze_embeddings(model: PreTrainedModel) -> None:
    """Keep the word embeddings as they are, and the output layer where it is tied to them: no gradient, no
    optimizer state (`train.freeze_embeddings`, `distill.freeze_embeddings`)."""
    model.get_input_embeddings().weight.requires_grad_(False)


def qlora_config() -> Any:
    """The 4-bit NF4 base of QLoRA (Dettmers et al. 2023): double quantization, bf16 compute."""
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise ConfigError("train.lora.qlora needs a CUDA GPU (this machine has none): use train.lora without qlora")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16,
    )


def add_lora(model: PreTrainedModel, cfg: LoraConfig, task: str) -> Any:
    """Wrap the model in LoRA adapters; only they train (and, under QLoRA, the base stays 4-bit)."""
    import peft

    if cfg.qlora:
        model = peft.prepare_model_for_kbit_training(model)
    lora = peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM if task == "causal-lm" else peft.TaskType.SEQ_2_SEQ_LM,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
    )
    return peft.get_peft_model(model, lora)
