"""Job configs: one frozen dataclass per job, strict parsing from CLI flags or dicts, a stable config hash."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.coercion import coerce_value

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO_ROOT / "data" / "caltech8"

BACKBONES = ("mobilenet_v2", "vgg16", "resnet50")
PROPOSERS = ("activation", "rpn")
REGION_POOLS = ("gem", "mac", "spoc")
PRECISIONS = ("float32", "bfloat16", "float16")
PROTOCOLS = ("category", "oxford", "revisited", "labels")
# The global part of the fused vector (paper 2.4): the paper's global CNN feature, R-MAC instead, or both side by side.
# One option decides it everywhere (index build, search queries, the benchmark's `ours`): pipeline.reduce.pca.
FUSE_GLOBALS = ("global", "rmac", "global+rmac")

# Keys whose values may carry credentials: never logged, hashed or written to manifests.
SECRET_FIELDS = ("storage_options",)

T = TypeVar("T")


def _opt(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with CLI metadata (help text, choices, a required flag)."""
    return field(default=default, metadata={"help": help, **meta})


class ConfigError(ValueError):
    """A config value or key is invalid."""


Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in an image's original pixels


def parse_box(text: str) -> Box:
    """``"x1,y1,x2,y2"`` -> a box (original pixels).

    Raises:
        ValueError: not four numbers, or not ``x1 < x2`` and ``y1 < y2``.
    """
    parts = [p.strip() for p in str(text).split(",")]
    try:
        box = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"box {text!r}: expected x1,y1,x2,y2 (numbers)") from None
    if len(box) != 4 or not all(math.isfinite(v) for v in box) or not (box[0] < box[2] and box[1] < box[3]):
        raise ValueError(f"box {text!r}: expected x1,y1,x2,y2 with x1 < x2 and y1 < y2")
    return box  # type: ignore[return-value]


def storage_field() -> Any:
    """The ``storage_options`` field every job config that touches storage has (JSON text, a secret)."""
    return _opt("", "JSON of fsspec storage options (never logged)")


class HasStorage:
    """Mixin for configs with a ``storage_options`` field: ``fs_options`` is it parsed, once per config object."""

    storage_options: str

    @functools.cached_property
    def fs_options(self) -> dict[str, Any]:
        """The parsed storage options (validated: a ConfigError when they are not a JSON object)."""
        return parse_storage_options(self.storage_options)


def _like(cls: type, name: str, **meta: Any) -> Any:
    """A field with the default and CLI metadata of field ``name`` of config ``cls`` (``meta`` overrides)."""
    f = cls.__dataclass_fields__[name]  # type: ignore[attr-defined]
    return field(default=f.default, metadata={**f.metadata, **meta})


def _part(cfg: Any, cls: type[T], **values: Any) -> T:
    """A ``cls`` config from the fields of ``cfg`` that ``cls`` has, plus ``values`` (not validated)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in names}, **values)


def _check_choices(cfg: Any) -> None:
    """Raise ConfigError for a field value outside the field's ``choices`` (also for configs built directly or with
    dataclasses.replace, which bypass from_dict)."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"{f.name}: {getattr(cfg, f.name)!r} is not one of {list(choices)}")


def _check_finite(cfg: Any) -> None:
    """Raise ConfigError for NaN or infinite float fields (argparse's float() accepts "nan" and "inf")."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{f.name}: expected a finite number, got {v!r}")


@dataclass(frozen=True)
class ModelConfig:
    """What determines the model's output: hashed into every row it produces."""

    backbone: str = _opt("mobilenet_v2", "CNN backbone", choices=BACKBONES)
    proposer: str = _opt("activation", "region proposer: training-free activation regions, or a trained RPN", choices=PROPOSERS)
    regions: int = _opt(12, "top-K regions kept per image, over all region scales (12: best measured, see BENCHMARKS.md)")
    max_side: int = _opt(448, "longer image side fed to the CNN, in pixels (aspect kept)")
    region_scales: str = _opt("0.7,1", "comma-separated image scales, relative to max_side, at which regions are "
                                       "proposed and described (a pyramid; 1 alone = one level); global descriptors "
                                       "use scale 1 only")
    nms_iou: float = _opt(0.5, "NMS IoU threshold between the activation proposer's candidate regions")
    region_pool: str = _opt("gem", "pooling of RoI features into a region descriptor (non-VGG backbones)", choices=REGION_POOLS)
    checkpoint: str = _opt("", "URL of a trained region-model checkpoint (required for --proposer rpn)")
    random_weights: bool = _opt(False, "use random backbone weights (tests only; never the default)")
    # Hashed only when set (hash_default=False): outputs extracted before the option existed keep their hash.
    precision: str = _opt("float32", "arithmetic of the backbone and region head: float32, or bfloat16/float16 "
                                     "autocast (mixed precision; GPU; see BENCHMARKS.md for its effect on retrieval)",
                          choices=PRECISIONS, hash_default=False)

    def validate(self) -> None:
        """Raise ConfigError for values outside their domain."""
        _check_choices(self)
        _check_finite(self)
        if self.regions < 1 or self.regions > 1000:
            raise ConfigError(f"regions must be in [1, 1000], got {self.regions}")
        if self.max_side < 32 or self.max_side > 4096:
            raise ConfigError(f"max_side must be in [32, 4096], got {self.max_side}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ConfigError(f"nms_iou must be in (0, 1], got {self.nms_iou}")
        self.scales()
        if self.proposer == "rpn" and not self.checkpoint:
            raise ConfigError("--proposer rpn needs --checkpoint URL of a trained region model")

    def scales(self) -> tuple[float, ...]:
        """The region scales, parsed and checked (ascending, distinct).

        Raises:
            ConfigError: a value that is not a number in (0, 4], a repeated scale, or a scale that makes the longer
                side shorter than 32 pixels.
        """
        out = []
        for part in self.region_scales.split(","):
            try:
                v = float(part)
            except ValueError:
                raise ConfigError(f"region_scales: {part.strip()!r} is not a number") from None
            if not (math.isfinite(v) and 0.0 < v <= 4.0):
                raise ConfigError(f"region_scales: {v} is not in (0, 4]")
            if round(v * self.max_side) < 32:
                raise ConfigError(f"region_scales: {v} x max_side {self.max_side} is under 32 pixels")
            out.append(v)
        if len(set(out)) != len(out):
            raise ConfigError(f"region_scales: repeated scale in {self.region_scales!r}")
        return tuple(sorted(out))

    def model_hash(self) -> str:
        """A short stable hash of everything that changes the model's output."""
        return config_hash(self)


@dataclass(frozen=True)
class ExtractConfig(ModelConfig, HasStorage):
    """`jobs/extract.py`: images under --input -> Parquet features under --output."""

    input: str = _opt("", "directory/prefix URL of images, or a manifest (.parquet/.csv); default: the embedded sample")
    output: str = _opt("", "output URL (local path, file://, s3://...)", required=True)
    shard_size: int = _opt(256, "images per shard (the unit of work, failure and retry)")
    batch_size: int = _opt(16, "images per forward pass")
    num_actors: int = _opt(0, "model actors; 0 = one per GPU, or on a CPU-only cluster one per actor_cpus CPUs "
                              "(each decoding its own shards)")
    num_gpus: float = _opt(-1.0, "GPUs per model actor; -1 = 1 when the cluster has GPUs, else 0")
    threads: int = _opt(0, "torch CPU threads per actor; 0 = auto: the actor's reserved CPUs (all cores in-process)")
    actor_cpus: float = _opt(1.0, "CPUs reserved per model actor")
    prefetch: int = _opt(2, "shards in flight per actor, decoded ahead of it (pipelining decode with inference)")
    pad_step: int = _opt(0, "pad each batch to its largest image rounded up to this many pixels, so batches come "
                            "in fewer shapes (GPU autotuning pays once per shape); 0: to the backbone's stride. More "
                            "padding changes features near image borders (see BENCHMARKS.md)")
    float16: bool = _opt(False, "store vectors as float16 (half the bytes)")
    max_pixels: int = _opt(89_478_485, "refuse images with more pixels (decompression bombs)")
    max_image_bytes: int = _opt(256 * 2**20, "refuse image files of more bytes, unread (status too_large): a huge or "
                                             "endless file cannot exhaust a worker's memory")
    allow_empty: bool = _opt(False, "run even when the input lists no images (an existing output's images are "
                                    "then all recorded as deleted); without it an empty input is an error")
    storage_options: str = storage_field()
    in_process: bool = _opt(False, "run in this process without Ray (single machine, debugging)")

    def validate(self) -> None:
        super().validate()
        if not self.output:
            raise ConfigError("--output is required")
        for name in ("shard_size", "batch_size", "prefetch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.pad_step < 0 or self.pad_step > self.max_side:
            raise ConfigError(f"pad_step must be in [0, max_side], got {self.pad_step}")
        if self.num_actors < 0 or self.threads < 0 or self.actor_cpus < 0:
            raise ConfigError("num_actors, threads and actor_cpus must be >= 0")
        if self.num_gpus < 0 and self.num_gpus != -1:
            raise ConfigError(f"num_gpus must be -1 (auto) or >= 0, got {self.num_gpus}")
        for name in ("max_pixels", "max_image_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.fs_options  # noqa: B018 - parses (and caches) the options: a ConfigError now, not mid-run

    def model_config(self) -> ModelConfig:
        """The model part of this config."""
        return _part(self, ModelConfig)


@dataclass(frozen=True)
class IndexConfig(HasStorage):
    """`jobs/index.py`: Parquet features -> PCA + faiss indexes."""

    features: str = _opt("", "URL of an extraction output", required=True)
    output: str = _opt("", "URL of the index output", required=True)
    pca_dim: int = _opt(512, "PCA output dimension (clipped to the data)")
    whiten: bool = _opt(False, "PCA whitening")
    local_weight: float = _opt(1.0, "weight of the L2-normalised local feature in the fused vector")
    # global+rmac: chosen on the Caltech-101 tune list and held on the unseen lists and on Paris (BENCHMARKS.md, issue 16).
    fuse_global: str = _opt("global+rmac", "global part of the fused vector: the paper's global CNN feature, R-MAC, or "
                                           "both L2-normalised side by side (recorded in the index; search follows it)",
                            choices=FUSE_GLOBALS)
    pca_sample: int = _opt(100_000, "images sampled to fit PCA")
    factory: str = _opt("", "faiss index-factory string; default: chosen from corpus size and memory budget")
    memory_budget_gb: float = _opt(8.0, "memory budget for each index, GiB")
    nprobe: int = _opt(32, "IVF lists visited per query (saved in the index)")
    ef_search: int = _opt(128, "HNSW search queue size (saved in the index)")
    region_codec: str = _opt("int8", "codec of the region store (re-ranking)", choices=("int8", "float16"))
    recall_queries: int = _opt(500, "corpus images sampled as queries to measure recall@10 against exact search")
    workers: int = _opt(0, "index-build tasks running at once on Ray (0 = the cluster's CPUs)")
    in_process: bool = _like(ExtractConfig, "in_process")  # the build's tasks in this process (small corpora, tests)
    storage_options: str = storage_field()

    def validate(self) -> None:
        _check_choices(self)
        _check_finite(self)
        if self.recall_queries < 1 or self.workers < 0:
            raise ConfigError("recall_queries must be >= 1 and workers >= 0")
        if not self.features or not self.output:
            raise ConfigError("--features and --output are required")
        if self.pca_dim < 1 or self.pca_sample < 1 or self.memory_budget_gb <= 0 or self.local_weight < 0 \
                or self.nprobe < 1 or self.ef_search < 1:
            raise ConfigError("pca_dim, pca_sample, memory_budget_gb must be > 0 and local_weight >= 0")
        self.fs_options  # noqa: B018 - parses (and caches) the options: a ConfigError now, not mid-run


MIN_KEEP = 2  # versions a re-index keeps at least: a reader that resolved the pointer before a publish still finds its


@dataclass(frozen=True)
class ReindexConfig(ModelConfig, HasStorage):
    """`jobs/reindex.py`: the extraction's and the index build's options, plus the root's.

    The extraction writes ``<root>/features`` and each index build a new version under the root (see
    ``pipeline.store.versions``), so neither ``--output`` nor ``--features`` is an option here.
    """

    # The extraction's options (ExtractConfig's, but the model's, which come from ModelConfig, and --output).
    input: str = _like(ExtractConfig, "input", help="directory/prefix URL of images, or a manifest (.parquet/.csv) "
                                                    "(required unless --rollback)")
    shard_size: int = _like(ExtractConfig, "shard_size")
    batch_size: int = _like(ExtractConfig, "batch_size")
    num_actors: int = _like(ExtractConfig, "num_actors")
    num_gpus: float = _like(ExtractConfig, "num_gpus")
    threads: int = _like(ExtractConfig, "threads")
    actor_cpus: float = _like(ExtractConfig, "actor_cpus")
    prefetch: int = _like(ExtractConfig, "prefetch")
    pad_step: int = _like(ExtractConfig, "pad_step")
    float16: bool = _like(ExtractConfig, "float16")
    max_pixels: int = _like(ExtractConfig, "max_pixels")
    max_image_bytes: int = _like(ExtractConfig, "max_image_bytes")
    allow_empty: bool = _like(ExtractConfig, "allow_empty")
    storage_options: str = storage_field()
    in_process: bool = _like(ExtractConfig, "in_process")
    # The index build's options (IndexConfig's, but --features, --output and --storage-options).
    pca_dim: int = _like(IndexConfig, "pca_dim")
    whiten: bool = _like(IndexConfig, "whiten")
    local_weight: float = _like(IndexConfig, "local_weight")
    fuse_global: str = _like(IndexConfig, "fuse_global")
    pca_sample: int = _like(IndexConfig, "pca_sample")
    factory: str = _like(IndexConfig, "factory")
    memory_budget_gb: float = _like(IndexConfig, "memory_budget_gb")
    nprobe: int = _like(IndexConfig, "nprobe")
    ef_search: int = _like(IndexConfig, "ef_search")
    region_codec: str = _like(IndexConfig, "region_codec")
    recall_queries: int = _like(IndexConfig, "recall_queries")
    workers: int = _like(IndexConfig, "workers")
    # The root's.
    root: str = _opt("", "root URL: features/, versions/ and the CURRENT pointer live under it", required=True)
    keep: int = _opt(3, f"complete index versions kept (>= {MIN_KEEP}); older ones are deleted")
    force: bool = _opt(False, "build and publish a new version even when no image changed")
    rollback: bool = _opt(False, "point CURRENT back at the previous complete version, then exit (no --input)")

    def validate(self) -> None:
        super().validate()
        if not self.root:
            raise ConfigError("--root is required")
        if self.rollback:
            return
        if not self.input:
            raise ConfigError("--input is required (unless --rollback)")
        if self.keep < MIN_KEEP:
            raise ConfigError(f"--keep must be >= {MIN_KEEP}")
        self.extract_config()
        self.index_config("unused")

    def features_url(self) -> str:
        """Where the extraction writes: ``<root>/features``."""
        from pipeline.store.versions import (
            features_url,  # lazily: configs import no storage code
        )

        return features_url(self.root)

    def extract_config(self) -> ExtractConfig:
        """The extraction part: ``--input`` into ``<root>/features`` (validated)."""
        cfg = _part(self, ExtractConfig, output=self.features_url())
        cfg.validate()
        return cfg

    def index_config(self, output: str) -> IndexConfig:
        """The index build part: ``<root>/features`` into ``output`` (validated)."""
        cfg = _part(self, IndexConfig, features=self.features_url(), output=output)
        cfg.validate()
        return cfg


@dataclass(frozen=True)
class SearchConfig(HasStorage):
    """`jobs/search.py`: one query image (or a region of it), or a folder/manifest of queries, against a built index."""

    index: str = _opt("", "URL of an index output (jobs/index.py)", required=True)
    image: str = _opt("", "query image path or URL (one query; or --queries)")
    box: str = _opt("", "search with this region of --image only: x1,y1,x2,y2 in original pixels")
    queries: str = _opt("", "batch search: a folder of query images or a Parquet/CSV manifest (instead of --image)")
    boxes: str = _opt("", "batch search: CSV query_id,x1,y1,x2,y2 of query regions (queries not listed: whole image)")
    output: str = _opt("", "batch search: results Parquet URL (one row per query and rank)")
    batch_size: int = _opt(32, "batch search: queries described and searched together")
    top_k: int = _opt(10, "results per query")
    rerank: int = _opt(0, "re-rank the top-N by region similarity (paper 2.5); 0 = off")
    rerank_mode: str = _opt("regions", "re-rank similarity: regions (query regions vs candidate regions) or gem "
                            "(the query's whole GeM vs candidate regions)", choices=("regions", "gem"))
    qe: int = _opt(0, "average query expansion with the top-k; 0 = off")
    space: str = _opt("fused", "which index to search: fused (paper 2.4) or crow (2.5)", choices=("fused", "crow"))
    json: bool = _opt(False, "print JSON instead of a table")
    sheet: str = _opt("", "write a PNG of the query (with its box) and the hits with their matched regions")
    storage_options: str = storage_field()

    def validate(self) -> None:
        _check_choices(self)
        if not self.index or bool(self.image) == bool(self.queries):
            raise ConfigError("--index and one of --image or --queries are required")
        if self.queries and (not self.output or self.box or self.sheet or self.json):
            raise ConfigError("--queries needs --output and takes --boxes, not --box, --sheet or --json")
        if self.image and (self.boxes or self.output):
            raise ConfigError("--boxes and --output go with --queries; one image takes --box")
        if self.top_k < 1 or self.rerank < 0 or self.qe < 0 or self.batch_size < 1:
            raise ConfigError("top_k and batch_size must be >= 1; rerank and qe >= 0")
        if self.box:
            try:
                parse_box(self.box)
            except ValueError as e:
                raise ConfigError(f"--box: {e}") from None
        self.fs_options  # noqa: B018 - parses (and caches) the options: a ConfigError now, not mid-run


@dataclass(frozen=True)
class BenchmarkConfig(ModelConfig, HasStorage):
    """`jobs/benchmark.py`: a retrieval protocol over a dataset -> report.json + Markdown table + pictures."""

    dataset: str = _opt("", "dataset root directory; default: the embedded sample")
    protocol: str = _opt("category", "evaluation protocol", choices=PROTOCOLS)
    queries: str = _opt("", "query list file (paths relative to the dataset root); default: a seeded random 5%")
    query_boxes: str = _opt("", "labels/category protocols: query regions instead of whole images, a CSV "
                            "path,x1,y1,x2,y2 (original pixels); each crop is described by the features' model")
    features: str = _opt("", "reuse an earlier extraction at this URL instead of extracting")
    report: str = _opt("", "output URL for report.json and pictures", required=True)
    k: int = _opt(10, "k of top-k precision (category protocol)")
    methods: str = _opt("", "comma-separated methods; default: all that apply to the protocol")
    merge_faces: bool = _opt(True, "Caltech-101: count Faces and Faces_easy as one class (same photographs)")
    pca_dim: int = _opt(512, "PCA dimension for the fused feature")
    local_weight: float = _opt(1.0, "weight of the local feature in the fused vector")
    fuse_global: str = _like(IndexConfig, "fuse_global", help="global part of `ours` fused with the local feature "
                             "(as the index build's --fuse-global): the paper's global CNN feature, R-MAC, or both")
    rerank: int = _opt(100, "top-N re-ranked by regions (crow+rerank)")
    qe: int = _opt(5, "query expansion depth")
    bow_words: int = _opt(1000, "BoW vocabulary size")
    dba_k: int = _opt(20, "ours+dba: neighbours averaged into each database vector")
    dba_alpha: float = _opt(3.0, "ours+dba: neighbour weight exponent (similarity ** alpha; 0 = plain average)")
    diffusion_k: int = _opt(20, "ours+diffusion: neighbours per image in the database graph")
    diffusion_alpha: float = _opt(0.8, "ours+diffusion: diffusion strength in [0, 1)")
    diffusion_seeds: int = _opt(5, "ours+diffusion: query neighbours that seed the diffusion")
    kr_k1: int = _opt(30, "ours+kr: k of the k-reciprocal neighbour sets")
    kr_k2: int = _opt(6, "ours+kr: neighbours averaged into each encoding (local query expansion; 1 = none)")
    kr_lambda: float = _opt(0.3, "ours+kr: weight of the original distance against the Jaccard distance, in [0, 1]")
    figure_queries: int = _opt(4, "queries shown in the results picture")
    seed: int = _opt(0, "seed of the random query sample")
    tune_seed: int = _opt(-1, "tune on one query list, report on others: the tune list's seed (category: the "
                              "stratified 5% sample; labels: half of each label's queries); -1 = one query list")
    report_seeds: str = _opt("1,2,3,4,5", "with --tune-seed, category protocol: seeds of the report lists (5% "
                                          "samples disjoint from the tune list); labels: the other half is reported")
    batch_size: int = _opt(16, "images per forward pass when extracting")
    shard_size: int = _opt(256, "images per shard when extracting")
    storage_options: str = storage_field()

    def validate(self) -> None:
        super().validate()
        if not self.report:
            raise ConfigError("--report is required")
        if self.k < 1 or self.rerank < 0 or self.qe < 0 or self.pca_dim < 1:
            raise ConfigError("k, pca_dim must be >= 1; rerank, qe >= 0")
        if self.dba_k < 0 or self.diffusion_k < 1 or self.diffusion_seeds < 1 or not 0 <= self.diffusion_alpha < 1:
            raise ConfigError("dba_k must be >= 0; diffusion_k, diffusion_seeds >= 1; diffusion_alpha in [0, 1)")
        if self.kr_k1 < 1 or self.kr_k2 < 1 or not 0 <= self.kr_lambda <= 1:
            raise ConfigError("kr_k1, kr_k2 must be >= 1; kr_lambda in [0, 1]")
        if self.tune_seed < -1:
            raise ConfigError("--tune-seed must be >= 0, or -1 for one query list")
        if self.tune_seed >= 0 and self.protocol not in ("category", "labels"):
            raise ConfigError(f"--tune-seed: the {self.protocol} protocol has fixed queries (category or labels only)")
        self.report_seed_list()

    def report_seed_list(self) -> list[int]:
        """The ``--report-seeds`` as ints (distinct, at least one).

        Raises:
            ConfigError: on a value that is not a comma-separated list of distinct non-negative ints.
        """
        try:
            seeds = [int(s) for s in self.report_seeds.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--report-seeds must be comma-separated ints, got {self.report_seeds!r}") from None
        if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ConfigError(f"--report-seeds needs distinct non-negative seeds, got {self.report_seeds!r}")
        return seeds
        self.fs_options  # noqa: B018 - parses (and caches) the options: a ConfigError now, not mid-run

    def model_config(self) -> ModelConfig:
        """The model part of this config."""
        return _part(self, ModelConfig)


@dataclass(frozen=True)
class CompactConfig(HasStorage):
    """`jobs/compact.py`: rewrite an extraction output's mostly superseded shards (pipeline.store.compact)."""

    features: str = _opt("", "URL of an extraction output", required=True)
    max_live_fraction: float = _opt(0.5, "rewrite shards whose live rows are at most this share of their rows")
    shard_size: int = _opt(0, "images per new shard; 0 = the largest shard already there")
    storage_options: str = storage_field()

    def validate(self) -> None:
        _check_finite(self)
        if not self.features:
            raise ConfigError("--features is required")
        if not 0 <= self.max_live_fraction <= 1 or self.shard_size < 0:
            raise ConfigError(f"max_live_fraction must be in [0, 1] and shard_size >= 0, got "
                              f"{self.max_live_fraction}, {self.shard_size}")
        self.fs_options  # noqa: B018 - parses (and caches) the options: a ConfigError now, not mid-run


def parse_storage_options(text: str) -> dict[str, Any]:
    """Parse the JSON storage options of a config (empty -> {}).

    Args:
        text: a JSON object or an empty string.

    Returns:
        The options dict.

    Raises:
        ConfigError: when it is not a JSON object.
    """
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--storage-options is not valid JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise ConfigError("--storage-options must be a JSON object")
    return value


def public_dict(cfg: Any) -> dict[str, Any]:
    """The config as a dict with secret fields redacted: what may be logged and written beside outputs."""
    d = dataclasses.asdict(cfg)
    for k in SECRET_FIELDS:
        if d.get(k):
            d[k] = "<redacted>"
    return d


def config_hash(cfg: Any) -> str:
    """A short stable hash of a config's public fields (sorted JSON, sha256, 12 hex)."""
    # A field marked hash_default=False is left out while it holds its default, so adding such a field to a config
    # does not change the hash of configs that do not use it.
    skip = {f.name for f in dataclasses.fields(cfg)
            if f.metadata.get("hash_default", True) is False and getattr(cfg, f.name) == f.default}
    blob = json.dumps({k: v for k, v in public_dict(cfg).items() if k not in SECRET_FIELDS and k not in skip},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _coerce(name: str, typ: Any, value: Any) -> Any:
    """Convert and type-check one value for a dataclass field (``pipeline.coercion``); the value of a secret field
    never appears in an error message."""
    try:
        return coerce_value(typ, value)
    except ValueError as e:
        if name in SECRET_FIELDS:
            raise ConfigError(f"{name}: expected a JSON string (value not shown: it may hold credentials)") from None
        raise ConfigError(f"{name}: {e}") from None


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Build and validate a config from a dict; unknown keys and bad values are errors.

    Args:
        cls: the config dataclass.
        values: field name -> value (dashes allowed in names).

    Returns:
        The validated frozen config.

    Raises:
        ConfigError: on unknown keys, bad types, values outside choices, or failed validation.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key not in fields:
            raise ConfigError(f"unknown option {raw_key!r} for {cls.__name__}; known: {sorted(fields)}")
        v = _coerce(key, hints[key], value)
        choices = fields[key].metadata.get("choices")
        if choices and v not in choices:
            raise ConfigError(f"{key}: {v!r} is not one of {list(choices)}")
        kwargs[key] = v
    cfg = cls(**kwargs)
    cfg.validate()  # type: ignore[attr-defined]
    return cfg
