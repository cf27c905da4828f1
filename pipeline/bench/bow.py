"""SIFT bag-of-visual-words baseline: vocabulary, tf-idf encoding, inverted-file-free dense scoring."""

from __future__ import annotations

import io
import multiprocessing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import faiss
import numpy as np

from pipeline.io import storage

SIFT_DIM = 128

# Descriptors are assigned to words in batches of at most this many rows so that encoding a whole collection
# (9k images x 500 descriptors x 128 floats is ~2.3 GB) never needs every descriptor in memory at once.
_ENCODE_BATCH_ROWS = 1_000_000


def sift_descriptors(image_rgb: np.ndarray, max_features: int = 500, root_sift: bool = True) -> np.ndarray:
    """Detect SIFT keypoints on one image and describe them.

    Args:
        image_rgb: ``(H, W, 3)`` uint8 RGB image (a ``(H, W)`` grayscale uint8 image is accepted as well).
        max_features: keep at most this many keypoints, the strongest by detector response; ``<= 0`` keeps all.
        root_sift: apply RootSIFT (Arandjelovic & Zisserman, CVPR 2012): L1-normalise each descriptor, then take
            the element-wise square root, so that Euclidean distance between descriptors matches the Hellinger
            kernel on the original histograms. Rows then have unit L2 norm.

    Returns:
        ``(n, 128)`` float32 descriptors, one row per keypoint; ``(0, 128)`` when no keypoint is found.
    """
    image = np.asarray(image_rgb)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 3:
        gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    elif image.ndim == 2:
        gray = np.ascontiguousarray(image)
    else:
        raise ValueError(f"expected an (H, W, 3) RGB or (H, W) gray image, got shape {image.shape}")

    # nfeatures=0 means "no limit" to OpenCV, which matches our "<= 0 keeps all" contract.
    sift = cv2.SIFT_create(nfeatures=max(int(max_features), 0))
    keypoints, desc = sift.detectAndCompute(gray, None)
    if desc is None or len(keypoints) == 0:
        return np.zeros((0, SIFT_DIM), dtype=np.float32)
    desc = np.asarray(desc, dtype=np.float32)

    # OpenCV's nfeatures cap keeps every keypoint tied with the weakest retained response, and one keypoint with
    # several dominant orientations yields several descriptors, so it can return more than asked: enforce the cap.
    if max_features > 0 and desc.shape[0] > max_features:
        responses = np.array([kp.response for kp in keypoints], dtype=np.float32)
        keep = np.sort(np.argsort(-responses, kind="stable")[:max_features])
        desc = desc[keep]

    if root_sift:
        # SIFT histograms are non-negative, so sqrt of the L1-normalised row has unit L2 norm by construction.
        l1 = np.abs(desc).sum(axis=1, keepdims=True)
        desc = np.sqrt(desc / np.maximum(l1, np.finfo(np.float32).tiny))
    return np.ascontiguousarray(desc, dtype=np.float32)


def _init_worker() -> None:
    """Pool initialiser: OpenCV single-threaded in each worker process."""
    # Each pool process already owns a core; OpenCV's internal thread pool would only oversubscribe them.
    cv2.setNumThreads(1)


def _sift_job(args: tuple[np.ndarray, int, bool]) -> np.ndarray:
    """:func:`sift_descriptors` of one ``(image, max_features, root_sift)`` job (a picklable pool task)."""
    image, max_features, root_sift = args
    return sift_descriptors(image, max_features=max_features, root_sift=root_sift)


def extract_sift_many(
    images: Iterable[np.ndarray],
    workers: int = 0,
    max_features: int = 500,
    root_sift: bool = True,
) -> list[np.ndarray]:
    """Run :func:`sift_descriptors` over many images, optionally in a process pool.

    Args:
        images: RGB uint8 images (see :func:`sift_descriptors`).
        workers: ``0`` or ``1`` runs in this process; ``> 1`` uses a pool of that many processes, each with
            OpenCV limited to one thread. The pool uses the "spawn" start method, so a calling script needs the
            usual ``if __name__ == "__main__":`` guard.
        max_features: passed to :func:`sift_descriptors`.
        root_sift: passed to :func:`sift_descriptors`.

    Returns:
        One ``(n_i, 128)`` float32 array per image, in input order.
    """
    if workers <= 1:
        return [sift_descriptors(im, max_features=max_features, root_sift=root_sift) for im in images]
    jobs = ((im, max_features, root_sift) for im in images)
    # "spawn" rather than the Linux default "fork": the parent may already run faiss/OpenMP or OpenCV threads,
    # and forking a process that holds such thread pools can deadlock the child.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes=workers, initializer=_init_worker) as pool:
        # imap keeps input order; a modest chunksize amortises pickling without starving the last worker.
        return list(pool.imap(_sift_job, jobs, chunksize=8))


def _check_descriptor_set(desc: np.ndarray) -> np.ndarray:
    """A descriptor set as ``(n, 128)`` float32 (an empty set of any shape becomes ``(0, 128)``)."""
    arr = np.asarray(desc, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != SIFT_DIM:
        if arr.size == 0:
            return np.zeros((0, SIFT_DIM), dtype=np.float32)
        raise ValueError(f"expected an (n, {SIFT_DIM}) descriptor array, got shape {arr.shape}")
    return arr


@dataclass
class BowModel:
    """A visual vocabulary with idf weights.

    Attributes:
        centroids: ``(k, 128)`` float32 visual words.
        idf: ``(k,)`` float32 inverse document frequencies, ``log(N / (1 + df))`` over the fitting images.
    """

    centroids: np.ndarray
    idf: np.ndarray

    def __post_init__(self) -> None:
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        self.idf = np.ascontiguousarray(self.idf, dtype=np.float32).reshape(-1)
        if self.centroids.ndim != 2 or self.centroids.shape[1] != SIFT_DIM:
            raise ValueError(f"centroids must be (k, {SIFT_DIM}), got {self.centroids.shape}")
        if self.idf.shape != (self.centroids.shape[0],):
            raise ValueError(f"idf must be ({self.centroids.shape[0]},), got {self.idf.shape}")

    @property
    def k(self) -> int:
        """Vocabulary size."""
        return int(self.centroids.shape[0])

    @classmethod
    def fit(
        cls,
        descriptor_sets: list[np.ndarray],
        k: int = 1000,
        sample: int = 200_000,
        seed: int = 0,
        niter: int = 20,
    ) -> BowModel:
        """Learn a vocabulary with k-means and idf weights from per-image descriptor sets.

        Args:
            descriptor_sets: one ``(n_i, 128)`` array per fitting image (empty sets allowed; they count in N).
            k: vocabulary size.
            sample: k-means trains on at most this many descriptors, drawn uniformly without replacement with
                ``seed``; idf is still computed on every descriptor of every set.
            seed: seeds both the descriptor sample and faiss's k-means initialisation.
            niter: k-means iterations.

        Returns:
            The fitted model.

        Raises:
            ValueError: when there are fewer descriptors than ``k`` (k-means cannot place k distinct centroids).
        """
        sets = [_check_descriptor_set(d) for d in descriptor_sets]
        if not sets:
            raise ValueError("need at least one descriptor set to fit a vocabulary")
        lengths = np.array([s.shape[0] for s in sets], dtype=np.int64)
        total = int(lengths.sum())
        if total < k:
            raise ValueError(f"k-means needs at least k={k} descriptors, got {total}")

        rng = np.random.default_rng(seed)
        if total > sample:
            # Sample global row indices and gather per set, instead of concatenating every descriptor first:
            # the full collection can be several GB while the sample is a few hundred MB at most.
            rows = np.sort(rng.choice(total, size=sample, replace=False))
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            owner = np.searchsorted(offsets, rows, side="right") - 1
            train = np.empty((sample, SIFT_DIM), dtype=np.float32)
            for i in np.unique(owner):
                sel = owner == i
                train[sel] = sets[i][rows[sel] - offsets[i]]
        else:
            train = np.concatenate(sets, axis=0)

        km = faiss.Kmeans(
            SIFT_DIM,
            k,
            niter=niter,
            seed=seed,
            verbose=False,
            # `sample` is the knob for training-set size; stop faiss from silently subsampling it again.
            max_points_per_centroid=int(np.ceil(train.shape[0] / k)) + 1,
        )
        km.train(np.ascontiguousarray(train))
        centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)

        # Document frequencies come from the same hard assignment that encode() uses, so idf and tf agree.
        provisional = cls(centroids=centroids, idf=np.ones(k, dtype=np.float32))
        counts = provisional._counts(sets)
        df = (counts > 0).sum(axis=0).astype(np.float64)
        n_docs = float(len(sets))
        # The "+1" keeps never-seen words finite. Note it makes idf slightly negative (at most log(1 + 1/N) in
        # magnitude) for a word present in every image; such words carry essentially no weight either way.
        idf = np.log(n_docs / (1.0 + df)).astype(np.float32)
        return cls(centroids=centroids, idf=idf)

    def _counts(self, descriptor_sets: Sequence[np.ndarray]) -> np.ndarray:
        """Term-frequency histograms: ``(n, k)`` float32 counts of hard-assigned visual words per set."""
        sets = [_check_descriptor_set(d) for d in descriptor_sets]
        k = self.k
        counts = np.zeros((len(sets), k), dtype=np.float32)
        index = faiss.IndexFlatL2(SIFT_DIM)
        index.add(self.centroids)

        start = 0
        while start < len(sets):
            # Gather whole images until the batch is full (always at least one image per batch).
            stop, rows = start, 0
            while stop < len(sets) and (stop == start or rows + sets[stop].shape[0] <= _ENCODE_BATCH_ROWS):
                rows += sets[stop].shape[0]
                stop += 1
            if rows:
                batch = np.ascontiguousarray(np.concatenate(sets[start:stop], axis=0))
                _, words = index.search(batch, 1)
                owner = np.repeat(np.arange(stop - start), [s.shape[0] for s in sets[start:stop]])
                flat = np.bincount(owner * k + words[:, 0], minlength=(stop - start) * k)
                counts[start:stop] = flat.reshape(stop - start, k)
            start = stop
        return counts

    def encode(self, descriptor_sets: Sequence[np.ndarray]) -> np.ndarray:
        """Encode descriptor sets as L2-normalised tf-idf vectors.

        Args:
            descriptor_sets: one ``(n_i, 128)`` float32 array per image.

        Returns:
            ``(n, k)`` float32 rows with unit L2 norm, so inner product is cosine similarity; images without
            descriptors (or whose words all have zero idf) give a zero row.
        """
        # Raw counts are fine as tf: any per-image scaling of tf cancels in the final L2 normalisation.
        weighted = self._counts(descriptor_sets) * self.idf[None, :]
        norms = np.linalg.norm(weighted, axis=1, keepdims=True)
        out = np.divide(weighted, norms, out=np.zeros_like(weighted), where=norms > 0)
        return out.astype(np.float32, copy=False)

    def save(self, url: str) -> None:
        """Write the model as an ``.npz`` file.

        Args:
            url: any fsspec URL or local path; local parent folders are created.
        """
        buf = io.BytesIO()
        np.savez(buf, centroids=self.centroids, idf=self.idf)
        storage.write_bytes(url, buf.getvalue())  # creates local parent folders; object stores have none

    @classmethod
    def load(cls, url: str) -> BowModel:
        """Read a model written by :meth:`save`.

        Args:
            url: any fsspec URL or local path.

        Returns:
            The model.
        """
        data = storage.read_bytes(url)
        # np.load needs a seekable file object.
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return cls(centroids=npz["centroids"], idf=npz["idf"])
