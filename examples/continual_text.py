"""Continual learning with MiniLM-L6: BBC News topics, then Rotten Tomatoes sentiment.

How much does fine-tuning on a new task make the encoder forget an old one? The paper ("Pay
Attention to Small Weights", section on continual learning) reports that NanoAdam forgets far less
than AdamW because it changes only a small set of small-magnitude weights. This script measures it
on real pretrained weights and real data, offline, on CPU:

1. **Task 1 (BBC News, 5 topics).** A linear head is fitted on the *frozen* pretrained encoder's
   mean-pooled features (logistic regression; the encoder is not trained on BBC at all).
2. **Task 2 (Rotten Tomatoes sentiment).** For every optimizer in ``--runs``, a copy of the
   pretrained encoder plus a new 2-class ``head`` is fine-tuned end to end (all encoder weights are
   trainable; NanoAdam updates ``--density`` of each tensor, AdamW all of them). Each NanoAdam run
   first prints its plan (``nanoadam_jax.plan``: per leaf the label, chunking, entries trained and
   state bytes against ``optax.adamw``'s). Every run sees the
   same batches in the same order and starts from the same head.
3. **Forgetting.** The *unchanged* BBC head is applied to the fine-tuned encoder's features: the
   drop of BBC accuracy from step 0 is the forgetting. Sentiment accuracy on held-out reviews shows
   what the new task gained. Both are also tracked every ``--eval-every`` steps.

::

    python examples/continual_text.py            # default run, ~5-10 min on 2 CPU cores
    python examples/continual_text.py --smoke    # seconds: 1 layer, tiny data, 3 steps
    python examples/continual_text.py --runs nanoadam:0.1,nanoadam:0.01:1e-3,adamw:3e-5

Outputs (in ``--out``): ``continual_text.json`` (all numbers and curves), ``continual_text.md``
(the table) and ``continual_text.png`` (forgetting curve, sentiment accuracy, training loss).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import assets, cli
from common.minilm import MiniLMClassifier, MiniLMEncoder, MiniLMTokenizer
from common.plans import show_plan
from common.progress import progress
from common.results import environment, write_results
from flax import nnx

import nanoadam_jax as nanoadam

__all__ = ["fit_linear_head", "main", "parse_args", "parse_runs"]

#: Settings of the default run and of ``--smoke``; explicit command-line flags override both.
FULL_DEFAULTS = dict(
    steps=100,
    batch_size=32,
    seq_len=32,
    bbc_seq_len=64,
    num_layers=6,
    bbc_train_examples=800,
    bbc_eval_examples=400,
    rt_train_examples=None,  # all reviews not held out
    rt_eval_examples=500,
    eval_every=50,
    mask_interval=50,
    head_steps=300,
    runs="nanoadam:0.1,nanoadam:0.01,adamw",
)
SMOKE_DEFAULTS = dict(
    steps=3,
    batch_size=8,
    seq_len=16,
    bbc_seq_len=16,
    num_layers=1,
    bbc_train_examples=40,
    bbc_eval_examples=20,
    rt_train_examples=48,
    rt_eval_examples=24,
    eval_every=2,
    mask_interval=2,
    head_steps=30,
    runs="nanoadam:0.1,adamw",  # each NanoAdam run compiles its own train step (~10 s CPU)
)
EVAL_BATCH_SIZE = 64


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def parse_runs(spec: str, lr_nanoadam: float, lr_adamw: float) -> list[dict[str, Any]]:
    """Parse ``--runs``: comma-separated ``nanoadam:DENSITY[:LR]`` or ``adamw[:LR]`` items.

    Returns a list of ``{"name", "kind", "density", "lr"}`` dicts (``density`` None for AdamW).
    """
    runs: list[dict[str, Any]] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        parts = item.split(":")
        kind = parts[0].strip().lower()
        if kind == "nanoadam" and len(parts) in (2, 3):
            density = float(parts[1])
            if not 0.0 < density <= 1.0:
                raise ValueError(f"density must be in (0, 1], got {item!r}")
            lr = float(parts[2]) if len(parts) == 3 else lr_nanoadam
            runs.append(dict(name=f"nanoadam@{density:g}", kind=kind, density=density, lr=lr))
        elif kind == "adamw" and len(parts) in (1, 2):
            lr = float(parts[1]) if len(parts) == 2 else lr_adamw
            runs.append(dict(name="adamw", kind=kind, density=None, lr=lr))
        else:
            raise ValueError(f"bad run {item!r}: use nanoadam:DENSITY[:LR] or adamw[:LR]")
    names = [r["name"] for r in runs]
    if not runs or len(set(names)) != len(names):
        raise ValueError(f"--runs needs at least one run and unique names, got {names}")
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; unset size flags take the default-run or ``--smoke`` values."""
    p = cli.parser(
        prog="continual_text.py",
        description=(
            "Continual learning on MiniLM-L6: fit a linear BBC News topic head on the frozen "
            "pretrained encoder, fully fine-tune the encoder on Rotten Tomatoes sentiment with "
            "NanoAdam and with AdamW, and measure how much BBC accuracy each loses (forgetting)."
        ),
    )

    sized = cli.sized_adder(p, FULL_DEFAULTS, SMOKE_DEFAULTS)

    sized("--steps", "steps", int, "sentiment fine-tuning steps per run")
    sized("--batch-size", "batch_size", int, "sentiment training batch size")
    sized("--seq-len", "seq_len", int, "tokens per review")
    sized("--bbc-seq-len", "bbc_seq_len", int, "tokens per BBC article (truncation)")
    sized("--num-layers", "num_layers", int, "pretrained encoder layers to keep (1-6)")
    sized("--bbc-train-examples", "bbc_train_examples", int, "BBC articles to fit the head on")
    sized("--bbc-eval-examples", "bbc_eval_examples", int, "held-out BBC articles")
    sized("--rt-train-examples", "rt_train_examples", int, "training reviews")
    sized("--rt-eval-examples", "rt_eval_examples", int, "held-out reviews")
    sized("--eval-every", "eval_every", int, "evaluate both tasks every N steps")
    sized("--mask-interval", "mask_interval", int, "NanoAdam: re-select weights every N steps")
    sized("--head-steps", "head_steps", int, "full-batch Adam steps to fit the BBC head")
    sized("--runs", "runs", str, "comma-separated runs: nanoadam:DENSITY[:LR] and/or adamw[:LR]")
    p.add_argument("--lr-nanoadam", type=float, default=2e-4, help="NanoAdam learning rate")
    p.add_argument("--lr-adamw", type=float, default=5e-5, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    cli.add_run_flags(p, seed_help="seed for subsets, batches and heads")
    args = p.parse_args(argv)
    cli.fill_sized_defaults(args, FULL_DEFAULTS, SMOKE_DEFAULTS)
    try:
        args.run_specs = parse_runs(args.runs, args.lr_nanoadam, args.lr_adamw)
    except ValueError as e:
        p.error(f"--runs: {e}")
    if not 1 <= args.num_layers <= 6:
        p.error("--num-layers must be in 1..6")
    for key in ("steps", "batch_size", "eval_every", "mask_interval", "head_steps"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def _subset(idx: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    if n is None or n >= len(idx):
        return idx
    return np.sort(np.random.default_rng(seed).choice(idx, size=n, replace=False))


def load_data(args: argparse.Namespace) -> dict[str, Any]:
    """Tokenized BBC News (train/eval) and Rotten Tomatoes (train/eval) splits as numpy arrays.

    The held-out sets are fixed seeded splits (seed 0, independent of ``--seed``); the training
    subsets are drawn with ``--seed``.
    """
    data: dict[str, Any] = {}
    bbc_texts, bbc_labels, bbc_classes = assets.load_bbc_news()
    tr, ev = assets.split_indices(len(bbc_texts), test_size=args.bbc_eval_examples, seed=0)
    tr = _subset(tr, args.bbc_train_examples, args.seed)
    bbc_tok = MiniLMTokenizer(max_length=args.bbc_seq_len)
    for split, idx in (("train", tr), ("eval", ev)):
        ids, mask = bbc_tok([bbc_texts[i] for i in idx])
        data[f"bbc_{split}"] = (ids, mask, bbc_labels[idx])
    data["bbc_classes"] = bbc_classes

    rt_texts, rt_labels = assets.load_rotten_tomatoes()
    tr, ev = assets.split_indices(len(rt_texts), test_size=args.rt_eval_examples, seed=0)
    tr = _subset(tr, args.rt_train_examples, args.seed)
    rt_tok = MiniLMTokenizer(max_length=args.seq_len)
    for split, idx in (("train", tr), ("eval", ev)):
        ids, mask = rt_tok([rt_texts[i] for i in idx])
        data[f"rt_{split}"] = (ids, mask, rt_labels[idx])
    return data


def batch_schedule(num_train: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """``(steps, batch_size)`` indices of shuffled epochs; the same for every run."""
    rng = np.random.default_rng(seed)
    reps = -(-steps * batch_size // num_train)
    order = np.concatenate([rng.permutation(num_train) for _ in range(reps)])
    return order[: steps * batch_size].reshape(steps, batch_size)


# ------------------------------------------------------------------------------------------------
# Model helpers
# ------------------------------------------------------------------------------------------------


@nnx.jit
def _features(encoder: MiniLMEncoder, ids, mask):
    return encoder.embed(ids, mask)  # mean pooling, not normalised: what MiniLMClassifier uses


@nnx.jit
def _logits(model: MiniLMClassifier, ids, mask):
    return model(ids, mask)


def _batched(fn, module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Apply ``fn(module, ids, mask)`` in fixed-size padded batches (one compilation)."""
    outs = []
    b = EVAL_BATCH_SIZE
    for start in range(0, len(ids), b):
        i, m = ids[start : start + b], mask[start : start + b]
        n = len(i)
        if n < b:
            i = np.concatenate([i, np.zeros((b - n, i.shape[1]), i.dtype)])
            m = np.concatenate([m, np.zeros((b - n, m.shape[1]), m.dtype)])
        outs.append(np.asarray(fn(module, i, m))[:n])
    return np.concatenate(outs)


def fit_linear_head(
    feats: np.ndarray, labels: np.ndarray, num_classes: int, steps: int, l2: float = 1e-3
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression on ``feats`` by full-batch Adam; returns ``(W, b)``.

    The features are standardised while fitting and the standardisation is folded back into the
    weights, so the head is a plain linear layer on raw features: ``logits = feats @ W + b``.
    """
    mu = feats.mean(0)
    sd = feats.std(0) + 1e-6
    x = jnp.asarray((feats - mu) / sd)
    y = jnp.asarray(labels)
    params = {"w": jnp.zeros((feats.shape[1], num_classes)), "b": jnp.zeros(num_classes)}
    tx = optax.adam(1e-2)

    def loss_fn(p):
        ce = optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()
        return ce + l2 * jnp.sum(p["w"] ** 2)

    @jax.jit
    def fit(params):
        def body(carry, _):
            p, s = carry
            g = jax.grad(loss_fn)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
        return params

    p = jax.tree.map(np.asarray, fit(params))
    w = p["w"] / sd[:, None]
    b = p["b"] - (mu / sd) @ p["w"]
    return w.astype(np.float32), b.astype(np.float32)


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, -1) == labels)) if len(labels) else 0.0


def bbc_accuracy(encoder: MiniLMEncoder, head: tuple[np.ndarray, np.ndarray], split) -> float:
    """Accuracy of the (fixed) BBC linear ``head`` on ``encoder``'s features of ``split``."""
    ids, mask, labels = split
    w, b = head
    return _accuracy(_batched(_features, encoder, ids, mask) @ w + b, labels)


def rt_accuracy(model: MiniLMClassifier, split) -> float:
    """Sentiment accuracy of the classifier on ``split``."""
    ids, mask, labels = split
    return _accuracy(_batched(_logits, model, ids, mask), labels)


def _loss_fn(model: MiniLMClassifier, ids, mask, labels):
    logits = model(ids, mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def train_step(model: MiniLMClassifier, optimizer: nnx.Optimizer, ids, mask, labels):
    """One optimisation step in place; returns the batch loss."""
    loss, grads = nnx.value_and_grad(_loss_fn)(model, ids, mask, labels)
    optimizer.update(model, grads)
    return loss


def make_optimizer(run: dict[str, Any], args: argparse.Namespace):
    """``(tx, description)`` for one parsed run."""
    if run["kind"] == "nanoadam":
        tx = nanoadam.nanoadam(
            learning_rate=run["lr"], density=run["density"], mask_interval=args.mask_interval
        )
        desc = (
            f"nanoadam(lr={run['lr']:g}, density={run['density']:g}, "
            f"mask_interval={args.mask_interval})"
        )
        return tx, desc
    tx = optax.adamw(run["lr"], weight_decay=args.weight_decay)
    return tx, f"optax.adamw(lr={run['lr']:g}, weight_decay={args.weight_decay:g})"


def _flat_params(module) -> dict[tuple, np.ndarray]:
    return {
        tuple(p): np.array(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))
    }


def encoder_drift(before: dict[tuple, np.ndarray], encoder: MiniLMEncoder) -> dict[str, float]:
    """How much the encoder moved: fraction of entries changed and relative L2 change."""
    after = _flat_params(encoder)
    changed = total = 0
    diff_sq = norm_sq = 0.0
    for key, w0 in before.items():
        w1 = after[key]
        changed += int(np.count_nonzero(w1 != w0))
        total += w0.size
        diff_sq += float(np.sum((w1.astype(np.float64) - w0) ** 2))
        norm_sq += float(np.sum(w0.astype(np.float64) ** 2))
    return {"touched_fraction": changed / total, "relative_change": (diff_sq / norm_sq) ** 0.5}


# ------------------------------------------------------------------------------------------------
# Experiment
# ------------------------------------------------------------------------------------------------


def run_one(run, args, data, base: MiniLMClassifier, bbc_head, schedule, start_point):
    """Fine-tune a copy of ``base`` on sentiment with one optimizer; track both tasks."""
    model = nnx.clone(base)
    plan = None
    if run["kind"] == "nanoadam":
        plan = show_plan(
            nnx.state(model, nnx.Param),
            f"{run['name']}: NanoAdam's plan (what it trains and stores per leaf)",
            density=run["density"],
        )
    tx, desc = make_optimizer(run, args)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    initial = _flat_params(model.encoder)
    ids, mask, labels = data["rt_train"]

    eval_steps, bbc_curve, rt_curve = [0], [start_point["bbc"]], [start_point["rt"]]
    eval_seconds = 0.0
    losses: list[float] = []
    step_times: list[float] = []
    bar = progress(range(args.steps), desc=f"{run['name']:>14}", enabled=not args.no_progress)
    for step in bar:
        idx = schedule[step]
        t = time.perf_counter()
        loss = float(train_step(model, optimizer, ids[idx], mask[idx], labels[idx]))
        step_times.append(time.perf_counter() - t)
        losses.append(loss)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            t = time.perf_counter()
            eval_steps.append(step + 1)
            bbc_curve.append(bbc_accuracy(model.encoder, bbc_head, data["bbc_eval"]))
            rt_curve.append(rt_accuracy(model, data["rt_eval"]))
            eval_seconds += time.perf_counter() - t
            bar.set_postfix(
                loss=f"{loss:.3f}", bbc=f"{bbc_curve[-1]:.3f}", rt=f"{rt_curve[-1]:.3f}"
            )
        elif step % 5 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()
    state_bytes = int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(optimizer.opt_state)))
    return {
        "optimizer": desc,
        "kind": run["kind"],
        "density": run["density"],
        "lr": run["lr"],
        "sentiment_accuracy": rt_curve[-1],
        "bbc_accuracy_after": bbc_curve[-1],
        "bbc_forgetting": start_point["bbc"] - bbc_curve[-1],
        "eval_steps": eval_steps,
        "bbc_accuracies": bbc_curve,
        "sentiment_accuracies": rt_curve,
        "losses": losses,
        "final_loss": losses[-1],
        "optimizer_state_bytes": state_bytes,
        "plan": plan,
        "first_step_seconds": step_times[0],
        "mean_step_seconds": float(np.mean(step_times[1:] if len(step_times) > 1 else step_times)),
        "train_seconds": float(np.sum(step_times)),
        "eval_seconds": eval_seconds,
        **{f"encoder_{k}": v for k, v in encoder_drift(initial, model.encoder).items()},
    }


def format_table(results: dict[str, Any]) -> str:
    """Markdown table, one row per run (the same text is printed and saved)."""
    bbc0 = results["bbc"]["accuracy_before"]
    lines = [
        "| run | optimizer | sentiment acc. | BBC acc. before -> after | BBC forgetting | "
        "encoder entries changed | encoder rel. change | optimizer state | step time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["runs"].items():
        lines.append(
            f"| {name} | `{r['optimizer']}` | {r['sentiment_accuracy']:.3f} | "
            f"{bbc0:.3f} -> {r['bbc_accuracy_after']:.3f} | "
            f"{100 * r['bbc_forgetting']:+.1f} pts | {100 * r['encoder_touched_fraction']:.1f}% | "
            f"{r['encoder_relative_change']:.2e} | {r['optimizer_state_bytes'] / 2**20:.1f} MiB | "
            f"{r['mean_step_seconds'] * 1e3:.0f} ms |"
        )
    cfg, b = results["config"], results["bbc"]
    lines += [
        "",
        f"Task 1: linear head on frozen MiniLM-L6 features ({cfg['num_layers']} layers), BBC News "
        f"truncated to {cfg['bbc_seq_len']} tokens, fitted on {b['num_train']} articles (train "
        f"acc. {b['train_accuracy']:.3f}), evaluated on {b['num_eval']} held-out articles "
        f"(majority class {b['majority_baseline']:.3f}). Task 2: {cfg['steps']} steps of batch "
        f"{cfg['batch_size']} on Rotten Tomatoes at {cfg['seq_len']} tokens, full encoder "
        f"trainable, evaluated on {results['sentiment']['num_eval']} held-out reviews (majority "
        f"class {results['sentiment']['majority_baseline']:.3f}; the new head at step 0: "
        f"{results['sentiment']['accuracy_before']:.3f}). Forgetting = BBC accuracy at step 0 "
        f"minus after, with the BBC head unchanged. {results['environment']['device']}.",
    ]
    return "\n".join(lines)


def save_plot(results: dict[str, Any], path: Path) -> None:
    """BBC accuracy (forgetting), sentiment accuracy and training loss of every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bbc, ax_rt, ax_loss) = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (name, r) in enumerate(results["runs"].items()):
        c = f"C{i}"
        ax_bbc.plot(r["eval_steps"], r["bbc_accuracies"], "o-", color=c, label=name)
        ax_rt.plot(r["eval_steps"], r["sentiment_accuracies"], "o-", color=c, label=name)
        losses = np.asarray(r["losses"])
        steps = np.arange(1, len(losses) + 1)
        ax_loss.plot(steps, losses, color=c, alpha=0.2, lw=0.8)
        w = max(1, min(10, len(losses) // 5))
        ax_loss.plot(steps[w - 1 :], np.convolve(losses, np.ones(w) / w, "valid"), color=c,
                     label=f"{name} ({w}-step mean)")  # fmt: skip
    ax_bbc.axhline(results["bbc"]["accuracy_before"], color="gray", ls=":", lw=1,
                   label="before task 2")  # fmt: skip
    ax_rt.axhline(results["sentiment"]["majority_baseline"], color="gray", ls="--", lw=1,
                  label="majority class")  # fmt: skip
    ax_bbc.set(xlabel="sentiment fine-tuning step", ylabel="accuracy",
               title=f"Task 1: BBC News topic (old head; majority class "
                     f"{results['bbc']['majority_baseline']:.2f})")  # fmt: skip
    ax_rt.set(xlabel="sentiment fine-tuning step", ylabel="accuracy",
              title="Task 2: Rotten Tomatoes sentiment")  # fmt: skip
    ax_loss.set(xlabel="step", ylabel="training loss", title="Task 2 training loss")
    for ax in (ax_bbc, ax_rt, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("MiniLM-L6 continual learning: forgetting of BBC News after sentiment fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the experiment; returns the results dict that is also written to ``--out``."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    missing = assets.missing_assets("minilm", "rotten_tomatoes", "bbc_news")
    if missing:
        raise SystemExit("Missing offline assets. Install them with:\n  " + "\n  ".join(missing))

    data = load_data(args)
    base = MiniLMClassifier.from_pretrained(
        num_classes=2, num_layers=args.num_layers, seed=args.seed
    )
    n_bbc_tr, n_bbc_ev = len(data["bbc_train"][2]), len(data["bbc_eval"][2])
    print(
        f"BBC News: {n_bbc_tr} articles to fit the head, {n_bbc_ev} held out "
        f"({args.bbc_seq_len} tokens); Rotten Tomatoes: {len(data['rt_train'][2])} training / "
        f"{len(data['rt_eval'][2])} held-out reviews ({args.seq_len} tokens); "
        f"MiniLM-L6 with {args.num_layers} layer(s)."
    )

    # Task 1: linear head on the frozen pretrained encoder.
    t = time.perf_counter()
    ids, mask, bbc_y = data["bbc_train"]
    feats = _batched(_features, base.encoder, ids, mask)
    bbc_head = fit_linear_head(feats, bbc_y, len(data["bbc_classes"]), args.head_steps)
    bbc_train_acc = _accuracy(feats @ bbc_head[0] + bbc_head[1], bbc_y)
    start_point = {
        "bbc": bbc_accuracy(base.encoder, bbc_head, data["bbc_eval"]),
        "rt": rt_accuracy(base, data["rt_eval"]),
    }
    task1_seconds = time.perf_counter() - t
    print(
        f"Task 1 head: BBC accuracy {start_point['bbc']:.4f} held out "
        f"({bbc_train_acc:.4f} train), {task1_seconds:.0f} s."
    )

    # Task 2: fine-tune a copy of the encoder with each optimizer.
    schedule = batch_schedule(len(data["rt_train"][2]), args.steps, args.batch_size, args.seed)
    runs = {
        r["name"]: run_one(r, args, data, base, bbc_head, schedule, start_point)
        for r in args.run_specs
    }

    def majority(y: np.ndarray) -> float:
        return float(np.bincount(y).max() / len(y)) if len(y) else 0.0

    config = {k: v for k, v in vars(args).items() if k != "run_specs"}
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in config.items()}
    results: dict[str, Any] = {
        "config": config,
        "bbc": {
            "num_train": n_bbc_tr,
            "num_eval": n_bbc_ev,
            "classes": data["bbc_classes"],
            "train_accuracy": bbc_train_acc,
            "accuracy_before": start_point["bbc"],
            "majority_baseline": majority(data["bbc_eval"][2]),
            "seconds": task1_seconds,
        },
        "sentiment": {
            "num_train": len(data["rt_train"][2]),
            "num_eval": len(data["rt_eval"][2]),
            "accuracy_before": start_point["rt"],
            "majority_baseline": majority(data["rt_eval"][2]),
        },
        "runs": runs,
        "environment": environment(),
        "command": "python examples/continual_text.py " + " ".join(argv or sys.argv[1:]),
        "wall_seconds": None,
    }
    table = format_table(results)
    print()
    print(table)

    write_results(
        args.out,
        "continual_text",
        "Continual learning on MiniLM-L6: BBC News, then Rotten Tomatoes",
        table,
        results,
        t_start,
        save_plot,
    )
    return results


if __name__ == "__main__":
    main()
