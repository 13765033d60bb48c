"""Which leaves are sparse (masked), dense (fully updated) or frozen (never updated).

The paper selects small weights inside every weight tensor except the final
classifier / language-model head and the normalisation layers, which it updates
densely (not frozen). :func:`default_labels` does that by name on common models
(Flax NNX and Linen, and the names of Hugging Face, Meta Llama, Gemma, timm and
torchvision checkpoints); pass your own ``labels`` to any transformation to change it.

**The naming rule.** A leaf's key path is read as a list of names: dict keys,
attribute names and indices, with flat keys split (``"model.norm.weight"`` of a
PyTorch state dict, ``"LayerNorm_0/scale"`` or ``("LayerNorm_0", "scale")`` of
``flax.traverse_util.flatten_dict``). Each name is split into lower-case *words*
(:func:`name_words`: on ``_``, ``-``, camelCase and digit boundaries, a trailing
number dropped, as in Linen's auto-suffix ``_0``, ``ln_1`` or ``bn1``):
``LayerNorm_0`` is ``layer norm``, ``post_attention_layernorm`` is ``post attention
layernorm``, ``ln_f`` is ``ln f``, ``MultiHeadDotProductAttention_0`` is ``multi
head dot product attention``. A leaf is dense when some name on its path

* is a **normalisation layer**: its first or last word is in :data:`NORM_WORDS`
  or ends in ``norm`` (``LayerNorm_0``, ``final_norm``, ``attention_norm``,
  ``input_layernorm``, ``ln_f``, ``bn1``, ``norm_proj``, ``layernorm_before``);
* or is an **output head**: its last word is in :data:`HEAD_WORDS` (``head``,
  ``lm_head``, ``classifier``, ``logits``) and its first word is not ``pre``
  (``pre_logits`` is a hidden layer);
* or is the first name (after a leading ``params``) and one of
  :data:`ROOT_HEADS` (Meta Llama's ``output``, Hugging Face's ``score``): deeper
  down, ``output`` is a hidden layer (BERT's ``layer.3.output.dense``).

Whole words only: ``enormous_proj``, ``header_proj``, ``normal_init`` and the
attention of ``MultiHeadDotProductAttention_0`` are sparse. Names that do not say
what they are cannot be recognised: a Linen model whose last layer is the
auto-named ``Dense_3``, torchvision ResNet's ``fc`` (``fc`` is also a hidden
layer's name in many models) or a norm known only by its index
(``downsample.1``) stay sparse. :func:`find_heads` tells which heads were found,
so that a tree with none can be reported instead of guessed. Tied embeddings
(GPT-2's ``wte``, Gemma's ``embedder``) stay sparse: see :func:`default_labels`.

``labels`` may be:

* ``None``: use :func:`default_labels`;
* a callable ``(path, leaf) -> label`` (``path`` is a ``jax.tree_util`` key path);
* a pytree of labels with the structure of the parameters (like
  ``optax.multi_transform``'s ``param_labels``), or a callable ``params -> pytree``.

Labels are the strings :data:`SPARSE`, :data:`DENSE` and :data:`FROZEN`. Leaves
that are not floating point (integer counters, booleans) are always frozen: their
update is zero. Complex leaves are refused (selection by magnitude of a complex
number is not defined by the paper).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "DENSE",
    "FROZEN",
    "HEAD_WORDS",
    "LABELS",
    "NORM_WORDS",
    "ROOT_HEADS",
    "SPARSE",
    "default_labels",
    "find_heads",
    "label_params",
    "name_words",
    "path_names",
]

SPARSE = "sparse"
DENSE = "dense"
FROZEN = "frozen"
LABELS = (SPARSE, DENSE, FROZEN)

#: Words that make a path component a normalisation layer when they are its first or
#: last word (any word ending in ``norm`` does too: ``layernorm``, ``rmsnorm``...).
NORM_WORDS = ("norm", "normalization", "ln", "bn")

#: Words that make a path component an output head when they are its last word.
HEAD_WORDS = ("head", "classifier", "logits")

#: Whole names that are an output head only as the first path component (after a
#: leading ``params``): Meta Llama's ``output``, Hugging Face ``*ForSequenceClassification``'s
#: ``score``.
ROOT_HEADS = ("output", "score")

# A first word that makes a head word mean "before the head" (big_vision's ``pre_logits``).
_NOT_HEAD_FIRST_WORDS = ("pre",)
# Wrappers skipped when looking for a root head (Linen's ``{"params": ...}``).
_ROOT_WRAPPERS = ("params",)
# camelCase words (``RMSNorm`` -> ``RMS``, ``Norm``), lower-case words and numbers.
_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")

Labels = None | Callable[..., Any] | Any


def path_names(path: tuple[Any, ...]) -> list[str]:
    """The components of a key path as lower-case strings.

    Example:
      >>> import jax, nanoadam_jax as nanoadam
      >>> path = jax.tree_util.tree_flatten_with_path({"Dense_0": {"kernel": 1.0}})[0][0][0]
      >>> nanoadam.path_names(path)
      ['dense_0', 'kernel']
    """
    return [_key_name(p).lower() for p in path]


def name_words(name: str) -> list[str]:
    """The lower-case words of one path component, as the naming rule reads them.

    Splits on ``_``, ``.``, ``-`` and other punctuation, on camelCase and on digit
    boundaries, then drops a trailing number (Linen's ``_0`` auto-suffix, ``ln_1``,
    ``bn1``). See the module docstring for how the words decide a label.

    Example:
      >>> import nanoadam_jax.labels as labels
      >>> labels.name_words("MultiHeadDotProductAttention_0")
      ['multi', 'head', 'dot', 'product', 'attention']
      >>> labels.name_words("RMSNorm_0"), labels.name_words("ln_f"), labels.name_words("bn1")
      (['rms', 'norm'], ['ln', 'f'], ['bn'])

    Args:
      name: a path component (dict key, attribute name or index).

    Returns:
      The words, possibly empty (for an index such as ``"0"``).
    """
    return list(_words(str(name)))


@functools.lru_cache(maxsize=4096)
def _words(name: str) -> tuple[str, ...]:
    words = [w.lower() for w in _WORD.findall(name)]
    while words and words[-1].isdigit():
        words.pop()
    return tuple(words)


def default_labels(path: tuple[Any, ...], leaf: Any) -> str:
    """The paper's choice, by name: heads and normalisation layers dense, the rest sparse.

    * non-floating-point leaves: ``"frozen"``;
    * a leaf under a normalisation layer or an output head (the naming rule of
      :mod:`nanoadam_jax.labels`: whole words of :data:`NORM_WORDS`,
      :data:`HEAD_WORDS` and, at the root only, :data:`ROOT_HEADS`): ``"dense"``;
    * everything else (kernels, embeddings, biases, convolutions): ``"sparse"``.

    Biases and embeddings are sparse: the paper's rule covers "every other weight
    tensor" and does not discuss them. **Tied embeddings** (GPT-2's ``wte``, Gemma's
    ``embedder.input_embedding``, which are also the output layer) stay sparse: they
    are embeddings, and updating the largest tensor of the model densely would keep
    full Adam moments for it. To update one densely, wrap this function::

        def labels(path, leaf):
            if "wte" in nanoadam.path_names(path):
                return nanoadam.DENSE
            return nanoadam.default_labels(path, leaf)

    and pass ``labels=labels``. A head that is not named as one (a Linen model's
    auto-named last ``Dense_3``, torchvision ResNet's ``fc``) is sparse: name it
    (``nn.Dense(..., name="head")``) or pass a predicate the same way;
    :func:`find_heads` returns ``[]`` for such a model.

    Example:
      >>> import jax, jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> w = jnp.ones((2, 2))
      >>> params = {
      ...     "MultiHeadDotProductAttention_0": {"query": {"kernel": w}},
      ...     "LayerNorm_0": {"scale": w},
      ...     "enormous_proj": {"kernel": w},
      ...     "layers": [{"output": {"kernel": w}}],
      ...     "output": {"kernel": w},
      ... }
      >>> nanoadam.label_params(params)  # doctest: +NORMALIZE_WHITESPACE
      {'LayerNorm_0': {'scale': 'dense'},
       'MultiHeadDotProductAttention_0': {'query': {'kernel': 'sparse'}},
       'enormous_proj': {'kernel': 'sparse'},
       'layers': [{'output': {'kernel': 'sparse'}}],
       'output': {'kernel': 'dense'}}

    Args:
      path: the leaf's key path.
      leaf: the leaf (array or ``jax.ShapeDtypeStruct``).

    Returns:
      One of :data:`LABELS`.
    """
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        return FROZEN
    components = _components(path)
    if _head_index(components) is not None or _norm_index(components) is not None:
        return DENSE
    return SPARSE


def find_heads(params: Any, labels: Labels = None) -> list[str]:
    """The output heads of ``params``: modules with a dense leaf that is not a norm.

    With the default labels these are the heads recognised by name, so an empty
    list means that the model's output layer was not recognised (a Linen model whose
    last layer is the auto-named ``Dense_3``, torchvision ResNet's ``fc``) or is a
    tied embedding (GPT-2, Gemma), which stays sparse. With your own ``labels``,
    every dense leaf outside a normalisation layer counts.

    Each head is named by its path components joined with ``/``, up to the
    component recognised as a head (``"lm_head"``, ``"head"``, ``"output"``), or,
    when no component is, the leaf's path without its own name (``"Dense_3"``).

    Example:
      >>> import jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> w = jnp.ones((2, 2))
      >>> params = {"Dense_0": {"kernel": w}, "LayerNorm_0": {"scale": w}, "Dense_1": {"kernel": w}}
      >>> nanoadam.labels.find_heads(params)
      []
      >>> def labels(path, leaf):
      ...     if nanoadam.path_names(path)[0] == "dense_1":
      ...         return nanoadam.DENSE
      ...     return nanoadam.default_labels(path, leaf)
      >>> nanoadam.labels.find_heads(params, labels)
      ['Dense_1']
      >>> nanoadam.labels.find_heads({"model": {"norm": {"scale": w}}, "lm_head": {"kernel": w}})
      ['lm_head']

    Args:
      params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
      labels: see the module docstring.

    Returns:
      The heads, each once, in the order of ``jax.tree_util`` flattening.
    """
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    flat_labels = treedef.flatten_up_to(label_params(params, labels))
    heads: list[str] = []
    for (path, _), label in zip(leaves_with_path, flat_labels):
        components = _components(path)
        if label != DENSE or _norm_index(components) is not None:
            continue
        i = _head_index(components)
        if i is None:
            i = max(len(components) - 2, 0)
        name = "/".join(components[: i + 1])
        if name not in heads:
            heads.append(name)
    return heads


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _components(path: tuple[Any, ...]) -> list[str]:
    """Path component names: flat keys (``"a.b"``, ``"a/b"``, ``("a", "b")``) split, NNX's
    trailing ``.value`` dropped."""
    keys = list(path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys.pop()  # an ``nnx.Variable``'s payload, not a name
    names = []
    for key in keys:
        raw = getattr(key, "key", None)  # a DictKey; flatten_dict without `sep` gives tuples
        if isinstance(raw, tuple):
            names.extend(str(k) for k in raw)
        else:
            names.append(_key_name(key))
    return [part for name in names for part in re.split(r"[./]", name) if part]


def _is_norm_word(word: str) -> bool:
    return word in NORM_WORDS or word.endswith("norm")


def _norm_index(components: list[str]) -> int | None:
    """Index of the first component naming a normalisation layer, or ``None``."""
    for i, name in enumerate(components):
        words = _words(name)
        if words and (_is_norm_word(words[0]) or _is_norm_word(words[-1])):
            return i
    return None


def _head_index(components: list[str]) -> int | None:
    """Index of the first component naming an output head, or ``None``."""
    root = 1 if components and components[0].lower() in _ROOT_WRAPPERS else 0
    for i, name in enumerate(components):
        if i == root and name.lower() in ROOT_HEADS:
            return i
        words = _words(name)
        if words and words[-1] in HEAD_WORDS and words[0] not in _NOT_HEAD_FIRST_WORDS:
            return i
    return None


def label_params(params: Any, labels: Labels = None) -> Any:
    """A pytree of labels (``"sparse"``, ``"dense"``, ``"frozen"``) for ``params``.

    Uses only shapes and dtypes, so it works on ``jax.ShapeDtypeStruct`` trees.

    Example:
      >>> import jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> params = {"w": jnp.ones((3, 3)), "step": jnp.zeros((), jnp.int32)}
      >>> nanoadam.label_params(params)
      {'step': 'frozen', 'w': 'sparse'}

    Args:
      params: the parameter pytree.
      labels: see the module docstring.

    Returns:
      A pytree of strings with the structure of ``params``.

    Raises:
      ValueError: a label is not one of :data:`LABELS`, the label tree does not
        match ``params``, or a leaf is complex.
    """
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    if labels is None:
        labels = default_labels
    if callable(labels) and num_positional(labels) == 1:
        out = _flatten_labels(labels(params), treedef)
    elif callable(labels):
        out = [labels(path, leaf) for path, leaf in leaves_with_path]
    else:
        out = _flatten_labels(labels, treedef)
    for (path, leaf), label in zip(leaves_with_path, out):
        if label not in LABELS:
            raise ValueError(
                f"labels must return one of {LABELS}; got {label!r} for the leaf at "
                f"{jax.tree_util.keystr(path)}"
            )
        if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            raise ValueError(
                f"complex parameters are not supported (leaf at {jax.tree_util.keystr(path)} "
                f"has dtype {leaf.dtype}), whatever their label: split them into real and "
                "imaginary parts, or keep them out of the optimizer (e.g. optax.masked)"
            )
    # Non-float leaves are never updated, whatever the predicate said.
    out = [
        label if jnp.issubdtype(leaf.dtype, jnp.floating) else FROZEN
        for (_, leaf), label in zip(leaves_with_path, out)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def num_positional(fn: Callable[..., Any]) -> int:
    """How many positional arguments ``fn`` takes (2 when it cannot be told): tells a
    ``(path, leaf)`` callable from a ``params`` one (labels, dimension numbers)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 2
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values()):
        return 2
    return sum(p.kind in kinds for p in sig.parameters.values())


def _flatten_labels(tree: Any, treedef: Any) -> list[Any]:
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"the `labels` tree must have the structure of the parameters ({treedef}); {e}"
        ) from e
