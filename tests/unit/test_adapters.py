"""LoRA adapters applied per row over one base: each row computes what peft computes for its adapter alone, rows of
different adapters share one pass, and an adapter that does not fit the base is refused with the layer named."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import peft
import pytest
import torch

from llmops.generation.adapters import AdapterError, LoraWeights
from llmops.generation.candidate import GenerationParams, Generator
from llmops.generation.decode import Running
from serving.engine import GenerationEngine, Sequence
from tests.tiny_registry import build_tiny_generator, random_lora


def save_adapter(base_dir: Path, out: Path, seed: int, r: int, targets: list[str], rslora: bool = False) -> Path:
    """A peft LoRA adapter over the base with random (non-zero) factors, saved as peft saves it."""
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, use_rslora=rslora, lora_dropout=0.0)
    random_lora(Generator(base_dir).model, config, seed).save_pretrained(out)
    return out


def peft_logits(base_dir: Path, adapter: Path, ids: list[int]) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(Generator(base_dir).model, adapter).eval()
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    base = build_tiny_generator(root / "base", seed=5)
    first = save_adapter(base, root / "first", seed=1, r=4, targets=["q_proj", "v_proj"])
    second = save_adapter(base, root / "second", seed=2, r=8, targets=["q_proj", "o_proj", "down_proj"], rslora=True)
    return base, first, second


def test_rows_of_different_adapters_in_one_batch_compute_what_peft_computes_for_each(setup) -> None:
    base, first, second = setup
    generator = Generator(base)
    adapters = generator.adapters
    assert adapters is not None
    adapters.attach(LoraWeights.load(first, "first/1"))
    adapters.attach(LoraWeights.load(second, "second/1"))
    prompts = [generator.encode(p) for p in ["write a tweet", "classify: lost my bag again", "hi", "write"]]
    keys = ["first/1", "second/1", None, "first/1"]
    running = Running(generator.model, generator.pad_id, generator.device, adapters=adapters)
    logits, _ = running.admit(prompts, keys)
    with torch.inference_mode():
        plain = [generator.model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts]
    expected = [peft_logits(base, first, prompts[0]), peft_logits(base, second, prompts[1]), plain[2]]
    expected.append(peft_logits(base, first, prompts[3]))
    for row, want in enumerate(expected):
        torch.testing.assert_close(logits[row], want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected[0], plain[0], atol=1e-2), "the adapter changes nothing: the test proves nothing"

    # a step keeps each row with its adapter after another row leaves
    running.keep([1, 2, 3])
    token = 2023
    stepped = running.step([token, token, token])
    with torch.inference_mode():
        alone = Running(generator.model, generator.pad_id, generator.device, adapters=adapters)
        alone.admit([prompts[1]], ["second/1"])
        torch.testing.assert_close(stepped[0], alone.step([token])[0], atol=1e-4, rtol=1e-4)


def test_sequences_of_two_adapters_write_what_each_writes_alone(setup) -> None:
    base, first, second = setup
    generator = Generator(base)
    assert generator.adapters is not None
    generator.adapters.attach(LoraWeights.load(first, "a"))
    generator.adapters.attach(LoraWeights.load(second, "b"))
    prompts = [generator.encode(p) for p in ["write a tweet about rain", "hi there", "classify: great day"]]
    params = GenerationParams(max_new_tokens=12, min_new_tokens=12)

    def decode(rows: list[list[int]], keys: list[str | None]) -> list[list[int]]:
        batch = generator.running_batch(4)
        logits, _ = batch.admit(rows, keys)
        written: list[list[int]] = [[] for _ in rows]
        for _ in range(params.max_new_tokens):
            tokens = generator.barred.forbid_always(logits).argmax(dim=1).tolist()
            for row, token in enumerate(tokens):
                written[row].append(token)
            logits = batch.step(tokens)
        return written

    together = decode(prompts, ["a", "b", None])
    alone = [decode([p], [k])[0] for p, k in zip(prompts, ["a", "b", None], strict=True)]
    assert together == alone
    assert len({tuple(w) for w in decode([prompts[0]] * 3, ["a", "b", None])}) == 3, "adapters wrote the same"


def test_detach_frees_the_slot_and_an_unattached_adapter_is_refused(setup) -> None:
    base, first, second = setup
    adapters = Generator(base).adapters
    assert adapters is not None
    adapters.attach(LoraWeights.load(first, "a"))
    adapters.attach(LoraWeights.load(second, "b"))
    adapters.detach("a")
    assert adapters.keys == {"b"}
    with pytest.raises(AdapterError, match="adapter a is not attached"):
        adapters.routing(["a", None])
    adapters.attach(LoraWeights.load(first, "c"))
    assert (adapters.slot("c"), adapters.slot("b")) == (1, 2)  # the freed slot is reused


def test_an_adapter_of_another_base_is_refused_naming_the_layer(setup, tmp_path: Path) -> None:
    base, first, _ = setup
    weights = LoraWeights.load(first, "a")
    (name, (a, b)), *_ = weights.factors.items()
    wider = LoraWeights("wide", {name: (torch.zeros(a.shape[0], a.shape[1] * 2), b)})
    adapters = Generator(base).adapters
    assert adapters is not None
    with pytest.raises(AdapterError, match=f"'{name}' maps {a.shape[1] * 2} -> {b.shape[0]} features"):
        adapters.attach(wider)
    with pytest.raises(AdapterError, match="the base has no layer 'model.layers.9.self_attn.q_proj'"):
        adapters.attach(LoraWeights("deep", {"model.layers.9.self_attn.q_proj": (a, b)}))
    assert adapters.keys == set()


def test_an_adapter_llmops_cannot_run_is_refused_when_read(setup, tmp_path: Path) -> None:
    _, first, _ = setup
    copy = tmp_path / "dora"
    copy.mkdir()
    config = json.loads((first / "adapter_config.json").read_text()) | {"use_dora": True}
    (copy / "adapter_config.json").write_text(json.dumps(config))
    (copy / "adapter_model.safetensors").write_bytes((first / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterError, match="uses DoRA"):
        LoraWeights.load(copy, "dora")
    with pytest.raises(AdapterError, match="no LoRA adapter here"):
        LoraWeights.load(tmp_path, "none")


async def _read(sequence: Sequence) -> tuple[str, str | None]:
    text = ""
    while True:
        event = await sequence.events.get()
        text += event.text
        if event.finish_reason is not None:
            return text, event.finish_reason


def test_an_adapter_released_while_its_sequences_run_finishes_them_then_is_detached(setup) -> None:
    """An adapter's alias moved: what it is writing ends as it would have, then its slot is freed; a sequence
    that still asks for it is told to try again (the others in the batch run on)."""
    base, first, second = setup
    generator = Generator(base)
    adapters = generator.adapters
    assert adapters is not None
    engine = GenerationEngine(generator, max_running=4, max_waiting=8)
    engine.call(lambda: adapters.attach(LoraWeights.load(first, "a")))
    engine.call(lambda: adapters.attach(LoraWeights.load(second, "b")))
    prompt = generator.encode("write a tweet about the rain")
    long = GenerationParams(max_new_tokens=40, min_new_tokens=40, adapter="a")

    async def run() -> tuple[tuple[str, str | None], ...]:
        loop = asyncio.get_running_loop()
        alone = await _read(engine.submit(prompt, long, loop))
        running = [
            engine.submit(prompt, long, loop),
            engine.submit(prompt, dataclasses.replace(long, adapter="b"), loop),
        ]
        engine.release_adapter("a")  # both still waiting or running: "a" stays until they end
        finished = await asyncio.gather(*map(_read, running))
        for _ in range(100):
            if "a" not in adapters.keys:
                break
            await asyncio.sleep(0.01)
        late = await _read(engine.submit(prompt, long, loop))
        return alone, *finished, late

    try:
        alone, again, other, late = asyncio.run(run())
    finally:
        engine.stop()
    assert again == alone and again[1] == "length"
    assert other[1] == "length" and other[0] != alone[0]
    assert adapters.keys == {"b"}
    assert late == ("adapter a is no longer served here: try again", "error")
