"""Progress bars: widgets in an interactive notebook, plain text when the runner executes
notebooks (a saved widget would show its first frame forever) and in terminals."""

from __future__ import annotations

import os

TEXT_ENV = "HSR_TEXT_PROGRESS"


def progress(iterable=None, **kwargs):
    """``tqdm`` with ETA; text when ``HSR_TEXT_PROGRESS`` is set (``hsr run`` sets it)."""
    if os.environ.get(TEXT_ENV):
        from tqdm.std import tqdm
    else:
        from tqdm.auto import tqdm
    kwargs.setdefault("mininterval", 1.0)
    return tqdm(iterable, **kwargs)


def maybe(iterable, show: bool, **kwargs):
    """``iterable`` inside a :func:`progress` bar when ``show`` is true, else unchanged."""
    return progress(iterable, **kwargs) if show else iterable
