"""CLIP pipeline (SPEC §4–5), offline on a tiny random CLIP, a local tokenizer and tiny tfds
data sets written as array_record: model import/export, heads, data, fine-tuning, CLI."""
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from bcjax.data import vision
from bcjax.data.task import Task
from bcjax.errors import BcjaxError, TreeMismatchError
from bcjax.models import clip as clip_lib
from bcjax.pipelines import clip as pipeline
from bcjax.testing import clip_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_tiny")
    return clip_tiny.setup_tiny(root)


@pytest.fixture(scope="module")
def pt_dir(tmp_path_factory):
    """The same kind of tiny CLIP saved by PyTorch (model.safetensors only)."""
    return clip_tiny.write_tiny_clip(tmp_path_factory.mktemp("clip_pt"), seed=1, framework="pytorch")


@pytest.fixture(scope="module")
def setup(tiny):
    return pipeline.setup(tiny, progress=False)


def _pixels(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- model
def test_flax_logits_equal_pytorch(pt_dir):
    import torch
    from transformers import CLIPModel

    clip = clip_lib.load_clip(pt_dir)  # no flax_model.msgpack: converted from PyTorch
    assert clip.tokenizer is not None and clip.image_size == 32
    classes = ["red", "a photo", "the thing"]
    w = clip_lib.zero_shot_head(clip, classes, ["{c}"])  # one template: W = normalized text embeds
    images = _pixels(3)
    predict, _ = clip_lib.make_classifier(clip.config)
    ours = np.asarray(predict(clip.vision, images, *clip_lib.head_args(clip), w, np.ones(3, bool)))

    model = CLIPModel.from_pretrained(pt_dir).eval()
    tok = clip.tokenizer(classes, padding="max_length", max_length=24, return_tensors="pt")
    pix = (images / 255.0 - np.array(clip_lib.CLIP_MEAN)) / np.array(clip_lib.CLIP_STD)
    with torch.no_grad():
        ref = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                    pixel_values=torch.tensor(pix.transpose(0, 3, 1, 2), dtype=torch.float32)).logits_per_image
    np.testing.assert_allclose(ours, ref.numpy(), atol=2e-4, rtol=1e-4)
    assert np.ptp(ours) > 1e-3  # not trivially constant


def _to_openclip(sd, layers):
    """Independent inverse of the documented mapping: HF PyTorch CLIP → open_clip names."""
    out = {"model.token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],  # ignored (text)
           "model.visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
           "model.visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
           "model.visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
           "model.visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
           "model.visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
           "model.visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
           "model.visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
           "model.visual.proj": sd["visual_projection.weight"].T}
    for i in range(layers):
        h, o = f"vision_model.encoder.layers.{i}.", f"model.visual.transformer.resblocks.{i}."
        out[o + "attn.in_proj_weight"] = np.concatenate([sd[h + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        out[o + "attn.in_proj_bias"] = np.concatenate([sd[h + f"self_attn.{p}_proj.bias"] for p in "qkv"])
        out[o + "attn.out_proj.weight"] = sd[h + "self_attn.out_proj.weight"]
        out[o + "attn.out_proj.bias"] = sd[h + "self_attn.out_proj.bias"]
        for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
            out[o + f"{a}.weight"], out[o + f"{a}.bias"] = sd[h + f"{b}.weight"], sd[h + f"{b}.bias"]
        for a, b in (("c_fc", "fc1"), ("c_proj", "fc2")):
            out[o + f"mlp.{a}.weight"], out[o + f"mlp.{a}.bias"] = sd[h + f"mlp.{b}.weight"], sd[h + f"mlp.{b}.bias"]
    return out


def test_openclip_state_dict_maps_onto_flax(pt_dir, tmp_path):
    from safetensors.numpy import load_file

    clip = clip_lib.load_clip(pt_dir, tokenizer=False)
    sd = load_file(os.path.join(pt_dir, "model.safetensors"))
    oc = _to_openclip(sd, clip.config.vision_config.num_hidden_layers)
    ref = {"vision_model": clip.params["vision_model"], "visual_projection": clip.params["visual_projection"]}
    mapped = clip_lib.openclip_visual_to_flax(oc, reference=ref)
    flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref)[0])
    flat = dict(jax.tree_util.tree_flatten_with_path(mapped)[0])
    assert flat.keys() == flat_ref.keys()
    for k in flat_ref:
        np.testing.assert_allclose(np.asarray(flat[k]), np.asarray(flat_ref[k]), atol=1e-6, err_msg=str(k))
    import torch

    torch.save({"state_dict": {k: torch.tensor(v) for k, v in oc.items()}}, tmp_path / "ft.pt")
    from_file = clip_lib.load_openclip_checkpoint(tmp_path / "ft.pt", reference=ref)
    for a, b in zip(jax.tree.leaves(from_file), jax.tree.leaves(mapped), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(clip_lib.ClipModelError, match="attnpool"):
        clip_lib.openclip_visual_to_flax({**oc, "visual.attnpool.c_proj.weight": np.zeros((2, 2))})
    with pytest.raises(clip_lib.ClipModelError, match="no 'visual"):
        clip_lib.openclip_visual_to_flax({"token_embedding.weight": np.zeros((2, 2))})
    bad = dict(oc)
    bad["model.visual.proj"] = np.zeros((3, 3), np.float32)
    with pytest.raises(TreeMismatchError, match="visual_projection"):
        clip_lib.openclip_visual_to_flax(bad, reference=ref)


def test_export_reloads_in_pytorch_and_flax(tiny, tmp_path):
    import torch
    from transformers import CLIPVisionModel

    clip = clip_lib.load_clip(tiny["model"]["name"])
    vis = jax.tree.map(lambda x: x + 0.01, clip.vision)  # a "merged" tower, different from θ0
    written = clip_lib.export_vision(vis, clip.config, tmp_path / "merged")
    images = _pixels(2, seed=3)
    from transformers.models.clip.modeling_flax_clip import FlaxCLIPVisionTransformer

    ours = FlaxCLIPVisionTransformer(clip.config.vision_config).apply(
        {"params": vis["vision_model"]}, clip_lib.normalize_pixels(images), return_dict=False)[1]
    tm = CLIPVisionModel.from_pretrained(written["pytorch"]).eval()
    with torch.no_grad():
        ref = tm(pixel_values=torch.tensor(np.asarray(clip_lib.normalize_pixels(images)).transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(np.asarray(ours), ref.pooler_output.numpy(), atol=2e-4)
    for path in (written["flax"], written["pytorch"]):  # both import back (the FusionBench path is from_pt)
        back = clip_lib.load_vision_finetune(path, clip.vision)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(vis), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    with pytest.raises(TreeMismatchError):
        clip_lib.check_vision_tree({"vision_model": {}}, clip.vision, "empty")
    assert clip_lib.fusionbench_name("cars") == "tanganke/clip-vit-base-patch32_stanford-cars"
    with pytest.raises(clip_lib.ClipModelError, match="no FusionBench name"):
        clip_lib.fusionbench_name("imagenet")


def test_wrong_image_shape_is_a_clear_error(setup):
    h = setup.heads[setup.names[0]]
    with pytest.raises(clip_lib.ClipModelError, match=r"\(batch, 32, 32, 3\)"):
        setup.predict(setup.clip.vision, _pixels(2, size=40), *h)


# ----------------------------------------------------------------------------- heads
def test_zero_shot_heads_are_cached_per_model_and_dataset(setup, tiny, tmp_path):
    clip, t = setup.clip, setup.tasks[0]
    w1 = clip_lib.cached_zero_shot_head(clip, t.name, t.class_names, t.templates, cache_dir=tmp_path)
    files = list(tmp_path.rglob("*.npy"))
    assert len(files) == 1 and t.name in files[0].name
    np.testing.assert_allclose(np.linalg.norm(w1, axis=1), 1.0, atol=1e-5)
    # SPEC §5: mean of normalized per-template embeddings, renormalized
    per = [clip_lib.zero_shot_head(clip, t.class_names, [tpl]) for tpl in t.templates]
    mean = np.mean(per, axis=0)
    np.testing.assert_allclose(w1, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-5)
    np.save(files[0], w1 * 0 + 7)  # a cache hit returns the stored head
    assert np.all(clip_lib.cached_zero_shot_head(clip, t.name, t.class_names, t.templates, cache_dir=tmp_path) == 7)
    w3 = clip_lib.cached_zero_shot_head(clip, t.name, t.class_names, ["a {c}."], cache_dir=tmp_path)
    assert len(list(tmp_path.rglob("*.npy"))) == 2 and not np.all(w3 == 7)
    with pytest.raises(clip_lib.ClipModelError, match="no class names"):
        clip_lib.zero_shot_head(clip, [], t.templates)


def test_templates_and_classnames_follow_ilharco():
    assert set(vision.TEMPLATES) >= set(vision.TASKS)
    assert len(vision.TEMPLATES["resisc45"]) == 18 and vision.TEMPLATES["resisc45"][7] == "aerial imagery of a {c}."
    assert len(vision.TEMPLATES["cars"]) == 8 and len(vision.TEMPLATES["dtd"]) == 8
    assert len(vision.GTSRB_CLASSNAMES) == 43 and vision.GTSRB_CLASSNAMES[14] == "stop"
    spec = vision.TASKS["eurosat"]
    tfds_labels = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake"]
    assert vision.classnames_for(spec, tfds_labels)[2] == "brushland or shrubland"
    assert vision.classnames_for(vision.TASKS["sun397"], ["/a/abbey", "/a/apartment_building/outdoor"]) == [
        "abbey", "apartment building outdoor"]
    assert vision.classnames_for(vision.TASKS["mnist"], None)[3] == "3"
    with pytest.raises(vision.VisionDataError, match="classnames"):
        vision.classnames_for(vision.TASKS["dtd"], None)


# ----------------------------------------------------------------------------- data
def test_split_sizes_match_spec():
    """SPEC §5 train/val/test sizes from the sources' split sizes and the carving rules."""
    source_train = {"cars": 8144, "dtd": 3760, "eurosat": 27000, "mnist": 60000, "resisc45": 31500,
                    "sun397": 19850, "svhn": 73257, "gtsrb": 26640}
    spec_sizes = {"cars": (7330, 814), "dtd": (3384, 376), "eurosat": (21600, 2700), "gtsrb": (23976, 2664),
                  "mnist": (55000, 5000), "resisc45": (17010, 1890), "sun397": (17865, 1985), "svhn": (68257, 5000)}
    for name, (n_train, n_val) in spec_sizes.items():
        s = vision.TASKS[name]
        cuts = ([s.test_size] if s.test_size else []) + [s.unused_size, s.val_size]
        parts = vision.carve(source_train[name], cuts, seed=0)
        assert (len(parts[-1]), len(parts[-2])) == (n_train, n_val), name
        assert len(np.unique(np.concatenate(parts))) == source_train[name]
    assert vision.TASKS["eurosat"].test_size == 2700 and vision.TASKS["resisc45"].test_size == 6300
    np.testing.assert_array_equal(vision.carve(100, [10], 3)[0], vision.carve(100, [10], 3)[0])
    assert not np.array_equal(vision.carve(100, [10], 3)[0], vision.carve(100, [10], 4)[0])


def test_tfds_task_by_name_without_tensorflow(tiny, tmp_path):
    import importlib.util

    assert importlib.util.find_spec("tensorflow") is None
    entry = tiny["data"]["tasks"][0]
    a = vision.load_task(entry, data_dir=tiny["data"]["data_dir"], image_size=32)
    b = vision.load_task(entry, data_dir=tiny["data"]["data_dir"], image_size=32)
    assert a.sizes == {"train": 32, "val": 8, "test": 16}
    assert a.class_names == tuple(clip_tiny.TINY_TASKS[entry["name"]])
    assert isinstance(a, Task) and all(y.dtype == np.int32 for _, y in a.splits.values())  # the one task type
    np.testing.assert_array_equal(a.splits["val"][0].indices, b.splits["val"][0].indices)
    assert not set(a.splits["val"][0].indices) & set(a.splits["train"][0].indices)
    x = a.splits["train"][0][np.array([0, 5])]
    assert x.shape == (2, 32, 32, 3) and x.dtype == np.uint8
    # colours are learnable: class c is the brightest channel
    y = a.splits["train"][1][np.array([0, 5])]
    assert list(x.reshape(2, -1, 3).mean(1).argmax(-1)) == list(y)
    # too big for memory (max_bytes=0): preprocessed once into memory-mapped .npy files, same pixels
    cached = vision.materialize(a, 0, tmp_path)
    assert isinstance(cached.splits["train"][0], np.memmap) and len(list(tmp_path.rglob("*.npy"))) == 3
    np.testing.assert_array_equal(cached.splits["train"][0][np.array([0, 5])], x)
    np.testing.assert_array_equal(np.asarray(vision.materialize(b, 1 << 30).splits["test"][0]), cached.splits["test"][0])
    assert vision.materialize(a, 0).splits["train"][0] is a.splits["train"][0]  # no cache folder: keeps streaming
    with pytest.raises(vision.UnknownDatasetError, match="unknown vision task 'imagenet'"):
        vision.load_task("imagenet")
    with pytest.raises(vision.UnknownDatasetError, match="no data set 'no_such_set'"):
        vision.load_task({"name": "x", "tfds_name": "no_such_set"}, data_dir=tiny["data"]["data_dir"])
    with pytest.raises(vision.VisionDataError, match="not prepared"):
        vision.load_task("mnist", data_dir=tiny["data"]["data_dir"])
    with pytest.raises(vision.VisionDataError, match="GTSRB is not in tensorflow-datasets"):
        vision.load_task("gtsrb")
    with pytest.raises(vision.VisionDataError, match="2 class names"):
        vision.load_task({**entry, "classnames": ["a", "b"], "num_classes": 3}, data_dir=tiny["data"]["data_dir"])


def test_clip_preprocess_resizes_shorter_side_and_center_crops():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 20:60] = 255  # the centre 40 columns are white
    out = vision.clip_preprocess(img, 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert out[:, 2:-2].min() > 240  # the crop is the centre
    grey = vision.clip_preprocess(np.full((10, 12), 0.5, np.float32), 8)
    assert grey.shape == (8, 8, 3) and abs(int(grey.mean()) - 128) <= 1
    with pytest.raises(vision.VisionDataError, match="expected an image"):
        vision.clip_preprocess(np.zeros((4, 4, 5)), 8)


def test_local_sources_folder_and_numpy(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for c in ("cat_face", "dog"):
            d = tmp_path / "pets" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(d / f"{i}.png")
    t = vision.load_folder_task(tmp_path / "pets", image_size=16, val_size=2)
    assert t.name == "pets" and t.class_names == ("cat face", "dog") and t.sizes == {"train": 10, "val": 2, "test": 4}
    assert t.splits["test"][0][:].shape == (4, 16, 16, 3)
    t2 = vision.load_task({"name": "pets", "source": "folder", "path": str(tmp_path / "pets"),
                           "classnames": {"cat_face": "cat"}}, image_size=16)
    assert t2.class_names == ("cat", "dog")
    x = rng.integers(0, 256, (10, 12, 12), dtype=np.uint8)
    y = np.arange(10) % 2
    nt = vision.numpy_task("digits", (x, y), (x[:4], y[:4]), classnames=["zero", "one"], image_size=16, val_size=2)
    assert nt.sizes == {"train": 8, "val": 2, "test": 4} and nt.splits["train"][0].shape == (8, 16, 16, 3)
    with pytest.raises(vision.VisionDataError, match="class names are required"):
        vision.numpy_task("digits", (x, y), (x, y), classnames=[])
    with pytest.raises(vision.VisionDataError, match="labels span"):
        vision.numpy_task("digits", (x, y + 5), (x, y), classnames=["zero", "one"])
    with pytest.raises(vision.VisionDataError, match="does not exist"):
        vision.load_folder_task(tmp_path / "nothing")


# ----------------------------------------------------------------------------- fine-tuning
def test_finetune_lowers_loss_and_resumes_after_a_crash(setup, tmp_path):
    from bcjax.train import TrainConfig, finetune

    t = setup.tasks[0]
    x, y = t.splits["train"]
    cfg = TrainConfig(steps=6, batch_size=8, learning_rate=1e-3, warmup_steps=1, checkpoint_every=3)
    theta0 = setup.clip.vision
    full = finetune(setup.loss, theta0, {"x": x, "y": y}, cfg, checkpoint_dir=str(tmp_path / "a"),
                    progress=False, loss_args=setup.heads[t.name])
    assert full.losses[-1] < full.losses[0]
    crashed = finetune(setup.loss, theta0, {"x": x, "y": y}, cfg, checkpoint_dir=str(tmp_path / "b"),
                       progress=False, loss_args=setup.heads[t.name], stop_after=3)
    assert len(crashed.losses) == 3
    resumed = finetune(setup.loss, theta0, {"x": x, "y": y}, cfg, checkpoint_dir=str(tmp_path / "b"),
                       progress=False, loss_args=setup.heads[t.name])
    assert resumed.resumed_from == 3 and len(resumed.losses) == 3
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(full.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    moved = sum(float(np.abs(np.asarray(a) - np.asarray(b)).sum())
                for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(theta0), strict=True))
    assert moved > 0


def test_cli_finetune_then_eval(tiny, tmp_path, monkeypatch, capsys):
    import yaml

    from bcjax import cli

    monkeypatch.setattr(cli, "_enable_compile_cache", lambda root: None)  # keep the test session's cache
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump({**tiny, "eval": {**tiny["eval"], "export": True}}))
    out = str(tmp_path / "run")
    assert cli.main(["finetune", "--config", str(cfg_path), "--out", out, "--no-progress"]) == 0
    ft = json.loads((pathlib.Path(out) / "summary_finetune.json").read_text())
    assert set(ft["tasks"]) == set(clip_tiny.TINY_TASKS)
    assert all(r["final_loss"] < r["first_loss"] for r in ft["tasks"].values())
    assert cli.main(["eval", "--config", str(cfg_path), "--out", out, "--no-progress"]) == 0
    ev = json.loads((pathlib.Path(out) / "summary_eval.json").read_text())
    assert set(ev["zero_shot"]) == set(clip_tiny.TINY_TASKS)
    assert set(ev["merges"]) == {"task_arithmetic alpha=0.5", "breadcrumbs alpha=0.5 beta=0.1 gamma=0.99"}
    for rec in ev["merges"].values():
        assert set(rec["accuracy"]) == set(clip_tiny.TINY_TASKS) and 0 <= rec["avg_accuracy"] <= 1
        assert os.path.isfile(os.path.join(rec["export"]["pytorch"], "model.safetensors"))
    # the sweeps' ModelSuite over the same fine-tunes agrees with `bcjax eval`
    from bcjax.experiments import model_suite
    from bcjax.evaluate import stack_trees

    suite = model_suite({"suite": {"name": "clip", "config": str(cfg_path), "out": out}}, progress=False)
    assert suite.tasks == tuple(clip_tiny.TINY_TASKS) and len(suite.finetuned) == 3
    t = suite.tasks[1]
    accs = suite.evaluate(stack_trees([suite.pretrained, suite.finetuned[1]]), t, "test")
    np.testing.assert_allclose(accs, [ev["zero_shot"][t], ev["finetuned"][t]])
    # the suite's loss: the mean cross-entropy of each stacked model on the same test examples
    x, y = suite.examples(t, "test")
    ref = []
    for p in (suite.pretrained, suite.finetuned[1]):
        z = np.asarray(suite.requirement("model_fn", [t])[0](p, x), np.float64)
        z = z - z.max(-1, keepdims=True)
        ref.append(-np.mean(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(-1))))
    np.testing.assert_allclose(suite.loss(stack_trees([suite.pretrained, suite.finetuned[1]]), t, "test"), ref,
                               rtol=1e-4)
    # `bcjax eval` scored its merges through the engine's chunked evaluation: the suite's accuracy of each merge
    import bcjax

    ta = bcjax.merge("task_arithmetic", suite.pretrained, list(suite.finetuned), alpha=0.5)
    for name in suite.tasks:
        assert ev["merges"]["task_arithmetic alpha=0.5"]["accuracy"][name] == float(
            suite.evaluate(stack_trees([ta]), name, "test")[0])
    # every method runs on CLIP: Fishers and sizes come from the suite, the PRNG key from `seed`
    from bcjax.experiments import parse_methods, select_and_test
    from bcjax.results_store import ResultsStore

    specs = parse_methods({"methods": [{"name": "fisher"}, {"name": "gradient_matching", "alpha": 0.5},
                                       {"name": "dare", "keep": 0.5, "seed": 1}]})
    res = select_and_test(suite, ResultsStore(None), methods=specs, progress=False)
    assert set(res["methods"]) == {"fisher", "gradient_matching", "dare"}
    assert all(0 <= r["avg_acc"] <= 1 for r in res["methods"].values())
    # the FusionBench comparison runs on CLIP too: the multi-task reference (one joint fine-tune,
    # cached under <out>/checkpoints), the ensembles and a corrupted test set (uint8 images)
    from bcjax.experiments.fusionbench import FusionBenchSettings, fusionbench_experiment
    from bcjax.experiments.settings import parse_section

    fb = parse_section(FusionBenchSettings, {"methods": [{"name": "task_arithmetic", "alpha": 0.5}],
                                             "robustness": {"corruptions": ["jpeg"]}, "generalization": None,
                                             "scaling": None, "bootstrap_resamples": 100})
    rep = fusionbench_experiment(suite, ResultsStore(None), fb, progress=False)
    assert list(rep["references"]) == ["pretrained", "individual", "multitask", "simple_ensemble",
                                       "weighted_ensemble"]
    assert rep["references"]["individual"]["average"] == pytest.approx(np.mean(list(ev["finetuned"].values())))
    assert all(0 <= r["average"] <= 1 for r in rep["references"].values())
    assert set(rep["robustness"]) == {"clean", "jpeg"} and "task_arithmetic" in rep["robustness"]["jpeg"]
    assert any(p.name.startswith("multitask-") for p in (pathlib.Path(out) / "checkpoints").iterdir())
    capsys.readouterr()
    # bad inputs: one clear line, exit code 2
    bad = dict(tiny, data={**tiny["data"], "tasks": ["imagenet"]})
    cfg_path.write_text(yaml.safe_dump(bad))
    assert cli.main(["eval", "--config", str(cfg_path), "--out", out, "--no-progress"]) == 2
    assert "unknown vision task 'imagenet'" in capsys.readouterr().err
    cfg_path.write_text(yaml.safe_dump(dict(tiny, train={"steps": 1, "lr": 1.0})))
    assert cli.main(["finetune", "--config", str(cfg_path), "--out", out, "--no-progress"]) == 2
    assert "unknown key 'train.lr'" in capsys.readouterr().err


def test_eval_without_finetunes_names_what_to_do(tiny, tmp_path):
    with pytest.raises(BcjaxError, match="run `bcjax finetune` with the same --out"):
        pipeline.evaluate(tiny, out_dir=str(tmp_path / "empty"), progress=False)


def test_shipped_configs_have_the_paper_settings():
    from bcjax.config import load_config

    root = pathlib.Path(__file__).resolve().parent.parent / "configs"
    for name, hub in (("clip_vit_b32", "openai/clip-vit-base-patch32"),
                      ("clip_vit_b16", "openai/clip-vit-base-patch16"),
                      ("clip_vit_l14", "openai/clip-vit-large-patch14")):
        cfg = load_config(root / f"{name}.yaml")
        assert cfg["pipeline"] == "clip" and cfg["model"]["name"] == hub
        t = pipeline.train_config(cfg)
        assert (t.learning_rate, t.weight_decay, t.warmup_steps, t.steps, t.batch_size) == (1e-5, 0.1, 200, 2000, 128)
        assert cfg["data"]["tasks"] == list(vision.TASKS)
        assert any(m["method"] == "breadcrumbs" for m in cfg["eval"]["merges"])


def test_suite_provides_grams_model_fn_and_unlabeled_test_inputs(setup):
    """What RegMean and AdaMerging require, from the CLIP pipeline: Grams of the vision tower's
    Dense inputs (keyed like the merged tree, from the task's own fine-tune), logits with the
    task's head, and the test images without labels; regmean and adamerging merge with them."""
    import bcjax
    from bcjax.tree import leaf_paths

    vision = setup.clip.vision
    rng = np.random.default_rng(0)
    fts = [jax.tree.map(lambda a: np.asarray(a) + 0.01 * rng.standard_normal(np.shape(a)).astype(np.float32), vision)
           for _ in setup.names]
    prov = pipeline.provides(setup, fts)
    t = setup.names[0]
    grams = [prov["grams"](n) for n in setup.names]
    shapes = dict(zip(leaf_paths(vision), (np.shape(a) for a in jax.tree.leaves(vision))))
    assert grams[0] and all(k.startswith("vision_model/") and k.endswith("kernel") for k in grams[0])
    for key, g in grams[0].items():
        assert g.shape == (shapes[key][0],) * 2 and np.allclose(g, g.T, atol=1e-5)
    own = pipeline.provides(setup, [fts[1]] * len(fts))["grams"](t)  # another model: other Grams
    assert any(not np.allclose(own[k], grams[0][k]) for k in own)
    x = prov["unlabeled_batches"](t)
    test_x, test_y = setup.task(t).splits["test"]
    assert x is test_x and np.ndim(x) == 4
    logits = prov["model_fn"](t)(fts[0], x[:4])
    np.testing.assert_allclose(logits, setup.predict(fts[0], x[:4], *setup.heads[t]), rtol=1e-6)
    merged = bcjax.merge("regmean", vision, fts, grams=grams, jitter=1e-4)
    assert set(leaf_paths(merged)) == set(shapes)
    ada = bcjax.merge("adamerging", vision, fts, model_fn=[prov["model_fn"](n) for n in setup.names],
                      unlabeled_batches=[prov["unlabeled_batches"](n) for n in setup.names], granularity="task",
                      steps=2, batch_size=4)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(ada))
