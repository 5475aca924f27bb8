"""Checkpoints on disk (SPEC §7): streaming merges equal bcjax.merge bit for bit, every
reader reads what was written, sharded output + index, resume, validation writes nothing,
and the mergekit → SPEC conversion table."""
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

import bcjax
from bcjax import merging
from bcjax.checkpoints import load_state_dict, merge_checkpoints, open_checkpoint, parse_merge_config, save_safetensors
from bcjax.checkpoints import io as ckio
from bcjax.host_memory import ZERO_COPY_ALIGNMENT
from bcjax.checkpoints import streaming
from bcjax.config import ConfigError
from bcjax.errors import CheckpointError, HyperparameterError, NonFiniteError

SHAPES = {"enc.0.weight": (64, 48), "enc.0.bias": (48,), "enc.1.weight": (120, 40), "emb.weight": (50, 16),
          "head.weight": (5,), "position_ids": (7,)}
T = 3


def _models(seed=0, dtype=np.float32, shapes=SHAPES, tasks=T):
    rng = np.random.default_rng(seed)
    pre = {}
    for k, s in shapes.items():
        pre[k] = np.arange(s[0], dtype=np.int64) if k == "position_ids" else \
            (0.02 * rng.standard_normal(s)).astype(dtype)
    fts = []
    for _ in range(tasks):
        ft = {}
        for k, v in pre.items():
            if v.dtype == np.int64:
                ft[k] = v.copy()
            else:
                d = 1e-3 * rng.standard_normal(v.shape) * np.where(rng.random(v.shape) < 0.02, 10, 1)
                ft[k] = (v.astype(np.float32) + d.astype(np.float32)).astype(dtype)
        fts.append(ft)
    return pre, fts


def _write(folder, pre, fts, shard_bytes=None):
    """θ0 and θt as HF-like folders: single model.safetensors, or sharded with an index."""
    locs = []
    for i, m in enumerate([pre, *fts]):
        d = os.path.join(folder, f"m{i}")
        os.makedirs(d)
        if shard_bytes is None:
            save_safetensors(os.path.join(d, "model.safetensors"), m)
        else:
            w = ckio.ShardedSafetensorsWriter(d, [(k, v.shape, v.dtype) for k, v in m.items()], shard_bytes)
            for j, (k, v) in enumerate(m.items()):
                w.write(j, v)
            w.write_index()
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"model_type": "toy", "i": i}, f)
        locs.append(d)
    return locs[0], locs[1:]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("toy"))
    pre, fts = _models()
    base, ft_locs = _write(folder, pre, fts, shard_bytes=9000)
    return pre, fts, base, ft_locs


CASES = [
    ("task_arithmetic", {"alpha": [0.5, 0.3, 0.2]}, None),
    ("simple_average", {}, None),
    ("breadcrumbs", {"alpha": 0.3, "beta": 0.85, "gamma": 0.99}, None),
    ("breadcrumbs", {"alpha": 0.3, "beta": 0.5, "gamma": 0.9, "granularity": "row", "axis": 0}, None),
    ("ties", {"density": 0.2, "alpha": 1.0}, None),
    ("dare", {"keep": 0.3, "alpha": 0.5}, 3),
    ("random_sparse", {"keep": 0.2, "alpha": 0.4}, 7),
]


def _whole(method, hp, seed, pre, fts, exclude=None):
    kw = dict(hp)
    if seed is not None:
        kw["key"] = jax.random.key(seed)
    out = bcjax.merge(method, pre, fts, exclude=exclude, **kw)
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("method,hp,seed", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_streamed_equals_bcjax_merge_bitwise(toy, tmp_path, method, hp, seed):
    pre, fts, base, ft_locs = toy
    cfg = {"method": method, "hparams": hp, "pretrained": base, "finetuned": ft_locs, "exclude": ["^head"]}
    if seed is not None:
        cfg["seed"] = seed
    summary = merge_checkpoints(cfg, tmp_path / "out", progress=False, max_shard_size="12KB", workers=2)
    got = load_state_dict(str(tmp_path / "out"))
    ref = _whole(method, hp, seed, pre, fts, exclude=["^head"])
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert got[k].dtype == pre[k].dtype
        np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{method}: {k}")
    np.testing.assert_array_equal(got["head.weight"], pre["head.weight"])  # excluded: copied from θ0
    assert summary["tensors"] == len(SHAPES) and summary["tensors_merged"] == len(SHAPES) - 2
    assert summary["shards"] > 1 and summary["peak_rss_bytes"] > 0
    # config.json copied from the base; card holds the config
    assert json.load(open(tmp_path / "out" / "config.json"))["i"] == 0
    card = open(tmp_path / "out" / "README.md").read()
    assert f"**{method}**" in card and bcjax.__version__ in card


def test_ties_streamed_threshold_is_model_wide(toy, tmp_path):
    """Per-tensor TIES (mergekit's) differs from the model-wide one; the streamed merge must be the latter."""
    pre, fts, base, ft_locs = toy
    merge_checkpoints({"method": "ties", "hparams": {"density": 0.1}, "pretrained": base, "finetuned": ft_locs},
                      tmp_path / "o", progress=False)
    got = load_state_dict(str(tmp_path / "o"))
    per_tensor = {k: np.asarray(bcjax.merge("ties", {k: pre[k]}, [{k: f[k]} for f in fts], density=0.1)[k])
                  for k in pre if pre[k].dtype == np.float32}
    whole = _whole("ties", {"density": 0.1}, None, pre, fts)
    assert any(not np.array_equal(per_tensor[k], whole[k]) for k in per_tensor)
    for k in whole:
        np.testing.assert_array_equal(got[k], whole[k])


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("bracket", ["sampled", "missed"])
def test_ties_streamed_threshold_from_a_sample_is_exact(tmp_path, monkeypatch, dtype, bracket):
    """The streamed threshold from a partial block sample (one counting pass) and from a
    bracket forced to miss (the coarse + fine fallback) both give the whole-model merge."""
    pre, fts = _models(seed=2, dtype=dtype)
    base, ft_locs = _write(str(tmp_path), pre, fts, shard_bytes=9000)
    monkeypatch.setattr(merging, "TIES_SAMPLE", 4096)  # about half of the 8.7 k entries
    monkeypatch.setattr(merging, "TIES_SAMPLE_BLOCK", 16)
    monkeypatch.setattr(merging, "TIES_SIGMAS", 3.0 if bracket == "sampled" else 0.0)
    monkeypatch.setattr(merging, "TIES_MAX_BINS", 64 if bracket == "sampled" else 1)
    passes = []
    real = merging.tau_magnitude_histograms
    monkeypatch.setattr(merging, "tau_magnitude_histograms", lambda p, f, bins=None: passes.append(bins is None)
                        or real(p, f, bins))
    merge_checkpoints({"method": "ties", "hparams": {"density": 0.2}, "pretrained": base, "finetuned": ft_locs},
                      tmp_path / "o", progress=False)
    got = load_state_dict(str(tmp_path / "o"))
    whole = _whole("ties", {"density": 0.2}, None, pre, fts)
    for k in whole:
        np.testing.assert_array_equal(got[k], whole[k], err_msg=k)
    merged = sum(1 for v in pre.values() if v.dtype != np.int64)
    assert len(passes) == (merged if bracket == "sampled" else 3 * merged)  # the coarse pass only on a miss
    assert any(passes) == (bracket == "missed")


def test_bf16_inputs_keep_dtype_and_match(tmp_path):
    pre, fts = _models(seed=1, dtype=ml_dtypes.bfloat16)
    base, ft_locs = _write(str(tmp_path), pre, fts)
    hp = {"alpha": 0.3, "beta": 0.8, "gamma": 0.99}
    merge_checkpoints({"method": "breadcrumbs", "hparams": hp, "pretrained": base, "finetuned": ft_locs},
                      tmp_path / "o", progress=False)
    got = load_state_dict(str(tmp_path / "o"))
    ref = _whole("breadcrumbs", hp, None, pre, fts)
    for k in ref:
        assert got[k].dtype == pre[k].dtype
        np.testing.assert_array_equal(got[k].view(np.uint8), np.asarray(ref[k]).view(np.uint8))
    # an explicit output dtype casts the merged floating tensors only
    merge_checkpoints({"method": "breadcrumbs", "hparams": hp, "pretrained": base, "finetuned": ft_locs,
                       "dtype": "float32"}, tmp_path / "o32", progress=False)
    got32 = load_state_dict(str(tmp_path / "o32"))
    assert got32["enc.0.weight"].dtype == np.float32 and got32["position_ids"].dtype == np.int64


def test_readers_roundtrip_every_format(tmp_path):
    torch = pytest.importorskip("torch")
    from flax import serialization

    pre, _ = _models(seed=2, tasks=0)
    save_safetensors(str(tmp_path / "a.safetensors"), pre)
    np.savez(tmp_path / "a.npz", **pre)
    torch.save({k: torch.from_numpy(v) for k, v in pre.items()}, tmp_path / "a.bin")
    with open(tmp_path / "a.msgpack", "wb") as f:
        f.write(serialization.msgpack_serialize({"enc": {"w": pre["enc.0.weight"]}, "b": pre["enc.0.bias"]}))
    for name in ("a.safetensors", "a.npz", "a.bin"):
        got = load_state_dict(str(tmp_path / name))
        assert sorted(got) == sorted(pre), name
        for k in pre:
            np.testing.assert_array_equal(got[k], pre[k])
    got = load_state_dict(str(tmp_path / "a.msgpack"))
    np.testing.assert_array_equal(got["enc/w"], pre["enc.0.weight"])
    np.testing.assert_array_equal(got["b"], pre["enc.0.bias"])
    # bf16 through torch
    bf = torch.randn(3, 4, dtype=torch.bfloat16)
    torch.save({"x": bf}, tmp_path / "bf.bin")
    x = load_state_dict(str(tmp_path / "bf.bin"))["x"]
    assert x.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(x.astype(np.float32), bf.float().numpy())


def test_orbax_checkpoint_reader(tmp_path):
    import orbax.checkpoint as ocp

    tree = {"params": {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}}
    ocp.PyTreeCheckpointer().save(str(tmp_path / "orb"), tree)
    got = load_state_dict(str(tmp_path / "orb"))
    np.testing.assert_array_equal(got["params/dense/kernel"], tree["params"]["dense"]["kernel"])


def test_written_safetensors_load_with_the_safetensors_library(toy, tmp_path):
    from safetensors.numpy import load_file

    pre, fts, base, ft_locs = toy
    merge_checkpoints({"method": "task_arithmetic", "pretrained": base, "finetuned": ft_locs}, tmp_path / "o",
                      progress=False, max_shard_size="10KB")
    index = json.load(open(tmp_path / "o" / "model.safetensors.index.json"))
    assert sorted(index["weight_map"]) == sorted(SHAPES)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in pre.values())
    loaded = {}
    for shard in sorted(set(index["weight_map"].values())):
        loaded.update(load_file(str(tmp_path / "o" / shard)))
        n_in_shard = sum(1 for v in index["weight_map"].values() if v == shard)
        data = sum(pre[k].nbytes for k, v in index["weight_map"].items() if v == shard)
        assert data <= 10_000 or n_in_shard == 1  # a tensor above the limit gets a shard of its own
    ref = _whole("task_arithmetic", {}, None, pre, fts)
    for k in ref:
        np.testing.assert_array_equal(loaded[k], ref[k])


def test_resume_continues_after_last_finished_shard(toy, tmp_path, monkeypatch):
    pre, fts, base, ft_locs = toy
    cfg = {"method": "breadcrumbs", "hparams": {"beta": 0.8}, "pretrained": base, "finetuned": ft_locs}
    out = tmp_path / "o"
    calls = []
    real = streaming._Merger.merge

    def dying(self, i):
        calls.append(i)
        if len(calls) == 4:
            raise KeyboardInterrupt  # a killed merge
        return real(self, i)

    monkeypatch.setattr(streaming._Merger, "merge", dying)
    with pytest.raises(KeyboardInterrupt):
        merge_checkpoints(cfg, out, progress=False, max_shard_size="12KB", workers=1)
    assert not out.exists()
    tmp = streaming.partial_folder(str(out))
    finished = sorted(f for f in os.listdir(tmp) if f.endswith(".safetensors"))
    assert finished  # at least one shard survived
    mtimes = {f: os.stat(os.path.join(tmp, f)).st_mtime_ns for f in finished}
    monkeypatch.setattr(streaming._Merger, "merge", real)
    with pytest.raises(CheckpointError, match="different merge"):
        merge_checkpoints({**cfg, "hparams": {"beta": 0.7}}, out, progress=False, max_shard_size="12KB", resume=True)
    s = merge_checkpoints(cfg, out, progress=False, max_shard_size="12KB", resume=True)
    assert s["shards_resumed"] == len(finished) and not os.path.exists(tmp)
    for f, t in mtimes.items():
        assert os.stat(out / f).st_mtime_ns == t  # finished shards were not rewritten
    got = load_state_dict(str(out))
    ref = _whole("breadcrumbs", {"beta": 0.8}, None, pre, fts)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
    with pytest.raises(CheckpointError, match="no interrupted merge"):
        merge_checkpoints(cfg, tmp_path / "fresh", progress=False, resume=True)


def _expect_nothing_written(cfg, out, err, match):
    with pytest.raises(err, match=match):
        merge_checkpoints(cfg, out, progress=False)
    assert not os.path.exists(out) and not os.path.exists(streaming.partial_folder(str(out)))


def test_validation_errors_name_file_and_tensor_and_write_nothing(tmp_path):
    pre, fts = _models(seed=3, tasks=2)
    base, locs = _write(str(tmp_path / "ok"), pre, fts)
    out = str(tmp_path / "out")
    cfg = {"method": "task_arithmetic", "pretrained": base, "finetuned": locs}

    def variant(name, model):
        d = tmp_path / name
        d.mkdir()
        save_safetensors(str(d / "model.safetensors"), model)
        return str(d)

    missing = variant("missing", {k: v for k, v in fts[0].items() if k != "enc.1.weight"})
    _expect_nothing_written({**cfg, "finetuned": [locs[0], missing]}, out, CheckpointError,
                            r"fine-tuned model 1 .*missing.*'enc.1.weight'.*is missing")
    extra = variant("extra", {**fts[0], "new.bias": np.zeros(3, np.float32)})
    _expect_nothing_written({**cfg, "finetuned": [extra]}, out, CheckpointError, r"model.safetensors.*'new.bias'")
    shape = variant("shape", {**fts[0], "enc.0.bias": np.zeros(47, np.float32)})
    _expect_nothing_written({**cfg, "finetuned": [shape]}, out, CheckpointError,
                            r"shape/model.safetensors\): tensor 'enc.0.bias' has shape \(47,\)")
    dtype = variant("dtype", {**fts[0], "enc.0.bias": fts[0]["enc.0.bias"].astype(np.float16)})
    _expect_nothing_written({**cfg, "finetuned": [dtype]}, out, CheckpointError, r"'enc.0.bias' has dtype float16")
    bad = dict(fts[0])
    bad["enc.1.weight"] = bad["enc.1.weight"].copy()
    bad["enc.1.weight"][3, 4] = np.nan
    nan = variant("nan", bad)
    _expect_nothing_written({**cfg, "finetuned": [locs[0], nan]}, out, NonFiniteError,
                            r"fine-tuned model 1 \(.*nan/model.safetensors\), tensor 'enc.1.weight'")
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    raw = open(os.path.join(locs[0], "model.safetensors"), "rb").read()
    open(trunc / "model.safetensors", "wb").write(raw[:-100])
    _expect_nothing_written({**cfg, "finetuned": [str(trunc)]}, out, CheckpointError, r"trunc/model.safetensors.*beyond")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    _expect_nothing_written({**cfg, "finetuned": [str(garbage)]}, out, CheckpointError, r"garbage.safetensors: corrupt")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    json.dump({"weight_map": {k: "model-00001-of-00002.safetensors" for k in pre}},
              open(sharded / "model.safetensors.index.json", "w"))
    _expect_nothing_written({**cfg, "finetuned": [str(sharded)]}, out, CheckpointError,
                            r"shard model-00001-of-00002.safetensors is missing")
    _expect_nothing_written({**cfg, "finetuned": [str(tmp_path / "nope")]}, out, CheckpointError, "not found")
    _expect_nothing_written({**cfg, "alpha": 1}, out, ConfigError, r"unknown key\(s\) \['alpha'\]")
    _expect_nothing_written({**cfg, "hparams": {"alpah": 1}}, out, ConfigError, r"hparams.alpah")
    _expect_nothing_written({**cfg, "method": "breadcrumbs", "hparams": {"beta": 0.9, "gamma": 0.5}}, out,
                            HyperparameterError, "beta")
    _expect_nothing_written({**cfg, "method": "dare"}, out, ConfigError, "seed")
    _expect_nothing_written({**cfg, "method": "fisher"}, out, ConfigError, "Fisher")
    # an existing output folder is never overwritten
    os.makedirs(out)
    with pytest.raises(CheckpointError, match="already exists"):
        merge_checkpoints(cfg, out, progress=False)
    assert os.listdir(out) == []


def test_cli_merge_both_forms(toy, tmp_path, capsys):
    from bcjax.cli import main

    pre, fts, base, ft_locs = toy
    (tmp_path / "bc.yaml").write_text(
        f"method: breadcrumbs\nhparams: {{alpha: 0.3, beta: 0.8, gamma: 0.99}}\npretrained: {base}\n"
        f"finetuned: [{', '.join(ft_locs)}]\n")
    assert main(["merge", str(tmp_path / "bc.yaml"), "--out", str(tmp_path / "o1"), "--no-progress",
                 "--set", "hparams.alpha=0.5"]) == 0
    assert "tensors" in capsys.readouterr().out
    ref = _whole("breadcrumbs", {"alpha": 0.5, "beta": 0.8, "gamma": 0.99}, None, pre, fts)
    got = load_state_dict(str(tmp_path / "o1"))
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
    models = "\n".join(f"  - model: {f}\n    parameters: {{weight: 1.0, density: 0.19, gamma: 0.01}}" for f in ft_locs)
    (tmp_path / "mk.yaml").write_text(f"merge_method: breadcrumbs\nbase_model: {base}\nmodels:\n{models}\n"
                                      "parameters: {lambda: 0.3}\ndtype: float32\n")
    assert main(["merge", str(tmp_path / "mk.yaml"), "--out", str(tmp_path / "o2"), "--no-progress"]) == 0
    got2 = load_state_dict(str(tmp_path / "o2"))
    beta, gamma = bcjax.breadcrumbs_from_mergekit(0.19, 0.01)
    ref2 = _whole("breadcrumbs", {"alpha": [0.3] * T, "beta": beta, "gamma": gamma}, None, pre, fts)
    for k in ref2:
        np.testing.assert_array_equal(got2[k], ref2[k])
    card = open(tmp_path / "o2" / "README.md").read()
    assert "Semantic differences from mergekit" in card and "merge_method: breadcrumbs" in card
    assert "parameters: {lambda: 0.3}" in card  # the config file, verbatim
    # errors: one line, exit 2, nothing written
    (tmp_path / "bad.yaml").write_text("merge_method: breadcrumbs\nbase_model: x\nmodels: [y]\nslices: []\n")
    assert main(["merge", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o3")]) == 2
    assert "slices" in capsys.readouterr().err and not (tmp_path / "o3").exists()


# ---------------------------------------------------------------- mergekit conversion table (SPEC §7)
def _mk(method, params=None, per_model=None, n=2, base="B", **extra):
    per_model = per_model or [{"weight": 1.0}] * n
    return {"merge_method": method, "base_model": base,
            "models": [{"model": base}] + [{"model": f"M{i}", "parameters": p} for i, p in enumerate(per_model)],
            **({"parameters": params} if params else {}), **extra}


@pytest.mark.parametrize("cfg,method,hparams", [
    (_mk("task_arithmetic", {"lambda": 0.5}, [{"weight": 1.0}, {"weight": 0.4}]), "task_arithmetic",
     {"alpha": [0.5, 0.2]}),
    (_mk("task_arithmetic", {"normalize": True}, [{"weight": 3.0}, {"weight": 1.0}]), "task_arithmetic",
     {"alpha": [0.75, 0.25]}),
    (_mk("breadcrumbs", {"lambda": 0.3}, [{"weight": 1.0, "density": 0.09, "gamma": 0.01}] * 2), "breadcrumbs",
     {"alpha": [0.3, 0.3], "beta": pytest.approx(0.9), "gamma": pytest.approx(0.99)}),
    (_mk("breadcrumbs_ties", {"density": 0.2, "gamma": 0.05}), "breadcrumbs",
     {"alpha": [1.0, 1.0], "beta": pytest.approx(0.75), "gamma": pytest.approx(0.95)}),
    (_mk("ties", {"density": 0.2, "lambda": 0.8}), "ties", {"density": 0.2, "alpha": 0.8}),
    (_mk("dare_linear", {"density": 0.3}, [{"weight": 0.5}, {"weight": 1.0}]), "dare",
     {"keep": 0.3, "alpha": [0.5, 1.0]}),
    (_mk("dare_ties", {"density": 0.3, "rescale": False}), "random_sparse", {"keep": 0.3, "alpha": [1.0, 1.0]}),
    ({"merge_method": "linear", "models": [{"model": "A", "parameters": {"weight": 1.0}},
                                           {"model": "C", "parameters": {"weight": 3.0}}]},
     "task_arithmetic", {"alpha": [0.25, 0.75]}),
])
def test_mergekit_conversion_table(cfg, method, hparams):
    plan = parse_merge_config(cfg)
    assert plan.method == method and plan.form == "mergekit"
    assert plan.hparams == hparams
    if cfg["merge_method"] == "linear":
        assert plan.pretrained == "A" and plan.finetuned == ["A", "C"]
    else:
        assert plan.pretrained == "B" and plan.finetuned == ["M0", "M1"]  # the base is not a task
    assert plan.notes or method == "task_arithmetic"
    if method in ("dare", "random_sparse"):
        assert plan.seed == 0 and "key" in plan.method_hparams()


@pytest.mark.parametrize("cfg,match", [
    (_mk("ties", {"density": 0.2}, [{"weight": 1.0}, {"weight": 2.0}]), "unequal weights"),
    (_mk("ties", {"density": 0.2, "normalize": False}), "disjoint"),
    (_mk("breadcrumbs", None, [{"weight": 1.0, "density": 0.1}, {"weight": 1.0, "density": 0.2}]), "differs"),
    (_mk("della"), "supported mergekit methods"),
    (_mk("task_arithmetic", {"epsilon": 0.1}), "parameters.epsilon"),
    (_mk("task_arithmetic", None, [{"weight": 1.0, "foo": 2}]), r"models\[1\].parameters.foo"),
    (_mk("task_arithmetic", None, [{"weight": [0.1, 0.2]}]), "finite number"),
    (_mk("task_arithmetic", None, [{"weight": 1.0}, {}]), r"models\[2\].parameters.weight is required"),
    ({**_mk("task_arithmetic"), "slices": []}, "slices"),
    ({"merge_method": "linear", "parameters": {"normalize": False},
      "models": [{"model": "A", "parameters": {"weight": 1.0}}, {"model": "C", "parameters": {"weight": 3.0}}]},
     "normalize"),
    (_mk("breadcrumbs", {"density": 0.5, "gamma": 0.6}), "no valid"),
])
def test_mergekit_conversion_errors(cfg, match):
    with pytest.raises((ConfigError, HyperparameterError), match=match):
        parse_merge_config(cfg)


def test_open_checkpoint_lazy_reads_one_tensor(toy):
    _, _, base, _ = toy
    with open_checkpoint(base) as ck:
        assert len(ck.files()) > 1  # sharded input read through its index
        shape, dtype, src = ck.info("enc.0.weight")
        assert shape == (64, 48) and dtype == np.float32 and src.endswith(".safetensors")
        assert ck.read("enc.0.weight").shape == (64, 48)


def test_plan_shards_and_sizes():
    e = [("a", (10,), np.float32), ("b", (100,), np.float32), ("c", (5,), np.float32)]
    assert ckio.plan_shards(e, 100) == [[0], [1], [2]]
    assert ckio.plan_shards(e, 10_000) == [[0, 1, 2]]
    assert ckio.parse_size("5GB") == 5 * 10**9 and ckio.parse_size("2GiB") == 2 * 2**30
    with pytest.raises(CheckpointError):
        ckio.parse_size("lots")


def test_ordered_keeps_order_and_bounds_bytes_in_flight():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    live, peak, lock = [0], [0], threading.Lock()
    sizes = [5, 1, 1, 8, 1, 1, 1, 3]

    def work(i):
        with lock:
            live[0] += sizes[i]
            peak[0] = max(peak[0], live[0])
        import time
        time.sleep(0.01)
        with lock:
            live[0] -= sizes[i]
        return i

    with ThreadPoolExecutor(4) as pool:
        got = list(streaming._ordered(pool, work, range(len(sizes)), 4, cost=lambda i: sizes[i], budget=6))
    assert got == list(range(len(sizes)))
    assert peak[0] <= 8  # never more than the budget, except one item larger than it running alone


def test_ordered_counts_a_result_until_the_consumer_is_done_with_it():
    """A result waiting in order, or being consumed (written), still holds its cost: an item
    above the budget runs alone, with no other item running, waiting or being written."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    sizes = [1, 1, 9, 1, 1, 9, 9, 1, 2, 2, 2]
    live, peak, lock = set(), [0], threading.Lock()

    def work(i):
        with lock:
            live.add(i)
            peak[0] = max(peak[0], sum(sizes[j] for j in live))
        return i

    with ThreadPoolExecutor(3) as pool:
        for i in streaming._ordered(pool, work, range(len(sizes)), 3, cost=lambda i: sizes[i], budget=4):
            with lock:
                assert i in live
                if sizes[i] > 4:
                    assert live == {i}, f"item {i} above the budget shares memory with {live - {i}}"
            import time
            time.sleep(0.002)  # "writing": other items may run only within the budget
            with lock:
                live.discard(i)
    assert peak[0] == 9  # the budget (4), or one item above it alone


@pytest.mark.parametrize("method,hp,chunk", [("breadcrumbs", {"alpha": 0.3, "beta": 0.85, "gamma": 0.99}, None),
                                             ("ties", {"density": 0.2}, None), ("ties", {"density": 0.2}, 1000)])
def test_streaming_live_bytes_stay_within_the_budget(toy, tmp_path, monkeypatch, method, hp, chunk):
    """Instrumented run: every input buffer read and every merged output is tracked until it
    is actually freed (weakref.finalize), so bytes that linger (e.g. zero-copy inputs whose
    release XLA defers to a later garbage collection, or an output kept by the loop) count.
    Live bytes never exceed max(INFLIGHT_BYTES, the largest tensor's inputs + output)."""
    import threading
    import weakref

    pre, fts, base, ft_locs = toy
    budget = 50_000  # bytes; the largest tensor, enc.1.weight, holds 4 × 19.2 kB in and 19.2 kB out
    monkeypatch.setattr(streaming, "INFLIGHT_BYTES", budget)
    live, peak, lock = [0], [0], threading.Lock()

    def track(a):
        with lock:
            live[0] += a.nbytes
            peak[0] = max(peak[0], live[0])
        weakref.finalize(a, untrack, a.nbytes)
        return a

    def untrack(n):
        with lock:
            live[0] -= n

    read, merge = streaming._Merger.read, streaming._Merger.merge

    def tracked_read(self, i):
        arrays = read(self, i)
        for a in arrays:
            track(streaming._owner(a))  # the buffer itself: freed only when every view of it is
        return arrays

    monkeypatch.setattr(streaming._Merger, "read", tracked_read)
    if chunk:  # large tensors merged chunk by chunk: their chunks are read buffers too
        monkeypatch.setattr(streaming, "CHUNK_ENTRIES", chunk)
        read_flat = ckio.SafetensorsCheckpoint.read_flat

        def tracked_read_flat(self, *a, **k):
            part = read_flat(self, *a, **k)
            track(streaming._owner(part))
            return part

        monkeypatch.setattr(ckio.SafetensorsCheckpoint, "read_flat", tracked_read_flat)
    monkeypatch.setattr(streaming._Merger, "merge", lambda self, i: track(merge(self, i)))
    largest = []
    init = streaming._Merger.__init__

    def spy_init(self, *a, **k):
        init(self, *a, **k)
        largest.append(self)

    monkeypatch.setattr(streaming._Merger, "__init__", spy_init)
    cfg = {"method": method, "hparams": hp, "pretrained": base, "finetuned": ft_locs}
    merge_checkpoints(cfg, tmp_path / "out", progress=False, workers=2)
    m = largest[0]
    big = m.names.index("enc.1.weight")
    if chunk:  # merged as output + one chunk (39.2 kB), under the budget; TIES's histogram pass reads it whole
        assert m.chunked(big) and m.live_bytes(big) < budget == m.budget
    else:
        assert m.live_bytes(big) == m.budget == 96_000
    # a tensor's cost in either pass (merge: inputs + output; histograms: inputs), or the budget;
    # each aligned buffer carries up to ZERO_COPY_ALIGNMENT spare bytes
    passes = [m.live_bytes] + ([m.input_bytes] if method == "ties" else [])
    bound = max(budget, *(cost(i) for cost in passes for i in range(len(m.names)))) + (T + 2) * ZERO_COPY_ALIGNMENT
    assert 0 < peak[0] <= bound, (peak[0], bound)
    ref = _whole(method, hp, None, pre, fts)
    for k, v in load_state_dict(str(tmp_path / "out")).items():
        np.testing.assert_array_equal(v, ref[k], err_msg=k)


@pytest.mark.parametrize("method,hp,dtype", [
    ("ties", {"density": 0.2, "alpha": 0.7}, np.float32),
    ("ties", {"density": 0.3, "alpha": [0.5, 1.0, 0.8]}, ml_dtypes.bfloat16),
    ("task_arithmetic", {"alpha": [0.5, 0.3, 0.2]}, ml_dtypes.bfloat16),
    ("weighted_average", {"weights": [1.0, 2.0, 0.5]}, np.float32),
])
def test_chunked_elementwise_merge_equals_whole_tensor_merge_bitwise(tmp_path, monkeypatch, method, hp, dtype):
    """Elementwise methods merge large tensors chunk by chunk (the last chunk zero-padded):
    bit for bit the whole-tensor result, with each tensor's chunks read as byte ranges."""
    pre, fts = _models(seed=5, dtype=dtype)
    base, locs = _write(str(tmp_path), pre, fts, shard_bytes=20_000)
    monkeypatch.setattr(streaming, "CHUNK_ENTRIES", 1000)  # enc.1.weight: 4800 entries → 5 chunks, the last padded
    calls = []
    read_flat = ckio.SafetensorsCheckpoint.read_flat

    def spy(self, name, start, stop, pad_to=None):
        calls.append((name, start, stop, pad_to))
        return read_flat(self, name, start, stop, pad_to)

    monkeypatch.setattr(ckio.SafetensorsCheckpoint, "read_flat", spy)
    cfg = {"method": method, "hparams": hp, "pretrained": base, "finetuned": locs}
    merge_checkpoints(cfg, tmp_path / "out", progress=False, workers=2)
    got = load_state_dict(str(tmp_path / "out"))
    ref = _whole(method, hp, None, pre, fts)
    for k in ref:
        assert got[k].dtype == pre[k].dtype
        want = np.asarray(ref[k], pre[k].dtype)  # (bcjax.merge hands int64 position_ids back as int32)
        np.testing.assert_array_equal(got[k].view(np.uint8), want.view(np.uint8), err_msg=k)  # bits
    chunks = {(n, a, b, p) for n, a, b, p in calls}
    assert ("enc.1.weight", 4000, 4800, 1000) in chunks and ("enc.0.weight", 3000, 3072, 1000) in chunks
    assert not any(n in ("enc.0.bias", "head.weight", "position_ids") for n, *_ in calls)  # small / integer: whole
    assert len(calls) == (T + 1) * (5 + 4)  # per model: enc.1 (4800 entries), enc.0 (3072); emb (800) whole


def test_read_flat_ranges(toy):
    _, _, base, _ = toy
    with open_checkpoint(base) as ck:
        whole = ck.read("enc.1.weight").reshape(-1)
        part = ck.read_flat("enc.1.weight", 4000, 4800, pad_to=1000)
        assert part.shape == (1000,) and part.ctypes.data % 64 == 0
        np.testing.assert_array_equal(part[:800], whole[4000:])
        assert not part[800:].any()
        np.testing.assert_array_equal(ckio.Checkpoint.read_flat(ck, "enc.1.weight", 7, 19), whole[7:19])  # generic
        with pytest.raises(CheckpointError, match="enc.1.weight"):
            ck.read_flat("enc.1.weight", 4000, 4801)


def test_nan_in_an_excluded_tensor_is_still_an_error(tmp_path):
    """SPEC §1: NaN/Inf in any input leaf is an error, as in bcjax.merge."""
    pre, fts = _models(seed=4, tasks=1)
    fts[0]["head.weight"] = fts[0]["head.weight"].copy()
    fts[0]["head.weight"][0] = np.inf
    base, locs = _write(str(tmp_path), pre, fts)
    with pytest.raises(NonFiniteError):
        bcjax.merge("task_arithmetic", pre, fts, exclude=["^head"])
    _expect_nothing_written({"method": "task_arithmetic", "pretrained": base, "finetuned": locs, "exclude": ["^head"]},
                            str(tmp_path / "o"), NonFiniteError, "'head.weight'")
