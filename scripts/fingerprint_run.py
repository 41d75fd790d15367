"""What a train_script.py produces, as hashes: to show that a change of the script's code changed
none of its results. On the tiny fixture (scripts/make_tiny_data.py) and 8 emulated CPU devices it
writes --dump_batches for several mixing and order flags, and trains two short runs (each resumed
once), then prints a line per result: the dump's hash, every exported file's, each checkpoint's
state and meta, and metrics.jsonl without its timings.

    python scripts/fingerprint_run.py [--script path/to/train_script.py] > before.txt
    ... change the script ...
    python scripts/fingerprint_run.py > after.txt && diff before.txt after.txt

The script runs as a copy at the same path, on the same OUTPUT path (the card quotes the command)
and the same fixture, all under --work (default: a folder of the system's temporary directory, the
fixture kept for the next call). About 5 minutes on 2 cores.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DUMPS = ["", "--mixing per_batch --data_order shuffled", "--eval_steps 5 --eval_rows 50 --datasets_per_batch 3",
         "--cache_small_sources 0 --seed 7 --nprocs 4", "--mixing per_batch --datasets_per_batch 4 --shuffle_buffer 100"]
RUNS = ["", "--mini_batch_size 2 --pad_to_buckets 8,16 --mixing per_batch"]
SHORT_RUN = ("--save_steps 3 --eval_steps 3 --eval_rows 50 --batch_size 4 --max_length 32 --lr 1e-3 "
             "--warmup_steps 2 --log_steps 2 --num_workers 1")
TIMINGS = ("pairs_per_s", "data_wait", "eval_seconds")


def digest(data):
    return hashlib.sha256(data).hexdigest()[:16]


def train_script(script, tiny, output, flags):
    command = [sys.executable, script, os.path.join(tiny, "data_config.json"), output, "--model",
               os.path.join(tiny, "model"), "--data_folder", os.path.join(tiny, "data"), *flags.split()]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def run_lines(output, tag):
    """The hashes of a finished run: exports (the script's own copy aside), checkpoints, metrics."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    for folder, _, files in sorted(os.walk(output)):
        relative = os.path.relpath(folder, output)
        if relative.split(os.sep)[0] in ("checkpoints", "tensorboard"):
            continue
        for name in sorted(set(files) - {"train_script.py", "metrics.jsonl", ".lock"}):
            with open(os.path.join(folder, name), "rb") as f:
                yield f"[{tag}] {os.path.join(relative, name)} {digest(f.read())}"
    with open(os.path.join(output, "metrics.jsonl")) as f:
        for line in f:
            record = {k: v for k, v in json.loads(line).items() if k not in TIMINGS}
            yield f"[{tag}] metrics {json.dumps(record, sort_keys=True)}"
    with ocp.CheckpointManager(os.path.join(output, "checkpoints")) as checkpoints:
        for step in checkpoints.all_steps():
            restored = checkpoints.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
            state = b"".join(np.ascontiguousarray(leaf).tobytes() for leaf in jax.tree_util.tree_leaves(restored.state))
            yield f"[{tag}] checkpoint {step} state {digest(state)} meta {json.dumps(restored.meta, sort_keys=True)}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--script", default=os.path.join(ROOT, "train_script.py"), help="the train_script.py to run")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "fingerprint_run"),
                   help="folder for the fixture (kept) and the runs")
    args = p.parse_args()
    tiny, output, script = (os.path.join(args.work, name) for name in ("tiny", "run", "train_script.py"))
    if not os.path.exists(os.path.join(tiny, "data_config.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tiny_data.py"), tiny], check=True,
                       capture_output=True)
    shutil.copyfile(args.script, script)
    for flags in DUMPS:
        shutil.rmtree(output, ignore_errors=True)
        dump = os.path.join(args.work, "dump.jsonl")
        train_script(script, tiny, output, f"--dry_run 40 --batch_size 4 --dump_batches {dump} {flags}")
        with open(dump, "rb") as f:
            print(f"dump [{flags}] {digest(f.read())}", flush=True)
    for flags in RUNS:
        shutil.rmtree(output, ignore_errors=True)
        train_script(script, tiny, output, f"--steps 6 {SHORT_RUN} {flags}")
        train_script(script, tiny, output, f"--steps 8 {SHORT_RUN} --resume {flags}")
        for line in run_lines(output, flags):
            print(line, flush=True)


if __name__ == "__main__":
    main()
