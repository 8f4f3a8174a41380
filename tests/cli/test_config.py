from __future__ import annotations

import dataclasses
import typing

import pytest

from mpidqn.config import Config, ConfigError, config_from_yaml_text, field_docs, iter_fields, load_config, to_yaml


def test_defaults_are_the_embedded_cartpole_config():
    cfg = load_config()
    assert cfg.env.id == "CartPole-v1" and cfg.train.total_steps == 50_000 and cfg.parallel.pipeline_stages == 1


def test_yaml_file_and_dotted_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 1\nenv: {id: Acrobot-v1}\ntrain: {lr: 0.001}\n")
    cfg = load_config(f, ["seed=3", "train.total_steps=2e5", "network.hidden=[64, 32]", "train.max_grad_norm=null",
                          "train.exploration.per_rank=true"])
    assert (cfg.seed, cfg.env.id, cfg.train.lr) == (3, "Acrobot-v1", 0.001)
    assert cfg.train.total_steps == 200_000 and isinstance(cfg.train.total_steps, int)
    assert cfg.network.hidden == [64, 32] and cfg.train.max_grad_norm is None and cfg.train.exploration.per_rank


@pytest.mark.parametrize("override, key", [
    ("train.lrr=1", "train.lrr"),
    ("nope=1", "nope"),
    ("env.id.x=1", "env.id"),
    ("train.lr=abc", "train.lr"),
    ("train.batch_size=1.5", "train.batch_size"),
    ("train.double_dqn=1", "train.double_dqn"),
    ("train.loss=l1", "train.loss"),
    ("network.hidden=[64, x]", "network.hidden[1]"),
    ("train.lr=0", "train.lr"),
    ("train.lr=-1e-3", "train.lr"),
    ("train.batch_size=5000", "train.batch_size"),
    ("train.learning_starts=60000", "train.learning_starts"),
    ("train.gamma=1.5", "train.gamma"),
    ("parallel.pipeline_stages=0", "parallel.pipeline_stages"),
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("train.optimizer=sgd", "train.optimizer"),
    ("train.rmsprop_alpha=1.5", "train.rmsprop_alpha"),
    ("train.rmsprop_alpha=0", "train.rmsprop_alpha"),
    ("train.rmsprop_eps=0", "train.rmsprop_eps"),
    ("train.rmsprop_centered=maybe", "train.rmsprop_centered"),
    ("train.ema_decay=1", "train.ema_decay"),
    ("train.ema_decay=-0.5", "train.ema_decay"),
    ("train.advantage_learning=1.0", "train.advantage_learning"),
    ("train.target_regularization=-0.1", "train.target_regularization"),
    ("train.target_regularization=nan", "train.target_regularization"),
    ("no_equals_sign", "no_equals_sign"),
    ("parallel.torch_threads=0", "parallel.torch_threads"),
    ("parallel.torch_threads=many", "parallel.torch_threads"),
])
def test_bad_values_are_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.buffer_size=1000", override] if "batch_size=5000" in override else [override])
    assert str(e.value).startswith(key), str(e.value)
    assert "\n" not in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def undocumented(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of the leaf fields of config class ``cls`` without a docstring."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    missing = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            missing += undocumented(hints[f.name], f"{prefix}{f.name}.")
        elif not docs.get(f.name):
            missing.append(prefix + f.name)
    return missing


@dataclasses.dataclass
class _Inner:
    documented: int = 1
    """A documented field."""
    bare: int = 2


@dataclasses.dataclass
class _Outer:
    first: float = 0.0
    """Documented, and followed by a field whose docstring is missing."""
    second: float = 1.0
    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_yaml_round_trip_and_every_field_documented():
    cfg = load_config(None, ["seed=7", "network.dueling=true"])
    assert config_from_yaml_text(to_yaml(cfg)) == cfg
    assert undocumented(_Outer) == ["second", "inner.bare"]  # the check sees a missing docstring
    assert field_docs(_Outer)["first"].startswith("Documented, and followed")
    assert len(list(iter_fields(Config))) > 50
    assert undocumented(Config) == []


def test_rmsprop_options_reach_the_learner():
    from mpidqn.learners.data_parallel import Hyper

    cfg = load_config(None, ["train.optimizer=rmsprop", "train.rmsprop_alpha=0.9", "train.rmsprop_eps=1e-3",
                             "train.rmsprop_centered=false"])
    h = Hyper.from_config(cfg.train, 0, cfg.train.lr)
    assert (h.optimizer, h.rmsprop_alpha, h.rmsprop_eps, h.rmsprop_centered) == ("rmsprop", 0.9, 1e-3, False)
    assert load_config().train.optimizer == "adam"


@pytest.mark.parametrize("name", ["minatar-breakout", "minatar-space-invaders"])
def test_minatar_configs_use_the_reference_rmsprop(name):
    from conftest import ROOT

    t = load_config(ROOT / "configs" / f"{name}.yaml").train
    assert (t.optimizer, t.lr, t.rmsprop_alpha, t.rmsprop_eps, t.rmsprop_centered) == ("rmsprop", 2.5e-4, 0.95, 0.01,
                                                                                         True)


def test_a_key_of_two_kinds_names_both_in_its_error():
    with pytest.raises(ConfigError, match=r"^parallel.torch_threads: expected an integer or 'auto', got 'many'$"):
        load_config(None, ["parallel.torch_threads=many"])
    assert load_config(None, ["parallel.torch_threads=auto"]).parallel.torch_threads == "auto"


@pytest.mark.parametrize("name", ["cartpole", "acrobot", "lunarlander"])
def test_shipped_configs_load(name):
    from conftest import ROOT

    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.env.id.split("-")[0].lower() == name


def test_cartpole_yaml_is_the_embedded_default():
    from conftest import ROOT

    assert load_config(ROOT / "configs" / "cartpole.yaml") == load_config()


def test_cartpole_pipeline_yaml_is_the_default_on_a_pipeline():
    """Its header promises the hyper-parameters of configs/cartpole.yaml: only the pipeline may differ."""
    from conftest import ROOT

    cfg, default = load_config(ROOT / "configs" / "cartpole-pipeline.yaml"), load_config()
    assert cfg.parallel.pipeline_stages == 2
    assert dataclasses.replace(cfg, parallel=default.parallel) == default


@pytest.mark.parametrize("overrides, key", [
    (["network.distributional=true", "network.num_atoms=1"], "network.num_atoms"),
    (["network.distributional=true", "network.v_min=5", "network.v_max=5"], "network.v_min"),
    (["network.noisy=true", "network.noisy_sigma0=0"], "network.noisy_sigma0"),
    (["network.distributional=true", "network.distribution=qr", "network.kappa=0"], "network.kappa"),
    (["network.distributional=true", "train.advantage_learning=0.5"], "train.advantage_learning"),
    (["network.distributional=true", "train.target_regularization=0.1"], "train.target_regularization"),
])
def test_rainbow_settings_are_checked(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        load_config(None, overrides)


def test_noisy_nets_turn_epsilon_off_unless_it_is_set(tmp_path):
    assert (load_config().train.exploration.eps_start, load_config().train.exploration.eps_end) == (1.0, 0.04)
    x = load_config(None, ["network.noisy=true"]).train.exploration
    assert (x.eps_start, x.eps_end) == (0.0, 0.0)
    x = load_config(None, ["network.noisy=true", "train.exploration.eps_end=0.01"]).train.exploration
    assert (x.eps_start, x.eps_end) == (0.0, 0.01)
    f = tmp_path / "c.yaml"
    f.write_text("network: {noisy: true}\ntrain: {exploration: {eps_start: 0.5}}\n")
    x = load_config(f).train.exploration
    assert (x.eps_start, x.eps_end) == (0.5, 0.0)
    # the resolved values are written out, so a run's config.yaml reads back the same
    assert config_from_yaml_text(to_yaml(load_config(None, ["network.noisy=true"]))).train.exploration.eps_start == 0.0
