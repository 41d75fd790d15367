"""Rebuild v1's Reddit files (reddit/reddit_2015...2018.jsonl.gz) from the public comment dumps.

    python scripts/build_reddit.py DUMPS DATA [--years 2015-2018] [--passes 1] [Beam pipeline options]

DUMPS is a folder, a glob or one file, on any filesystem Beam reads (local, gs://, s3://, ...):
the monthly Pushshift-format dumps RC_YYYY-MM.zst, or JSON lines plain, .gz or .bz2, one comment
a line. An Apache Beam pipeline makes (context, response) pairs by the rules of PolyAI's
conversational-datasets (reddit/create_data.py), which built v1's files:

- a thread is the comments with one link_id (ids compared without their t1_/t3_ prefix) and a year;
- every reply whose parent is a comment of its thread, reached from the thread's top along the
  replies (so a cycle of replies and what hangs below it gives nothing), gives one pair, kept when
  both texts are: a text is dropped when it is [deleted] or [removed], shorter than 9 or longer than
  127 characters (Unicode code points);
- the pairs of a year are written in a fixed pseudo-random order (a hash of the thread chooses one
  of 256 parts of the file, a hash of the reply its place there), so a file read in order, as
  train_script.py reads Reddit, mixes threads.

It writes DATA/reddit/reddit_YYYY.jsonl.gz, one {"context": <parent>, "response": <reply>} a line,
each under a temporary name until whole, adds the years written to DATA/data_config.json (v1's
weight, the true lines; the other entries kept) and prints the comments read, what was dropped and
why, and each year's pairs against v1's. Beam's own options choose where it runs: by default the
local runner on every core (--direct_num_workers N for fewer); --runner DataflowRunner --project P
--region R --temp_location gs://... for Dataflow (or Flink, Spark, Prism). The local runner holds all
the comments in RAM at once (~0.45 KB each): --passes K runs the pipeline K times, each in a process
of its own on a K-th of the threads, reading the dumps each time, for a K-th of that (the same
files). Exit status 2 for a bad command line or no dumps; 1 for a failed run (no file written) or a
damaged dump (its lines before the damage are used, the file named).
"""

import argparse
import bz2
import gzip
import hashlib
import json
import logging
import multiprocessing
import os
import re
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor

import apache_beam as beam
import zstandard
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions, WorkerOptions
from apache_beam.portability.api import beam_provision_api_pb2
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.runners.portability.portable_runner import JobServiceHandle
from apache_beam.runners.runner import PipelineState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V1_CONFIG = os.path.join(ROOT, "data_config.json")
NAME = "reddit/reddit_{}.jsonl.gz"
V1_YEARS = {2015, 2016, 2017, 2018}
METRICS = "build_reddit"
CHUNK = 1 << 20
SHARDS = 256  # per year, of whole threads; a shard is sorted in one worker's memory (~1M pairs a year)


class UserError(Exception):
    """A problem with the command line or the dumps: one line, exit 2 (train_script.py's rule; not
    imported from it, so that Beam's workers need neither it nor JAX)."""


# ============================================================================================
# The rules (PolyAI's conversational-datasets, reddit/create_data.py)
# ============================================================================================

MIN_CHARS, MAX_CHARS = 9, 127
GONE = ("[deleted]", "[removed]")
SHORT, LONG = f"shorter than {MIN_CHARS}", f"longer than {MAX_CHARS}"


def bare_id(raw):
    """Reddit's ids carry their kind (t1_ a comment, t3_ a submission) in parent_id and link_id."""
    return raw[3:] if raw[2:3] == "_" and raw[:1] == "t" and raw[1:2].isdigit() else raw


def text_problem(body):
    """Why a text cannot be in a pair (None when it can)."""
    if body in GONE:
        return body
    if len(body) < MIN_CHARS:
        return SHORT
    if len(body) > MAX_CHARS:
        return LONG
    return None


def comment_of(line):
    """(year, link_id), (id, parent_id, body or "" when the text is dropped), the text's problem;
    a str naming what is wrong with a line that is not a comment."""
    try:
        record = json.loads(line)
    except ValueError:
        return "not JSON"
    try:
        link, cid, parent, body = record["link_id"], record["id"], record["parent_id"], record["body"]
        year = time.gmtime(int(record["created_utc"])).tm_year  # some dumps write it as a string
        if not isinstance(body, str):
            return "missing a field"
        key, comment, problem = (year, bare_id(link)), (bare_id(cid), bare_id(parent)), text_problem(body)
    except (KeyError, TypeError, ValueError, OverflowError):  # absent, null, or not of its kind
        return "missing a field"
    return key, comment + ("" if problem else body,), problem


def thread_pairs(comments):
    """The pairs of one thread's comments, (reply id, context, response), and the replies that give none
    because they are not reached from the thread's top (a cycle, or below one). A comment whose
    parent is not in the thread (a top-level comment, or a reply to one missing from the dumps)
    starts a path; each comment is reached once."""
    by_id = {}
    for comment in comments:  # a comment twice in the dumps: the same one kept, whatever the order
        by_id[comment[0]] = max(comment, by_id.get(comment[0], comment))
    children = {}
    for cid, parent, _ in by_id.values():
        children.setdefault(parent, []).append(cid)
    reached = [cid for cid, parent, _ in by_id.values() if parent not in by_id]
    todo, pairs = list(reached), []
    while todo:
        parent = todo.pop()
        for cid in children.get(parent, ()):
            todo.append(cid)
            reached.append(cid)
            if by_id[parent][2] and by_id[cid][2]:
                pairs.append((cid, by_id[parent][2], by_id[cid][2]))
    return pairs, len(by_id) - len(reached)


def order_key(year, link_id, cid):
    """A reply's place in its shard: a hash, so that the order is fixed and threads mixed."""
    return int.from_bytes(hashlib.blake2b(f"{year}/{link_id}/{cid}".encode(), digest_size=8).digest(), "big")


def shard_of(year, link_id):
    """The shard of its year's file that holds a thread's pairs; --passes K makes shard s in pass s % K."""
    return order_key(year, link_id, "") % SHARDS


# ============================================================================================
# Reading the dumps
# ============================================================================================

class Damaged(Exception):
    pass


def zstd_chunks(raw):
    """The decompressed bytes of a .zst, frame after frame; the dumps are written with a long
    window (up to 2 GiB), which the decoder must be allowed. A file ending inside a frame is
    truncated (zstandard itself would end quietly)."""
    decoder = zstandard.ZstdDecompressor(max_window_size=2**31)
    frame, inside = decoder.decompressobj(), False
    for chunk in iter(lambda: raw.read(CHUNK), b""):
        while chunk:
            yield frame.decompress(chunk)
            inside = not frame.eof
            chunk = frame.unused_data if frame.eof else b""
            if frame.eof:
                frame = decoder.decompressobj()
    if inside:
        raise Damaged("truncated")


def stream_chunks(stream):
    return iter(lambda: stream.read(CHUNK), b"")


DECODERS = {".zst": zstd_chunks, ".zstd": zstd_chunks,
            ".gz": lambda raw: stream_chunks(gzip.GzipFile(fileobj=raw)),
            ".bz2": lambda raw: stream_chunks(bz2.BZ2File(raw))}


def dump_lines(path):
    """The lines of one dump, decompressed as its name says. Damage (truncation, corrupt bytes)
    raises Damaged after the lines before it; the broken last line is not given."""
    decode = DECODERS.get(os.path.splitext(path)[1], stream_chunks)
    rest = b""
    try:
        with FileSystems.open(path, compression_type="uncompressed") as raw:
            for chunk in decode(raw):
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                yield from lines
    except (EOFError, OSError, zlib.error, zstandard.ZstdError) as e:
        raise Damaged(str(e) or type(e).__name__) from None
    if rest.strip():
        yield rest


class ReadDump(beam.DoFn):
    """One dump to ((year, link_id), comment) for the years asked and the threads of this pass,
    counting per file (in the first pass) the lines read, those that are not comments, those of other
    years and the texts dropped."""

    def __init__(self, years, part, passes):
        self.years, self.part, self.passes = years, part, passes

    def process(self, path):
        counts = {}
        try:
            for line in dump_lines(path):
                comment = comment_of(line)
                if isinstance(comment, str):
                    what = comment
                elif comment[0][0] not in self.years:
                    what = "outside --years"
                else:
                    what = comment[2]
                    if self.passes == 1 or shard_of(*comment[0]) % self.passes == self.part:
                        yield comment[:2]
                counts["read"] = counts.get("read", 0) + 1
                if what:
                    counts[what] = counts.get(what, 0) + 1
        except Damaged as e:
            counts[f"damaged: {e}"] = 1
        for what, count in counts.items() if self.part == 0 else ():
            Metrics.counter(METRICS, f"{what}\t{path}").inc(count)


class MakePairs(beam.DoFn):
    """A thread's pairs, keyed by its year's shard, each with its place there."""

    def __init__(self):
        self.cycles = Metrics.counter(METRICS, "replies in a cycle\t")

    def process(self, thread):
        (year, link_id), comments = thread
        pairs, unreached = thread_pairs(comments)
        if unreached:
            self.cycles.inc(unreached)
        shard = (year, shard_of(year, link_id))
        for cid, context, response in pairs:
            yield shard, (order_key(year, link_id, cid), json.dumps({"context": context, "response": response}))


class WriteShard(beam.DoFn):
    """One shard of a year's pairs, in their order, as one gzip member named with its line count:
    the year's file is the concatenation of its shards (gzip readers read on across members)."""

    def __init__(self, folder):
        self.folder = folder

    def process(self, shard):
        (year, index), lines = shard
        lines = sorted(lines)
        data = gzip.compress("".join(line + "\n" for _, line in lines).encode(), mtime=0)
        path = FileSystems.join(self.folder, f"{year}-{index:05d}-{len(lines)}.gz")
        with FileSystems.create(path, compression_type="uncompressed") as f:  # a retry writes the same bytes
            f.write(data)


def run_pipeline(paths, years, folder, beam_args, part=0, passes=1):
    """Runs the pipeline (pass `part` of `passes`) to its end; returns its counters."""
    logging.getLogger("apache_beam").setLevel(logging.ERROR)  # the workers' notices, relayed
    options, runner = beam_options(beam_args)
    pipeline = beam.Pipeline(runner=runner, options=options)
    (pipeline
     | "dumps" >> beam.Create(paths)
     | "spread" >> beam.Reshuffle()
     | "comments" >> beam.ParDo(ReadDump(years, part, passes))
     | "threads" >> beam.GroupByKey()
     | "pairs" >> beam.ParDo(MakePairs())
     | "shards" >> beam.GroupByKey()
     | "write" >> beam.ParDo(WriteShard(folder)))
    result = pipeline.run()
    if result.wait_until_finish() != PipelineState.DONE:  # a cancelled cluster job, say
        raise RuntimeError(f"the pipeline ended {result.state}")
    return counts_of(result)


# ============================================================================================
# Around the pipeline: the dumps, the files, the config, the report
# ============================================================================================

def find_dumps(dumps):
    """The dump files DUMPS names: a folder's (RC_* or JSON-lines names), a glob's, or one file."""
    try:
        found = [] if any(c in dumps for c in "*?[") else \
            [m for m in matching(FileSystems.join(dumps, "*")) if is_dump(m.path)]
        found = found or matching(dumps)
    except ValueError as e:  # a filesystem Beam does not have (gs:// wants apache-beam[gcp])
        raise UserError(f"{dumps}: {e}") from None
    if not any(m.size_in_bytes for m in found):
        raise UserError(f"{dumps}: no dumps there (RC_*.zst, *.jsonl or *.json, plain, .gz or .bz2), "
                        "or only empty files")
    return sorted(m.path for m in found)


def matching(pattern):
    return [m for m in FileSystems.match([pattern])[0].metadata_list if not os.path.isdir(m.path)]


def is_dump(path):
    name = os.path.basename(path)
    return name.startswith("RC_") or re.search(r"\.(jsonl?|zst)(\.gz|\.bz2)?$", name) is not None


def parse_years(text):
    """A year or a range of v1's Reddit years (each file gets its v1 weight)."""
    match = re.fullmatch(r"(\d{4})(?:-(\d{4}))?", text)
    years = range(int(match[1]), int(match[2] or match[1]) + 1) if match else range(0)
    if not years or not set(years) <= V1_YEARS:
        raise argparse.ArgumentTypeError(f"expected a year or a range of years within 2015-2018, got {text!r}")
    return years


def parse_passes(text):
    if not text.isdigit() or not 1 <= int(text) <= SHARDS:
        raise argparse.ArgumentTypeError(f"expected a number of passes from 1 to {SHARDS}, got {text!r}")
    return int(text)


def beam_options(beam_args):
    """Beam's options as given and the runner they name (None: Beam makes it); with no --runner, the
    local runner on every core. An option neither this script's nor Beam's is refused (Beam would
    drop it with a warning)."""
    options = PipelineOptions(beam_args)
    unknown = set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options())
    if unknown:
        raise UserError(f"unknown option --{min(unknown)} (see --help for this script's, "
                        "Beam's documentation for its own)")
    if options.view_as(StandardOptions).runner is None:
        direct = options.view_as(DirectOptions)
        direct.direct_running_mode = "multi_processing"
        options.view_as(WorkerOptions).default_sdk_harness_log_level = "ERROR"  # not lines per worker
        if "--direct_num_workers" not in " ".join(beam_args):
            direct.direct_num_workers = os.cpu_count()
        return options, local_runner(options)
    return options, None


def local_runner(options):
    """The DirectRunner's engine, set up as the DirectRunner does (its workers get the options),
    without the DirectRunner's first try of Prism: a download, and another parallelism."""
    info = beam_provision_api_pb2.ProvisionInfo(
        pipeline_options=JobServiceHandle.encode_pipeline_options(options.get_all_options()))
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(info))


def assemble(folder, data):
    """Each year's shards, in order, into DATA/reddit/reddit_YYYY.jsonl.gz: every year written under
    a temporary name, then all renamed, so that a failure leaves none under its name. Returns
    {year: lines}."""
    shards = {}
    for m in matching(FileSystems.join(folder, "*.gz")):
        year, index, lines = map(int, os.path.basename(m.path)[:-3].split("-"))
        shards.setdefault(year, []).append((index, lines, m.path))
    finals = {year: FileSystems.join(data, NAME.format(year)) for year in sorted(shards)}
    written = []
    try:
        for year, final in finals.items():
            with FileSystems.create(final + ".partial", compression_type="uncompressed") as out:
                written.append(final + ".partial")
                for _, _, path in sorted(shards[year]):
                    with FileSystems.open(path, compression_type="uncompressed") as f:
                        for chunk in stream_chunks(f):
                            out.write(chunk)
    except BaseException:
        FileSystems.delete(written)
        raise
    FileSystems.rename(written, [final for final in finals.values()])
    return {year: sum(lines for _, lines, _ in parts) for year, parts in sorted(shards.items())}


def read_json(path):
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return json.loads(f.read())


def update_config(data, written):
    """DATA/data_config.json with the years written (v1's weight, their lines) in place of any
    earlier entries of theirs, the other entries kept; written whole, then renamed."""
    path = FileSystems.join(data, "data_config.json")
    entries = read_json(path) if FileSystems.exists(path) else []
    if not isinstance(entries, list):
        raise UserError(f"{path}: not a data config (a JSON list); the files are written, the config is not")
    weights = {e["name"]: e["weight"] for e in read_json(V1_CONFIG)}
    names = {NAME.format(year): lines for year, lines in written.items()}
    entries = [e for e in entries if not (isinstance(e, dict) and e.get("name") in names)]
    entries += [{"name": name, "lines": lines, "weight": weights[name]} for name, lines in names.items()]
    with FileSystems.create(path + ".partial", compression_type="uncompressed") as f:
        f.write(json.dumps(entries, indent=1).encode())
    FileSystems.rename([path + ".partial"], [path])
    return path


def counts_of(result):
    """{(what, file or ""): count} from the run's counters (committed where the runner has them)."""
    counts = {}
    for c in result.metrics().query(MetricsFilter().with_namespace(METRICS))["counters"]:
        key = tuple(c.key.metric.name.split("\t"))
        counts[key] = counts.get(key, 0) + (c.committed if c.committed is not None else c.attempted)
    return counts


def report(paths, counts, written, years):
    """The run in a few lines: each file's lines and what was dropped, the totals, each year's pairs
    against v1's. Returns the text and the damaged files."""
    v1 = {e["name"]: e["lines"] for e in read_json(V1_CONFIG)}
    out, totals, damaged = [], {}, []
    for path in paths:
        mine = {what: n for (what, p), n in counts.items() if p == path}
        for what, n in mine.items():
            totals[what] = totals.get(what, 0) + n
        damaged += [path for what in mine if what.startswith("damaged")]
        out.append(f"{path}: {mine.pop('read', 0):,} lines" + "".join(
            f", {w}" if w.startswith("damaged") else f", {n:,} {w}" for w, n in sorted(mine.items())))
    dropped = [f"{n:,} {w}" for w, n in sorted(totals.items()) if w != "read" and not w.startswith("damaged")]
    cycles = counts.get(("replies in a cycle", ""), 0)
    out.append(f"comments read: {totals.get('read', 0):,}; dropped: {', '.join(dropped) or 'none'}; "
               f"replies in a cycle: {cycles:,}")
    for year in years:
        name, pairs = NAME.format(year), written.get(year, 0)
        share = f" ({100 * pairs / v1[name]:.2f} % of v1's {v1[name]:,})" if name in v1 else ""
        out.append(f"{name}: {pairs:,} pairs{share}" + ("" if pairs else ", not written"))
    return "\n".join(out), damaged


def remove_folder(folder):
    files = [m.path for m in matching(FileSystems.join(folder, "*"))]
    if files:
        FileSystems.delete(files)
    if os.path.isdir(folder):  # a local folder; on an object store the prefix goes with its files
        os.rmdir(folder)


def build(dumps, data, years, passes, beam_args):
    """The whole job: the pipeline into shards (once per pass), the shards into each year's file, the
    config, the report. Returns the years written and the damaged dumps."""
    paths = find_dumps(dumps)
    beam_options(beam_args)  # a bad option refused before any work
    folder = FileSystems.join(data, "reddit", ".shards")
    remove_folder(folder)  # a failed run's
    FileSystems.mkdirs(folder)
    counts = {}
    try:
        for part in range(passes):
            if passes == 1:
                more = run_pipeline(paths, set(years), folder, beam_args)
            else:  # each pass in a process of its own: the local runner's process keeps what a pass took
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
                    more = pool.submit(run_pipeline, paths, set(years), folder, beam_args, part, passes).result()
                print(f"pass {part + 1} of {passes} done", flush=True)
            for key, n in more.items():
                counts[key] = counts.get(key, 0) + n
        written = assemble(folder, data)
    finally:
        remove_folder(folder)
    text, damaged = report(paths, counts, written, years)
    print(text)
    if written:
        print(f"added {', '.join(map(str, written))} to {update_config(data, written)}")
    return written, damaged


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Other options go to Beam.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dumps", help="the comment dumps: a folder, a glob or a file (local, gs://, ...)")
    p.add_argument("data", help="the data folder: DATA/reddit/reddit_YYYY.jsonl.gz and DATA/data_config.json")
    p.add_argument("--years", type=parse_years, default="2015-2018", help="YYYY or YYYY-YYYY")
    p.add_argument("--passes", type=parse_passes, default=1,
                   help="make the pairs of a K-th of the threads at a time, reading the dumps K times: "
                        "the local runner holds them all in RAM, a K-th then")
    args, beam_args = p.parse_known_args(argv)
    try:
        written, damaged = build(args.dumps, args.data, args.years, args.passes, beam_args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit("stopped: interrupted, no file written")
    except Exception as e:  # the runner's failure, or the files', whatever its kind: its first line
        sys.exit(f"error: the run failed, no file written: {(str(e).strip() or type(e).__name__).splitlines()[0]}")
    if not written:
        sys.exit(f"error: {args.dumps}: no pairs for {args.years[0]}-{args.years[-1]}")
    if damaged:
        sys.exit(f"error: {len(damaged)} damaged dump(s), their lines before the damage used: {', '.join(damaged)}; "
                 "download them again and rerun")


if __name__ == "__main__":
    main()
