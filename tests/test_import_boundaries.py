"""Who may import whom: the edge talks to the actors through messages and the schemas in
protocols/, not through the actors' code (issue 12). Read from the source with `ast`, so an
import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent

# What edge/ may take from actors/: the plumbing of joining the actor system, never an
# actor's logic or schema. module -> the names that may be imported from it.
EDGE_MAY_IMPORT = {
    "actors.addressing": {"*"},  # actor addresses as "host:port" strings (bridge)
    "actors.secret": {"*"},  # the cluster secret this process holds (app)
    "actors.secret_file": {"*"},  # the admin CLI reads the gateway's secret file
    "actors.system": {"*"},  # joining the actor system with authenticated frames (admin CLI)
    "actors.supervisor": {"SupervisorActor"},  # Thespian's createActor(globalName=...) needs the class
}


def imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) for every import in `path`; name "*" for `import module`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, "*") for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                # `from actors import system` imports the module actors.system
                out.append(
                    (f"{node.module}.{alias.name}", "*")
                    if node.module in ("actors", "edge", "sim")
                    else (node.module, alias.name)
                )
    return out


def actor_imports_not_allowed(path: Path) -> list[str]:
    wrong = []
    for module, name in imports(path):
        if module != "actors" and not module.startswith("actors."):
            continue
        allowed = EDGE_MAY_IMPORT.get(module, set())
        if "*" not in allowed and name not in allowed:
            wrong.append(f"{path.name}: {module} {name}")
    return wrong


def test_the_edge_imports_no_actor_code_beyond_the_plumbing():
    wrong = [w for path in sorted((ROOT / "edge").glob("*.py")) for w in actor_imports_not_allowed(path)]
    assert not wrong, "edge/ imports actor code (use protocols/ for schemas, role names, validation):\n" + "\n".join(
        wrong
    )


def test_protocols_import_nothing_above_them():
    wrong = [
        f"{path.relative_to(ROOT)}: {module}"
        for path in sorted((ROOT / "protocols").rglob("*.py"))
        for module, _ in imports(path)
        if module.split(".")[0] in ("actors", "edge", "sim", "bench", "scripts", "run")
    ]
    assert not wrong, "protocols/ is the bottom layer:\n" + "\n".join(wrong)


def test_the_checker_sees_a_forbidden_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import actors.alerts\n"
        "def f():\n    from actors.pacer_logic import PacerSettings\n    from actors import system\n"
        "    from actors.supervisor import SUPERVISOR_NAME, SupervisorActor\n"
    )
    assert actor_imports_not_allowed(sample) == [
        "sample.py: actors.alerts *",
        "sample.py: actors.pacer_logic PacerSettings",
        "sample.py: actors.supervisor SUPERVISOR_NAME",
    ]
