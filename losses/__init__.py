"""Loss terms of MBS and its baseline (see losses/mbs.py)."""

from .mbs import *  # noqa: F401,F403  (the public names are listed once, in mbs.__all__)
from .mbs import __all__  # noqa: F401
