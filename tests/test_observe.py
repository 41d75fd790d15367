"""Watching a run: metrics.jsonl, TensorBoard, held-out evaluation, plots."""
import collections
import gzip
import json
import os
import struct

import numpy as np
import pytest

import train_script
from conftest import pmap_traces
from train_script import UserError

TRAIN_FLAGS = ["--batch_size", "2", "--max_length", "16", "--lr", "1e-3", "--warmup_steps", "5",
               "--save_steps", "1000", "--num_workers", "0"]


def texts_in(value):
    """Every string inside a JSON value."""
    if isinstance(value, str):
        return [value]
    values = value.values() if isinstance(value, dict) else value
    return [t for v in values for t in texts_in(v)]


def file_lines(path):
    with gzip.open(path, "rt") as f:
        return f.readlines()


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


# --------------------------------------------------------------------------------------------
# A short run with metrics and held-out evaluation
# --------------------------------------------------------------------------------------------

RUN_TRACES = collections.Counter()  # the run's traces of each pmapped function


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    output = tmp_path_factory.mktemp("observe") / "run"
    with pmap_traces() as traces:
        train_script.main([str(tiny / "data_config.json"), str(output), "--model", str(tiny / "model"),
                           "--data_folder", str(tiny / "data"), "--steps", "12", "--log_steps", "4",
                           "--eval_steps", "6", "--eval_rows", "64", *TRAIN_FLAGS])
    RUN_TRACES.update(traces)
    return output


def read_metrics(output):
    records = [json.loads(line) for line in open(output / "metrics.jsonl")]
    return [r for r in records if "loss" in r], [r for r in records if "eval" in r]


def test_metrics_jsonl_has_a_line_per_log_step(run, tiny):
    training, _ = read_metrics(run)
    assert [r["step"] for r in training] == [4, 8, 12]
    args = train_script.parse_args([str(tiny / "data_config.json"), str(run), "--data_folder", str(tiny / "data")])
    for r in training:
        assert np.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["pairs_per_s"] > 0
        assert 0 <= r["data_wait"] <= 1
        # the lr of the window's last update (made at state.step = step - 1): linear warm-up over
        # 5 steps to 1e-3, then linear decay to 0 at step 12
        s = r["step"] - 1
        expected = 1e-3 * s / 5 if s < 5 else 1e-3 * (12 - s) / (12 - 5)
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


def test_tensorboard_events_hold_the_same_numbers(run):
    training, evaluation = read_metrics(run)
    scalars = tensorboard_scalars(run / "tensorboard")
    for r in training:
        for key in ("loss", "lr", "grad_norm", "pairs_per_s", "data_wait"):
            assert scalars[key][r["step"]] == pytest.approx(r[key], rel=1e-6)
        for name, count in r["batches"].items():
            assert scalars[f"batches/{name}"][r["step"]] == count
    for r in evaluation:
        assert scalars["eval/overall/accuracy"][r["step"]] == pytest.approx(r["eval"]["overall"]["accuracy"])


def test_held_out_scores_match_sentence_transformers_on_the_export(run, tiny):
    """The last evaluation scored the final parameters; recompute it from the exported model with
    sentence-transformers and a NumPy ranking."""
    from sentence_transformers import SentenceTransformer
    _, evaluation = read_metrics(run)
    assert [r["step"] for r in evaluation] == [0, 6, 12]
    assert RUN_TRACES["embed_step"] == 1  # three evaluations, one compilation
    args = train_script.parse_args([str(tiny / "data_config.json"), str(run), "--data_folder", str(tiny / "data"),
                                    "--eval_steps", "6", "--eval_rows", "64"])
    sources = train_script.open_sources(train_script.load_data_config(str(tiny / "data_config.json")), args)
    held_out = train_script.load_held_out(sources, 64)
    model = SentenceTransformer(str(run / "final"), device="cpu")
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
    data = tmp_path / "data"
    config = []
    for entry in json.load(open(tiny / "data_config.json"))[:2]:
        lines = file_lines(tiny / "data" / entry["name"])[:160]
        os.makedirs(os.path.dirname(data / entry["name"]), exist_ok=True)
        with gzip.open(data / entry["name"], "wt") as f:
            f.writelines(lines)
        config.append({"name": entry["name"], "lines": 160, "weight": 1})
    json.dump(config, open(tmp_path / "config.json", "w"))
    train_script.main([str(tmp_path / "config.json"), str(tmp_path / "out"), "--model", str(tiny / "model"),
                       "--data_folder", str(data), "--eval_steps", "10", "--eval_rows", "20",
                       "--dry_run", "60", "--dump_batches", str(tmp_path / "batches.jsonl"), "--batch_size", "2",
                       "--shuffle_buffer", "16", "--num_workers", "0"])
    seen = {t for line in open(tmp_path / "batches.jsonl") for row in json.loads(line)["rows"] for t in row["texts"]}
    for entry in config:
        lines = file_lines(data / entry["name"])
        held_out = {t for line in lines[:20] for t in texts_in(json.loads(line))}
        trained = [set(texts_in(json.loads(line))) for line in lines[20:]]
        assert not seen & held_out, entry["name"]
        assert all(texts & seen for texts in trained), entry["name"]  # every training line was used


def test_eval_rows_that_leave_nothing_to_train_on_fail_before_training(tiny, tmp_path):
    with pytest.raises(UserError, match=r"paraphrase_pairs.jsonl.gz: has only 2000 lines.*--eval_rows 5000"):
        train_script.main([str(tiny / "data_config.json"), str(tmp_path / "out"), "--model", str(tiny / "model"),
                           "--data_folder", str(tiny / "data"), "--eval_steps", "10", "--eval_rows", "5000"])
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="--eval_steps"):
        train_script.parse_args(["c.json", "out", "--eval_steps", "-1"])


# --------------------------------------------------------------------------------------------
# scripts/plot_run.py
# --------------------------------------------------------------------------------------------

def test_plot_run_draws_a_png_of_the_run(run, tmp_path):
    import matplotlib.image
    import plot_run
    out = plot_run.plot_run(str(run), str(tmp_path / "run.png"))
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 500 and image.shape[1] > 800
    assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas


def test_plot_run_keeps_the_last_record_of_a_step_logged_twice(tmp_path):
    import plot_run
    lines = [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0}, {"step": 20, "loss": 2.5},
             {"step": 20, "eval": {"overall": {"accuracy": 0.5}}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3')
    training, evaluation = plot_run.read_metrics(str(tmp_path))
    assert [(r["step"], r["loss"]) for r in training] == [(10, 3.0), (20, 2.5)]
    assert [r["step"] for r in evaluation] == [20]
