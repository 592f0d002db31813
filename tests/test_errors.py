"""The exit-code table: README.md, edgeft/errors.py and the modules that raise must agree."""

import re
from pathlib import Path

import pytest

import edgeft.errors as errors

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_table() -> dict[int, str]:
    text = README.read_text(encoding="utf-8")
    start = text.index("| exit code | meaning |")
    table = {}
    for line in text[start:].splitlines()[2:]:
        m = re.fullmatch(r"\|\s*(\d+)\s*\|\s*(.+?)\s*\|", line.strip())
        if not m:
            break
        table[int(m.group(1))] = m.group(2)
    return table


def docstring_table() -> dict[int, tuple[list[str], str]]:
    """errors.py's table: code -> (class names, meaning)."""
    rows = re.findall(r"^\| (\d+) \|([\w, ]*)\| (.+) \|$", errors.__doc__, re.M)
    return {int(code): ([n.strip() for n in names.split(",") if n.strip()], meaning) for code, names, meaning in rows}


def test_readme_and_errors_agree():
    readme = readme_table()
    assert sorted(readme) == list(range(14)), readme  # 0..13, no gaps, no duplicates
    codes = errors.exit_codes()
    assert sorted(codes) == sorted(set(readme) - {0}), "every non-zero README code has its error class in errors.py, and no other"
    doc = docstring_table()
    assert {c: names for c, (names, _) in doc.items()} == {0: [], **{c: [k.__name__ for k in ks] for c, ks in codes.items()}}
    for code, (_, meaning) in doc.items():  # errors.py says what README says (README may add examples after it)
        assert readme[code].startswith(meaning), (code, meaning, readme[code])


@pytest.mark.parametrize("module, name", [
    ("edgeft.bundle", "BundleError"), ("edgeft.plan", "PlanError"), ("edgeft.workstation.preflight", "ExportError"),
    ("edgeft.device.state", "StateError"), ("edgeft.device.runtime", "RuntimeMismatch"), ("edgeft.device.trainer", "TrainingDiverged"),
])
def test_old_homes_reexport_the_one_class(module, name):
    import importlib

    assert getattr(importlib.import_module(module), name) is getattr(errors, name)


def test_no_exit_code_defined_outside_errors_py():
    root = Path(errors.__file__).parent
    stray = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py") if p.name != "errors.py"
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"^\s*exit_code\s*=\s*\d|sys\.exit\(\d", line)]
    assert not stray, f"exit codes belong in edgeft/errors.py: {stray}"
