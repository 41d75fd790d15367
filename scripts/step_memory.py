"""Working memory of train_script.py's compiled update step, plain and with GradCache.

    python scripts/step_memory.py [--batch_size 128] [--max_length 128] [--mini_batch_sizes 32,8]

Compiles (does not run) the pmapped step of train_script.py for one device, on the architecture
of microsoft/MiniLM-L12-H384-uncased from a random init (no download), and prints XLA's
temporary buffer size: activations, gradients and the optimizer's scratch, beyond the state and
the batch themselves. Runs on whatever device JAX finds (CPU, GPU, TPU).
"""
import argparse
import os
import sys

import jax
import numpy as np
from transformers import BertConfig, FlaxBertModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_script  # noqa: E402

MINILM_L12_H384 = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=1536)


def step_temp_bytes(model, args, device, columns):
    """XLA's temporary allocation of the compiled update step on one device, in bytes."""
    sharding = train_script.device_sharding([device])
    state = train_script.replicate(train_script.init_state(model, args), sharding, 1)
    key = train_script.replicate(jax.random.PRNGKey(0), sharding, 1)
    step = train_script.make_train_step(model, args, [device])
    compiled = step.lower(state, train_script.to_devices(columns, sharding), key).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch_size", type=int, default=128, help="rows per device")
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--mini_batch_sizes", default="32,8", help="GradCache chunk sizes to compare with the plain step")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    options = p.parse_args()
    device = jax.local_devices()[0]
    model = FlaxBertModel(MINILM_L12_H384, seed=0, dtype=jax.numpy.dtype(options.dtype))
    rows = np.random.default_rng(0).integers(1000, 30000, (2, 1, options.batch_size, options.max_length))
    columns = [(ids.astype(np.int32), np.ones_like(ids, dtype=np.int32)) for ids in rows]
    print(f"{device.device_kind}: MiniLM-L12-H384, {options.batch_size} pairs x {options.max_length} tokens "
          f"per device, {options.dtype}")
    for mini in [None, *map(int, options.mini_batch_sizes.split(","))]:
        flags = ["data_config.json", "unused", "--batch_size", str(options.batch_size),
                 "--max_length", str(options.max_length), "--dtype", options.dtype]
        args = train_script.parse_args(flags + (["--mini_batch_size", str(mini)] if mini else []))
        temp = step_temp_bytes(model, args, device, columns)
        print(f"  {'plain step' if mini is None else f'--mini_batch_size {mini}':24} {temp / 2**20:9.1f} MiB temporary")


if __name__ == "__main__":
    main()
