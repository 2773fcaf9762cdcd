"""The PII and secret guards, offline: each kind found and redacted by its name, what tweets hold left alone, and
the shipped evaluation set's recall and precision."""

from __future__ import annotations

import re

import pytest
from detect_secrets.plugins.ibm_cloud_iam import IbmCloudIamDetector

from bench.guards import evaluate, load
from llmops.guards import (
    NO_WORD_BEFORE,
    PREFILTER_MAX_CHARS,
    WORD_START,
    Guard,
    _detect_secrets_patterns,
    re2_superset,
)


@pytest.fixture(scope="module")
def guard() -> Guard:
    return Guard().warm()


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("mail jane.doe@example.com today", "mail <EMAIL_ADDRESS> today"),
        ("call +44 7400 123456 or (415) 555-2671", "call <PHONE_NUMBER> or <PHONE_NUMBER>"),
        ("card 4111 1111 1111 1111 exp 04/29", "card <CREDIT_CARD> exp 04/29"),
        ("iban DE89 3704 0044 0532 0130 00 thanks", "iban <IBAN_CODE> thanks"),
        ("key AKIAIOSFODNN7EXAMPLE and -----BEGIN RSA PRIVATE KEY-----", "key <CREDENTIAL> and <CREDENTIAL>"),
        ("@united flight 1234 #coachella2015 https://t.co/abc $1,299.99", None),  # nothing to redact
        ("card 4111 1111 1111 1112 is not Luhn-valid", None),
    ],
)
def test_each_kind_is_redacted_by_its_name_and_tweets_are_left_alone(
    guard: Guard, text: str, redacted: str | None
) -> None:
    assert guard.redact(text) == (text if redacted is None else redacted)


def test_the_shipped_evaluation_set_meets_recall_and_precision(guard: Guard) -> None:
    result = evaluate(guard, load(), repeats=0)
    assert result["rows"] == 800
    assert result["recall_all"] >= 0.95 and result["precision_all"] >= 0.95, result
    assert min(result["recall"].values()) >= 0.9, result["recall"]


def test_the_keyword_patterns_opened_more_cheaply_find_what_detect_secrets_finds() -> None:
    patterns = _detect_secrets_patterns()
    ours = [p for p in patterns if p.pattern.startswith(NO_WORD_BEFORE)]
    originals = [re.compile(WORD_START + p.pattern[len(NO_WORD_BEFORE) :], p.flags) for p in ours]
    assert len(ours) == 5 and not any(p.pattern.startswith(WORD_START) for p in patterns)
    assert {p.pattern for p in originals} >= {p.pattern for p in IbmCloudIamDetector().denylist}  # as shipped
    key, hexes = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGH", "0123456789abcdef" * 4
    texts = [row["text"] for row in load()] + [
        f"ibm_cloud_api_key: '{key}'", f"x=1\ncloudant_password = '{key[:24]}'", f"mycloudant_password='{key[:24]}'",
        f"(sl_api_key={hexes})", f'"cos_secret_access_key": "{hexes[:48]}"',
    ]  # fmt: skip
    found = [[m.span() for p in ours for m in p.finditer(t)] for t in texts]
    assert found == [[m.span() for p in originals for m in p.finditer(t)] for t in texts]
    assert [bool(spans) for spans in found[-5:]] == [True, True, False, True, True]  # a word before: not a key name


EVERY_CHARACTER = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)


@pytest.mark.parametrize(
    ("pattern", "flags"),
    [
        *[(pattern, 0) for pattern in (r"\w", r"\d", r"\s", r"[^\w]", r"[^\d]", r"[^\s]", "[^a]", ".")],
        *[(pattern, re.I) for pattern in ("[a-z]", "i", "[^i]", r"[^\w]")],
    ],
)
def test_re2_reads_a_translated_class_at_least_as_widely_as_python_on_every_character(pattern: str, flags: int) -> None:
    import re2

    matched = re.sub(f"(?!(?-s:{pattern})).", "", EVERY_CHARACTER, flags=re.S | flags)  # what Python matches
    assert matched and re2.fullmatch(f"(?:{re2_superset(re.compile(pattern, flags))})*", matched) is not None


def test_the_credential_prefilter_passes_every_text_a_pattern_matches(guard: Guard) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    prefilter = guard._credentials
    assert prefilter.always == []  # RE2 takes every pattern detect-secrets ships today

    def check(pattern: re.Pattern[str]) -> None:
        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(st.from_regex(pattern))  # texts holding a match, Unicode around and inside it
        def passed(text: str) -> None:
            assert pattern.pattern in {p.pattern for p in prefilter.candidates(text)}

        passed()

    for pattern in _detect_secrets_patterns():
        check(pattern)
    # the evaluation set, and a key at the end of a text too long for the prefilter: as without it
    texts = [row["text"] for row in load()] + ["x" * PREFILTER_MAX_CHARS + " AKIAIOSFODNN7EXAMPLE"]
    every = _detect_secrets_patterns()
    for text in texts:
        spans = sorted(m.span() for p in prefilter.candidates(text) for m in p.finditer(text))
        assert spans == sorted(m.span() for p in every for m in p.finditer(text))
    assert guard.redact(texts[-1]).endswith(" <CREDENTIAL>")
