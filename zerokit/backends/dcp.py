"""Sharded checkpoints through torch.distributed.checkpoint (DCP), used by the plain and FSDP
backends. DCP stores each tensor with its global shape, so a checkpoint written by N ranks
loads on any other number of ranks (and by a plain single process)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from zerokit.optim import set_lrs


def save_dcp(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(Path(path) / "dcp"))


def load_dcp(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(Path(path) / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


class DCPState:
    """set_lr/save/load for the backends that own a torch optimizer (`self.module`, `self.optimizer`)."""

    def set_lr(self, lr: float) -> None:
        set_lrs(self.optimizer, lr)

    def save(self, path) -> None:
        save_dcp(path, self.module, self.optimizer)

    def load(self, path) -> None:
        load_dcp(path, self.module, self.optimizer)


def full_model_state_dict(model: torch.nn.Module) -> dict:
    """Unsharded model weights on CPU (a collective under FSDP; every rank gets them)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def dcp_model_weights(path) -> dict:
    """Offline: the model weights of a DCP checkpoint as one state dict (no process group needed)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(Path(path) / "dcp"), str(out))
        state = torch.load(out, map_location="cpu", weights_only=True)
    return state["model"]
