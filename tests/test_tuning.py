"""benchmarks/tuning.py: the upward batch search's stopping rules, kernel kinds by real kernel names, and a profile
that finds what dominates a run (a matmul-bound run against an elementwise-bound one)."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

_bench = Path(__file__).resolve().parents[1] / "benchmarks"
_spec = importlib.util.spec_from_file_location("tuning", _bench / "tuning.py")
tuning = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tuning)


def rates(table, oom_at=None, error_at=None):
    """A measure over a throughput table; raises CUDA's out-of-memory message (or another error) at a size."""
    tried = []

    def measure(bs):
        tried.append(bs)
        if bs == oom_at:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if bs == error_at:
            raise RuntimeError("shape mismatch")
        return table[bs]

    return measure, tried


def test_search_stops_where_doubling_stops_paying():
    """256 -> 512 -> 1024 each gain >5 %; 2048 gains 3 %: stop there and keep the fastest tried (2048), 4096
    never runs."""
    measure, tried = rates({256: 100.0, 512: 190.0, 1024: 300.0, 2048: 309.0, 4096: 900.0})
    found = tuning.search_batch_size(measure, 256, limit=8192)
    assert tried == [256, 512, 1024, 2048]
    assert (found["batch_size"], found["images_per_s"], found["stopped"]) == (2048, 309.0, "throughput")


def test_search_keeps_the_faster_batch_when_a_larger_one_is_slower():
    measure, tried = rates({256: 100.0, 512: 150.0, 1024: 120.0})
    found = tuning.search_batch_size(measure, 256, limit=8192)
    assert tried == [256, 512, 1024] and found["batch_size"] == 512 and found["stopped"] == "throughput"


def test_search_stops_at_the_limit_while_still_improving():
    measure, tried = rates({64: 1.0, 128: 2.0, 256: 4.0, 512: 8.0})
    found = tuning.search_batch_size(measure, 64, limit=300)
    assert tried == [64, 128, 256] and found["batch_size"] == 256 and found["stopped"] == "limit"


def test_search_stops_at_out_of_memory_and_keeps_the_last_that_fit():
    measure, tried = rates({256: 100.0, 512: 200.0}, oom_at=1024)
    found = tuning.search_batch_size(measure, 256, limit=8192)
    assert tried == [256, 512, 1024] and found["batch_size"] == 512 and found["stopped"] == "memory"
    assert found["trials"][-1] == {"batch_size": 1024, "oom": True}


def test_search_raises_what_is_not_out_of_memory_and_memory_at_the_start():
    measure, _ = rates({256: 100.0}, error_at=512)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        tuning.search_batch_size(measure, 256, limit=8192)
    measure, _ = rates({}, oom_at=256)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        tuning.search_batch_size(measure, 256, limit=8192)
    with pytest.raises(ValueError):
        tuning.search_batch_size(measure, 512, limit=256)


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "matmul"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>", "matmul"),
    ("aten::addmm", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("Memcpy HtoD (Pinned -> Device)", "copy host<->device"),
    ("Memcpy DtoH (Device -> Pageable)", "copy host<->device"),
    ("Memcpy DtoD (Device -> Device)", "copy on device"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise / norm"),
    ("triton_poi_fused__to_copy_convert_element_type_add_mul_0", "copy on device"),
    ("triton_per_fused_native_layer_norm_3", "elementwise / norm"),
    ("aten::mul", "elementwise / norm"),
    ("ncclDevKernel_AllGather_RING_LL", "other"),
])
def test_kernel_kinds_by_real_names(name, kind):
    assert tuning.kind_of(name) == kind


def test_profile_names_what_dominates_a_run():
    """A run of large matmuls is matmul-bound; a run of elementwise products on the same data is not: the profile
    must tell the two apart (a profile that always said "matmul" would pass the first half alone)."""
    a = torch.randn(512, 512)

    def matmuls():
        for _ in range(20):
            a @ a

    def elementwise():
        x = a.repeat(8, 1)
        for _ in range(200):
            x = x * 1.0001

    mm = tuning.profile_top(matmuls, torch.device("cpu"))
    ew = tuning.profile_top(elementwise, torch.device("cpu"))
    assert mm["measured"] == "cpu" and mm["top"][0]["kind"] == "matmul" and mm["by_kind"]["matmul"]["share"] > 0.8
    assert ew["top"][0]["kind"] == "elementwise / norm" and ew["top"][0]["calls"] == 200
    assert ew["by_kind"].get("matmul", {"share": 0})["share"] < 0.2
    for p in (mm, ew):
        assert 0 < p["busy_ms"] and 0 < p["busy_share"] <= 1.5 and abs(sum(r["share"] for r in p["top"]) - 1) < 0.05
    assert "matmul" in tuning.describe_profile(mm)


def test_gpu_session_smoke_runs_its_steps_and_bundles_the_records(tmp_path):
    """The GPU runbook's CPU rehearsal (GPU_SESSION_SMOKE=1): the eval and attack steps run with the options the GPU
    run uses (batch search, profile) and come back as one archive with a step table; an unknown step is refused
    before anything runs (exit 2), so a typo does not cost device time."""
    root = _bench.parent
    env = {**os.environ, "GPU_SESSION_SMOKE": "1", "GPU_SESSION_BUDGET": "300", "OUT": str(tmp_path),
           "PY": sys.executable, "CLIPGUARD_CACHE": str(tmp_path / "cache")}
    p = subprocess.run(["bash", "benchmarks/gpu_session.sh", "eval", "attack"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with tarfile.open(tmp_path / "records-eval+attack-smoke-cpu.tgz") as tar:
        names = sorted(n.removeprefix("./") for n in tar.getnames() if n != ".")
        steps = tar.extractfile("./steps.tsv").read().decode().split("\n")
        ev = json.load(tar.extractfile("./perf_eval-vit-b-32-random-smoke-cpu.json"))
    assert names == ["perf_attack-smoke-cpu.json", "perf_eval-vit-b-32-random-smoke-cpu.json", "steps.tsv"]
    assert steps[1].split("\t")[:2] == ["eval", "0"] and steps[2].split("\t")[:2] == ["attack", "0"]
    assert ev["batch_search"]["trials"] and ev["profile"]["top"]
    assert ev["batch_size"] == ev["batch_search"]["batch_size"]
    assert (tmp_path / "gpu-eval+attack-smoke-cpu.log").stat().st_size > 0

    bad = subprocess.run(["bash", "benchmarks/gpu_session.sh", "eval", "evall"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown step evall" in bad.stderr


def test_device_rows_count_each_kernel_once():
    """kineto credits a kernel's time both to itself (a CUDA event) and to the aten op that launched it (a CPU event
    with that self device time), and record_function ranges span work: on CUDA only the device's own events count.
    Events shaped as torch's FunctionEventAvg (key, count, device_type, is_user_annotation, own times)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def ev(key, device_type, device_us, cpu_us=0.0, annotation=False):
        return SimpleNamespace(key=key, count=1, device_type=device_type, is_user_annotation=annotation,
                               self_device_time_total=device_us, self_cpu_time_total=cpu_us)

    events = [ev("aten::mm", DeviceType.CPU, 900.0, cpu_us=30.0), ev("nvjet_tst_128x256", DeviceType.CUDA, 900.0),
              ev("Memcpy HtoD (Pinned -> Device)", DeviceType.CUDA, 100.0),
              ev("clean pass", DeviceType.CUDA, 1000.0, annotation=True)]
    rows = tuning.own_time_rows(events, cuda=True)
    assert [(r["name"], r["ms"]) for r in rows] == [("nvjet_tst_128x256", 0.9), ("Memcpy HtoD (Pinned -> Device)", 0.1)]
    assert [r["name"] for r in tuning.own_time_rows(events, cuda=False)] == ["aten::mm"]  # twin: a CPU run's ops
