"""`serve.guards` applied: prompts with personal data or credentials refused where a model blocks them, and every
row of the prediction log redacted before it reaches the disk (on the log writer's thread, off the request path).

The finding is `llmops.guards.Guard`'s. Its libraries take seconds to import, so it is built on a thread of its
own when the service starts; a request that must check a prompt before then waits for it (on a thread). A check
of short texts runs on the event loop: a tweet takes 4 us there, where a hop to a thread and back cost the loop
12-48 us and the thread as much again (measured); longer texts go to a thread, so no request holds the loop long.
Counts per model and direction go to Prometheus: texts checked, texts flagged, findings by kind (the flag rate
monitoring reads).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from llmops.config import GuardsConfig
from llmops.guards import Guard
from llmops.predlog import GenerationFeedbackRow, GenerationRow, PredictionRow
from serving.errors import ApiError
from serving.metrics import ServingMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")
INLINE_CHARS = 1_000
"""Texts of up to this many characters in all are checked on the event loop (about 30 us); longer ones on a
thread (4,100 characters took 108 us)."""


class Guards:
    def __init__(self, cfg: GuardsConfig, metrics: ServingMetrics):
        self.cfg = cfg
        self.metrics = metrics
        self._guard: Guard | None = None
        self._ready = threading.Event()
        self.needed = (
            cfg.prompts != "allow"
            or cfg.answers != "allow"
            or any(r.prompts != "allow" or r.answers != "allow" for r in cfg.models.values())
        )

    def start(self) -> None:
        if self.needed:
            threading.Thread(target=self._build, name="guards", daemon=True).start()

    def _build(self) -> None:
        try:
            self._guard = Guard().warm()
        except Exception:  # rows wait in the log writer (nothing unredacted is written) and the error says why
            log.exception("the PII guards could not be built: the prediction log holds its rows until they are")
        finally:
            self._ready.set()

    def wait(self) -> None:
        """Until the guard is built (at once when no rule needs one)."""
        if self.needed:
            self._ready.wait()

    @property
    def guard(self) -> Guard:
        self._ready.wait()
        if self._guard is None:
            raise RuntimeError("the PII guards failed to build (see the log)")
        return self._guard

    def _checked(self, model: str, direction: str, text: str) -> list[Any]:
        findings = self.guard.find(text)
        self.metrics.guard_texts.labels(model, direction).inc()
        if findings:
            self.metrics.guard_flagged.labels(model, direction).inc()
            for finding in findings:
                self.metrics.guard_findings.labels(model, direction, finding.entity).inc()
        return findings

    def blocks(self, model: str, direction: str = "prompts") -> bool:
        """`model` refuses prompts (or answers) holding personal data or credentials (`check_prompts`,
        `check_answer`)."""
        return getattr(self.cfg.rule(model), direction) == "block"

    def check_prompts(self, model: str, texts: list[str]) -> None:
        """A 400 naming the kinds found (never the values) when `model` blocks prompts that hold any (`prompts_checked`
        from the event loop)."""
        kinds = self._blocked_kinds(model, "prompts", texts)
        if kinds:
            raise ApiError(
                400,
                f"the request holds {', '.join(kinds)}: '{model}' refuses personal data and credentials "
                "(serve.guards); remove them and send it again",
                type="sensitive_data",
            )

    async def prompts_checked(self, model: str, texts: list[str]) -> None:
        """`check_prompts`, on the event loop for short texts (`INLINE_CHARS`), else on a thread."""
        await self._near(self.check_prompts, model, texts, sum(map(len, texts)))

    async def answer_checked(self, model: str, text: str) -> None:
        """`check_answer`, on the event loop for a short answer (`INLINE_CHARS`), else on a thread."""
        await self._near(self.check_answer, model, text, len(text))

    async def _near(self, check: Callable[[str, T], None], model: str, texts: T, size: int) -> None:
        if size <= INLINE_CHARS and self._ready.is_set():  # built: nothing to wait for
            check(model, texts)
        else:
            await asyncio.to_thread(check, model, texts)

    def check_answer(self, model: str, text: str) -> None:
        """A 400 naming the kinds found when `model` blocks answers that hold any (`answer_checked` from the loop)."""
        kinds = self._blocked_kinds(model, "answers", [text])
        if kinds:
            raise ApiError(
                400,
                f"the answer held {', '.join(kinds)}: '{model}' does not give out personal data and credentials "
                "(serve.guards); ask again without asking for them",
                type="sensitive_data",
            )

    def _blocked_kinds(self, model: str, direction: str, texts: list[str]) -> list[str]:
        """The kinds found in `texts` where `model` blocks `direction`, sorted (none where it does not)."""
        if not self.blocks(model, direction):
            return []
        return sorted({f.entity for text in texts for f in self._checked(model, direction, text)})

    def _redacted(self, model: str, direction: str, text: str, found: set[str] | None = None) -> str:
        """`text` with what `model`'s rule for `direction` redacts replaced; the kinds found added to `found`."""
        if not text or getattr(self.cfg.rule(model), direction) == "allow":  # a blocked answer is logged redacted
            return text
        findings = self._checked(model, direction, text)
        if found is not None:
            found.update(f.entity for f in findings)
        return self.guard.redact(text, findings) if findings else text

    def _redacted_chat(self, model: str, messages: str, found: set[str]) -> str:
        if not messages:
            return messages
        chat = json.loads(messages)
        for message in chat:
            if isinstance(message.get("content"), str):
                direction = "answers" if message.get("role") == "assistant" else "prompts"
                message["content"] = self._redacted(model, direction, message["content"], found)
        return json.dumps(chat)

    def _checks(self, model: str, *directions: str) -> bool:
        rule = self.cfg.rule(model)
        return any(getattr(rule, direction) != "allow" for direction in directions)

    def scrub(self, row: Any) -> Any:
        """The prediction-log row with what its model's rules redact replaced by `<KIND>`, and the kinds found in
        its `flagged` (the share monitoring reports)."""
        found: set[str] = set()
        if isinstance(row, PredictionRow):
            text = self._redacted(row.model_name, "prompts", row.text, found)
            flagged = ",".join(sorted(found)) if self._checks(row.model_name, "prompts") else None
            return dataclasses.replace(row, text=text, flagged=flagged)
        if isinstance(row, GenerationRow):
            model = row.model_name
            return dataclasses.replace(
                row,
                prompt=self._redacted(model, "prompts", row.prompt, found),
                messages=self._redacted_chat(model, row.messages, found),
                completion=self._redacted(model, "answers", row.completion, found),
                flagged=",".join(sorted(found)) if self._checks(model, "prompts", "answers") else None,
            )
        if isinstance(row, GenerationFeedbackRow) and row.correction:
            # a correction is an answer a person wrote; feedback rows do not name the model: the default rules
            return dataclasses.replace(row, correction=self._redacted("", "answers", row.correction))
        return row
