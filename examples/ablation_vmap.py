"""Density and selection-criterion ablation, each criterion as ONE compiled, vmapped program.

The pretrained MNIST CNN is fine-tuned on 90-degree rotated MNIST (the task of
``continual_vision.py``) with NanoAdam at many densities at once: the whole training run (optimizer
init, a ``jax.lax.scan`` over the steps, the final evaluation on both tasks) is one function of the
density, ``jax.vmap``-ed over a vector of densities and ``jax.jit``-compiled once. This works
because ``nanoadam.nanoadam`` accepts a traced ``density``; ``max_density=1.0`` sizes the compact
moment buffers for the largest density in the vector.

The selection criterion (``"smallest"``, ``"random"``, ``"largest"``) changes the program, so it
cannot be vmapped: the script compiles one program per criterion (a loop of three compilations)
and prints how often each was traced and compiled (counted with a trace counter and with
``jax.monitoring``'s XLA-compilation events). ``density=1.0`` is plain Adam (every criterion
selects everything), so all curves meet there.

The paper's ablation (BERT on GLUE) finds small > random > large at equal density. On this small
CNN the criterion matters little: with the defaults (100 steps, one learning rate for every
density) "largest" is marginally ahead on the new task at densities 0.05-0.2; "smallest" forgets
least at 0.5 (both heads) but most through the shared head at 0.01-0.2. At the settings of
``continual_vision.py`` (lr 1e-2, 300 steps of batch 64) the three reach the same new-task
accuracy within 1 point and "smallest" forgets least at density 0.1 (own head: 0.6 points vs 1.0
random, 2.3 largest). One seed; read it as an illustration of the tool, not as a replication.

The model is the real pretrained ``digit-recognizer-py`` CNN, with its parameters taken from
``common.mnist_cnn.load_mnist_cnn()`` as a plain dict. The forward pass is re-written as a pure
function whose 3x3 convolutions are done as im2col + matmul: on XLA:CPU a convolution inside a
``while`` loop (what ``lax.scan`` compiles to) runs about 20x slower than the same convolution
outside one (jax-ml/jax#12868), while matmuls do not suffer. The script checks that this forward
pass reproduces the NNX model's logits.

    python examples/ablation_vmap.py            # writes examples/results/ablation_vmap.*
    python examples/ablation_vmap.py --smoke    # 2 densities, 3 steps (seconds)
    python examples/ablation_vmap.py --help

Outputs (in ``--out``): ``ablation_vmap.json``, ``ablation_vmap.md`` and ``ablation_vmap.png``
(new- and old-task accuracy against density, one line per criterion).
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
from common.mnist_cnn import load_mnist_cnn, normalize_images
from common.progress import progress
from common.results import environment, write_results
from continual_vision import ASSET_NAMES, batch_schedule, load_tasks
from flax import nnx

import nanoadam_jax as nanoadam

__all__ = [
    "CRITERIA",
    "cnn_apply",
    "format_table",
    "main",
    "make_program",
    "parse_args",
    "pretrained_params",
]

CRITERIA = ("smallest", "random", "largest")

#: Name of the JAX monitoring event recorded once per XLA compilation.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_COMPILE_LOG: list[float] = []  # durations of every XLA compilation since the listener was added
_LISTENING = [False]


def _listen_to_compilations() -> None:
    """Record every XLA backend compilation (``jax.monitoring``), once per process."""
    if not _LISTENING[0]:

        def listener(event: str, duration: float, **_: Any) -> None:
            if event == BACKEND_COMPILE_EVENT:
                _COMPILE_LOG.append(duration)

        jax.monitoring.register_event_duration_secs_listener(listener)
        _LISTENING[0] = True


FULL_DEFAULTS = dict(
    steps=100,
    batch_size=32,
    train_examples=None,
    test_examples=1000,
    mask_interval=25,
    densities="0.01,0.02,0.05,0.1,0.2,0.5,1.0",
)
SMOKE_DEFAULTS = dict(
    steps=3,
    batch_size=8,
    train_examples=64,
    test_examples=64,
    mask_interval=2,
    densities="0.1,1.0",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; unset size flags take the full-run or ``--smoke`` defaults."""
    p = cli.parser(
        "ablation_vmap.py",
        "NanoAdam density x selection-criterion ablation on rotated MNIST: for each criterion "
        "one jit-compiled program that vmaps a lax.scan training loop over all densities.",
    )

    sized = cli.sized_adder(p, FULL_DEFAULTS, SMOKE_DEFAULTS)

    sized("--steps", "steps", int, "training steps (the length of the lax.scan)")
    sized("--batch-size", "batch_size", int, "training batch size")
    sized("--train-examples", "train_examples", int, "rotated training images (of 4,000)")
    sized("--test-examples", "test_examples", int, "held-out images (of the 1,000 test images)")
    sized("--mask-interval", "mask_interval", int, "re-select the weights every N steps")
    sized("--densities", "densities", str, "comma-separated densities, vmapped in one program")
    p.add_argument(
        "--criteria", default=",".join(CRITERIA), help="comma-separated selection criteria"
    )
    p.add_argument("--lr", type=float, default=3e-3, help="NanoAdam learning rate (all runs)")
    p.add_argument(
        "--fast-compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile with XLA's backend optimisation off (about 2x faster to compile, slower "
        "to run; default: on with --smoke, off otherwise)",
    )
    cli.add_run_flags(p, seed_help="seed of the batch order and of 'random'")
    args = p.parse_args(argv)
    cli.fill_sized_defaults(args, FULL_DEFAULTS, SMOKE_DEFAULTS)
    if args.fast_compile is None:
        args.fast_compile = args.smoke
    try:
        args.densities = [float(d) for d in args.densities.split(",") if d.strip()]
    except ValueError:
        p.error(f"--densities: not a list of numbers: {args.densities!r}")
    if not args.densities or not all(0.0 < d <= 1.0 for d in args.densities):
        p.error("--densities must be a non-empty list of numbers in (0, 1]")
    args.criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    if not args.criteria or set(args.criteria) - set(CRITERIA):
        p.error(f"--criteria must be a non-empty subset of {list(CRITERIA)}")
    if min(args.steps, args.batch_size, args.mask_interval) < 1:
        p.error("--steps, --batch-size and --mask-interval must be >= 1")
    if not 1 <= args.test_examples <= 1000:
        p.error("--test-examples must be in 1..1000")
    return args


# ------------------------------------------------------------------------------------------------
# The CNN as a pure function of a parameter dict
# ------------------------------------------------------------------------------------------------


def pretrained_params() -> dict[str, dict[str, jax.Array]]:
    """The pretrained CNN's parameters as a plain nested dict (``conv1`` ... ``fc``, ``head``)."""
    return nnx.to_pure_dict(nnx.state(load_mnist_cnn(), nnx.Param))


def _conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """3x3 'same' convolution (NHWC, HWIO kernel) as im2col + one matmul."""
    _, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], -1)
    return cols @ kernel.reshape(9 * c, -1) + bias


def _max_pool2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 and floor (like torch and the NNX model)."""
    n, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    return x[:, : 2 * h2, : 2 * w2].reshape(n, h2, 2, w2, 2, c).max(axis=(2, 4))


def cnn_apply(params: dict, images: jax.Array) -> jax.Array:
    """Logits of the CNN for raw ``[0, 255]`` images ``(N, 28, 28)`` (same as ``MnistCNN``)."""
    x = normalize_images(jnp.asarray(images, jnp.float32))[..., None]
    for name in ("conv1", "conv2", "conv3"):
        x = _max_pool2(jax.nn.relu(_conv3x3(x, params[name]["kernel"], params[name]["bias"])))
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(x @ params["fc"]["kernel"] + params["fc"]["bias"])
    return x @ params["head"]["kernel"] + params["head"]["bias"]


def _accuracy(params: dict, images: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(cnn_apply(params, images), axis=-1) == labels)


# ------------------------------------------------------------------------------------------------
# One program per criterion
# ------------------------------------------------------------------------------------------------


def make_program(criterion: str, args: argparse.Namespace, on_step=None):
    """The jitted, vmapped training program of one criterion, and its trace counter.

    Returns:
      ``(program, trace_count)``: ``program(densities, params, xb, yb, new_x, old_x, test_y)``
      trains one model per entry of ``densities`` (a 1-D array) for ``xb.shape[0]`` steps and
      returns per-density ``new_acc``, ``old_own_acc`` (old task through the pretrained head),
      ``old_shared_acc`` (through the trained head), ``losses`` (steps,) and ``touched`` (the
      fraction of non-head weights that moved); ``trace_count[0]`` counts how many times the
      Python function was traced (once per compilation).
    """
    trace_count = [0]

    def train_one(density, params, xb, yb, new_x, old_x, test_y):
        trace_count[0] += 1  # runs at trace time only
        tx = nanoadam.nanoadam(
            args.lr,
            density=density,
            mask_interval=args.mask_interval,
            criterion=criterion,
            max_density=1.0,
            seed=args.seed,
        )

        def loss_fn(p, x, y):
            return optax.softmax_cross_entropy_with_integer_labels(cnn_apply(p, x), y).mean()

        def step(carry, batch):
            p, opt_state = carry
            i, x, y = batch
            loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
            updates, opt_state = tx.update(grads, opt_state, p)
            if on_step is not None:
                jax.debug.callback(on_step, i)  # unbatched argument: one call per step
            return (optax.apply_updates(p, updates), opt_state), loss

        steps = jnp.arange(xb.shape[0])
        (final, _), losses = jax.lax.scan(step, (params, tx.init(params)), (steps, xb, yb))
        moved = [
            jnp.sum(final[k][n] != params[k][n]) for k in params if k != "head" for n in params[k]
        ]
        total = sum(params[k][n].size for k in params if k != "head" for n in params[k])
        return {
            "new_acc": _accuracy(final, new_x, test_y),
            # The old task through its own (pretrained) head, and through the trained head.
            "old_own_acc": _accuracy(dict(final, head=params["head"]), old_x, test_y),
            "old_shared_acc": _accuracy(final, old_x, test_y),
            "losses": losses,
            "touched": sum(moved) / total,
        }

    in_axes = (0, None, None, None, None, None, None)
    return jax.jit(jax.vmap(train_one, in_axes=in_axes)), trace_count


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------


def format_table(results: dict[str, Any]) -> str:
    """Markdown: accuracy per density (rows) and criterion (columns), then compile counts."""
    crits = list(results["criteria"])
    header = "| density | " + " | ".join(f"{c}: new / old own / old shared" for c in crits) + " |"
    lines = [header, "|---|" + "---|" * len(crits)]
    for i, d in enumerate(results["densities"]):
        cells = []
        for c in crits:
            r = results["criteria"][c]
            cells.append(
                f"{100 * r['new_task_accuracy'][i]:.1f} / "
                f"{100 * r['old_task_accuracy_own_head'][i]:.1f} / "
                f"{100 * r['old_task_accuracy_shared_head'][i]:.1f}"
            )
        lines.append(f"| {d:g} | " + " | ".join(cells) + " |")
    cfg = results["config"]
    lines += [
        "",
        "Accuracy (%) on the held-out images: new = rotated; old own = upright, through the "
        "pretrained head (the old task keeps its own head); old shared = upright, through the "
        f"head trained on the new task. {cfg['steps']} steps of batch {cfg['batch_size']}, lr "
        f"{cfg['lr']:g}, mask_interval {cfg['mask_interval']}. Before fine-tuning: new "
        f"{100 * results['before']['new']:.1f}, old {100 * results['before']['old']:.1f}."
        + (" Density 1.0 is plain Adam." if 1.0 in results["densities"] else ""),
        "",
        "| criterion | traces | XLA compilations | compile time | run time (all densities) |",
        "|---|---|---|---|---|",
    ]
    for c in crits:
        r = results["criteria"][c]
        lines.append(
            f"| {c} | {r['trace_count']} | {r['compile_count']} | {r['compile_seconds']:.1f} s | "
            f"{r['run_seconds']:.1f} s |"
        )
    return "\n".join(lines)


def save_plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy against density (log axis), one line per criterion, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = np.asarray(results["densities"])
    panels = (
        ("new_task_accuracy", "new task (rotated MNIST)", "new"),
        ("old_task_accuracy_own_head", "old task (MNIST), own head", "old"),
        ("old_task_accuracy_shared_head", "old task (MNIST), shared head", "old"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.3), sharey=True)
    for ax, (key, title, before_key) in zip(axes, panels):
        for i, (c, r) in enumerate(results["criteria"].items()):
            ax.plot(d, 100 * np.asarray(r[key]), "o-", color=f"C{i}", label=c)
        before = 100 * results["before"][before_key]
        ax.axhline(before, color="gray", ls="--", lw=1, label="before fine-tuning")
        ax.set_xscale("log")
        ax.set_xticks(d, [f"{x:g}" for x in d])
        ax.minorticks_off()
        ax.set(xlabel="density (fraction of each tensor updated)", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("accuracy (%)")
    cfg = results["config"]
    fig.suptitle(
        f"NanoAdam ablation: density x selection criterion ({cfg['steps']} steps of batch "
        f"{cfg['batch_size']}, lr {cfg['lr']:g}); each criterion one vmapped program"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every criterion; returns the results dict that is also written to ``--out``."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    missing = assets.missing_assets(*ASSET_NAMES)
    if missing:
        raise SystemExit("Missing offline assets. Install them with:\n  " + "\n  ".join(missing))

    data = load_tasks(args.train_examples, args.test_examples, args.seed)
    schedule = batch_schedule(len(data["train_y"]), args.steps, args.batch_size, args.seed)
    xb = jnp.asarray(data["new_train_x"][schedule])  # (steps, batch, 28, 28)
    yb = jnp.asarray(data["train_y"][schedule])
    new_x, old_x = jnp.asarray(data["new_test_x"]), jnp.asarray(data["old_test_x"])
    test_y = jnp.asarray(data["test_y"])
    _listen_to_compilations()
    params = pretrained_params()
    densities = jnp.asarray(args.densities, jnp.float32)

    # The pure forward pass must be the NNX model's.
    nnx_logits = np.asarray(load_mnist_cnn()(old_x[:200]))
    pure_logits = np.asarray(jax.jit(cnn_apply)(params, old_x[:200]))
    max_logit_diff = float(np.abs(nnx_logits - pure_logits).max())
    if max_logit_diff > 1e-3:
        raise RuntimeError(
            f"pure CNN differs from the NNX model: max |logit diff| {max_logit_diff}"
        )
    before = {
        "new": float(jax.jit(_accuracy)(params, new_x, test_y)),
        "old": float(jax.jit(_accuracy)(params, old_x, test_y)),
    }
    print(
        f"Rotated MNIST, {len(data['train_y'])} training / {len(test_y)} test images; "
        f"{args.steps} steps of batch {args.batch_size}; densities {args.densities} vmapped; "
        f"before: new {before['new']:.3f}, old {before['old']:.3f} "
        f"(pure CNN vs NNX: max |logit diff| {max_logit_diff:.1e})."
    )

    runs: dict[str, Any] = {}
    for criterion in args.criteria:
        bar = progress(total=args.steps, desc=f"{criterion:>8}", enabled=not args.no_progress)

        def on_step(i, bar=bar):
            bar.update(int(i) + 1 - bar.n)

        program, trace_count = make_program(criterion, args, on_step)
        inputs = (densities, params, xb, yb, new_x, old_x, test_y)
        n_compiles = len(_COMPILE_LOG)
        t0 = time.perf_counter()
        options = {"xla_backend_optimization_level": 0} if args.fast_compile else None
        compiled = program.lower(*inputs).compile(compiler_options=options)  # trace + compile
        compile_s = time.perf_counter() - t0
        bar.set_postfix(compile=f"{compile_s:.1f}s")
        t0 = time.perf_counter()
        out = compiled(*inputs)  # every density, every step: one call
        jax.block_until_ready(out)
        run_s = time.perf_counter() - t0
        compile_count = len(_COMPILE_LOG) - n_compiles  # XLA compilations seen in this block
        out = jax.device_get(out)
        bar.close()
        runs[criterion] = {
            "new_task_accuracy": [float(v) for v in out["new_acc"]],
            "old_task_accuracy_own_head": [float(v) for v in out["old_own_acc"]],
            "old_task_accuracy_shared_head": [float(v) for v in out["old_shared_acc"]],
            "forgetting_own_head": [before["old"] - float(v) for v in out["old_own_acc"]],
            "touched_fraction_body": [float(v) for v in out["touched"]],
            "final_loss": [float(v) for v in np.asarray(out["losses"])[:, -1]],
            "losses": np.asarray(out["losses"]).tolist(),
            "trace_count": trace_count[0],
            "compile_count": compile_count,
            "compile_seconds": compile_s,
            "run_seconds": run_s,
        }
        print(
            f"criterion {criterion!r}: traced {trace_count[0]}x, compiled {compile_count}x "
            f"({compile_s:.1f} s); "
            f"{len(args.densities)} densities trained in one call ({run_s:.1f} s)"
        )

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = {
        "config": config,
        "densities": list(args.densities),
        "num_train": len(data["train_y"]),
        "num_test": len(test_y),
        "before": before,
        "pure_vs_nnx_max_logit_diff": max_logit_diff,
        "environment": environment(),
        "criteria": runs,
        "wall_seconds": None,
    }
    table = format_table(results)
    print()
    print(table)

    write_results(
        args.out,
        "ablation_vmap",
        "NanoAdam ablation: density (vmapped) x selection criterion",
        table,
        results,
        t_start,
        save_plot,
    )
    return results


if __name__ == "__main__":
    main()
