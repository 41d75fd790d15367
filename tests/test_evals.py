"""Evals: what a run tells while it goes (metrics.jsonl, TensorBoard) and its held-out evaluation
(--eval_steps, --eval_rows): the rows it holds out, the scores it logs."""
import json
import os
import struct

import numpy as np
import pytest

import train_script
from conftest import read_source, tiny_argv, write_config, write_source
from train_script import UserError


def texts_in(value):
    """Every string inside a JSON value."""
    if isinstance(value, str):
        return [value]
    values = value.values() if isinstance(value, dict) else value
    return [t for v in values for t in texts_in(v)]


def tensorboard_scalars(folder):
    """{tag: {step: value}} from the event files in folder, read with the protobuf alone
    (TFRecord framing: 8-byte length, 4-byte CRC, the record, 4-byte CRC)."""
    from tensorboardX.proto import event_pb2
    scalars = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 16 + length
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def read_metrics(output):
    records = [json.loads(line) for line in open(output / "metrics.jsonl")]
    return [r for r in records if "loss" in r], [r for r in records if "eval" in r]


def run_flag(run, name):
    """The value of flag `name` on the shared run's command line."""
    return run.argv[run.argv.index(name) + 1]


# --------------------------------------------------------------------------------------------
# metrics.jsonl and TensorBoard (conftest's short_run: 12 steps, logged and evaluated every 4)
# --------------------------------------------------------------------------------------------

def test_metrics_jsonl_has_a_line_per_log_step(short_run, tiny):
    training, _ = read_metrics(short_run.output)
    assert [r["step"] for r in training] == [4, 8, 12]
    args = train_script.parse_args(short_run.argv)
    lr, warmup, steps = args.lr, args.warmup_steps, args.steps
    for r in training:
        assert np.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["pairs_per_s"] > 0
        assert 0 <= r["data_wait"] <= 1
        # the lr of the window's last update (made at state.step = step - 1): linear warm-up over
        # --warmup_steps to --lr, then linear decay to 0 at --steps
        s = r["step"] - 1
        expected = lr * s / warmup if s < warmup else lr * (steps - s) / (steps - warmup)
        assert r["lr"] == pytest.approx(expected, rel=1e-5)
    # batches per source so far: --mixing original draws 2 sources per round of 8 steps from
    # (seed, round) alone, each filling 4 steps
    sources = train_script.open_sources(train_script.load_data_config(str(tiny / "data_config.json")), args)
    for r in training:
        expected = dict.fromkeys((s.name for s in sources), 0)
        for step in range(r["step"]):
            drawn = train_script.choose_sources(np.random.default_rng([42, step // 8]), sources, 2)
            expected[drawn[step % 8 // 4].name] += 1
        assert r["batches"] == expected


def test_tensorboard_events_hold_the_same_numbers(short_run):
    training, evaluation = read_metrics(short_run.output)
    scalars = tensorboard_scalars(short_run.output / "tensorboard")
    for r in training:
        for key in ("loss", "lr", "grad_norm", "pairs_per_s", "data_wait"):
            assert scalars[key][r["step"]] == pytest.approx(r[key], rel=1e-6)
        for name, count in r["batches"].items():
            assert scalars[f"batches/{name}"][r["step"]] == count
    for r in evaluation:
        assert scalars["eval/overall/accuracy"][r["step"]] == pytest.approx(r["eval"]["overall"]["accuracy"])


# --------------------------------------------------------------------------------------------
# Held-out evaluation
# --------------------------------------------------------------------------------------------

def test_held_out_scores_match_sentence_transformers_on_the_export(short_run):
    """The last evaluation scored the final parameters; recompute it from the exported model with
    sentence-transformers and a NumPy ranking."""
    from sentence_transformers import SentenceTransformer
    _, evaluation = read_metrics(short_run.output)
    assert [r["step"] for r in evaluation] == [0, 4, 8, 12]
    assert short_run.traces["embed_step"] == 1  # four evaluations, one compilation
    args = train_script.parse_args(short_run.argv)
    sources = train_script.open_sources(train_script.load_data_config(args.data_config), args)
    held_out = train_script.load_held_out(sources, int(run_flag(short_run, "--eval_rows")))
    model = SentenceTransformer(str(short_run.output / "final"), device="cpu")
    last = evaluation[-1]["eval"]
    for name, rows in held_out.items():
        columns = [model.encode(list(c), normalize_embeddings=True) for c in zip(*rows)]
        scores = columns[0] @ np.concatenate(columns[1:]).T
        # rank of the true partner: position of column i in row i's descending order
        ranks = np.array([1 + np.sum(row > row[i]) for i, row in enumerate(scores)])
        assert last[name]["accuracy"] == pytest.approx(np.mean(ranks == 1), abs=0.02)
        assert last[name]["mrr@10"] == pytest.approx(np.mean(np.where(ranks <= 10, 1 / ranks, 0)), abs=0.02)
    assert last["overall"]["accuracy"] == pytest.approx(np.mean([last[n]["accuracy"] for n in held_out]))
    assert evaluation[-1]["eval_seconds"] > 0


def test_held_out_rows_never_reach_a_training_batch(tiny, tmp_path):
    """Small files read several times over (140 training lines: a round of 8 steps x 16 rows fits in
    one): every training line is seen, no held-out line is."""
    entries = []
    for entry in json.loads((tiny / "data_config.json").read_text())[:2]:
        write_source(tmp_path / "data" / entry["name"], read_source(tiny / "data" / entry["name"], 160))
        entries.append({"name": entry["name"], "lines": 160, "weight": 1})
    config = write_config(tmp_path / "config.json", entries)
    train_script.main(tiny_argv(tiny, tmp_path / "out", "--eval_steps", "10", "--eval_rows", "20", "--dry_run", "60",
                                "--dump_batches", tmp_path / "batches.jsonl", "--batch_size", "2",
                                "--shuffle_buffer", "16", "--num_workers", "0", config=config, data=tmp_path / "data"))
    seen = {t for line in open(tmp_path / "batches.jsonl") for row in json.loads(line)["rows"] for t in row["texts"]}
    for entry in entries:
        rows = read_source(tmp_path / "data" / entry["name"])
        held_out = {t for row in rows[:20] for t in texts_in(row)}
        trained = [set(texts_in(row)) for row in rows[20:]]
        assert not seen & held_out, entry["name"]
        assert all(texts & seen for texts in trained), entry["name"]  # every training line was used


def test_eval_rows_that_leave_nothing_to_train_on_fail_before_training(tiny, tmp_path):
    with pytest.raises(UserError, match=r"paraphrase_pairs.jsonl.gz: has only 2000 lines.*--eval_rows 5000"):
        train_script.main(tiny_argv(tiny, tmp_path / "out", "--eval_steps", "10", "--eval_rows", "5000"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="--eval_steps"):
        train_script.parse_args(["c.json", "out", "--eval_steps", "-1"])
