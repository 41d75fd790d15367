"""scripts/build_reddit.py: v1's Reddit files rebuilt from comment dumps (scripts/make_reddit_dumps.py).

The pipeline's pairs are checked against PolyAI's rules written out plainly below (reading the
dumps on its own, walking each reply's parents), then case by case. Beam takes seconds to start,
so the runs are few: one shared build with two workers, one with one worker, one in three passes,
one of damaged dumps, one that fails while writing.
"""

import collections
import datetime
import gzip
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import zstandard

import train_script
from conftest import ROOT, read_source, tiny_argv, write_config, write_source
from make_reddit_dumps import write_cases

V1 = {e["name"]: e for e in json.load(open(os.path.join(ROOT, "data_config.json")))}
YEARS = (2015, 2016)


def build_reddit(dumps, data, *flags):
    return subprocess.run([sys.executable, "scripts/build_reddit.py", str(dumps), str(data), *map(str, flags)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


# --------------------------------------------------------------------------------------------
# The rules, written out plainly
# --------------------------------------------------------------------------------------------

def dump_text(path):
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".zst"):  # stream_reader stops quietly at a truncation: the lines before it
        try:
            raw = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(io.BytesIO(raw)).read()
        except zstandard.ZstdError:  # not zstandard from its first byte: no lines
            raw = b""
    elif path.endswith(".gz"):
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", "surrogatepass").splitlines()


def unprefixed(name):
    return name[3:] if name[:1] == "t" and name[2:3] == "_" else name


def keepable(body):
    return body not in ("[deleted]", "[removed]") and 9 <= len(body) <= 127


def reference(paths, years=YEARS):
    """{year: Counter((context, response))}, and {id: body} of every comment read."""
    threads, bodies = collections.defaultdict(dict), {}
    for path in paths:
        for line in dump_text(path):
            try:
                c = json.loads(line)
                year = datetime.datetime.fromtimestamp(int(c["created_utc"]), datetime.timezone.utc).year
                link, cid, parent, body = (c["link_id"], c["id"], c["parent_id"], c["body"])
            except (ValueError, KeyError, TypeError):
                continue
            if body is None or year not in years:
                continue
            threads[year, unprefixed(link)][unprefixed(cid)] = (unprefixed(parent), body)
            bodies[cid] = body
    pairs = {year: collections.Counter() for year in years}
    for (year, _), comments in threads.items():
        for cid, (parent, body) in comments.items():
            if parent not in comments:
                continue
            seen, above = {cid}, parent  # up the parents: to the top, or round a cycle
            while above in comments and above not in seen:
                seen.add(above)
                above = comments[above][0]
            if above not in comments and keepable(body) and keepable(comments[parent][1]):
                pairs[year][comments[parent][1], body] += 1
    return pairs, bodies


def built_pairs(data, year):
    return collections.Counter((row["context"], row["response"])
                               for row in read_source(data / f"reddit/reddit_{year}.jsonl.gz"))


# --------------------------------------------------------------------------------------------
# One build, shared
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dumps")
    return folder, write_cases(str(folder), seed=0)


@pytest.fixture(scope="module")
def built(dumps, tmp_path_factory):
    """DUMPS built with two workers into a DATA that has a config with another file and a stale
    Reddit entry."""
    data = tmp_path_factory.mktemp("data")
    write_source(str(data / "other.jsonl.gz"), [[f"question {i}", f"answer {i}"] for i in range(64)])
    write_config(data / "data_config.json", [{"name": "other.jsonl.gz", "lines": 64, "weight": 3},
                                             {"name": "reddit/reddit_2015.jsonl.gz", "lines": 1, "weight": 1}])
    result = build_reddit(dumps[0], data, "--direct_num_workers", 2)
    assert result.returncode == 0, result.stderr
    return data, result


def test_pairs_are_the_rules(dumps, built):
    for path in dumps[1]:  # the .zst need the long window of the real dumps
        if path.endswith(".zst"):
            assert zstandard.get_frame_parameters(open(path, "rb").read(18)).window_size == 2**31
    expected, _ = reference(dumps[1])
    for year in YEARS:
        assert built_pairs(built[0], year) == expected[year]
        assert sum(expected[year].values()) > 100


def test_the_cases(dumps, built):
    """Each case of the fixture, by the ids make_reddit_dumps gives its comments."""
    _, body = reference(dumps[1])
    pairs = {year: built_pairs(built[0], year) for year in YEARS}
    every = pairs[2015] + pairs[2016]
    responses = {r for _, r in every}
    assert all((body[f"ch{i - 1}"], body[f"ch{i}"]) in pairs[2015] for i in range(1, 15))  # 14 parents deep
    assert all((body["br0"], body[f"br{i}"]) in pairs[2015] and (body[f"br{i}"], body[f"br{i}{j}"]) in pairs[2015]
               for i in (1, 2, 3) for j in (0, 1))
    for k in range(4):  # ASCII, accented, CJK, emoji: 9 and 127 characters kept, 8 and 128 not
        assert (body[f"len{k}c"], body[f"len{k}_9"]) in pairs[2015]
        assert (body[f"len{k}c"], body[f"len{k}_127"]) in pairs[2015]
        assert body[f"len{k}_8"] not in responses and body[f"len{k}_128"] not in responses
        assert (body[f"len{k}_127"], body[f"len{k}_127r"]) in pairs[2015]
        assert body[f"len{k}_8r"] not in responses and body[f"len{k}_128r"] not in responses
    assert len(body["len3_127"].encode()) == 4 * 127
    for gone in ("gone1", "gone2"):  # [deleted] and [removed]: no pair with them, their replies' replies kept
        assert body[f"{gone}a"] not in responses and (body[f"{gone}a"], body[f"{gone}b"]) in pairs[2015]
    assert body["orphan1"] not in responses and (body["orphan1"], body["orphan2"]) in pairs[2016]
    assert (body["mon0"], body["mon1"]) in pairs[2015]  # one thread over two monthly files
    assert body["mon2"] not in responses and body["ny1"] not in responses  # a parent in the year before
    assert (body["ny1"], body["ny2"]) in pairs[2016]
    assert (body["cy0"], body["cy1"]) in pairs[2016]
    assert not {body[c] for c in ("cyA", "cyB", "cyC", "cyS")} & (responses | {c for c, _ in every})
    assert pairs[2016][body["str0"], body["str1"]] == 1  # created_utc a string; the comment twice, one pair


def test_the_config_and_the_report(dumps, built):
    data, result = built
    entries = json.loads((data / "data_config.json").read_text())
    lines = {year: len(read_source(data / f"reddit/reddit_{year}.jsonl.gz")) for year in YEARS}
    assert entries == [{"name": "other.jsonl.gz", "lines": 64, "weight": 3}] + [
        {"name": f"reddit/reddit_{y}.jsonl.gz", "lines": lines[y],
         "weight": V1[f"reddit/reddit_{y}.jsonl.gz"]["weight"]}
        for y in YEARS]
    assert sorted(os.listdir(data / "reddit")) == [f"reddit_{y}.jsonl.gz" for y in YEARS]  # no temporary left
    comments = [json.loads(line) for path in dumps[1] for line in dump_text(path)]
    reasons = collections.Counter("[deleted]" if c["body"] == "[deleted]" else "[removed]" if c["body"] == "[removed]"
                                  else "shorter than 9" if len(c["body"]) < 9 else "longer than 127"
                                  for c in comments if not keepable(c["body"]))
    out = result.stdout
    dropped = ", ".join(f"{reasons[r]:,} {r}" for r in sorted(reasons))
    assert f"comments read: {len(comments):,}; dropped: {dropped}" in out
    assert "replies in a cycle: 4" in out  # cyA, cyB, cyC below them, cyS its own parent
    for y in (2015, 2016):
        assert f"reddit/reddit_{y}.jsonl.gz: {lines[y]:,} pairs" in out
    assert "reddit/reddit_2017.jsonl.gz: 0 pairs" in out and "not written" in out
    assert "Traceback" not in result.stderr


def test_one_worker_writes_the_same_files(dumps, built, tmp_path):
    result = build_reddit(dumps[0] / "RC_*", tmp_path, "--direct_num_workers", 1)  # the folder's files by a glob
    assert result.returncode == 0, result.stderr
    for year in YEARS:
        name = f"reddit/reddit_{year}.jsonl.gz"
        assert (tmp_path / name).read_bytes() == (built[0] / name).read_bytes()


def test_passes_write_the_same_files_and_report(dumps, built, tmp_path):
    """--passes, the local runner's way to hold a part of the threads at a time."""
    result = build_reddit(dumps[0], tmp_path, "--direct_num_workers", 2, "--passes", 3)
    assert result.returncode == 0, result.stderr
    for year in YEARS:
        name = f"reddit/reddit_{year}.jsonl.gz"
        assert (tmp_path / name).read_bytes() == (built[0] / name).read_bytes()
    report = [line for line in result.stdout.splitlines() if not line.startswith(("pass ", "added "))]
    assert report == [line for line in built[1].stdout.splitlines() if not line.startswith("added ")]
    assert "pass 3 of 3 done" in result.stdout


def test_train_script_reads_the_files(tiny, built, tmp_path):
    data = built[0]
    dump = tmp_path / "batches.jsonl"
    train_script.main(tiny_argv(tiny, tmp_path / "out", "--batch_size", 1, "--max_length", 16, "--num_workers", 0,
                                "--dry_run", 40, "--dump_batches", dump, config=data / "data_config.json", data=data))
    rows = [row for line in dump.read_text().splitlines() for row in json.loads(line)["rows"]]
    reddit = [row["texts"] for row in rows if row["source"].startswith("reddit/")]
    pairs = built_pairs(data, 2015) + built_pairs(data, 2016)
    assert reddit and all((context, response) in pairs for response, context in reddit)  # [response, context]


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def test_damaged_dumps_are_counted_per_file(dumps, tmp_path):
    folder = tmp_path / "dumps"
    folder.mkdir()
    whole = (dumps[0] / "RC_2015-11.zst").read_bytes()
    (folder / "RC_2015-11.zst").write_bytes(whole[:len(whole) // 2])
    lines = (dumps[0] / "RC_2016-02.jsonl").read_text().splitlines()
    broken = json.loads(lines[0])
    del broken["body"]
    bad = ["{not json", json.dumps(broken), "[1, 2]"]
    (folder / "RC_2016-02.jsonl").write_text("\n".join(lines[1:50] + bad) + "\n")
    shutil.copy(dumps[0] / "RC_2015-12.zst", folder)
    (folder / "RC_2015-10.zst").write_bytes(b"not zstandard at all")
    result = build_reddit(folder, tmp_path / "data", "--direct_num_workers", 2, "--years", 2015)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 2 damaged dump(s)")
    assert str(folder / "RC_2015-11.zst") in last and str(folder / "RC_2015-10.zst") in last
    out = result.stdout
    assert f"{folder / 'RC_2015-11.zst'}: " in out and ", damaged: truncated" in out
    assert f"{folder / 'RC_2015-10.zst'}: 0 lines, damaged: " in out
    assert f"{folder / 'RC_2016-02.jsonl'}: 52 lines, " in out
    assert "2 missing a field" in out and "1 not JSON" in out and "49 outside --years" in out
    expected, _ = reference([str(p) for p in sorted(folder.iterdir())], years=(2015,))
    assert built_pairs(tmp_path / "data", 2015) == expected[2015]  # the lines before the damage


NO_DUMPS = "no dumps there (RC_*.zst, *.jsonl or *.json, plain, .gz or .bz2), or only empty files"


@pytest.mark.parametrize("what, flags, error", [
    ("missing", (), NO_DUMPS), ("empty folder", (), NO_DUMPS), ("empty file", (), NO_DUMPS),
    ("dumps", ("--yeras", 2015), "unknown option --yeras"), ("dumps", ("--years", 2019), "--years: expected a year"),
    ("dumps", ("--passes", 0), "--passes: expected a number")],
    ids=["missing", "empty folder", "empty file", "unknown option", "a year not v1's", "no passes"])
def test_bad_command_lines_are_one_line(dumps, tmp_path, what, flags, error):
    folder = {"missing": tmp_path / "none", "empty folder": tmp_path, "dumps": dumps[0]}.get(what, tmp_path)
    if what == "empty file":
        (tmp_path / "RC_2015-01.zst").write_bytes(b"")
    result = build_reddit(folder, tmp_path / "data", *flags)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert error in result.stderr.strip().splitlines()[-1] and "error: " in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "data").exists()


def test_a_failed_run_leaves_no_file_under_its_name(dumps, tmp_path):
    data = tmp_path / "data"
    (data / "reddit" / "reddit_2015.jsonl.gz.partial").mkdir(parents=True)  # cannot be written
    (data / "reddit" / "reddit_2016.jsonl.gz").write_bytes(b"an earlier run's")
    write_config(data / "data_config.json", [{"name": "other.jsonl.gz", "lines": 64, "weight": 3}])
    result = build_reddit(dumps[0], data, "--direct_num_workers", 2)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: the run failed, no file written: ")
    assert sorted(os.listdir(data / "reddit")) == ["reddit_2015.jsonl.gz.partial", "reddit_2016.jsonl.gz"]
    assert (data / "reddit" / "reddit_2016.jsonl.gz").read_bytes() == b"an earlier run's"
    assert json.loads((data / "data_config.json").read_text()) == [{"name": "other.jsonl.gz", "lines": 64, "weight": 3}]
