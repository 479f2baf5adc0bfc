"""A run's logs: RUN/log.jsonl (one JSON record per line) and TensorBoard events in RUN/tb."""

from __future__ import annotations

import gzip
import json
import logging
import math
from pathlib import Path
from typing import Any

from loopedlm.common.validation import is_number

log = logging.getLogger(__name__)


class RunLogger:
    """RUN/log.jsonl (one JSON object per record) and TensorBoard events in RUN/tb.
    Only rank 0 should own one."""

    def __init__(self, run_dir: Path, *, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(run_dir) / "log.jsonl"
        if resume_step is not None and self.path.exists():
            # drop records a crashed run wrote after the checkpoint we resume from
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"),
                                        purge_step=resume_step + 1 if resume_step else None)
            except ImportError:  # tensorboard is a declared dependency; tolerate its absence
                log.warning("tensorboard is not installed: no TensorBoard events")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if key == "step":
                    continue
                if isinstance(value, list):  # per-loop numbers; not collapse_flags (dicts)
                    for i, v in enumerate(value):
                        if is_number(v):
                            self.tb.add_scalar(f"{key}/loop_{i + 1}", v, record["step"])
                elif is_number(value):
                    if value is not None and math.isfinite(value):
                        self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.close()


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of RUN/log.jsonl (or of a log file given directly, gzipped if it ends
    in .gz)."""
    path = Path(run_dir)
    if path.is_dir() or not path.exists():
        path = path / "log.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a loopedlm run folder?")
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


__all__ = ["RunLogger", "read_log"]
