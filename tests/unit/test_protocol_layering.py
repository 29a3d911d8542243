"""chatserver.protocol is sans-I/O: standard library only, and none of its I/O parts."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import chatserver.protocol

PACKAGE_DIR = Path(chatserver.protocol.__file__).resolve().parent
ROOT = PACKAGE_DIR.parents[1]  # the directory holding the chatserver package

# Modules whose presence would mean I/O, concurrency, clocks, logging or storage.
FORBIDDEN = {
    "socket", "_socket", "ssl", "select", "selectors", "asyncio", "threading",
    "concurrent", "multiprocessing", "logging", "sqlite3", "_sqlite3", "sqlalchemy",
    "datetime", "subprocess", "click",
}
# What the package's own source may import (besides its own modules).
ALLOWED_IMPORTS = {
    "__future__", "collections", "dataclasses", "enum", "operator", "struct", "typing",
}


def test_importing_the_protocol_pulls_in_no_io_and_no_other_chatserver_module():
    # -I -S: a bare interpreter, so that site hooks (.pth files) add nothing to the baseline.
    code = (
        "import sys, json\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "before = set(sys.modules)\n"
        "import chatserver.protocol\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                         text=True, check=True, timeout=60)
    new = set(json.loads(out.stdout))
    assert "chatserver.protocol" in new
    top_level = {name.split(".")[0] for name in new}
    assert not top_level & FORBIDDEN, sorted(top_level & FORBIDDEN)
    ours = {name for name in new if name.split(".")[0] == "chatserver"}
    assert all(name == "chatserver" or name.startswith("chatserver.protocol") for name in ours), (
        sorted(ours)
    )


def test_the_source_imports_only_the_standard_modules_it_needs():
    # Catches imports a runtime check would miss: inside functions, or behind conditions.
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module.split(".")[0]]
            else:
                continue
            assert set(names) <= ALLOWED_IMPORTS, f"{path.name}:{node.lineno} imports {names}"
