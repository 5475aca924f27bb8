"""Multi-process bcjax, for real: N processes on this machine, one global mesh, CPU collectives.

    python docs/multihost_demo.py --processes 2            # 2 processes x 2 CPU devices each
    python docs/multihost_demo.py --processes 4 --devices-per-process 1

The launcher starts N copies of this script (``--process-id i``), each of which calls
``jax.distributed.initialize`` (coordinator on a free localhost port, gloo CPU collectives),
builds the global mesh over all processes' devices, and runs -- on global arrays that every
process assembles from its own slices (``jax.make_array_from_callback``, as a host would read
its shards of a checkpoint):

1. a sharded Breadcrumbs merge (``bcjax.merge``, eager, on global arrays),
2. a (β, γ) grid of Breadcrumbs merges (``grids.grid_threshold_bits`` + ``grids.merges_kernel``
   with ``out_shardings`` on the global mesh),
3. a subset sweep (``sweeps.task_deltas`` + ``grids.subset_merge_kernel``, all 2^T subsets).

Process 0 gathers the results (``multihost_utils.process_allgather``) and saves them; the
launcher then runs the same code in one process on one device and checks every leaf of every
result is bit-identical (SPEC §2: histograms are int32 sums, everything else elementwise). On
a TPU pod the worker part is the whole program: ``jax.distributed.initialize()`` auto-detects
the coordinator and process ids, and the same kernels run unchanged (docs/multihost.md).

Every child runs in its own session with a timeout; on any failure or timeout the launcher
kills the children it started and prints their logs.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ALPHA, BETA, GAMMA = 0.3, 0.9, 0.99
GRID_ALPHAS, GRID_BETAS, GRID_GAMMAS = (0.3, 1.0), (0.0, 0.5, 0.9), (0.99, 1.0)
SWEEP_ALPHA = 0.5


def make_models(num_tasks: int = 3, seed: int = 0):
    """θ0 and T fine-tuned trees (numpy, deterministic): a histogram-path leaf ("w"), a
    sort-path leaf ("b"), a leaf full of ties ("q"), a leaf with an odd size ("odd") and an
    integer leaf ("n", copied from θ0)."""
    rng = np.random.default_rng(seed)
    pre = {"w": rng.standard_normal((64, 48)).astype(np.float32), "b": rng.standard_normal(40).astype(np.float32),
           "q": np.zeros((16, 16), np.float32), "odd": rng.standard_normal((7, 5)).astype(np.float32),
           "n": np.int32(3)}
    fts = []
    for t in range(num_tasks):
        fts.append({"w": pre["w"] + rng.standard_normal((64, 48)).astype(np.float32) * (0.5 + t),
                    "b": pre["b"] + rng.standard_normal(40).astype(np.float32),
                    "q": np.round(rng.standard_normal((16, 16)) * 2).astype(np.float32),
                    "odd": pre["odd"] + rng.standard_normal((7, 5)).astype(np.float32),
                    "n": np.int32(7)})
    return pre, fts


def run_all(mesh, pre, fts) -> dict[str, np.ndarray]:
    """The three computations on ``mesh`` (any number of processes and devices); returns
    host numpy arrays, identical on every process."""
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    import bcjax
    from bcjax import grids, sweeps

    def global_tree(tree, skip_leading=0):
        """Each process builds the global arrays from the slices its devices hold."""
        shardings = grids.leaf_shardings(tree, mesh, "x", skip_leading=skip_leading)
        return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
                            tree, shardings)

    def to_host(tree):
        return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)

    pre_g, fts_g = global_tree(pre), [global_tree(f) for f in fts]
    out = {}

    # 1. one Breadcrumbs merge of all tasks, eager, on global arrays
    merged = bcjax.merge("breadcrumbs", pre_g, fts_g, alpha=ALPHA, beta=BETA, gamma=GAMMA)
    out.update({f"merge/{k}": v for k, v in to_host(merged).items()})

    # 2. a (β, γ) grid: one order-statistics pass per leaf x task, every grid point in one program
    pairs = grids.beta_gamma_pairs(GRID_BETAS, GRID_GAMMAS)
    points = [(a, b, g) for (b, g) in pairs for a in GRID_ALPHAS]
    taus = grids.stack_task_vectors(pre_g, fts_g)
    thresholds = grids.grid_threshold_bits(taus, pairs)
    weights = np.array([[a] * len(fts) for a, _, _ in points], np.float32)
    gidx = np.array([pairs.index((b, g)) for _, b, g in points], np.int32)
    grid_out = grids.leaf_shardings(jax.tree.map(lambda x: np.zeros((len(points),) + np.shape(x)), pre), mesh, "x",
                                    skip_leading=1)
    grid = grids.weighted_masked_merges(pre_g, taus, thresholds, weights, gidx,
                                        kernel=grids.merges_kernel(out_shardings=grid_out))
    out.update({f"grid/{k}": v for k, v in to_host(grid).items()})

    # 3. every subset of the tasks (one contraction per leaf), Δ sharded over the mesh
    indicator = sweeps.all_subsets(len(fts))
    deltas = sweeps.task_deltas("breadcrumbs", pre_g, fts_g, beta=BETA, gamma=GAMMA)
    d_sh = grids.leaf_shardings(deltas, mesh, "x", skip_leading=1)
    deltas = jax.device_put(deltas, d_sh)
    rep = NamedSharding(mesh, P())
    sub_out = grids.leaf_shardings(jax.tree.map(lambda x: np.zeros((len(indicator),) + np.shape(x)), pre), mesh, "x",
                                   skip_leading=1)
    p_sh = jax.tree.map(lambda x: x.sharding, pre_g)     # θ0 stays sharded as loaded
    kernel = grids.subset_merge_kernel(in_shardings=(p_sh, d_sh, rep, rep),
                                       out_shardings=sub_out)
    sweep = kernel(pre_g, deltas, indicator, np.float32(SWEEP_ALPHA))
    out.update({f"sweep/{k}": v for k, v in to_host(sweep).items()})
    return out


def worker(args) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", args.devices_per_process)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=int(args.timeout))
    from jax.sharding import Mesh

    devices = np.array(jax.devices())               # all devices of all processes, in a global order
    mesh = Mesh(devices, ("x",))
    pre, fts = make_models()
    out = run_all(mesh, pre, fts)
    print(f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of "
          f"{jax.device_count()} global devices, {len(out)} result leaves", flush=True)
    if jax.process_index() == 0:
        np.savez(os.path.join(args.out, "multiprocess.npz"), **out)
    jax.distributed.shutdown()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(num_processes: int, devices_per_process: int, out_dir: str, *, timeout: float = 120.0,
           env: dict | None = None) -> dict[str, np.ndarray]:
    """Start ``num_processes`` workers on localhost, wait (at most ``timeout`` seconds in all),
    and return process 0's gathered results. Raises ``RuntimeError`` with the workers' logs
    if any fails or times out; every child still running is killed first."""
    coordinator = f"127.0.0.1:{free_port()}"
    env = dict(os.environ if env is None else env)
    env.pop("XLA_FLAGS", None)                        # the worker sets its own device count
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    procs, logs = [], []
    try:
        for i in range(num_processes):
            log = open(os.path.join(out_dir, f"process{i}.log"), "w+")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--process-id", str(i), "--num-processes",
                 str(num_processes), "--devices-per-process", str(devices_per_process), "--coordinator", coordinator,
                 "--out", out_dir, "--timeout", str(int(timeout))],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
        codes = [p.poll() for p in procs]
        if codes != [0] * num_processes:
            raise RuntimeError(f"multi-process run failed (exit codes {codes}; None: still running "
                               f"when stopped, at the first failure or the {timeout:.0f} s timeout):\n" + _logs(logs))
        return dict(np.load(os.path.join(out_dir, "multiprocess.npz")))
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, 9)                # the child's own session: only what we started
                except ProcessLookupError:
                    pass
                p.wait()
        for log in logs:
            log.close()


def _logs(logs) -> str:
    parts = []
    for i, log in enumerate(logs):
        log.flush()
        log.seek(0)
        parts.append(f"--- process {i} ---\n" + log.read()[-4000:])
    return "\n".join(parts)


def single_process_reference() -> dict[str, np.ndarray]:
    """The same computations in this process, on a one-device mesh."""
    import jax
    from jax.sharding import Mesh

    pre, fts = make_models()
    return run_all(Mesh(np.array(jax.devices()[:1]), ("x",)), pre, fts)


def compare(got: dict, want: dict) -> list[str]:
    """Names of the result leaves that differ (bit for bit) or are missing."""
    bad = sorted(set(want) ^ set(got))
    for k in sorted(set(want) & set(got)):
        a, b = np.asarray(got[k]), np.asarray(want[k])
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            bad.append(k)
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--processes", type=int, default=2, help="number of processes to launch")
    ap.add_argument("--devices-per-process", type=int, default=2, help="CPU devices per process")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole multi-process run")
    ap.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--num-processes", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--coordinator", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.process_id is not None:
        worker(args)
        return 0
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        got = launch(args.processes, args.devices_per_process, tmp, timeout=args.timeout)
        wall = time.perf_counter() - t0
        for line in _logs_of(tmp, args.processes):
            print(line)
    want = single_process_reference()
    bad = compare(got, want)
    groups = sorted({k.split("/")[0] for k in want})
    print(f"jax {jax.__version__}: {args.processes} processes x {args.devices_per_process} CPU devices "
          f"(gloo collectives), {wall:.1f} s including start-up")
    for g in groups:
        keys = [k for k in want if k.startswith(g + "/")]
        shapes = ", ".join(f"{k.split('/')[1]} {tuple(want[k].shape)}" for k in keys)
        same = all(k not in bad for k in keys)
        print(f"  {g:6s} {'bit-identical' if same else 'DIFFERS'} to one process: {shapes}")
    if bad:
        print(f"differing leaves: {bad}")
        return 1
    return 0


def _logs_of(out_dir: str, n: int):
    for i in range(n):
        with open(os.path.join(out_dir, f"process{i}.log")) as f:
            yield from (line.rstrip() for line in f if line.startswith("process "))


if __name__ == "__main__":
    sys.exit(main())
