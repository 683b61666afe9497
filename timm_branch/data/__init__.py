"""Data for continual SSL: sources, continual scenarios and batched augmentations.

- ``files.py``: :class:`ImageFiles`, a streamed folder split decoded batch by batch in
  DataLoader workers.
- ``sources.py``: :class:`Split`, :class:`DataSource` and the offline loaders (npz, image
  folders, torchvision CIFAR/STL-10, scikit-learn digits) behind :func:`load_source`.
- ``scenarios.py``: :class:`Task`, :class:`Scenario`; class-, data- and domain-incremental
  splits (:func:`build_scenario`).
- ``augment.py``: :class:`SSLAugment`, :class:`TwoViewAugment`, :class:`EvalTransform`:
  augmentations on uint8 tensor batches, on CPU or GPU.
- ``resize.py``: the one resizing policy (shorter side, centre crop).
"""
from .augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALIZATIONS,
    AugmentParams,
    EvalTransform,
    SSLAugment,
    TwoViewAugment,
)
from .files import ImageFiles, decode_image, default_workers
from .resize import resize_center_crop
from .scenarios import (
    SCENARIO_KINDS,
    Scenario,
    Task,
    build_scenario,
    class_incremental,
    concat_sources,
    data_incremental,
    domain_sequence,
)
from .sources import (
    IMAGE_EXTENSIONS,
    TORCHVISION_SOURCES,
    DataSource,
    Split,
    is_folder_spec,
    load_digits,
    load_folder,
    load_npz,
    load_source,
    load_torchvision,
    resize_source,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORMALIZATIONS",
    "IMAGE_EXTENSIONS",
    "SCENARIO_KINDS",
    "TORCHVISION_SOURCES",
    "AugmentParams",
    "DataSource",
    "EvalTransform",
    "ImageFiles",
    "SSLAugment",
    "Scenario",
    "Split",
    "Task",
    "TwoViewAugment",
    "build_scenario",
    "class_incremental",
    "concat_sources",
    "data_incremental",
    "decode_image",
    "default_workers",
    "domain_sequence",
    "is_folder_spec",
    "load_digits",
    "load_folder",
    "load_npz",
    "load_source",
    "load_torchvision",
    "resize_center_crop",
    "resize_source",
]
