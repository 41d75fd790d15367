"""Train all-MiniLM-L12-v1 the way it was trained: JAX/Flax, pmap, in-batch contrastive loss.

    python train_script.py data_config.json OUTPUT [--flags]

The model card's recipe is the default of every flag: microsoft/MiniLM-L12-H384-uncased, 540k
steps, 128 pairs per device on 8 devices (a global batch of 1024), 128 word pieces, AdamW at 2e-5
with 500 warm-up steps, mean pooling, scale 20. Each step draws `--datasets_per_batch` sources
from data_config.json with probability proportional to their weight, scores every anchor against
every candidate of the global batch (embeddings are gathered over all devices) and minimises the
cross-entropy of the true partner. OUTPUT/final is a sentence-transformers model.

The file reads in the order of the work: arguments, data, model & loss, update step, export,
train loop, main. A copy of it is left in OUTPUT as the record of how the model was made.
"""

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import json
import multiprocessing
import os
import queue
import shutil
import sys
import threading
import time
import zlib

import flax
import flax.jax_utils
import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
import transformers
from flax import traverse_util
from flax.training import train_state
from jax.experimental import multihost_utils
from safetensors.numpy import save_file
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoTokenizer, FlaxAutoModel


class UserError(Exception):
    """A problem with the command line, the data or the model: reported as one line, exit 2."""


# ============================================================================================
# Arguments
# ============================================================================================

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data_config", help="JSON list of {name, lines, weight}: the sources and their weights")
    p.add_argument("output", help="folder for the exported models, checkpoints and logs")
    p.add_argument("--model", default="microsoft/MiniLM-L12-H384-uncased",
                   help="starting checkpoint: a Hub name or a local folder")
    p.add_argument("--steps", type=int, default=540_000, help="training steps")
    p.add_argument("--save_steps", type=int, default=10_000,
                   help="export a sentence-transformers model to OUTPUT/<step> every this many steps")
    p.add_argument("--batch_size", type=int, default=128, help="pairs per device; global batch = this x devices")
    p.add_argument("--max_length", type=int, default=128, help="truncate every text to this many word pieces")
    p.add_argument("--nprocs", type=int, default=None, help="devices to use (default: all local devices)")
    p.add_argument("--cpu_devices", type=int, default=None,
                   help="without an accelerator: split the CPU into this many devices; XLA runs most of one "
                        "CPU device's step on one thread, so one per core is about cores x faster (default: "
                        "XLA_FLAGS' --xla_force_host_platform_device_count, else 1)")
    p.add_argument("--datasets_per_batch", type=int, default=2,
                   help="sources that fill each global batch, in equal shares")
    p.add_argument("--scale", type=float, default=20.0, help="cosine similarities are multiplied by this")
    p.add_argument("--symmetric_loss", action=argparse.BooleanOptionalAction, default=True,
                   help="for pairs, average the anchor->positive and positive->anchor cross-entropies")
    p.add_argument("--data_folder", default="data",
                   help="folder or fsspec URL (gs://..., hf://datasets/...) the config's names are relative to")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate of AdamW")
    p.add_argument("--warmup_steps", type=int, default=500, help="linear warm-up steps, then linear decay to 0")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (not on biases, LayerNorm)")
    p.add_argument("--seed", type=int, default=42, help="seeds data order, dropout and source choice")
    p.add_argument("--log_steps", type=int, default=100, help="fetch and print loss/lr every this many steps")
    p.add_argument("--dropout", type=float, default=None,
                   help="override the model's dropout probabilities (default: keep the checkpoint's)")
    p.add_argument("--shuffle_buffer", type=int, default=10_000,
                   help="lines of a source shuffled together as it is streamed")
    p.add_argument("--cache_small_sources", type=int, default=0,
                   help="hold sources with fewer lines than this in RAM and shuffle them whole, as the "
                        "original did with 10000000 (tens of GB for the v1 mixture); 0: stream everything")
    p.add_argument("--num_workers", type=int, default=1,
                   help="tokenizer processes; 0 tokenizes in a thread of the trainer")
    p.add_argument("--prefetch", type=int, default=4, help="tokenized batches kept ready ahead of the step")
    p.add_argument("--dry_run", type=int, default=None, metavar="N",
                   help="stream N global batches without a model, print source counts and throughput, exit")
    p.add_argument("--dump_batches", default=None, metavar="FILE",
                   help="with --dry_run: write each global batch's texts and sources as a JSON line")
    p.add_argument("--overwrite", action="store_true", help="delete an existing OUTPUT and start afresh")
    p.add_argument("--multihost", action="store_true",
                   help="join the other hosts of a multi-host run (every host runs the same command) with "
                        "jax.distributed.initialize(); it finds them by itself on Cloud TPU pod slices, SLURM and "
                        "Open MPI; elsewhere give the three flags below (--coordinator_address implies --multihost)")
    p.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                   help="multi-host: process 0's address, the same on every host")
    p.add_argument("--num_processes", type=int, default=None, help="multi-host: how many processes join")
    p.add_argument("--process_id", type=int, default=None, help="multi-host: this process's index, 0 .. N-1")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    positive = ["steps", "save_steps", "batch_size", "max_length", "datasets_per_batch", "log_steps",
                "shuffle_buffer", "prefetch"]
    for name in positive:
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.nprocs is not None and args.nprocs < 1:
        raise UserError(f"--nprocs must be at least 1, got {args.nprocs}")
    if args.cpu_devices is not None and args.cpu_devices < 1:
        raise UserError(f"--cpu_devices must be at least 1, got {args.cpu_devices}")
    if args.num_workers < 0 or args.warmup_steps < 0 or args.cache_small_sources < 0:
        raise UserError("--num_workers, --warmup_steps and --cache_small_sources cannot be negative")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.dump_batches and args.dry_run is None:
        raise UserError("--dump_batches only works with --dry_run N")
    if args.num_processes is not None and args.num_processes < 1:
        raise UserError(f"--num_processes must be at least 1, got {args.num_processes}")
    if args.process_id is not None and args.process_id < 0:
        raise UserError(f"--process_id cannot be negative, got {args.process_id}")
    if args.num_processes and args.process_id is not None and args.process_id >= args.num_processes:
        raise UserError(f"--process_id {args.process_id} must be below --num_processes {args.num_processes}")
    if (args.num_processes is not None or args.process_id is not None) and not (
            args.multihost or args.coordinator_address):
        raise UserError("--num_processes and --process_id need --coordinator_address (or --multihost)")


# ============================================================================================
# Data: the weighted mixture, streamed
# ============================================================================================
# Every source is a gzip'd JSON-lines file read sequentially and cyclically. Lines are shuffled
# in blocks of --shuffle_buffer, each block by an RNG seeded from (seed, source, pass, block), so a
# source's stream is a pure function of the seed and the file, and its position is two integers
# (pass, lines consumed in the pass). That makes batches reproducible and a resumed run exact.

def load_data_config(path):
    """Reads and validates the mixture: a JSON list of {"name", "weight", "lines"}."""
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"data config {path}: cannot read it as JSON ({e})")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"data config {path}: expected a non-empty JSON list of sources")
    seen = set()
    for i, entry in enumerate(entries):
        where = f"data config {path}, entry {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise UserError(f"{where}: needs a \"name\" (a file relative to --data_folder)")
        where += f" ({entry['name']})"
        weight = entry.get("weight")
        if type(weight) is not int or weight < 1:
            raise UserError(f"{where}: \"weight\" must be a positive integer, got {weight!r}")
        if "lines" in entry and (type(entry["lines"]) is not int or entry["lines"] < 0):
            raise UserError(f"{where}: \"lines\" must be a non-negative integer, got {entry['lines']!r}")
        if entry["name"] in seen:
            raise UserError(f"{where}: the name appears twice")
        seen.add(entry["name"])
    return entries


def source_url(data_folder, name):
    return data_folder.rstrip("/") + "/" + name


def parse_row(record, draws):
    """One JSON record of any published format -> a tuple of texts, or None if unusable.

    `draws` are two uniform numbers fixed per line, used where the original picked at random
    (two members of a duplicate set, one positive and one negative of a query)."""
    if isinstance(record, dict):
        if "texts" in record:
            record = record["texts"]
        elif "set" in record:
            members = record["set"]
            if not isinstance(members, list) or len(members) < 2:
                return None
            first = int(draws[0] * len(members))
            second = (first + 1 + int(draws[1] * (len(members) - 1))) % len(members)
            record = [members[first], members[second]]
        elif "query" in record:
            pos, neg = record.get("pos"), record.get("neg") or []
            if not isinstance(pos, list) or not pos or not isinstance(neg, list):
                return None
            record = [record["query"], pos[int(draws[0] * len(pos))]]
            if neg:
                record.append(neg[int(draws[1] * len(neg))])
        elif "context" in record and "response" in record:
            record = [record["context"], record["response"]]
        else:
            return None
    if not isinstance(record, list) or len(record) not in (2, 3):
        return None
    if not all(isinstance(text, str) and text.strip() for text in record):
        return None
    return tuple(record)


def open_source(url):
    return fsspec.open(url, "rb", compression="infer")


def read_lines(url, stride):
    """All lines of a file that belong to this process (every stride[1]-th from stride[0])."""
    try:
        with open_source(url) as f:
            yield from itertools.islice(f, stride[0], None, stride[1])
    except (EOFError, OSError, zlib.error) as e:
        raise UserError(f"{url}: corrupt or truncated file ({e}); re-download it") from e


def first_row(url):
    """The first usable row of a file; checks that it exists and has one."""
    try:
        for line in read_lines(url, (0, 1)):
            try:
                row = parse_row(json.loads(line), (0.0, 0.5))
            except ValueError:
                continue
            if row is not None:
                return row
    except FileNotFoundError:
        raise UserError(f"{url}: no such file (check --data_folder)")
    raise UserError(f"{url}: no usable row in the whole file")


@dataclasses.dataclass
class Source:
    """One file of the mixture and where its stream stands."""
    name: str
    url: str
    weight: int
    columns: int
    block: int                      # lines shuffled together
    position: tuple = (0, 0)        # (pass over the file, lines consumed in this pass)
    invalid: int = 0                # lines skipped: not JSON, wrong shape, wrong column count
    duplicate: int = 0              # rows skipped: a text already in the batch
    rows: object = None             # the live iterator, opened on first use

    def next_row(self, seed, stride):
        """The next usable row; counts (and skips) the unusable ones."""
        if self.rows is None:
            self.rows = self._stream(seed, stride)
        for position, line, draws in self.rows:
            self.position = position
            try:
                row = parse_row(json.loads(line), draws)
            except ValueError:
                row = None
            if row is not None and len(row) == self.columns:
                return row
            self.invalid += 1

    def _stream(self, seed, stride):
        source_key = zlib.crc32(self.name.encode())
        pass_index, offset = self.position
        while True:
            lines = read_lines(self.url, stride)
            block_index, skip = divmod(offset, self.block)
            for _ in itertools.islice(lines, block_index * self.block):
                pass
            seen_any = offset > 0
            while block := list(itertools.islice(lines, self.block)):
                seen_any = True
                rng = np.random.default_rng([seed, source_key, pass_index, block_index])
                order, draws = rng.permutation(len(block)), rng.random((len(block), 2))
                for k in range(skip, len(block)):
                    yield (pass_index, block_index * self.block + k + 1), block[order[k]], draws[k]
                block_index, skip = block_index + 1, 0
            if not seen_any:
                raise UserError(f"{self.url}: no lines for this process")
            pass_index, offset = pass_index + 1, 0


def open_sources(entries, args):
    """Checks every file before training starts (exists, has a usable row) and learns its format."""
    urls = [source_url(args.data_folder, e["name"]) for e in entries]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        firsts = list(pool.map(first_row, urls))
    sources = []
    for entry, url, row in zip(entries, urls, firsts):
        whole = 0 < entry.get("lines", 0) < args.cache_small_sources
        sources.append(Source(entry["name"], url, entry["weight"], len(row),
                              block=entry["lines"] if whole else args.shuffle_buffer))
    return sources


@dataclasses.dataclass
class TextBatch:
    step: int
    sources: list          # the source of each slot, in batch order
    rows: list             # (source name, texts) per row of this process's part of the batch
    stream_state: dict     # {source name: position} after this batch: enough to resume exactly


def choose_sources(rng, sources, count):
    """The first source by weight; the others by weight among those with the same columns."""
    weights = np.array([s.weight for s in sources], dtype=np.float64)
    first = sources[rng.choice(len(sources), p=weights / weights.sum())]
    same = [s for s in sources if s.columns == first.columns]
    same_weights = np.array([s.weight for s in same], dtype=np.float64)
    others = rng.choice(len(same), size=count - 1, p=same_weights / same_weights.sum())
    return [first] + [same[i] for i in others]


def text_batches(sources, args, global_batch, local_range, stride, start_step=0):
    """Yields the text of every step's batch (this process's rows of it), forever.

    The sources of step i depend only on (seed, i), so every process of a multi-host run picks
    the same ones and a resumed run continues the same sequence."""
    share = global_batch // args.datasets_per_batch
    local_start, local_stop = local_range
    for step in itertools.count(start_step):
        chosen = choose_sources(np.random.default_rng([args.seed, step]), sources, args.datasets_per_batch)
        rows, in_batch = [], set()
        for slot, source in enumerate(chosen):
            needed = min(local_stop, (slot + 1) * share) - max(local_start, slot * share)
            while needed > 0:
                texts = source.next_row(args.seed, stride)
                # As in the original: a text seen twice in a batch would be a false negative.
                if len(set(texts)) < len(texts) or not in_batch.isdisjoint(texts):
                    source.duplicate += 1
                    continue
                in_batch.update(texts)
                rows.append((source.name, texts))
                needed -= 1
        yield TextBatch(step, [s.name for s in chosen], rows, {s.name: s.position for s in sources})


# Tokenization runs in worker processes (or a thread with --num_workers 0). Each worker holds the
# model's fast tokenizer, configured to truncate at --max_length and pad to a fixed length.

_tokenizer = None


def _init_tokenizer(tokenizer_json, max_length, pad_id):
    global _tokenizer
    _tokenizer = Tokenizer.from_str(tokenizer_json)
    _tokenizer.enable_truncation(max_length)
    _tokenizer.enable_padding(length=max_length, pad_id=pad_id)


def tokenize_columns(columns, shape):
    """Texts by column -> [(input_ids, attention_mask)] per column, each int32 [*shape, length]."""
    out = []
    for texts in columns:
        encodings = _tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int32)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int32)
        out.append((ids.reshape(*shape, -1), mask.reshape(*shape, -1)))
    return out


@dataclasses.dataclass
class Batch:
    text: TextBatch
    columns: list          # [(input_ids, attention_mask)] per column, numpy [devices, per_device, length]


def tokenizer_pool(tokenizer, args):
    """An executor whose workers tokenize: processes, or one thread with --num_workers 0."""
    init = (tokenizer.backend_tokenizer.to_str(), args.max_length, tokenizer.pad_token_id)
    if args.num_workers == 0:
        return concurrent.futures.ThreadPoolExecutor(1, initializer=_init_tokenizer, initargs=init)
    # spawn: forking a process that runs JAX's threads is unsafe
    return concurrent.futures.ProcessPoolExecutor(
        args.num_workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_tokenizer, initargs=init)


def background_batches(texts, pool, workers, shape, depth):
    """Tokenized batches, produced by a background thread into a bounded queue.

    Any failure of the producer or a worker reaches the consumer as an exception: never a hang."""
    ready, stop = queue.Queue(depth), threading.Event()

    def put(item):
        while not stop.is_set():
            try:
                return ready.put(item, timeout=0.2)
            except queue.Full:
                pass

    def produce():
        try:
            pending = collections.deque()
            for text_batch in texts:
                columns = list(zip(*(row for _, row in text_batch.rows)))
                pending.append((text_batch, pool.submit(tokenize_columns, columns, shape)))
                # keep every worker busy, and batches in order
                if len(pending) > workers:
                    text_batch, future = pending.popleft()
                    put(Batch(text_batch, future.result()))
                if stop.is_set():
                    return
        except BaseException as e:  # handed to the trainer, which stops with it
            put(e)

    thread = threading.Thread(target=produce, name="producer", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = ready.get(timeout=1.0)
            except queue.Empty:
                if not thread.is_alive():
                    raise RuntimeError("the data producer stopped without a reason")
                continue
            if isinstance(item, BaseException):
                if isinstance(item, UserError):
                    raise item
                raise RuntimeError(f"the data producer failed: {type(item).__name__}: {item}") from item
            yield item
    finally:
        stop.set()


def dry_run(sources, args, tokenizer, global_batch):
    """Streams --dry_run batches through the whole input pipeline and reports what it saw."""
    texts = text_batches(sources, args, global_batch, (0, global_batch), (0, 1))
    counts = collections.Counter()
    dump = open(args.dump_batches, "w") if args.dump_batches else None
    started = time.perf_counter()
    with tokenizer_pool(tokenizer, args) as pool:
        batches = background_batches(texts, pool, max(1, args.num_workers), (global_batch,), args.prefetch)
        for batch in itertools.islice(batches, args.dry_run):
            counts.update(batch.text.sources)
            if dump:
                rows = [{"source": name, "texts": list(t)} for name, t in batch.text.rows]
                dump.write(json.dumps({"step": batch.text.step, "rows": rows}) + "\n")
        batches.close()
    seconds = time.perf_counter() - started
    if dump:
        dump.close()
    print(f"{args.dry_run} batches of {global_batch} rows in {seconds:.1f}s: "
          f"{args.dry_run * global_batch / seconds:,.0f} rows/s")
    print(f"{'source':60} {'batches':>8} {'invalid':>8} {'duplicate':>9}")
    for s in sources:
        print(f"{s.name:60} {counts[s.name]:8d} {s.invalid:8d} {s.duplicate:9d}")


# ============================================================================================
# Model & loss
# ============================================================================================

AXIS = "devices"  # the pmap axis: one entry per device of the global batch


def load_tokenizer_and_config(args):
    """The cheap half of --model, checked before any weights are loaded."""
    try:
        config = AutoConfig.from_pretrained(args.model)
        tokenizer = AutoTokenizer.from_pretrained(args.model, use_fast=True)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {args.model}: cannot load it ({first_line(e)})")
    if not tokenizer.is_fast:
        raise UserError(f"--model {args.model}: has no fast (Rust) tokenizer")
    # RoBERTa-style models start positions after the padding index
    offset = config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta") else 0
    positions = config.max_position_embeddings - offset
    if args.max_length > positions:
        raise UserError(f"--max_length {args.max_length} exceeds the {positions} positions of {args.model}")
    if args.dropout is not None:
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
            if hasattr(config, name):
                setattr(config, name, args.dropout)
    return tokenizer, config


def load_model(args, config):
    """FlaxAutoModel from a Hub name or folder; PyTorch-only `model.safetensors` loads without torch."""
    try:
        return FlaxAutoModel.from_pretrained(args.model, config=config)
    except OSError as e:
        if "from_pt=True" not in str(e):
            raise UserError(f"--model {args.model}: cannot load its weights ({first_line(e)})")
    try:  # only pytorch_model.bin: converting it needs torch
        import torch  # noqa: F401
    except ImportError:
        raise UserError(f"--model {args.model}: has only pytorch_model.bin weights, which need torch to "
                        "convert; pip install torch, or save the model as model.safetensors")
    return FlaxAutoModel.from_pretrained(args.model, config=config, from_pt=True)


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def embed(model, params, input_ids, attention_mask, dropout_key=None):
    """Mean of the last hidden states over the attention mask, L2-normalised (dropout if a key)."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask, params=params,
                   dropout_rng=dropout_key, train=dropout_key is not None)[0]
    mask = attention_mask[..., None].astype(jnp.float32)
    mean = (hidden.astype(jnp.float32) * mask).sum(-2) / jnp.maximum(mask.sum(-2), 1e-9)
    # the eps of torch.nn.functional.normalize, as sentence-transformers' Normalize module uses
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def cross_entropy_of_partners(queries, candidates, labels, scale):
    """Mean cross-entropy of picking candidates[labels[i]] for queries[i] by scaled cosine."""
    scores = scale * queries @ candidates.T
    true_scores = jnp.take_along_axis(scores, labels[:, None], axis=-1)[:, 0]
    return (jax.nn.logsumexp(scores, axis=-1) - true_scores).mean()


def in_batch_loss(embeddings, scale, symmetric):
    """This device's share of the loss over the global batch; called inside pmap over AXIS.

    embeddings: this device's [anchors, positives] or [anchors, positives, negatives], each
    [per_device, dim]. Every anchor is scored against the positives (and negatives) of all devices.
    """
    gather = functools.partial(jax.lax.all_gather, axis_name=AXIS, tiled=True)
    anchors, positives = embeddings[:2]
    # the true partner of local anchor i is global row (device index * per_device + i)
    labels = jax.lax.axis_index(AXIS) * len(anchors) + jnp.arange(len(anchors))
    candidates = jnp.concatenate([gather(e) for e in embeddings[1:]])
    loss = cross_entropy_of_partners(anchors, candidates, labels, scale)
    if symmetric and len(embeddings) == 2:
        loss = (loss + cross_entropy_of_partners(positives, gather(anchors), labels, scale)) / 2
    return loss


# ============================================================================================
# Optimizer & update step
# ============================================================================================

def learning_rate_schedule(args):
    """Linear warm-up to --lr over --warmup_steps, then linear decay to 0 at --steps."""
    warmup = optax.linear_schedule(0.0, args.lr, max(args.warmup_steps, 1))
    decay = optax.linear_schedule(args.lr, 0.0, max(args.steps - args.warmup_steps, 1))
    return optax.join_schedules([warmup, decay], [args.warmup_steps])


def decays(params):
    """Weight decay applies to weight matrices and embeddings, not to biases or LayerNorm."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({
        path: path[-1] != "bias" and not any("layernorm" in p.lower().replace("_", "") for p in path)
        for path in flat})


def make_optimizer(args):
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        # eps 1e-6: transformers' AdamW, which the published script used
        optax.adamw(learning_rate_schedule(args), b1=0.9, b2=0.999, eps=1e-6,
                    weight_decay=args.weight_decay, mask=decays))


def make_train_step(model, args, devices):
    """The pmapped update: (state, columns, dropout key) -> (new state, measurements).

    Gradient reduction: device d computes L_d, the mean loss of its own anchors against the
    gathered global batch. The transpose of all_gather is a reduce-scatter, so the gradient
    that reaches device d's embeddings is that of sum_d' L_d' (every device's loss that used
    them), and device d's parameter gradient is the gradient of sum_d' L_d' through its own
    examples. Summing over devices gives d(sum_d' L_d')/d(params) in full; pmean (sum / D)
    gives the gradient of the global mean loss: the update of one device on the whole batch.
    """
    schedule = learning_rate_schedule(args)

    def train_step(state, columns, dropout_key):
        make_train_step.traces += 1  # runs only when jax traces (and compiles) the step
        key = jax.random.fold_in(jax.random.fold_in(dropout_key, state.step), jax.lax.axis_index(AXIS))

        def loss_fn(params):
            keys = jax.random.split(key, len(columns))
            embeddings = [embed(model, params, ids, mask, k) for (ids, mask), k in zip(columns, keys)]
            return in_batch_loss(embeddings, args.scale, args.symmetric_loss)

        lr = schedule(state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        grads = jax.lax.pmean(grads, AXIS)
        loss = jax.lax.pmean(loss, AXIS)
        grad_norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree_util.tree_leaves(grads)))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updated = state.apply_gradients(grads=grads)
        # a non-finite step leaves parameters and moments untouched; only the counter moves on
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        state = updated.replace(params=jax.tree_util.tree_map(keep, updated.params, state.params),
                                opt_state=jax.tree_util.tree_map(keep, updated.opt_state, state.opt_state))
        return state, {"loss": loss, "grad_norm": grad_norm, "lr": lr,
                       "finite": finite}

    make_train_step.traces = 0
    return jax.pmap(train_step, axis_name=AXIS, devices=devices, donate_argnums=0)


def devices_of_all_processes(local_devices):
    """The devices of the whole run: every process's first len(local_devices), grouped by process.

    Grouped so that the pmap positions of process p's devices are the rows of the global batch
    it reads (text_batches' local range); a single process gets its own devices back."""
    count = len(local_devices)
    return [d for p in range(jax.process_count()) for d in jax.local_devices(process_index=p)[:count]]


def device_sharding(devices):
    """The layout pmap takes its inputs and gives its outputs in: the leading axis over the devices.

    Inputs already in this layout (the state, every batch) never make the step recompile. With
    several processes the mesh spans all their devices, each process supplies the rows of its own
    devices, and pmap hands back this process's rows only; those go back in as they are."""
    return jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)),
                                      jax.sharding.PartitionSpec(AXIS))


def to_devices(tree, sharding):
    """Host arrays [local devices, ...] -> one global array per leaf, laid out for pmap."""
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def first_local_replica(tree):
    """The copy held by this process's first device of every replicated leaf (no cross-host fetch)."""
    return jax.tree_util.tree_map(lambda x: x.addressable_data(0)[0], tree)


def replicate(tree, sharding, local_devices):
    return to_devices(jax.tree_util.tree_map(lambda x: np.broadcast_to(x, (local_devices, *np.shape(x))), tree),
                      sharding)


def init_state(model, args):
    return train_state.TrainState.create(apply_fn=model.__call__, params=model.params,
                                         tx=make_optimizer(args))


# ============================================================================================
# Export: a sentence-transformers folder, written from the Flax parameters (no torch needed)
# ============================================================================================

# Model types whose Flax parameter tree mirrors the PyTorch module names (kernel/scale/embedding
# aside), so the mapping below is exact; checked by loading the result with transformers.
EXPORTABLE = ("bert", "roberta", "xlm-roberta")


def torch_state_dict(params):
    """Flax parameters -> PyTorch `AutoModel` names and layouts, as float32 numpy arrays."""
    state = {}
    for path, value in traverse_util.flatten_dict(params).items():
        *module, leaf = path
        value = np.asarray(value, dtype=np.float32)
        if leaf == "kernel":  # flax Dense is [in, out]; torch Linear.weight is [out, in]
            value = value.T
        leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
        state[".".join([*module, leaf])] = np.ascontiguousarray(value)
    return state


def export_sentence_transformer(folder, params, config, tokenizer, args, run):
    """Writes a folder that `SentenceTransformer(folder)` loads: Transformer -> mean Pooling -> Normalize."""
    os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
    os.makedirs(os.path.join(folder, "2_Normalize"), exist_ok=True)
    save_file(torch_state_dict(params), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = config.__class__.from_dict(config.to_dict())
    config.architectures = [config.model_type.title().replace("-", "").replace("Xlm", "XLM") + "Model"]
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_json(os.path.join(folder, "modules.json"), [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}])
    write_json(os.path.join(folder, "sentence_bert_config.json"),
               {"max_seq_length": args.max_length, "do_lower_case": False})
    write_json(os.path.join(folder, "1_Pooling", "config.json"), {
        "word_embedding_dimension": config.hidden_size, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False, "include_prompt": True})
    write_json(os.path.join(folder, "config_sentence_transformers.json"), {
        "__version__": {"sentence_transformers": "2.0.0", "transformers": transformers.__version__,
                        "jax": jax.__version__},
        "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"})
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(model_card(config, args, run))


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def model_card(config, args, run):
    """A sentence-transformers style model card describing this run."""
    total_weight = sum(e["weight"] for e in run["mixture"])
    sources = "\n".join(
        f"| {e['name']} | {e.get('lines', 0):,} | {e['weight']} | {e['weight'] / total_weight:.2%} |"
        for e in run["mixture"])
    loss = ("symmetric in-batch cross-entropy (anchor->positive and positive->anchor, averaged)"
            if args.symmetric_loss else "in-batch cross-entropy (anchor->candidates)")
    name = os.path.basename(os.path.normpath(args.output))
    versions = ", ".join(f"{k} {v}" for k, v in run["versions"].items())
    return f"""---
pipeline_tag: sentence-similarity
library_name: sentence-transformers
tags:
- sentence-transformers
- feature-extraction
- sentence-similarity
base_model: {args.model}
---

# {name}

A [sentence-transformers](https://www.sbert.net) model: it maps sentences and paragraphs to a
{config.hidden_size}-dimensional dense vector space (mean pooling, L2-normalised), for semantic search,
clustering and similarity. It was trained with `train_script.py` (JAX/Flax), the reproduction of
how all-MiniLM-L12-v1 was trained; this export is from step {run['step']:,} of {args.steps:,}.

## Usage (sentence-transformers)

```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("{name}")
embeddings = model.encode(["This is an example sentence", "Each sentence is converted"])
```

## Usage (transformers)

```python
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{name}")
model = AutoModel.from_pretrained("{name}")
batch = tokenizer(["This is an example sentence"], padding=True, truncation=True,
                  max_length={args.max_length}, return_tensors="pt")
with torch.no_grad():
    hidden = model(**batch).last_hidden_state
mask = batch["attention_mask"].unsqueeze(-1).float()
embeddings = F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), p=2, dim=1)
```

## Training

| | |
|---|---|
| base model | `{args.model}` |
| steps | {run['step']:,} of {args.steps:,} |
| global batch | {run['global_batch']:,} ({args.batch_size} per device x {run['devices']} devices) |
| sources per batch | {args.datasets_per_batch} |
| learning rate | {args.lr} (AdamW, weight decay {args.weight_decay}, linear warm-up over {args.warmup_steps} steps, then linear decay to 0) |
| gradient clipping | global norm 1.0 |
| max sequence length | {args.max_length} word pieces |
| loss | {loss}, scale {args.scale}, candidates gathered over all devices |
| seed | {args.seed} |

Command:

```
{run['command']}
```

Libraries: {versions}.

### Data

Each batch draws its sources with probability weight / {total_weight:,} (the share below).

| source | lines | weight | share of batches |
|---|---:|---:|---:|
{sources}
"""


def start_run_record(args, entries, output):
    """As the original did: a copy of this script with the command appended, and the config used."""
    command = " ".join(["python", *sys.argv]) if sys.argv[0].endswith(".py") else " ".join(sys.argv)
    shutil.copyfile(__file__, os.path.join(output, "train_script.py"))
    with open(os.path.join(output, "train_script.py"), "a") as f:
        f.write(f"\n\n# Script was called via:\n# {command}\n")
    write_json(os.path.join(output, "data_config.json"), entries)
    return command


# ============================================================================================
# Train loop
# ============================================================================================

MAX_BAD_STEPS = 5  # non-finite steps in a row before the run stops


def train(args, model, tokenizer, config, sources, entries, devices):
    process, processes = jax.process_index(), jax.process_count()
    global_batch = args.batch_size * len(devices) * processes
    local_batch = args.batch_size * len(devices)
    writer = process == 0
    command = start_run_record(args, entries, args.output) if writer else None
    versions = {m.__name__: m.__version__ for m in (jax, flax, optax, transformers)}

    sharding = device_sharding(devices_of_all_processes(devices))
    state = replicate(init_state(model, args), sharding, len(devices))
    train_step = make_train_step(model, args, devices_of_all_processes(devices))
    dropout_key = replicate(jax.random.PRNGKey(args.seed), sharding, len(devices))
    texts = text_batches(sources, args, global_batch,
                         (process * local_batch, (process + 1) * local_batch), (process, processes))

    def export(step):
        if writer:
            params = jax.device_get(first_local_replica(state.params))
            run = {"step": step, "global_batch": global_batch, "devices": len(devices) * processes,
                   "mixture": entries, "command": command, "versions": versions}
            folder = os.path.join(args.output, "final" if step == args.steps else str(step))
            export_sentence_transformer(folder, params, config, tokenizer, args, run)

    with tokenizer_pool(tokenizer, args) as pool:
        batches = background_batches(texts, pool, max(1, args.num_workers),
                                     (len(devices), args.batch_size), args.prefetch)

        def next_batch():
            batch = next(batches)
            return batch, to_devices(batch.columns, sharding)

        window, waited, window_start = [], 0.0, time.perf_counter()
        bar = tqdm.trange(0, args.steps, disable=not writer, dynamic_ncols=True)
        batch, columns = next_batch()
        for step in bar:
            state, measured = train_step(state, columns, dropout_key)
            window.append((batch.text, measured))
            if step + 1 < args.steps:  # the host prepares the next batch while the step runs
                wait_start = time.perf_counter()
                batch, columns = next_batch()
                waited += time.perf_counter() - wait_start
            if (step + 1) % args.log_steps == 0 or step + 1 == args.steps:
                log_window(bar, window, waited, time.perf_counter() - window_start, global_batch)
                window, waited, window_start = [], 0.0, time.perf_counter()
            if (step + 1) % args.save_steps == 0 and step + 1 < args.steps:
                export(step + 1)
        export(args.steps)
        batches.close()
    if writer:
        print(f"done: {args.steps} steps; the step was compiled {make_train_step.traces} time(s); "
              f"model in {os.path.join(args.output, 'final')}")


def log_window(bar, window, waited, seconds, global_batch):
    """Fetches the window's measurements (the only host sync) and reports them."""
    measured = jax.device_get([m for _, m in window])
    bad_in_a_row = 0
    for (text, _), m in zip(window, measured):
        bad_in_a_row = 0 if m["finite"][0] else bad_in_a_row + 1
        if bad_in_a_row >= MAX_BAD_STEPS:
            raise RuntimeError(f"{MAX_BAD_STEPS} non-finite losses in a row, the last at step {text.step + 1} "
                               f"(sources {', '.join(text.sources)}); updates were skipped")
    losses = [float(m["loss"][0]) for m in measured if m["finite"][0]]
    last = measured[-1]
    line = {"step": window[-1][0].step + 1, "loss": np.mean(losses) if losses else float("nan"),
            "lr": float(last["lr"][0]), "grad_norm": float(last["grad_norm"][0]),
            "pairs/s": len(window) * global_batch / seconds, "data_wait": waited / seconds,
            "skipped": len(measured) - len(losses)}
    if bar.disable:  # processes other than 0 check the losses but log nothing
        return
    bar.set_postfix(loss=f"{line['loss']:.4f}", lr=f"{line['lr']:.2e}",
                    pairs_s=f"{line['pairs/s']:.0f}", wait=f"{line['data_wait']:.0%}")
    bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in line.items()))


# ============================================================================================
# Main: cheap checks first, then the model, then the run
# ============================================================================================

def choose_devices(args):
    local = jax.local_devices()
    count = args.nprocs or len(local)
    if count > len(local):
        raise UserError(f"--nprocs {count} but only {len(local)} {local[0].platform} device(s) are present; "
                        f"on CPU, emulate {count} with XLA_FLAGS=--xla_force_host_platform_device_count={count}")
    return local[:count]


def split_cpu(args):
    """--cpu_devices: must run before anything asks jax for devices."""
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)


def join_processes(args):
    """Multi-host: connects this process to the others; must run before anything asks jax for devices."""
    if not (args.multihost or args.coordinator_address):
        return
    # CPU devices need a collectives library to reach other processes; GPU and TPU ignore this
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"--multihost: cannot join the other processes ({first_line(e)})")


def prepare_output(args):
    if os.path.exists(args.output) and os.listdir(args.output):
        if not args.overwrite:
            raise UserError(f"{args.output} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(args.output)
    os.makedirs(args.output, exist_ok=True)


def prepare_output_on_process_0(args):
    """Process 0 alone checks and (re)creates OUTPUT; the others wait for it and share its verdict."""
    problem = None
    if jax.process_index() == 0:
        try:
            prepare_output(args)
        except UserError as e:
            problem = e
    ready = multihost_utils.broadcast_one_to_all(np.int32(problem is None))  # a barrier too
    if problem:
        raise problem
    if not ready:
        raise UserError(f"process 0 could not prepare {args.output} (its error says why)")


def main(argv=None):
    args = parse_args(argv)
    split_cpu(args)
    join_processes(args)
    entries = load_data_config(args.data_config)
    devices = choose_devices(args)
    global_batch = args.batch_size * len(devices) * jax.process_count()
    if global_batch % args.datasets_per_batch:
        raise UserError(f"the global batch of {global_batch} (--batch_size {args.batch_size} x "
                        f"{len(devices) * jax.process_count()} devices) cannot be split into "
                        f"--datasets_per_batch {args.datasets_per_batch} equal shares")
    sources = open_sources(entries, args)
    tokenizer, config = load_tokenizer_and_config(args)
    if args.dry_run is not None:
        return dry_run(sources, args, tokenizer, global_batch)
    if config.model_type not in EXPORTABLE:
        raise UserError(f"--model {args.model}: export supports {', '.join(EXPORTABLE)}, "
                        f"not {config.model_type}")
    prepare_output_on_process_0(args)
    model = load_model(args, config)
    train(args, model, tokenizer, config, sources, entries, devices)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
