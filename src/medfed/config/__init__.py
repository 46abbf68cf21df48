"""The job file: schema, loading and error messages.

A job is validated once, at load time, and frozen. An error names the field path and the
bad value, e.g. ``train.lr: must be > 0, got -1``. Relative data paths are resolved
against the job file's folder, so a job file and its data can move together; the output
folder is resolved against the current directory, where the user runs medfed.

Numbers are what they say: a count is a whole number (``true``, ``2.0`` or ``1.0e9`` is
refused), a real number is finite (``.inf`` and ``.nan`` are refused), and every count has
an upper bound, so a typo cannot make a run that never ends or never fits in memory:
``rounds`` <= 100 000, epochs <= :data:`MAX_EPOCHS`, ``batch_size`` <= :data:`MAX_BATCH`,
sites <= :data:`MAX_SITES`, examples per split of a synthetic site <= :data:`MAX_EXAMPLES`,
image and patch sides <= :data:`MAX_SIDE` (:data:`MAX_VOXELS` per image), and all the
generated (synthetic) images of a job <= :data:`SYNTHETIC_MAX_BYTES`. A YAML file whose
aliases expand to more than :data:`MAX_YAML_NODES` values is refused before it is read.

One module per section of the job, each importing only those listed before it:

- ``limits``: the bounds above, :data:`SiteName`, :func:`unique_names`
- ``reading``: how a file source is read (``cache``, ``loader``), kept out of the job's hash
- ``transforms``: preprocessing and augmentation steps, :class:`TransformsConfig`
- ``dicom``: DICOM settings of the file sources (the VOI window, with the ``window``
  step's presets; DICOM SEG segments)
- ``data``: the ``data`` section (synthetic, medmnist, folder, pairs, volumes), partitions, splits
- ``reconstruction``: the reconstruction task, its phantom source and its checks across sections
- ``model``: the network (:class:`ModelConfig` by name, :class:`MonaiModelConfig`,
  :class:`ImportModelConfig`, :class:`BundleModelConfig`; any of them :data:`AnyModelConfig`), its init and frozen
  layers, and the task (:class:`TaskConfig`, :class:`SegmentationTaskConfig`)
- ``topology``: how the sites' training is combined: a server (default), cyclic, swarm, split
- ``algorithms``: one settings class per algorithm, with what it does beyond the mean declared on it
- ``contribution``: per-site contribution (Shapley values, leave-one-out) and what it cannot go with
- ``tracking``: where results are also logged (TensorBoard, MLflow), kept out of the job's dumps and hash
- ``ray``: where ``transport: ray`` runs its sites (a local Ray instance or a cluster), :class:`RayConfig`
- ``job``: :class:`Job` (top-level fields, :class:`TrainConfig`, :class:`SamplingConfig`, checks across sections)
- ``messages``: pydantic errors as ``field.path: what, got value``
- ``files``: reading YAML (aliases bounded), :func:`load_job`, :func:`parse_job`, path mapping

Everything public is imported from here: ``from medfed.config import Job, load_job``.

The modules that define settings models do not use ``from __future__ import annotations``:
with it, pydantic evaluates every field annotation from its string when the models are
built, at every start of ``medfed`` (a few milliseconds, more than the split into modules
costs).
"""

from medfed.config.algorithms import (
    AlgorithmConfig,
    AlgorithmSettings,
    DittoConfig,
    FedAvgConfig,
    FedBNConfig,
    FedCEConfig,
    FedDynConfig,
    FedNovaConfig,
    FedOptConfig,
    FedPerConfig,
    FedProxConfig,
    FedRepConfig,
    HarmoFLConfig,
    MoonConfig,
    QFedAvgConfig,
    ScaffoldConfig,
    algorithm_names,
    mean_algorithm_names,
)
from medfed.config.data import (
    SEGMENTATION_SOURCES,
    DataConfig,
    FileSet,
    FileSite,
    FolderData,
    MedMNISTData,
    OnBadFile,
    PairsData,
    PartitionConfig,
    ScannerConfig,
    SitesBy,
    SplitConfig,
    SyntheticData,
    SyntheticSegmentationData,
    SyntheticSite,
    VolumesData,
    synthetic_size_problem,
)
from medfed.config.dicom import DicomWindow
from medfed.config.reconstruction import (
    RECONSTRUCTION_SOURCES,
    RECONSTRUCTORS,
    FastMRIData,
    FastMRISite,
    PhantomData,
    PhantomSite,
    ReconstructionTaskConfig,
    reads_kspace,
    reconstruction_problem,
)
from medfed.config.reading import READING_FIELDS, CacheMode, LoaderConfig, without_reading
from medfed.config.files import (
    SITE_LOCAL,
    builtin_job_path,
    checked_bundle_digest,
    load_job,
    map_paths,
    parse_job,
    read_yaml,
    resolve_paths,
    with_init_hash,
)
from medfed.config.job import Job, SamplingConfig, TrainConfig
from medfed.config.semi import SemiConfig
from medfed.config.pretrain import PretrainConfig
from medfed.config.contribution import ContributionConfig, contribution_metric
from medfed.config.generalization import GeneralizationConfig
from medfed.config.topology import (
    PEER_ALGORITHMS,
    AnyTopology,
    CyclicTopology,
    ServerTopology,
    SplitTopology,
    SwarmTopology,
    TopologyConfig,
)
from medfed.config.tracking import MlflowConfig, TrackingConfig
from medfed.config.ray import RAY_EXTRA, RayConfig
from medfed.config.limits import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_EXAMPLES,
    MAX_ROUND_TIMEOUT,
    MAX_ROUNDS,
    MAX_SIDE,
    MAX_SITES,
    MAX_VOXELS,
    MAX_YAML_NODES,
    RESERVED_SITE_NAMES,
    SYNTHETIC_MAX_BYTES,
    SiteName,
    unique_names,
)
from medfed.config.messages import describe_error, format_validation_error
from medfed.config.model import (
    CLASSIFIERS,
    INIT_SUFFIXES,
    SEGMENTERS,
    AnyModelConfig,
    BundleModelConfig,
    AnyTaskConfig,
    ArgValue,
    ImportModelConfig,
    ModelConfig,
    ModelSettings,
    MonaiModelConfig,
    ImportLossConfig,
    SEGMENTATION_LOSSES,
    SegmentationTaskConfig,
    TaskConfig,
    hashed_model,
    hashed_task,
    model_kind,
    task_kind,
)
from medfed.config.transforms import (
    WINDOW_PRESETS,
    AugmentStep,
    ContrastStep,
    CropOrPadStep,
    FlipStep,
    ImageSize,
    IntensityStep,
    NoiseStep,
    NormalizeStep,
    PreprocessStep,
    ResizeStep,
    Rotate90Step,
    RotateStep,
    SpacingStep,
    TransformsConfig,
    WindowStep,
    ZoomStep,
)

__all__ = [
    "SemiConfig",
    "PretrainConfig",
    "ContributionConfig",
    "contribution_metric",
    "CLASSIFIERS",
    "INIT_SUFFIXES",
    "MAX_BATCH",
    "MAX_EPOCHS",
    "MAX_EXAMPLES",
    "MAX_ROUNDS",
    "MAX_ROUND_TIMEOUT",
    "MAX_SIDE",
    "MAX_SITES",
    "MAX_VOXELS",
    "MAX_YAML_NODES",
    "RESERVED_SITE_NAMES",
    "RECONSTRUCTION_SOURCES",
    "RECONSTRUCTORS",
    "SEGMENTATION_SOURCES",
    "SEGMENTERS",
    "SITE_LOCAL",
    "SYNTHETIC_MAX_BYTES",
    "WINDOW_PRESETS",
    "AlgorithmConfig",
    "AlgorithmSettings",
    "AnyModelConfig",
    "AnyTopology",
    "BundleModelConfig",
    "CyclicTopology",
    "AnyTaskConfig",
    "ArgValue",
    "CacheMode",
    "READING_FIELDS",
    "LoaderConfig",
    "AugmentStep",
    "ContrastStep",
    "CropOrPadStep",
    "DataConfig",
    "DicomWindow",
    "DittoConfig",
    "FedAvgConfig",
    "FedBNConfig",
    "FedCEConfig",
    "HarmoFLConfig",
    "GeneralizationConfig",
    "FedDynConfig",
    "FedNovaConfig",
    "FedOptConfig",
    "FedPerConfig",
    "FedProxConfig",
    "FedRepConfig",
    "FileSet",
    "FileSite",
    "FlipStep",
    "FolderData",
    "ImageSize",
    "ImportModelConfig",
    "IntensityStep",
    "Job",
    "MedMNISTData",
    "MlflowConfig",
    "ModelConfig",
    "PEER_ALGORITHMS",
    "ModelSettings",
    "MonaiModelConfig",
    "MoonConfig",
    "NoiseStep",
    "NormalizeStep",
    "OnBadFile",
    "PairsData",
    "PartitionConfig",
    "PreprocessStep",
    "QFedAvgConfig",
    "RAY_EXTRA",
    "RayConfig",
    "ResizeStep",
    "Rotate90Step",
    "RotateStep",
    "SamplingConfig",
    "ServerTopology",
    "SplitTopology",
    "SwarmTopology",
    "ScaffoldConfig",
    "ScannerConfig",
    "ImportLossConfig",
    "SEGMENTATION_LOSSES",
    "FastMRIData",
    "FastMRISite",
    "PhantomData",
    "PhantomSite",
    "ReconstructionTaskConfig",
    "reads_kspace",
    "reconstruction_problem",
    "SegmentationTaskConfig",
    "SiteName",
    "SitesBy",
    "SpacingStep",
    "SplitConfig",
    "SyntheticData",
    "SyntheticSegmentationData",
    "SyntheticSite",
    "TaskConfig",
    "TopologyConfig",
    "TrackingConfig",
    "TrainConfig",
    "TransformsConfig",
    "VolumesData",
    "WindowStep",
    "ZoomStep",
    "algorithm_names",
    "builtin_job_path",
    "checked_bundle_digest",
    "describe_error",
    "format_validation_error",
    "hashed_model",
    "hashed_task",
    "load_job",
    "map_paths",
    "mean_algorithm_names",
    "model_kind",
    "parse_job",
    "read_yaml",
    "resolve_paths",
    "synthetic_size_problem",
    "without_reading",
    "with_init_hash",
    "task_kind",
    "unique_names",
]
