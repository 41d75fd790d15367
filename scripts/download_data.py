"""Download every file a data config names, resuming where a previous attempt stopped.

    python scripts/download_data.py DATA_CONFIG DATA_FOLDER [--source URL] [--workers N]

The files come from the Hub dataset sentence-transformers/embedding-training-data unless --source
names another fsspec location (gs://bucket/mirror, s3://..., file:///mnt/copy, ...). A file keeps the
sub-folder its name has in the config (reddit/reddit_2015.jsonl.gz -> DATA_FOLDER/reddit/...).

- A file is written to NAME.part and renamed when complete; a later run continues a .part from
  where it stopped (a byte-range read, where the filesystem can seek; otherwise that file restarts).
- A file already as large as the remote one is skipped.
- Every file's rows are counted and compared with the config's "lines". Counts are remembered in
  DATA_FOLDER/.download_manifest.json, so a rerun does not read the whole data again. A file that
  does not decompress is deleted. A row-count mismatch (the file is kept), a missing remote file,
  a corrupt or an unfinished download is reported at the end, and the exit status is 1.
"""

import argparse
import concurrent.futures
import json
import os
import sys
import threading
import zlib

import fsspec
import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train_script import UserError, load_data_config, open_source  # noqa: E402

DEFAULT_SOURCE = "hf://datasets/sentence-transformers/embedding-training-data"
MANIFEST = ".download_manifest.json"
CHUNK = 1 << 20


class CorruptFile(Exception):
    pass


def count_rows(path):
    """Lines of a (gzip'd) JSON-lines file, read as training reads it."""
    rows, last = 0, b"\n"
    try:
        with open_source(path) as f:
            while chunk := f.read(CHUNK):
                rows += chunk.count(b"\n")
                last = chunk[-1:]
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise CorruptFile(f"corrupt or truncated ({e})") from e
    return rows + (last != b"\n")  # a last line without a newline is a row too


def copy_remote(fs, remote, part, offset, bar):
    """Appends remote[offset:] to `part` (the whole file where the remote cannot seek)."""
    with fs.open(remote, "rb") as src:
        if offset:
            try:
                src.seek(offset)
            except (OSError, ValueError):  # io.UnsupportedOperation is both
                bar.write(f"{remote}: cannot resume here (no seek), downloading it again")
                bar.total += offset
                offset = 0
        with open(part, "r+b" if offset else "wb") as dst:
            dst.seek(offset)
            dst.truncate()
            while chunk := src.read(CHUNK):
                dst.write(chunk)
                bar.update(len(chunk))


class Manifest:
    """{name: {"bytes", "rows"}} of the files counted so far, saved after every change."""

    def __init__(self, folder):
        self.path = os.path.join(folder, MANIFEST)
        self.lock = threading.Lock()
        try:
            with open(self.path) as f:
                self.files = json.load(f)
        except (OSError, ValueError):
            self.files = {}

    def rows(self, name, size):
        known = self.files.get(name)
        return known["rows"] if known and known["bytes"] == size else None

    def record(self, name, size, rows):
        with self.lock:
            self.files[name] = {"bytes": size, "rows": rows}
            with open(self.path + ".tmp", "w") as f:
                json.dump(self.files, f, indent=1)
            os.replace(self.path + ".tmp", self.path)


def fetch(entry, fs, root, folder, manifest, bar):
    """Downloads (or resumes, or skips) one file and checks its rows; returns a problem or None."""
    name = entry["name"]
    remote, local = root.rstrip("/") + "/" + name, os.path.join(folder, name)
    try:
        size = fs.size(remote)
        if not (os.path.exists(local) and os.path.getsize(local) == size):
            part = local + ".part"
            os.makedirs(os.path.dirname(local), exist_ok=True)
            offset = os.path.getsize(part) if os.path.exists(part) else 0
            copy_remote(fs, remote, part, offset if offset <= size else 0, bar)
            if os.path.getsize(part) != size:
                return f"{name}: got {os.path.getsize(part):,} bytes of {size:,}; rerun to resume"
            os.replace(part, local)
        rows = manifest.rows(name, size)
        if rows is None:
            rows = count_rows(local)
            manifest.record(name, size, rows)
    except CorruptFile as e:  # e.g. a .part continued from bytes that were not the remote's
        os.remove(local)
        return f"{name}: {e}; deleted it, rerun to download it again"
    except FileNotFoundError:
        return f"{name}: not found at {remote}"
    except OSError as e:  # network and disk errors: the .part stays for the next run
        return f"{name}: {e}"
    if "lines" in entry and rows != entry["lines"]:
        return f"{name}: {rows:,} rows, but the config says \"lines\": {entry['lines']:,}"
    return None


def bytes_to_fetch(fs, root, folder, entries):
    """Bytes not yet on disk, for the progress bar (0 for files whose size cannot be read)."""
    total = 0
    for entry in entries:
        local = os.path.join(folder, entry["name"])
        try:
            size = fs.size(root.rstrip("/") + "/" + entry["name"])
        except OSError:
            continue
        if not (os.path.exists(local) and os.path.getsize(local) == size):
            total += size - (os.path.getsize(local + ".part") if os.path.exists(local + ".part") else 0)
    return max(total, 0)


def download(config, folder, source=DEFAULT_SOURCE, workers=4):
    """Fetches every file of the config into folder; returns the list of problems."""
    entries = load_data_config(config)
    fs, root = fsspec.core.url_to_fs(source)
    os.makedirs(folder, exist_ok=True)
    manifest = Manifest(folder)
    with tqdm.tqdm(total=bytes_to_fetch(fs, root, folder, entries), unit="B", unit_scale=True,
                   unit_divisor=1024, desc="download", dynamic_ncols=True) as bar:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            problems = [p for p in pool.map(lambda e: fetch(e, fs, root, folder, manifest, bar), entries) if p]
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data_config", help="the data config whose files to fetch (e.g. data_config.json)")
    p.add_argument("data_folder", help="where to put them (train with --data_folder DATA_FOLDER)")
    p.add_argument("--source", default=DEFAULT_SOURCE, help="fsspec URL of the folder holding the files")
    p.add_argument("--workers", type=int, default=4, help="files downloaded at the same time")
    args = p.parse_args(argv)
    if args.workers < 1:
        sys.exit(f"error: --workers must be at least 1, got {args.workers}")
    try:
        problems = download(args.data_config, args.data_folder, args.source, args.workers)
    except UserError as e:
        sys.exit(f"error: {e}")
    if problems:
        print(f"{len(problems)} problem(s):", *problems, sep="\n  ", file=sys.stderr)
        sys.exit(1)
    print(f"all files of {args.data_config} are in {args.data_folder} with the expected rows")


if __name__ == "__main__":
    main()
