"""The optimizer step of the backends that own a torch optimizer (plain/DDP, FSDP2), with fp16's
dynamic loss scaling, and the scaler's state in the checkpoint beside the DCP shards: without it a
resumed fp16 run would restart at 2^16 and skip steps the uninterrupted run takes."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from zerokit.backends.dcp import DCPState

SCALER_FILE = "grad_scaler.json"


class LossScaledDCP(DCPState):
    """Needs `self.module`, `self.optimizer`, `self.scaler` (a GradScaler, enabled for fp16 only),
    `self.grad_clip`, `self.info` and the counter `self.skipped_updates`. The scale is the same on every rank (inf checks are all-reduced),
    so rank 0 writes it once."""

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> torch.Tensor:
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.module.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else math.inf)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)  # skipped when a gradient is inf/nan (fp16 overflow)
        self.scaler.update()
        if scale is not None and self.scaler.get_scale() < scale:  # the scale backs off only after a skip
            self.skipped_updates += 1
        self.optimizer.zero_grad(set_to_none=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def skip_step(self) -> bool:
        """Drop this window's gradients without an update (train.nonfinite=skip)."""
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def save(self, path) -> None:
        super().save(path)
        if self.scaler.is_enabled() and self.info.is_main:
            (Path(path) / SCALER_FILE).write_text(json.dumps(self.scaler.state_dict()))

    def load(self, path) -> None:
        super().load(path)
        saved = Path(path) / SCALER_FILE
        if self.scaler.is_enabled() and saved.is_file():  # absent: the checkpoint was not written in fp16
            self.scaler.load_state_dict(json.loads(saved.read_text()))
