"""PCA, whitening, L2 normalisation and global + local fusion (paper 2.4)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from pipeline.config import FUSE_GLOBALS
from pipeline.io import storage

# Bumped whenever the .npz layout written by PCA.to_bytes changes, so that an old
# file is rejected with a clear message instead of being misread.
_PCA_FORMAT_VERSION = 1


def l2n(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """L2-normalise the rows of ``x``.

    Args:
        x: ``(N, D)`` array (a 1-D ``(D,)`` vector is treated as one row); any float dtype.
        eps: lower bound on the norm, so that all-zero rows stay zero instead of becoming NaN.

    Returns:
        ``float32`` array of the same shape whose rows have unit L2 norm (zero rows stay zero).
    """
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, np.float32(eps))


@dataclass
class PCA:
    """A fitted PCA projection, optionally whitening.

    Attributes:
        mean: ``(d_in,)`` float32 mean of the fit sample.
        components: ``(d_out, d_in)`` float32 principal axes, rows sorted by decreasing variance.
        eigvals: ``(d_out,)`` float64 variances along each axis (covariance with ``n - 1`` in the denominator).
        whiten: whether :meth:`transform` divides each projected coordinate by its standard deviation.
    """

    mean: np.ndarray
    components: np.ndarray
    eigvals: np.ndarray
    whiten: bool

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        dim: int,
        whiten: bool = False,
        sample: int | None = None,
        seed: int = 0,
    ) -> PCA:
        """Fit a PCA on the rows of ``x``.

        The output dimension is clipped to ``min(n - 1, d_in)`` (``n`` = rows actually used): centred data
        has rank at most ``n - 1``, and any further axis would be numerical noise that whitening would
        blow up. Each axis has a deterministic sign (its largest-magnitude coefficient is positive) so
        that refitting on the same data gives the same projection.

        Args:
            x: ``(N, d_in)`` training descriptors.
            dim: requested output dimension.
            whiten: store whitening, applied by :meth:`transform`.
            sample: fit on at most this many rows, drawn without replacement with a seeded RNG
                (``None`` uses every row); bounds the cost on large corpora.
            seed: seed of that draw.

        Returns:
            The fitted :class:`PCA`.

        Raises:
            ValueError: if ``x`` is not 2-D, has fewer than 2 rows, or ``dim < 1``.
        """
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"PCA.fit expects a 2-D array, got shape {x.shape}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if sample is not None and sample < x.shape[0]:
            rng = np.random.default_rng(seed)
            # Sorted rows keep memory access sequential (matters for memory-mapped inputs).
            rows = np.sort(rng.choice(x.shape[0], size=sample, replace=False))
            x = x[rows]
        n, d_in = x.shape
        if n < 2:
            raise ValueError(f"PCA.fit needs at least 2 rows, got {n}")
        dim = min(dim, n - 1, d_in)

        # Float64 for the decomposition: float32 covariances lose the small eigenvalues that
        # whitening divides by.
        x64 = x.astype(np.float64)
        mean = x64.mean(axis=0)
        xc = x64 - mean
        if n >= d_in:
            # Many rows: the d_in x d_in covariance is the smaller problem.
            eigvals, eigvecs = np.linalg.eigh(xc.T @ xc / (n - 1))
            order = np.argsort(eigvals)[::-1][:dim]
            eigvals = eigvals[order]
            components = eigvecs[:, order].T
        else:
            # Fewer rows than dimensions: thin SVD of the n x d_in data is cheaper.
            _, s, vt = np.linalg.svd(xc, full_matrices=False)
            eigvals = s[:dim] ** 2 / (n - 1)
            components = vt[:dim]
        eigvals = np.maximum(eigvals, 0.0)  # eigh can return tiny negatives for null directions

        signs = np.sign(components[np.arange(dim), np.abs(components).argmax(axis=1)])
        signs[signs == 0] = 1.0
        components = components * signs[:, None]

        return cls(
            mean=mean.astype(np.float32),
            components=np.ascontiguousarray(components, dtype=np.float32),
            eigvals=eigvals.astype(np.float64),
            whiten=bool(whiten),
        )

    @property
    def dim(self) -> int:
        """Output dimension ``d_out``."""
        return int(self.components.shape[0])

    def project(self, x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
        """Centre, project and (if ``whiten``) whiten, without the final L2 normalisation.

        Args:
            x: ``(N, d_in)`` descriptors.
            eps: added to each eigenvalue before the square root, so null directions do not divide by 0.

        Returns:
            ``(N, d_out)`` float32 projections; with whitening their covariance on the fit sample is identity.
        """
        x = np.asarray(x, dtype=np.float32)
        y = (x - self.mean) @ self.components.T
        if self.whiten:
            y = y / np.sqrt(self.eigvals + eps).astype(np.float32)
        return y.astype(np.float32, copy=False)

    def transform(self, x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
        """Project (and whiten) then L2-normalise, as used before indexing.

        Args:
            x: ``(N, d_in)`` descriptors.
            eps: see :meth:`project`.

        Returns:
            ``(N, d_out)`` float32 unit-norm rows.
        """
        return l2n(self.project(x, eps=eps))

    def to_bytes(self) -> bytes:
        """Serialise to an ``.npz`` archive (plain arrays only, no pickle).

        Returns:
            The archive bytes.
        """
        buf = io.BytesIO()
        np.savez(
            buf,
            version=np.array(_PCA_FORMAT_VERSION, dtype=np.int64),
            mean=np.asarray(self.mean, dtype=np.float32),
            components=np.asarray(self.components, dtype=np.float32),
            eigvals=np.asarray(self.eigvals, dtype=np.float64),
            whiten=np.array(bool(self.whiten)),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PCA:
        """Read an archive written by :meth:`to_bytes`.

        Args:
            data: the ``.npz`` bytes.

        Returns:
            The :class:`PCA`.

        Raises:
            ValueError: on an unknown format version or inconsistent shapes.
        """
        # allow_pickle=False: the file may come from shared storage; never execute its contents.
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            version = int(z["version"])
            if version != _PCA_FORMAT_VERSION:
                raise ValueError(f"unsupported PCA file version {version} (expected {_PCA_FORMAT_VERSION})")
            pca = cls(
                mean=z["mean"].astype(np.float32),
                components=z["components"].astype(np.float32),
                eigvals=z["eigvals"].astype(np.float64),
                whiten=bool(z["whiten"]),
            )
        d_out, d_in = pca.components.shape
        if pca.mean.shape != (d_in,) or pca.eigvals.shape != (d_out,):
            raise ValueError("inconsistent PCA arrays in file")
        return pca

    def save(self, url: str, storage_options: dict | None = None) -> None:
        """Write :meth:`to_bytes` to any fsspec URL (local path, ``file://``, ``s3://`` ...).

        Args:
            url: destination.
            storage_options: fsspec options (e.g. S3 endpoint and keys).
        """
        storage.write_bytes(url, self.to_bytes(), storage_options)

    @classmethod
    def load(cls, url: str, storage_options: dict | None = None) -> PCA:
        """Read a PCA written by :meth:`save`.

        Args:
            url: source fsspec URL.
            storage_options: fsspec options.

        Returns:
            The :class:`PCA`.
        """
        return cls.from_bytes(storage.read_bytes(url, storage_options))


def fuse(global_desc: np.ndarray, local_desc: np.ndarray, local_weight: float = 1.0) -> np.ndarray:
    """Concatenate the L2-normalised global and local descriptors (paper 2.4).

    ``[l2n(global), local_weight * l2n(local)]``: each part is normalised first so that neither
    dominates through its raw scale; ``local_weight`` then sets their relative influence on the
    inner product. The paper follows the concatenation with PCA + L2 (:meth:`PCA.transform`).

    Args:
        global_desc: ``(N, Dg)`` global descriptors.
        local_desc: ``(N, Dl)`` local descriptors for the same ``N`` images, same order.
        local_weight: multiplier of the local part.

    Returns:
        ``(N, Dg + Dl)`` float32 fused descriptors (not re-normalised).

    Raises:
        ValueError: if the inputs are not 2-D or their row counts differ.
    """
    g = np.asarray(global_desc)
    loc = np.asarray(local_desc)
    if g.ndim != 2 or loc.ndim != 2 or g.shape[0] != loc.shape[0]:
        raise ValueError(f"fuse expects (N, Dg) and (N, Dl) arrays, got {g.shape} and {loc.shape}")
    return np.concatenate([l2n(g), np.float32(local_weight) * l2n(loc)], axis=1)


def fuse_global_part(vectors: Mapping[str, np.ndarray], kind: str) -> np.ndarray:
    """The global part of the fused vector: the paper's global CNN feature (``global``), R-MAC instead (``rmac``), or
    both L2-normalised side by side (``global+rmac``, so that neither dominates by its scale before ``fuse``
    normalises the part as a whole).

    Args:
        vectors: descriptor name -> ``(N, d)`` array (an extraction's columns, a model's stacked outputs).
        kind: one of ``FUSE_GLOBALS`` (the ``--fuse-global`` option).

    Returns:
        ``(N, d)`` vectors, not normalised as a whole.

    Raises:
        ValueError: on an unknown ``kind``.
    """
    if kind == "global+rmac":
        return np.concatenate([l2n(vectors["global"]), l2n(vectors["rmac"])], axis=1)
    if kind in ("global", "rmac"):
        return np.asarray(vectors[kind])
    raise ValueError(f"unknown fuse_global {kind!r}; known: {FUSE_GLOBALS}")


def fuse_columns(kind: str) -> tuple[str, ...]:
    """The descriptors that the fused vector of ``kind`` reads (global part first, then ``local``).

    Raises:
        ValueError: on an unknown ``kind``.
    """
    if kind not in FUSE_GLOBALS:
        raise ValueError(f"unknown fuse_global {kind!r}; known: {FUSE_GLOBALS}")
    return (*kind.split("+"), "local")


def fuse_vectors(vectors: Mapping[str, np.ndarray], kind: str, local_weight: float = 1.0) -> np.ndarray:
    """The fused vector before PCA, the one definition the index build, search and the benchmark share:
    ``fuse(fuse_global_part(vectors, kind), vectors["local"], local_weight)``.

    Args:
        vectors: descriptor name -> ``(N, d)`` array, holding at least ``fuse_columns(kind)``.
        kind: one of ``FUSE_GLOBALS``.
        local_weight: multiplier of the local part.

    Returns:
        ``(N, Dg + Dl)`` float32 fused descriptors (not re-normalised; PCA + L2 follow).
    """
    return fuse(fuse_global_part(vectors, kind), vectors["local"], local_weight)
