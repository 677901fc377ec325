"""The config sections other than the levers: one dataclass per section (``data``, ``model``,
``train``, ``optim``, ``deepspeed``, ``logging``), each field with its default and, as a trailing
comment, its unit or choices (what a run folder's ``config.yaml`` shows), and each section's rules
(``validate(check)``). The ``memory`` and ``parallel`` keys are ``memory.Levers``; ``config.py``
puts the sections together (load, ``--set``, dump, the rules between sections).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

#: ``model.energy_normalization``: how the model's output is turned into eV (see ``model.py``)
ENERGY_NORMALIZATIONS = ("total_mean_std", "per_atom_mean_force_rms")

#: every ``*.seed`` key: numpy's generators refuse a negative seed and torch one above 2**64 - 1
SEED_RANGE = (0, 2**64 - 1)


def check_seed(check, key: str, value) -> None:
    """The rule of every seed key (``data.seed``, ``train.seed``), the one copy."""
    low, high = SEED_RANGE
    check(low <= value <= high, key, f"must be an integer from {low} to 2**64-1 (a random-number seed), not {value!r}")


@dataclass
class DataConfig:
    root: str = "data"  # folder holding the dataset files (catalog names resolve here)
    name: Optional[str] = None  # catalog name, e.g. md17_aspirin, rmd17_ethanol, md22_AT-AT
    path: Optional[str] = None  # a file; wins over name
    train_size: int = 950  # frames
    val_size: int = 50  # frames
    test_size: Optional[int] = None  # frames; None = all frames left after train and val
    seed: int = 1  # split seed (Equiformer's MD17 split uses 1)
    split_index: Optional[int] = None  # rMD17 only: use the published split 0-4 instead of a seeded one

    def validate(self, check):
        check(self.name is not None or self.path is not None, "name", "set data.name or data.path")
        check(self.train_size >= 1, "train_size", "must be >= 1")
        check(self.val_size >= 0, "val_size", "must be >= 0")
        check(self.test_size is None or self.test_size >= 0, "test_size", "must be >= 0 or null")
        check(self.split_index is None or 0 <= self.split_index <= 4, "split_index", "must be 0-4")
        check_seed(check, "seed", self.seed)


@dataclass
class ModelConfig:
    """Defaults are the paper's MD17 model at Lmax 2 (3.50 M parameters)."""

    irreps_node: str = "128x0e+64x1e+32x2e"
    lmax: int = 2  # spherical harmonics 1x0e+1x1e+...+1x{lmax}e
    num_blocks: int = 6
    num_heads: int = 4
    irreps_head: str = "32x0e+16x1e+8x2e"  # per attention head
    irreps_feedforward: str = "384x0e+192x1e+96x2e"
    irreps_feature: str = "512x0e"  # output of the last block, read by the energy head
    num_radial: int = 32
    radial_basis: str = "exp_normal"  # exp_normal | gaussian | bessel
    radial_hidden: list[int] = field(default_factory=lambda: [64, 64])
    cutoff: float = 5.0  # Å
    attention: str = "mlp"  # mlp | dot
    message: str = "nonlinear"  # nonlinear | linear
    alpha_drop: float = 0.0
    proj_drop: float = 0.0
    drop_path: float = 0.0
    max_atomic_number: int = 64
    avg_num_neighbors: Optional[float] = 15.57930850982666  # the original's (QM9) constant; null = from the training split
    avg_num_atoms: Optional[float] = 18.03065905448718  # the original's (QM9) constant; null = from the training split
    dtype: str = "float32"  # float32 | float64
    smooth_cutoff: bool = False  # true: cutoff envelope on attention weights, values and edge-degree embedding (energy continuous at the cutoff); false = the original
    energy_normalization: str = "total_mean_std"  # total_mean_std (the original: E = std * out + mean of the training split's total energies) | per_atom_mean_force_rms
    tensor_product: str = "fast"  # fast | e3nn | cueq: how the depth-wise tensor products compute (one function, the same weights: checkpoints load under any); cueq needs pip install '.[cueq]'

    def validate(self, check):
        """Every rule of the model section, the one copy: ``load_config`` runs it at load and
        ``model.build_model`` runs it (through :func:`validate_section`) for a ModelConfig built in
        Python. The builder and the ``nn`` modules trust what passes here."""
        from e3nn import o3

        from .nn.attention import ATTENTION_TYPES, MESSAGE_TYPES
        from .nn.radial import RADIAL_BASES
        from .nn.tensor_product import TP_IMPLEMENTATIONS

        irreps = {}
        for key in ("irreps_node", "irreps_head", "irreps_feedforward", "irreps_feature"):
            try:
                irreps[key] = o3.Irreps(getattr(self, key))
            except Exception:
                check(False, key, f"not an irreps string: {getattr(self, key)!r}")
        check(all(ir.l == 0 and ir.p == 1 for _, ir in irreps["irreps_feature"]), "irreps_feature",
              f"must be even scalars only (e.g. '512x0e'), got {irreps['irreps_feature']}")
        for key in ("lmax", "num_blocks", "num_heads", "num_radial", "max_atomic_number"):
            value = getattr(self, key)
            check(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        check(0 <= self.lmax <= 6, "lmax", "must be 0-6")
        check(self.num_blocks >= 1, "num_blocks", "must be >= 1")
        check(self.num_heads >= 1, "num_heads", "must be >= 1")
        check(self.num_radial >= 1, "num_radial", "must be >= 1")
        check(self.radial_basis in RADIAL_BASES, "radial_basis",
              f"must be {', '.join(RADIAL_BASES[:-1])} or {RADIAL_BASES[-1]}, not {self.radial_basis!r}")
        hidden = self.radial_hidden
        check(isinstance(hidden, (list, tuple)) and len(hidden) > 0
              and all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden), "radial_hidden",
              f"must be a non-empty list of positive integers, got {hidden!r}")
        check(self.cutoff > 0, "cutoff", "must be > 0 Å")
        check(self.attention in ATTENTION_TYPES, "attention", f"must be mlp or dot, not {self.attention!r}")
        check(self.attention != "mlp" or any(ir.l == 0 and ir.p == 1 for _, ir in irreps["irreps_head"]), "irreps_head",
              f"MLP attention needs even scalars in each head, got {irreps['irreps_head']}")
        check(self.message in MESSAGE_TYPES, "message",
              f"must be nonlinear or linear, not {self.message!r}")
        for key in ("alpha_drop", "proj_drop", "drop_path"):
            check(0.0 <= getattr(self, key) < 1.0, key, "must be in [0, 1)")
        check(self.max_atomic_number >= 1, "max_atomic_number", "must be >= 1")
        check(self.avg_num_neighbors is None or self.avg_num_neighbors > 0, "avg_num_neighbors", "must be > 0")
        check(self.avg_num_atoms is None or self.avg_num_atoms > 0, "avg_num_atoms", "must be > 0")
        check(self.dtype in ("float32", "float64"), "dtype", f"must be float32 or float64, not {self.dtype!r}")
        check(self.energy_normalization in ENERGY_NORMALIZATIONS, "energy_normalization",
              f"must be one of {', '.join(ENERGY_NORMALIZATIONS)}, not {self.energy_normalization!r}")
        tp = getattr(self, "tensor_product", "fast")  # a ModelConfig-like object from before the key: the default
        check(tp in TP_IMPLEMENTATIONS, "tensor_product", f"must be fast, e3nn or cueq, not {tp!r}")
        if tp == "cueq":
            from .nn import tensor_product_cueq

            check(tensor_product_cueq.available(), "tensor_product", tensor_product_cueq.INSTALL_HINT)


@dataclass
class TrainConfig:
    max_epochs: int = 1500
    max_steps: Optional[int] = None  # optimizer steps; None = no limit
    batch_size: int = 8  # molecules per optimizer step, over all data-parallel ranks
    eval_batch_size: int = 16
    energy_weight: float = 1.0
    force_weight: float = 80.0
    loss: str = "l2mae"  # l2mae (original: mean per-atom L2 norm of the force error) | mae | mse
    ema_decay: Optional[float] = None  # None = no EMA; e.g. 0.999
    grad_clip: Optional[float] = None  # max gradient norm; None = off
    eval_every: int = 1  # epochs
    log_every: int = 50  # optimizer steps between metrics.csv rows of training loss
    max_eval_frames: Optional[int] = None  # cap on validation frames per evaluation; None = all
    out_dir: str = "runs"
    run_name: Optional[str] = None  # None = <data name>_<timestamp>
    init_from: Optional[str] = None  # a checkpoint (e.g. from tools/import_original.py) whose weights start this run
    init_statistics: str = "training_split"  # with init_from: normalisation from training_split | checkpoint
    seed: int = 0  # model init and shuffling
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True  # progress bar (rank 0 only)
    compile: bool = False  # true: energies, forces and force-loss gradients of the training step by torch.compile'd code (training/compiled.py); plain path only

    def validate(self, check):
        check(self.max_epochs >= 1, "max_epochs", "must be >= 1")
        check(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1 or null")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        check(self.energy_weight >= 0, "energy_weight", "must be >= 0")
        check(self.force_weight >= 0, "force_weight", "must be >= 0")
        check(self.energy_weight + self.force_weight > 0, "force_weight", "energy and force weights are both 0")
        check(self.loss in ("l2mae", "mae", "mse"), "loss", f"must be l2mae, mae or mse, not {self.loss!r}")
        check(self.ema_decay is None or 0.0 < self.ema_decay < 1.0, "ema_decay", "must be in (0, 1) or null")
        check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be > 0 or null")
        check(self.eval_every >= 1, "eval_every", "must be >= 1")
        check(self.log_every >= 1, "log_every", "must be >= 1")
        check(self.max_eval_frames is None or self.max_eval_frames >= 1, "max_eval_frames", "must be >= 1")
        check(self.device in ("auto", "cpu", "cuda"), "device", f"must be auto, cpu or cuda, not {self.device!r}")
        check(self.init_statistics in ("training_split", "checkpoint"), "init_statistics",
              f"must be training_split or checkpoint, not {self.init_statistics!r}")
        name = self.run_name
        check(name is None or (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
                               and (os.altsep is None or os.altsep not in name) and "\0" not in name),
              "run_name", f"must be a folder name (the run folder is train.out_dir/train.run_name: no path "
              f"separators, not '.' or '..'), not {name!r}")
        check_seed(check, "seed", self.seed)


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: str = "cosine"  # cosine | constant
    warmup_epochs: float = 10.0
    warmup_lr: float = 1e-6  # learning rate at the start of the warm-up
    min_lr: float = 1e-6

    def validate(self, check):
        check(self.lr > 0, "lr", "must be > 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        check(self.scheduler in ("cosine", "constant"), "scheduler", f"must be cosine or constant, not {self.scheduler!r}")
        check(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        check(self.warmup_lr >= 0, "warmup_lr", "must be >= 0")
        check(0 <= self.min_lr <= self.lr, "min_lr", "must be between 0 and optim.lr")


@dataclass(frozen=True)
class ParallelSection:
    """``cfg.parallel``, read-only: its one key, ``graph_partitions``, is a lever, held by ``cfg.memory``
    (a :class:`~scalable_equiformer.memory.Levers`) like the ``memory.*`` keys."""

    graph_partitions: int


@dataclass
class DeepSpeedConfig:
    enabled: str = "auto"  # auto (when launched with several ranks or by the deepspeed launcher) | true | false
    zero_stage: int = 0  # 0 = plain data parallel; 1, 2, 3 shard optimizer state / gradients / parameters
    extra: dict = field(default_factory=dict)  # raw DeepSpeed config keys merged last

    def validate(self, check):
        check(str(self.enabled).lower() in ("auto", "true", "false"), "enabled", "must be auto, true or false")
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", "must be 0, 1, 2 or 3")


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    plot: bool = True  # learning_curve.png at the end of training
    level: str = "info"  # debug | info | warning

    def validate(self, check):
        check(self.level in ("debug", "info", "warning"), "level", "must be debug, info or warning")
