"""The manifest ships inside the package: a wheel installed elsewhere finds it."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from waiting import HANG_S

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_top_level_manifest_is_the_shipped_one():
    from advcl_cli.zoo.manifest import SHIPPED

    top = REPO_ROOT / "zoo" / "manifest.toml"
    assert top.read_bytes() == SHIPPED.read_bytes()
    assert top.resolve() == SHIPPED.resolve()  # one file: zoo/manifest.toml links to the package's


def test_a_built_wheel_carries_and_finds_the_manifest(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (REPO_ROOT / name).exists():
            shutil.copy(REPO_ROOT / name, src / name)
    if not (src / "README.md").exists():
        (src / "README.md").write_text("advcl\n")
    shutil.copytree(REPO_ROOT / "advcl_cli", src / "advcl_cli", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
        check=True, capture_output=True, cwd=tmp_path, timeout=HANG_S,
    )
    wheel = next(dist.glob("advcl-*.whl"))
    assert "advcl_cli/zoo/manifest.toml" in zipfile.ZipFile(wheel).namelist()
    assert "advcl_cli/benchmark/reported.toml" in zipfile.ZipFile(wheel).namelist()

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, capture_output=True, timeout=HANG_S,
    )
    probe = (
        "import advcl_cli, advcl_cli.zoo.manifest as m; "
        "print(advcl_cli.__file__); print(m.SHIPPED); print(len(m.load_manifest().entries))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("ADVCL_ZOO_MANIFEST", None)
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    package, shipped, count = out.stdout.split()
    assert Path(package).is_relative_to(target) and Path(shipped).is_relative_to(target)
    assert int(count) == 8
