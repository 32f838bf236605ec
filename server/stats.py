"""Time the engine spends encoding and pruning images, on the API server's ``/metrics``.

The vision tower and the pruning run in vLLM's engine-core process while ``/metrics`` is
served by the API server's, and vLLM carries no custom statistic between the two. The
engine adds its figures to a small shared file under an exclusive lock (:func:`add`);
the API server reads it whenever ``/metrics`` is scraped (:class:`StatsCollector`).
The file's path travels in ``VTPRUNE_STATS_FILE``: the first process that loads the
plugin sets it (:func:`ensure_path`) and the processes vLLM starts inherit it::

    vtprune_images_encoded_total         images through the tower (pruned or not)
    vtprune_image_encode_seconds_total   tower + pruning, per image, summed
    vtprune_pruning_seconds_total        the pruning method alone (for a method inside
                                         the encoder: with the tower layers it runs)
"""
from __future__ import annotations

import atexit
import fcntl
import os
import struct
import tempfile

ENV = "VTPRUNE_STATS_FILE"
FIELDS = ("images", "encode_seconds", "prune_seconds")
_FORMAT = "<" + "d" * len(FIELDS)
_SIZE = struct.calcsize(_FORMAT)


def ensure_path() -> str:
    """The stats file of this process tree, created (empty) by the first caller."""
    path = os.environ.get(ENV)
    if path:
        return path
    fd, path = tempfile.mkstemp(prefix="vtprune-stats-", suffix=".bin")
    os.close(fd)
    os.environ[ENV] = path
    atexit.register(_remove, path)
    return path


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def add(images: int, encode_seconds: float, prune_seconds: float) -> None:
    """Add one batch of figures; a process without a stats file records nothing."""
    path = os.environ.get(ENV)
    if not path:
        return
    try:  # created if gone: a server outliving the process that made the file still counts
        with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            values = _unpack(f.read(_SIZE))
            f.seek(0)
            f.write(struct.pack(_FORMAT, *(v + d for v, d in
                                           zip(values, (images, encode_seconds, prune_seconds)))))
    except OSError:  # the serving process left; figures are best effort, serving is not
        return


def read() -> dict[str, float]:
    path = os.environ.get(ENV)
    values = (0.0,) * len(FIELDS)
    if path:
        try:
            with open(path, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_SH)
                values = _unpack(f.read(_SIZE))
        except OSError:
            pass
    return dict(zip(FIELDS, values))


def _unpack(raw: bytes) -> tuple[float, ...]:
    return struct.unpack(_FORMAT, raw) if len(raw) == _SIZE else (0.0,) * len(FIELDS)


class StatsCollector:
    """Prometheus collector over :func:`read`."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        stats = read()
        yield CounterMetricFamily("vtprune_images_encoded", "Images through the vision tower",
                                  value=stats["images"])
        yield CounterMetricFamily("vtprune_image_encode_seconds",
                                  "Seconds in the vision tower and pruning", value=stats["encode_seconds"])
        yield CounterMetricFamily("vtprune_pruning_seconds",
                                  "Seconds in the pruning methods", value=stats["prune_seconds"])


_collector: StatsCollector | None = None


def register_collector() -> None:
    """Expose the figures on the default registry (what vLLM's ``/metrics`` serves); once."""
    global _collector
    if _collector is None:
        from prometheus_client import REGISTRY

        _collector = StatsCollector()
        REGISTRY.register(_collector)
