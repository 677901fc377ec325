"""config.py: precedence, strictness, dump round trip; every shipped config loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from scalable_equiformer.config import CONFIG_DIR, Config, config_from_dict, load_config
from scalable_equiformer.errors import ConfigError

SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_precedence_defaults_file_set(tmp_path):
    p = _write(tmp_path, "data: {path: x.npz}\ntrain: {max_epochs: 7, batch_size: 4}\n")
    cfg = load_config(p, ["train.max_epochs=9"])
    assert cfg.train.max_epochs == 9  # --set beats the file
    assert cfg.train.batch_size == 4  # the file beats the default
    assert cfg.train.eval_batch_size == 16  # default
    assert cfg.sources["train.max_epochs"] == "--set" and cfg.sources["train.batch_size"] == str(p)


@pytest.mark.parametrize("text,override,match", [
    ("train: {max_epoch: 3}\n", None, r"unknown key train.max_epoch \(did you mean train.max_epochs\?\)"),
    ("trian: {max_epochs: 3}\n", None, r"unknown section 'trian' \(did you mean 'train'\?\)"),
    ("", "train.max_epoch=3", r"--set: unknown key train.max_epoch"),
    ("train: {max_epochs: three}\n", None, r"train.max_epochs: expected an integer, got 'three'"),
    ("", "train.batch_size=2.5", r"train.batch_size: expected an integer"),
    ("", "model.cutoff=-1", r"model.cutoff: must be > 0"),
    ("", "train.loss=huber", r"train.loss: must be l2mae, mae or mse"),
    ("", "memory.precision=fp8", r"memory.precision: must be fp32, bf16 or fp16"),
    ("", "deepspeed.zero_stage=4", r"deepspeed.zero_stage: must be 0, 1, 2 or 3"),
    ("", "model.irreps_node=banana", r"model.irreps_node: not an irreps string"),
    ("train: {num_workers: 4}\n", None, r"c\.yaml: train.num_workers was removed \(it never did anything"),
    ("train: {num_workers: 0}\n", None, r"c\.yaml: train.num_workers was removed"),
    ("", "train.num_workers=2", r"--set: train.num_workers was removed"),
])
def test_bad_config_names_the_key(tmp_path, text, override, match):
    p = _write(tmp_path, "data: {path: x.npz}\n" + text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(p, [override] if override else [])
    assert "\n" not in str(e.value)


def test_dump_round_trip(tmp_path):
    cfg = load_config("demo", ["train.max_epochs=3",
                               "deepspeed.extra={\"zero_optimization\": {\"overlap_comm\": true}}",
                               "train.ema_decay=0.99", "model.radial_hidden=[16, 16]"])
    text = cfg.dump(tmp_path / "config.yaml")
    assert "Å" in text and "from --set" in text
    again = load_config(tmp_path / "config.yaml")
    assert again.to_dict() == cfg.to_dict()
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_removed_key_in_old_run_folders_and_checkpoints_is_dropped(tmp_path):
    """Every resolved config.yaml and checkpoint written before train.num_workers was removed lists
    it at its default 0: those still load (resume, evaluate); a changed value still raises."""
    cfg = load_config(None, ["data.path=x.npz", "train.max_epochs=3"])
    old = cfg.dump().replace("  progress:", "  num_workers: 0\n  progress:")
    assert "num_workers: 0" in old
    p = tmp_path / "config.yaml"
    p.write_text(old)
    assert load_config(p).to_dict() == cfg.to_dict()
    p.write_text(old.replace("num_workers: 0", "num_workers: 3"))
    with pytest.raises(ConfigError, match=r"config\.yaml: train.num_workers was removed"):
        load_config(p)
    stored = cfg.to_dict()
    stored["train"]["num_workers"] = 0
    assert config_from_dict(stored).to_dict() == cfg.to_dict()
    assert "num_workers" not in cfg.dump()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name):
    cfg = load_config(name)
    assert cfg.data.name or cfg.data.path


def test_every_config_of_the_issue_is_shipped():
    mols = ["aspirin", "benzene", "ethanol", "malonaldehyde", "naphthalene", "salicylic", "toluene", "uracil"]
    want = {"demo"} | {f"md17_{m}" for m in mols} | {f"md17_{m}_l3" for m in mols} | {
        f"md22_{s}" for s in ("atat", "atat_cgcg", "ac_ala3_nhme", "dha", "stachyose", "buckyball_catcher", "nanotube")}
    assert want <= set(SHIPPED)


PAPER_MD17 = {  # molecule: (lr L2, force weight L2, lr L3, force weight L3)
    "aspirin": (5e-4, 80, 2e-4, 100), "benzene": (1e-4, 80, 1e-4, 80), "ethanol": (5e-4, 80, 2e-4, 80),
    "malonaldehyde": (5e-4, 100, 2e-4, 100), "naphthalene": (5e-4, 20, 2e-4, 100), "salicylic": (5e-4, 80, 2e-4, 100),
    "toluene": (5e-4, 80, 2e-4, 100), "uracil": (5e-4, 20, 2e-4, 100),
}


@pytest.mark.parametrize("mol", sorted(PAPER_MD17))
def test_md17_configs_follow_the_paper(mol):
    lr2, fw2, lr3, fw3 = PAPER_MD17[mol]
    for name, lmax, epochs, batch, lr, fw in ((f"md17_{mol}", 2, 1500, 8, lr2, fw2),
                                              (f"md17_{mol}_l3", 3, 2000, 5, lr3, fw3)):
        c = load_config(name)
        assert (c.model.lmax, c.train.max_epochs, c.train.batch_size) == (lmax, epochs, batch)
        assert (c.optim.lr, c.train.force_weight, c.train.energy_weight) == (lr, fw, 1.0)
        assert (c.optim.weight_decay, c.optim.scheduler, c.optim.warmup_epochs, c.optim.min_lr) == \
            (1e-6, "cosine", 10, 1e-6)
        assert (c.data.train_size, c.data.val_size, c.data.seed, c.model.cutoff) == (950, 50, 1, 5.0)
        assert c.data.name == ("md17_benzene2017" if mol == "benzene" else f"md17_{mol}")
    assert load_config(f"md17_{mol}_l3").model.irreps_node == "128x0e+64x1e+64x2e+32x3e"


def test_md22_configs_use_the_paper_train_sizes():
    sizes = {"ac_ala3_nhme": 6000, "dha": 8000, "stachyose": 8000, "atat": 3000, "atat_cgcg": 2000,
             "buckyball_catcher": 600, "nanotube": 800}
    from scalable_equiformer.data import get_info

    for key, n in sizes.items():
        c = load_config(f"md22_{key}")
        assert c.data.train_size == n and get_info(c.data.name).num_atoms > 0
        assert c.data.val_size == get_info(c.data.name).val_size


def test_zero3_with_a_float64_model_is_refused_at_load():
    with pytest.raises(ConfigError, match="zero_stage=3 with model.dtype=float64"):
        load_config(None, ["data.name=md17_aspirin", "deepspeed.zero_stage=3", "model.dtype=float64"])
    load_config(None, ["data.name=md17_aspirin", "deepspeed.zero_stage=3", "model.dtype=float32"])


def test_energy_normalization_is_checked_and_old_configs_keep_theirs():
    with pytest.raises(ConfigError, match="energy_normalization"):
        load_config(None, ["data.name=md17_aspirin", "model.energy_normalization=per_molecule"])
    stored = load_config(None, ["data.name=md17_aspirin"]).to_dict()
    del stored["model"]["energy_normalization"]  # a checkpoint written before the key existed
    assert config_from_dict(stored).model.energy_normalization == "per_atom_mean_force_rms"


@pytest.mark.parametrize("text,line,key", [
    # a whole section twice: plain yaml.safe_load kept the second (a 1-epoch file ran 1500 epochs)
    ("train:\n  max_epochs: 1\nmodel:\n  cutoff: 4.0\ntrain:\n  max_epochs: 1500\n", 6, "train"),
    ("train:\n  max_epochs: 1\n  batch_size: 2\n  max_epochs: 3\n", 5, "max_epochs"),  # a key twice in a section
    ("deepspeed:\n  extra: {zero_optimization: {stage: 1, stage: 2}}\n", 3, "stage"),  # nested, flow style
])
def test_a_key_given_twice_in_a_yaml_file_is_refused_naming_file_line_and_key(tmp_path, text, line, key):
    p = _write(tmp_path, "data: {path: x.npz}\n" + text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: line {line}: key {key!r} appears twice") and "\n" not in msg


def test_duplicate_keys_are_refused_in_run_folder_configs_and_set_values(tmp_path):
    """The run folder's config.yaml (what --resume reads) and a --set mapping go through the same loader;
    a YAML merge key (<<) that a later key overrides is not a duplicate."""
    p = tmp_path / "config.yaml"
    text = load_config(None, ["data.path=x.npz"]).dump()
    p.write_text(text + "train:\n  max_epochs: 9\n")
    with pytest.raises(ConfigError, match=r"config\.yaml: line \d+: key 'train' appears twice \(first at line \d+\)"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"^--set: deepspeed\.extra: key 'a' appears twice"):
        load_config(None, ["data.path=x.npz", "deepspeed.extra={a: 1, a: 2}"])
    from scalable_equiformer.config_text import load_yaml

    assert load_yaml("base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  x: 3\n", "f")["use"] == {"x": 3, "y": 2}


@pytest.mark.parametrize("text,override,key", [
    ("data: {path: x.npz, seed: -1}\n", None, "data.seed"),
    ("data: {path: x.npz}\n", "train.seed=-5", "train.seed"),
    ("data: {path: x.npz}\n", "data.seed=18446744073709551616", "data.seed"),  # 2**64: torch.manual_seed refuses it
])
def test_a_seed_out_of_range_is_refused_at_load(tmp_path, text, override, key):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"{key}: must be an integer from 0 to 2\*\*64-1") as e:
        load_config(p, [override] if override else [])
    assert "\n" not in str(e.value)
    assert load_config(p, [f"{key}=0"]).to_dict()[key.split(".")[0]]["seed"] == 0


def test_configs_point_to_readme_sections_that_exist():
    """The configs pointed to a README section "Deviations from the original" that had been renamed."""
    import re

    readme = (CONFIG_DIR.parent / "README.md").read_text()
    headings = {m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", readme, re.M)}
    pointers = [(p.name, m.group(1)) for p in sorted(CONFIG_DIR.glob("*.yaml"))
                for m in re.finditer(r'README, "([^"]+)"', p.read_text())]
    assert pointers and all(title in headings for _, title in pointers), [x for x in pointers if x[1] not in headings]


def test_md17_configs_load_to_the_configs_they_were_before_their_presets():
    """configs/md17_*.yaml derive from configs/presets/md17_l{2,3}.yaml (``base:``); each loads to
    exactly the Config its full file gave (tests/data/md17_configs_main.json: every value that
    differs from the defaults, dumped before the presets existed)."""
    import json

    before = json.loads((Path(__file__).parent / "data" / "md17_configs_main.json").read_text())
    assert sorted(before) == sorted(n for n in SHIPPED if n.startswith("md17_")) and len(before) == 16
    defaults = Config().to_dict()
    for name, changed in before.items():
        want = {s: {**values, **changed.get(s, {})} for s, values in defaults.items()}
        assert load_config(name).to_dict() == want, name


def _write_at(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_base_is_extended_key_by_key(tmp_path):
    from scalable_equiformer.config_text import read_config

    _write_at(tmp_path / "presets" / "a.yaml",
              "train: {max_epochs: 3, batch_size: 2}\noptim: {lr: 0.1}\nmodel: {lmax: 2}\n")
    _write_at(tmp_path / "presets" / "b.yaml", "base: presets/a\ntrain: {batch_size: 4}\nmodel:\n")
    top = _write_at(tmp_path / "c.yaml", "base: presets/b.yaml\noptim: {lr: 0.2, min_lr: 0.0}\n")
    raw, text = read_config(top, tmp_path)
    assert raw == {"train": {"max_epochs": 3, "batch_size": 4}, "optim": {"lr": 0.2, "min_lr": 0.0},
                   "model": {"lmax": 2}}
    assert text.startswith("base: presets/b.yaml")


def test_a_config_anywhere_can_start_from_a_shipped_preset(tmp_path):
    path = _write_at(tmp_path / "mine.yaml",
                     "base: presets/md17_l3\ndata: {name: md17_ethanol}\ntrain: {max_epochs: 7}\n")
    cfg = load_config(path)
    assert (cfg.model.lmax, cfg.train.batch_size, cfg.train.max_epochs, cfg.data.name) == (3, 5, 7, "md17_ethanol")
    assert cfg.sources["model.lmax"] == str(path)  # a preset's values count as the file's


@pytest.mark.parametrize("files, match", [
    ({"c.yaml": "base: presets/none\n"}, r"c.yaml: base: no such preset configs/presets/none.yaml"),
    ({"c.yaml": "base: ../outside\n"}, r"c.yaml: base: '../outside' is outside configs/"),
    ({"c.yaml": "base: [a]\n"}, r"c.yaml: base: expected the name of a preset under configs/"),
    ({"c.yaml": "base: a\n", "a.yaml": "base: c\n"},
     r"a.yaml: base: the chain of presets loops \(.*c.yaml -> .*a.yaml -> .*c.yaml\)"),
    ({"c.yaml": "base: a\n", "a.yaml": "- 1\n"}, r"a.yaml: expected a mapping of sections, got list"),
    ({"c.yaml": "base: a\n", "a.yaml": "x: [\n"}, r"a.yaml: line 2 not valid YAML"),
])
def test_a_bad_base_is_one_config_error(tmp_path, files, match):
    from scalable_equiformer.config_text import read_config

    for name, text in files.items():
        _write_at(tmp_path / name, text)
    with pytest.raises(ConfigError, match=match):
        read_config(tmp_path / "c.yaml", tmp_path)
