"""One typed configuration, read in one place: :func:`load_config`.

Every stage gets its own sub-config. Unknown keys and wrong types are rejected
at load time with a message that names the key, before any data is read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PACKAGED_CORPUS = "packaged:tweets"
PACKAGED_INSTRUCTIONS = "packaged:tweet-instructions"
PACKAGED_MODEL = "packaged:all-MiniLM-L6-v2"

Task = Literal["sequence-classification", "causal-lm", "seq2seq-lm"]
GENERATIVE_TASKS: tuple[Task, ...] = ("causal-lm", "seq2seq-lm")

QuantKind = Literal[
    "fp32",
    "int8",
    "bnb-int8",
    "nf4",
    "onnx-fp32",
    "onnx-int8",
    "gguf-f16",
    "gguf-q8_0",
    "gguf-q4_k_m",
    "openvino-int8",
    "openvino-int4",
]
CLASSIFIER_QUANT_KINDS: tuple[QuantKind, ...] = ("fp32", "int8", "bnb-int8", "nf4", "onnx-fp32", "onnx-int8")
ONNX_KINDS: tuple[QuantKind, ...] = ("onnx-fp32", "onnx-int8")
"""Classifiers only: the student exported to ONNX and run by ONNX Runtime."""
GGUF_QUANT_KINDS: tuple[QuantKind, ...] = ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m")
"""Decoders only: the student converted and quantized by llama.cpp (`llmops.gguf`), run by llama.cpp. A decoder
of an architecture llama.cpp does not take is skipped with a note naming it."""
OPENVINO_KINDS: tuple[QuantKind, ...] = ("openvino-int8", "openvino-int4")
"""Decoders only: the student exported to OpenVINO's IR, its weights compressed by NNCF (`llmops.openvino_ir`),
run by OpenVINO. Skipped with a note, like GGUF, for an architecture the export does not take."""
RUNTIME_KINDS: tuple[QuantKind, ...] = (*GGUF_QUANT_KINDS, *OPENVINO_KINDS)
"""Decoder candidates another runtime runs: built for generators only."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    source: str = PACKAGED_CORPUS
    """`packaged:tweets`, a .csv / .jsonl / .parquet path, or `hf:<dataset id>` (online only). Generative tasks
    default to `packaged:tweet-instructions`, an instruction set built from the packaged tweets."""
    text_column: str = "text"
    label_column: str = "sentiment"
    prompt_column: str = "prompt"
    """Generative tasks: the prompt of a prompt/completion file (TRL's "standard" format, used as written)."""
    completion_column: str = "completion"
    """Generative tasks: the text the model learns to write; the loss covers these tokens only."""
    messages_column: str = "messages"
    """Generative tasks: a chat (OpenAI / TRL fine-tuning format, a list of {role, content}). The model learns the
    last assistant message; the conversation before it is rendered with the model's chat template."""
    instruction_column: str = "instruction"
    """Generative tasks, optional: the kind of each row (`classify`, `write`, ...); evaluation picks rows by it."""
    target_column: str = "target"
    """Generative tasks, optional: the label a generation should carry (the requested sentiment of a `write` row)."""
    confidence_column: str | None = "confidence"
    encoding: str = "utf-8"
    """Encoding of a CSV source. The packaged corpus is always read as latin-1."""
    hf_split: str = "train"
    labels: list[str] | None = None
    """Label order. Default: the sorted distinct labels of the data."""
    min_confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    """Drop rows whose crowd confidence is below this. Rows without a confidence are dropped too."""
    sample: int | None = Field(default=None, gt=0)
    """Stratified sample of this many rows after cleaning (quickstart runs)."""
    url_token: str = "http"
    """Every URL is replaced by this token."""
    topics: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "airline": [
                r"@united\b",
                r"@usairways\b",
                r"@americanair\b",
                r"@southwestair\b",
                r"@jetblue\b",
                r"@virginamerica\b",
                r"@delta\b",
            ],
            "self-driving": [r"self[- ]?driving", r"driverless", r"autonomous", r"google car"],
            "coachella": [r"coachella"],
            "apple": [r"\bapple\b", r"@apple\b", r"#apple\b", r"\biphone", r"\bipad", r"\bmacbook", r"\bios\b"],
            "deflategate": [r"deflategate", r"deflate"],
            "claritin": [r"claritin"],
        }
    )
    """Slice name -> case-insensitive regexes. First match wins; no match is `other`."""
    holdout_topics: list[str] = Field(default_factory=list)
    """Topics removed from train/validation/test and written to holdout.parquet (drift scenarios)."""
    extra_rows: str | None = None
    """Labelled rows (.parquet / .csv / .jsonl with `text` and `label` columns) added to the data after the
    holdout and the sample, then split like the rest. Retraining puts monitoring's feedback-labelled traffic
    here; the model's monitoring reference is then these rows (the traffic it was retrained for)."""
    test_size: float = Field(default=0.15, gt=0.0, lt=0.5)
    val_size: float = Field(default=0.1, gt=0.0, lt=0.5)
    seed: int = 42

    @model_validator(mode="after")
    def _holdout_topics_are_declared(self) -> DataConfig:
        unknown = sorted(set(self.holdout_topics) - set(self.topics))
        if unknown:
            raise ValueError(f"data.holdout_topics names topics not in data.topics: {unknown}")
        return self


class ModelConfig(_Strict):
    name_or_path: str = PACKAGED_MODEL
    """`packaged:all-MiniLM-L6-v2`, a local folder, or any Hugging Face checkpoint id (online)."""
    random_init: dict[str, Any] | None = None
    """Build a random-init model from the checkpoint's config with these overrides (smoke tests). With `model_type`
    (`llama`, `gpt2`, `t5`, ...), that architecture is built instead, with the checkpoint's tokenizer."""
    max_length: int = Field(default=128, gt=0)
    """Tokens per example at most (generative tasks: prompt and completion together)."""
    chat_template: str | None = None
    """Generative tasks: a Jinja chat template for a tokenizer that has none (default: llmops's plain template,
    `role: content` lines ending in `assistant:`). A tokenizer's own template always wins."""


class LoraConfig(_Strict):
    """LoRA adapters (peft) instead of full fine-tuning; merged into the base for release, or released as an adapter of
    a registered base (`adapter_of`)."""

    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None
    """Module names to adapt. Default: peft's choice for the architecture (attention query and value)."""
    qlora: bool = False
    """QLoRA: the frozen base in 4-bit NF4 (bitsandbytes) under the adapters. Needs a CUDA GPU."""
    adapter_of: str | None = None
    """Keep the adapter unmerged and register it as its own model (`registry.model_name`), an adapter of a registered
    generator: `name` (its `champion`), `name@alias` or `name/version`. The base's weights are that version's (a
    float torch candidate: `teacher` or `fp32`; `model.name_or_path` is not used); `llmops serve` runs the adapter
    over that same version, in the base's batch (`serve.models` names both). null: merged into the base."""

    @field_validator("adapter_of")
    @classmethod
    def _names_a_registered_model(cls, spec: str | None) -> str | None:
        if spec is not None and not re.fullmatch(r"[^@/\s]+(@[^@/\s]+|/\d+)?", spec):
            raise ValueError(f"train.lora.adapter_of must be `name`, `name@alias` or `name/version`, got {spec!r}")
        return spec


class TrainConfig(_Strict):
    epochs: float = Field(default=2.0, gt=0)
    batch_size: int = Field(default=32, gt=0)
    learning_rate: float = Field(default=5e-5, gt=0)
    weight_decay: float = 0.01
    warmup_ratio: float = Field(default=0.06, ge=0, lt=1)
    early_stopping_patience: int = Field(default=2, ge=1)
    evals_per_epoch: int = Field(default=2, ge=1)
    """Validation passes per epoch; early stopping and the best checkpoint use them."""
    mixed_precision: bool = True
    """bf16/fp16 on a GPU; always full precision on CPU."""
    seed: int = 42
    """Seeds the new head's initialisation, data order and dropout (fine-tuning and distillation)."""
    processes: int = Field(default=1, ge=1)
    """Data-parallel fine-tuning processes. Above 1, fine-tuning runs under `accelerate launch --multi_gpu`:
    one process per GPU (NCCL), or CPU processes over gloo on a machine without one; on a Ray cluster (the
    lifecycle's stages on Ray), as that many Ray Train workers on any nodes (`ray.stages.fine_tune` each).
    `batch_size` is per process, so the effective batch is `processes * batch_size`."""
    launch_args: list[str] = Field(default_factory=list)
    """Extra `accelerate launch` arguments when `processes > 1`, e.g. `["--gpu_ids", "0,1"]`."""
    lora: LoraConfig | None = None
    """Train LoRA adapters (peft) instead of every weight; `{}` takes the defaults."""
    loss_per: Literal["token", "example"] = "token"
    """Generative tasks: the completion loss is a mean over all completion tokens of a batch (`token`, the usual
    choice), or over examples, each example's tokens averaged first (`example`): then a one-word answer weighs as
    much as a 40-token one, which mixed instruction sets need (the distillation's terms follow it too)."""
    freeze_embeddings: bool = False
    """Generative tasks: keep the word embeddings as the base has them, and with them the output layer where the two
    are tied (the packaged decoder, GPT-2, most small LMs). The vocabulary projection's weight gradient and optimizer
    state are skipped: a quarter of a MiniLM decoder's training step. No effect under LoRA (the base is frozen
    there). Distillation has its own (`distill.freeze_embeddings`)."""
    target_contrast: float = Field(default=0.0, ge=0.0)
    """Generative tasks: weight of a term that makes the model read the target its prompt names (GeDi's
    generative-discriminative training, Krause et al. 2020). For instruction kinds whose every prompt names the
    row's target (the packaged `write a <sentiment> tweet about <topic>`: kinds with two targets or more, each
    row's target a word of its prompt), the row's answer is also scored after the prompt naming each other target,
    and the loss adds the cross-entropy of the row's own target under p(target | answer), the softmax of those
    answer log-likelihoods. Costs a forward and backward pass per alternative. 0: off."""


DistillLoss = Literal["forward_kl", "reverse_kl", "jsd"]


class DistillConfig(_Strict):
    student_layers: list[int] = Field(default_factory=lambda: [0, 2, 4])
    """Teacher layers copied into the student, in order (DistilBERT-style init)."""
    ffn_keep: float | None = Field(default=None, gt=0.0, le=1.0)
    """Share of each student layer's feed-forward neurons kept (structured pruning by weight magnitude before
    distillation). null (default): 0.96 where every block is one llmops prunes (BERT- and Llama-style; MiniLM: 1,472
    of 1,536 neurons, which brings three of its six layers under half its non-embedding parameters), 1.0 for other
    architectures. A number prunes every block, and a block llmops cannot prune is then an error. 1.0 keeps all."""
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    """Weight of the hard-label cross-entropy; (1 - alpha) goes to the distillation term."""
    temperature: float = Field(default=2.0, gt=0.0)
    loss: DistillLoss = "forward_kl"
    """Generative tasks: the token-level divergence to the teacher: forward KL(teacher || student), reverse
    KL(student || teacher), or the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024), weighted by
    `beta`. Classification always uses the forward KL of Hinton et al."""
    beta: float = Field(default=0.5, gt=0.0, lt=1.0)
    """Generative tasks, `loss: jsd`: the mixture weight of the generalized JSD."""
    on_policy: float = Field(default=0.0, ge=0.0, le=1.0)
    """Generative tasks: share of batches whose completions the student writes itself (GKD's lambda); the teacher
    scores those tokens. 0: the dataset's completions only."""
    freeze_embeddings: bool = False
    """Generative tasks: the student keeps the teacher's word embeddings, and the output layer tied to them: it
    learns to match the teacher's distribution through the teacher's own output layer, and skips that layer's
    weight gradient and optimizer state (half of a 3-layer MiniLM student's step)."""
    hidden_weight: float = Field(default=0.0, ge=0.0)
    """Weight of the hidden-state (cosine) loss; > 0 runs the teacher on every batch."""
    target_contrast: float = Field(default=0.0, ge=0.0)
    """Generative tasks: the student's `train.target_contrast` term, with this weight (not on on-policy batches)."""
    epochs: float = Field(default=3.0, gt=0)
    batch_size: int = Field(default=32, gt=0)
    learning_rate: float = Field(default=1e-4, gt=0)
    transfer_rows: int = Field(default=0, ge=0)
    """Classification: extra texts (from rows `data.sample` left out) that the student learns from the teacher's
    soft labels alone."""

    @field_validator("student_layers")
    @classmethod
    def _layers_are_distinct(cls, layers: list[int]) -> list[int]:
        if not layers:
            raise ValueError("distill.student_layers must name at least one teacher layer")
        if len(set(layers)) != len(layers) or any(i < 0 for i in layers):
            raise ValueError(f"distill.student_layers must be distinct non-negative indices, got {layers}")
        return layers


class QuantizeConfig(_Strict):
    candidates: list[QuantKind] = Field(default_factory=lambda: list(CLASSIFIER_QUANT_KINDS))
    """Which compressed students to build and evaluate."""
    int8_per_channel: bool = True
    """Per-output-channel int8 weight scales (more accurate than one scale per tensor)."""
    skip_modules: list[str] = Field(default_factory=lambda: ["classifier"])
    """Modules kept in full precision, by any component of their dotted name (default: the classifier head)."""
    max_loss: float | None = Field(default=0.005, ge=0)
    """torch int8 of a classifier: the most validation macro-F1 it may lose against the fp32 student (0.005: half
    a point). Layers are returned to fp32, the most sensitive first, until the loss is within it (Intel Neural
    Compressor's accuracy-aware tuning). None: quantize every Linear layer outside `skip_modules`."""
    search_trials: int = Field(default=40, gt=0)
    """The search's budget: validation passes at most."""
    search_rows: int = Field(default=1000, gt=0)
    """Validation rows each pass scores (never the test split)."""
    onnx_opset: int = Field(default=17, ge=14)
    """ONNX opset the student is exported with (`onnx-fp32`, `onnx-int8`)."""
    onnx_int8_mode: Literal["dynamic", "static", "auto"] = "auto"
    """`onnx-int8`: ONNX Runtime's dynamic int8 (weights int8, activations quantized per batch), static int8
    (activation ranges calibrated on `calibration_rows` training rows), or `auto`: build both and keep static only
    where it is faster on the validation split and within `max_loss` (the same search result applies to both)."""
    calibration_rows: int = Field(default=256, gt=0)
    """Training rows whose activations calibrate static int8."""


class GenerationEvalConfig(_Strict):
    """How generative candidates are measured (all on the same held-out rows)."""

    perplexity_rows: int = Field(default=400, gt=0)
    """Test rows whose completions the perplexity is measured on (teacher-forced)."""
    agreement_rows: int = Field(default=64, ge=0)
    """A runtime candidate (GGUF, OpenVINO) against the fp32 student it was converted from, teacher-forced on this many
    test completions: `top1_agreement` and `mean_kl` (0: not measured)."""
    exact_match_instructions: list[str] = Field(default_factory=lambda: ["classify"])
    """Rows of these instruction kinds are answered greedily and scored by exact match and macro-F1."""
    exact_match_rows: int = Field(default=400, gt=0)
    control_instructions: list[str] = Field(default_factory=lambda: ["write"])
    """Rows of these kinds (all non-exact-match rows when the data has no instruction column) are answered by
    sampling: distinct-2, repetition, and control accuracy where the row has a target."""
    samples: int = Field(default=64, gt=0)
    """Open generations per candidate."""
    max_new_tokens: int = Field(default=48, gt=0)
    temperature: float = Field(default=0.8, ge=0.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    seed: int = 0
    control_model: str | None = "tweet-sentiment"
    """Registered classifier whose `champion` labels the open generations (control accuracy: the share labelled
    with the requested target). null, or no such champion: not measured, and said so."""
    speed_prompts: int = Field(default=8, gt=0)
    """Prompts timed at batch 1 (time to first token, decode tokens/s)."""
    speed_new_tokens: int = Field(default=32, gt=1)
    speed_batch_size: int = Field(default=16, gt=0)
    """The batched decode rate is measured at this batch size."""


class EvalConfig(_Strict):
    latency_samples: int = Field(default=100, gt=0)
    throughput_batch_size: int = Field(default=64, gt=0)
    throughput_max_rows: int = Field(default=1024, gt=0)
    throughput_repeats: int = Field(default=1, gt=0)
    """Timed passes over those rows; the median is reported (benchmarks use more)."""
    threads: int | None = None
    """Torch threads for every timing (the same for all candidates). Default: all cores."""
    min_slice_size: int = Field(default=30, gt=0)
    """Slices with fewer test rows are reported but not gated (too noisy)."""
    parallel: Literal["none", "ray"] = "none"
    """ray: evaluate the candidates at once on Ray, each asking what `ray.stages.evaluate` says: on the lifecycle's
    cluster when it runs on one (there they always are), else on a Ray instance started on this machine for the
    evaluation. Their latency and throughput are then measured side by side on shared cores unless each has a
    node of its own. (The Dask path this replaced is retired: docs/scale.md.)"""
    generation: GenerationEvalConfig = GenerationEvalConfig()
    """Generative tasks only."""

    @model_validator(mode="before")
    @classmethod
    def _dask_retired(cls, tree: Any) -> Any:
        if isinstance(tree, dict):
            if tree.get("parallel") == "dask":
                raise ValueError(
                    "eval.parallel: dask is retired; `ray` evaluates the candidates at once (on a Ray instance "
                    "started on this machine, or the lifecycle's cluster): docs/scale.md"
                )
            retired = sorted(key for key in tree if key in {"dask_address", "dask_workers"})
            if retired:
                raise ValueError(
                    f"eval.{retired[0]}: the Dask path is retired; with eval.parallel: ray the candidates are "
                    "evaluated on the cluster at ray.address (or RAY_ADDRESS), else on a Ray instance on this machine"
                )
        return tree


class AnswerGates(_Strict):
    """Generators: absolute ceilings on what a reader notices first, whatever the teacher scored. Each applies where
    the evaluation measures it: the empty share on every answer, the off-label share on the closed instructions'
    rows (`classify`), truncation and repetition on the open ones (`write`). null turns one off."""

    max_empty_share: float | None = Field(default=0.02, ge=0.0, le=1.0)
    """Answers that are empty or that the model would have left empty (its first choice was the end token)."""
    max_off_label_share: float | None = Field(default=0.05, ge=0.0, le=1.0)
    """Answers to a closed instruction that are none of its labels."""
    max_truncated_share: float | None = Field(default=0.25, ge=0.0, le=1.0)
    """Open answers cut at `eval.generation.max_new_tokens` instead of ending by themselves."""
    max_repetition_rate: float | None = Field(default=0.2, ge=0.0, le=1.0)
    """seq-rep-3: the share of an answer's word trigrams that repeat one before them (a loop is near 1)."""


class GateConfig(_Strict):
    metric: str = "macro_f1"
    """The quality metric that retention and non-inferiority compare (generative tasks default to `perplexity`).
    Any metric the evaluation reports; for lower-is-better metrics (perplexity) both compare the other way."""
    min_macro_f1: float | None = Field(default=0.6, ge=0.0, le=1.0)
    min_retention: float = Field(default=0.97, ge=0.0)
    """Candidate / teacher on `metric` (teacher / candidate for a lower-is-better metric)."""
    max_drop_vs_champion: float = Field(default=0.005, ge=0.0)
    """Non-inferiority margin on `metric`, in its units, against the current champion on the same test set."""
    max_latency_p95_ms: float | None = Field(default=None, gt=0)
    """p95 latency at batch 1 (generative tasks: time to first token)."""
    max_size_mb: float | None = Field(default=None, gt=0)
    min: dict[str, float] = Field(default_factory=dict)
    """Floors on any reported metric: `{control_accuracy: 0.6}`."""
    max: dict[str, float] = Field(default_factory=dict)
    """Ceilings on any reported metric: `{repetition_rate: 0.2}`."""
    min_ratio_to_teacher: dict[str, float] = Field(default_factory=dict)
    """Candidate / teacher at least this, per metric: `{control_accuracy: 0.95}`."""
    max_ratio_to_teacher: dict[str, float] = Field(default_factory=dict)
    """Candidate / teacher at most this, per metric: `{perplexity: 1.25}`."""
    max_slice_gap: float | None = Field(default=None, gt=0)
    """Largest allowed gap in macro-F1 between gated slices."""
    allow_teacher: bool = True
    """The teacher may be promoted when it is the only candidate that passes."""
    answers: AnswerGates | None = None
    """Generative tasks (on by default there): absolute ceilings on empty, off-label, truncated and repeating
    answers. null: none."""
    when_measured: list[str] = Field(default_factory=list)
    """Metrics whose gates apply only when this run can measure them (`control_accuracy` needs a classifier
    champion in the registry). A gate on any other metric the run cannot measure is refused before any stage runs,
    with the override that fixes it."""


class RegistryConfig(_Strict):
    model_name: str = "tweet-sentiment"
    """Generative tasks default to `tweet-generator`."""
    experiment: str = "llmops"
    tracking_uri: str | None = None
    """Default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    artifact_location: str = "mlartifacts"
    """Artifact root for a new experiment on the embedded default store."""


GuardMode = Literal["redact", "block", "allow"]


class GuardRule(_Strict):
    prompts: GuardMode = "redact"
    """What a prompt (or a text to classify) holding personal data or a credential gets: redacted in the
    prediction log (the model still reads it), refused with a 400 naming the kind (`block`), or kept (`allow`)."""
    answers: GuardMode = "redact"
    """What an answer holding one gets: redacted in the prediction log (the caller receives it as written), kept
    from the caller (`block`: a 400 naming the kind, or an error event in a stream; a stream then sends the answer
    once it is whole and checked, and the log holds it redacted), or kept (`allow`)."""


class GuardsConfig(GuardRule):
    models: dict[str, GuardRule] = {}
    """Per served model, in place of the rules above: `{tweet-generator: {prompts: block}}`."""

    def rule(self, model: str) -> GuardRule:
        return self.models.get(model, self)


class BatchesConfig(_Strict):
    """OpenAI's Batch API (`/v1/files`, `/v1/batches`): batches of chat or completion requests answered in the
    background by the served generators, interleaved with live traffic."""

    dir: str = "batches"
    """Uploaded files, batch state, output and error files: shared by the workers (a shared path for replicas)."""
    concurrency: int = Field(default=8, gt=0)
    """Requests of one batch in flight at once (each joins the engine's running batch like a live request)."""
    max_file_bytes: int = Field(default=104_857_600, gt=0)
    """An uploaded file's size at most (it is exempt from `max_body_bytes`)."""
    max_requests: int = Field(default=50_000, gt=0)
    """Requests in one batch at most."""
    completion_window_s: float = Field(default=86_400, gt=0)
    """A batch not finished this long after it was created expires, as OpenAI's do after their `completion_window`
    (24h): no more of its requests are sent, those not answered go to its error file as `batch_expired`, and what
    it answered stays in its output file."""


class RayServeConfig(_Strict):
    """`llmops serve --ray`: the service as Ray Serve replicas (docs/scale.md)."""

    target_ongoing_requests: float = Field(default=8, gt=0)
    """Requests in flight per replica the autoscaler aims at: above it, more replicas (up to `max_replicas`)."""
    replica_cpus: float = Field(default=1, gt=0)
    """CPUs a replica asks of its node (with `serve.threads` its torch threads)."""
    replica_gpus: float = Field(default=0, ge=0)
    max_ongoing_requests: int = Field(default=256, gt=0)
    """Requests a replica takes at once (its batcher forms batches of them); more wait in Ray Serve's router."""
    upscale_delay_s: float = Field(default=10, ge=0)
    downscale_delay_s: float = Field(default=120, ge=0)
    retries: int = Field(default=3, ge=0)
    """A request whose replica dies before it answers is sent to another, this many times at most."""


class ServeConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    models: list[str] | None = None
    """Registered models served, each following `alias`. Default: `registry.model_name` and `tweet-generator`
    (`tweet-sentiment` and `tweet-generator` with the default config). A model without the alias yet is listed
    as absent and does not hold readiness back."""
    alias: str = "champion"
    """Registry alias the service follows."""
    poll_interval_s: float = Field(default=10.0, gt=0)
    """How often the registry is asked where the alias points."""
    retry_failed_after_s: float = Field(default=300.0, ge=0)
    """A version that failed to load is tried again after this long (if the alias still points at it)."""
    startup_wait_s: float = Field(default=120.0, ge=0)
    """How long a starting worker waits for its first model load before taking connections (then 503 until loaded)."""
    model_cache: str = "artifacts/served"
    """Downloaded versions, one folder per version."""
    batching: bool = True
    max_batch_size: int = Field(default=32, gt=0)
    """Texts per forward pass at most (one request larger than this runs alone)."""
    max_wait_ms: float = Field(default=5.0, ge=0)
    """While the model is busy, how long a forming batch waits for more texts (a request that finds the model
    idle runs at once)."""
    max_queue: int = Field(default=1024, gt=0)
    """Texts waiting for the model at most; beyond it requests get 503 with Retry-After."""
    threads: int | None = Field(default=None, gt=0)
    """Torch threads for inference, per worker. Default: all cores."""
    workers: int = Field(default=1, ge=1)
    """Server processes (uvicorn workers), each with its own model copy, batcher and queue. On CPU, one
    worker per core with `threads: 1` beats one worker using every core: the event loop and the model
    no longer take turns on one interpreter lock."""
    max_texts: int = Field(default=64, gt=0)
    """Texts per request at most."""
    max_text_chars: int = Field(default=2000, gt=0)
    over_length: Literal["truncate", "reject"] = "truncate"
    """A text over max_text_chars is cut to it, or the request gets 422 (the OpenAPI document says so)."""
    max_body_bytes: int = Field(default=1_048_576, gt=0)
    api_keys_env: str = "LLMOPS_API_KEYS"
    """Environment variable holding comma-separated API keys. No keys anywhere: no auth."""
    api_keys_file: str | None = None
    """File with one API key per line (added to those from the environment)."""
    gateway_store: str | None = "gateway.db"
    """Named, scoped keys with limits and usage (`llmops keys`): a SQLite file shared by the workers on one host
    (used once `llmops keys create` made it), or a PostgreSQL URL shared by replicas. None: not used."""
    guards: GuardsConfig = GuardsConfig()
    """Personal data and credentials (e-mails, phone numbers, card numbers, IBANs, keys) in what the models read
    and write: redacted in the prediction log by default (`llmops.guards`)."""
    batches: BatchesConfig = BatchesConfig()
    key_refresh_s: float = Field(default=2.0, gt=0)
    """A worker reads a stored key again after this long: a revoked key is refused within it."""
    min_replicas: int = Field(default=1, ge=1)
    """`llmops serve --ray`: replicas at least; the autoscaler adds up to `max_replicas` under load."""
    max_replicas: int = Field(default=1, ge=1)
    ray: RayServeConfig = RayServeConfig()

    @model_validator(mode="after")
    def _replicas(self) -> ServeConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"serve.max_replicas ({self.max_replicas}) below serve.min_replicas ({self.min_replicas})")
        return self

    mlflow_traces: float = Field(default=0.1, ge=0.0, le=1.0)
    """Generators: the share of generations also written as MLflow traces, to the experiment of the run that
    trained the served version (its Traces view): prompt and answer redacted as the prediction log is, tokens,
    latency, the key's name. 0: none. OpenTelemetry spans of every request are set by the OTEL_* variables."""
    prediction_log: str = "predictions.db"
    """Where every prediction and feedback label goes: a .db file (SQLite), a database URL (PostgreSQL:
    `postgresql+psycopg2://user@host/db`, one log for every replica) or a folder (Parquet files)."""
    flush_interval_s: float = Field(default=1.0, gt=0)
    """The prediction log is written at least this often; a crash loses at most this much."""
    log_embeddings: bool = True
    """Log each text's embedding (the classification head's input, float16) for monitoring's embedding drift."""
    shadow: bool = False
    """Score a copy of every request with `challenger` and log it beside the champion's answer."""
    canary_share: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of requests answered by `challenger` (0: off)."""
    continuous_batching: bool = True
    """Generators: sequences join and leave the running batch at every decoding step. Off: one at a time."""
    max_running: int = Field(default=16, gt=0)
    """Generators: sequences decoding at once, per model version."""
    max_waiting: int = Field(default=64, ge=0)
    """Generators: sequences waiting for a slot; beyond it requests get 503 with Retry-After."""
    max_new_tokens: int = Field(default=256, gt=0)
    """Generators: `max_tokens` of a request is capped at this."""
    default_max_tokens: int = Field(default=64, gt=0)
    """Generators: `max_tokens` when a request gives none."""
    max_prompt_tokens: int = Field(default=256, gt=0)
    """Generators: longer prompts get 413."""
    max_n: int = Field(default=8, gt=0)
    """Generators: choices per prompt (`n`) at most; beyond it requests get 422."""

    @model_validator(mode="after")
    def _one_challenger_mode(self) -> ServeConfig:
        if self.shadow and self.canary_share > 0:
            raise ValueError("serve.shadow and serve.canary_share > 0 exclude each other: choose one")
        if self.max_batch_size > self.max_queue:
            raise ValueError("serve.max_batch_size must not exceed serve.max_queue")
        if self.models is not None and (not self.models or len(set(self.models)) != len(self.models)):
            raise ValueError(f"serve.models must name distinct registered models, got {self.models}")
        if self.default_max_tokens > self.max_new_tokens:
            raise ValueError("serve.default_max_tokens must not exceed serve.max_new_tokens")
        return self


class RetrainPolicy(_Strict):
    """When monitoring starts a retraining (monitoring/decision.py applies it)."""

    min_window: int = Field(default=200, gt=0)
    """Fewer predictions in the window than this: no verdict at all."""
    drift_windows: int = Field(default=2, gt=0)
    """Drift must hold in this many (K) ..."""
    of_last: int = Field(default=3, gt=0)
    """... of the last M windows, this one included (hysteresis: one noisy window does not trigger)."""
    cooldown_hours: float = Field(default=24.0, ge=0)
    """No retraining this soon after the last one."""
    max_per_day: int = Field(default=2, ge=0)
    """Retrainings in any 24 hours at most."""
    max_quality_drop: float | None = Field(default=0.05, ge=0)
    """Window macro-F1 (from feedback labels) below the champion's test macro-F1 by more than this triggers alone."""
    max_bias_gap: float | None = Field(default=None, gt=0)
    """A gap between slices over this ceiling triggers alone."""
    max_flagged_share: float | None = Field(default=None, gt=0, le=1)
    """The share of the window's texts in which the guards found personal data or credentials (`serve.guards`)
    over this ceiling triggers alone."""
    max_flagged_rise: float | None = Field(default=None, gt=0, le=1)
    """That share rising by more than this over its mean in the earlier windows (the last `of_last`) triggers
    alone: the traffic now carries data it did not."""

    @model_validator(mode="after")
    def _k_of_m(self) -> RetrainPolicy:
        if self.drift_windows > self.of_last:
            raise ValueError("monitor.retrain.drift_windows must not exceed monitor.retrain.of_last")
        return self


DriftSignal = Literal["text", "descriptors", "embedding", "prediction", "confidence"]
DEFAULT_DRIFT_SIGNALS: tuple[DriftSignal, ...] = ("text", "embedding", "prediction")


class SliceRule(_Strict):
    """A slice for the bias check: texts with a keyword, texts matching a regex, or each value of a column."""

    name: str
    keywords: list[str] | None = None
    """Whole words, case-insensitive; any of them puts a text in the slice."""
    regex: str | None = None
    """Case-insensitive; a match anywhere puts a text in the slice."""
    column: str | None = None
    """A column of the window (`model_version`, `feedback_label`, ...): one slice per value, named `name=value`."""

    @model_validator(mode="after")
    def _exactly_one_rule(self) -> SliceRule:
        given = [k for k in ("keywords", "regex", "column") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"slice '{self.name}' needs exactly one of keywords, regex, column (got {given or 'none'})"
            )
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as error:
                raise ValueError(f"slice '{self.name}': invalid regex: {error}") from None
        return self


class BiasConfig(_Strict):
    by_topic: bool = True
    """Slice by `data.topics` (the topic tags training used)."""
    slices: list[SliceRule] = Field(default_factory=list)
    min_slice_rows: int = Field(default=30, gt=0)
    """Smaller slices are listed but left out of the gaps (too noisy)."""
    max_rate_gap: float | None = Field(default=None, gt=0, le=1)
    """Ceiling on the largest difference in a predicted label's rate between slices (reported as over/under)."""


GenerationSignal = Literal["prompt", "embedding", "generation"]
DEFAULT_GENERATION_SIGNALS: tuple[GenerationSignal, ...] = ("prompt",)


class GenerationMonitorConfig(_Strict):
    """How a served generator is monitored (`llmops monitor` covers every served model with a champion)."""

    drift_on: list[GenerationSignal] = Field(default_factory=lambda: list(DEFAULT_GENERATION_SIGNALS))
    """Signals whose drift makes the window drifted: the prompts' text (default), their embedding, the
    generations' descriptors. The others are reported. Templated prompts (the tweet instructions) put the
    prompt embeddings in a few tight clusters, on which the component tests fire on sampling noise alone: the
    embedding is reported, not a trigger, by default."""
    reference_rows: int = Field(default=300, gt=0)
    """Reference prompts (the champion's reference data) the champion answers once per version, greedily."""
    max_new_tokens: int = Field(default=40, gt=0)
    control_model: str | None = "tweet-sentiment"
    """The classifier champion that labels generated texts (null: no control signal)."""
    target_pattern: str = r"\bwrite an? (\w+) tweet\b"
    """A regex over a prompt whose first group is the label the answer should carry."""
    good_rating: float = 1.0
    """On retraining, answers rated at least this join the training data (corrections always do)."""
    retrain_config: str = "configs/llm-quickstart.yaml"
    retrain_deployment: str = "lifecycle/llm"

    @field_validator("target_pattern")
    @classmethod
    def _one_group(cls, pattern: str) -> str:
        try:
            groups = re.compile(pattern).groups
        except re.error as error:
            raise ValueError(f"monitor.generation.target_pattern: invalid regex: {error}") from None
        if groups < 1:
            raise ValueError("monitor.generation.target_pattern needs a group around the label")
        return pattern


class MonitorConfig(_Strict):
    window_size: int | None = Field(default=1000, gt=0)
    """The window: the champion's last N logged predictions ..."""
    window_hours: float | None = Field(default=None, gt=0)
    """... and/or those of the last T hours (both set: the last N within T hours)."""
    reference_rows: int = Field(default=5000, gt=0)
    """Reference rows compared at most (a fixed sample of the champion's reference data)."""
    sample_rows: int | None = Field(default=50_000, gt=0)
    """A window with more rows is read in chunks and compared through a uniform random sample of this many (seeded):
    the pass's memory stays bounded and its time grows linearly with the window. Rows with feedback are all kept
    for quality and a retraining. The report states the sample, its margin against the whole window and the
    smallest change in a share it detects. null: every row in memory, whatever the window's size."""
    embedding_components: int = Field(default=5, gt=0)
    """Embeddings are compared on this many principal components (fit on the reference)."""
    text_drift_rows: int | None = Field(default=2000, gt=0)
    """Rows of each side that text drift's domain classifier learns from (a seeded sample; null: every row). The
    other signals use every row. The report states the smallest ROC AUC the sample tells from chance. Keep it above
    1000: at 1000 rows or fewer a side Evidently switches to its permutation-percentile method, several fits (a
    5,000-row window took 1.77 s at 1000, 0.46 s at 2000, 0.54 s uncapped)."""
    drift_on: list[DriftSignal] = Field(default_factory=lambda: list(DEFAULT_DRIFT_SIGNALS))
    """Signals whose drift makes the window drifted; the others are reported for diagnosis."""
    min_labelled: int = Field(default=30, gt=0)
    """Feedback labels in the window needed before quality is measured."""
    reports_dir: str = "reports"
    workspace: str = "evidently-workspace"
    """Evidently workspace (`evidently ui --workspace <dir>`); every report and decision is added to it."""
    retrain_config: str | None = None
    """Config of the retraining lifecycle. Default: the config the monitor runs with."""
    retrain_via: Literal["auto", "prefect", "in-process"] = "auto"
    """auto: through Prefect when a Prefect API is configured (PREFECT_API_URL), else in-process."""
    retrain_deployment: str = "lifecycle/retrain"
    """The deployment `run_deployment` starts for a retraining through Prefect."""
    bias: BiasConfig = BiasConfig()
    retrain: RetrainPolicy = RetrainPolicy()
    generation: GenerationMonitorConfig = GenerationMonitorConfig()
    """Generators only."""

    @model_validator(mode="after")
    def _has_window(self) -> MonitorConfig:
        if self.window_size is None and self.window_hours is None:
            raise ValueError("monitor needs window_size, window_hours or both")
        if not self.drift_on:
            raise ValueError("monitor.drift_on must name at least one signal")
        return self


TASK_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "causal-lm": {
        "data": {"source": PACKAGED_INSTRUCTIONS},
        "distill": {"temperature": 1.0},
        "quantize": {
            "skip_modules": [],
            "candidates": [
                "fp32",
                "int8",
                "bnb-int8",
                "nf4",
                "gguf-q8_0",
                "gguf-q4_k_m",
                "openvino-int8",
                "openvino-int4",
            ],
        },
        # perplexity: candidate <= 1.25 x the teacher's, and <= the champion's + 0.5 on the same test rows; the
        # answers' floors (empty, off-label, truncated, repeating) with their defaults
        "gates": {
            "metric": "perplexity",
            "min_macro_f1": None,
            "min_retention": 0.8,
            "max_drop_vs_champion": 0.5,
            "answers": {},
        },
        "registry": {"model_name": "tweet-generator"},
    },
}
"""What a generative task changes in the defaults; a key the user sets always wins."""
TASK_DEFAULTS["seq2seq-lm"] = TASK_DEFAULTS["causal-lm"]


RAY_STAGES = ("data", "fine_tune", "distil", "quantize", "evaluate")
"""The lifecycle's stages that run on a Ray cluster (registry reads and writes stay with the flow)."""


class RayStage(_Strict):
    num_cpus: float = Field(default=1, gt=0)
    num_gpus: float = Field(default=0, ge=0)
    memory_gb: float | None = Field(default=None, gt=0)
    """Memory the stage reserves on its node (Ray's `memory`): none by default."""


class RayConfig(_Strict):
    """The lifecycle on a Ray cluster (docs/scale.md). Without an address, nothing changes and Ray is not
    imported."""

    address: str | None = None
    """The cluster (`host:6379`, `auto`, `ray://host:10001`); None: `RAY_ADDRESS` if set, else this process."""
    stages: dict[Literal["data", "fine_tune", "distil", "quantize", "evaluate", "monitor"], RayStage] = {}
    """What each stage asks of its node: `{fine_tune: {num_cpus: 4, num_gpus: 1}}`; 1 CPU by default. `fine_tune`
    with `train.processes` above 1: what each Ray Train worker asks. `monitor`: each model's monitoring pass."""


class LlmopsConfig(_Strict):
    task: Task = "sequence-classification"
    """`causal-lm` (GPT-2, Llama, Qwen style) and `seq2seq-lm` (T5 style) generate text."""
    work_dir: str = "artifacts"
    """Stage outputs (data splits, checkpoints, candidates), keyed by their inputs."""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    distill: DistillConfig = DistillConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    eval: EvalConfig = EvalConfig()
    gates: GateConfig = GateConfig()
    registry: RegistryConfig = RegistryConfig()
    serve: ServeConfig = ServeConfig()
    monitor: MonitorConfig = MonitorConfig()
    ray: RayConfig = RayConfig()

    @property
    def generative(self) -> bool:
        return self.task in GENERATIVE_TASKS

    @property
    def served_models(self) -> list[str]:
        """What `llmops serve` serves: `serve.models`, else this config's model and the generator."""
        return self.serve.models or list(dict.fromkeys([self.registry.model_name, "tweet-generator"]))

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, tree: Any) -> Any:
        if not isinstance(tree, dict) or tree.get("task") not in TASK_DEFAULTS:
            return tree
        tree = dict(tree)
        for section, defaults in TASK_DEFAULTS[tree["task"]].items():
            given = tree.get(section)
            if given is None or isinstance(given, dict):
                tree[section] = {**defaults, **(given or {})}
        return tree

    @model_validator(mode="after")
    def _fits_the_task(self) -> LlmopsConfig:
        if self.generative and self.distill.transfer_rows > 0:
            raise ValueError("distill.transfer_rows is for classification; a generative task has no transfer set")
        if not self.generative and self.train.lora is not None and self.train.lora.qlora:
            raise ValueError("train.lora.qlora is for generative tasks")
        adapter_of = self.train.lora.adapter_of if self.train.lora is not None else None
        if adapter_of is not None:
            if self.task != "causal-lm":
                raise ValueError(f"train.lora.adapter_of: adapters are served over causal-lm bases, not {self.task}")
            if self.train.lora.qlora:  # type: ignore[union-attr]
                raise ValueError(
                    "train.lora.adapter_of: an adapter trains over the base's own weights, not under QLoRA"
                )
            if adapter_of.split("@")[0].split("/")[0] == self.registry.model_name:
                raise ValueError(
                    f"train.lora.adapter_of: the adapter is registered as its own model; registry.model_name must "
                    f"name it, not its base '{self.registry.model_name}'"
                )
        onnx = [kind for kind in self.quantize.candidates if kind in ONNX_KINDS]
        if self.generative and onnx:
            raise ValueError(f"quantize.candidates: {onnx} are built for classifiers; a {self.task} task has none")
        runtime = [kind for kind in self.quantize.candidates if kind in RUNTIME_KINDS]
        if not self.generative and runtime:
            raise ValueError(f"quantize.candidates: {runtime} are built for generators; a {self.task} task has none")
        if not self.generative and self.gates.answers is not None:
            raise ValueError("gates.answers is for generative tasks: a classifier's answers are always a label")
        gated = {self.gates.metric, *self.gates.min, *self.gates.max, *self.gates.when_measured}
        gated |= {*self.gates.min_ratio_to_teacher, *self.gates.max_ratio_to_teacher}
        unknown = sorted(name for name in gated if not is_known_metric(self.task, name))
        if unknown:
            known = ", ".join(TASK_METRICS[self.task])
            raise ValueError(f"gates name metrics a {self.task} evaluation does not report: {unknown} (known: {known})")
        return self


TASK_METRICS: dict[str, tuple[str, ...]] = {
    "sequence-classification": (
        "macro_f1",
        "accuracy",
        "latency_p50_ms",
        "latency_p95_ms",
        "throughput_per_s",
        "size_mb",
        "params_total",
        "params_non_embedding",
    ),
    "causal-lm": (
        "perplexity",
        "macro_f1",
        "exact_match",
        "control_accuracy",
        "distinct_2",
        "repetition_rate",
        "empty_share",
        "truncated_share",
        "off_label_share",
        "ttft_p50_ms",
        "ttft_p95_ms",
        "decode_tokens_per_s",
        "batch_tokens_per_s",
        "peak_memory_mb",
        "size_mb",
        "params_total",
        "params_non_embedding",
        "top1_agreement",
        "mean_kl",
    ),
}
"""The metrics each task's evaluation reports, by name (plus `f1_<label>` and `slice_f1_<slice>`)."""
TASK_METRICS["seq2seq-lm"] = TASK_METRICS["causal-lm"]


def is_known_metric(task: str, name: str) -> bool:
    return name in TASK_METRICS[task] or name.startswith(("f1_", "slice_f1_"))


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
        node = child
    node[leaf] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value), the value parsed as YAML (numbers, lists, null)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    return key.strip(), yaml.safe_load(raw)


def _describe(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {key}: {message}")
    return "invalid configuration:\n" + "\n".join(lines)


ENV_PREFIX = "LLMOPS__"
"""`LLMOPS__SERVE__PREDICTION_LOG=/data/log` sets `serve.prediction_log` (containers configure themselves so)."""


def environment_overrides(environ: dict[str, str] | None = None) -> list[str]:
    """`key=value` overrides from LLMOPS__SECTION__KEY variables, sorted by name."""
    environ = dict(os.environ) if environ is None else environ
    return [
        f"{name[len(ENV_PREFIX) :].lower().replace('__', '.')}={value}"
        for name, value in sorted(environ.items())
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX)
    ]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> LlmopsConfig:
    """Read a YAML config, apply overrides (LLMOPS__ variables, then `key=value` items), validate.

    Raises ConfigError."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping, not {type(loaded).__name__}")
        tree = loaded
    for item in [*environment_overrides(), *(overrides or [])]:
        _set_dotted(tree, *parse_override(item))
    try:
        return LlmopsConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
