"""Every command of the trainer, bench/ and runtime.demo refuses abbreviated flags (argparse's prefix matching off).

``--max_step 2`` was silently taken as ``--max_steps 2``. The other commands' owners check theirs (runtime.encode,
runtime.serve, export); a new ``ArgumentParser`` under bench/ without ``allow_abbrev=False`` fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _parsers(path: Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", None)) == "ArgumentParser"]


def test_every_bench_and_demo_command_refuses_abbreviations():
    files = [ROOT / "trainer" / "config.py", ROOT / "runtime" / "demo.py", *sorted((ROOT / "bench").rglob("*.py"))]
    checked, missing = 0, []
    for path in files:
        for call in _parsers(path):
            value = {k.arg: k.value for k in call.keywords}.get("allow_abbrev")
            if not (isinstance(value, ast.Constant) and value.value is False):
                missing.append(f"{path.relative_to(ROOT)}:{call.lineno}")
            checked += 1
    assert not missing, f"ArgumentParser without allow_abbrev=False: {', '.join(missing)}"
    assert checked >= 15
