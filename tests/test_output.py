"""OUTPUT: one run at a time (a live run keeps it, a killed one's lock is taken over), a resume
on a full disk is one line before anything is written, --overwrite never deletes an input and
loses no run to a replacement that fails or is killed before its first step, and a linked OUTPUT
or a read-only parent is one line. Runs: tests/conftest.py's RUN."""
import errno
import os
import shutil
import signal
import socket
import time

import pytest

import train_script
from conftest import (SAVE_STEPS, STEPS, assert_same_params, file_bytes, final_params, start_script, tiny_args,
                      wait_for_checkpoint, write_config, write_source)

pytestmark = pytest.mark.usefixtures("compile_the_step_once")


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
