"""token_overlap.overlap_stats on distributions whose figures are known by hand."""

import pytest
import torch

from soda_distill.token_overlap import overlap_stats, overlap_with_topk, sampled_states, state_logits


def test_overlap_of_known_distributions():
    # student: tokens 0, 1 likely; teacher: tokens 1, 2 likely; k = 2 shares token 1 only
    student = torch.tensor([[0.5, 0.3, 0.1, 0.1]]).log()
    teacher = torch.tensor([[0.1, 0.4, 0.4, 0.1]]).log()
    stats = overlap_stats(student, teacher, k=2)
    assert stats["overlap/ratio"] == pytest.approx(0.5)
    assert stats["overlap/student_mass_shared"] == pytest.approx(0.3)
    assert stats["overlap/teacher_mass_shared"] == pytest.approx(0.4)
    assert stats["overlap/teacher_mass_topk"] == pytest.approx(0.8)
    same = overlap_stats(teacher, teacher, k=2)
    assert same["overlap/ratio"] == 1 and same["overlap/student_mass_shared"] == pytest.approx(0.8)
    # the teacher's own top-k mass, not the student's (whose top 2 hold 0.9 here)
    peaked = torch.tensor([[0.6, 0.3, 0.05, 0.05]]).log()
    assert overlap_stats(peaked, teacher, k=2)["overlap/teacher_mass_topk"] == pytest.approx(0.8)
    # means over states
    both = overlap_stats(torch.cat([student, teacher]), torch.cat([teacher, teacher]), k=2)
    assert both["overlap/ratio"] == pytest.approx(0.75)


def test_sampled_states_predict_completion_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    states = sampled_states(mask, prompt_length=4, count=10, generator=torch.Generator().manual_seed(0))
    assert sorted(map(tuple, states.tolist())) == [(0, 3), (0, 4), (1, 3)]  # the token before each completion token
    two = sampled_states(mask, 4, 2, torch.Generator().manual_seed(0)).tolist()
    assert len({tuple(state) for state in two}) == 2 and all(tuple(state) in {(0, 3), (0, 4), (1, 3)} for state in two)


def test_state_logits_are_the_models_own_at_left_padded_states():
    """Only the chosen states go through the output layer, with the batch's padding masked as in a full forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = torch.tensor([[0, 4], [1, 2], [0, 3]])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        unmasked = model(input_ids=ids).logits
        chosen = state_logits(model, ids, mask, positions)
    assert torch.allclose(chosen, full[positions[:, 0], positions[:, 1]], atol=1e-5)
    assert not torch.allclose(chosen[0], unmasked[0, 4], atol=1e-3)  # the padding matters at these states


def test_overlap_with_only_the_teachers_top_k():
    """Grey-box: the teacher's tokens 1 and 2 at log 0.4 each (token 3 padding); the student's top 2 are 0 and 1."""
    student = torch.tensor([[0.5, 0.3, 0.1, 0.1]]).log()
    ids = torch.tensor([[1, 2, 0]])
    logprobs = torch.tensor([[torch.tensor(0.4).log(), torch.tensor(0.4).log(), float("-inf")]])
    stats = overlap_with_topk(student, ids, logprobs)
    assert overlap_with_topk(torch.tensor([[0.6, 0.3, 0.05, 0.05]]).log(), ids, logprobs)["overlap/teacher_mass_topk"] == pytest.approx(0.8)
    assert stats["overlap/ratio"] == pytest.approx(0.5)
    assert stats["overlap/teacher_mass_shared"] == pytest.approx(0.4)
    assert stats["overlap/student_mass_shared"] == pytest.approx(0.3)
    assert stats["overlap/teacher_mass_topk"] == pytest.approx(0.8)
    # the same as the white-box figures where the whole teacher distribution is known
    teacher = torch.tensor([[0.1, 0.4, 0.4, 0.1]]).log()
    assert overlap_with_topk(student, ids[:, :2], logprobs[:, :2]) == pytest.approx(overlap_stats(student, teacher, 2))
    # each state with its own k: beside a state whose teacher reports 3 tokens, the first state's S stays 2 tokens
    second = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    three = torch.tensor([[0, 1, 3]]), torch.tensor([[0.5, 0.3, 0.1]]).log()
    stats = overlap_with_topk(torch.cat([second, second]), torch.cat([ids, three[0]]), torch.cat([logprobs, three[1]]))
    assert stats["overlap/ratio"] == pytest.approx((1 / 2 + 2 / 3) / 2)  # S = {0, 1} against T = {1, 2}; {0, 1, 2} against {0, 1, 3}
