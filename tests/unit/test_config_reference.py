"""docs/config_reference.md is generated from the config classes (tools/gen_config_reference.py):
the committed page equals the generated one, every field of every section has a docstring, and a
planted change to a section (a new field) or a field without a docstring is caught."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import textwrap
from dataclasses import dataclass

import pytest

from megatron_rlp.config import RunConfig, TrainConfig
from tools import gen_config_reference as gen


def test_committed_page_is_the_generated_one():
    diff = gen.stale_diff()
    assert not diff, (f"{gen.PAGE.name} is stale; run `{gen.COMMAND}` and commit it:\n"
                      + "\n".join(diff[:40]))


def test_every_field_of_every_section_has_a_docstring():
    secs = gen.sections()
    assert list(secs) == [f.name for f in dataclasses.fields(RunConfig)]
    assert gen.missing_docstrings(secs) == [], (
        f"config fields without a docstring: {gen.missing_docstrings(secs)}; {gen.FIX}")


def test_page_lists_every_key_with_its_real_default_in_field_order():
    page = gen.PAGE.read_text(encoding="utf-8")
    for name, cls in gen.sections().items():
        rows = [line for line in page.splitlines() if line.startswith(f"| `{name}.")]
        keys = [row.split("`")[1] for row in rows]
        assert keys == [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
    row = next(line for line in page.splitlines() if line.startswith("| `rlp.group_size`"))
    assert f"| `{RunConfig().rlp.group_size}` |" in row


def _planted_module(tmp_path, monkeypatch, body: str):
    """A module on disk holding `class Planted(TrainConfig)` with `body` (ast needs a source)."""
    path = tmp_path / "planted_section.py"
    path.write_text("from dataclasses import dataclass\n"
                    "from megatron_rlp.config import TrainConfig\n\n\n"
                    "@dataclass(kw_only=True)\n"
                    "class Planted(TrainConfig):\n"
                    '    """A planted section."""\n\n' + textwrap.indent(body, "    "))
    spec = importlib.util.spec_from_file_location("planted_section", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "planted_section", module)
    spec.loader.exec_module(module)
    return module.Planted


def test_planted_new_field_makes_the_page_stale(tmp_path, monkeypatch):
    planted = _planted_module(tmp_path, monkeypatch,
                              'planted_knob: int = 3\n"""A knob no page lists yet."""\n')
    secs = {**gen.sections(), "train": planted}
    diff = gen.stale_diff(secs=secs)
    assert any("train.planted_knob" in line and line.startswith("+") for line in diff)
    assert "A knob no page lists yet." in gen.render(secs)
    # --check exits 1 on a stale page, 0 on the committed one.
    stale = tmp_path / "config_reference.md"
    stale.write_text(gen.PAGE.read_text(encoding="utf-8").replace("`1234`", "`4321`"))
    assert gen.main(["--check", "--out", str(stale)]) == 1
    assert gen.main(["--check"]) == 0


def test_planted_field_without_docstring_is_named_with_the_fix(tmp_path, monkeypatch):
    planted = _planted_module(tmp_path, monkeypatch,
                              "# a comment is not a docstring\nundocumented_knob: int = 0\n")
    secs = {**gen.sections(), "train": planted}
    assert gen.missing_docstrings(secs) == ["train.undocumented_knob"]
    with pytest.raises(gen.MissingDocstring) as err:
        gen.render(secs)
    assert "train.undocumented_knob" in str(err.value)
    assert "add a docstring under the field, then run python tools/gen_config_reference.py" \
        in str(err.value)


def test_inherited_fields_keep_their_docstrings():
    @dataclass(kw_only=True)
    class Sub(TrainConfig):  # no new field: every docstring comes from TrainConfig's source
        pass

    assert gen.field_docstrings(Sub) == gen.field_docstrings(TrainConfig)
