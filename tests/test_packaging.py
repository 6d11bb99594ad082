"""The wheel holds the whole package: every sub-package of transformer/ and the recipes of
configs/ (installed as transformer.configs) are listed in pyproject.toml."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_of_the_tree_is_in_the_wheel():
  settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
  listed = set(settings["packages"])
  on_disk = {
    ".".join(init.parent.relative_to(ROOT).parts)
    for init in (ROOT / "transformer").rglob("__init__.py")
  }
  assert (ROOT / "configs" / "__init__.py").is_file()
  assert settings["package-dir"] == {"transformer.configs": "configs"}
  assert listed == on_disk | {"transformer.configs"}
