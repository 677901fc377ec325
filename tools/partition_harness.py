"""Check that the partitioned model equals the single-process model: the comparison harness (a
library for the tools and the tests, not part of the package: no I/O at import, bad input is a
ValueError).

Its command line is ``tools/check_partitions.py``:

    python tools/check_partitions.py --config CONFIG --data FILE --partitions P [--frames K]

spawns P gloo processes on this machine (CPU), runs one training-mode step (energy, forces with
``create_graph``, ``loss.backward()``) of the same weights partitioned over them, runs the same
step in one process, prints the largest relative errors of energies, forces and parameter
gradients, and exits with status 1 past the tolerance (1e-9 in float64, 1e-5 in float32; the
model's ``model.dtype`` decides, ``--dtype`` overrides). ``--frames K`` takes the first K frames
of FILE as one batch (each molecule is partitioned on its own); ``--tile AxBxC`` replaces each
frame by an A x B x C grid of copies ``--gap`` Å apart (a large system from a small molecule);
``--tiny`` swaps the config's model for a few-thousand-parameter one (the paper's model is slow
on CPUs). Without ``--config`` the tiny model is used.

Relative errors: energy ``max_b |E_b - E0_b| / max_b |E0_b|``; forces ``max |F - F0| / max |F0|``;
gradients, all parameters as one vector as the forces, ``max |g - g0| / max |g0|`` (the pass
criterion), and per tensor (the worst tensor is printed too). In float32 the per-tensor error of
a tensor whose gradient is a sum with cancellations is at the level of float32 rounding itself
(~1e-5 for the single-process float32 model against float64), whatever the partitioning.
Loss of the step: ``sum_b E_b + 0.5 * sum F^2`` (its gradient exercises the force graph).

The same machinery (:func:`run_partitioned`, :func:`reference_step`, :func:`compare`) is used by
``tools/check_partitions.py``, ``tools/bench_partition.py`` and ``tests/test_partition*.py``
(``import partition_harness`` with ``tools/`` on ``sys.path``: the tools' own folder, and
``tests/conftest.py`` appends it). A case's options
(:func:`run_partitioned`) are ``PartitionedModel`` keyword arguments and lever values
(``checkpointing="forces"``, ...): those make the partitioned model's ``memory.ForceRunner``.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from scalable_equiformer.config import ModelConfig
from scalable_equiformer.data import load_dataset
from scalable_equiformer.memory import ForceRunner, Levers
from scalable_equiformer.model import build_model
from scalable_equiformer.parallel.launch import spawn_local
from scalable_equiformer.parallel.partitioned import PartitionedModel, allreduce_gradients, gradient_scale, make_groups
from scalable_equiformer.presets import tiny_model_dict
from scalable_equiformer.runtime import cuda_index

__all__ = [
    "tiny_model",
    "tiny_model_config",
    "tile_system",
    "parse_tile",
    "load_frames",
    "stack_frames",
    "make_system",
    "reference_step",
    "partitioned_step",
    "run_partitioned",
    "rank_device",
    "compare",
    "evaluate",
    "describe",
    "build_checked_model",
    "TOLERANCE",
    "check",
]

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}

def tiny_model() -> dict:
    """The check's tiny model: ``configs/tiny.yaml`` with the normalisation constants fixed (no
    data statistics needed; about those of the AT-AT frames)."""
    return {**tiny_model_dict(), "avg_num_neighbors": 20.0, "avg_num_atoms": 60.0}


def tiny_model_config(**overrides):
    """A :class:`~scalable_equiformer.config.ModelConfig` of the tiny model (overrides win)."""
    return ModelConfig(**{**tiny_model(), **overrides})


# --- systems ------------------------------------------------------------------------------------


def tile_system(
    pos: torch.Tensor | np.ndarray,
    z: torch.Tensor | np.ndarray,
    reps: tuple[int, int, int],
    gap: float = 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of one molecule on a ``reps`` grid, ``gap`` Å apart (so neighbours interact).

    Returns ``(pos [n * prod(reps), 3] float64, z [n * prod(reps)] int64)``.
    """
    pos = torch.as_tensor(np.asarray(pos), dtype=torch.float64)
    z = torch.as_tensor(np.asarray(z), dtype=torch.long)
    ext = pos.max(0).values - pos.min(0).values + gap  # [3]
    grid = torch.stack(
        torch.meshgrid(*[torch.arange(k, dtype=torch.float64) for k in reps], indexing="ij"), -1
    ).reshape(-1, 3)  # [T, 3]
    tiled = (pos[None] + (grid * ext)[:, None]).reshape(-1, 3)
    return tiled, z.repeat(grid.shape[0])


def parse_tile(text: str | None) -> tuple[int, int, int] | None:
    """``"AxBxC"`` -> ``(A, B, C)`` (each >= 1); None for no tiling."""
    if not text:
        return None
    try:
        reps = tuple(int(v) for v in text.lower().split("x"))
        assert len(reps) == 3 and all(r >= 1 for r in reps)
    except (ValueError, AssertionError):
        raise ValueError(f"--tile: expected AxBxC (e.g. 3x3x2), got {text!r}") from None
    return reps


def load_frames(path, frames: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(pos [n, 3] Å float64, z [n] int64), ...]`` of the first ``frames`` frames of a data file
    (any format :func:`..data.load_dataset` reads)."""
    ds = load_dataset(path)
    items = [ds[i] for i in range(min(frames, len(ds)))]
    return [(d.pos.to(torch.float64), d.z.long()) for d in items]


def stack_frames(molecules) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames of one molecule from :func:`load_frames` as ``(R [K, n, 3], z [n])``."""
    return torch.stack([p for p, _ in molecules]), molecules[0][1]


def make_system(name: str, molecules, eval: bool = False) -> dict:
    """A batch of molecules ``[(pos [n, 3], z [n]), ...]`` as plain tensors (picklable);
    ``eval=True`` also compares inference (``model.eval()``, no graph kept)."""
    pos = torch.cat([p for p, _ in molecules]).to(torch.float64)
    z = torch.cat([q for _, q in molecules]).long()
    batch = torch.cat([torch.full((p.shape[0],), i, dtype=torch.long) for i, (p, _) in enumerate(molecules)])
    return {"name": name, "pos": pos, "z": z, "batch": batch, "num_graphs": len(molecules), "eval": eval}


def _as_batch(system):
    from torch_geometric.data import Batch, Data  # noqa: PLC0415

    b = int(system["num_graphs"])
    data = [
        Data(pos=system["pos"][system["batch"] == i], z=system["z"][system["batch"] == i])
        for i in range(b)
    ]
    return Batch.from_data_list(data)


# --- one step, single process or partitioned --------------------------------------------------


def _loss(out):
    return out["energy"].sum() + 0.5 * (out["forces"].double() ** 2).sum()


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _cpu(t: torch.Tensor) -> torch.Tensor:
    """Results are compared on the CPU, whatever device computed them."""
    return t.detach().cpu()


def reference_step(model, system) -> dict:
    """Single-process training-mode step: energy [B], forces [N, 3], grads {name: tensor}, on the
    model's device (results on the CPU)."""
    model.train()
    model.zero_grad(set_to_none=True)
    device = _device_of(model)
    out = model(_as_batch(system).to(device))
    _loss(out).backward()
    res = {
        "energy": _cpu(out["energy"]),
        "forces": _cpu(out["forces"]),
        "grads": {n: _cpu(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None},
    }
    model.zero_grad(set_to_none=True)
    if system.get("eval"):
        model.eval()
        res["eval"] = {k: _cpu(v) for k, v in model(_as_batch(system).to(device)).items()}
        model.train()
    return res


def partitioned_step(pmodel, system, loss_scale: float = 1.0, reduce_grads: bool = True) -> dict:
    """The same step through a :class:`PartitionedModel`; gradients summed over its group."""

    model = pmodel.model
    model.train()
    model.zero_grad(set_to_none=True)
    device = _device_of(model)
    t0 = time.perf_counter()
    out = pmodel(_as_batch(system).to(device))
    (loss_scale * _loss(out)).backward()
    if reduce_grads:
        allreduce_gradients(model.parameters(), pmodel.group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    part = pmodel.last_partition.local(pmodel.part_rank)
    res = {
        "energy": _cpu(out["energy"]),
        "forces": _cpu(out["forces"]),
        "grads": {n: _cpu(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None},
        "edges": int(part.edge_ids.numel()),
        "edge_ids": part.edge_ids.clone(),
        "owned": part.num_owned,
        "halo": part.num_halo,
        "stats": pmodel.last_partition.stats(),
        "seconds": seconds,
        "partition_seconds": pmodel.last_partition_seconds,
    }
    model.zero_grad(set_to_none=True)
    if system.get("eval"):  # inference: no graph kept; must equal model.eval() too
        model.eval()
        out = pmodel(_as_batch(system).to(device))
        res["eval"] = {**{k: _cpu(v) for k, v in out.items()},
                       "requires_grad": any(v.requires_grad for v in out.values())}
        model.train()
    return res


def _build(model_config: dict, state_dict, device="cpu"):
    model = build_model(ModelConfig(**model_config))
    model.load_state_dict(state_dict)
    return model.to(device)


def rank_device(rank: int, device: str = "cpu") -> torch.device:
    """Where rank ``rank`` of a spawned group computes: the CPU, or with ``device='cuda'`` the GPU
    ``rank % device_count`` (several ranks share one GPU; gloo moves CUDA tensors too)."""
    if torch.device(device).type != "cuda":
        return torch.device("cpu")
    d = torch.device("cuda", cuda_index(rank, torch.cuda.device_count()))
    torch.cuda.set_device(d)
    return d


def _worker(rank: int, world: int, workdir: str) -> None:
    """One rank of :func:`run_partitioned` (started by :func:`.launch.spawn_local`: the gloo
    group is initialised, one thread)."""
    job = torch.load(Path(workdir) / "job.pt", weights_only=False)

    device = rank_device(rank, job.get("device", "cpu"))
    results = {}
    for case in job["cases"]:  # one partition group of all ranks
        options = dict(case["options"])
        model = _build(case["model_config"], case["state_dict"], device)
        runner = _runner(options)
        pmodel = PartitionedModel(model, runner=runner, **options)
        for system in case["systems"]:
            results[system["name"]] = partitioned_step(pmodel, system)
    dp = job.get("data_parallel")
    if dp is not None:  # D x P: data-parallel group d takes system d; world-averaged grads
        P = dp["partitions"]
        _, part_group = make_groups(world, P)
        pmodel = PartitionedModel(_build(dp["model_config"], dp["state_dict"], device), group=part_group)
        system = dp["systems"][rank // P]
        r = partitioned_step(pmodel, system, loss_scale=gradient_scale(part_group), reduce_grads=False)
        for g in r["grads"].values():  # what DeepSpeed / DDP do: average over all ranks (results are on the CPU)
            dist.all_reduce(g)
            g /= world
        results["data_parallel"] = r
    if rank != 0:  # grads are the same on every rank after the reduction: keep one copy
        for r in results.values():
            r["grads"] = None
    torch.save(results, Path(workdir) / f"rank{rank}.pt")


def _runner(options: dict):
    """The ``memory.ForceRunner`` of a case's lever options (taken out of ``options``), or None."""
    levers = {k: options.pop(k) for k in list(options) if k in Levers.__dataclass_fields__}
    return ForceRunner(Levers(**levers)) if levers else None


def _case(model, systems, options=None) -> dict:
    return {
        "model_config": dataclasses.asdict(_model_config_of(model)),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "systems": list(systems),
        "options": dict(options or {}),
    }


def run_partitioned(cases, world: int, data_parallel=None, workdir=None, start_method: str | None = None,
                    device: str = "cpu") -> list[dict]:
    """Spawn ``world`` gloo processes; return each rank's results by system name.

    ``cases``: ``[(model, systems), ...]`` or ``(model, systems, options)`` with ``options`` the
    keyword arguments of :class:`PartitionedModel` and lever values (``checkpointing="forces"``
    for the force-aware recomputation: the model's ``memory.ForceRunner``): each system runs partitioned over all
    ``world`` ranks (one partition group); system names must be unique.
    ``data_parallel``: ``(model, systems, P)`` with ``len(systems) = world / P``: ranks form
    D x P groups (:func:`make_groups`), data-parallel group ``d`` takes
    ``systems[d]``, the loss is scaled by :func:`gradient_scale` and gradients are averaged over
    the world (as DeepSpeed does); its result is under ``"data_parallel"``.
    ``model`` must come from :func:`build_checked_model` (workers rebuild it from its config).
    ``start_method``: ``"fork"`` (the default on Linux while CUDA is not initialised) starts the
    workers without re-importing torch, seconds instead of tens of seconds on a busy CPU (the
    workers run single-threaded); ``"spawn"`` elsewhere.
    ``device``: ``"cuda"`` runs every rank with CUDA tensors (rank r on GPU ``r % device_count``,
    gloo between them: one GPU can hold all ranks); results come back on the CPU.
    """
    job = {"cases": [_case(*c) for c in cases], "data_parallel": None, "device": str(device)}
    if data_parallel is not None:
        m, systems, P = data_parallel
        if len(systems) * P != world:
            raise ValueError(f"data_parallel: {len(systems)} systems x P={P} != world {world}")
        job["data_parallel"] = {**_case(m, systems), "partitions": P}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        torch.save(job, Path(tmp) / "job.pt")
        spawn_local(_worker, world, args=(tmp,), start_method=start_method, workdir=tmp)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _model_config_of(model):
    cfg = getattr(model, "_check_config", None)
    if cfg is None:
        raise ValueError("build the model with check.build_checked_model so workers can rebuild it")
    return cfg


def build_checked_model(model_config, seed: int = 0):
    """``build_model(model_config)`` with its config remembered (workers rebuild it from that)."""

    torch.manual_seed(seed)
    model = build_model(model_config)
    model._check_config = model_config
    return model


# --- comparison ----------------------------------------------------------------------------------


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max()) if b.numel() else 0.0
    err = float((a.double() - b.double()).abs().max()) if b.numel() else 0.0
    return err / scale if scale > 0 else err


def compare(ref: dict, got: dict) -> dict:
    """Largest relative errors of ``got`` against ``ref`` (see the module docstring)."""
    out = {"energy": _rel(got["energy"], ref["energy"]), "forces": _rel(got["forces"], ref["forces"])}
    if got.get("grads") is not None:
        missing = sorted(set(ref["grads"]) ^ set(got["grads"]))
        if missing:
            raise AssertionError(f"gradients present in one run only: {missing[:5]}")
        names = list(ref["grads"])
        errs = {n: _rel(got["grads"][n], ref["grads"][n]) for n in names}
        worst = max(errs, key=errs.get) if errs else ""
        scale = max((float(ref["grads"][n].abs().max()) for n in names if ref["grads"][n].numel()), default=0.0)
        diff = max((float((got["grads"][n].double() - ref["grads"][n].double()).abs().max())
                    for n in names if ref["grads"][n].numel()), default=0.0)
        out["grads"] = diff / scale if scale > 0 else diff
        out["grads_per_tensor"] = errs[worst] if errs else 0.0
        out["worst_param"] = worst
    return out


def evaluate(ref: dict, ranks: list[dict], name: str, tol: float) -> dict:
    """Errors of every rank's result for system ``name`` against the single-process ``ref``,
    whether each edge was computed exactly once, and the partition's balance; ``ok`` if all hold."""
    errs = compare(ref, ranks[0][name])
    rep_err = max(max(_rel(r[name]["energy"], ref["energy"]), _rel(r[name]["forces"], ref["forces"])) for r in ranks)
    ids = torch.cat([r[name]["edge_ids"] for r in ranks])
    stats = ranks[0][name]["stats"]
    once = ids.numel() == stats["num_edges"] and bool(torch.equal(torch.sort(ids).values, torch.arange(ids.numel())))
    detached = True
    if "eval" in ref:  # inference on every rank: same numbers, nothing kept for a backward
        ev = [compare(ref["eval"], {**r[name]["eval"], "grads": None}) for r in ranks]
        errs["eval"] = max(max(e["energy"], e["forces"]) for e in ev)
        detached = not any(r[name]["eval"]["requires_grad"] for r in ranks)
        errs["eval_detached"] = detached
    ok = max(errs["energy"], errs["forces"], errs.get("grads", 0.0), errs.get("eval", 0.0), rep_err) <= tol
    ok = ok and once and detached
    return {
        **errs,
        "all_ranks": rep_err,
        "atoms": stats["num_atoms"],
        "edges": stats["num_edges"],
        "edges_once": once,
        "edges_per_part": stats["edges_per_part"],
        "edge_imbalance": stats["edge_imbalance"],
        "halo_per_part": stats["halo_per_part"],
        "seconds_partitioned_max": max(r[name]["seconds"] for r in ranks),
        "ok": ok,
    }


def describe(name: str, e: dict, partitions: int) -> str:
    return (
        f"{name}: {e['atoms']} atoms, {e['edges']} edges, P={partitions} (edges/part {e['edges_per_part']}, "
        f"max/mean {e['edge_imbalance']:.3f}, halo/part {e['halo_per_part']}): rel. error energy "
        f"{e['energy']:.2e}, forces {e['forces']:.2e}, grads {e.get('grads', 0.0):.2e} (worst tensor "
        f"{e.get('grads_per_tensor', 0.0):.2e}, {e.get('worst_param', '')}), "
        f"all ranks {e['all_ranks']:.2e}; every edge once: "
        f"{e['edges_once']}" + (f"; inference {e['eval']:.2e}" if "eval" in e else "")
        + f" -> {'ok' if e['ok'] else 'FAIL'}"
    )


def check(
    model, systems, partitions: int, tolerance: float | None = None, verbose: bool = True,
    start_method: str | None = None,
) -> dict:
    """Compare the partitioned run of every system with the single-process run. Returns a report
    with ``ok``, per-system errors and partition statistics."""
    tol = tolerance if tolerance is not None else TOLERANCE[model.dtype]
    t0 = time.perf_counter()
    ranks = run_partitioned([(model, systems)], partitions, start_method=start_method)
    t_part = time.perf_counter() - t0
    report = {"partitions": partitions, "dtype": str(model.dtype), "tolerance": tol, "systems": {}, "ok": True}
    for system in systems:
        name = system["name"]
        t0 = time.perf_counter()
        ref = reference_step(model, system)
        e = evaluate(ref, ranks, name, tol)
        e["seconds_reference"] = time.perf_counter() - t0
        report["ok"] &= e["ok"]
        report["systems"][name] = e
        if verbose:
            print(describe(name, e, partitions))
    if verbose:
        print(f"spawn + partitioned runs {t_part:.1f} s; tolerance {tol:.0e} ({model.dtype})")
    return report
