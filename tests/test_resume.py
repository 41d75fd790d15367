"""Checkpoints and resume: a run killed with -9 and resumed ends with the parameters of an
uninterrupted run, a resume mid-round skips the rows its round had seen, a truncated newest
checkpoint falls back to the one before, a resume with changed flags is refused (forced, another
mixture is recorded), and a finished run resumed exits 0 or, given more steps, is extended.

Every run is tiny (tests/conftest.py's RUN: the fixture's pairs, its 2-layer model, 16 word pieces,
2 pairs per device on the 8 emulated devices, 12 steps, a checkpoint every 4) and trains in-process
where the behaviour is not about the process itself."""
import json
import os
import re
import shutil

import numpy as np
import pytest

import train_script
from conftest import (SAVE_STEPS, STEPS, assert_same_params, file_bytes, final_params, read_source, run_train_script,
                      start_script, tiny_args, wait_for_checkpoint, write_config, write_source)

pytestmark = pytest.mark.usefixtures("compile_the_step_once")


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
