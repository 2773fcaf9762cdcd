"""Guards for personal data and secrets in what the served models read and write, offline.

Finding them is two maintained libraries' work, with nothing to download:

- Presidio's pattern recognizers (`presidio-analyzer`, no NLP engine): e-mail addresses, phone numbers
  (Google's `phonenumbers`, for the regions of `PHONE_REGIONS`), credit card numbers (Luhn-checked) and IBANs
  (checksum-checked). The e-mail recognizer checks the domain against the public-suffix list bundled with
  `tldextract`, never fetched (Presidio's own check would fetch it).
- detect-secrets' credential patterns (Yelp's `detect-secrets`: the regex detectors for AWS, GitHub, GitLab,
  Slack, Stripe, OpenAI, npm, PyPI, SendGrid, Twilio, Azure storage, JWTs, private key blocks, ...), plus the
  two it lacks: Google API keys and this product's own `llmops-` keys. Its entropy heuristics are left out: on
  prose they flag every other word.

A `Guard` finds spans and redacts them as `<EMAIL_ADDRESS>`, `<PHONE_NUMBER>`, `<CREDIT_CARD>`, `<IBAN_CODE>`,
`<CREDENTIAL>`. `serving` decides, per model and direction, whether a finding is redacted in the prediction log
(`redact`, the default), refuses the request (`block`), or is let through (`allow`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "CREDENTIAL")
PHONE_REGIONS = ("US", "GB", "DE", "FR", "IN", "CA", "BR", "IL", "IT", "ES", "NL", "AU")
"""Where a phone number without a country code is read from (Presidio's default list, with more of Europe)."""
MIN_SCORE = 0.4
"""Presidio's score of a bare phone number: every recognizer's match counts (context would only raise it)."""
EXTRA_CREDENTIALS = (
    r"AIza[0-9A-Za-z_\-]{35}",  # Google API keys
    r"llmops-[A-Za-z0-9_\-]{32}",  # this product's own keys (llmops.gateway)
)


MASTERCARD_2_SERIES = r"\b2(?:2[2-9]\d|[3-6]\d\d|7[01]\d|720)[- ]?\d{4}[- ]?\d{4}[- ]?\d{4}\b"
PRIORITY = ("CREDENTIAL", "IBAN_CODE", "CREDIT_CARD", "EMAIL_ADDRESS", "PHONE_NUMBER")
"""Where findings overlap, the entity named: the checked kinds (an IBAN's checksum, a Luhn-valid card: digits
inside an IBAN may pass Luhn by chance) before a phone number, which many digit runs can be."""


@dataclass(frozen=True)
class Finding:
    entity: str
    start: int
    end: int


def _detect_secrets_patterns() -> list[re.Pattern[str]]:
    import importlib
    import inspect
    import pkgutil

    import detect_secrets.plugins as plugins
    from detect_secrets.plugins.base import RegexBasedDetector

    skipped = {"IPPublicDetector"}  # an IP address is not a secret
    patterns: list[re.Pattern[str]] = []
    for module_info in pkgutil.iter_modules(plugins.__path__):
        module = importlib.import_module(f"{plugins.__name__}.{module_info.name}")
        for name, detector in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(detector, RegexBasedDetector)
                and detector is not RegexBasedDetector
                and detector.__module__ == module.__name__
                and name not in skipped
            ):
                patterns += [_cheaper(pattern) for pattern in detector().denylist]
    return patterns + [re.compile(p) for p in EXTRA_CREDENTIALS]


WORD_START = r"(?:(?<=\W)|(?<=^))"
"""How five of detect-secrets' keyword patterns open (IBM Cloud, Cloudant, IBM COS, SoftLayer)."""
NO_WORD_BEFORE = r"(?<!\w)"
"""How they open here (`_cheaper`)."""


def _cheaper(pattern: re.Pattern[str]) -> re.Pattern[str]:
    """`pattern`, opening with `NO_WORD_BEFORE` where it opens with `WORD_START`: the same places (no word character
    before; `^` is the text's start, the patterns not being MULTILINE), found in about two thirds of the time (a
    look-behind alternation first keeps `re` from skipping ahead; these five were a third of the guards' cost)."""
    if not pattern.pattern.startswith(WORD_START) or pattern.flags & re.MULTILINE:
        return pattern
    return re.compile(NO_WORD_BEFORE + pattern.pattern[len(WORD_START) :], pattern.flags)


EMAIL_HINT = re.compile(r"[^\s@]@\w+(?:-+\w+)*\.\w")
"""What every match of Presidio's e-mail pattern holds (a mention, `@name`, does not): the texts it is run on."""


class Guard:
    """Finds and redacts personal data and credentials in text. Thread-safe; build one per process."""

    @cached_property
    def _recognizers(self) -> list[tuple[Any, Callable[[str, int], bool]]]:
        import tldextract
        from presidio_analyzer import Pattern
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            EmailRecognizer,
            IbanRecognizer,
            PhoneRecognizer,
        )

        offline = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)  # the bundled snapshot, no fetch

        class OfflineEmail(EmailRecognizer):  # type: ignore[misc]
            def validate_result(self, pattern_text: str) -> bool:
                return offline(pattern_text).fqdn != ""

        cards: Any = CreditCardRecognizer()
        # Presidio's pattern predates Mastercard's 2-series (2221-2720); its Luhn check applies to this one too.
        cards.patterns.append(Pattern("mastercard 2-series", MASTERCARD_2_SERIES, 0.3))
        # Each with what a text must hold for it to find anything: most texts skip the phone matcher, the cost.
        return [
            (OfflineEmail(), lambda text, digits: "@" in text and EMAIL_HINT.search(text) is not None),
            (PhoneRecognizer(supported_regions=PHONE_REGIONS), lambda text, digits: digits >= 7),
            (cards, lambda text, digits: digits >= 12),
            (IbanRecognizer(), lambda text, digits: digits >= 8),
        ]

    @cached_property
    def _credentials(self) -> list[re.Pattern[str]]:
        return _detect_secrets_patterns()

    def warm(self) -> Guard:
        """Build the recognizers now (a first call would otherwise pay for it)."""
        self.find("warm up: jane@example.com +1 415 555 0132")
        return self

    def find(self, text: str) -> list[Finding]:
        """Every finding, in order; overlapping ones merged into the longest."""
        if not text or not text.strip():
            return []
        digits = sum(c.isdigit() for c in text)
        found = [
            Finding(result.entity_type, result.start, result.end)
            for recognizer, may_hold in self._recognizers
            if may_hold(text, digits)
            for result in recognizer.analyze(text, recognizer.supported_entities, None)
            if result.score >= MIN_SCORE
        ]
        found += [
            _whole_token(text, m.start(), m.end()) for pattern in self._credentials for m in pattern.finditer(text)
        ]
        return _merged(found)

    def redact(self, text: str, findings: Iterable[Finding] | None = None) -> str:
        """`text` with each finding replaced by `<ENTITY>`."""
        spans = list(self.find(text) if findings is None else findings)
        for finding in reversed(spans):
            text = text[: finding.start] + f"<{finding.entity}>" + text[finding.end :]
        return text


def _whole_token(text: str, start: int, end: int) -> Finding:
    """A credential pattern's match widened to the run of non-space characters around it: detect-secrets' patterns
    match a key's telling part (`BEGIN RSA PRIVATE KEY` of its armour line, a JWT's header), the redaction takes
    the whole token."""
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    while end < len(text) and not text[end].isspace():
        end += 1
    return Finding("CREDENTIAL", start, end)


def _merged(found: list[Finding]) -> list[Finding]:
    """Overlapping findings as one: their union, named by the entity first in `PRIORITY`."""
    out: list[Finding] = []
    for finding in sorted(found, key=lambda f: f.start):
        if out and finding.start < out[-1].end:
            previous = out[-1]
            entity = min(previous.entity, finding.entity, key=PRIORITY.index)
            out[-1] = Finding(entity, previous.start, max(previous.end, finding.end))
            continue
        out.append(finding)
    return out
