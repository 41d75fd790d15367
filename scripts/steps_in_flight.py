"""What bounding the steps in flight costs: train_script's loop with STEPS_IN_FLIGHT = 2, 3, 4 and
unbounded, on 8 emulated CPU devices and the tiny fixture (scripts/make_tiny_data.py), with a batch
heavy enough (8 pairs of 32 word pieces per device) that the host can run ahead of the devices.

    python scripts/steps_in_flight.py [--repeats 2] [--steps 100] [--log_steps 20]

Prints pairs/s per setting: the median of the logging windows after the first (which holds the
compilation), each repeat running every setting in turn, so that a change in the machine's load
touches them alike.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for train_script; scripts/ is on the path already (run from it, or by the tests)
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

import train_script  # noqa: E402
from make_tiny_data import build_fixture  # noqa: E402

SETTINGS = {"2": 2, "3": 3, "4": 4, "unbounded": 10 ** 9}


def pairs_per_second(tiny, output, steps, log_steps):
    train_script.main([os.path.join(tiny, "data_config_pairs.json"), output, "--model", os.path.join(tiny, "model"),
                       "--data_folder", os.path.join(tiny, "data"), "--steps", str(steps), "--save_steps", str(steps),
                       "--log_steps", str(log_steps), "--batch_size", "8", "--max_length", "32", "--num_workers", "0"])
    with open(os.path.join(output, "metrics.jsonl")) as f:
        windows = [json.loads(line)["pairs_per_s"] for line in f]
    return statistics.median(windows[1:])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--log_steps", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        jax.config.update("jax_compilation_cache_dir", os.path.join(folder, "jax-cache"))  # compile once
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        build_fixture(os.path.join(folder, "tiny"), lines_per_file=2000, seed=0)
        results = {name: [] for name in SETTINGS}
        for repeat in range(args.repeats):
            for name, k in SETTINGS.items():
                train_script.STEPS_IN_FLIGHT = k
                output = os.path.join(folder, f"run-{repeat}-{name}")
                results[name].append(pairs_per_second(os.path.join(folder, "tiny"), output, args.steps, args.log_steps))
    print(f"{'steps in flight':>16} {'pairs/s, each repeat':>30} {'median':>8}")
    for name, values in results.items():
        print(f"{name:>16} {' '.join(f'{v:7.0f}' for v in values):>30} {statistics.median(values):8.0f}")


if __name__ == "__main__":
    main()
