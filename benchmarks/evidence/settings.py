"""Settings of the evidence runs (:class:`Settings`, :class:`Sweep`), the optimizer
configurations (:class:`Variant`) and the package's constants."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import optax

import nanoadam_jax as nanoadam

REPO = Path(__file__).resolve().parents[2]

DEFAULT_OUT = REPO / "benchmarks" / "results" / "evidence"
DEFAULT_OUT_TEXT = REPO / "benchmarks" / "results" / "evidence-text"
EXPERIMENTS = ("e1", "e2", "e3", "e4", "e5", "text")
#: Opt-in experiments (not in ``all``), each run alone into its own results folder.
OPT_IN = ("e3long", "e6")
OPT_IN_OUT = {
    "e3long": REPO / "benchmarks" / "results" / "evidence-long",
    "e6": REPO / "benchmarks" / "results" / "e6",
}
TASKS = ("vision", "text")
VISION_ASSETS = ("mnist_cnn", "mnist")
TEXT_ASSETS = ("minilm", "rotten_tomatoes")
OLD_TEXT_ASSETS = ("bbc_news",)  # the old task of --task text
ADAMW_WEIGHT_DECAY = 1e-4  # optax.adamw's default
SPLIT_SEED = 0
#: ``Variant.bias_correction`` values and their suffix in a variant's key (``True`` and
#: ``"per_entry"`` are the same, the library's default: no suffix).
BIAS_CORRECTIONS: dict[bool | str, str] = {
    True: "",
    "per_entry": "",
    "global": "-bcglobal",
    "gradient": "-bcgrad",
    False: "-nobc",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of a run. :data:`FULL` is the default run, :data:`SMOKE` the ``--smoke`` run."""

    seeds: tuple[int, ...] = (0, 1, 2)
    # vision
    steps: int = 200
    batch_size: int = 32
    train_examples: int = 2000
    val_examples: int = 500
    test_examples: int = 1000
    lr_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    densities: tuple[float, ...] = (0.1, 0.01)  # the first is the default density
    mask_interval: int = 100  # the library default
    mask_intervals: tuple[int, ...] = (5, 20, 100)  # e3 (plus a static mask)
    e3_lr_neighbours: int = 1  # e3: best LR of the default +- this many grid points
    matched_thresholds: tuple[float, ...] = (0.8, 0.9, 0.95)  # e5: equal new-task accuracy
    reach: float = 0.9  # e4: which LRs reach this validation accuracy
    vmap_chunk: int = 9  # runs per compiled call (padded): one compilation per configuration
    timing_steps: int = 25
    timing_rounds: int = 4
    # text
    text_layers: int = 2
    text_seq_len: int = 32
    text_steps: int = 100
    text_batch_size: int = 16
    text_train_examples: int = 2000
    text_val_examples: int = 300
    text_test_examples: int = 1000
    text_lr_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3)
    text_mask_interval: int = 20
    text_vmap_chunk: int = 3
    # text, used by --task text only (e2-e5 on the text task)
    text_old_examples: int = 0  # held-out BBC News articles (the old task); 0: no old task
    text_old_train_examples: int = 800  # BBC articles the frozen old-task head is fitted on
    text_old_head_steps: int = 300  # full-batch Adam steps of that fit
    text_mask_intervals: tuple[int, ...] = (5, 20, 50)
    text_matched_thresholds: tuple[float, ...] = (0.6, 0.65, 0.7)
    text_reach: float = 0.7
    curve_points: int = 40
    # XLA options of every compilation; --smoke compiles at -O0 (half the compile time of the
    # default, twice the run time: right for a few steps).
    compiler_options: tuple[tuple[str, Any], ...] = ()

    def vision_signature(self) -> dict[str, Any]:
        keys = ("steps", "batch_size", "train_examples", "val_examples", "test_examples")
        return {k: getattr(self, k) for k in keys}

    def text_signature(self) -> dict[str, Any]:
        keys = (
            "text_layers",
            "text_seq_len",
            "text_steps",
            "text_batch_size",
            "text_train_examples",
            "text_val_examples",
            "text_test_examples",
        )
        if self.text_old_examples:  # absent otherwise: the runs cached before it stay valid
            keys += ("text_old_examples", "text_old_train_examples", "text_old_head_steps")
        return {k: getattr(self, k) for k in keys}

    def sweep(self, task: str) -> Sweep:
        """What the experiments read for ``task``: steps, LR grid and mask intervals."""
        if task == "vision":
            return Sweep(
                task,
                self.steps,
                self.lr_grid,
                self.mask_interval,
                self.mask_intervals,
                self.matched_thresholds,
                self.reach,
            )
        return Sweep(
            task,
            self.text_steps,
            self.text_lr_grid,
            self.text_mask_interval,
            self.text_mask_intervals,
            self.text_matched_thresholds,
            self.text_reach,
        )


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One task's view of :class:`Settings` (see :meth:`Settings.sweep`)."""

    task: str  # "vision" | "text"
    steps: int
    lr_grid: tuple[float, ...]
    mask_interval: int  # the NanoAdam default of the experiments
    mask_intervals: tuple[int, ...]  # e3
    matched_thresholds: tuple[float, ...]  # e5
    reach: float  # e4


FULL = Settings()
SMOKE = Settings(
    steps=3,
    batch_size=8,
    train_examples=64,
    val_examples=32,
    test_examples=64,
    lr_grid=(1e-3, 1e-2),
    mask_interval=2,
    mask_intervals=(2,),
    vmap_chunk=6,
    timing_steps=2,
    timing_rounds=1,
    text_layers=1,
    text_seq_len=16,
    text_steps=2,
    text_batch_size=4,
    text_train_examples=32,
    text_val_examples=16,
    text_test_examples=16,
    text_lr_grid=(1e-4,),
    text_mask_interval=1,
    curve_points=10,
    compiler_options=(("xla_backend_optimization_level", 0),),
)
#: ``--task text``: e1-e5 on MiniLM, sized to take about half an hour on 2 busy CPU cores.
TEXT = dataclasses.replace(FULL, text_old_examples=400)
TEXT_SMOKE = dataclasses.replace(
    SMOKE,
    # No transformer layer (embeddings, pooling, heads): each sparse leaf adds NanoAdam selection
    # code to every compilation, and the 1-layer encoder is already smoke-tested by e1's text part.
    text_layers=0,
    text_old_examples=16,
    text_old_train_examples=40,
    text_old_head_steps=20,
    text_mask_intervals=(1,),
    text_matched_thresholds=(0.5,),
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One optimizer configuration (one compilation); ``lr``, seed and density are traced.

    ``mask_interval=None`` is a static mask: ``mask_interval`` longer than the run, so the
    selection is made once, at step 0.
    """

    method: str  # "adamw" | "nanoadam"
    criterion: str = "smallest"
    refresh_policy: str = "keep"  # the library's default
    mask_interval: int | None = 100
    dense_head: bool = True  # False: the head is sparse too (an e5 diagnostic)
    # Adam's bias correction of the selected entries (``nanoadam.nanoadam``'s argument): True
    # (= "per_entry", the default: each entry's own age), "global" (the running step count),
    # "gradient" (entering moments initialised from the current gradient), False (none).
    bias_correction: bool | str = True

    def __post_init__(self):
        if self.bias_correction not in BIAS_CORRECTIONS:
            raise ValueError(
                f"bias_correction must be one of {list(BIAS_CORRECTIONS)}, "
                f"got {self.bias_correction!r}"
            )
        if self.bias_correction == "per_entry":  # one spelling: equal variants, equal keys
            object.__setattr__(self, "bias_correction", True)

    @property
    def key(self) -> str:
        if self.method == "adamw":
            return "adamw"
        m = "static" if self.mask_interval is None else f"m{self.mask_interval}"
        head = "" if self.dense_head else "-headsparse"
        bc = BIAS_CORRECTIONS[self.bias_correction]
        return f"nanoadam-{self.criterion}-{self.refresh_policy}-{m}{head}{bc}"

    def make(self, lr, density, seed, steps: int, max_density: float | None):
        if self.method == "adamw":
            return optax.adamw(lr, weight_decay=ADAMW_WEIGHT_DECAY)
        interval = steps + 1 if self.mask_interval is None else self.mask_interval
        return nanoadam.nanoadam(
            lr,
            density=density,
            mask_interval=interval,
            criterion=self.criterion,
            refresh_policy=self.refresh_policy,
            max_density=max_density,
            seed=seed,
            labels=None if self.dense_head else (lambda path, leaf: nanoadam.SPARSE),
            bias_correction=self.bias_correction,
        )


ADAMW = Variant("adamw")
