"""Train all-MiniLM-L12-v1 the way it was trained: JAX/Flax, pmap, in-batch contrastive loss.

    python train_script.py data_config.json OUTPUT [--flags]

The published run is the default of every flag: microsoft/MiniLM-L12-H384-uncased, 540k steps, 128 pairs per
device on 8 devices (a global batch of 1024), 128 word pieces, AdamW at 2e-5 with 500 warm-up steps, mean pooling,
scale 20. Each step takes its global batch from one source of data_config.json, drawn in proportion to its weight
(as the published script: `--mixing`), scores every anchor against every candidate of the global batch (embeddings
gathered over all devices) and minimises the cross-entropy of the true partner. OUTPUT/final is a sentence-transformers
model.

Sections, in the order of the work: arguments, devices, data, input pipeline, model & loss, update step, evals, export,
OUTPUT, checkpoints, stopping, train loop, compiling for a TPU, main. Its copy in OUTPUT records how the model was made.
"""

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import functools
import gzip
import importlib
import itertools
import json
import logging
import math
import multiprocessing
import multiprocessing.resource_tracker
import os
import platform
import posixpath
import queue
import shlex
import shutil
import signal
import socket
import stat
import sys
import threading
import time
import zlib
from typing import NamedTuple

import flax
import fsspec
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
import orbax.checkpoint as ocp
import safetensors
import tensorboardX
import tokenizers
import tqdm
import transformers
from flax import traverse_util
from flax.training import train_state
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from jax.experimental import multihost_utils
from safetensors.numpy import save_file
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoTokenizer, FlaxAutoModel

# Dropout masks from the RBG generator rather than threefry: the same keys-in, bits-out contract (splits and
# fold_ins stay safe), and on CPU the step is ~15% faster (scripts/benchmark.py); on TPU, the hardware generator's.
jax.config.update("jax_default_prng_impl", "rbg")

# transformers 4.57.6 (pinned; v5 has no Flax models) logs a deprecation for every Flax model: only that is dropped.
logging.getLogger("transformers.modeling_flax_utils").addFilter(
    lambda record: not record.getMessage().startswith("TensorFlow and JAX classes are deprecated"))


class UserError(Exception):
    """A problem with the command line, the data or the model: reported as one line, exit 2."""


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


# ============================================================================================
# Arguments
# ============================================================================================

def checked(kind, condition, requirement):
    """An argparse type: the flag's text as `kind`, refused unless finite and `condition` holds."""
    def parse(text):
        with contextlib.suppress(ValueError, OverflowError):  # not a number; an integer past float's range
            if math.isfinite(value := kind(text)) and condition(value):
                return value
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
    return parse


COUNT = checked(int, lambda n: n >= 1, "at least 1 (a whole number)")
NATURAL = checked(int, lambda n: n >= 0, "0 or more (a whole number)")
POSITIVE = checked(float, lambda x: x > 0, "a finite number above 0")
NON_NEGATIVE = checked(float, lambda x: x >= 0, "a finite number of 0 or more")
PROBABILITY = checked(float, lambda x: 0 <= x < 1, "a number in [0, 1)")


def hub_id(text):
    """--base_model must be a name the Hub accepts in the card's metadata."""
    try:
        validate_repo_id(text)
    except HFValidationError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a Hub model name (OWNER/NAME)")
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], exit_on_error=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data_config", help="JSON list of {name, lines, weight}: the sources and their weights")
    p.add_argument("output", help="folder for the exported models, checkpoints and logs")

    run = p.add_argument_group("what the run computes (a resumed run must repeat these)")  # a checkpoint records them
    run.add_argument("--model", default="microsoft/MiniLM-L12-H384-uncased", help="Hub name or folder to start from")
    run.add_argument("--steps", type=COUNT, default=540_000,
                     help="training steps; a --resume may change it (and --schedule_steps): a finished run goes on")
    run.add_argument("--batch_size", type=COUNT, default=128, help="pairs per device; global batch = this x devices")
    run.add_argument("--mini_batch_size", type=COUNT, default=None,
                     help="GradCache: embed and back-propagate this many rows of a device's batch at a time (same "
                          "gradients, activation memory of this many rows); None: the whole batch in one pass")
    run.add_argument("--max_length", type=COUNT, default=128, help="truncate every text to this many word pieces")
    run.add_argument("--pad_to_buckets", type=bucket_list, default=None, metavar="L1,L2,...",
                     help="pad each column to the smallest of these lengths that fits its longest text "
                          "(--max_length is the last); None: always to --max_length")
    run.add_argument("--mixing", choices=["original", "per_batch"], default="original",
                     help="original (the published script): each global batch from one source; a round draws "
                          "--datasets_per_batch sources of one column count, each filling devices / "
                          "--datasets_per_batch steps (rounded down, at least 1), no text twice in a round. per_batch: "
                          "each batch in --datasets_per_batch equal shares drawn anew, no text twice in a batch")
    run.add_argument("--datasets_per_batch", type=COUNT, default=2, help="sources drawn per round (or per batch)")
    run.add_argument("--data_order", choices=["original", "shuffled"], default="original",
                     help="original (the published script): every file's first pass in file order, later passes "
                          "of the files kept in RAM shuffled whole, of the others in file order. shuffled: every "
                          "pass shuffled in blocks of --shuffle_buffer lines")
    run.add_argument("--shuffle_buffer", type=COUNT, default=10_000, help="lines read (and shuffled) together")
    run.add_argument("--cache_small_sources", type=NATURAL, default=None,
                     help="keep files whose config \"lines\" is below this in RAM from their first pass on, and "
                          "reshuffle them whole every later pass (the RAM it takes is printed) (default: %(default)s, "
                          "which is 10000000 with --data_order original, as the published script, and 0 with shuffled)")
    run.add_argument("--scale", type=POSITIVE, default=20.0, help="cosine similarities are multiplied by this")
    run.add_argument("--symmetric_loss", action=argparse.BooleanOptionalAction, default=True,
                     help="for pairs, average the anchor->positive and positive->anchor cross-entropies")
    run.add_argument("--lr", type=NON_NEGATIVE, default=2e-5, help="peak learning rate of AdamW")
    run.add_argument("--warmup_steps", type=NATURAL, default=500, help="linear warm-up steps, then linear decay to 0")
    run.add_argument("--schedule_steps", type=COUNT, default=None,
                     help="the step at which the decay reaches lr 0 (a run may stop before it); None: --steps")
    run.add_argument("--weight_decay", type=NON_NEGATIVE, default=0.0,
                     help="AdamW's decoupled weight decay, not on biases and LayerNorm (the published script: none)")
    run.add_argument("--clip_scope", choices=["device", "global"], default="device",
                     help="device: clip each device's share of the gradient to norm 1, then average (the published "
                          "script's cores); global: average, then clip the whole gradient to norm 1")
    run.add_argument("--dropout", type=PROBABILITY, default=None,
                     help="override the model's dropout probabilities; None: keep the checkpoint's")
    run.add_argument("--attention_dropout", choices=["element", "shared"], default="element",
                     help="element: independent draws per example, head and position (PyTorch, the published run); "
                          "shared: transformers' Flax default, one mask per layer for a device's examples and heads")
    run.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                     help="activations and matmuls; parameters, optimizer and loss stay float32")
    run.add_argument("--seed", type=checked(int, lambda n: 0 <= n < 2**63, "a whole number from 0 to 2**63 - 1"),
                     default=42, help="seeds data order, dropout and source choice")

    p.add_argument("--data_folder", default="data",
                   help="folder or fsspec URL (gs://..., hf://datasets/...) the config's names are relative to")
    p.add_argument("--base_model", type=hub_id, default=None, metavar="OWNER/NAME",
                   help="the Hub name the model card gives a local --model folder (a folder of the Hugging Face "
                        "cache names itself); None: the card names none")
    p.add_argument("--save_steps", type=COUNT, default=10_000,
                   help="export to OUTPUT/<step> and checkpoint to OUTPUT/checkpoints/<step> every this many steps")
    p.add_argument("--keep_checkpoints", type=COUNT, default=2, help="newest checkpoints kept; exports are all kept")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the newest readable checkpoint in OUTPUT (start afresh if there is none)")
    start.add_argument("--overwrite", action="store_true",
                       help="replace an existing OUTPUT's run, kept in OUTPUT/.replaced until the new run's first step")
    p.add_argument("--resume_force", action="store_true",
                   help="with --resume: continue even if data, model or batch flags differ from the checkpoint's")
    p.add_argument("--log_steps", type=COUNT, default=100, help="fetch and print loss/lr every this many steps")
    p.add_argument("--eval_steps", type=NATURAL, default=0,
                   help="score held-out rows of every source by in-batch retrieval every this many steps, at the "
                        "start and at the end; 0: off, and no row is held out")
    p.add_argument("--eval_rows", type=checked(int, lambda n: n >= 2, "at least 2 (a row is ranked against others)"),
                   default=1000, help="with --eval_steps: the first this many lines of each file, held out of training")
    p.add_argument("--nprocs", type=COUNT, default=None, help="devices to use; None: all local devices")
    p.add_argument("--cpu_devices", type=COUNT, default=None,
                   help="without an accelerator, split the CPU into this many devices (one per core runs about cores "
                        "x faster); None: XLA_FLAGS' --xla_force_host_platform_device_count, else 1")
    p.add_argument("--num_workers", type=NATURAL, default=min(4, max(1, (os.cpu_count() or 2) // 2)),
                   help="tokenizer processes, one core each; 0: a thread of the trainer (default: %(default)s, half "
                        "this host's cores but at most 4, which keeps a TPU v3-8 fed)")
    p.add_argument("--prefetch", type=COUNT, default=4, help="tokenized batches kept ready ahead of the step")
    p.add_argument("--batch_timeout", type=NON_NEGATIVE, default=300,
                   help="seconds to wait for a batch, then name the stuck worker, checkpoint, exit 1; 0: wait forever")
    p.add_argument("--dry_run", type=COUNT, default=None, metavar="N",
                   help="stream N global batches without a model, print source counts and throughput, exit")
    p.add_argument("--compile_for", default=None, metavar="TPU",
                   help="compile the run's steps for a TPU slice (v3-8, v4-8, v5e-8, v6e-8, v5p-8, ... or a "
                        "topology such as v3:2x2) on this machine, without one; print their HBM, FLOPs and a lower "
                        "bound on the run's time, exit (needs libtpu)")
    p.add_argument("--dump_batches", default=None, metavar="FILE",
                   help="with --dry_run: each global batch's texts and sources as a JSON line (never over an input)")
    p.add_argument("--multihost", action="store_true",
                   help="join the other hosts (each runs the same command) with jax.distributed.initialize(), which "
                        "finds them on Cloud TPU pods, SLURM and Open MPI; elsewhere give the three flags below")
    p.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                   help="multi-host: process 0's address, the same on every host (implies --multihost)")
    p.add_argument("--num_processes", type=COUNT, default=None, help="multi-host: how many processes join")
    p.add_argument("--process_id", type=NATURAL, default=None, help="multi-host: this process's index, 0 .. N-1")
    p.add_argument("--join_timeout", type=POSITIVE, default=300,
                   help="multi-host: seconds to wait for every process to join, then stop naming who is missing")
    try:
        args = p.parse_args(argv)
    except argparse.ArgumentError as e:  # a bad value: one line, as every other UserError
        raise UserError(f"{e.argument_name} {e.message}") from None
    args.run_flags = [action.dest for action in run._group_actions]  # what a checkpoint records
    args.command = shlex.join(["python", *sys.argv] if argv is None else ["python", "train_script.py", *argv])
    check_combinations(args, p)
    return args


def check_combinations(args, parser):
    """What the flags' types cannot see alone (against the devices: check_batch_split); fills dependent defaults."""
    # A smoke test may keep the card's warm-up; one typed beyond --steps would leave the lr short of --lr all run.
    if args.warmup_steps > args.steps and args.warmup_steps != parser.get_default("warmup_steps"):
        raise UserError(f"--warmup_steps {args.warmup_steps} exceeds --steps {args.steps}")
    if args.cache_small_sources is None:
        args.cache_small_sources = 10_000_000 if args.data_order == "original" else 0
    args.schedule_steps = args.schedule_steps or args.steps
    if args.schedule_steps < args.steps:
        raise UserError(f"--schedule_steps {args.schedule_steps} is below --steps {args.steps}: the lr would be 0 "
                        "from there on")
    if args.mini_batch_size and args.batch_size % args.mini_batch_size:
        raise UserError(f"--mini_batch_size {args.mini_batch_size} must divide --batch_size {args.batch_size}")
    if args.max_length < 3:
        raise UserError(f"--max_length {args.max_length} leaves no room for a word piece after [CLS] and [SEP]: "
                        "pass at least 3")
    args.pad_to_buckets = bucket_lengths(args.pad_to_buckets, args.max_length)
    if args.dump_batches and args.dry_run is None:
        raise UserError("--dump_batches only works with --dry_run N")
    if args.resume_force and not args.resume:
        raise UserError("--resume_force only works with --resume")
    args.multihost = args.multihost or bool(args.coordinator_address)
    if (args.num_processes is not None or args.process_id is not None) and not args.multihost:
        raise UserError("--num_processes and --process_id need --coordinator_address (or --multihost)")
    if args.num_processes and args.process_id is not None and args.process_id >= args.num_processes:
        raise UserError(f"--process_id {args.process_id} must be below --num_processes {args.num_processes}")


def bucket_list(text):
    """An argparse type: --pad_to_buckets "32,64" -> (32, 64), positive and increasing."""
    try:
        buckets = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: expected comma-separated lengths such as 32,64,128")
    if any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise argparse.ArgumentTypeError(f"{text}: lengths must be positive and increasing")
    return buckets


def bucket_lengths(buckets, max_length):
    """--pad_to_buckets (32, 64) -> (32, 64, max_length): ending at --max_length (None: that alone)."""
    if buckets is None:
        return (max_length,)
    if buckets[-1] > max_length:
        raise UserError(f"--pad_to_buckets {','.join(map(str, buckets))}: {buckets[-1]} exceeds --max_length "
                        f"{max_length}")
    return buckets if buckets[-1] == max_length else (*buckets, max_length)


# ============================================================================================
# Devices: the processes of the run and their devices
# ============================================================================================
# Every process runs the same command on its own devices; pmap spans the devices of all of them.

def join_processes(args):
    """Multi-host: connects this process to the others; must run before anything asks jax for devices."""
    if not args.multihost:
        return
    # CPU devices need a collectives library to reach other processes; GPU and TPU ignore this
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # jax's preemption service would take SIGTERM from handle_stop_signals, which agrees a stop step as for SIGINT
    jax.config.update("jax_enable_preemption_service", False)
    address, count, me = args.coordinator_address, args.num_processes, args.process_id
    if address:
        print(f"joining {count or 'all'} processes at {address}" + ("" if me is None else f" as process {me}") +
              f"; waiting up to {args.join_timeout:g}s (--join_timeout)", flush=True)

    def give_up():  # jax's own timeout aborts with a C++ stack trace: this one comes first, in one line
        print(f"error: --join_timeout {args.join_timeout:g}: {who_is_missing(address, count, me)}; start the "
              "same command on every host, each with its --process_id", file=sys.stderr, flush=True)
        os._exit(2)
    timer = threading.Timer(args.join_timeout, give_up)
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(address, count, me, initialization_timeout=math.ceil(args.join_timeout) + 60)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"--multihost: cannot join the other processes ({first_line(e)})")
    finally:
        timer.cancel()


def who_is_missing(address, count, me):
    """The processes that did not join, as far as this one can tell."""
    if not address or me == 0:
        others = "process 1" if count == 2 else f"some of processes 1 .. {count - 1}" if count else "a process"
        return f"{others} did not join" + (f" the coordinator at {address} (this process)" if address else "")
    with contextlib.suppress(OSError, ValueError), socket.create_connection(
            (address.rpartition(":")[0].strip("[]"), int(address.rpartition(":")[2])), timeout=5):
        return f"the coordinator at {address} answers, but not all of the {count} processes joined it"
    return f"process 0, the coordinator at {address}, does not answer"


def choose_devices(args):
    """This process's devices (--nprocs of them), refused with the flags that do not fit their number."""
    local = jax.local_devices()
    count = args.nprocs or len(local)
    if count > len(local):
        raise UserError(f"--nprocs {count} but only {len(local)} {local[0].platform} device(s) are present; "
                        f"on CPU, emulate {count} with XLA_FLAGS=--xla_force_host_platform_device_count={count}")
    check_batch_split(args, count * jax.process_count(), jax.process_count())
    return local[:count]


def check_batch_split(args, device_count, processes):
    """Refuses a global batch without negatives or that --mixing cannot fill (`device_count`: every process's)."""
    if len(args.pad_to_buckets) > 1 and processes > 1:  # each process tokenizes, and pads, only its own rows
        raise UserError("--pad_to_buckets works on one process only (processes would pad to different lengths)")
    global_batch = args.batch_size * device_count
    if global_batch < 2:  # its loss and gradient would be 0
        raise UserError(f"a global batch of 1 pair (--batch_size {args.batch_size} x {device_count} device) has no "
                        "in-batch negatives: pass --batch_size 2 or more")
    if args.mixing == "per_batch" and global_batch % args.datasets_per_batch:
        raise UserError(f"the global batch of {global_batch} (--batch_size {args.batch_size} x {device_count} devices) "
                        f"cannot be split into --datasets_per_batch {args.datasets_per_batch} equal shares")


def devices_of_all_processes(local_devices):
    """Every process's first len(local_devices) devices, by process: p's pmap positions are the rows p reads."""
    return [d for p in range(jax.process_count()) for d in jax.local_devices(process_index=p)[:len(local_devices)]]


def local_rows(args, local_devices):
    """(first, end) rows of the global batch that this process reads: those of its devices' pmap positions."""
    local_batch = args.batch_size * len(local_devices)
    return jax.process_index() * local_batch, (jax.process_index() + 1) * local_batch


def device_sharding(devices):
    """pmap's layout of inputs and outputs: the leading axis over the devices. Inputs in it (the state, every batch)
    never make the step recompile. Over several processes the mesh spans all their devices, each process supplies its
    own devices' rows, and pmap hands back this process's rows only, which go back in as they are."""
    return jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)), jax.sharding.PartitionSpec(AXIS))


def to_devices(tree, sharding):
    """Host arrays [local devices, ...] -> one global array per leaf, laid out for pmap."""
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def first_local_replica(tree):
    """The copy held by this process's first device of every replicated leaf (no cross-host fetch)."""
    return jax.tree_util.tree_map(lambda x: x.addressable_data(0)[0], tree)


def replicate(tree, sharding, copies):
    """A copy of `tree` on each of this process's devices (`copies` of them)."""
    return to_devices(jax.tree_util.tree_map(lambda x: np.broadcast_to(x, (copies, *np.shape(x))), tree), sharding)


# ============================================================================================
# Data: the weighted mixture, streamed
# ============================================================================================
# Every source is a gzip'd JSON-lines file, read cyclically in the order --data_order says. Each block of lines has an
# RNG seeded from (seed, source, pass, block) for its order and per-line draws: a source's stream is a pure function of
# seed and file, its position two integers (pass, lines consumed in it), batches reproducible, a resumed run exact.
# With --eval_steps, the first --eval_rows lines of every file are held out: the stream and its positions start after.

def load_data_config(path):
    """The mixture, checked: a JSON list of {"name", "weight", "lines"}."""
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"data config {path}: cannot read it as JSON ({e})")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"data config {path}: expected a non-empty JSON list of sources")
    for i, entry in enumerate(entries):
        where = f"data config {path}, entry {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise UserError(f"{where}: needs a \"name\" (a file relative to --data_folder)")
        where += f" ({entry['name']})"
        if unknown := sorted(set(entry) - {"name", "weight", "lines"}):  # a misspelt "lines" would leave it out of RAM
            raise UserError(f"{where}: unknown key {', '.join(map(repr, unknown))} (the keys are name, weight, lines)")
        weight, lines = entry.get("weight"), entry.get("lines", 0)
        if type(weight) is not int or not 1 <= weight <= 2**53:  # above, float64 probabilities lose it
            raise UserError(f"{where}: \"weight\" must be a positive integer up to 2**53, got {weight!r}")
        if type(lines) is not int or lines < 0:
            raise UserError(f"{where}: \"lines\" must be a non-negative integer, got {lines!r}")
    return entries


def source_url(data_folder, name):
    return data_folder.rstrip("/") + "/" + name


def local_path(url):
    """The local file a URL reads, None for gs://, hf://...; of a chained URL (simplecache::gs://...), the last."""
    protocol, path = fsspec.core.split_protocol(url.split("::")[-1])
    return os.path.abspath(path) if protocol in (None, "file", "local") else None


def parse_row(record, draws):
    """One JSON record of any published format -> a tuple of texts, or None if unusable. `draws`, two uniform numbers
    fixed per line, stand in for the original's random picks (two members of a set, a positive and a negative)."""
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
        elif "context" in record and "response" in record:  # response first, as the original's Reddit reader
            record = [record["response"], record["context"]]
        else:
            return None
    if not isinstance(record, list) or len(record) not in (2, 3):
        return None
    return tuple(record) if all(isinstance(text, str) and text.strip() for text in record) else None


def usable_row(line, draws, columns=None):
    """parse_row of one JSON line; None if the line is not JSON, not a usable row or not of `columns` texts."""
    try:
        row = parse_row(json.loads(line), draws)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the JSON decoder goes
        return None
    return row if row is None or columns is None or len(row) == columns else None


def repeats_a_text(texts, seen, within_row=True):
    """Whether a row repeats a text of `seen` (a text twice among the candidates is a false negative), or with
    `within_row` one of its own texts; the original only compared a row with earlier rows."""
    return not seen.isdisjoint(texts) or (within_row and len(set(texts)) < len(texts))


def open_source(url):
    return fsspec.open(url, "rb", compression="infer")


def read_lines(url, stride, skip=0):
    """This process's lines of a file (every stride[1]-th from stride[0]) after the first `skip`. A corrupt or
    truncated gzip stops the run, naming the file: wrapping around at the damage would change the mixture."""
    try:
        with open_source(url) as f:
            yield from itertools.islice(f, skip + stride[0], None, stride[1])
    except FileNotFoundError:
        raise UserError(f"{url}: no such file (check --data_folder)") from None
    except IsADirectoryError:
        raise UserError(f"{url}: is a folder, not a data file (check its name in the data config)") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise UserError(f"{url}: corrupt or truncated file ({e}); re-download it") from e
    except ImportError as e:  # fsspec knows the protocol; the package that implements it is missing
        raise UserError(f"{url}: {e} (pip install it)") from None
    except ValueError as e:  # fsspec knows no such protocol
        raise UserError(f"{url}: {e} (check --data_folder)") from None
    except OSError as e:  # permission denied, a Hub or bucket out of reach, ...: not the file's fault
        raise UserError(f"{url}: cannot read it ({first_line(e)})") from e


def head_of(url, count=1000):
    """(The first usable row, the mean size of the first `count` lines) of a file that must have one."""
    row, sizes = None, []
    for line in read_lines(url, (0, 1)):
        sizes.append(len(line))
        row = row or usable_row(line, (0.0, 0.5))
        if row is not None and len(sizes) >= count:
            break
    if row is None:
        raise UserError(f"{url}: no usable row in the whole file")
    return row, sum(sizes) / len(sizes)


@dataclasses.dataclass
class Source:
    """One file of the mixture and where its stream stands."""
    name: str
    url: str
    weight: int
    columns: int
    block: int                      # lines read together (and shuffled together with --data_order shuffled)
    file_order: bool = False        # --data_order original
    held_out: int = 0               # first lines of the file, kept out of training for evaluation
    position: tuple = (0, 0)        # (pass over the file, lines consumed in this pass)
    invalid: int = 0                # lines skipped: not JSON, wrong shape, wrong column count
    widths: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # of those of wrong count
    duplicate: int = 0              # rows skipped: a text already in the batch (or round)
    rows: object = None             # the live iterator, opened on first use
    keep_lines: bool = False        # --cache_small_sources: keep the file's lines in RAM from the first pass on
    kept: list = None               # those lines, once read whole

    def next_row(self, seed, stride):
        """The next usable row; counts (and skips) the unusable ones."""
        self.rows = self.rows or self._stream(seed, stride)
        for position, line, draws in self.rows:
            self.position = position
            row = usable_row(line, draws)
            if row is not None and len(row) == self.columns:
                return row
            self.invalid += 1
            if row is not None:
                self.widths[len(row)] += 1

    def _lines(self, stride):
        """This process's lines of the file in file order; from RAM once kept."""
        if self.kept is not None:
            yield from self.kept
            return
        kept = []
        for line in read_lines(self.url, stride, skip=self.held_out):
            if self.keep_lines:
                kept.append(line)
            yield line
        self.kept = kept if self.keep_lines else None

    def _stream(self, seed, stride):
        source_key = zlib.crc32(self.name.encode())
        pass_index, offset = self.position
        while True:
            # --data_order original shuffles only the later passes of a kept file, and that whole
            shuffled = not self.file_order or (self.keep_lines and pass_index > 0)
            size = sys.maxsize if shuffled and self.keep_lines else self.block
            lines, (block_index, skip) = self._lines(stride), divmod(offset, size)
            collections.deque(itertools.islice(lines, block_index * size), maxlen=0)  # the blocks consumed
            while block := list(itertools.islice(lines, size)):
                rng = np.random.default_rng([seed, source_key, pass_index, block_index])
                order = rng.permutation(len(block)) if shuffled else range(len(block))
                draws = rng.random((len(block), 2))
                for k in range(skip, len(block)):
                    yield (pass_index, block_index * size + k + 1), block[order[k]], draws[k]
                block_index, skip = block_index + 1, 0
            if block_index == offset == 0:  # not one line in a whole pass
                raise UserError(f"{self.url}: no lines for this process")
            pass_index, offset = pass_index + 1, 0


def open_sources(entries, args):
    """Checks every file before training starts (exists, has a usable row) and learns its format; refuses to keep
    files in RAM (--cache_small_sources) beyond the machine's, estimated from the config's lines and first lines."""
    urls = [source_url(args.data_folder, e["name"]) for e in entries]
    first = {}  # {a file, every link resolved: the entry that names it first}; one file twice weighs double
    for i, url in enumerate(urls):  # x, ./x, a/../x and a link to x are one file
        if (j := first.setdefault(os.path.realpath(p) if (p := local_path(url)) else posixpath.normpath(url), i)) != i:
            raise UserError(f"data config entry {i} ({entries[i]['name']}) names the file of entry {j} "
                            f"({entries[j]['name']}): list it once")
    if args.cache_small_sources and (unsized := [e["name"] for e in entries if "lines" not in e]):
        print(f"warning: no \"lines\" in the data config for {', '.join(unsized)}: streamed, never kept in RAM "
              "(--cache_small_sources), so its later passes are not reshuffled", file=sys.stderr)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        heads = list(pool.map(head_of, urls))
    sources = [Source(entry["name"], url, entry["weight"], len(row), block=args.shuffle_buffer,
                      file_order=args.data_order == "original",
                      keep_lines=0 < entry.get("lines", 0) < args.cache_small_sources,
                      held_out=args.eval_rows if args.eval_steps else 0)
               for entry, url, (row, _) in zip(entries, urls, heads)]
    # a kept line costs its bytes, a bytes object's header and its slot in the list
    kept = [entry["lines"] * (line_bytes + sys.getsizeof(b"") + 8)
            for entry, source, (_, line_bytes) in zip(entries, sources, heads) if source.keep_lines]
    if kept:
        limit, files, needed = args.cache_small_sources, len(kept), sum(kept) / jax.process_count()
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        print(f"--cache_small_sources {limit}: {files} file(s) kept in RAM, about {needed / 2**20:,.0f} MiB "
              f"of this machine's {total / 2**20:,.0f} MiB")
        if needed > total:
            raise UserError(f"--cache_small_sources {limit} keeps {files} file(s) in RAM, about {needed / 2**20:,.0f} "
                            f"MiB, more than this machine's {total / 2**20:,.0f} MiB: lower --cache_small_sources "
                            "(0 keeps none)")
    return sources


@dataclasses.dataclass
class TextBatch:
    step: int
    sources: list          # the source of each slot, in batch order (one with --mixing original)
    rows: list             # (source name, texts) per row of this process's part of the batch
    stream_state: dict     # {source name: position} that text_batches resumes from at the next step
    invalid: dict          # {source name: unusable lines skipped so far}, sources with any


def choose_sources(rng, sources, count):
    """The first source by weight; the others by weight among those of its columns, as the original's redraws gave."""
    weights = np.array([s.weight for s in sources], dtype=np.float64)
    first = sources[rng.choice(len(sources), p=weights / weights.sum())]
    same = [s for s in sources if s.columns == first.columns]
    same_weights = np.array([s.weight for s in same], dtype=np.float64)
    others = rng.choice(len(same), size=count - 1, p=same_weights / same_weights.sum())
    return [first] + [same[i] for i in others]


def new_rows(source, count, seen, args, stride):
    """The next `count` rows of a source with no text in `seen`, which their texts join; one repeating a text within
    itself is kept with --mixing original, as the original did."""
    rows, rejecting_since = [], None  # the pass in which the current run of rejected rows began
    while len(rows) < count:
        texts = source.next_row(args.seed, stride)
        if repeats_a_text(texts, seen, within_row=args.mixing == "per_batch"):
            source.duplicate += 1
            if rejecting_since is None:
                rejecting_since = source.position[0]
            if source.position[0] > rejecting_since + 1:  # every line of a whole pass rejected
                unit = "round" if args.mixing == "original" else "batch"
                if source.widths:  # its first usable row set its columns; rows of other counts were skipped
                    counts = ", ".join(f"{n} with {width}" for width, n in source.widths.items())
                    raise UserError(f"{source.url}: its first usable row has {source.columns} texts, but rows "
                                    f"skipped for another number ({counts}) leave too few to fill a {unit}: a "
                                    "file must hold one number of texts per row")
                raise UserError(f"{source.url}: too few distinct texts to fill its rows of a {unit} "
                                f"(a whole pass gave no row new to the {unit})")
            continue
        rejecting_since = None
        seen.update(texts)
        rows.append((source.name, texts))
    return rows


def text_batches(sources, args, global_batch, local_range, stride, start_step=0):
    """Every step's texts (this process's rows), forever, mixed as --mixing says. A step's sources are a pure function
    of (seed, step): the same on every process, continued on resume. A round a checkpoint cut is replayed from its
    first step on resume, so that the same rows are skipped: mid-round, stream_state is the positions at its start."""
    # --mixing original: a drawn source fills devices // --datasets_per_batch steps as the original, at least 1 (0 hung)
    per_draw = max(1, global_batch // args.batch_size // args.datasets_per_batch)
    period = per_draw * args.datasets_per_batch if args.mixing == "original" else 1  # steps sharing draw and seen texts
    local_start, local_stop = local_range
    for step in itertools.count(start_step - start_step % period):
        if step % period == 0:
            rng = np.random.default_rng([args.seed, step // period])
            drawn, seen = choose_sources(rng, sources, args.datasets_per_batch), set()
            round_start = {s.name: s.position for s in sources}
        chosen = drawn if args.mixing == "per_batch" else [drawn[step % period // per_draw]]
        share, rows = global_batch // len(chosen), []
        for slot, source in enumerate(chosen):
            count = min(local_stop, (slot + 1) * share) - max(local_start, slot * share)
            rows += new_rows(source, max(0, count), seen, args, stride)
        resume_from = {s.name: s.position for s in sources} if (step + 1) % period == 0 else round_start
        if step >= start_step:
            yield TextBatch(step, [s.name for s in chosen], rows, resume_from,
                            {s.name: s.invalid for s in sources if s.invalid})


def invalid_lines_report(invalid):
    return "skipped unusable lines: " + ", ".join(f"{name} {count}" for name, count in invalid.items())


# ============================================================================================
# Input pipeline: texts tokenized in worker processes, batches ready ahead of the step
# ============================================================================================
# Each worker (a process, or a thread with --num_workers 0) holds the model's fast tokenizer, truncating and padding to
# --max_length, then cuts each column to the smallest of --pad_to_buckets that fits it: every step has one of a few
# shapes (each compiled once), and short texts do not pay for 128 positions.
_tokenizer = _buckets = _taken = None  # _taken: a queue told (step, pid) as a worker takes a batch
WORKERS_GRACE = 5  # seconds


def _init_tokenizer(tokenizer_json, max_length, pad_id, buckets, taken, parent=None):
    global _tokenizer, _buckets, _taken
    if parent:  # a worker process
        # One thread per worker: --num_workers is the number of cores tokenizing (the Rust tokenizer's own thread
        # pool would compete with the trainer's threads for the others)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"

        def exit_with_parent():
            while os.getppid() == parent:  # the parent's pid, given: one that died first is not mistaken
                time.sleep(1)
            os._exit(1)
        threading.Thread(target=exit_with_parent, daemon=True).start()
    _tokenizer = Tokenizer.from_str(tokenizer_json)
    _tokenizer.enable_truncation(max_length)
    _tokenizer.enable_padding(length=max_length, pad_id=pad_id, direction="right")
    _buckets, _taken = buckets, taken


def tokenize_columns(columns, shape):
    """Texts by column -> [(input_ids, attention_mask)] per column, each int32 [*shape, bucket]."""
    out = []
    for texts in columns:
        encodings = _tokenizer.encode_batch_fast(list(texts))  # _fast: no character offsets
        ids = np.array([e.ids for e in encodings], dtype=np.int32)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int32)
        length = next(b for b in _buckets if b >= mask.sum(-1).max())
        out.append((ids[:, :length].reshape(*shape, -1), mask[:, :length].reshape(*shape, -1)))
    return out


def tokenize_batch(step, columns, shape):
    _taken.put((step, os.getpid()))
    return tokenize_columns(columns, shape)


@dataclasses.dataclass
class Batch:
    text: TextBatch
    columns: list          # [(input_ids, attention_mask)] per column, numpy [devices, per_device, length]


class PipelineError(RuntimeError):
    """The input pipeline failed (a worker died, a reader raised) or gave no batch in --batch_timeout seconds: the
    trainer checkpoints its last step and stops with this one line."""


@contextlib.contextmanager
def tokenizer_pool(tokenizer, args):
    """The tokenizing executor: processes, or one thread with --num_workers 0 (`workers`: how many at once). On exit
    the processes get WORKERS_GRACE seconds to finish their batch, then are killed: pending batches are not needed, a
    stuck worker would hold the trainer forever, and one killed mid-send leaves the pool's thread reading forever."""
    spawn = multiprocessing.get_context("spawn")  # forking a process that runs JAX's threads is unsafe
    taken = spawn.Queue() if args.num_workers else queue.SimpleQueue()
    init = (tokenizer.backend_tokenizer.to_str(), args.max_length, tokenizer.pad_token_id, args.pad_to_buckets, taken)
    if args.num_workers == 0:
        pool = concurrent.futures.ThreadPoolExecutor(1, initializer=_init_tokenizer, initargs=init)
    else:
        pool = concurrent.futures.ProcessPoolExecutor(args.num_workers, mp_context=spawn,
                                                      initializer=_init_tokenizer, initargs=(*init, os.getpid()))
        # Every worker starts now with STOP_SIGNALS blocked (inherited from this thread's mask): a Ctrl-C sent to the
        # process group (a terminal, a container's stop) never reaches one, even while it starts; the trainer decides.
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for _ in range(args.num_workers):  # each submit starts a process while none is idle
                pool.submit(int)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
    pool.taken, pool.workers = taken, max(1, args.num_workers)
    try:
        yield pool
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + WORKERS_GRACE
        for worker in multiprocessing.active_children():
            worker.join(max(0.0, deadline - time.monotonic()))
        end_workers()


def end_workers():
    for worker in multiprocessing.active_children():
        worker.kill()


def background_batches(texts, pool, shape, depth, timeout=None, interrupted=lambda: False):
    """Tokenized batches in order, read and submitted ahead by a BatchProducer thread (at most `depth` ready and
    pool.workers more tokenizing). A reader's or worker's failure, or a wait over `timeout` seconds (naming the batch
    and who has it), raises PipelineError (a UserError as is): never a hang. Ends if `interrupted()` during a wait."""
    producer = BatchProducer(texts, pool, shape, depth)
    try:
        while item := producer.next_tokenized(timeout, interrupted):
            text_batch, future = item
            failure = future.exception()
            if isinstance(failure, UserError):
                raise failure
            if failure:
                raise PipelineError(f"the data producer failed: {type(failure).__name__}: {failure}") from failure
            if text_batch is None:
                return
            producer.holders().pop(text_batch.step, None)
            yield Batch(text_batch, future.result())
    finally:
        producer.stopped.set()


class BatchProducer:
    """background_batches' thread and queue; knows which worker took which batch, to name the holder of a late one."""

    def __init__(self, texts, pool, shape, depth):
        # (text batch, future) pairs; with the pair the producer holds and the one the consumer waits for,
        # depth + workers - 1 queued keep at most `depth` ready and the workers tokenizing
        self.submitted, self.stopped = queue.Queue(depth + pool.workers - 1), threading.Event()
        self.pool, self.holder = pool, {}  # holder: step -> pid of the worker that took its batch
        self.thread = threading.Thread(target=self.produce, args=(texts, shape), name="producer", daemon=True)
        self.thread.start()

    def put(self, item):
        while not self.stopped.is_set():
            with contextlib.suppress(queue.Full):
                self.submitted.put(item, timeout=0.2)
                return True
        return False

    def produce(self, texts, shape):
        end = concurrent.futures.Future()  # the last item: why the batches end
        try:
            for text_batch in texts:
                columns = list(zip(*(row for _, row in text_batch.rows)))
                if not self.put((text_batch, self.pool.submit(tokenize_batch, text_batch.step, columns, shape))):
                    return
            end.set_result(None)  # a finite `texts` (tests, benchmarks) ends here
        except BaseException as e:  # handed to the trainer, which stops with it
            end.set_exception(e)
        self.put((None, end))

    def next_tokenized(self, timeout, interrupted):
        """The next (text batch, future) once the future is done; None if interrupted meanwhile."""
        since, item = time.monotonic(), None
        while True:
            if item is None:  # not yet submitted
                with contextlib.suppress(queue.Empty):
                    item = self.submitted.get(timeout=0.2)
                if item is None and not self.thread.is_alive() and self.submitted.empty():
                    raise PipelineError("the data producer stopped without a reason")
            elif concurrent.futures.wait([item[1]], timeout=0.2).done:
                return item
            if interrupted():
                return None
            if timeout and time.monotonic() - since > timeout:
                raise PipelineError(self.late(item[0] if item else None, time.monotonic() - since))

    def holders(self):
        """{step: pid of the worker that took its batch}, with the workers' latest notes."""
        with contextlib.suppress(queue.Empty):
            while True:
                step, pid = self.pool.taken.get_nowait()
                self.holder[step] = pid
        return self.holder

    def late(self, text_batch, waited):
        """Why no batch came in `waited` seconds: the reader gave none, or who has it."""
        if text_batch is None:
            return f"no batch in {waited:.0f}s (--batch_timeout): the data reader gave no texts for the next one"
        pid = self.holders().get(text_batch.step)
        alive = ", ".join(str(w.pid) for w in multiprocessing.active_children())
        who = (f"tokenizer worker pid {pid} has it" if pid and pid != os.getpid() else
               "the tokenizer thread has it" if pid else
               f"none of the tokenizer workers (pid {alive}) took it" if alive else "no tokenizer took it")
        return (f"no batch in {waited:.0f}s (--batch_timeout) for step {text_batch.step + 1} "
                f"(sources {', '.join(text_batch.sources)}): {who}")


def dry_run(sources, args, tokenizer, global_batch):
    """Streams --dry_run batches through the whole input pipeline and reports what it saw."""
    texts = text_batches(sources, args, global_batch, (0, global_batch), (0, 1))
    counts, started = collections.Counter(), time.perf_counter()
    with (open_dump(args, run_inputs(args, sources)) if args.dump_batches else contextlib.nullcontext() as dump,
          tokenizer_pool(tokenizer, args) as pool,
          contextlib.closing(background_batches(texts, pool, (global_batch,), args.prefetch,
                                                args.batch_timeout)) as batches):
        for batch in itertools.islice(batches, args.dry_run):
            counts.update(batch.text.sources)
            if dump:
                rows = [{"source": name, "texts": list(t)} for name, t in batch.text.rows]
                dump.write(json.dumps({"step": batch.text.step, "sources": batch.text.sources, "rows": rows}) + "\n")
    seconds = time.perf_counter() - started
    print(f"{args.dry_run} batches of {global_batch} rows in {seconds:.1f}s: "
          f"{args.dry_run * global_batch / seconds:,.0f} rows/s")
    print(f"{'source':60} {'batches':>8} {'invalid':>8} {'duplicate':>9}")
    for s in sources:
        print(f"{s.name:60} {counts[s.name]:8d} {s.invalid:8d} {s.duplicate:9d}")


def open_dump(args, inputs):
    """--dump_batches' file, open for writing; refused before truncating it if it is a run_inputs file by any name."""
    dump = args.dump_batches
    for what, path in inputs:
        if os.path.exists(dump) and os.path.exists(path) and os.path.samefile(dump, path):
            raise UserError(f"--dump_batches {dump} is {what} {path}; give a new file")
    try:
        return open(dump, "w")
    except OSError as e:  # no such folder, a folder, no permission, a full disk
        raise UserError(f"--dump_batches: cannot write {dump} ({e.strerror or e})") from None


# ============================================================================================
# Model & loss
# ============================================================================================

AXIS = "devices"  # the pmap axis: one entry per device of the global batch


class ModelType(NamedTuple):
    torch_class: str         # the PyTorch class an export's config names
    shared_masks: str        # the module of its Flax model if that shares attention-dropout masks, else None


# The model types the script trains and exports: Flax and PyTorch share their parameter names (kernel/scale/embedding
# aside) and outputs (tests/test_export.py checks each; ELECTRA's names map too, its outputs differ). transformers' Flax
# BERT, RoBERTa, XLM-RoBERTa and ALBERT pass broadcast_dropout=True to dot_product_attention_weights: one dropout
# mask per layer for all of a device's examples and heads. PyTorch (which trained the published weights) and Flax
# DistilBERT (an nn.Dropout of its own) draw every element of the attention probabilities independently.
MODEL_TYPES = {
    "bert": ModelType("BertModel", "transformers.models.bert.modeling_flax_bert"),
    "roberta": ModelType("RobertaModel", "transformers.models.roberta.modeling_flax_roberta"),
    "xlm-roberta": ModelType("XLMRobertaModel", "transformers.models.xlm_roberta.modeling_flax_xlm_roberta"),
    "distilbert": ModelType("DistilBertModel", None),
    "albert": ModelType("AlbertModel", "transformers.models.albert.modeling_flax_albert"),
}


# A tokenizer is saved whole (tokenizer.json) or as the vocabulary of its type: those of MODEL_TYPES'.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")


def check_model_folder(folder):
    """A local --model holds a config and a tokenizer. Checked by name because transformers, missing
    them, guesses a model type from the folder's name (`empty` -> MPT) and fails deep inside."""
    files = os.listdir(folder)
    if not files:
        raise UserError(f"--model {folder}: the folder is empty; expected a model saved with save_pretrained")
    if "config.json" not in files:
        raise UserError(f"--model {folder}: the folder has no config.json")
    if not set(files) & set(TOKENIZER_FILES):
        raise UserError(f"--model {folder}: the folder has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")


def load_tokenizer_and_config(args):
    """The cheap half of --model, checked before any weights are loaded."""
    if os.path.isdir(args.model):
        check_model_folder(args.model)
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
        names = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")
        config.update({name: args.dropout for name in names if hasattr(config, name)})
    if config.model_type not in MODEL_TYPES:
        raise UserError(f"--model {args.model}: export supports {', '.join(MODEL_TYPES)}, not {config.model_type}")
    if args.attention_dropout == "shared" and not MODEL_TYPES[config.model_type].shared_masks:
        shared = [name for name, model_type in MODEL_TYPES.items() if model_type.shared_masks]
        raise UserError(f"--attention_dropout shared: the Flax {config.model_type} draws its attention-dropout "
                        f"masks per element only; shared masks exist for {', '.join(shared)}")
    return tokenizer, config


def load_model(args, config):
    """FlaxAutoModel from a Hub name or folder; PyTorch-only `model.safetensors` loads without torch.
    Its parameters stay float32 whatever --dtype: the optimizer updates float32 master weights."""
    load = functools.partial(FlaxAutoModel.from_pretrained, args.model, config=config, dtype=jnp.dtype(args.dtype))
    try:
        try:
            return load()
        except OSError as e:
            if "from_pt=True" not in str(e):
                raise UserError(f"--model {args.model}: cannot load its weights ({first_line(e)})")
        try:  # only pytorch_model.bin: converting it needs torch
            import torch  # noqa: F401
        except ImportError:
            raise UserError(f"--model {args.model}: has only pytorch_model.bin weights, which need torch to "
                            "convert; pip install torch, or save the model as model.safetensors")
        return load(from_pt=True)
    except (ValueError, RuntimeError, safetensors.SafetensorError) as e:  # msgpack's, torch's, safetensors' readers
        raise UserError(f"--model {args.model}: cannot read its weights ({first_line(e)}); "
                        "is the file truncated or damaged?")


@contextlib.contextmanager
def attention_dropout_masks(model_type, masks):
    """While tracing inside it, attention dropout draws `masks` ("element", PyTorch's, or "shared", transformers' Flax
    masks), and every dropout mask is kept for the backward pass as a byte per element: XLA's TPU compiler may keep
    its 32 random bits instead and compare them again, which made --dtype bfloat16 need more HBM than float32
    (docs/performance.md). transformers has no option for either: the functions it calls are swapped meanwhile."""
    bernoulli = jax.random.bernoulli
    swapped = [(jax.random, "bernoulli", lambda *a, **k: jax.lax.optimization_barrier(bernoulli(*a, **k)))]
    if MODEL_TYPES[model_type].shared_masks:  # the others draw per element already ("shared" is refused up front)
        module = importlib.import_module(MODEL_TYPES[model_type].shared_masks)
        library = module.dot_product_attention_weights
        swapped.append((module, "dot_product_attention_weights", lambda *args, broadcast_dropout, **kwargs: library(
            *args, broadcast_dropout=masks == "shared", **kwargs)))
    with contextlib.ExitStack() as originals:
        for owner, name, function in swapped:
            originals.callback(setattr, owner, name, getattr(owner, name))
            setattr(owner, name, function)
        yield


def embed(model, params, input_ids, attention_mask, dropout_key=None, attention_dropout="element"):
    """Mean of the last hidden states over the attention mask, L2-normalised; dropout if given a key."""
    with attention_dropout_masks(model.config.model_type, attention_dropout):
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
    """This device's share of the global batch's loss, inside pmap over AXIS. embeddings: its anchors, positives (and
    negatives), each [per_device, dim]; every anchor is scored against all devices' positives (and negatives)."""
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
    """Linear warm-up to --lr over --warmup_steps, then linear decay to 0 at --schedule_steps:
    transformers' get_linear_schedule_with_warmup, as the published script used."""
    warmup = optax.linear_schedule(0.0, args.lr, max(args.warmup_steps, 1))
    decay = optax.linear_schedule(args.lr, 0.0, max(args.schedule_steps - args.warmup_steps, 1))
    return optax.join_schedules([warmup, decay], [args.warmup_steps])


def decays(params):
    """Weight decay applies to weight matrices and embeddings, not to biases or LayerNorm."""
    return traverse_util.path_aware_map(
        lambda path, _: path[-1] != "bias" and not any("layernorm" in p.lower().replace("_", "") for p in path), params)


def transformers_adamw(learning_rate, b1, b2, eps, weight_decay, mask):
    """transformers.AdamW(correct_bias=True), the published script's optimizer, as an optax transformation. Unlike
    optax.adamw it adds eps to sqrt(v) before the bias correction (step size lr * sqrt(1 - b2^t) / (1 - b1^t)), which
    changes the first updates, and decays the parameters already moved by Adam, p <- p' - lr * wd * p'. Its state is
    optax's Adam state, whose count (the updates made so far) is the schedule's step and Adam's t - 1."""
    def init(params):
        zeros = optax.tree.zeros_like
        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), zeros(params), zeros(params))

    def update(grads, state, params):
        mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
        lr, t = learning_rate(state.count), (state.count + 1).astype(jnp.float32)
        # 1 - b^t as -expm1(t log b): float32 holds 1 - 0.999 only to 1e-5, expm1 to its last bit
        step_size = lr * jnp.sqrt(-jnp.expm1(t * math.log(b2))) / -jnp.expm1(t * math.log(b1))
        moved = jax.tree_util.tree_map(lambda m, v: -step_size * m / (jnp.sqrt(v) + eps), mu, nu)
        updates = jax.tree_util.tree_map(
            lambda a, p, decayed: a - lr * weight_decay * (p + a) if decayed and weight_decay else a,
            moved, params, mask(params))
        return updates, optax.ScaleByAdamState(state.count + 1, mu, nu)

    return optax.GradientTransformation(init, update)


def make_optimizer(args):
    return transformers_adamw(learning_rate_schedule(args), b1=0.9, b2=0.999, eps=1e-6,
                              weight_decay=args.weight_decay, mask=decays)


def clip_to_norm_1(grads, norm):
    """torch.nn.utils.clip_grad_norm_(..., 1.0), given the gradient's global norm (the step measures
    it anyway): scaled down to norm 1 when above it, as optax.clip_by_global_norm does."""
    return jax.tree_util.tree_map(lambda g: jnp.where(norm < 1.0, g, g / norm), grads)


def loss_and_grads(model, args, params, columns, key):
    """This device's loss over the global batch and its gradient w.r.t. params (before the pmean), each column embedded
    with its own dropout key: in one pass, or with --mini_batch_size chunk by chunk (GradCache)."""
    keys = jax.random.split(key, len(columns))
    embed_rows = functools.partial(embed, model, attention_dropout=args.attention_dropout)
    loss_of = functools.partial(in_batch_loss, scale=args.scale, symmetric=args.symmetric_loss)
    if args.mini_batch_size is None:
        return jax.value_and_grad(
            lambda p: loss_of([embed_rows(p, ids, mask, k) for (ids, mask), k in zip(columns, keys)]))(params)
    return cached_loss_and_grads(embed_rows, loss_of, params, columns, keys, args.mini_batch_size)


def cached_loss_and_grads(embed_rows, loss_of, params, columns, keys, mini_batch):
    """GradCache (Gao et al., 2021): the one-pass step's loss and gradient with only `mini_batch` rows' activations
    alive at a time, the chain rule split at the embeddings: (1) embed every chunk, keeping no activations; (2) the
    whole batch's loss (in-batch negatives need all of it) and its gradient w.r.t. the embeddings; (3) per chunk, the
    forward again (same dropout key, same function) and a vjp back to the parameters, summed by a scan."""
    def chunks_of(column, key):  # ids, mask [B, L] -> [B / M, M, L] each, and a dropout key per chunk
        ids, mask = (tokens.reshape(-1, mini_batch, tokens.shape[-1]) for tokens in column)
        return ids, mask, jax.random.split(key, len(ids))

    def add_chunk_grads(grads, chunk_and_cotangent):
        chunk, cotangent = chunk_and_cotangent
        _, pull_back = jax.vjp(lambda p: embed_rows(p, *chunk), params)
        return jax.tree_util.tree_map(jnp.add, grads, pull_back(cotangent)[0]), None

    chunks = [chunks_of(column, key) for column, key in zip(columns, keys)]
    embeddings = [jax.lax.map(lambda chunk: embed_rows(params, *chunk), c) for c in chunks]  # [B / M, M, dim]
    loss, cotangents = jax.value_and_grad(lambda e: loss_of([x.reshape(-1, x.shape[-1]) for x in e]))(embeddings)
    grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    for column_chunks, column_cotangents in zip(chunks, cotangents):
        grads, _ = jax.lax.scan(add_chunk_grads, grads, (column_chunks, column_cotangents))
    return loss, grads


def make_train_step(model, args, devices):
    """The pmapped update: (state, columns, dropout key) -> (new state, measurements).

    Gradient reduction: device d computes L_d, the mean loss of its anchors against the gathered global batch. The
    transpose of all_gather is a reduce-scatter, so device d's parameter gradient g_d is that of sum_d' L_d' through
    its own examples, and g_d / P (P devices) that of the global mean loss: the g_d / P add up to the full gradient,
    whose norm --clip_scope global clips after a pmean. --clip_scope device clips each g_d / P to norm 1, then averages
    them ((1 / P) sum_d clip(g_d / P)), as the published script's cores each clipped their gradient and all-reduced a
    mean. grad_norm is the norm clipped: with device scope, the mean over devices of each device's norm."""
    schedule = learning_rate_schedule(args)

    def train_step(state, columns, dropout_key):
        key = jax.random.fold_in(jax.random.fold_in(dropout_key, state.step), jax.lax.axis_index(AXIS))
        lr = schedule(state.step)  # the lr of this update: state.step counts the updates made
        loss, grads = loss_and_grads(model, args, state.params, columns, key)
        if args.clip_scope == "device":
            grads = jax.tree_util.tree_map(lambda g: g / len(devices), grads)
            device_norm = optax.tree.norm(grads)
            grads = jax.lax.pmean(clip_to_norm_1(grads, device_norm), AXIS)
            grad_norm = jax.lax.pmean(device_norm, AXIS)
        else:
            grads = jax.lax.pmean(grads, AXIS)
            grad_norm = optax.tree.norm(grads)
            grads = clip_to_norm_1(grads, grad_norm)
        loss = jax.lax.pmean(loss, AXIS)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step leaves the whole state as it was: parameters, moments and the step counter, so that the
        # schedule, Adam's bias correction and the dropout keys count the updates made. (optax.apply_if_finite would
        # keep the optimizer's state only, and sees the gradients but not the loss.)
        updated = state.apply_gradients(grads=grads)
        state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), updated, state)
        return state, {"loss": loss, "grad_norm": grad_norm, "lr": lr, "finite": finite}

    return jax.pmap(train_step, axis_name=AXIS, devices=devices, donate_argnums=0)


def init_state(model, args, params=None):
    return train_state.TrainState.create(apply_fn=model.__call__, params=model.params if params is None else params,
                                         tx=make_optimizer(args))


# ============================================================================================
# Evals: the held-out rows of every source, ranked by the current model
# ============================================================================================
# Each anchor ranks the candidates (positives, and negatives for triplets) of its own source's held-out rows: an
# in-batch retrieval over --eval_rows rows drawn from that source alone, fixed for the run, so scores at different steps
# compare. Accuracy: the share of anchors that rank their own partner first; MRR@10: the mean of 1/rank (0 past 10).

MRR_CUTOFF = 10


def held_out_rows(source, count):
    """The usable rows among the first `count` lines of a source's file, rows repeating a text dropped; a row format's
    random picks are seeded by the file name alone, so runs with different --seed are scored on the same rows."""
    lines = list(itertools.islice(read_lines(source.url, (0, 1)), count + 1))
    if len(lines) <= count:
        raise UserError(f"{source.url}: has only {len(lines)} lines, all held out by --eval_rows {count}; "
                        "lower --eval_rows")
    draws = np.random.default_rng(zlib.crc32(source.name.encode())).random((count, 2))
    rows, seen = [], set()
    for line, line_draws in zip(lines, draws):
        row = usable_row(line, line_draws, source.columns)
        if row is not None and not repeats_a_text(row, seen):
            seen.update(row)
            rows.append(row)
    if len(rows) < 2:
        raise UserError(f"{source.url}: fewer than 2 usable rows among its first {count} lines "
                        "(--eval_rows); cannot evaluate on them")
    return rows


def load_held_out(sources, count):
    """{source name: held-out rows}, read before training starts."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        rows = pool.map(functools.partial(held_out_rows, count=count), sources)
        return {source.name: source_rows for source, source_rows in zip(sources, rows)}


def held_out_texts(held_out):
    """Every held-out text in one list: per source, all anchors, then all positives (then negatives)."""
    return [text for rows in held_out.values() for column in zip(*rows) for text in column]


def make_evaluator(model, held_out, pool, local_devices, sharding, per_device):
    """(params) -> the held-out scores. The texts are tokenized once, padded with empty texts to whole global batches;
    every batch is dispatched before any is fetched, so the devices never wait for the host."""
    texts = held_out_texts(held_out)
    chunk = len(local_devices) * per_device
    texts += [""] * (-len(texts) % chunk)
    shape = (len(texts) // chunk, len(local_devices), per_device)
    [(ids, mask)] = pool.submit(tokenize_columns, [texts], shape).result()

    @functools.partial(jax.pmap, axis_name=AXIS, devices=local_devices)
    def embed_step(params, input_ids, attention_mask):  # no dropout
        return embed(model, params, input_ids, attention_mask)

    def evaluate(params):
        outputs = [embed_step(params, *to_devices(chunk_tokens, sharding)) for chunk_tokens in zip(ids, mask)]
        embeddings = np.concatenate([np.asarray(out).reshape(chunk, -1) for out in jax.device_get(outputs)])
        return score_held_out(held_out, embeddings)
    return evaluate


def rank_of_partners(queries, candidates):
    """The 1-based rank of candidates[i] among all candidates by dot product with queries[i]
    (cosine similarity for normalised embeddings); ties count in the query's favour."""
    ranks = []
    for start in range(0, len(queries), 1024):  # bounds the score matrix held at once
        scores = queries[start:start + 1024] @ candidates.T
        true = scores[np.arange(len(scores)), np.arange(start, start + len(scores))]
        ranks.append(1 + (scores > true[:, None]).sum(axis=1))
    return np.concatenate(ranks)


def score_held_out(held_out, embeddings):
    """{source name: {accuracy, mrr@10}, ..., "overall": each score's mean over the sources}."""
    scores, start = {}, 0
    for name, rows in held_out.items():
        columns = embeddings[start:start + len(rows) * len(rows[0])]  # anchors, then positives (then negatives)
        start += len(columns)
        ranks = rank_of_partners(columns[:len(rows)], columns[len(rows):])
        scores[name] = {"accuracy": float(np.mean(ranks == 1)),
                        f"mrr@{MRR_CUTOFF}": float(np.mean(np.where(ranks <= MRR_CUTOFF, 1.0 / ranks, 0.0)))}
    scores["overall"] = {key: float(np.mean([s[key] for s in scores.values()])) for key in scores[name]}
    return scores


# ============================================================================================
# Export: a sentence-transformers folder, written from the Flax parameters (no torch needed)
# ============================================================================================

# sentence-transformers never runs here, so its "version" in the folder is that of the format: the oldest release that
# reads every field written below (similarity_fn_name came with 3.0.0).
SENTENCE_TRANSFORMERS_FORMAT = "3.0.0"
POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")


def torch_state_dict(params):
    """Flax parameters -> PyTorch `AutoModel` names and layouts (flax kernels [in, out], torch weights [out, in])."""
    state = {}
    for (*module, leaf), value in traverse_util.flatten_dict(params).items():
        name = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
        state[".".join([*module, name])] = np.ascontiguousarray(value.T if leaf == "kernel" else value, np.float32)
    return state


def export_sentence_transformer(folder, params, config, tokenizer, args, run, step):
    """Writes a folder that `SentenceTransformer(folder)` loads (Transformer -> mean Pooling -> Normalize), with its
    card and the run record, as FOLDER.partial renamed when whole: OUTPUT/<step> is a whole model or absent."""
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        os.makedirs(os.path.join(partial, "1_Pooling"))
        os.makedirs(os.path.join(partial, "2_Normalize"))  # Normalize has no parameters: an empty folder
        save_file(torch_state_dict(params), os.path.join(partial, "model.safetensors"), metadata={"format": "pt"})
        architecture = MODEL_TYPES[config.model_type].torch_class
        config = type(config).from_dict({**config.to_dict(), "architectures": [architecture]})
        config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        write_json(os.path.join(partial, "modules.json"), [{
            "idx": i, "name": str(i), "path": f"{i}_{cls}" if i else "", "type": f"sentence_transformers.models.{cls}"}
            for i, cls in enumerate(("Transformer", "Pooling", "Normalize"))])
        write_json(os.path.join(partial, "sentence_bert_config.json"),
                   {"max_seq_length": args.max_length, "do_lower_case": False})
        write_json(os.path.join(partial, "1_Pooling", "config.json"), {"word_embedding_dimension": config.hidden_size,
                   "include_prompt": True, **{f"pooling_mode_{m}": m == "mean_tokens" for m in POOLING_MODES}})
        write_json(os.path.join(partial, "config_sentence_transformers.json"), {
            "__version__": {"sentence_transformers": SENTENCE_TRANSFORMERS_FORMAT,
                            "transformers": transformers.__version__, "jax": jax.__version__, "flax": flax.__version__},
            "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"})
        records = run_record(args.output)
        model_card(folder, config, args, run, step, records).save(os.path.join(partial, "README.md"))
        for record in records:  # the run record travels with every upload
            shutil.copyfile(os.path.join(args.output, record), os.path.join(partial, record))
    except (OSError, safetensors.SafetensorError) as e:  # a full disk, most often
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(f"cannot write the export {folder} ({first_line(e)}); --resume writes it again from "
                        f"the checkpoint of step {step}") from e
    shutil.rmtree(folder, ignore_errors=True)  # a step exported again (a resumed run) replaces the old one
    os.replace(partial, folder)


def export_folder(args, step):
    return os.path.join(args.output, "final" if step == args.steps else str(step))


def keep_final_model(args, ended):
    """A run resumed with another --steps than its checkpoints' (`ended`) keeps their OUTPUT/final as OUTPUT/<ended>."""
    final, kept = os.path.join(args.output, "final"), export_folder(args, ended)
    if ended != args.steps and os.path.isdir(final) and not os.path.exists(kept):
        os.replace(final, kept)
        print(f"--resume: the model of step {ended} moves from {final} to {kept}")


def write_json(path, value):
    with open(path, "w") as f:
        f.write(json.dumps(value, indent=2) + "\n")


def library_versions():
    modules = (jax, jaxlib, flax, optax, transformers, tokenizers, safetensors, np)
    return {"python": platform.python_version(), **{m.__name__: m.__version__ for m in modules}}


@dataclasses.dataclass
class RunFacts:
    """What an export's card tells of its run beyond the flags."""
    mixture: list                  # the data config's entries
    global_batch: int
    device_count: int              # of every process
    versions: dict = dataclasses.field(default_factory=library_versions)
    scores: dict = dataclasses.field(default_factory=dict)  # {step: the held-out scores at that step}


def source_group(name):
    """The card's summary counts a folder of files (stackexchange_title_body/*) as one source."""
    return name.split("/")[0] if "/" in name else name.split(".")[0]


def mixture_table(mixture, pairs_drawn, group=None):
    """The mixture as a Markdown table, a row per file or (with `group`) per group of files, heaviest first.
    A file's expected share of the pairs is weight / total weight: its chance to be a round's (or a batch's)
    first source, and the others are drawn by weight among the files of its format."""
    total = sum(e["weight"] for e in mixture)
    rows = collections.defaultdict(lambda: np.zeros(3, np.int64))  # files, lines, weight
    for e in mixture:
        rows[group(e["name"]) if group else e["name"]] += (1, e.get("lines", 0), e["weight"])
    table = [f"| {'source | files' if group else 'file'} | lines | weight | share of pairs | pairs drawn (expected) |",
             "|---|" + "---:|" * (5 if group else 4)]
    for name, (files, lines, weight) in sorted(rows.items(), key=lambda row: -row[1][2]):
        table.append(f"| {name} |{f' {files} |' if group else ''} {lines:,} | {weight:,} | {weight / total:.2%} | "
                     f"{weight / total * pairs_drawn:,.0f} |")
    return "\n".join(table)


def hub_name(model):
    """The Hub name of --model: the name itself, or the name a snapshot in the Hugging Face cache (the
    .../models--OWNER--NAME/snapshots/REVISION that `hf download` prints) was downloaded as; else None."""
    if not os.path.isdir(model):
        return model
    parts = os.path.abspath(model).split(os.sep)
    cached = parts[-2] == "snapshots" and parts[-3].startswith("models--")
    return parts[-3][len("models--"):].replace("--", "/") if cached else None  # Hub names never contain "--"


def model_card(folder, config, args, run, step, records=()):
    """The card of an export: the metadata the Hub indexes (the dataset is that of an hf://datasets/OWNER/NAME
    --data_folder; the held-out scores a model-index), how to use the model, and the run in its own numbers."""
    mixture, batch = run.mixture, run.global_batch
    name, pairs_drawn = os.path.basename(os.path.normpath(args.output)), step * batch
    scores = run.scores[step]["overall"] if step in run.scores else {}
    held_out = f"the first {args.eval_rows} lines of every training file"
    hub_data = args.data_folder.startswith("hf://datasets/")
    datasets = ["/".join(args.data_folder[len("hf://datasets/"):].split("/")[:2]).split("@")[0]] if hub_data else []
    data = ModelCardData(
        language="en", license="apache-2.0", library_name="sentence-transformers", pipeline_tag="sentence-similarity",
        base_model=args.base_model or hub_name(args.model), datasets=datasets or None,
        tags=["sentence-transformers", "feature-extraction", "sentence-similarity", "jax"],
        model_name=name if scores else None,  # the model-index's name; alone it is no Hub field
        eval_results=[EvalResult(task_type="information-retrieval", task_name="In-batch retrieval of held-out rows",
                                 dataset_type=datasets[0] if datasets else "unknown", dataset_name=held_out,
                                 metric_type=key, metric_value=value) for key, value in scores.items()] or None)
    base = (f"[{data.base_model}](https://huggingface.co/{data.base_model})" if data.base_model
            else f"`{args.model}` (a local folder)")
    clipping = ("each device's gradient on its own, then averaged over the devices" if args.clip_scope == "device"
                else "of the gradient averaged over the devices")
    loss = ("in-batch cross-entropy of each anchor against all positives and hard negatives "
            "(MultipleNegativesRankingLoss)")
    if args.symmetric_loss:
        loss += ("; for pairs, averaged with that of each positive against all anchors "
                 "(MultipleNegativesSymmetricRankingLoss)")
    attention_dropout = ("drawn per element" if args.attention_dropout == "element"
                         else "one mask per layer, shared by a device's examples and heads")
    groups = {source_group(e["name"]) for e in mixture}
    table = mixture_table(mixture, pairs_drawn)
    if len(groups) < len(mixture):  # folders of many files: a summary, then every file folded away
        table = (f"{mixture_table(mixture, pairs_drawn, source_group)}\n\n"
                 f"<details><summary>All {len(mixture)} files</summary>\n\n{table}\n\n</details>")
    evaluation = (f"## Evaluation\n\nAt step {step:,}, in-batch retrieval over {held_out}, held out of training (each "
                  "anchor ranks the candidates of its own file's rows; scores averaged over the files): "
                  f"{', '.join(f'{k} {v:.4f}' for k, v in scores.items())}.\n\n" if scores else "")
    progress = "the end of the run" if step == args.steps else f"the export at step {step:,} of {args.steps:,}"
    earlier = [name for name in records if name.startswith("data_config.before_step_")]
    earlier = f" (earlier steps drew from other mixtures: {', '.join(earlier)}, beside this card)" if earlier else ""
    versions = "\n".join(f"- {library}: {version}" for library, version in run.versions.items())
    return ModelCard(f"""---
{data.to_yaml()}
---

# {name}

A [sentence-transformers](https://www.SBERT.net) model finetuned from {base} with `train_script.py` (JAX/Flax), the
reproduction of how all-MiniLM-L12-v1 was trained; this folder holds {progress}. It maps texts of up to
{args.max_length} tokens to {config.hidden_size}-dimensional unit vectors (mean pooling, normalised) compared by cosine.

## Usage

`{name}` stands for the model's Hub id once this folder is uploaded (`hf upload <user>/{name} {folder}`);
where it was trained, load it from disk: `SentenceTransformer("{folder}")`.
```python
from sentence_transformers import SentenceTransformer  # pip install -U sentence-transformers
model = SentenceTransformer("{name}")
embeddings = model.encode(["This is an example sentence", "Each sentence is converted"])
print(embeddings.shape, model.similarity(embeddings, embeddings))  # (2, {config.hidden_size}), 2 x 2 cosines
```

Without sentence-transformers: average `AutoModel.from_pretrained("{name}")`'s last hidden states over the
attention mask of `AutoTokenizer.from_pretrained("{name}")`'s batch, then L2-normalise.

{evaluation}## Training

A file's share of the training pairs is its weight / {sum(e['weight'] for e in mixture):,}; "pairs drawn" is that
share of the {pairs_drawn:,} pairs of the {step:,} steps behind this export. {len(mixture)} files in {len(groups)}
sources (a folder of files counts as one), {sum(e.get('lines', 0) for e in mixture):,} lines in all{earlier}:

{table}

| hyper-parameter | value |
|---|---|
| steps | {step:,} of {args.steps:,} |
| global batch | {batch:,} ({args.batch_size} per device x {run.device_count} devices, {jax.local_devices()[0].device_kind}) |
| batches | files drawn by weight as `--mixing {args.mixing} --datasets_per_batch {args.datasets_per_batch} --data_order {args.data_order}` say (`python train_script.py --help`) |
| optimizer | transformers' AdamW (eps 1e-6 added before the bias correction), lr {args.lr}, betas (0.9, 0.999), weight decay {args.weight_decay} (not on biases and LayerNorm) |
| schedule | linear warm-up over {args.warmup_steps:,} steps, then linear decay to 0 at step {args.schedule_steps:,} |
| gradient clipping | norm 1.0, {clipping} |
| max sequence length | {args.max_length} tokens |
| loss | {loss}, scale {args.scale}, candidates gathered over all devices |
| dropout | {"the base model's" if args.dropout is None else args.dropout}; attention dropout {attention_dropout} |
| seed | {args.seed} |

The exact command (this folder's `train_script.py` is the script that ran, with it appended):
```bash
{args.command}
```
Framework versions:
{versions}
""")


def write_run_record(args, entries, step):
    """As the original did: OUTPUT/train_script.py is this script with the command appended (a resumed run appends its
    own), OUTPUT/data_config.json the config used. A resume with another config (--resume_force) keeps the one before
    as data_config.before_step_<step>.json, unless a resume at that step kept one (it trained no step that counts)."""
    config, earlier = (os.path.join(args.output, f"data_config{name}.json") for name in ("", f".before_step_{step}"))
    changed = False
    if step == 0:
        shutil.copyfile(__file__, os.path.join(args.output, "train_script.py"))
    elif os.path.exists(config):
        with open(config) as f:
            changed = json.load(f) != entries
        if changed and not os.path.exists(earlier):
            os.replace(config, earlier)
    if step == 0 or changed:
        write_json(config, entries)
    with open(os.path.join(args.output, "train_script.py"), "a") as f:
        f.write((f"# Resumed at step {step}" if step else "\n\n# Script was called") + f" via:\n# {args.command}\n"
                + (f"# with another data config: {os.path.basename(earlier)} holds the one before\n" * changed))


def run_record(output):
    """The files of OUTPUT's run record, which every export carries."""
    return ["train_script.py", *sorted(name for name in os.listdir(output)
                                       if name.startswith("data_config.") and name.endswith(".json"))]


# ============================================================================================
# OUTPUT: one run at a time, and nothing lost in replacing one
# ============================================================================================
# Process 0 holds an exclusive lock (flock) on OUTPUT/.lock from before anything in OUTPUT is deleted until the run
# ends; the file names the holder. The kernel drops the lock when its holder dies: a killed run's lock is taken over.

def run_inputs(args, sources):
    """(what, local path) of all the run reads: --overwrite must delete none, nor --dump_batches write over one."""
    inputs = [("the data config", args.data_config), ("this script", __file__)]
    if os.path.isdir(args.model):  # a folder, not a Hub name; its files may be links to elsewhere
        files = [os.path.join(args.model, name) for name in os.listdir(args.model)]
        inputs += [("--model", path) for path in [args.model, *files]]
    for source in sources:
        if path := local_path(source.url):  # gs://, hf://... are nowhere in OUTPUT
            inputs.append(("the data file", path))
    return inputs


def prepare_output(args, inputs):
    """Under the lock: an empty OUTPUT, or with --resume the one to continue, rid of exports a kill or a full disk
    left unfinished (--resume writes them again). One in use is emptied only with --overwrite, never if it holds an
    input (as written or links resolved); its run goes to OUTPUT/.replaced, returned, until the new run's first step."""
    aside = replaced_run(args.output)
    existing = [name for name in os.listdir(args.output) if name not in (".lock", REPLACED)]
    if args.resume:
        existing = [name for name in existing if name.endswith(".partial")]
    elif existing or aside:
        if not args.overwrite:
            raise UserError(f"{args.output} exists and is not empty; pass --resume to continue it "
                            "or --overwrite to replace it")
        if os.path.islink(args.output):
            raise UserError(f"--overwrite: {args.output} is a link to {os.path.realpath(args.output)}; "
                            "pass the folder itself")
        folders = {os.path.abspath(args.output), os.path.realpath(args.output)}
        for what, path in inputs:
            if any(os.path.commonpath([folder, p]) == folder
                   for folder in folders for p in (os.path.abspath(path), os.path.realpath(path))):
                raise UserError(f"--overwrite would delete {what} {path}: it is inside {args.output}")
        if not aside:
            aside = os.path.join(args.output, REPLACED)
            os.mkdir(aside)
            for name in existing:
                os.replace(os.path.join(args.output, name), os.path.join(aside, name))
            existing = []
    for name in existing:  # with a replaced run aside: what a killed run wrote before its first step
        remove(os.path.join(args.output, name))
    if aside:
        print(f"{aside} holds the run that --overwrite replaces until this run's first step (put back on a failure)")
    return aside


# --overwrite moves OUTPUT's run to OUTPUT/.replaced; train deletes it after the new run's first step (drop_replaced),
# a failure before puts it back (put_back). A kill in between leaves it to the next run on OUTPUT, which keeps it so if
# run with --overwrite or --resume (the rest is the killed run's, no step made); a put-back cut short is finished first.
REPLACED, PUTTING_BACK = ".replaced", ".putting_back"  # the latter in REPLACED: OUTPUT holds its run again


def replaced_run(output):
    """OUTPUT/.replaced if it holds a replaced run, else None; the leftovers of a kill cleared first."""
    aside = os.path.join(output, REPLACED)
    shutil.rmtree(aside + ".deleted", ignore_errors=True)  # drop_replaced cut short
    if os.path.exists(os.path.join(aside, PUTTING_BACK)):
        put_back(output)
    elif os.path.isdir(aside) and not os.listdir(aside):
        os.rmdir(aside)
    return aside if os.path.isdir(aside) else None


def put_back(output):
    """OUTPUT as before --overwrite: what the new run wrote deleted, the replaced run moved back."""
    aside = os.path.join(output, REPLACED)
    marker = os.path.join(aside, PUTTING_BACK)
    if not os.path.exists(marker):
        for name in os.listdir(output):
            if name not in (".lock", REPLACED):
                remove(os.path.join(output, name))
        open(marker, "w").close()
    for name in os.listdir(aside):
        if name != PUTTING_BACK:
            os.replace(os.path.join(aside, name), os.path.join(output, name))
    shutil.rmtree(aside)


def drop_replaced(output):
    aside = os.path.join(output, REPLACED)
    if os.path.isdir(aside):
        os.replace(aside, aside + ".deleted")  # at once: a kill during the deletion leaves no half a run
        shutil.rmtree(aside + ".deleted")


def remove(path):
    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)


@contextlib.contextmanager
def claim_output(args, inputs):
    """OUTPUT created, locked (a run holding it is named and refused) and prepared; the lock held until the run ends.
    A run that fails before its first step puts back the run it replaced."""
    if os.path.lexists(args.output) and not os.path.isdir(args.output):
        raise UserError(f"{args.output} exists and is not a folder")
    try:
        os.makedirs(args.output, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {args.output} ({e.strerror or e})") from None
    path, aside = os.path.join(args.output, ".lock"), None
    lock = lock_file(path, args.output)
    try:
        aside = prepare_output(args, inputs)
        try:  # after prepare_output, which may have freed space
            lock.truncate(0)  # a killed run's line
            lock.write(f"host {socket.gethostname()} pid {os.getpid()}\n".encode())
            os.fsync(lock.fileno())
        except OSError as e:
            raise UserError(f"cannot write to {args.output} ({e.strerror or e})") from None
        yield
    except BaseException:
        if aside and os.path.isdir(aside):
            put_back(args.output)
            print(f"{args.output} holds the run that --overwrite was to replace again", file=sys.stderr)
        raise
    finally:
        os.unlink(path)  # while still locked, so that no other run locks the removed file
        lock.close()


def lock_file(path, output):
    """The lock file, open and locked; refused, naming its holder, if another run holds it."""
    while True:
        lock = open(path, "a+b", buffering=0)  # unbuffered: a failed write fails once, at the write
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().decode().strip() or "starting"
            lock.close()
            raise UserError(f"{output} is in use by another run ({holder}); wait for it to end or stop it") from None
        except OSError as e:  # a file system without locks: run, but say that nothing guards OUTPUT
            print(f"warning: cannot lock {path} ({e.strerror}); make sure no other run uses {output}",
                  file=sys.stderr)
            return lock
        if os.path.exists(path) and os.path.samefile(path, lock.fileno()):
            return lock
        lock.close()  # locked a file that its holder removed on exiting: lock the new one


@contextlib.contextmanager
def output_of_process_0(args, inputs):
    """Process 0 alone claims OUTPUT and holds it for the run; the others wait for it and share its verdict."""
    with contextlib.ExitStack() as claimed:
        problem = None
        if jax.process_index() == 0:
            try:
                claimed.enter_context(claim_output(args, inputs))
            except UserError as e:
                problem = e
        if not multihost_utils.broadcast_one_to_all(np.int32(problem is None)):  # a barrier too
            raise problem or UserError(f"process 0 could not prepare {args.output} (its error says why)")
        yield


# ============================================================================================
# Checkpoints: the whole training state, and where a run starts
# ============================================================================================
# OUTPUT/checkpoints/<step>/ holds "state" (parameters, AdamW moments, step counter) and "meta" (the position every
# data stream resumes from, the batches drawn per source, the flags that make the run what it is). Orbax renames a
# checkpoint's temporary folder when it is complete: a kill leaves the whole checkpoint or none. Nothing else is
# needed to continue exactly: a batch's sources derive from (seed, step), dropout keys from (seed, step, device).

def run_identity(args, entries, devices):
    """What a checkpoint records and a resume must match: the run's flags, the mixture, the devices (of every
    process), the lines held out of training; as JSON reads it back (tuples become lists)."""
    identity = {f"--{name}": getattr(args, name) for name in args.run_flags}
    identity.update({"data config": entries, "devices": len(devices), "processes": jax.process_count(),
                     "--eval_rows held out": args.eval_rows if args.eval_steps else 0})
    return json.loads(json.dumps(identity))


@contextlib.contextmanager
def checkpoint_manager(args):
    """Orbax's CheckpointManager, closed on leaving: its threads end before the interpreter does, instead of failing
    by the hundred on a closed event loop after an error."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=args.keep_checkpoints,
        enable_async_checkpointing=False,  # a save that fails (a full disk) fails at its own step
        cleanup_tmp_directories=True)      # the temporary folders of saves that a kill interrupted
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(args.output, "checkpoints")), options=options)
    with orbax_in_one_line(manager):
        yield manager
    manager.close()


@contextlib.contextmanager
def orbax_in_one_line(manager):
    """Orbax's failures in the run's one line, without orbax's own reports: it logs each failure of its threads,
    traceback and all, before raising it (its logger, absl's, is kept quiet); a damaged checkpoint's reads that
    tensorstore finishes after orbax gave up find their event loop closed (nothing lost); and closing the manager
    while an error is on its way out complains of the failed save's leftovers (not reported)."""
    absl, report = logging.getLogger("absl"), sys.unraisablehook
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda u: None if (isinstance(u.exc_value, RuntimeError)
                                            and str(u.exc_value) == "Event loop is closed") else report(u)
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            manager.close()
        raise
    finally:
        sys.unraisablehook = report
        absl.setLevel(level)


def save_checkpoint(checkpoints, state, text, sources, identity, batches_per_source):
    """Checkpoints the state after `text`'s batch (process 0's copy), the stream positions and the batches drawn from
    each source so far (for metrics)."""
    step = text.step + 1
    first_copy = jax.device_get(first_local_replica(
        {"params": state.params, "opt_state": state.opt_state, "step": state.step}))
    # every process reads its own stride of each file, so each has its own positions
    positions = multihost_utils.process_allgather(np.array([text.stream_state[s.name] for s in sources]))
    meta = {"step": step, "run": identity, "batches": dict(batches_per_source),
            "stream": [{s.name: [int(p), int(n)] for s, (p, n) in zip(sources, process)} for process in positions]}
    intact, threads_before = checkpoints.all_steps(), set(threading.enumerate())
    try:
        checkpoints.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(first_copy),
                                                       meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:
        # A failed save's other writes go on in orbax's threads: once they end, nothing writes into its temporary
        # folder while the run stops, or when a resume cleans it up.
        for thread in set(threading.enumerate()) - threads_before:
            if type(thread) is not threading.Thread:  # orbax's own threads, not idle executor workers
                thread.join()
        kept = f"the checkpoint of step {max(intact)} is intact" if intact else "no earlier checkpoint exists"
        raise UserError(f"cannot write the checkpoint of step {step} to {checkpoints.directory} "
                        f"({first_line(e)}); {kept}") from e


def initial_state(args, model, checkpoints, identity, sources):
    """Where the run starts, decided here only: 1. with --resume, the newest checkpoint in OUTPUT that reads whole
    (newest_checkpoint): its state, and the positions of this process's streams, which `sources` take; 2. otherwise
    --model's weights with fresh AdamW moments at step 0, every stream at its start. Returns (TrainState, its step,
    {source name: batches drawn from it before that step}, the --steps its run had)."""
    fresh = init_state(model, args)
    restored = newest_checkpoint(args, checkpoints, identity, fresh) if args.resume else None
    if restored is None:
        return fresh, 0, {}, args.steps
    state, meta = restored
    step, recorded = meta["step"], meta["run"]
    if step > args.steps:
        raise UserError(f"--resume: the checkpoint of step {step} is past --steps {args.steps}")
    if step < args.steps:  # at --steps, the run is complete: train says so
        print(f"resuming at step {step} from {os.path.join(checkpoints.directory, str(step))}")
    ended, scheduled = (recorded.get(name, identity[name]) for name in WHERE_IT_ENDS)
    if (ended, scheduled) != (args.steps, args.schedule_steps):  # a run extended (or cut short)
        before = argparse.Namespace(**{**vars(args), "schedule_steps": scheduled})
        print(f"--resume: the run now ends at step {args.steps} (was {ended}) and its lr decays to 0 at step "
              f"{args.schedule_steps} (was {scheduled}): step {step} trains at lr "
              f"{learning_rate_schedule(args)(step):.3g} (was {learning_rate_schedule(before)(step):.3g})")
    streams = meta["stream"]
    positions = streams[jax.process_index()] if jax.process_index() < len(streams) else {}
    for source in sources:
        source.position = tuple(positions.get(source.name, (0, 0)))
    return fresh.replace(**state), step, meta.get("batches", {}), ended


def newest_checkpoint(args, checkpoints, identity, fresh):
    """(state, meta) of the newest checkpoint that reads whole; None if there is none. A damaged one (truncated by a
    copy, a failing disk) is skipped with a warning, and renamed <step>.unreadable so the run can write that step."""
    steps = sorted(checkpoints.all_steps(), reverse=True)
    if not steps:
        print(f"--resume: no checkpoint in {checkpoints.directory}; starting from --model {args.model}")
        return None
    target = jax.device_get({"params": fresh.params, "opt_state": fresh.opt_state, "step": fresh.step})
    for tried, step in enumerate(steps):
        folder = os.path.join(checkpoints.directory, str(step))
        try:
            meta = checkpoints.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            check_same_run(args, meta["run"], identity, folder)
            state = checkpoints.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
        except UserError:
            raise
        except Exception as e:
            print(f"warning: checkpoint {folder} is unreadable ({first_line(e)}); trying the one before",
                  file=sys.stderr)
            continue
        for damaged in (os.path.join(checkpoints.directory, str(s)) for s in steps[:tried]):
            shutil.rmtree(damaged + ".unreadable", ignore_errors=True)
            os.replace(damaged, damaged + ".unreadable")
        checkpoints.reload()
        return state, meta
    raise UserError(f"--resume: none of the checkpoints in {checkpoints.directory} is readable")


# A resume may move the run's end (a finished run extended): the schedule follows (initial_state says how).
WHERE_IT_ENDS = ("--steps", "--schedule_steps")


def check_same_run(args, recorded, identity, folder):
    """Refuses to continue a checkpoint of a different run (run_identity differs), unless --resume_force."""
    changed = [config_changes(recorded.get(name) or [], now) if name == "data config"
               else f"{name} ({recorded.get(name)!r} in the checkpoint, now {now!r})"
               for name, now in identity.items() if recorded.get(name) != now and name not in WHERE_IT_ENDS]
    if changed and not args.resume_force:
        raise UserError(f"--resume: this run differs from the checkpoint {folder} in {', '.join(changed)}; "
                        f"pass the checkpoint's flags, or --resume_force to continue regardless")
    if changed:
        print(f"warning: --resume_force: continuing {folder} with a different {', '.join(changed)}", file=sys.stderr)


def config_changes(recorded, now):
    """How the data config differs from the checkpoint's, entry by entry."""
    before, after = ({e.get("name"): e for e in entries} for entries in (recorded, now))
    changes = [f"{name} added" for name in after if name not in before]
    changes += [f"{name} removed" for name in before if name not in after]
    changes += [f"{name}'s {key} ({before[name].get(key)!r} in the checkpoint, now {after[name].get(key)!r})"
                for name in after if name in before
                for key in sorted({*before[name], *after[name]}) if before[name].get(key) != after[name].get(key)]
    return f"data config ({', '.join(changes or ['the order of its entries'])})"


# ============================================================================================
# Stopping: signals, a dropped session, the step every process stops after
# ============================================================================================

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: the ssh session to the host dropped


class Interrupted(Exception):
    """A signal or the input pipeline stopped the run (after a checkpoint of its last step, where one could be
    written); exits with `status`."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class StopRequests:
    """What SIGTERM (a preemption notice), SIGINT (Ctrl-C) and SIGHUP (a dropped ssh session) asked. While the train
    loop runs, the first signal asks it to finish its step, checkpoint and stop (the loop reads `first`); any other
    signal, or one outside the loop, stops at once."""
    first: signal.Signals = None   # the signal the loop was asked to stop for
    in_loop: bool = False          # the loop runs: there is a step to checkpoint
    resume: str = None             # once OUTPUT is ready: the command that continues (or restarts) the run

    def ends_a_wait(self):
        """Whether the loop's wait for a batch ends: one process stops without it; several wait for the step at which
        they all stop."""
        return self.first is not None and jax.process_count() == 1

    def receive(self, signum):
        if signum == signal.SIGHUP:
            leave_the_terminal()
        if self.in_loop and self.first is None:
            self.first = signum
            print(f"\n{signum.name}: finishing the step, then writing a checkpoint (again to stop at once)",
                  file=sys.stderr, flush=True)
            return
        saved = f"resume with: {self.resume}" if self.resume else "no checkpoint to resume from"
        print(f"\nstopped: {signum.name}, at once; {saved}", file=sys.stderr, flush=True)
        end_workers()
        os._exit(128 + signum)


def leave_the_terminal():
    """After SIGHUP, writes to the terminal or pipe (`| tee`) gone with the session fail: they go to /dev/null, so
    that the step, its checkpoint and the exit status still come. Files go on."""
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.dup2(os.open(os.devnull, os.O_WRONLY), fd)


class OutlivesTheTerminal:
    """sys.stdout or sys.stderr, whose first write to a terminal or pipe gone with the session (EIO, EPIPE) leaves it
    as SIGHUP does: the terminal closes before the signal comes, and a line printed in between must not end the run.
    Other errors (a full disk under a log file) are raised."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        return self.survive(self.stream.write, text)

    def flush(self):
        return self.survive(self.stream.flush)

    def survive(self, call, *args):
        try:
            return call(*args)
        except OSError as e:
            if e.errno not in (errno.EIO, errno.EPIPE):
                raise
            leave_the_terminal()
            return call(*args)  # to /dev/null now

    def __getattr__(self, name):
        return getattr(self.stream, name)


def handle_stop_signals():
    """Takes SIGTERM, SIGINT and SIGHUP for the rest of the process; returns the StopRequests they feed. A thread
    answers them, woken through signal.set_wakeup_fd: a Python handler runs only in the main thread, between two
    bytecodes: it would wait for an XLA compilation, a step or a stuck call, where a second signal must stop at once."""
    requests = StopRequests()
    sys.stdout, sys.stderr = OutlivesTheTerminal(sys.stdout), OutlivesTheTerminal(sys.stderr)
    # Stopping at once leaves the semaphores of the workers' queues to multiprocessing's resource tracker, which
    # removes them and would warn about each; it takes its warning filters from here.
    sys.warnoptions.append("ignore:resource_tracker:UserWarning")
    # That tracker, a child in this process group, ignores SIGINT and SIGTERM but dies of SIGHUP (and relaunched,
    # prints a traceback per semaphore): started now with SIGHUP blocked, it keeps it blocked.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    multiprocessing.resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)

    def watch():
        while byte := os.read(wake_read, 1):
            if byte[0] in STOP_SIGNALS:
                requests.receive(signal.Signals(byte[0]))

    for s in STOP_SIGNALS:  # a handler that does nothing: having one makes Python write to the pipe
        if not (s == signal.SIGHUP and signal.getsignal(s) == signal.SIG_IGN):  # under nohup, stays ignored
            signal.signal(s, lambda signum, frame: None)
    signal.set_wakeup_fd(wake_write)
    threading.Thread(target=watch, name="signals", daemon=True).start()
    return requests


STOP_CHECK_STEPS = 10  # multi-host: the processes share their stop requests every this many steps


def agreed_stop(stop, step):
    """The signal the run stops for once `step` steps are made, the same on every process. Signals reach the hosts at
    different moments, so each process's request is shared every STOP_CHECK_STEPS steps (an all-gather of one
    number) and all stop after the same step."""
    if jax.process_count() == 1:
        return stop.first
    if not due(step, STOP_CHECK_STEPS):
        return None
    received = [int(s) for s in multihost_utils.process_allgather(np.int32(stop.first or 0)) if s]
    if received and stop.first is None:
        stop.first = signal.Signals(received[0])  # another process's: a signal here now stops at once
    return signal.Signals(received[0]) if received else None


def resume_command(args):
    """This run's command line with --resume (and without --overwrite)."""
    words = [w for w in shlex.split(args.command) if w not in ("--overwrite", "--resume")]
    return shlex.join([*words, "--resume"])


# ============================================================================================
# Train loop
# ============================================================================================

MAX_BAD_STEPS = 5  # non-finite steps in a row before the run stops
STEPS_IN_FLIGHT = 2  # dispatched steps the host may run ahead of the devices: costs nothing (docs/performance.md)


@dataclasses.dataclass
class Progress:
    """The loop's bookkeeping. The steps since the last log line keep their measurements on the devices until
    log_window fetches them; the host runs at most STEPS_IN_FLIGHT steps ahead."""
    batches: collections.Counter    # batches drawn per source, from the run's start
    window: list = dataclasses.field(default_factory=list)  # (text batch, measurements) since the last line
    started: float = dataclasses.field(default_factory=time.perf_counter)  # the window's start
    waited: float = 0.0             # seconds of the window spent waiting for a batch
    bad_in_a_row: int = 0           # non-finite steps in a row, up to the last logged one
    skipped: int = 0                # non-finite steps, all told
    invalid: dict = dataclasses.field(default_factory=dict)  # the unusable-line counts last reported
    compiled: set = dataclasses.field(default_factory=set)   # batch shapes the step was compiled for


def train(args, model, tokenizer, sources, entries, held_out, local_devices, checkpoints, stop):
    """Trains from where initial_state says to --steps; process 0 alone writes what the run reports."""
    writer, devices = jax.process_index() == 0, devices_of_all_processes(local_devices)
    sharding, run = device_sharding(devices), RunFacts(entries, args.batch_size * len(devices), len(devices))
    identity = run_identity(args, entries, devices)
    state, first_step, batches_so_far, ended = initial_state(args, model, checkpoints, identity, sources)
    state = replicate(state, sharding, len(local_devices))
    if writer:
        catch_up_output(args, first_step, ended, state, model, tokenizer, run)
    if first_step == args.steps:  # a loop that restarts the command until it succeeds ends here
        return
    train_step = make_train_step(model, args, devices)
    dropout_key = replicate(jax.random.PRNGKey(args.seed), sharding, len(local_devices))
    texts = text_batches(sources, args, run.global_batch, local_rows(args, local_devices),
                         (jax.process_index(), jax.process_count()), first_step)
    progress = Progress(collections.Counter(batches_so_far))
    with (tokenizer_pool(tokenizer, args) as pool,
          contextlib.closing(background_batches(texts, pool, (len(local_devices), args.batch_size), args.prefetch,
                                                args.batch_timeout, stop.ends_a_wait)) as batches,
          contextlib.closing(Report(args, first_step, writer)) as report):
        evaluate = held_out and make_evaluator(model, held_out, pool, local_devices, sharding, args.batch_size)
        if evaluate:
            run.scores[first_step] = report_eval(report, first_step, evaluate, state)
        batch, failed = next_batch(batches, sharding, progress), None
        for step in range(first_step + 1, args.steps + 1):  # step: the steps made once this one is
            state = dispatch(train_step, state, batch, dropout_key, progress, args, report)
            stop.in_loop = True  # from here a signal checkpoints this step
            if writer and step == first_step + 1:  # a step made: the run that --overwrite replaces goes
                drop_replaced(args.output)
            done, last = batch.text, step == args.steps
            if not last:  # the host prepares the next batch while the step runs
                batch, failed = next_batch_or_failure(batches, sharding, progress, args)
            signalled = agreed_stop(stop, step)
            checkpoint_now = due(step, args.save_steps) or last or bool(signalled or failed)
            # the window is checked before a checkpoint, so a run that must stop never writes one
            if due(step, args.log_steps) or checkpoint_now:
                log_window(report, progress, run.global_batch, sources, checkpoints.latest_step())
            if evaluate and (due(step, args.eval_steps) or last):
                run.scores[step] = report_eval(report, step, evaluate, state)
                progress.started = time.perf_counter()  # the eval is not training time
            if checkpoint_now:
                save_checkpoint(checkpoints, state, done, sources, identity, progress.batches)
            if writer and due(step, args.save_steps) and not last:
                export(args, step, state, model.config, tokenizer, run)
            stop_for(args, step, failed, signalled)
            report.bar.update()
        stop.in_loop = False  # a signal from here stops at once: the last checkpoint is written
    if writer:
        export(args, args.steps, state, model.config, tokenizer, run)
        print(f"done: {args.steps} steps, {progress.skipped} skipped as non-finite, {len(progress.compiled)} "
              f"batch shape(s) compiled; model in {export_folder(args, args.steps)}")


def stop_for(args, step, failed, signalled):
    """Ends the run once the checkpoint of `step` is written, for a failed input pipeline or a signal."""
    resume = f"resume with: {resume_command(args)}"
    if failed:
        raise Interrupted(f"{str(failed).rstrip('.')}; checkpoint of step {step} written; {resume}", 1)
    if signalled and step < args.steps:  # after the last step, the export is all that is left
        raise Interrupted(f"{signalled.name} at step {step}, checkpoint written; {resume}", 128 + signalled)


def due(step, every):
    """Whether the work done every `every` steps comes after `step` (the steps made so far)."""
    return step % every == 0


def catch_up_output(args, first_step, ended, state, model, tokenizer, run):
    """OUTPUT as a resumed run leaves it before its first step: OUTPUT/final kept under its step if --steps moved,
    the export that a kill or a full disk cut short written, the run record extended."""
    if first_step:
        keep_final_model(args, ended)
        if (due(first_step, args.save_steps) or first_step in (args.steps, ended)) and not os.path.isdir(
                export_folder(args, first_step)):
            export(args, first_step, state, model.config, tokenizer, run)
    if first_step == args.steps:
        print(f"--resume: the run is complete ({args.steps} steps); model in {export_folder(args, args.steps)}")
    else:
        write_run_record(args, run.mixture, first_step)


def next_batch(batches, sharding, progress):
    """The next batch, its columns put on the devices; None if a stop was asked meanwhile."""
    started = time.perf_counter()
    batch = next(batches, None)
    if batch:
        batch.columns = to_devices(batch.columns, sharding)
    progress.waited += time.perf_counter() - started
    return batch


def next_batch_or_failure(batches, sharding, progress, args):
    """(next_batch, None), or (None, the input pipeline's PipelineError) for the step just made to be checkpointed;
    with several processes, a failure stops at once: the others wait in the next step, and a checkpoint needs them."""
    try:
        return next_batch(batches, sharding, progress), None
    except PipelineError as failed:
        if jax.process_count() == 1:
            return None, failed
        raise Interrupted(f"{str(failed).rstrip('.')}; no checkpoint written (it needs every process); "
                          f"resume with: {resume_command(args)}", 1)


def dispatch(train_step, state, batch, dropout_key, progress, args, report):
    """Dispatches the step on `batch` (compiling it for a new batch shape) and returns the new state. The host runs
    ahead of the devices by STEPS_IN_FLIGHT steps at most: unbounded, it queues hundreds between two logging steps, and
    XLA:CPU aborts when a collective of one of them waits over 40 s for its devices (docs/performance.md)."""
    shape = tuple(ids.shape for ids, _ in batch.columns)
    if shape in progress.compiled:
        state, measured = train_step(state, batch.columns, dropout_key)
    else:
        state, measured = compile_step(train_step, state, batch.columns, dropout_key, args, report)
        progress.compiled.add(shape)
    progress.window.append((batch.text, measured))
    if len(progress.window) > STEPS_IN_FLIGHT:  # the steps before the window were fetched when it began
        jax.block_until_ready(progress.window[-STEPS_IN_FLIGHT - 1][1])
    progress.batches.update(batch.text.sources)
    return state


SMALLER_STEP = "lower --batch_size (the global batch shrinks with it) or --max_length, or pass --mini_batch_size"


def batch_kind(lengths):
    return f"{ {2: 'pairs', 3: 'triplets'}[len(lengths)]} of {' + '.join(map(str, lengths))} tokens"


def compile_step(train_step, state, columns, dropout_key, args, report):
    """Runs a step that compiles (a new batch shape) and waits for it: a batch too big for the device fails here, in
    one line, rather than at the next fetch with a traceback."""
    kind = batch_kind([ids.shape[-1] for ids, _ in columns])
    started = time.perf_counter()
    try:
        state, measured = jax.block_until_ready(train_step(state, columns, dropout_key))
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise UserError(f"a step on {kind} with --batch_size {args.batch_size} per device and --max_length "
                        f"{args.max_length} does not fit in device memory ({first_line(e)}); {SMALLER_STEP}") from e
    report.line(f"compiled the step for {kind} and ran it in {time.perf_counter() - started:.1f}s")
    return state, measured


def log_window(report, progress, global_batch, sources, last_checkpoint):
    """Fetches the measurements of the steps since the last line (the loop's only host sync), stops the run after
    MAX_BAD_STEPS non-finite steps in a row, and reports them. last_checkpoint: OUTPUT's newest checkpoint, or None."""
    window, seconds = progress.window, time.perf_counter() - progress.started
    measured = jax.device_get([m for _, m in window])
    for (text, _), m in zip(window, measured):
        progress.bad_in_a_row = 0 if m["finite"][0] else progress.bad_in_a_row + 1
        if progress.bad_in_a_row >= MAX_BAD_STEPS:
            kept = (f"the checkpoint of step {last_checkpoint} is intact" if last_checkpoint is not None
                    else "no checkpoint was written")
            raise UserError(f"{MAX_BAD_STEPS} non-finite losses in a row, the last at step {text.step + 1} "
                            f"(sources {', '.join(text.sources)}); their updates were skipped; {kept}")
    finite = [m for m in measured if m["finite"][0]]
    mean = lambda key: float(np.mean([m[key][0] for m in finite])) if finite else float("nan")  # noqa: E731
    line = {"step": window[-1][0].step + 1, "loss": mean("loss"), "lr": float(measured[-1]["lr"][0]),
            "grad_norm": mean("grad_norm"), "pairs_per_s": len(window) * global_batch / seconds,
            "data_wait": progress.waited / seconds, "skipped": len(measured) - len(finite)}
    progress.skipped += line["skipped"]
    progress.window, progress.waited, progress.started = [], 0.0, time.perf_counter()
    report.bar.set_postfix(loss=f"{line['loss']:.4f}", lr=f"{line['lr']:.2e}",
                           pairs_s=f"{line['pairs_per_s']:.0f}", wait=f"{line['data_wait']:.0%}")
    report.line(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in line.items()))
    report.record({**line, "batches": {s.name: progress.batches[s.name] for s in sources}})
    if window[-1][0].invalid != progress.invalid:
        progress.invalid = window[-1][0].invalid
        report.line(invalid_lines_report(progress.invalid))


def report_eval(report, step, evaluate, state):
    """Scores the held-out rows at `step` (every process, on its own devices) and reports them."""
    started = time.perf_counter()
    scores = evaluate(state.params)
    seconds = time.perf_counter() - started
    report.line(f"eval step={step} " + " ".join(f"{k}={v:.4f}" for k, v in scores["overall"].items())
                + f" ({seconds:.1f}s)")
    report.record({"step": step, "eval": scores, "eval_seconds": seconds})
    return scores


def export(args, step, state, config, tokenizer, run):
    """OUTPUT/<step> (OUTPUT/final at --steps), from this process's first copy of the parameters."""
    params = jax.device_get(first_local_replica(state.params))
    export_sentence_transformer(export_folder(args, step), params, config, tokenizer, args, run, step)


class Report:
    """What the run reports, written by process 0 alone (the others train the same steps in silence): lines above
    the progress bar, OUTPUT/metrics.jsonl and OUTPUT/tensorboard/ (a record per log line and per evaluation, nested
    keys joined by "/"; appended to, so a resumed run continues both)."""

    def __init__(self, args, first_step, writer):
        self.writer = writer
        self.bar = tqdm.tqdm(initial=first_step, total=args.steps, disable=not writer, dynamic_ncols=True)
        if writer:
            self.jsonl = open(os.path.join(args.output, "metrics.jsonl"), "a")
            self.board = tensorboardX.SummaryWriter(os.path.join(args.output, "tensorboard"))

    def line(self, text):
        if self.writer:
            self.bar.write(text)

    def record(self, record):
        if not self.writer:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        numbers = {key: value for key, value in record.items() if key != "step"}  # the x axis, not a scalar
        for tag, value in traverse_util.flatten_dict(numbers, sep="/").items():
            self.board.add_scalar(tag, value, record["step"])
        self.board.flush()

    def close(self):
        self.bar.close()  # a line printed after the run starts on a line of its own
        if self.writer:
            self.jsonl.close()
            self.board.close()


# ============================================================================================
# Compile for a TPU: the run's steps through the TPU compiler, before renting one
# ============================================================================================

# libtpu compiles for a TPU topology on a machine without its chips ("compile-only" devices): whether each step of
# a run fits a slice's HBM is known before paying for it. The peaks are Google Cloud's published figures (bf16
# FLOP/s, HBM bytes/s, HBM GiB; jax gives no HBM size for compile-only devices) per device: a v3 chip is two
# devices, a v4 or v5p chip one "megacore".
TPU_PEAKS = {"TPU v3": (61.5e12, 450e9, 16), "TPU v4": (275e12, 1200e9, 32), "TPU v5 lite": (197e12, 819e9, 16),
             "TPU v5": (459e12, 2765e9, 95), "TPU v6 lite": (918e12, 1638e9, 32)}
# Cloud TPU's slice names: v3, v4 and v5p count TensorCores (two per chip), v5e and v6e chips.
TPU_SLICES = {"v3-8": "v3:2x2", "v3-32": "v3:4x4", "v4-8": "v4:2x2x1", "v4-32": "v4:2x2x4", "v5p-8": "v5p:2x2x1",
              "v5p-32": "v5p:2x2x4", "v5e-8": "v5e:2x4", "v5e-32": "v5e:4x8", "v6e-8": "v6e:2x4", "v6e-32": "v6e:4x8"}


def tpu_devices(name):
    """The compile-only devices of a TPU slice (TPU_SLICES) or topology (v3:2x2)."""
    topology = TPU_SLICES.get(name, name)
    generation, _, chips = topology.partition(":")
    options = {"chip_config_name": "megacore"} if generation in ("v4", "v5", "v5p") else {}
    if generation in ("v5e", "v6e") and chips == "2x4":  # one host of 8 chips, as Cloud TPU has it
        options["chips_per_host_bounds"] = (2, 4, 1)
    jax.config.update("jax_platforms", "cpu")  # nothing runs: a TPU of this machine is not needed
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # nor its lock, which would keep out other runs
    from jax.experimental import topologies
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)  # libtpu starts by warning that it cannot tell which chips this machine has
    try:
        devices = topologies.get_topology_desc(topology, "tpu", **options).devices
    except RuntimeError as e:
        if "not installed" in str(e):
            raise UserError(f'--compile_for needs libtpu: pip install "jax[tpu]=={jax.__version__}"') from None
        raise UserError(f"--compile_for {name}: libtpu does not know it ({first_line(e)}); try one of "
                        f"{', '.join(TPU_SLICES)} or a topology such as v3:2x2") from None
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    if devices[0].device_kind not in TPU_PEAKS:
        raise UserError(f"--compile_for {name}: no peak figures for {devices[0].device_kind}")
    return devices


def compile_for_tpu(args, entries):
    """--compile_for: the step for every batch shape the run can meet (each column count its files give, both if they
    cannot be read here; each bucket length), compiled for the slice's devices."""
    devices = tpu_devices(args.compile_for)
    peaks, hosts = TPU_PEAKS[devices[0].device_kind], len({d.process_index for d in devices})
    check_batch_split(args, len(devices), hosts)
    _, config = load_tokenizer_and_config(args)
    model = FlaxAutoModel.from_config(config, dtype=jnp.dtype(args.dtype), _do_init=False)  # no weights
    per_device = lambda leaf: jax.ShapeDtypeStruct((len(devices), *leaf.shape), leaf.dtype)  # noqa: E731
    state, key = jax.tree_util.tree_map(per_device, jax.eval_shape(
        lambda: (init_state(model, args, model.params_shape_tree), jax.random.PRNGKey(args.seed))))
    train_step, too_big = make_train_step(model, args, devices), []
    print(f"--compile_for {args.compile_for}: {len(devices)} x {devices[0].device_kind} on {hosts} host(s), a global "
          f"batch of {args.batch_size * len(devices)}; per device {peaks[2]} GiB HBM and peaks of {peaks[0] / 1e12:g} "
          f"TFLOP/s (bf16) and {peaks[1] / 1e9:g} GB/s (Google Cloud's figures)")
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            kinds = sorted({len(row) for row, _ in pool.map(  # each file's first usable line
                lambda entry: head_of(source_url(args.data_folder, entry["name"]), 1), entries)})
    except UserError as e:
        print(f"the data cannot be read here ({e}): compiling for pairs and triplets")
        kinds = [2, 3]
    for lengths in (shape for columns in kinds for shape in itertools.product(args.pad_to_buckets, repeat=columns)):
        batch = [(jax.ShapeDtypeStruct((len(devices), args.batch_size, length), jnp.int32),) * 2 for length in lengths]
        started = time.perf_counter()
        try:
            line, fits = step_cost(train_step.lower(state, batch, key).compile(), args, peaks)
            line = f"compiled in {time.perf_counter() - started:.1f}s; {line}"
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            line, fits = f"does not fit, the compiler refuses ({first_line(e)})", False
        print(f"{batch_kind(lengths)}: {line}")
        too_big += [] if fits else [batch_kind(lengths)]
    if too_big:
        raise UserError(f"--compile_for {args.compile_for}: the step on {', '.join(too_big)} does not fit in "
                        f"{peaks[2]} GiB per device; {SMALLER_STEP}")
    print("every step fits; the times are lower bounds (at the peaks, which no step reaches), not estimates")


def step_cost(compiled, args, peaks):
    """(A compiled step's needs per device, whether they fit): HBM for its buffers (the donated state counted once) and
    code; time at least for its FLOPs at the peak FLOP/s, or its bytes at the peak bandwidth."""
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    needed = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
              + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)
    bound = max(cost["flops"] / peaks[0], cost["bytes accessed"] / peaks[1])
    return (f"per device {needed / 2**20:,.1f} MiB of {peaks[2] * 1024:,} MiB HBM (arguments "
            f"{memory.argument_size_in_bytes / 2**20:,.1f}, temporaries {memory.temp_size_in_bytes / 2**20:,.1f}), "
            f"{cost['flops'] / 1e12:.3g} TFLOP and {cost['bytes accessed'] / 1e9:.3g} GB per step: at least "
            f"{bound * 1e3:,.1f} ms per step, {bound * args.steps / 3600:,.1f} h for --steps {args.steps}",
            needed <= peaks[2] * 2**30)


# ============================================================================================
# Main: cheap checks first, then the model, then the run
# ============================================================================================

def main(argv=None, stop=None):
    """The run; `stop`: the StopRequests of handle_stop_signals, which only the script's own process installs
    (called as a function, main leaves the caller's signals alone)."""
    stop = stop or StopRequests()
    args = parse_args(argv)
    if args.compile_for:  # runs nothing: needs no accelerator, no weights, no OUTPUT
        return compile_for_tpu(args, load_data_config(args.data_config))
    if args.cpu_devices:  # before anything asks jax for devices
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    join_processes(args)
    entries = load_data_config(args.data_config)
    local_devices = choose_devices(args)
    device_count = len(local_devices) * jax.process_count()
    sources = open_sources(entries, args)
    held_out = load_held_out(sources, args.eval_rows) if args.eval_steps else None
    tokenizer, config = load_tokenizer_and_config(args)
    if args.dry_run is not None:
        return dry_run(sources, args, tokenizer, args.batch_size * device_count)
    model = load_model(args, config)
    # only once the model loads: --overwrite must not lose a run for nothing
    with output_of_process_0(args, run_inputs(args, sources)):
        stop.resume = resume_command(args)  # from here a signal names the command that continues the run
        with checkpoint_manager(args) as checkpoints:
            train(args, model, tokenizer, sources, entries, held_out, local_devices, checkpoints, stop)


if __name__ == "__main__":
    stop = handle_stop_signals()  # before the first line of output
    try:
        main(stop=stop)
    except (UserError, PipelineError) as e:  # a PipelineError comes before the first step: nothing to checkpoint
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 1)
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(e.status)
