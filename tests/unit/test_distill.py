import math

import datasets
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import BertConfig, BertForSequenceClassification, DataCollatorWithPadding, PreTrainedTokenizerFast

from llmops.classification.distill import distillation_loss, hidden_state_loss, teacher_logits, transfer_indices
from llmops.students import build_student, pruned_width, resolve_ffn_keep


def test_loss_is_zero_kl_for_identical_logits() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    labels = torch.tensor([0, 2])
    assert distillation_loss(logits, logits, labels, alpha=0.0, temperature=3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_alpha_one_is_plain_cross_entropy() -> None:
    student, teacher = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.tensor([0, 1, 2, 1])
    expected = torch.nn.functional.cross_entropy(student, labels)
    assert distillation_loss(student, teacher, labels, alpha=1.0, temperature=2.0).item() == pytest.approx(
        expected.item()
    )


def test_hand_computed_value() -> None:
    # One example, two classes, T = 1. Student logits [0, 0] -> p_s = [.5, .5].
    # Teacher logits [ln 3, 0] -> p_t = [.75, .25]. Label 0.
    # CE = -ln .5 = ln 2. KL(p_t || p_s) = .75 ln(.75/.5) + .25 ln(.25/.5).
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    expected = 0.5 * math.log(2.0) + 0.5 * kl
    got = distillation_loss(student, teacher, torch.tensor([0]), alpha=0.5, temperature=1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_temperature_squared_scaling() -> None:
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[4.0, 0.0]])
    labels = torch.tensor([0])
    t = 2.0
    p_t = torch.softmax(teacher / t, -1)[0]
    kl = float((p_t * (p_t / 0.5).log()).sum())
    got = distillation_loss(student, teacher, labels, alpha=0.0, temperature=t)
    assert got.item() == pytest.approx(t**2 * kl, rel=1e-6)


def test_hidden_state_loss_zero_when_equal_and_ignores_padding() -> None:
    hidden = (torch.randn(2, 4, 8), torch.randn(2, 4, 8))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert hidden_state_loss(hidden, hidden, mask).item() == pytest.approx(0.0, abs=1e-6)
    noisy = tuple(h.clone() for h in hidden)
    for h in noisy:
        h[mask == 0] = torch.randn_like(h[mask == 0])  # only padding differs
    assert hidden_state_loss(noisy, hidden, mask).item() == pytest.approx(0.0, abs=1e-6)


def _teacher(layers: int = 4) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


def test_build_student_copies_the_chosen_layers() -> None:
    teacher = _teacher()
    student = build_student(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2 and len(student.bert.encoder.layer) == 2
    for s_idx, t_idx in enumerate([0, 3]):
        s_state = student.bert.encoder.layer[s_idx].state_dict()
        t_state = teacher.bert.encoder.layer[t_idx].state_dict()
        assert all(torch.equal(s_state[k], t_state[k]) for k in t_state)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert len(teacher.bert.encoder.layer) == 4  # the teacher is untouched
    ids = torch.tensor([[1, 2, 3]])
    assert student(input_ids=ids).logits.shape == (1, 3)


def test_build_student_rejects_missing_layers() -> None:
    with pytest.raises(ValueError, match="only 4 layers"):
        build_student(_teacher(), [0, 4])


def test_unlabelled_rows_count_in_the_kl_term_only() -> None:
    student, teacher = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.tensor([0, 2, -100, -100])
    kl_all = distillation_loss(student, teacher, labels, alpha=0.0, temperature=2.0)
    ce_labelled = torch.nn.functional.cross_entropy(student[:2], labels[:2])
    got = distillation_loss(student, teacher, labels, alpha=0.5, temperature=2.0)
    assert got.item() == pytest.approx(0.5 * ce_labelled.item() + 0.5 * kl_all.item(), rel=1e-6)
    only_unlabelled = distillation_loss(student, teacher, torch.full((4,), -100), alpha=0.5, temperature=2.0)
    assert torch.isfinite(only_unlabelled) and only_unlabelled.item() == pytest.approx(0.5 * kl_all.item(), rel=1e-6)


def test_ffn_pruning_keeps_the_strongest_neurons_at_kernel_friendly_widths() -> None:
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512, num_labels=3
    )
    teacher = BertForSequenceClassification(config).eval()
    with torch.no_grad():  # neuron 7 of layer 0 made the strongest: pruning must keep it
        teacher.bert.encoder.layer[0].intermediate.dense.weight[7] *= 100
    student = build_student(teacher, [0, 1], ffn_keep=0.9)
    kept = student.bert.encoder.layer[0].intermediate.dense
    assert kept.out_features == 448 == student.config.intermediate_size  # 0.9 x 512 = 460.8 -> a multiple of 64
    assert student.bert.encoder.layer[0].output.dense.in_features == 448
    assert kept.weight.abs().max() == teacher.bert.encoder.layer[0].intermediate.dense.weight.abs().max()
    assert student(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3)
    assert [pruned_width(1536, 0.9), pruned_width(128, 0.9), pruned_width(128, 0.5)] == [1408, 128, 64]


def test_unset_ffn_keep_prunes_only_blocks_llmops_knows() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    bert = BertForSequenceClassification(
        BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)
    )
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2))
    assert resolve_ffn_keep(bert, None) == 0.96 and resolve_ffn_keep(gpt2, None) == 1.0
    assert resolve_ffn_keep(gpt2, 0.5) == 0.5  # a number is applied as given...
    with pytest.raises(ValueError, match="cannot prune the feed-forward block of GPT2Block"):
        build_student(gpt2, [0], ffn_keep=0.5)  # ...and refused where the block cannot be pruned


def test_the_transfer_set_takes_a_seeded_prefix_and_leaves_the_rest_unseen() -> None:
    small, large = transfer_indices(1000, 300), transfer_indices(1000, 600)
    assert len(set(large)) == 600 and all(0 <= row < 1000 for row in large)
    assert large[:300] == small  # more transfer rows add rows; the ones already taken stay
    assert transfer_indices(1000, 300) == small  # the same every run: the cache and the benchmark rely on it
    assert sorted(small) != small  # a shuffle, not the pool's first rows
    assert transfer_indices(50, 300) == transfer_indices(50, 50)  # capped at the pool


def test_teacher_logits_come_back_in_the_datasets_order() -> None:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    teacher = BertForSequenceClassification(config).eval()
    lengths = [9, 2, 5, 12, 3, 7, 4]  # batched by length, these are not in the dataset's order
    rows = [{"input_ids": [1 + (i * 7 + j) % 40 for j in range(n)], "label": i % 3} for i, n in enumerate(lengths)]
    dataset = datasets.Dataset.from_list(rows)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"[PAD]": 0}, unk_token="[PAD]")))
    tokenizer.pad_token = "[PAD]"

    got = teacher_logits(teacher, dataset, DataCollatorWithPadding(tokenizer), batch_size=3)

    with torch.no_grad():
        alone = [teacher(input_ids=torch.tensor([r["input_ids"]])).logits[0].tolist() for r in rows]
    assert torch.allclose(torch.tensor(got), torch.tensor(alone), atol=1e-5)
