"""What each feature needs of PyTorch (sru_cupy/torch_support.py): ``require`` refuses an older
torch (simulated here by replacing ``torch.__version__``) with a message naming the feature, both
versions and the other route; the layers refuse at import, the ONNX route where it starts; every
feature of the table is checked somewhere in the package, and setup.cfg and the README agree with
the table."""

import ast
import configparser
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sru_cupy import export, torch_support
from sru_cupy.torch_support import FEATURES, TorchVersionError

from child_env import child_env

REPO = Path(__file__).resolve().parents[1]


def _just_below(minimum):
    major, minor = minimum
    return f"{major}.{minor - 1}.1+cpu" if minor else f"{major - 1}.99.0"


@pytest.mark.parametrize("text, expected", [("2.13.0", (2, 13)), ("2.8.0+cpu", (2, 8)),
                                            ("2.8.0.dev20250601+cu128", (2, 8)),
                                            ("2.4.0a0+git1234abc", (2, 4)), ("10.0", (10, 0))])
def test_installed_version_reads_major_and_minor(monkeypatch, text, expected):
    monkeypatch.setattr(torch, "__version__", text)
    assert torch_support.installed_version() == expected


def test_installed_version_rejects_an_unreadable_version(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "unknown")
    with pytest.raises(ValueError, match=r"torch\.__version__: expected .* got 'unknown'"):
        torch_support.installed_version()


def test_the_installed_torch_has_every_feature():
    for feature in FEATURES:
        torch_support.require(feature)


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_require_refuses_an_older_torch_and_says_what_to_do(monkeypatch, feature):
    needs = FEATURES[feature]
    older = _just_below(needs.minimum)
    monkeypatch.setattr(torch, "__version__", older)
    with pytest.raises(TorchVersionError) as info:
        torch_support.require(feature)
    message = str(info.value)
    assert f"torch >= {needs.minimum[0]}.{needs.minimum[1]} is needed for {needs.title}" in message
    assert f"torch {older} is installed" in message
    assert needs.apis in message and message.endswith(needs.alternative)
    with pytest.raises(ImportError, match=re.escape(f"torch {older} is installed")):
        torch_support.require(feature, ImportError)
    monkeypatch.setattr(torch, "__version__", "%d.%d.0+cpu" % needs.minimum)
    torch_support.require(feature)  # the minimum itself is enough


def test_require_rejects_an_unknown_feature():
    with pytest.raises(ValueError, match=r"feature: expected one of layers, onnx_export, "
                                         r"got 'onnx'"):
        torch_support.require("onnx")


def test_missing_names_the_api_the_installed_torch_lacks(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    error = torch_support.missing("onnx_export", "torch.export.Dim.AUTO")
    assert isinstance(error, TorchVersionError)
    assert str(error).startswith("ONNX export of the SRU layers: needs torch.export.Dim.AUTO, "
                                 "which torch 2.99.0 lacks")
    assert str(error).endswith(FEATURES["onnx_export"].alternative)


# -- where the package checks ---------------------------------------------------------------------

_IMPORT_OPS_WITH_AN_OLD_TORCH = """
import sys, torch
torch.__version__ = sys.argv[1]
try:
    import sru_cupy.ops
except ImportError as error:
    print("ImportError:", error)
else:
    print("imported")
"""


def test_importing_the_layers_with_an_older_torch_raises_import_error():
    older = _just_below(FEATURES["layers"].minimum)
    result = subprocess.run([sys.executable, "-c", _IMPORT_OPS_WITH_AN_OLD_TORCH, older],
                            capture_output=True, text=True, env=child_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ImportError: torch >= 2.4 is needed for the PyTorch layers"), \
        result.stdout
    assert f"torch {older} is installed" in result.stdout


def test_onnx_export_with_an_older_torch_refuses_before_exporting(monkeypatch, tmp_path):
    from sru_cupy import SRU
    model = SRU(4, 4).eval()
    x = torch.randn(3, 2, 4)
    monkeypatch.setattr(torch, "__version__", _just_below(FEATURES["onnx_export"].minimum))
    path = tmp_path / "sru.onnx"
    with pytest.raises(TorchVersionError, match=r"torch >= 2\.8 is needed for ONNX export"):
        export.export_onnx(model, (x,), str(path))
    assert not path.exists()
    # The plain torch.onnx.export route reaches the scan through recurrence_scan.
    from sru_cupy import torch_fallback
    from sru_cupy.call import RecurrenceCall
    L, B, d = 3, 2, 4
    arrays = dict(U=torch.randn(L, B, 3 * d), x=torch.randn(L, B, d), weight_c=torch.randn(2 * d),
                  bias=torch.randn(2 * d), c0=torch.randn(B, d))
    with pytest.raises(TorchVersionError, match=r"torch >= 2\.8 is needed for ONNX export"):
        torch_fallback.recurrence_scan(RecurrenceCall.describe((L, B, 3 * d), "float32", d),
                                       arrays)


def _checked_features():
    """The features named by ``require(...)`` / ``missing(...)`` calls in the package's sources."""
    checked = {}
    for path in sorted((REPO / "sru_cupy").rglob("*.py")):
        if path.name == "torch_support.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else \
                getattr(node.func, "id", None)
            first = node.args[0]
            if name in ("require", "missing") and isinstance(first, ast.Constant) \
                    and isinstance(first.value, str):
                checked.setdefault(first.value, set()).add((path.name, name))
    return checked


def test_every_feature_in_the_table_is_checked_by_the_package():
    checked = _checked_features()
    assert set(checked) == set(FEATURES), (
        f"checked but not in the table: {sorted(set(checked) - set(FEATURES))}; in the table but "
        f"never required: {sorted(set(FEATURES) - set(checked))}")
    for feature, sites in checked.items():
        assert any(call == "require" for _, call in sites), f"{feature}: only missing() calls"
    assert ("ops.py", "require") in checked["layers"]
    assert ("export.py", "require") in checked["onnx_export"]
    assert ("torch_fallback.py", "require") in checked["onnx_export"]


def test_setup_cfg_asks_for_the_layers_floor():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg", encoding="utf-8")
    requirement = config["options.extras_require"]["torch"].strip()
    assert requirement == "torch>=%d.%d" % FEATURES["layers"].minimum


def test_readme_table_matches_the_features():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("**Features per torch version.**")
    rows = {}
    for line in text[start:].splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            key = re.search(r"\(`(\w+)`\)$", cells[0])
            if key:
                rows[key.group(1)] = cells[1]
        elif rows and not line.startswith("|"):
            break  # the end of the table
    assert rows == {feature: "%d.%d" % needs.minimum for feature, needs in FEATURES.items()}
