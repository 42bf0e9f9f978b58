"""student.lora: warmup and DPO train peft adapters. Each stage saves its adapter and the model with it merged; DPO
trains a fresh adapter on q_w, whose reference is q_w itself (the adapter off)."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from soda_distill.config import load_config
from soda_distill.manifest import RunDir
from soda_distill.pipeline import run_methods
from soda_distill.records import read_metrics
from soda_distill.stages import warmup
from soda_distill.models import load_model, load_tokenizer

R = 4


def lora_config(qa_file, tiny_model_dir, *extra):
    return load_config(None, [
        f"teacher.file={qa_file}", f"student.model={tiny_model_dir}", f"student.lora.r={R}", "student.lora.alpha=8",
        "student.lora.dropout=0", "snapshot.max_new_tokens=12",
        "pairs.truncated_rejected=open", "snapshot.temperature=1.0",
        "warmup.learning_rate=1e-2", "warmup.batch_size=4", "warmup.epochs=6", "warmup.warmup_ratio=0",
        "warmup.max_length=128", "distill.learning_rate=1e-2", "distill.batch_size=4", "distill.epochs=6",
        "distill.warmup_ratio=0", "distill.max_length=128", *extra])


def test_lora_stages_train_adapters_merge_them_and_dpo_starts_at_its_reference(tmp_path, qa_file, tiny_model_dir):
    cfg = lora_config(qa_file, tiny_model_dir)
    run = RunDir(tmp_path / "run")
    run_methods(cfg, run, ["soda"])
    base = load_file(tiny_model_dir / "model.safetensors")
    q_w = load_file(run.output("warmup") / "model.safetensors")
    for stage, start in (("warmup", base), ("distill", q_w)):
        merged = load_file(run.output(stage) / "model.safetensors")
        delta = merged["model.layers.0.self_attn.q_proj.weight"] - start["model.layers.0.self_attn.q_proj.weight"]
        assert 0 < torch.linalg.matrix_rank(delta.double(), atol=1e-6) <= R  # a low-rank update, merged in
        assert torch.equal(merged["model.embed_tokens.weight"], start["model.embed_tokens.weight"])  # not a target
        assert (run.output(stage) / "adapter" / "adapter_model.safetensors").exists()
    # The adapter loads as transformers loads any adapter (on its base: q0 for the warmup, q_w for DPO) and gives
    # the merged model's logits.
    ids = torch.tensor([[1, 42, 7, 99, 3]])
    with torch.no_grad():
        adapter = AutoModelForCausalLM.from_pretrained(run.output("distill") / "adapter")(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(run.output("distill"))(ids).logits
    torch.testing.assert_close(adapter, merged, atol=1e-4, rtol=1e-4)

    losses = [m["loss"] for m in read_metrics(run.output("warmup") / "metrics.jsonl") if "loss" in m]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3  # nats: a random tiny model, adapters of rank 4
    steps = [m for m in read_metrics(run.output("distill") / "metrics.jsonl") if "rewards/margins" in m]
    # The reference is q_w, where the fresh adapter starts: no margin at the first step (q0 as the reference would
    # give one at once), then the margin grows.
    assert steps[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert steps[-1]["rewards/margins"] > 0.1


def test_lora_trains_through_the_cpu_head(tmp_path, qa_file, tiny_model_dir):
    cfg = lora_config(qa_file, tiny_model_dir)
    run = RunDir(tmp_path / "run")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    from soda_distill.stages.teacher import run_teacher

    trainer = warmup.build_sft_trainer(load_model(str(tiny_model_dir)), tokenizer,
                                       warmup.sft_dataset(run_teacher(cfg, run), tokenizer)[0], cfg,
                                       run.file("warmup"), run.file("warmup") / "metrics.jsonl")
    assert trainer.model.get_base_model()._soda_cpu_lm_head
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_gad_trains_adapters_on_its_generator_and_discriminator(tmp_path, qa_file, tiny_model_dir):
    cfg = lora_config(qa_file, tiny_model_dir, "warmup.epochs=1", "gad.max_new_tokens=8", "gad.num_generations=2",
                      "gad.batch_size=4", "gad.gradient_accumulation_steps=1", "gad.max_length=128",
                      "gad.discriminator.batch_size=2", "gad.discriminator.only_steps=1", "gad.epochs=1",
                      "gad.learning_rate=1e-2", "gad.discriminator.learning_rate=1e-2", "gad.gradient_checkpointing=false")
    run = RunDir(tmp_path / "run")
    run_methods(cfg, run, ["gad"])
    q_w = load_file(run.output("warmup") / "model.safetensors")
    generator = load_file(run.output("gad") / "model.safetensors")
    delta = generator["model.layers.0.mlp.up_proj.weight"] - q_w["model.layers.0.mlp.up_proj.weight"]
    assert 0 < torch.linalg.matrix_rank(delta.double(), atol=1e-6) <= R  # GRPO trained an adapter on q_w
    warm = load_file(run.output("gad_warmup") / "model.safetensors")
    final = load_file(run.file("gad") / "discriminator" / "model.safetensors")
    for name in ("model.layers.0.self_attn.v_proj.weight", "score.weight"):  # an adapter, and the head trained whole
        assert not torch.equal(warm[name], final[name]), name
    for folder in (run.output("gad"), run.output("gad_warmup"), run.file("gad") / "discriminator"):
        assert (folder / "adapter" / "adapter_model.safetensors").exists()
    assert run.manifest()["stages"]["gad"]["discriminator_updates"] == 6


def test_qlora_trains_adapters_on_a_4bit_base_and_merges_them_at_full_precision(tmp_path, qa_file, tiny_model_dir):
    """student.lora.quantize: 4bit (bitsandbytes, which runs on CPU): the base weights being trained on are NF4,
    the adapters learn, and each stage's model is the adapter merged into the full-precision base, a plain model."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from transformers import TrainerCallback

    seen = []

    class Layers(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen.append(type(model.get_base_model().model.layers[0].mlp.up_proj.base_layer))

    cfg = lora_config(qa_file, tiny_model_dir, "student.lora.quantize=4bit")
    run = RunDir(tmp_path / "run")
    original = warmup.build_sft_trainer
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(warmup, "build_sft_trainer", lambda *a, **k: original(*a, **{**k, "callbacks": [Layers()]}))
        run_methods(cfg, run, ["soda"])
    assert seen == [bnb.nn.Linear4bit]
    base = load_file(tiny_model_dir / "model.safetensors")
    for stage in ("warmup", "distill"):
        merged = load_file(run.output(stage) / "model.safetensors")
        assert merged["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32  # not NF4: no quantization state
        assert "quantization_config" not in (run.output(stage) / "config.json").read_text()
    delta = load_file(run.output("warmup") / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"] \
        - base["model.layers.0.self_attn.q_proj.weight"]
    assert 0 < torch.linalg.matrix_rank(delta.double(), atol=1e-6) <= R  # the adapter merged into the exact base
    losses = [m["loss"] for m in read_metrics(run.output("warmup") / "metrics.jsonl") if "loss" in m]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    steps = [m for m in read_metrics(run.output("distill") / "metrics.jsonl") if "rewards/margins" in m]
    assert steps[0]["rewards/margins"] == pytest.approx(0, abs=1e-6) and steps[-1]["rewards/margins"] > 0.05


def test_qlora_gradients_are_those_of_the_dequantized_model(tmp_path, tiny_model_dir):
    """bitsandbytes warns that its 4-bit kernels have no autograd kernel of their own: the adapters' gradients
    through the NF4 base are still those of a full-precision model holding the dequantized weights."""
    bnb = pytest.importorskip("bitsandbytes")
    import copy

    from peft import LoraConfig, get_peft_model

    quantized = load_model(str(tiny_model_dir), quantize="4bit")
    plain = load_model(str(tiny_model_dir))
    weights = plain.state_dict()
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weights[f"{name}.weight"] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    plain.load_state_dict(weights)
    lora = LoraConfig(r=R, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    grads = []
    for model in (quantized, plain):
        torch.manual_seed(1)  # the same random adapters on both
        model = get_peft_model(model, copy.deepcopy(lora))
        ids = torch.randint(0, 1000, (2, 16))
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert torch.linalg.norm(grads[0] - grads[1]) < 0.01 * torch.linalg.norm(grads[1])
