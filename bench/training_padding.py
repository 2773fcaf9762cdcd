"""Training-step benchmark: a batch of short and long rows scored in length parts against one padded pass.

The quickstart teacher's training step (`configs/llm-quickstart.yaml`: the MiniLM decoder, embeddings frozen,
batches of 16 rows with their target-contrast alternatives, loss per example) on the same random batches of the
packaged instructions, forward and backward, with `score_completions(parts=1)` (one pass as wide as the batch's
longest row) and with the default (`parts=3`: the rows in up to three passes of similar length, the output layer
once). The two take turns batch by batch (the order alternating), three rounds; the median round and the spread.
Also: the positions each computes, and the largest difference of their gradients on one batch (dropout off).

    python bench/training_padding.py     # -> bench/results/training_padding.{md,json}
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import machine
from tabulate import tabulate

from llmops.config import load_config
from llmops.generation.data import prepare_data, tokenize_split
from llmops.generation.losses import (
    completion_loss,
    length_parts,
    of_rows,
    score_completions,
    with_target_contrast,
    without_owners,
)
from llmops.generation.modeling import freeze_embeddings, load_base_model, load_tokenizer
from llmops.generation.train import collator

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
CONFIG = REPO / "configs" / "llm-quickstart.yaml"
BATCHES, ROUNDS, VARIANTS = 24, 3, (1, 3)


def main() -> None:
    torch.set_num_threads(2)
    cfg = load_config(CONFIG)
    tokenizer = load_tokenizer(cfg.model)
    with tempfile.TemporaryDirectory() as scratch:
        data = prepare_data(cfg.data, scratch)
        rows = tokenize_split(data.split_path("train"), tokenizer, cfg.task, cfg.model.max_length, contrast=True)
    torch.manual_seed(0)
    model = load_base_model(cfg.model, cfg.task, tokenizer)
    freeze_embeddings(model)
    pad = collator(tokenizer, model, cfg.task)
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    size = cfg.train.batch_size
    batches = [pad([rows[i] for i in order[k : k + size]]) for k in range(0, size * BATCHES, size)]

    def loss(batch: dict[str, torch.Tensor], parts: int) -> torch.Tensor:
        inputs, owners, n_own = without_owners(batch)
        everything = score_completions(model, inputs, cfg.task, parts=parts)
        own = completion_loss(of_rows(everything, n_own), cfg.train.loss_per)
        return with_target_contrast(own, cfg.train.target_contrast, model, everything, n_own, owners)

    def gradients(parts: int) -> list[torch.Tensor]:
        model.zero_grad()
        loss(batches[0], parts).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.eval()  # dropout off: the two ways give the same gradients
    difference = max(float((a - b).abs().max()) for a, b in zip(gradients(1), gradients(3), strict=True))
    model.train()

    def computed(batch: dict[str, torch.Tensor], parts: int) -> int:
        return sum(len(r) * width for r, width in length_parts(without_owners(batch)[0], cfg.task, model, parts))

    positions = {parts: sum(computed(b, parts) for b in batches) for parts in VARIANTS}
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    rounds: list[dict[int, float]] = []
    for round_ in range(ROUNDS):
        spent = dict.fromkeys(VARIANTS, 0.0)
        for i, batch in enumerate(batches):
            for parts in VARIANTS if (i + round_) % 2 == 0 else VARIANTS[::-1]:
                start = time.perf_counter()
                model.zero_grad()
                loss(batch, parts).backward()
                spent[parts] += time.perf_counter() - start
        rounds.append({parts: spent[parts] / len(batches) * 1000 for parts in VARIANTS})
        print(f"round {round_ + 1}: " + ", ".join(f"parts={p} {ms:.0f} ms a step" for p, ms in rounds[-1].items()))

    ratios = [r[3] / r[1] for r in rounds]
    result = {
        "machine": machine(),
        "batches": BATCHES,
        "batch_size": size,
        "rounds": rounds,
        "step_ms": {str(p): statistics.median(r[p] for r in rounds) for p in VARIANTS},
        "ratio_median": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "positions": {str(p): positions[p] for p in VARIANTS},
        "real_positions": real,
        "max_gradient_difference": difference,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "training_padding.json").write_text(json.dumps(result, indent=2))
    table = [
        [
            "one pass (parts=1)" if parts == 1 else "length parts (parts=3, the default)",
            f"{positions[parts]} ({positions[parts] / real:.2f}x)",
            f"{result['step_ms'][str(parts)]:.0f} ({min(r[parts] for r in rounds):.0f}-"
            f"{max(r[parts] for r in rounds):.0f})",
        ]
        for parts in VARIANTS
    ]
    lines = [
        "# Training step: length parts against one padded pass",
        "",
        f"Machine: {result['machine']}. The quickstart teacher's step (`{CONFIG.relative_to(REPO)}`: MiniLM "
        f"decoder, embeddings frozen, {size} rows a batch with their target-contrast alternatives), forward and "
        f"backward, on the same {BATCHES} batches of the packaged instructions; the two ways take turns batch by "
        f"batch, {ROUNDS} rounds; median round (lowest-highest).",
        "",
        tabulate(table, headers=["scoring", "positions computed (x real tokens)", "ms a step"], tablefmt="github"),
        "",
        f"Length parts take {result['ratio_median']:.3f}x the one pass's time a step (rounds "
        f"{min(ratios):.3f}-{max(ratios):.3f}); {real} real tokens. The largest difference of the two ways' "
        f"gradients on one batch, dropout off: {difference:.1e}.",
        "",
    ]
    (RESULTS / "training_padding.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
