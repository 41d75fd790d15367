"""Fetch the files of a data config from where each one lives today, and write the mixture on disk.

    python scripts/download_data.py data_config.json DATA [--substitutes] [--workers N]
    python train_script.py DATA/data_config.json OUTPUT --data_folder DATA

data_sources.json (beside data_config.json) lists, for every file of the v1 mixture, the locations
that hold the exact file, tried in order (its Hub repo, then the 2021 server path where one is
known), and for the 8 files that exist today only in another form, a substitute. Each file is
written under the config's name (stackexchange_title_body/cs.stackexchange.com.jsonl.gz lands in
DATA/stackexchange_title_body/ whatever the repo calls it); with --substitutes the substitutes are
written under their own names (DATA/substitutes/...). --source URL reads every file from one fsspec
location instead (a mirror: gs://bucket/data, file:///mnt/copy, ...), under the same names.

- Hub files come through huggingface_hub (hf_hub_download: resumes an interrupted file, honours
  HF_ENDPOINT and HF_TOKEN); other locations through fsspec, into NAME.part, continued by a
  byte-range read. A parquet substitute is read with `datasets` and written as JSON lines.
- Every file's rows are counted and compared with the config's "lines" (a substitute's with its
  known count); counts are remembered in DATA/.download_manifest.json. A file that does not
  decompress (say, a resumed part that was not the remote's bytes) is fetched once more from scratch.
- At the end DATA/data_config.json is the mixture on disk: the exact files with their v1 weights,
  substitutes with the weight of the file they replace and their true "lines"; files that could not
  be had are left out. A table says how much of v1's weight and lines that is. Entries of an earlier
  DATA/data_config.json for files this script never fetched (the Reddit files a user adds) are kept;
  the file is replaced whole or not at all.
- The hosts (and --source) are probed first: with no network the script stops within seconds with
  one line; so does a full disk, or a folder it cannot create.
  Exit status 1 when anything went wrong (a mismatch, a failed download); a file that is simply
  unavailable (the Reddit files, never published) is reported, not an error.
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import errno
import gzip
import json
import os
import re
import sys
import threading
import urllib.parse
import zlib

import fsspec
import huggingface_hub
import requests
import tqdm
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for train_script; scripts/ is on the path already (run from it, or by the tests)
from train_script import UserError, load_data_config, open_source  # noqa: E402

DEFAULT_SOURCES = os.path.join(ROOT, "data_sources.json")
HUB_PREFIX = "hf://datasets/"
MANIFEST = ".download_manifest.json"
CHUNK = 1 << 20
PROBE_SECONDS = 10


class CorruptFile(Exception):
    pass


class NotThere(Exception):
    """The location does not hold the file: try the next one."""


# --------------------------------------------------------------------------------------------
# Where each file is: data_sources.json
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    """How to get one entry of the config."""
    entry: dict
    locations: list         # URLs of the exact file, in the order to try them
    substitute: dict        # or None: {"name", "location" | "dataset"/"subset"/"split", "lines"}
    note: str = ""          # data_sources.json's word on it


def hub_file(url):
    """hf://datasets/OWNER/NAME/PATH -> ("OWNER/NAME", "PATH")."""
    owner, name, path = url[len(HUB_PREFIX):].split("/", 2)
    return f"{owner}/{name}", path


def check_location(url, name, where):
    """hf_hub_download writes local_dir/PATH, so the local name must end with the repo path."""
    if url.startswith(HUB_PREFIX) and not ("/" + name).endswith("/" + hub_file(url)[1]):
        raise UserError(f"{where}: {url} cannot be written as {name} (the name must end with the file's "
                        "path in the repo)")


def plan_downloads(entries, sources_path, source=None):
    """One Plan per config entry: data_sources.json's locations, or the --source mirror's."""
    if source is not None:
        url = source.rstrip("/") + "/"
    try:
        with open(sources_path) as f:
            sources = json.load(f)["sources"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{sources_path}: cannot read it as a data sources file ({e})")
    plans = []
    for entry in entries:
        known = sources.get(entry["name"])
        if known is None and source is None:
            raise UserError(f"{sources_path}: no entry for {entry['name']} (add its locations, or use --source)")
        known = known or {}
        substitute = known.get("substitute")
        if source is not None:
            locations = [url + entry["name"]]
            if substitute:
                substitute = {"name": substitute["name"], "location": url + substitute["name"],
                              "lines": substitute.get("lines")}
        else:
            locations = known.get("locations", [])
        where = f"{sources_path}, {entry['name']}"
        for location in locations:
            check_location(location, entry["name"], where)
        if substitute and "location" in substitute:
            check_location(substitute["location"], substitute["name"], where)
        plans.append(Plan(entry, locations, substitute, known.get("note", "")))
    return plans


# --------------------------------------------------------------------------------------------
# Before anything: is the network there?
# --------------------------------------------------------------------------------------------

def host_of(url):
    """The http(s) server a location is read from, or None (a bucket, a local path)."""
    if url.startswith(HUB_PREFIX):
        return huggingface_hub.constants.ENDPOINT
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme in ("http", "https") else None


def probe(host):
    """None if the host answers at all (any HTTP status), else the reason it does not."""
    try:
        requests.head(host, timeout=PROBE_SECONDS, allow_redirects=False)
    except requests.RequestException as e:
        reason = re.search(r"\[Errno -?\d+\] [^'\")]*", str(e))  # the operating system's reason, if any
        return f"{type(e).__name__}: {reason[0] if reason else str(e)[:120]}"
    return None


def unreachable_hosts(plans, substitutes):
    """{host: reason} of the servers that do not answer. The Hub down (it holds nearly all files), or
    every server down, is one clear error."""
    urls = [url for plan in plans for url in plan.locations]
    if substitutes:  # a parquet dataset is read from the Hub
        urls += [plan.substitute.get("location", HUB_PREFIX) for plan in plans if plan.substitute]
    hosts = sorted({h for h in map(host_of, urls) if h})
    hub = huggingface_hub.constants.ENDPOINT
    if hub in hosts and huggingface_hub.constants.HF_HUB_OFFLINE:
        raise UserError(f"cannot reach {hub} (HF_HUB_OFFLINE is set); check the network, or use --source for a copy")
    with concurrent.futures.ThreadPoolExecutor(max(len(hosts), 1)) as pool:
        down = {h: reason for h, reason in zip(hosts, pool.map(probe, hosts)) if reason}
    if hub in down or (hosts and len(down) == len(hosts)):
        host = hub if hub in down else hosts[0]
        reason = down[host]
        raise UserError(f"cannot reach {host} ({reason}); check the network, or use --source for a copy")
    return down


# --------------------------------------------------------------------------------------------
# Fetching one file
# --------------------------------------------------------------------------------------------

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


class Manifest:
    """{name: {"bytes", "mtime", "rows"}} of the files counted so far, saved after every change."""

    def __init__(self, folder):
        self.path = os.path.join(folder, MANIFEST)
        self.lock = threading.Lock()
        try:
            with open(self.path) as f:
                self.files = json.load(f)
        except (OSError, ValueError):
            self.files = {}

    def rows(self, name, local):
        """The file's rows, counted once per version of the file."""
        stat = os.stat(local)
        known = self.files.get(name)
        if known and (known["bytes"], known.get("mtime")) == (stat.st_size, stat.st_mtime_ns):
            return known["rows"]
        rows = count_rows(local)
        with self.lock:
            self.files[name] = {"bytes": stat.st_size, "mtime": stat.st_mtime_ns, "rows": rows}
            with open(self.path + ".tmp", "w") as f:
                json.dump(self.files, f, indent=1)
            os.replace(self.path + ".tmp", self.path)
        return rows


def fetch_hub(url, local):
    """huggingface_hub's download into the data folder: it resumes its own .incomplete file, and
    skips a file whose recorded etag still matches the Hub's."""
    repo, path = hub_file(url)
    try:
        huggingface_hub.hf_hub_download(repo, path, repo_type="dataset", local_dir=local[:len(local) - len(path)])
    except (EntryNotFoundError, RepositoryNotFoundError) as e:
        raise NotThere(f"not found at {url}") from e


def fetch_fsspec(url, local):
    """Copies url to local through local.part, continuing a part left by an earlier run."""
    fs, remote = fsspec.core.url_to_fs(url)
    try:
        size = fs.size(remote)
    except FileNotFoundError as e:
        raise NotThere(f"not found at {url}") from e
    if os.path.exists(local) and os.path.getsize(local) == size:
        return
    part = local + ".part"
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    with fs.open(remote, "rb") as src:
        if 0 < offset <= size:
            try:
                src.seek(offset)
            except (OSError, ValueError):  # io.UnsupportedOperation is both: restart this file
                offset = 0
        else:
            offset = 0
        with open(part, "r+b" if offset else "wb") as dst, \
                tqdm.tqdm(desc=os.path.basename(local), total=size, initial=offset, unit="B", unit_scale=True,
                          unit_divisor=1024, leave=False) as bar:
            dst.seek(offset)
            dst.truncate()
            while chunk := src.read(CHUNK):
                dst.write(chunk)
                bar.update(len(chunk))
    if os.path.getsize(part) != size:
        raise OSError(f"got {os.path.getsize(part):,} bytes of {size:,} from {url}; rerun to resume")
    os.replace(part, local)


def convert_dataset(spec, local):
    """A parquet Hub dataset -> local, one JSON list of the row's columns per line (the pair format
    train_script reads). Streamed: the dataset is never whole in memory or on disk."""
    import datasets  # only --substitutes needs it, and it takes seconds to import
    if os.path.exists(local):
        return
    rows = datasets.load_dataset(spec["dataset"], spec.get("subset"), split=spec.get("split", "train"),
                                 streaming=True)
    with gzip.open(local + ".part", "wt", encoding="utf-8", compresslevel=6) as f:
        for batch in rows.iter(batch_size=10_000):
            f.writelines(json.dumps(list(row), ensure_ascii=False) + "\n" for row in zip(*batch.values()))
    os.replace(local + ".part", local)


def fetch_and_count(fetch, what, folder, name, manifest):
    """Fetches `what` into folder/name and returns its rows; a file that does not decompress is
    deleted and fetched once more (a fresh download: its partial file went with it)."""
    local = os.path.join(folder, name)
    make_folder(os.path.dirname(local))
    for attempt in range(2):
        fetch(what, local)
        try:
            return manifest.rows(name, local)
        except CorruptFile:
            os.remove(local)
            if attempt:
                raise


def fetcher(url):
    return fetch_hub if url.startswith(HUB_PREFIX) else fetch_fsspec


@dataclasses.dataclass
class Outcome:
    kind: str               # "exact", "substituted" or "missing"
    entry: dict             # the v1 entry
    name: str = None        # the file on disk
    lines: int = None
    why: str = ""           # for "missing"
    problems: list = dataclasses.field(default_factory=list)


def obtain(plan, folder, manifest, down, substitutes):
    """Tries the exact file's locations in order, then (with --substitutes) the substitute."""
    name, problems = plan.entry["name"], []

    def attempt(fetch, what, local_name, expected):
        try:
            rows = fetch_and_count(fetch, what, folder, local_name, manifest)
        except NotThere as e:
            return None, str(e)
        except CorruptFile as e:
            problems.append(f"{local_name}: {e}")
            return None, str(e)
        except UserError:
            raise
        except Exception as e:  # a network or disk error, one line per file; the partial file stays
            if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):  # for every file alike: stop at once
                raise UserError(f"{folder}: no space left on the disk (writing {local_name}); free some and "
                                "rerun: what is fetched so far is kept") from None
            problems.append(f"{local_name}: {type(e).__name__}: {(str(e) or '?').splitlines()[0]}; rerun to resume")
            return None, "download failed"
        if expected is not None and rows != expected:
            problems.append(f"{local_name} (from {what}): {rows:,} rows, but {expected:,} were expected")
            return None, "row-count mismatch"
        return rows, ""

    reasons = []
    for url in plan.locations:
        if host_of(url) in down:
            reasons.append(f"{host_of(url)} unreachable")
            continue
        rows, reason = attempt(fetcher(url), url, name, plan.entry.get("lines"))
        if rows is not None:
            return Outcome("exact", plan.entry, name, rows, problems=problems)
        reasons.append(reason)
    sub = plan.substitute if substitutes else None
    if plan.substitute and not substitutes:
        reasons.append("a substitute exists: rerun with --substitutes")
    if sub:
        fetch, what = (fetcher(sub["location"]), sub["location"]) if "location" in sub else (convert_dataset, sub)
        if host_of(sub.get("location", HUB_PREFIX)) in down:
            reasons.append("substitute's host unreachable")
        else:
            rows, reason = attempt(fetch, what, sub["name"], sub.get("lines"))
            if rows is not None:
                return Outcome("substituted", plan.entry, sub["name"], rows, problems=problems)
            reasons.append(f"substitute: {reason}")
    why = "; ".join(reasons) if reasons else plan.note or "no known location"
    return Outcome("missing", plan.entry, why=why, problems=problems)


# --------------------------------------------------------------------------------------------
# The mixture on disk
# --------------------------------------------------------------------------------------------

def mixture_on_disk(outcomes):
    """The data config of what was fetched: v1's weights; each file's own name and true lines."""
    return [{"name": o.name, "lines": o.lines, "weight": o.entry["weight"]} for o in outcomes if o.kind != "missing"]


def write_mixture(path, mixture, earlier, folder):
    """DATA/data_config.json: the mixture fetched, then the entries of the earlier one (`earlier`) for
    files this script never fetched (not in its manifest), which it returns. Written to a temporary
    file and renamed: the file is replaced whole or not at all."""
    fetched = set(Manifest(folder).files) | {entry["name"] for entry in mixture}
    kept = [entry for entry in earlier if entry["name"] not in fetched]
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(mixture + kept, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise UserError(f"cannot write {path} ({e.strerror or e}); "
                        + ("the earlier one is unchanged" if earlier else "rerun once the disk has room")) from None
    return kept


def summary(outcomes, config_out, folder):
    """The table: how much of v1 is on disk, exactly or substituted, and what is missing."""
    weight = sum(o.entry["weight"] for o in outcomes)
    lines = sum(o.entry.get("lines", 0) for o in outcomes)
    out = [f"{'share of the config':<20}{'files':>7}{'weight':>10}{'lines':>10}"]
    for kind in ("exact", "substituted", "missing"):
        part = [o for o in outcomes if o.kind == kind]
        w, n = sum(o.entry["weight"] for o in part), sum(o.entry.get("lines", 0) for o in part)
        out.append(f"{kind:<20}{len(part):>7}{100 * w / weight:>9.1f}%{100 * n / max(lines, 1):>9.1f}%")
    for o in outcomes:
        if o.kind == "missing":
            out.append(f"  missing {o.entry['name']}: {o.why}")
    if any(o.kind != "missing" for o in outcomes):
        out.append(f"wrote {config_out}; train on it with:")
        out.append(f"  python train_script.py {config_out} OUTPUT --data_folder {folder}")
    return "\n".join(out)


def check_source(source):
    """--source, before any file: a protocol fsspec knows (its package installed) and a folder there
    (an http(s) server, which lists no folders, is probed with the other hosts)."""
    try:
        fs, path = fsspec.core.url_to_fs(source)
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        found = bool(protocols & {"http", "https"}) or fs.isdir(path)
    except Exception as e:  # an unknown protocol, a missing package, no access
        raise UserError(f"--source {source}: {type(e).__name__}: {(str(e) or '?').splitlines()[0]}") from None
    if not found:
        raise UserError(f"--source {source}: no such folder")


def make_folder(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {path} ({e.strerror or e})") from None


def download(config, folder, sources=DEFAULT_SOURCES, source=None, substitutes=False, workers=4):
    """Fetches what can be had of the config into folder; returns the outcome of every entry."""
    plans = plan_downloads(load_data_config(config), sources, source)
    if source is not None:
        check_source(source)
    down = unreachable_hosts(plans, substitutes)
    for host, reason in down.items():
        print(f"{host} does not answer ({reason}): its files are skipped", file=sys.stderr)
    make_folder(folder)
    manifest = Manifest(folder)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda plan: obtain(plan, folder, manifest, down, substitutes), plans))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data_config", help="the data config whose files to fetch (e.g. data_config.json)")
    p.add_argument("data_folder", help="where to put them; DATA_FOLDER/data_config.json is the mixture fetched")
    p.add_argument("--substitutes", action="store_true",
                   help="where the exact file is not to be had, fetch the substitute data_sources.json names")
    p.add_argument("--data_sources", default=DEFAULT_SOURCES, help="where each file lives (see data_sources.json)")
    p.add_argument("--source", help="fsspec URL of a mirror holding every file under the config's names; "
                                    "replaces the locations of --data_sources")
    p.add_argument("--workers", type=int, default=4, help="files fetched at the same time")
    args = p.parse_args(argv)
    if args.workers < 1:
        sys.exit(f"error: --workers must be at least 1, got {args.workers}")
    config_out = os.path.join(args.data_folder, "data_config.json")
    try:
        if os.path.abspath(args.data_config) == os.path.abspath(config_out):
            raise UserError(f"{config_out} is where the fetched mixture is written; give the original config")
        earlier = load_data_config(config_out) if os.path.exists(config_out) else []  # a broken one: said first
        outcomes = download(args.data_config, args.data_folder, args.data_sources, args.source, args.substitutes,
                            args.workers)
        mixture = mixture_on_disk(outcomes)
        kept = write_mixture(config_out, mixture, earlier, args.data_folder) if mixture else []
    except UserError as e:
        sys.exit(f"error: {e}")
    print(summary(outcomes, config_out, args.data_folder))
    if kept:
        print(f"kept the entries of {config_out} for files this script did not fetch: "
              + ", ".join(entry["name"] for entry in kept))
    problems = [problem for o in outcomes for problem in o.problems] + ["no file could be had"] * (not mixture)
    if problems:
        print(f"{len(problems)} problem(s):", *problems, sep="\n  ", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
