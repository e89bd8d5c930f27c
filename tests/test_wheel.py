"""The packaged CLI works from a wheel installed in a fresh venv, far from the checkout (recipes included).

The venv sees the system's site-packages, so torch and friends are not installed again; the
package itself comes from the wheel (the test checks where it was imported from).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source_tree(dest: Path) -> Path:
    """A copy of the files a release would be built from (tracked and new, not ignored ones)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0:
        for name in listed.stdout.splitlines():
            if (ROOT / name).is_file() and not name.startswith("docs/"):
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
    else:  # not a git checkout
        ignore = shutil.ignore_patterns(
            ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*cache", "docs"
        )
        shutil.copytree(ROOT, dest, ignore=ignore, dirs_exist_ok=True)
    return dest


def test_the_wheel_installs_and_its_cli_records_outside_the_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PIP_DISABLE_PIP_VERSION_CHECK="1")

    def run(*command, **kwargs):
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, **kwargs)
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-3000:])
        return done.stdout

    src = source_tree(tmp_path / "src")
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", str(src), "-w", "dist")
    (wheel,) = (tmp_path / "dist").glob("hf_datasel-*.whl")
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", "venv")
    python, cli = tmp_path / "venv" / "bin" / "python", tmp_path / "venv" / "bin" / "hf-datasel"
    run(str(python), "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel))  # the system's pip

    where = run(
        str(python), "-c", "import hf_datasel, hf_datasel.cli as c; print(hf_datasel.__file__, c.default_recipe())"
    )
    package, recipe = where.split()
    assert package.startswith(str(tmp_path / "venv")) and recipe.startswith(str(Path(package).parent))
    shipped = run(  # the evaluate metrics load offline from the installed package, not from a checkout
        str(python), "-c",
        "import json; from hf_datasel import metrics as m; m.load_exact_match(); "
        "s = m.load_selection_stats().compute(selected=[True, False], source=['a', 'b']); "
        "print(json.dumps([m.EXACT_MATCH, m.SELECTION_STATS, s['rows']]))",
    )  # fmt: skip
    exact, stats, rows = json.loads(shipped.strip().splitlines()[-1])
    assert exact.startswith(str(Path(package).parent)) and stats.startswith(str(Path(package).parent)) and rows == 1
    assert "hf-datasel record" in run(str(cli), "--help")
    assert run(str(cli), "--version").strip().startswith("hf-datasel ")

    run(
        str(cli), "record", "--", "--tiny", "--output_dir", "warm", "--pool_size", "8", "--max_steps", "1", timeout=300
    )
    summary = json.loads(run(str(cli), "report", "warm", "--json"))
    assert summary["loss_records"] == 8 and summary["last_step"] == 1
