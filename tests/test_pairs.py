import json

from soda_distill.config import load_config
from soda_distill.manifest import RunDir
from soda_distill.stages.pairs import run_pairs


def conv(i, prompt, answer):
    return {"id": i, "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def test_pairs_format_and_drops(tmp_path, tiny_model_dir):
    run = RunDir(tmp_path / "run")
    teacher = [conv("a", "Name a color.", "Red."), conv("b", "Name a fruit.", "Apple."), conv("c", "Say hi.", "Hi!"),
               conv("d", "Tell a story.", "Once upon a time."), conv("e", "Name a planet.", "Mars.")]
    student = [conv("a", "Name a color.", "I think blue."), conv("b", "Name a fruit.", " Apple. "),
               conv("c", "Say hi.", "   "), conv("d", "Tell a story.", "word " * 300)]
    for name, recs in (("teacher.jsonl", teacher), ("snapshot.jsonl", student)):
        run.file(name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = load_config(None, [f"student.model={tiny_model_dir}", "pairs.max_length=128"])
    pairs = [json.loads(line) for line in run_pairs(cfg, run).read_text().splitlines()]
    assert pairs == [{
        "id": "a",
        "prompt": [{"role": "user", "content": "Name a color."}],
        "chosen": [{"role": "assistant", "content": "Red."}],
        "rejected": [{"role": "assistant", "content": "I think blue."}],
    }]
    info = run.manifest()["stages"]["pairs"]
    assert info["kept"] == 1
    assert info["dropped"] == {"identical": 1, "empty_rejected": 1, "too_long": 1, "no_student_response": 1}
    assert info["lengths"]["chosen"]["max"] >= 2 and info["lengths"]["prompt"]["mean"] > 0
