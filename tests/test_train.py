"""The update step and the train loop ("Optimizer & update step", "Train loop", "Main").

- the optimizer against transformers' AdamW formula (written out here) on the linear schedule,
- the 8-device step against the published script's update computed in torch: each core's
  gradient through its own rows, clipped on its own, averaged; GradCache too,
- a non-finite step skipped as if it never ran (parameters, moments, counter, lr),
- attention dropout drawn per element (PyTorch's) for every exportable model type, or shared,
- one run on 8 emulated devices against one device with the same global batch,
- a tiny model trained from scratch learns the fixture's paraphrases (held-out retrieval),
- the step is compiled once, and the loop fetches from the device only at logging steps,
- the flags --dropout, --symmetric_loss, --log_steps,
- the errors of bad input: one line, before compiling.
Run with -s to see the measured differences.
"""
import importlib
import os
import shutil
import sys

import flax
import jax
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util
from jax._src.array import ArrayImpl  # where every implicit conversion of an array to NumPy goes
from safetensors.numpy import load_file
from sentence_transformers.sentence_transformer.losses import (MultipleNegativesRankingLoss,
                                                               MultipleNegativesSymmetricRankingLoss)
from transformers import AutoTokenizer, BertConfig, BertModel, FlaxAutoModel, FlaxBertModel

import train_script
from conftest import pmap_traces, read_source, run_train_script, tiny_argv, write_config

pytestmark = pytest.mark.filterwarnings("ignore:The MultipleNegativesSymmetricRankingLoss is deprecated")


# ============================================================================================
# The optimizer
# ============================================================================================

def transformers_adamw_by_hand(start, gradients, lr_of_step, weight_decay, decayed, eps=1e-6):
    """transformers.AdamW(correct_bias=True), the published script's optimizer, written out in
    float64 NumPy from its formula: m, v as usual; denom = sqrt(v) + eps (eps before the bias
    correction); step = lr sqrt(1 - b2^t) / (1 - b1^t); p -= step m / denom; then the decoupled
    decay p -= lr wd p on the parameters in `decayed`. start: {name: array}; gradients: one
    {name: array} per step; lr_of_step(t) for t = 0, 1, ..."""
    b1, b2 = 0.9, 0.999
    params = {n: p.astype(np.float64) for n, p in start.items()}
    m = {n: np.zeros_like(p) for n, p in params.items()}
    v = {n: np.zeros_like(p) for n, p in params.items()}
    for t, grads in enumerate(gradients, start=1):
        lr = lr_of_step(t - 1)
        for n in params:
            g = grads[n].astype(np.float64)
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
            step_size = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            params[n] = params[n] - step_size * m[n] / (np.sqrt(v[n]) + eps)
            if n in decayed:
                params[n] = params[n] - lr * weight_decay * params[n]
    return params


def linear_schedule_by_hand(lr, warmup, schedule_steps):
    """transformers' get_linear_schedule_with_warmup, as a function of the step."""
    return lambda t: lr * t / warmup if t < warmup else lr * max(0.0, (schedule_steps - t) / (schedule_steps - warmup))


def largest_relative_difference(ours, reference, offset=None):
    """max over parameters of max|ours - reference| / max|reference - offset|; where the reference
    equals the offset (a parameter that got no update), any difference is infinite."""
    worst = 0.0
    for n in reference:
        difference = np.abs(ours[n] - reference[n]).max()
        size = np.abs(reference[n] - (offset[n] if offset else 0)).max()
        worst = max(worst, difference / size if size else np.inf if difference else 0.0)
    return worst


def perturbed_start(params, seed=0, scale=0.05):
    """Parameters with non-zero biases and LayerNorm offsets, as in a pretrained checkpoint."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda p: (np.asarray(p) + rng.normal(scale=scale, size=np.shape(p))).astype(np.float32), params)


@pytest.mark.parametrize("weight_decay, schedule_steps", [(0.0, None), (0.1, 20)], ids=["defaults", "decay-schedule"])
def test_optimizer_is_transformers_adamw_on_the_linear_schedule(tmp_path, weight_decay, schedule_steps):
    """Twelve steps on fixed gradients, large and tiny (where eps matters), through the warm-up and
    the decay, against the hand-written formula. Weight decay: none by default (the published
    script passed none); with --weight_decay, not on the parameters named *bias or *LayerNorm.weight."""
    lr, warmup, steps = 1e-3, 3, 12
    flags = ["--weight_decay", str(weight_decay)]
    if schedule_steps:
        flags += ["--schedule_steps", str(schedule_steps)]
    args = train_script.parse_args([str(tmp_path / "config.json"), str(tmp_path / "out"), "--lr", str(lr),
                                    "--warmup_steps", str(warmup), "--steps", str(steps), *flags])
    assert args.schedule_steps == (schedule_steps or steps)
    config = BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16)
    start_tree = perturbed_start(FlaxBertModel(config, seed=0).params)
    names = list(train_script.torch_state_dict(start_tree))  # the PyTorch names, in flatten_dict order
    paths = list(traverse_util.flatten_dict(start_tree))
    start = dict(zip(names, traverse_util.flatten_dict(start_tree).values()))
    rng = np.random.default_rng(1)
    gradients = []
    for norm in [4.0, 0.3, 2.0, 0.8, 10.0, 0.005, 1.5, 0.5, 3.0, 0.9, 6.0, 0.002]:  # global norms
        raw = {n: rng.normal(size=p.shape) for n, p in start.items()}
        total = np.sqrt(sum(np.sum(g * g) for g in raw.values()))
        gradients.append({n: (g * norm / total).astype(np.float32) for n, g in raw.items()})

    def run_optax(tx):
        params = traverse_util.unflatten_dict(dict(zip(paths, start.values())))
        state, update = tx.init(params), jax.jit(tx.update)
        for grads in gradients:
            updates, state = update(traverse_util.unflatten_dict(dict(zip(paths, grads.values()))), state, params)
            params = optax.apply_updates(params, updates)
        return dict(zip(names, map(np.asarray, traverse_util.flatten_dict(params).values())))

    ours = run_optax(train_script.make_optimizer(args))
    decayed = {n for n in names if "bias" not in n and "LayerNorm.weight" not in n}
    schedule = linear_schedule_by_hand(lr, warmup, schedule_steps or steps)
    reference = transformers_adamw_by_hand(start, gradients, schedule, weight_decay, decayed)
    values = largest_relative_difference(ours, reference)
    updates = largest_relative_difference(ours, reference, offset=start)
    print(f"\noptimizer, {steps} steps vs transformers' AdamW formula: parameters differ by {values:.1e} "
          f"of their size, the total updates by {updates:.1e} of theirs")
    assert values <= 1e-6
    # the updates to within 1e-5 of their size, once the float32 rounding of the stored parameters
    # is allowed for (up to one unit in the last place per step: a LayerNorm scale near 1.0 holds
    # its ~4e-3 update to within 1.2e-7)
    for n in reference:
        rounding = steps * np.spacing(np.abs(reference[n]).max().astype(np.float32))
        assert np.abs(ours[n] - reference[n]).max() <= 1e-5 * np.abs(reference[n] - start[n]).max() + rounding, n
    # the test tells the formula apart: optax.adamw adds eps after the bias correction, and a
    # schedule that ends at --steps when --schedule_steps is longer moves the parameters more
    optax_adamw = run_optax(optax.adamw(train_script.learning_rate_schedule(args), b1=0.9, b2=0.999, eps=1e-6,
                                        weight_decay=weight_decay, mask=train_script.decays))
    assert largest_relative_difference(optax_adamw, reference, offset=start) > 1e-3
    if schedule_steps:
        short = transformers_adamw_by_hand(start, gradients, linear_schedule_by_hand(lr, warmup, steps),
                                           weight_decay, decayed)
        assert largest_relative_difference(short, reference, offset=start) > 1e-2
    if weight_decay:
        everything = transformers_adamw_by_hand(start, gradients, schedule, weight_decay, set(names))
        assert largest_relative_difference(everything, reference, offset=start) > 1e-3


# ============================================================================================
# The update step: the published script's rule, on 8 devices, against torch
# ============================================================================================

STEP_LR, STEP_SCHEDULE, PER_DEVICE, STEP_LENGTH = 1e-3, 10, 2, 16


def fixture_pairs(tiny, batches, rows):
    """`batches` lists of `rows` paraphrase pairs from the fixture, in file order."""
    pairs = read_source(tiny / "data" / "paraphrase_pairs.jsonl.gz", batches * rows)
    return [pairs[i * rows:(i + 1) * rows] for i in range(batches)]


def step_args(tiny, tmp_path, *flags):
    return train_script.parse_args(tiny_argv(
        tiny, tmp_path / "out", "--dropout", "0", "--lr", STEP_LR, "--warmup_steps", "0", "--steps", "4",
        "--schedule_steps", STEP_SCHEDULE, "--batch_size", PER_DEVICE, "--max_length", STEP_LENGTH, *flags,
        config=tiny / "data_config_pairs.json"))


def jax_steps(args, start, batches, devices, model=None):
    """train_script's pmapped step over `batches` from `start`; (host state, measurements per step)."""
    tokenizer, config = train_script.load_tokenizer_and_config(args)
    model = model or train_script.load_model(args, config)
    model.params = start
    sharding = train_script.device_sharding(devices)
    state = train_script.replicate(train_script.init_state(model, args), sharding, len(devices))
    step = train_script.make_train_step(model, args, devices)
    key = train_script.replicate(jax.random.PRNGKey(0), sharding, len(devices))
    measured = []
    for batch in batches:
        state, m = step(state, train_script.to_devices(batch, sharding), key)
        measured.append(jax.device_get(train_script.first_local_replica(m)))
    return jax.device_get(train_script.first_local_replica(state)), measured


def tokenized_pairs(tokenizer, pairs, devices):
    """[(ids, mask)] per column, [devices, per device, length]: rows d * B ... (d + 1) * B on device d."""
    columns = []
    for texts in zip(*pairs):
        t = tokenizer(list(texts), padding="max_length", truncation=True, max_length=STEP_LENGTH, return_tensors="np")
        columns.append(tuple(t[k].reshape(devices, -1, STEP_LENGTH) for k in ("input_ids", "attention_mask")))
    return columns


def published_update_in_torch(model_folder, start, pairs_per_step, devices, scope):
    """The published script's steps, in torch: each core's gradient is that of the global mean
    loss (symmetric, scale 20) through its own rows only (the other cores' embeddings detached,
    as all_gather's backward hands a core only its slice); with scope "device" each core clips
    its own to norm 1 (torch.nn.utils.clip_grad_norm_) and the mean is taken; with "global" the
    full gradient is clipped. Then transformers' AdamW. Returns (parameters, per-core norms)."""
    config = BertConfig.from_pretrained(model_folder, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertModel(config).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    names = list(start)
    gradients, norms = [], []

    def state_at(step):  # the parameters before `step`, from the hand-written optimizer
        return transformers_adamw_by_hand(start, gradients[:step], linear_schedule_by_hand(STEP_LR, 0, STEP_SCHEDULE),
                                          0.0, set())

    for step, pairs in enumerate(pairs_per_step):
        model.load_state_dict({n: torch.tensor(p, dtype=torch.float32) for n, p in state_at(step).items()})
        parameters = [dict(model.named_parameters())[n] for n in names]
        embeddings = []
        for texts in zip(*pairs):
            batch = tokenizer(list(texts), padding="max_length", truncation=True, max_length=STEP_LENGTH,
                              return_tensors="pt")
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            embeddings.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), p=2, dim=1))
        rows = len(pairs)

        def global_loss(anchors, positives):
            scores = 20.0 * anchors @ positives.T
            labels = torch.arange(rows)
            return (F.cross_entropy(scores, labels) + F.cross_entropy(scores.T, labels)) / 2

        def gradient(loss):
            grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
            return [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads)]

        def clipped(grads):
            holders = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
            for h, g in zip(holders, grads):
                h.grad = g.clone()
            norms[-1].append(float(torch.nn.utils.clip_grad_norm_(holders, 1.0)))
            return [h.grad for h in holders]

        norms.append([])
        if scope == "device":
            per_core = []
            for d in range(devices):
                own = torch.zeros(rows, 1, dtype=torch.bool)
                own[d * rows // devices:(d + 1) * rows // devices] = True
                only_own = [torch.where(own, e, e.detach()) for e in embeddings]
                per_core.append(clipped(gradient(global_loss(*only_own))))
            mean = [torch.stack(gs).mean(0) for gs in zip(*per_core)]
        else:
            mean = clipped(gradient(global_loss(*embeddings)))
        gradients.append({n: g.numpy() for n, g in zip(names, mean)})
    return state_at(len(pairs_per_step)), norms


@pytest.mark.parametrize("flags", [[], ["--mini_batch_size", "1"]], ids=["one-pass", "gradcache"])
def test_the_step_is_the_published_update_rule(tiny, tmp_path, flags):
    """Four steps of the 8-device step with the defaults (--clip_scope device, transformers'
    AdamW, a linear decay to 0 at --schedule_steps 10), dropout off, against the published
    script's update computed independently in torch; different batches every step. The
    per-core clipping binds (per-core norms above 1), and the test tells it from --clip_scope global."""
    devices = jax.local_devices()
    args = step_args(tiny, tmp_path, *flags)
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    pairs_per_step = fixture_pairs(tiny, 4, PER_DEVICE * len(devices))
    start_tree = perturbed_start(FlaxAutoModel.from_pretrained(tiny / "model").params)
    state, measured = jax_steps(args, start_tree, [tokenized_pairs(tokenizer, p, len(devices)) for p in pairs_per_step],
                                devices)
    ours = train_script.torch_state_dict(state.params)
    start = train_script.torch_state_dict(start_tree)
    reference, norms = published_update_in_torch(tiny / "model", start, pairs_per_step, len(devices), "device")
    global_rule, _ = published_update_in_torch(tiny / "model", start, pairs_per_step, len(devices), "global")

    values = largest_relative_difference(ours, reference)
    moved = largest_relative_difference(reference, start)
    other_rule = largest_relative_difference(global_rule, reference, offset=start)
    worst = max(reference, key=lambda n: np.abs(ours[n] - reference[n]).max() / np.abs(reference[n]).max())
    print(f"\n8-device step vs torch, 4 steps: parameters differ by {values:.1e} of their size ({worst}; they "
          f"moved by up to {moved:.1e} of it); per-core norms {[[round(n, 2) for n in step] for step in norms]}; "
          f"--clip_scope global's update differs by {other_rule:.1e}")
    # float32 on both sides, summed in different orders (XLA, torch): measured 5e-7 to 1.1e-6 of a
    # parameter's size, about 10 ulps, where a bias's gradient nearly cancels over the tokens
    assert values <= 3e-6
    assert all(n > 1 for step in norms for n in step)  # every core's clipping binds
    assert other_rule > 1e-2
    assert [m["grad_norm"] for m in measured] == pytest.approx([np.mean(step) for step in norms], rel=1e-4)
    assert [m["lr"] for m in measured] == pytest.approx([STEP_LR * (STEP_SCHEDULE - t) / STEP_SCHEDULE
                                                          for t in range(4)], rel=1e-6)
    assert int(state.step) == int(state.opt_state.count) == 4


def test_a_skipped_step_leaves_the_state_as_a_run_without_it(tiny, tmp_path):
    """Steps A, P, B where P's batch reaches a NaN embedding row, against A, B: the same
    parameters, moments, step counter and lr at B (the schedule counts the updates made)."""
    devices = jax.local_devices()
    args = step_args(tiny, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    start = FlaxAutoModel.from_pretrained(tiny / "model").params
    embedding = np.array(start["embeddings"]["word_embeddings"]["embedding"])
    embedding[tokenizer.unk_token_id] = np.nan  # no clean batch holds [UNK]
    start["embeddings"]["word_embeddings"]["embedding"] = embedding
    a, b, poisoned = (tokenized_pairs(tokenizer, p, len(devices)) for p in fixture_pairs(tiny, 3, PER_DEVICE * 8))
    assert not any((ids == tokenizer.unk_token_id).any() for batch in (a, b) for ids, _ in batch)
    poisoned[0][0][3, 1, 2] = tokenizer.unk_token_id

    with_skip, measured = jax_steps(args, start, [a, poisoned, b], devices)
    without, measured_without = jax_steps(args, start, [a, b], devices)
    assert [bool(m["finite"]) for m in measured] == [True, False, True]
    assert int(with_skip.step) == int(with_skip.opt_state.count) == 2
    second_lr = STEP_LR * (STEP_SCHEDULE - 1) / STEP_SCHEDULE  # the schedule at one update made
    assert measured[2]["lr"] == measured_without[1]["lr"] == pytest.approx(second_lr)
    for x, y in zip(jax.tree_util.tree_leaves(with_skip), jax.tree_util.tree_leaves(without)):
        np.testing.assert_array_equal(x, y)


# ============================================================================================
# Attention dropout: PyTorch's independent draws, or transformers' Flax shared masks
# ============================================================================================

def tiny_config(model_type, vocab_size):
    """A small model of each exportable type: attention dropout 0.1, every other dropout 0."""
    from transformers import AutoConfig
    if model_type == "distilbert":
        sizes = dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, dropout=0.0, attention_dropout=0.1)
    else:
        sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.1)
        if model_type == "albert":
            sizes["embedding_size"] = 16
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, max_position_embeddings=64, pad_token_id=1, **sizes)


def kept_attention(model_type, masks, examples=8, length=16):
    """Which attention probabilities survive dropout in a training-mode forward pass inside
    train_script.attention_dropout_masks: bool [layers, examples, heads, length, length]."""
    model = FlaxAutoModel.from_config(tiny_config(model_type, 100), seed=0)
    ids = np.random.default_rng(0).integers(5, 100, size=(examples, length))
    with train_script.attention_dropout_masks(model_type, masks):
        attentions = model(ids, np.ones_like(ids), output_attentions=True, train=True,
                           dropout_rng=jax.random.PRNGKey(0)).attentions
    return np.stack([np.asarray(a) != 0 for a in attentions])  # every probability is > 0 before dropout


@pytest.mark.parametrize("model_type", sorted(train_script.MODEL_TYPES))
def test_attention_dropout_is_drawn_per_element_for_every_model_type(model_type):
    kept = kept_attention(model_type, "element")
    examples_differ = np.mean(kept[:, 0] != kept[:, 1])
    heads_differ = np.mean(kept[:, :, 0] != kept[:, :, 1])
    print(f"\n{model_type}: kept {kept.mean():.3f} of {kept.size} (rate 0.1); examples differ at "
          f"{examples_differ:.3f}, heads at {heads_differ:.3f} of their positions (independent draws: 0.18)")
    # 8192 draws: the kept fraction of 0.9 to within 4 standard deviations (0.013)
    assert kept.mean() == pytest.approx(0.9, abs=0.013)
    # two independent masks disagree at 2 x 0.9 x 0.1 = 18% of the positions (2048 each)
    assert examples_differ == pytest.approx(0.18, abs=0.04) and heads_differ == pytest.approx(0.18, abs=0.04)


@pytest.mark.parametrize("model_type", sorted(t for t, m in train_script.MODEL_TYPES.items() if m.shared_masks))
def test_shared_attention_dropout_is_transformers_flax_mask(model_type):
    kept = kept_attention(model_type, "shared")
    assert (kept == kept[:, :1, :1]).all()  # one mask per layer, for every example and head
    assert kept.mean() == pytest.approx(0.9, abs=0.04)
    # and leaving the context gives transformers' own code back
    module = importlib.import_module(train_script.MODEL_TYPES[model_type].shared_masks)
    assert module.dot_product_attention_weights is flax.linen.attention.dot_product_attention_weights


def test_the_attention_dropout_flag_reaches_embed_and_distilbert_refuses_shared(tiny, tmp_path):
    args = train_script.parse_args([str(tiny / "data_config.json"), str(tmp_path / "out"), "--model",
                                    str(tiny / "model"), "--dropout", "0.1"])
    assert args.attention_dropout == "element"
    tokenizer, config = train_script.load_tokenizer_and_config(args)
    model = train_script.load_model(args, config)
    t = tokenizer(["how do i cook rice in the kitchen?"] * 4, padding="max_length", max_length=16, return_tensors="np")
    key = jax.random.PRNGKey(3)

    def embed(*masks):
        return np.asarray(train_script.embed(model, model.params, t["input_ids"], t["attention_mask"], key, *masks))

    assert np.array_equal(embed(), embed("element"))
    assert np.abs(embed("element") - embed("shared")).max() > 1e-4

    folder = tmp_path / "distilbert"
    config = tiny_config("distilbert", config.vocab_size)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(train_script.UserError, match="--attention_dropout shared: .*distilbert.*per element"):
        train_script.load_tokenizer_and_config(train_script.parse_args(
            ["config.json", "out", "--model", str(folder), "--max_length", "16", "--attention_dropout", "shared"]))


def test_schedule_steps_default_and_bounds():
    def parse(*flags):
        return train_script.parse_args(["config.json", "out", "--steps", "100", *flags]).schedule_steps
    assert parse() == 100 and parse("--schedule_steps", "250") == 250
    with pytest.raises(train_script.UserError, match="--schedule_steps 99 is below --steps 100"):
        parse("--schedule_steps", "99")


# ============================================================================================
# Runs of the script on the tiny fixture
# ============================================================================================

def run(tiny, output, *flags):
    """train_script.main on the tiny fixture's pairs, in this process."""
    train_script.main(tiny_argv(tiny, output, "--num_workers", "0", *flags, config=tiny / "data_config_pairs.json"))


@pytest.fixture
def logged(monkeypatch):
    """(batch texts, measurements) of every step, as the loop fetches them at its logging steps."""
    seen = []
    log_window = train_script.log_window

    def recording(report, progress, *rest):
        seen.extend(zip([text for text, _ in progress.window], jax.device_get([m for _, m in progress.window])))
        return log_window(report, progress, *rest)

    monkeypatch.setattr(train_script, "log_window", recording)
    return seen


def exported_params(folder):
    return load_file(str(folder / "model.safetensors"))


def reference_embeddings(model_folder, texts, max_length):
    """The published script's embedding, in torch: mean of the last hidden states over the mask,
    L2-normalised. The torch BertModel gets the tiny Flax model's weights by name."""
    config = BertConfig.from_pretrained(model_folder)
    model = BertModel(config, add_pooling_layer=True).eval()
    flax_params = FlaxAutoModel.from_pretrained(model_folder).params
    model.load_state_dict({k: torch.tensor(v) for k, v in train_script.torch_state_dict(flax_params).items()},
                          strict=True)
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), p=2, dim=1)


def test_eight_devices_make_the_same_steps_as_one(tiny, tmp_path, logged):
    """The user's path twice with the same seed and data: 8 devices x 2 pairs, then 1 device x 16
    pairs. Two steps without warm-up (the first step of a warm-up has lr 0) and without dropout,
    with --clip_scope global (the default clips each device's share, so the device count matters).
    The first step's loss is also checked against torch + sentence-transformers on the same texts."""
    flags = ["--steps", "2", "--warmup_steps", "0", "--lr", "1e-3", "--dropout", "0", "--log_steps", "1",
             "--max_length", "16", "--no-symmetric_loss", "--clip_scope", "global",
             "--mixing", "per_batch"]  # its batches do not depend on the devices; a round of original's does
    run(tiny, tmp_path / "eight", "--nprocs", "8", "--batch_size", "2", *flags)
    eight = list(logged)
    logged.clear()
    run(tiny, tmp_path / "one", "--nprocs", "1", "--batch_size", "16", *flags)
    one = list(logged)

    assert [t.rows for t, _ in eight] == [t.rows for t, _ in one]  # the same global batches
    for (_, a), (_, b) in zip(eight, one):
        assert np.ptp(a["loss"]) == 0 and np.ptp(a["grad_norm"]) == 0  # every device agrees
    losses = [(float(a["loss"][0]), float(b["loss"][0])) for (_, a), (_, b) in zip(eight, one)]
    norms = [(float(a["grad_norm"][0]), float(b["grad_norm"][0])) for (_, a), (_, b) in zip(eight, one)]
    a, b = exported_params(tmp_path / "eight" / "final"), exported_params(tmp_path / "one" / "final")
    start = train_script.torch_state_dict(FlaxAutoModel.from_pretrained(tiny / "model").params)
    parameters = max(np.abs(a[k] - b[k]).max() for k in a)
    moved = max(np.abs(a[k] - start[k]).max() for k in a)

    texts = [row for _, row in eight[0][0].rows]
    anchors, positives = (reference_embeddings(tiny / "model", column, 16) for column in zip(*texts))
    one_way = float(MultipleNegativesRankingLoss(None).compute_loss_from_embeddings([anchors, positives], None))
    symmetric = float(MultipleNegativesSymmetricRankingLoss(None).compute_loss_from_embeddings(
        [anchors, positives], None))
    print(f"\n8 devices vs 1, 2 steps: losses {losses}, gradient norms {norms}, parameters differ by at most "
          f"{parameters:.1e} (they moved by up to {moved:.1e}); first loss vs torch + "
          f"MultipleNegativesRankingLoss: {abs(losses[0][0] - one_way):.1e}")
    for pair in losses + norms:
        assert abs(pair[0] - pair[1]) <= 1e-5 * abs(pair[1])
    assert parameters <= 1e-5 and moved > 1e-4
    assert abs(losses[0][0] - one_way) <= 1e-5
    assert abs(losses[0][0] - symmetric) > 1e-3  # --no-symmetric_loss reached the step


def held_out_pairs(tiny, tmp_path, count):
    """Paraphrase pairs from the fixture's generator with another seed, none seen in training."""
    from make_tiny_data import build_fixture
    build_fixture(str(tmp_path / "held_out"), lines_per_file=count + 50, seed=1)
    seen = {text for pair in read_source(tiny / "data" / "paraphrase_pairs.jsonl.gz") for text in pair}
    pairs = [pair for pair in read_source(tmp_path / "held_out" / "data" / "paraphrase_pairs.jsonl.gz")
             if seen.isdisjoint(pair)]
    assert len(pairs) >= count
    return pairs[:count]


def in_batch_accuracy(model_folder, tokenizer_folder, pairs, batch, max_length):
    """How often an anchor's nearest text among `batch` candidates is its partner (our embed)."""
    model = FlaxAutoModel.from_pretrained(model_folder)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    embed = jax.jit(lambda ids, mask: train_script.embed(model, model.params, ids, mask))

    def embeddings(texts):
        t = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
        return np.asarray(embed(t["input_ids"], t["attention_mask"]))

    hits = 0
    for start in range(0, len(pairs), batch):
        anchors, positives = map(embeddings, zip(*pairs[start:start + batch]))
        hits += np.sum(np.argmax(anchors @ positives.T, axis=1) == np.arange(len(anchors)))
    return hits / len(pairs)


def count_device_fetches(monkeypatch):
    """Records every device-to-host fetch made from train_script.py: ("device_get", function) per
    jax.device_get call, ("implicit", function) per float()/bool()/np.asarray() of a jax.Array.
    (On CPU the transfer guard cannot see these: a CPU array converts without a transfer.)"""
    fetches, in_device_get = [], []

    def caller():
        frame = sys._getframe(2)
        while frame and frame.f_code.co_filename != train_script.__file__:
            frame = frame.f_back
        return frame and frame.f_code.co_name

    def device_get(tree):
        if caller():
            fetches.append(("device_get", caller()))
        in_device_get.append(True)
        try:
            return original_device_get(tree)
        finally:
            in_device_get.pop()

    def value(array):
        if not in_device_get and caller():
            fetches.append(("implicit", caller()))
        return original_value.fget(array)

    original_device_get, original_value = jax.device_get, ArrayImpl._value
    monkeypatch.setattr(jax, "device_get", device_get)
    monkeypatch.setattr(ArrayImpl, "_value", property(value))
    return fetches


def test_a_tiny_model_learns_paraphrases_compiling_once(tiny, tmp_path, capsys, monkeypatch):
    """The fixture's 2-layer, 32-wide BERT is randomly initialised: trained from scratch for 120
    steps of 32 pairs on 8 devices, it must find the partner of held-out paraphrases among 32
    candidates (chance: 1/32 = 3%) far more often than before training. Measured when written:
    20% before, 75% after. The same run checks that the step is traced and compiled once (by its
    pmap traces and by jax's own compile events), that the script fetches device values only at
    its logging steps and exports, never once a step, and that --log_steps sets when it prints."""
    compiled, first_step = [], []  # names of the XLA compilations; those of the compiling step

    def on_compile(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name"))

    def compile_step(*inputs):
        before = len(compiled)
        result = original_compile_step(*inputs)
        first_step.append((compiled[before:], len(compiled)))
        return result

    original_compile_step = train_script.compile_step
    monkeypatch.setattr(train_script, "compile_step", compile_step)
    fetches = count_device_fetches(monkeypatch)
    jax.monitoring.register_event_duration_secs_listener(on_compile)
    try:
        with pmap_traces() as traces:
            run(tiny, tmp_path / "run", "--steps", "120", "--batch_size", "4", "--max_length", "32",
                "--lr", "1e-3", "--warmup_steps", "10", "--log_steps", "40")
    finally:
        jax.monitoring.unregister_event_duration_listener(on_compile)
    monkeypatch.undo()

    printed = capsys.readouterr().out
    logged_steps = [int(line.split()[0].split("=")[1]) for line in printed.splitlines() if line.startswith("step=")]
    pairs = held_out_pairs(tiny, tmp_path, 256)
    before = in_batch_accuracy(tiny / "model", tiny / "model", pairs, 32, 32)
    after = in_batch_accuracy(tmp_path / "run" / "final", tiny / "model", pairs, 32, 32)
    [(step_compiles, end_of_step_1)] = first_step  # pairs only: one batch format
    later = [name for name in compiled[end_of_step_1:] if name in step_compiles]
    with capsys.disabled():
        print(f"\nheld-out in-batch accuracy among 32: chance 3.1%, before training {before:.1%}, "
              f"after 120 steps {after:.1%}; XLA compilations in step 1: {step_compiles}, of the same "
              f"function after it: {later}; device fetches by the script: {fetches}")
    assert after >= 0.5 and after >= before + 0.2
    assert traces["train_step"] == 1
    assert step_compiles and not later
    assert logged_steps == [40, 80, 120]
    # 3 logging steps and the export: a fetch (a sync) in every step would make 120 or more
    assert not [f for f in fetches if f[0] == "implicit"]
    assert len(fetches) <= len(logged_steps) + 2


# ============================================================================================
# Flags
# ============================================================================================

def test_dropout_flag_sets_the_models_dropout(tiny, tmp_path):
    """--dropout 0 makes training-mode embeddings deterministic; the checkpoint's 0.1 does not."""
    def embeddings_with_two_keys(*flags):
        args = train_script.parse_args([str(tiny / "data_config.json"), str(tmp_path / "out"),
                                        "--model", str(tiny / "model"), *flags])
        tokenizer, config = train_script.load_tokenizer_and_config(args)
        model = train_script.load_model(args, config)
        t = tokenizer(["how do i cook rice in the kitchen?"], padding="max_length", max_length=16, return_tensors="np")
        embed = jax.jit(lambda key: train_script.embed(model, model.params, t["input_ids"], t["attention_mask"], key))
        return config, [np.asarray(embed(jax.random.PRNGKey(k))) for k in (0, 1)]

    config, (a, b) = embeddings_with_two_keys()
    assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0.1
    assert np.abs(a - b).max() > 1e-3
    config, (a, b) = embeddings_with_two_keys("--dropout", "0")
    assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0.0
    assert np.array_equal(a, b)


def test_help_gives_each_default_once(capsys):
    with pytest.raises(SystemExit):
        train_script.parse_args(["--help"])
    flags = capsys.readouterr().out.split("\n  -")[1:]  # one item per option and its help
    assert len(flags) > 30 and [f.split()[0] for f in flags if f.count("(default:") != 1] == ["h,"]


# ============================================================================================
# Errors: one line, before compiling
# ============================================================================================

@pytest.fixture(scope="module")
def torch_only_checkpoint(tiny, tmp_path_factory):
    """The tiny model saved by PyTorch as pytorch_model.bin only, with its tokenizer."""
    folder = tmp_path_factory.mktemp("torch_only")
    config = BertConfig.from_pretrained(tiny / "model")
    model = BertModel(config)
    params = FlaxAutoModel.from_pretrained(tiny / "model").params
    model.load_state_dict({k: torch.tensor(v) for k, v in train_script.torch_state_dict(params).items()})
    model.save_pretrained(folder, safe_serialization=False)
    AutoTokenizer.from_pretrained(tiny / "model").save_pretrained(folder)
    assert not {"model.safetensors", "flax_model.msgpack"} & set(os.listdir(folder))
    return folder


def test_pytorch_model_bin_loads_through_torch(tiny, tmp_path, torch_only_checkpoint):
    args = train_script.parse_args(["config.json", str(tmp_path / "out"), "--model", str(torch_only_checkpoint)])
    _, config = train_script.load_tokenizer_and_config(args)
    loaded = traverse_util.flatten_dict(train_script.load_model(args, config).params)
    original = traverse_util.flatten_dict(FlaxAutoModel.from_pretrained(tiny / "model").params)
    assert loaded.keys() == original.keys()
    assert max(np.abs(np.asarray(loaded[k]) - np.asarray(original[k])).max() for k in original) <= 1e-6


def weightless_copy(tiny, tmp_path):
    folder = tmp_path / "no_weights"
    shutil.copytree(tiny / "model", folder, ignore=shutil.ignore_patterns("*.msgpack"))
    return folder


def empty_folder(tmp_path, name):
    (tmp_path / name).mkdir()
    return tmp_path / name


def tokenizerless_copy(tiny, tmp_path):
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(tiny / "model", folder, ignore=shutil.ignore_patterns("*token*", "vocab.txt"))
    return folder


def truncated_copy(tiny, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(tiny / "model", folder)
    weights = folder / "flax_model.msgpack"
    os.truncate(weights, weights.stat().st_size // 2)
    return folder


@pytest.mark.parametrize("flags, message", [
    (lambda tiny, tmp: ["--model", str(tmp / "missing")], r"--model .*missing: cannot load it"),
    (lambda tiny, tmp: ["--model", str(weightless_copy(tiny, tmp))], r"--model .*no_weights: cannot load its weights"),
    # transformers reads a model type into these names (eMPTy: MPT, my_BERT_dir: BERT)
    (lambda tiny, tmp: ["--model", str(empty_folder(tmp, "empty"))], r"--model .*/empty: the folder is empty"),
    (lambda tiny, tmp: ["--model", str(empty_folder(tmp, "my_bert_dir"))], r"--model .*/my_bert_dir: the folder is empty"),
    (lambda tiny, tmp: ["--model", str(tokenizerless_copy(tiny, tmp))],
     r"--model .*/no_tokenizer: the folder has no tokenizer \(none of tokenizer.json, vocab.txt"),
    (lambda tiny, tmp: ["--model", str(truncated_copy(tiny, tmp))],
     r"--model .*/truncated: cannot read its weights \(Unpack failed: incomplete input\); is the file truncated"),
    (lambda tiny, tmp: ["--nprocs", "9"],
     r"--nprocs 9 but only 8 cpu device\(s\).*XLA_FLAGS=--xla_force_host_platform_device_count=9"),
    (lambda tiny, tmp: ["--max_length", "129"], r"--max_length 129 exceeds the 128 positions"),
    (lambda tiny, tmp: ["--lr", "-1"], r"--lr must be a finite number of 0 or more, got -1"),
    (lambda tiny, tmp: ["--lr", "nan"], r"--lr must be a finite number of 0 or more, got nan"),
    (lambda tiny, tmp: ["--scale", "nan"], r"--scale must be a finite number above 0, got nan"),
    (lambda tiny, tmp: ["--weight_decay", "-0.01"], r"--weight_decay must be a finite number of 0 or more"),
    (lambda tiny, tmp: ["--steps", "10", "--warmup_steps", "20"], r"--warmup_steps 20 exceeds --steps 10"),
    # each of these three trained (loss 0), or failed in the data producer naming no flag
    (lambda tiny, tmp: ["--nprocs", "1", "--batch_size", "1"], r"a global batch of 1 pair .* no in-batch negatives"),
    (lambda tiny, tmp: ["--max_length", "1"], r"--max_length 1 leaves no room for a word piece"),
    (lambda tiny, tmp: ["--seed", "-1"], r"--seed must be a whole number from 0 to 2\*\*63 - 1, got -1"),
], ids=["missing-model", "model-without-weights", "empty-model-folder", "empty-model-folder-named-bert",
        "model-without-tokenizer", "truncated-weights", "too-many-devices", "max-length-beyond-positions",
        "negative-lr", "nan-lr", "nan-scale", "negative-weight-decay", "warmup-beyond-steps", "one-pair",
        "max-length-1", "negative-seed"])
def test_bad_input_fails_in_one_line_before_any_work(tiny, tmp_path, monkeypatch, flags, message):
    def never(*_):
        raise AssertionError("the step was built despite bad input")

    monkeypatch.setattr(train_script, "make_train_step", never)
    output = tmp_path / "out"
    with pytest.raises(train_script.UserError, match=message) as error:
        run(tiny, output, *flags(tiny, tmp_path))
    assert "\n" not in str(error.value)
    assert not output.exists()


@pytest.mark.slow
def test_readmes_one_gpu_command_trains_on_one_device(tiny, tmp_path, capsys):
    """README's `--nprocs 1 --batch_size 1024 --mini_batch_size 64`, scaled down, every other flag
    its default (--mixing original, --datasets_per_batch 2, which refused one device before)."""
    train_script.main(tiny_argv(tiny, tmp_path / "out", "--nprocs", "1", "--batch_size", "8", "--mini_batch_size",
                                "2", "--max_length", "16", "--num_workers", "0", "--steps", "3"))
    assert "done: 3 steps" in capsys.readouterr().out
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()
    card = (tmp_path / "out" / "final" / "README.md").read_text()
    assert "| global batch | 8 (8 per device x 1 devices" in card and "--mixing original --datasets_per_batch 2" in card


@pytest.mark.parametrize("second, message", [
    ("./paraphrase_pairs.jsonl.gz", r"entry 1 \(./paraphrase_pairs.jsonl.gz\) names the file of entry 0 \(para"),
    ("reddit//../paraphrase_pairs.jsonl.gz", r"entry 1 \(reddit//../paraphrase_pairs.jsonl.gz\) names the file of"),
    ("reddit", r"data/reddit: is a folder, not a data file"),
], ids=["dot-slash", "dot-dot", "folder"])
def test_a_data_config_naming_one_file_twice_or_a_folder_is_one_line(tiny, tmp_path, second, message):
    config = write_config(tmp_path / "config.json", [{"name": "paraphrase_pairs.jsonl.gz", "weight": 1},
                                                      {"name": second, "weight": 1}])
    with pytest.raises(train_script.UserError, match=message) as error:
        train_script.main([str(config), str(tmp_path / "out"), "--data_folder", str(tiny / "data"), "--dry_run", "1"])
    assert "\n" not in str(error.value) and "corrupt" not in str(error.value)


def one_error_line(result):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return line


def test_pytorch_model_bin_without_torch_says_what_to_do(tiny, tmp_path, torch_only_checkpoint):
    result = run_train_script(tiny / "data_config_pairs.json", tmp_path / "out", "--model", torch_only_checkpoint,
                        "--data_folder", tiny / "data", block_torch=True)
    line = one_error_line(result)
    assert "pytorch_model.bin" in line and "pip install torch" in line
    assert not (tmp_path / "out").exists()


def test_a_batch_too_big_for_the_device_fails_in_one_line(tiny, tmp_path):
    """A model with 131072 positions at --max_length 131072: one device's step needs terabytes
    (attention scores are length x length), so the allocation fails at once on any machine."""
    folder = tmp_path / "long_model"
    shutil.copytree(tiny / "model", folder)
    config = BertConfig.from_pretrained(folder)
    config.max_position_embeddings = 131072
    FlaxBertModel(config, seed=0).save_pretrained(folder)
    result = run_train_script(tiny / "data_config_pairs.json", tmp_path / "out", "--model", folder, "--data_folder",
                        tiny / "data", "--nprocs", "1", "--datasets_per_batch", "1", "--batch_size", "2",
                        "--max_length", "131072",
                        "--steps", "1", "--num_workers", "0")
    line = one_error_line(result)
    assert "does not fit in device memory" in line and "lower --batch_size" in line


def test_a_negative_learning_rate_is_refused_by_the_command(tiny, tmp_path):
    """Before, `--lr -1` trained, exited 0 and exported a model moved away from its data."""
    result = run_train_script(tiny / "data_config_pairs.json", tmp_path / "out", "--model", tiny / "model",
                        "--data_folder", tiny / "data", "--lr", "-1", "--steps", "1")
    assert one_error_line(result) == "error: --lr must be a finite number of 0 or more, got -1"
    assert not (tmp_path / "out").exists()
