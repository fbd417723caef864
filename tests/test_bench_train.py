"""``scripts/bench_train.py``: its table on CPU, its FLOP count and its MFU arithmetic (no timings asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ddm.eval.flops import count_flops
from ddm.models.dit import DiT
from ddm.train.throughput import Throughput, bf16_peak_tflops

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


def _script():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_prints_its_table_on_cpu(capsys):
    args = ["--size", "DiT-N/4", "DiT-T/4", "--image-size", "8", "--batch", "4", "--steps", "2", "--warmup", "1"]
    results = _script().main(args + ["--accelerator", "cpu", "--threads", "1"])
    out = capsys.readouterr().out
    assert (
        "| model | params | input | batch | precision | compile | step ms | img/s | peak mem GiB | TFLOP/s | MFU |"
        in out
    )
    rows = [line for line in out.splitlines() if line.startswith("| DiT-")]
    assert [r.split(" | ")[0] for r in rows] == ["| DiT-N/4", "| DiT-T/4"]
    assert all(r.rstrip().endswith("| - |") for r in rows)  # no MFU without a GPU's peak
    for r, size in zip(results, ("DiT-N/4", "DiT-T/4")):
        net = DiT(size, 8, 1, 10)
        forward = count_flops(net, torch.zeros(1, 1, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long))
        assert r.flops_per_step == 3 * forward * 4
        assert r.step_s > 0 and r.peak_memory_bytes > 0 and r.precision == "32-true"


def test_mfu_is_achieved_over_peak():
    r = Throughput("DiT-XL/2", (4, 32, 32), 32, "bf16-mixed", False, 675, 3e12, 0.01, 1, "NVIDIA H100", 1000.0)
    assert r.tflops == pytest.approx(300.0) and r.mfu == pytest.approx(0.3)
    assert r.images_per_s == pytest.approx(3200.0)
    assert Throughput("x", (1, 8, 8), 1, "32-true", False, 1, 1.0, 1.0, 1, "cpu", None).mfu is None


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Some Future GPU", None),
    ],
)
def test_bf16_peaks_by_device_name(name, peak):
    assert bf16_peak_tflops(name) == peak
