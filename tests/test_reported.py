"""The published numbers shipped in advcl_cli/benchmark/reported.toml: they parse, every row names
a known source, and they are the numbers of the leaderboard tables (written out here)."""

import pytest

from advcl_cli.benchmark.reported import SHIPPED, load_reported
from advcl_cli.errors import UsageError

# REFERENCE.md, "CIFAR-10 leaderboard, RA (AutoAttack) / SA, ResNet-18": SLF, ALF, AFF, SLF CA
CIFAR10 = {
    "dynacl-air++": ((46.99, 81.80), (48.23, 79.56), (50.79, 82.36), 72.11),
    "dynacl++": ((46.54, 79.82), (47.98, 78.81), (50.34, 81.93), 71.96),
    "dynacl-air": ((45.17, 78.08), (46.14, 77.42), (50.58, 82.74), 70.51),
    "dynacl": ((45.09, 75.41), (45.67, 72.97), (50.52, 81.86), 68.67),
    "deacl": ((43.27, 79.94), (41.99, 77.71), (44.96, 78.29), 73.06),
    "advcl": ((43.18, 82.36), (44.05, 80.04), (49.61, 83.00), 73.14),
    "a-infonce": ((42.72, 83.70), (43.28, 80.30), (49.73, 82.99), 74.09),
    "acl": ((39.17, 78.22), (40.60, 75.53), (49.60, 81.25), 70.72),
}


def test_shipped_numbers_match_the_leaderboard():
    rep = load_reported()
    for method, (slf, alf, aff, ca) in CIFAR10.items():
        for scheme, (aa, sa) in zip(("slf", "alf", "aff"), (slf, alf, aff)):
            cell, source, row = rep.lookup(method, "cifar10", scheme)
            assert (cell.aa, cell.sa) == (aa, sa), (method, scheme)
            assert source.url == "https://robustssl.github.io" and row.source == "robustssl"
        assert rep.lookup(method, "cifar10", "slf")[0].ca == ca
    # CIFAR-100: AdvCL SLF 19.10 / 44.60, ALF 18.19 / 39.85, AFF 25.26 / 58.29; ACL AFF 24.78 / 57.74
    c100 = {s: rep.lookup("advcl", "cifar100", s)[0] for s in ("slf", "alf", "aff")}
    assert [(c.aa, c.sa) for c in c100.values()] == [(19.10, 44.60), (18.19, 39.85), (25.26, 58.29)]
    assert (rep.lookup("ACL", "CIFAR100", "aff")[0].aa, rep.lookup("acl", "cifar100", "aff")[0].sa) == (24.78, 57.74)
    assert rep.lookup("acl", "cifar100", "alf") is None  # not reported
    assert rep.lookup("simclr", "cifar10", "slf") is None
    # the paper's PGD-20 number comes from the paper, the leaderboard row has none
    cell, source, _ = rep.lookup("advcl", "cifar10", "slf", metric="pgd20")
    assert (cell.sa, cell.pgd20) == (80.85, 50.45) and source.url == "https://arxiv.org/abs/2111.01124"


def test_every_row_names_a_source_defined_once(tmp_path):
    text = SHIPPED.read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('source = "advcl-paper"', 'source = "somewhere"'))
    with pytest.raises(UsageError, match="unknown source 'somewhere'"):
        load_reported(bad)
    bad.write_text(text.replace("aa = 43.18", "aa = 143.18"))
    with pytest.raises(UsageError, match=r"numbers\.5\.slf\.aa: Input should be less than or equal to 100"):
        load_reported(bad)
    with pytest.raises(UsageError, match="no such reported-numbers file"):
        load_reported(tmp_path / "missing.toml")
