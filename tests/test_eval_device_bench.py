"""``scripts/bench_eval.py``: its table on the CPU, with small networks in place of the large ones (no timings
asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_eval.py"


def _script():
    spec = importlib.util.spec_from_file_location("bench_eval", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_vae():
    from ddm.latent import LatentCodec
    from tests.test_latent_vae import tiny_vae

    return LatentCodec(tiny_vae(), "tiny")


def test_bench_eval_prints_a_row_per_network_and_says_what_it_skipped(capsys, tmp_path):
    bench = _script()
    bench.sd_vae = _tiny_vae  # the SD VAE's decoder takes seconds per image on a CPU
    args = ["--device", "cpu", "--images", "3", "--router-images", "2", "--vae-images", "2"]
    args += ["--inception", str(tmp_path / "none.pt"), "--set", "router.size=DiT-N/4", "eval.router.t_buckets=2"]
    rows = bench.main(args)
    out = capsys.readouterr().out
    assert "| network | input | batch (config) | images | seconds | images/s | the config's images |" in out
    assert f"Inception skipped: no weights file at {tmp_path / 'none.pt'}" in out
    assert [r["name"] for r in rows] == ["feature net features", "router diagnostics", "VAE decode"]
    assert [(r["n"], r["batch"], r["default"]) for r in rows] == [(3, 3, 256), (2, 2, 256), (2, 2, 128)]
    assert all(r["rate"] > 0 for r in rows)
    assert "router diagnostics: " in out and "router calls/s" in out
    assert "(auto: fp32)" in out  # the CPU decodes in fp32
