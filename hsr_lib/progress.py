"""Progress bars: widgets in an interactive notebook, plain text when the runner executes
notebooks (a saved widget would show its first frame forever) and in terminals."""

from __future__ import annotations

_TEXT = [False]  # set by use_text(): hsr run's kernels get it from notebook.start(text_progress=True)


def use_text(on: bool = True) -> None:
    """Draw every later bar of this process as plain text (``on``) or let tqdm choose (widgets in a notebook)."""
    _TEXT[0] = bool(on)


def progress(iterable=None, **kwargs):
    """``tqdm`` with ETA; plain text after :func:`use_text` (``hsr run`` asks for it)."""
    if _TEXT[0]:
        from tqdm.std import tqdm
    else:
        from tqdm.auto import tqdm
    kwargs.setdefault("mininterval", 1.0)
    return tqdm(iterable, **kwargs)


def maybe(iterable, show: bool, **kwargs):
    """``iterable`` inside a :func:`progress` bar when ``show`` is true, else unchanged."""
    return progress(iterable, **kwargs) if show else iterable
