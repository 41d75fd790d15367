"""The tools in scripts/ around the job: benchmark.py and profile_step.py (run end to end on a
one-layer model and a tiny batch, their premises checked in-process), plot_run.py on a run's
metrics. download_data.py and evaluate.py have files of their own (test_download.py,
test_evaluate.py); make_tiny_data.py builds the fixture every test uses (conftest.py)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT


def run_script(name, *flags, timeout=600):
    """scripts/`name` in its own process, on the 8 emulated devices of the environment."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *flags],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# --------------------------------------------------------------------------------------------
# scripts/benchmark.py
# --------------------------------------------------------------------------------------------

def test_benchmark_reports_both_steps_and_their_ratio():
    # 8 emulated devices (conftest's XLA_FLAGS): the JAX step is pmapped over all of them
    result = run_script("benchmark.py", "--layers", "1", "--batch_size", "8", "--max_length", "16", "--steps", "1",
                        "--producer_batches", "2", "--skip", "buckets,gradcache")
    assert result.returncode == 0, result.stderr[-3000:]
    named = dict(re.findall(r"^\| ((?:JAX|PyTorch): [^|]*?) \| ([\d.]+) \| [\d.]+ \|$", result.stdout, re.M))
    assert all(float(s) > 0 for s in named.values())
    rows = {name.split(",")[0]: seconds for name, seconds in named.items()}
    # the published update rule next to its cheaper alternatives, in the same run
    assert set(rows) == {"JAX: train_script step", "PyTorch: sentence-transformers MNRL step",
                         "JAX: the same with --clip_scope global", "JAX: the same with --attention_dropout shared"}
    assert "8 cpu device(s), 8 pairs x 16 tokens" in result.stdout
    assert re.search(r"^JAX seconds per step / PyTorch seconds per step: [\d.]+$", result.stdout, re.M)
    assert re.search(r"producer .*: [\d,]+ pairs/s", result.stdout)


def test_benchmark_rejects_a_batch_that_does_not_split_over_the_devices():
    result = run_script("benchmark.py", "--batch_size", "12", timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == "error: --batch_size 12 does not split over 8 JAX devices"


# --------------------------------------------------------------------------------------------
# scripts/profile_step.py
# --------------------------------------------------------------------------------------------

def test_profile_splits_both_steps_into_parts_that_add_up_to_the_step():
    result = run_script("profile_step.py", "--layers", "1", "--batch_size", "8", "--max_length", "16")
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


# --------------------------------------------------------------------------------------------
# scripts/plot_run.py
# --------------------------------------------------------------------------------------------

def test_plot_run_draws_a_png_of_the_run(short_run, tmp_path):
    import matplotlib.image
    import plot_run
    out = plot_run.plot_run(str(short_run.output), str(tmp_path / "run.png"))
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 500 and image.shape[1] > 800
    assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas


def test_plot_run_keeps_the_last_record_of_a_step_logged_twice(tmp_path):
    import plot_run
    lines = [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0}, {"step": 20, "loss": 2.5},
             {"step": 20, "eval": {"overall": {"accuracy": 0.5}}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3')
    training, evaluation = plot_run.read_metrics(str(tmp_path))
    assert [(r["step"], r["loss"]) for r in training] == [(10, 3.0), (20, 2.5)]
    assert [r["step"] for r in evaluation] == [20]
