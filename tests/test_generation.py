import pytest
import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from soda_distill.generation import CategoricalSampler, Sampling, generate_transformers, vllm_sampling
from soda_distill.models import load_model, load_tokenizer


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


PROMPTS = [[{"role": "user", "content": "Name a color."}], [{"role": "user", "content": "Count to five, please."}]]


def _answers(model, tokenizer, sampling):
    out = {}
    generate_transformers(model, tokenizer, PROMPTS, sampling, batch_size=2,
                          on_batch=lambda results: out.update({i: g.text for i, g in results}))
    return [out[i] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("temperature,lora", [(0.0, False), (1.0, False), (0.0, True)])
def test_the_model_generation_config_does_not_change_decoding(tiny_model_dir, temperature, lora):
    """A model that ships a repetition penalty, no-repeat n-grams and top-k decodes by `Sampling` alone; also inside
    a LoRA wrapper (the on-policy refresh generates with one), whose generate reads its base model's settings."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    sampling = Sampling(max_new_tokens=16, temperature=temperature, seed=3)
    plain = _answers(load_model(str(tiny_model_dir)), tokenizer, sampling)
    model = load_model(str(tiny_model_dir))
    shipped = model.generation_config
    shipped.repetition_penalty, shipped.no_repeat_ngram_size, shipped.top_k, shipped.min_new_tokens = 50.0, 1, 2, 16
    if lora:  # a fresh adapter leaves the model's function as it was
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    # the shipped settings change what greedy `generate` gives when it applies them (16 tokens at least, no repeats)
    ids = tokenizer.apply_chat_template(PROMPTS[0], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    greedy = Sampling(max_new_tokens=16, temperature=0.0, seed=3)
    honoured = model.generate(**ids, max_new_tokens=16, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert tokenizer.decode(honoured, skip_special_tokens=True) != _answers(model, tokenizer, greedy)[0]
    assert _answers(model, tokenizer, sampling) == plain
    assert model.generation_config is shipped and shipped.repetition_penalty == 50.0  # the model's own is left as it was


def test_vllm_requests_each_get_their_own_seed():
    sampling = Sampling(max_new_tokens=8, temperature=0.8, seed=5)
    params = vllm_sampling(sampling, [0, 1, 7])
    assert [p["seed"] for p in params] == [sampling.request_seed(i) for i in (0, 1, 7)]
    assert len({p["seed"] for p in params}) == 3
    assert vllm_sampling(sampling, [7])[0] == params[2]  # a resumed run asks prompt 7 exactly as before
    assert all(p["repetition_penalty"] == 1.0 and p["top_k"] == -1 for p in params)
