"""Version pins: setup.py gives compatible ranges (an NGC container's torch is kept, newer
transformers/tokenizers allowed), constraints.txt the exact versions, and the README's two
commands (`make demo`, `make test` through the Makefile) install with those constraints, so
a fresh clone still gets the versions the tests ran with."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _setup_requirements() -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords
          if k.arg in ("install_requires", "extras_require")}
    return ([Requirement(r) for r in kw["install_requires"]],
            {e: [Requirement(r) for r in rs] for e, rs in kw["extras_require"].items()})


def _constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[\w.+-]+", version), f"not an exact pin: {line}"
            assert canonicalize_name(name) not in pins, f"pinned twice: {name}"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_setup_py_has_ranges_and_constraints_pin_every_requirement_inside_them():
    install, extras = _setup_requirements()
    pins = _constraints()
    for req in install:  # no exact pin in what `pip install -e .` must satisfy
        assert not any(s.operator in ("==", "===") for s in req.specifier), str(req)
    for name in ("torch", "tokenizers"):
        assert any(canonicalize_name(r.name) == name and r.specifier for r in install), name
    for req in install + [r for e, rs in extras.items() if e != "gpu" for r in rs]:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} has no exact version in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (str(req), pins[name])
    # a newer transformers' tokenizers and an NGC-style torch build satisfy the package
    tok = next(r for r in install if r.name == "tokenizers")
    torch = next(r for r in install if r.name == "torch")
    assert tok.specifier.contains("0.23.0") and torch.specifier.contains("2.8.0a0",
                                                                        prereleases=True)


def test_the_makefile_installs_with_the_constraints():
    make = (ROOT / "Makefile").read_text()
    installs = [line for line in make.splitlines() if "pip install" in line
                and "--upgrade pip" not in line]
    # the package (demo), its dev extra (test), then the kernel tests' mamba-ssm and its
    # build tools
    assert len(installs) == 4, installs
    assert all("-c constraints.txt" in line for line in installs), installs
    stamp = re.search(r"^\$\(STAMP\):(.*)$", make, re.M)
    assert stamp and "constraints.txt" in stamp.group(1)  # a new pin reinstalls
