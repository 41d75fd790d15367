"""Scaling flags: GradCache (--mini_batch_size), length buckets (--pad_to_buckets), --dtype bfloat16.

The references are the plain one-pass step (GradCache must give its loss and gradients), the
fully padded batch (buckets must not change the loss) and the float32 model (bfloat16 must stay
close to it).
"""
import argparse
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_script as ts
from conftest import pmap_traces, tiny_argv

DEVICES = 8
PER_DEVICE = 8
MINI = 2
MAX_LENGTH = 32
BUCKETS = (8, 16, 24)


def flags(tiny, *extra):
    return ts.parse_args(tiny_argv(tiny, tiny / "out", "--max_length", MAX_LENGTH, "--batch_size", PER_DEVICE, *extra,
                                   config=tiny / "data_config_pairs.json"))


def changed(args, **values):
    return argparse.Namespace(**{**vars(args), **values})


def first_batch_texts(args):
    """The columns of texts of the first global batch the training loop would see."""
    sources = ts.open_sources(ts.load_data_config(args.data_config), args)
    global_batch = PER_DEVICE * DEVICES
    batch = next(ts.text_batches(sources, args, global_batch, (0, global_batch), (0, 1)))
    return list(zip(*(texts for _, texts in batch.rows)))


def tokenized(args, tokenizer, texts):
    """What a tokenizer worker makes of the texts, laid out [devices, per_device, length]."""
    ts._init_tokenizer(tokenizer.backend_tokenizer.to_str(), args.max_length, tokenizer.pad_token_id,
                       args.pad_to_buckets, taken=None)  # tokenize_columns tells no one it took a batch
    return ts.tokenize_columns(texts, (DEVICES, PER_DEVICE))


@pytest.fixture(scope="module")
def setup(tiny):
    """Dropout off, a real batch of the fixture, the model replicated on 8 devices."""
    args = flags(tiny, "--dropout", "0")
    tokenizer, config = ts.load_tokenizer_and_config(args)
    model = ts.load_model(args, config)
    sharding = ts.device_sharding(jax.local_devices()[:DEVICES])
    params = ts.replicate(model.params, sharding, DEVICES)
    keys = ts.replicate(jax.random.PRNGKey(0), sharding, DEVICES)
    texts = first_batch_texts(args)
    return args, tokenizer, model, params, keys, texts


@pytest.fixture(scope="module")
def plain_and_cached(setup):
    """The compiled per-device loss-and-gradient of the plain step and of GradCache, fully padded."""
    args, tokenizer, model, params, keys, texts = setup
    columns = tokenized(args, tokenizer, texts)
    compiled = {}
    for mini_batch in (None, MINI):
        step_args = changed(args, mini_batch_size=mini_batch)
        f = jax.pmap(functools.partial(ts.loss_and_grads, model, step_args), axis_name=ts.AXIS)
        compiled[mini_batch] = f.lower(params, columns, keys).compile()
    results = {m: c(params, columns, keys) for m, c in compiled.items()}
    return compiled, results


def assert_same_gradients(grads, reference):
    """Equal to 1e-5 of each parameter's largest gradient entry: float32 round-off of another
    summation order (the token-type embedding's gradient sums every token and reaches ~7)."""
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        r = functools.reduce(lambda tree, key: tree[key.key], path, reference)
        bound = 1e-5 * float(jnp.abs(r).max()) + 1e-9
        assert float(jnp.abs(g - r).max()) <= bound, jax.tree_util.keystr(path)


# --------------------------------------------------------------------------------------------
# GradCache
# --------------------------------------------------------------------------------------------

def test_gradcache_gives_the_plain_loss_and_gradients(plain_and_cached):
    _, results = plain_and_cached
    (plain_loss, plain_grads), (cached_loss, cached_grads) = results[None], results[MINI]
    assert plain_loss.shape == (DEVICES,)
    np.testing.assert_allclose(cached_loss, plain_loss, rtol=0, atol=1e-5)
    assert_same_gradients(cached_grads, plain_grads)
    # not vacuous: the gradients are not all zero
    assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(plain_grads)) > 1e-2


def test_gradcache_needs_a_fraction_of_the_memory(plain_and_cached):
    compiled, _ = plain_and_cached
    plain, cached = (compiled[m].memory_analysis().temp_size_in_bytes for m in (None, MINI))
    # activations of 2 rows instead of 8 per device; parameter-sized buffers are the same in both
    assert cached < plain / 2, (plain, cached)


def test_gradcache_with_dropout_is_the_gradient_of_its_loss(tiny, setup):
    """Each chunk must see one dropout mask in both forward passes, else the gradient belongs to
    another function than the loss. Checked by a central difference along the gradient."""
    _, tokenizer, _, params, keys, texts = setup
    args = flags(tiny, "--dropout", "0.1", "--mini_batch_size", str(MINI))
    model = ts.load_model(args, ts.load_tokenizer_and_config(args)[1])
    columns = tokenized(args, tokenizer, texts)
    loss_and_grads = jax.pmap(functools.partial(ts.loss_and_grads, model, args), axis_name=ts.AXIS)
    _, grads = loss_and_grads(params, columns, keys)
    # the per-device gradients add up to the gradient of the summed per-device losses
    total = jax.tree_util.tree_map(lambda g: g.sum(0), grads)
    norm = np.sqrt(sum(float(jnp.sum(g * g)) for g in jax.tree_util.tree_leaves(total)))
    eps = 1e-3
    moved = [loss_and_grads(jax.tree_util.tree_map(lambda p, g: p + sign * eps * g / norm, params, total),
                            columns, keys)[0].sum() for sign in (1, -1)]
    slope = (float(moved[0]) - float(moved[1])) / (2 * eps)
    # an implementation that draws new masks in the second pass misses by several percent
    assert slope == pytest.approx(norm, rel=1e-2), (slope, norm)


# --------------------------------------------------------------------------------------------
# Length buckets
# --------------------------------------------------------------------------------------------

def test_each_column_is_padded_to_the_smallest_bucket_that_fits(setup):
    args, tokenizer, _, _, _, texts = setup
    buckets = ts.bucket_lengths(BUCKETS, MAX_LENGTH)
    bucketed = tokenized(changed(args, pad_to_buckets=buckets), tokenizer, texts)
    full = tokenized(args, tokenizer, texts)
    for column, (ids, mask), (full_ids, full_mask) in zip(texts, bucketed, full):
        longest = max(len(tokenizer(t, truncation=True, max_length=MAX_LENGTH)["input_ids"]) for t in column)
        assert ids.shape[-1] == min(b for b in buckets if b >= longest)
        assert full_ids.shape[-1] == MAX_LENGTH
        np.testing.assert_array_equal(ids, full_ids[..., :ids.shape[-1]])
        np.testing.assert_array_equal(mask, full_mask[..., :ids.shape[-1]])
        assert not full_mask[..., ids.shape[-1]:].any()  # only padding was cut


def test_buckets_leave_the_loss_and_gradients_unchanged(setup, plain_and_cached):
    args, tokenizer, model, params, keys, texts = setup
    _, results = plain_and_cached
    bucket_args = changed(args, pad_to_buckets=ts.bucket_lengths(BUCKETS, MAX_LENGTH))
    columns = tokenized(bucket_args, tokenizer, texts)
    # the first batch is reddit's: long responses (cut), then short comments
    assert [ids.shape[-1] for ids, _ in columns] == [MAX_LENGTH, 24]
    loss, grads = jax.pmap(functools.partial(ts.loss_and_grads, model, args), axis_name=ts.AXIS)(params, columns, keys)
    plain_loss, plain_grads = results[None]
    np.testing.assert_allclose(loss, plain_loss, rtol=0, atol=1e-5)
    assert_same_gradients(grads, plain_grads)


@pytest.mark.parametrize("text, culprit", [("16,8", "increasing"), ("8,8", "increasing"), ("0,16", "positive"),
                                           ("8,64", "exceeds --max_length 32"), ("8,x", "comma-separated")])
def test_bad_bucket_lists_are_refused(tiny, text, culprit):
    with pytest.raises(ts.UserError, match=f"--pad_to_buckets {text}: .*{culprit}"):
        flags(tiny, "--pad_to_buckets", text)


def test_bucket_lists_end_at_max_length():
    assert ts.bucket_lengths(None, 128) == (128,)
    assert ts.bucket_lengths((32, 64), 128) == (32, 64, 128)
    assert ts.bucket_lengths((32, 64, 128), 128) == (32, 64, 128)


@pytest.mark.parametrize("mini, message", [("3", f"3 must divide --batch_size {PER_DEVICE}"),
                                           ("16", f"16 must divide --batch_size {PER_DEVICE}"), ("0", "must be at least 1")])
def test_mini_batch_must_divide_the_batch(tiny, mini, message):
    with pytest.raises(ts.UserError, match=f"--mini_batch_size {message}"):
        flags(tiny, "--mini_batch_size", mini)


# --------------------------------------------------------------------------------------------
# bfloat16
# --------------------------------------------------------------------------------------------

def test_bfloat16_embeddings_stay_close_to_float32(setup):
    args, tokenizer, model, _, _, texts = setup
    bf16_model = ts.load_model(changed(args, dtype="bfloat16"), model.config)
    # master weights stay float32: the optimizer never sees bfloat16
    assert {p.dtype for p in jax.tree_util.tree_leaves(bf16_model.params)} == {jnp.dtype("float32")}
    ids, mask = (x.reshape(-1, x.shape[-1]) for x in tokenized(args, tokenizer, texts)[0])
    embed = jax.jit(ts.embed, static_argnums=0)
    fp32, bf16 = embed(model, model.params, ids, mask), embed(bf16_model, model.params, ids, mask)
    assert bf16.dtype == jnp.float32  # the loss is computed in float32
    cosine = np.sum(np.asarray(fp32) * np.asarray(bf16), axis=-1)
    print("bf16 vs fp32: min cosine", cosine.min(), "max abs", float(jnp.abs(fp32 - bf16).max()))
    assert cosine.min() > 0.9999 and float(jnp.abs(fp32 - bf16).max()) < 1e-2
    assert not np.array_equal(fp32, bf16)  # the bfloat16 model really computes in bfloat16


@pytest.mark.slow
def test_a_bfloat16_bucketed_gradcache_run_trains(tiny, tmp_path, capsys):
    """All three flags at once, through main: the loss falls, and buckets bound the compiled shapes."""
    with pmap_traces() as traces:
        ts.main(tiny_argv(tiny, tmp_path / "run", "--overwrite", "--max_length", MAX_LENGTH, "--batch_size", "4",
                          "--mini_batch_size", "2", "--pad_to_buckets", "16", "--dtype", "bfloat16", "--steps", "40",
                          "--lr", "1e-3", "--warmup_steps", "4", "--log_steps", "10", "--save_steps", "1000",
                          config=tiny / "data_config_pairs.json"))
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"step=\d+ loss=([\d.]+)", out)]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3, losses
    # two columns, each padded to 16 or 32: at most 4 shapes, however many steps
    assert 1 <= traces["train_step"] <= 4
