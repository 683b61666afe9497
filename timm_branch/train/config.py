"""The configuration of a continual SSL run, validated as a whole before any training starts."""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..pairs import DEFAULT_NORMS, DEFAULT_THROUGH, check_norms_through

STRATEGIES: tuple[str, ...] = ("finetune", "branch", "cassle", "cassle+branch", "joint")
SCENARIOS: tuple[str, ...] = ("class", "data", "domain")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
PUSH_WHEN: tuple[str, ...] = ("task", "end")
NONFINITE: tuple[str, ...] = ("stop", "skip")
PRESETS: dict[str, dict[str, object]] = {
    # The library's defaults: exact merges and BatchNorm statistics that stay fixed (bn="frozen"),
    # one tensor per cross, weight decay on branches (towards the old kernel), timm's own init.
    "library": dict(shape="cross", bn="frozen", branch_weight_decay=None, normalization="imagenet", zero_init_last=None),
    # The authors' settings (their main_pretrain_new_fixbn.py and scripts): BN statistics follow
    # the new data, no weight decay on branches, the k x 1 + 1 x k pair, LARS for every method
    # (MoCo v2+ included), CIFAR statistics, no zero-initialised last BN (CaSSLe's ResNet).
    "paper": dict(shape="cross-pair", bn="affine", branch_weight_decay=0.0, normalization="data", zero_init_last=False,
                  optimizer="lars"),
}
"""Settings a ``preset`` gives the fields left unset (``None``); see docs/REPRODUCTION.md."""
NORMALIZATION_CHOICES: tuple[str, ...] = ("imagenet", "cifar10", "cifar100", "data")
RESUME_MAY_CHANGE: tuple[str, ...] = (
    "output", "device", "stream", "workers", "compile", "channels_last", "eval_batch_size", "push_to_hub", "push_when",
    "nonfinite", "nonfinite_limit",
)
"""The fields a resume may change: where and how the same computation runs, and what happens
around it. Any other change would not match the finished tasks, and a resume refuses it."""



def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest single-character insertions, deletions and substitutions."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def _closest(name: str, names: list[str], count: int = 5) -> list[str]:
    """The ``count`` entries of ``names`` nearest to ``name`` by edit distance (ties: alphabetical)."""
    return sorted(names, key=lambda n: (_edit_distance(name, n), n))[:count]

@dataclass
class TrainConfig:
    """Everything a run needs; the defaults are the README's offline run (digits, 5 tasks, SimCLR).

    ``optimizer``, ``lr`` and ``weight_decay`` default to the SSL method's recipe (LARS, except
    MoCo v2+'s SGD); ``split_seed`` to the
    scenario's convention (5 for class-incremental, 42 for data-incremental).

    ``batch_size`` is the global batch: under ``torchrun --nproc_per_node N`` each process trains
    on ``batch_size / N`` of its images, and the run computes what one process would.

    A NaN or Inf loss stops the task (``nonfinite="stop"``), or, with ``nonfinite="skip"``, skips
    that step's update; ``nonfinite_limit`` non-finite steps in a row stop the task anyway.
    ``"stop"`` reads losses back every 16 steps (no wait for the GPU in between), so the error may
    come a few steps after the step it names, always before the epoch's checkpoint; ``"skip"``
    checks each loss before its update, which costs one wait for the GPU per step.

    ``compile``, a ``torch.compile`` backend (``"inductor"``, PyTorch's default), runs the backbone
    (and the momentum network) of each task's training steps compiled: every task compiles afresh
    (its branched backbone is a new graph) after ``torch.compiler.reset()`` drops the previous
    task's graphs, so a task's first steps are slow; the heads, losses and evaluation stay eager.

    ``stream`` keeps image folders on disk: ``workers`` DataLoader processes decode each batch
    while the previous one trains, and each process of a ``torchrun`` job decodes only its own
    rows. Without it a folder is decoded once, up front, into memory (and onto the GPU). The
    pixels, and so the run, are the same either way.
    """

    model: str = "resnet18"
    pretrained: str | None = None  # a timm name, "hf-hub:org/name" or "local-dir:PATH"; replaces model
    data: list[str] = field(default_factory=lambda: ["digits"])
    stream: bool = False  # image folders: decode batch by batch in DataLoader workers, not all up front
    workers: int | None = None  # processes decoding image folders; None: 1 on the CPU, else a machine's cores shared among its ranks, <= 8 each
    scenario: str = "class"
    num_tasks: int = 5
    split_seed: int | None = None
    method: str = "simclr"
    strategy: str = "branch"
    preset: str | None = None  # "library" (None) or "paper": the defaults of the fields below left unset
    shape: str | None = None  # preset: "cross" (library), "cross-pair" (paper)
    bn: str | None = None  # preset: "frozen" (library), "affine" (paper)
    # Which norm layers a branched conv may feed, and what may stand between them (add_branches').
    norms: list[str] = field(default_factory=lambda: list(DEFAULT_NORMS), metadata={
        "metavar": "KIND", "help": "norm layers a branched conv may feed: batch (the paper's) | layer | group"})
    through: list[str] = field(default_factory=lambda: list(DEFAULT_THROUGH), metadata={
        "metavar": "KIND", "help": "what may stand between conv and norm: shape (shape-only ops) | act (activations) "
                                   "| conv (a following conv: separable chains)"})
    epochs: int = 4
    batch_size: int = 64
    image_size: int = 32
    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    branch_weight_decay: float | None = None  # branches' weight decay; None: weight_decay (library), 0 (paper)
    branch_lr_scale: float = 1.0  # the branch tensors' learning rate as a multiple of lr
    normalization: str | None = None  # imagenet | cifar10 | cifar100 | data (CIFAR's own for cifar10:/cifar100: data)
    zero_init_last: bool | None = None  # timm's zero init of each block's last BN; None: timm's default
    warmup_epochs: int = 1
    distill_weight: float = 1.0
    precision: str = "fp32"
    channels_last: bool = False
    compile: str | None = None  # a torch.compile backend ("inductor"); None: eager
    device: str = "auto"
    sync_bn: bool = False  # under torchrun on GPUs: the backbone's BatchNorms use the global batch's statistics
    seed: int = 0
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_probe: bool = True
    online_probe: bool = False
    eval_batch_size: int = 256
    output: str = "runs/default"
    push_to_hub: str | None = None
    push_when: str = "task"
    nonfinite: str = "stop"
    nonfinite_limit: int = 10

    def problems(self) -> list[str]:
        """Every problem with the configuration that can be seen without loading data."""
        import timm

        from ..bn import BN_POLICIES
        from ..branch import BRANCH_SHAPES
        from ..ssl import METHODS
        from .optim import OPTIMIZERS

        found = self._type_problems()
        if found:  # the checks below compare values, which a wrong type would break
            return found
        choices = [
            ("strategy", STRATEGIES), ("scenario", SCENARIOS), ("method", METHODS), ("shape", BRANCH_SHAPES),
            ("bn", BN_POLICIES), ("optimizer", OPTIMIZERS), ("precision", PRECISIONS), ("push_when", PUSH_WHEN),
            ("nonfinite", NONFINITE), ("preset", tuple(PRESETS)), ("normalization", NORMALIZATION_CHOICES),
        ]
        for name, allowed in choices:
            if getattr(self, name) not in allowed and getattr(self, name) is not None:
                found.append(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.pretrained:
            if not self.pretrained.startswith(("hf-hub:", "local-dir:")) and not timm.is_model(self.pretrained):
                found.append(f"pretrained={self.pretrained!r} is neither a timm model name nor an hf-hub:/local-dir: source")
        elif not timm.is_model(self.model):
            close = _closest(self.model.split(".")[0], timm.list_models())
            found.append(f"model={self.model!r} is not a timm model name" + (f" (close: {', '.join(close)})" if close else ""))
        for name, low in (("num_tasks", 1), ("epochs", 1), ("batch_size", 2), ("image_size", 8), ("eval_batch_size", 1),
                          ("knn_k", 1), ("nonfinite_limit", 1)):
            if getattr(self, name) < low:
                found.append(f"{name}={getattr(self, name)} must be at least {low}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            found.append(f"warmup_epochs={self.warmup_epochs} must lie between 0 and epochs={self.epochs}")
        if self.branch_lr_scale <= 0:
            found.append(f"branch_lr_scale={self.branch_lr_scale} must be positive")
        if self.lr is not None and self.lr <= 0:
            found.append(f"lr={self.lr} must be positive")
        for name in ("weight_decay", "branch_weight_decay"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                found.append(f"{name}={getattr(self, name)} must not be negative")
        if self.knn_temperature <= 0:
            found.append(f"knn_temperature={self.knn_temperature} must be positive")
        if self.workers is not None and self.workers < 0:
            found.append(f"workers={self.workers} must not be negative (0 decodes in the training process)")
        try:
            check_norms_through(self.norms, self.through)
        except ValueError as err:
            found.append(str(err))
        if self.distill_weight < 0:
            found.append(f"distill_weight={self.distill_weight} must not be negative")
        found += self._device_problems() + self._pretrained_folder_problems() + self._compile_problems()
        if self.push_to_hub is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", self.push_to_hub):
            found.append(f"push_to_hub={self.push_to_hub!r} is not a Hub repository id of the form org/name")
        if not self.data:
            found.append("data is empty: give at least one source (e.g. digits, a folder, a .npz file)")
        if self.scenario == "domain" and len(self.data) < 2:
            found.append("scenario='domain' needs two or more data sources, one per task")
        if self.scenario != "domain" and len(self.data) != 1:
            found.append(f"scenario={self.scenario!r} takes one data source, got {len(self.data)} (use scenario='domain')")
        return found

    def _device_problems(self) -> list[str]:
        """``device`` must parse and, for a GPU, exist on this machine (checked here, not at the first ``.to``)."""
        import torch

        if self.device == "auto":
            return []
        try:
            device = torch.device(self.device)
        except RuntimeError:
            return [f"device={self.device!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)"]
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            return [f"device={self.device!r}, but this machine has {torch.cuda.device_count()} CUDA GPUs; use device=auto or cpu"]
        return []

    def _compile_problems(self) -> list[str]:
        """``compile`` must name a backend this torch has (checked here, not at the first step)."""
        if self.compile is None:
            return []
        import torch

        backends = torch.compiler.list_backends(exclude_tags=())
        if self.compile not in backends:
            return [f"compile={self.compile!r} is not a torch.compile backend; choose one of {', '.join(backends)} "
                    "(inductor is PyTorch's default)"]
        return []

    def _type_problems(self) -> list[str]:
        """Each field whose value is not of its annotated type (e.g. ``epochs: "1"`` or ``1.5`` in YAML)."""
        hints = typing.get_type_hints(type(self))
        return [f"{f.name}={getattr(self, f.name)!r} is a {type(getattr(self, f.name)).__name__}, not {_type_name(hints[f.name])}"
                for f in dataclasses.fields(self) if not _has_type(getattr(self, f.name), hints[f.name])]

    def _pretrained_folder_problems(self) -> list[str]:
        """A ``local-dir:`` start must be an exported folder (its files are checked when loaded)."""
        if not (self.pretrained or "").startswith("local-dir:"):
            return []
        folder = Path(self.pretrained[len("local-dir:"):])
        missing = [name for name in ("config.json", "model.safetensors") if not (folder / name).is_file()]
        if missing:
            return [f"pretrained={self.pretrained!r}: {folder} has no {' or '.join(missing)}; give a folder written by "
                    "save_pretrained or timm-branch train (RUN/task-K)"]
        return []

    def with_preset(self) -> "TrainConfig":
        """A copy with every field the preset sets and this configuration leaves unset (``None``)
        filled in from :data:`PRESETS` (``preset=None`` is ``"library"``), and ``"data"``
        normalisation resolved: CIFAR-10's or CIFAR-100's own statistics for ``cifar10:`` or
        ``cifar100:`` data, else ImageNet's. Other unset fields (``lr``, ``optimizer``, ...) stay
        ``None`` for the SSL method's recipe."""
        chosen = {**PRESETS["library"], **PRESETS[self.preset or "library"]}
        values = {name: value for name, value in chosen.items() if getattr(self, name) is None}
        if values.get("normalization", self.normalization) == "data":
            prefix = self.data[0].split(":", 1)[0] if self.data else ""
            values["normalization"] = prefix if prefix in ("cifar10", "cifar100") else "imagenet"
        return dataclasses.replace(self, **values)

    def validate(self) -> "TrainConfig":
        """Raise ``ValueError`` listing every problem at once; return ``self`` when there is none."""
        found = self.problems()
        if found:
            raise ValueError("invalid configuration:\n  - " + "\n  - ".join(found))
        return self

    def to_dict(self) -> dict:
        """Every field by name, as plain Python values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a mapping; unknown keys raise ``ValueError`` naming them and the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys {unknown}; known keys: {', '.join(sorted(known))}")
        values = dict(values)
        if isinstance(values.get("data"), str):
            values["data"] = [values["data"]]
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        """Read a YAML mapping of field names to values (see :meth:`from_dict`)."""
        text = Path(path).read_text(encoding="utf-8")
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:  # syntax errors, and tags such as !!python/object (never executed)
            raise ValueError(f"{path} is not a plain YAML mapping: {' '.join(str(err).split())}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a configuration file must hold a mapping of keys to values")
        return cls.from_dict(values)

    def to_yaml(self) -> str:
        """The configuration as YAML, fields in declaration order (what ``config.yaml`` holds)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _has_type(value: object, hint: object) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (``int``, ``float``, ``bool``, ``str``,
    ``X | None``, ``list[str]``); an int fits ``float``, a bool fits only ``bool``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_has_type(v, typing.get_args(hint)[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: object) -> str:
    """``hint`` as a reader would write it: ``int``, ``str or None``, ``list of str``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))

