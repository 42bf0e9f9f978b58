import pytest
import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from soda_distill.generation import CategoricalSampler


@pytest.mark.parametrize("temperature, top_p", [(0.8, 1.0), (1.3, 0.7)])
def test_sampler_draws_from_the_warped_distribution_generate_would_sample(temperature, top_p):
    logits = torch.tensor([2.0, 1.5, 0.3, -0.4, 1.0, float("-inf"), -2.0])
    rows = 60_000
    scores = logits.repeat(rows, 1)
    torch.manual_seed(0)
    out = CategoricalSampler(temperature, top_p)(torch.zeros(rows, 1, dtype=torch.long), scores)

    # exactly one token left standing per row, for greedy decoding to pick
    assert ((out == 0).sum(-1) == 1).all() and (out[out != 0] == float("-inf")).all()
    drawn = out.argmax(-1)
    # the reference: what `generate` samples from, through transformers' own warpers
    warped = TemperatureLogitsWarper(temperature)(None, logits[None].clone())
    if top_p < 1:
        warped = TopPLogitsWarper(top_p)(None, warped)
    expected = warped.softmax(-1)[0]
    frequency = torch.bincount(drawn, minlength=len(logits)).double() / rows
    sigma = (expected * (1 - expected) / rows).sqrt()
    assert ((frequency - expected).abs() <= 5 * sigma + 1e-12).all(), (frequency, expected)
    assert frequency[expected == 0].sum() == 0  # masked tokens (-inf, outside the nucleus) are never drawn
    if top_p < 1:
        assert (expected == 0).sum() > 1  # the nucleus really cut something
