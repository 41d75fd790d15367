"""Score an exported model on STS-style and retrieval files: what to run to compare checkpoints.

    python scripts/evaluate.py MODEL_DIR FILE [FILE ...] [--max_rows N] [--batch_size B]

MODEL_DIR is anything SentenceTransformer() loads (OUTPUT/final, OUTPUT/<step>, a Hub name).
Each FILE is one of

- STS: .csv or .tsv with a header row naming the columns sentence1, sentence2, score (others are
  ignored), or JSON lines of {"sentence1": ..., "sentence2": ..., "score": ...}. Reported: the
  Spearman correlation between score and the cosine similarity of the two sentences.
- pairs: JSON lines (optionally .gz) in any format training reads ([a, b], [a, b, negative],
  {"texts": ...}, {"query", "pos", "neg"}, ...). Each anchor ranks the partners of all rows (and
  their negatives): reported are accuracy@1 and MRR@10, as in train_script's held-out evaluation.

One JSON line per file is printed to stdout, e.g. {"file": "sts-dev.csv", "pairs": 1500, "spearman": 0.84}.
The scoring needs sentence-transformers (and torch): pip install -r requirements-test.txt.
"""

import argparse
import csv
import json
import os
import sys

import numpy as np
import scipy.stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train_script import (MRR_CUTOFF, UserError, open_source, parse_row, rank_of_partners,  # noqa: E402
                          repeats_a_text, retrieval_scores)

STS_COLUMNS = ("sentence1", "sentence2", "score")


def read_records(path):
    """The file's records: dicts from a csv/tsv header, JSON values from JSON lines."""
    plain = path[:-3] if path.endswith(".gz") else path
    with open_source(path) as f:
        lines = (line.decode("utf-8") for line in f)
        if plain.endswith((".csv", ".tsv")):
            return list(csv.DictReader(lines, delimiter="\t" if plain.endswith(".tsv") else ","))
        try:
            return [json.loads(line) for line in lines if line.strip()]
        except ValueError as e:
            raise UserError(f"{path}: not JSON lines ({e}); STS files may also be .csv or .tsv")


def is_sts(records):
    return bool(records) and isinstance(records[0], dict) and all(c in records[0] for c in STS_COLUMNS)


def sts_pairs(path, records, max_rows):
    """(sentences1, sentences2, scores) of an STS file."""
    try:
        records = records[:max_rows]
        return ([r["sentence1"] for r in records], [r["sentence2"] for r in records],
                np.array([float(r["score"]) for r in records]))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: every row needs sentence1, sentence2 and a numeric score ({e})")


def retrieval_rows(path, records, max_rows):
    """Up to max_rows usable rows of a pairs file, all of one column count, no text repeated."""
    draws = np.random.default_rng(0).random((len(records), 2))  # fixed picks from sets and pos/neg lists
    rows, seen = [], set()
    for record, record_draws in zip(records, draws):
        row = parse_row(record, record_draws)
        if row is None or repeats_a_text(row, seen) or (rows and len(row) != len(rows[0])):
            continue
        seen.update(row)
        rows.append(row)
        if len(rows) == max_rows:
            break
    if len(rows) < 2:
        raise UserError(f"{path}: fewer than 2 usable rows; expected STS columns {', '.join(STS_COLUMNS)} "
                        "or pairs in a training format")
    return rows


def evaluate_file(model, path, max_rows, batch_size):
    records = read_records(path)

    def encode(texts):
        return model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True)

    if is_sts(records):
        first, second, scores = sts_pairs(path, records, max_rows)
        cosine = np.sum(encode(first) * encode(second), axis=1)
        return {"file": path, "pairs": len(scores), "spearman": float(scipy.stats.spearmanr(scores, cosine)[0])}
    rows = retrieval_rows(path, records, max_rows)
    columns = list(zip(*rows))
    candidates = np.concatenate([encode(column) for column in columns[1:]])
    scores = retrieval_scores(rank_of_partners(encode(columns[0]), candidates))
    return {"file": path, "rows": len(rows), "candidates": len(candidates),
            "accuracy@1": scores["accuracy"], f"mrr@{MRR_CUTOFF}": scores[f"mrr@{MRR_CUTOFF}"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", help="an exported sentence-transformers folder (or a Hub name)")
    p.add_argument("files", nargs="+", metavar="FILE", help="STS (.csv/.tsv/JSON lines) or pairs (JSON lines) files")
    p.add_argument("--max_rows", type=int, default=10_000, help="use at most this many rows of each file")
    p.add_argument("--batch_size", type=int, default=64, help="texts encoded at once")
    args = p.parse_args(argv)
    try:
        for path in args.files:
            if not os.path.exists(path):
                raise UserError(f"{path}: no such file")
        from sentence_transformers import SentenceTransformer
        try:
            model = SentenceTransformer(args.model_dir)
        except (OSError, ValueError) as e:
            raise UserError(f"{args.model_dir}: cannot load it with sentence-transformers ({e})")
        for path in args.files:
            print(json.dumps(evaluate_file(model, path, args.max_rows, args.batch_size)), flush=True)
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
