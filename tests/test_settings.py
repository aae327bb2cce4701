import pytest

from advcl_cli.errors import UsageError
from advcl_cli.settings import EvalSettings, FinetuneSettings, PretrainSettings, format_eps, parse_eps, parse_eps_list


def test_defaults_are_the_papers():
    s = PretrainSettings.resolve()
    assert (s.epochs, s.batch_size, s.lr, s.momentum, s.weight_decay) == (1000, 512, 0.5, 0.9, 1e-4)
    assert s.eps == pytest.approx(8 / 255) and s.pgd_steps == 5 and s.pgd_step_size == pytest.approx(2 / 255)
    assert (s.temperature, s.ce_weight, s.hfc_radius) == (0.5, 0.2, 8.0)


def test_layers_defaults_toml_env_flags(tmp_path, monkeypatch):
    (tmp_path / "advcl.toml").write_text('seed = 3\nepochs = 7\n[pretrain]\nepochs = 11\nlr = 0.1\n[finetune]\nepochs = 99\n')
    s = PretrainSettings.resolve()
    assert (s.seed, s.epochs, s.lr) == (3, 11, 0.1)  # the verb's table beats top-level keys
    assert FinetuneSettings.resolve().epochs == 99
    monkeypatch.setenv("ADVCL_EPOCHS", "12")
    monkeypatch.setenv("ADVCL_LR", "0.2")
    s = PretrainSettings.resolve()
    assert (s.epochs, s.lr) == (12, 0.2)  # env beats the file
    s = PretrainSettings.resolve(epochs=13, lr=None)
    assert (s.epochs, s.lr) == (13, 0.2)  # a flag beats env; None means "not given"


def test_explicit_config_file(tmp_path, monkeypatch):
    cfg = tmp_path / "other.toml"
    cfg.write_text("[pretrain]\nbatch_size = 64\n")
    assert PretrainSettings.resolve(config_file=cfg).batch_size == 64
    monkeypatch.setenv("ADVCL_CONFIG", str(cfg))
    assert PretrainSettings.resolve().batch_size == 64
    with pytest.raises(UsageError, match="config file not found"):
        PretrainSettings.resolve(config_file=tmp_path / "missing.toml")


def test_bad_toml_and_bad_values(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = = 3")
    with pytest.raises(UsageError, match="not valid TOML"):
        PretrainSettings.resolve(config_file=bad)
    with pytest.raises(UsageError, match="bad value for epochs"):
        PretrainSettings.resolve(epochs=0)
    with pytest.raises(UsageError, match="eps"):
        PretrainSettings.resolve(eps="2")


def test_eps_parsing():
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert parse_eps("0.031") == pytest.approx(0.031)
    assert parse_eps_list("2/255,4/255, 8/255") == pytest.approx([2 / 255, 4 / 255, 8 / 255])
    for bad in ("0", "-1/255", "1.5", "abc", "1/0"):
        with pytest.raises(ValueError):
            parse_eps(bad)


def test_an_eps_list_needs_one_eps():
    for empty in (",", " , ", []):
        with pytest.raises(ValueError, match="at least one eps"):
            parse_eps_list(empty)
    with pytest.raises(UsageError, match="bad value for eps: give at least one eps"):
        EvalSettings.resolve(eps=",")


def test_format_eps_is_parse_eps_for_people():
    assert format_eps(8 / 255) == "8/255" and format_eps(0.031) == "0.031" and format_eps(0.03) == "0.03"
    assert parse_eps(format_eps(4 / 255)) == pytest.approx(4 / 255)


def test_resolved_config_is_json_ready(tmp_path):
    cfg = PretrainSettings.resolve(out=tmp_path / "run").to_config()
    assert cfg["out"] == str(tmp_path / "run") and cfg["method"] == "advcl"
