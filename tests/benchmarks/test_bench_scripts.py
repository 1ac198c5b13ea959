"""CPU checks of the GPU benchmark scripts (bench_layer, bench_mx_gemm, bench_train).

The scripts are run on the H200 in one call each, so their code paths are exercised here first:
the kernel categories and the list of FP8 GEMMs directly, and each script's ``--smoke`` mode
(tiny shapes, CPU, eager) in a subprocess. The numbers measured on CPU mean nothing.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


def _import(name: str):
    """Imports a benchmark script without letting it change this process's environment
    (bench_layer turns Inductor's caches off at import)."""
    saved = dict(os.environ)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCHMARKS))
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.parametrize("name, category", [
    ("nvjet_qqtst_128x256_64x4_2x1_v_bz_coopA_NNT", "gemm"),                       # cuBLASLt FP8
    ("sm90_xmma_gemm_e4m3e4m3_e4m3f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("void cutlass::device_kernel<at::cuda::detail::enable_3x_kernel_for_sm9x<GemmUniversal<>>>", "gemm"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float>", "gemm"),
    ("_dequantize_kernel", "gemm"),                                                 # Hopper MX emulation
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
    ("triton_poi_fused__scaled_dot_product_efficient_attention_backward_3", "attention"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "norm+cast"),            # Inductor RMSNorm
    ("_norm_cast_kernel", "norm+cast"),
    ("_rms_norm_backward_kernel", "norm+cast"),
    ("triton_red_fused_abs_amax_0", "casts"),                                       # torchao amax
    ("triton_poi_fused__to_copy_clamp_mul_1", "casts"),                             # saturating FP8 cast
    ("triton_poi_fused_block_scaled_mm_5", "casts"),                                # MX weight/grad casts
    ("triton_poi_fused_mul_silu_2", "other"),
    ("Memset (Device)", "other"),
])
def test_kernel_categories(name, category):
    assert _import("bench_profile").categorise(name) == category


def test_fp8_gemms_are_the_21_gemms_of_a_layer():
    gm = _import("bench_mx_gemm")
    gemms = gm.fp8_gemms(16384, gm.FP8_LINEARS)
    assert len(gemms) == 21
    assert sum(g.m * g.n * g.k for g in gemms) == 3 * 16384 * sum(n * k for _, n, k in gm.FP8_LINEARS)
    q_fwd, q_dgrad, q_wgrad = gemms[:3]
    assert (q_fwd.m, q_fwd.n, q_fwd.k) == (16384, 4096, 4096)
    down = [g for g in gemms if g.linear == "down"]
    assert [(g.kind, g.m, g.n, g.k) for g in down] == [
        ("fwd", 16384, 4096, 14336), ("dgrad", 16384, 14336, 4096), ("wgrad", 4096, 14336, 16384)]
    for g in gemms:  # e4m3 forward, e5m2 gradients in both backward GEMMs; fast accumulation forward only
        assert (g.a_dtype == gm.E4M3) == (g.kind == "fwd")
        assert g.b_dtype == gm.E4M3
        assert g.fast_accum == (g.kind == "fwd")


def _smoke(script: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke", "--out", str(tmp_path), *args],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "command: python" in proc.stdout
    return proc


def _fp8_api() -> bool:
    return _import("bench_layer").fp8_api_missing() is None


@pytest.mark.slow
def test_bench_layer_smoke(tmp_path):
    _smoke("bench_layer.py", "--eager", "--arms", "torchao,mxrewrite fp8", tmp_path=tmp_path)
    res = {r["arm"]: r for r in json.loads((tmp_path / "bench_layer.json").read_text())["results"]}
    assert res["bf16"]["status"] == "ok" and res["bf16"]["rel_err_vs_fp32"] < 0.01
    for name in ("torchao float8 tensorwise", "torchao float8 rowwise"):  # (GEMMs emulated on CPU)
        assert res[name]["status"] == "ok" and res[name]["converted_linears"] == 7, res[name]
        assert res["bf16"]["rel_err_vs_fp32"] < res[name]["rel_err_vs_fp32"] < 0.05
    for name in ("mxrewrite fp8 rmsnorm", "mxrewrite fp8 mxnorm"):
        if _fp8_api():
            assert res[name]["status"] == "ok", res[name]["status"]
            assert res[name]["converted_linears"] == 7
            assert res[name]["rel_err_vs_fp32"] < 0.05
        else:
            assert res[name]["status"].startswith("not available")


@pytest.mark.slow
def test_bench_mx_gemm_smoke(tmp_path):
    _smoke("bench_mx_gemm.py", "--fp8-rounds", "1", tmp_path=tmp_path)
    res = json.loads((tmp_path / "fp8_gemm_results.json").read_text())
    assert len(res["rows"]) == 21
    assert all(r["scaled_mm_ms"] > 0 and r["bf16_ms"] > 0 for r in res["rows"])
    if res["fp8_matmul_missing"]:
        return
    if not res["environment"]["device"].startswith("CPU"):  # fp8_mm is torch._scaled_mm there: the same bits
        assert all(r["bit_equal"] for r in res["rows"])
    else:  # ours multiplies the dequantised operands in float32; torch's CPU _scaled_mm (oneDNN) may round
        # differently (fast accumulation): at most one bf16 rounding step of the output's largest value apart
        assert all(r["max_rel_diff"] <= 2 ** -7 for r in res["rows"]), [r["max_rel_diff"] for r in res["rows"]]


@pytest.mark.slow
def test_bench_train_smoke(tmp_path):
    _smoke("bench_train.py", "--compile", "none", "--arms", "mxrewrite fp8", tmp_path=tmp_path)
    res = {r["arm"]: r for r in json.loads((tmp_path / "bench_train.json").read_text())["results"]}
    assert res["bf16"]["status"] == "ok" and res["bf16"]["trains"]
    for name in ("mxrewrite fp8 rmsnorm", "mxrewrite fp8 mxnorm"):
        if _fp8_api():
            assert res[name]["status"] == "ok", res[name]["status"]
            assert res[name]["trains"]
            assert res[name]["converted_linears"] == 14  # 7 per layer, the head stays bf16
        else:
            assert res[name]["status"].startswith("not available")


def _bench_distributed(tmp_path: Path, *args: str, ranks: int = 2) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(ranks), str(BENCHMARKS / "bench_distributed.py"), "--smoke", "--out", str(tmp_path),
                           *args], capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"command: torchrun --nproc-per-node {ranks}" in proc.stdout
    return {r["arm"]: r for r in json.loads((tmp_path / "bench_distributed.json").read_text())["results"]}


@pytest.mark.slow
@pytest.mark.parametrize("world,tp", [(2, 1), (4, 2)], ids=("dp2", "dp2xtp2"))
def test_bench_distributed_smoke(tmp_path, world, tp):
    """torchrun with CPU ranks (gloo), FSDP2 over 2 ranks, or over 2 x TP 2 on 4 ranks (the 2-D layout of a
    multi-GPU node), activation checkpointing: every arm trains, the parameters are really sharded, and the
    run follows the one-rank run within the script's tolerances."""
    res = _bench_distributed(tmp_path, "--tp", str(tp), ranks=world)
    mx_arms = ["mxrewrite fp8 rmsnorm", "mxrewrite fp8 mxnorm", "mxrewrite fp8-all-gather rmsnorm",
               "mxrewrite mxfp8 mxnorm"]
    for name in ["bf16", "torchao float8 tensorwise", *mx_arms]:
        r = res[name]
        assert r["status"] == "ok", r["status"]
        assert (r["world"], r["dp"], r["tp"]) == (world, 2, tp)
        # FSDP2 halves everything; TP halves each layer's 7 linears again (embedding, norms, head whole)
        assert r["held_fraction"] == 0.5 if tp == 1 else 0.25 < r["held_fraction"] < 0.4
        assert r["trains"] and len(r["losses"]) == 6
        assert r["reference"]["ok"], r["reference"]
        assert len(r["reference"]["reference_losses"]) == 6
    for name in mx_arms:  # the casts ran: the losses are not bf16's, and every linear but the head was replaced
        assert res[name]["losses"][1:] != res["bf16"]["losses"][1:]
    assert [res[n]["converted_linears"] for n in mx_arms] == [14, 14, 14, 10]
    assert [res[n]["fp8_gathered_weights"] for n in mx_arms] == [0, 0, 14, 0]
    # every FP8-gathered weight's scale precomputed after the last step, also over the 2-D (dp, tp) mesh
    assert [res[n]["precomputed_scales"] for n in mx_arms] == [0, 0, 14, 0]
    torchao = res["torchao float8 tensorwise"]  # (its GEMMs emulated on CPU, its casts and FP8 all-gather real)
    assert torchao["converted_linears"] == torchao["fp8_gathered_weights"] == 14
    assert torchao["losses"][1:] != res["bf16"]["losses"][1:]
    assert res["bf16"]["converted_linears"] == 0
    # float32 compute: the split batch or the split linears change only the order of the sums
    assert res["bf16"]["reference"]["loss_max_rel_diff"] < 1e-5
    assert res["bf16"]["reference"]["param_max_rel_drift"] < 1e-3


@pytest.mark.slow
def test_bench_distributed_compiled_layers(tmp_path):
    """The GPU run's stack on CPU: per-layer torch.compile (fullgraph) inside activation checkpointing under
    FSDP2, the FP8 recipe (weights gathered in bf16, and in FP8) against bf16; about 2 min of compiling."""
    res = _bench_distributed(tmp_path, "--compile", "layers", "--arms", "mxrewrite fp8 rmsnorm,fp8-all-gather",
                             "--profile")
    fp8_arms = ["mxrewrite fp8 rmsnorm", "mxrewrite fp8-all-gather rmsnorm"]
    assert list(res) == ["bf16", *fp8_arms]
    for r in res.values():
        assert r["status"] == "ok" and r["trains"] and r["reference"]["ok"], r
        assert r["compiled_graphs"] >= 1
        # --profile: the last step profiled (CPU operators' self time), and left out of the timing
        assert len(r["losses"]) == 6 and len(r["step_s"]) == 5
        assert r["profile"]["total_ms"] > 0 and r["profile"]["top_kernels"]
        assert r["profile"]["wall_ms"] > 0
        assert any(name.startswith("FSDP::") for name, _ in r["profile"]["host"]), r["profile"]["host"]
    assert "## mxrewrite fp8-all-gather rmsnorm" in (tmp_path / "bench_distributed_profile.md").read_text()
    assert (tmp_path / "trace-mxrewrite-fp8-all-gather-rmsnorm.json.gz").stat().st_size > 0
    for name in fp8_arms:
        assert res[name]["reference"]["param_max_rel_drift"] < 1e-3


@pytest.mark.slow
def test_fp8_error_smoke(tmp_path):
    _smoke("fp8_error.py", tmp_path=tmp_path)
    res = {r["arm"]: r for r in json.loads((tmp_path / "fp8_error.json").read_text())["results"]}
    assert res["bf16"]["status"] == "ok"
    assert "mxrewrite fp8 rmsnorm, exact accumulation" not in res      # GPU only
    ours = res["mxrewrite fp8 rmsnorm"]
    assert ours["status"] == "ok" and set(ours["grad_w_err"]) == {"wq", "wk", "wv", "wo", "w1", "w3", "w2"}
    # FP8 casts cost accuracy that bf16 does not lose, in every measured quantity
    for key in ("branch_err", "grad_x_err", "grad_w_err_mean"):
        assert res["bf16"][key] < ours[key] < 0.2


def _trace(path: Path, kernels: list[tuple[str, int, float, float]], host: list[tuple[str, float, float]]) -> str:
    """A Chrome trace as torch.profiler writes it: kernels ``(name, stream, ts, dur)``, host ops ``(name, ts, dur)``."""
    events = [{"ph": "X", "cat": "kernel", "name": n, "ts": ts, "dur": dur, "args": {"stream": s}}
              for n, s, ts, dur in kernels]
    events += [{"ph": "X", "cat": "cpu_op", "name": n, "ts": ts, "dur": dur} for n, ts, dur in host]
    events.append({"ph": "i", "name": "marker", "ts": 0})
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    return str(path)


def test_trace_diff_finds_the_gap_and_the_extra_kernels(tmp_path):
    trace_diff = _import("trace_diff")
    base = _trace(tmp_path / "a.json.gz", [("gemm", 7, 0, 100), ("gemm", 7, 100, 100), ("copy", 20, 0, 30)], [])
    slow = _trace(tmp_path / "b.json.gz",
                  [("gemm", 7, 0, 100), ("gemm", 7, 400, 100), ("cast", 20, 50, 80), ("cast", 20, 90, 80)],
                  [("FSDP::pre_forward", 90, 400), ("aten::clamp", 95, 10), ("aten::to", 150, 50)])
    a, b = trace_diff.load(base), trace_diff.load(slow)
    assert b.compute_stream == 7 and trace_diff.busy_us(b.streams[20]) == 120  # (overlapping casts: 50..170)
    assert trace_diff.gaps(b.streams[7], 50) == [(100, 300)]
    assert trace_diff.host_at(b, 160) == "FSDP::pre_forward > aten::to" and trace_diff.host_at(b, 600) == "-"
    text = trace_diff.report(a, b, ("a", "b"))
    assert "| 0.30 | FSDP::pre_forward > aten::clamp" in text          # the gap, and what the host was doing
    assert text.index("| cast ") < text.index("| copy ")             # the largest difference first
    assert "+0.16" in text                                             # two 80 µs casts more
    host_only = _trace(tmp_path / "cpu.json.gz", [], [("aten::mm", 0, 10)])  # what a CPU run writes
    with pytest.raises(SystemExit, match="without GPU kernels"):
        trace_diff.main([host_only, slow])
