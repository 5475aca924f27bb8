"""docs/data_dependent.md's Python examples run as written."""
import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "data_dependent.md"


def test_data_dependent_doc_blocks_execute():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 3
    ns: dict = {}
    exec(compile("\n".join(blocks), str(DOC), "exec"), ns)  # noqa: S102
    assert ns["lam"].shape == (3, 4)
    assert (ns["lam_loaded"] == ns["lam"]).all()
    assert 0 <= ns["acc_ensemble"] <= 1 and 0 <= ns["acc_own"] <= 1
