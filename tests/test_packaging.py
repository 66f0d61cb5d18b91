"""The installable package: pyproject.toml's dependencies and console scripts, the license and citation, and
the entry points' config lookup."""

import importlib
import tomllib
from pathlib import Path

import yaml

from fellrec_jax.run import entry

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement_lines(path):
  lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
  return [line for line in lines if line and not line.startswith("-r")]


def test_dependencies_are_requirements_txt():
  assert PYPROJECT["dependencies"] == requirement_lines(ROOT / "requirements.txt")


def test_requires_python_is_what_the_dependencies_need():
  assert PYPROJECT["requires-python"] == ">=3.11"
  from importlib.metadata import metadata
  for name in ("jax", "jaxlib", "flax", "numpy"):
    assert metadata(name)["Requires-Python"].replace(".0", "") == ">=3.11", name


def test_console_scripts_name_functions_of_the_package():
  scripts = PYPROJECT["scripts"]
  assert set(scripts) == {"fellrec-train", "fellrec-evaluate", "fellrec-compare", "fellrec-prepare-data"}
  for target in scripts.values():
    module, _, function = target.partition(":")
    assert module.startswith("fellrec_jax.") and callable(getattr(importlib.import_module(module), function))


def test_scripts_of_a_checkout_are_thin_wrappers_of_the_entry_points():
  for script, function in [("experiments/train.py", "entry.train()"), ("experiments/evaluate.py", "entry.evaluate()"),
                           ("experiments/compare.py", "entry.compare()"),
                           ("tools/prepare_data.py", "import prepare_data as main")]:
    text = (ROOT / script).read_text()
    assert function in text and "DEFINE_" not in text and "argparse" not in text, script


def test_license_is_the_full_apache_2_text():
  text = (ROOT / "LICENSE").read_text()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
  assert "9. Accepting Warranty or Additional Liability." in text and "END OF TERMS AND CONDITIONS" in text
  assert PYPROJECT["license"] == "Apache-2.0"


def test_citation_names_the_paper():
  cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
  assert cff["cff-version"] == "1.2.0" and cff["type"] == "software" and cff["license"] == "Apache-2.0"
  paper = cff["preferred-citation"]
  assert paper["title"] == "A Federated Framework for LLM-based Recommendation" and paper["year"] == 2025
  assert [a["family-names"] for a in paper["authors"]] == ["Zhao", "Wang", "Xu", "Ng", "Chua"]
  assert "NAACL 2025" in paper["collection-title"]
  assert {"type": "other", "value": "arXiv:2402.09959", "description": "The arXiv preprint"} in paper["identifiers"]


def test_configs_import_from_the_folder_above_the_config_file(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert entry.config_import_path(["prog"]) == tmp_path  # the default configs/default.py, relative to the cwd
  assert entry.config_import_path(["prog", "--config=configs/games.py:smoke"]) == tmp_path
  assert entry.config_import_path(["prog", "--config", "/x/y/configs/a.py", "--workdir=w"]) == Path("/x/y")
