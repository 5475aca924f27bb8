"""GLUE as text-to-text through tfds by name (no TensorFlow): splits, prompts, tokenization
errors and truncation, and the numpy metrics against sklearn / scipy."""
import dataclasses
import sys

import numpy as np
import pytest
from t5_fixtures import t5_loaded, t5_tiny  # noqa: F401  (fixtures)

from bcjax.data import glue
from bcjax.data.task import Task
from bcjax.errors import BcjaxError


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_sklearn_and_scipy(seed):
    from scipy.stats import spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    gold = rng.integers(0, 2 + seed % 2, n)
    pred = np.where(rng.random(n) < 0.6, gold, rng.integers(0, 2, n))
    assert glue.accuracy(pred, gold) == pytest.approx(np.mean(pred == gold))
    assert glue.matthews_corrcoef(pred, gold) == pytest.approx(matthews_corrcoef(gold, pred), abs=1e-12)
    assert glue.f1_binary(pred, gold) == pytest.approx(f1_score(gold, pred, labels=[1], average="micro"), abs=1e-12)
    x, y = np.round(rng.normal(size=n), 1), np.round(rng.normal(size=n), 1)  # with ties
    assert glue.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert glue.matthews_corrcoef(np.ones(5), np.ones(5)) == 0.0  # undefined → 0, as sklearn


def test_tasks_are_read_by_name_without_tensorflow(t5_tiny):  # noqa: F811
    task = glue.load_glue("mrpc", data_dir=t5_tiny["data_dir"], val_size=16, seed=0)
    assert isinstance(task, Task) and task.sizes == {"train": 48, "val": 16, "test": 24}  # one split vocabulary
    assert "tensorflow" not in sys.modules
    idx = {sp: task.columns[sp]["idx"] for sp in ("train", "val", "test")}
    assert not set(idx["train"]) & set(idx["val"]) and sorted([*idx["train"], *idx["val"]]) == list(range(64))
    assert list(idx["test"]) == list(range(24))  # GLUE validation is the test split
    inputs, labels = task.splits["train"]
    assert inputs[0].startswith("mrpc sentence1: ") and " sentence2: " in inputs[0]
    assert task.class_names == ("not_equivalent", "equivalent") and len(set(labels)) == 2
    assert labels.dtype == np.int32
    again = glue.load_glue("mrpc", data_dir=t5_tiny["data_dir"], val_size=16, seed=0)
    assert list(again.columns["val"]["idx"]) == list(idx["val"])  # deterministic
    other = glue.load_glue("mrpc", data_dir=t5_tiny["data_dir"], val_size=16, seed=1)
    assert list(other.columns["val"]["idx"]) != list(idx["val"])
    st = glue.load_glue("stsb", data_dir=t5_tiny["data_dir"], val_size=0.25)
    scores, st_labels = st.columns["train"]["scores"], st.splits["train"][1]
    assert st.class_names == glue.TASKS["stsb"].label_words and "scores" not in task.columns["train"]
    np.testing.assert_allclose(st_labels * 0.2, np.round(scores / 0.2) * 0.2)
    capped = glue.load_glue("mrpc", data_dir=t5_tiny["data_dir"], val_size=16, seed=0, max_examples=5)
    assert capped.sizes == {"train": 5, "val": 5, "test": 5}
    assert list(capped.columns["val"]["idx"]) == list(idx["val"][:5]) and capped.splits["val"][0] == \
        task.splits["val"][0][:5]


def test_unknown_task_and_missing_data_are_clear_errors(tmp_path, t5_tiny):  # noqa: F811
    with pytest.raises(glue.UnknownTaskError, match="unknown GLUE task 'qnli2'.*supported"):
        glue.load_glue("qnli2", data_dir=t5_tiny["data_dir"])
    with pytest.raises(glue.GlueDataError, match="glue/rte split 'train': not available"):
        glue.load_glue("rte", data_dir=str(tmp_path))
    with pytest.raises(glue.GlueDataError, match="val_size"):
        glue.load_glue("rte", data_dir=t5_tiny["data_dir"], val_size=64)


def test_encode_label_words_and_truncation(t5_tiny, t5_loaded):  # noqa: F811
    _, _, tok = t5_loaded
    task = glue.load_glue("rte", data_dir=t5_tiny["data_dir"], val_size=16)
    enc = glue.encode(task, "train", tok, max_input_length=64)
    assert enc.num_truncated == 0 and enc.arrays["input_ids"].shape == (48, 64)
    ids, mask = glue.encode_choices(task, tok)
    np.testing.assert_array_equal(enc.arrays["labels"], ids[task.splits["train"][1]])
    assert (ids[mask.astype(bool)] == tok.eos_token_id).sum() == 2  # every label word ends with </s>
    short = enc.max_input_tokens - 3
    with pytest.raises(glue.InputTooLongError, match=f"exceed max_input_length={short}.*example idx"):
        glue.encode(task, "train", tok, max_input_length=short, truncation="error")
    cut = glue.encode(task, "train", tok, max_input_length=short, truncation="truncate")
    assert cut.num_truncated > 0 and cut.arrays["input_ids"].shape[1] == short
    long_rows = np.flatnonzero(cut.arrays["attention_mask"].sum(1) == short)
    assert (cut.arrays["input_ids"][long_rows, -1] == tok.eos_token_id).all()  # </s> kept
    for words, what in ((("", "entailment"), "tokenizes to nothing"), (("@@@", "entailment"), "tokenizes to nothing"),
                        (("entailment", "entailment"), "tokenize identically")):
        bad = dataclasses.replace(task, class_names=words)
        with pytest.raises(glue.LabelWordError, match=what):
            glue.encode_choices(bad, tok)
    assert issubclass(glue.LabelWordError, BcjaxError) and issubclass(glue.InputTooLongError, BcjaxError)


def test_task_metrics_per_task():
    task = glue.TASKS["stsb"]
    scores = np.array([0.0, 1.0, 2.4, 3.0, 5.0])
    labels = np.round(scores / 0.2).astype(np.int64)
    perfect = glue.task_metrics(task, labels, labels, scores)
    assert perfect["main_metric"] == "spearman" and perfect["spearman"] == pytest.approx(100.0)
    unparseable = glue.task_metrics(task, np.array([0, 5, -1, 15, 25]), labels, scores)  # −1 → the middle of the scale
    assert unparseable["spearman"] == pytest.approx(100.0)
    cola = glue.TASKS["cola"]
    y = np.array([0, 1, 1, 0, 1, 1])
    m = glue.task_metrics(cola, np.array([0, 1, 1, 1, 1, -1]), y)
    assert m["main_metric"] == "matthews" and m["accuracy"] == pytest.approx(100 * 4 / 6)
    assert m["matthews"] == pytest.approx(100 * glue.matthews_corrcoef(np.array([0, 1, 1, 1, 1, -1]), y))


def test_tfds_own_glue_parser_prepares_official_tsv_files_without_tensorflow(tmp_path):
    """tfds' real GLUE example generator (only the download step replaced by local files in
    the official RTE TSV format) prepares ArrayRecord data that load_glue reads by name."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import registered
    from tensorflow_datasets.text import glue as tfds_glue

    rows = {"train": [("A man walks.", "A person walks.", "entailment"), ("It rains.", "It is dry.", "not_entailment"),
                      ("Cats purr.", "Animals purr.", "entailment"), ("Sun is up.", "It is night.", "not_entailment")],
            "dev": [("Birds fly.", "Some animals fly.", "entailment"), ("He ate.", "He starved.", "not_entailment")],
            "test": [("Fish swim.", "Fish move.", None)]}
    for split, items in rows.items():
        lines = ["index\tsentence1\tsentence2" + ("\tlabel" if split != "test" else "")]
        lines += [f"{i}\t{a}\t{b}" + (f"\t{y}" if y else "") for i, (a, b, y) in enumerate(items)]
        (tmp_path / f"{split}.tsv").write_text("\n".join(lines) + "\n")

    with registered.skip_registration():
        class Glue(tfds_glue.Glue):
            def _split_generators(self, dl_manager):
                return [tfds.core.SplitGenerator(name=name, gen_kwargs={"data_file": str(tmp_path / f"{f}.tsv"),
                                                                        "split": f})
                        for name, f in (("train", "train"), ("validation", "dev"), ("test", "test"))]

    Glue(config="rte", data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    task = glue.load_glue("rte", data_dir=str(tmp_path / "tfds"), val_size=1)
    assert "tensorflow" not in sys.modules
    assert task.sizes["train"] == 3 and task.sizes["val"] == 1
    inputs, labels = task.splits["test"]
    assert inputs == ["rte sentence1: Birds fly. sentence2: Some animals fly.",
                      "rte sentence1: He ate. sentence2: He starved."]
    assert [task.class_names[i] for i in labels] == ["entailment", "not_entailment"]
