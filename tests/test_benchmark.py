"""scripts/benchmark.py runs end to end (a one-layer model, a tiny batch) and reports both steps."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_reports_both_steps_and_their_ratio():
    # 8 emulated devices (conftest's XLA_FLAGS): the JAX step is pmapped over all of them
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), "--layers", "1", "--batch_size", "8",
         "--max_length", "16", "--steps", "1", "--producer_batches", "2", "--skip", "buckets,gradcache"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = dict(re.findall(r"^\| (JAX|PyTorch): .* \| ([\d.]+) \| [\d.]+ \|$", result.stdout, re.M))
    assert set(rows) == {"JAX", "PyTorch"} and all(float(s) > 0 for s in rows.values())
    assert "8 cpu device(s), 8 pairs x 16 tokens" in result.stdout
    ratio = float(re.search(r"JAX seconds per step / PyTorch seconds per step: ([\d.]+)", result.stdout)[1])
    assert abs(ratio - float(rows["JAX"]) / float(rows["PyTorch"])) < 0.02 * ratio + 0.01
    assert re.search(r"producer .*: [\d,]+ pairs/s", result.stdout)


def test_benchmark_rejects_a_batch_that_does_not_split_over_the_devices():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), "--batch_size", "12"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == "error: --batch_size 12 does not split over 8 JAX devices"
