"""The runtime never imports research code.

vql.research (training data, training, the evaluation grid, the baselines) may import the
runtime model, never the other way round: the worker, serving and replay must run, and
start, without the training data module and its dependencies. Two checks: a static one over
every runtime module's imports, and the modules a fresh interpreter loads for the worker and
serving.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_FOLDERS = ("schemas", "model", "streams", "serving")
# The CLI is the one runtime-folder module allowed to reach research code: its train and
# evaluate commands are research entry points, and nothing the worker runs imports it.
CLI_MODULES = {Path("streams/cli.py")}
RESEARCH = "vql.research"


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a source file imports, at any depth (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_runtime_module_imports_research_code() -> None:
    offenders = []
    for folder in RUNTIME_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT)
            if relative in CLI_MODULES:
                continue
            bad = {m for m in imported_modules(path) if m == RESEARCH or m.startswith(RESEARCH + ".")}
            if bad:
                offenders.append(f"{relative}: {sorted(bad)}")
    assert not offenders, "runtime modules import research code:\n" + "\n".join(offenders)


def test_the_worker_and_serving_load_no_research_module() -> None:
    code = (
        "import sys\n"
        "import vql.streams.worker, vql.streams.app, vql.streams.processor, vql.streams.replay, vql.streams.replay_files\n"
        "import vql.serving.client, vql.serving.service, vql.serving.http\n"
        "import vql.model.encoder, vql.model.scoring, vql.model.state\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('vql.research'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
