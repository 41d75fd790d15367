"""Plot a training run from its OUTPUT/metrics.jsonl: loss, learning rate, held-out scores, throughput.

    python scripts/plot_run.py OUTPUT [--out FILE]      # writes OUTPUT/run.png by default

Works while the run is going (it reads what has been written so far). A resumed run logs some
steps twice; the last record of a step wins.
"""

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

PER_SOURCE_LINES = 12  # more sources than this: only the overall evaluation curves are drawn


def read_metrics(output):
    """(training records, evaluation records) by step, the last record of a step winning."""
    path = os.path.join(output, "metrics.jsonl")
    if not os.path.exists(path):
        sys.exit(f"error: {path}: no such file (is {output} the OUTPUT of a training run?)")
    training, evaluation = {}, {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError:
                if line.endswith("\n"):  # a last line without newline is being written right now
                    sys.exit(f"error: {path}, line {number}: not JSON")
                continue
            (evaluation if "eval" in record else training)[record["step"]] = record
    return [training[s] for s in sorted(training)], [evaluation[s] for s in sorted(evaluation)]


def column(records, key, *path):
    values = []
    for record in records:
        value = record[key]
        for part in path:
            value = value[part]
        values.append(value)
    return values


def plot_loss(ax, training):
    ax.plot(column(training, "step"), column(training, "loss"), color="tab:blue")
    ax.set_title("training loss (mean over each logging window)")
    ax.set_ylabel("loss")


def plot_evaluation(ax, evaluation):
    ax.set_title("held-out in-batch retrieval")
    if not evaluation:
        ax.text(0.5, 0.5, "no evaluation in this run\n(train with --eval_steps N)",
                ha="center", va="center", transform=ax.transAxes, color="gray")
        return
    steps = column(evaluation, "step")
    sources = [name for name in evaluation[-1]["eval"] if name != "overall"]
    if len(sources) <= PER_SOURCE_LINES:
        for name in sources:
            ax.plot(steps, column(evaluation, "eval", name, "accuracy"), linewidth=0.8, alpha=0.5,
                    label=f"{name} accuracy")
    highest = 0.0
    for metric, style in zip(evaluation[-1]["eval"]["overall"], ("-", "--")):
        values = column(evaluation, "eval", "overall", metric)
        highest = max(highest, *values)
        ax.plot(steps, values, "k" + style, linewidth=2, marker="o", markersize=3,
                label=f"{metric} (mean of {len(sources)} sources)")
    ax.set_ylim(0, min(1.0, 1.6 * highest + 0.05))  # room above the curves for the legend
    ax.set_ylabel("score")
    ax.legend(fontsize="x-small", loc="upper left")


def plot_learning_rate(ax, training):
    ax.plot(column(training, "step"), column(training, "lr"), color="tab:green")
    ax.set_title("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))


def plot_throughput(ax, training):
    ax.plot(column(training, "step"), column(training, "pairs_per_s"), color="tab:purple")
    ax.set_title("throughput and time spent waiting for data")
    ax.set_ylabel("pairs / s", color="tab:purple")
    wait = ax.twinx()
    wait.plot(column(training, "step"), [100 * w for w in column(training, "data_wait")], color="tab:orange")
    wait.set_ylabel("data wait (% of time)", color="tab:orange")
    wait.set_ylim(0, 100)


def plot_run(output, out):
    training, evaluation = read_metrics(output)
    if not training and not evaluation:
        sys.exit(f"error: {output}/metrics.jsonl has no records yet")
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), sharex=True)
    plot_loss(axes[0, 0], training)
    plot_evaluation(axes[0, 1], evaluation)
    plot_learning_rate(axes[1, 0], training)
    plot_throughput(axes[1, 1], training)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    last = max([r["step"] for r in training + evaluation])
    fig.suptitle(f"{os.path.basename(os.path.normpath(output))}: step {last:,}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output", help="the OUTPUT folder of a training run")
    p.add_argument("--out", default=None, help="the PNG to write (default: OUTPUT/run.png)")
    args = p.parse_args(argv)
    print(plot_run(args.output, args.out or os.path.join(args.output, "run.png")))


if __name__ == "__main__":
    main()
