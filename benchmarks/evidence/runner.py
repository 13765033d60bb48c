"""Vmapped training of many runs in one compiled call, and the on-disk cache of finished runs."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nanoadam_jax as nanoadam
from benchmarks.evidence.settings import Settings, Variant
from benchmarks.evidence.tasks.base import Task
from benchmarks.evidence.tasks.text import load_text_task
from benchmarks.evidence.tasks.vision import load_vision_task


def batch_indices(num_train: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """``(steps, batch_size)`` training indices: shuffled epochs, fixed by ``seed``."""
    rng = np.random.default_rng(1000 + seed)
    need = steps * batch_size
    order = np.concatenate([rng.permutation(num_train) for _ in range(-(-need // num_train))])
    return order[:need].reshape(steps, batch_size)


def _fraction_changed(params, init, labels) -> jax.Array:
    changed = total = 0
    for p, q, lab in zip(jax.tree.leaves(params), jax.tree.leaves(init), jax.tree.leaves(labels)):
        if lab == nanoadam.SPARSE:
            changed = changed + jnp.sum(p != q)
            total += p.size
    return changed / max(total, 1)


def make_grid_fn(task: Task, variant: Variant, max_density: float | None) -> Callable:
    """Jitted ``(lrs, seeds, densities, batch_idx, params, data) -> metrics``.

    Vmapped over the runs (the first four arguments); ``params`` and ``data`` are shared.
    The density is traced: ``max_density`` sizes NanoAdam's state.
    """
    labels = task.body_labels()

    def one(lr, seed, density, idx, params, data):
        p0 = task.init(params, seed)
        tx = variant.make(lr, density, seed, task.steps, max_density)
        inputs, y = data["train"]

        def step(carry, i):
            p, o = carry
            batch = tuple(a[i] for a in inputs)
            loss, g = jax.value_and_grad(task.loss)(p, data["frozen"], batch, y[i])
            u, o = tx.update(g, o, p)
            return (optax.apply_updates(p, u), o), loss

        (p, _), losses = jax.lax.scan(step, (p0, tx.init(p0)), idx)
        accs = task.accuracies(p, data["frozen"], *data["eval"])
        return {"losses": losses, "acc": accs, "changed": _fraction_changed(p, p0, labels)}

    return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, None, None)))


def _compile(fn: Callable, args: tuple, s: Settings) -> Callable:
    """Ahead-of-time compile the jitted ``fn`` for ``args`` with the settings' XLA options."""
    return fn.trace(*args).lower().compile(compiler_options=dict(s.compiler_options))


_LIBRARY_HASH: str | None = None


def library_hash() -> str:
    """sha256 of the library's code: every ``nanoadam_jax/**/*.py`` (path and contents, sorted
    by path) of the imported package. Computed once per process.

    Part of every cached run's key: a run made with other library code is never reused.
    """
    global _LIBRARY_HASH
    if _LIBRARY_HASH is None:
        root = Path(nanoadam.__file__).resolve().parent
        h = hashlib.sha256()
        for f in sorted(root.rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode() + b"\0")
            h.update(f.read_bytes() + b"\0")
        _LIBRARY_HASH = h.hexdigest()
    return _LIBRARY_HASH


def _key_prefix() -> str:
    return f"lib={library_hash()[:16]}|"


class RunCache:
    """A results folder's ``runs.json``: finished runs keyed by what they computed.

    Every key starts with ``lib=<first 16 hex digits of library_hash()>|``. Only the runs of
    the current library code are readable (:attr:`runs`); the others (and the keys of the old
    hand-bumped ``CACHE_VERSION`` scheme) stay in the file, under their own keys, but are
    never read.
    """

    def __init__(self, path: Path):
        self.path = path
        self.runs: dict[str, dict[str, Any]] = {}
        self.other: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for k, v in json.loads(path.read_text()).items():
                (self.runs if k.startswith(_key_prefix()) else self.other)[k] = v

    @staticmethod
    def key(*parts: str) -> str:
        return _key_prefix() + "|".join(parts)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({**self.other, **self.runs}) + "\n")
        tmp.replace(self.path)  # atomic: an interrupted write never corrupts the cache


class Runner:
    """Runs (task, variant, lr, seed, density) points, caching every finished run on disk."""

    def __init__(self, settings: Settings, out: Path, progress: bool = True):
        self.s = settings
        self.out = out
        self.progress = progress
        self.store = RunCache(out / "runs.json")
        self.cache_path = self.store.path
        self.cache = self.store.runs  # the runs of the current library code only
        self.tasks: dict[str, Task] = {}
        self.fns: dict[tuple[str, str], Callable] = {}
        self.compile_log: list[dict[str, Any]] = []
        self.used: set[str] = set()  # keys of the runs read since the last reset

    def task(self, name: str) -> Task:
        if name not in self.tasks:
            self.tasks[name] = (
                load_vision_task(self.s) if name == "vision" else load_text_task(self.s)
            )
        return self.tasks[name]

    def run_key(self, task: Task, variant: Variant, lr: float, seed: int, density: float) -> str:
        d = 1.0 if variant.method == "adamw" else density
        sig = json.dumps(task.signature, sort_keys=True)
        return RunCache.key(
            task.name, sig, variant.key, f"lr={lr:.6g}", f"seed={seed}", f"d={d:.6g}"
        )

    def runs(
        self,
        task_name: str,
        variant: Variant,
        lrs: Sequence[float],
        densities: Sequence[float] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[dict[str, Any]]:
        """All (lr, seed, density) runs of ``variant`` (``seeds``: default the settings');
        computes those not in the cache."""
        task = self.task(task_name)
        if variant.method == "adamw":
            densities = (1.0,)
        elif densities is None:
            densities = (self.s.densities[0],)
        seeds = self.s.seeds if seeds is None else seeds
        points = [(lr, seed, d) for d in densities for lr in lrs for seed in seeds]
        keys = [self.run_key(task, variant, *p) for p in points]
        todo = [p for p, k in zip(points, keys) if k not in self.cache]
        chunk = task.vmap_chunk
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            self._compute(task, variant, part + [part[-1]] * (chunk - len(part)), len(part))
        self.used.update(keys)
        return [self.cache[k] for k in keys]

    def _compute(self, task: Task, variant: Variant, points, n_real: int) -> None:
        fkey = (task.name, variant.key)
        lrs = jnp.asarray([p[0] for p in points], jnp.float32)
        seeds = jnp.asarray([p[1] for p in points], jnp.int32)
        dens = jnp.asarray([p[2] for p in points], jnp.float32)
        n_train = len(task.train[1])
        idx = jnp.asarray(
            np.stack([batch_indices(n_train, task.steps, task.batch_size, p[1]) for p in points])
        )
        args = (lrs, seeds, dens, idx, task.params, task.data())
        label = f"{task.name} {variant.key}: {n_real} runs x {task.steps} steps"
        if self.progress:
            print(f"  running {label} ...", end="", flush=True)
        w0, c0 = time.perf_counter(), time.process_time()
        if fkey not in self.fns:
            fn = make_grid_fn(task, variant, max(self.s.densities))
            self.fns[fkey] = _compile(fn, args, self.s)
        out = jax.device_get(self.fns[fkey](*args))
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if self.progress:
            print(f" {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
        self.compile_log.append(
            {"call": label, "wall_s": wall, "cpu_s": cpu, "runs_in_call": len(points)}
        )
        stride = max(1, task.steps // self.s.curve_points)
        for i, (lr, seed, d) in enumerate(points[:n_real]):
            losses = np.asarray(out["losses"][i], np.float64)
            tail = losses[-max(1, task.steps // 10) :]
            self.cache[self.run_key(task, variant, lr, seed, d)] = {
                "task": task.name,
                "variant": variant.key,
                "lr": float(lr),
                "seed": int(seed),
                "density": None if variant.method == "adamw" else float(d),
                "val_acc": float(out["acc"]["val"][i]),
                "test_acc": float(out["acc"]["new"][i]),
                "old_task_acc": float(out["acc"]["old"][i]) if "old" in out["acc"] else None,
                "final_loss": float(np.mean(tail)) if np.all(np.isfinite(tail)) else None,
                "diverged": bool(not np.all(np.isfinite(losses))),
                "body_changed_fraction": float(out["changed"][i]),
                "loss_curve": [round(float(x), 5) for x in losses[::stride]],
                "call_wall_s_per_run_step": wall / (len(points) * task.steps),
                "call_cpu_s_per_run_step": cpu / (len(points) * task.steps),
                "library_hash": library_hash(),
            }
        self.store.save()

    def base_accuracy(self, task_name: str) -> dict[str, float]:
        """Accuracies of the pretrained model before fine-tuning (vision only: the text head
        is new)."""
        task = self.task(task_name)
        inputs, labels = task.data()["eval"]
        accs = jax.jit(task.accuracies)(task.params, task.frozen, inputs, labels)
        return {k: float(v) for k, v in accs.items()}
