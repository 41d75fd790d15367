"""The tools in scripts/ around the job: benchmark.py and profile_step.py (run end to end on a
one-layer model and a tiny batch, their premises checked in-process), plot_run.py on a run's
metrics. download_data.py and evaluate.py have files of their own (test_download.py,
test_evaluate.py); make_tiny_data.py builds the fixture every test uses (conftest.py)."""
import argparse
import json
import os
import re
import subprocess
import sys
import time

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

@pytest.mark.slow
def test_benchmark_prints_a_row_per_step_the_ratio_the_memory_and_the_producer():
    # 8 emulated devices (conftest's XLA_FLAGS): the JAX step is pmapped over all of them
    result = run_script("benchmark.py", "--layers", "1", "--batch_size", "8", "--max_length", "16", "--steps", "1",
                        "--producer_batches", "2", "--skip", "buckets", "--mini_batch_size", "1")
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
    # the activation memory of the plain step and of GradCache (--memory_only prints only this line)
    assert re.search(r"^GradCache activation memory \(XLA temp buffers, 1 rows x 16 tokens per device\): "
                     r"[1-9][\d,]* MiB plain, [1-9][\d,]* MiB with --mini_batch_size 1$", result.stdout, re.M)


def test_benchmark_gives_both_frameworks_the_same_weights_and_token_ids(tiny, tmp_path):
    """What makes the two rows comparable: the JAX step's state (as benchmark.jax_setup builds it)
    holds the weights sentence-transformers loads for the PyTorch step, and train_script's
    tokenization of the batch is the Hugging Face tokenizer's."""
    import benchmark
    import jax
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    import train_script
    folder = str(tmp_path / "model")
    benchmark.write_random_model(folder, str(tiny), layers=1)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = benchmark.synthetic_pairs(tokenizer, 8)
    args = benchmark.script_args(folder, argparse.Namespace(max_length=64), 1, [])
    columns = benchmark.tokenized_columns(texts, tokenizer, args, 8)
    _, (state, _, _) = benchmark.jax_setup(args, columns)

    ours = train_script.torch_state_dict(jax.device_get(train_script.first_local_replica(state).params))
    theirs = {name: tensor.numpy() for name, tensor in
              SentenceTransformer(folder, device="cpu")[0].auto_model.state_dict().items()}
    assert set(ours) == set(theirs) - {"embeddings.position_ids"}
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    lengths = []
    for texts_of_column, (ids, mask) in zip(zip(*texts), columns):
        reference = tokenizer(list(texts_of_column), padding="max_length", truncation=True, max_length=64,
                              return_tensors="np")
        np.testing.assert_array_equal(ids.reshape(8, -1), reference["input_ids"])
        np.testing.assert_array_equal(mask.reshape(8, -1), reference["attention_mask"])
        lengths += mask.sum(-1).ravel().tolist()
    assert min(lengths) < 64 == max(lengths)  # padded texts and truncated ones


def test_benchmark_times_each_step_after_an_untimed_warm_up():
    """The first call compiles; the times are those of the calls after it, one per step."""
    import benchmark
    calls = []

    def step():
        time.sleep(0.5 if not calls else 0.01)
        calls.append(True)

    times = benchmark.time_steps(step, 3)
    assert len(calls) == 4 and len(times) == 3
    assert all(0.01 <= t < 0.25 for t in times), times


def test_benchmark_rejects_a_batch_that_does_not_split_over_the_devices():
    result = run_script("benchmark.py", "--batch_size", "12", timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == "error: --batch_size 12 does not split over 8 JAX devices"


# --------------------------------------------------------------------------------------------
# scripts/profile_step.py
# --------------------------------------------------------------------------------------------

PARTS = ["matrix products", "dropout masks", "layout copies", "collectives", "other element-wise"]


@pytest.mark.slow
def test_profile_splits_both_steps_into_the_same_parts():
    result = run_script("profile_step.py", "--layers", "1", "--batch_size", "8", "--max_length", "16")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {name: [float(v) for v in values.split(" | ")]
            for name, values in re.findall(r"^\| ([a-z() -]+) \| ([\d.]+ \| \d+ \| [\d.]+ \| \d+) \|$",
                                           result.stdout, re.M)}
    assert list(rows) == [*PARTS, "step (wall)"]
    assert rows["step (wall)"][0] > 0 and rows["step (wall)"][2] > 0
    # both steps multiply matrices; the JAX step gathers over its 8 devices
    assert rows["matrix products"][0] > 0 and rows["matrix products"][2] > 0 and rows["collectives"][0] > 0


def jax_parts(function, *inputs):
    """The parts profile_step charges the operations of `function` (pmapped over 8 devices) to."""
    import jax
    import profile_step
    compiled = jax.pmap(function, axis_name="devices").lower(*inputs).compile()
    instructions = profile_step.hlo_instructions(compiled.as_text())
    return {profile_step.jax_part(name, line) for name, line in instructions.items()}


def test_profile_names_the_parts_of_jax_operations():
    """The parts are read from XLA:CPU's compiled operations: a function made of known work
    (a matrix product, an all_gather, a transpose, a dropout mask drawn as flax draws it) must
    show each part, and a function without them must not."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class Layer(nn.Module):  # as transformers' Flax layers hold their dropout
        def setup(self):
            self.dropout = nn.Dropout(0.1)

        def __call__(self, x):
            return self.dropout(x, deterministic=False)

    def known_work(x, w, key):
        dropped = Layer().apply({}, x, rngs={"dropout": key[0]})
        products = jnp.tanh(dropped @ w)
        return jax.lax.all_gather(products, "devices").transpose(2, 0, 1).sum()

    def element_wise(x, w, key):
        return jnp.tanh(x * 2 + 1)

    x, w = np.ones((8, 4, 16), np.float32), np.ones((8, 16, 16), np.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), 8)[:, None]
    assert jax_parts(known_work, x, w, keys) >= {"matrix products", "dropout masks", "collectives"}
    assert jax_parts(element_wise, x, w, keys) == {"other element-wise"}


def test_profile_names_the_parts_of_torch_operators():
    import profile_step
    import torch

    def parts(module, train):
        module.train(train)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            module(torch.ones(4, 16))
        return {profile_step.torch_part(op.key) for op in profile.key_averages()}

    model = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(16, 16))
    assert {"matrix products", "dropout masks"} <= parts(model, train=True)
    assert "dropout masks" not in parts(model, train=False)


# --------------------------------------------------------------------------------------------
# scripts/plot_run.py
# --------------------------------------------------------------------------------------------

def test_plot_run_draws_a_png_of_the_run(short_run, tmp_path):
    import matplotlib.image
    import plot_run
    out = plot_run.plot_run(str(short_run.output), str(tmp_path / "run.png"))
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 500 and image.shape[1] > 800


def test_plot_run_draws_the_runs_numbers(short_run, monkeypatch):
    """Each panel's curve holds metrics.jsonl's numbers by step: loss, held-out accuracy, lr, pairs/s."""
    import matplotlib.pyplot as plt
    import plot_run
    figures = []
    monkeypatch.setattr(plot_run.plt, "close", figures.append)  # keep the figure to read it
    plot_run.plot_run(str(short_run.output), str(short_run.output / "plot.png"))
    [figure] = figures
    records = [json.loads(line) for line in open(short_run.output / "metrics.jsonl")]
    training = [r for r in records if "loss" in r]
    evaluation = [r for r in records if "eval" in r]

    def curve(panel, label=None):
        [line] = [line for line in panel.get_lines() if label is None or line.get_label() == label]
        return line.get_xydata().tolist()

    loss, held_out, lr, throughput = figure.axes[:4]
    assert curve(loss) == [[r["step"], r["loss"]] for r in training]
    assert curve(lr) == [[r["step"], r["lr"]] for r in training]
    assert curve(throughput) == [[r["step"], r["pairs_per_s"]] for r in training]
    sources = len(evaluation[-1]["eval"]) - 1
    assert curve(held_out, f"accuracy (mean of {sources} sources)") == \
        [[r["step"], r["eval"]["overall"]["accuracy"]] for r in evaluation]
    plt.close(figure)


def test_plot_run_keeps_the_last_record_of_a_step_logged_twice(tmp_path):
    import plot_run
    lines = [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0}, {"step": 20, "loss": 2.5},
             {"step": 20, "eval": {"overall": {"accuracy": 0.5}}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3')
    training, evaluation = plot_run.read_metrics(str(tmp_path))
    assert [(r["step"], r["loss"]) for r in training] == [(10, 3.0), (20, 2.5)]
    assert [r["step"] for r in evaluation] == [20]
