"""The optimizers behind `optim.name` (the learning-rate schedule is zerokit/schedule.py).

    adamw      torch AdamW (DeepSpeedCPUAdam when DeepSpeed offloads the optimizer)
    lion       `Lion` below: torch ops only, so it steps whole tensors, ZeRO's flat partitions and
               FSDP2's DTensor shards alike
    adamw8bit, lion8bit   bitsandbytes' block-wise 8-bit states (plain/DDP and ZeRO; its kernels take no DTensor)
    muon       Muon on the 2-D matrices inside the transformer blocks, AdamW on the rest (embeddings, head,
               biases, norms): torch.optim.Muon (`MuonAdamW`) on plain/DDP; under ZeRO, whose partitions
               are flat, DeepSpeed's MuonWithAuxAdam, which orthogonalises each whole matrix itself (ZeRO-3:
               only with reduce_scatter off, DeepSpeed's rule).
Which engine allows which is `check_engine`, the one place that says so.
"""
from __future__ import annotations

import torch

from zerokit.errors import UsageError

OPTIMIZERS = ("adamw", "lion", "adamw8bit", "lion8bit", "muon")
MUON_MOMENTUM = 0.95  # Keller Jordan's Muon default, torch's and DeepSpeed's too


def ndim(p: torch.Tensor) -> int:
    """The parameter's own rank: a ZeRO-3 partitioned one (built under deepspeed.zero.Init) is a 1-D
    placeholder, its shape in ds_shape."""
    return len(getattr(p, "ds_shape", p.shape))


def param_groups(model: torch.nn.Module, weight_decay: float, params=None) -> list[dict]:
    # Decay matrices (embeddings, linears); never biases or norm gains (nanoGPT/GPT-3 practice).
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    decay = [p for p in params if ndim(p) >= 2]
    no_decay = [p for p in params if ndim(p) < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def check_engine(name: str, engine: str, *, offload: bool = False, stage: int = 0, json_optimizer: bool = False,
                 reduce_scatter: bool = True) -> None:
    """What each engine ("plain", "deepspeed", "fsdp") allows, as a UsageError naming an alternative.
    `reduce_scatter`: DeepSpeed's zero_optimization.reduce_scatter (its default is on)."""
    if name not in OPTIMIZERS:
        raise UsageError(f"optim.name={name} is not one of {', '.join(OPTIMIZERS)}; set e.g. optim.name=adamw")
    if name == "adamw":
        return
    if json_optimizer:
        raise UsageError(f"optim.name={name} and the DeepSpeed JSON's own \"optimizer\" block both choose the optimizer; "
                         f"delete the JSON's \"optimizer\" block (or keep it and set optim.name=adamw)")
    if engine == "deepspeed" and offload:
        raise UsageError(f"optim.name={name} cannot run under DeepSpeed's offload_optimizer (it steps the host copy "
                         f"with DeepSpeedCPUAdam); use optim.name=adamw, or a JSON without offload_optimizer (e.g. zero2.json)")
    if engine == "deepspeed" and name == "muon" and stage == 3 and reduce_scatter:
        raise UsageError("optim.name=muon under ZeRO-3: DeepSpeed refuses Muon with reduce_scatter (on by default); "
                         "set \"reduce_scatter\": false in the JSON's zero_optimization, or use ZeRO-1/2 (ds_config=zero2)")
    if engine == "fsdp" and name != "lion":
        raise UsageError(f"optim.name={name} cannot step FSDP2's sharded DTensor parameters "
                         f"({'bitsandbytes kernels take plain tensors' if '8bit' in name else 'Muon needs whole matrices'}); "
                         f"use DeepSpeed ZeRO-2 (ds_config=zero2) or DDP (fsdp=none)")


def build_optimizer(model: torch.nn.Module, train, optim=None, *, engine: str = "plain",
                    cpu_adam: bool = False) -> torch.optim.Optimizer:
    """The optimizer `optim.name` asks for, with train.lr/betas/eps/weight_decay. `engine` "deepspeed"
    builds DeepSpeed's Muon (flat ZeRO partitions), anything else torch's."""
    name = (optim or {}).get("name", "adamw")
    lr, betas, eps, wd = train.lr, tuple(train.betas), train.eps, train.weight_decay
    if name == "adamw":
        return build_adamw(model, lr, betas, eps, wd, cpu_adam=cpu_adam)
    if name == "lion":
        return Lion(param_groups(model, wd), lr=lr, betas=betas)
    if name in ("adamw8bit", "lion8bit"):
        import bitsandbytes as bnb
        if name == "adamw8bit":
            return bnb.optim.AdamW8bit(param_groups(model, wd), lr=lr, betas=betas, eps=eps)
        return bnb.optim.Lion8bit(param_groups(model, wd), lr=lr, betas=betas)
    return build_muon(model, lr, betas, eps, wd, optim["muon_lr"], deepspeed=engine == "deepspeed")


def closure_loss(closure):
    """torch's optimizer contract: a closure, when given, re-evaluates the loss (with gradients on)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): one moment m per parameter;
    p <- p(1 - lr*wd) - lr * sign(b1*m + (1-b1)*g), then m <- b2*m + (1-b2)*g. Every element moves by
    exactly lr, so it wants a ~3-10x lower lr than AdamW."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            (beta1, beta2), lr = group["betas"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(m.lerp(p.grad, 1 - beta1).sign_(), alpha=-lr)
                m.lerp_(p.grad, 1 - beta2)
        return loss


def hidden_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    """Muon's parameters: the trainable 2-D weights inside the transformer blocks (attention and MLP
    projections, LoRA factors), not the embeddings, the head, biases or norms."""
    from zerokit.models import block_classes
    blocks = block_classes(model)
    found: dict[int, torch.Tensor] = {}
    for m in model.modules():
        if type(m).__name__ in blocks:
            found.update({id(p): p for p in m.parameters() if p.requires_grad and ndim(p) == 2})
    return list(found.values())


def muon_groups(model: torch.nn.Module, weight_decay: float, lr_scale: float) -> tuple[list[dict], list[dict]]:
    """(AdamW's groups, Muon's group). `lr_scale` (optim.muon_lr / train.lr) rides in Muon's group, so the
    schedule's lr reaches it scaled (`set_lrs`)."""
    matrices = hidden_matrices(model)
    ids = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return param_groups(model, weight_decay, rest), [{"params": matrices, "weight_decay": weight_decay,
                                                      "lr_scale": lr_scale}]


def build_muon(model, lr, betas, eps, weight_decay, muon_lr, deepspeed: bool = False) -> torch.optim.Optimizer:
    adam, muon = muon_groups(model, weight_decay, muon_lr / lr)
    if not muon[0]["params"]:
        raise UsageError("optim.name=muon found no 2-D matrix inside a transformer block to train; use optim.name=adamw")
    if not deepspeed:
        return MuonAdamW(adam, muon, lr=lr, betas=betas, eps=eps, on_cuda=next(model.parameters()).is_cuda)
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
    matrices = {id(p) for p in muon[0]["params"]}
    for p in model.parameters():  # what ZeRO reads to orthogonalise a partition's matrices
        p.use_muon = id(p) in matrices
    # "standard" Newton-Schulz runs in bf16, as torch's Muon does ("gram", its default, in fp16 or fp32).
    groups = [*({**g, "use_muon": False, "lr": lr, "betas": betas, "eps": eps} for g in adam),
              {**muon[0], "use_muon": True, "lr": muon_lr, "momentum": MUON_MOMENTUM, "ns_method": "standard"}]
    return MuonWithAuxAdam(groups)  # AdamW for the rest inline (its adam_update), on ZeRO's flat partitions


class Fp32Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in fp32, for the CPU: torch's runs it in bf16, which
    on a CPU without bf16 matrix units (this machine's EPYC) made the iteration 19x slower than fp32 and the
    demo's whole step 5x slower (1.24 against 0.23 CPU s). Same state (`momentum_buffer`), same update."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            a, b, c = group["ns_coefficients"]
            for p, g, buf in zip(params, grads, bufs):
                buf.lerp_(g, 1 - group["momentum"])
                x = g.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                x = x.T if x.size(0) > x.size(1) else x
                x = x / x.norm().clamp(min=group["eps"])
                for _ in range(group["ns_steps"]):
                    gram = x @ x.T
                    x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
                x = x.T if g.size(0) > g.size(1) else x
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(x, alpha=-group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5)
        return loss


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW and torch.optim.Muon as one optimizer: one param_groups list (AdamW's first, so
    group 0 carries the schedule's own lr) and one state, so gradient clipping, GradScaler and DCP
    checkpoints see an ordinary torch optimizer."""

    def __init__(self, adam_groups, muon_groups, *, lr, betas, eps, on_cuda: bool = False):
        self.adamw = torch.optim.AdamW(adam_groups, lr=lr, betas=betas, eps=eps, fused=on_cuda or None,
                                       foreach=None if on_cuda else True)
        muon = torch.optim.Muon if on_cuda else Fp32Muon
        self.muon = muon(muon_groups, lr=lr * muon_groups[0]["lr_scale"], momentum=MUON_MOMENTUM)
        super().__init__(self.adamw.param_groups + self.muon.param_groups, {})
        self._share()

    def _share(self) -> None:
        """Point both at this optimizer's groups and state (again after load_state_dict replaced them)."""
        n = len(self.adamw.param_groups)
        self.adamw.param_groups, self.muon.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.adamw.state = self.muon.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        self.adamw.step()
        self.muon.step()
        return loss

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._share()


def set_lrs(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The step's lr on every group, times the group's `lr_scale` where it has one (Muon's matrices)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_adamw(model: torch.nn.Module, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                cpu_adam: bool = False) -> torch.optim.Optimizer:
    """DeepSpeedCPUAdam when DeepSpeed offloads the optimizer to the host, else torch AdamW with the
    fastest multi-tensor kernel the device has (fused on CUDA, foreach on CPU)."""
    groups = param_groups(model, weight_decay)
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=on_cuda or None, foreach=None if on_cuda else True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
