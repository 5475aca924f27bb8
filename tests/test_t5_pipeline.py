"""T5 pipeline end to end on tiny offline assets: fine-tuning lowers the loss and makes rank
classification and greedy generation agree; target-task merging; the CLI."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from t5_fixtures import t5_loaded, t5_tiny  # noqa: F401  (fixtures)

import bcjax
from bcjax.data import glue
from bcjax.pipelines import t5 as pipe
from bcjax.train import TrainConfig

CFG = TrainConfig(steps=40, batch_size=16, learning_rate=3e-3, weight_decay=0.0, warmup_steps=4)


@pytest.fixture(scope="module")
def mrpc(t5_tiny):  # noqa: F811
    return glue.load_glue("mrpc", data_dir=t5_tiny["data_dir"], val_size=16)


@pytest.fixture(scope="module")
def trained(t5_loaded, mrpc):  # noqa: F811
    model, params, tok = t5_loaded
    res, enc = pipe.finetune_task(model, params, tok, mrpc, CFG, max_input_length=32, progress=False)
    return res


def test_finetuning_lowers_loss_and_rank_agrees_with_generation(t5_loaded, mrpc, trained):  # noqa: F811
    model, params0, tok = t5_loaded
    assert trained.losses[-1] < 0.5 * trained.losses[0]
    out = pipe.evaluate_split(model, trained.params, tok, mrpc, "train", prediction="both", max_input_length=32,
                              batch_size=16)
    assert out["prediction"] == "both" and out["truncated"] == 0
    assert out["rank_generate_agreement"] == 100.0
    assert out["rank"]["accuracy"] >= 90 and out["rank"]["main_metric"] == "accuracy" and "f1" in out["rank"]
    before = pipe.evaluate_split(model, params0, tok, mrpc, "train", prediction="generate", max_input_length=32,
                                 batch_size=16)
    assert before["generate"]["accuracy"] < out["generate"]["accuracy"]


def test_predict_classes_rejects_unknown_method(t5_loaded, mrpc):  # noqa: F811
    model, params, tok = t5_loaded
    enc = glue.encode(mrpc, "test", tok, max_input_length=32)
    with pytest.raises(bcjax.errors.BcjaxError, match="prediction must be one of"):
        pipe.predict_classes(model, params, enc, glue.encode_choices(mrpc, tok), method="beam")


def _trees(seed=0):
    rng = np.random.default_rng(seed)

    def tree():
        return {"a": {"w": jnp.asarray(rng.normal(size=(40, 30)), jnp.float32)},
                "b": jnp.asarray(rng.normal(size=(50,)), jnp.float32), "step": jnp.asarray(3, jnp.int32)}

    return tree(), tree(), [tree(), tree(), tree()]


@pytest.mark.parametrize("method,hp", [("breadcrumbs", dict(beta=0.5, gamma=0.95)), ("task_arithmetic", {})])
def test_target_task_merge_alpha_zero_is_the_target(method, hp):
    base, target, aux = _trees()
    out = pipe.target_task_merge(target, base, aux, method, alpha=0.0, **hp)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), out, target)


def test_target_task_merge_formula():
    base, target, aux = _trees(1)
    taus = [bcjax.task_vector(a, base) for a in aux]
    ta = pipe.target_task_merge(target, base, aux, "task_arithmetic", alpha=0.3)
    np.testing.assert_allclose(ta["a"]["w"], target["a"]["w"] + 0.3 * sum(t["a"]["w"] for t in taus), rtol=1e-5,
                               atol=1e-6)
    bc = pipe.target_task_merge(target, base, aux, "breadcrumbs", alpha=0.5, beta=0.6, gamma=0.9)
    expect = target["b"] + 0.5 * sum(bcjax.breadcrumbs_mask(t["b"], 0.6, 0.9) * t["b"] for t in taus)
    np.testing.assert_allclose(bc["b"], expect, rtol=1e-5, atol=1e-6)
    assert int(bc["step"]) == 3
    with pytest.raises(bcjax.errors.TreeMismatchError):
        pipe.target_task_merge(target, base, [{**aux[0], "b": aux[0]["b"][:10]}], "task_arithmetic", alpha=0.1)


def test_target_task_experiment_picks_on_validation_and_reports_stderr():
    base, target, aux = _trees(2)
    second_seed = jax.tree.map(jnp.copy, target)

    def score(params, split):  # validation prefers alpha 0.2; test is a different function
        gap = float(jnp.abs(params["b"] - target["b"]).sum())
        truth = float(jnp.abs(0.2 * sum(a["b"] - base["b"] for a in aux)).sum())
        return -abs(gap - truth) if split == "val" else gap

    grids = {"task_arithmetic": {"alpha": [0.0, 0.2, 0.5]}}
    out = pipe.target_task_experiment(base, [target, second_seed], aux, score, grids)
    assert out["task_arithmetic"]["chosen"] == [{"alpha": 0.2}, {"alpha": 0.2}]
    assert out["finetuned"]["test"]["mean"] == 0.0 and out["task_arithmetic"]["test"]["n"] == 2
    ms = pipe.mean_and_stderr([1.0, 2.0, 4.0])
    assert ms["mean"] == pytest.approx(7 / 3) and ms["stderr"] == pytest.approx(np.std([1, 2, 4], ddof=1) / np.sqrt(3))


def test_cli_finetune_then_eval_with_target_task(t5_tiny, tmp_path, capsys):  # noqa: F811
    from bcjax.cli import main

    out = tmp_path / "run"
    cfg = {"pipeline": "t5", "model": {"name": t5_tiny["model"]},
           "data": {"tasks": ["mrpc", "sst2"], "data_dir": t5_tiny["data_dir"], "val_size": 16,
                    "max_input_length": 32, "truncation": "error"},
           "train": {"steps": 12, "batch_size": 16, "learning_rate": 3e-3, "weight_decay": 0.0, "warmup_steps": 2,
                     "seeds": [0]},
           "eval": {"prediction": "rank", "batch_size": 16}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["finetune", "--config", str(path), "--out", str(out), "--no-progress"]) == 0
    ft = json.loads((out / "finetune.json").read_text())
    assert ft["tasks"]["mrpc_seed0"]["train"]["final_loss"] < ft["tasks"]["mrpc_seed0"]["train"]["first_loss"]
    assert ft["tasks"]["sst2_seed0"]["test"]["prediction"] == "rank"
    cfg["data"]["tasks"] = ["mrpc"]
    cfg["target_task"] = {"aux_models": [str(out / "models" / "sst2_seed0")],
                          "grids": {"breadcrumbs": {"alpha": [0.0, 0.5], "beta": [0.5], "gamma": [0.99]},
                                    "task_arithmetic": {"alpha": [0.25]}}}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["eval", "--config", str(path), "--out", str(out), "--no-progress"]) == 0
    ev = json.loads((out / "eval.json").read_text())
    tt = ev["tasks"]["mrpc"]["target_task"]
    assert tt["prediction"] == "rank" and tt["metric"] == "accuracy"
    assert set(tt) >= {"finetuned", "breadcrumbs", "task_arithmetic"}
    assert tt["finetuned"]["test"]["values"] == [ev["tasks"]["mrpc"]["seed0"]["test"]["rank"]["main"]]
    assert tt["breadcrumbs"]["val"]["mean"] >= tt["finetuned"]["val"]["mean"]  # α = 0 is in the grid
    # bad configs: a clear one-line error, exit code 2
    capsys.readouterr()
    assert main(["finetune", "--config", str(path), "--out", str(out), "--set", "train.lr=0.1"]) == 2
    assert "unknown key 'train.lr'" in capsys.readouterr().err
    cfg["data"]["tasks"] = ["nope"]
    path.write_text(yaml.safe_dump(cfg))
    assert main(["eval", "--config", str(path), "--out", str(out)]) == 2
    assert "unknown GLUE task 'nope'" in capsys.readouterr().err


def test_interrupted_finetuning_resumes_from_its_checkpoint(t5_loaded, mrpc, tmp_path):  # noqa: F811
    model, params0, tok = t5_loaded
    cfg = TrainConfig(steps=6, batch_size=16, learning_rate=3e-3, weight_decay=0.0, warmup_steps=1,
                      checkpoint_every=3)
    full, _ = pipe.finetune_task(model, params0, tok, mrpc, cfg, max_input_length=32, progress=False)
    ckpt = str(tmp_path / "ckpt")
    first, _ = pipe.finetune_task(model, params0, tok, mrpc, cfg, max_input_length=32, progress=False,
                                  checkpoint_dir=ckpt, stop_after=3)
    assert len(first.losses) == 3 and first.resumed_from is None
    resumed, _ = pipe.finetune_task(model, params0, tok, mrpc, cfg, max_input_length=32, progress=False,
                                    checkpoint_dir=ckpt)
    assert resumed.resumed_from == 3 and len(resumed.losses) == 3
    np.testing.assert_allclose(resumed.losses, full.losses[3:], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                 resumed.params, full.params)


def test_every_registered_method_runs_on_t5_through_the_engine(t5_tiny, t5_loaded, trained, tmp_path):  # noqa: F811
    """The T5 ModelSuite provides what every method requires (PRNG key, Fishers, data-set
    sizes, Grams, model function, unlabeled inputs): `bcjax sweep` runs the select experiment
    with every registered method on two fine-tunes saved as `bcjax finetune` saves them, and
    the suite's accuracy is the pipeline's own rank-classification accuracy."""
    from bcjax.cli import main
    from bcjax.evaluate import stack_trees
    from bcjax.experiments import model_suite

    model, params0, tok = t5_loaded
    out = tmp_path / "run"
    rng = np.random.default_rng(0)
    fine_tunes = {"mrpc": jax.device_get(trained.params),  # the module's fine-tune; rte: a perturbed θ0 (cheap)
                  "rte": jax.tree.map(lambda a: np.asarray(a) + 0.02 * rng.standard_normal(np.shape(a)).astype(
                      np.float32), params0)}
    for task, params in fine_tunes.items():
        model.save_pretrained(str(out / "models" / f"{task}_seed0"), params=params)
    cfg = {"pipeline": "t5", "model": {"name": t5_tiny["model"]},
           "data": {"tasks": ["mrpc", "rte"], "data_dir": t5_tiny["data_dir"], "val_size": 16,
                    "max_input_length": 32, "truncation": "error"},
           "train": {"seeds": [0]}, "eval": {"batch_size": 16, "fisher_examples": 4, "gram_examples": 8}}
    t5_path = tmp_path / "t5.yaml"
    t5_path.write_text(yaml.safe_dump(cfg))
    # one point per method of configs/all_methods.yaml (a test keeps that file covering `bcjax methods`)
    with open("configs/all_methods.yaml") as f:
        methods = [{k: v for k, v in m.items() if k != "grid"} for m in yaml.safe_load(f)["methods"]]
    for m in methods:
        if m["name"] == "regmean":  # 8 examples × one decoder position < the FFN width: regularize the solve
            m["jitter"] = 1e-4
        if m["name"] == "adamerging":
            m["steps"] = 2
    sweep = {"experiment": "select", "suite": {"name": "t5", "config": str(t5_path), "out": str(out)},
             "models_per_call": 2, "methods": methods, "bootstrap_resamples": 50}
    sweep_path = tmp_path / "sweep.yaml"
    sweep_path.write_text(yaml.safe_dump(sweep))
    assert main(["sweep", "--config", str(sweep_path), "--out", str(tmp_path / "sweep"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert set(summary["methods"]) == set(bcjax.methods())
    for name, r in summary["methods"].items():
        assert set(r["acc"]) == {"mrpc", "rte"} and all(0.0 <= a <= 1.0 for a in r["acc"].values()), name
    # the suite scores a model as the pipeline does (rank classification, accuracy)
    suite = model_suite({"suite": {"name": "t5", "config": str(t5_path), "out": str(out)}}, progress=False)
    task = glue.load_glue("mrpc", data_dir=t5_tiny["data_dir"], val_size=16)
    own = pipe.evaluate_split(model, suite.finetuned[0], tok, task, "test", prediction="rank", max_input_length=32)
    acc = float(suite.evaluate(stack_trees([suite.finetuned[0]]), "mrpc", "test")[0])
    assert acc == pytest.approx(own["rank"]["accuracy"] / 100, abs=1e-12) and summary["finetuned_acc"]["mrpc"] == acc
    for x, y in zip(jax.tree.leaves(suite.finetuned[0]), jax.tree.leaves(fine_tunes["mrpc"]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # the saved fine-tune, as `bcjax finetune` saves it
