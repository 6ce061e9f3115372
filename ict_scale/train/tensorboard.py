"""TensorBoard scalars and sample grids, when the optional `tensorboard` package is installed."""
from __future__ import annotations

import io
import os


class TensorBoard:
    """Rank 0 writes `<run_dir>/tensorboard`; a no-op without the package or for object-store run dirs."""

    def __init__(self, run_dir: str, enabled: bool):
        self.writer = None
        if not enabled or "://" in run_dir:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the optional extra is not installed: scalars stay in metrics.jsonl only
            return
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def scalars(self, record: dict) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(f"train/{key}", value, record["step"])

    def image(self, tag: str, png: bytes, step: int) -> None:
        if self.writer is None:
            return
        import numpy as np
        from PIL import Image
        self.writer.add_image(tag, np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
