"""The zoo manifest: the shipped entries, validation messages, precedence, writing."""

from pathlib import Path

import pytest

from advcl_cli.errors import UsageError
from advcl_cli.zoo import manifest as mf
from advcl_cli.zoo.manifest import Entry, Manifest, load_manifest, manifest_path, parse_manifest, write_manifest

PAPER_ENTRIES = [
    "simclr-r18-cifar10",
    "advcl-r18-cifar10",
    "advcl-r18-cifar10-slf",
    "advcl-r18-cifar10-alf",
    "advcl-r18-cifar10-aff",
    "advcl-r18-cifar100-slf",
    "advcl-r18-cifar100-alf",
    "advcl-r18-cifar100-aff",
]
GOOD = """
[mine]
repo = "lab/mine"
revision = "0123456789abcdef0123456789abcdef01234567"
sha256 = "%s"
kind = "classifier"
arch = "resnet18"
method = "advcl"
dataset = "cifar10"
scheme = "slf"
eps = "8/255"

[mine.metrics.sa]
value = 80.0
status = "measured"
command = "advcl eval mine --attack pgd20"
""" % ("a" * 64)


def test_shipped_manifest_holds_the_paper_models_unpublished_with_recipes():
    zoo = load_manifest()
    assert zoo.names() == PAPER_ENTRIES
    assert not any(e.published for e in zoo.entries.values())
    assert all(e.recipe and all(line.startswith(("advcl ", "labels=", "enc=", "clf=", "simclr=")) for line in e.recipe) for e in zoo.entries.values())
    slf = zoo.get("advcl-r18-cifar10-slf")
    assert {k: m.value for k, m in slf.metrics.items()} == {"sa": 82.36, "pgd20": 50.45, "aa": 43.18}
    assert all(m.status == "reported" and m.source for m in slf.metrics.values())
    assert (slf.metrics["pgd20"].source, slf.metrics["aa"].source) == ("advcl-paper", "robustssl")
    assert {k: m.value for k, m in zoo.get("advcl-r18-cifar100-aff").metrics.items()} == {"sa": 58.29, "aa": 25.26}
    assert slf.eps == pytest.approx(8 / 255) and slf.scheme == "slf" and slf.kind == "classifier"
    assert "ImageNet" in zoo.get("simclr-r18-cifar10").notes
    assert any("pseudo-labels import imagenet_clPretrain_pseudo_labels.pkl" in line for line in zoo.get("advcl-r18-cifar10").recipe)


def test_shipped_manifest_is_in_canonical_form():
    """What advcl writes back is the file itself: updates make clean diffs."""
    zoo = load_manifest()
    assert mf.manifest_to_toml(zoo) == mf.SHIPPED.read_text()


@pytest.mark.parametrize(
    "change, entry_field, words",
    [
        (('revision = "0123456789abcdef0123456789abcdef01234567"', 'revision = "main"'), "revision", "40-hex"),
        (('sha256 = "' + "a" * 64 + '"', 'sha256 = "abc"'), "sha256", "pattern"),
        (('kind = "classifier"', 'kind = "detector"'), "kind", "encoder"),
        (('eps = "8/255"', 'eps = "eight"'), "eps", "fraction"),
        (('command = "advcl eval mine --attack pgd20"', 'source = "x"'), "metrics.sa", "command"),
        (('[mine.metrics.sa]', '[mine.metrics.fgsm]'), "metrics.fgsm", "sa"),
        (('scheme = "slf"', 'scheme = "slf"\ncolour = "red"'), "colour", "not permitted"),
        (('sha256 = "' + "a" * 64 + '"\n', ""), "(entry)", "needs 'revision'"),
    ],
)
def test_validation_errors_name_the_entry_and_the_field(change, entry_field, words):
    text = GOOD.replace(*change)
    assert text != GOOD
    with pytest.raises(UsageError) as e:
        parse_manifest(text, Path("team.toml"))
    assert f"manifest team.toml: entry 'mine', field '{entry_field}'" in e.value.message
    assert words in e.value.message


def test_reported_metrics_are_the_published_numbers_file():
    """A metric whose source is an id of reported.toml carries that file's number, so the zoo and
    the benchmark's leaderboard cannot disagree; the file itself, read as plain TOML, is the reference."""
    import tomllib

    from advcl_cli.benchmark.reported import SHIPPED as REPORTED

    published = tomllib.loads(REPORTED.read_text())
    shipped, checked = load_manifest(), 0
    for name, entry in shipped.entries.items():
        for key, metric in entry.metrics.items():
            if metric.status != "reported":
                continue
            assert metric.source in published["sources"], (name, key, metric.source)  # no free-text copy left
            rows = [r for r in published["numbers"] if (r["source"], r["method"], r["dataset"]) ==
                    (metric.source, entry.method, entry.dataset) and key in r.get(entry.scheme, {})]
            assert rows and metric.value == rows[0][entry.scheme][key], (name, key)
            checked += 1
    assert checked == 13

    reported = GOOD.replace('status = "measured"\ncommand = "advcl eval mine --attack pgd20"', 'status = "reported"\nsource = "robustssl"')
    assert reported != GOOD
    with pytest.raises(UsageError) as e:  # RobustSSL's AdvCL SLF SA on CIFAR-10 is 82.36, not 80.0
        parse_manifest(reported, Path("team.toml"))
    assert e.value.message == ("manifest team.toml: entry 'mine', metric 'sa' is 80.0, but source 'robustssl' "
                               "in reported.toml gives 82.36")
    assert parse_manifest(reported.replace("80.0", "82.36"), Path("team.toml")).entries["mine"].metrics["sa"].value == 82.36
    with pytest.raises(UsageError, match="'advcl-paper' in reported.toml has no sa for advcl alf on cifar10"):
        parse_manifest(reported.replace('"robustssl"', '"advcl-paper"').replace('"slf"', '"alf"'), Path("team.toml"))
    # a free-text source is a team's own claim: accepted as written
    assert parse_manifest(reported.replace('"robustssl"', '"our lab, table 2"'), Path("t.toml")).entries["mine"]


def test_bad_toml_and_bad_names_are_usage_errors():
    with pytest.raises(UsageError, match="not valid TOML"):
        parse_manifest("[mine\n", Path("x.toml"))
    with pytest.raises(UsageError, match="bad entry name 'Has Space'"):
        parse_manifest(GOOD.replace("[mine]", '["Has Space"]').replace("[mine.metrics.sa]", '["Has Space".metrics.sa]'), Path("x.toml"))
    with pytest.raises(UsageError, match="must be a table"):
        parse_manifest('version = 1\n', Path("x.toml"))
    with pytest.raises(UsageError, match="no such manifest file"):
        load_manifest("missing.toml")


def test_unknown_names_get_close_suggestions():
    with pytest.raises(UsageError) as e:
        load_manifest().get("advcl-r18-cifar100-sf")
    assert "advcl-r18-cifar100-slf" in e.value.hint and "advcl zoo list" in e.value.hint


def test_manifest_path_precedence(monkeypatch, tmp_path):
    assert manifest_path() == mf.SHIPPED
    monkeypatch.setenv("ADVCL_ZOO_MANIFEST", "team.toml")
    assert manifest_path() == Path("team.toml")
    assert manifest_path("flag.toml") == Path("flag.toml")
    monkeypatch.delenv("ADVCL_ZOO_MANIFEST")
    Path("advcl.toml").write_text('[hub]\nzoo_manifest = "from-config.toml"\n')
    assert manifest_path() == mf.SHIPPED  # advcl.toml is the command line's: the library never reads it
    from advcl_cli.settings.layering import resolve
    from advcl_cli.settings import HubSettings

    assert manifest_path(resolve(HubSettings, {}).zoo_manifest) == Path("from-config.toml")  # as cli/ passes it


def test_write_round_trips_and_goes_through_a_link(tmp_path):
    real = tmp_path / "real.toml"
    real.write_text("# my team's zoo\n\n" + GOOD.lstrip())
    link = tmp_path / "zoo.toml"
    link.symlink_to(real)
    zoo = load_manifest(link)
    zoo.entries["other"] = Entry(kind="encoder", arch="resnet18", method="simclr", dataset="cifar10", recipe=["advcl pretrain --method simclr"])
    write_manifest(zoo)
    assert link.is_symlink()  # the link survives; the file it points at was replaced atomically
    again = load_manifest(link)
    assert again.names() == ["mine", "other"] and again.entries == zoo.entries
    assert real.read_text().startswith("# my team's zoo\n")
    assert not list(tmp_path.glob(".*.tmp"))


def test_write_refuses_what_it_could_not_read_back(tmp_path):
    path = tmp_path / "zoo.toml"
    zoo = Manifest(path, {"Bad Name": Entry(kind="encoder", arch="resnet18", method="simclr", dataset="cifar10")})
    with pytest.raises(UsageError):
        write_manifest(zoo)
    assert not path.exists()


def test_the_installed_package_manifest_is_never_edited(monkeypatch, tmp_path):
    from advcl_cli.zoo import publish

    fake = tmp_path / "lib" / "site-packages" / "advcl_cli" / "zoo" / "manifest.toml"
    fake.parent.mkdir(parents=True)
    fake.write_text("")
    monkeypatch.setattr(mf, "SHIPPED", fake)
    monkeypatch.setattr(publish, "SHIPPED", fake)
    with pytest.raises(UsageError, match="inside the installed advcl package"):
        publish.writable_manifest(None)
    assert publish.writable_manifest(tmp_path / "team.toml") == tmp_path / "team.toml"


def test_a_manifest_that_is_not_utf8_is_a_usage_error(tmp_path):
    path = tmp_path / "zoo.toml"
    path.write_bytes(b"# our caf\xe9's zoo (latin-1, not UTF-8)\n" + GOOD.encode())
    with pytest.raises(UsageError, match="not UTF-8"):
        load_manifest(path)
