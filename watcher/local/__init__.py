"""Local analysis with Essentia (the optional ``local`` extra, AGPL-3.0): key, tempo and loudness.

Importing this package never imports Essentia; :func:`available` says whether it can run here.
"""

from __future__ import annotations

import importlib.util

# The model names the local backend computes, spelled as the analysis service returns them.
LOCAL_MODELS = ("key", "bpm_degara", "loudness_ebur128")


def available() -> bool:
    """True when Essentia (and numpy) can be imported."""
    return importlib.util.find_spec("essentia") is not None and importlib.util.find_spec("numpy") is not None
