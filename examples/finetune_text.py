"""Fine-tune pretrained MiniLM-L6 on Rotten Tomatoes sentiment: NanoAdam vs AdamW, side by side.

The main demo of ``nanoadam-jax``. Both optimizers start from the same pretrained all-MiniLM-L6-v2
encoder and the same randomly initialised linear ``head``, see the same batches in the same order
and are evaluated on the same held-out reviews. NanoAdam only updates the ``--density`` fraction
of smallest-magnitude weights of each tensor (exactly that fraction of every chunk of at most 16,384
consecutive entries, re-selected every ``--mask-interval`` steps) plus the head and LayerNorms, and
keeps Adam moments only for the selected entries. Before training it prints its plan
(``nanoadam_jax.plan``): per leaf the label, chunking, entries trained and state bytes against
``optax.adamw``'s.

Everything runs offline on CPU; the data and weights come from pip packages installed with
``--no-deps`` (see ``examples/common/assets.py``). With the defaults the whole script takes a few
minutes on 2 CPU cores (~1 s per step at batch 32, sequence length 48)::

    python examples/finetune_text.py                 # full demo, writes examples/results/
    python examples/finetune_text.py --smoke         # seconds: 1 layer, tiny data, 3 steps
    python examples/finetune_text.py --help

Outputs (in ``--out``): ``finetune_text.json`` (all numbers and curves), ``finetune_text.md`` (the
side-by-side table) and ``finetune_text.png`` (loss and eval-accuracy curves).

Reported per optimizer:

* accuracy on the held-out reviews at the end;
* optimizer-state bytes: sum of ``.nbytes`` over the optimizer state's arrays;
* peak step memory: XLA's estimate for the compiled train step, ``argument + output + temp``
  bytes minus the bytes of outputs aliased to (donated) arguments;
* mean step time, excluding the first step;
* weights touched: fraction of parameter entries whose final value differs from the initial one.
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
from common.minilm import MiniLMClassifier, MiniLMTokenizer
from common.plans import show_plan
from common.progress import progress
from common.results import environment, write_results
from flax import nnx

import nanoadam_jax as nanoadam

__all__ = [
    "OPTIMIZERS",
    "batch_schedule",
    "count_touched",
    "evaluate",
    "format_table",
    "load_data",
    "main",
    "make_optimizer",
    "optimizer_state_bytes",
    "parse_args",
    "save_plot",
    "step_memory_bytes",
    "train_and_evaluate",
    "train_step",
]

#: Optimizers compared, in table order.
OPTIMIZERS = ("nanoadam", "adamw")

#: Settings of the full demo and of ``--smoke``; explicit command-line flags override both.
FULL_DEFAULTS = dict(
    steps=150,
    batch_size=32,
    seq_len=48,
    num_layers=6,
    train_examples=None,  # all reviews not held out for evaluation
    eval_examples=800,
    eval_every=30,
    mask_interval=50,
)
SMOKE_DEFAULTS = dict(
    steps=3,
    batch_size=8,
    seq_len=16,
    num_layers=1,
    train_examples=64,
    eval_examples=32,
    eval_every=2,
    mask_interval=2,
)
EVAL_BATCH_SIZE = 100


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; unset size flags take the full-demo or ``--smoke`` defaults."""
    p = cli.parser(
        prog="finetune_text.py",
        description=(
            "Fine-tune pretrained MiniLM-L6 + a new linear head on Rotten Tomatoes sentiment "
            "with NanoAdam and with AdamW, and compare accuracy, optimizer memory, step time and "
            "the fraction of weights touched. Runs offline on CPU."
        ),
    )

    sized = cli.sized_adder(p, FULL_DEFAULTS, SMOKE_DEFAULTS)

    sized("--steps", "steps", int, "training steps per optimizer")
    sized("--batch-size", "batch_size", int, "training batch size")
    sized("--seq-len", "seq_len", int, "tokens per review (padding/truncation length)")
    sized("--num-layers", "num_layers", int, "pretrained encoder layers to keep (1-6)")
    sized("--train-examples", "train_examples", int, "training reviews")
    sized("--eval-examples", "eval_examples", int, "held-out reviews for evaluation")
    sized("--eval-every", "eval_every", int, "evaluate every this many steps")
    sized("--mask-interval", "mask_interval", int, "NanoAdam: re-select weights every N steps")
    p.add_argument("--lr-nanoadam", type=float, default=2e-4, help="NanoAdam learning rate")
    p.add_argument("--lr-adamw", type=float, default=5e-5, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument(
        "--density", type=float, default=0.1, help="NanoAdam: fraction of weights updated"
    )
    p.add_argument(
        "--optimizers", default=",".join(OPTIMIZERS), help="comma-separated optimizers to run"
    )
    cli.add_run_flags(p, seed_help="seed for batches and head init")
    args = p.parse_args(argv)
    cli.fill_sized_defaults(args, FULL_DEFAULTS, SMOKE_DEFAULTS)
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    unknown = set(args.optimizers) - set(OPTIMIZERS)
    if unknown or not args.optimizers:
        p.error(f"--optimizers: unknown {sorted(unknown)}; choose from {list(OPTIMIZERS)}")
    if not 1 <= args.num_layers <= 6:
        p.error("--num-layers must be in 1..6")
    if args.steps < 1 or args.batch_size < 1 or args.eval_every < 1 or args.mask_interval < 1:
        p.error("--steps, --batch-size, --eval-every and --mask-interval must be >= 1")
    return args


# ------------------------------------------------------------------------------------------------
# Optimizers
# ------------------------------------------------------------------------------------------------


def make_optimizer(name: str, args: argparse.Namespace) -> tuple[optax.GradientTransformation, str]:
    """Build optimizer ``name`` (``"nanoadam"`` or ``"adamw"``) from the parsed arguments.

    Returns:
      ``(tx, description)``.
    """
    if name == "nanoadam":
        tx = nanoadam.nanoadam(
            learning_rate=args.lr_nanoadam,
            density=args.density,
            mask_interval=args.mask_interval,
        )
        desc = (
            f"nanoadam(lr={args.lr_nanoadam:g}, density={args.density:g}, "
            f"mask_interval={args.mask_interval})"
        )
        return tx, desc
    if name == "adamw":
        tx = optax.adamw(args.lr_adamw, weight_decay=args.weight_decay)
        return tx, f"optax.adamw(lr={args.lr_adamw:g}, weight_decay={args.weight_decay:g})"
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def load_data(args: argparse.Namespace) -> dict[str, Any]:
    """Load, split and tokenize Rotten Tomatoes (fresh = 1, rotten = 0).

    ``--eval-examples`` reviews are held out with a seeded split; ``--train-examples`` (or all) of
    the rest are used for training. Returns numpy ``{split}_ids``, ``{split}_mask`` and
    ``{split}_labels`` for ``split`` in ``train``/``eval``.
    """
    texts, labels = assets.load_rotten_tomatoes()
    train_idx, eval_idx = assets.split_indices(len(texts), test_size=args.eval_examples, seed=0)
    if args.train_examples is not None and args.train_examples < len(train_idx):
        rng = np.random.default_rng(args.seed)
        train_idx = np.sort(rng.choice(train_idx, size=args.train_examples, replace=False))
    tokenizer = MiniLMTokenizer(max_length=args.seq_len)
    data: dict[str, Any] = {}
    for split, idx in (("train", train_idx), ("eval", eval_idx)):
        ids, mask = tokenizer([texts[i] for i in idx])
        data[f"{split}_ids"], data[f"{split}_mask"], data[f"{split}_labels"] = (
            ids,
            mask,
            labels[idx],
        )
    return data


def batch_schedule(num_train: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices ``(steps, batch_size)`` of every training batch: shuffled epochs, fixed by ``seed``.

    Both optimizers use the same schedule, so they see identical batches in identical order.
    """
    rng = np.random.default_rng(seed)
    needed = steps * batch_size
    order = np.concatenate([rng.permutation(num_train) for _ in range(-(-needed // num_train))])
    return order[:needed].reshape(steps, batch_size)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def _loss_fn(model: MiniLMClassifier, ids, mask, labels):
    logits = model(ids, mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit(donate_argnums=(0, 1))
def train_step(model: MiniLMClassifier, optimizer: nnx.Optimizer, ids, mask, labels):
    """One optimisation step (in place on ``model`` and ``optimizer``); returns the batch loss."""
    loss, grads = nnx.value_and_grad(_loss_fn)(model, ids, mask, labels)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def _count_correct(model: MiniLMClassifier, ids, mask, labels, valid):
    pred = jnp.argmax(model(ids, mask), axis=-1)
    return jnp.sum((pred == labels) & valid)


def evaluate(model: MiniLMClassifier, ids, mask, labels, batch_size: int = EVAL_BATCH_SIZE):
    """Accuracy on the given tokenized examples (fixed-size padded batches: one compilation)."""
    n = len(labels)
    correct = 0
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        b_ids, b_mask, b_lab = ids[sl], mask[sl], labels[sl]
        valid = np.ones(len(b_lab), bool)
        pad = batch_size - len(b_lab)
        if pad:
            b_ids = np.concatenate([b_ids, np.zeros((pad, ids.shape[1]), ids.dtype)])
            b_mask = np.concatenate([b_mask, np.zeros((pad, mask.shape[1]), mask.dtype)])
            b_lab = np.concatenate([b_lab, np.zeros(pad, labels.dtype)])
            valid = np.concatenate([valid, np.zeros(pad, bool)])
        correct += int(_count_correct(model, b_ids, b_mask, b_lab, valid))
    return correct / max(n, 1)


def optimizer_state_bytes(optimizer: nnx.Optimizer) -> int:
    """Bytes held by the optimizer state: sum of ``.nbytes`` of the arrays of ``opt_state``."""
    leaves = jax.tree.leaves(optimizer.opt_state)
    return int(sum(getattr(x, "nbytes", 0) for x in leaves))


def step_memory_bytes(compiled) -> dict[str, int | None]:
    """XLA's memory estimate of a compiled step: components and ``peak`` (``None`` if unknown).

    ``peak = argument + output + temp - alias`` (outputs aliased to donated arguments share their
    buffers and are counted once).
    """
    try:
        stats = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        stats = None
    names = ("argument", "output", "temp", "alias", "generated_code")
    out: dict[str, int | None] = {}
    for n in names:
        value = getattr(stats, f"{n}_size_in_bytes", None) if stats is not None else None
        out[f"{n}_bytes"] = None if value is None else int(value)
    parts = [out["argument_bytes"], out["output_bytes"], out["temp_bytes"]]
    if any(v is None for v in parts):
        out["peak_bytes"] = None
    else:
        out["peak_bytes"] = int(sum(parts) - (out["alias_bytes"] or 0))
    return out


def count_touched(initial: dict, model: MiniLMClassifier) -> dict[str, float]:
    """Fraction of parameter entries whose current value differs from ``initial``.

    Returns fractions over three groups: ``"all"`` parameters, the ``"encoder"`` (all but the new
    head) and the transformer ``"layers"`` (the encoder without its embedding tables, whose rows
    for tokens absent from the training batches get no gradient at all).
    """
    groups = {"all": [0, 0], "encoder": [0, 0], "layers": [0, 0]}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        now = np.asarray(var.get_value())
        diff = int(np.count_nonzero(now != initial[tuple(path)]))
        member = {"all": True, "encoder": path[0] == "encoder"}
        member["layers"] = member["encoder"] and path[1] == "layers"
        for g, is_member in member.items():
            if is_member:
                groups[g][0] += diff
                groups[g][1] += now.size
    return {g: changed / max(total, 1) for g, (changed, total) in groups.items()}


def train_and_evaluate(
    name: str, args: argparse.Namespace, data: dict[str, Any], base_model: MiniLMClassifier
) -> dict[str, Any]:
    """Fine-tune a copy of ``base_model`` with optimizer ``name``; return its metrics and curves."""
    model = nnx.clone(base_model)
    # Fresh buffers: the train step donates the model's arrays, which must not free base_model's.
    nnx.update(model, jax.tree.map(lambda x: jnp.array(x, copy=True), nnx.state(model)))
    plan = None
    if name == "nanoadam":
        plan = show_plan(
            nnx.state(model, nnx.Param),
            f"NanoAdam's plan (density {args.density:g}): what it trains and stores per leaf",
            density=args.density,
        )
    tx, description = make_optimizer(name, args)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    initial = {
        tuple(p): np.array(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    n_params = sum(v.size for v in initial.values())
    schedule = batch_schedule(len(data["train_labels"]), args.steps, args.batch_size, args.seed)

    def batch(step: int):
        idx = schedule[step]
        return data["train_ids"][idx], data["train_mask"][idx], data["train_labels"][idx]

    t0 = time.perf_counter()
    compiled = train_step.lower(model, optimizer, *batch(0)).compile()
    compile_s = time.perf_counter() - t0
    memory = step_memory_bytes(compiled)

    eval_seconds = 0.0

    def run_eval() -> float:
        nonlocal eval_seconds
        t = time.perf_counter()
        acc = evaluate(model, data["eval_ids"], data["eval_mask"], data["eval_labels"])
        eval_seconds += time.perf_counter() - t
        return acc

    losses: list[float] = []
    step_times: list[float] = []
    eval_steps, eval_accs = [0], [run_eval()]
    bar = progress(range(args.steps), desc=f"{name:>8}", enabled=not args.no_progress)
    for step in bar:
        ids, mask, labels = batch(step)
        t = time.perf_counter()
        loss = float(compiled(model, optimizer, ids, mask, labels))  # float() waits for the step
        step_times.append(time.perf_counter() - t)
        losses.append(loss)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            eval_steps.append(step + 1)
            eval_accs.append(run_eval())
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{eval_accs[-1]:.3f}")
        elif step % 5 == 0:
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{eval_accs[-1]:.3f}")
    bar.close()

    touched = count_touched(initial, model)
    timed = step_times[1:] if len(step_times) > 1 else step_times
    return {
        "optimizer": description,
        "accuracy": eval_accs[-1],
        "initial_accuracy": eval_accs[0],
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "plan": plan,
        "param_bytes": int(sum(v.nbytes for v in initial.values())),
        "num_params": int(n_params),
        "step_memory": memory,
        "peak_step_bytes": memory["peak_bytes"],
        "compile_seconds": compile_s,
        "mean_step_seconds": float(np.mean(timed)),
        "first_step_seconds": step_times[0],
        "train_seconds": float(np.sum(step_times)),
        "eval_seconds": eval_seconds,
        "touched_fraction": touched["all"],
        "touched_fraction_encoder": touched["encoder"],
        "touched_fraction_layers": touched["layers"],
        "final_loss": losses[-1],
        "losses": losses,
        "eval_steps": eval_steps,
        "eval_accuracies": eval_accs,
    }


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------


def _mib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:,.1f} MiB"


def format_table(results: dict[str, Any]) -> str:
    """Markdown table with one column per optimizer (the same text is printed and saved)."""
    runs = results["optimizers"]
    names = list(runs)
    rows = [
        ("optimizer", lambda r: r["optimizer"]),
        ("eval accuracy", lambda r: f"{r['accuracy']:.4f}"),
        ("accuracy before fine-tuning", lambda r: f"{r['initial_accuracy']:.4f}"),
        ("final train loss", lambda r: f"{r['final_loss']:.4f}"),
        ("optimizer state", lambda r: _mib(r["optimizer_state_bytes"])),
        ("peak step memory (XLA)", lambda r: _mib(r["peak_step_bytes"])),
        ("mean step time", lambda r: f"{r['mean_step_seconds'] * 1e3:,.0f} ms"),
        ("weights touched (all)", lambda r: f"{100 * r['touched_fraction']:.2f}%"),
        ("weights touched (layers)", lambda r: f"{100 * r['touched_fraction_layers']:.2f}%"),
    ]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(runs[n]) for n in names) + " |")
    cfg = results["config"]
    lines.append("")
    lines.append(
        f"{cfg['steps']} steps, batch {cfg['batch_size']}, sequence length {cfg['seq_len']}, "
        f"{cfg['num_layers']} encoder layers, {results['num_train']} training / "
        f"{results['num_eval']} held-out reviews (majority class "
        f"{results['majority_baseline']:.4f}); {results['environment']['device']}."
    )
    return "\n".join(lines)


def save_plot(results: dict[str, Any], path: Path) -> None:
    """Training-loss (raw and smoothed) and eval-accuracy curves of every optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, run) in enumerate(results["optimizers"].items()):
        color = f"C{i}"
        losses = np.asarray(run["losses"])
        steps = np.arange(1, len(losses) + 1)
        ax_loss.plot(steps, losses, color=color, alpha=0.25, lw=0.8)
        w = max(1, min(10, len(losses) // 5))
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax_loss.plot(steps[w - 1 :], smooth, color=color, label=f"{name} ({w}-step mean)")
        ax_acc.plot(run["eval_steps"], run["eval_accuracies"], "o-", color=color, label=name)
    ax_acc.axhline(results["majority_baseline"], color="gray", ls="--", lw=1, label="majority")
    ax_loss.set(xlabel="step", ylabel="training loss", title="Training loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="Held-out accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("MiniLM-L6 fine-tuned on Rotten Tomatoes: NanoAdam vs AdamW")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison; returns the results dict that is also written to ``--out``."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    missing = assets.missing_assets("minilm", "rotten_tomatoes")
    if missing:
        raise SystemExit("Missing offline assets. Install them with:\n  " + "\n  ".join(missing))

    data = load_data(args)
    n_train, n_eval = len(data["train_labels"]), len(data["eval_labels"])
    majority = float(max(data["eval_labels"].mean(), 1 - data["eval_labels"].mean()))
    print(
        f"Rotten Tomatoes: {n_train} training / {n_eval} held-out reviews "
        f"(majority class {majority:.3f}); MiniLM-L6 with {args.num_layers} layer(s); "
        f"{args.steps} steps of batch {args.batch_size} at sequence length {args.seq_len}."
    )
    base_model = MiniLMClassifier.from_pretrained(
        num_classes=2, num_layers=args.num_layers, seed=args.seed
    )

    runs = {name: train_and_evaluate(name, args, data, base_model) for name in args.optimizers}

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = {
        "config": config,
        "num_train": n_train,
        "num_eval": n_eval,
        "majority_baseline": majority,
        "environment": environment(),
        "optimizers": runs,
        "wall_seconds": None,
    }
    table = format_table(results)
    print()
    print(table)

    write_results(
        args.out,
        "finetune_text",
        "MiniLM-L6 on Rotten Tomatoes: NanoAdam vs AdamW",
        table,
        results,
        t_start,
        save_plot,
    )
    return results


if __name__ == "__main__":
    main()
