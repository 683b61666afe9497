"""``python -m timm_branch.cli`` (and ``python -m timm_branch``): the command line, exiting with its status."""
import sys

from . import main

sys.exit(main())
