import json
import math

import numpy as np
import pytest
import scipy.stats
import torch
from conftest import QUESTIONS

from soda_distill.errors import SodaError
from soda_distill.evaluation.analyze import activation_entropy, analyze, kurtosis, last_token_states, linear_cka
from soda_distill.models import load_model, load_tokenizer

PROMPTS = [[{"role": "user", "content": q}] for q in QUESTIONS] + [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Explain rainbows in one line."}],
    [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Name three rivers, longest first, with their continents."}],
]


def paper_cka(X, Y):
    """The paper's formula, literally: ‖XᵀY‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) on centered matrices."""
    X, Y = X - X.mean(0), Y - Y.mean(0)
    return np.linalg.norm(X.T @ Y) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))


@pytest.mark.parametrize("n, d", [(500, 16), (20, 64)])  # more samples than features, and fewer
def test_cka_invariances(n, d):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, d)) * rng.uniform(0.1, 10, d)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    assert linear_cka(X, X) == pytest.approx(1, abs=1e-12)
    assert linear_cka(X, X @ Q) == pytest.approx(1, abs=1e-12)
    assert linear_cka(X, 3.7 * X + 5.0) == pytest.approx(1, abs=1e-12)
    Y = X @ rng.standard_normal((d, d // 2)) + rng.standard_normal((n, d // 2))
    assert linear_cka(X, Y) == pytest.approx(paper_cka(X, Y), rel=1e-10)
    assert linear_cka(X, Y) == pytest.approx(linear_cka(Y, X), rel=1e-12)


def test_cka_independent_is_low_and_constant_is_undefined():
    rng = np.random.default_rng(1)
    X, Y = rng.standard_normal((5000, 8)), rng.standard_normal((5000, 8))
    assert linear_cka(X, Y) < 0.1
    constant = np.tile(rng.standard_normal(8) * 0.1, (5000, 1))
    assert math.isnan(linear_cka(constant, X)) and math.isnan(linear_cka(constant, constant))


def test_kurtosis_and_entropy_match_scipy():
    rng = np.random.default_rng(2)
    for sample in (rng.standard_normal(10_000), rng.standard_t(3, 10_000), rng.uniform(size=(50, 40))):
        assert kurtosis(sample) == pytest.approx(scipy.stats.kurtosis(sample.ravel()), rel=1e-10)
        edges = np.linspace(sample.min(), sample.max(), 101)
        counts, _ = np.histogram(sample, edges)
        assert activation_entropy(sample, edges) == pytest.approx(scipy.stats.entropy(counts), rel=1e-12)
    assert kurtosis(rng.standard_normal(200_000)) == pytest.approx(0, abs=0.05)
    assert activation_entropy(np.arange(8.0), np.linspace(0, 8, 9)) == pytest.approx(math.log(8))
    assert math.isnan(kurtosis(np.ones(10)))


def test_last_token_states_independent_of_padding_and_batching(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    runs = []
    for side, batch_size in (("right", 1), ("right", 5), ("left", 5)):
        tokenizer.padding_side = side
        runs.append(last_token_states(model, tokenizer, PROMPTS, batch_size=batch_size))
    assert len(runs[0]) == model.config.num_hidden_layers + 1
    assert runs[0][0].shape == (len(PROMPTS), model.config.hidden_size) and runs[0][0].dtype == np.float64
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_allclose(a, b, atol=1e-5)
    # Unbatched reference for one multi-turn prompt: the final layer of its last token.
    ids = tokenizer.apply_chat_template(PROMPTS[-1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        ref = model(**ids, output_hidden_states=True).hidden_states[-1][0, -1].double().numpy()
    np.testing.assert_allclose(runs[2][-1][-1], ref, atol=1e-5)


@pytest.fixture(scope="module")
def perturbed_model_dir(tiny_model_dir, tmp_path_factory):
    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("perturbed")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_analyze_writes_json_and_plots(tmp_path, tiny_model_dir, perturbed_model_dir):
    models = {"base": str(tiny_model_dir), "copy": str(tiny_model_dir), "perturbed": str(perturbed_model_dir)}
    result = analyze(models, PROMPTS, tmp_path / "out", batch_size=4, bins=50, bf16=False)
    assert json.loads((tmp_path / "out" / "analysis.json").read_text()) == result
    for png in ("cka.png", "activation_stats.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["num_prompts"] == len(PROMPTS) and result["num_layers"] == 3  # embeddings + 2 layers
    assert result["binning"]["bins"] == 50
    stats = result["models"]
    assert list(stats) == ["base", "copy", "perturbed"]
    for name in stats:
        assert len(stats[name]["cka"]) == 3
        # Every prompt ends with the same generation-prompt token, so the embedding layer has no variance.
        assert stats[name]["cka"][0] is None
        assert 0 < stats[name]["final_layer_entropy"] <= math.log(50)
        assert isinstance(stats[name]["final_layer_kurtosis"], float)
    for name in ("base", "copy"):
        assert stats[name]["cka"][1:] == pytest.approx([1, 1], abs=1e-9)
    assert stats["copy"]["final_layer_kurtosis"] == pytest.approx(stats["base"]["final_layer_kurtosis"])
    assert min(stats["perturbed"]["cka"][1:]) < 0.99
    assert stats["perturbed"]["final_layer_kurtosis"] != pytest.approx(stats["base"]["final_layer_kurtosis"])


def test_analyze_refuses_missing_base(tmp_path, tiny_model_dir):
    with pytest.raises(SodaError, match="base model 'q0'"):
        analyze({"base": str(tiny_model_dir)}, PROMPTS, tmp_path, base="q0")
