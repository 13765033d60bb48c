"""NanoAdam with Flax Linen's ``TrainState``: the rotated-MNIST fine-tune of continual_vision.py.

For users who have not moved to Flax NNX. The pretrained MNIST CNN is re-declared as a Linen
module whose submodules carry the NNX model's attribute names (``conv1``, ``conv2``, ``conv3``,
``fc``, ``head``), so the NNX parameters (``common.mnist_cnn.load_mnist_cnn()``) become a Linen
``params`` dict with ``nnx.to_pure_dict``; the script checks the two models give the same logits.
Training is the usual Linen recipe, with NanoAdam as the ``tx``::

    state = TrainState.create(apply_fn=model.apply, params=params,
                              tx=nanoadam.nanoadam(1e-2, density=0.1, mask_interval=100))
    state = state.apply_gradients(grads=grads)      # inside a jitted train step

The head is recognised by its name (``head``) and updated densely, every other kernel and bias
sparsely (``nanoadam.default_labels``); a Linen model whose last layer is called ``Dense_1`` needs
``name="head"`` or a ``labels=`` predicate. The script prints the plan first
(``nanoadam.plan(params, density=...)``: per leaf the label, chunking, entries trained and state
bytes against ``optax.adamw``'s), which shows that choice before any training.

Data, batches and defaults are those of ``continual_vision.py`` (same split, same batch order for
the same ``--seed``), so with the same settings the result matches its ``nanoadam d=0.1`` run; if
``continual_vision.json`` is found in ``--out`` with matching settings, its accuracy at the same
step is printed next to this one.

    python examples/linen_trainstate.py            # writes examples/results/linen_trainstate.*
    python examples/linen_trainstate.py --smoke    # a few steps on tiny data (seconds)
    python examples/linen_trainstate.py --help

Outputs (in ``--out``): ``linen_trainstate.json`` and ``linen_trainstate.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import assets, cli
from common.mnist_cnn import load_mnist_cnn, normalize_images
from common.plans import show_plan
from common.progress import progress
from common.results import environment, write_results
from continual_vision import ASSET_NAMES, batch_schedule, load_tasks
from flax import nnx
from flax.training.train_state import TrainState

import nanoadam_jax as nanoadam

__all__ = ["LinenMnistCNN", "accuracy", "linen_params_from_nnx", "main", "parse_args"]

FULL_DEFAULTS = dict(
    steps=300,
    batch_size=64,
    train_examples=None,
    test_examples=1000,
    eval_every=50,
    mask_interval=100,
)
SMOKE_DEFAULTS = dict(
    steps=4,
    batch_size=16,
    train_examples=128,
    test_examples=100,
    eval_every=2,
    mask_interval=2,
)
EVAL_BATCH_SIZE = 500


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; unset size flags take the full-run or ``--smoke`` defaults."""
    p = cli.parser(
        prog="linen_trainstate.py",
        description=(
            "Fine-tune the pretrained MNIST CNN, as a Flax Linen module with a TrainState, on "
            "90-degree rotated MNIST with nanoadam.nanoadam; print new- and old-task accuracy."
        ),
    )

    sized = cli.sized_adder(p, FULL_DEFAULTS, SMOKE_DEFAULTS)

    sized("--steps", "steps", int, "training steps")
    sized("--batch-size", "batch_size", int, "training batch size")
    sized("--train-examples", "train_examples", int, "rotated training images (of 4,000)")
    sized("--test-examples", "test_examples", int, "held-out images (of the 1,000 test images)")
    sized("--eval-every", "eval_every", int, "evaluate both tasks every this many steps")
    sized("--mask-interval", "mask_interval", int, "re-select the weights every N steps")
    p.add_argument("--density", type=float, default=0.1, help="fraction of each tensor updated")
    p.add_argument("--lr", type=float, default=1e-2, help="NanoAdam learning rate")
    cli.add_run_flags(p, seed_help="seed of the batch order")
    args = p.parse_args(argv)
    cli.fill_sized_defaults(args, FULL_DEFAULTS, SMOKE_DEFAULTS)
    if not 0.0 < args.density <= 1.0:
        p.error("--density must lie in (0, 1]")
    if min(args.steps, args.batch_size, args.eval_every, args.mask_interval) < 1:
        p.error("--steps, --batch-size, --eval-every and --mask-interval must be >= 1")
    if not 1 <= args.test_examples <= 1000:
        p.error("--test-examples must be in 1..1000")
    return args


# ------------------------------------------------------------------------------------------------
# The CNN in Linen, and the NNX -> Linen parameter conversion
# ------------------------------------------------------------------------------------------------


class LinenMnistCNN(nn.Module):
    """``common.mnist_cnn.MnistCNN`` in Linen, with the same submodule names and layouts."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = jnp.asarray(images, jnp.float32)
        if x.ndim == 3:
            x = x[..., None]
        x = normalize_images(x)
        for name, features in (("conv1", 32), ("conv2", 64), ("conv3", 128)):
            x = nn.relu(nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), name=name)(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        x = x.reshape(x.shape[0], -1)  # (H, W, C) order, as the NNX model
        x = nn.relu(nn.Dense(256, name="fc")(x))
        return nn.Dense(self.num_classes, name="head")(x)


def linen_params_from_nnx(nnx_model: nnx.Module, linen_model: nn.Module) -> dict:
    """The NNX model's parameters as a Linen ``params`` dict, checked against Linen's own init."""
    params = nnx.to_pure_dict(nnx.state(nnx_model, nnx.Param))
    reference = jax.eval_shape(linen_model.init, jax.random.key(0), jnp.zeros((1, 28, 28)))
    ref_shapes = jax.tree.map(lambda x: x.shape, reference["params"])
    got_shapes = jax.tree.map(lambda x: x.shape, params)
    if ref_shapes != got_shapes:
        raise ValueError(f"NNX params {got_shapes} do not fit the Linen model {ref_shapes}")
    return params


@jax.jit
def _count_correct(params, images, labels, valid):
    logits = LinenMnistCNN().apply({"params": params}, images)
    return jnp.sum((jnp.argmax(logits, axis=-1) == labels) & valid)


def accuracy(params: dict, images: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of the Linen CNN with ``params`` (fixed-size padded batches: one compilation)."""
    correct = 0
    for start in range(0, len(labels), EVAL_BATCH_SIZE):
        x = np.asarray(images[start : start + EVAL_BATCH_SIZE], np.float32)
        y = labels[start : start + EVAL_BATCH_SIZE]
        valid = np.ones(len(y), bool)
        pad = EVAL_BATCH_SIZE - len(y)
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)])
            y = np.concatenate([y, np.zeros(pad, y.dtype)])
            valid = np.concatenate([valid, np.zeros(pad, bool)])
        correct += int(_count_correct(params, x, y, valid))
    return correct / max(len(labels), 1)


@jax.jit
def train_step(state: TrainState, images: jax.Array, labels: jax.Array):
    """One step of the plain Linen recipe; NanoAdam lives entirely in ``state.tx``."""

    def loss_fn(params):
        logits = state.apply_fn({"params": params}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def _nnx_reference(args: argparse.Namespace) -> dict[str, Any] | None:
    """The matching ``nanoadam`` run of ``continual_vision.json`` in ``--out``, if there is one."""
    path = Path(args.out) / "continual_vision.json"
    if not path.is_file():
        return None
    try:
        ref = json.loads(path.read_text())
        cfg = ref["config"]
        same = (
            all(
                cfg[k] == getattr(args, k)
                for k in ("batch_size", "train_examples", "test_examples", "mask_interval", "seed")
            )
            and cfg["lr_nanoadam"] == args.lr
        )
        run = ref["methods"].get(f"nanoadam d={args.density:g}")
        if not same or run is None or args.steps not in run["eval_steps"]:
            return None
        i = run["eval_steps"].index(args.steps)
        return {
            "file": str(path),
            "new_task_accuracy": run["new_task_curve"][i],
            "old_task_accuracy_own_head": run["old_task_own_head_curve"][i],
            "old_task_accuracy_shared_head": run["old_task_shared_head_curve"][i],
        }
    except (KeyError, ValueError, TypeError):
        return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune with a Linen TrainState; returns the results dict also written to ``--out``."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    missing = assets.missing_assets(*ASSET_NAMES)
    if missing:
        raise SystemExit("Missing offline assets. Install them with:\n  " + "\n  ".join(missing))

    data = load_tasks(args.train_examples, args.test_examples, args.seed)
    schedule = batch_schedule(len(data["train_y"]), args.steps, args.batch_size, args.seed)
    nnx_model = load_mnist_cnn()
    model = LinenMnistCNN()
    params = linen_params_from_nnx(nnx_model, model)
    probe = data["old_test_x"][:100]
    max_logit_diff = float(
        np.abs(
            np.asarray(model.apply({"params": params}, probe)) - np.asarray(nnx_model(probe))
        ).max()
    )
    if max_logit_diff > 1e-3:
        raise RuntimeError(f"Linen and NNX models disagree: max |logit diff| {max_logit_diff}")
    task1_head = params["head"]  # the old task keeps its own (pretrained) head

    plan = show_plan(params, "NanoAdam's plan for the Linen params", density=args.density)
    tx = nanoadam.nanoadam(args.lr, density=args.density, mask_interval=args.mask_interval)
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    labels = nanoadam.label_params(params)  # what the default labelling makes of this model
    print(
        f"Linen TrainState + nanoadam.nanoadam(lr={args.lr:g}, density={args.density:g}, "
        f"mask_interval={args.mask_interval}); head: {labels['head']['kernel']}, fc kernel: "
        f"{labels['fc']['kernel']}; Linen vs NNX max |logit diff| {max_logit_diff:.1e}."
    )

    def evaluate(p) -> dict[str, float]:
        return {
            "new": accuracy(p, data["new_test_x"], data["test_y"]),
            "old_shared_head": accuracy(p, data["old_test_x"], data["test_y"]),
            "old_own_head": accuracy(dict(p, head=task1_head), data["old_test_x"], data["test_y"]),
        }

    curve = [{"step": 0, **evaluate(state.params)}]
    losses = []
    bar = progress(range(args.steps), desc="linen nanoadam", enabled=not args.no_progress)
    for step in bar:
        idx = schedule[step]
        state, loss = train_step(state, data["new_train_x"][idx], data["train_y"][idx])
        losses.append(float(loss))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append({"step": step + 1, **evaluate(state.params)})
            bar.set_postfix(loss=f"{losses[-1]:.3f}", new=f"{curve[-1]['new']:.3f}")
    bar.close()

    moved = sum(
        int(np.count_nonzero(np.asarray(a) != np.asarray(b)))
        for k in params
        if k != "head"
        for a, b in zip(jax.tree.leaves(state.params[k]), jax.tree.leaves(params[k]))
    )
    body = sum(int(np.size(x)) for k in params if k != "head" for x in jax.tree.leaves(params[k]))
    first, last = curve[0], curve[-1]
    results = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "num_train": len(data["train_y"]),
        "num_test": len(data["test_y"]),
        "linen_vs_nnx_max_logit_diff": max_logit_diff,
        "new_task_accuracy_before": first["new"],
        "new_task_accuracy": last["new"],
        "old_task_accuracy_before": first["old_own_head"],
        "old_task_accuracy_own_head": last["old_own_head"],
        "old_task_accuracy_shared_head": last["old_shared_head"],
        "forgetting_own_head": first["old_own_head"] - last["old_own_head"],
        "forgetting_shared_head": first["old_shared_head"] - last["old_shared_head"],
        "touched_fraction_body": moved / body,
        "plan": plan,
        "final_loss": losses[-1],
        "losses": losses,
        "curve": curve,
        "nnx_reference": _nnx_reference(args),
        "environment": environment(),
        "wall_seconds": None,
    }
    pct = lambda x: f"{100 * x:.1f}%"
    rows = [
        ("new task (rotated) before", pct(first["new"])),
        ("new task (rotated) after", pct(last["new"])),
        ("old task (MNIST) before", pct(first["old_own_head"])),
        ("old task after, own head (forgetting)",
         f"{pct(last['old_own_head'])} ({100 * results['forgetting_own_head']:.1f} pts)"),
        ("old task after, shared head (forgetting)",
         f"{pct(last['old_shared_head'])} ({100 * results['forgetting_shared_head']:.1f} pts)"),
        ("body weights touched", f"{100 * results['touched_fraction_body']:.2f}%"),
    ]  # fmt: skip
    ref = results["nnx_reference"]
    if ref is not None:
        rows.append(
            (
                "NNX run of continual_vision.py, same step",
                f"new {pct(ref['new_task_accuracy'])}, old own head "
                f"{pct(ref['old_task_accuracy_own_head'])}, shared head "
                f"{pct(ref['old_task_accuracy_shared_head'])}",
            )
        )
    table = "\n".join(["| | Linen TrainState + NanoAdam |", "|---|---|"])
    table += "\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    table += (
        f"\n\n{args.steps} steps of batch {args.batch_size}, lr {args.lr:g}, density "
        f"{args.density:g}, mask_interval {args.mask_interval}, seed {args.seed}; "
        f"{results['num_test']} held-out images; {results['environment']['device']}."
    )
    print()
    print(table)
    write_results(
        args.out,
        "linen_trainstate",
        "Flax Linen TrainState + NanoAdam on rotated MNIST",
        table,
        results,
        t_start,
    )
    return results


if __name__ == "__main__":
    main()
