"""Results store: resume without recomputation, corrupt last line skipped with a warning."""
import pytest

from bcjax.results_store import ResultsStore, config_key


def test_put_get_and_resume(tmp_path):
    path = tmp_path / "r.jsonl"
    s = ResultsStore(path)
    calls = []
    for i in range(3):
        s.get_or_compute({"point": i, "alpha": 0.3}, lambda i=i: calls.append(i) or {"acc": i / 10})
    assert calls == [0, 1, 2]
    again = ResultsStore(path)  # a rerun after the process died
    assert len(again) == 3 and again.get({"alpha": 0.3, "point": 1}) == {"acc": 0.1}  # key order irrelevant
    again.get_or_compute({"point": 1, "alpha": 0.3}, lambda: pytest.fail("recomputed a finished point"))
    assert config_key({"a": 1, "b": 2}) == config_key({"b": 2, "a": 1}) != config_key({"a": 1, "b": 3})


def test_corrupt_last_line_is_skipped_with_warning_and_recomputed(tmp_path):
    path = tmp_path / "r.jsonl"
    s = ResultsStore(path)
    s.put({"p": 1}, 1.0)
    s.put({"p": 2}, 2.0)
    data = path.read_bytes()
    path.write_bytes(data[:-15])  # the last write was cut off mid-line
    with pytest.warns(RuntimeWarning, match="corrupt results line"):
        resumed = ResultsStore(path)
    assert resumed.skipped_lines == 1 and resumed.get({"p": 1}) == 1.0 and {"p": 2} not in resumed
    resumed.put({"p": 2}, 2.5)
    with pytest.warns(RuntimeWarning, match="corrupt results line"):  # the cut-off line is still there
        assert ResultsStore(path).get({"p": 2}) == 2.5  # the appended line starts on a fresh line


def test_in_memory_store():
    s = ResultsStore(None)
    s.put({"x": 1}, [1, 2])
    assert s.get({"x": 1}) == [1, 2] and len(s) == 1
