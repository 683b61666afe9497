"""The record a model carries while branched, and the branch history it keeps after merging.

Both live as plain attributes of the module ``add_branches`` was called on: they are not in the
state dict, they follow ``copy.deepcopy`` (momentum encoders, frozen teachers), and
``save_pretrained`` writes the history into ``config.json``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

_ACTIVE = "_timm_branch_active"
_HISTORY = "_timm_branch_history"


@dataclass
class BranchRecord:
    """What ``add_branches`` changed, so ``merge_branches`` can restore it.

    ``requires_grad`` maps every parameter name (relative to the owning module) to its flag
    before ``add_branches``.
    """

    shape: str
    bn: str
    convs: list[str]
    requires_grad: dict[str, bool]
    train_unpaired: bool
    include: str | list[str] | None = None
    exclude: str | list[str] | None = None

    def summary(self) -> dict:
        """A JSON-ready summary of this task's branch settings, for the history."""
        return {
            "shape": self.shape,
            "bn": self.bn,
            "branches": len(self.convs),
            "train_unpaired": self.train_unpaired,
            "include": self.include,
            "exclude": self.exclude,
        }


def set_active(owner: nn.Module, record: BranchRecord) -> None:
    setattr(owner, _ACTIVE, record)


def find_active(model: nn.Module) -> list[tuple[nn.Module, BranchRecord]]:
    """Every module in ``model``'s tree (itself included) that holds an active record, with it."""
    return [(m, m.__dict__[_ACTIVE]) for m in model.modules() if _ACTIVE in m.__dict__]


def close_active(owner: nn.Module) -> None:
    """Drop ``owner``'s active record and append its summary to the history."""
    record = owner.__dict__.pop(_ACTIVE)
    history = owner.__dict__.setdefault(_HISTORY, [])
    history.append(record.summary())


def branch_history(model: nn.Module) -> list[dict]:
    """One entry per merged task: ``shape``, ``bn``, ``branches`` (count), ``include``, ``exclude``."""
    return [dict(entry) for entry in model.__dict__.get(_HISTORY, [])]
