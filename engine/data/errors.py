"""The exceptions for problems with the user's data (not with the code): :class:`DataError`,
:class:`VideoDecodeError` and :class:`ImageDecodeError`.

A dataset root or list that is missing, empty or inconsistent (no class folders, a label that is
not an integer or has no class name, a val class that train lacks, two source files that would be
written to the same prepared name) raises :class:`DataError`. ``maskfeat`` reports it as one
paragraph, ``data error: ...``, with exit status 5 (engine/cli.py), without a traceback.

A file that passed validation (its first frame decodes) but fails to decode later, in the middle
of an epoch (corrupt in the middle), raises :class:`VideoDecodeError` under
``data.on_bad_file=error`` (``pipeline.Feeder``); the message names the file, the decoder's error
and what to do (remove it or set ``data.on_bad_file=skip``, then ``--resume auto``). An image
(``dataset=image_folder``) that cannot be decoded raises :class:`ImageDecodeError` likewise
(``images.py``).

It subclasses ValueError so that code catching the ValueErrors that engine/data raised before
this class existed keeps working.
"""
from __future__ import annotations

__all__ = ["DataError", "ImageDecodeError", "VideoDecodeError"]


class DataError(ValueError):
    """The dataset (files, folders or list files) given by the user is missing, empty or inconsistent."""


class VideoDecodeError(DataError):
    """A validated video failed to decode while loading a clip (``path``: the file, ``error``: the
    decoder's message)."""

    def __init__(self, message: str, path: str = "", error: str = ""):
        super().__init__(message)
        self.path = path
        self.error = error


class ImageDecodeError(DataError):
    """An image failed to decode while loading a batch (``path``: the file, ``error``: the decoder's
    message)."""

    def __init__(self, message: str, path: str = "", error: str = ""):
        super().__init__(message)
        self.path = path
        self.error = error
