"""A third-party method, installed as a package with an `advcl.methods` entry point, trains
through the real CLI with its own option, and shows in `advcl pretrain --help`."""

import json
import os
import subprocess
import sys

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


def install_toy(root):
    """A package and its dist-info (what `pip install` leaves) in ``root``."""
    (root / "toy_advcl_method").mkdir()
    (root / "toy_advcl_method" / "__init__.py").write_text(TOY)
    info = root / "toy_advcl_method-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-advcl-method\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[advcl.methods]\ntoy = toy_advcl_method:Toy\n")


def advcl(root, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *sys.path]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "advcl_cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=HANG_S)


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
