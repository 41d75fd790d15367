"""The in-batch contrastive loss ("Model & loss") against NumPy and sentence-transformers (torch).

train_script.in_batch_loss runs under pmap, one call per device; what a step reports (and
differentiates) is the mean of the per-device losses. These tests run it on the 8 emulated
devices and on 1 device with the same global batch, and compare with
- a plain NumPy (float64) cross-entropy over the whole global batch,
- sentence-transformers' MultipleNegativesRankingLoss (pairs one-way; triplets, whose candidates
  are all positives then all negatives) and MultipleNegativesSymmetricRankingLoss (pairs, both
  directions, averaged: the published script's CLIP-style loss), evaluated in torch on the same
  embeddings.
Run with -s to see the measured differences.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sentence_transformers.sentence_transformer.losses import (MultipleNegativesRankingLoss,
                                                               MultipleNegativesSymmetricRankingLoss)

import train_script

pytestmark = pytest.mark.filterwarnings("ignore:The MultipleNegativesSymmetricRankingLoss is deprecated")

SCALE = 20.0
PER_DEVICE, DIM, IN_DIM = 3, 16, 12
TOLERANCE = 1e-5

# (columns, --symmetric_loss, the sentence-transformers loss that is the card's objective)
CASES = [
    (2, True, MultipleNegativesSymmetricRankingLoss),
    (2, False, MultipleNegativesRankingLoss),
    (3, False, MultipleNegativesRankingLoss),
    (3, True, MultipleNegativesRankingLoss),  # triplets are one-way whatever the flag says
]
CASE_IDS = ["pairs-symmetric", "pairs-one-way", "triplets", "triplets-flag-ignored"]


def correlated_columns(seed, columns, rows, dim):
    """Anchors, positives near their anchors, negatives near them too: the true partner matters."""
    rng = np.random.default_rng(seed)
    anchors = rng.normal(size=(rows, dim))
    out = [anchors] + [anchors + rng.normal(scale=s, size=(rows, dim)) for s in (1.2, 1.5)][:columns - 1]
    return [x.astype(np.float32) for x in out]


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_loss(columns, symmetric):
    """Cross-entropy of the true partner over the whole global batch, in float64."""
    anchors, positives = (c.astype(np.float64) for c in columns[:2])
    candidates = np.concatenate(columns[1:]).astype(np.float64)

    def cross_entropy(queries, keys):
        scores = SCALE * queries @ keys.T
        top = scores.max(axis=1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(scores - top).sum(axis=1))
        return np.mean(log_z - np.diag(scores[:, :len(queries)]))

    loss = cross_entropy(anchors, candidates)
    if symmetric and len(columns) == 2:
        loss = (loss + cross_entropy(positives, anchors)) / 2
    return loss


def sentence_transformers_loss(loss_class, columns):
    """The loss class's own computation on given embeddings (no model needed for that part)."""
    return loss_class(model=None, scale=SCALE).compute_loss_from_embeddings(list(columns), labels=None)


def shard(columns, devices):
    return [c.reshape(len(devices), -1, c.shape[-1]) for c in columns]


def pmapped_loss(columns, devices, symmetric):
    """The global loss as a step reports it: in_batch_loss on every device, averaged over devices."""
    per_device = jax.pmap(lambda *cols: train_script.in_batch_loss(list(cols), SCALE, symmetric),
                          axis_name=train_script.AXIS, devices=devices)(*shard(columns, devices))
    return float(np.mean(per_device))


@pytest.mark.parametrize("devices", [8, 1], ids=["8-devices", "1-device"])
@pytest.mark.parametrize("columns, symmetric, loss_class", CASES, ids=CASE_IDS)
def test_loss_equals_numpy_and_sentence_transformers(columns, symmetric, loss_class, devices):
    assert len(jax.local_devices()) == 8, "conftest should emulate 8 CPU devices"
    embeddings = [unit(c) for c in correlated_columns(columns, columns, 8 * PER_DEVICE, DIM)]
    ours = pmapped_loss(embeddings, jax.local_devices()[:devices], symmetric)
    reference = numpy_loss(embeddings, symmetric)
    theirs = float(sentence_transformers_loss(loss_class, [torch.from_numpy(e) for e in embeddings]))
    print(f"\n{devices} device(s), {columns} columns, symmetric={symmetric}: loss {ours:.6f}; "
          f"|ours - numpy| = {abs(ours - reference):.1e}, |ours - {loss_class.__name__}| = {abs(ours - theirs):.1e}")
    assert abs(ours - reference) <= TOLERANCE
    assert abs(ours - theirs) <= TOLERANCE
    # the partners are close, so a loss that ignored them would be near log(candidates)
    assert reference < 0.5 * np.log(8 * PER_DEVICE * (columns - 1))


def test_the_symmetric_flag_changes_the_pair_loss():
    embeddings = [unit(c) for c in correlated_columns(0, 2, 8 * PER_DEVICE, DIM)]
    # scale the positives' directions unevenly so the two directions differ
    embeddings[1] = unit(embeddings[1] + embeddings[1][::-1])
    one_way = pmapped_loss(embeddings, jax.local_devices(), symmetric=False)
    both = pmapped_loss(embeddings, jax.local_devices(), symmetric=True)
    assert abs(one_way - both) > 1e-3
    assert abs(both - numpy_loss(embeddings, True)) <= TOLERANCE


@pytest.mark.parametrize("devices", [8, 1], ids=["8-devices", "1-device"])
@pytest.mark.parametrize("columns, symmetric, loss_class", CASES[:3], ids=CASE_IDS[:3])
def test_gradient_through_all_gather_is_the_global_gradient(columns, symmetric, loss_class, devices):
    """The reduction of make_train_step: each device differentiates its own loss (the gradient
    flows back through all_gather to the devices whose embeddings it used), then pmean. Every
    device must end up with the gradient of the global loss, here taken by torch autograd through
    sentence-transformers' loss on the whole global batch, for a shared linear "encoder" W."""
    inputs = correlated_columns(10 + columns, columns, 8 * PER_DEVICE, IN_DIM)
    weights = np.random.default_rng(1).normal(size=(IN_DIM, DIM)).astype(np.float32)
    devices = jax.local_devices()[:devices]

    def local_loss(w, cols):
        embeddings = [e / jnp.linalg.norm(e, axis=-1, keepdims=True) for e in (c @ w for c in cols)]
        return train_script.in_batch_loss(embeddings, SCALE, symmetric)

    def reduced_gradient(w, *cols):
        return jax.lax.pmean(jax.grad(local_loss)(w, list(cols)), train_script.AXIS)

    # W replicated with a leading device axis, as the train state is
    replicated = np.broadcast_to(weights, (len(devices), *weights.shape))
    ours = np.asarray(jax.pmap(reduced_gradient, axis_name=train_script.AXIS, devices=devices)(
        replicated, *shard(inputs, devices)))

    w = torch.tensor(weights, requires_grad=True)
    embeddings = [F.normalize(torch.from_numpy(x) @ w, p=2, dim=1) for x in inputs]
    sentence_transformers_loss(loss_class, embeddings).backward()
    reference = w.grad.numpy()

    difference = np.abs(ours - reference).max()
    print(f"\n{len(devices)} device(s), {columns} columns: max|grad| {np.abs(reference).max():.3f}, "
          f"max |ours - torch| = {difference:.1e}, devices disagree by {np.ptp(ours, axis=0).max():.1e}")
    assert difference <= TOLERANCE
    # a psum instead of pmean (or no reduction) would be off by a factor of the devices
    assert np.abs(reference).max() > 100 * TOLERANCE

