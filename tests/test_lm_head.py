"""The CPU LM head against the plain path (full logits, fp32, transformers' own loss): the same loss and gradients —
to fp32 rounding without autocast, and in bf16 (autocast, with fp32 or bf16 weights) no further off than TRL's own
fused head under autocast — and the same per-token outputs as TRL's head."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

from soda_distill.cpu import add_cpu_lm_head
from soda_distill.cpu.lm_head import ChunkedLogProbs

OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
SCORED = 3 * 37 - 7  # batch(): 39 next-token labels a row, the first two and row 3's padding unscored
CHUNK = 16  # several chunks of the scored tokens, so that the head's loop over them is what is compared


def batch(vocab: int):
    """Three rows: the first two prompt tokens of each unscored, the last row right-padded by 7."""
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (3, 40))
    attention = torch.ones_like(ids)
    attention[2, -7:] = 0
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :3] = -100
    return dict(input_ids=ids, attention_mask=attention, labels=labels)


def loss_and_grads(model, inputs, fused: bool, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**inputs, fused_lm_head=True) if fused else model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def models(path, head: str):
    """A fresh model with TRL's fused head, and then this package's on top of it when `head == "soda"`."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    add_fused_lm_head(model, outputs=OUTPUTS)
    if head == "soda":
        assert add_cpu_lm_head(model, chunk_tokens=CHUNK)
    return model


@pytest.fixture(autouse=True)
def head_calls(monkeypatch):
    """The tokens each call of this package's head scored: a comparison cannot pass on TRL's head alone."""
    calls, apply = [], ChunkedLogProbs.apply
    monkeypatch.setattr(ChunkedLogProbs, "apply", lambda hidden, *rest: calls.append(len(hidden)) or apply(hidden, *rest))
    return calls


def relative_errors(grads, reference):
    return {n: float((g - reference[n]).norm() / reference[n].norm()) for n, g in grads.items()}


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    inputs = batch(model.config.vocab_size)
    out, grads = loss_and_grads(model, inputs, fused=False, autocast=False)
    return inputs, out.loss.item(), grads


def test_fp32_matches_the_plain_loss_and_gradients(tiny_model_dir, plain, head_calls):
    inputs, loss, grads = plain
    out, fast = loss_and_grads(models(tiny_model_dir, "soda"), inputs, fused=True, autocast=False)
    assert head_calls == [SCORED]
    assert out.loss.item() == pytest.approx(loss, rel=1e-6)
    assert max(relative_errors(fast, grads).values()) < 1e-5


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])  # bf16: as training on CPU sets the model up
def test_bf16_is_as_close_as_trls_head_under_autocast(tiny_model_dir, plain, weights, head_calls):
    inputs, loss, grads = plain
    trl_out, trl_grads = loss_and_grads(models(tiny_model_dir, "trl"), inputs, fused=True, autocast=True)
    soda_out, soda_grads = loss_and_grads(models(tiny_model_dir, "soda").to(weights), inputs, fused=True, autocast=True)
    assert head_calls == [SCORED]
    assert abs(soda_out.loss.item() - loss) / loss < 1e-3
    soda_err = relative_errors({n: g.float() for n, g in soda_grads.items()}, grads)
    trl_err = relative_errors(trl_grads, grads)
    # bf16 keeps 8 bits of mantissa: a few 1e-3 of relative error on a gradient is its rounding, not a bug
    assert max(soda_err.values()) < 2e-2
    assert all(soda_err[n] <= 2 * trl_err[n] + 1e-3 for n in grads), (soda_err, trl_err)


def test_per_token_outputs_match_trls_head(tiny_model_dir, plain, head_calls):
    inputs = plain[0]
    with torch.no_grad():
        trl, soda = (models(tiny_model_dir, head)(**inputs, fused_lm_head=True) for head in ("trl", "soda"))
    assert head_calls == [SCORED]
    assert torch.equal(soda.label_mask, trl.label_mask)
    for name in ("log_probs", "entropy", "mean_logits"):
        torch.testing.assert_close(getattr(soda, name), getattr(trl, name), rtol=1e-5, atol=1e-5)
    assert torch.equal(soda.is_top1, trl.is_top1)
    assert not soda.log_probs[~soda.label_mask].any()  # unscored positions are zero, as TRL's
