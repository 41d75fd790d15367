"""scripts/download_data.py and data_sources.json, offline: a loopback HTTP server plays the Hub
(huggingface_hub's resolve endpoint) and the 2021 file server; a local folder laid out like a Hub
parquet dataset plays the substitute; --source tests read a file:// mirror."""
import gzip
import hashlib
import http.server
import json
import os
import re
import shutil
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import train_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = "/work/shared/reference/hub_data/README.md"


# --------------------------------------------------------------------------------------------
# A loopback Hub and file server
# --------------------------------------------------------------------------------------------

class FakeServer(http.server.ThreadingHTTPServer):
    """/datasets/OWNER/NAME/resolve/REV/PATH -> root/hub/OWNER/NAME/PATH (with the headers
    huggingface_hub needs), /files/PATH -> root/files/PATH. Range requests, 404s, and a download
    cut after `cut[path]` bytes, once, to stand for an interrupted connection."""

    def __init__(self, root):
        super().__init__(("127.0.0.1", 0), Handler)
        self.root, self.cut, self.served = root, {}, {}
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def target(self):
        hub = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/[^/]+/(.+)", self.path)
        if hub:
            return self.server.root / "hub" / hub[1] / hub[2], True
        return self.server.root / "files" / self.path.removeprefix("/files/"), False

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body):
        path, hub = self.target()
        if not path.is_file():
            self.send_response(404)
            if hub:
                self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = path.read_bytes()
        start = 0
        if self.headers.get("Range"):
            start = int(re.match(r"bytes=(\d+)-", self.headers["Range"])[1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
        self.send_header("X-Repo-Commit", "0" * 40)
        self.end_headers()
        if body:
            part = data[start:start + self.server.cut.pop(str(path), len(data))]
            self.server.served[str(path)] = self.server.served.get(str(path), 0) + len(part)
            self.wfile.write(part)
            self.close_connection = True


@pytest.fixture
def server(tmp_path, monkeypatch):
    """The fake server, standing in for the Hub as HF_ENDPOINT would (set before import)."""
    import huggingface_hub
    fake = FakeServer(tmp_path / "server")
    thread = threading.Thread(target=fake.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", fake.url)
    monkeypatch.setattr(huggingface_hub.file_download, "HUGGINGFACE_CO_URL_TEMPLATE",
                        fake.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    huggingface_hub.utils.reset_sessions()  # sessions made while offline refuse every request
    yield fake
    fake.shutdown()
    huggingface_hub.utils.reset_sessions()


def place(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def parquet_dataset(folder, rows):
    """A folder laid out like sentence-transformers/coco-captions: subset "pair", README configs."""
    (folder / "pair").mkdir(parents=True)
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: pair\n  data_files:\n  - split: train\n"
                                      "    path: pair/train-*\n---\n")
    pq.write_table(pa.table({"caption1": [a for a, _ in rows], "caption2": [b for _, b in rows]}),
                   folder / "pair" / "train-00000-of-00001.parquet")


@pytest.fixture
def world(tiny, tmp_path, server):
    """The tiny mixture, each file somewhere else:
    - paraphrase_pairs: the Hub repo test/etd (exact);
    - stackexchange_title_body/tiny...: the root of the Hub repo test/se (exact, another prefix);
    - nli_triplets: not on the Hub, on the file server (exact at its second location);
    - duplicate_question_sets: only a parquet dataset of its pairs (substitute, converted);
    - msmarco_query_pos_neg: only under another name on the Hub (substitute, a Hub file);
    - reddit/reddit_tiny: nowhere (unavailable)."""
    entries = json.loads((tiny / "data_config.json").read_text())
    data, hub, files = tiny / "data", server.root / "hub", server.root / "files"
    etd = f"hf://datasets/test/etd/"
    place(hub / "test/etd/paraphrase_pairs.jsonl.gz", (data / "paraphrase_pairs.jsonl.gz").read_bytes())
    se = "stackexchange_title_body/tiny.stackexchange.com.jsonl.gz"
    place(hub / "test/se/tiny.stackexchange.com.jsonl.gz", (data / se).read_bytes())
    place(files / "nli_triplets.jsonl.gz", (data / "nli_triplets.jsonl.gz").read_bytes())
    place(hub / "test/etd/msmarco-triplets.jsonl.gz", (data / "msmarco_query_pos_neg.jsonl.gz").read_bytes())
    with gzip.open(data / "duplicate_question_sets.jsonl.gz", "rt") as f:
        pairs = [json.loads(line)["set"][:2] for line in f][:500]
    parquet_dataset(tmp_path / "coco", pairs)
    sources = {
        "paraphrase_pairs.jsonl.gz": {"status": "exact", "locations": [etd + "paraphrase_pairs.jsonl.gz"]},
        se: {"status": "exact", "locations": ["hf://datasets/test/se/tiny.stackexchange.com.jsonl.gz"]},
        "nli_triplets.jsonl.gz": {"status": "exact", "locations": [
            etd + "nli_triplets.jsonl.gz", server.url + "/files/nli_triplets.jsonl.gz"]},
        "duplicate_question_sets.jsonl.gz": {
            "status": "substitute", "locations": [server.url + "/files/duplicate_question_sets.jsonl.gz"],
            "substitute": {"name": "substitutes/pairs.jsonl.gz", "dataset": str(tmp_path / "coco"),
                           "subset": "pair", "lines": len(pairs)}},
        "msmarco_query_pos_neg.jsonl.gz": {
            "status": "substitute", "locations": [],
            "substitute": {"name": "substitutes/msmarco-triplets.jsonl.gz", "location": etd + "msmarco-triplets.jsonl.gz",
                           "lines": None}},
        "reddit/reddit_tiny.jsonl.gz": {"status": "unavailable", "locations": [], "note": "never published"},
    }
    (tmp_path / "sources.json").write_text(json.dumps({"sources": sources}))
    return entries, pairs, [str(tiny / "data_config.json"), str(tmp_path / "DATA"), "--sources",
                            str(tmp_path / "sources.json")]


def run(argv, capsys):
    """download_data.main -> (exit status, stdout, stderr)."""
    import download_data
    try:
        download_data.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def share_row(out, kind):
    """(files, weight %, lines %) of the table's row for kind."""
    files, weight, lines = re.search(rf"^{kind}\s+(\d+)\s+([\d.]+)%\s+([\d.]+)%$", out, re.M).groups()
    return int(files), float(weight), float(lines)


def expected_share(entries, names, key):
    return round(100 * sum(e[key] for e in entries if e["name"] in names) / sum(e[key] for e in entries), 1)


# --------------------------------------------------------------------------------------------
# Each status
# --------------------------------------------------------------------------------------------

EXACT = ["paraphrase_pairs.jsonl.gz", "stackexchange_title_body/tiny.stackexchange.com.jsonl.gz", "nli_triplets.jsonl.gz"]


def test_exact_files_come_from_their_locations_and_the_rest_is_reported(world, tiny, tmp_path, capsys):
    entries, _, argv = world
    code, out, err = run(argv, capsys)
    assert code == 0, err
    for name in EXACT:  # under the config's name, whatever the remote calls it, bytes identical
        assert (tmp_path / "DATA" / name).read_bytes() == (tiny / "data" / name).read_bytes()
    written = json.loads((tmp_path / "DATA" / "data_config.json").read_text())
    assert written == [e for e in entries if e["name"] in EXACT]  # v1's names, lines and weights, v1's order
    assert share_row(out, "exact") == (3, expected_share(entries, EXACT, "weight"), expected_share(entries, EXACT, "lines"))
    assert share_row(out, "substituted") == (0, 0.0, 0.0)
    assert share_row(out, "missing")[0] == 3
    assert "missing reddit/reddit_tiny.jsonl.gz: never published" in out
    assert "missing msmarco_query_pos_neg.jsonl.gz: a substitute exists: rerun with --substitutes" in out
    assert f"python train_script.py {tmp_path / 'DATA' / 'data_config.json'} OUTPUT --data_folder {tmp_path / 'DATA'}" in out
    assert not (tmp_path / "DATA" / "substitutes").exists()


@pytest.mark.slow
def test_substitutes_are_converted_and_the_written_mixture_trains(world, tiny, tmp_path, capsys):
    entries, pairs, argv = world
    code, out, err = run(argv + ["--substitutes"], capsys)
    assert code == 0, err
    with gzip.open(tmp_path / "DATA" / "substitutes" / "pairs.jsonl.gz", "rt") as f:
        assert [json.loads(line) for line in f] == pairs  # the parquet rows, as [a, b] lines
    assert ((tmp_path / "DATA" / "substitutes" / "msmarco-triplets.jsonl.gz").read_bytes()
            == (tiny / "data" / "msmarco_query_pos_neg.jsonl.gz").read_bytes())
    replaced = {"duplicate_question_sets.jsonl.gz": ("substitutes/pairs.jsonl.gz", len(pairs)),
                "msmarco_query_pos_neg.jsonl.gz": ("substitutes/msmarco-triplets.jsonl.gz", 2000)}
    expected = [e if e["name"] in EXACT else
                {"name": replaced[e["name"]][0], "lines": replaced[e["name"]][1], "weight": e["weight"]}
                for e in entries if e["name"] in EXACT or e["name"] in replaced]
    assert json.loads((tmp_path / "DATA" / "data_config.json").read_text()) == expected  # true lines, v1 weights
    substituted = ["duplicate_question_sets.jsonl.gz", "msmarco_query_pos_neg.jsonl.gz"]
    assert share_row(out, "substituted") == (2, expected_share(entries, substituted, "weight"),
                                             expected_share(entries, substituted, "lines"))
    assert share_row(out, "missing") == (1, expected_share(entries, ["reddit/reddit_tiny.jsonl.gz"], "weight"),
                                         expected_share(entries, ["reddit/reddit_tiny.jsonl.gz"], "lines"))
    output = tmp_path / "run"
    train_script.main([str(tmp_path / "DATA" / "data_config.json"), str(output), "--model", str(tiny / "model"),
                       "--data_folder", str(tmp_path / "DATA"), "--steps", "4", "--batch_size", "2",
                       "--max_length", "16", "--warmup_steps", "1", "--save_steps", "1000", "--num_workers", "0"])
    assert (output / "final" / "config.json").exists()
