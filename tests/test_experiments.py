"""Experiments as compiled programs (SPEC §4): subset contraction = core merges, validation-free
tuning never reads test, resume after a killed sweep, class splits, CLI end to end."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import bcjax
from bcjax import experiments as E
from bcjax.config import ConfigError
from bcjax.evaluate import unstack_tree
from bcjax.results_store import ResultsStore

SUITE = {"name": "synthetic", "tasks": 4, "steps": 30}


@pytest.fixture(scope="module")
def suite():
    return E.model_suite({"suite": SUITE}, cache_dir="unused", progress=False)


@pytest.fixture(scope="module")
def split_suite():
    return E.model_suite({"suite": {"name": "synthetic", "classes": 6, "classes_per_task": 2, "steps": 30}},
                         cache_dir="unused", progress=False)


class Recorder:
    """Wraps a suite's evaluate: records (split, task, models) and can die after N calls."""

    def __init__(self, evaluate, die_after=None):
        self.evaluate, self.die_after, self.calls = evaluate, die_after, []

    def __call__(self, stacked, task, split):
        if self.die_after is not None and len(self.calls) >= self.die_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls.append((split, task, jax.tree.leaves(stacked)[0].shape[0]))
        return self.evaluate(stacked, task, split)


def test_fine_tunes_help(suite):
    from bcjax.evaluate import stack_trees

    for t, ft in zip(suite.tasks, suite.finetuned, strict=True):
        acc = suite.evaluate(stack_trees([suite.pretrained, ft]), t, "val")
        assert acc[1] > acc[0] + 0.1, (t, acc)


@pytest.mark.parametrize("method,hp", [("breadcrumbs", dict(alpha=0.4, beta=0.8, gamma=0.99)),
                                       ("task_arithmetic", dict(alpha=0.4)), ("ties", dict(density=0.3, alpha=1.0))])
def test_subset_builder_equals_core_merges(suite, method, hp):
    """The merged models the sweep evaluates are the core API's merges of each subset."""
    from bcjax import sweeps

    ind = sweeps.all_subsets(len(suite.tasks))
    build = E.method_builder(suite, method, hp, ind)
    idx = np.array([0, 3, 7, 15])
    for j, tree in enumerate(unstack_tree(build(idx))):
        members = [f for f, on in zip(suite.finetuned, ind[idx[j]], strict=True) if on]
        expect = bcjax.merge(method, suite.pretrained, members, **hp) if members else suite.pretrained
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(expect), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_grid_builder_equals_core_merges_exactly(suite):
    from bcjax import grids, sweeps

    pairs = grids.beta_gamma_pairs([0.0, 0.7], [0.95, 1.0])
    points = [(a, b, g) for b, g in pairs for a in (0.5, 1.0)]
    rows = np.tile(sweeps.all_subsets(4, [2]), (len(points), 1))[: len(points)]
    build = E.grid_builder(suite, pairs, points, rows, np.arange(len(points)))
    for j, tree in enumerate(unstack_tree(build(np.arange(len(points))))):
        a, b, g = points[j]
        members = [f for f, on in zip(suite.finetuned, rows[j], strict=True) if on]
        expect = bcjax.merge("breadcrumbs", suite.pretrained, members, alpha=a, beta=b, gamma=g)
        for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(expect), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_validation_free_never_reads_test(suite):
    rec = Recorder(suite.evaluate)
    s = suite.with_evaluate(rec)
    variants = {"breadcrumbs": {"betas": [0.5, 0.8], "gammas": [0.99]}, "task_arithmetic": {}}
    # tuning alone with a data source that raises on any test access
    def no_test(stacked, task, split):
        if split == "test":
            raise AssertionError("tuning touched the test split")
        return suite.evaluate(stacked, task, split)

    tuned = E.tune_validation_free(suite.with_evaluate(no_test), ResultsStore(None), tune_size=2,
                                   alphas=[0.3, 1.0], betas=[0.5, 0.8], gammas=[0.99], progress=False)
    assert tuned["beta"] in (0.5, 0.8) and len(tuned["grid"]) == 4
    # the guard itself: a tuning evaluate asked for test raises
    guarded = E.guard_splits(suite.evaluate, ("val",), "tuning")
    with pytest.raises(E.SplitAccessError, match="test"):
        guarded(jax.tree.map(lambda x: np.asarray(x)[None], suite.pretrained), suite.tasks[0], "test")
    # the whole experiment: every val read happens before the first test read
    res = E.validation_free_experiment(s, ResultsStore(None), tune_size=2, variants=variants, alphas=[0.3, 1.0],
                                       progress=False)
    splits = [c[0] for c in rec.calls]
    first_test = splits.index("test")
    assert "val" not in splits[first_test:] and "test" not in splits[:first_test]
    bc = res["variants"]["breadcrumbs"]
    assert bc["hparams"] == {k: tuned[k] for k in ("alpha", "beta", "gamma")}
    assert sorted(bc["test_curve"]) == [2, 3, 4]
    assert res["variants"]["task_arithmetic"]["hparams"]["beta"] == 0.0
    assert res["variants"]["task_arithmetic"]["variant"] == "no mask"


def test_resume_after_killed_sweep(suite, tmp_path):
    path = tmp_path / "results.jsonl"
    methods = [("breadcrumbs", dict(alpha=0.5, beta=0.8, gamma=0.99))]
    killed = Recorder(suite.evaluate, die_after=4 + 4 * 2)  # refs (4 tasks) + 2 chunks of 4 tasks
    with pytest.raises(KeyboardInterrupt):
        E.subsets_experiment(suite.with_evaluate(killed), ResultsStore(path), methods=methods, chunk=4,
                             progress=False)
    done = len(ResultsStore(path))
    assert done == 4 + 2 * 4  # 4 references + 2 finished chunks of 4 subsets
    with open(path, "a") as f:
        f.write('{"key": "cut off')  # a write cut off by the kill
    rerun = Recorder(suite.evaluate)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        store = ResultsStore(path)
    res = E.subsets_experiment(suite.with_evaluate(rerun), store, methods=methods, chunk=4, progress=False)
    evaluated = sum(m for _, _, m in rerun.calls) // len(suite.tasks)
    assert evaluated == 16 - 8  # only the unfinished subsets, no reference recomputed
    full = E.subsets_experiment(suite, ResultsStore(None), methods=methods, chunk=4, progress=False)
    assert res["methods"]["breadcrumbs"]["all"] == full["methods"]["breadcrumbs"]["all"]
    third = Recorder(suite.evaluate)
    with pytest.warns(RuntimeWarning, match="corrupt"):  # the cut-off line stays, skipped again
        store = ResultsStore(path)
    E.subsets_experiment(suite.with_evaluate(third), store, methods=methods, chunk=4, progress=False)
    assert third.calls == []


def test_split_classes_and_subsets():
    assert E.split_classes(6, 2) == [(0, 1), (2, 3), (4, 5)]
    assert E.split_classes(4, 2, order=[3, 1, 0, 2]) == [(3, 1), (0, 2)]
    with pytest.raises(ValueError, match="cannot be split"):
        E.split_classes(5, 2)
    with pytest.raises(ValueError, match="permutation"):
        E.split_classes(4, 2, order=[0, 0, 1, 2])
    x = np.arange(10)[:, None].astype(np.float32)
    y = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    xs, ys = E.class_subset(x, y, (3, 1))
    assert xs[:, 0].tolist() == [1, 3, 6, 8] and ys.tolist() == [1, 0, 1, 0]
    assert E.prefix_indicator(3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_class_split_incremental(split_suite):
    s = split_suite
    assert s.tasks == ("classes-0-1", "classes-2-3", "classes-4-5")
    rec = Recorder(s.evaluate)
    res = E.class_split_experiment(s.with_evaluate(rec), ResultsStore(None),
                                   methods=[("task_arithmetic", dict(alpha=1.0)), ("ties", dict(density=0.5))],
                                   chunk=3, progress=False)
    steps = res["methods"]["task_arithmetic"]["steps"]
    assert [sorted(st["acc"]) for st in steps] == [["classes-0-1"], ["classes-0-1", "classes-2-3"], list(s.tasks)]
    # step 1 with alpha = 1 is the first fine-tune itself
    assert steps[0]["avg_normalized_acc"] == pytest.approx(1.0)
    assert {c[0] for c in rec.calls} == {"test"}
    assert len(res["methods"]["ties"]["steps"]) == 3


def test_cli_sweep_end_to_end(tmp_path):
    cfg = tmp_path / "grid.yaml"
    cfg.write_text("experiment: grid\nsuite: {name: synthetic, tasks: 3, steps: 20}\n"
                   "alphas: [0.5, 1.0]\nbetas: [0.0, 0.8]\ngammas: [0.99, 1.0]\n")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "bcjax.cli", "sweep", "--config", str(cfg), "--out", str(out), "--no-progress",
           "--cache-dir", str(tmp_path / "cache"), "--set", "alphas=[0.5,1.0]"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == "grid" and len(summary["points"]) == 2 * 4
    assert {p["variant"] for p in summary["points"]} == {"no mask", "bottom-only", "top-only", "breadcrumbs"}
    for png in ("grid_heatmap.png", "grid_violins.png"):
        assert (out / png).stat().st_size > 5000
    assert json.loads(proc.stdout)["best"] == summary["best"]
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3 + 3 + 8  # fine-tuned references (accuracy + per-example correctness), 8 grid points
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: nope\nsuite: {name: synthetic}\n")
    proc = subprocess.run([*cmd[:5], str(bad), "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "unknown experiment 'nope'" in proc.stderr


def test_sweep_speed_bench_smoke(tmp_path):
    """bench/sweep_speed.py runs (tiny MLP) and writes its schema; not a timing test."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import sweep_speed

    assert sweep_speed.main(["--smoke", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "sweep_speed.json").read_text())
    assert r["subsets"] == 8 and r["tasks"] == 3 and 0 < r["merge_share_of_sweep"] <= 1
    assert "sweep total" in (tmp_path / "sweep_speed.md").read_text()


@pytest.mark.slow
def test_dinov2_suite_subsets_and_cosine(demo_cache, tmp_path):
    """The embedded DINOv2 suite through run_sweep (reuses the quick demo's cached fine-tunes
    when tests/test_demo.py ran first in the session)."""
    cfg = {"experiment": "subsets", "suite": {"name": "dinov2_demo", "preset": "quick",
                                              "eval_examples": {"test": 16}},
           "cache_dir": demo_cache, "sizes": [0, 1, 3], "models_per_call": 2,
           "methods": [{"name": "breadcrumbs", "alpha": 0.3, "beta": 0.9, "gamma": 0.99}]}
    s = E.run_sweep(cfg, out_dir=str(tmp_path / "subsets"), progress=False)
    curve = s["methods"]["breadcrumbs"]["observed"]
    assert sorted(curve) == ["0", "1", "3"] and all(0 < v < 1.5 for v in curve.values())
    assert s["points_stored"] == 3 + 1 + 3 + 1
    cos = {k: v for k, v in cfg.items() if k not in ("sizes", "methods")}  # keys of the subsets experiment
    c = E.run_sweep({**cos, "experiment": "cosine", "settings": [[0.9, 0.99]]}, out_dir=str(tmp_path / "cos"),
                    progress=False)
    m = np.array(c["matrices"]["raw task vectors"])
    assert m.shape == (3, 3) and np.allclose(np.diag(m), 1, atol=1e-4)


def test_subsets_sweep_on_a_mesh_is_bit_identical(suite, tmp_path):
    """`mesh:` shards the stacked task vectors over 8 fake devices; the merged models and
    every stored accuracy equal the unsharded sweep's."""
    from bcjax import sweeps

    assert len(jax.devices()) == 8
    mesh = E.sweep_mesh({"mesh": {"axis": "models"}})
    ind = sweeps.all_subsets(len(suite.tasks))
    hp = dict(alpha=0.4, beta=0.8, gamma=0.99)
    idx = np.array([1, 6, 11, 15])
    plain = E.method_builder(suite, "breadcrumbs", hp, ind)(idx)
    sharded = E.method_builder(suite, "breadcrumbs", hp, ind, mesh)(idx)
    assert any(len(leaf.sharding.device_set) == 8 for leaf in jax.tree.leaves(sharded))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    cfg = {"experiment": "subsets", "methods": [{"name": "breadcrumbs", **hp}], "models_per_call": 4}
    one = E.run_sweep(cfg, out_dir=str(tmp_path / "plain"), progress=False, suite=suite)
    eight = E.run_sweep({**cfg, "mesh": {"axis": "models", "devices": 8}}, out_dir=str(tmp_path / "mesh"),
                        progress=False, suite=suite)
    assert one["methods"] == eight["methods"]
    with pytest.raises(ConfigError, match="mesh.devices"):
        E.sweep_mesh({"mesh": {"devices": 99}})


def test_every_registered_method_runs_through_select_with_its_requirements(suite):
    """Requirements (PRNG key from `seed`, Fishers, data-set sizes, Grams, model_fn, unlabeled
    test inputs) come from the suite; the selected merge equals the core merge with those inputs."""
    from bcjax.experiments.engine import method_inputs

    specs = E.parse_methods({"methods": [{"name": n} for n in bcjax.methods()]})
    res = E.select_and_test(suite, ResultsStore(None), methods=specs, progress=False)
    assert set(res["methods"]) == set(bcjax.methods())
    for name, r in res["methods"].items():
        assert set(r["acc"]) == set(suite.tasks) and 0 < r["avg_normalized_acc"] < 2, name
    hp = method_inputs(suite, "gradient_matching", {"alpha": 0.5}, list(suite.tasks))
    assert len(hp["fishers"]) == 4 and hp["dataset_sizes"] == [96] * 4
    assert method_inputs(suite, "gradient_matching", {}, ["task1"])["fishers"][0] is hp["fishers"][1]  # computed once
    key_a = method_inputs(suite, "dare", {"seed": 3}, [])["key"]
    np.testing.assert_array_equal(jax.random.key_data(key_a), jax.random.key_data(jax.random.key(3)))
    build = E.method_builder(suite, "dare", {"keep": 0.5, "alpha": 0.3, "seed": 1}, np.ones((1, 4), bool))
    expect = bcjax.merge("dare", suite.pretrained, list(suite.finetuned), keep=0.5, alpha=0.3, key=jax.random.key(1))
    for a, b in zip(jax.tree.leaves(build(np.array([0]))), jax.tree.leaves(expect), strict=True):
        np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b))


@pytest.mark.parametrize("name,hp", [
    ("regmean", {"nondiag": 0.9}),
    ("weighted_average", {"weights": [1.0, 2.0, 0.5, 1.0]}),
    ("adamerging", {"granularity": "task", "steps": 4, "learning_rate": 0.05, "batch_size": 8}),
])
def test_data_dependent_methods_through_select_equal_the_core_merge(suite, name, hp):
    """regmean, weighted_average and adamerging run through select with what the suite provides
    (Grams, model_fn, unlabeled test inputs); the model select scores is bcjax.merge with the
    same inputs, bit for bit, and its test accuracies are that model's."""
    from bcjax.evaluate import stack_trees
    from bcjax.experiments.engine import method_inputs
    from bcjax.merging import REQUIREMENTS

    tasks = list(suite.tasks)
    res = E.select_and_test(suite, ResultsStore(None), methods=[E.MethodSpec(name, hp)], progress=False)
    assert res["methods"][name]["hparams"] == hp
    needs = bcjax.methods()[name].requires
    assert set(needs) - set(suite.provides) <= {"key", "work_dir"}  # those two the runner supplies itself
    inputs = {r: suite.requirement(r, tasks) for r in needs if r in suite.provides}
    assert set(method_inputs(suite, name, hp, tasks)) == set(hp) | set(needs) and set(needs) <= set(REQUIREMENTS)
    expect = bcjax.merge(name, suite.pretrained, list(suite.finetuned), **hp, **inputs)
    built = E.method_builder(suite, name, hp, np.ones((1, len(tasks)), bool), contract=False)(np.array([0]))
    for a, b in zip(jax.tree.leaves(built), jax.tree.leaves(expect), strict=True):
        np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b))
    acc = {t: float(suite.evaluate(stack_trees([expect]), t, "test")[0]) for t in tasks}
    assert res["methods"][name]["acc"] == acc
    # and the method's requirements do matter: the merge differs from the simple average
    plain = bcjax.merge("simple_average", suite.pretrained, list(suite.finetuned))
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(expect), jax.tree.leaves(plain)))


def test_select_learns_adamerging_once_and_reuses_the_saved_coefficients(suite, tmp_path, monkeypatch):
    """Scoring the chosen point on test reuses the coefficients learned for it on val (kept
    under the run's folder, the ``work_dir`` requirement) instead of re-running the seeded
    optimisation: one optimisation per point, the same results as learning twice."""
    import importlib

    adamerging = importlib.import_module("bcjax.adamerging")  # the module (bcjax.adamerging is also the function)
    calls = []
    real = adamerging._make_step
    monkeypatch.setattr(adamerging, "_make_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = E.MethodSpec("adamerging", {"granularity": "task", "steps": 3, "learning_rate": 0.05, "batch_size": 8})
    res = E.select_and_test(suite, ResultsStore(tmp_path / "results.jsonl"), methods=[spec], progress=False)
    assert len(calls) == 1  # learned on val; not learned again for test
    saved = sorted((tmp_path / "method_state" / "adamerging").glob("*/coefficients.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["steps"] == 3
    calls.clear()
    memory = E.select_and_test(suite, ResultsStore(None), methods=[spec], progress=False)  # no folder: learns twice
    assert len(calls) == 2 and memory["methods"] == res["methods"]
    calls.clear()
    E.select_and_test(suite, ResultsStore(tmp_path / "results.jsonl"), methods=[spec], progress=False)
    assert calls == []  # a rerun reads every point from the store


def test_synthetic_suite_provides_grams_model_fn_and_unlabeled_test_inputs(suite):
    """Grams are Xᵀ X / N of each linear layer's inputs (symmetric PSD, shaped [in, in], keyed
    like θ0's kernels), model_fn gives each task's logits, unlabeled_batches are the test
    inputs only (no labels), each computed once."""
    from bcjax.evaluate import stack_trees

    tasks = list(suite.tasks)
    grams = suite.requirement("grams", tasks)
    assert suite.requirement("grams", tasks[1:2])[0] is grams[1]  # computed once
    for g in grams:
        assert sorted(g) == ["l1/w", "l2/w"]
        for key, dim in (("l1/w", 8), ("l2/w", 16)):
            assert g[key].shape == (dim, dim) and g[key].dtype == np.float32
            np.testing.assert_allclose(g[key], g[key].T, rtol=1e-6, atol=1e-6)
            assert np.linalg.eigvalsh(g[key].astype(np.float64)).min() > -1e-5
    pools = suite.requirement("unlabeled_batches", tasks)
    assert all(isinstance(p, np.ndarray) and p.shape == (96, 8) and p.dtype == np.float32 for p in pools)
    fns = suite.requirement("model_fn", tasks)
    for t, (fn, pool) in enumerate(zip(fns, pools, strict=True)):
        logits = np.asarray(fn(suite.finetuned[t], pool))
        assert logits.shape == (96, 3)
        # the fine-tuned model's argmax on these inputs is what evaluate scores on "test"
        acc = float(suite.evaluate(stack_trees([suite.finetuned[t]]), tasks[t], "test")[0])
        assert 0.5 < acc <= 1.0
    assert not np.allclose(np.asarray(fns[0](suite.pretrained, pools[0])), np.asarray(fns[1](suite.pretrained,
                                                                                                pools[0])))


def test_a_suite_without_fishers_names_the_missing_requirement(suite):
    bare = E.ModelSuite(name="bare", tasks=suite.tasks, pretrained=suite.pretrained, finetuned=suite.finetuned,
                        evaluate=suite.evaluate, fingerprint="bare")
    with pytest.raises(E.MissingRequirementError, match="'fisher' requires 'fishers'.*'bare'"):
        E.method_builder(bare, "fisher", {}, np.ones((1, 4), bool))(np.array([0]))


def test_new_method_with_a_requirement_runs_without_runner_changes(suite):
    """A method registered with requires=("fishers",) runs through the engine unchanged."""
    @bcjax.register_method("test_fisher_weighted_ta", requires=("fishers",), linear=False)
    def fisher_weighted(pretrained, finetuned, flags, *, alpha=1.0, fishers=None):
        """Test method."""
        return bcjax.merge("fisher", pretrained, finetuned, fishers=fishers)

    try:
        res = E.select_and_test(suite, ResultsStore(None), methods=E.parse_methods(
            {"methods": [{"name": "test_fisher_weighted_ta", "grid": {"alpha": [0.5, 1.0]}}]}), progress=False)
        assert len(res["validation_grid"]["test_fisher_weighted_ta"]) == 2
    finally:
        bcjax.unregister_method("test_fisher_weighted_ta")


@pytest.mark.parametrize("bad,match", [
    ("experiment: grid\nalpha: [0.5]\n", "unknown key 'alpha'"),
    ("experiment: grid\nalphas: [a]\n", "alphas\\[0\\] must be a number"),
    ("experiment: subsets\nmethods: [{name: breadcrumbs, alfa: 0.3}]\n", "methods\\[0\\].alfa"),
    ("experiment: subsets\nmethods: [{name: nope}]\n", "methods\\[0\\].name: unknown merge method 'nope'"),
    ("experiment: subsets\nmethods: [{name: ties, seed: 1}]\n", "methods\\[0\\].seed"),
    ("experiment: validation_free\nvariants: {breadcrumbs: {beta: [0.9]}}\n", "variants.breadcrumbs: unknown key"),
    ("experiment: grid\nmesh: {axes: models}\n", "mesh.axes"),
])
def test_typed_configs_reject_unknown_keys_naming_file_and_key(tmp_path, bad, match):
    from bcjax.config import load_config

    path = tmp_path / "bad.yaml"
    path.write_text(bad + "suite: {name: synthetic}\n")
    with pytest.raises(ConfigError, match=f"bad.yaml: .*{match}"):
        E.run_sweep(load_config(path), out_dir=str(tmp_path / "out"), progress=False, suite=object())


@pytest.mark.parametrize("experiment", ["grid", "validation_free", "class_split"])
def test_more_experiments_on_a_mesh_are_bit_identical(suite, split_suite, tmp_path, experiment):
    """`mesh:` also shards the grid, validation-free and class-split experiments (8 fake devices)."""
    cfgs = {"grid": {"alphas": [0.5, 1.0], "betas": [0.0, 0.8], "gammas": [0.99, 1.0]},
            "validation_free": {"alphas": [0.5], "tune_size": 2,
                                "variants": {"breadcrumbs": {"betas": [0.8], "gammas": [0.99]}}},
            "class_split": {"methods": [{"name": "breadcrumbs", "alpha": 0.5}, {"name": "ties", "density": 0.5}]}}
    s = split_suite if experiment == "class_split" else suite
    cfg = {"experiment": experiment, "models_per_call": 4, **cfgs[experiment]}
    one = E.run_sweep(cfg, out_dir=str(tmp_path / "plain"), progress=False, suite=s)
    eight = E.run_sweep({**cfg, "mesh": {"axis": "models", "devices": 8}}, out_dir=str(tmp_path / "mesh"),
                        progress=False, suite=s)
    drop = ("results_file",)
    assert {k: v for k, v in one.items() if k not in drop} == {k: v for k, v in eight.items() if k not in drop}
    if experiment == "grid":
        from bcjax import grids

        pairs = grids.beta_gamma_pairs([0.0, 0.8], [0.99, 1.0])
        points = [(a, b, g) for b, g in pairs for a in (0.5, 1.0)]
        rows = np.ones((len(points), 4), bool)
        mesh = E.sweep_mesh({"mesh": {"devices": 8}})
        sharded = E.grid_builder(suite, pairs, points, rows, np.arange(len(points)), mesh)(np.arange(4))
        plain = E.grid_builder(suite, pairs, points, rows, np.arange(len(points)))(np.arange(4))
        assert any(len(leaf.sharding.device_set) == 8 for leaf in jax.tree.leaves(sharded))
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_all_methods_config_covers_every_registered_method():
    """configs/all_methods.yaml runs every `bcjax methods` name (a new method must be added)."""
    from bcjax.config import load_config
    from bcjax.experiments.select import SelectSettings

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "all_methods.yaml")
    s = E.parse_section(SelectSettings, load_config(path))
    names = [m.name for m in s.methods]
    assert sorted(names) == sorted(bcjax.methods()) and len(set(names)) == len(names)
    assert all(len(m.points()) >= 1 for m in s.methods)


def test_all_methods_sweep_on_the_synthetic_suite(tmp_path):
    """The same config through `bcjax sweep` on the synthetic suite: one summary entry per method."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bcjax.cli", "sweep", "--config", os.path.join(root, "configs", "all_methods.yaml"),
           "--out", str(out), "--no-progress", "--cache-dir", str(tmp_path / "cache"),
           "--set", "suite={name: synthetic, tasks: 3, steps: 20}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["methods"]) == sorted(bcjax.methods())
    assert len(summary["validation_grid"]["task_arithmetic"]) == 3
    assert (out / "normalized_accuracy.png").stat().st_size > 5000


def test_no_import_time_side_effects():
    """Importing bcjax's apps and adapters patches nothing: matplotlib's backend stays, the
    transformers T5 module keeps jax.numpy until load_t5/t5_functions apply the shim."""
    code = ("import matplotlib, jax.numpy as jnp; before = matplotlib.get_backend(); "
            "import bcjax.plots, bcjax.experiments, bcjax.demo, bcjax.models.t5, bcjax.cli; "
            "from transformers.models.t5 import modeling_flax_t5 as mod; "
            "assert matplotlib.get_backend() == before, matplotlib.get_backend(); "
            "assert mod.jnp is jnp, 'T5 patched at import'; "
            "import sys; assert 'matplotlib.pyplot' not in sys.modules; print('clean')")
    env = dict(os.environ, MPLBACKEND="svg")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stderr[-2000:]


def test_plots_return_figures_without_pyplot(tmp_path):
    from matplotlib.figure import Figure

    from bcjax import plots

    fig = plots.subset_curves({"a": {0: 0.5, 1: 0.8}}, None, title="t")
    assert isinstance(fig, Figure)
    path = plots.violins({"a": [0.5, 0.6]}, str(tmp_path / "v.png"))
    assert os.path.getsize(path) > 1000


def test_select_scores_the_core_merge_and_explicit_settings(suite):
    """select merges with bcjax.merge itself (no contraction) and keeps explicit candidate lists."""
    from bcjax.evaluate import stack_trees

    spec = E.MethodSpec("breadcrumbs", {"beta": 0.8}, settings=({"alpha": 0.3}, {"alpha": 0.6, "gamma": 0.95}))
    assert spec.points() == [{"beta": 0.8, "alpha": 0.3}, {"beta": 0.8, "alpha": 0.6, "gamma": 0.95}]
    res = E.select_and_test(suite, ResultsStore(None), methods=[spec], progress=False)
    best = res["methods"]["breadcrumbs"]["hparams"]
    merged = bcjax.merge("breadcrumbs", suite.pretrained, list(suite.finetuned), **best)
    expect = {t: float(suite.evaluate(stack_trees([merged]), t, "test")[0]) for t in suite.tasks}
    assert res["methods"]["breadcrumbs"]["acc"] == expect
    assert [g["hparams"] for g in res["validation_grid"]["breadcrumbs"]] == spec.points()


def test_select_and_subsets_add_bootstrap_intervals_from_per_example_correctness(suite, tmp_path):
    """With a suite providing per-example correctness, select's test scores are its means (one
    pass) and SPEC §4 intervals are added: per method avg/per-task/raw CIs and the paired
    difference to task arithmetic (exactly 0 for itself), pretrained/fine-tuned reference rows,
    test sizes; subsets adds per-size curve intervals. A rerun reads everything back from the store."""
    from bcjax import stats
    from bcjax.evaluate import stack_trees
    from bcjax.experiments.engine import reference_correctness

    specs = [E.MethodSpec("task_arithmetic", {}, settings=({"alpha": 0.3}, {"alpha": 0.6})),
             E.MethodSpec("breadcrumbs", {"alpha": 0.5, "beta": 0.8, "gamma": 0.99})]
    store = ResultsStore(str(tmp_path / "r.jsonl"))
    res = E.select_and_test(suite, store, methods=specs, progress=False)
    tasks = list(suite.tasks)
    assert res["test_examples_per_task"] == {t: 96 for t in tasks}
    assert res["bootstrap"]["resamples"] == 1000 and res["bootstrap"]["seed"] == 0
    refs = reference_correctness(suite, store, "test")
    for t, tree in zip(tasks, suite.finetuned):
        assert res["finetuned_acc"][t] == float(suite.evaluate(stack_trees([tree]), t, "test")[0])
        assert res["finetuned_acc"][t] == refs["finetuned"][t].sum() / refs["finetuned"][t].size
    rows = {**res["methods"], **res["references"]}
    for name, m in rows.items():
        lo, hi = m["avg_normalized_acc_ci95"]
        assert lo <= m["avg_normalized_acc"] <= hi, name
        assert all(m["normalized_acc_ci95"][t][0] <= m["normalized_acc"][t] <= m["normalized_acc_ci95"][t][1]
                   for t in tasks), name
        d = m["delta_vs_task_arithmetic"]
        assert d["ci95"][0] <= d["mean"] <= d["ci95"][1], name
        np.testing.assert_allclose(d["mean"], m["avg_normalized_acc"] - rows["task_arithmetic"]["avg_normalized_acc"],
                                   atol=1e-12)
    ta = res["methods"]["task_arithmetic"]
    assert ta["delta_vs_task_arithmetic"] == {"mean": 0.0, "ci95": [0.0, 0.0]}
    ft = res["references"]["finetuned"]
    assert ft["avg_normalized_acc"] == 1.0 and ft["avg_normalized_acc_ci95"] == [1.0, 1.0]
    assert ft["acc"] == res["finetuned_acc"] and "note" in ft
    # the pretrained row is θ0's accuracy; its interval is the stats module's on the same arrays
    pre = res["references"]["pretrained"]
    assert pre["acc"] == {t: float(suite.evaluate(stack_trees([suite.pretrained]), t, "test")[0]) for t in tasks}
    expect = stats.method_intervals({"p": refs["pretrained"]}, refs["finetuned"], seed=0)["p"]["avg"]
    assert pre["avg_normalized_acc_ci95"] == expect["ci95"]
    np.testing.assert_allclose(pre["avg_normalized_acc"], expect["mean"], rtol=1e-15)
    # the chosen merge's test accuracies are those of the core merge, via the accuracy path
    best = bcjax.merge("task_arithmetic", suite.pretrained, list(suite.finetuned), **ta["hparams"])
    assert ta["acc"] == {t: float(suite.evaluate(stack_trees([best]), t, "test")[0]) for t in tasks}
    again = E.select_and_test(suite, ResultsStore(str(tmp_path / "r.jsonl")), methods=specs, progress=False)
    assert json.dumps(again, sort_keys=True) == json.dumps(res, sort_keys=True)
    # tasks not in sorted order: the correctness read back from the store keeps the suite's order
    import dataclasses

    rev = dataclasses.replace(suite, tasks=tuple(reversed(suite.tasks)), finetuned=tuple(reversed(suite.finetuned)),
                              fingerprint=suite.fingerprint + "-reversed")
    first = E.select_and_test(rev, ResultsStore(str(tmp_path / "rev.jsonl")), methods=specs, progress=False)
    second = E.select_and_test(rev, ResultsStore(str(tmp_path / "rev.jsonl")), methods=specs, progress=False)
    new_fields = ("avg_normalized_acc_ci95", "normalized_acc_ci95", "avg_acc_ci95", "delta_vs_task_arithmetic")
    for r in (first, second):  # (the existing val scores may differ in the last bit: summation order)
        r["methods"] = {m: {k: v[k] for k in new_fields} for m, v in r["methods"].items()}
        r.pop("validation_grid")
    assert json.dumps(second, sort_keys=True) == json.dumps(first, sort_keys=True)
    assert first["methods"]["breadcrumbs"]["avg_normalized_acc_ci95"] == res["methods"]["breadcrumbs"][
        "avg_normalized_acc_ci95"]

    sub = E.subsets_experiment(suite, store, methods=[("task_arithmetic", {"alpha": 0.3})], progress=False)
    pts = sub["methods"]["task_arithmetic"]["points"]
    curve = sub["methods"]["task_arithmetic"]["observed"]
    assert set(pts["observed"]) == set(pts["all"]) == set(range(len(tasks) + 1))
    for k, p in pts["observed"].items():
        np.testing.assert_allclose(p["mean"], curve[k], rtol=1e-12)
        assert p["ci95"][0] <= p["mean"] <= p["ci95"][1] and p["examples_per_task"] == {t: 96 for t in tasks}
        assert p["num_subsets"] == len([r for r in range(2 ** len(tasks)) if bin(r).count("1") == k])


def test_target_task_experiment_through_bcjax_sweep(suite, tmp_path):
    """configs/target_task.yaml (its suite swapped for the synthetic one) runs through `bcjax
    sweep`: per target, each method's point is chosen on val and reported on test, α = 0 (the
    target itself) among the candidates; its numbers are the target_task_experiment of the
    suite's fine-tunes, scored by the suite."""
    import yaml

    from bcjax.evaluate import stack_trees

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "configs", "target_task.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["suite"] = dict(SUITE)
    cfg["targets"] = ["task0", "task2"]
    path = tmp_path / "target_task.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bcjax.cli", "sweep", "--config", str(path), "--out", str(out),
                           "--no-progress"], env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == "target_task" and sorted(summary["targets"]) == ["task0", "task2"]
    r = summary["targets"]["task0"]
    assert r["auxiliary"] == ["task1", "task2", "task3"] and r["metric"] == "accuracy"
    ft = dict(zip(suite.tasks, suite.finetuned, strict=True))
    for split in ("val", "test"):
        own = float(suite.evaluate(stack_trees([ft["task0"]]), "task0", split)[0])
        assert r["finetuned"][split]["values"] == [own]
    for m in ("breadcrumbs", "task_arithmetic"):
        assert r[m]["val"]["mean"] >= r["finetuned"]["val"]["mean"]  # α = 0 is a candidate
        assert r[m]["chosen"][0]["alpha"] in (0.0, 0.1, 0.3, 0.5)
    expect = E.target_task_experiment(
        suite.pretrained, [ft["task0"]], [ft[t] for t in ("task1", "task2", "task3")],
        lambda p, sp: float(suite.evaluate(stack_trees([p]), "task0", sp)[0]),
        {"task_arithmetic": {"alpha": [0.0, 0.1, 0.3, 0.5]}})
    assert r["task_arithmetic"] == json.loads(json.dumps(expect["task_arithmetic"]))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**cfg, "target": ["task0"]}))
    proc = subprocess.run([sys.executable, "-m", "bcjax.cli", "sweep", "--config", str(bad), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown key 'target'" in proc.stderr
