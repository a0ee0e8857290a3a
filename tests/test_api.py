"""The API is the entrance of every command: the listings, and `train_teacher`'s refusal to overwrite."""

from __future__ import annotations

import pytest

import fewstep
from fewstep.errors import FewstepError


def test_listings_name_every_method_and_built_in_teacher():
    from fewstep.methods import available_methods
    from fewstep.teachers import BUILTIN_TEACHERS

    methods = fewstep.list_methods()
    assert [m["name"] for m in methods] == available_methods()
    scm = next(m for m in methods if m["name"] == "scm")
    assert scm["options"]["mode"] == "distill" and "sCM" in scm["description"]
    teachers = fewstep.list_teachers()
    assert [t["name"] for t in teachers] == list(BUILTIN_TEACHERS)
    digits = next(t for t in teachers if t["name"] == "digits")
    assert digits["conditioning"] == "class" and digits["shape"] == [1, 8, 8] and digits["params"] > 100_000


def test_train_teacher_refuses_an_existing_directory_before_training(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "keep.txt").write_text("mine")
    with pytest.raises(FewstepError, match=r"--out '.*t' already exists; choose a new path"):
        fewstep.train_teacher("toy:moons", tmp_path / "t", iters=1)
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["keep.txt"]
