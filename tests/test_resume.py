"""Checkpoints and resume: a run killed (-9 or SIGTERM) and resumed ends with the parameters of
an uninterrupted run; damaged checkpoints, changed flags, NaN steps, a full disk and a crashed
producer are each handled without losing the last good checkpoint; a finished run is extended, a
forced resume with another mixture recorded, and --overwrite loses no run to a replacement that
fails or is killed before its first step. Signals (before the first step,
twice), a frozen or killed tokenizer worker each end the run in one line, with a checkpoint where
there is a step to save, and no worker left behind; the host never runs far ahead of the devices.

Every run is tiny (the fixture's pairs, its 2-layer model, 16 word pieces, 2 pairs per device on
the 8 emulated devices, 12 steps, a checkpoint every 4) and trains in-process where the behaviour
is not about the process itself."""
import contextlib
import errno
import json
import logging
import os
import pty
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors
from jax.experimental.compilation_cache import compilation_cache
from safetensors.numpy import load_file

import train_script
from conftest import TINY_STEP, read_source, run_train_script, tiny_argv, write_config, write_source

STEPS, SAVE_STEPS = 12, 4
RUN = ("--steps", STEPS, "--save_steps", SAVE_STEPS, "--log_steps", SAVE_STEPS, *TINY_STEP,
       "--lr", "1e-3", "--warmup_steps", "2")


def tiny_args(tiny, output, *extra, config=None, **inputs):
    """Every run of this file: RUN on the fixture's pairs (or the given config, data, model), then `extra`."""
    return tiny_argv(tiny, output, *RUN, *extra, config=config or tiny / "data_config_pairs.json", **inputs)


def final_params(output):
    return load_file(os.path.join(output, "final", "model.safetensors"))


def assert_same_params(got, expected):
    assert got.keys() == expected.keys()
    worst = max(float(np.max(np.abs(got[k] - expected[k]))) for k in expected)
    assert worst <= 1e-6, f"parameters differ by up to {worst}"


@pytest.fixture(scope="module", autouse=True)
def compile_the_step_once(tmp_path_factory):
    """Every run here compiles the same step: JAX's persistent cache, here and in the subprocesses,
    compiles it once rather than a dozen times."""
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


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    """A run from step 0 to STEPS in one go: what every interrupted run must end with."""
    output = tmp_path_factory.mktemp("resume") / "uninterrupted"
    train_script.main(tiny_args(tiny, output))
    return output


def start_script(args, log, **popen):
    """train_script.py as its own process (the 8 emulated devices come with the environment)."""
    return subprocess.Popen([sys.executable, train_script.__file__, *args], stdout=log, stderr=log, **popen)


def wait_for_checkpoint(process, output, step, log_path):
    folder = output / "checkpoints" / str(step)
    deadline = time.monotonic() + 600
    while not folder.is_dir():
        assert process.poll() is None, f"the run ended before checkpoint {step}:\n{log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint after 10 minutes"
        time.sleep(0.1)


def test_kill_9_then_resume_ends_with_the_uninterrupted_parameters(tiny, tmp_path, uninterrupted, capsys):
    output, log_path = tmp_path / "run", tmp_path / "log"
    with open(log_path, "w") as log:
        process = start_script(tiny_args(tiny, output), log)
        try:
            wait_for_checkpoint(process, output, SAVE_STEPS, log_path)
        finally:
            process.kill()
            process.wait()
    assert not (output / "final").exists(), "the run finished before it was killed: nothing was tested"

    train_script.main(tiny_args(tiny, output, "--resume"))
    assert re.search(r"resuming at step \d+ from", capsys.readouterr().out)
    assert_same_params(final_params(output), final_params(uninterrupted))
    # the batches drawn per source count on from the checkpoint, as if never interrupted
    assert last_logged_batches(output) == last_logged_batches(uninterrupted)


def last_logged_batches(output):
    records = [json.loads(line) for line in open(output / "metrics.jsonl")]
    return [r["batches"] for r in records if r["step"] == STEPS][-1]


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_prints_the_resume_command(tiny, tmp_path, uninterrupted, capsys):
    output, log_path = tmp_path / "run", tmp_path / "log"
    # tokenizer worker processes, and the signal sent to the whole process group, as a terminal's
    # Ctrl-C or a container's stop does: the workers must outlive the final step and checkpoint
    args = [*tiny_args(tiny, output), "--num_workers", "1"]
    with open(log_path, "w") as log:
        process = start_script(args, log, start_new_session=True)
        try:
            wait_for_checkpoint(process, output, SAVE_STEPS, log_path)
            os.killpg(process.pid, signal.SIGTERM)
            returncode = process.wait(timeout=300)
        finally:
            process.kill()
    last_line = log_path.read_text().strip().splitlines()[-1]
    assert returncode == 128 + signal.SIGTERM, last_line
    stopped = re.fullmatch(r"stopped: SIGTERM at step (\d+), checkpoint written; resume with: (.*)", last_line)
    assert stopped, last_line
    step = int(stopped[1])
    assert SAVE_STEPS <= step < STEPS and (output / "checkpoints" / str(step)).is_dir()

    command = shlex.split(stopped[2])
    assert command[:2] == ["python", train_script.__file__] and command[-1] == "--resume"
    train_script.main(command[2:])
    assert f"resuming at step {step} from" in capsys.readouterr().out
    assert_same_params(final_params(output), final_params(uninterrupted))


def test_a_resume_mid_round_skips_the_rows_its_round_had_seen(tmp_path, tiny, capsys):
    """--mixing original: a text appears once per round, here 8 steps of 16 rows, so the checkpoint
    of step 4 falls mid-round. Lines 64..79 repeat the answers of step 0's rows: the uninterrupted
    run skips them at step 4; a resume that forgot the round's texts would train on them."""
    rows = read_source(tiny / "data" / "paraphrase_pairs.jsonl.gz", 400)  # distinct texts, in the model's vocabulary
    for i in range(64, 80):
        rows[i][1] = rows[i - 64][1]
    write_source(tmp_path / "data" / "planted.jsonl.gz", rows)
    config = write_config(tmp_path / "config.json", [{"name": "planted.jsonl.gz", "lines": 400, "weight": 1}])

    def args(output, *extra):
        return tiny_args(tiny, output, "--keep_checkpoints", "3", *extra, config=config, data=tmp_path / "data")

    dump = tmp_path / "batches.jsonl"
    train_script.main([*args(tmp_path / "dry"), "--dry_run", "8", "--dump_batches", str(dump)])
    step_4 = [row["texts"][0] for row in json.loads(dump.read_text().splitlines()[4])["rows"]]
    assert step_4 == [row[0] for row in rows[80:96]]  # lines 64..79 skipped in the round

    train_script.main(args(tmp_path / "uninterrupted"))
    output = tmp_path / "resumed"
    shutil.copytree(tmp_path / "uninterrupted", output)
    for later in ("final", "checkpoints/8", "checkpoints/12"):
        shutil.rmtree(output / later)
    capsys.readouterr()
    train_script.main(args(output, "--resume"))
    assert "resuming at step 4 from" in capsys.readouterr().out
    assert_same_params(final_params(output), final_params(tmp_path / "uninterrupted"))


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(tiny, tmp_path, uninterrupted, capsys):
    output = tmp_path / "run"
    shutil.copytree(uninterrupted, output)
    newest = output / "checkpoints" / str(STEPS)
    largest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)

    train_script.main(tiny_args(tiny, output, "--resume"))
    captured = capsys.readouterr()
    assert f"warning: checkpoint {newest} is unreadable" in captured.err
    assert "Traceback" not in captured.err and "Event loop is closed" not in captured.err
    assert f"resuming at step {STEPS - SAVE_STEPS} from" in captured.out
    assert_same_params(final_params(output), final_params(uninterrupted))
    # the damaged one is set aside and its step written again
    assert (output / "checkpoints" / f"{STEPS}.unreadable").is_dir() and newest.is_dir()


@pytest.mark.parametrize("change, culprit", [
    (["--batch_size", "4"], "--batch_size"),
    (["--seed", "7"], "--seed"),
    (["--nprocs", "4"], "devices"),
    (["--max_length", "32"], "--max_length"),
    ("reweighted mixture", r"data config \(paraphrase_pairs.jsonl.gz's weight \(\d+ in the checkpoint, now \d+\)\)"),
])
def test_resume_of_a_different_run_is_refused(tiny, tmp_path, uninterrupted, change, culprit):
    args = tiny_args(tiny, uninterrupted, "--resume")
    if change == "reweighted mixture":
        entries = json.loads((tiny / "data_config_pairs.json").read_text())
        entries[0]["weight"] += 1
        args[0] = str(write_config(tmp_path / "reweighted.json", entries))
    else:
        args += change
    with pytest.raises(train_script.UserError, match=f"differs from the checkpoint .* in {culprit}.*--resume_force"):
        train_script.main(args)


def test_a_forced_resume_with_another_mixture_records_both(tiny, tmp_path, uninterrupted, capsys):
    """OUTPUT/data_config.json and every later export's copy show the mixture the run trains on from the
    resume; the one before is kept beside it, and the card and the script's record say so."""
    output, step = tmp_path / "run", STEPS - SAVE_STEPS
    shutil.copytree(uninterrupted, output)
    shutil.rmtree(output / "final")
    shutil.rmtree(output / "checkpoints" / str(STEPS))
    before = file_bytes(output)
    entries = json.loads((tiny / "data_config_pairs.json").read_text())
    entries[0]["weight"] += 1
    config = write_config(tmp_path / "reweighted.json", entries)
    train_script.main(tiny_args(tiny, output, "--resume", "--resume_force", config=config))
    assert f"with a different data config ({entries[0]['name']}'s weight" in capsys.readouterr().err
    earlier = f"data_config.before_step_{step}.json"
    for folder in (output, output / "final"):
        assert json.loads((folder / "data_config.json").read_text()) == entries
        assert (folder / earlier).read_bytes() == before[output / "data_config.json"]
    assert f"earlier steps drew from other mixtures: {earlier}" in (output / "final" / "README.md").read_text()
    assert (output / "train_script.py").read_text().endswith(f"--resume_force\n# with another data config: "
                                                             f"{earlier} holds the one before\n")
    for path, content in before.items():  # the exports and checkpoints before the resume stay as they were
        if path.relative_to(output).parts[0] in ("4", "8", "checkpoints"):
            assert path.read_bytes() == content, path


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


def test_resuming_on_a_full_disk_is_one_line_before_anything_is_written(tiny, tmp_path, uninterrupted, monkeypatch):
    output = tmp_path / "run"
    shutil.copytree(uninterrupted, output)
    shutil.rmtree(output / "checkpoints" / str(STEPS))
    shutil.rmtree(output / "final")
    before = file_bytes(output)

    def disk_full(fd):  # the kernel's answer when the run's first new block (its lock's) finds none
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(train_script.os, "fsync", disk_full)
    with pytest.raises(train_script.UserError, match=rf"^cannot write to {output} \(No space left on device\)$"):
        train_script.main(tiny_args(tiny, output, "--resume"))
    assert file_bytes(output) == before


def test_resume_of_a_finished_run_exits_0_and_writes_only_a_missing_final_export(tiny, tmp_path, uninterrupted, capsys):
    """A restart loop (`until python train_script.py ... --resume; do sleep 60; done`) must end."""
    output = tmp_path / "run"
    shutil.copytree(uninterrupted, output)
    shutil.rmtree(output / "final")  # a full disk or a kill during the last export
    result = run_train_script(*tiny_args(tiny, output, "--resume"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"--resume: the run is complete ({STEPS} steps); model in {output / 'final'}" in result.stdout
    assert_same_params(final_params(output), final_params(uninterrupted))

    before = file_bytes(output)
    train_script.main(tiny_args(tiny, output, "--resume"))
    assert "the run is complete" in capsys.readouterr().out
    assert file_bytes(output) == before


def test_a_finished_run_given_more_steps_keeps_its_model_and_says_the_schedule_changes(
        tiny, tmp_path, uninterrupted, capsys):
    """Extending a run: --resume with a larger --steps, no --resume_force. The finished model stays, as
    OUTPUT/<its step>; the learning rate follows the new schedule (transformers' linear warm-up and decay)."""
    output, more = tmp_path / "run", STEPS + SAVE_STEPS
    shutil.copytree(uninterrupted, output)
    before = file_bytes(output)
    train_script.main(tiny_args(tiny, output, "--resume", "--steps", more))
    out = capsys.readouterr().out
    lr = lambda step: 1e-3 * (more - step) / (more - 2)  # noqa: E731  (--lr 1e-3, --warmup_steps 2)
    assert f"--resume: the run now ends at step {more} (was {STEPS}) and its lr decays to 0 at step {more} (was " \
           f"{STEPS}): step {STEPS} trains at lr {lr(STEPS):.3g} (was 0)\n" in out
    assert f"the model of step {STEPS} moves from {output / 'final'} to {output / str(STEPS)}" in out
    after = file_bytes(output)
    for path, content in before.items():  # the finished model, the exports and the newest checkpoint intact
        relative = path.relative_to(output).parts
        if relative[0] == "final":
            assert after[output.joinpath(str(STEPS), *relative[1:])] == content, path
        elif relative[0] in ("4", "8") or relative[:2] == ("checkpoints", str(STEPS)):
            assert after[path] == content, path
    [last] = [json.loads(line) for line in open(output / "metrics.jsonl") if json.loads(line)["step"] == more]
    assert abs(last["lr"] - lr(more - 1)) <= 1e-6 * lr(more - 1)  # the lr of the last update, step index more - 1
    assert (output / "final").is_dir() and final_params(output).keys() == final_params(uninterrupted).keys()
    name = "embeddings.word_embeddings.weight"  # trained on: the new final is not step 12's model
    assert not np.array_equal(final_params(output)[name], final_params(uninterrupted)[name])


# --------------------------------------------------------------------------------------------
# OUTPUT: one run at a time, and --overwrite never deletes an input
# --------------------------------------------------------------------------------------------

def file_bytes(folder):
    """{path: content} of every file under `folder`, links followed."""
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_live_run_keeps_its_output_and_a_killed_one_is_taken_over(tiny, tmp_path, uninterrupted):
    output, log_path = tmp_path / "run", tmp_path / "log"
    with open(log_path, "w") as log:
        process = start_script(tiny_args(tiny, output), log)
        try:
            wait_for_checkpoint(process, output, SAVE_STEPS, log_path)
            process.send_signal(signal.SIGSTOP)  # alive and holding OUTPUT, but not finishing meanwhile
            before = file_bytes(output)
            holder = rf"host {socket.gethostname()} pid {process.pid}"
            for second_run in (["--overwrite"], ["--resume"], []):
                with pytest.raises(train_script.UserError, match=rf"{output} is in use by another run \({holder}\)"):
                    train_script.main(tiny_args(tiny, output, *second_run))
            assert file_bytes(output) == before
        finally:
            process.kill()
            process.wait()
    assert (output / ".lock").read_text().strip() == holder  # left by the killed run

    train_script.main(tiny_args(tiny, output, "--resume"))
    assert_same_params(final_params(output), final_params(uninterrupted))
    assert not (output / ".lock").exists()


@pytest.fixture
def project(tiny, tmp_path):
    """A user's folder holding the data, the model and an earlier run's log, used as OUTPUT."""
    output = tmp_path / "project"
    shutil.copytree(tiny / "data", output / "data")
    shutil.copytree(tiny / "model", output / "model")
    (output / "metrics.jsonl").write_text("an earlier run\n")
    return output


@pytest.mark.parametrize("form", ["file-url", "relative", "linked-folder", "linked-file", "linked-model"])
def test_overwrite_never_deletes_an_input_in_any_form(tiny, tmp_path, monkeypatch, project, form):
    data, model = tiny / "data", tiny / "model"
    if form == "file-url":
        data = (project / "data").as_uri()
    elif form == "relative":
        monkeypatch.chdir(project)
        data = "data"
    elif form == "linked-folder":
        (tmp_path / "data_link").symlink_to(project / "data")
        data = tmp_path / "data_link"
    elif form == "linked-file":  # one file of the mixture only
        data = tmp_path / "data"
        shutil.copytree(tiny / "data", data)
        (data / "paraphrase_pairs.jsonl.gz").unlink()
        (data / "paraphrase_pairs.jsonl.gz").symlink_to(project / "data" / "paraphrase_pairs.jsonl.gz")
    else:
        (tmp_path / "model_link").symlink_to(project / "model")
        model = tmp_path / "model_link"
    before = file_bytes(project)
    argv = tiny_args(tiny, project, "--overwrite", data=data, model=model)
    with pytest.raises(train_script.UserError, match=r"--overwrite would delete .* it is inside .*project$") as refused:
        train_script.main(argv)
    assert "\n" not in str(refused.value)
    assert file_bytes(project) == before


def fail_before_the_first_step(how, tmp_path, monkeypatch):
    """Flags (and a patch) for a run that fails once data flows, before its first step."""
    if how == "a tokenizer crash":
        def crash(columns, shape):
            raise MemoryError("the tokenizer ran out of memory")
        monkeypatch.setattr(train_script, "tokenize_columns", crash)
        return {}
    # a file whose first row has 2 texts and every other row 3: it runs dry once streaming skips them
    write_source(tmp_path / "data" / "mixed.jsonl.gz", [["a question", "an answer"]] + [
        [f"question {i}", f"answer {i}", f"wrong answer {i}"] for i in range(100)])
    return {"config": write_config(tmp_path / "mixed.json", [{"name": "mixed.jsonl.gz", "lines": 101, "weight": 1}]),
            "data": tmp_path / "data"}


ONE_STEP = ("--steps", "1", "--save_steps", "1", "--warmup_steps", "0")


def assert_replaced_by_a_one_step_run(output):
    assert (output / "final").is_dir() and (output / "checkpoints" / "1").is_dir()
    assert not [p.name for p in output.iterdir() if p.name in ("4", "8", ".replaced", ".replaced.deleted")]


@pytest.mark.parametrize("how", ["a tokenizer crash", "rows of another column count"])
def test_overwrite_keeps_the_replaced_run_until_the_first_step(tiny, tmp_path, uninterrupted, monkeypatch, capsys,
                                                               how):
    output = tmp_path / "run"
    shutil.copytree(uninterrupted, output)
    before = file_bytes(output)
    with pytest.raises((train_script.UserError, RuntimeError)):
        train_script.main(tiny_args(tiny, output, "--overwrite",
                                    **fail_before_the_first_step(how, tmp_path, monkeypatch)))
    assert file_bytes(output) == before and not (output / ".replaced").exists()
    assert f"{output} holds the run that --overwrite was to replace again" in capsys.readouterr().err

    monkeypatch.undo()  # a replacement that works: the old run goes once the new one has made a step
    train_script.main(tiny_args(tiny, output, "--overwrite", *ONE_STEP))
    assert_replaced_by_a_one_step_run(output)


def kill_during_the_replacement(tiny, output, log_path):
    """An --overwrite of OUTPUT killed (-9) as soon as it has moved the old run aside."""
    with open(log_path, "w") as log:
        process = start_script(tiny_args(tiny, output, "--overwrite"), log)
        try:
            while not (output / ".replaced").is_dir():
                assert process.poll() is None, log_path.read_text()[-3000:]
                time.sleep(0.01)
        finally:
            process.kill()
            process.wait()
    assert not (output / ".replaced.deleted").exists(), "the run made its first step before the kill: nothing tested"


@pytest.mark.slow
@pytest.mark.parametrize("then", ["--overwrite", "--resume"])
def test_a_replacement_killed_before_its_first_step_loses_nothing(tiny, tmp_path, uninterrupted, monkeypatch,
                                                                  capsys, then):
    """kill -9 while the replaced run is aside: the next --overwrite or --resume keeps it aside the same way,
    puts it back if it fails before its first step, and deletes it once it has made one."""
    output, aside = tmp_path / "run", tmp_path / "run" / ".replaced"
    shutil.copytree(uninterrupted, output)
    before = file_bytes(output)
    kill_during_the_replacement(tiny, output, tmp_path / "log")
    assert {p.relative_to(aside): c for p, c in file_bytes(aside).items()} == {
        p.relative_to(output): c for p, c in before.items()}
    with pytest.raises(RuntimeError, match="the tokenizer ran out of memory"):
        train_script.main(tiny_args(tiny, output, then,
                                    **fail_before_the_first_step("a tokenizer crash", tmp_path, monkeypatch)))
    assert f"{aside} holds the run that --overwrite replaces until this run's first step" in capsys.readouterr().out
    assert file_bytes(output) == before and not aside.exists()

    monkeypatch.undo()
    kill_during_the_replacement(tiny, output, tmp_path / "log")
    train_script.main(tiny_args(tiny, output, then, *ONE_STEP))
    assert_replaced_by_a_one_step_run(output)


def test_a_put_back_cut_short_by_a_kill_is_finished_by_the_next_run(tiny, tmp_path, uninterrupted, capsys):
    output, aside = tmp_path / "run", tmp_path / "run" / ".replaced"
    shutil.copytree(uninterrupted, output)
    before = file_bytes(output)
    aside.mkdir()  # what a kill leaves while a failed replacement puts the old run back: some of it still aside
    for name in ("checkpoints", "final"):
        (output / name).rename(aside / name)
    (aside / ".putting_back").touch()
    train_script.main(tiny_args(tiny, output, "--resume"))
    assert "the run is complete" in capsys.readouterr().out
    assert file_bytes(output) == before and not aside.exists()


def test_overwrite_of_a_linked_output_is_one_line(tiny, tmp_path):
    (tmp_path / "disk" / "run").mkdir(parents=True)
    (tmp_path / "disk" / "run" / "metrics.jsonl").write_text("an earlier run\n")
    (tmp_path / "run").symlink_to(tmp_path / "disk" / "run")
    with pytest.raises(train_script.UserError, match=r"--overwrite: .*/run is a link to .*/disk/run; pass the folder"):
        train_script.main(tiny_args(tiny, tmp_path / "run", "--overwrite"))
    assert (tmp_path / "disk" / "run" / "metrics.jsonl").read_text() == "an earlier run\n"


def test_a_read_only_output_parent_is_one_line(tiny, tmp_path, monkeypatch):
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):  # root writes anyway: give it the refusal everyone else gets
            def refuse(path, *_, **__):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            monkeypatch.setattr(train_script.os, "makedirs", refuse)
        with pytest.raises(train_script.UserError, match=rf"cannot create {parent / 'out'} \(Permission denied\)"):
            train_script.main(tiny_args(tiny, parent / "out"))
    finally:
        parent.chmod(0o755)
# ============================================================================================
# Signals, stuck and dead workers: one line, a checkpoint where there is a step to save, no
# worker left behind
# ============================================================================================

def worker_pids(pid):
    """The tokenizer workers of process `pid`: its children that multiprocessing spawned (not its
    resource tracker), from /proc."""
    def read(path):  # a thread or child that ends between the listing and the read has nothing to say
        with contextlib.suppress(FileNotFoundError, ProcessLookupError), open(path, "rb") as f:
            return f.read()
        return b""

    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        children += [int(c) for c in read(f"/proc/{pid}/task/{task}/children").split()]
    return [c for c in children if b"spawn_main" in read(f"/proc/{c}/cmdline")]


def gone(pid, within=30):
    """Whether process `pid` has ended (or is a zombie) within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.2)
    return False


def run_until(args, log_path, started, then):
    """Starts the script in its own session with one tokenizer worker; once `started()` holds,
    calls then(process, workers); returns (exit status, log lines, the workers)."""
    with open(log_path, "w") as log:
        process = start_script([*args, "--num_workers", "1"], log, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while not started():
                assert process.poll() is None, f"the run ended too soon:\n{log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "never started"
                time.sleep(0.05)
            workers = worker_pids(process.pid)
            then(process, workers)
            returncode = process.wait(timeout=300)
        finally:
            process.kill()
    return returncode, log_path.read_text().strip().splitlines(), workers


def assert_one_line_and_no_worker_left(lines, workers):
    assert not [line for line in lines if "Traceback" in line], "\n".join(lines[-40:])
    assert all(gone(w) for w in workers), "a tokenizer worker outlived the trainer"


@pytest.mark.parametrize("moment", ["first output", "workers starting"])
def test_a_signal_before_the_first_step_stops_at_once_in_one_line(tiny, tmp_path, moment):
    """From the first line of output (here: transformers' deprecation warning) a Ctrl-C, sent to the
    whole process group as a terminal does, stops the run at once: there is no step to save."""
    output, log_path = tmp_path / "run", tmp_path / "log"
    marker = {"first output": log_path, "workers starting": output / "train_script.py"}[moment]
    returncode, lines, workers = run_until(
        tiny_args(tiny, output), log_path, lambda: marker.exists() and marker.stat().st_size > 0,
        lambda process, workers: os.killpg(process.pid, signal.SIGINT))
    assert returncode == 128 + signal.SIGINT, lines[-5:]
    assert re.fullmatch(r"stopped: SIGINT, at once; (no checkpoint to resume from|resume with: .*--resume)",
                        lines[-1]), lines[-5:]
    assert not (output / "final").exists() and not (output / "checkpoints" / str(SAVE_STEPS)).exists()
    assert_one_line_and_no_worker_left(lines, workers)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["--batch_timeout", "SIGINT"])
def test_a_frozen_worker_ends_the_run_with_a_checkpoint_not_a_hang(tiny, tmp_path, how):
    """A worker stopped with kill -STOP: the trainer waits --batch_timeout seconds, names the worker
    and its batch, checkpoints the last finished step and exits 1; or a Ctrl-C meanwhile
    checkpoints at once. The frozen worker is killed with the trainer."""
    output, log_path = tmp_path / "run", tmp_path / "log"
    args = [*tiny_args(tiny, output), "--steps", "400", "--prefetch", "1",
            "--batch_timeout", "30" if how == "--batch_timeout" else "600"]  # 30: the workers' start fits

    def freeze_the_worker(process, workers):
        os.kill(workers[0], signal.SIGSTOP)
        if how == "SIGINT":
            time.sleep(5)  # the trainer is waiting for the frozen worker by now
            os.killpg(process.pid, signal.SIGINT)

    started = time.monotonic()
    returncode, lines, workers = run_until(args, log_path, (output / "checkpoints" / str(SAVE_STEPS)).is_dir,
                                           freeze_the_worker)
    assert time.monotonic() - started < 240, "the stop took minutes"
    assert len(workers) == 1
    if how == "--batch_timeout":
        assert returncode == 1, lines[-5:]
        # frozen while on the awaited batch, or before it took it
        stopped = re.fullmatch(rf"stopped: no batch in 3\ds \(--batch_timeout\) for step (\d+) \(sources .+\): "
                               rf"(tokenizer worker pid {workers[0]} has it|none of the tokenizer workers \(pid "
                               rf"{workers[0]}\) took it); checkpoint of step (\d+) written; resume with: .*--resume",
                               lines[-1])
        assert stopped and int(stopped[1]) == int(stopped[3]) + 1, lines[-5:]
        step = int(stopped[3])
    else:
        assert returncode == 128 + signal.SIGINT, lines[-5:]
        stopped = re.fullmatch(r"stopped: SIGINT at step (\d+), checkpoint written; resume with: .*--resume", lines[-1])
        assert stopped, lines[-5:]
        step = int(stopped[1])
    assert SAVE_STEPS <= step < 400 and (output / "checkpoints" / str(step)).is_dir()
    assert_one_line_and_no_worker_left(lines, workers)


def test_a_second_signal_stops_at_once_in_one_line(tiny, tmp_path):
    """SIGINT and SIGTERM, delivered together (the trainer is held with SIGSTOP while they are
    sent): the first taken asks for a checkpoint, the second stops at once, naming the resume command."""
    output, log_path = tmp_path / "run", tmp_path / "log"

    def two_signals(process, workers):
        for signum in (signal.SIGSTOP, signal.SIGINT, signal.SIGTERM, signal.SIGCONT):
            os.kill(process.pid, signum)

    returncode, lines, workers = run_until([*tiny_args(tiny, output), "--steps", "400"], log_path,
                                           (output / "checkpoints" / str(SAVE_STEPS)).is_dir, two_signals)
    [notice] = [i for i, line in enumerate(lines) if line.endswith(": finishing the step, then writing a checkpoint "
                                                                  "(again to stop at once)")]
    first, second = lines[notice].split(":")[0], ({"SIGINT", "SIGTERM"} - {lines[notice].split(":")[0]}).pop()
    assert first in ("SIGINT", "SIGTERM") and returncode == 128 + signal.Signals[second], lines[-5:]
    after = [line for line in lines[notice + 1:] if line.strip()]
    assert len(after) == 1 and re.fullmatch(rf"stopped: {second}, at once; resume with: (.*)", after[0]), lines[-5:]
    assert shlex.split(after[0].split("resume with: ")[1])[-1] == "--resume"
    assert_one_line_and_no_worker_left(lines, workers)


@pytest.mark.slow
def test_sighup_with_the_terminal_gone_checkpoints_as_sigterm(tiny, tmp_path):
    """An ssh session that drops: its terminal closes, the run goes on printing to it, then SIGHUP
    reaches the process group. The run finishes its step, checkpoints and exits 129; its output to
    the dead terminal is dropped, stderr in a file keeps the line (before, SIGHUP killed the run
    with no checkpoint and no line; a line printed before the signal ended it with an OSError)."""
    output, log_path = tmp_path / "run", tmp_path / "log"
    master, terminal = pty.openpty()
    read_on = threading.Event()
    read_on.set()

    def drain():  # a terminal shows what it gets, so the run never waits for it
        while read_on.is_set():
            if select.select([master], [], [], 0.1)[0]:
                with contextlib.suppress(OSError):
                    os.read(master, 65536)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, train_script.__file__, *tiny_args(tiny, output), "--steps", "400",
                                    "--log_steps", "1", "--num_workers", "1"],
                                   stdout=terminal, stderr=log, start_new_session=True)
        os.close(terminal)
        try:
            deadline = time.monotonic() + 600
            while not (output / "checkpoints" / str(SAVE_STEPS)).is_dir():
                assert process.poll() is None, f"the run ended too soon:\n{log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "never started"
                time.sleep(0.05)
            workers = worker_pids(process.pid)
            read_on.clear()
            reader.join()
            os.close(master)  # the terminal is gone: writes to it fail from here
            time.sleep(1)  # lines the run prints before SIGHUP comes go to the dead terminal (the window of a drop)
            os.killpg(process.pid, signal.SIGHUP)
            returncode = process.wait(timeout=300)
        finally:
            process.kill()
    lines = log_path.read_text().strip().splitlines()
    assert returncode == 128 + signal.SIGHUP, lines[-5:]
    stopped = re.fullmatch(r"stopped: SIGHUP at step (\d+), checkpoint written; resume with: .*--resume", lines[-1])
    assert stopped, lines[-5:]
    assert SAVE_STEPS <= int(stopped[1]) < 400 and (output / "checkpoints" / stopped[1]).is_dir()
    assert_one_line_and_no_worker_left(lines, workers)


@pytest.mark.slow
def test_a_killed_worker_ends_the_run_in_one_line_with_a_checkpoint(tiny, tmp_path):
    output, log_path = tmp_path / "run", tmp_path / "log"
    returncode, lines, workers = run_until(
        [*tiny_args(tiny, output), "--steps", "400"], log_path, (output / "checkpoints" / str(SAVE_STEPS)).is_dir,
        lambda process, workers: os.kill(workers[0], signal.SIGKILL))
    assert returncode == 1, lines[-5:]
    stopped = re.fullmatch(r"stopped: the data producer failed: BrokenProcessPool: .*[^.]; checkpoint of step (\d+) "
                           r"written; resume with: .*--resume", lines[-1])
    assert stopped and (output / "checkpoints" / stopped[1]).is_dir(), lines[-5:]
    assert_one_line_and_no_worker_left(lines, workers)


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
