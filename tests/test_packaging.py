"""pyproject.toml lists packages one by one (patterns/ and runtime/ install under adp_pass.*):
every source directory with an __init__.py must be one of them, or a wheel install lacks it."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_source_package_is_in_the_wheel():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    dirs = config["package-dir"]
    assert listed == set(dirs), "packages and package-dir must name the same packages"
    found = set()
    for package, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *relative)))
    assert found - listed == set(), f"add to pyproject.toml's packages: {sorted(found - listed)}"
