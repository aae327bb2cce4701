"""leaderboard.md and the bar chart from benchmark result records: the RobustSSL layout, our
numbers in percent, the published numbers for the same method and dataset under them."""

import pytest

from advcl_cli.benchmark.leaderboard import leaderboard_markdown, write_leaderboard
from advcl_cli.plots import benchmark_chart


def cell(encoder, sha, method, scheme, dataset="cifar10", **numbers):
    return {"encoder": encoder, "sha256": sha * 8, "method": method, "dataset": dataset, "scheme": scheme,
            "eps": 8 / 255, "corruptions": "cifar10-c", "seconds": 12.5, **numbers}


RECORDS = [
    cell("advcl-r18", "a1b2c3d4", "advcl", "slf", sa=0.8, aa=0.4, pgd20=0.5, ca=0.7),  # replaced below
    cell("advcl-r18", "a1b2c3d4", "advcl", "alf", sa=0.7912, aa=0.4411, pgd20=0.48),
    cell("mine.safetensors", "ffff0000", "simclr", "slf", sa=0.9, aa=0.0, ca=0.8),
    cell("advcl-r18", "a1b2c3d4", "advcl", "slf", sa=0.8236, aa=0.4355, pgd20=0.51, ca=0.7321),
    cell("advcl-r18", "a1b2c3d4", "advcl", "aff", sa=0.83, aa=0.5, pgd20=0.55),
]


def parse(markdown):
    """The table's header and rows (lists of cell strings) back from the Markdown."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert set(split[1]) == {"---"}
    return split[0], split[2:]


def test_rows_per_encoder_with_the_reported_numbers_under_them(tmp_path):
    path = write_leaderboard(RECORDS, tmp_path / "leaderboard.md")
    text = path.read_text()
    header, rows = parse(text)
    assert header == ["encoder", "method", "dataset", "SLF RA", "SLF CA", "SLF SA", "ALF RA", "ALF CA", "ALF SA",
                      "AFF RA", "AFF CA", "AFF SA"]
    assert [r[0] for r in rows] == ["advcl-r18 (a1b2c3d4)", "reported: AdvCL (Fan et al., NeurIPS'21) [1]",
                                    "mine.safetensors (ffff0000)"]  # no published numbers for simclr
    ours, published, mine = (dict(zip(header, r)) for r in rows)
    assert [ours[k] for k in header[3:]] == ["43.55", "73.21", "82.36", "44.11", "-", "79.12", "50.00", "-", "83.00"]
    assert [published[k] for k in header[3:]] == ["43.18", "73.14", "82.36", "44.05", "-", "80.04", "49.61", "-", "83.00"]
    assert [mine[k] for k in header[3:]] == ["0.00", "80.00", "90.00"] + ["-"] * 6
    assert "[1] RobustSSL benchmark leaderboard" in text and "https://robustssl.github.io" in text
    assert "eps 8/255" in text and "cifar10-c" in text


def test_the_same_encoder_on_another_dataset_gets_that_datasets_numbers():
    records = [cell("advcl-r18", "a1b2c3d4", "advcl", "aff", dataset="cifar100", sa=0.58, aa=0.25)]
    header, rows = parse(leaderboard_markdown(records))
    assert header[3:] == ["AFF RA", "AFF CA", "AFF SA"]  # only the schemes measured
    assert rows[1][3:] == ["25.26", "-", "58.29"]  # CIFAR-100 AdvCL AFF, not CIFAR-10's 49.61 / 83.00


def test_bar_chart_is_a_png(tmp_path):
    path = benchmark_chart(RECORDS, tmp_path / "chart.png", title="cifar10")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bar_chart_legend_covers_no_panel_bar_or_axis_label(tmp_path, monkeypatch):
    import advcl_cli.plots as plots

    boxes, save = {}, plots.save_figure

    def measure(fig, path):
        renderer = fig.canvas.get_renderer()
        legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        boxes["legends"] = [legend.get_window_extent(renderer) for legend in legends]
        boxes["panels"] = [ax.get_tightbbox(renderer) for ax in fig.axes]  # bars, ticks, axis labels, titles
        return save(fig, path)

    monkeypatch.setattr(plots, "save_figure", measure)
    benchmark_chart(RECORDS, tmp_path / "chart.png", title="cifar10")
    assert len(boxes["legends"]) == 1
    assert not any(legend.overlaps(panel) for legend in boxes["legends"] for panel in boxes["panels"])


def test_a_record_without_its_keys_is_refused():
    with pytest.raises(ValueError, match="scheme"):
        leaderboard_markdown([{"encoder": "x", "sha256": "0" * 64, "method": "advcl", "dataset": "cifar10"}])


def test_ra_under_another_attack_is_named_and_smoke_runs_are_marked():
    records = [cell("advcl-r18", "a1b2c3d4", "advcl", "slf", sa=0.8, ra=0.3, ra_attack="pgd5", aa=None,
                    deviations=["epochs=2"])]
    text = leaderboard_markdown(records)
    header, rows = parse(text)
    assert rows[0][3:6] == ["30.00", "-", "80.00"] and rows[1][3] == "43.18"  # ours under pgd5, theirs AutoAttack
    assert "RA: robust accuracy under pgd5 (L-inf eps 8/255; published RA is AutoAttack's)" in text
    assert "Not the published protocol: epochs=2." in text
    assert "Not the published protocol" not in leaderboard_markdown(RECORDS)


def test_a_checkpoints_method_reaches_the_published_rows_through_one_mapping():
    from advcl_cli.benchmark.reported import REPORTED_IDS, load_reported, reported_id

    rep = load_reported()
    assert {r.method for r in rep.numbers} <= set(REPORTED_IDS.values())  # every published method is reachable
    assert reported_id("DynACL++") == "dynacl++" and reported_id("simclr") is None
    assert rep.row_for("simclr", "cifar10") is None and rep.row_for("acl", "cifar100").label.startswith("ACL")
