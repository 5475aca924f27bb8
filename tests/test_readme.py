"""The README's Python examples run as written (docs that run)."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_execute():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    try:
        exec(compile("\n".join(blocks), str(README), "exec"), namespace)  # noqa: S102
        assert namespace["kept"] > 0
        assert namespace["stacked"]["Dense_0"]["kernel"].shape[0] == 2
    finally:
        import bcjax

        if "scaled_mean_tv" in bcjax.methods():
            bcjax.unregister_method("scaled_mean_tv")


def test_readme_opens_with_the_two_commands_ci_uses():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    assert "bash run.sh demo" in first_block and "bash run.sh test" in first_block
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash run.sh test" in ci
