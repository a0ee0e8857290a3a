"""Flags generated from a config dataclass: one per field, typed, with its help; a new field is a new flag."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fewstep.commands.common import command, dataclass_flags, dataclass_values, emit, with_signature
from fewstep.errors import FewstepError


@dataclass
class Toy:
    name: str = field(default="a", metadata={"help": "A name."})
    count: int | None = field(default=None, metadata={"help": "How many."})
    rate: float = field(default=0.5, metadata={"help": "A rate."})
    on: bool = field(default=True, metadata={"help": "Switch."})
    out: str | None = field(default=None, metadata={"help": "Where.", "cli": "path"})
    steps: list[int] | None = field(default=None, metadata={"help": "Step counts.", "cli": "int_list"})
    extra: dict = field(default_factory=dict, metadata={"help": "Not a flag.", "cli": "none"})


def app_for(cls, seen: dict) -> typer.Typer:
    app = typer.Typer(rich_markup_mode=None)

    def run(**flags):
        seen.update(dataclass_values(cls, flags))
        emit(seen, True, "")

    app.command()(command(with_signature(run, dataclass_flags(cls))))

    @app.callback()
    def _main():
        pass

    return app


def test_every_field_but_the_skipped_one_is_a_typed_flag():
    names = [p.name for p in dataclass_flags(Toy)]
    assert names == [f.name for f in dataclasses.fields(Toy) if f.name != "extra"]
    seen: dict = {}
    r = CliRunner().invoke(app_for(Toy, seen), ["run", "--count", "3", "--rate", "1e-3", "--no-on", "--out", "x/y",
                                                "--steps", "1,2, 4"])
    assert r.exit_code == 0, r.output
    assert seen == {"count": 3, "rate": 1e-3, "on": False, "out": "x/y", "steps": [1, 2, 4]}
    assert isinstance(seen["out"], str)
    seen.clear()
    r = CliRunner().invoke(app_for(Toy, seen), ["run"])
    assert r.exit_code == 0 and seen == {}  # flags left out leave the config's own values
    r = CliRunner().invoke(app_for(Toy, {}), ["run", "--help"])
    assert "How many." in r.output and "--on / --no-on" in r.output and "--extra" not in r.output


def test_a_bad_list_is_a_one_line_error():
    with pytest.raises(FewstepError, match="--steps must be comma-separated integers, got '1,x'"):
        dataclass_values(Toy, {"steps": "1,x"})


def test_a_new_config_field_becomes_a_distill_flag():
    from fewstep.commands.distill import distill_parameters
    from fewstep.training.config import DistillConfig

    names = [p.name for p in distill_parameters()]
    fields = [f.name for f in dataclasses.fields(DistillConfig) if f.name != "options"]
    assert [n for n in names if n in fields] == fields
    assert names[names.index("out") + 1:names.index("out") + 3] == ["config", "resume"]
    assert names[-3:] == ["mode", "opt", "as_json"]  # sCM's own flag, from its cli_options

    @dataclass
    class Grown(DistillConfig):
        new_knob: float | None = field(default=None, metadata={"help": "A knob added later."})

    assert [p.name for p in dataclass_flags(Grown)][-1] == "new_knob"
    assert dataclass_values(Grown, {"new_knob": 0.25, "out": Path("r")}) == {"new_knob": 0.25, "out": "r"}


def test_distill_help_shows_every_fields_help_with_its_default():
    from typer.testing import CliRunner

    from fewstep.cli import app
    from fewstep.commands.common import flag_help
    from fewstep.training.config import DistillConfig

    r = CliRunner().invoke(app, ["distill", "--help"], terminal_width=400)
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    for f in dataclasses.fields(DistillConfig):
        if f.name != "options":
            assert " ".join(flag_help(f).split()) in text, f.name
    assert "Linear LR warm-up iterations (default 100)." in text and "Final quality table (default on)." in text
    assert "Max gradient norm per network, 0 = off (default 1)." in text


def test_a_method_flag_that_would_shadow_another_flag_is_left_to_opt(monkeypatch):
    from fewstep.commands.distill import distill_parameters, method_flags
    from fewstep.methods import get_method

    scm = get_method("scm")
    monkeypatch.setattr(scm, "cli_options", {**scm.cli_options, "seed": "clash", "resume": "clash",
                                             "tangent_c": "sCM's tangent c"})
    flags = method_flags()
    assert "seed" not in flags and "resume" not in flags and flags["tangent_c"] == "sCM's tangent c"
    names = [p.name for p in distill_parameters()]
    assert len(names) == len(set(names)) and "tangent_c" in names
