"""Real multi-process runs (SPEC §2): 2 and 4 processes on localhost, ``jax.distributed``
with gloo CPU collectives, one global mesh; a sharded Breadcrumbs merge, a (β, γ) grid and a
subset sweep must be bit-identical to the same code in one process on one device.

The runnable script is ``docs/multihost_demo.py`` (its output is in docs/multihost.md); this
test drives its launcher (free port, timeout, children killed on failure)."""
import importlib.util
import os

import numpy as np
import pytest

import bcjax
from bcjax import sweeps

_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "docs", "multihost_demo.py")


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("multihost_demo", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def reference(demo):
    want = demo.single_process_reference()
    # the reference itself is the core: one merge and the sweep agree with bcjax.merge on numpy
    pre, fts = demo.make_models()
    core = bcjax.merge("breadcrumbs", pre, fts, alpha=demo.ALPHA, beta=demo.BETA, gamma=demo.GAMMA)
    for k in core:
        np.testing.assert_array_equal(want[f"merge/{k}"], np.asarray(core[k]), err_msg=k)
    subset = [1, 0, 1]
    row = [i for i, r in enumerate(sweeps.all_subsets(len(fts))) if list(r) == [bool(s) for s in subset]][0]
    two = bcjax.merge("breadcrumbs", pre, [fts[0], fts[2]], alpha=demo.SWEEP_ALPHA, beta=demo.BETA, gamma=demo.GAMMA)
    np.testing.assert_allclose(want["sweep/w"][row], np.asarray(two["w"]), rtol=1e-6, atol=1e-6)
    return want


@pytest.mark.parametrize("processes,devices", [(2, 2), (4, 1)])
def test_multi_process_results_are_bit_identical_to_one_process(demo, reference, tmp_path, processes, devices):
    got = demo.launch(processes, devices, str(tmp_path), timeout=240)
    assert demo.compare(got, reference) == []
    assert {k.split("/")[0] for k in got} == {"merge", "grid", "sweep"}
    logs = [open(tmp_path / f"process{i}.log").read() for i in range(processes)]
    for i, log in enumerate(logs):   # every process really joined one global mesh
        assert f"process {i}/{processes}: {devices} local of {processes * devices} global devices" in log


def test_compare_flags_a_one_ulp_difference(demo, reference):
    changed = dict(reference)
    w = np.array(changed["grid/w"])
    w.flat[5] = np.nextafter(w.flat[5], np.float32(np.inf))
    changed["grid/w"] = w
    del changed["sweep/b"]
    assert sorted(demo.compare(changed, reference)) == ["grid/w", "sweep/b"]


def test_failing_workers_raise_with_their_logs_instead_of_hanging(demo, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="no_such_platform")
    with pytest.raises(RuntimeError, match=r"(?s)exit codes.*--- process 0 ---.*no_such_platform.*--- process 1 ---"):
        demo.launch(2, 1, str(tmp_path), timeout=60, env=env)
