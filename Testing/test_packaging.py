"""Static checks of the Slicer extension: .ui file, CMake lists, extension descriptions, icons.

Rules checked here were read in Slicer's source: slicerMacroBuildScriptedModule fails on a listed
file that does not exist (CMake/SlicerMacroBuildScriptedModule.cmake); parameterNodeWrapper binds
widgets whose ``SlicerParameterName`` property names a field, with one connector per widget class
(Base/Python/slicer/parameterNodeWrapper/guiConnectors.py); ScriptedLoadableModule takes the icon
from Resources/Icons/<ModuleName>.png and runTest looks up <ModuleName>Test; the .s4ext keys come from
Utilities/Templates/Extensions/extension_description.s4ext.in and the ExtensionsIndex check script,
the .json keys from ExtensionsIndex schemas/slicer-extension-catalog-entry-schema-v1.0.2.json.
"""

import ast
import json
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "RefNetSegmentRefine"
MODULE_PY = MODULE_DIR / "RefNetSegmentRefine.py"
LOGIC_PY = MODULE_DIR / "RefNetSegmentRefineLib" / "logic.py"  # the parameter node and the Logic
UI_FILE = MODULE_DIR / "Resources" / "UI" / "RefNetSegmentRefine.ui"
DEFAULT_MODEL = "refnet/weights/refnet_phantom.pt"  # produced by `refnet demo`; listed before it exists

# parameterNodeWrapper connectors: field type -> widget classes that can represent it
CONNECTORS = {
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton", "ctkCheckablePushButton"},
    "pathlib.Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "Device": {"QComboBox", "ctkComboBox"},  # an Enum
    "vtkMRMLSegmentationNode": {"qMRMLNodeComboBox"},
    "vtkMRMLScalarVolumeNode": {"qMRMLNodeComboBox"},
}


def _ui_widgets():
    root = ET.parse(UI_FILE).getroot()
    return root, {w.get("name"): w for w in root.iter("widget")}


def _prop(widget, name):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return prop
    return None


def _parameter_fields():
    tree = ast.parse(LOGIC_PY.read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RefNetSegmentRefineParameterNode"]
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


# ------------------------------------------------------------------------------------------ .ui


def test_ui_parses_and_names_are_unique():
    root, _ = _ui_widgets()
    assert root.tag == "ui"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "RefNetSegmentRefine"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names))


def test_every_widget_the_code_uses_exists_in_the_ui():
    _, widgets = _ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_PY.read_text()))
    assert used, "the module uses no ui widget?"
    assert sorted(used - set(widgets)) == []


def test_parameter_node_fields_are_bound_to_fitting_widgets():
    _, widgets = _ui_widgets()
    fields = _parameter_fields()
    bound = {}
    for name, widget in widgets.items():
        prop = _prop(widget, "SlicerParameterName")
        if prop is not None:
            assert prop.get("stdset") == "0", f"{name}: SlicerParameterName must be a dynamic property"
            bound[prop.findtext("string")] = widget
    assert set(bound) == set(fields)  # every field shown, nothing bound to a missing field
    for field, annotation in fields.items():
        widget = bound[field]
        assert widget.get("class") in CONNECTORS[annotation], (field, widget.get("class"))
        if widget.get("class") == "qMRMLNodeComboBox":
            node_types = [s.text for s in _prop(widget, "nodeTypes").iter("string")]
            assert node_types == [annotation]


def test_custom_widgets_are_declared():
    root, widgets = _ui_widgets()
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in widgets.values() if not w.get("class").startswith("Q")}
    assert used <= declared


def test_mrml_selectors_get_the_scene():
    root, widgets = _ui_widgets()
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("slot").startswith("setMRMLScene")}
    selectors = {n for n, w in widgets.items() if w.get("class") == "qMRMLNodeComboBox"}
    assert selectors and selectors <= receivers


# ------------------------------------------------------------------------------------------ module CMakeLists


def _cmake_list(text, variable):
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not set"
    return [item.replace("${MODULE_NAME}", "RefNetSegmentRefine") for item in match.group(1).split()]


def _listed():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    return _cmake_list(text, "MODULE_PYTHON_SCRIPTS"), _cmake_list(text, "MODULE_PYTHON_RESOURCES")


def _module_files():
    """Files of the module folder that belong in the source tree (build and install artefacts left out)."""
    skip = {"CMakeLists.txt"}
    for path in MODULE_DIR.rglob("*"):
        rel = path.relative_to(MODULE_DIR).as_posix()
        generated = "__pycache__" in path.parts or any(p.endswith(".egg-info") for p in path.parts)
        if path.is_file() and not generated and not path.name.endswith(".pyc") and rel not in skip:
            if not any(part.startswith(".") for part in path.relative_to(MODULE_DIR).parts):
                yield rel


def test_every_module_file_is_listed_in_cmake():
    scripts, resources = _listed()
    missing = sorted(set(_module_files()) - set(scripts) - set(resources))
    assert missing == [], f"add these to RefNetSegmentRefine/CMakeLists.txt: {missing}"


def test_python_files_are_scripts_and_the_rest_resources():
    scripts, resources = _listed()
    assert all(s.endswith(".py") for s in scripts)
    assert scripts[0] == "RefNetSegmentRefine.py"
    for required in ("Resources/Icons/RefNetSegmentRefine.png", "Resources/UI/RefNetSegmentRefine.ui",
                     "Resources/requirements.txt", "Scripts/RefNetBatchRefine.py", DEFAULT_MODEL):
        assert required in resources
    assert len(scripts + resources) == len(set(scripts + resources))


def test_every_listed_file_exists():
    """slicerMacroBuildScriptedModule stops the configure on a listed file that does not exist."""
    scripts, resources = _listed()
    missing = [f for f in scripts + resources if f != DEFAULT_MODEL and not (MODULE_DIR / f).is_file()]
    assert missing == []


def test_default_model_exists():
    if not (MODULE_DIR / DEFAULT_MODEL).is_file():
        pytest.skip(f"{DEFAULT_MODEL} is listed in CMake but not produced yet (refnet demo); "
                    "the extension build fails until it exists")


def test_module_cmake_builds_a_scripted_module_with_its_test():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "set(MODULE_NAME RefNetSegmentRefine)" in text
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}", text)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_module_classes_follow_slicer_names():
    tree = ast.parse(MODULE_PY.read_text())
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"RefNetSegmentRefine", "RefNetSegmentRefineWidget", "RefNetSegmentRefineTest"} <= classes
    # The Logic lives in RefNetSegmentRefineLib (MONAIAuto3DSeg's layout) and is imported into the module.
    imported = {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "RefNetSegmentRefineLogic" in imported
    assert "RefNetSegmentRefineLogic" in {n.name for n in ast.parse(LOGIC_PY.read_text()).body
                                          if isinstance(n, ast.ClassDef)}


# ------------------------------------------------------------------------------------------ extension


def _extension_vars():
    text = (ROOT / "CMakeLists.txt").read_text()
    return text, dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', text))


def test_extension_cmakelists():
    text, values = _extension_vars()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert key in values
    assert values["EXTENSION_DEPENDS"] == "PyTorch"
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                 "add_subdirectory(RefNetSegmentRefine)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                 "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text
    assert re.search(r"^project\(RefNet\)", text, re.M)


def _parse_s4ext(path):
    """As ExtensionsIndex's scripts/check_description_files.py parses it (first token = key)."""
    metadata = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, _, value = line.strip().partition(" ")
        metadata[key] = value.strip()
    return metadata


S4EXT_REQUIRED = ("scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
                  "category", "iconurl", "description", "enabled")
S4EXT_KNOWN = set(S4EXT_REQUIRED) | {"recommends", "status", "tier", "screenshoturls", "dicom_support_rule",
                                     "keywords"}


def test_s4ext_has_the_required_fields():
    meta = _parse_s4ext(ROOT / "RefNet.s4ext")
    assert set(meta) <= S4EXT_KNOWN
    assert [k for k in S4EXT_REQUIRED if not meta.get(k)] == []
    assert meta["scm"] == "git" and urlsplit(meta["scmurl"]).scheme in ("git", "https", "svn")
    assert "slicer" in urlsplit(meta["scmurl"]).path.split("/")[-1].lower()  # the index's repository-name rule
    assert meta["enabled"] in ("0", "1") and 1 <= int(meta["tier"]) <= 5
    _, values = _extension_vars()
    assert meta["category"] == values["EXTENSION_CATEGORY"]
    assert meta["homepage"] == values["EXTENSION_HOMEPAGE"]
    assert meta["iconurl"] == values["EXTENSION_ICONURL"]
    assert meta["depends"].split() == values["EXTENSION_DEPENDS"].split()


JSON_REQUIRED = {"$schema", "category", "scm_url"}
JSON_PROPERTIES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                   "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str,
                   "enabled": bool, "tier": int}


def test_extensions_index_json_follows_the_schema():
    entry = json.loads((ROOT / "RefNet.json").read_text())
    assert JSON_REQUIRED <= set(entry) <= set(JSON_PROPERTIES)  # the schema has additionalProperties: false
    for key, value in entry.items():
        assert isinstance(value, JSON_PROPERTIES[key]), key
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert 1 <= entry["tier"] <= 5
    meta = _parse_s4ext(ROOT / "RefNet.s4ext")
    assert entry["scm_url"] == meta["scmurl"] and entry["category"] == meta["category"]
    assert entry["build_dependencies"] == meta["depends"].split()


# ------------------------------------------------------------------------------------------ resources


@pytest.mark.parametrize("path", ["Resources/RefNet.png",
                                  "RefNetSegmentRefine/Resources/Icons/RefNetSegmentRefine.png"])
def test_icons_are_128_pixel_pngs(path):
    data = (ROOT / path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


def test_requirements_parse_and_leave_torch_to_the_pytorch_extension():
    text = (MODULE_DIR / "Resources" / "requirements.txt").read_text()
    lines = [ln.split("#")[0].strip() for ln in text.splitlines()]
    names = {Requirement(ln).name.lower() for ln in lines if ln}
    assert {"monai", "nibabel"} <= names
    assert not names & {"torch", "numpy"}  # torch: PyTorch extension; numpy: shipped with Slicer


def test_console_scripts_point_at_real_entry_points():
    """`refnet` and `refnet-batch` (named in the README) are installed and resolve to callables."""
    import importlib

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"refnet", "refnet-batch"}
    for target in scripts.values():
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name))


def test_index_submission_has_a_license_and_a_screenshot_that_exists():
    # ExtensionsIndex's checks: a LICENSE file at the repository root, non-empty screenshot URLs.
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    assert "Apache-2.0" in (ROOT / "pyproject.toml").read_text()
    _, values = _extension_vars()
    urls = values["EXTENSION_SCREENSHOTURLS"].split()
    assert urls and urls == _parse_s4ext(ROOT / "RefNet.s4ext")["screenshoturls"].split()
    home = values["EXTENSION_HOMEPAGE"]
    prefix = home.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    for url in urls:
        assert url.startswith(prefix)
        shot = ROOT / url[len(prefix):]
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pairs_module_stands_without_the_training_loop():
    """refnet.pairs (the pair type and file loading) is imported by train.py, never the other way round."""
    import subprocess
    import sys

    code = "import sys, refnet.pairs; sys.exit('refnet.train' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
