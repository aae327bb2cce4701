"""The README's claims that the code can check: its table of settings is the settings'."""

from pathlib import Path

from advcl_cli.settings import settings_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_lists_every_setting_under_its_one_name():
    lines = [line.strip() for line in README.read_text().splitlines()]
    table = settings_table().splitlines()
    start = lines.index(table[0])
    assert lines[start:start + len(table)] == table, (
        "README's settings table is out of date: paste the output of "
        "python -c 'from advcl_cli.settings import settings_table; print(settings_table())'"
    )
    assert not lines[start + len(table)].startswith("|")  # no stale rows after it
