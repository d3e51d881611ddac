"""The rooms of DESIGN: what each top-level package may import from the others."""
import ast

import pytest

from conftest import REPO

MAY_IMPORT = {
    "kernels": set(),
    "cluster": set(),
    "serve_apps": {"kernels", "cluster"},
    "jobs": {"kernels", "cluster", "serve_apps"},
}


def project_imports(path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            root = name.split(".")[0]
            if root in MAY_IMPORT:
                yield node.lineno, root


@pytest.mark.parametrize("package", MAY_IMPORT)
def test_package_imports_only_what_its_room_allows(package):
    broken = [
        f"{path.relative_to(REPO)}:{line} imports {root}"
        for path in sorted((REPO / package).rglob("*.py"))
        for line, root in project_imports(path)
        if root != package and root not in MAY_IMPORT[package]
    ]
    assert not broken, "\n".join(broken)
