"""Packaging lives in setup.cfg; this only adds the recipes, shipped in the wheel as `hf_datasel/recipes/`.

(setup.cfg's `packages = find:` cannot add a package from another folder; `hf-datasel record`
runs `hf_datasel/recipes/record_warmup.py` from an installed wheel, `recipes/` from a checkout.)
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["hf_datasel", "hf_datasel.*"]), "hf_datasel.recipes"],
    package_dir={"hf_datasel.recipes": "recipes"},
)
