"""The exception for problems with the user's data (not with the code): :class:`DataError`.

A dataset root or list that is missing, empty or inconsistent (no class folders, a label that is
not an integer or has no class name, a val class that train lacks, two source files that would be
written to the same prepared name) raises :class:`DataError`. ``maskfeat`` reports it as one
paragraph, ``data error: ...``, with exit status 5 (engine/cli.py), without a traceback.

It subclasses ValueError so that code catching the ValueErrors that engine/data raised before
this class existed keeps working.
"""
from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """The dataset (files, folders or list files) given by the user is missing, empty or inconsistent."""
