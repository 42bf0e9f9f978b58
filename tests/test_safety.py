"""Safety: a planted API key appears nowhere a full run writes or prints; weights load only from safetensors; a
model's own code never runs unless asked."""

import base64
from pathlib import Path

import pytest

from soda_distill.cli import main
from soda_distill.errors import SodaError
from soda_distill.models import load_model

KEY = "sk-planted-secret-4242"
URL_TOKEN = "planted-url-token-77"  # credentials in an endpoint's URL


def test_planted_key_absent_from_a_full_run_and_its_evaluation(tmp_path, prompts_file, qa_file, tiny_model_dir,
                                                              chat_server, counting_proxy, monkeypatch, capfd):
    """The teacher behind credentials in its URL (sent as basic auth), the judge behind the key: both really sent,
    neither written or printed."""
    monkeypatch.setenv("SODA_TEST_KEY", KEY)
    teacher = [f"base_url={chat_server['url'].replace('http://', f'http://user:{URL_TOKEN}@')}/v1",
               f"model={chat_server['model']}", "api_key_env=null", "max_tokens=8"]
    judge = [f"base_url={counting_proxy.url}/v1", f"model={chat_server['model']}", "api_key_env=SODA_TEST_KEY",
             "max_tokens=16"]
    run, evaluation = tmp_path / "run", tmp_path / "eval"
    assert main(["run", "--out", str(run), f"data.prompts={prompts_file}", f"student.model={tiny_model_dir}",
                 *[f"teacher.{e}" for e in teacher], "snapshot.max_new_tokens=8", "pairs.truncated_rejected=open",
                 "warmup.max_length=128", "distill.max_length=128"]) == 0
    assert main(["evaluate", str(run), "--out", str(evaluation), f"evaluate.benchmarks=[{qa_file}]", "evaluate.limit=2",
                 "evaluate.max_new_tokens=4", *[f"evaluate.judge.{e}" for e in judge]]) == 0
    assert counting_proxy.authorizations and set(counting_proxy.authorizations) == {f"Bearer {KEY}"}
    basic_auth = base64.b64encode(f"user:{URL_TOKEN}".encode())
    written = [p for p in [*run.rglob("*"), *evaluation.rglob("*")] if p.is_file()]
    assert len(written) > 20
    for path in written:
        data = path.read_bytes()
        assert not any(secret in data for secret in (KEY.encode(), URL_TOKEN.encode(), basic_auth)), path
    printed = capfd.readouterr()
    assert not any(secret in printed.out + printed.err for secret in (KEY, URL_TOKEN, basic_auth.decode()))


def test_weights_load_only_from_safetensors(tmp_path, tiny_model_dir):
    """A folder with pickled weights (which can run code when unpickled) is refused, not loaded."""
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_model_dir / "config.json", pickled)
    torch.save(load_file(tiny_model_dir / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(SodaError, match="safetensors"):
        load_model(str(pickled))


def test_a_model_path_that_is_not_there_is_one_line(tmp_path, capsys):
    from soda_distill.models import load_tokenizer

    missing = str(tmp_path / "modles" / "qwen")
    for load in (load_tokenizer, load_model):
        with pytest.raises(SodaError, match=f"^{missing}: cannot load the"):
            load(missing)
    # and a run refuses it before its first stage: no teacher is asked for answers the student could never use
    assert main(["run", "--out", str(tmp_path / "run"), f"student.model={missing}", "teacher.base_url=http://127.0.0.1:9/v1",
                 "teacher.model=m", "teacher.api_key_env=null"]) == 2
    assert capsys.readouterr().err == f"soda-distill: error: student.model: {missing}: no such folder or file\n"
    assert not (tmp_path / "run" / "teacher_cache.jsonl").exists()
    answers = tmp_path / "answers.jsonl"  # the teacher stage alone does not need the student
    answers.write_text('{"prompt": "Q?", "response": "A."}\n')
    assert main(["teacher", "--out", str(tmp_path / "run"), f"student.model={missing}", f"teacher.file={answers}"]) == 0


def test_model_code_never_runs_unless_asked(tmp_path, tiny_model_dir):
    """A model folder shipping its own modeling code (which would leave a marker file if it ran) is refused."""
    import json
    import shutil

    folder, marker = tmp_path / "remote", tmp_path / "code-ran"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="planted", auto_map={"AutoConfig": "planted.PlantedConfig",
                                                  "AutoModelForCausalLM": "planted.PlantedModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "planted.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    with pytest.raises(SodaError, match="trust_remote_code"):
        load_model(str(folder))
    assert not marker.exists()
    assert not Path(folder / "__pycache__").exists()


def test_credentials_in_a_url_are_redacted_and_a_resume_from_the_saved_config_keeps_its_fingerprints(tmp_path):
    from soda_distill.config import fingerprint, load_config, redact_url, save_config
    from soda_distill.endpoint import request_key

    assert redact_url("https://ann:s3cr3t@api.example.com:8443/v1?key=s3cr3t&x=1") == "https://***@api.example.com:8443/v1?key=***&x=***"
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    cfg = load_config(None, ["teacher.base_url=https://ann:s3cr3t@api.example.com/v1", "teacher.model=m"])
    save_config(cfg, tmp_path / "config.yaml")
    assert "s3cr3t" not in (tmp_path / "config.yaml").read_text()
    saved = load_config(tmp_path / "config.yaml")
    assert fingerprint(saved.teacher) == fingerprint(cfg.teacher)
    body = {"model": "m", "messages": []}  # the answers cached with the credentials are found without them
    assert request_key(saved.teacher.base_url, body) == request_key(cfg.teacher.base_url, body)


def test_request_headers_come_from_the_environment_and_are_written_nowhere(tmp_path, prompts_file, monkeypatch, capsys):
    from responder import Responder

    secret = "gateway-secret-5151"
    responder = Responder()
    run = tmp_path / "run"
    args = ["teacher", "--out", str(run), f"data.prompts={prompts_file}", f"teacher.base_url={responder.url}",
            "teacher.model=m", "teacher.api_key_env=null", "teacher.headers_env={X-Gateway-Token: SODA_GATEWAY}"]
    try:
        assert main(args) == 2  # the variable is not set yet: one line naming it
        assert "SODA_GATEWAY (teacher.headers_env.X-Gateway-Token) is not set" in capsys.readouterr().err
        monkeypatch.setenv("SODA_GATEWAY", secret)
        assert main(args) == 0
    finally:
        responder.close()
    assert len(responder.headers) == 12
    assert all(h.get("x-gateway-token") == secret for h in responder.headers)
    for path in (p for p in run.rglob("*") if p.is_file()):
        assert secret.encode() not in path.read_bytes(), path
    printed = capsys.readouterr()
    assert secret not in printed.out + printed.err


def test_credentials_in_a_url_reach_the_endpoint_as_basic_auth(tmp_path, prompts_file):
    import base64

    from responder import Responder

    responder = Responder()
    url = responder.url.replace("http://", "http://ann:s%40cret@")  # percent-encoded as a URL must carry "@"
    try:
        assert main(["teacher", "--out", str(tmp_path / "run"), f"data.prompts={prompts_file}", f"teacher.base_url={url}",
                     "teacher.model=m", "teacher.api_key_env=null"]) == 0
    finally:
        responder.close()
    assert {h["authorization"] for h in responder.headers} == {"Basic " + base64.b64encode(b"ann:s@cret").decode()}
