"""How ``hsr`` starts the kernels that execute notebooks (papermill / nbclient options): encrypted
sockets, stream outputs that keep only a progress bar's final state, and no Hugging Face widget bars."""

from __future__ import annotations

import os
from typing import Any


def execute_options() -> dict[str, Any]:
    """Keyword arguments for ``papermill.execute_notebook``.

    ``coalesce_streams`` merges a cell's stdout/stderr pieces and applies carriage returns, so a text
    progress bar is saved as its final state, not as one line per redraw. The kernel manager
    provisions CurveZMQ keys where pyzmq supports them (the kernelspec declares it), else uses IPC
    sockets on POSIX: a plain-TCP kernel logs "running over TCP without encryption" on every start.
    Also turns off the Hugging Face progress bars of the kernels it starts (see below).
    """
    from traitlets.config import Config

    # transformers' and huggingface_hub's bars ("Loading weights") are ipywidgets in a kernel; a saved
    # widget shows its first frame ("0%") forever. Kernels inherit this environment.
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    return {"kernel_name": "python3", "coalesce_streams": True, "config": Config({"KernelManager": _transport()})}


def _transport() -> dict[str, str]:
    import zmq

    if zmq.has("curve"):
        return {"transport_encryption": "auto"}
    return {"transport": "ipc"} if os.name == "posix" else {}
