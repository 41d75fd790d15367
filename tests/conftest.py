"""Shared fixtures and builders. Eight emulated CPU devices, so the real 8-way pmap runs in every
test session; the tiny fixture (a 2-layer BERT and a small mixture); the command line of a run on
it; train_script.py in a fresh process; the runs that checkpoint (test_resume, test_faults,
test_signals, test_output); gzip JSON-lines sources and data configs written for a test."""
import collections
import contextlib
import functools
import gzip
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import types

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# With libtpu installed (requirements-test.txt, for --compile_for) JAX would load it at start-up in
# every process, warn on stderr that this machine has no TPU, and let one process at a time hold its
# lock file; every test runs on CPU devices, and --compile_for needs no backend of libtpu's.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes over 30 s; `pytest -m 'not slow'` leaves it out")


# --------------------------------------------------------------------------------------------
# The tiny fixture and runs on it
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny fixture of scripts/make_tiny_data.py: data/, data_config.json, model/."""
    from make_tiny_data import build_fixture
    out = tmp_path_factory.mktemp("tiny")
    build_fixture(str(out), lines_per_file=2000, seed=0)
    return out


# The tiny run's step: 2 pairs per device (16 on the 8 devices) of 16 word pieces, tokenized in a
# thread of the trainer (no worker processes to start)
TINY_STEP = ("--batch_size", "2", "--max_length", "16", "--num_workers", "0")


def tiny_argv(tiny, output, *flags, config=None, data=None, model=None):
    """train_script's command line for a run on the tiny fixture: the data config (the fixture's
    whole mixture unless given), OUTPUT, --model and --data_folder (the fixture's unless given),
    then `flags` as they are."""
    return [str(config or tiny / "data_config.json"), str(output), "--model", str(model or tiny / "model"),
            "--data_folder", str(data or tiny / "data"), *map(str, flags)]


# The model the shared run loads, laid out as the Hugging Face cache keeps a download of this name
CACHED_AS = "nreimers/MiniLM-L6-H384-uncased"
SHORT_RUN = ("--steps", "12", *TINY_STEP, "--lr", "1e-3", "--warmup_steps", "5", "--log_steps", "4",
             "--save_steps", "4", "--eval_steps", "4", "--eval_rows", "64")


@pytest.fixture(scope="session")
def short_run(tiny, tmp_path_factory):
    """One run shared by the tests of what a run leaves behind (test_evals, test_export,
    test_scripts): SHORT_RUN on the fixture's mixture, logged, evaluated on held-out rows and
    exported every 4 steps. The model comes from a folder laid out as the Hugging Face cache
    keeps a download of CACHED_AS. Returns output, argv, the parameters handed to each export (by
    folder name) and the pmap traces of each function during the run."""
    import train_script
    root = tmp_path_factory.mktemp("short_run")
    model = root / "hub" / f"models--{CACHED_AS.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny / "model", model)
    output = root / "run"
    argv = tiny_argv(tiny, output, *SHORT_RUN, model=model)
    exported, write = {}, train_script.export_sentence_transformer

    def keep_params(folder, params, *rest):
        exported[os.path.basename(folder)] = params
        write(folder, params, *rest)

    with pytest.MonkeyPatch.context() as patch, pmap_traces() as traces:
        patch.setattr(train_script, "export_sentence_transformer", keep_params)
        train_script.main(argv)
    return types.SimpleNamespace(output=output, argv=argv, params=exported, traces=collections.Counter(traces))


def run_train_script(*argv, block_torch=False, block=(), timeout=300):
    """train_script.py as a user runs it, in a fresh process on 8 emulated devices, where importing
    torch (block_torch) or the modules in `block` fails."""
    prelude = "".join(f"sys.modules[{name!r}] = None; " for name in ("torch",) * block_torch + tuple(block))
    code = prelude + f"import runpy; sys.argv = {['train_script.py', *map(str, argv)]!r}; " \
                     "runpy.run_path('train_script.py', run_name='__main__')"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", "import sys; " + code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------
# Runs that checkpoint (test_resume, test_faults, test_signals, test_output): RUN on the fixture's
# pairs, 12 steps, a checkpoint every 4, and the uninterrupted run they must end as
# --------------------------------------------------------------------------------------------

STEPS, SAVE_STEPS = 12, 4
RUN = ("--steps", STEPS, "--save_steps", SAVE_STEPS, "--log_steps", SAVE_STEPS, *TINY_STEP,
       "--lr", "1e-3", "--warmup_steps", "2")


def tiny_args(tiny, output, *extra, config=None, **inputs):
    """Every run of these files: RUN on the fixture's pairs (or the given config, data, model), then `extra`."""
    return tiny_argv(tiny, output, *RUN, *extra, config=config or tiny / "data_config_pairs.json", **inputs)


def final_params(output):
    return load_file(os.path.join(output, "final", "model.safetensors"))


def assert_same_params(got, expected):
    assert got.keys() == expected.keys()
    worst = max(float(np.max(np.abs(got[k] - expected[k]))) for k in expected)
    assert worst <= 1e-6, f"parameters differ by up to {worst}"


@pytest.fixture(scope="module")
def compile_the_step_once(tmp_path_factory):
    """Every run of a file that uses it compiles the same step: JAX's persistent cache, here and in
    the subprocesses, compiles it once rather than a dozen times."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache
    folder = str(tmp_path_factory.mktemp("jax-cache"))
    settings = {"jax_compilation_cache_dir": folder, "jax_persistent_cache_min_compile_time_secs": 0}
    before = {name: getattr(jax.config, name) for name in settings}
    with pytest.MonkeyPatch.context() as env:
        for name, value in settings.items():
            jax.config.update(name, value)
            env.setenv(name.upper(), str(value))
        compilation_cache.reset_cache()
        yield
    for name, value in before.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def uninterrupted(tiny, tmp_path_factory):
    """A run from step 0 to STEPS in one go: what every interrupted run must end with (one run for
    the four files, which copy it or leave it as it is)."""
    import train_script
    output = tmp_path_factory.mktemp("resume") / "uninterrupted"
    train_script.main(tiny_args(tiny, output))
    return output


def start_script(args, log, **popen):
    """train_script.py as its own process (the 8 emulated devices come with the environment)."""
    import train_script
    return subprocess.Popen([sys.executable, train_script.__file__, *args], stdout=log, stderr=log, **popen)


def wait_for_checkpoint(process, output, step, log_path):
    folder = output / "checkpoints" / str(step)
    deadline = time.monotonic() + 600
    while not folder.is_dir():
        assert process.poll() is None, f"the run ended before checkpoint {step}:\n{log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint after 10 minutes"
        time.sleep(0.1)


def file_bytes(folder):
    """{path: content} of every file under `folder`, links followed."""
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# --------------------------------------------------------------------------------------------
# Data files written by a test
# --------------------------------------------------------------------------------------------

def write_source(path, rows):
    """A gzip'd JSON-lines data file: each row as JSON, or a str as it is (a broken line)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, "wt", compresslevel=1) as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def write_config(path, entries):
    """A data config: the entries (or a str, as it is) as the file. Returns the path."""
    path.write_text(entries if isinstance(entries, str) else json.dumps(entries))
    return path


def read_source(path, count=None):
    """The first `count` rows (all by default) of a gzip'd JSON-lines file, parsed."""
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in itertools.islice(f, count)]


# --------------------------------------------------------------------------------------------
# Watching jax from outside the script
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def pmap_traces():
    """How often each function given to jax.pmap is traced while the block runs, by name: a
    pmapped function's Python body runs only when jax traces it, i.e. once per compilation."""
    import jax
    traces, pmap = collections.Counter(), jax.pmap

    def counting_pmap(fun, *args, **kwargs):
        @functools.wraps(fun)
        def traced(*inputs):
            traces[fun.__name__] += 1
            return fun(*inputs)
        return pmap(traced, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jax, "pmap", counting_pmap)
        yield traces
