"""bench/plans.py keeps the paper-scale programs compiling (issue 16, item 5).

* ViT-B/32 at full size (batch 128, 224 px, 87.5M parameters) on 1 and 8 devices: all four
  programs (fine-tuning step, evaluation step, 256-subset and 2-subset merge kernels)
  *lower*, and XLA's FLOP counts match closed forms; the merge kernels are also *compiled*
  at full size and their per-device memory matches the sharding plan. Compiling the full
  fine-tuning and evaluation steps takes 15–60 s per device count on a 2-core machine, so
  here they compile at a tiny width instead (bench/plans.py compiles them at full size).
* The tiny programs are compiled and *run*: the planned fine-tuning and evaluation steps
  give exactly what calling :func:`bcjax.train._train_step` / the evaluation step directly
  gives (the plan measures the real program), for CLIP and T5.
"""
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytest.importorskip("transformers.models.clip.modeling_flax_clip", reason="transformers with Flax models")
from bench import plans  # noqa: E402

from bcjax import evaluate, train  # noqa: E402
from bcjax.train import data_mesh  # noqa: E402

TINY_CLIP = {"vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            patch_size=8, projection_dim=16), "image_size": 32, "batch": 16, "classes": 5}
TINY_T5 = {"t5": dict(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2),
           "batch": 8, "input_len": 16}


def _mesh(n):
    if len(jax.devices()) < n:
        pytest.fail(f"tests/conftest.py sets 8 CPU devices; found {len(jax.devices())}")
    return data_mesh(jax.devices()[:n])


def _params(planned):
    return planned.info["params"]


@pytest.fixture(scope="module", params=[1, 8], ids=["1dev", "8dev"])
def vit_b_32(request):
    n = request.param
    return n, plans.lowered_programs("vit_b_32", _mesh(n))


def _vit_b_32_param_count(d=768, layers=12, patch=32, grid=7):
    """HF CLIPVisionModel: patch conv (no bias), class and position embeddings, pre/post
    LayerNorms; per layer q, k, v, out (with biases), fc1 d→4d, fc2 4d→d, two LayerNorms."""
    per_layer = 4 * (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d
    return patch * patch * 3 * d + d + (grid * grid + 1) * d + 2 * 2 * d + layers * per_layer


def test_vit_b_32_lowers_at_full_size_and_flops_match_closed_forms(vit_b_32):
    n, programs = vit_b_32
    assert set(programs) == {"train", "eval", "merge256", "merge_chunk"}
    n_params = _params(programs["train"])
    assert n_params == _vit_b_32_param_count()
    tokens = plans.CLIP_BATCH * ((plans.IMAGE_SIZE // 32) ** 2 + 1)
    flops = {k: p.lowered.cost_analysis()["flops"] for k, p in programs.items()}  # whole program, all devices
    print(f"\nViT-B/32 on {n} device(s), lowered: " + ", ".join(f"{k} {v / 1e12:.4g} TFLOP" for k, v in flops.items()))
    # forward = 2·N·tokens (matmuls) + 4·t²·d per layer and image (QKᵀ, AV); eval = 2 models' forwards;
    # training ≈ 3 forwards (the patch embedding's input gradient is not needed: −0.9 %)
    attention = 12 * 4 * 50 ** 2 * 768 * plans.CLIP_BATCH
    forward = 2 * n_params * tokens + attention
    assert flops["eval"] == pytest.approx(plans.MODELS_PER_CALL * forward, rel=0.002)
    assert flops["train"] == pytest.approx(3 * forward, rel=0.01)
    # the subset contraction: per subset and parameter, T multiply-adds + α· and +θ0
    for prog, s in (("merge256", 256), ("merge_chunk", plans.MODELS_PER_CALL)):
        assert flops[prog] == s * n_params * (2 * plans.NUM_TASKS + 2)


@pytest.mark.parametrize("prog", ["merge256", "merge_chunk"])
def test_vit_b_32_merge_kernels_compile_at_full_size_with_sharded_memory(vit_b_32, prog):
    n, programs = vit_b_32
    planned = programs[prog]
    compiled = planned.lowered.compile()
    mem, cost = plans._memory(compiled), plans._cost(compiled)
    print(f"\nViT-B/32 {prog} on {n} device(s), per device: " +
          ", ".join(f"{k} {v / 2**30:.3f} GiB" for k, v in mem.items()) + f", {cost['flops'] / 1e12:.4g} TFLOP")
    n_params, s, t = _params(planned), planned.info["subsets"], plans.NUM_TASKS
    # θ0 replicated, Δ (T models) split over the devices — every ViT-B/32 leaf has an axis divisible by 8
    assert mem["argument_size_bytes"] == pytest.approx(4 * n_params * (1 + t / n), rel=1e-3)
    assert mem["output_size_bytes"] == pytest.approx(4 * n_params * s / n, rel=1e-3)
    assert cost["flops"] == pytest.approx(s * n_params * (2 * t + 2) / n, rel=1e-3)


def _copy(tree):
    return jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, tree)


@pytest.mark.parametrize("n", [1, 8])
def test_planned_clip_steps_compile_and_compute_the_real_steps(n):
    programs = plans.lowered_programs("vit_b_32", _mesh(n), ("train", "eval"), small=TINY_CLIP)
    tx = train.make_optimizer(train.TrainConfig())
    _, _, predict, loss, _, _ = plans.clip_setup("tiny", TINY_CLIP["image_size"], TINY_CLIP["batch"],
                                                 TINY_CLIP["classes"], TINY_CLIP["vision"])
    for prog, planned in programs.items():
        compiled = planned.lowered.compile()
        mem = plans._memory(compiled)
        print(f"\ntiny CLIP {prog} on {n} device(s), per device: {mem['total_bytes'] / 2**20:.2f} MiB")
        args = plans.random_like(planned.args, jax.random.PRNGKey(1))
        if prog == "train":
            # parameters and optimizer state replicated, the batch split over the devices
            batch_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(args[2]))
            state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(args[:2]) + jax.tree.leaves(args[3]))
            assert mem["argument_size_bytes"] == state_bytes + batch_bytes // n
            got = compiled(*_copy(args))
            want = train._train_step(loss, tx, *_copy(args))
        else:
            got = compiled(*args)
            want = evaluate._correct_stack(predict, *args)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_planned_t5_steps_compile_and_compute_the_real_steps():
    from bcjax.models import t5 as t5m

    programs = plans.lowered_programs("t5_base", _mesh(8), ("train", "eval", "merge_chunk"), small=TINY_T5)
    fns, _ = plans.t5_setup(TINY_T5["t5"])
    tx = train.make_optimizer(train.TrainConfig())
    for prog, planned in programs.items():
        compiled = planned.lowered.compile()
        assert plans._cost(compiled)["flops"] > 0
        args = plans.random_like(planned.args, jax.random.PRNGKey(2))
        got = compiled(*_copy(args))
        if prog == "train":
            want = train._train_step(fns.loss, tx, *_copy(args))
        elif prog == "eval":
            want = t5m.jit_rank_scores(fns, *args)
        else:
            from bcjax.sweeps import subset_merges

            want = subset_merges(*args)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


def test_markdown_table_lists_memory_and_flops_per_device_count():
    def row(model, prog, n, gib, tflop):
        return {"model": model, "program": prog, "devices": n, "params": 87.5e6,
                "memory_per_device": {"total_bytes": gib * 2**30}, "cost_per_device": {"flops": tflop * 1e12}}

    rows = [row("t5_base", "train", 1, 3.0, 10.0), row("vit_b_32", "train", 8, 1.5, 0.42),
            row("vit_b_32", "train", 1, 7.5, 3.37), row("vit_b_32", "merge256", 1, 129.0, 0.4)]
    lines = plans.markdown_table(rows).splitlines()
    assert lines[0] == ("| model | program | params (M) | 1 dev: GiB/device | 8 dev: GiB/device "
                        "| 1 dev: TFLOP/device | 8 dev: TFLOP/device |")
    assert lines[2] == "| vit_b_32 | fine-tuning step | 87.5 | 7.50 | 1.50 | 3.37 | 0.42 |"
    assert lines[3] == "| vit_b_32 | merge, 256 subsets | 87.5 | 129.00 | – | 0.4 | – |"
    assert lines[4] == "| t5_base | fine-tuning step | 87.5 | 3.00 | – | 10 | – |"


def test_gpu_step_script_runs_the_planned_programs_on_this_device(tmp_path):
    """bench/gpu_step.py (run once on an H200 by hand) on tiny shapes: it compiles the planned
    programs, runs them and records time next to XLA's estimate."""
    import json

    from bench import gpu_step

    gpu_step.main(["--small", "--steps", "2", "--programs", "eval,merge_chunk", "--out", str(tmp_path / "g.json")])
    data = json.loads((tmp_path / "g.json").read_text())
    assert [r["program"] for r in data["rows"]] == ["eval", "merge_chunk"]
    for r in data["rows"]:
        assert len(r["times_s"]) == 2 and r["median_s"] > 0 and r["cost"]["flops"] > 0
        assert r["achieved_tflops"] == pytest.approx(r["cost"]["flops"] / r["median_s"] / 1e12)
        assert r["memory"]["total_bytes"] > 0
