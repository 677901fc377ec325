"""Typed configuration: one dataclass per section, YAML files, ``--set`` overrides, validation.

Precedence is ``dataclass defaults < config file < --set overrides``. Every final value remembers
where it came from (:attr:`Config.sources`), and the resolved config is written into each run folder
with the units of every physical quantity as comments.

>>> cfg = load_config("md17_aspirin", ["train.max_epochs=3", "model.cutoff=4.5"])
>>> cfg.train.max_epochs, cfg.model.cutoff, cfg.data.name
(3, 4.5, 'md17_aspirin')

Unknown keys, wrong types and impossible values raise :class:`ConfigError` naming the key and the
file (or ``--set``) they came from. Keys that were removed (:data:`REMOVED`) raise one saying so and
why; only in what this package wrote itself (a run folder's resolved ``config.yaml``, a checkpoint's
stored config) is a removed key at its old default dropped silently, so old runs still resume and load.

The sections are declared in :mod:`.config_sections` and, for ``memory.*`` and
``parallel.graph_partitions``, by :class:`scalable_equiformer.memory.Levers` (``cfg.memory`` is
one: made, and checked, once at load); this module loads, overrides, validates and dumps them.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .config_sections import (  # noqa: F401 (the sections are part of this module's API)
    ENERGY_NORMALIZATIONS,
    SEED_RANGE,
    DataConfig,
    DeepSpeedConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelSection,
    TrainConfig,
    check_seed,
)
from .config_text import CONFIG_DIR, coerce, field_comments, read_config
from .errors import ConfigError
from .memory.levers import LeverError, Levers


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    memory: Levers = field(default_factory=Levers)  # the memory.* keys and parallel.graph_partitions
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # where each non-default value came from: "a.b" -> "<file>" or "--set"
    sources: dict = field(default_factory=dict, repr=False, compare=False)
    # lever values read but not yet made into ``memory`` (a Levers is checked when it is made: at validate)
    _lever_values: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    SECTIONS = ("data", "model", "train", "optim", "memory", "parallel", "deepspeed", "logging")
    #: the sections whose keys are the fields of ``memory`` (a :class:`Levers`)
    LEVER_SECTIONS = ("memory", "parallel")

    @property
    def parallel(self) -> ParallelSection:
        return ParallelSection(self.memory.graph_partitions)

    def section_values(self, section: str) -> dict:
        """``{key: value}`` of one section."""
        if section in self.LEVER_SECTIONS:
            return self.memory.section(section)
        return dataclasses.asdict(getattr(self, section))

    def to_dict(self) -> dict:
        return {s: self.section_values(s) for s in self.SECTIONS}

    def dump(self, path: Union[str, Path, None] = None) -> str:
        """YAML of the resolved config, with units and the origin of each non-default value."""
        lines = ["# scalable_equiformer resolved config", "# units: lengths Å, energies eV, forces eV/Å"]
        for section in self.SECTIONS:
            lines.append(f"{section}:")
            comments = field_comments(_section_class(section))
            for name, raw in self.section_values(section).items():
                value = yaml.safe_dump(raw, default_flow_style=True).strip()
                if value.endswith("\n...") or value.endswith("..."):
                    value = value.replace("\n...", "").replace("...", "").strip()
                note = comments.get(name, "")
                origin = self.sources.get(f"{section}.{name}")
                tail = ("  # " + "; ".join(x for x in (note, f"from {origin}" if origin else "") if x)
                        if (note or origin) else "")
                lines.append(f"  {name}: {value}{tail}")
        text = "\n".join(lines) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    def validate(self, origin: str = "config") -> None:
        def where(key):
            return self.sources.get(key, origin)

        for section in self.SECTIONS:
            if section == "memory":
                self._make_levers(where)
            elif section not in self.LEVER_SECTIONS:
                getattr(self, section).validate(_section_check(section, where))
        if self.memory.keep_blocks > self.model.num_blocks:
            raise ConfigError(f"{where('memory.keep_blocks')}: memory.keep_blocks ({self.memory.keep_blocks}) is more "
                              f"than model.num_blocks ({self.model.num_blocks})")
        if self.memory.micro_batch_size is not None and self.memory.micro_batch_size > self.train.batch_size:
            raise ConfigError(f"{self.sources.get('memory.micro_batch_size', origin)}: memory.micro_batch_size "
                              f"({self.memory.micro_batch_size}) is larger than train.batch_size "
                              f"({self.train.batch_size})")
        if self.deepspeed.zero_stage == 3 and self.model.dtype == "float64":
            where = self.sources.get("deepspeed.zero_stage", origin)
            raise ConfigError(f"{where}: deepspeed.zero_stage=3 with model.dtype=float64: "
                              "DeepSpeed's ZeRO-3 partitions only fp32/bf16/fp16 parameters (whether it notices "
                              "depends on the processor); use model.dtype=float32, or zero_stage 1-2 for a float64 "
                              "model")
        check_compile(self, where=where)

    def _make_levers(self, where) -> None:
        """``memory`` from the lever values read (the one place they are checked: when the
        :class:`Levers` is made); a :class:`ConfigError` naming the key and where it came from."""
        if not self._lever_values:
            return
        try:
            self.memory = self.memory.replace(**self._lever_values)
        except LeverError as e:
            raise ConfigError(f"{where(e.key)}: {e.detail}") from None
        self._lever_values = {}


def _section_check(section: str, where):
    """The ``check(ok, key, message)`` that the sections' ``validate`` methods call."""

    def check(ok, key, message):
        if not ok:
            name = f"{section}.{key}"
            raise ConfigError(f"{where(name)}: {name}: {message}")

    return check


def validate_section(obj, section: str, origin: str = "config") -> None:
    """Run one section's rules on ``obj`` (e.g. a ``ModelConfig`` built in Python, without
    :func:`load_config`): a :class:`ConfigError` naming the key, as at load.

    ``obj`` may be any object with the section's attributes (the section class's ``validate`` is
    called on it). ``model.build_model`` calls this for the model section.
    """
    _section_class(section).validate(obj, _section_check(section, lambda name: origin))


def _section_class(section: str) -> type:
    """The dataclass that declares a section's keys (:class:`Levers` for ``memory`` and ``parallel``)."""
    return {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "optim": OptimConfig,
            "memory": Levers, "parallel": Levers, "deepspeed": DeepSpeedConfig, "logging": LoggingConfig}[section]


#: ``train.compile: true`` refuses these (key, what it needs, why): the compiled step traces the plain
#: autograd path of one process in fp32/fp64 without random masks (``training/compiled.py``)
_COMPILE_NEEDS = (
    ("memory.checkpointing", lambda c: c.memory.checkpointing == "none", "none",
     "the compiled step traces the plain autograd path; checkpointing recomputes blocks outside it"),
    ("memory.precision", lambda c: c.memory.precision == "fp32", "fp32", "mixed precision is not traced"),
    ("parallel.graph_partitions", lambda c: c.parallel.graph_partitions == 1, "1",
     "the halo exchange between blocks is not traced"),
    ("deepspeed.zero_stage", lambda c: c.deepspeed.zero_stage == 0, "0", "DeepSpeed engines are not supported"),
    ("deepspeed.enabled", lambda c: str(c.deepspeed.enabled).lower() != "true", "auto or false",
     "DeepSpeed engines are not supported (plain torch data parallel is)"),
    ("model.alpha_drop", lambda c: c.model.alpha_drop == 0, "0", "random masks are not traced"),
    ("model.proj_drop", lambda c: c.model.proj_drop == 0, "0", "random masks are not traced"),
    ("model.drop_path", lambda c: c.model.drop_path == 0, "0", "random masks are not traced"),
    ("model.tensor_product", lambda c: c.model.tensor_product != "cueq", "fast or e3nn",
     "cuEquivariance's products hold their constants outside the model, which the tracer cannot take"),
)


def check_compile(cfg, where=lambda key: "config") -> None:
    """The rules of ``train.compile``, the one copy: with it on, each key of :data:`_COMPILE_NEEDS`
    must have the value it needs (a :class:`ConfigError` naming the key, one line)."""
    if not getattr(cfg.train, "compile", False):
        return
    for key, ok, need, why in _COMPILE_NEEDS:
        if not ok(cfg):
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            raise ConfigError(f"{where(key)}: train.compile=true needs {key}={need}, not {value!r} ({why})")


# One home per setting: mixed precision is a memory lever (it applies with or without DeepSpeed),
# so the name users know from DeepSpeed configs is an alias of memory.precision.
ALIASES = {("deepspeed", "precision"): ("memory", "precision")}


# Keys that existed once and no longer do: (section, key) -> (old default, why it went).
REMOVED = {
    ("train", "num_workers"): (0, "it never did anything: batches are collated in the training process and the "
                                  "radius graph is built inside the model, so there is no work for loader processes"),
}

#: Keys added after run folders and checkpoints were first written -> the behaviour those had.
#: A resolved config (run folder's config.yaml, a checkpoint's config) lists every key it knew, so
#: one without such a key was made before it existed and gets this value, not today's default.
ADDED = {
    ("model", "energy_normalization"): "per_atom_mean_force_rms",
}


def _fill_added(cfg: "Config", present: set, origin: str) -> None:
    for (section, key), value in ADDED.items():
        if (section, key) not in present:
            setattr(getattr(cfg, section), key, value)
            cfg.sources[f"{section}.{key}"] = f"{origin} (written before {section}.{key} existed)"


#: first line of :meth:`Config.dump` output (a run folder's config.yaml)
_DUMP_HEADER = "# scalable_equiformer resolved config"


def _apply(cfg: Config, section: str, key: str, value: Any, origin: str, from_string: bool,
           written_by_us: bool = False) -> None:
    section, key = ALIASES.get((section, key), (section, key))
    if (section, key) in REMOVED:
        old_default, why = REMOVED[(section, key)]
        if written_by_us and value == old_default:
            return  # an old run folder or checkpoint: every resolved config listed the key
        raise ConfigError(f"{origin}: {section}.{key} was removed ({why}); delete it")
    if section not in Config.SECTIONS:
        hint = difflib.get_close_matches(section, Config.SECTIONS, n=1)
        raise ConfigError(f"{origin}: unknown section {section!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + f"; sections: {', '.join(Config.SECTIONS)}")
    levers = section in Config.LEVER_SECTIONS
    hints = typing.get_type_hints(_section_class(section))
    if levers:
        hints = {k: hints[k] for k in Levers.keys(section)}
    if key not in hints:
        hint = difflib.get_close_matches(key, list(hints), n=1)
        raise ConfigError(f"{origin}: unknown key {section}.{key}"
                          + (f" (did you mean {section}.{hint[0]}?)" if hint else ""))
    value = coerce(value, hints[key], f"{section}.{key}", origin, from_string)
    if levers:
        cfg._lever_values[key] = value  # made into cfg.memory, and checked, by Config.validate
    else:
        setattr(getattr(cfg, section), key, value)
    cfg.sources[f"{section}.{key}"] = origin


def resolve_config_path(name_or_path: Union[str, Path]) -> Path:
    """A path as given, or a bare name looked up in ``configs/`` (with or without ``.yaml``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for candidate in (CONFIG_DIR / p.name, CONFIG_DIR / f"{p.name}.yaml", CONFIG_DIR / f"{p.name}.yml"):
        if candidate.is_file():
            return candidate
    known = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    hint = difflib.get_close_matches(p.stem, known, n=3)
    raise ConfigError(f"{name_or_path}: no such config file, and no configs/{p.stem}.yaml"
                      + (f" (close: {', '.join(hint)})" if hint else ""))


def load_config(name_or_path: Union[str, Path, None] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults, then the YAML file (path or name in ``configs/``), then ``a.b=value`` overrides."""
    cfg = Config()
    origin = "defaults"
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        origin = str(path)
        raw, text = read_config(path)
        raw = raw or {}
        dumped = text.startswith(_DUMP_HEADER)  # a run folder's config.yaml (see REMOVED)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        for section, values in raw.items():
            if section not in Config.SECTIONS:
                _apply(cfg, str(section), "", None, origin, False)  # raises: unknown section
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping of keys")
            for key, value in values.items():
                _apply(cfg, section, str(key), value, origin, False, written_by_us=dumped)
        if dumped:
            _fill_added(cfg, {(sec, str(k)) for sec, vals in raw.items() if isinstance(vals, dict) for k in vals},
                        origin)
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.max_epochs=10")
        dotted, value = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        _apply(cfg, section, key, value, "--set", True)
    cfg.validate(origin)
    return cfg


def config_from_dict(data: dict, origin: str = "checkpoint") -> Config:
    """Rebuild a Config from :meth:`Config.to_dict` output (e.g. stored in a checkpoint)."""
    cfg = Config()
    for section, values in data.items():
        for key, value in (values or {}).items():
            _apply(cfg, section, key, value, origin, False, written_by_us=True)
    _fill_added(cfg, {(sec, k) for sec, vals in data.items() for k in (vals or {})}, origin)
    cfg.validate(origin)
    return cfg
