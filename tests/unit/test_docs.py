"""The README and the docs pages: every command they show is run by a test, or named as untested.

A command is an entry point found in a fenced code block of README.md or docs/*.md
(`pretrain_rlp.py`, `tools/X.py|sh`, `examples/...sh|py`, `make TARGET`). It counts as run by a
test when its path appears in a test file or in `.ci/run` (tests name the scripts they start).
Otherwise it must be listed in UNTESTED with the reason, so a new page cannot show a command
that nothing exercises without saying so. The links between pages must resolve too.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
ENTRY = re.compile(r"(pretrain_rlp\.py|tools/[\w_]+\.(?:py|sh)|examples/[\w/]+\.(?:sh|py)"
                   r"|\bmake [a-z]+)")

# Shown in the docs but run by no test here, and why.
UNTESTED = {
    "make demo": "the demo is CI's own start-up check (README); its figures are from a real run",
    "examples/tiny_hybrid_cpu.sh": "a 2-rank training run of the tiny hybrid; the same config "
                                   "runs in tests/e2e (tiny_hybrid_cpu.yaml)",
    "tools/lm_eval_rlp.py": "a thin CLI over megatron_rlp/eval/lm_eval_adapter.py, which "
                            "tests/unit/test_eval_*.py and tests/e2e/test_evaluate.py run",
    "tools/bench_packed_attention.py": "a benchmark (its figures are in docs/performance.md)",
    "tools/bench_decode.py": "a benchmark (its figures are in docs/performance.md); the "
                             "equality it checks is tests/unit/test_compiled_decode.py's",
    "tools/bench_compiled_update.py": "a benchmark (its figures are in docs/performance.md); "
                                      "the equality is tests/unit/test_compiled_update.py's",
}


def _commands() -> dict[str, set[str]]:
    """Entry point -> the pages whose code blocks show it."""
    found: dict[str, set[str]] = {}
    for page in PAGES:
        in_code = False
        for line in page.read_text(encoding="utf-8").splitlines():
            if line.lstrip().startswith("```"):
                in_code = not in_code
                continue
            if in_code:
                for entry in ENTRY.findall(line):
                    found.setdefault(entry, set()).add(page.name)
    return found


def _test_text() -> str:
    files = [*(ROOT / "tests").glob("**/*.py"), ROOT / ".ci" / "run"]
    return "\n".join(p.read_text(encoding="utf-8") for p in files
                     if p.name != Path(__file__).name)


def _missing(commands: dict[str, set[str]], tests: str) -> dict[str, list[str]]:
    return {cmd: sorted(pages) for cmd, pages in commands.items()
            if cmd not in tests and cmd not in UNTESTED}


def test_every_documented_command_is_tested_or_named_untested():
    commands = _commands()
    assert "pretrain_rlp.py" in commands, "the docs show no training command at all"
    missing = _missing(commands, _test_text())
    assert not missing, f"commands shown in the docs that no test runs (add a test or an " \
                        f"UNTESTED entry with the reason): {missing}"
    stale = sorted(set(UNTESTED) - set(commands))
    assert not stale, f"UNTESTED names commands no page shows any more: {stale}"


def test_documented_scripts_exist():
    for cmd, pages in _commands().items():
        if not cmd.startswith("make "):
            assert (ROOT / cmd).is_file(), f"{sorted(pages)} show {cmd}, which does not exist"


def test_readme_is_a_front_door_and_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 320
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_planted_untested_command_is_caught(tmp_path, monkeypatch):
    """The check is not vacuous: a page showing a script no test names fails it."""
    page = tmp_path / "new.md"
    page.write_text("```bash\npython tools/never_tested_tool.py --x\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "PAGES", [*PAGES, page])
    assert _missing(_commands(), _test_text()) == {"tools/never_tested_tool.py": ["new.md"]}
