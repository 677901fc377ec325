"""The optimizer step behind one interface: plain torch (one process, or several with a gradient
all-reduce) or a DeepSpeed engine (ZeRO stage 0-3).

Both engines see the same losses: each micro-batch loss is its share of the whole optimizer step
(sums over the micro-batch divided by counts over the global batch, see :mod:`.loss`), so the sum
over micro-batches and ranks is the full-batch loss. The plain engine sums gradients over ranks;
DeepSpeed *averages* over micro-batches and ranks, so its engine multiplies each loss by
``gradient_accumulation_steps x world_size`` first. Either way the update equals one full batch
on one process.

The DeepSpeed config is generated from the typed config (:func:`deepspeed_config`): ZeRO stage,
batch sizes, gradient accumulation, clipping, precision; ``deepspeed.extra`` is merged last.
The optimizer is always a client ``torch.optim.AdamW`` (a DeepSpeed ``"type": "AdamW"`` would
compile fused_adam for minutes) and the learning rate is set by the trainer every step.

ZeRO-3 and forces: the force loss differentiates through ``autograd.grad(E, pos,
create_graph=True)``. DeepSpeed's ZeRO-3 fetches and frees each module's parameters in module
hooks, which the double-backward graph of the forces bypasses (parameters are already freed when
the second backward reaches them: "size of tensor a (0) must match ..."), and its memory-efficient
linear has a backward that is not twice differentiable ("mat2 must be a matrix"). Under ZeRO-3
this engine therefore (a) turns ``memory_efficient_linear`` off, (b) removes DeepSpeed's per-module
hooks and (c) runs each micro-step (forward, forces, loss, backward) inside one gather of all
parameters (:class:`deepspeed.zero.GatheredParameters`), which partitions them again afterwards.
Gradients are still reduce-scattered by ZeRO-3's gradient hooks, and optimizer state, fp32 master
weights and gradients stay partitioned; what ZeRO-3 adds over ZeRO-2 is that parameters are
partitioned between micro-steps (Equiformer's parameters are few, the activations of the force
graph are what fills memory, see ``memory.*``).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

import torch

from ..errors import CheckpointError, ConfigError
from .batches import BatchPlan
from .checkpoint import clean_state
from .steps import base_model, loss_scaler, model_call

log = logging.getLogger(__name__)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only; none on biases, norms and other 1-d parameters
    (as the original's timm optimizer factory)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(model: torch.nn.Module, optim, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`. ``fused``: torch's fused kernel (one call for all parameters,
    the same update to rounding: 3x faster than the per-parameter loop for the paper's 414 tensors
    on one CPU core), where every parameter is a floating tensor on the CPU or CUDA; the DeepSpeed
    engine keeps the loop (ZeRO hands the optimizer its own flat partitions)."""
    params = list(model.parameters())
    fused = fused and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas),
                             weight_decay=optim.weight_decay, **({"fused": True} if fused else {}))


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


#: DeepSpeed's default gradient bucket (elements)
DS_BUCKET_DEFAULT = 500_000_000
#: ZeRO-1/2 assert ``allgather_bucket_size % nccl_start_alignment_factor == 0`` with the factor a constant 2
#: (``deepspeed/runtime/zero/stage_1_and_2.py``: "4-byte alignment/sizeof(fp16) = 2", whatever the world
#: size or dtype); ZeRO-3 and the reduce bucket ask for nothing but > 0. Buckets are rounded up to it.
DS_BUCKET_ALIGNMENT = 2


def zero_bucket_size(num_params: int) -> int:
    """ZeRO bucket (elements) that holds every gradient of a ``num_params`` model at once: at least 2**20,
    at most DeepSpeed's default, a multiple of :data:`DS_BUCKET_ALIGNMENT` (an odd parameter count, such as
    the paper model's 3,496,001, is rounded up)."""
    bucket = min(DS_BUCKET_DEFAULT, max(int(num_params), 1 << 20))
    return -(-bucket // DS_BUCKET_ALIGNMENT) * DS_BUCKET_ALIGNMENT


def deepspeed_config(cfg, plan: BatchPlan, world_size: int, num_params: Optional[int] = None) -> dict:
    """DeepSpeed JSON config from the typed config. DeepSpeed counts every rank as data parallel,
    so ``train_batch_size`` = micro x accumulation x world size.

    ``num_params``: the model's parameter count; ZeRO's gradient buckets are then sized to hold
    every gradient at once (:func:`zero_bucket_size`). DeepSpeed's default bucket of 5e8 elements is
    allocated whatever the model's size (ZeRO-1/2 with contiguous gradients: in every backward;
    ZeRO-3: at start), 1.9 GiB in fp32: for the 3.5 M parameters of the paper's model that is
    1.9 GiB of a GPU next to 56 MB of model states, and a peak the planner's estimate does not know."""
    stage = cfg.deepspeed.zero_stage
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["memory_efficient_linear"] = False  # its backward is not twice differentiable (forces)
    if num_params and stage > 0:
        bucket = zero_bucket_size(num_params)
        zero["reduce_bucket_size"] = bucket
        zero["allgather_bucket_size"] = bucket
    ds = {
        "train_batch_size": plan.micro_batch_size * plan.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "zero_optimization": zero,
        "gradient_clipping": float(cfg.train.grad_clip or 0.0),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    precision = cfg.memory.precision
    if precision in ("bf16", "fp16"):
        if precision == "fp16" and stage > 0:
            raise ConfigError("memory.precision: fp16 with deepspeed.zero_stage > 0 is not supported "
                              "(DeepSpeed's torch_autocast scales fp16 losses only without ZeRO); use bf16")
        # parameters and optimizer state stay fp32; the forward runs under torch.autocast
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if precision == "bf16" else "float16"}
    return _merge(ds, dict(cfg.deepspeed.extra or {}))


class PlainEngine:
    """torch.optim.AdamW on the module; with several ranks, gradients are summed over them."""

    kind = "torch"

    def __init__(self, model, cfg, plan: BatchPlan, group=None, world: int = 1):
        self.module = model
        self.base = base_model(model)
        self.cfg = cfg
        self.plan = plan
        self.group = group
        self.world = world
        self.optimizer = make_optimizer(model, cfg.optim, fused=True)
        self.scaler = loss_scaler(cfg.memory.precision, next(model.parameters()).device)
        self.zero_stage = 0
        if world > 1:  # same initial weights everywhere
            for t in list(model.parameters()) + list(model.buffers()):
                torch.distributed.broadcast(t.data, src=0, group=group)
        self.optimizer.zero_grad(set_to_none=True)

    def micro_step(self, batch) -> dict:
        return model_call(self.module, batch, self.cfg)

    def backward(self, loss: torch.Tensor) -> None:
        # only the parameters' gradients: the positions (a leaf that requires grad, for the forces)
        # would get one too, and autograd would run every node that leads only to them
        params = [p for p in self.module.parameters() if p.requires_grad]
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward(inputs=params)

    def after_micro(self) -> None:
        pass

    def micro_context(self):
        return contextlib.nullcontext()

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step(self, lr: float) -> None:
        self.set_lr(lr)
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.world > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=self.group)
            offset = 0
            for p in params:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- weights and state --
    def full_state_dict(self) -> dict:
        return clean_state(self.base.state_dict())

    def named_full_parameters(self):
        return self.base.named_parameters()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict, path) -> None:
        if state.get("optimizer") is None:
            raise CheckpointError(f"{path}: no optimizer state in it "
                                  "(written by a DeepSpeed run? resume with DeepSpeed)")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: optimizer state does not fit this model ({exc})") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def save_sharded(self, run_dir: Path, tag: str) -> Optional[str]:
        return None

    def load_sharded(self, run_dir: Path, tag: Optional[str], path) -> None:
        pass

    def remove_sharded(self, run_dir: Path, keep: Optional[str]) -> None:
        pass


class DeepSpeedEngine:
    """A DeepSpeed engine over the module (ZeRO stage ``deepspeed.zero_stage``)."""

    kind = "deepspeed"

    def __init__(self, model, cfg, plan: BatchPlan, world: int):
        import deepspeed

        self.cfg = cfg
        self.plan = plan
        self.world = world
        self.zero_stage = cfg.deepspeed.zero_stage
        self.ds_config = deepspeed_config(cfg, plan, world, num_params=sum(p.numel() for p in model.parameters()))
        optimizer = make_optimizer(model, cfg.optim)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.ds_config)
        self.client_optimizer = optimizer
        self.module = self.engine.module
        self.base = base_model(self.module)
        if self.zero_stage == 3:
            offload = getattr(self.optimizer, "parameter_offload", None)
            if offload is None or not hasattr(offload, "_remove_module_hooks"):
                raise ConfigError("deepspeed.zero_stage=3: this DeepSpeed version does not expose the ZeRO-3 module "
                                  "hooks that force training must replace; use zero_stage 2")
            # per-module fetch/release does not cover the double-backward graph of the forces:
            # gather all parameters per micro-step instead (micro_context)
            offload._remove_module_hooks()
        # DeepSpeed averages over accumulation steps and all ranks (D x P: the P ranks of a
        # partition group hold partial gradients of one molecule); our losses are shares of the sum
        self.loss_factor = float(plan.grad_accum * world)
        self._gather = None

    def micro_context(self):
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    def micro_step(self, batch) -> dict:
        return model_call(self.engine, batch, self.cfg)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * self.loss_factor)

    def after_micro(self) -> None:
        self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step

    def set_lr(self, lr: float) -> None:
        for g in self.client_optimizer.param_groups:
            g["lr"] = lr
        for g in getattr(self.optimizer, "param_groups", []):
            g["lr"] = lr

    def step(self, lr: float) -> None:
        self.set_lr(lr)
        self.engine.step()

    # -- weights and state --
    def full_state_dict(self) -> dict:
        """Consolidated weights on every rank (ZeRO-3: gathered)."""
        if self.zero_stage != 3:
            return clean_state(self.base.state_dict())
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.base.parameters()), modifier_rank=None):
            return clean_state(self.base.state_dict())

    def named_full_parameters(self):
        if self.zero_stage != 3:
            return list(self.base.named_parameters())
        state = self.full_state_dict()
        return [(k, state[k]) for k, _ in self.base.named_parameters()]

    def state_dict(self) -> dict:
        return {"optimizer": None, "scaler": None}

    def load_state_dict(self, state: dict, path) -> None:
        pass

    def save_sharded(self, run_dir: Path, tag: str) -> Optional[str]:
        """DeepSpeed's own checkpoint (every rank writes its shard) under ``<run>/deepspeed/<tag>``."""
        self.engine.save_checkpoint(str(Path(run_dir) / "deepspeed"), tag=tag)
        return tag

    def load_sharded(self, run_dir: Path, tag: Optional[str], path) -> None:
        folder = Path(run_dir) / "deepspeed"
        if tag is None or not (folder / tag).is_dir():
            raise CheckpointError(f"{path}: its DeepSpeed state {folder / str(tag)} is missing "
                                  "(a checkpoint of a plain torch run cannot resume under DeepSpeed)")
        try:
            load_path, _ = self.engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True,
                                                       load_lr_scheduler_states=False, load_module_strict=True)
        except (RuntimeError, ValueError, KeyError, AssertionError) as exc:
            raise CheckpointError(f"{folder / tag}: DeepSpeed checkpoint does not load "
                                  f"(another ZeRO stage or world size?): {str(exc).splitlines()[0][:160]}") from None
        if load_path is None:
            raise CheckpointError(f"{folder / tag}: DeepSpeed checkpoint does not load")

    def remove_sharded(self, run_dir: Path, keep: Optional[str]) -> None:
        import shutil

        folder = Path(run_dir) / "deepspeed"
        if not folder.is_dir():
            return
        for p in folder.iterdir():
            if p.is_dir() and p.name != keep:
                shutil.rmtree(p, ignore_errors=True)


def use_deepspeed(cfg, launcher: str, world_size: int) -> bool:
    """``deepspeed.enabled``: true / false, or auto = with several ranks, under the deepspeed
    launcher, or for ZeRO stage > 0. DeepSpeed's stage-0 gradient all-reduce takes no float64, so
    auto picks the plain torch engine (which sums gradients over ranks) for float64 at stage 0."""
    enabled = str(cfg.deepspeed.enabled).lower()
    fp64_stage0 = cfg.model.dtype == "float64" and cfg.deepspeed.zero_stage == 0
    if enabled == "true":
        if fp64_stage0:
            raise ConfigError("model.dtype float64 with DeepSpeed ZeRO stage 0: DeepSpeed all-reduces only "
                              "fp32/bf16/fp16 gradients; set deepspeed.enabled=auto or false (plain torch data "
                              "parallel) or zero_stage >= 1")
        return True
    if enabled == "false":
        if cfg.deepspeed.zero_stage > 0:
            raise ConfigError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} needs DeepSpeed, "
                              "but deepspeed.enabled is false")
        return False
    if fp64_stage0:
        return False
    return world_size > 1 or launcher == "deepspeed" or cfg.deepspeed.zero_stage > 0


__all__ = ["PlainEngine", "DeepSpeedEngine", "deepspeed_config", "make_optimizer", "param_groups", "use_deepspeed"]
