"""The paper's judge protocol: pairwise scores against a reference answer, in both presentation orders.

For each prompt the judge (GPT-4o in the paper; any OpenAI-compatible endpoint here) sees the question and two
answers — the student's and the reference model's — each between its own markers, rates each from 1 to 10 for
helpfulness, relevance, accuracy and level of detail, and writes the two scores on its first line before
explaining. The default prompt is the lineage's: FastChat's pairwise review prompt ("general"), which MiniLLM and
GAD evaluate with, shipped verbatim with its system prompt (data/judge_fastchat.txt); `soda` names this package's
own stricter wording, and any file with the three placeholders works. Every prompt is judged twice, student first and reference first; a judgment scores S/(S+R)×100
(50 = parity with the reference), and a cell's score is the mean over its judgments.

Only the reply's first line is read, and marker-like text inside an answer is defused, so an answer that tries to
instruct the judge is judged as text. A reply whose first line is not just two scores from 1 to 10 is asked again
(`judge.parse_retries`), then counted as unparseable and reported — never dropped silently or scored as zero.
Reference answers and judgments go through `endpoint.collect`, so they are cached and a killed run resumes
without asking again for any finished one.
"""

from __future__ import annotations

import hashlib
import re
import statistics
from importlib import resources
from pathlib import Path

from ..config import EvaluateConfig, JudgeConfig, ScoredEndpointConfig, redact_url
from ..endpoint import ask, collect, cost_usd, estimate, request_key, sum_usage
from ..errors import SodaError
from ..append_log import AppendLog
from ..records import read_text_file
from .benchmarks import Benchmark, Item

ORDERS = ("student_first", "reference_first")
PLACEHOLDERS = ("{question}", "{answer_1}", "{answer_2}")
RERUN = "run the same command again"
MAX_TEMPLATE_BYTES = 64 << 10

# Text in an answer that looks like one of the templates' markers ("[The End of Assistant 1's Answer]", "[System]")
# is rewritten with parentheses, so an answer cannot end its own block and pose as the judge's instructions.
_MARKER = re.compile(r"\[(\s*(?:the\s+)?(?:(?:start|end)\s+of\s+)?(?:question|system|assistant\b[^\]\n]*))\]",
                     re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?!\w|\.\d)")
# What may stand beside the two scores on the first line: labels, "/10", and a few joining words.
_LABEL = re.compile(r"assistant\s*[12](?:'s)?|(?:/|out\s+of)\s*10\b|\b(?:scores?|ratings?|and|vs)\b", re.IGNORECASE)


FASTCHAT_SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
# Named templates: their file in data/ and their system prompt.
TEMPLATES = {
    "fastchat": ("judge_fastchat.txt", FASTCHAT_SYSTEM_PROMPT),
    "soda": ("judge_soda.txt", "You are a careful, impartial judge of the quality of AI assistants' answers."),
}


class UnparseableReply(ValueError):
    """A judge reply whose first line does not hold the two scores."""


def load_template(name: str) -> tuple[str, str]:
    """The judge prompt template and its name: a named one (TEMPLATES), or a user's file."""
    if name in TEMPLATES:
        return (resources.files("soda_distill") / "data" / TEMPLATES[name][0]).read_text(encoding="utf-8"), name
    path = name
    text = read_text_file(Path(path), "judge template", MAX_TEMPLATE_BYTES)  # it is sent with every judgment
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise SodaError(f"{path}: the judge template lacks {', '.join(missing)} (it needs {', '.join(PLACEHOLDERS)})")
    return text, str(path)


def render(template: str, question: str, answer_1: str, answer_2: str) -> str:
    """Fill the template in one pass (so a placeholder written inside an answer stays text), markers defused."""
    values = {p: _MARKER.sub(r"(\1)", v) for p, v in zip(PLACEHOLDERS, (question, answer_1, answer_2))}
    return re.sub("|".join(re.escape(p) for p in PLACEHOLDERS), lambda m: values[m.group(0)], template)


def question_text(prompt: list[dict]) -> str:
    """The question as the judge sees it: the user's message, or the whole conversation when there were turns before."""
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def parse_scores(reply: str) -> tuple[float, float]:
    """The two scores on the reply's first non-blank line ("8 5", "8, 5", "Assistant 1: 8 Assistant 2: 5", "8/10 5/10");
    other words there make it unparseable, and anything after that line is the explanation and is never read."""
    lines = [line for line in reply.splitlines() if line.strip()]
    if not lines:
        raise UnparseableReply("empty reply")
    first = lines[0]
    unlabelled = _LABEL.sub(" ", first)
    numbers = _NUMBER.findall(unlabelled)
    if len(numbers) != 2:
        raise UnparseableReply(f"the first line holds {len(numbers)} number(s), not two scores: {first[:120]!r}")
    if re.search(r"[^\W\d_]", _NUMBER.sub(" ", unlabelled)):
        raise UnparseableReply(f"the first line has words besides the two scores: {first[:120]!r}")
    scores = float(numbers[0]), float(numbers[1])
    if not all(1 <= s <= 10 for s in scores):
        raise UnparseableReply(f"score out of the range 1-10: {first[:120]!r}")
    return scores


def system_prompt(section: JudgeConfig) -> str:
    """The configured system prompt, else the named template's own (FastChat's for a file of one's own)."""
    if section.system_prompt is not None:
        return section.system_prompt
    return TEMPLATES.get(section.template, TEMPLATES["fastchat"])[1]


def judge_body(section: JudgeConfig, template: str, item: Item, answer_1: str, answer_2: str) -> dict:
    return {
        "model": section.model,
        "messages": [
            {"role": "system", "content": system_prompt(section)},
            {"role": "user", "content": render(template, question_text(item.prompt), answer_1, answer_2)},
        ],
        "temperature": section.temperature,
        "max_tokens": section.max_tokens,
    }


def judged(answers: list[dict]) -> dict:
    """The outcome of asking the judge `answers` times: the last reply's scores, or why it did not parse."""
    outcome = {"reply": answers[-1]["content"], "attempts": len(answers), "usage": sum_usage(answers)}
    try:
        return {"scores": list(parse_scores(answers[-1]["content"])), **outcome}
    except UnparseableReply as e:
        return {"scores": None, "error": str(e), **outcome}


async def judge_once(client, body: dict, section: JudgeConfig) -> dict:
    """Ask until the reply parses, at most 1 + `parse_retries` times. (Through the Batch API, a judgment is asked
    once: each retry would be another batch.)"""
    answers = []
    for _ in range(max(section.parse_retries, 0) + 1):
        answers.append(await ask(client, body, section, "evaluate.judge"))
        outcome = judged(answers)
        if outcome["scores"] is not None:
            break
    return outcome


def _spend(answers: list[dict], section: ScoredEndpointConfig, new_requests: int) -> dict:
    usage = sum_usage(answers)
    return {"model": section.model, "usage": usage, "cost_usd": cost_usd(usage, section), "requests_this_run": new_requests}


def _reference_jobs(r: ScoredEndpointConfig, benchmarks: list[Benchmark]) -> tuple[dict[str, list[str]], dict]:
    """Per benchmark its prompts' request keys, and the requests by key: (benchmark/id, body)."""
    keys, jobs = {}, {}
    for b in benchmarks:
        bodies = [{"model": r.model, "messages": it.prompt, "temperature": r.temperature, "max_tokens": r.max_tokens} for it in b.items]
        keys[b.name] = [request_key(r.base_url, body) for body in bodies]
        jobs.update({k: (f"{b.name}/{it.id}", body) for k, it, body in zip(keys[b.name], b.items, bodies)})
    return keys, jobs


def plan_requests(ev: EvaluateConfig, evaldir: Path, benchmarks: list[Benchmark], rows: int) -> list[str]:
    """--dry-run: the reference answers and judgments an evaluation of `rows` models would ask for, and their cost at
    most; the judgments' prompts are counted with answers of the longest allowed length, their cache not consulted
    (the answers are not made yet)."""
    lines = []
    if ev.judge.base_url and ev.reference.base_url:
        _, jobs = _reference_jobs(ev.reference, benchmarks)
        cache = evaldir / "reference_cache.jsonl"
        cached = set(AppendLog(cache, "key").records) if cache.exists() else set()
        lines.append(estimate(ev.reference, "evaluate.reference", [body for k, (_, body) in jobs.items() if k not in cached],
                              len(cached & set(jobs))))
    if ev.judge.base_url:
        template, _ = load_template(ev.judge.template)
        longest = "x" * 4 * ev.max_new_tokens  # estimated_usage counts 4 characters a token
        bodies = [judge_body(ev.judge, template, it, longest, it.reference or "x" * 4 * ev.reference.max_tokens)
                  for b in benchmarks for it in b.items]
        lines.append(estimate(ev.judge, "evaluate.judge", bodies * 2 * rows, 0) + " (both orders; a judgment asked "
                     f"again up to {ev.judge.parse_retries} times when its reply does not parse)")
    return lines or ["no endpoint asked: no evaluate.judge.base_url"]


def reference_answers(ev: EvaluateConfig, evaldir: Path, benchmarks: list[Benchmark]) -> tuple[dict[str, list[str | None]], dict]:
    """Per benchmark, the reference answer to each prompt: the benchmark's own, or the reference model's
    (`evaluate.reference`, greedy, asked once and cached)."""
    r = ev.reference
    if not r.base_url:
        return {b.name: [it.reference for it in b.items] for b in benchmarks}, {"source": "the benchmarks' reference answers"}
    keys, jobs = _reference_jobs(r, benchmarks)
    cache = AppendLog(evaldir / "reference_cache.jsonl", "key")
    new = collect(r, "evaluate.reference", jobs, cache, evaldir / "reference_failed.jsonl", "prompts got no reference answer", RERUN)
    answers = {name: [cache.records[k]["content"] for k in ks] for name, ks in keys.items()}
    return answers, {"source": f"{r.model} at {redact_url(r.base_url)}", **_spend([cache.records[k] for k in jobs], r, new)}


def run_judge(
    ev: EvaluateConfig, evaldir: Path, cells: dict[tuple[str, str], list[tuple[Item, str, str]]]
) -> tuple[dict[tuple[str, str], dict], dict]:
    """Judge every (item, student answer, reference answer) of every cell in both orders.

    Returns per cell a summary and the per-prompt judgments, and the totals: token usage, estimated cost,
    requests made by this call, and the unparseable count."""
    j = ev.judge
    template, template_name = load_template(j.template)
    keys: dict[tuple[str, str], list[dict[str, str]]] = {}
    jobs = {}
    for cell, triples in cells.items():
        keys[cell] = []
        for item, student, reference in triples:
            bodies = {
                "student_first": judge_body(j, template, item, student, reference),
                "reference_first": judge_body(j, template, item, reference, student),
            }
            per_order = {order: request_key(j.base_url, body) for order, body in bodies.items()}
            keys[cell].append(per_order)
            for order, body in bodies.items():
                jobs.setdefault(per_order[order], ("/".join((*cell, item.id, order)), body))
    cache = AppendLog(evaldir / "judge_cache.jsonl", "key")
    new = collect(j, "evaluate.judge", jobs, cache, evaldir / "judge_failed.jsonl", "judgments got no reply", RERUN,
                  call=lambda client, body: judge_once(client, body, j), record=lambda answer: judged([answer]))
    results = {}
    for cell, triples in cells.items():
        details, scores = [], {order: [] for order in ORDERS}
        for (item, _, _), per_order in zip(triples, keys[cell]):
            detail = {"id": item.id}
            for order in ORDERS:
                rec = cache.records[per_order[order]]
                shown = rec["scores"] or (None, None)  # as shown: assistant 1's, assistant 2's
                s, r = shown if order == "student_first" else shown[::-1]
                if s is not None:
                    scores[order].append(100 * s / (s + r))
                detail[order] = {"student": s, "reference": r, "reply": rec["reply"], "attempts": rec["attempts"], "error": rec.get("error")}
            details.append(detail)
        pooled = scores["student_first"] + scores["reference_first"]
        summary = {
            "score": round(statistics.fmean(pooled), 2) if pooled else None,
            **{order: round(statistics.fmean(v), 2) if v else None for order, v in scores.items()},
            "prompts": len(triples),
            "unparseable": {order: len(triples) - len(v) for order, v in scores.items()},
        }
        results[cell] = {"summary": summary, "details": details}
    totals = _spend([cache.records[k] for k in jobs], j, new)
    totals.update(
        template=template_name,
        template_sha256=hashlib.sha256(template.encode()).hexdigest(),
        system_prompt=system_prompt(j),
        temperature=j.temperature,
        judgments=len(jobs),
        unparseable=sum(cache.records[k]["scores"] is None for k in jobs),
    )
    return results, totals
