"""What a check says: a failure in a student's terms, a pass in one line."""

from __future__ import annotations

from typing import Any, Callable

import torch


class CheckFailed(AssertionError):
    """A check found the student's function wrong; the message says where and the likely mistake."""


def call(fn: Callable, *args: Any, name: str | None = None, **kwargs: Any) -> Any:
    """``fn(*args)``; a stub that is not written yet, or a crash, becomes a :class:`CheckFailed`."""
    label = name or getattr(fn, "__name__", "your function")
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise CheckFailed(f"{label} is not written yet: it raises NotImplementedError. Replace the "
                          "`raise NotImplementedError()` under `# YOUR CODE HERE` with your code.") from None
    except CheckFailed:
        raise
    except Exception as err:  # the student's crash, named with the input that caused it
        raise CheckFailed(f"{label} raised {type(err).__name__}: {err}") from err


def fail(message: str) -> None:
    raise CheckFailed(message)


def passed(message: str) -> None:
    print(f"✔ {message}")


def as_tensor(got: Any, label: str, expected: torch.Tensor) -> torch.Tensor:
    """``got`` as a tensor of ``expected``'s shape, or a CheckFailed saying what came back."""
    if got is None:
        fail(f"{label} returned None: did you forget the `return`?")
    if not isinstance(got, torch.Tensor):
        fail(f"{label} returned a {type(got).__name__}; expected a torch.Tensor of shape {tuple(expected.shape)}")
    if tuple(got.shape) != tuple(expected.shape):
        fail(f"{label} returned shape {tuple(got.shape)}; expected {tuple(expected.shape)}")
    return got


def as_mask(got: Any, label: str, expected: torch.Tensor) -> torch.Tensor:
    """``got`` as a boolean tensor of ``expected``'s shape."""
    got = as_tensor(got, label, expected)
    if got.dtype != torch.bool:
        fail(f"{label} returned dtype {got.dtype}; expected a boolean mask (torch.bool)")
    return got


def first_index(diff: torch.Tensor) -> tuple[int, ...]:
    """The first True entry of ``diff`` (row-major) as an index tuple."""
    return tuple(int(i) for i in torch.nonzero(diff)[0])


def as_number(got: Any, label: str) -> float | None:
    """A float (or None), or a CheckFailed naming what came back instead."""
    if got is None:
        return None
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        return float(got)
    try:
        return float(got)
    except (TypeError, ValueError):
        fail(f"{label} returned {got!r} ({type(got).__name__}); expected a number")
