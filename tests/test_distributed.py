"""Launched as two processes: `torchrun --nproc_per_node 2` over gloo on this CPU, as a user launches several GPUs.

Warmup and DPO on two ranks take the optimizer steps of one process accumulating the same global batch, to the same
weights; the main process alone writes the run directory; a launch killed mid-stage resumes under the same launch,
and a resume with another number of processes is refused in one line. GAD's two stages train on two ranks too, and
the on-policy dial refreshes each rank's own negatives.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from soda_distill.training import last_checkpoint

# Settings that make one step of two processes (batch 2 each) the step of one process accumulating two batches of 2.
SMALL = ["student.bf16=false", "snapshot.max_new_tokens=12", "pairs.truncated_rejected=open", "check.limit=0",
         "warmup.batch_size=2", "warmup.epochs=3", "warmup.learning_rate=3e-3", "warmup.warmup_ratio=0",
         "warmup.max_length=128", "distill.batch_size=2", "distill.epochs=3", "distill.learning_rate=2e-3",
         "distill.warmup_ratio=0", "distill.max_length=128"]
STEPS_PER_EPOCH = 3  # 12 examples, 2 per process per step, 2 processes
GAD_SMALL = ["gad.max_new_tokens=12", "gad.num_generations=2", "gad.batch_size=2", "gad.gradient_accumulation_steps=1",
             "gad.max_length=128", "gad.discriminator.batch_size=1", "gad.discriminator.only_steps=1", "gad.epochs=1"]


def command(processes: int, out: Path, *settings: str, method: str = "soda") -> list[str]:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
              if processes > 1 else [sys.executable])
    return [*launch, "-m", "soda_distill", "run", "--method", method, "--out", str(out), *settings]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def launch(processes: int, out: Path, *settings: str, method: str = "soda") -> subprocess.CompletedProcess:
    done = subprocess.run(command(processes, out, *settings, method=method), env=env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir):
    from conftest import QA, write_jsonl

    qa = write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl", QA)
    return [f"teacher.file={qa}", f"student.model={tiny_model_dir}", *SMALL]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, inputs) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    launch(2, out, *inputs)
    return out


def test_two_processes_train_the_steps_and_weights_of_one_accumulating(two_processes, inputs, tmp_path):
    one = tmp_path / "one"
    launch(1, one, *inputs, "warmup.gradient_accumulation_steps=2", "distill.gradient_accumulation_steps=2")
    manifest = json.loads((two_processes / "manifest.json").read_text())
    assert manifest["soda_distill"]["processes"] == 2
    assert (two_processes / "pairs.jsonl").read_text() == (one / "pairs.jsonl").read_text()  # on the main process
    for stage in ("warmup", "distill"):
        assert manifest["stages"][stage]["steps"] == 3 * STEPS_PER_EPOCH
        assert_same_weights(two_processes / stage, one / stage)
        losses = [m["loss"] for m in map(json.loads, (two_processes / stage / "metrics.jsonl").open()) if "loss" in m]
        assert len(losses) == 3 * STEPS_PER_EPOCH  # each step logged once, by the main process
        assert sum(losses[-3:]) < sum(losses[:3])
        assert not (two_processes / stage / "checkpoints").exists()
    assert not list(two_processes.rglob("*.tmp"))  # no half-written file of a second writer


def test_a_killed_launch_resumes_and_another_world_size_is_refused(two_processes, inputs, tmp_path):
    out = tmp_path / "killed"
    settings = [*inputs, "warmup.save_steps=2", "distill.save_steps=2"]
    launcher = subprocess.Popen(command(2, out, *settings), env=env(), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # a whole checkpoint in the second epoch (steps 3-5): the resumed epoch skips a step of an order not the first's
    while not (last_checkpoint(out / "warmup" / "checkpoints") or "").endswith("checkpoint-4"):
        assert launcher.poll() is None and time.time() < deadline, "the launch ended before its checkpoint of step 4"
        time.sleep(0.05)
    # The launcher and both ranks (torchrun starts each in a session of its own), as a scheduler's kill would.
    for process in [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]:
        process.kill()
    launcher.wait()

    refused = subprocess.run(command(1, out, *settings), env=env(), capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2
    assert "written by 2 process(es)" in refused.stderr and "Traceback" not in refused.stderr

    launch(2, out, *settings)
    warmup = json.loads((out / "manifest.json").read_text())["stages"]["warmup"]
    assert warmup["resumed_from_step"] == 4 and warmup["steps"] == 3 * STEPS_PER_EPOCH
    for stage in ("warmup", "distill"):
        assert_same_weights(out / stage, two_processes / stage)


def test_the_on_policy_dial_on_two_processes(inputs, tmp_path):
    """distill.refresh_every under DDP: each rank generates the rejected answers of its own micro-batches at the same
    steps, foreseen exactly (none generated late), into a folder of its own; the manifest sums the ranks' figures."""
    out = tmp_path / "dial"
    launch(2, out, *inputs, "distill.refresh_every=2", "snapshot.temperature=1.0")
    distill = json.loads((out / "manifest.json").read_text())["stages"]["distill"]
    steps, refresh = distill["steps"], distill["refresh"]
    points = list(range(2, steps, 2))
    assert steps == 3 * STEPS_PER_EPOCH and refresh["refreshes"] == len(points) and refresh["late"] == 0, refresh
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").open()]
    by_rank = {}
    for rank in (0, 1):
        files = sorted((out / "distill" / "refreshed" / f"rank-{rank}").glob("step-*.jsonl"))
        assert [int(f.stem.removeprefix("step-")) for f in files] == points
        by_rank[rank] = {int(f.stem.removeprefix("step-")): [json.loads(line) for line in f.open()] for f in files}
    for point in points:  # the block's pairs, 2 a micro-batch and a step on each rank, dealt to one rank or the other
        mine, theirs = ([r["pair"] for r in by_rank[rank][point]] for rank in (0, 1))
        assert len(mine) == len(theirs) == 2 * min(2, steps - point) and not set(mine) & set(theirs)
    records = [r for rank in by_rank.values() for block in rank.values() for r in block]
    assert refresh["answers"] == len(records) == 2 * 2 * (steps - 2)
    assert sum(r["text"] != pairs[r["pair"]]["rejected"][0]["content"] for r in records) >= len(records) // 2
    losses = [m["loss"] for m in map(json.loads, (out / "distill" / "metrics.jsonl").open()) if "loss" in m]
    assert len(losses) == steps and all(0 < loss < 10 for loss in losses)


def test_gad_trains_on_two_processes(two_processes, inputs):
    launch(2, two_processes, *inputs, *GAD_SMALL, method="gad")
    stages = json.loads((two_processes / "manifest.json").read_text())["stages"]
    per_epoch = 12 // (1 * 2)  # one prompt (two rollouts) per process a step
    assert stages["gad_warmup"]["steps"] == per_epoch and stages["gad"]["steps"] == per_epoch
    assert stages["gad"]["discriminator_updates"] == per_epoch
    for start, trained in (("warmup", "gad/generator"), ("gad/discriminator_warmup", "gad/discriminator")):
        before, after = weights(two_processes / start), weights(two_processes / trained)
        assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before), trained


def test_deepspeed_zero3_on_two_processes_trains_as_ddp_does(two_processes, inputs, tmp_path):
    """accelerate launch with the shipped ZeRO-3 config (DeepSpeed's CPU accelerator, gloo): warmup and DPO train the
    weights DDP trains, DPO starting at its reference q_w, and the final models are saved whole."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero3"
    root = Path(__file__).parents[1]

    def launch_zero3(*settings: str, method: str = "soda") -> None:
        done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                               str(root / "configs" / "accelerate" / "zero3.yaml"), "--num_processes", "2",
                               "--mixed_precision", "no", "-m", "soda_distill", "run", "--method", method,
                               "--out", str(out), *inputs, *settings],
                              env=env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    launch_zero3()
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert stages["distill"]["reward_margin"]["first"] == pytest.approx(0, abs=1e-4)
    for stage, atol in (("warmup", 1e-5), ("distill", 1e-3)):  # DPO's steps are 2e-3 (Adam): rounding shows more
        assert stages[stage]["steps"] == 3 * STEPS_PER_EPOCH
        losses = [[m["loss"] for m in map(json.loads, (run / stage / "metrics.jsonl").open()) if "loss" in m]
                  for run in (out, two_processes)]
        assert losses[0] == pytest.approx(losses[1], abs=1e-4) and losses[0][-1] < losses[0][0]
        wz, wd = weights(out / stage), weights(two_processes / stage)
        assert wz.keys() == wd.keys()
        for name in wz:
            torch.testing.assert_close(wz[name], wd[name], rtol=0, atol=atol, msg=name)
    # GAD too: its discriminator whole on each rank beside the sharded generator (and GRPO's reference)
    launch_zero3(*GAD_SMALL, method="gad")
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert stages["gad_warmup"]["steps"] == stages["gad"]["steps"] == stages["gad"]["discriminator_updates"] == 6
    assert (out / "gad" / "discriminator" / "model.safetensors").exists()


def test_lora_under_zero3_saves_whole_merged_models(inputs, tmp_path):
    """LoRA's warmup and DPO on 2 processes under ZeRO-3: the merged models are saved from gathered shards (they were
    saved empty, tensors of shape [0]) with a low-rank update in them, and DPO starts at its reference q_w."""
    pytest.importorskip("deepspeed")
    root, out = Path(__file__).parents[1], tmp_path / "lora"
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(root / "configs" / "accelerate" / "zero3.yaml"), "--num_processes", "2",
                           "--mixed_precision", "no", "-m", "soda_distill", "run", "--out", str(out), *inputs,
                           "student.lora.r=4", "student.lora.dropout=0", "warmup.epochs=1", "distill.epochs=1"],
                          env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    base = weights(Path(inputs[1].split("=", 1)[1]))
    for stage, start in (("warmup", base), ("distill", weights(out / "warmup"))):
        merged = weights(out / stage)
        assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in base.items()}
        name = "model.layers.0.self_attn.q_proj.weight"
        assert 0 < torch.linalg.matrix_rank((merged[name] - start[name]).double(), atol=1e-6) <= 4
        assert (out / stage / "adapter" / "adapter_model.safetensors").exists()
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert stages["distill"]["reward_margin"]["first"] == pytest.approx(0, abs=1e-4)


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("zero2", "DEEPSPEED"), ("zero3", "DEEPSPEED")])
def test_the_shipped_accelerate_configs_load(name, kind):
    """What `accelerate launch --config_file` reads them with (they run on GPUs only: see the README)."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).parents[1] / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.name == kind and config.mixed_precision == "bf16"
    assert f"--config_file configs/accelerate/{name}.yaml -m soda_distill" in (
        Path(__file__).parents[1] / "configs" / "accelerate" / f"{name}.yaml").read_text()
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2


def test_the_gpu_check_runs_dry_and_refuses_a_bad_part(tmp_path):
    """bench/gpu.sh --dry: every part's command checked (configs, overrides, methods, arguments), none run."""
    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    subprocess.run(["bash", str(root / "bench" / "gpu.sh"), "--dry"], env=env, check=True, capture_output=True, timeout=300)
    parts = json.loads((tmp_path / "gpu.json").read_text())["parts"]
    assert {"demo_soda", "throughput", "fsdp", "zero3", "zero2", "lora", "demo_gad", "shapes"} <= set(parts)
    assert all(p["returncode"] == "dry: checked" for n, p in parts.items() if isinstance(p, dict) and n != "replica"), parts
    assert parts["replica"]["returncode"] == "skipped: not in --parts"  # it runs only when named
    subprocess.run(["bash", str(root / "bench" / "gpu.sh"), "--dry", "--parts", "zero3,demo_gad,replica"], env=env,
                   check=True, capture_output=True, timeout=300)
    parts = json.loads((tmp_path / "gpu.json").read_text())["parts"]
    assert [n for n, p in parts.items() if isinstance(p, dict) and p["ok"]] == ["zero3", "demo_gad", "replica"]
    assert parts["fsdp"]["returncode"] == "skipped: not in --parts"
    unknown = subprocess.run(["bash", str(root / "bench" / "gpu.sh"), "--dry", "--parts", "zero4"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert unknown.returncode == 2 and "no part ['zero4']" in unknown.stderr

    sys.path.insert(0, str(root / "bench"))
    try:
        import gpu
    finally:
        sys.path.remove(str(root / "bench"))
    refused = gpu.dry_check([sys.executable, "-m", "soda_distill", "run", "configs/demo.yaml", "student.lora.rank=16"])
    assert not refused["ok"] and "rank" in refused["output_tail"]
    assert not gpu.dry_check([sys.executable, "-m", "soda_distill", "run", "configs/demo.yaml", "--method", "sodaa"])["ok"]


def test_the_gpu_bundle_is_gathered_over_calls_and_unpacked_once_whole(tmp_path):
    """bench/gpu.sh: bench/gpu_wheels.sh --replica's parts, carried one a call, kept on the machine between calls and
    unpacked, checked against their sums, once the last has come; a damaged part unpacks nothing."""
    root = Path(__file__).parents[1]
    checkout, bundle = tmp_path / "checkout", tmp_path / "bundle"
    (checkout / "bench").mkdir(parents=True)
    shutil.copy(root / "bench" / "gpu.sh", checkout / "bench")
    data = tmp_path / "payload" / "runs" / "alpaca_eval" / "data" / "AE-gpt-4o.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text('{"messages": []}\n' * 5000)
    with tarfile.open(tmp_path / "bundle.tar", "w") as tar:
        tar.add(tmp_path / "payload" / "runs", arcname="runs")
    whole = (tmp_path / "bundle.tar").read_bytes()
    parts = {f"part-{i}": whole[i * len(whole) // 2 : (i + 1) * len(whole) // 2] for i in range(2)}
    sums = "".join(f"{hashlib.sha256(b).hexdigest()}  {name}\n" for name, b in parts.items())
    # PYTHON=true: the install and bench/gpu.py are not this test's; what the script unpacks is
    env = {**os.environ, "PYTHON": "true", "SODA_GPU_BUNDLE": str(bundle)}

    def call(name: str, content: bytes) -> subprocess.CompletedProcess:  # one device call, carrying one part
        shutil.rmtree(checkout / ".gpu", ignore_errors=True)
        (checkout / ".gpu").mkdir()
        (checkout / ".gpu" / "SHA256SUMS").write_text(sums)
        (checkout / ".gpu" / name).write_bytes(content)
        return subprocess.run(["bash", str(checkout / "bench" / "gpu.sh")], env=env, capture_output=True, text=True,
                              timeout=60)

    first = call("part-1", parts["part-1"])
    assert first.returncode == 0 and first.stdout.strip() == "bundle: 1 of 2 parts on this machine; carry the next"
    damaged = call("part-0", parts["part-0"][:-1] + b"!")
    assert damaged.returncode == 1 and "part-0 damaged in transfer" in damaged.stdout
    assert not (checkout / "runs").exists()
    assert call("part-0", parts["part-0"]).returncode == 0
    assert (checkout / "runs" / "alpaca_eval" / "data" / "AE-gpt-4o.jsonl").read_text() == data.read_text()


def test_the_shapes_figures_are_soda_over_stock_and_a_missing_measurement_leaves_none():
    """bench/gpu_shapes.py: MFU is model FLOP/s over the peak, the speedups soda's tokens/s over stock TRL's."""
    root = Path(__file__).parents[1]
    sys.path.insert(0, str(root / "bench"))
    try:
        import gpu_shapes
    finally:
        sys.path.remove(str(root / "bench"))
    def run(tokens_per_s, peak_gpu_mb):
        return {"ok": True, "tokens_per_s": tokens_per_s, "flops_per_token": 6e9, "peak_gpu_mb": [peak_gpu_mb]}

    measured = {"sft_soda": run(20_000, 30_000), "sft_stock": run(16_000, 40_000), "dpo_soda": run(10_000, 50_000),
                "dpo_stock": {"ok": False, "returncode": 1}}
    figures = gpu_shapes.figures(measured, peak_tflops=989)
    assert figures["sft_mfu"] == round(20_000 * 6e9 / 989e12, 4)
    assert measured["sft_stock"]["mfu"] == round(16_000 * 6e9 / 989e12, 4)
    assert figures["sft_speedup"] == 1.25 and figures["sft_memory_ratio"] == 0.75
    assert figures["dpo_mfu"] is not None and figures["dpo_speedup"] is None and figures["dpo_memory_ratio"] is None
    assert gpu_shapes.figures(measured, peak_tflops=None)["sft_mfu"] is None


def test_the_paper_setting_is_a_config_and_a_launch_command():
    """configs/paper.yaml loads as the paper's setting, and the launches it and the SLURM template name exist."""
    from soda_distill.config import load_config

    root = Path(__file__).parents[1]
    cfg = load_config(str(root / "configs" / "paper.yaml"))
    assert cfg.student.model == "Qwen/Qwen2.5-7B-Instruct" and cfg.teacher.max_tokens == 1536
    assert cfg.snapshot.max_new_tokens == cfg.evaluate.max_new_tokens == 1536 and cfg.warmup.max_length == 3584
    assert 8 * cfg.warmup.batch_size * cfg.warmup.gradient_accumulation_steps == 64
    header = (root / "configs" / "paper.yaml").read_text() + (root / "configs" / "slurm" / "soda.sbatch").read_text()
    assert "--config_file configs/accelerate/zero3.yaml" in header
    subprocess.run(["bash", "-n", str(root / "configs" / "slurm" / "soda.sbatch")], check=True)
