"""testbed.build.images: the image's cache key and its mmdebstrap command (pure parts)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from testbed.build import images
from testbed.settings import Settings


def test_mmdebstrap_builds_minbase_with_our_packages_and_no_docs(tmp_path: Path):
    cmd = images.mmdebstrap_command(Settings(), ["netperf", "ethtool"], tmp_path / "root")
    assert cmd[:3] == ["mmdebstrap", "--variant=minbase", "--mode=root"]
    assert "--include=netperf,ethtool" in cmd
    assert "--dpkgopt=path-exclude=/usr/share/doc/*" in cmd
    assert cmd[-3:] == ["bookworm", str(tmp_path / "root"), "http://deb.debian.org/debian"]


def test_the_key_follows_the_recipe_and_the_suite(tmp_path: Path, monkeypatch):
    recipe, tools = tmp_path / "rootfs", tmp_path / "tools"
    recipe.mkdir()
    tools.mkdir()
    (recipe / "packages.txt").write_text("netperf  # the load\n\nethtool\n")
    monkeypatch.setattr(images, "RECIPE_DIR", recipe)
    monkeypatch.setattr(images, "TOOLS_DIR", tools)
    monkeypatch.setattr(images, "IMAGES_DIR", tmp_path)
    s = Settings()
    key = images.recipe_key(s)
    assert images.recipe_key(s) == key and len(key) == 16
    assert images.read_package_list(recipe / "packages.txt") == ["netperf", "ethtool"]
    (tools / "nbmark.c").write_text("int main(void) { return 0; }\n")
    with_tool = images.recipe_key(s)
    assert with_tool != key
    assert images.recipe_key(replace(s, debian_suite="trixie")) != with_tool
