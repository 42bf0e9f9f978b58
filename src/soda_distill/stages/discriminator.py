"""GAD's discriminator: the student's backbone with a scalar head, read at the last real token of prompt + response,
trained with the Bradley–Terry loss to score the teacher's answer above the student's — and, as GRPO's reward
function (`Discriminator`), trained on the rollouts it has just scored (gad.py).
"""

from __future__ import annotations

import os
import time
import types
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ..config import GadConfig, LoraSettings
from ..cpu import MasterWeightsAdamW, adamw_for
from ..distributed import is_main, world_size
from ..errors import SodaError
from ..models import transformers_model
from ..training import peft_config

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
        self.optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=g.discriminator.learning_rate,
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
            for start in range(0, n, self.g.discriminator.batch_size):
                rows = range(start, min(start + self.g.discriminator.batch_size, n))
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
