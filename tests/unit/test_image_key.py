"""The guest image's cache key: the recipe's data, per distro, not the file's bytes."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

IMAGE_PY = Path(__file__).resolve().parents[1] / "vm" / "image.py"


@pytest.fixture()
def image():
    spec = importlib.util.spec_from_file_location("guest_image", IMAGE_PY)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["guest_image"] = mod
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules["guest_image"]


def test_each_distro_has_its_own_key(image):
    keys = {name: image.recipe_hash(name) for name in image.DISTROS}
    assert len(set(keys.values())) == len(keys)
    assert all(len(k) == 16 for k in keys.values())


def test_a_new_distro_leaves_the_others_keys_alone(image, monkeypatch):
    before = {name: image.recipe_hash(name) for name in image.DISTROS}
    more = dict(image.DISTROS, sid=image.Distro(suite="sid", kernel_suite="sid"))
    monkeypatch.setattr(image, "DISTROS", more)
    assert {name: image.recipe_hash(name) for name in before} == before


def test_the_recipe_changes_the_key(image, monkeypatch):
    before = image.recipe_hash("bookworm")
    monkeypatch.setattr(image, "APT_PACKAGES", (*image.APT_PACKAGES, "strace"))
    assert image.recipe_hash("bookworm") != before
    monkeypatch.undo()
    entry = dataclasses.replace(image.DISTROS["bookworm"], packages=("strace",))
    monkeypatch.setitem(image.DISTROS, "bookworm", entry)
    assert image.recipe_hash("bookworm") != before
    monkeypatch.undo()
    monkeypatch.setattr(image, "RECIPE", image.RECIPE + 1)
    assert image.recipe_hash("bookworm") != before


def test_comments_are_not_the_recipe(image, tmp_path):
    src = IMAGE_PY.read_text()
    edited = tmp_path / "image.py"
    edited.write_text(src.replace("# One entry per bootable guest", "# One entry per guest we boot", 1))
    spec = importlib.util.spec_from_file_location("guest_image_edited", edited)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["guest_image_edited"] = mod
    try:
        spec.loader.exec_module(mod)
        assert mod.recipe_hash("trixie") == image.recipe_hash("trixie")
    finally:
        del sys.modules["guest_image_edited"]
