"""scripts/benchmark.py and scripts/profile_step.py run end to end (a one-layer model, a tiny batch)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_reports_both_steps_and_their_ratio():
    # 8 emulated devices (conftest's XLA_FLAGS): the JAX step is pmapped over all of them
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), "--layers", "1", "--batch_size", "8",
         "--max_length", "16", "--steps", "1", "--producer_batches", "2", "--skip", "buckets,gradcache"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    named = dict(re.findall(r"^\| ((?:JAX|PyTorch): [^|]*?) \| ([\d.]+) \| [\d.]+ \|$", result.stdout, re.M))
    assert all(float(s) > 0 for s in named.values())
    rows = {name.split(",")[0]: seconds for name, seconds in named.items()}
    # the published update rule next to its cheaper alternatives, in the same run
    assert set(rows) == {"JAX: train_script step", "PyTorch: sentence-transformers MNRL step",
                         "JAX: the same with --clip_scope global", "JAX: the same with --attention_dropout shared"}
    rows = {"JAX": rows["JAX: train_script step"], "PyTorch": rows["PyTorch: sentence-transformers MNRL step"]}
    assert "8 cpu device(s), 8 pairs x 16 tokens" in result.stdout
    ratio = float(re.search(r"JAX seconds per step / PyTorch seconds per step: ([\d.]+)", result.stdout)[1])
    assert abs(ratio - float(rows["JAX"]) / float(rows["PyTorch"])) < 0.02 * ratio + 0.01
    assert re.search(r"producer .*: [\d,]+ pairs/s", result.stdout)


def test_benchmark_rejects_a_batch_that_does_not_split_over_the_devices():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), "--batch_size", "12"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == "error: --batch_size 12 does not split over 8 JAX devices"


def test_profile_splits_both_steps_into_parts_that_add_up_to_the_step():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "profile_step.py"), "--layers", "1", "--batch_size", "8",
         "--max_length", "16"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {name: [float(v) for v in values.split(" | ")]
            for name, values in re.findall(r"^\| ([a-z() -]+) \| ([\d.]+ \| \d+ \| [\d.]+ \| \d+) \|$",
                                           result.stdout, re.M)}
    parts = ["matrix products", "dropout masks", "layout copies", "collectives", "other element-wise"]
    assert list(rows) == [*parts, "step (wall)"]
    jax_wall, torch_wall = rows["step (wall)"][0], rows["step (wall)"][2]
    assert sum(rows[p][0] for p in parts) == pytest.approx(jax_wall, abs=0.03 + 0.01 * jax_wall)
    assert sum(rows[p][2] for p in parts) == pytest.approx(torch_wall, abs=0.03 + 0.01 * torch_wall)
    # both steps multiply matrices; the JAX step gathers over its 8 devices
    assert rows["matrix products"][0] > 0 and rows["matrix products"][2] > 0 and rows["collectives"][0] > 0


def test_benchmark_memory_only_compiles_the_plain_and_gradcache_steps_and_runs_neither():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), "--memory_only", "--layers", "1",
         "--batch_size", "32", "--max_length", "16", "--mini_batch_size", "2,1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "seconds/step" not in result.stdout and "producer" not in result.stdout  # nothing timed
    memory = re.search(r"^GradCache activation memory \(XLA temp buffers, 4 rows x 16 tokens per device\): "
                       r"([\d,]+) MiB plain, ([\d,]+) MiB with --mini_batch_size 2, ([\d,]+) MiB with "
                       r"--mini_batch_size 1$", result.stdout, re.M)
    assert memory, result.stdout
    assert all(int(m.replace(",", "")) > 0 for m in memory.groups())
