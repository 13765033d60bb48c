"""Density and selection-criterion ablation, each criterion as ONE compiled, vmapped program.

The pretrained MNIST CNN is fine-tuned on 90-degree rotated MNIST (the task of
``continual_vision.py``) with NanoAdam at many densities at once: the whole training run (optimizer
init, a ``jax.lax.scan`` over the steps, the final evaluation on both tasks) is one function of the
density, ``jax.vmap``-ed over a vector of densities and ``jax.jit``-compiled once. This works
because ``nanoadam.nanoadam`` accepts a traced ``density``; a traced density at ``init`` needs
``max_density``, here the largest density of the grid, which sizes every run's compact state
(positions and moments per chunk). The script prints NanoAdam's plan first (``nanoadam.plan``:
per leaf the label, chunking, entries trained and state bytes at ``max_density``, against
``optax.adamw``'s) and the entries trained at each density.

**What the grid costs.** After the ablation the script times one step of the vmapped grid
against one step of each single run (``nanoadam(density=d)`` with a Python float, jitted on its
own), interleaved, after compilation, on an ordinary step (no refresh due) and on a refresh step,
and writes the ratio ``grid / sum of single runs`` into the results (``vmap_cost``), with compile
times and state bytes. The refresh is a ``lax.cond`` that stays a real conditional under
``vmap`` (the library's ``custom_vmap`` rule), so an ordinary grid step does no selection work:
it is cheaper than a refresh step of the grid, as a single run's ordinary step is cheaper than its
refresh step (the results give both differences).
What still makes the grid dearer than the sum: every run's state is sized for the grid's largest
density, so a small density's run gathers and scatters as many entries as the largest one (the
table also times single runs with that state size: ``ratio_same_state``, about 1x), and XLA:CPU
may run the model vmapped over parameter copies more slowly than one copy at a time (a control,
the same model and grid with ``optax.adam``: ``adam_ratio``).

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

Outputs (in ``--out``): ``ablation_vmap.json``, ``ablation_vmap.md`` (accuracy table, compile
counts, the grid's cost against the single runs) and ``ablation_vmap.png`` (new- and old-task
accuracy against density, one line per criterion).
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
from common.mnist_cnn import load_mnist_cnn, normalize_images
from common.plans import show_plan
from common.progress import progress
from common.results import environment, write_results
from continual_vision import ASSET_NAMES, batch_schedule, load_tasks
from flax import nnx

import nanoadam_jax as nanoadam

__all__ = [
    "CRITERIA",
    "cnn_apply",
    "format_cost_table",
    "format_table",
    "main",
    "make_optimizer",
    "make_program",
    "measure_vmap_cost",
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
    timing_repeats=20,
)
SMOKE_DEFAULTS = dict(
    steps=3,
    batch_size=8,
    train_examples=64,
    test_examples=64,
    mask_interval=2,
    densities="0.1,1.0",
    timing_repeats=3,
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
    sized(
        "--timing-repeats",
        "timing_repeats",
        int,
        "repeats of the timed grid step and single-run steps (vmap cost; 0: not measured)",
    )
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
    if args.timing_repeats < 0:
        p.error("--timing-repeats must be >= 0")
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


def make_optimizer(
    density: Any, criterion: str, args: argparse.Namespace, max_density: float | None = None
) -> optax.GradientTransformation:
    """The NanoAdam optimizer of one run: ``density`` may be traced (the vmapped grid), and
    then ``max_density`` (the grid's largest density) sizes its state."""
    return nanoadam.nanoadam(
        args.lr,
        density=density,
        mask_interval=args.mask_interval,
        criterion=criterion,
        max_density=max_density,
        seed=args.seed,
    )


def _loss_fn(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(cnn_apply(p, x), y).mean()


def _train_step(tx: optax.GradientTransformation, p: dict, opt_state: Any, x, y):
    """One NanoAdam step of the CNN: ``(new_params, new_opt_state, loss)``."""
    loss, grads = jax.value_and_grad(_loss_fn)(p, x, y)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss


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
        tx = make_optimizer(density, criterion, args, max_density=max(args.densities))

        def step(carry, batch):
            p, opt_state = carry
            i, x, y = batch
            p, opt_state, loss = _train_step(tx, p, opt_state, x, y)
            if on_step is not None:
                jax.debug.callback(on_step, i)  # unbatched argument: one call per step
            return (p, opt_state), loss

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
# The cost of the vmapped grid: one grid step against the single runs' steps
# ------------------------------------------------------------------------------------------------


def _nbytes(tree: Any) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def _timed(fn, *inputs) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*inputs))
    return time.perf_counter() - t0


def _compile(fn, inputs: tuple, compiler_options: dict | None) -> tuple[Any, float]:
    t0 = time.perf_counter()
    compiled = fn.lower(*inputs).compile(compiler_options=compiler_options)
    return compiled, time.perf_counter() - t0


def _single_runs(
    criterion: str,
    args: argparse.Namespace,
    params: dict,
    x: jax.Array,
    y: jax.Array,
    compiler_options: dict | None,
    max_density: float | None,
) -> list[dict[str, Any]]:
    """One jitted NanoAdam step per density (a Python float), compiled, after its step 0."""
    runs = []
    for d in args.densities:
        tx = make_optimizer(d, criterion, args, max_density)
        state0 = tx.init(params)
        inputs0 = (params, state0, x, y)
        step, compile_s = _compile(
            jax.jit(functools.partial(_train_step, tx)), inputs0, compiler_options
        )
        p1, state1, _ = step(*inputs0)  # step 0: the first selection
        runs.append(
            {
                "step": step,
                "refresh_inputs": inputs0,
                "inputs": (p1, state1, x, y),
                "compile_seconds": compile_s,
                "state_bytes": _nbytes(state1),
            }
        )
    return runs


def measure_vmap_cost(
    criterion: str,
    args: argparse.Namespace,
    params: dict,
    x: jax.Array,
    y: jax.Array,
    compiler_options: dict | None = None,
) -> dict[str, Any]:
    """Time one step of the vmapped grid against the sum of one step of each single run.

    The single runs are what one would run on their own: ``nanoadam(density=d)`` with a Python
    float ``d`` (state sized for ``d``), each jitted on its own. The grid is the vmapped step of
    the training program (a traced density; every run's state sized by ``max_density``, the
    grid's largest density). Everything is compiled first (compile times recorded), takes its
    step-0 step (a refresh: the first selection), and is then timed, interleaved,
    ``--timing-repeats`` times on one batch from the state after that step. Step 1 has no
    refresh due (``mask_interval >= 2``), so the timed steps are ordinary steps: if the refresh
    conditional became a ``select`` under ``vmap`` (both branches run), every grid step would pay
    for a refresh.

    Also timed the same way: the single runs with the grid's state size (``max_density`` set:
    the same work per run as in the grid, so their ratio is the cost of ``vmap`` alone), the
    refresh step (from the initial state), and a control, the same model and grid with
    ``optax.adam`` (no selection), whose ratio is the cost of vmapping the model itself.

    Returns:
      A dict of medians over the repeats: ``ratio`` (grid step / sum of the single runs' steps),
      ``ratio_same_state``, ``adam_ratio``, ``refresh_ratio``, the times behind them, what a
      skipped refresh saves (refresh step minus ordinary step, grid and singles), compile times
      and state bytes.
    """
    densities = list(args.densities)
    grid_max = max(densities)
    singles = _single_runs(criterion, args, params, x, y, compiler_options, None)
    sized = _single_runs(criterion, args, params, x, y, compiler_options, grid_max)

    def grid_one(d, p, opt_state, xx, yy):
        return _train_step(make_optimizer(d, criterion, args, grid_max), p, opt_state, xx, yy)

    ds = jnp.asarray(densities, jnp.float32)
    grid_params = jax.tree.map(lambda a: jnp.broadcast_to(a, (len(densities), *a.shape)), params)
    grid_state0 = jax.jit(
        jax.vmap(lambda d: make_optimizer(d, criterion, args, grid_max).init(params))
    )(ds)
    grid_refresh_inputs = (ds, grid_params, grid_state0, x, y)
    grid, grid_compile_s = _compile(
        jax.jit(jax.vmap(grid_one, in_axes=(0, 0, 0, None, None))),
        grid_refresh_inputs,
        compiler_options,
    )
    gp1, grid_state1, _ = grid(*grid_refresh_inputs)
    grid_inputs = (ds, gp1, grid_state1, x, y)

    # Control: the same model and grid with optax.adam (no selection), vmapped over copies of
    # the parameters. Its ratio is what vmapping the model's forward and backward pass costs.
    adam = optax.adam(args.lr)
    adam_inputs = (params, adam.init(params), x, y)
    adam_grid_inputs = (grid_params, jax.vmap(lambda _: adam.init(params))(ds), x, y)
    adam_single, _ = _compile(
        jax.jit(functools.partial(_train_step, adam)), adam_inputs, compiler_options
    )
    adam_grid, _ = _compile(
        jax.jit(jax.vmap(functools.partial(_train_step, adam), in_axes=(0, 0, None, None))),
        adam_grid_inputs,
        compiler_options,
    )
    jax.block_until_ready((adam_single(*adam_inputs), adam_grid(*adam_grid_inputs)))

    keys = ("grid", "single", "sized", "adam_grid", "adam", "grid_refresh", "single_refresh")
    times: dict[str, list] = {k: [] for k in keys}
    for _ in range(args.timing_repeats):  # interleaved, so load changes hit all alike
        times["grid"].append(_timed(grid, *grid_inputs))
        times["single"].append(sum(_timed(r["step"], *r["inputs"]) for r in singles))
        times["sized"].append(sum(_timed(r["step"], *r["inputs"]) for r in sized))
        times["adam_grid"].append(_timed(adam_grid, *adam_grid_inputs))
        times["adam"].append(sum(_timed(adam_single, *adam_inputs) for _ in densities))
        times["grid_refresh"].append(_timed(grid, *grid_refresh_inputs))
        times["single_refresh"].append(
            sum(_timed(r["step"], *r["refresh_inputs"]) for r in singles)
        )
    t = {k: float(np.median(v)) for k, v in times.items()}
    ratio_same_state = t["grid"] / t["sized"]
    adam_ratio = t["adam_grid"] / t["adam"]
    return {
        "criterion": criterion,
        "densities": densities,
        "max_density": grid_max,
        "repeats": args.timing_repeats,
        "timed_step": 1,
        "refresh_due_in_timed_steps": args.mask_interval < 2,
        "fast_compile": bool(compiler_options),
        "vmapped_step_seconds": t["grid"],
        "sum_single_step_seconds": t["single"],
        "ratio": t["grid"] / t["single"],
        "sum_single_same_state_step_seconds": t["sized"],
        "ratio_same_state": ratio_same_state,
        "adam_vmapped_step_seconds": t["adam_grid"],
        "adam_sum_single_step_seconds": t["adam"],
        "adam_ratio": adam_ratio,
        "vmapped_refresh_step_seconds": t["grid_refresh"],
        "sum_single_refresh_step_seconds": t["single_refresh"],
        "refresh_ratio": t["grid_refresh"] / t["single_refresh"],
        # What skipping the refresh saves: a refresh step minus an ordinary step. If the cond
        # became a select under vmap, the grid's saving would be about zero.
        "vmapped_refresh_saving_seconds": t["grid_refresh"] - t["grid"],
        "sum_single_refresh_saving_seconds": t["single_refresh"] - t["single"],
        "vmapped_compile_seconds": grid_compile_s,
        "single_compile_seconds": [r["compile_seconds"] for r in singles],
        "sum_single_compile_seconds": float(sum(r["compile_seconds"] for r in singles)),
        "vmapped_state_bytes": _nbytes(grid_state1),
        "single_state_bytes": [r["state_bytes"] for r in singles],
        "sum_single_state_bytes": int(sum(r["state_bytes"] for r in singles)),
    }


def format_cost_table(cost: dict[str, Any]) -> str:
    """Markdown: the vmapped grid against the sum of the single runs (steps, compile, state)."""
    n = len(cost["densities"])

    def ms(x: float) -> str:
        return f"{1e3 * x:,.1f} ms"

    def kib(x: int) -> str:
        return f"{x / 1024:,.1f} KiB"

    top = cost["max_density"]
    rows = [
        ("ordinary step (no refresh due)", ms(cost["vmapped_step_seconds"]),
         ms(cost["sum_single_step_seconds"]), f"{cost['ratio']:.2f}x"),
        (f"ordinary step, single runs sized like the grid (max_density={top:g})",
         ms(cost["vmapped_step_seconds"]), ms(cost["sum_single_same_state_step_seconds"]),
         f"{cost['ratio_same_state']:.2f}x"),
        ("control: the same step with optax.adam", ms(cost["adam_vmapped_step_seconds"]),
         ms(cost["adam_sum_single_step_seconds"]), f"{cost['adam_ratio']:.2f}x"),
        ("refresh step (new selection)", ms(cost["vmapped_refresh_step_seconds"]),
         ms(cost["sum_single_refresh_step_seconds"]), f"{cost['refresh_ratio']:.2f}x"),
        ("compile", f"{cost['vmapped_compile_seconds']:.1f} s",
         f"{cost['sum_single_compile_seconds']:.1f} s",
         f"{cost['vmapped_compile_seconds'] / cost['sum_single_compile_seconds']:.2f}x"),
        ("optimizer state", kib(cost["vmapped_state_bytes"]), kib(cost["sum_single_state_bytes"]),
         f"{cost['vmapped_state_bytes'] / cost['sum_single_state_bytes']:.2f}x"),
    ]  # fmt: skip
    lines = [
        f"| criterion {cost['criterion']!r} | vmapped grid ({n} densities, one call) | "
        f"{n} single runs (sum) | grid / sum |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
        "",
        f"Medians of {cost['repeats']} interleaved repeats after compilation, on one batch; the "
        "ordinary step is step 1 (no refresh due). Single runs: `nanoadam(density=d)` with a "
        "Python float, state sized for `d`; the grid: a traced density, every run's state sized "
        f"for `max_density={top:g}` (so a small density's run gathers and scatters {top:g} of "
        "each chunk, padded: the second row gives the single runs that state size). The "
        "optax.adam control is the same model and grid without selection: its ratio is what "
        "vmapping the model's forward and backward pass costs. A refresh step of the grid costs "
        f"{ms(cost['vmapped_refresh_saving_seconds'])} more than an ordinary one (the single "
        f"runs: {ms(cost['sum_single_refresh_saving_seconds'])} in sum): the ordinary grid step "
        "skips the refresh, as a single run does (a refresh `select`ed under vmap would make "
        "the two cost the same)."
        + (" Compiled with XLA's backend optimisation off (--fast-compile): not representative."
           if cost["fast_compile"] else ""),
    ]  # fmt: skip
    return "\n".join(lines)


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

    # What the optimizer trains and stores: the full plan at the smallest density, then the
    # trained entries at each density (every run's state is sized for the largest).
    grid_max = max(args.densities)
    plans = {
        d: nanoadam.plan(params, density=d, max_density=grid_max, show=False)
        for d in args.densities
    }
    plan = show_plan(
        params,
        f"NanoAdam's plan at density {min(args.densities):g}, state sized for max_density="
        f"{grid_max:g} (the grid's largest density):",
        density=min(args.densities),
        max_density=grid_max,
    )
    per_density = [
        {"density": d, "trained_entries": sum(leaf.trained for leaf in p.leaves)}
        for d, p in plans.items()
    ]
    print(
        "Entries trained per step, by density: "
        + ", ".join(f"{r['density']:g}: {r['trained_entries']:,}" for r in per_density)
        + f" (of {plan['total_entries']:,}); state per run {plan['state_bytes'] / 1024:,.1f} KiB "
        f"(optax.adamw: {plan['adamw_bytes'] / 1024:,.1f} KiB)."
    )
    options = {"xla_backend_optimization_level": 0} if args.fast_compile else None

    runs: dict[str, Any] = {}
    for criterion in args.criteria:
        bar = progress(total=args.steps, desc=f"{criterion:>8}", enabled=not args.no_progress)

        def on_step(i, bar=bar):
            bar.update(int(i) + 1 - bar.n)

        program, trace_count = make_program(criterion, args, on_step)
        inputs = (densities, params, xb, yb, new_x, old_x, test_y)
        n_compiles = len(_COMPILE_LOG)
        t0 = time.perf_counter()
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

    cost = None
    if args.timing_repeats:
        criterion = "smallest" if "smallest" in args.criteria else args.criteria[0]
        print(f"\nTiming one vmapped grid step against the {len(args.densities)} single runs...")
        cost = measure_vmap_cost(criterion, args, params, xb[0], yb[0], options)
        print(
            f"grid step {1e3 * cost['vmapped_step_seconds']:.1f} ms vs single runs' steps "
            f"{1e3 * cost['sum_single_step_seconds']:.1f} ms in sum: {cost['ratio']:.2f}x; with "
            f"the grid's state size {cost['ratio_same_state']:.2f}x, optax.adam control "
            f"{cost['adam_ratio']:.2f}x."
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
        "plan": {**plan, "max_density": grid_max, "per_density": per_density},
        "vmap_cost": cost,
        "wall_seconds": None,
    }
    table = format_table(results)
    if cost is not None:
        table += "\n\n" + format_cost_table(cost)
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
