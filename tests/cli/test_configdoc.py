"""`python -m mpidqn config`: the key reference that docs/configuration.md is generated from, and the
resolved config."""
from __future__ import annotations

import sys

import yaml

from conftest import ROOT, run
from mpidqn.cli.configdoc import PAGE, keys, reference, type_name
from mpidqn.config import Config, iter_fields, load_config, to_dict


def _cli(args: list[str]):
    return run([sys.executable, "-m", "mpidqn", "config", *args], timeout=120)


def test_committed_configuration_page_is_the_commands_output():
    p = _cli(["--list"])
    assert p.returncode == 0, p.stderr
    committed = (ROOT / PAGE).read_text()
    assert committed == p.stdout, (f"{PAGE} is out of date with mpidqn/config.py: "
                                   f"run `python -m mpidqn config --list > {PAGE}`")


def _leaf(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def test_every_key_is_listed_with_its_real_default_and_a_docstring():
    listed = list(keys())
    assert [k.name for k in listed] == [name for name, _ in iter_fields(Config)]
    defaults = to_dict(Config())
    for key in listed:
        assert key.doc, f"{key.name} has no docstring"
        assert yaml.safe_load(key.default) == _leaf(defaults, key.name), key.name
    page = reference("markdown")
    text = reference("text")
    for key in listed:
        assert f"**`{key.name}`**" in page and f"\n{key.name} (" in f"\n{text}"
    assert '"global" | "per_rank"' in page and "int | null" in page  # Literal and Optional read as YAML


def test_type_names():
    assert type_name(list[int]) == "list[int]"
    assert type_name(float | None) == "float | null"


def test_config_prints_the_resolved_config_and_refuses_bad_keys(tmp_path):
    p = _cli(["--config", str(ROOT / "configs/acrobot.yaml"), "seed=3", "train.lr=0.002"])
    assert p.returncode == 0, p.stderr
    assert to_dict(load_config(None, [])) != yaml.safe_load(p.stdout)
    resolved = yaml.safe_load(p.stdout)
    assert resolved == to_dict(load_config(ROOT / "configs/acrobot.yaml", ["seed=3", "train.lr=0.002"]))
    assert (resolved["seed"], resolved["train"]["lr"]) == (3, 0.002)
    bad = _cli(["train.lrr=1"])
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "train.lrr" in bad.stderr
