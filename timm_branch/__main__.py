"""``python -m timm_branch``: the ``timm-branch`` command line (:mod:`timm_branch.cli`)."""
from .cli import __main__  # noqa: F401  (importing it runs the command line and exits)
