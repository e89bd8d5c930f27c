"""The README's quick-start snippet runs as written (on this CPU machine: TRL's bf16 default included)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _snippet(heading: str) -> str:
    section = README.read_text().split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quickstart_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_snippet("## Use it in your own script"), "README.md", "exec"), namespace)
    subset, raw_ds = namespace["subset"], namespace["raw_ds"]
    assert len(subset) == round(0.2 * len(raw_ds))
    assert (tmp_path / "runs/proxy/datasel/manifest.json").exists()
