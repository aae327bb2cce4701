"""A third-party method, installed as a package with an `advcl.methods` entry point, trains
through the real CLI with its own option, and shows in `advcl pretrain --help`; the README's
plug-in example trains as written; a broken plug-in is a warning, two that declare one option
with different meanings an error."""

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

from safetensors import safe_open
from waiting import HANG_S

TOY = '''
"""A toy method: SimCLR's loss on two crop+flip views, scaled by its own option."""
import torch
from advcl_cli.data.augment import crop_flip_view, to_float
from advcl_cli.distributed import all_gather_with_grad, local_slice
from advcl_cli.methods.base import Method, TrainSettings
from advcl_cli.methods.losses import supcon_loss
from advcl_cli.settings import option, with_defaults


class Toy(Method):
    name = "toy"
    summary = "a plugin method used by advcl's tests"

    class Settings(with_defaults(TrainSettings, "ToyTraining", lr=0.05, batch_size=16)):
        toy_weight: float = option(1.0, "Scale of the toy loss.", gt=0)

    def model_config(self, arch):
        return {"bn_sets": ("normal",), "proj_dim": 16}

    def schedule(self):
        from advcl_cli.optim import MultiStep
        return MultiStep(self.settings.lr)

    def step(self, model, batch, indices, gen, ctx):
        x = to_float(batch)
        views = torch.cat([local_slice(crop_flip_view(x, gen), ctx), local_slice(crop_flip_view(x, gen), ctx)])
        z = model.project(model.features(views, "normal"))
        loss = self.settings.toy_weight * supcon_loss(all_gather_with_grad(torch.stack(z.chunk(2), 1), ctx), 0.5, 0.5)
        return loss, {"toy": loss.detach()}
'''


README = Path(__file__).resolve().parents[1] / "README.md"


def install(root, package: str, entry_points: dict[str, str], files: dict[str, str]):
    """A package (``files``: its modules' sources by file name) and its dist-info (what `pip
    install` leaves) in ``root``, registering ``entry_points`` (name -> "module:Class")."""
    (root / package).mkdir()
    for name, text in {"__init__.py": "", **files}.items():
        (root / package / name).write_text(text)
    info = root / f"{package}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[advcl.methods]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))


def install_toy(root):
    install(root, "toy_advcl_method", {"toy": "toy_advcl_method:Toy"}, {"__init__.py": TOY})


def advcl(root, *args, cwd=None, env=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *sys.path]), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "advcl_cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=HANG_S, cwd=cwd)


def test_a_plugin_method_trains_with_its_own_option(tmp_path):
    install_toy(tmp_path)
    help_text = advcl(tmp_path, "pretrain", "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert "Options of toy" in help_text.stdout and "--toy-weight" in help_text.stdout
    assert "a plugin method used by advcl's tests" in " ".join(help_text.stdout.split())
    done = advcl(tmp_path, "pretrain", "--method", "toy", "--dataset", "digits", "--limit", "32", "--arch", "resnet18-tiny",
                 "--epochs", "1", "--toy-weight", "0.5", "--device", "cpu", "--out", tmp_path / "run", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["metrics"]["toy"] > 0
    with safe_open(doc["path"], "pt") as f:
        meta = json.loads(f.metadata()["advcl"])
    assert meta["method"] == "toy"
    assert (meta["config"]["toy_weight"], meta["config"]["lr"], meta["config"]["batch_size"]) == (0.5, 0.05, 16)
    refused = advcl(tmp_path, "pretrain", "--method", "advcl", "--toy-weight", "2", "--dataset", "digits")
    assert refused.returncode == 2 and "--toy-weight is an option of toy" in refused.stderr


def test_the_readme_plugin_example_trains_as_written(tmp_path):
    """The README's method, its entry point and its command line, taken from the README."""
    text = README.read_text()
    (code,) = re.findall(r"```python\n(# my_package/advpair.py\n.*?)```", text, re.S)
    (toml,) = [t for t in re.findall(r"```toml\n(.*?)```", text, re.S) if "advcl.methods" in t]
    (command,) = [line for line in re.findall(r"^advcl pretrain --method advpair .*$", text, re.M)]
    entry_points = tomllib.loads(toml)["project"]["entry-points"]["advcl.methods"]
    assert "def schedule" not in code  # the default schedule needs only TrainSettings
    install(tmp_path, "my_package", entry_points, {"advpair.py": code})
    args = shlex.split(command)[1:]
    done = advcl(tmp_path, *args, "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["metrics"]["adv"] > 0 and doc["metrics"]["clean"] > 0
    with safe_open(doc["path"], "pt") as f:
        meta = json.loads(f.metadata()["advcl"])
    assert (meta["method"], meta["config"]["adv_weight"], meta["config"]["pgd_steps"]) == ("advpair", 0.5, 2)
    assert meta["eps"] == 8 / 255  # PGDSettings makes it a robust method
    assert Path(doc["path"]).resolve().parent == (tmp_path / "runs" / "advpair").resolve()


BROKEN = {"missing": "no_such_module_for_advcl:Thing", "raising": "broken_advcl_plugin.worse:Bad",
          "notamethod": "broken_advcl_plugin.bad:NOT_A_METHOD"}


def test_a_broken_plugin_is_a_warning_and_other_verbs_work(tmp_path):
    install(tmp_path, "broken_advcl_plugin", BROKEN,
            {"bad.py": "NOT_A_METHOD = 3\n", "worse.py": "raise RuntimeError('a bug in the plug-in')\n"})
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}  # the help is built here, not taken from a cache
    help_text = advcl(tmp_path, "pretrain", "--help", env=cache)
    assert help_text.returncode == 0, help_text.stderr
    for name, cause in (("missing", "ModuleNotFoundError"), ("raising", "RuntimeError: a bug in the plug-in"),
                        ("notamethod", "is not an advcl Method")):
        line = next(line for line in help_text.stderr.splitlines() if f"'{name}'" in line)
        assert line.startswith("warning: the plug-in method") and cause in line, help_text.stderr
    assert "Traceback" not in help_text.stderr
    # another verb, through the paths that load every method: a [pretrain] table, an ADVCL_* name
    (tmp_path / "advcl.toml").write_text("[pretrain]\nepochs = 2\n")
    clf = tmp_path / "clf.safetensors"
    made = subprocess.run([sys.executable, "-c", "import sys; from advcl_cli.checkpoint import save_model; "
                           "from advcl_cli.models import create_model; save_model(sys.argv[1], create_model("
                           "'resnet18-tiny', bn_sets=('pgd',), num_classes=10), kind='classifier', method='advcl', "
                           "dataset='digits', eps=8/255)", clf], capture_output=True, text=True, timeout=HANG_S)
    assert made.returncode == 0, made.stderr
    done = advcl(tmp_path, "eval", clf, "--attack", "fgsm", "--limit", "8", "--image-size", "16", "--device", "cpu", "--json",
                 cwd=tmp_path, env={"ADVCL_NOT_A_SETTING": "1", **cache})
    assert done.returncode == 0, done.stderr
    assert "clean_acc" in done.stdout and json.loads(done.stdout)
    assert "warning: the plug-in method 'missing' is left out" in done.stderr
    asked = advcl(tmp_path, "pretrain", "--method", "missing", "--dataset", "digits", cwd=tmp_path)
    assert asked.returncode == 2 and "error: method 'missing' could not be loaded" in asked.stderr
    assert "Traceback" not in asked.stderr


def test_two_plugins_declaring_one_option_differently_are_refused(tmp_path):
    other = TOY.replace("class Toy", "class Other").replace('name = "toy"', 'name = "other"').replace(
        'toy_weight: float = option(1.0, "Scale of the toy loss.", gt=0)', 'toy_weight: str = option("a", "A name.")')
    same = TOY.replace("class Toy", "class Same").replace('name = "toy"', 'name = "same"').replace(
        '"Scale of the toy loss."', '"The same option, another help text."')
    install(tmp_path, "two_plugins", {"toy": "two_plugins.toy:Toy", "same": "two_plugins.same:Same"},
            {"toy.py": TOY, "same.py": same})
    agreed = advcl(tmp_path, "pretrain", "--method", "same", "--dataset", "digits", "--limit", "16", "--arch", "resnet18-tiny",
                   "--epochs", "1", "--toy-weight", "0.5", "--device", "cpu", "--out", tmp_path / "run", "--json")
    assert agreed.returncode == 0, agreed.stderr  # one name, one meaning (a float): fine
    (tmp_path / "two_plugins" / "other.py").write_text(other)
    info = tmp_path / "two_plugins-0.1.dist-info" / "entry_points.txt"
    info.write_text(info.read_text() + "other = two_plugins.other:Other\n")
    for args in (["--help"], ["--method", "toy", "--dataset", "digits"], ["--method", "advcl", "--dataset", "digits"]):
        refused = advcl(tmp_path, "pretrain", *args)
        assert refused.returncode == 2, refused.stderr
        assert "error: the methods 'toy' and 'other' both declare the option --toy-weight with different meanings" in refused.stderr
        assert "Traceback" not in refused.stderr
