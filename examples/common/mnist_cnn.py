"""The ``digit-recognizer-py`` MNIST CNN in Flax NNX, with a torch-free ``.pth`` loader.

Architecture (checked against the shapes in the shipped state_dict)::

    input (N, 28, 28) raw pixels in [0, 255] -> (x / 255 - 0.1307) / 0.3081
    conv1  Conv(1 -> 32, 3x3, pad 1)   ReLU  MaxPool(2, 2)   28 -> 14
    conv2  Conv(32 -> 64, 3x3, pad 1)  ReLU  MaxPool(2, 2)   14 -> 7
    conv3  Conv(64 -> 128, 3x3, pad 1) ReLU  MaxPool(2, 2)    7 -> 3 (floor, like torch)
    flatten 3 * 3 * 128 = 1152
    fc     Linear(1152 -> 256) ReLU
    head   Linear(256 -> 10)

The torch checkpoint is a zip archive whose ``data.pkl`` pickle references raw tensor storages
stored as separate zip entries. :func:`read_torch_state_dict` reads it with a *restricted*
unpickler that only allows the handful of globals a plain state_dict needs and rebuilds each
tensor as a numpy array, so neither torch nor arbitrary pickle code is ever executed.
"""

from __future__ import annotations

import pickle
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "MNIST_MEAN",
    "MNIST_STD",
    "MnistCNN",
    "evaluate_accuracy",
    "load_mnist_cnn",
    "load_torch_state_dict_into_cnn",
    "normalize_images",
    "read_torch_state_dict",
]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


# ------------------------------------------------------------------------------------------------
# Torch-free reader for torch zip-format checkpoints
# ------------------------------------------------------------------------------------------------

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` & co.: only remembers the element dtype."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, *args):
    """numpy replacement of ``torch._utils._rebuild_tensor_v2`` (strides are in elements)."""
    del requires_grad, args  # backward hooks / metadata are irrelevant for inference weights
    size = tuple(int(s) for s in size)
    if len(size) == 0:
        return storage[storage_offset].copy()
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:],
        shape=size,
        strides=tuple(int(s) * itemsize for s in stride),
        writeable=False,
    )
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
    """numpy replacement of ``torch._utils._rebuild_parameter``: a Parameter is just its data."""
    del requires_grad, backward_hooks, args
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for torch ``data.pkl`` files that allows only state_dict building blocks."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._byteorder = byteorder
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name == "BFloat16Storage":
            import ml_dtypes  # a jax dependency

            return _StorageType(np.dtype(ml_dtypes.bfloat16))
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a checkpoint")

    def persistent_load(self, pid):
        # pid = ("storage", storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}/data/{key}")
            dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            arr = np.frombuffer(raw, dtype=dtype)
            if not arr.dtype.isnative:
                arr = arr.astype(arr.dtype.newbyteorder("="))
            self._storages[key] = arr
        return self._storages[key]


def read_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a torch zip-format ``state_dict`` checkpoint into numpy arrays, without torch.

    Only plain tensors in (ordered) dicts are supported; any other pickled global is refused.

    Args:
      path: the ``.pth`` / ``.pt`` file (torch >= 1.6 zip serialization).

    Returns:
      An ordered ``{name: np.ndarray}`` dict with torch's own shapes and layouts.
    """
    with zipfile.ZipFile(path) as archive:
        pkl_names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl_names) != 1:
            raise ValueError(f"{path} is not a torch zip checkpoint (data.pkl: {pkl_names})")
        pkl_name = pkl_names[0]
        prefix = pkl_name[: -len("/data.pkl")] if "/" in pkl_name else ""
        byteorder = "little"
        if f"{prefix}/byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}/byteorder").decode().strip()
        with archive.open(pkl_name) as f:
            obj = _RestrictedUnpickler(f, archive, prefix, byteorder).load()
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state_dict but a {type(obj).__name__}")
    return OrderedDict((k, np.asarray(v)) for k, v in obj.items())


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


def normalize_images(images: jax.Array) -> jax.Array:
    """Map raw pixels in ``[0, 255]`` to the network's input scale ``(x/255 - mean) / std``."""
    return (images / 255.0 - MNIST_MEAN) / MNIST_STD


class MnistCNN(nnx.Module):
    """Three conv blocks + two linear layers; the output layer is called ``head``.

    Call it on raw images of shape ``(N, 28, 28)`` or ``(N, 28, 28, 1)`` with values in
    ``[0, 255]``; it normalises them itself and returns ``(N, 10)`` logits.
    """

    def __init__(self, *, rngs: nnx.Rngs, num_classes: int = 10):
        pad = ((1, 1), (1, 1))
        self.conv1 = nnx.Conv(1, 32, (3, 3), padding=pad, rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), padding=pad, rngs=rngs)
        self.conv3 = nnx.Conv(64, 128, (3, 3), padding=pad, rngs=rngs)
        self.fc = nnx.Linear(128 * 3 * 3, 256, rngs=rngs)
        self.head = nnx.Linear(256, num_classes, rngs=rngs)

    def features(self, images: jax.Array) -> jax.Array:
        """The 256-dimensional penultimate features (after ``fc`` and its ReLU)."""
        x = jnp.asarray(images, jnp.float32)
        if x.ndim == 3:
            x = x[..., None]
        x = normalize_images(x)
        for conv in (self.conv1, self.conv2, self.conv3):
            x = jax.nn.relu(conv(x))
            x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")
        x = x.reshape(x.shape[0], -1)  # NHWC flatten: (H, W, C) order
        return jax.nn.relu(self.fc(x))

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.head(self.features(images))


def _set(var: nnx.Variable, value: np.ndarray, name: str) -> None:
    current = var.get_value()
    if tuple(current.shape) != tuple(value.shape):
        raise ValueError(f"{name}: shape {value.shape} does not match {current.shape}")
    var.set_value(jnp.asarray(value, dtype=current.dtype))


def load_torch_state_dict_into_cnn(model: MnistCNN, state_dict: dict[str, np.ndarray]) -> None:
    """Copy the ``digit-recognizer-py`` torch weights into ``model`` (in place).

    Layouts: torch conv weights are OIHW and become HWIO Flax kernels; torch linear weights are
    ``(out, in)`` and become ``(in, out)``. torch flattens the last feature map in ``(C, H, W)``
    order while the NHWC model flattens ``(H, W, C)``, so the input axis of ``fc_layers.0`` is
    permuted accordingly.
    """
    expected = {
        "conv_layers.0.weight", "conv_layers.0.bias", "conv_layers.3.weight",
        "conv_layers.3.bias", "conv_layers.6.weight", "conv_layers.6.bias",
        "fc_layers.0.weight", "fc_layers.0.bias", "fc_layers.2.weight", "fc_layers.2.bias",
    }  # fmt: skip
    if set(state_dict) != expected:
        raise ValueError(f"unexpected state_dict keys: {sorted(set(state_dict) ^ expected)}")
    for conv, idx in ((model.conv1, 0), (model.conv2, 3), (model.conv3, 6)):
        w = state_dict[f"conv_layers.{idx}.weight"]
        _set(conv.kernel, w.transpose(2, 3, 1, 0), f"conv_layers.{idx}.weight")
        _set(conv.bias, state_dict[f"conv_layers.{idx}.bias"], f"conv_layers.{idx}.bias")
    w = state_dict["fc_layers.0.weight"]  # (256, 1152) with inputs in (C=128, H=3, W=3) order
    w = w.reshape(w.shape[0], 128, 3, 3).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
    _set(model.fc.kernel, w.T, "fc_layers.0.weight")
    _set(model.fc.bias, state_dict["fc_layers.0.bias"], "fc_layers.0.bias")
    _set(model.head.kernel, state_dict["fc_layers.2.weight"].T, "fc_layers.2.weight")
    _set(model.head.bias, state_dict["fc_layers.2.bias"], "fc_layers.2.bias")


def load_mnist_cnn(path: str | Path | None = None, *, seed: int = 0) -> MnistCNN:
    """Build :class:`MnistCNN` and load the pretrained ``digit-recognizer-py`` weights.

    Args:
      path: checkpoint path; defaults to the installed package's ``handwriting_model.pth``.
      seed: seed for the (immediately overwritten) random initialisation.
    """
    if path is None:
        from .assets import mnist_cnn_weights_path

        path = mnist_cnn_weights_path()
    model = MnistCNN(rngs=nnx.Rngs(seed))
    load_torch_state_dict_into_cnn(model, read_torch_state_dict(path))
    return model


@nnx.jit
def _predict(model: MnistCNN, images: jax.Array) -> jax.Array:
    return jnp.argmax(model(images), axis=-1)


def evaluate_accuracy(
    model: MnistCNN, images: np.ndarray, labels: np.ndarray, batch_size: int = 500
) -> float:
    """Classification accuracy of ``model`` on raw ``[0, 255]`` images, in batches."""
    n = len(images)
    correct = 0
    for start in range(0, n, batch_size):
        batch = np.asarray(images[start : start + batch_size], np.float32)
        pad = batch_size - len(batch)
        if pad:  # keep one static shape -> one compilation
            batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), np.float32)])
        pred = np.asarray(_predict(model, batch))[: batch_size - pad]
        correct += int((pred == labels[start : start + len(pred)]).sum())
    return correct / max(n, 1)


if __name__ == "__main__":  # quick manual check: python -m common.mnist_cnn (from examples/)
    from .assets import load_mnist_subset

    imgs, labs = load_mnist_subset()
    acc = evaluate_accuracy(load_mnist_cnn(), imgs, labs)
    print(f"MNIST subset accuracy: {acc:.4f}", file=sys.stderr)
