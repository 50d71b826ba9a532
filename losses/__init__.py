"""Loss terms of MBS and its baseline (losses/mbs.py) and of the MiB and PLOP baselines (losses/mib.py, plop.py)."""

from . import mbs, mib, plop  # noqa: F401  (also reachable as losses.mib.*, losses.plop.*)
from .mbs import *  # noqa: F401,F403  (the public names are listed once per module, in its __all__)
from .mib import *  # noqa: F401,F403
from .plop import *  # noqa: F401,F403

__all__ = [*mbs.__all__, *mib.__all__, *plop.__all__]
if len(set(__all__)) != len(__all__):  # a clash would silently shadow one module's name
    raise ImportError("losses: two loss modules export the same name")
