"""`advcl import` of the RobustSSL benchmark's published layouts: ACL, ACL-AIR, DynACL (its
momentum model too), DynACL++ and DynACL-AIR++ (dual- and single-BN), DeACL (a solo-learn
Lightning checkpoint), with the wrappers and prefixes they come in.

Each file is written here from the layout facts (the authors' module names: VITA-Group's and
PKU-ML's ``models/resnet_multi_bn.py``, torchvision's ``resnet.py``, solo-learn's
``resnet_add_normalize.py``), name by name from a randomised advcl model whose BN sets all
differ; the import must put every tensor back where it came from, and the imported model must
compute what a ResNet-18 forward written here from the published keys computes (the authors'
normalisation and stem included).
"""

import json

import pytest
import torch
import torch.nn.functional as F

from advcl_cli.checkpoint import load_checkpoint
from advcl_cli.errors import CheckpointError, UsageError
from advcl_cli.importer import import_original
from advcl_cli.models import create_model
from test_bad_input import refused, tree
from test_import import BN_PARAMS, randomise

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))  # solo-learn's resnet_add_normalize.py
ACL_SETS = ("normal", "pgd")
D = 64  # resnet18-tiny's feature width


def source_model(seed=1, **config):
    torch.manual_seed(seed)
    net = create_model("resnet18-tiny", **config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # test_import's randomise, then every tensor moved again: no two models share values
        for t in randomise(net).state_dict().values():
            if t.dtype.is_floating_point:
                t.add_(0.1 * torch.rand(t.shape, generator=g))
    return net.eval()


def published_backbone(sd, sets, *, indexed=True, shortcut="downsample.conv"):
    """The authors' backbone keys for advcl's ``sd``. ``indexed``: ``batch_norm_multiple``'s
    ``bn_list.{i}`` for set ``sets[i]``, else a plain BatchNorm (torchvision) of ``sets[0]``;
    ``shortcut``: ``downsample.conv/bn`` (Downsample_multiple) or ``downsample.0/1``
    (torchvision's Sequential)."""
    out = {"conv1.weight": sd["backbone.conv1.weight"]}

    def bn(theirs, ours):
        for p in BN_PARAMS:
            if indexed:
                for i, s in enumerate(sets):
                    out[f"{theirs}.bn_list.{i}.{p}"] = sd[f"{ours}.sets.{s}.{p}"]
            else:
                out[f"{theirs}.{p}"] = sd[f"{ours}.sets.{sets[0]}.{p}"]

    bn("bn1", "backbone.bn1")
    for stage in range(4):
        for block in range(2):
            ours, theirs = f"backbone.layers.{stage}.{block}", f"layer{stage + 1}.{block}"
            for n in (1, 2):
                out[f"{theirs}.conv{n}.weight"] = sd[f"{ours}.conv{n}.weight"]
                bn(f"{theirs}.bn{n}", f"{ours}.bn{n}")
            if f"{ours}.shortcut_conv.weight" in sd:
                conv, norm = ("downsample.conv", "downsample.bn") if shortcut == "downsample.conv" else ("downsample.0", "downsample.1")
                out[f"{theirs}.{conv}.weight"] = sd[f"{ours}.shortcut_conv.weight"]
                bn(f"{theirs}.{norm}", f"{ours}.shortcut_bn")
    return out


def normalize(stats):
    """NormalizeByChannelMeanStd's buffers, float32 as the authors' models hold them."""
    return {"normalize.mean": torch.tensor(stats[0]), "normalize.std": torch.tensor(stats[1])}


def acl_head(sd, sets=ACL_SETS):
    """proj_head's keys: fc1 (bias), fc2, fc3 (no bias), a dual BN after each."""
    out = {"fc.fc1.weight": sd["proj.fc1.weight"], "fc.fc1.bias": sd["proj.fc1.bias"],
           "fc.fc2.weight": sd["proj.fc2.weight"], "fc.fc3.weight": sd["proj.fc3.weight"]}
    for n in (1, 2, 3):
        for i, s in enumerate(sets):
            for p in BN_PARAMS:
                out[f"fc.bn{n}.bn_list.{i}.{p}"] = sd[f"proj.bn{n}.sets.{s}.{p}"]
    return out


def clone(d):
    return {k: v.clone() for k, v in d.items()}


# --- the layouts -------------------------------------------------------------------------------


def acl_pretrained():
    """train_simCLR.py / train_DynACL.py's model_encoder_k.pt / AIR's pretraining.py:
    {'epoch', 'state_dict', 'optim'} of resnet18(bn_names=['normal', 'pgd']) with proj_head."""
    net = source_model(bn_sets=ACL_SETS, proj_dim=D, proj_head="mlp3")
    sd = net.state_dict()
    state = {**normalize(IMAGENET), **published_backbone(sd, ACL_SETS), **acl_head(sd)}
    return net, clone(state)


def dynacl_post_dual():
    """LPAFT_AFF.py's (and AIR's LP-AFF.py's) model.pt: both routes, fc = Linear(512, 10)
    trained on the k-means pseudo labels."""
    net = source_model(bn_sets=ACL_SETS)
    g = torch.Generator().manual_seed(5)
    state = {**normalize(IMAGENET), **published_backbone(net.state_dict(), ACL_SETS),
             "fc.weight": torch.randn(10, D, generator=g), "fc.bias": torch.randn(10, generator=g)}
    return net, clone(state)


def dynacl_post_single():
    """LPAFT.py's model.pt: torchvision's resnet18 (plain BN, downsample.0/1) of the pgd route
    with the pseudo-label fc."""
    net = source_model(bn_sets=("pgd",))
    g = torch.Generator().manual_seed(6)
    state = {**normalize(IMAGENET), **published_backbone(net.state_dict(), ("pgd",), indexed=False, shortcut="downsample.0"),
             "fc.weight": torch.randn(10, D, generator=g), "fc.bias": torch.randn(10, generator=g)}
    return net, clone(state)


def deacl_lightning():
    """A solo-learn Lightning checkpoint of DeACL: the student ``backbone.*`` (torchvision
    names, CIFAR-10 normalisation inside, fc an Identity), the teacher ``momentum_backbone.*``,
    the online classifiers; the projectors are Identities (no keys)."""
    net = source_model(bn_sets=("normal",), stem_padding=2, mean=CIFAR10[0], std=CIFAR10[1])
    teacher = source_model(seed=2, bn_sets=("normal",))
    student = {**normalize(CIFAR10), **published_backbone(net.state_dict(), ("normal",), indexed=False, shortcut="downsample.0")}
    teacher_sd = {**normalize(CIFAR10), **published_backbone(teacher.state_dict(), ("normal",), indexed=False, shortcut="downsample.0")}
    state = {**{f"backbone.{k}": v for k, v in student.items()},
             **{f"momentum_backbone.{k}": v for k, v in teacher_sd.items()},
             "classifier.weight": torch.zeros(10, D), "classifier.bias": torch.zeros(10),
             "classifier_adv.weight": torch.ones(10, D), "classifier_adv.bias": torch.ones(10)}
    doc = {"epoch": 99, "global_step": 19600, "pytorch-lightning_version": "1.5.10", "state_dict": clone(state),
           "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.5, "params": [0, 1]}]}],
           "lr_schedulers": [{"last_epoch": 100, "base_lrs": [0.5]}], "callbacks": {}}
    return net, doc


# --- the forward written from the published keys -------------------------------------------------


def reference_features(pub, x, bn=None, stem_padding=1):
    """ResNet-18 features in eval mode from the published keys (``bn``: the ``bn_list`` index,
    None for plain BatchNorms), as the authors' modules compute them: normalize, conv1 (3x3,
    stride 1, ``stem_padding``), bn1, relu, no max-pool, four stages of BasicBlocks, average pool."""
    p = {k: v.double() for k, v in pub.items()}

    def norm(name, h):
        get = (lambda n: p[f"{name}.{n}"]) if bn is None else (lambda n: p[f"{name}.bn_list.{bn}.{n}"])
        return F.batch_norm(h, get("running_mean"), get("running_var"), get("weight"), get("bias"), False, 0.0, 1e-5)

    h = (x - p["normalize.mean"].view(1, 3, 1, 1)) / p["normalize.std"].view(1, 3, 1, 1)
    h = F.relu(norm("bn1", F.conv2d(h, p["conv1.weight"], padding=stem_padding)))
    for stage in range(1, 5):
        for block in range(2):
            name, stride = f"layer{stage}.{block}", 2 if stage > 1 and block == 0 else 1
            out = F.relu(norm(f"{name}.bn1", F.conv2d(h, p[f"{name}.conv1.weight"], stride=stride, padding=1)))
            out = norm(f"{name}.bn2", F.conv2d(out, p[f"{name}.conv2.weight"], padding=1))
            for conv, bn_name in (("downsample.conv", "downsample.bn"), ("downsample.0", "downsample.1")):
                if f"{name}.{conv}.weight" in p:
                    h = norm(f"{name}.{bn_name}", F.conv2d(h, p[f"{name}.{conv}.weight"], stride=stride))
                    break
            h = F.relu(out + h)
    return h.mean(dim=(2, 3))


def assert_same_tensors(ckpt, net):
    expected = net.state_dict()
    assert ckpt.tensors.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(ckpt.tensors[key], value), key


def imported(tmp_path, doc, name="model.pt", **kwargs):
    path = tmp_path / name
    torch.save(doc, path)
    notes = []
    out = import_original(path, tmp_path / f"{name}.safetensors", notes=notes, **kwargs)
    return load_checkpoint(out, kind="encoder"), notes


X = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


# --- each layout imports strictly and computes what the authors' model computes -------------------


@pytest.mark.parametrize("method", ["acl", "acl-air", "dynacl", "dynacl-air"])
def test_the_acl_familys_pretrained_layout(tmp_path, method):
    net, state = acl_pretrained()
    ckpt, notes = imported(tmp_path, {"epoch": 1000, "state_dict": state, "optim": {"state": {}, "param_groups": []}},
                           source=method)
    assert_same_tensors(ckpt, net)
    cfg = ckpt.model_config
    assert (cfg.bn_sets, cfg.proj_head, cfg.proj_dim, cfg.mean, cfg.std, cfg.stem_padding) == (
        ACL_SETS, "mlp3", D, *IMAGENET, 1)
    assert ckpt.meta.method == method and ckpt.meta.config["epoch"] == 1000 and notes == []
    model = ckpt.build().double()
    for i, bn in enumerate(ACL_SETS):  # set i of every layer is bn_list.i: nothing swapped
        torch.testing.assert_close(model.features(X, bn), reference_features(state, X, bn=i))
    feat = model.features(X, "pgd")
    torch.testing.assert_close(model.project(feat, "pgd"), net.double().project(feat, "pgd"))


def test_dynacls_momentum_model_keeps_encoder_k(tmp_path):
    net, state = acl_pretrained()
    other = source_model(seed=3, bn_sets=ACL_SETS, proj_dim=D, proj_head="mlp3").state_dict()
    online = {**normalize(IMAGENET), **published_backbone(other, ACL_SETS), **acl_head(other)}
    doc = {"epoch": 1000, "state_dict": {**{f"encoder_q.{k}": v for k, v in online.items()},
                                         **{f"encoder_k.{k}": v for k, v in state.items()}}}
    ckpt, notes = imported(tmp_path, doc)  # detected: only DynACL has a momentum encoder
    assert ckpt.meta.method == "dynacl"
    assert_same_tensors(ckpt, net)
    why = "DynACL's online encoder (the authors release and finetune the momentum encoder encoder_k)"
    assert notes == [f"dropped encoder_q.* ({why})"] and ckpt.meta.config["dropped"] == {"encoder_q.*": why}
    ckpt, _ = imported(tmp_path, doc, name="again.pt", source="DynACL-AIR")  # --from wins over the detection
    assert ckpt.meta.method == "dynacl-air"


@pytest.mark.parametrize("method", ["dynacl++", "dynacl-air++"])
def test_the_post_processed_dual_bn_layout(tmp_path, method):
    net, state = dynacl_post_dual()
    ckpt, notes = imported(tmp_path, {"state_dict_dual": state}, source=method)
    assert_same_tensors(ckpt, net)
    cfg = ckpt.model_config
    assert (cfg.bn_sets, cfg.proj_dim, cfg.num_classes, cfg.mean, cfg.std) == (ACL_SETS, None, None, *IMAGENET)
    assert ckpt.meta.method == method and set(ckpt.meta.config["dropped"]) == {"fc.weight", "fc.bias"}
    assert notes and notes[0].startswith("dropped fc.weight, fc.bias (the post-processing's pseudo-label head")
    model = ckpt.build().double()
    for i, bn in enumerate(ACL_SETS):
        torch.testing.assert_close(model.features(X, bn), reference_features(state, X, bn=i))


def test_the_post_processed_single_bn_layout_is_the_pgd_route(tmp_path):
    net, state = dynacl_post_single()
    ckpt, _ = imported(tmp_path, {"epoch": 25, "state_dict": state, "optim": {}}, source="dynacl++")
    assert_same_tensors(ckpt, net)
    assert ckpt.model_config.bn_sets == ("pgd",) and ckpt.model_config.mean == IMAGENET[0]
    torch.testing.assert_close(ckpt.build().double().features(X), reference_features(state, X))


def test_deacls_lightning_checkpoint(tmp_path):
    net, doc = deacl_lightning()
    ckpt, notes = imported(tmp_path, doc)  # detected from the backbone. prefix
    assert_same_tensors(ckpt, net)
    cfg = ckpt.model_config
    assert (ckpt.meta.method, cfg.bn_sets, cfg.proj_dim, cfg.mean, cfg.std, cfg.stem_padding) == (
        "deacl", ("normal",), None, *CIFAR10, 2)
    assert ckpt.meta.config["epoch"] == 99 and ckpt.meta.config["pytorch-lightning_version"] == "1.5.10"
    assert set(ckpt.meta.config["dropped"]) == {"momentum_backbone.*", "classifier.*", "classifier_adv.*"}
    assert notes == ["dropped momentum_backbone.* (DeACL's frozen teacher); classifier.*, classifier_adv.* "
                     "(solo-learn's online linear classifier, a training monitor)"]
    student = {k[len("backbone."):]: v for k, v in doc["state_dict"].items() if k.startswith("backbone.")}
    # the authors' stem pads by 2 (solo-learn's CIFAR stem): 34x34 maps, another function than padding 1
    torch.testing.assert_close(ckpt.build().double().features(X), reference_features(student, X, stem_padding=2))
    assert not torch.allclose(reference_features(student, X, stem_padding=1), reference_features(student, X, stem_padding=2))


# --- wrappers, prefixes, detection, --from ---------------------------------------------------------


@pytest.mark.parametrize("wrapper", ["state_dict_dual", "state_dict", "model", None])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_every_wrapper_and_prefix(tmp_path, wrapper, prefix):
    net, state = dynacl_post_dual()
    state = {prefix + k: v for k, v in state.items()}
    ckpt, _ = imported(tmp_path, {wrapper: state, "epoch": 3} if wrapper else state, source="dynacl++")
    assert_same_tensors(ckpt, net)
    assert ckpt.meta.config.get("epoch") == (3 if wrapper else None)  # a raw state dict has no other entries


def test_a_tensor_with_and_without_the_wrapper_prefix_is_refused(tmp_path):
    _, state = dynacl_post_dual()
    with pytest.raises(CheckpointError, match=r"holds some tensors twice, with and without a wrapper prefix \(module\.\): "
                                              r"conv1\.weight$"):
        imported(tmp_path, {**state, "module.conv1.weight": state["conv1.weight"]}, source="dynacl++")


def test_deacls_solo_learn_simclr_teacher_is_a_simclr_encoder(tmp_path):
    """solo-learn's SimCLR (DeACL's teacher): backbone.* with a projector and no teacher is
    recorded as the SimCLR encoder it is; a DeACL student made from it needs no note."""
    net, doc = deacl_lightning()
    state = {k: v for k, v in doc["state_dict"].items() if not k.startswith(("momentum_backbone.", "classifier_adv."))}
    state.update({"projector.0.weight": torch.ones(D, D), "projector.0.bias": torch.zeros(D)})
    ckpt, notes = imported(tmp_path, {**doc, "state_dict": state})
    assert (ckpt.meta.method, ckpt.model_config.stem_padding, ckpt.model_config.mean) == ("simclr", 2, CIFAR10[0])
    assert set(ckpt.meta.config["dropped"]) == {"projector.*", "classifier.*"}
    assert_same_tensors(ckpt, net)
    forced, _ = imported(tmp_path, {**doc, "state_dict": state}, name="forced.pt", source="deacl")  # --from always wins
    assert forced.meta.method == "deacl"


def test_a_raw_deacl_state_dict_with_its_prefix(tmp_path):
    net, doc = deacl_lightning()
    raw = {k: v for k, v in doc["state_dict"].items() if k.startswith("backbone.")}
    ckpt, notes = imported(tmp_path, {f"module.{k}": v for k, v in raw.items()})
    assert ckpt.meta.method == "deacl" and notes == []
    assert_same_tensors(ckpt, net)


def test_a_shared_layout_needs_from_and_the_hint_knows_the_benchmarks_names(run_cli, tmp_path):
    _, state = acl_pretrained()
    torch.save({"state_dict": state}, tmp_path / "DynACL_IR.pt")
    _, err = refused(run_cli("import", "DynACL_IR.pt"), 2, "the ACL family's", "acl, acl-air, dynacl, dynacl-air",
                     "--from")
    assert "hint: it is named like the RobustSSL benchmark's DynACL_IR.pt: add --from dynacl-air" in err
    _, post = dynacl_post_dual()
    torch.save({"state_dict": post}, tmp_path / "mine.pt")
    _, err = refused(run_cli("import", "mine.pt"), 2, "DynACL++'s", "dynacl++, dynacl-air++")
    assert "--from dynacl++" in err
    headless = {k: v for k, v in post.items() if not k.startswith("fc.")}
    torch.save(headless, tmp_path / "headless.pt")
    refused(run_cli("import", "headless.pt"), 2, "has no head that tells which method made it",
            "acl, acl-air, deacl, dynacl, dynacl++, dynacl-air, dynacl-air++, simclr: say which one made it with --from")
    assert tree(tmp_path) == {"DynACL_IR.pt", "mine.pt", "headless.pt"}
    code, out, err = run_cli("import", "DynACL_IR.pt", "--from", "DynACL-AIR", "--json")
    assert code == 0, err
    assert json.loads(out)["method"] == "dynacl-air" and json.loads(out)["model"]["proj_head"] == "mlp3"
    assert load_checkpoint(tmp_path / "DynACL_IR.safetensors").meta.method == "dynacl-air"
    code, out, err = run_cli("import", "mine.pt", "--from", "dynacl++")
    assert code == 0 and out.strip() == "mine.safetensors"
    assert err.startswith("dropped fc.weight, fc.bias (the post-processing's pseudo-label head")  # said, on stderr


def test_an_unknown_from_is_one_line_with_the_choices(run_cli, tmp_path):
    _, state = acl_pretrained()
    torch.save(state, tmp_path / "acl.pt")
    refused(run_cli("import", "acl.pt", "--from", "rocl"), 2,
            "unknown --from 'rocl': choose one of a-infonce, acl, acl-air, advcl, deacl, dynacl, dynacl++, dynacl-air, dynacl-air++, simclr")
    assert tree(tmp_path) == {"acl.pt"}


def test_an_unexpected_or_missing_key_fails_with_a_list(tmp_path):
    _, state = acl_pretrained()
    bad = {**state, "layer2.0.bn1.bn_list.0.extra": torch.zeros(16), "fc.weight": torch.zeros(10, D)}
    del bad["layer3.0.downsample.bn.bn_list.1.running_var"]
    with pytest.raises(CheckpointError) as err:
        imported(tmp_path, {"state_dict": bad}, source="acl")
    msg = err.value.message
    assert "unmatched: fc.weight, layer2.0.bn1.bn_list.0.extra;" in msg
    assert "missing: backbone.layers.2.0.shortcut_bn.sets.pgd.running_var" in msg
    assert "read as the ACL family's (pretrained, fc.fc1..fc3 head) layout (acl, --from acl)" in msg
    assert not (tmp_path / "model.pt.safetensors").exists()


def test_one_unexpected_key_alone_fails_with_it_named(tmp_path):
    """Nothing missing, every shape right: the one tensor that maps nowhere still fails the import."""
    _, state = acl_pretrained()
    with pytest.raises(CheckpointError) as err:
        imported(tmp_path, {"state_dict": {**state, "fc.weight": torch.zeros(10, D)}}, source="acl")
    msg = err.value.message
    assert "unmatched: fc.weight" in msg and "missing" not in msg and "wrong shape" not in msg
    assert not (tmp_path / "model.pt.safetensors").exists()


def test_a_key_mapped_twice_and_a_wrong_method_fail(tmp_path):
    _, state = dynacl_post_dual()
    twice = {**state, "layer2.0.downsample.0.weight": state["layer2.0.downsample.conv.weight"]}
    with pytest.raises(CheckpointError, match=r"mapped twice: backbone\.layers\.1\.0\.shortcut_conv\.weight "
                                              r"\(layer2\.0\.downsample\.conv\.weight, layer2\.0\.downsample\.0\.weight\)"):
        imported(tmp_path, twice, source="dynacl++")
    from test_import import KS, SETS, original_layout

    advcl = original_layout(randomise(create_model("resnet18-tiny", bn_sets=SETS, proj_dim=128, pseudo_ks=KS)))
    with pytest.raises(CheckpointError, match=r"3 batch-norm sets \(bn_list.0-2\); acl's layout has 2") as err:
        imported(tmp_path, {"model": advcl}, source="acl")
    assert err.value.hint == "an AdvCL checkpoint has 3: --from advcl"
    ckpt, notes = imported(tmp_path, {"model": advcl})  # detected as AdvCL's, its unused heads dropped by name
    assert ckpt.meta.method == "advcl" and set(ckpt.meta.config["dropped"]) == {"head_pred.*", "head_ce.*"}


def test_a_infonce_imports_from_advcls_layout_and_reaches_its_published_rows(tmp_path):
    """A-InfoNCE publishes AdvCL's layout (the benchmark's AInfoNCE.pt): --from a-infonce records
    its method, which reaches the leaderboard's A-InfoNCE rows and finetunes as AdvCL."""
    from test_import import KS, SETS, original_layout

    from advcl_cli.benchmark.reported import load_reported
    from advcl_cli.methods import method_for

    net = randomise(create_model("resnet18-tiny", bn_sets=SETS, proj_dim=128, pseudo_ks=KS))
    ckpt, _ = imported(tmp_path, {"model": original_layout(net)}, name="AInfoNCE.pt", source="a-infonce")
    assert_same_tensors(ckpt, net)
    assert ckpt.meta.method == "a-infonce" and set(ckpt.meta.config["dropped"]) == {"head_pred.*", "head_ce.*"}
    cell, source, row = load_reported().lookup(ckpt.meta.method, "cifar10", "aff")
    assert (cell.aa, cell.sa, row.label) == (49.73, 82.99, "A-InfoNCE (Yu et al., ECCV'22)")
    assert method_for(ckpt.meta.method).name == "advcl"


def test_a_stl10_stem_is_refused_with_the_reason(tmp_path):
    _, state = acl_pretrained()
    state["conv1.weight"] = torch.zeros(8, 3, 7, 7)
    with pytest.raises(CheckpointError, match="stem conv1 takes 3 channels with a 7x7 kernel") as err:
        imported(tmp_path, state, source="acl")
    assert "7x7" in err.value.hint


def test_normalisation_the_file_lacks_is_the_methods_and_said(tmp_path):
    net, state = dynacl_post_single()
    del state["normalize.mean"], state["normalize.std"]
    ckpt, notes = imported(tmp_path, state, source="dynacl++")
    assert (ckpt.model_config.mean, ckpt.model_config.std) == IMAGENET
    assert "has no normalize.mean/std: recorded dynacl++'s normalisation" in notes[0]
    odd = {**state, "normalize.mean": torch.tensor([0.5, 0.5, 0.5]), "normalize.std": torch.tensor([0.2, 0.3, 0.4])}
    ckpt, _ = imported(tmp_path, odd, name="odd.pt", source="dynacl++")
    assert ckpt.model_config.mean == (0.5, 0.5, 0.5)
    torch.testing.assert_close(torch.tensor(ckpt.model_config.std), torch.tensor([0.2, 0.3, 0.4]), rtol=0, atol=1e-7)
    with pytest.raises(CheckpointError, match="normalize.mean without normalize.std"):
        imported(tmp_path, {**state, "normalize.mean": torch.zeros(3)}, name="half.pt", source="dynacl++")


class Payload:
    """Unpickling this creates the file ``target``: code running from the checkpoint."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_pickle_that_runs_code_is_refused_without_running_it(run_cli, tmp_path):
    _, state = acl_pretrained()
    marker = tmp_path / "pwned"
    torch.save({"state_dict": state, "args": Payload(marker)}, tmp_path / "ACL_DS.pt")
    refused(run_cli("import", "ACL_DS.pt", "--from", "acl"), 2, "holds objects other than tensors (io.open)",
            "refused")
    assert not marker.exists() and tree(tmp_path) == {"ACL_DS.pt"}
    torch.load(tmp_path / "ACL_DS.pt", weights_only=False)  # the payload is live: unpickled, it runs
    assert marker.exists()


def test_a_file_that_is_not_a_state_dict(tmp_path):
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1), "epoch": 3}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="its 'state_dict' entry is not one"):
        import_original(tmp_path / "x.pt", tmp_path / "x.safetensors")
    torch.save([torch.zeros(1)], tmp_path / "y.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint dict"):
        import_original(tmp_path / "y.pt", tmp_path / "y.safetensors")
    with pytest.raises(UsageError, match="unknown --from"):
        import_original(tmp_path / "y.pt", tmp_path / "y.safetensors", source="nope")


# --- they finetune and evaluate with no extra flags ------------------------------------------------


@pytest.mark.parametrize("layout", ["acl", "deacl", "dynacl++ single-BN"])
def test_imported_encoders_finetune_and_evaluate(run_cli, tmp_path, layout):
    if layout == "acl":
        _, state = acl_pretrained()
        torch.save({"state_dict": state}, tmp_path / "in.pt")
        extra, bn_sets = ["--from", "acl"], ["pgd"]
    elif layout == "deacl":
        torch.save(deacl_lightning()[1], tmp_path / "in.pt")
        extra, bn_sets = [], ["normal"]
    else:
        torch.save({"state_dict": dynacl_post_single()[1]}, tmp_path / "in.pt")
        extra, bn_sets = ["--from", "dynacl++"], ["pgd"]
    code, enc, err = run_cli("import", "in.pt", *extra, "--dataset", "digits")
    assert code == 0, err
    small = ["--dataset", "digits", "--limit", "32", "--image-size", "16", "--device", "cpu"]
    code, clf, err = run_cli("finetune", enc.strip(), "--scheme", "slf", "--epochs", "1", "--batch-size", "16",
                             "--eval-limit", "8", *small, "--out", tmp_path / "slf")
    assert code == 0, err
    meta = load_checkpoint(clf.strip()).meta
    assert meta.kind == "classifier" and meta.model["bn_sets"] == bn_sets
    assert meta.model["stem_padding"] == (2 if layout == "deacl" else 1)
    assert meta.model["mean"] == list((CIFAR10 if layout == "deacl" else IMAGENET)[0])
    code, out, err = run_cli("eval", clf.strip(), "--attack", "pgd3", "--limit", "8", "--image-size", "16", "--json")
    assert code == 0, err
    assert json.loads(out)["n"] == 8
