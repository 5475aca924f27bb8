"""Install hygiene: the core needs only jax and numpy; optional dependencies are imported
lazily and a missing one names the extra that provides it; versions are ranges in
pyproject.toml and exact pins only in the constraints files."""
import os
import re
import subprocess
import sys
import textwrap
import tomllib

import pytest

from bcjax import errors
from bcjax._optional import EXTRAS, requires

ROOT = os.path.join(os.path.dirname(__file__), "..")
OPTIONAL = ("flax", "optax", "orbax", "chex", "transformers", "torch", "tensorflow_datasets", "onnx",
            "onnxruntime", "sentencepiece", "safetensors", "matplotlib", "PIL", "skimage", "sklearn", "mlxtend")


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_core_imports_load_no_optional_dependency():
    r = _run(f"""
        import sys
        import bcjax, bcjax.grids, bcjax.sweeps, bcjax.masks, bcjax.order_stats, bcjax.tree, bcjax.merging
        import bcjax.results_store, bcjax.config, bcjax.cli
        loaded = sorted(m for m in {OPTIONAL!r} if m in sys.modules)
        print("LOADED", loaded)
    """)
    assert r.returncode == 0, r.stderr
    assert "LOADED []" in r.stdout, r.stdout


def test_a_missing_optional_module_names_the_extra():
    with pytest.raises(errors.MissingDependencyError, match=r"no_such_pkg_xyz.*pip install 'bcjax\[t5\]'") as e:
        with requires("t5"):
            import no_such_pkg_xyz  # noqa: F401
    assert isinstance(e.value, ImportError) and isinstance(e.value, errors.BcjaxError)
    assert isinstance(e.value.__cause__, ModuleNotFoundError)


def test_an_incompatible_version_names_the_extra():
    with pytest.raises(errors.MissingDependencyError, match=r"incompatible version.*bcjax\[clip\]"):
        with requires("clip"):
            from json import NoSuchName  # noqa: F401  (ImportError, as `from transformers import FlaxX` on 5.x)


def test_bcjax_own_import_errors_and_unknown_extras_pass_through():
    with pytest.raises(ModuleNotFoundError) as e:
        with requires("train"):
            import bcjax.no_such_module  # noqa: F401
    assert not isinstance(e.value, errors.MissingDependencyError)
    with pytest.raises(ValueError, match="unknown bcjax extra"):
        with requires("nope"):
            pass


@pytest.mark.parametrize("blocked,code,extra", [
    ("optax", "import bcjax.train", "train"),
    ("orbax", "import bcjax.train; bcjax.train._checkpoint_manager('/tmp/x')", "train"),
    ("transformers", "from bcjax.models import clip; clip.load_tokenizer('x')", "clip"),
    ("transformers", "from bcjax.models import t5; t5.load_tokenizer('x')", "t5"),
])
def test_library_modules_report_the_extra(blocked, code, extra):
    """With a package made unimportable (``sys.modules[name] = None``), the adapter that
    needs it raises MissingDependencyError naming the extra."""
    if blocked == "orbax":   # bcjax.train imports optax first (absent in the lowest-jax venv)
        pytest.importorskip("optax")
    r = _run(f"""
        import sys
        sys.modules[{blocked!r}] = None
        from bcjax.errors import MissingDependencyError
        try:
            {code}
        except MissingDependencyError as e:
            print("MISSING", e)
    """)
    assert r.returncode == 0, r.stderr
    assert f"MISSING module {blocked!r}" in r.stdout and f"pip install 'bcjax[{extra}]'" in r.stdout, r.stdout


def _req_name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower().replace("_", "-")


def _pins(path: str) -> dict[str, str]:
    pins = {}
    for line in open(os.path.join(ROOT, path)):
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path}: {line!r} is not an exact pin"
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_metadata_has_ranges_and_constraints_pin_every_dependency():
    meta = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    core = {_req_name(r): r for r in meta["dependencies"]}
    assert set(core) == {"jax", "numpy", "pyyaml", "tqdm"}
    extras = meta["optional-dependencies"]
    assert set(EXTRAS) <= set(extras), "every extra an error message names exists"
    assert {"flax", "optax", "orbax-checkpoint", "chex"} == {_req_name(r) for r in extras["train"]}
    every = list(meta["dependencies"]) + [r for reqs in extras.values() for r in reqs]
    assert not [r for r in every if "==" in r], "exact pins belong in constraints.txt"
    pins = _pins("constraints.txt")
    names = {_req_name(r) for r in every} - {"bcjax"}
    assert names <= set(pins), f"not pinned in constraints.txt: {sorted(names - set(pins))}"
    lowest = _pins("constraints-lowest.txt")
    assert f"jax>={lowest['jax']}" in meta["dependencies"] and lowest["jaxlib"] == lowest["jax"]
    assert f"numpy>={lowest['numpy'].rsplit('.', 1)[0]}" in meta["dependencies"]


def test_run_sh_test_groups_name_existing_files_and_core_tests_need_no_extras():
    """`bash run.sh test` runs TEST_GROUPS, then every other file; `test-lowest` runs CORE_TESTS
    in a venv with only the test-core extra, so those files must not import optional packages."""
    text = open(os.path.join(ROOT, "run.sh")).read()
    groups = re.search(r"TEST_GROUPS=\((.*?)\)\n", text, flags=re.S).group(1)
    core = re.search(r"CORE_TESTS=\((.*?)\)\n", text, flags=re.S).group(1)
    files = re.findall(r"tests/test_\w+\.py", groups)
    core_files = re.findall(r"tests/test_\w+\.py", core)
    assert len(files) == len(set(files)) >= 4 and len(core_files) >= 6
    for f in files + core_files:
        assert os.path.isfile(os.path.join(ROOT, f)), f
    assert not set(files) & set(core_files)
    for f in core_files:
        src = open(os.path.join(ROOT, f)).read()
        imported = set(re.findall(r"^\s*(?:import|from) (\w+)", src, flags=re.M))
        assert not imported & set(OPTIONAL), (f, imported & set(OPTIONAL))
