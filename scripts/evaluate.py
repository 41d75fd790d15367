"""Score models side by side on STS benchmark and on held-out pairs of the mixture.

    python scripts/evaluate.py OUTPUT/final sentence-transformers/all-MiniLM-L12-v1 \
        --data_config DATA/data_config.json --data_folder DATA

Each MODEL is anything SentenceTransformer() loads: an export (OUTPUT/final, OUTPUT/<step>) or a Hub
name. Reported for each, as one column of a table:

- STS: the Spearman correlation between the gold scores of --sts (a dataset with sentence1,
  sentence2 and score columns, read with `datasets`: a Hub name, a local dataset folder, or a .csv /
  .json(l) file) and the cosine similarity of the model's embeddings.
- Held-out pairs (with --data_config): the rows train_script's evaluation uses, the usable rows
  among the first --max_rows lines of each file (a run with --eval_steps and --eval_rows of the same
  number never trained on them; a published model may have). Each anchor ranks the partners (and
  negatives) of all those rows of its file: accuracy@1 and MRR@10, the mean over the files. The
  files are read as streams, never further than --max_rows lines.

--json PATH also writes every number, per file. Scoring needs sentence-transformers (and torch):
pip install -r requirements-test.txt.
"""

import argparse
import json
import os
import sys

import numpy as np
import scipy.stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for train_script; scripts/ is on the path already (run from it, or by the tests)
from train_script import (MRR_CUTOFF, Source, UserError, head_of, held_out_rows, held_out_texts,  # noqa: E402
                          load_data_config, score_held_out, source_url)

STS_COLUMNS = ("sentence1", "sentence2", "score")


def load_sts(name, split):
    """(sentences1, sentences2, gold scores) of the whole split (STS benchmark's test split: 1,379 pairs)."""
    import datasets  # not needed to score held-out pairs alone, and it takes seconds to import
    if name.endswith((".csv", ".json", ".jsonl")):
        builder, files = ("csv" if name.endswith(".csv") else "json"), {split: name}
    else:
        builder, files = name, None
    try:
        rows = list(datasets.load_dataset(builder, data_files=files, split=split, streaming=True))
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:  # OSError: no file, no network
        raise UserError(f"--sts {name}: cannot load split {split!r} ({str(e).splitlines()[0]}); "
                        "--sts '' skips STS")
    if len(rows) < 2 or not all(column in rows[0] for column in STS_COLUMNS):
        raise UserError(f"--sts {name}: needs at least 2 rows with the columns {', '.join(STS_COLUMNS)}")
    return [r["sentence1"] for r in rows], [r["sentence2"] for r in rows], np.array([float(r["score"]) for r in rows])


def load_held_out_pairs(config, data_folder, max_rows):
    """{file: its held-out rows}, exactly as train_script's --eval_rows picks them."""
    held_out = {}
    for entry in load_data_config(config):
        url = source_url(data_folder, entry["name"])
        source = Source(entry["name"], url, entry["weight"], columns=len(head_of(url)[0]), block=max_rows)
        held_out[entry["name"]] = held_out_rows(source, min(max_rows, entry.get("lines", max_rows + 1) - 1))
    return held_out


def score_model(name, sts, held_out, batch_size):
    """{"sts_spearman", "pairs": {file: {"accuracy", "mrr@10"}, "overall": ...}} of one model."""
    from sentence_transformers import SentenceTransformer
    try:
        model = SentenceTransformer(name)
    except (OSError, ValueError) as e:
        raise UserError(f"{name}: cannot load it with sentence-transformers ({str(e).splitlines()[0]})")

    def encode(texts):
        return model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True)

    scores = {}
    if sts:
        first, second, gold = sts
        cosine = np.sum(encode(first) * encode(second), axis=1)
        scores["sts_spearman"] = float(scipy.stats.spearmanr(gold, cosine).statistic)
    if held_out:
        scores["pairs"] = score_held_out(held_out, encode(held_out_texts(held_out)))
    return scores


def table(results, sts_rows, pair_files):
    """One column per model, one row per measure."""
    rows = []
    if sts_rows:
        rows.append((f"STS Spearman ({sts_rows} pairs)", "sts_spearman", None))
    if pair_files:
        rows += [(f"held-out accuracy@1 ({pair_files} files)", "pairs", "accuracy"),
                 (f"held-out MRR@{MRR_CUTOFF}", "pairs", f"mrr@{MRR_CUTOFF}")]
    width = max(len(label) for label, _, _ in rows)
    lines = [" " * width + "".join(f"  {name:>12}" for name in results)]
    for label, key, sub in rows:
        values = [r[key] if sub is None else r[key]["overall"][sub] for r in results.values()]
        lines.append(f"{label:<{width}}" + "".join(f"  {value:>{max(12, len(name))}.4f}"
                                                   for value, name in zip(values, results)))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("models", nargs="+", metavar="MODEL", help="an exported model folder or a Hub name")
    p.add_argument("--sts", default="sentence-transformers/stsb",
                   help="STS data: a Hub dataset, a dataset folder, or a .csv/.json(l) file ('' to skip)")
    p.add_argument("--sts_split", default="test", help="which split of --sts")
    p.add_argument("--data_config", help="score held-out pairs of this mixture's files too")
    p.add_argument("--data_folder", default="data", help="where --data_config's files are")
    p.add_argument("--max_rows", type=int, default=1000,
                   help="lines of each mixture file read at most (as train_script's --eval_rows)")
    p.add_argument("--batch_size", type=int, default=64, help="texts encoded at once")
    p.add_argument("--json", help="also write every score to this file")
    args = p.parse_args(argv)
    try:
        if args.max_rows < 2:
            raise UserError(f"--max_rows must be at least 2, got {args.max_rows}")
        if not args.sts and not args.data_config:
            raise UserError("nothing to score: give --sts and/or --data_config")
        sts = load_sts(args.sts, args.sts_split) if args.sts else None
        held_out = load_held_out_pairs(args.data_config, args.data_folder, args.max_rows) if args.data_config else {}
        results = {name: score_model(name, sts, held_out, args.batch_size) for name in args.models}
    except UserError as e:
        sys.exit(f"error: {e}")
    print(table(results, len(sts[2]) if sts else 0, len(held_out)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
