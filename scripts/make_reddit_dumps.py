"""Reddit comment dumps in the Pushshift format, small for the tests of build_reddit.py or large to
time it.

    python scripts/make_reddit_dumps.py OUT                    # the cases below and random threads
    python scripts/make_reddit_dumps.py OUT --comments 500000 --months 2  # random threads only, RC_2015-0M.zst

or, from tests (with scripts/ on sys.path): `from make_reddit_dumps import write_cases`.

The cases, Nov 2015 to Feb 2016 in four monthly files (RC_2015-11.zst and RC_2015-12.zst written
with a 2 GiB window as the real dumps are, RC_2016-01.gz, RC_2016-02.jsonl plain): a chain of 14
replies; a branching thread; [deleted] and [removed] texts with replies; texts of 8, 9, 127 and 128
characters, in ASCII, accented letters, CJK and emoji; a reply to a comment not in the dumps; a
thread over two monthly files; a thread across New Year; a cycle of two replies with a reply below
it and a comment that is its own parent; a comment twice; created_utc as a string. Then random
threads of every depth, whose texts' lengths cluster at the limits. Everything follows from --seed.
"""

import argparse
import calendar
import gzip
import json
import os
import random
import time

import zstandard

WORDS = ("reply", "thread", "comment", "karma", "upvote", "subreddit", "post", "link", "mods", "meme",
         "café", "naïve", "日本語", "한국어", "🙂", "🚀", "ok", "lol", "this", "is", "the", "way")


def text(rng, length, word=None, head=""):
    """A text of exactly `length` characters (code points): `head` then random words, or `word`
    repeated."""
    if word:
        return (word * length)[:length]
    out = head
    while len(out) < length:
        out += rng.choice(WORDS) + " "
    return out[:length]


def at(day, hour=12):
    """Unix seconds of a day "YYYY-MM-DD" (UTC) plus hours."""
    y, m, d = map(int, day.split("-"))
    return calendar.timegm((y, m, d, 0, 0, 0)) + int(hour * 3600)


def comment(cid, link, parent, body, created, **extra):
    """One dump line's fields (and some of the others real dumps carry)."""
    return {"id": cid, "link_id": f"t3_{link}", "parent_id": parent, "body": body, "created_utc": created,
            "author": f"user_{cid}", "subreddit": "test", "score": 1, "gilded": 0, "controversiality": 0,
            "distinguished": None, "edited": False, "author_flair_text": None, **extra}


def case_comments(rng):
    out = []

    def add(cid, link, parent, body, day, hour=12, word=None):
        """A comment; a body given as a length is a text of that length, unique to the comment."""
        body = body if isinstance(body, str) else text(rng, body, word, head=f"{cid} ")
        out.append(comment(cid, link, parent if parent.startswith("t3_") else f"t1_{parent}", body, at(day, hour)))

    for i in range(15):  # a chain: each reply has up to 14 parents
        add(f"ch{i}", "chain", "t3_chain" if i == 0 else f"ch{i - 1}", 40, "2015-11-10", i / 10)
    add("br0", "branch", "t3_branch", 50, "2015-11-11")
    for i in range(3):
        add(f"br{i + 1}", "branch", "br0", 60, "2015-11-11", 13)
        for j in range(2):
            add(f"br{i + 1}{j}", "branch", f"br{i + 1}", 70, "2015-11-11", 14)
    add("gone0", "gone", "t3_gone", 30, "2015-11-12")
    for i, body in enumerate(("[deleted]", "[removed]")):
        add(f"gone{i + 1}", "gone", "gone0", body, "2015-11-12", 13)
        add(f"gone{i + 1}a", "gone", f"gone{i + 1}", 30, "2015-11-12", 14)
        add(f"gone{i + 1}b", "gone", f"gone{i + 1}a", 30, "2015-11-12", 15)
    for k, word in enumerate(("ab", "é", "日本", "🙂")):  # lengths at the limits
        add(f"len{k}c", f"len{k}", f"t3_len{k}", 10, "2015-12-02", word=word)
        for i, n in enumerate((8, 9, 127, 128)):
            add(f"len{k}_{n}", f"len{k}", f"len{k}c", n, "2015-12-02", 13, word)
            add(f"len{k}_{n}r", f"len{k}", f"len{k}_{n}", 11 + i, "2015-12-02", 14, word)
    add("orphan1", "orphan", "orphan0", 40, "2016-01-05")  # orphan0 is not in the dumps
    add("orphan2", "orphan", "orphan1", 40, "2016-01-05", 13)
    add("mon0", "months", "t3_months", 40, "2015-11-30", 23.9)
    add("mon1", "months", "mon0", 40, "2015-12-01", 0.1)
    add("mon2", "months", "mon1", 40, "2016-01-01", 0.2)
    add("ny0", "newyear", "t3_newyear", 40, "2015-12-31", 23.9)
    add("ny1", "newyear", "ny0", 40, "2016-01-01", 0.1)
    add("ny2", "newyear", "ny1", 40, "2016-01-01", 0.2)
    add("cy0", "cycle", "t3_cycle", 40, "2016-02-03")
    add("cy1", "cycle", "cy0", 40, "2016-02-03", 13)
    add("cyA", "cycle", "cyB", 40, "2016-02-03", 14)
    add("cyB", "cycle", "cyA", 40, "2016-02-03", 15)
    add("cyC", "cycle", "cyA", 40, "2016-02-03", 16)
    add("cyS", "cycle", "cyS", 40, "2016-02-03", 17)
    add("str0", "strings", "t3_strings", 40, "2016-02-04")
    add("str1", "strings", "str0", 40, "2016-02-04", 13)
    for c in out[-2:]:
        c["created_utc"] = str(c["created_utc"])
    out.append(dict(out[-1]))  # the same comment twice
    return out


def random_comments(rng, count, start, end, prefix="r"):
    """Random threads, `count` comments in all between the two times: each reply answers a random
    earlier comment of its thread (or, once in 50, one not in the dumps)."""
    out, n = [], 0
    while n < count:
        link, size = f"{prefix}t{n}", min(count - n, int(rng.paretovariate(1.2)))
        t0 = rng.uniform(start, end - 3 * 86400)
        ids = []
        for i in range(size):
            cid = f"{prefix}{n + i}"
            parent = (f"t3_{link}" if not ids or rng.random() < 0.3 else
                      "t1_lost" + cid if rng.random() < 0.02 else f"t1_{rng.choice(ids)}")
            length = rng.choice((rng.randint(1, 20), rng.randint(5, 140), rng.randint(100, 600), rng.randint(120, 135)))
            body = rng.choice(("[deleted]", "[removed]")) if rng.random() < 0.05 else text(rng, length)
            out.append(comment(cid, link, parent, body, int(t0 + rng.expovariate(1 / 7200) * (i > 0))))
            ids.append(cid)
        n += size
    return out


def write_dump(path, comments):
    """One dump file, compressed as its name says (.zst with a 2 GiB window, .gz, or plain)."""
    data = "".join(json.dumps(c) + "\n" for c in comments).encode()
    with open(path, "wb") as f:
        if path.endswith(".zst"):  # streamed, size unknown, as `zstd --long=31` writes: the frame asks a 2 GiB window
            params = zstandard.ZstdCompressionParameters.from_level(3, window_log=31, write_content_size=False)
            with zstandard.ZstdCompressor(compression_params=params).stream_writer(f, closefd=False) as z:
                z.write(data)
        else:
            f.write(gzip.compress(data, mtime=0) if path.endswith(".gz") else data)
    return path


MONTH_FILES = {"2015-11": "RC_2015-11.zst", "2015-12": "RC_2015-12.zst", "2016-01": "RC_2016-01.gz",
               "2016-02": "RC_2016-02.jsonl"}


def write_cases(out, seed=0, random_count=3000):
    """The cases and `random_count` random comments, in MONTH_FILES under out. Returns the paths."""
    rng = random.Random(seed)
    comments = case_comments(rng) + random_comments(rng, random_count, at("2015-11-01"), at("2016-02-28"))
    return write_months(out, comments, MONTH_FILES)


def write_months(out, comments, names):
    """The comments in one dump per month, named by `names` {"YYYY-MM": file name}."""
    by_month = {}
    for c in sorted(comments, key=lambda c: int(c["created_utc"])):
        by_month.setdefault(month_of(c), []).append(c)
    os.makedirs(out, exist_ok=True)
    return [write_dump(os.path.join(out, names[month]), cs) for month, cs in sorted(by_month.items())]


def month_of(c):
    return "{:04d}-{:02d}".format(*time.gmtime(int(c["created_utc"]))[:2])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the folder to write the dumps in")
    p.add_argument("--comments", type=int, help="random threads only, this many comments, from January 2015 on")
    p.add_argument("--months", type=int, default=1, help="with --comments: over this many monthly files (1-12)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.comments:
        names = {f"2015-{m:02d}": f"RC_2015-{m:02d}.zst" for m in range(1, 13)}
        end = at(f"2015-{args.months + 1:02d}-01") if args.months < 12 else at("2016-01-01")
        comments = random_comments(random.Random(args.seed), args.comments, at("2015-01-01"), end)
        print(*write_months(args.out, [c for c in comments if c["created_utc"] < end], names), sep="\n")
    else:
        print(*write_cases(args.out, args.seed), sep="\n")


if __name__ == "__main__":
    main()
