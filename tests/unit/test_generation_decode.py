"""The decoding loop: the same greedy tokens as transformers' generate(), sampling inside the nucleus."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llmops.generation.decode import choose, decode

TINY = {
    "llama": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 2},
    "bert": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2},
}
EOS, PAD = 1, 0


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    return ids, (ids != PAD).long()


@pytest.mark.parametrize("model_type", TINY)
def test_greedy_decoding_writes_what_generate_writes(model_type: str) -> None:
    torch.manual_seed(0)
    extra = {"is_decoder": True} if model_type == "bert" else {}
    config = AutoConfig.for_model(
        model_type, vocab_size=60, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2, **TINY[model_type], **extra
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    ids, mask = _left_padded([[2, 7, 8, 9, 10, 11], [2, 30, 31]])  # two lengths: the short one is left-padded
    ours = decode(model, ids, mask, max_new_tokens=8, eos_id=EOS, min_new_tokens=8).ids
    theirs = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=PAD
    )[:, ids.shape[1] :]
    assert ours == theirs.tolist()


class Scripted(torch.nn.Module):
    """A stand-in LM whose next token is scripted per row: row 0 writes 5, then its end token; row 1 writes 6s."""

    def forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache):
        from types import SimpleNamespace

        written = attention_mask.shape[1] - 3  # the prompts are 3 wide; every step adds one
        logits = torch.zeros(len(input_ids), input_ids.shape[1], 10)
        logits[0, -1, EOS if written >= 1 else 5] = 1.0
        logits[1, -1, 6] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


def test_a_row_stops_at_its_end_token_and_the_others_go_on() -> None:
    ids, mask = _left_padded([[2, 3, 4], [2, 3, 4]])
    assert decode(Scripted(), ids, mask, max_new_tokens=5, eos_id=EOS).ids == [[5, EOS], [6, 6, 6, 6, 6]]
    forced = decode(Scripted(), ids, mask, max_new_tokens=3, eos_id=EOS, min_new_tokens=3).ids
    assert EOS not in forced[0]  # a minimum length keeps the end token out until it is reached


def test_greedy_is_the_argmax_and_sampling_stays_in_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert choose(logits, 0.0, 1.0).tolist() == [0]
    seen = {int(choose(logits, 1.0, 0.7, torch.Generator().manual_seed(s))) for s in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 reach 0.7: tokens 2 and 3 are outside the nucleus
    everything = {int(choose(logits, 1.0, 1.0, torch.Generator().manual_seed(s))) for s in range(400)}
    assert everything == {0, 1, 2, 3}


def test_extreme_temperatures_and_nuclei_still_choose_a_token() -> None:
    """Found by fuzzing the served API: a temperature of 1e-261 overflowed the softmax to NaN (a 500)."""
    logits = torch.tensor([[30.0, 29.0, -5.0, 0.0]])
    assert choose(logits, 3.7e-261, 1.0).tolist() == [0]
    assert choose(logits, 1.0, 3.3e-262, torch.Generator().manual_seed(0)).tolist() == [0]
    assert choose(logits, 2.0, 1.0, torch.Generator().manual_seed(0)).shape == (1,)


def test_a_seed_makes_sampling_reproducible() -> None:
    logits = torch.randn(3, 50)
    first = choose(logits, 0.9, 0.95, torch.Generator().manual_seed(11))
    assert torch.equal(first, choose(logits, 0.9, 0.95, torch.Generator().manual_seed(11)))


def test_sequences_join_and_leave_a_running_batch_without_changing_what_they_write() -> None:
    from llmops.generation.decode import join, keep_rows, prefill, step

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=60, pad_token_id=PAD, eos_token_id=EOS, **TINY["llama"])
    model = AutoModelForCausalLM.from_config(config).eval()
    prompts = [[2, 7, 8, 9, 10, 11, 12], [2, 30, 31], [2, 40, 41, 42, 43]]

    def alone(prompt: list[int], n: int) -> list[int]:
        return decode(model, *_left_padded([prompt]), max_new_tokens=n, eos_id=EOS, min_new_tokens=n).ids[0]

    def greedy(logits: torch.Tensor) -> torch.Tensor:
        return logits.index_fill(1, torch.tensor([EOS]), float("-inf")).argmax(-1)  # as min_new_tokens does

    # Row 0 starts alone and writes 2 tokens; rows 1 and 2 join; row 0 leaves after 4; the others go on.
    logits, running = prefill(model, *_left_padded(prompts[:1]))
    written: list[list[int]] = [[]]
    for _ in range(2):
        token = greedy(logits)
        written[0].append(int(token[0]))
        logits = step(model, token, running)
    new_logits, joining = prefill(model, *_left_padded(prompts[1:]))
    running, logits, written = join(running, joining), torch.cat([logits, new_logits]), [*written, [], []]
    for count in range(4):
        tokens = greedy(logits)
        for row, token in enumerate(tokens.tolist()):
            written[row].append(token)
        if count == 1:  # row 0 has its 4 tokens: it leaves
            running, tokens, finished, written = keep_rows(running, [1, 2]), tokens[1:], written[0], written[1:]
        logits = step(model, tokens, running)
    assert finished == alone(prompts[0], 4)
    assert written == [alone(prompts[1], 4), alone(prompts[2], 4)]
    assert running.attention_mask.shape[1] == running.cache.layers[0].keys.shape[-2]
