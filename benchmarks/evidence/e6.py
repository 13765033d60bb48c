"""E6 (opt-in): the whole MiniLM-L6 fine-tuned on the full Rotten Tomatoes training split.

Closer to the paper's GLUE runs than the text task of e1-e5: all 6 encoder layers (and the
embedding tables) are trained, on every review of a fixed training split, for ``epochs`` full
epochs at batch 32. Arms:

* ``adamw``: ``optax.adamw`` (weight decay 1e-4, as everywhere in the evidence);
* ``nanoadam d=0.1``: ``nanoadam_jax.nanoadam`` at constant density 0.1;
* ``nanoadam 10%->4%``: the paper's linear density decay, ``linear_density_decay(0.1, 0.04, T,
  density_interval)``.

NanoAdam's ``mask_interval`` is about ``T / 200`` and the density interval about ``T / 40`` (the
paper's GLUE settings relative to the run length ``T``). Protocol: each arm runs its learning-rate
grid on the sweep seed(s) (``sweep_seeds``, default seed 0); the LR with the best final
validation accuracy is that arm's best; the other seeds then run at that LR only, and the test
accuracy is reported over all seeds at the best LR (mean, sample std and standard error). This
keeps the experiment at ``arms x (LRs + seeds - 1)`` runs instead of ``arms x LRs x seeds``.

Forgetting: a 5-topic BBC News head is fitted on the frozen *pretrained* encoder's features
before fine-tuning (logistic regression, as E5 on the text task) and kept frozen; after
fine-tuning it is applied to the fine-tuned encoder on held-out articles, and the drop in its
accuracy is the forgetting.

Runs are not vmapped (one 22.7M-parameter model at a time); each finished run is cached in
``runs.json`` keyed by the settings and the library's code hash, so an interrupted invocation
resumes at the first unfinished run. Progress lines are printed at every evaluation. Outputs:
``e6.json``, ``e6.md``, ``e6.png`` (validation accuracy vs step, at each arm's best LR).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import assets
from flax import nnx

import nanoadam_jax as nanoadam
from benchmarks.evidence.plots import _plt
from benchmarks.evidence.runner import RunCache, batch_indices, library_hash
from benchmarks.evidence.settings import ADAMW_WEIGHT_DECAY, FULL, SPLIT_SEED
from benchmarks.evidence.stats import mean_std

ASSETS = ("minilm", "rotten_tomatoes", "bbc_news")
#: Avoids a copy of each weight before the optimizer's in-place scatter (XLA CPU).
COPY_INSERTION = (("xla_cpu_copy_insertion_use_region_analysis", True),)


@dataclasses.dataclass(frozen=True)
class E6Settings:
    seeds: tuple[int, ...] = (0, 1, 2)
    sweep_seeds: tuple[int, ...] = (0,)  # the seeds the LR is chosen on (validation)
    layers: int = 6
    seq_len: int = 48
    batch_size: int = 32
    epochs: int = 1
    val_examples: int = 800
    test_examples: int = 1500
    train_examples: int = 0  # 0: every review not in validation or test
    train_word_embeddings: bool = True
    adamw_lrs: tuple[float, ...] = (2e-5, 5e-5, 1e-4)
    nanoadam_lrs: tuple[float, ...] = (1e-4, 2e-4, 5e-4)
    density: float = 0.1
    decay: tuple[float, float] = (0.1, 0.04)
    mask_fraction: float = 1 / 200  # mask_interval = round(T * this)
    density_fraction: float = 1 / 40  # density interval = round(T * this)
    eval_points: int = 10  # validation evaluations per run (the learning curve)
    eval_batch: int = 100
    bbc_examples: int = 400
    bbc_train_examples: int = 800
    bbc_head_steps: int = 300
    bbc_seq_len: int = 128
    compiler_options: tuple[tuple[str, Any], ...] = COPY_INSERTION

    def signature(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("seeds", "sweep_seeds", "adamw_lrs", "nanoadam_lrs", "compiler_options"):
            d.pop(k)  # which runs are made, not what a run computes
        return d


E6 = E6Settings()
E6_SMOKE = E6Settings(
    seeds=(0, 1),
    layers=0,
    train_word_embeddings=False,  # (selection over its 11.7M entries: slow to compile at -O0)
    seq_len=16,
    batch_size=8,
    val_examples=16,
    test_examples=16,
    train_examples=48,
    adamw_lrs=(1e-4, 1e-3),
    nanoadam_lrs=(1e-3,),
    eval_points=2,
    eval_batch=16,
    bbc_examples=16,
    bbc_train_examples=40,
    bbc_head_steps=20,
    bbc_seq_len=16,
    compiler_options=(*COPY_INSERTION, ("xla_backend_optimization_level", 0)),
)


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    method: str  # "adamw" | "nanoadam" | "decay"

    def lrs(self, s: E6Settings) -> tuple[float, ...]:
        return s.adamw_lrs if self.method == "adamw" else s.nanoadam_lrs

    def make(self, lr, s: E6Settings, steps: int) -> optax.GradientTransformation:
        if self.method == "adamw":
            return optax.adamw(lr, weight_decay=ADAMW_WEIGHT_DECAY)
        m, d = intervals(s, steps)
        density = (
            s.density
            if self.method == "nanoadam"
            else nanoadam.linear_density_decay(*s.decay, decay_steps=steps, density_interval=d)
        )
        return nanoadam.nanoadam(lr, density=density, mask_interval=m)


def arms(s: E6Settings) -> tuple[Arm, ...]:
    lo, hi = (f"{100 * x:g}%" for x in s.decay)
    return (
        Arm("adamw", "adamw"),
        Arm(f"nanoadam d={s.density:g}", "nanoadam"),
        Arm(f"nanoadam {lo}->{hi}", "decay"),
    )


def intervals(s: E6Settings, steps: int) -> tuple[int, int]:
    """NanoAdam's ``mask_interval`` and density interval for a run of ``steps`` steps."""
    return max(1, round(steps * s.mask_fraction)), max(1, round(steps * s.density_fraction))


# ------------------------------------------------------------------------------------------------
# Data and model
# ------------------------------------------------------------------------------------------------


class Problem:
    """Tokenized splits, the pretrained parameters, the frozen BBC head and compiled functions."""

    def __init__(self, s: E6Settings, progress: bool):
        from common.minilm import MiniLMClassifier, MiniLMTokenizer

        from benchmarks.evidence.tasks.text import _bbc_old_task

        self.s = s
        texts, labels = assets.load_rotten_tomatoes()
        perm = np.random.default_rng(SPLIT_SEED).permutation(len(texts))
        val, test = perm[: s.val_examples], perm[s.val_examples : s.val_examples + s.test_examples]
        train = perm[s.val_examples + s.test_examples :]
        if s.train_examples:
            train = train[: s.train_examples]
        train, val, test = np.sort(train), np.sort(val), np.sort(test)
        ids, mask = MiniLMTokenizer(max_length=s.seq_len)(texts)
        self.splits = {k: (ids[i], mask[i], labels[i]) for k, i in
                       (("train", train), ("val", val), ("test", test))}  # fmt: skip
        self.steps = s.epochs * (len(train) // s.batch_size)
        model = MiniLMClassifier.from_pretrained(num_classes=2, num_layers=s.layers)
        self.graphdef, state = nnx.split(model, nnx.Param)
        self.params = jax.tree.map(jnp.asarray, nnx.to_pure_dict(state))
        self.frozen: dict[str, Any] = {}
        if not s.train_word_embeddings:
            emb = self.params["encoder"]["embeddings"]
            self.frozen = {"word_embeddings": emb.pop("word_embeddings")}
        old = dataclasses.replace(
            FULL,
            text_seq_len=s.bbc_seq_len,
            text_old_examples=s.bbc_examples,
            text_old_train_examples=s.bbc_train_examples,
            text_old_head_steps=s.bbc_head_steps,
        )
        (bbc_inputs, self.bbc_labels), self.bbc_head, self.bbc_info = _bbc_old_task(old, model)
        self.bbc_inputs = bbc_inputs[:2]
        self.info = {
            "train": len(train),
            "val": len(val),
            "test": len(test),
            "reviews": len(texts),
            "majority_test": float(max(np.mean(labels[test]), 1 - np.mean(labels[test]))),
            "steps": self.steps,
            "mask_interval": intervals(s, self.steps)[0],
            "density_interval": intervals(s, self.steps)[1],
            "trained_parameters": int(sum(x.size for x in jax.tree.leaves(self.params))),
            "bbc": self.bbc_info,
        }
        self.fns: dict[str, Callable] = {}
        self.predict = jax.jit(self._predict)
        self.bbc_predict = jax.jit(self._bbc_predict)

    def model(self, params):
        p = params
        if self.frozen:
            emb = {**p["encoder"]["embeddings"], "word_embeddings": self.frozen["word_embeddings"]}
            p = {**p, "encoder": {**p["encoder"], "embeddings": emb}}
        return nnx.merge(self.graphdef, p)

    def init(self, seed: int) -> dict[str, Any]:
        head = self.params["head"]
        kernel = 0.02 * jax.random.normal(jax.random.PRNGKey(seed), head["kernel"].shape)
        return {**self.params, "head": {"kernel": kernel, "bias": jnp.zeros_like(head["bias"])}}

    def loss(self, params, ids, mask, labels):
        logits = self.model(params)(ids, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def _predict(self, params, ids, mask):
        return jnp.argmax(self.model(params)(ids, mask), -1)

    def _bbc_predict(self, params, ids, mask):
        feats = self.model(params).encoder.embed(ids, mask)
        return jnp.argmax(feats @ self.bbc_head["kernel"] + self.bbc_head["bias"], -1)

    def accuracy(self, fn, params, ids, mask, labels) -> float:
        b = self.s.eval_batch
        n = len(labels)
        pad = -n % b
        ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)])
        mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), mask.dtype)])
        preds = np.concatenate([np.asarray(fn(params, ids[i : i + b], mask[i : i + b]))
                                for i in range(0, len(ids), b)])  # fmt: skip
        return float(np.mean(preds[:n] == labels))

    def train_step(self, arm: Arm, params, opt_state, lr, batch) -> Callable:
        """The compiled step of ``arm`` (the learning rate is an argument: one compilation)."""
        if arm.name not in self.fns:

            def step(p, o, lr, ids, mask, y):
                tx = arm.make(lr, self.s, self.steps)
                loss, g = jax.value_and_grad(self.loss)(p, ids, mask, y)
                u, o = tx.update(g, o, p)
                return optax.apply_updates(p, u), o, loss

            jitted = jax.jit(step, donate_argnums=(0, 1))
            lowered = jitted.trace(params, opt_state, lr, *batch).lower()
            self.fns[arm.name] = lowered.compile(compiler_options=dict(self.s.compiler_options))
        return self.fns[arm.name]


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------


def train_run(pb: Problem, arm: Arm, lr: float, seed: int, log: Callable[[str], None]) -> dict:
    s, T = pb.s, pb.steps
    params = jax.tree.map(jnp.copy, pb.init(seed))  # the step donates its parameters
    tx = arm.make(lr, s, T)
    opt_state = tx.init(params)
    ids, mask, y = pb.splits["train"]
    idx = batch_indices(len(y), T, s.batch_size, seed)
    evals = sorted({max(1, round(T * i / s.eval_points)) for i in range(1, s.eval_points + 1)})
    lr_arr = jnp.asarray(lr, jnp.float32)
    c0 = time.perf_counter()
    fn = pb.train_step(arm, params, opt_state, lr_arr, (ids[idx[0]], mask[idx[0]], y[idx[0]]))
    compile_s = time.perf_counter() - c0
    losses, step_s, curve, eval_s = [], [], [], []
    t_start = time.perf_counter()
    for t in range(T):
        b = idx[t]
        w0 = time.perf_counter()
        params, opt_state, loss = fn(params, opt_state, lr_arr, ids[b], mask[b], y[b])
        losses.append(float(loss))  # blocks: the step's time is its own
        step_s.append(time.perf_counter() - w0)
        if t + 1 in evals:
            e0 = time.perf_counter()
            acc = pb.accuracy(pb.predict, params, *pb.splits["val"])
            eval_s.append(time.perf_counter() - e0)
            curve.append([t + 1, acc])
            done = time.perf_counter() - t_start
            log(
                f"    {arm.name} lr={lr:g} seed={seed}: step {t + 1}/{T}, loss "
                f"{np.mean(losses[-max(1, T // s.eval_points) :]):.4f}, val {100 * acc:.2f}% "
                f"({done:.0f} s, about {done / (t + 1) * (T - t - 1) / 60:.1f} min left)"
            )
    e0 = time.perf_counter()
    test = pb.accuracy(pb.predict, params, *pb.splits["test"])
    bbc = pb.accuracy(pb.bbc_predict, params, *pb.bbc_inputs, pb.bbc_labels)
    final_eval_s = time.perf_counter() - e0
    ls = np.asarray(losses)
    stride = max(1, T // 100)
    return {
        "arm": arm.name,
        "lr": float(lr),
        "seed": int(seed),
        "steps": T,
        "val_acc": curve[-1][1],
        "test_acc": test,
        "bbc_acc": bbc,
        "val_curve": curve,
        "loss_curve": [round(float(x), 5) for x in ls[::stride]],
        "final_loss": float(np.mean(ls[-max(1, T // 10) :])),
        "diverged": bool(not np.all(np.isfinite(ls))),
        "compile_s": compile_s,
        "s_per_step_median": statistics.median(step_s[1:] or step_s),
        "s_per_val_eval_median": statistics.median(eval_s),
        "final_eval_s": final_eval_s,
        "wall_s": time.perf_counter() - t_start,
        "library_hash": library_hash(),
    }


def _stats(xs: list[float]) -> dict[str, float]:
    m, sd = mean_std(xs)
    return {"mean": m, "std": sd, "se": sd / math.sqrt(len(xs)), "n": len(xs)}


def _pm(st: dict[str, float], scale: float = 100) -> str:
    return f"{scale * st['mean']:.2f} ± {scale * st['se']:.2f}"


def run_e6(s: E6Settings, out: Path, progress: bool = True) -> dict[str, Any]:
    """All runs of E6 (cached in ``out / "runs.json"``); returns the results (and a figure)."""

    def log(msg: str) -> None:
        if progress:
            print(msg, flush=True)

    pb = Problem(s, progress)
    cache = RunCache(out / "runs.json")
    sig = json.dumps(s.signature(), sort_keys=True)

    def get(arm: Arm, lr: float, seed: int) -> dict[str, Any]:
        key = RunCache.key("e6", sig, arm.name, f"lr={lr:.6g}", f"seed={seed}")
        if key not in cache.runs:
            log(f"  [e6] {arm.name} lr={lr:g} seed={seed}: {pb.steps} steps ...")
            cache.runs[key] = train_run(pb, arm, lr, seed, log)
            cache.save()
        return cache.runs[key]

    before = {"bbc": pb.accuracy(pb.bbc_predict, pb.init(0), *pb.bbc_inputs, pb.bbc_labels)}
    log(
        f"  [e6] {pb.info['train']} training reviews, {pb.steps} steps per run, mask_interval "
        f"{pb.info['mask_interval']}, density interval {pb.info['density_interval']}; BBC News "
        f"before fine-tuning {100 * before['bbc']:.2f}%"
    )
    results: dict[str, Any] = {"arms": {}}
    used: list[dict[str, Any]] = []
    for arm in arms(s):
        sweep = {lr: [get(arm, lr, seed) for seed in s.sweep_seeds] for lr in arm.lrs(s)}
        val = {lr: float(np.mean([r["val_acc"] for r in rs])) for lr, rs in sweep.items()}
        best = max(val, key=lambda lr: (val[lr], -lr))  # ties: the smaller LR
        runs = [get(arm, best, seed) for seed in s.seeds]
        used += [r for rs in sweep.values() for r in rs] + runs
        results["arms"][arm.name] = {
            "lrs": list(arm.lrs(s)),
            "sweep_val": {f"{lr:g}": v for lr, v in val.items()},
            "sweep_test": {
                f"{lr:g}": float(np.mean([r["test_acc"] for r in rs])) for lr, rs in sweep.items()
            },
            "best_lr": best,
            "test": _stats([r["test_acc"] for r in runs]),
            "val": _stats([r["val_acc"] for r in runs]),
            "bbc_after": _stats([r["bbc_acc"] for r in runs]),
            "forgetting": _stats([before["bbc"] - r["bbc_acc"] for r in runs]),
            "s_per_step": statistics.median(r["s_per_step_median"] for r in runs),
            "s_per_val_eval": statistics.median(r["s_per_val_eval_median"] for r in runs),
            "curves": [r["val_curve"] for r in runs],
        }
    results.update(before=before, info=pb.info)
    results["markdown"] = _markdown(s, results)
    results["figure"] = _figure(s, results)
    uniq = {json.dumps([r["arm"], r["lr"], r["seed"]]): r for r in used}
    results["runs"] = list(uniq.values())
    return results


def _markdown(s: E6Settings, res: dict[str, Any]) -> str:
    info, before = res["info"], res["before"]
    n = len(s.seeds)
    lines = [
        f"all-MiniLM-L6-v2, all {s.layers} layers trained"
        + (" (word-embedding table included)" if s.train_word_embeddings else "")
        + f", {info['trained_parameters']:,} parameters, new 2-class head; Rotten Tomatoes: "
        f"{info['train']:,} training / {info['val']} validation / {info['test']} test reviews "
        f"(fixed split, seed {SPLIT_SEED}; majority class {100 * info['majority_test']:.1f}%), "
        f"sequence length {s.seq_len}, {s.epochs} epoch(s) at batch {s.batch_size} = "
        f"{info['steps']} steps, constant learning rate. NanoAdam: mask_interval "
        f"{info['mask_interval']} (about T/200), density interval {info['density_interval']} "
        f"(about T/40). Best LR per arm on the validation accuracy of seed(s) "
        f"{', '.join(map(str, s.sweep_seeds))}; then {n} seeds at that LR. Test accuracy and BBC "
        "News forgetting: mean ± standard error over the seeds. BBC News: a 5-topic head fitted "
        f"on the frozen pretrained encoder ({info['bbc']['train']} articles, sequence length "
        f"{s.bbc_seq_len}), kept frozen, evaluated on {info['bbc']['test']} held-out articles: "
        f"{100 * before['bbc']:.2f}% before fine-tuning.",
        "",
        "| arm | LRs (val. acc. %, sweep seed) | best LR | test acc. (%) | BBC News after (%) | "
        "forgetting (pts) | s / step | s / val. eval |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, a in res["arms"].items():
        sweep = ", ".join(f"{lr}: {100 * v:.1f}" for lr, v in a["sweep_val"].items())
        lines.append(
            f"| {name} | {sweep} | {a['best_lr']:g} | {_pm(a['test'])} | {_pm(a['bbc_after'])} | "
            f"{_pm(a['forgetting'])} | {a['s_per_step']:.2f} | {a['s_per_val_eval']:.1f} |"
        )
    lines.append("")
    ref = res["arms"]["adamw"]
    for name, a in res["arms"].items():
        if name == "adamw":
            continue
        diff = a["test"]["mean"] - ref["test"]["mean"]
        se = math.hypot(a["test"]["se"], ref["test"]["se"])
        lines.append(
            f"- {name} vs AdamW: test {100 * diff:+.2f} pts "
            f"({abs(diff) / se if se else math.inf:.1f} standard errors); forgetting "
            f"{100 * a['forgetting']['mean']:.2f} vs {100 * ref['forgetting']['mean']:.2f} pts."
        )
    return "\n".join(lines)


def _figure(s: E6Settings, res: dict[str, Any]):
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, a) in enumerate(res["arms"].items()):
        steps = [p[0] for p in a["curves"][0]]
        accs = np.array([[100 * p[1] for p in c] for c in a["curves"]])
        m = accs.mean(0)
        se = accs.std(0, ddof=1) / math.sqrt(len(accs)) if len(accs) > 1 else 0 * m
        a1.plot(steps, m, "-o", ms=3, color=f"C{i}", label=f"{name} (lr {a['best_lr']:g})")
        a1.fill_between(steps, m - se, m + se, color=f"C{i}", alpha=0.2)
    a1.set(xlabel="step", ylabel="validation accuracy (%)", title="Rotten Tomatoes, at best LR")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    names = list(res["arms"])
    x = np.arange(len(names))
    for j, (key, lab) in enumerate((("test", "Rotten Tomatoes test"), ("bbc_after", "BBC after"))):
        v = [100 * res["arms"][k][key]["mean"] for k in names]
        e = [100 * res["arms"][k][key]["se"] for k in names]
        rects = a2.bar(x + (j - 0.5) * 0.38, v, 0.38, yerr=e, capsize=3, label=lab, color=f"C{j}")
        a2.bar_label(rects, fmt="%.1f", fontsize=7, padding=2)
    a2.axhline(100 * res["before"]["bbc"], color="C7", ls="--", label="BBC before")
    a2.set_xticks(x, names, fontsize=8)
    a2.set(ylabel="accuracy (%)", ylim=(0, 105), title="Test accuracy and forgetting (± s.e.)")
    a2.legend(fontsize=8, loc="lower left")
    fig.suptitle(f"E6: MiniLM-L6 on Rotten Tomatoes, {len(s.seeds)} seeds")
    fig.tight_layout()
    return fig
