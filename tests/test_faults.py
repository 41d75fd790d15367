"""Faults in the middle of a run, each handled without losing the last good checkpoint: NaN steps
are skipped and counted (five in a row stop the run), a full disk while saving or exporting is one
line and the resume still matches an uninterrupted run, a crashed producer stops the run and keeps
the checkpoints, and the host never runs far ahead of the devices. Runs: tests/conftest.py's RUN."""
import errno
import json
import logging
import os
import re
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors

import train_script
from conftest import SAVE_STEPS, STEPS, assert_same_params, final_params, tiny_args, write_config, write_source

pytestmark = pytest.mark.usefixtures("compile_the_step_once")


def poison(tiny, tmp_path, only_snowmen=False):
    """The crafted input: a model whose [UNK] embedding is NaN, and a source whose texts all hold a
    character outside the fixture's vocabulary (so [UNK]); no other fixture text has [UNK].
    Returns the run's arguments and the unpoisoned model."""
    from transformers import AutoTokenizer, FlaxAutoModel
    model = FlaxAutoModel.from_pretrained(tiny / "model")
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    assert tokenizer("\u2603")["input_ids"][1] == tokenizer.unk_token_id
    params = model.params
    embedding = np.array(params["embeddings"]["word_embeddings"]["embedding"])
    embedding[tokenizer.unk_token_id] = np.nan
    params["embeddings"]["word_embeddings"]["embedding"] = embedding
    model.save_pretrained(tmp_path / "model", params=params)
    tokenizer.save_pretrained(tmp_path / "model")

    shutil.copytree(tiny / "data", tmp_path / "data")
    write_source(tmp_path / "data" / "snowmen.jsonl.gz", [[f"snowman {i} \u2603", f"a snowman number {i}"]
                                                          for i in range(200)])
    entries = [] if only_snowmen else json.loads((tiny / "data_config_pairs.json").read_text())
    entries.append({"name": "snowmen.jsonl.gz", "lines": 200, "weight": 4})
    args = tiny_args(tiny, tmp_path / "run", config=write_config(tmp_path / "config.json", entries),
                     data=tmp_path / "data", model=tmp_path / "model")
    return args, model


def test_a_nan_step_is_skipped_and_counted(tiny, tmp_path, capsys):
    args, model = poison(tiny, tmp_path)
    # which steps see a snowman: the dry run streams the same batches without a model
    train_script.main([*args, "--dry_run", str(STEPS), "--dump_batches", str(tmp_path / "batches.jsonl")])
    batches = [json.loads(line) for line in (tmp_path / "batches.jsonl").read_text().splitlines()]
    poisoned = sum(any("\u2603" in text for row in b["rows"] for text in row["texts"]) for b in batches)
    assert 0 < poisoned < STEPS, "the seed gives no poisoned batch (or only those): pick another weight"
    capsys.readouterr()

    train_script.main(args)
    out = capsys.readouterr().out
    assert f"{poisoned} skipped as non-finite" in out
    assert sum(int(n) for n in re.findall(r"skipped=(\d+)", out)) == poisoned
    trained = final_params(tmp_path / "run")
    assert all(np.isfinite(v).all() for k, v in trained.items() if k != "embeddings.word_embeddings.weight")
    start = model.params["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]
    assert not np.allclose(trained["encoder.layer.0.attention.self.query.weight"], np.asarray(start).T)


@pytest.mark.parametrize("extra, kept", [([], "the checkpoint of step 4 is intact"),
                                         (["--save_steps", str(STEPS)], "no checkpoint was written")],
                         ids=["after-a-checkpoint", "before-any-checkpoint"])
def test_non_finite_steps_in_a_row_stop_the_run_even_across_log_windows(tiny, tmp_path, extra, kept):
    # Every batch is poisoned; the log windows hold 4 steps, so only a streak carried from one
    # window to the next reaches MAX_BAD_STEPS = 5 (at step 5, seen when step 8 is logged). The
    # message names the checkpoint left, if any (that of step 4 holds the skipped steps' state).
    args, _ = poison(tiny, tmp_path, only_snowmen=True)
    with pytest.raises(train_script.UserError, match=r"5 non-finite losses in a row, the last at step 5 "
                                                     r"\(sources snowmen.jsonl.gz\)") as stopped:
        train_script.main([*args, *extra])
    assert str(stopped.value).endswith(kept)
    assert not (tmp_path / "run" / "final").exists()


def test_a_full_disk_while_saving_is_one_clear_error_and_the_previous_checkpoint_loads(
        tiny, tmp_path, uninterrupted, monkeypatch, capsys, caplog):
    write_json = ocp.handlers.JsonCheckpointHandler._save_fn

    async def disk_full_at_the_second_checkpoint(self, meta, directory):
        if meta["step"] == 2 * SAVE_STEPS:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await write_json(self, meta, directory)

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", disk_full_at_the_second_checkpoint)
    output = tmp_path / "run"
    with pytest.raises(train_script.UserError) as failed:
        train_script.main(tiny_args(tiny, output))
    message = str(failed.value)
    assert "\n" not in message and os.strerror(errno.ENOSPC) in message
    assert f"checkpoint of step {2 * SAVE_STEPS}" in message and f"step {SAVE_STEPS} is intact" in message
    monkeypatch.undo()
    # orbax's threads neither log the failure again nor go on writing after it
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[-2000:]
    assert "Traceback" not in capsys.readouterr().err

    # the resumed run starts from the checkpoint before the failed one and ends as if never stopped
    train_script.main(tiny_args(tiny, output, "--resume"))
    assert f"resuming at step {SAVE_STEPS} from" in capsys.readouterr().out
    assert_same_params(final_params(output), final_params(uninterrupted))
    assert not [p for p in (output / "checkpoints").iterdir() if not p.name.isdigit()], "a partial save is left"


def test_a_producer_crash_stops_the_run_with_its_error_and_keeps_the_checkpoint(
        tiny, tmp_path, uninterrupted, monkeypatch):
    output = tmp_path / "run"
    shutil.copytree(uninterrupted, output)
    shutil.rmtree(output / "checkpoints" / str(STEPS))

    def tokenizer_crash(columns, shape):
        raise MemoryError("the tokenizer ran out of memory")

    monkeypatch.setattr(train_script, "tokenize_columns", tokenizer_crash)
    with pytest.raises(RuntimeError, match="the data producer failed: MemoryError: the tokenizer ran out"):
        train_script.main(tiny_args(tiny, output, "--resume"))
    checkpoints = ocp.CheckpointManager(output / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True))
    assert checkpoints.all_steps() == [STEPS - SAVE_STEPS]


def test_a_full_disk_while_exporting_is_one_line_and_resume_writes_the_export_again(
        tiny, tmp_path, uninterrupted, monkeypatch, capsys):
    save_file = train_script.save_file
    step = 2 * SAVE_STEPS

    def disk_full_at_the_second_export(tensors, path, metadata=None):
        if os.path.basename(os.path.dirname(path)) == f"{step}.partial":  # safetensors' own error on ENOSPC
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(train_script, "save_file", disk_full_at_the_second_export)
    output = tmp_path / "run"
    with pytest.raises(train_script.UserError) as failed:
        train_script.main(tiny_args(tiny, output))
    message = str(failed.value)
    assert "\n" not in message and "No space left on device" in message
    assert f"cannot write the export {output / str(step)}" in message and f"checkpoint of step {step}" in message
    assert not (output / f"{step}.partial").exists(), "the unfinished export still takes the disk's space"
    # the disk still full: resuming says so in one line, before any training
    with pytest.raises(train_script.UserError, match=f"cannot write the export {output / str(step)} "):
        train_script.main(tiny_args(tiny, output, "--resume"))
    monkeypatch.undo()

    (output / f"{step}.partial").mkdir()  # what a kill in the middle of an export leaves
    (output / f"{step}.partial" / "model.safetensors").write_bytes(b"half a model")
    capsys.readouterr()
    train_script.main(tiny_args(tiny, output, "--resume"))
    assert f"resuming at step {step} from" in capsys.readouterr().out
    assert not list(output.glob("*.partial"))
    assert (output / str(step) / "model.safetensors").read_bytes() == \
        (uninterrupted / str(step) / "model.safetensors").read_bytes()
    assert_same_params(final_params(output), final_params(uninterrupted))


def test_the_host_runs_at_most_steps_in_flight_ahead_of_the_devices(tiny, tmp_path, monkeypatch):
    """Between two logging steps the host waits for no measurement; unbounded, it queued hundreds of
    steps and XLA:CPU aborted ("Termination timeout for all gather ... 40 seconds exceeded").
    The devices are made to lag: each step's loss passes a 50 ms callback on every device, which
    the host's dispatch does not wait for. Counted at each dispatch: the earlier steps whose
    measurements are not ready yet."""
    not_ready, measurements = [], []
    make_train_step = train_script.make_train_step
    slow_identity = jax.pmap(lambda x: jax.pure_callback(lambda v: (time.sleep(0.05), v)[1], x, x))

    def lagging_train_step(*setup):
        step = make_train_step(*setup)

        def dispatch(*inputs):
            not_ready.append(sum(not m["loss"].is_ready() for m in measurements))
            state, measured = step(*inputs)
            measured = {**measured, "loss": slow_identity(measured["loss"])}
            measurements.append(measured)
            return state, measured
        return dispatch

    monkeypatch.setattr(train_script, "make_train_step", lagging_train_step)
    train_script.main([*tiny_args(tiny, tmp_path / "run"), "--steps", "40", "--log_steps", "40",
                       "--save_steps", "40"])
    assert max(not_ready) == train_script.STEPS_IN_FLIGHT, not_ready
