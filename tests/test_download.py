"""scripts/download_data.py and data_sources.json, offline: a loopback HTTP server plays the Hub
(huggingface_hub's resolve endpoint) and the 2021 file server; a local folder laid out like a Hub
parquet dataset plays the substitute; --source tests read a file:// mirror."""
import errno
import hashlib
import http.server
import json
import os
import re
import shutil
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import train_script
from conftest import ROOT, TINY_STEP, read_source, tiny_argv, write_config


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
    etd = "hf://datasets/test/etd/"
    place(hub / "test/etd/paraphrase_pairs.jsonl.gz", (data / "paraphrase_pairs.jsonl.gz").read_bytes())
    se = "stackexchange_title_body/tiny.stackexchange.com.jsonl.gz"
    place(hub / "test/se/tiny.stackexchange.com.jsonl.gz", (data / se).read_bytes())
    place(files / "nli_triplets.jsonl.gz", (data / "nli_triplets.jsonl.gz").read_bytes())
    place(hub / "test/etd/msmarco-triplets.jsonl.gz", (data / "msmarco_query_pos_neg.jsonl.gz").read_bytes())
    pairs = [row["set"][:2] for row in read_source(data / "duplicate_question_sets.jsonl.gz", 500)]
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
    return entries, pairs, [str(tiny / "data_config.json"), str(tmp_path / "DATA"), "--data_sources",
                            str(tmp_path / "sources.json")]


def run(argv, capsys):
    """download_data.main -> (exit status, stdout, stderr), as the shell would see them."""
    import download_data
    code, message = 0, ""
    try:
        download_data.main(argv)
    except SystemExit as e:
        code, message = (e.code, "") if isinstance(e.code, int) else (1, f"{e.code}\n")  # sys.exit("...")
    out, err = capsys.readouterr()
    return code, out, err + message


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


def test_substitutes_are_converted_and_the_written_mixture_trains(world, tiny, tmp_path, capsys):
    entries, pairs, argv = world
    code, out, err = run(argv + ["--substitutes"], capsys)
    assert code == 0, err
    assert read_source(tmp_path / "DATA" / "substitutes" / "pairs.jsonl.gz") == pairs  # the parquet rows, as [a, b]
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
    train_script.main(tiny_argv(tiny, output, "--steps", "4", *TINY_STEP, "--warmup_steps", "1", "--save_steps", "1000",
                                config=tmp_path / "DATA" / "data_config.json", data=tmp_path / "DATA"))
    assert (output / "final" / "config.json").exists()


# --------------------------------------------------------------------------------------------
# No network, interruptions, corrupt parts
# --------------------------------------------------------------------------------------------

def closed_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_no_network_is_one_line_within_seconds(world, server, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    _, _, argv = world
    dead = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", dead)
    sources = (tmp_path / "sources.json").read_text()
    (tmp_path / "sources.json").write_text(sources.replace(server.url, dead))  # both servers gone
    start = time.monotonic()
    code, out, err = run(argv + ["--substitutes"], capsys)
    assert time.monotonic() - start < 5
    assert code == 1 and out == ""
    assert err == f"error: cannot reach {dead} (ConnectionError: [Errno 111] Connection refused); check the " \
                  "network, or use --source for a copy\n"
    assert not (tmp_path / "DATA").exists()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # offline, the other server up
    (tmp_path / "sources.json").write_text(sources)
    code, out, err = run(argv, capsys)
    assert (code, err) == (1, "error: cannot reach https://huggingface.co (HF_HUB_OFFLINE is set); check the "
                              "network, or use --source for a copy\n")


def test_an_unreachable_second_server_skips_its_files_only(world, tmp_path, capsys):
    _, _, argv = world
    sources = json.loads((tmp_path / "sources.json").read_text())
    dead = f"http://127.0.0.1:{closed_port()}"
    sources["sources"]["nli_triplets.jsonl.gz"]["locations"][1] = dead + "/files/nli_triplets.jsonl.gz"
    (tmp_path / "sources.json").write_text(json.dumps(sources))
    code, out, err = run(argv, capsys)
    assert code == 0 and err.startswith(f"{dead} does not answer (ConnectionError")
    assert re.search(rf"missing nli_triplets.jsonl.gz: not found at hf://\S+; {dead} unreachable", out)
    assert share_row(out, "exact")[0] == 2


def hub_path(server, repo_path):
    return str(server.root / "hub" / repo_path)


@pytest.fixture
def small_chunks(monkeypatch):
    """huggingface_hub writes what it received in chunks (10 MB by default); the fixture's files are smaller."""
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 4096)


def interrupt(server, argv, capsys, tmp_path):
    """A first run whose download of paraphrase_pairs breaks off; returns the remote and the partial file."""
    remote = hub_path(server, "test/etd/paraphrase_pairs.jsonl.gz")
    server.cut[remote] = 5 * 4096
    code, out, err = run(argv, capsys)
    assert code == 1 and "paraphrase_pairs.jsonl.gz: ChunkedEncodingError: ('Connection broken" in err
    assert "rerun to resume" in err
    assert "paraphrase_pairs.jsonl.gz" not in (tmp_path / "DATA" / "data_config.json").read_text()
    [part] = (tmp_path / "DATA").rglob("*.incomplete")  # huggingface_hub's partial file
    assert part.stat().st_size == 5 * 4096
    server.served.clear()
    return remote, part


def test_an_interrupted_hub_download_resumes(world, server, small_chunks, tmp_path, capsys):
    _, _, argv = world
    remote, part = interrupt(server, argv, capsys, tmp_path)
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert server.served == {remote: os.path.getsize(remote) - 5 * 4096}  # only the missing bytes, nothing else
    assert (tmp_path / "DATA" / "paraphrase_pairs.jsonl.gz").read_bytes() == open(remote, "rb").read()
    assert share_row(out, "exact")[0] == 3


def test_a_corrupt_partial_hub_download_is_fetched_again(world, server, small_chunks, tmp_path, capsys):
    _, _, argv = world
    remote, part = interrupt(server, argv, capsys, tmp_path)
    part.write_bytes(b"\0" * part.stat().st_size)  # not the remote's bytes
    code, out, err = run(argv, capsys)
    assert code == 0, err
    size = os.path.getsize(remote)
    assert server.served == {remote: (size - 5 * 4096) + size}  # the resumed rest, then the whole file again
    assert (tmp_path / "DATA" / "paraphrase_pairs.jsonl.gz").read_bytes() == open(remote, "rb").read()


# --------------------------------------------------------------------------------------------
# --source: a mirror holding every file under the config's names (fsspec)
# --------------------------------------------------------------------------------------------

@pytest.fixture
def mirror(tiny, tmp_path):
    shutil.copytree(tiny / "data", tmp_path / "mirror")
    return tmp_path / "mirror", json.loads((tiny / "data_config.json").read_text())


def test_a_mirror_serves_every_file_and_a_row_mismatch_is_reported(mirror, tmp_path, capsys):
    folder, entries = mirror
    entries[1]["lines"] += 1  # the config disagrees with the file
    config = write_config(tmp_path / "config.json", entries)
    argv = [str(config), str(tmp_path / "data"), "--source", f"file://{folder}"]
    code, out, err = run(argv, capsys)
    name = entries[1]["name"]
    assert code == 1
    assert f"{name} (from file://{folder}/{name}): {entries[1]['lines'] - 1:,} rows, but {entries[1]['lines']:,} " \
           "were expected" in err
    for entry in entries:  # sub-folders kept, bytes identical, the mismatching file kept too
        assert (tmp_path / "data" / entry["name"]).read_bytes() == (folder / entry["name"]).read_bytes()
    assert [e["name"] for e in json.loads((tmp_path / "data" / "data_config.json").read_text())] == \
        [e["name"] for e in entries if e["name"] != name]
    code, _, err = run(argv, capsys)  # a rerun still reports it, from the manifest
    assert code == 1 and name in err


def test_an_interrupted_mirror_download_resumes_and_complete_files_are_skipped(mirror, tmp_path, capsys,
                                                                                 monkeypatch):
    """A "remote" that breaks off after 20000 bytes of one file: the rerun reads only the rest."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem
    import download_data
    folder, entries = mirror
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
    monkeypatch.setattr(download_data, "CHUNK", 4096)
    argv = [str(write_config(tmp_path / "config.json", entries)), str(tmp_path / "data"), "--source",
            f"flaky://{folder}"]
    code, _, err = run(argv, capsys)
    assert code == 1 and "connection reset" in err
    part = tmp_path / "data" / (entries[0]["name"] + ".part")
    assert part.stat().st_size == 20_000 and not (tmp_path / "data" / entries[0]["name"]).exists()
    Flaky.bytes_read.clear()
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert Flaky.bytes_read == {broken: os.path.getsize(broken) - 20_000}  # only the missing bytes; the others skipped
    assert (tmp_path / "data" / entries[0]["name"]).read_bytes() == open(broken, "rb").read()
    assert not part.exists()


def test_a_corrupt_mirror_part_is_fetched_again(mirror, tmp_path, capsys):
    folder, entries = mirror
    local = tmp_path / "data" / entries[0]["name"]
    place(local.parent / (local.name + ".part"), b"\0" * 5000)  # not the remote's bytes
    code, _, err = run([str(write_config(tmp_path / "c.json", entries[:1])), str(tmp_path / "data"),
                        "--source", f"file://{folder}"], capsys)
    assert code == 0, err
    assert local.read_bytes() == (folder / entries[0]["name"]).read_bytes()


# --------------------------------------------------------------------------------------------
# data_sources.json against the reference
# --------------------------------------------------------------------------------------------

def test_data_sources_cover_the_v1_mixture_as_the_reference_counts_it():
    """The reference's shares (hub_data/README.md, "Main finding"), from our data_sources.json."""
    import download_data
    entries = train_script.load_data_config(os.path.join(ROOT, "data_config.json"))
    plans = download_data.plan_downloads(entries, download_data.DEFAULT_SOURCES)  # checks every location
    status = json.load(open(download_data.DEFAULT_SOURCES))["sources"]
    assert set(status) == {e["name"] for e in entries}
    groups = {"exact": [], "substitute": [], "unavailable": []}
    for entry in entries:
        groups[status[entry["name"]]["status"]].append(entry["name"])
    etd = [p.entry["name"] for p in plans
           if p.locations and p.locations[0].startswith("hf://datasets/sentence-transformers/embedding-training-data/")]
    shares = {k: (len(v), expected_share(entries, v, "weight"), expected_share(entries, v, "lines"))
              for k, v in groups.items()}
    # 20 exact ETD files 47.1 % / 10.3 %, + 91 Stack Exchange files 19.4 % / 2.3 %; 8 others 23.6 % / 22.9 %;
    # reddit 9.8 % / 64.6 %
    assert (len(etd), expected_share(entries, etd, "weight"), expected_share(entries, etd, "lines")) == (20, 47.1, 10.3)
    assert shares["exact"][0] == 111 and abs(shares["exact"][1] - (47.1 + 19.4)) <= 0.1
    assert shares["substitute"] == (8, 23.6, 22.9)
    assert shares["unavailable"] == (4, 9.8, 64.6)
    assert all(p.substitute for p in plans if status[p.entry["name"]]["status"] == "substitute")
    assert all(p.entry["name"].startswith("reddit/") for p in plans if not p.locations and not p.substitute)


# --------------------------------------------------------------------------------------------
# DATA/data_config.json kept whole; a disk, a folder or a --source that cannot serve: one line
# --------------------------------------------------------------------------------------------

def test_a_rerun_keeps_the_entries_it_did_not_write(world, tiny, tmp_path, capsys):
    """README's Reddit step: the user adds the rebuilt file and its entry; the rerun README recommends keeps it."""
    _, _, argv = world
    assert run(argv, capsys)[0] == 0
    config = tmp_path / "DATA" / "data_config.json"
    written = json.loads(config.read_text())
    (tmp_path / "DATA" / "reddit").mkdir()
    shutil.copy(tiny / "data" / "reddit" / "reddit_tiny.jsonl.gz", tmp_path / "DATA" / "reddit")
    added = [{"name": "reddit/reddit_tiny.jsonl.gz", "lines": 2000, "weight": 82},
             {"name": "my_pairs.jsonl.gz", "lines": 5, "weight": 1}]
    config.write_text(json.dumps(written[:1] + added + written[1:]))  # anywhere in the file
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert json.loads(config.read_text()) == written + added
    assert f"kept the entries of {config} for files this script did not fetch: reddit/reddit_tiny.jsonl.gz, " \
           "my_pairs.jsonl.gz" in out


def test_a_full_disk_is_one_line_and_leaves_the_mixture_as_it_was(mirror, tmp_path, capsys, monkeypatch):
    import download_data
    folder, entries = mirror
    argv = [str(write_config(tmp_path / "config.json", entries)), str(tmp_path / "data"),
            "--source", f"file://{folder}"]
    assert run(argv, capsys)[0] == 0
    config = tmp_path / "data" / "data_config.json"
    before = config.read_bytes()

    def disk_full(fd):  # the kernel's answer when the new file's blocks find no room
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(download_data.os, "fsync", disk_full)
    code, out, err = run(argv, capsys)
    assert (code, err) == (1, f"error: cannot write {config} (No space left on device); the earlier one is unchanged\n")
    assert config.read_bytes() == before and not (tmp_path / "data" / "data_config.json.tmp").exists()
    monkeypatch.undo()

    (tmp_path / "data" / entries[0]["name"]).unlink()  # the disk fills while a file is fetched
    fetch = download_data.fetch_fsspec

    def fills_the_disk(url, local):
        fetch(url, local + ".part")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), local + ".part")

    monkeypatch.setattr(download_data, "fetch_fsspec", fills_the_disk)
    code, out, err = run(argv + ["--workers", "1"], capsys)
    assert code == 1 and "rerun to resume" not in err
    assert err.split("\r")[-1] == (f"error: {tmp_path / 'data'}: no space left on the disk (writing "
                                   f"{entries[0]['name']}); free some and rerun: what is fetched so far is kept\n")
    assert config.read_bytes() == before


def test_a_data_folder_it_cannot_create_is_one_line(mirror, tmp_path, capsys):
    folder, entries = mirror
    (tmp_path / "a_file").write_text("not a folder")
    code, out, err = run([str(write_config(tmp_path / "config.json", entries)), str(tmp_path / "a_file" / "DATA"),
                          "--source", f"file://{folder}"], capsys)
    assert (code, out, err) == (1, "", f"error: cannot create {tmp_path / 'a_file' / 'DATA'} (Not a directory)\n")


@pytest.mark.parametrize("source, reason", [("nosuch://bucket/data", r"ValueError: Protocol not known: nosuch"),
                                            ("missing", r"no such folder")])
def test_a_bogus_source_is_one_line_before_any_file(mirror, tmp_path, capsys, source, reason):
    _, entries = mirror
    source = str(tmp_path / source) if source == "missing" else source
    code, out, err = run([str(write_config(tmp_path / "config.json", entries)), str(tmp_path / "data"),
                          "--source", source], capsys)
    assert code == 1 and re.fullmatch(rf"error: --source {re.escape(source)}: {reason}\n", err), err
    assert not (tmp_path / "data").exists()
