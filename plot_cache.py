"""Model-card plots drawn once: PNG bytes cached on disk under a key derived from their inputs.

matplotlib costs 0.2-0.4 s of CPU a figure; a model's figures never change, so each is drawn on
its first view, written atomically to the cache folder (shared by all worker processes) and read
back afterwards in well under a millisecond. Flask-free: the web layer passes the folder.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path

from model_store import atomic_write

# One figure drawn at a time per process: a flood of first views of uncached plots queues here
# instead of taking every thread's CPU, and the plot the others wait for is then read from disk.
_drawing = threading.Lock()


def plot_key(model_sha256: str, plot: str, inputs: object) -> str:
    """A file-name-safe key: the model's sha256, the plot's name and a digest of what is drawn."""
    digest = hashlib.sha256(json.dumps([plot, inputs], sort_keys=True, default=str).encode()).hexdigest()
    return f"{model_sha256[:16]}-{plot}-{digest[:16]}"


def cached_png(directory: Path, key: str, draw: Callable[[], bytes]) -> bytes:
    """The cached PNG for `key`, drawn with `draw` and stored the first time."""
    path = directory / f"{key}.png"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    with _drawing:
        if path.exists():  # drawn by another thread while this one waited
            return path.read_bytes()
        png = draw()
        atomic_write(path, png)
    return png
