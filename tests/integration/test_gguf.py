"""GGUF candidates: a tiny trained Llama (and GPT-2) converted by llama.cpp's own converter (with the packaged
WordPiece vocabulary), quantized by its own quantizer, and run in-process by llama.cpp with the same prompts,
token ids and decoding rules as torch.

Needs the llama.cpp that `make install` builds (scripts/build-llama-cpp.sh); the tests fail, not skip, without
it: `make test` builds it first.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llmops.config import load_config
from llmops.generation.candidate import GenerationParams, Generator
from llmops.generation.evaluate import agreement
from llmops.generation.llamacpp import LlamaCppGenerator
from llmops.generation.loading import load_generator
from llmops.generation.modeling import load_tokenizer
from llmops.gguf import GGUF_FILE, llama_cpp_dir, save_gguf
from tests.integration.trained_decoders import GPT2, LLM_TINY, QWEN2, trained

CHECK = Path(__file__).resolve().parents[2] / "scripts" / "check-llama-cpp.py"
"""The build's check: a tiny Llama decoded through a llama.cpp just built (scripts/build-llama-cpp.sh runs it)."""


@pytest.fixture(scope="module")
def q8(llama: tuple[Path, object], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_gguf(llama[0], "gguf-q8_0", tmp_path_factory.mktemp("q8") / "candidate")


def test_a_q8_0_candidate_records_its_recipe_and_loads_on_llama_cpp(q8: Path) -> None:
    meta = json.loads((q8 / "candidate.json").read_text())
    assert meta["kind"] == "gguf-q8_0" and meta["task"] == "causal-lm"
    recipe = meta["recipe"]["quantization"]
    assert recipe["runtime"] == "llama.cpp" and recipe["quant_type"] == "Q8_0" and recipe["llama_cpp_python"]
    assert (q8 / GGUF_FILE).stat().st_size > 0 and not list(q8.glob("*.safetensors"))
    assert isinstance(load_generator(q8), LlamaCppGenerator)


def test_greedy_answers_of_the_f16_gguf_are_the_torch_model_s(llama: tuple[Path, object], tmp_path: Path) -> None:
    f16 = load_generator(save_gguf(llama[0], "gguf-f16", tmp_path / "f16"))
    torch_model = Generator(llama[0])
    prompts = ["write a positive tweet about coachella", "write a negative tweet about united airlines"]
    params = GenerationParams(max_new_tokens=12, temperature=0.0)
    ours = [g.text for g in torch_model.generate(prompts, params)]
    assert [g.text for g in f16.generate(prompts, params)] == ours
    assert all(ours)  # a trained model writes something


def test_q8_0_agrees_with_its_fp32_source_and_q4_k_m_stays_close(
    llama: tuple[Path, object], q8: Path, held_out: tuple[list, list[str]], tmp_path: Path
) -> None:
    prompts, completions = held_out
    fp32 = Generator(llama[0])
    q8_agreement = agreement(fp32, load_generator(q8), prompts, completions)
    q4 = load_generator(save_gguf(llama[0], "gguf-q4_k_m", tmp_path / "q4"))
    q4_agreement = agreement(fp32, q4, prompts, completions)
    assert q8_agreement["positions"] > 100
    assert q8_agreement["top1_agreement"] >= 0.99 and q8_agreement["mean_kl"] < 0.01, q8_agreement
    assert q4_agreement["top1_agreement"] >= 0.8, q4_agreement  # a 64-wide model quantizes worse than a real one
    assert q4_agreement["mean_kl"] > q8_agreement["mean_kl"]  # fewer bits, further from the source
    nll, tokens = fp32.completion_nll(prompts, completions)
    q8_nll, q8_tokens = load_generator(q8).completion_nll(prompts, completions)
    assert q8_tokens == tokens and math.exp(q8_nll / tokens) == pytest.approx(math.exp(nll / tokens), rel=0.02)


def test_a_gpt2_converts_too(tmp_path: Path) -> None:
    teacher, _ = trained(tmp_path, GPT2, "train.epochs=1", "data.sample=100")
    q8 = load_generator(save_gguf(teacher, "gguf-q8_0", tmp_path / "q8"))
    answers = q8.generate(["write a positive tweet about coachella"], GenerationParams(max_new_tokens=6))
    assert answers[0].completion_tokens >= 1


def test_a_qwen2_keeps_the_packaged_vocabulary_through_its_folders_and_converts(tmp_path: Path) -> None:
    """transformers 5 loads a Qwen2 folder's tokenizer as Qwen2's own byte-level BPE whatever the folder declares:
    the packaged WordPiece vocabulary then spells every word letter by letter (found at the 0.5B shape, where the
    converter then failed). Every folder llmops writes reloads with the tokenizer it was trained with."""
    teacher, _ = trained(tmp_path, QWEN2, "train.epochs=1", "data.sample=100")
    text = "write a positive tweet about coachella"
    packaged = load_tokenizer(load_config(LLM_TINY).model).tokenize(text)
    assert packaged[:3] == ["write", "a", "positive"]  # word pieces, not letters
    assert Generator(teacher).tokenizer.tokenize(text) == packaged
    q8 = load_generator(save_gguf(teacher, "gguf-q8_0", tmp_path / "q8"))
    answers = q8.generate([text], GenerationParams(max_new_tokens=6))
    assert answers[0].completion_tokens >= 1


def test_running_steps_and_joining_prompts_share_one_batch_and_give_what_they_give_apart(q8: Path) -> None:
    """The serving engine feeds llama.cpp the running sequences' next tokens and the joining prompts in one
    `llama_decode`, as llama-server fills its slots' batch: each row gets the logits it gets on its own."""
    runtime = load_generator(q8)
    first, second = (runtime.encode(p) for p in ("write a positive tweet about coachella", "classify: great crew"))
    apart = runtime.running_batch(4)
    logits, _ = apart.admit([first])
    token = int(logits[0].argmax())
    stepped, (joined, _) = apart.step([token]), apart.admit([second])
    together = runtime.running_batch(4)
    together.admit([first])
    both, _ = together.step_and_admit([token], [second])
    assert both.shape[0] == 2
    for ours, theirs in ((both[0], stepped[0]), (both[1], joined[0])):
        assert int(ours.argmax()) == int(theirs.argmax()) and torch.allclose(ours, theirs, atol=1e-3)
    after = together.step([int(both[0].argmax()), int(both[1].argmax())])  # both rows go on from there
    assert torch.allclose(after, apart.step([int(stepped[0].argmax()), int(joined[0].argmax())]), atol=1e-3)


def test_a_prompt_that_starts_as_a_finished_one_reuses_its_cache_and_answers_as_it_would_afresh(q8: Path) -> None:
    """A slot keeps its cache after its sequence leaves, as llama-server's do: the next prompt goes to the free
    slot sharing the longest prefix with it and computes only the rest (a chat's next turn, a repeated
    question); what it writes is what a fresh slot writes."""
    runtime = load_generator(q8)
    asked, again, other = (
        runtime.encode(p)
        for p in (
            "write a positive tweet about coachella",
            "write a positive tweet about the crew",
            "classify the mood of this tweet: the crew at the festival was great fun",
        )
    )

    def common(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

    def greedy(batch: object, ids: list[int], steps: int = 8) -> list[int]:
        logits, _ = batch.admit([ids])  # type: ignore[attr-defined]
        written = [int(logits[0].argmax())]
        for _ in range(steps - 1):
            written.append(int(batch.step(written[-1:])[0].argmax()))  # type: ignore[attr-defined]
        batch.keep([])  # type: ignore[attr-defined]
        return written

    slots = runtime.running_batch(2)
    first = greedy(slots, asked)
    other_answer = greedy(slots, other)  # the other slot: a start token in common is not worth evicting for
    assert slots.reused == 0 and common(asked, other) <= 1
    assert greedy(slots, asked) == first  # its own slot again: all but its last token from the cache
    reused = len(asked) - 1
    assert slots.reused == reused
    assert greedy(slots, again) == greedy(runtime.running_batch(2), again)  # the shared start reused, no more
    reused += common(asked, again)
    assert slots.reused == reused and common(asked, again) > 3
    assert greedy(slots, other) == other_answer  # its own slot, untouched by the others
    assert slots.reused == reused + len(other) - 1


def test_a_cache_its_slot_gave_up_is_saved_to_host_memory_and_restored_for_the_same_prompt(q8: Path) -> None:
    """As llama-server's `--cache-ram`: one slot, two prompts in turn; each comes back to its own saved cache."""
    runtime = load_generator(q8)
    asked, other = (runtime.encode(p) for p in ("write a positive tweet about coachella", "classify: the crew"))
    fresh = runtime.running_batch(1)
    answers = []
    for ids in (asked, other, asked, other):
        logits, _ = fresh.admit([ids])
        written = [int(logits[0].argmax())]
        for _ in range(5):
            written.append(int(fresh.step(written[-1:])[0].argmax()))
        fresh.keep([])
        answers.append(written)
    assert answers[0] == answers[2] and answers[1] == answers[3]
    start = 1  # the start token the prompts share: the second one keeps it from the slot
    assert asked[:start] == other[:start] and asked[start] != other[start]
    assert fresh.reused == start + len(asked) - 1 + len(other) - 1  # the second time round, from host memory
    assert len(fresh.saved) == 2 and fresh.saved.bytes > 0  # each cache as it was when its slot was taken


def test_a_joining_sequence_takes_the_free_slot_beside_the_running_ones(q8: Path) -> None:
    """llama.cpp computes a batch over per-sequence caches as one pass over the weights per run of consecutive
    sequence ids: a sequence that joins fills the gap a finished one left, so the running ones stay one run."""
    runtime = load_generator(q8)
    slots = runtime.running_batch(8)
    prompts = [runtime.encode(p) for p in ("great crew", "the music was loud", "coachella", "the lineup")]
    for ids in prompts[:3]:
        slots.admit([ids])
    slots.keep([0, 2])  # the middle one finishes
    logits, _ = slots.admit([prompts[3]])
    running = sorted(slots._seqs)
    assert running == list(range(running[0], running[0] + 3))  # one run of ids: one pass a step
    fresh = runtime.running_batch(8)
    alone, _ = fresh.admit([prompts[3]])
    assert int(logits[0].argmax()) == int(alone[0].argmax())


def test_serving_s_prompt_embeddings_are_the_torch_model_s_and_logging_them_changes_no_logits(
    llama: tuple[Path, object], tmp_path: Path
) -> None:
    """Serving logs each prompt's embedding (the output layer's input at its last token) from a llama.cpp context
    that returns embeddings: a prompt joining a running step gets the logits it gets without them, and its
    embedding is the torch model's (an f16 file: no quantization between them). A long enough prompt is fed in two
    (all but its last token with embeddings off, then its last token with the step, `SPLIT_FACTOR`): the same
    logits and embedding as fed whole, where llama.cpp would run the output layer over every prompt token."""
    f16 = load_generator(save_gguf(llama[0], "gguf-f16", tmp_path / "f16"))
    source = Generator(llama[0])
    prompts = [
        "write a positive tweet about coachella",
        "classify: the crew at the festival was great fun, and the music went on loud until the morning",
    ]
    first, second = (f16.encode(p) for p in prompts)
    logged, plain = f16.running_batch(4, embeddings=True), f16.running_batch(4)
    token = int(logged.admit([first])[0][0].argmax())
    assert token == int(plain.admit([first])[0][0].argmax())
    assert logged.split_from < len(second) - 1  # a tiny model: its prompts are fed apart
    whole = f16.running_batch(4, embeddings=True)
    whole.split_from = math.inf
    whole.admit([first])
    both, embedding = logged.step_and_admit([token], [second])
    assert torch.equal(both, plain.step_and_admit([token], [second])[0])
    together, whole_embedding = whole.step_and_admit([token], [second])
    assert torch.allclose(both, together, atol=1e-3) and whole_embedding is not None
    assert np.allclose(embedding, whole_embedding, atol=1e-4)
    assert embedding is not None and embedding.shape == (1, source.model.config.hidden_size)
    theirs = source.prompt_embeddings([prompts[1]])
    assert np.allclose(embedding, theirs, atol=2e-2 * float(np.abs(theirs).max()))
    assert np.allclose(
        f16.prompt_embeddings(prompts), source.prompt_embeddings(prompts), atol=2e-2 * float(np.abs(theirs).max())
    )


def test_the_build_check_fails_make_install_with_a_clear_message_when_llama_cpp_crashes(tmp_path: Path) -> None:
    """scripts/check-llama-cpp.py, which the build script runs after each build, on a llama.cpp whose bindings die
    of SIGSEGV when loaded (as the AMX kernels made every decode die on Intel Xeons): exit 1, naming the signal."""
    built = llama_cpp_dir()
    crashing = tmp_path / "llama.cpp"
    crashing.mkdir()
    for part in ("build", "src", ".built"):
        (crashing / part).symlink_to(built / part)
    bindings = crashing / "python" / "llama_cpp"
    shutil.copytree(built / "python" / "llama_cpp", bindings)
    init = bindings / "__init__.py"
    init.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n" + init.read_text())
    env = os.environ | {"LLMOPS_LLAMA_CPP": str(crashing)}
    done = subprocess.run([sys.executable, str(CHECK)], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert "died of SIGSEGV" in done.stderr and "GGML_NATIVE=OFF" in done.stderr
