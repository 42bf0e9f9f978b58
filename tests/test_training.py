import copy
import io
import random

import pytest
import torch

from soda_distill.errors import SodaError
from soda_distill.cpu import MasterWeightsAdamW, adamw_for
from soda_distill.training import LengthBuckets


def test_length_buckets_group_a_small_data_set():
    """67 examples, batches of 8: every example once, batches of near-equal lengths, longest first, short batch last,
    and another order for another seed."""
    lengths = [random.Random(i).randint(100, 600) for i in range(67)]
    orders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        orders.append(list(LengthBuckets(lengths, 8)))
    for order in orders:
        assert sorted(order) == list(range(67))
        batches = [order[i : i + 8] for i in range(0, 67, 8)]
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        assert 1 - sum(lengths) / padded < 0.15  # random batches of 8 from 100–600 pad about 35%
        assert max(lengths[i] for i in batches[0]) == max(lengths)
        assert len(batches[-1]) == 3 and max(lengths[i] for i in batches[-1]) == sorted(lengths)[2]
    assert orders[0] != orders[1]


def test_master_weights_clip_their_gradients_as_the_trainer_would():
    """Given max_grad_norm, each step clips the masters' gradients before the update and keeps their norm, which the
    trainer logs: the same weights as clipping then AdamW on fp32, unlike AdamW unclipped."""
    torch.manual_seed(0)
    start = torch.rand(64) * 2 + 2
    weight = torch.nn.Parameter(start.to(torch.bfloat16))
    clipped, unclipped = (torch.nn.Parameter(weight.detach().float()) for _ in range(2))
    optimizer = MasterWeightsAdamW([weight], max_grad_norm=1.0, lr=1e-3)
    plain, plain_unclipped = torch.optim.AdamW([clipped], lr=1e-3), torch.optim.AdamW([unclipped], lr=1e-3)
    for i in range(6):
        gradient = (torch.rand(64) * 10 ** (i % 3)).to(torch.bfloat16)  # norms of about 5 to 500
        for param in (weight, clipped, unclipped):
            (param * gradient.to(param.dtype)).sum().backward()
        norm = torch.nn.utils.clip_grad_norm_([clipped], 1.0)
        for opt in (optimizer, plain, plain_unclipped):
            opt.step()
            opt.zero_grad()
        assert optimizer.grad_norm == pytest.approx(float(norm), rel=1e-6) and optimizer.grad_norm > 1
    assert torch.equal(optimizer.masters[0], clipped.detach())
    assert not torch.equal(clipped, unclipped)


def test_master_weights_keep_updates_too_small_for_bf16():
    """bf16 weights of 2–4 move by steps of 2^-6 at least: one AdamW update of 1e-4 rounds away. The fp32 masters
    accumulate two micro-batches' gradients and take every update exactly as AdamW on fp32 weights would, the bf16
    weights follow them rounded, and a restored optimizer continues from the masters."""
    torch.manual_seed(0)
    start = torch.rand(64) * 2 + 2
    weight = torch.nn.Parameter(start.to(torch.bfloat16))
    reference = torch.nn.Parameter(weight.detach().float())
    optimizer = MasterWeightsAdamW([{"params": [weight], "weight_decay": 0.01}], lr=1e-4)
    plain = torch.optim.AdamW([{"params": [reference], "weight_decay": 0.01}], lr=1e-4)

    def step(opt, param, i):
        for micro_batch in range(2):
            torch.manual_seed(2 * i + micro_batch)
            # positive, so the updates add up; bf16-exact, so both optimizers see the same gradients
            gradient = (torch.rand(64) + 0.1).to(torch.bfloat16)
            (param * gradient.to(param.dtype)).sum().backward()
        if isinstance(opt, MasterWeightsAdamW):
            assert param.grad is None  # moved into the master, in fp32
            norm = opt.clip_grad_norm_(float("inf"))
            assert torch.equal(norm, torch.linalg.vector_norm(opt.masters[0].grad))
        opt.step()
        opt.zero_grad()

    for i in range(100):
        step(optimizer, weight, i), step(plain, reference, i)
    assert torch.equal(optimizer.masters[0], reference.detach())
    assert torch.equal(weight.detach(), reference.detach().to(torch.bfloat16))
    assert (weight.detach() != start.to(torch.bfloat16)).any()  # 100 steps of 1e-4 add up to a visible change
    naive = torch.nn.Parameter(start.to(torch.bfloat16))
    naive_optimizer = torch.optim.AdamW([naive], lr=1e-4)
    for i in range(100):
        step(naive_optimizer, naive, i)
    assert torch.equal(naive.detach(), start.to(torch.bfloat16))  # each update rounded away: nothing learned

    checkpoint = io.BytesIO()  # as the trainer saves and loads it
    torch.save(optimizer.state_dict(), checkpoint)
    checkpoint.seek(0)
    restored_weight = torch.nn.Parameter(weight.detach().clone())
    restored = MasterWeightsAdamW([{"params": [restored_weight], "weight_decay": 0.01}], lr=1e-4)
    restored.load_state_dict(torch.load(checkpoint, weights_only=True))
    for i in range(100, 105):
        step(optimizer, weight, i), step(restored, restored_weight, i), step(plain, reference, i)
    assert torch.equal(restored.masters[0], reference.detach()) and torch.equal(restored_weight, weight)


def test_master_weights_refuse_a_checkpoint_written_without_them():
    weight = torch.nn.Parameter(torch.ones(4))
    plain_state = torch.optim.AdamW([weight]).state_dict()
    bf16_weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    with pytest.raises(SodaError, match="student.bf16"):
        MasterWeightsAdamW([bf16_weight]).load_state_dict(plain_state)


def test_bf16_weights_train_exactly_as_autocast_over_fp32_weights():
    """adamw_for's bf16 path keeps each weight's fp32 value as its master: the bf16 weights the forward pass sees are
    then what autocast casts fp32 weights to, step after step, and the two runs' losses are the same. (Masters taken
    from the rounded weights lie on bf16's grid, where updates under half its step never reach the forward pass: the
    demo's SFT loss stayed 0.24 nats above fp32's.)"""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    data = [(torch.randn(16, 32), torch.randint(0, 4, (16,))) for _ in range(4)]

    def train(m, adamw):
        optimizer = adamw(list(m.parameters()), lr=1e-4)
        losses = []
        for step in range(40):
            x, y = data[step % 4]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(m(x).float(), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    plain = train(copy.deepcopy(model), torch.optim.AdamW)
    bf16_model = copy.deepcopy(model)
    adamw = adamw_for(bf16_model, bf16=True)
    assert adamw is MasterWeightsAdamW and all(p.dtype == torch.bfloat16 for p in bf16_model.parameters())
    assert train(bf16_model, adamw) == plain and sum(plain[-4:]) < sum(plain[:4]) - 0.05
    # masters taken from weights already rounded to bf16 (as before): another, worse-placed run
    rounded = copy.deepcopy(model).to(torch.bfloat16)
    assert train(rounded, MasterWeightsAdamW) != plain


def test_bf16_weights_leave_the_rotary_frequencies_in_fp32(tiny_model_dir):
    from soda_distill.models import load_model

    model = load_model(str(tiny_model_dir))
    adamw_for(model, bf16=True)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
