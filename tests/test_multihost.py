"""Multi-host: two processes x 4 emulated CPU devices on localhost, joined by jax.distributed
(gloo collectives), against one process x 8 devices.

Can the two runs see the same global batch? Each process reads every second line of a source
(process p: lines p, p+2, ...) and fills its own rows of the global batch. With one source and its
first pass in file order (--data_order original), the 2-process global batch is lines
[0, 2, .., 14, 1, 3, .., 15] and the 1-process one lines [0 .. 15] (then 16 .. 31): the same pairs in
another order. The in-batch loss is a mean over anchors, each scored against all candidates, so
it does not depend on the order: with --dropout 0, the steps must give the same parameters up to
float rounding (two steps, so that the second also takes the state as pmap handed it back). It would not if the loss or the gradient mean covered only one host's devices.
Every text of the data file is distinct, so no row is skipped as a duplicate in either run.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file
from transformers import FlaxAutoModel

import train_script
from conftest import ROOT, TINY_STEP, read_source, run_train_script, tiny_argv, write_config, write_source

ROWS = 64


@pytest.fixture(scope="module")
def distinct_pairs(tiny, tmp_path_factory):
    """A one-source data config whose texts are all different."""
    out = tmp_path_factory.mktemp("distinct")
    seen, rows = set(), []
    for pair in read_source(tiny / "data" / "paraphrase_pairs.jsonl.gz"):
        if not seen.intersection(pair) and len(set(pair)) == 2 and len(rows) < ROWS:
            seen.update(pair)
            rows.append(pair)
    write_source(out / "pairs.jsonl.gz", rows)
    return out, write_config(out / "config.json", [{"name": "pairs.jsonl.gz", "lines": len(rows), "weight": 1}])


def flags(tiny, data):
    # --clip_scope global: each process reads every other line of a file, so a device holds other
    # rows of the same global batch than in the one-process run; the global clip does not depend
    # on which device holds which row, the per-device clip (the default) does
    return ["--model", str(tiny / "model"), "--data_folder", str(data), "--steps", "2", *TINY_STEP,
            "--dropout", "0", "--lr", "1e-3", "--warmup_steps", "0", "--log_steps", "1", "--clip_scope", "global"]


# Runs train_script.py as __main__ (argv after -c), then prints how many pmapped functions XLA compiled
COUNTING_PMAP_COMPILES = """
import runpy, sys, jax
names = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kwargs: names.append(kwargs.get("fun_name"))
    if event == "/jax/core/compile/backend_compile_duration" else None)
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print(f"pmap compilations: {names.count('jit(_fun)')}")
"""


def launch_two_processes(config, outputs, extra, per_process=([], [])):
    """Starts processes 0 and 1 (4 CPU devices each) and waits for both: [(returncode, output)], the
    output being stdout, then stderr from a line of its own. Apart, because gloo's C++ code prints its
    "[Gloo] Rank 0 is connected..." lines to stdout in pieces, from threads of its own: in one
    stream, the script's error line could land inside one of them."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen(
        [sys.executable, "-c", COUNTING_PMAP_COMPILES, os.path.join(ROOT, "train_script.py"), str(config),
         str(output), *extra, *per_process[p],
         "--coordinator_address", f"localhost:{port}", "--num_processes", "2", "--process_id", str(p)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        for p, output in enumerate(outputs)]
    try:
        streams = [proc.communicate(timeout=300) for proc in procs]
        return [(proc.returncode, f"{stdout}\n{stderr}") for proc, (stdout, stderr) in zip(procs, streams)]
    finally:
        for proc in procs:
            proc.kill()


@pytest.fixture(scope="module")
def two_process_run(tiny, distinct_pairs, tmp_path_factory):
    """Process 1 is given an OUTPUT of its own to prove it writes nothing (real runs share one).
    Two processes start, join and compile: 30 to 45 s, so the tests that use it are marked slow."""
    data, config = distinct_pairs
    out = tmp_path_factory.mktemp("two")
    outputs = [out / "process0", out / "process1"]
    results = launch_two_processes(config, outputs, flags(tiny, data))
    return outputs, results


@pytest.mark.slow
def test_both_processes_finish(two_process_run):
    _, results = two_process_run
    for process, (code, output) in enumerate(results):
        assert code == 0, f"process {process} failed:\n{output[-3000:]}"


@pytest.mark.slow
def test_only_process_0_writes_and_logs(two_process_run):
    (out0, out1), results = two_process_run
    assert (out0 / "final" / "model.safetensors").exists()
    assert (out0 / "train_script.py").exists()
    assert not out1.exists()
    assert "done: 2 steps" in results[0][1]
    # the one pmapped function of a run without evaluation, compiled once: the second step takes
    # pmap's host-local state back without a recompilation
    assert "pmap compilations: 1" in results[0][1]
    assert "loss=" in results[0][1]
    assert "done:" not in results[1][1] and "loss=" not in results[1][1]


@pytest.mark.slow
def test_global_batch_spans_both_processes(two_process_run):
    (out0, _), _ = two_process_run
    card = (out0 / "final" / "README.md").read_text()
    assert "| global batch | 16 (2 per device x 8 devices" in card


@pytest.mark.slow
def test_two_processes_take_the_one_process_step(two_process_run, tiny, distinct_pairs, tmp_path):
    (out0, _), results = two_process_run
    assert results[0][0] == 0
    data, config = distinct_pairs
    train_script.main([str(config), str(tmp_path / "one"), *flags(tiny, data)])
    one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    two = load_file(out0 / "final" / "model.safetensors")
    initial = train_script.torch_state_dict(FlaxAutoModel.from_pretrained(str(tiny / "model")).params)
    assert one.keys() == two.keys()
    moved = max(np.abs(one[k] - initial[k]).max() for k in initial if k in one)
    assert moved > 1e-4  # the step changed the parameters well beyond the tolerance below
    for name in one:
        np.testing.assert_allclose(two[name], one[name], atol=1e-5, err_msg=name)


def test_existing_output_stops_every_process(tiny, distinct_pairs, tmp_path):
    data, config = distinct_pairs
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("earlier work")
    results = launch_two_processes(config, [tmp_path / "out"] * 2, flags(tiny, data))
    assert [code for code, _ in results] == [2, 2]
    errors = [[line for line in output.splitlines() if line.startswith("error: ")] for _, output in results]
    assert len(errors[0]) == 1 and "exists and is not empty" in errors[0][0]
    assert len(errors[1]) == 1 and "process 0 could not prepare" in errors[1][0]
    assert (tmp_path / "out" / "keep.txt").read_text() == "earlier work"


def test_two_processes_draw_the_one_process_batches(tiny, tmp_path):
    """--mixing original counts the devices of every process (P = 8 here, as with one process x 8):
    both processes' dry runs dump the global batches of one process with 8 devices."""
    extra = ["--model", str(tiny / "model"), "--data_folder", str(tiny / "data"), "--batch_size", "1",
             "--max_length", "16", "--num_workers", "0", "--dry_run", "40"]
    dumps = [tmp_path / f"process{p}.jsonl" for p in (0, 1)]
    results = launch_two_processes(tiny / "data_config.json", [tmp_path / "out"] * 2, extra,
                                   [["--dump_batches", str(dump)] for dump in dumps])
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:]
    train_script.main([str(tiny / "data_config.json"), str(tmp_path / "out"), *extra,
                       "--dump_batches", str(tmp_path / "one.jsonl")])
    one = (tmp_path / "one.jsonl").read_text()
    runs = [[json.loads(line)["sources"] for line in one.splitlines()][start:start + 4] for start in range(0, 40, 4)]
    assert all(len(set(map(tuple, run))) == 1 for run in runs)  # P / D = 8 / 2 steps a source
    assert len({run[0][0] for run in runs}) > 1
    for dump in dumps:
        assert dump.read_text() == one


@pytest.mark.parametrize("flags, message", [
    (["--coordinator_address", "h:1", "--num_processes", "2", "--process_id", "2"], "must be below --num_processes 2"),
    (["--coordinator_address", "h:1", "--num_processes", "0"], "--num_processes must be at least 1"),
    (["--num_processes", "2", "--process_id", "0"], "need --coordinator_address"),
])
def test_inconsistent_process_flags_are_refused_before_joining(flags, message):
    with pytest.raises(train_script.UserError, match=message):
        train_script.parse_args(["config.json", "out", *flags])


@pytest.mark.parametrize("process, missing", [
    (0, r"process 1 did not join the coordinator at 127.0.0.1:\d+ \(this process\)"),
    (1, r"process 0, the coordinator at 127.0.0.1:\d+, does not answer"),
], ids=["process-0", "process-1"])
def test_a_process_alone_says_what_it_waits_for_and_stops_naming_who_is_missing(tiny, process, missing):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    result = run_train_script(*tiny_argv(tiny, "unused", *TINY_STEP, "--dry_run", "1"),
                              "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                              "--process_id", process, "--join_timeout", "5", timeout=120)
    assert time.monotonic() - started < 60
    assert f"joining 2 processes at 127.0.0.1:{port} as process {process}; waiting up to 5s (--join_timeout)" \
        in result.stdout.splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr and "Check failure" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert re.fullmatch(rf"error: --join_timeout 5: {missing}; start the same command on every host, each with its "
                        r"--process_id", line), line


def test_cpu_devices_split_the_cpu(tiny):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train_script.py"),
         *tiny_argv(tiny, "unused", *TINY_STEP, "--cpu_devices", "3", "--datasets_per_batch", "1", "--dry_run", "1",
                    config=tiny / "data_config_pairs.json")],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 batches of 6 rows" in result.stdout  # 2 per device x 3 devices


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_after_the_same_step(tiny, distinct_pairs, tmp_path):
    """Preemption notices reach hosts at different moments: here only process 1 gets SIGTERM. The
    processes share their requests every STOP_CHECK_STEPS steps, so both checkpoint the same step
    (one checkpoint, in the OUTPUT they share) and exit alike."""
    data, config = distinct_pairs
    output = tmp_path / "out"
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    # --mixing per_batch: a round of the original's needs 8 x 16 distinct rows, more than this file
    # has; how the processes agree to stop does not depend on the mixing
    args = [*flags(tiny, data), "--steps", "2000", "--save_steps", "10", "--log_steps", "10", "--mixing", "per_batch"]
    # stderr alone: the script's own lines, which gloo's pieces of lines on stdout cannot split
    logs = [tmp_path / f"log{p}" for p in range(2)]
    files = [open(log, "w") for log in logs]
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train_script.py"), str(config), str(output), *args,
         "--coordinator_address", f"localhost:{port}", "--num_processes", "2", "--process_id", str(p)],
        stdout=subprocess.DEVNULL, stderr=f, env=env, cwd=ROOT) for p, f in enumerate(files)]
    try:
        deadline = time.monotonic() + 600
        while not (output / "checkpoints" / "10").is_dir():
            assert all(p.poll() is None for p in procs), logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 10 minutes"
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p, f in zip(procs, files):
            p.kill()
            f.close()
    last_lines = [log.read_text().strip().splitlines()[-1] for log in logs]
    assert codes == [128 + signal.SIGTERM] * 2, last_lines
    steps = [re.fullmatch(r"stopped: SIGTERM at step (\d+), checkpoint written; resume with: .*--resume", line)
             for line in last_lines]
    assert all(steps), last_lines
    step = int(steps[0][1])
    assert int(steps[1][1]) == step and 10 < step < 2000 and step % train_script.STOP_CHECK_STEPS == 0
    assert (output / "checkpoints" / str(step)).is_dir()
    assert "finishing the step" in logs[1].read_text() and "finishing the step" not in logs[0].read_text()
