"""Video (and image) data for the MaskFeat engine: datasets, validation, DALI pipelines, tools.

Public API (issue 5): :class:`DataConfig`, :func:`build_loader` -> :class:`VideoLoader`,
:func:`validate_dataset`, :func:`prepare_main` (``maskfeat data prepare``), :func:`demo_dataset`,
:func:`write_class_index`, :class:`DataError` (the user's data is missing, empty or inconsistent;
:class:`VideoDecodeError` for a file that fails to decode mid-run). See ``loader.py`` for the batch contract and ``sampler.py`` for the
sharding/shuffling policy.
"""
from .config import DataConfig
from .datasets import Dataset, load_dataset, write_class_index
from .demo import demo_dataset
from .errors import DataError, ImageDecodeError, VideoDecodeError
from .loader import DatasetCheck, VideoLoader, build_loader, validate_dataset
from .prepare import prepare_main
from .probe import BadDatasetError, BadFile, ValidationReport, VideoInfo, probe_video, validate_files

__all__ = [
    "BadDatasetError", "BadFile", "DataConfig", "DataError", "Dataset", "DatasetCheck", "ValidationReport", "VideoInfo",
    "VideoLoader", "build_loader", "demo_dataset", "load_dataset", "prepare_main", "probe_video",
    "validate_dataset", "validate_files", "ImageDecodeError", "VideoDecodeError", "write_class_index",
]
