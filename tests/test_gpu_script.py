"""benchmarks/gpu.sh --dry-run: the GPU benchmark's own code at toy sizes on the CPU, so the one
call made on a lent GPU cannot fail on something a CPU would have shown."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_dry_run_writes_the_family_table(tmp_path):
    results = tmp_path / "RESULTS.md"
    env = {**os.environ, "PYTHON": sys.executable, "ADVCL_GPU_RESULTS": str(results), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    text = results.read_text()
    assert "## GPU family (benchmarks/gpu_family.py)" in text and "dry run" in text
    for method in ("advcl", "a-infonce", "acl", "dynacl", "air", "dynacl-air", "deacl", "rocl", "simclr"):
        assert f"| {method} | ours (fastest)" in text or f"| {method} | ours compiled (fastest)" in text, method
    assert "| simclr | ours compiled" in text and "| acl | reference |" in text and "| advcl | reference |" in text
    assert "| pgd20 | 32 |" in text and "| autoattack | 16 |" in text and "one benchmark cell" in text
    # the CLI part: a bf16, channels_last pretraining run that records what ran
    assert '"precision": "bf16"' in done.stdout and '"channels_last": true' in done.stdout
    assert "(dry run: toy sizes" not in (ROOT / "benchmarks" / "RESULTS.md").read_text()  # nothing written there
