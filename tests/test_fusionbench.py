"""FusionBench protocols (SPEC §3 references, §4 robustness / generalization / scaling): the
multi-task reference training, each registered experiment end to end on the synthetic suite,
the report's keys, and each row against a plain reference computed here."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bcjax
from bcjax import experiments as E
from bcjax.config import ConfigError
from bcjax.evaluate import stack_trees
from bcjax.results_store import ResultsStore
from bcjax.train import TrainConfig, joint_loss, multitask_config, multitask_finetune

SUITE = {"name": "synthetic", "tasks": 3, "steps": 20}
METHODS = [{"name": "task_arithmetic", "alpha": 0.3}, {"name": "regmean", "nondiag": 0.95},
           {"name": "adamerging", "granularity": "task", "steps": 2, "learning_rate": 0.01},
           {"name": "adamerging", "granularity": "layer", "steps": 2, "learning_rate": 0.01}]


@pytest.fixture(scope="module")
def suite():
    return E.model_suite({"suite": SUITE}, cache_dir="unused", progress=False)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- multi-task training
def _linear_loss(params, batch, w_head):
    logits = (batch["x"] @ params["w"]) @ w_head
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], 1))


def test_joint_loss_is_the_mean_of_each_examples_own_task_loss():
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((4, 3)).astype(np.float32)}
    heads = rng.standard_normal((2, 3, 5)).astype(np.float32)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    y = rng.integers(0, 5, 6).astype(np.int32)
    task = np.array([0, 1, 1, 0, 1, 0], np.int32)
    got = float(joint_loss(_linear_loss)(params, {"x": x, "y": y, "task": task}, heads))
    logits = np.einsum("nd,dh,nhc->nc", x, params["w"], heads[task])
    ref = -np.mean(np.log(_softmax(logits)[np.arange(6), y]))
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_multitask_finetune_runs_the_combined_steps_and_fits_every_task(tmp_path):
    rng = np.random.default_rng(1)
    w_true = rng.standard_normal((4, 3)).astype(np.float32)
    heads = [(rng.standard_normal((3, 2)).astype(np.float32),) for _ in range(2)]
    data = []
    for (h,) in heads:
        x = rng.standard_normal((32, 4)).astype(np.float32)
        data.append({"x": x, "y": np.argmax(x @ w_true @ h, -1).astype(np.int32)})
    params = {"w": np.zeros((4, 3), np.float32) + 0.01}
    cfg = TrainConfig(steps=15, batch_size=8, learning_rate=0.05, weight_decay=0.0, warmup_steps=2)
    assert multitask_config(cfg, 2) == TrainConfig(steps=30, batch_size=8, learning_rate=0.05, weight_decay=0.0,
                                                   warmup_steps=4)
    res = multitask_finetune(_linear_loss, params, data, heads, cfg, checkpoint_dir=str(tmp_path / "mt"),
                             progress=False)
    assert len(res.losses) == 30
    before = [float(_linear_loss(params, d, *h)) for d, h in zip(data, heads)]
    after = [float(_linear_loss(res.params, d, *h)) for d, h in zip(data, heads)]
    assert all(a < b for a, b in zip(after, before)), (before, after)
    again = multitask_finetune(_linear_loss, params, data, heads, cfg, checkpoint_dir=str(tmp_path / "mt"),
                               progress=False)  # cached: the finished run is reloaded
    assert again.resumed_from == 30
    np.testing.assert_array_equal(np.asarray(again.params["w"]), np.asarray(res.params["w"]))


def test_multitask_finetune_rejects_heads_of_different_shapes():
    data = [{"x": np.zeros((4, 2), np.float32), "y": np.zeros(4, np.int32)}] * 2
    with pytest.raises(ValueError, match="heads differ in shape"):
        multitask_finetune(_linear_loss, {"w": np.zeros((2, 3), np.float32)}, data,
                           [(np.zeros((3, 2), np.float32),), (np.zeros((3, 4), np.float32),)],
                           TrainConfig(steps=1, batch_size=4, warmup_steps=0), progress=False)


def test_synthetic_multitask_reference_fits_every_task(suite):
    mt = stack_trees([suite.multitask()])
    pre = stack_trees([suite.pretrained])
    for t in suite.tasks:
        assert suite.evaluate(mt, t, "test")[0] > suite.evaluate(pre, t, "test")[0] + 0.2


# ----------------------------------------------------------------------------- experiments
def _core_hits(suite, tree, task, split="test"):
    return np.asarray(suite.correctness(stack_trees([tree]), task, split), bool)[0]


def test_robustness_rows_are_the_core_merge_on_corrupted_inputs(suite, tmp_path):
    cfg = {"experiment": "robustness", "suite": SUITE, "methods": METHODS[:2],
           "corruptions": ["gaussian_noise", "jpeg"], "severity": 2, "bootstrap_resamples": 200}
    s = E.run_sweep(cfg, out_dir=str(tmp_path), progress=False, suite=suite)
    assert s["conditions"] == ["clean", "gaussian_noise", "jpeg"]
    assert set(s["table"]["clean"]) == {"pretrained", "task_arithmetic", "regmean", "finetuned"}
    ta = bcjax.merge("task_arithmetic", suite.pretrained, suite.finetuned, alpha=0.3)
    fn0 = suite.requirement("model_fn", [suite.tasks[0]])[0]
    for t in suite.tasks:
        assert s["results"]["clean"]["task_arithmetic"][t]["accuracy"] == _core_hits(suite, ta, t).mean()
        x, y = suite.examples(t, "test")
        xc = suite.corrupt(x, "jpeg", 2, 0)
        fn = suite.requirement("model_fn", [t])[0]
        ref = np.mean(np.argmax(np.asarray(fn(ta, xc)), -1) == y)
        assert s["results"]["jpeg"]["task_arithmetic"][t]["accuracy"] == pytest.approx(ref)
    assert fn0 is not None
    # the corruption hurts; the per-condition normalizer is θk on the same corrupted inputs
    assert s["table"]["gaussian_noise"]["finetuned"] < s["table"]["clean"]["finetuned"]
    assert (tmp_path / "robustness.png").exists()


def test_generalization_merges_only_the_seen_tasks(suite, tmp_path):
    cfg = {"experiment": "generalization", "suite": SUITE, "methods": METHODS[:3], "seen": ["task0", "task2"],
           "bootstrap_resamples": 200}
    s = E.run_sweep(cfg, out_dir=str(tmp_path), progress=False, suite=suite)
    assert s["unseen_tasks"] == ["task1"] and set(s["table"]) == {"pretrained", "task_arithmetic", "regmean",
                                                                   "adamerging"}
    seen = [suite.finetuned[0], suite.finetuned[2]]
    ta = bcjax.merge("task_arithmetic", suite.pretrained, seen, alpha=0.3)
    rm = bcjax.merge("regmean", suite.pretrained, seen, nondiag=0.95,
                     grams=suite.requirement("grams", ["task0", "task2"]))
    for name, tree in (("task_arithmetic", ta), ("regmean", rm)):
        hits = {t: _core_hits(suite, tree, t) for t in suite.tasks}
        row = s["results"][name]
        assert row["unseen"] == hits["task1"].mean()
        assert row["seen"] == pytest.approx((hits["task0"].mean() + hits["task2"].mean()) / 2)
    with pytest.raises(ValueError, match="every task is seen"):
        E.run_sweep({**cfg, "seen": list(suite.tasks)}, out_dir=str(tmp_path / "all"), progress=False, suite=suite)


def test_scaling_curve_starts_at_the_pretrained_model_and_follows_the_core_merge(suite, tmp_path):
    cfg = {"experiment": "scaling", "suite": SUITE, "alphas": [0.0, 0.4, 1.0], "bootstrap_resamples": 200}
    s = E.run_sweep(cfg, out_dir=str(tmp_path), progress=False, suite=suite)
    assert set(s["curves"]) == {"task_arithmetic", "gradient_matching"}
    for m in s["curves"]:
        assert list(s["curves"][m]) == ["0", "0.4", "1"]
        assert s["curves"][m]["0"] == pytest.approx(s["pretrained"])  # α = 0 is θ0 for both
    ta = bcjax.merge("task_arithmetic", suite.pretrained, suite.finetuned, alpha=0.4)
    ref = np.mean([_core_hits(suite, ta, t).mean() for t in suite.tasks])
    assert s["curves"]["task_arithmetic"]["0.4"] == pytest.approx(ref)
    lo, hi = s["curves_ci95"]["task_arithmetic"]["0.4"]
    assert lo <= ref <= hi
    with pytest.raises(ValueError, match="no hyper-parameter 'alpha'"):
        E.run_sweep({**cfg, "methods": [{"name": "simple_average"}]}, out_dir=str(tmp_path / "x"), progress=False,
                    suite=suite)


def test_fusionbench_report_end_to_end_and_resumes(suite, tmp_path):
    cfg = {"experiment": "fusionbench", "suite": SUITE, "methods": METHODS,
           "robustness": {"methods": ["task_arithmetic", "adamerging[granularity=task]"], "corruptions": ["contrast"]},
           "generalization": {"methods": ["task_arithmetic", "regmean"]},
           "scaling": {"methods": ["task_arithmetic"], "alphas": [0.0, 0.5]}, "bootstrap_resamples": 200}
    s = E.run_sweep(cfg, out_dir=str(tmp_path), progress=False, suite=suite)
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("methods", "references", "robustness", "generalization", "scaling", "bootstrap", "load_average"):
        assert key in report, key
    labels = ["task_arithmetic", "regmean", "adamerging[granularity=task]", "adamerging[granularity=layer]"]
    assert list(report["methods"]) == labels
    assert list(report["references"]) == ["pretrained", "individual", "multitask", "simple_ensemble",
                                          "weighted_ensemble"]
    for row in [*report["methods"].values(), *report["references"].values()]:
        assert set(suite.tasks) <= set(row) and 0 <= row["average"] <= 1
        assert row["average_ci95"][0] <= row["average"] <= row["average_ci95"][1]
    assert report["references"]["individual"]["normalized_average"] == 1.0
    assert set(report["robustness"]) == {"clean", "contrast"}
    assert set(report["robustness"]["contrast"]) == {"pretrained", "task_arithmetic", "adamerging[granularity=task]",
                                                     "finetuned"}
    assert set(report["generalization"]["regmean"]) == {"seen", "unseen"}
    assert report["scaling"]["task_arithmetic"]["0"] == pytest.approx(report["references"]["pretrained"]["average"])
    # rows against references computed here
    ta = bcjax.merge("task_arithmetic", suite.pretrained, suite.finetuned, alpha=0.3)
    for t in suite.tasks:
        assert report["methods"]["task_arithmetic"][t]["accuracy"] == _core_hits(suite, ta, t).mean()
        x, y = suite.examples(t, "test")
        fn = suite.requirement("model_fn", [t])[0]
        probs = [_softmax(np.asarray(fn(ft, x), np.float64)) for ft in suite.finetuned]
        assert report["references"]["simple_ensemble"][t]["accuracy"] == pytest.approx(
            np.mean(np.argmax(np.mean(probs, 0), -1) == y))
        assert report["references"]["individual"][t]["accuracy"] == _core_hits(
            suite, suite.finetuned[suite.tasks.index(t)], t).mean()
    # per-task test loss: a plain numpy cross-entropy of the suite's logits, for trees only
    def xent(tree, t):
        x, y = suite.examples(t, "test")
        z = np.asarray(suite.requirement("model_fn", [t])[0](tree, x), np.float64)
        z = z - z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return -np.mean(logp[np.arange(len(y)), y])

    rm = bcjax.merge("regmean", suite.pretrained, suite.finetuned, nondiag=0.95,
                     grams=suite.requirement("grams", list(suite.tasks)))
    for name, tree in (("task_arithmetic", ta), ("regmean", rm)):
        row = report["methods"][name]
        for t in suite.tasks:
            assert row[t]["loss"] == pytest.approx(xent(tree, t), rel=1e-4)
        assert row["average_loss"] == pytest.approx(np.mean([row[t]["loss"] for t in suite.tasks]))
    for t in suite.tasks:
        assert report["references"]["pretrained"][t]["loss"] == pytest.approx(xent(suite.pretrained, t), rel=1e-4)
        own = suite.finetuned[suite.tasks.index(t)]
        assert report["references"]["individual"][t]["loss"] == pytest.approx(xent(own, t), rel=1e-4)
    for row in [*report["methods"].values(), *(report["references"][r] for r in ("pretrained", "individual",
                                                                                   "multitask"))]:
        assert all(np.isfinite(row[t]["loss"]) and row[t]["loss"] > 0 for t in suite.tasks)
    for r in ("simple_ensemble", "weighted_ensemble"):  # ensembles: no loss
        assert "average_loss" not in report["references"][r]
        assert all("loss" not in report["references"][r][t] for t in suite.tasks)
    md = (tmp_path / "report.md").read_text()
    assert "## Test loss" in md and "| *pretrained* |" in md.split("## Test loss")[1]
    assert "| *simple_ensemble* |" not in md.split("## Test loss")[1].split("##")[0]
    assert "| *multitask* |" in md and "## Robustness" in md and "![radar](radar.png)" in md
    assert (tmp_path / "radar.png").exists() and (tmp_path / "scaling.png").exists()
    # a rerun reads every row back from the results store: nothing new is stored, same report
    n = len(ResultsStore(str(tmp_path / "results.jsonl")))
    s2 = E.run_sweep(cfg, out_dir=str(tmp_path), progress=False, suite=suite)
    assert len(ResultsStore(str(tmp_path / "results.jsonl"))) == n
    assert s2["methods"] == s["methods"] and s2["robustness"] == s["robustness"]
    assert s2["references"] == s["references"]


def test_loss_of_stack_is_the_mean_cross_entropy_of_each_model_over_padded_batches():
    from bcjax.evaluate import loss_of_stack

    rng = np.random.default_rng(3)
    stacked = {"w": rng.standard_normal((3, 4, 5)).astype(np.float32)}
    x = rng.standard_normal((11, 4)).astype(np.float32)
    y = rng.integers(0, 5, 11).astype(np.int32)
    got = loss_of_stack(lambda p, xb: xb @ p["w"], stacked, x, y, batch_size=4, models_per_call=2)
    ref = [-np.mean(np.log(_softmax(x.astype(np.float64) @ w)[np.arange(11), y])) for w in stacked["w"]]
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_synthetic_suite_loss_matches_a_numpy_cross_entropy(suite):
    trees = [suite.pretrained, *suite.finetuned]
    t = suite.tasks[1]
    x, y = suite.examples(t, "test")
    fn = suite.requirement("model_fn", [t])[0]
    ref = [-np.mean(np.log(_softmax(np.asarray(fn(p, x), np.float64))[np.arange(len(y)), y])) for p in trees]
    np.testing.assert_allclose(suite.loss(stack_trees(trees), t, "test"), ref, rtol=1e-4)
    # the fine-tune on its own task has a lower loss than θ0
    assert ref[2] < ref[0]


@pytest.mark.parametrize("bad, match", [
    ({"methods": [{"name": "task_arithmetic", "grid": {"alpha": [0.1, 0.3]}}]}, "fixed hyper-parameters"),
    ({"robustness": {"corruptions": ["fog"]}}, "robustness.*fog"),
    ({"robustness": {"methods": ["ties"]}}, "not among the methods"),
    ({"scaling": {"alpha": [0.1]}}, "scaling.*unknown key 'alpha'"),
    ({"references": ["oracle"]}, "unknown.*oracle"),
])
def test_fusionbench_config_errors_name_the_key(tmp_path, bad, match):
    cfg = {"experiment": "fusionbench", "suite": {"name": "synthetic"}, "methods": METHODS[:1],
           "_source": "fb.yaml", **bad}
    with pytest.raises(ConfigError, match=match):
        E.run_sweep(cfg, out_dir=str(tmp_path), progress=False)


def test_fusionbench_config_parses_and_names_every_data_free_and_data_dependent_method():
    from bcjax.config import load_config
    from bcjax.experiments.fusionbench import FusionBenchSettings
    from bcjax.experiments.rows import labelled
    from bcjax.experiments.settings import parse_section

    s = parse_section(FusionBenchSettings, load_config("configs/fusionbench.yaml"))
    names = {m.name for m in s.methods}
    assert {"regmean", "adamerging", "ties", "fisher", "task_arithmetic", "breadcrumbs", "simple_average",
            "weighted_average", "gradient_matching"} <= names
    labels = [lab for lab, _, _ in labelled(s.methods)]
    assert "adamerging[granularity=layer,vectors=breadcrumbs]" in labels
    assert s.references == ["pretrained", "individual", "multitask", "simple_ensemble", "weighted_ensemble"]
    for sec in ("robustness", "generalization", "scaling"):
        assert s.section(sec) is not None


@pytest.mark.parametrize("name", ["robustness", "generalization", "scaling", "fusionbench"])
def test_protocol_configs_parse(name):
    from bcjax.config import load_config
    from bcjax.experiments.settings import parse_section

    cfg = load_config(f"configs/{name}.yaml")
    assert cfg["experiment"] == name
    parse_section(E.get_experiment(name).settings, cfg)


def test_fusionbench_without_a_suite_loss_reports_accuracy_only(suite, tmp_path):
    import dataclasses

    plain = dataclasses.replace(suite, loss=None)
    cfg = {"experiment": "fusionbench", "suite": SUITE, "methods": METHODS[:1], "references": ["pretrained"],
           "robustness": None, "generalization": None, "scaling": None, "bootstrap_resamples": 50}
    E.run_sweep(cfg, out_dir=str(tmp_path), progress=False, suite=plain)
    report = json.loads((tmp_path / "report.json").read_text())
    for row in (report["methods"]["task_arithmetic"], report["references"]["pretrained"]):
        assert "average_loss" not in row and all("loss" not in row[t] for t in suite.tasks)
    assert "## Test loss" not in (tmp_path / "report.md").read_text()


def test_fusionbench_clip_generalization_splits_hold_out_two_of_the_clip_tasks():
    """FusionBench's exp1/exp2 CLIP splits (its generalization model pools) name six of the CLIP
    config's eight tasks each, and their held-out pairs are exp1 {mnist, eurosat}, exp2
    {resisc45, svhn}."""
    import yaml

    from bcjax.experiments.generalization import FUSIONBENCH_CLIP_SEEN

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "configs", "clip_vit_b32.yaml")) as f:
        tasks = set(yaml.safe_load(f)["data"]["tasks"])
    unseen = {k: tasks - set(v) for k, v in FUSIONBENCH_CLIP_SEEN.items()}
    assert all(len(set(v)) == 6 and set(v) <= tasks for v in FUSIONBENCH_CLIP_SEEN.values())
    assert unseen == {"exp1": {"mnist", "eurosat"}, "exp2": {"resisc45", "svhn"}}
