"""Which offline base should the generative quickstart start from? Three candidates, one budget, one run.

No pretrained causal LM installs here; the packaged all-MiniLM-L6-v2 (a BERT sentence encoder) does. On the
quickstart's tweet instructions, with its fine-tuning settings, this fine-tunes:
1. MiniLM warm-starting a decoder (BERT weights, causal mask, new LM-head transform; Rothe et al. 2020);
2. the same BERT architecture from random weights (what the pretrained weights are worth);
3. a Llama of the same width, depth and feed-forward size, first trained as a plain language model on the
   corpus's tweets (those outside the test and validation splits) for as long as one fine-tuning epoch takes,
   then fine-tuned the same way (a small Llama-architecture base trained on the corpus first).
Each is measured on the same test rows: perplexity, instruction exact match and macro-F1, distinct-2. Results
go to bench/results/base_model.{md,json}.

    python bench/base_model.py
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from machine import machine
from tabulate import tabulate

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
LLAMA = {
    "model_type": "llama",
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "intermediate_size": 1024,  # SwiGLU: 3 x 384 x 1024 = BERT's 2 x 384 x 1536 weights per block
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
}
BERT_RANDOM = {"is_decoder": True}


def pretrain_on_tweets(model: torch.nn.Module, tokenizer, texts: list[str], seconds: float, lr: float) -> int:
    """Plain next-token training on raw tweets for `seconds`; returns the steps taken."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    rng = random.Random(0)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = tokenizer(
            [f"{tokenizer.bos_token}{t}{tokenizer.eos_token}" for t in rng.sample(texts, 32)],
            add_special_tokens=False,
            padding=True,
            truncation=True,
            max_length=64,
            return_tensors="pt",
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
    return steps


def run(config: Path) -> list[dict]:
    from llmops import tasks
    from llmops.candidate_folder import CandidateMeta, save_hf_candidate
    from llmops.checkpoints import count_parameters
    from llmops.config import load_config
    from llmops.generation import train
    from llmops.generation.modeling import load_base_model, load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="llmops-base-"))
    cfg = load_config(config)
    task = tasks.for_config(cfg)
    data = task.prepare_data(cfg.data, work / "data")
    rows = []

    def fine_tune_and_measure(name: str, model_cfg, seconds_before: float = 0.0) -> dict:
        start = time.perf_counter()
        model_dir = train.fine_tune(model_cfg, cfg.train, cfg.task, data, work / name)
        seconds = time.perf_counter() - start
        quality = task.measure_quality(cfg, str(model_dir), str(data.directory), {})
        meta = CandidateMeta.load(model_dir)
        return {"base": name, "train_s": seconds_before + seconds, "params": meta.params, **quality}

    warm = fine_tune_and_measure("minilm-decoder", cfg.model)
    rows.append(warm)
    rows.append(fine_tune_and_measure("bert-random", cfg.model.model_copy(update={"random_init": BERT_RANDOM})))

    # The Llama: pretrained as a plain LM on tweets outside the test and validation splits, then fine-tuned.
    llama_cfg = cfg.model.model_copy(update={"random_init": LLAMA})
    tokenizer = load_tokenizer(llama_cfg)
    torch.manual_seed(cfg.train.seed)
    llama = load_base_model(llama_cfg, cfg.task, tokenizer)
    held = pd.concat([pd.read_parquet(data.split_path(s)) for s in ("test", "validation")])
    from llmops.config import PACKAGED_CORPUS
    from llmops.corpus import clean_frame, read_source

    tweets_cfg = cfg.data.model_copy(update={"source": PACKAGED_CORPUS})
    tweets = clean_frame(read_source(tweets_cfg), tweets_cfg)["text"]
    texts = sorted(set(tweets) - set(held["completion"]))
    budget = warm["train_s"]
    steps = pretrain_on_tweets(llama, tokenizer, texts, budget, lr=1e-3)
    pretrained = work / "llama-pretrained"
    meta = CandidateMeta("base", [], cfg.model.max_length, task=cfg.task, params=count_parameters(llama))
    save_hf_candidate(llama, tokenizer, meta, pretrained)
    from_pretrained = llama_cfg.model_copy(update={"name_or_path": str(pretrained), "random_init": None})
    result = fine_tune_and_measure("llama-pretrained-on-tweets", from_pretrained, budget)
    result["pretraining_steps"] = steps
    rows.append(result)
    return rows


def main() -> None:
    config = REPO / "configs" / "llm-quickstart.yaml"
    rows = run(config)
    report = {"machine": machine(), "config": str(config.relative_to(REPO)), "bases": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "base_model.json").write_text(json.dumps(report, indent=2))
    m = report["machine"]
    table = [
        {
            "base": r["base"],
            "training s": f"{r['train_s']:.0f}",
            "non-emb params": f"{r['params']['params_non_embedding'] / 1e6:.2f}M",
            "perplexity": f"{r['perplexity']:.1f}",
            "exact match": f"{r.get('exact_match', float('nan')):.3f}",
            "macro-F1": f"{r.get('macro_f1', float('nan')):.3f}",
            "distinct-2": f"{r.get('distinct_2', float('nan')):.3f}",
        }
        for r in rows
    ]
    md = [
        "# Offline base model for the generative quickstart",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}"
        + (f", GPU {m['cuda']}" if m["cuda"] else ", no GPU")
        + f". Config: `{report['config']}` (its data and fine-tuning settings for every base).",
        "",
        tabulate(table, headers="keys", tablefmt="github"),
        "",
        "The Llama's training time includes its language-model pretraining on the tweets "
        f"({rows[-1]['pretraining_steps']} steps of 32 tweets, as long as the MiniLM decoder's fine-tuning).",
        "",
    ]
    (RESULTS / "base_model.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
