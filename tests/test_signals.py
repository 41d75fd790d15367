"""Stopping: SIGTERM checkpoints and prints the command that resumes to the uninterrupted run's
parameters; a signal before the first step, a second signal, SIGHUP with the terminal gone, a
frozen or killed tokenizer worker each end the run in one line, with a checkpoint where there is a
step to save, and no worker left behind. Runs: tests/conftest.py's RUN, as their own processes."""
import contextlib
import os
import pty
import re
import select
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

import train_script
from conftest import SAVE_STEPS, STEPS, assert_same_params, final_params, start_script, tiny_args, wait_for_checkpoint

pytestmark = pytest.mark.usefixtures("compile_the_step_once")


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
    # a step that ends between the two signals redraws the progress bar: not a line the run says
    after = [line for line in lines[notice + 1:] if line.strip() and not re.match(r"\s*\d+%\|", line)]
    assert len(after) == 1 and re.fullmatch(rf"stopped: {second}, at once; resume with: (.*)", after[0]), lines[-5:]
    assert shlex.split(after[0].split("resume with: ")[1])[-1] == "--resume"
    assert_one_line_and_no_worker_left(lines, workers)


@pytest.mark.slow
def test_sighup_with_the_terminal_gone_checkpoints_as_sigterm(tiny, tmp_path):
    """An ssh session to a TPU VM that drops: its terminal closes, the run goes on printing to it, then SIGHUP
    reaches the process group. The run finishes its step, checkpoints and exits 129; its output to the dead terminal
    is dropped, stderr in a file keeps the line (before, SIGHUP killed the run with no checkpoint and no line; a
    line printed before the signal ended it with an OSError). The run starts libtpu as on a TPU VM (JAX_PLATFORMS
    unset: it finds no chip and runs on the CPU); libtpu's start sets SIGHUP to be ignored if it is at its default,
    and leaves the script's handler, installed before, alone."""
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
    as_on_a_tpu_vm = {name: value for name, value in os.environ.items() if name != "JAX_PLATFORMS"}
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, train_script.__file__, *tiny_args(tiny, output), "--steps", "400",
                                    "--log_steps", "1", "--num_workers", "1"], stdout=terminal, stderr=log,
                                   start_new_session=True, env={**as_on_a_tpu_vm, "TPU_SKIP_MDS_QUERY": "1"})
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
