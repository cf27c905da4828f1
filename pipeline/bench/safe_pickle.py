"""Safe unpickling of ground-truth pickles: an allow-list unpickler that builds only containers and numpy arrays."""

from __future__ import annotations

import importlib
import io
import pickle
import warnings
from typing import Any, Callable, Sequence

import numpy as np


def _numpy_attr(modules: Sequence[str], name: str) -> Any:
    """First ``module.name`` that imports, trying numpy 2's ``numpy._core`` before numpy 1's ``numpy.core``.

    The refusal is decided by the allow-list before this runs; this only maps an allowed name to the installed
    numpy's object (``numpy.core`` warns on import under numpy 2, ``numpy._core`` may not exist under numpy 1).
    """
    for mod in modules:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {name!r} in any of {list(modules)}")


def _latin1_encode(obj: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` as used by protocol 0-2 pickles of ``bytes`` (``encode(s, 'latin1')``).

    The real function reaches every registered codec; a ground-truth file has no reason to need any but latin-1.
    """
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"refused global _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin1")


_MA = ("numpy._core.multiarray", "numpy.core.multiarray")
_NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")

# Everything a pickle of plain containers and numpy arrays references, and nothing else. What each is for:
#   _reconstruct, ndarray, dtype: ndarray.__reduce__ (protocols 0-4); scalar: numpy scalars (np.float32(1));
#   _frombuffer: ndarray.__reduce_ex__ at protocol 5; set/frozenset/complex/bytes/bytearray/slice: containers
#   and values that protocols 0-2 spell as a call; _codecs.encode: how protocols 0-2 spell ``bytes`` in Python 3.
# ``__builtin__`` and ``numpy.core`` are the Python 2 / numpy 1 spellings found in older pickles (the revisitop
# files date from 2018). Lazy resolvers: numpy is imported only when a pickle actually uses it.
_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = lambda: _numpy_attr(_MA, "_reconstruct")
    _ALLOWED[(_mod, "scalar")] = lambda: _numpy_attr(_MA, "scalar")
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_mod, "_frombuffer")] = lambda: _numpy_attr(_NUMERIC, "_frombuffer")
_ALLOWED[("numpy", "ndarray")] = lambda: np.ndarray
_ALLOWED[("numpy", "dtype")] = lambda: np.dtype
for _mod in ("builtins", "__builtin__"):
    for _name, _obj in (
        ("set", set),
        ("frozenset", frozenset),
        ("complex", complex),
        ("bytes", bytes),
        ("bytearray", bytearray),
        ("slice", slice),
    ):
        _ALLOWED[(_mod, _name)] = lambda _obj=_obj: _obj
_ALLOWED[("_codecs", "encode")] = lambda: _latin1_encode
del _mod, _name, _obj


def _nbytes(shape: Any, dtype: Any) -> int:
    """Bytes an array of ``shape`` and ``dtype`` would take (shape as numpy accepts it: an int or a sequence)."""
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(d, int) and d >= 0 for d in dims):
        raise pickle.UnpicklingError(f"refused array shape {shape!r}")
    n = np.dtype(dtype).itemsize
    for d in dims:
        n *= d
    return n


class _Bounded:
    """The allocating constructors a pickle may call, each refusing to build more than ``max_bytes``: a 27-byte pickle
    can otherwise ask for ``bytearray(8 GiB)`` or an empty ``ndarray`` of any shape. A real ground-truth pickle carries
    its data inline, so nothing it builds is larger than the pickle itself."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def _check(self, n: int, what: str) -> None:
        """Refuse an allocation over the bound."""
        if n > self.max_bytes:
            raise pickle.UnpicklingError(f"refused {what} of {n} bytes from a {self.max_bytes}-byte pickle")

    def bytes_(self, *args: Any) -> bytes:
        """``bytes(...)``; an integer argument (that many zero bytes) is bounded."""
        if args and isinstance(args[0], int):
            self._check(args[0], "bytes")
        return bytes(*args)

    def bytearray_(self, *args: Any) -> bytearray:
        """``bytearray(...)``; an integer argument is bounded."""
        if args and isinstance(args[0], int):
            self._check(args[0], "bytearray")
        return bytearray(*args)

    def ndarray(self, shape: Any, dtype: Any = float, *args: Any, **kwargs: Any) -> np.ndarray:
        """``numpy.ndarray(shape, dtype, ...)`` called directly: bounded by shape x itemsize."""
        self._check(_nbytes(shape, dtype), "array")
        return np.ndarray(shape, dtype, *args, **kwargs)

    def reconstruct(self, subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        """numpy's ``_reconstruct`` (how every ndarray pickle starts): bounded by shape x itemsize."""
        if subtype != self.ndarray and subtype is not np.ndarray:  # bound methods are equal, not identical
            raise pickle.UnpicklingError(f"refused array subtype {subtype!r}")
        self._check(_nbytes(shape, dtype), "array")
        return _numpy_attr(_MA, "_reconstruct")(np.ndarray, shape, dtype)


# The allocating globals, answered by the unpickler's own bounded versions instead of _ALLOWED's.
_BOUNDED = {("numpy", "ndarray"): "ndarray", ("builtins", "bytes"): "bytes_", ("__builtin__", "bytes"): "bytes_",
            ("builtins", "bytearray"): "bytearray_", ("__builtin__", "bytearray"): "bytearray_",
            **{(m, "_reconstruct"): "reconstruct" for m in ("numpy.core.multiarray", "numpy._core.multiarray")}}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that only builds plain containers and numpy arrays, none larger than ``max_bytes``.

    A pickle is a program: every global it names is imported and may be called (``os.system``, ``eval``, a
    class whose constructor does anything). ``find_class`` is the single point through which every global
    passes (GLOBAL, STACK_GLOBAL, INST, OBJ and the copyreg extension opcodes all call it), so an exact
    ``(module, name)`` allow-list there is enough; everything else raises before it is imported. The globals that
    allocate by a size argument are answered by bounded versions. ``persistent_load`` is left at the default, which
    refuses persistent ids.

    Args:
        file: the pickle stream.
        max_bytes: the largest bytes, bytearray or array that may be built (``safe_loads``: the pickle's own size).
        **kwargs: forwarded to ``pickle.Unpickler`` (``encoding``).
    """

    def __init__(self, file: Any, *, max_bytes: int = 1 << 30, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._bounded = _Bounded(max_bytes)

    def find_class(self, module: str, name: str) -> Any:
        """Return the allowed object for ``module.name``.

        Args:
            module: module named by the pickle.
            name: attribute named by the pickle.

        Returns:
            The object to use for that global.

        Raises:
            pickle.UnpicklingError: for any global not on the allow-list, naming it.
        """
        bounded = _BOUNDED.get((module, name))
        if bounded is not None:
            return getattr(self._bounded, bounded)
        resolver = _ALLOWED.get((module, name))
        if resolver is None:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: ground-truth pickles may only contain plain containers and "
                "numpy arrays"
            )
        return resolver()


def safe_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`SafeUnpickler`, building nothing larger than ``data`` itself.

    Args:
        data: pickle bytes.

    Returns:
        The unpickled object.
    """
    # latin1: Python 2 pickles store numpy buffers as ``str``; latin1 maps those bytes 1:1 (numpy's own advice).
    return SafeUnpickler(io.BytesIO(data), encoding="latin1", max_bytes=len(data)).load()
