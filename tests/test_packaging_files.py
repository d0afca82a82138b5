"""The files that make Slimscope a desktop application: valid, complete and in step with pyproject.

Fast and Qt-free, so they run in CI. Building and launching the frozen app is the on-demand
smoke test, packaging/smoke_test.sh.
"""

from __future__ import annotations

import configparser
import re
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESOURCES = ROOT / "resources"
ICONS = RESOURCES / "icons"
DESKTOP = RESOURCES / "slimscope.desktop"
METAINFO = RESOURCES / "io.github.slimscope.Slimscope.metainfo.xml"
ICON_SIZES = (16, 32, 48, 64, 128, 256, 512)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def pyproject_section(name: str) -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    return text.split(f"[{name}]", 1)[1].split("\n[", 1)[0]


def pyproject_version() -> str:
    return re.search(r'^version\s*=\s*"([^"]+)"', pyproject_section("project"), re.M).group(1)


def desktop_entry() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string(DESKTOP.read_text(encoding="utf-8"))
    return parser["Desktop Entry"]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, checking the PNG signature first."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert head[12:16] == b"IHDR", f"{path.name} has no IHDR chunk first"
    return struct.unpack(">II", head[16:24])


# -- the .desktop file ---------------------------------------------------------------------------
def test_desktop_entry_has_the_keys_a_launcher_needs():
    entry = desktop_entry()
    assert entry["Type"] == "Application"
    assert entry["Name"] == "Slimscope"
    assert entry["Exec"].split()[0] == "slimscope"  # the console script, also the frozen binary
    assert "%f" in entry["Exec"] or "%F" in entry["Exec"]
    assert entry["Icon"] == "slimscope"  # found through the icon theme, hence no path
    assert entry["Terminal"] == "false"
    for key in ("Categories", "Keywords"):
        assert entry[key].endswith(";"), f"{key} must end with ';'"
    assert (ICONS / f"{entry['Icon']}.svg").is_file()


@pytest.mark.skipif(shutil.which("desktop-file-validate") is None,
                    reason="desktop-file-validate not installed (apt: desktop-file-utils)")
def test_desktop_file_validates():
    result = subprocess.run(["desktop-file-validate", str(DESKTOP)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -- AppStream metainfo --------------------------------------------------------------------------
def test_metainfo_has_the_required_appstream_elements():
    root = ET.parse(METAINFO).getroot()
    assert root.tag == "component" and root.get("type") == "desktop-application"
    assert root.findtext("id") == METAINFO.name.removesuffix(".metainfo.xml")
    assert root.findtext("metadata_license") == "CC0-1.0"
    assert root.findtext("project_license") == re.search(
        r'license\s*=\s*\{\s*text\s*=\s*"([^"]+)"', pyproject_section("project")).group(1)
    assert root.findtext("name") == desktop_entry()["Name"]
    assert root.findtext("summary")
    assert root.find("description/p") is not None
    launchable = root.find("launchable")
    assert launchable is not None and launchable.get("type") == "desktop-id"
    assert launchable.text == DESKTOP.name
    assert root.findtext("provides/binary") == "slimscope"
    assert root.find("content_rating") is not None


def test_metainfo_newest_release_is_the_pyproject_version():
    releases = ET.parse(METAINFO).getroot().findall("releases/release")
    assert releases, "metainfo lists no release"
    assert releases[0].get("version") == pyproject_version()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", releases[0].get("date") or "")


@pytest.mark.skipif(shutil.which("appstreamcli") is None,
                    reason="appstreamcli not installed (apt: appstream)")
def test_metainfo_validates():
    result = subprocess.run(["appstreamcli", "validate", "--no-net", str(METAINFO)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -- icons ---------------------------------------------------------------------------------------
def test_icon_svg_is_a_square_svg():
    root = ET.parse(ICONS / "slimscope.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert root.get("viewBox") == "0 0 256 256"


@pytest.mark.parametrize("size", ICON_SIZES)
def test_every_icon_size_is_a_png_of_that_size(size: int):
    path = ICONS / f"slimscope-{size}.png"
    assert path.is_file(), f"missing {path.name}: run packaging/render_icons.py"
    assert png_size(path) == (size, size)


def test_gui_and_packaging_agree_on_icon_sizes():
    # gui/icons.py imports Qt, so read its constant as text rather than importing it here.
    for file in (ROOT / "gui" / "icons.py", ROOT / "packaging" / "render_icons.py"):
        found = re.search(r"SIZES\s*=\s*\(([^)]*)\)", file.read_text(encoding="utf-8"))
        assert found, file
        assert tuple(int(n) for n in found.group(1).split(",") if n.strip()) == ICON_SIZES


# -- what ships ----------------------------------------------------------------------------------
def test_package_data_ships_icons_desktop_file_and_metainfo():
    block = pyproject_section("tool.setuptools.package-data")
    patterns = re.findall(r'"([^"]+)"', re.search(r"^resources\s*=\s*\[(.*?)\]", block,
                                                  re.M | re.S).group(1))
    shipped = [DESKTOP, METAINFO, *ICONS.iterdir(), *(RESOURCES / "demo").iterdir()]
    for path in shipped:
        relative = path.relative_to(RESOURCES).as_posix()
        assert any(fnmatch(relative, pattern) for pattern in patterns), f"{relative} not shipped"


def test_pyinstaller_spec_and_launcher_compile():
    for name in ("slimscope.spec", "launcher.py", "render_icons.py"):
        path = ROOT / "packaging" / name
        compile(path.read_text(encoding="utf-8"), str(path), "exec")


# -- one version ---------------------------------------------------------------------------------
def test_version_option_prints_the_pyproject_version():
    # The installed console script when there is one (what users run), else the module.
    script = Path(sys.executable).parent / "slimscope"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "engine.cli"]
    result = subprocess.run([*command, "--version"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"slimscope {pyproject_version()}"
