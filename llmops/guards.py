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

What decides the cost is how little of that runs on an ordinary text. Google's RE2 (`google-re2`) reads each
text once against all the credential patterns together (`CredentialPrefilter`: each pattern translated to a
looser RE2 one, so a text RE2 passes over holds no match), and only the patterns RE2 flags run in Python's `re`,
which decides; phone numbers are looked for only where the phone library's own candidate pattern finds a run of
seven digits or more. A packaged tweet costs about 10 us instead of 58 (bench/results/guards.md).

A `Guard` finds spans and redacts them as `<EMAIL_ADDRESS>`, `<PHONE_NUMBER>`, `<CREDIT_CARD>`, `<IBAN_CODE>`,
`<CREDENTIAL>`. `serving` decides, per model and direction, whether a finding is redacted in the prediction log
(`redact`, the default), refuses the request (`block`), or is let through (`allow`).
"""

from __future__ import annotations

import re
import re._constants as _c
import re._parser as _parser
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


class Untranslatable(ValueError):
    """A construct `re2_superset` does not translate (back-references, atomic groups, scoped flags): the pattern
    then runs on every text."""


# What Python's classes match, widened (outside a negated class) or narrowed (inside one) to RE2's, so that RE2
# matches wherever `re` does. Checked over every code point by tests/unit/test_guards.py.
_WIDE = {
    _c.CATEGORY_DIGIT: r"\p{Nd}",
    _c.CATEGORY_WORD: r"\p{L}\p{N}_",
    _c.CATEGORY_SPACE: r"\t-\r\x{1c}-\x{20}\x{85}\p{Z}",
}
_NARROW = {_c.CATEGORY_DIGIT: "0-9", _c.CATEGORY_WORD: "0-9A-Za-z_", _c.CATEGORY_SPACE: r"\t-\r\x{20}"}
_DOTTED_I = r"\x{130}\x{131}"
"""İ and ı: Python's IGNORECASE matches them to i and I, RE2's does not."""
RE2_MAX_REPEAT = 1000
RE2_MEMORY = 64 << 20
PREFILTER_MAX_CHARS = 8192
"""Longer texts skip the prefilter: RE2's set gives up without saying so (no match) when its automaton outgrows
`RE2_MEMORY`, which these patterns do not come near at this length."""


def re2_superset(pattern: re.Pattern[str]) -> str:
    """An RE2 pattern that matches somewhere in every text where `pattern` does: looser where RE2 cannot say the
    same (look-arounds and anchors dropped, repeats over RE2's limit left open), wider where the two read a class
    differently. Raises `Untranslatable`."""
    ignore_case = bool(pattern.flags & re.IGNORECASE)

    def char(code: int) -> str:
        return chr(code) if chr(code).isascii() and chr(code).isalnum() else f"\\x{{{code:x}}}"

    def dotted(low: int, high: int) -> str:
        cased = ignore_case and any(low <= ord(c) <= high for c in "iI")
        return _DOTTED_I if cased else ""

    def klass(items: list[Any]) -> str:
        negated = bool(items) and items[0][0] is _c.NEGATE
        parts = []
        for op, arg in items[negated:]:
            if op is _c.LITERAL:
                parts.append(char(arg) + ("" if negated else dotted(arg, arg)))
            elif op is _c.RANGE:
                parts.append(f"{char(arg[0])}-{char(arg[1])}" + ("" if negated else dotted(*arg)))
            elif op is _c.CATEGORY and arg in (_NARROW if negated else _WIDE):
                parts.append((_NARROW if negated else _WIDE)[arg])
            else:
                raise Untranslatable(f"{op} {arg} in a class")
        return f"[{'^' if negated else ''}{''.join(parts)}]"

    def seq(items: Any) -> str:
        out = []
        for op, arg in items:
            if op is _c.LITERAL:
                out.append(f"[{char(arg)}{_DOTTED_I}]" if dotted(arg, arg) else char(arg))
            elif op is _c.NOT_LITERAL:
                out.append(f"[^{char(arg)}]")
            elif op is _c.ANY:
                out.append(".")
            elif op is _c.IN:
                out.append(klass(arg))
            elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
                low, high, body = arg
                low = min(low, RE2_MAX_REPEAT)
                high = "" if high is _c.MAXREPEAT or high > RE2_MAX_REPEAT else high
                out.append(f"(?:{seq(body)}){{{low},{high}}}")
            elif op is _c.SUBPATTERN:
                _, add_flags, del_flags, body = arg
                if add_flags or del_flags:
                    raise Untranslatable("scoped flags")
                out.append(f"(?:{seq(body)})")
            elif op is _c.BRANCH:
                out.append("(?:" + "|".join(seq(branch) for branch in arg[1]) + ")")
            elif op in (_c.AT, _c.ASSERT, _c.ASSERT_NOT):
                continue  # dropped: a looser pattern
            else:
                raise Untranslatable(str(op))
        return "".join(out)

    flags = ("i" if ignore_case else "") + ("s" if pattern.flags & re.DOTALL else "")
    return (f"(?{flags})" if flags else "") + seq(_parser.parse(pattern.pattern, pattern.flags))


class CredentialPrefilter:
    """Which credential patterns may match a text, from one RE2 pass over it (`re2_superset` of each); the
    patterns RE2 cannot take are always in."""

    def __init__(self, patterns: list[re.Pattern[str]]):
        import re2

        options = re2.Options()
        options.max_mem = RE2_MEMORY
        self._set = re2.Set.SearchSet(options)
        self._patterns: list[re.Pattern[str]] = []
        """In the order they were added to the set (its indexes)."""
        self.always: list[re.Pattern[str]] = []
        for pattern in patterns:
            try:
                self._set.Add(re2_superset(pattern))
            except Exception:  # Untranslatable, or RE2 refused it: `re` reads every text for it
                self.always.append(pattern)
                continue
            self._patterns.append(pattern)
        self._set.Compile()

    def candidates(self, text: str) -> list[re.Pattern[str]]:
        if len(text) > PREFILTER_MAX_CHARS:
            return self._patterns + self.always
        return [self._patterns[i] for i in self._set.Match(text) or ()] + self.always


DIGIT = re.compile(r"\d")
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

        from phonenumbers.phonenumbermatcher import _PATTERN as phone_candidate  # the matcher's own candidates

        def phone_run(text: str) -> bool:
            return any(len(DIGIT.findall(m.group())) >= 7 for m in phone_candidate.finditer(text))

        cards: Any = CreditCardRecognizer()
        # Presidio's pattern predates Mastercard's 2-series (2221-2720); its Luhn check applies to this one too.
        cards.patterns.append(Pattern("mastercard 2-series", MASTERCARD_2_SERIES, 0.3))
        # Each with what a text must hold for it to find anything (a phone number: a run of seven digits or more
        # that the phone library would read as a candidate): most texts skip the phone matcher, the cost.
        return [
            (OfflineEmail(), lambda text, digits: "@" in text and EMAIL_HINT.search(text) is not None),
            (PhoneRecognizer(supported_regions=PHONE_REGIONS), lambda text, digits: digits >= 7 and phone_run(text)),
            (cards, lambda text, digits: digits >= 12),
            (IbanRecognizer(), lambda text, digits: digits >= 8),
        ]

    @cached_property
    def _credentials(self) -> CredentialPrefilter:
        return CredentialPrefilter(_detect_secrets_patterns())

    def warm(self) -> Guard:
        """Build the recognizers now (a first call would otherwise pay for it)."""
        self.find("warm up: jane@example.com +1 415 555 0132")
        return self

    def find(self, text: str) -> list[Finding]:
        """Every finding, in order; overlapping ones merged into the longest."""
        if not text or not text.strip():
            return []
        digits = len(DIGIT.findall(text))
        found = [
            Finding(result.entity_type, result.start, result.end)
            for recognizer, may_hold in self._recognizers
            if may_hold(text, digits)
            for result in recognizer.analyze(text, recognizer.supported_entities, None)
            if result.score >= MIN_SCORE
        ]
        found += [
            _whole_token(text, m.start(), m.end())
            for pattern in self._credentials.candidates(text)
            for m in pattern.finditer(text)
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
