"""faiss index build / save / load / search, and the index choice from corpus size and memory budget."""

from __future__ import annotations

import math
from collections.abc import Iterable

import faiss
import numpy as np

from pipeline.io import storage

# Corpora up to this size are searched exactly when they fit in memory: brute force over 200k
# vectors is still interactive on a CPU, and exact results need no tuning.
FLAT_MAX_ROWS = 200_000
# HNSW graph degree used by choose_factory.
HNSW_M = 32
# faiss warns below 39 training points per k-means centroid; PQ sub-quantizers have 256 centroids.
_MIN_POINTS_PER_CENTROID = 39
_PQ_CENTROIDS = 256
# Rows per faiss.add call: bounds the temporary float32 copy made for each chunk.
_ADD_CHUNK_ROWS = 65_536


def _pq_subquantizers(d: int) -> int:
    """Largest ``m <= 64`` dividing ``d`` with at least 8 dimensions per sub-quantizer (1 if none)."""
    candidates = [m for m in range(1, 65) if d % m == 0 and d // m >= 8]
    return max(candidates) if candidates else 1


def _ivf_nlist(n: int) -> int:
    """``4 * sqrt(n)`` rounded to the nearest power of two, capped so k-means has >= 39 points per list."""
    nlist = 2 ** round(math.log2(max(1.0, 4.0 * math.sqrt(n))))
    cap = max(1, n // _MIN_POINTS_PER_CENTROID)
    while nlist > cap:
        nlist //= 2
    return max(1, nlist)


def hnsw_bytes(n: int, d: int, m: int = HNSW_M) -> int:
    """Approximate resident size of an ``HNSW{m}`` flat index.

    Args:
        n: number of vectors.
        d: dimension.
        m: graph degree.

    Returns:
        ``n * (4 d + 12 m + 16)`` bytes: float32 vectors, ``2m`` int32 links on level 0 plus about
        ``m`` on the upper levels (counted generously), and per-node level / offset bookkeeping.
    """
    return n * (4 * d + 12 * m + 16)


def choose_factory(n: int, d: int, memory_budget_bytes: int) -> str:
    """Pick a faiss factory string for ``n`` vectors of dimension ``d`` within a memory budget.

    Rules, first match wins (measured on real Caltech-101 features, see BENCHMARKS.md "Indexing at scale"):

    1. ``"Flat"`` (exact) when the raw vectors fit (``n * d * 4 <= budget``) and ``n <= 200_000``.
    2. ``"Flat"`` when ``n < 39 * 256 = 9_984``: too few rows to train 256 IVF lists, and brute force on so few rows
       costs little even past the budget.
    3. ``f"IVF{nlist},SQ8"`` otherwise: 8-bit scalar codes (``d`` bytes a vector) in inverted lists that the build
       merges on disk and a search memory-maps, so the budget bounds only the coarse centroids. PQ codes are not
       chosen: at 64 and 128 bytes they reached recall@10 0.69 and 0.82 against exact search on real features,
       SQ8 0.99. HNSW is not chosen: its graph cannot be built shard by shard and merged.
       ``nlist`` = ``4 * sqrt(n)`` rounded to the nearest power of two, halved until ``n >= 39 * nlist``.

    Args:
        n: number of database vectors.
        d: their dimension.
        memory_budget_bytes: bytes the index may occupy in RAM.

    Returns:
        A string for :func:`faiss.index_factory`, e.g. ``"Flat"``, ``"IVF1024,SQ8"``.

    Raises:
        ValueError: if ``n`` or ``d`` is not positive.
    """
    if n < 1 or d < 1:
        raise ValueError(f"n and d must be positive, got n={n}, d={d}")
    if n * d * 4 <= memory_budget_bytes and n <= FLAT_MAX_ROWS:
        return "Flat"
    if n < _MIN_POINTS_PER_CENTROID * _PQ_CENTROIDS:
        return "Flat"
    return f"IVF{_ivf_nlist(n)},SQ8"


def _as_rows(x: np.ndarray) -> np.ndarray:
    """C-contiguous float32 2-D view/copy, the only layout the faiss Python wrappers accept."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of row vectors, got shape {x.shape}")
    return x


def add_chunks(index: faiss.Index, chunks: Iterable[np.ndarray]) -> int:
    """Add vectors to a trained index chunk by chunk (e.g. streamed from Parquet shards).

    Rows get consecutive ids continuing from ``index.ntotal``, so ids equal database row order.

    Args:
        index: a trained index of dimension ``index.d``.
        chunks: iterable of ``(n_i, d)`` arrays.

    Returns:
        The number of vectors added.

    Raises:
        ValueError: if the index is not trained or a chunk has the wrong dimension.
    """
    if not index.is_trained:
        raise ValueError("index must be trained before adding vectors")
    added = 0
    for chunk in chunks:
        chunk = _as_rows(chunk)
        if chunk.shape[1] != index.d:
            raise ValueError(f"chunk dimension {chunk.shape[1]} != index dimension {index.d}")
        if len(chunk):
            index.add(chunk)
            added += len(chunk)
    return added


def new_index(d: int, factory: str) -> faiss.Index:
    """Create an empty inner-product index from a factory string, configured for this pipeline.

    Use this rather than ``faiss.index_factory`` directly when training an index yourself (e.g. when
    streaming): it turns off PQ polysemous training, which faiss enables by default, costs ~40 s per
    PQ on 2 cores whatever the corpus size, and only serves Hamming-filtered search
    (``polysemous_ht``), which this pipeline does not use.

    Args:
        d: vector dimension.
        factory: :func:`faiss.index_factory` string.

    Returns:
        The untrained (if it needs training), empty index with ``METRIC_INNER_PRODUCT``.
    """
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    # try_extract_index_ivf returns the IndexIVF base class: downcast to see the PQ variant.
    for sub in (faiss.downcast_index(index), faiss.downcast_index(ivf) if ivf is not None else None):
        if isinstance(sub, (faiss.IndexPQ, faiss.IndexIVFPQ)):
            sub.do_polysemous_training = False
    return index


def is_ivf(index: faiss.Index) -> bool:
    """Whether an index is IVF-based (its inverted lists can be merged on disk)."""
    return faiss.try_extract_index_ivf(index) is not None


def is_flat(index: faiss.Index) -> bool:
    """Whether an index is a plain exact ``Flat`` index (partial indexes merge by concatenation)."""
    return isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def build_index(
    x: np.ndarray,
    factory: str,
    train_sample: int = 100_000,
    seed: int = 0,
) -> faiss.Index:
    """Build an inner-product faiss index over the rows of ``x``.

    Args:
        x: ``(N, d)`` database vectors (L2-normalised, so inner product is cosine).
        factory: :func:`faiss.index_factory` string, e.g. from :func:`choose_factory`.
        train_sample: number of rows, drawn with a seeded RNG, used to train indexes that need it
            (IVF, PQ). For IVF it is raised to ``39 * nlist`` when ``N`` allows, faiss's minimum
            for a well-trained coarse quantizer.
        seed: seed of the training-sample draw.

    Returns:
        The trained index holding all ``N`` rows with ids ``0..N-1``.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of row vectors, got shape {x.shape}")
    n, d = x.shape
    index = new_index(d, factory)
    ivf = faiss.try_extract_index_ivf(index)
    if not index.is_trained:
        size = min(n, train_sample)
        if ivf is not None:
            size = min(n, max(size, _MIN_POINTS_PER_CENTROID * ivf.nlist))
        rng = np.random.default_rng(seed)
        # Sorted rows: sequential reads when x is memory-mapped.
        rows = np.sort(rng.choice(n, size=size, replace=False)) if size < n else slice(None)
        index.train(_as_rows(x[rows]))
    add_chunks(index, (x[i : i + _ADD_CHUNK_ROWS] for i in range(0, n, _ADD_CHUNK_ROWS)))
    return index


def set_search_params(
    index: faiss.Index,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> dict[str, int]:
    """Set search-time parameters through :class:`faiss.ParameterSpace`.

    ParameterSpace walks wrappers (IndexPreTransform, IndexRefine, IDMap) to the index that owns the
    parameter, and ``efSearch`` also reaches an HNSW coarse quantizer of an IVF index. A parameter
    that the index does not have (``nprobe`` on ``Flat``) is skipped, so callers can pass their
    configured values whatever :func:`choose_factory` picked.

    Args:
        index: the index to tune in place.
        nprobe: IVF lists visited per query (``None`` leaves it unchanged).
        ef_search: HNSW search queue size (``None`` leaves it unchanged).

    Returns:
        The parameters actually set, by faiss name (e.g. ``{"nprobe": 32}``).
    """
    ps = faiss.ParameterSpace()
    applied: dict[str, int] = {}
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
        if value is None:
            continue
        try:
            ps.set_index_parameter(index, name, int(value))
        except RuntimeError:
            # faiss throws "could not set parameter" when no sub-index has it.
            continue
        applied[name] = int(value)
    return applied


def index_bytes(index: faiss.Index) -> bytes:
    """An index in faiss's native serialised format (what ``faiss.write_index`` writes), as bytes: in memory, so that
    fsspec can write it anywhere (faiss itself only knows local paths)."""
    return faiss.serialize_index(index).tobytes()


def index_from_bytes(data: bytes) -> faiss.Index:
    """An index from :func:`index_bytes` (search parameters such as ``nprobe`` are stored with it)."""
    # A zero-copy uint8 view of the bytes: deserialize_index only reads it.
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def save_index(index: faiss.Index, url: str, storage_options: dict | None = None) -> None:
    """Serialise an index to any fsspec URL (local path, ``file://``, ``s3://`` ...).

    Args:
        index: the index.
        url: destination.
        storage_options: fsspec options (e.g. S3 endpoint and keys).
    """
    storage.write_bytes(url, index_bytes(index), storage_options)


def load_index(url: str, storage_options: dict | None = None) -> faiss.Index:
    """Read an index written by :func:`save_index`.

    Args:
        url: source fsspec URL.
        storage_options: fsspec options.

    Returns:
        The index (search parameters such as ``nprobe`` are stored with it).
    """
    return index_from_bytes(storage.read_bytes(url, storage_options))


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner-product search.

    Args:
        index: a built index.
        queries: ``(Q, d)`` query vectors (L2-normalised).
        k: results per query.

    Returns:
        ``(scores, ids)``: ``(Q, k)`` float32 similarities, best first, and ``(Q, k)`` int64
        database row ids. When fewer than ``k`` results exist, faiss pads with id ``-1``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = _as_rows(queries)
    if q.shape[1] != index.d:
        raise ValueError(f"query dimension {q.shape[1]} != index dimension {index.d}")
    scores, ids = index.search(q, k)
    return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)


def pca_matrix(mean: np.ndarray, components: np.ndarray, eigvals: np.ndarray, whiten: bool,
               eps: float = 1e-12) -> faiss.PCAMatrix:
    """Our PCA (``pipeline.reduce.pca.PCA.project``) as a trained faiss ``PCAMatrix``: ``(x - mean) @ components.T``,
    each output divided by ``sqrt(eigval + eps)`` when whitening.

    Args:
        mean: ``(d_in,)``.
        components: ``(d_out, d_in)`` rows, the axes.
        eigvals: ``(d_out,)`` variances.
        whiten: whether to whiten.
        eps: added to each eigenvalue before the square root (as ``PCA.project``).

    Returns:
        The matrix (holding only these ``d_out`` rows, not faiss' usual ``d_in x d_in``; an index file stores them
        and the linear map made from them: twice the ``.npz``'s axes).
    """
    d_out, d_in = components.shape
    t = faiss.PCAMatrix(d_in, d_out, -0.5 if whiten else 0.0, False)
    t.epsilon = eps
    faiss.copy_array_to_vector(np.ascontiguousarray(mean, np.float32), t.mean)
    faiss.copy_array_to_vector(np.ascontiguousarray(eigvals, np.float32), t.eigenvalues)
    faiss.copy_array_to_vector(np.ascontiguousarray(components, np.float32).ravel(), t.PCAMat)
    t.prepare_Ab()
    t.is_trained = True
    return t


def with_pca(index: faiss.Index, pca: faiss.PCAMatrix) -> faiss.IndexPreTransform:
    """``index`` (over L2-normalised PCA outputs) behind its PCA and the L2 normalisation: an index that standard faiss
    tooling searches with the vectors before PCA. The wrapper does not own ``index``."""
    wrapped = faiss.IndexPreTransform(faiss.NormalizationTransform(pca.d_out, 2.0), index)
    wrapped.prepend_transform(pca)
    return wrapped


def unwrap(index: faiss.Index) -> faiss.Index:
    """The index inside an ``IndexPreTransform`` (searched with PCA outputs, as the Searcher does), else ``index``.
    The inner index keeps its wrapper alive (the wrapper read from a file owns and frees it)."""
    if not isinstance(index, faiss.IndexPreTransform):
        return index
    inner = faiss.downcast_index(index.index)
    # faiss's own slot for objects a wrapper must keep alive (other attributes are refused by its SWIG classes).
    inner.referenced_objects = [index]
    return inner


def name_ivfdata(index: faiss.Index, file_name: str) -> None:
    """Record ``file_name`` (a bare name) as where an on-disk IVF index's lists live, instead of the path they were
    written to: the index file then names the ``.ivfdata`` beside it (``faiss.IO_FLAG_ONDISK_SAME_DIR``, or a reader
    whose working directory is the folder), and two builds of the same data write the same bytes."""
    ivf = faiss.extract_index_ivf(index)
    faiss.downcast_InvertedLists(ivf.invlists).filename = file_name
