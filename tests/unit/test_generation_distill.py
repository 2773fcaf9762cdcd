"""Token-level distillation losses against hand-computed values, the completion loss, and students of every
architecture the generative task takes."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from llmops.checkpoints import count_parameters
from llmops.generation.data import IGNORE
from llmops.generation.losses import (
    Scored,
    average,
    completion_loss,
    length_parts,
    of_rows,
    score_completions,
    scored_positions,
    target_contrast_loss,
    token_distillation_loss,
    token_divergence,
)
from llmops.students import build_student, prune_ffn

# One position, two tokens. Teacher logits [ln 3, 0] -> p_t = [.75, .25]; student logits [0, 0] -> p_s = [.5, .5].
TEACHER = torch.tensor([[[math.log(3.0), 0.0]]])
STUDENT = torch.tensor([[[0.0, 0.0]]])
P_T, P_S = (0.75, 0.25), (0.5, 0.5)


def kl(p: tuple[float, ...], q: tuple[float, ...]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def test_forward_kl_is_teacher_to_student() -> None:
    got = token_divergence(STUDENT, TEACHER, "forward_kl")
    assert got.shape == (1, 1) and got.item() == pytest.approx(kl(P_T, P_S), rel=1e-6)


def test_reverse_kl_is_student_to_teacher() -> None:
    assert token_divergence(STUDENT, TEACHER, "reverse_kl").item() == pytest.approx(kl(P_S, P_T), rel=1e-6)


def test_generalized_jsd_weights_both_sides_against_the_mixture() -> None:
    beta = 0.3
    mixture = tuple(beta * t + (1 - beta) * s for t, s in zip(P_T, P_S, strict=True))
    expected = beta * kl(P_T, mixture) + (1 - beta) * kl(P_S, mixture)
    assert token_divergence(STUDENT, TEACHER, "jsd", beta=beta).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_identical_distributions_diverge_by_nothing(loss: str) -> None:
    logits = torch.randn(7, 11)
    rows = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    assert token_distillation_loss(logits, logits, rows, loss).item() == pytest.approx(0.0, abs=1e-6)


def test_temperature_softens_both_distributions() -> None:
    t = 2.0
    p_t = torch.softmax(TEACHER[0, 0] / t, -1).tolist()
    assert token_divergence(STUDENT, TEACHER, "forward_kl", temperature=t).item() == pytest.approx(
        kl(tuple(p_t), P_S), rel=1e-5
    )


def test_per_example_averaging_weighs_a_short_answer_like_a_long_one() -> None:
    values = torch.tensor([1.0, 3.0, 3.0, 3.0])  # example 0 has one scored token, example 1 three
    rows = torch.tensor([0, 1, 1, 1])
    assert average(values, rows, "token").item() == pytest.approx(10 / 4)
    assert average(values, rows, "example").item() == pytest.approx((1 + 3) / 2)
    student, teacher = torch.cat([STUDENT[0], STUDENT[0]]), torch.cat([TEACHER[0], STUDENT[0]])
    per_example = token_distillation_loss(student, teacher, torch.tensor([0, 1]), per="example")
    assert per_example.item() == pytest.approx(kl(P_T, P_S) / 2, rel=1e-6)


def test_a_decoder_scores_the_position_before_each_completion_token() -> None:
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8, IGNORE], [IGNORE, 5, IGNORE, IGNORE, IGNORE]])
    assert scored_positions(labels, "causal-lm").tolist() == [
        [False, True, True, False, False],
        [True, False, False, False, False],
    ]
    assert scored_positions(labels, "seq2seq-lm").tolist() == (labels != IGNORE).tolist()


@pytest.mark.parametrize("model_type", ["llama", "t5"])
def test_completion_logits_are_the_full_logits_at_completion_positions(model_type: str) -> None:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=50, pad_token_id=0, **TINY[model_type])
    auto = AutoModelForSeq2SeqLM if model_type == "t5" else AutoModelForCausalLM
    model = auto.from_config(config).eval()
    task = "seq2seq-lm" if model_type == "t5" else "causal-lm"
    ids = torch.randint(2, 50, (2, 6))
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 9, 10, 11], [IGNORE, IGNORE, 12, 13, IGNORE, IGNORE]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    if task == "seq2seq-lm":
        inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
    scored = score_completions(model, inputs, task)
    full = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    assert torch.allclose(scored.logits, full[scored_positions(labels, task)], atol=1e-5)
    assert scored.targets.tolist() == [9, 10, 11, 12, 13] and scored.rows.tolist() == [0, 0, 0, 1, 1]
    expected = torch.nn.functional.cross_entropy(scored.logits, scored.targets)
    assert completion_loss(scored, "token").item() == pytest.approx(expected.item(), rel=1e-5)


def test_target_contrast_is_the_cross_entropy_of_the_target_the_prompt_named() -> None:
    """Row 0 (a `write` row) is also scored after two prompts naming other targets; row 1 (a `classify` row) has no
    alternative. The term is -log softmax([log p(answer | own prompt), log p(answer | each other)])[own], row 0's;
    the alternatives come after the rows in one batch, and the completion loss sees the rows alone."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=50, pad_token_id=0, **TINY["llama"])
    model = AutoModelForCausalLM.from_config(config).eval()
    answer = [9, 10, 11]
    own = [[2, 20, 21, *answer], [2, 30, 31, 32, 33, 12]]
    others = [[2, 22, 21, *answer], [2, 23, 21, *answer]]  # the prompt's second word renamed
    ids = torch.tensor(own + others)
    labels = torch.tensor([[IGNORE] * 3 + answer, [IGNORE] * 5 + [12]] + [[IGNORE] * 3 + answer] * 2)
    batch = score_completions(
        model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, "causal-lm"
    )

    def answer_logprob(sequence: list[int]) -> torch.Tensor:
        logp = model(input_ids=torch.tensor([sequence])).logits[0].log_softmax(-1)
        return sum(logp[t - 1, sequence[t]] for t in range(3, 6))

    scores = torch.stack([answer_logprob(own[0]), answer_logprob(others[0]), answer_logprob(others[1])])
    expected = -scores.log_softmax(0)[0]
    assert target_contrast_loss(batch, 2, torch.tensor([0, 0])).item() == pytest.approx(expected.item(), rel=1e-4)
    rows = of_rows(batch, 2)
    assert rows.rows.tolist() == [0, 0, 0, 1] and rows.targets.tolist() == [*answer, 12]


def test_a_bert_decoder_projects_completion_positions_alone_with_the_same_logits_and_gradients() -> None:
    """The BERT decoder takes no `logits_to_keep`: its output layer is narrowed to the scored positions instead."""
    from llmops.generation.losses import output_layer_at

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "bert", vocab_size=50, is_decoder=True, hidden_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(2, 50, (2, 6))
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 9, 10, 11], [IGNORE, IGNORE, 12, 13, IGNORE, IGNORE]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    keep = scored_positions(labels, "causal-lm")
    with output_layer_at(model, keep) as narrowed:
        assert narrowed and model(input_ids=ids).logits.shape == (int(keep.sum()), 50)
    assert model(input_ids=ids).logits.shape == (2, 6, 50)  # restored after the block
    completion_loss(score_completions(model, inputs, "causal-lm"), "token").backward()
    narrowed_grad = model.get_output_embeddings().weight.grad.clone()
    model.zero_grad()
    full = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[keep]
    reference = Scored(full, labels[:, 1:][labels[:, 1:] != IGNORE], keep.nonzero()[:, 0])
    completion_loss(reference, "token").backward()
    assert torch.allclose(narrowed_grad, model.get_output_embeddings().weight.grad, atol=1e-6)


def _padded_batch(lengths: list[int], vocab: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Rows of the given lengths, each answering its last three tokens, padded to the longest."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for row, length in enumerate(lengths):
        place = slice(width - length, width) if left else slice(0, length)
        ids[row, place] = torch.randint(2, vocab, (length,))
        mask[row, place] = 1
        labels[row, place] = torch.where(torch.arange(length) >= length - 3, ids[row, place], IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_a_batch_of_short_and_long_rows_is_scored_in_parts_with_the_same_logits_and_gradients(model_type: str) -> None:
    """Rows of 4 to 40 tokens: the short ones run as narrower passes than the longest, and the batch's logits,
    targets, rows and gradients are those of one pass over the whole padded batch."""
    torch.manual_seed(0)
    size = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    extra = {"is_decoder": True, **size} if model_type == "bert" else TINY["llama"]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=50, pad_token_id=0, **extra))
    model.eval()
    inputs = _padded_batch([40, 4, 5, 38, 6, 4, 39, 5], 50)
    parts = length_parts(inputs, "causal-lm", model, 3)
    assert len(parts) > 1 and sorted(torch.cat([rows for rows, _ in parts]).tolist()) == list(range(8))
    assert [width for _, width in parts] != [40] * len(parts)  # the short rows run narrower

    def scored_and_grads(n_parts: int) -> tuple[Scored, list[torch.Tensor]]:
        model.zero_grad()
        scored = score_completions(model, inputs, "causal-lm", parts=n_parts)
        completion_loss(scored, "example").backward()
        return scored, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    whole, whole_grads = scored_and_grads(1)
    split, split_grads = scored_and_grads(3)
    assert torch.allclose(split.logits, whole.logits, atol=1e-5)
    assert split.targets.tolist() == whole.targets.tolist() and split.rows.tolist() == whole.rows.tolist()
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(split_grads, whole_grads, strict=True))


def test_a_left_padded_or_even_batch_runs_as_one_pass() -> None:
    """Left padding: a narrower pass would move the rows' positions. Rows of about one length: nothing to save."""
    config = AutoConfig.for_model("llama", vocab_size=50, pad_token_id=0, **TINY["llama"])
    model = AutoModelForCausalLM.from_config(config)
    for inputs in (_padded_batch([40, 4, 38, 5], 50, left=True), _padded_batch([20, 19, 20, 18], 50)):
        assert len(length_parts(inputs, "causal-lm", model, 3)) == 1


def test_completion_loss_is_zero_for_a_certain_right_answer() -> None:
    logits = torch.full((2, 4), -20.0)
    logits[0, 2] = logits[1, 3] = 20.0
    scored = Scored(logits, torch.tensor([2, 3]), torch.tensor([0, 1]))
    assert completion_loss(scored, "example").item() == pytest.approx(0.0, abs=1e-6)


TINY = {
    "llama": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 2},
    "gpt2": {"n_embd": 64, "n_layer": 4, "n_head": 2},
    "t5": {"d_model": 64, "d_ff": 128, "num_layers": 4, "num_heads": 2, "d_kv": 32, "decoder_start_token_id": 0},
}


@pytest.mark.parametrize("model_type", TINY)
def test_a_layer_dropped_student_generates_with_its_cache(model_type: str) -> None:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=50, pad_token_id=0, eos_token_id=1, **TINY[model_type])
    auto = AutoModelForSeq2SeqLM if model_type == "t5" else AutoModelForCausalLM
    teacher = auto.from_config(config).eval()
    student = build_student(teacher, [0, 3]).eval()
    assert student.config.num_hidden_layers == 2
    prompt = torch.randint(2, 50, (2, 6))
    out = student.generate(input_ids=prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape[1] in (6 + 5, 1 + 5)  # decoder: prompt + 5; seq2seq: start token + 5
    assert count_parameters(student)["params_non_embedding"] < count_parameters(teacher)["params_non_embedding"]


def test_t5_students_keep_layer_zero() -> None:
    config = AutoConfig.for_model("t5", vocab_size=50, **TINY["t5"])
    with pytest.raises(ValueError, match="position bias in layer 0"):
        build_student(AutoModelForSeq2SeqLM.from_config(config), [1, 3])


def test_ffn_pruning_keeps_the_strongest_neurons_and_a_working_model() -> None:
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=50, **TINY["llama"])
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 50, (1, 7))
    before = count_parameters(model)["params_non_embedding"]
    untouched = model(ids).logits
    assert torch.equal(prune_ffn(model, 1.0)(ids).logits, untouched)
    pruned = prune_ffn(model, 0.5)
    assert pruned.config.intermediate_size == 64
    assert pruned.model.layers[0].mlp.down_proj.in_features == 64
    assert count_parameters(pruned)["params_non_embedding"] < before
    assert pruned(ids).logits.shape == untouched.shape
