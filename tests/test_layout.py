"""The README's layout picture names every folder of the tree and every module of the
product packages (issue 12: "the README's architecture picture matches the folders"), so a
new module is placed in the picture when it is added. Read from the files; nothing runs."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.unit

PACKAGES = ("actors", "edge", "protocols", "sim")


def layout() -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"^## Layout\n\n```\n(.*?)^```", text, re.S | re.M)
    assert found, "README.md has no '## Layout' picture"
    return found.group(1)


def tracked_top_folders() -> set[str]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return {name.split("/")[0] for name in names if "/" in name}


def test_every_top_folder_is_in_the_picture():
    picture = layout()
    described = set(re.findall(r"^([.\w]+)/", picture, re.M)) | {".github"}  # named on .ci/run's line
    missing = sorted(tracked_top_folders() - described)
    assert not missing, f"README.md's Layout does not describe {', '.join(missing)}: give each a line"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_of_a_product_package_is_named(package):
    words = set(re.findall(r"\w+", layout()))
    missing = [
        path.stem
        for path in sorted((ROOT / package).glob("*.py"))
        if not path.stem.startswith("__") and not path.stem.endswith("_logic") and path.stem not in words
    ]
    assert not missing, f"README.md's Layout does not place {package}/{', '.join(missing)}: add it to {package}/'s line"
