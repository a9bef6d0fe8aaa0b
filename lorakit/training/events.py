"""Where a run's records go besides its JSONL log: TensorBoard event files (`report_to="tensorboard"`)."""
from __future__ import annotations

from pathlib import Path

TENSORBOARD_DIR = "tensorboard"


class EventLog:
    """Scalars of the run's records, under the run's folder: train/loss, train/lr, ..., eval/eval_loss, ...

    With report_to=None it writes nothing; the writer is opened lazily, on rank 0 only (the caller decides).
    """

    def __init__(self, out: Path, report_to: str | None) -> None:
        self.folder = Path(out) / TENSORBOARD_DIR
        self.enabled = report_to == "tensorboard"
        self.writer = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # here: importing tensorboard takes a second

            self.writer = SummaryWriter(str(self.folder))
        kind = "eval" if "eval_loss" in record else "train"
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{kind}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
