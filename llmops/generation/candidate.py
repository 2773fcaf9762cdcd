"""A loaded generator candidate: prompts or chats in, text out.

The folder layout is the shared contract (`llmops.candidate_folder`): `candidate.json`, the tokenizer (with its chat
template), `config.json` and the weights; torch int8 candidates are rebuilt from their recipe. Evaluation, the
MLflow model and serving generate through :class:`Generator`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmops.candidate_folder import load_torch_model, open_candidate
from llmops.generation.adapters import Adapters
from llmops.generation.data import IGNORE, encode_example, prompt_ids, render_prompt
from llmops.generation.decode import Decoded, Running, RunningBatch, decode, head_inputs, pick, prefill
from llmops.generation.losses import score_completions
from llmops.generation.vocabulary import Vocabulary

Chat = Sequence[dict[str, str]]
Prompt = str | Chat
"""A plain prompt (given to the model as written) or a chat (rendered with the model's chat template)."""


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0: greedy decoding; above 0: sampling at this temperature."""
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    """Generation ends at the first of these strings (not included in the text)."""
    seed: int | None = None
    min_new_tokens: int = 1
    """Tokens written before the end token may end the answer: 1 by default, so an answer is never empty unless
    the caller asks for 0. Benchmarks force a fixed length with it."""
    logprobs: int | None = None
    """Serving: each written token's log-probability, with this many most likely alternatives (None: none)."""
    prompt_logprobs: int | None = None
    """Serving: each prompt token's log-probability too, with this many alternatives (None: none)."""
    grammar: str | None = None
    """Serving: the answer keeps to this grammar (`llmops.generation.constrained`) and ends where it is complete."""
    adapter: str | None = None
    """Serving: the LoRA adapter this sequence's rows run with (a key attached to the runtime's `adapters`)."""


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """`stop` (end-of-text token or a stop string) or `length` (max_new_tokens reached)."""
    chose_end_first: bool = False
    """The model's own first choice was the end token: it would have answered nothing (evaluation counts these)."""


class Generator:
    """A loaded candidate generator."""

    def __init__(self, directory: str | Path):
        self.directory, self.meta, self.tokenizer = open_candidate(directory)
        self.task = self.meta.task
        self.model, self.device = self._load_model()
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.vocabulary = Vocabulary(self.tokenizer)
        self.barred = self.vocabulary.barred
        self.adapters = Adapters(self.model) if isinstance(self.model, torch.nn.Module) else None
        """LoRA adapters served over this model, row by row (a torch model; None: this runtime runs none)."""

    def _load_model(self) -> tuple[Any, torch.device]:
        """The model that runs the forward passes (torch here; another runtime overrides this and the passes)."""
        return load_torch_model(self.directory, self.meta)

    def _model_file(self, name: str, runtime: str) -> tuple[Path, int | None]:
        """A runtime candidate's model file (a clear error where it is missing) and the positions its config
        gives (None: not said)."""
        model_file = self.directory / name
        if not model_file.is_file():
            raise FileNotFoundError(f"{model_file}: the {runtime} candidate has no model file")
        config = json.loads((self.directory / "config.json").read_text())
        positions = config.get("max_position_embeddings") or config.get("n_positions")
        return model_file, int(positions) if positions else None

    @property
    def prompt_format(self) -> str:
        """`chat` when training rendered its prompts with the chat template, else `plain` (prompts as written)."""
        return str(self.meta.recipe.get("prompt_format", "plain"))

    def render(self, prompt: Prompt) -> str:
        """The text the model sees before its answer."""
        if isinstance(prompt, str):
            return prompt
        return render_prompt(self.tokenizer, "", json.dumps(list(prompt)))

    def encode(self, prompt: Prompt, truncate: bool = True) -> list[int]:
        """Prompt token ids as the model was trained on them (BOS first for a decoder), the oldest cut to the
        training `max_length` unless `truncate` is off (serving checks the length against its own limit)."""
        rendered = self.render(prompt)
        if self.task == "seq2seq-lm":
            ids = list(self.tokenizer(rendered)["input_ids"])
            return ids[: self.meta.max_length] if truncate else ids
        ids = prompt_ids(self.tokenizer, rendered)
        return ids[-self.meta.max_length :] if truncate else ids

    @property
    def context_length(self) -> int | None:
        """Positions the model has (prompt and answer together); None where it has no such limit (T5)."""
        config = self.model.config
        for key in ("max_position_embeddings", "n_positions"):
            if isinstance(getattr(config, key, None), int):
                return int(getattr(config, key))
        return None

    def _batch(self, encoded: list[list[int]]) -> dict[str, torch.Tensor]:
        """Pad a batch: on the left for a decoder (generation continues at the right end), right for an encoder."""
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(encoded):
            span = slice(width - len(ids), width) if self.task == "causal-lm" else slice(0, len(ids))
            input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
            mask[i, span] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}

    @torch.inference_mode()
    def generate_ids(self, encoded: list[list[int]], params: GenerationParams) -> Decoded:
        """New token ids per row, ending with the end-of-text token where the row stopped by itself."""
        batch = self._batch(encoded)
        if self.task == "causal-lm":
            generator = None if params.seed is None else torch.Generator(self.device).manual_seed(params.seed)
            return decode(
                self.model,
                batch["input_ids"],
                batch["attention_mask"],
                max_new_tokens=params.max_new_tokens,
                eos_id=self.eos_id,
                temperature=params.temperature,
                top_p=params.top_p,
                min_new_tokens=params.min_new_tokens,
                generator=generator,
                barred=self.barred,
            )
        return self._generate_seq2seq(batch, params)

    def _generate_seq2seq(self, batch: dict[str, torch.Tensor], params: GenerationParams) -> Decoded:
        """transformers' `generate()` under the same rules: `never` suppressed at every step, `not_first` at the
        first, the end token until `min_new_tokens`."""
        if params.seed is not None:
            torch.manual_seed(params.seed)
        sampling = params.temperature > 0
        out = self.model.generate(
            **batch,
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_new_tokens or None,
            do_sample=sampling,
            temperature=params.temperature if sampling else None,
            top_p=params.top_p if sampling else None,
            top_k=None,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            suppress_tokens=list(self.barred.never) or None,
            begin_suppress_tokens=list(self.barred.not_first) or None,
            output_logits=True,
            return_dict_in_generate=True,
        )
        chose_end_first = (out.logits[0].argmax(dim=-1) == self.eos_id).tolist()  # the first step, before the rules
        return Decoded(out.sequences[:, 1:].tolist(), chose_end_first)  # after the decoder's start token

    def text_of(self, ids: list[int]) -> str:
        """Token ids as text, special tokens left out (see `llmops.generation.vocabulary`)."""
        return self.vocabulary.text(ids)

    def result(
        self, new_ids: list[int], prompt_tokens: int, params: GenerationParams, chose_end_first: bool = False
    ) -> Generation:
        """The text of new token ids, cut at the end token or the first stop string, and why it ended."""
        ended = self.eos_id in new_ids
        if ended:
            new_ids = new_ids[: new_ids.index(self.eos_id) + 1]
        text = self.text_of(new_ids)
        hits = [text.index(s) for s in params.stop if s and s in text]
        if hits:
            text = text[: min(hits)].rstrip()
            count = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            return Generation(text, prompt_tokens, count, "stop", chose_end_first)
        return Generation(text, prompt_tokens, len(new_ids), "stop" if ended else "length", chose_end_first)

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams, batch_size: int = 16) -> list[Generation]:
        """One generation per prompt, in order, `batch_size` prompts per `generate` call."""
        results: list[Generation] = []
        for start in range(0, len(prompts), batch_size):
            encoded = [self.encode(p) for p in prompts[start : start + batch_size]]
            new = self.generate_ids(encoded, params)
            results += [
                self.result(ids, len(enc), params, first)
                for ids, enc, first in zip(new.ids, encoded, new.chose_end_first, strict=True)
            ]
        return results

    def generate_running(
        self, running: RunningBatch, encoded: list[list[int]], params: GenerationParams, slots: int
    ) -> Decoded:
        """`encoded` decoded through a runtime's running batch, `slots` rows at a time, under the same rules as
        torch's `decode` (how the llama.cpp and OpenVINO candidates generate outside the serving engine)."""
        generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        written: list[list[int]] = [[] for _ in encoded]
        chose_end_first = [False] * len(encoded)
        barred = self.barred
        for first in range(0, len(encoded), slots):
            rows = list(range(first, min(first + slots, len(encoded))))
            logits, _ = running.admit([encoded[row] for row in rows])
            count = 0
            while rows:
                now_barred = barred.at(count, params.min_new_tokens)
                tokens, own = pick(
                    barred.forbid_always(logits), now_barred, params.temperature, params.top_p, generator
                )
                staying = []
                for index, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
                    if count == 0:
                        chose_end_first[row] = int(own[index]) == self.eos_id
                    written[row].append(token)
                    done = token == self.eos_id or count + 1 == params.max_new_tokens or running.full(index)
                    if not done:
                        staying.append(index)
                running.keep(staying)
                rows = [rows[index] for index in staying]
                if rows:
                    logits = running.step([written[row][-1] for row in rows])
                count += 1
        return Decoded(written, chose_end_first)

    def running_batch(self, slots: int, embeddings: bool = False, positions: int | None = None) -> RunningBatch:
        """The serving engine's running batch over this model (`slots` sequences of at most `positions` tokens:
        a runtime that allocates its caches up front, llama.cpp, sizes them by these; torch's grow)."""
        return Running(self.model, self.pad_id, self.device, embeddings, self.adapters)

    @torch.inference_mode()
    def prompt_embeddings(self, prompts: Sequence[Prompt], batch_size: int = 32) -> np.ndarray:
        """(n_prompts, hidden) float32: the output layer's input at each prompt's last token, as serving logs it."""
        vectors = []
        for start in range(0, len(prompts), batch_size):
            batch = self._batch([self.encode(p) for p in prompts[start : start + batch_size]])
            with head_inputs(self.model) as caught:
                prefill(self.model, batch["input_ids"], batch["attention_mask"])
            vectors.append(caught[0][:, -1, :].float().cpu().numpy())
        return np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)

    def completion_nll(
        self, prompts: Sequence[Prompt], completions: Sequence[str], batch_size: int = 8
    ) -> tuple[float, int]:
        """Summed negative log-likelihood of the completions (and their end-of-text token) given the prompts, and
        the number of tokens it sums over: perplexity is exp(nll / tokens)."""
        total, count = 0.0, 0
        for logits, targets in self.completion_logits(prompts, completions, batch_size):
            total += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            count += len(targets)
        return total, count

    def examples(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[dict[str, list[int]]]:
        """Prompt and completion (and end token) as training encodes them: `input_ids`, `labels`."""
        pairs = zip(prompts, completions, strict=True)
        return [encode_example(self.tokenizer, self.render(p), c, self.task, self.meta.max_length) for p, c in pairs]

    @torch.inference_mode()
    def completion_logits(
        self, prompts: Sequence[Prompt], completions: Sequence[str], batch_size: int = 8
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch: the logits at every completion position (n, vocab) and the tokens there (n,), rows in order
        and positions in order within a row (so two runtimes' outputs on the same rows line up)."""
        for start in range(0, len(prompts), batch_size):
            examples = self.examples(prompts[start : start + batch_size], completions[start : start + batch_size])
            scored = score_completions(self.model, self._right_padded(examples), self.task)
            yield scored.logits, scored.targets

    def scored_one_at_a_time(
        self, score: Callable[[list[int]], torch.Tensor], prompts: Sequence[Prompt], completions: Sequence[str]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`completion_logits` of a runtime that scores one sequence at a time: `score(ids)` gives the logits at
        every position of one example."""
        for example in self.examples(prompts, completions):
            logits, labels = score(example["input_ids"]), torch.tensor(example["labels"])
            scored = (labels[1:] != IGNORE).nonzero()[:, 0]  # position t predicts token t + 1
            yield logits[scored], labels[1:][scored]

    def _right_padded(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        label_width = max(len(e["labels"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full((len(examples), label_width), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[i, : len(e["input_ids"])] = 1
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if self.task == "seq2seq-lm":
            batch["decoder_input_ids"] = self.model.prepare_decoder_input_ids_from_labels(labels=labels)
        return {k: v.to(self.device) for k, v in batch.items()}
