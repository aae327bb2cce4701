"""Settings: the layers, one spelling and one parser everywhere, and no silently ignored names."""

import re

import pytest

from advcl_cli.settings.layering import resolve
from advcl_cli.errors import UsageError
from advcl_cli.methods import get_method, method_names
from advcl_cli.settings import (
    VERBS,
    EvalSettings,
    FinetuneSettings,
    PretrainSettings,
    PseudoLabelSettings,
    format_eps,
    parse_eps,
    parse_eps_list,
)


def test_defaults_are_the_papers():
    s = resolve(PretrainSettings, {})
    assert (s.method, s.epochs, s.batch_size, s.lr, s.momentum, s.weight_decay) == ("advcl", 1000, 512, 0.5, 0.9, 1e-4)
    assert s.eps == pytest.approx(8 / 255) and s.pgd_steps == 5 and s.pgd_step_size == pytest.approx(2 / 255)
    assert (s.temperature, s.ce_weight, s.hfc_radius, s.optimizer) == (0.5, 0.2, 8.0, "sgd")


def test_layers_defaults_toml_env_flags(tmp_path, monkeypatch):
    (tmp_path / "advcl.toml").write_text(
        "seed = 3\nepochs = 7\n[pretrain]\nepochs = 11\nlr = 0.1\n[pretrain.advcl]\nlr = 0.2\n[finetune]\nepochs = 99\n"
    )
    s = resolve(PretrainSettings, {})
    assert (s.seed, s.epochs, s.lr) == (3, 11, 0.2)  # verb table beats top level, method table beats verb table
    assert resolve(PretrainSettings, {"method": "simclr"}).lr == 0.1  # [pretrain.advcl] is advcl's only
    assert resolve(FinetuneSettings, {}).epochs == 99
    monkeypatch.setenv("ADVCL_EPOCHS", "12")
    monkeypatch.setenv("ADVCL_LR", "0.3")
    s = resolve(PretrainSettings, {})
    assert (s.epochs, s.lr) == (12, 0.3)  # the environment beats the file
    s = resolve(PretrainSettings, {"epochs": "13", "lr": None})
    assert (s.epochs, s.lr) == (13, 0.3)  # a flag beats the environment; None means "not given"
    s = resolve(PretrainSettings, {"epochs": "13"}, base={"epochs": 5, "seed": 3, "save_every": 2}, may_change={"epochs"})
    # a resumed run's settings sit below every other layer, which may change only ``may_change``
    assert (s.epochs, s.seed, s.save_every) == (13, 3, 2)
    for base, layer in (({"seed": 8}, "advcl.toml (top level)"), ({"lr": 0.5}, "ADVCL_LR"), ({"epochs": 5}, "--epochs")):
        with pytest.raises(UsageError, match=f"cannot resume with different settings: .* from {re.escape(layer)} but"):
            resolve(PretrainSettings, {"epochs": "13"}, base=base)


def test_explicit_config_file(tmp_path, monkeypatch):
    cfg = tmp_path / "other.toml"
    cfg.write_text("[pretrain]\nbatch_size = 64\n")
    assert resolve(PretrainSettings, {}, config_file=cfg).batch_size == 64
    monkeypatch.setenv("ADVCL_CONFIG", str(cfg))
    assert resolve(PretrainSettings, {}).batch_size == 64
    with pytest.raises(UsageError, match="no such config file"):
        resolve(PretrainSettings, {}, config_file=tmp_path / "missing.toml")


@pytest.mark.parametrize(
    "text, message, hint",
    [
        ("epochs = = 3", "not valid TOML", None),
        ("[pretrain]\nepocs = 3\n", "unknown key 'epocs' in [pretrain]", "did you mean 'epochs'?"),
        ("batch_sise = 3\n", "unknown key 'batch_sise' in the top level", "did you mean 'batch_size'?"),
        ("[pretrian]\nepochs = 3\n", "unknown table [pretrian]", "did you mean [pretrain]?"),
        ("[pretrain.advlc]\nlr = 3\n", "unknown table [pretrain.advlc]", "did you mean [pretrain.advcl]?"),
        ("[pretrain.simclr]\nhfc_radius = 3\n", "unknown key 'hfc_radius' in [pretrain.simclr]", None),
        ("[eval]\nattacks = ['fgsm']\n", "unknown key 'attacks' in [eval]", "did you mean 'attack'?"),
        ("[finetune.slf]\nlr = 1\n", "unknown table [finetune.slf]", None),
    ],
)
def test_a_config_file_with_an_unknown_name_is_refused(tmp_path, text, message, hint):
    (tmp_path / "advcl.toml").write_text(text)
    for cls in (PretrainSettings, EvalSettings):  # checked whichever verb runs
        with pytest.raises(UsageError) as e:
            resolve(cls, {})
        assert message in e.value.message
        if hint:
            assert e.value.hint == hint


def test_a_config_file_that_is_not_utf8_is_a_usage_error(tmp_path):
    (tmp_path / "advcl.toml").write_bytes(b"epochs = 3 # \xff\xfe\n")
    with pytest.raises(UsageError, match="not UTF-8"):
        resolve(PretrainSettings, {})


def test_every_method_key_is_accepted_in_pretrain_tables(tmp_path):
    (tmp_path / "advcl.toml").write_text("[pretrain]\nhfc_radius = 4\n[pretrain.simclr]\ntemperature = 0.2\n")
    assert resolve(PretrainSettings, {}).hfc_radius == 4  # advcl uses it
    s = resolve(PretrainSettings, {"method": "simclr"})  # simclr has no hfc_radius: [pretrain] is for every method
    assert s.temperature == 0.2 and "hfc_radius" not in type(s).model_fields


def test_lists_and_eps_parse_the_same_from_flags_env_and_toml(tmp_path, monkeypatch):
    expected = ([2 / 255, 8 / 255], ["fgsm", "pgd20"])
    flags = resolve(EvalSettings, {"eps": ["2/255,8/255"], "attack": ["FGSM", "pgd20", "fgsm"]})
    assert flags.eps == pytest.approx(expected[0]) and flags.attack == expected[1]  # case and repeats folded
    monkeypatch.setenv("ADVCL_EPS", "2/255,8/255")
    monkeypatch.setenv("ADVCL_ATTACK", "fgsm,pgd20")
    env = resolve(EvalSettings, {})
    assert env.eps == pytest.approx(expected[0]) and env.attack == expected[1]
    monkeypatch.delenv("ADVCL_EPS")
    monkeypatch.delenv("ADVCL_ATTACK")
    (tmp_path / "advcl.toml").write_text('[eval]\neps = ["2/255", 0.03137254901960784]\nattack = ["fgsm", "pgd20"]\n')
    toml = resolve(EvalSettings, {})
    assert toml.eps == pytest.approx(expected[0]) and toml.attack == expected[1]
    monkeypatch.setenv("ADVCL_K", "2,10")
    assert resolve(PseudoLabelSettings, {}).k == [2, 10]


def test_the_environment_uses_the_flag_names_and_warns_about_others(monkeypatch):
    monkeypatch.setenv("ADVCL_PGD_STEPS", "3")
    monkeypatch.setenv("ADVCL_KS", "2")  # the old spelling
    warnings = []
    s = resolve(PretrainSettings, {}, warn=warnings.append)
    assert s.pgd_steps == 3
    assert any("ADVCL_KS is not an advcl setting" in w and "ADVCL_K" in w for w in warnings), warnings


def test_bad_values_name_the_flag_and_where_the_value_came_from(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match=r"bad value '0' for --epochs: .*greater than or equal to 1"):
        resolve(PretrainSettings, {"epochs": "0"})
    with pytest.raises(UsageError, match=r"for --epochs: .*valid integer"):
        resolve(PretrainSettings, {"epochs": "abc"})
    with pytest.raises(UsageError, match="for --eps: eps must be in"):
        resolve(PretrainSettings, {"eps": "2"})
    monkeypatch.setenv("ADVCL_K", "2,abc")
    with pytest.raises(UsageError, match="for ADVCL_K: 'abc' is not a whole number"):
        resolve(PseudoLabelSettings, {})
    monkeypatch.delenv("ADVCL_K")
    (tmp_path / "advcl.toml").write_text("[pretrain]\nlr = -1\n")
    with pytest.raises(UsageError, match=r"for --lr \(from advcl.toml \[pretrain\]\)"):
        resolve(PretrainSettings, {})


def test_an_option_of_another_method_is_refused():
    with pytest.raises(UsageError, match="--hfc-radius is an option of advcl, not of --method simclr"):
        resolve(PretrainSettings, {"method": "simclr", "hfc_radius": "4"})
    with pytest.raises(UsageError, match="unknown method 'byol'"):
        resolve(PretrainSettings, {"method": "byol"})


def test_choices_are_case_insensitive():
    assert resolve(PretrainSettings, {"method": "SimCLR"}).method == "simclr"
    assert resolve(FinetuneSettings, {"scheme": "AFF"}).scheme == "aff"
    assert resolve(PretrainSettings, {"optimizer": "LARS", "precision": "FP32"}).optimizer == "lars"


def test_the_resolved_config_holds_the_methods_settings(tmp_path):
    cfg = resolve(PretrainSettings, {"out": tmp_path / "run"}).to_config()
    assert cfg["out"] == str(tmp_path / "run") and cfg["method"] == "advcl"
    assert {"hfc_radius", "ce_weight", "pgd_steps", "optimizer", "lr"} <= set(cfg)
    simclr = resolve(PretrainSettings, {"method": "simclr"}).to_config()
    assert "hfc_radius" not in simclr and simclr["method"] == "simclr"


def test_no_method_redefines_a_run_setting_and_every_setting_has_help():
    for name in method_names():
        fields = get_method(name).Settings.model_fields
        assert not set(fields) & set(PretrainSettings.model_fields)
        assert all(f.description for f in fields.values()), name
    for cls in VERBS.values():
        assert all(f.description for f in cls.model_fields.values()), cls.__name__


def test_eps_parsing():
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert parse_eps("0.031") == pytest.approx(0.031)
    assert parse_eps_list("2/255,4/255, 8/255") == pytest.approx([2 / 255, 4 / 255, 8 / 255])
    assert parse_eps_list(["8/255", "8/255"]) == pytest.approx([8 / 255])  # each eps once
    for bad in ("0", "-1/255", "1.5", "abc", "1/0", True):
        with pytest.raises(ValueError):
            parse_eps(bad)


def test_an_eps_list_needs_one_eps():
    for empty in (",", " , ", []):
        with pytest.raises(ValueError, match="at least one eps"):
            parse_eps_list(empty)
    with pytest.raises(UsageError, match="for --eps: give at least one eps"):
        resolve(EvalSettings, {"eps": ","})


def test_format_eps_is_parse_eps_for_people():
    assert format_eps(8 / 255) == "8/255" and format_eps(0.031) == "0.031" and format_eps(0.03) == "0.03"
    assert format_eps(1e-20) == "1e-20"  # never "0/255"
    assert parse_eps(format_eps(4 / 255)) == pytest.approx(4 / 255)


def test_a_resumed_runs_stored_settings_are_a_layer_of_their_own():
    s = resolve(PretrainSettings, {}, base={"method": "simclr", "temperature": 0.2})
    assert type(s).__name__.lower().startswith("simclr") and s.method == "simclr" and s.temperature == 0.2
    with pytest.raises(UsageError, match=r"bad value -1.0 for --lr \(from the stored settings of the run\)"):
        resolve(PretrainSettings, {}, base={"lr": -1.0})
    # what a resumed run may change comes from the fields: device yes, lr no
    assert resolve(PretrainSettings, {"device": "cpu"}, base={"device": "cuda"}).device == "cpu"
    with pytest.raises(UsageError, match="lr is 0.1 from --lr but 0.5 in the run"):
        resolve(PretrainSettings, {"lr": "0.1"}, base={"lr": 0.5})


def test_the_files_shape_takes_every_methods_keys_and_names_a_table_where_a_value_goes(tmp_path):
    (tmp_path / "advcl.toml").write_text("temperature = 0.2\n")  # a key of methods only: the top level takes it
    assert resolve(PretrainSettings, {"method": "simclr"}).temperature == 0.2
    assert resolve(EvalSettings, {}).attack == []  # and a verb without it runs
    (tmp_path / "advcl.toml").write_text("[pretrain.acl]\nlr = { a = 1 }\n")
    with pytest.raises(UsageError) as e:
        resolve(EvalSettings, {})
    assert "'lr' in [pretrain.acl] of advcl.toml takes a value, not a table" in e.value.message
