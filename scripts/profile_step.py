"""Where a training step's time goes: train_script.py's JAX step (jax.profiler) next to the
sentence-transformers PyTorch step (torch.profiler), on scripts/benchmark.py's model and batch.

    python scripts/profile_step.py                 # MiniLM-L12-H384, 32 pairs x 128 tokens (CPU only)
    python scripts/profile_step.py -- --dtype bfloat16   # flags after -- go to train_script

Both steps are warmed up (compiled, allocated), then one step of each is traced. Each framework's
time is split into the same parts: matrix products, dropout masks (drawing the random bits),
layout copies (transposes, concatenations), collectives (all_gather and all-reduce, including a
device waiting for the other) and the other element-wise work. JAX's parts are shares of the time
of XLA:CPU's worker threads, each operation charged until the next one starts on its thread;
PyTorch's are shares of its operators' own time. Seconds are those shares of the step's wall time.
"""
import collections
import glob
import os
import re
import sys
import tempfile
import time

import jax
import torch

import benchmark

PARTS = ["matrix products", "dropout masks", "layout copies", "collectives", "other element-wise"]


# ============================================================================================
# JAX: XLA's executed operations, named by the compiled HLO
# ============================================================================================

def hlo_instructions(compiled_text):
    """Instruction name -> its HLO line (opcode, shape, metadata), from the compiled module's text."""
    found = re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", compiled_text, re.M)
    return dict(found)


def jax_part(event, line):
    """The part of the step an XLA operation belongs to, from its name and HLO line."""
    kind = event.split(".")[0]
    if kind in ("ynn_fusion", "dot"):  # XLA:CPU's products: YNNPACK, else Eigen
        return "matrix products"
    if kind in ("all_gather", "reduce_scatter", "all-reduce", "Rendezvous") or kind.startswith("Wait"):
        return "collectives"
    if "dropout" in line and "bernoulli" in line:
        return "dropout masks"
    if kind.startswith(("copy", "transpose", "concatenate")):
        return "layout copies"
    return "other element-wise"


def profile_jax(args, columns, trace_dir):
    """Seconds per part of one traced JAX step, and the step's wall time."""
    train_step, inputs = benchmark.jax_setup(args, columns)
    instructions = hlo_instructions(train_step.lower(*inputs).compile().as_text())

    def step():
        inputs[0], measured = train_step(*inputs)
        jax.block_until_ready((inputs[0], measured))
    step()
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    step()
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()

    trace = jax.profiler.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
    charged = collections.Counter()
    for plane in trace.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):  # XLA:CPU's worker threads run the operations
                continue
            ops = sorted((e.start_ns, e.end_ns, e.name) for e in line.events
                         if e.name in instructions or e.name.startswith(("Rendezvous", "Wait")))
            # an operation is charged until the next one starts on its thread: a thread that
            # waits for an Eigen product's work, done on the pool, is charged to that product
            for (start, end, name), next_start in zip(ops, [s for s, _, _ in ops[1:]] + [0]):
                charged[jax_part(name, instructions.get(name, ""))] += max(end, next_start) - start
    total = sum(charged.values())
    return {part: wall * charged[part] / total for part in PARTS}, wall


# ============================================================================================
# PyTorch: aten operators
# ============================================================================================

def torch_part(name):
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "matrix products"
    if name == "aten::bernoulli_":
        return "dropout masks"
    if name in ("aten::copy_", "aten::clone", "aten::cat"):
        return "layout copies"
    return "other element-wise"


def profile_torch(folder, columns):
    """Seconds per part of one traced PyTorch step on the CPU, and the step's wall time."""
    step = benchmark.torch_step(folder, columns, "cpu")
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        start = time.perf_counter()
        step()
        wall = time.perf_counter() - start
    busy = collections.Counter()
    for op in profile.key_averages():
        busy[torch_part(op.key)] += op.self_cpu_time_total
    total = sum(busy.values())
    return {part: wall * busy[part] / total for part in PARTS}, wall


# ============================================================================================
# Main
# ============================================================================================

def main():
    options = benchmark.step_parser(__doc__.split("\n\n")[0]).parse_args()
    benchmark.use_one_cpu_device_per_core(options)
    devices = jax.local_devices()
    if devices[0].platform != "cpu":
        sys.exit(f"error: this script reads XLA:CPU's trace; on {devices[0].platform}, open a jax.profiler "
                 "trace of the step in TensorBoard or Perfetto instead")
    if options.batch_size % len(devices):
        sys.exit(f"error: --batch_size {options.batch_size} does not split over {len(devices)} JAX devices")
    with tempfile.TemporaryDirectory() as tmp:
        folder, tokenizer, texts = benchmark.random_model_and_texts(tmp, options)
        args = benchmark.script_args(folder, options, options.batch_size // len(devices), options.train_script_flags)
        columns = benchmark.tokenized_columns(texts, tokenizer, args, len(devices))
        jax_parts, jax_wall = profile_jax(args, columns, os.path.join(tmp, "trace"))
        torch_parts, torch_wall = profile_torch(folder, columns)

    print(f"\n{options.batch_size} pairs x {options.max_length} tokens, {options.layers} layers; JAX on "
          f"{len(devices)} {devices[0].platform} device(s), PyTorch with {torch.get_num_threads()} threads")
    print(f"command: {' '.join(['python', *sys.argv])}\n")
    print("| part | JAX s | JAX % | PyTorch s | PyTorch % |\n|---|---:|---:|---:|---:|")
    for part in PARTS:
        print(f"| {part} | {jax_parts[part]:.2f} | {100 * jax_parts[part] / jax_wall:.0f} | "
              f"{torch_parts[part]:.2f} | {100 * torch_parts[part] / torch_wall:.0f} |")
    print(f"| step (wall) | {jax_wall:.2f} | 100 | {torch_wall:.2f} | 100 |")


if __name__ == "__main__":
    main()
