"""Side by side on one machine: train_script.py's training step (JAX) and a sentence-transformers
training step (PyTorch, MultipleNegativesRankingLoss), same architecture, batch and lengths.

    python scripts/benchmark.py                       # 32 pairs x 128 tokens, MiniLM-L12-H384
    python scripts/benchmark.py --steps 5 --buckets 32,64 -- --dtype bfloat16
    python scripts/benchmark.py --memory_only --cpu_devices 1 --batch_size 128 --mini_batch_size 32,8

The model is MiniLM-L12-H384's architecture (12 layers, hidden 384, 12 heads, intermediate 1536)
from a random init built offline; both frameworks start from the same weights, dropout on. JAX
runs the real make_train_step pmapped over all local devices (the batch split over them); PyTorch
runs on CUDA when there is a GPU, else on the CPU. Flags after `--` go to train_script's parser
(e.g. --dtype, --pad_to_buckets, --mini_batch_size where the script has them) and apply to the
JAX step only. Also measured: the JAX step with the cheaper alternatives to the published update
rule (--clip_scope global, --attention_dropout shared), the producer (streaming, parsing,
tokenizing; pairs/s), the step on length buckets if train_script has --pad_to_buckets, and
GradCache's activation memory (XLA's buffer assignment of the compiled step) if it has
--mini_batch_size. --memory_only compiles the plain and GradCache steps and runs neither, so the
card's 128 rows per device can be measured on a machine too slow or too small to run them.

The texts are synthetic with a realistic length mix: short questions, long answers. The tiny
fixture's tokenizer (scripts/make_tiny_data.py) turns them into ids, so nothing is downloaded.
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for train_script; scripts/ is on the path already (run from it, or by the tests)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# on a GPU, JAX would otherwise reserve most of its memory up front and leave PyTorch little
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import benchmark_producer  # noqa: E402
import train_script  # noqa: E402
from make_tiny_data import build_fixture  # noqa: E402

MINILM_L12_H384 = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=1536, max_position_embeddings=512, hidden_act="gelu",
                       hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
QUESTION_WORDS, ANSWER_WORDS = (4, 30), (20, 120)  # a realistic mix: short questions, long answers


def step_parser(description):
    """A parser with the flags of the step both frameworks run, shared with profile_step.py: the model,
    the batch, JAX's CPU devices and the flags for train_script."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--batch_size", type=int, default=32, help="pairs per step (global: split over JAX's devices)")
    p.add_argument("--max_length", type=int, default=128, help="tokens per text (fixed padding)")
    p.add_argument("--layers", type=int, default=12, help="transformer layers (12: MiniLM-L12)")
    p.add_argument("--cpu_devices", type=int, default=None,
                   help="without an accelerator: JAX CPU devices, the batch split over them (default: one per "
                        "core, or XLA_FLAGS' --xla_force_host_platform_device_count when set)")
    p.add_argument("train_script_flags", nargs="*",
                   help="after --: flags for train_script's parser, for every JAX step (e.g. --dtype bfloat16)")
    return p


def parse_args():
    p = step_parser(__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps of each framework, after one warm-up step")
    p.add_argument("--buckets", default="32,64", help="--pad_to_buckets of the bucketed step (if the script has it)")
    p.add_argument("--mini_batch_size", type=lambda text: [int(m) for m in text.split(",")], default=None,
                   help="GradCache rows per chunk for the memory comparison, comma-separated for several "
                        "(default: about a quarter of a device's)")
    p.add_argument("--memory_only", action="store_true",
                   help="only compile the plain and GradCache steps and print their activation memory: no "
                        "step runs, so no PyTorch, no timing, no producer")
    p.add_argument("--producer_batches", type=int, default=20, help="batches timed through the producer")
    p.add_argument("--skip", default="",
                   help="comma-separated parts to leave out: update_rule,torch,buckets,gradcache,producer")
    return p.parse_args()


# ============================================================================================
# The shared starting point: one random MiniLM, one batch of token ids
# ============================================================================================

def write_random_model(folder, fixture, layers):
    """A random-init MiniLM-L12-H384 (safetensors) with the fixture's tokenizer: both frameworks load it."""
    torch.manual_seed(0)
    config = transformers.BertConfig(**{**MINILM_L12_H384, "num_hidden_layers": layers})
    transformers.BertModel(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(os.path.join(fixture, "model")).save_pretrained(folder)


def random_model_and_texts(tmp, options):
    """The starting point both frameworks share, built in `tmp`: (model folder, its tokenizer, the
    batch's texts)."""
    fixture, folder = os.path.join(tmp, "fixture"), os.path.join(tmp, "model")
    build_fixture(fixture, lines_per_file=2000, seed=0)
    write_random_model(folder, fixture, options.layers)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return folder, tokenizer, synthetic_pairs(tokenizer, options.batch_size)


def synthetic_pairs(tokenizer, pairs, seed=0):
    """(question, answer) texts of one-token words, lengths drawn from the realistic mix."""
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.islower()]
    rng = np.random.default_rng(seed)
    text = lambda low_high: " ".join(rng.choice(words, rng.integers(*low_high)))  # noqa: E731
    return [(text(QUESTION_WORDS), text(ANSWER_WORDS)) for _ in range(pairs)]


def tokenized_columns(texts, tokenizer, args, devices):
    """train_script's own tokenization of the pairs: [(ids, mask)] per column, [devices, per device, length]."""
    with train_script.tokenizer_pool(tokenizer, args) as pool:
        return pool.submit(train_script.tokenize_columns, list(zip(*texts)), (devices, args.batch_size)).result()


def script_args(folder, options, batch_size, extra):
    """train_script's arguments for this benchmark (the two positionals are never read)."""
    argv = ["unused_config.json", "unused_output", "--model", folder, "--batch_size", str(batch_size),
            "--max_length", str(options.max_length), "--num_workers", "0", *extra]
    return train_script.parse_args(argv)


# ============================================================================================
# The two steps
# ============================================================================================

def time_steps(step, steps):
    """Seconds of each of `steps` calls, after one untimed warm-up (compilation, allocation)."""
    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def jax_setup(args, columns_numpy):
    """train_script's pmapped update and its inputs: [state, batch on the devices, dropout key]."""
    _, config = train_script.load_tokenizer_and_config(args)
    model = train_script.load_model(args, config)
    devices = train_script.choose_devices(args)
    sharding = train_script.device_sharding(devices)
    state = train_script.replicate(train_script.init_state(model, args), sharding, len(devices))
    dropout_key = train_script.replicate(jax.random.PRNGKey(args.seed), sharding, len(devices))
    return train_script.make_train_step(model, args, devices), [
        state, train_script.to_devices(columns_numpy, sharding), dropout_key]


def jax_step(args, columns_numpy):
    """A callable that runs one JAX training step to completion (the state carried between calls)."""
    train_step, inputs = jax_setup(args, columns_numpy)

    def step():
        inputs[0], measured = train_step(*inputs)
        jax.block_until_ready((inputs[0], measured))
    return step


def torch_step(folder, columns_numpy, device):
    """A sentence-transformers training step: MultipleNegativesRankingLoss, AdamW, clipping at 1."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    model = SentenceTransformer(folder, device=device)  # Transformer + mean pooling
    model.train()
    loss = MultipleNegativesRankingLoss(model, scale=20.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, eps=1e-6, weight_decay=0.01)
    features = [{"input_ids": torch.from_numpy(ids.reshape(-1, ids.shape[-1])).long().to(device),
                 "attention_mask": torch.from_numpy(mask.reshape(-1, mask.shape[-1])).long().to(device)}
                for ids, mask in columns_numpy]

    def step():
        loss(features, None).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
    return step


# ============================================================================================
# Extras: the producer, buckets, GradCache memory
# ============================================================================================

def producer_pairs_per_second(tmp, options):
    """train_script's input pipeline (stream, parse, tokenize; one tokenizer worker) in pairs/s, on
    benchmark_producer.py's generated question/answer data with MiniLM's tokenizer, 1024-pair batches."""
    data = os.path.join(tmp, "producer")
    config = benchmark_producer.generate(data, files=4, lines=20_000)
    return benchmark_producer.measure(config, data, 1, options.producer_batches, warmup=4)[0]


def activation_bytes(args, columns_numpy):
    """XLA's temporary buffers of the compiled step (its buffer assignment): the activation memory."""
    train_step, inputs = jax_setup(args, columns_numpy)
    return train_step.lower(*inputs).compile().memory_analysis().temp_size_in_bytes


# ============================================================================================
# Main
# ============================================================================================

def use_one_cpu_device_per_core(options):
    """XLA runs most of one CPU device's step on a single thread; the cores are used by splitting the
    CPU into devices, as a TPU host has one device per core. No effect on GPUs and TPUs."""
    if options.cpu_devices is None and "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    cores = os.cpu_count() or 1
    count = options.cpu_devices or max(d for d in range(1, cores + 1) if options.batch_size % d == 0)
    jax.config.update("jax_num_cpu_devices", count)


def main():
    options = parse_args()
    use_one_cpu_device_per_core(options)  # before anything starts JAX's CPU backend
    skip = set(filter(None, options.skip.split(",")))
    devices = jax.local_devices()
    if options.batch_size % len(devices):
        sys.exit(f"error: --batch_size {options.batch_size} does not split over {len(devices)} JAX devices")
    per_device = options.batch_size // len(devices)
    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = f"{options.batch_size} pairs x {options.max_length} tokens"
    flags = options.train_script_flags

    with tempfile.TemporaryDirectory() as tmp:
        folder, tokenizer, texts = random_model_and_texts(tmp, options)
        fixed = script_args(folder, options, per_device, flags)
        columns = tokenized_columns(texts, tokenizer, fixed, len(devices))

        if options.memory_only:
            skip |= {"update_rule", "torch", "buckets", "producer"}
            rows = []
        else:
            rows = [(f"JAX: train_script step, {len(devices)} {devices[0].platform} device(s), {shape}",
                     time_steps(jax_step(fixed, columns), options.steps))]
        if "torch" not in skip:
            rows.append((f"PyTorch: sentence-transformers MNRL step, {torch_device}, {shape}",
                         time_steps(torch_step(folder, columns, torch_device), options.steps)))
        if "update_rule" not in skip:  # the published update rule against the cheaper choices
            for choice in (["--clip_scope", "global"], ["--attention_dropout", "shared"]):
                rows.append((f"JAX: the same with {' '.join(choice)}",
                             time_steps(jax_step(script_args(folder, options, per_device, [*flags, *choice]), columns),
                                        options.steps)))
        if "buckets" not in skip:
            bucketed = script_args(folder, options, per_device, [*flags, "--pad_to_buckets", options.buckets])
            bucket_columns = tokenized_columns(texts, tokenizer, bucketed, len(devices))
            lengths = " + ".join(str(ids.shape[-1]) for ids, _ in bucket_columns)
            rows.append((f"JAX: the same with --pad_to_buckets {options.buckets} ({lengths} tokens)",
                         time_steps(jax_step(bucketed, bucket_columns), options.steps)))

        print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s); "
              f"jax {jax.__version__} on {devices[0].device_kind}; torch {torch.__version__} on "
              f"{torch.cuda.get_device_name() if torch_device == 'cuda' else 'cpu'} "
              f"({torch.get_num_threads()} threads)")
        print(f"command: {' '.join(['python', *sys.argv])}\n")
        if rows:
            print("| step | seconds/step (median of %d) | pairs/s |\n|---|---:|---:|" % options.steps)
        for name, times in rows:
            print(f"| {name} | {statistics.median(times):.3f} | {options.batch_size / statistics.median(times):.1f} |")
        if "torch" not in skip:  # rows[1] is PyTorch's
            ratio = statistics.median(rows[0][1]) / statistics.median(rows[1][1])
            print(f"\nJAX seconds per step / PyTorch seconds per step: {ratio:.2f}")

        if "gradcache" not in skip:
            # default: the largest divisor of a device's rows up to a quarter of them
            minis = options.mini_batch_size or [next(d for d in range(max(1, per_device // 4), 0, -1)
                                                      if per_device % d == 0)]
            sizes = [f"{activation_bytes(fixed, columns) / 2**20:,.0f} MiB plain"]
            for mini in minis:
                cached = script_args(folder, options, per_device, [*flags, "--mini_batch_size", str(mini)])
                sizes.append(f"{activation_bytes(cached, columns) / 2**20:,.0f} MiB with --mini_batch_size {mini}")
            print(f"GradCache activation memory (XLA temp buffers, {per_device} rows x {options.max_length} "
                  f"tokens per device): {', '.join(sizes)}")
        if "producer" not in skip:
            print(f"producer (stream, parse, tokenize; 1 tokenizer worker; generated question/answer data, "
                  f"MiniLM's tokenizer): {producer_pairs_per_second(tmp, options):,.0f} pairs/s")


if __name__ == "__main__":
    main()
