"""The shared settings (data, attack budget, batch, speed, run folder), declared once in field
groups (``advcl_cli.settings``), keep every verb's default, flag and bounds: the table below was
taken from the settings before they were grouped (issue 19), so it is a regression check."""

from pathlib import Path

import annotated_types as at
import pytest

from advcl_cli.settings.layering import resolve
from advcl_cli.methods import method_names, settings_model
from advcl_cli.settings import VERBS, FinetuneSettings, LpaftSettings

E8, E2 = 8 / 255, 2 / 255

# verb -> field -> (default, short flag, has a flag, bounds)
PINNED = {
    'pretrain': {
        'dataset': ('cifar10', '-d', True, {}),
        'data_dir': (None, None, True, {}),
        'download': (True, None, False, {}),
        'limit': (None, None, True, {'ge': 1}),
        'image_size': (None, None, True, {'ge': 8, 'le': 1024}),
        'norm': ('linf', None, True, {}),
        'precision': ('auto', None, True, {}),
        'device': ('auto', None, True, {}),
        'channels_last': ('auto', None, True, {}),
        'compile': (False, None, True, {}),
        'seed': (0, None, True, {'ge': 0, 'le': 4294967295}),
        'out': (None, '-o', True, {}),
        'resume': ('off', None, True, {}),
    },
    'pseudo-labels': {
        'dataset': ('cifar10', '-d', True, {}),
        'data_dir': (None, None, True, {}),
        'download': (True, None, False, {}),
        'limit': (None, None, True, {'ge': 1}),
        'image_size': (None, None, True, {'ge': 8, 'le': 1024}),
        'batch_size': (512, '-b', True, {'ge': 1}),
        'device': ('auto', None, True, {}),
        'seed': (0, None, True, {'ge': 0, 'le': 4294967295}),
        'out': (None, '-o', True, {}),
    },
    'finetune': {
        'dataset': (None, '-d', True, {}),
        'data_dir': (None, None, True, {}),
        'download': (True, None, False, {}),
        'limit': (None, None, True, {'ge': 1}),
        'image_size': (None, None, True, {'ge': 8, 'le': 1024}),
        'eps': (E8, None, True, {}),
        'norm': ('linf', None, True, {}),
        'attack_steps': (10, None, True, {'ge': 1}),
        'attack_step_size': (E2, None, True, {}),
        'batch_size': (None, '-b', True, {'ge': 1}),
        'precision': ('auto', None, True, {}),
        'device': ('auto', None, True, {}),
        'channels_last': ('auto', None, True, {}),
        'compile': (False, None, True, {}),
        'seed': (0, None, True, {'ge': 0, 'le': 4294967295}),
        'out': (None, '-o', True, {}),
        'resume': ('off', None, True, {}),
    },
    'lpaft': {
        'dataset': (None, '-d', True, {}),
        'data_dir': (None, None, True, {}),
        'download': (True, None, False, {}),
        'limit': (None, None, True, {'ge': 1}),
        'image_size': (None, None, True, {'ge': 8, 'le': 1024}),
        'eps': (E8, None, True, {}),
        'attack_steps': (10, None, True, {'ge': 1}),
        'attack_step_size': (E2, None, True, {}),
        'batch_size': (512, '-b', True, {'ge': 1}),
        'precision': ('auto', None, True, {}),
        'device': ('auto', None, True, {}),
        'channels_last': ('auto', None, True, {}),
        'compile': (False, None, True, {}),
        'seed': (0, None, True, {'ge': 0, 'le': 4294967295}),
        'out': (None, '-o', True, {}),
        'resume': ('off', None, True, {}),
    },
    'eval': {
        'dataset': (None, '-d', True, {}),
        'data_dir': (None, None, True, {}),
        'download': (True, None, False, {}),
        'limit': (None, None, True, {'ge': 1}),
        'image_size': (None, None, True, {'ge': 8, 'le': 1024}),
        'eps': ([E8], None, True, {}),
        'norm': ('linf', None, True, {}),
        'batch_size': (256, '-b', True, {'ge': 1}),
        'precision': ('fp32', None, True, {}),
        'device': ('auto', None, True, {}),
        'channels_last': ('auto', None, True, {}),
        'compile': (False, None, True, {}),
        'seed': (0, None, True, {'ge': 0, 'le': 4294967295}),
    },
    'attack': {
        'dataset': (None, '-d', True, {}),
        'data_dir': (None, None, True, {}),
        'download': (True, None, False, {}),
        'image_size': (None, None, True, {'ge': 8, 'le': 1024}),
        'eps': (E8, None, True, {}),
        'norm': ('linf', None, True, {}),
        'device': ('auto', None, True, {}),
        'seed': (0, None, True, {'ge': 0, 'le': 4294967295}),
        'out': ('adv.safetensors', '-o', True, {}),
    },
    'benchmark': {
        'dataset': (None, '-d', True, {}),
        'data_dir': (None, None, True, {}),
        'download': (True, None, False, {}),
        'limit': (None, None, True, {'ge': 1}),
        'image_size': (None, None, True, {'ge': 8, 'le': 1024}),
        'eps': (E8, None, True, {}),
        'batch_size': (None, '-b', True, {'ge': 1}),
        'precision': ('auto', None, True, {}),
        'device': ('auto', None, True, {}),
        'channels_last': ('auto', None, True, {}),
        'compile': (False, None, True, {}),
        'seed': (0, None, True, {'ge': 0, 'le': 4294967295}),
        'out': ('runs/benchmark', '-o', True, {}),
    },
    'import': {
        'dataset': ('cifar10', '-d', True, {}),
        'out': (None, '-o', True, {}),
    },
    'pretrain --method advcl': {
        'dataset': ('cifar10', '-d', True, {}),
        'data_dir': (None, None, True, {}),
        'download': (True, None, False, {}),
        'limit': (None, None, True, {'ge': 1}),
        'image_size': (None, None, True, {'ge': 8, 'le': 1024}),
        'eps': (E8, None, True, {}),
        'norm': ('linf', None, True, {}),
        'pgd_steps': (5, None, True, {'ge': 0}),
        'pgd_step_size': (E2, None, True, {}),
        'batch_size': (512, '-b', True, {'ge': 2}),
        'precision': ('auto', None, True, {}),
        'device': ('auto', None, True, {}),
        'channels_last': ('auto', None, True, {}),
        'compile': (False, None, True, {}),
        'seed': (0, None, True, {'ge': 0, 'le': 4294967295}),
        'out': (None, '-o', True, {}),
        'resume': ('off', None, True, {}),
    },
    'pretrain --method acl': {
        'dataset': ('cifar10', '-d', True, {}),
        'data_dir': (None, None, True, {}),
        'download': (True, None, False, {}),
        'limit': (None, None, True, {'ge': 1}),
        'image_size': (None, None, True, {'ge': 8, 'le': 1024}),
        'eps': (E8, None, True, {}),
        'norm': ('linf', None, True, {}),
        'pgd_steps': (5, None, True, {'ge': 0}),
        'pgd_step_size': (E2, None, True, {}),
        'batch_size': (512, '-b', True, {'ge': 2}),
        'precision': ('auto', None, True, {}),
        'device': ('auto', None, True, {}),
        'channels_last': ('auto', None, True, {}),
        'compile': (False, None, True, {}),
        'seed': (0, None, True, {'ge': 0, 'le': 4294967295}),
        'out': (None, '-o', True, {}),
        'resume': ('off', None, True, {}),
    },
    'pretrain --method dynacl': {
        'dataset': ('cifar10', '-d', True, {}),
        'data_dir': (None, None, True, {}),
        'download': (True, None, False, {}),
        'limit': (None, None, True, {'ge': 1}),
        'image_size': (None, None, True, {'ge': 8, 'le': 1024}),
        'eps': (E8, None, True, {}),
        'norm': ('linf', None, True, {}),
        'pgd_steps': (5, None, True, {'ge': 0}),
        'pgd_step_size': (E2, None, True, {}),
        'batch_size': (512, '-b', True, {'ge': 2}),
        'precision': ('auto', None, True, {}),
        'device': ('auto', None, True, {}),
        'channels_last': ('auto', None, True, {}),
        'compile': (False, None, True, {}),
        'seed': (0, None, True, {'ge': 0, 'le': 4294967295}),
        'out': (None, '-o', True, {}),
        'resume': ('off', None, True, {}),
    },
    'pretrain --method simclr': {
        'dataset': ('cifar10', '-d', True, {}),
        'data_dir': (None, None, True, {}),
        'download': (True, None, False, {}),
        'limit': (None, None, True, {'ge': 1}),
        'image_size': (None, None, True, {'ge': 8, 'le': 1024}),
        'norm': ('linf', None, True, {}),
        'batch_size': (512, '-b', True, {'ge': 2}),
        'precision': ('auto', None, True, {}),
        'device': ('auto', None, True, {}),
        'channels_last': ('auto', None, True, {}),
        'compile': (False, None, True, {}),
        'seed': (0, None, True, {'ge': 0, 'le': 4294967295}),
        'out': (None, '-o', True, {}),
        'resume': ('off', None, True, {}),
    },
    'pretrain --method deacl': {
        'dataset': ('cifar10', '-d', True, {}),
        'data_dir': (None, None, True, {}),
        'download': (True, None, False, {}),
        'limit': (None, None, True, {'ge': 1}),
        'image_size': (None, None, True, {'ge': 8, 'le': 1024}),
        'eps': (E8, None, True, {}),
        'norm': ('linf', None, True, {}),
        'pgd_steps': (5, None, True, {'ge': 0}),
        'pgd_step_size': (E2, None, True, {}),
        'batch_size': (256, '-b', True, {'ge': 2}),
        'precision': ('auto', None, True, {}),
        'device': ('auto', None, True, {}),
        'channels_last': ('auto', None, True, {}),
        'compile': (False, None, True, {}),
        'seed': (0, None, True, {'ge': 0, 'le': 4294967295}),
        'out': (None, '-o', True, {}),
        'resume': ('off', None, True, {}),
    },
    'pretrain --method air': {
        'dataset': ('cifar10', '-d', True, {}),
        'data_dir': (None, None, True, {}),
        'download': (True, None, False, {}),
        'limit': (None, None, True, {'ge': 1}),
        'image_size': (None, None, True, {'ge': 8, 'le': 1024}),
        'eps': (E8, None, True, {}),
        'norm': ('linf', None, True, {}),
        'pgd_steps': (5, None, True, {'ge': 0}),
        'pgd_step_size': (E2, None, True, {}),
        'batch_size': (512, '-b', True, {'ge': 2}),
        'precision': ('auto', None, True, {}),
        'device': ('auto', None, True, {}),
        'channels_last': ('auto', None, True, {}),
        'compile': (False, None, True, {}),
        'seed': (0, None, True, {'ge': 0, 'le': 4294967295}),
        'out': (None, '-o', True, {}),
        'resume': ('off', None, True, {}),
    },
    'pretrain --method dynacl-air': {
        'dataset': ('cifar10', '-d', True, {}),
        'data_dir': (None, None, True, {}),
        'download': (True, None, False, {}),
        'limit': (None, None, True, {'ge': 1}),
        'image_size': (None, None, True, {'ge': 8, 'le': 1024}),
        'eps': (E8, None, True, {}),
        'norm': ('linf', None, True, {}),
        'pgd_steps': (5, None, True, {'ge': 0}),
        'pgd_step_size': (E2, None, True, {}),
        'batch_size': (512, '-b', True, {'ge': 2}),
        'precision': ('auto', None, True, {}),
        'device': ('auto', None, True, {}),
        'channels_last': ('auto', None, True, {}),
        'compile': (False, None, True, {}),
        'seed': (0, None, True, {'ge': 0, 'le': 4294967295}),
        'out': (None, '-o', True, {}),
        'resume': ('off', None, True, {}),
    },
}

RESUME_MAY_CHANGE = {"channels_last", "compile", "data_dir", "device", "download", "log", "out", "precision",
                     "save_every_minutes"}


def models():
    return {**VERBS, **{f"pretrain --method {m}": settings_model(m) for m in method_names()}}


def describe(info):
    extra = info.json_schema_extra or {}
    default = str(info.default) if isinstance(info.default, Path) else info.default
    bounds = {type(m).__name__.lower(): getattr(m, type(m).__name__.lower())
              for m in info.metadata if isinstance(m, (at.Ge, at.Gt, at.Le, at.Lt))}
    return default, extra.get("short"), extra.get("flag", True), bounds


@pytest.mark.parametrize("verb", sorted(PINNED))
def test_each_verb_keeps_its_defaults_flags_and_bounds(verb):
    cls = models()[verb]
    shared = {f for row in PINNED.values() for f in row}
    got = {name: describe(info) for name, info in cls.model_fields.items() if name in shared}
    assert got == PINNED[verb]


def test_the_training_verbs_keep_their_resume_rule():
    assert FinetuneSettings.resume_may_change() == RESUME_MAY_CHANGE | {"eval_limit"}
    assert LpaftSettings.resume_may_change() == RESUME_MAY_CHANGE
    for m in method_names():
        assert settings_model(m).resume_may_change() == RESUME_MAY_CHANGE | {"monitor_every", "save_every"}


def test_each_shared_field_has_one_help_text():
    helps = {}
    for cls in models().values():
        for name, info in cls.model_fields.items():
            helps.setdefault(name, set()).add(info.description)
    shared = ["dataset", "data_dir", "download", "limit", "image_size", "eps", "norm", "attack_steps",
              "attack_step_size", "batch_size", "precision", "device", "channels_last", "compile", "seed", "out"]
    assert {name: helps[name] for name in shared if len(helps[name]) > 1} == {}


@pytest.mark.parametrize("verb", ["pretrain", "pseudo-labels", "finetune", "lpaft", "eval", "attack", "benchmark"])
def test_the_shared_fields_reach_every_verb_from_each_layer(verb, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "advcl.toml").write_text(f'[{verb}]\nseed = 3\n')
    monkeypatch.setenv("ADVCL_DATA_DIR", str(tmp_path / "data"))
    settings = resolve(VERBS[verb], {"dataset": "digits"})
    assert (settings.dataset, settings.seed, settings.data_dir) == ("digits", 3, tmp_path / "data")
