"""Fast checks of packaging/: the systemd unit, nfpm recipe, default config, .desktop file and icons.

The slow end-to-end checks (build the .deb and install it into a debootstrap root, freeze the
desktop console) are scripts run by hand: packaging/test_deb_debootstrap.sh and
packaging/build_desktop.sh; docs/packaging.md records their results.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from agent import __version__ as agent_version
from agent.config import DEFAULT_CONFIG_PATH, FIELD_NAMES, AgentConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "packaging"
UNIT = PKG / "gpusoc-agent.service"
DESKTOP = PKG / "gpusoc-console.desktop"
MAX_EXPOSURE = 4.0


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd unit syntax: sections, repeatable keys, `\\` continuations, # and ; comments."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def pyproject_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


# ---------------------------------------------------------------- systemd unit


def test_unit_parses_and_runs_the_agent_hardened() -> None:
    unit = parse_unit(UNIT.read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    svc = unit["Service"]
    exec_start = svc["ExecStart"][0].split()
    assert exec_start[0] == "/usr/bin/gpusoc-agent" and "gpusoc-agent" in pyproject_scripts()
    assert exec_start[1] == "run"
    assert exec_start[exec_start.index("--config") + 1] == DEFAULT_CONFIG_PATH
    assert svc["User"] == ["gpusoc"] and "DynamicUser" not in svc
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "read-only",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "RestrictSUIDSGID": "yes",
    }.items():
        assert svc.get(key) == [value], key
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert "StartLimitIntervalSec" in unit["Unit"]  # [Service] would ignore it


def test_unit_keeps_gpu_devices_and_process_attribution() -> None:
    """NVML needs /dev/nvidia*; naming other users' GPU processes needs their /proc entries."""
    svc = parse_unit(UNIT.read_text())["Service"]
    assert svc.get("PrivateDevices", ["no"]) == ["no"]
    policy = svc.get("DevicePolicy", ["auto"])[-1]
    if policy in ("closed", "strict"):
        allowed = " ".join(svc.get("DeviceAllow", []))
        assert "nvidia" in allowed, "a closed device policy must allow the NVIDIA devices"
    assert svc.get("ProtectProc", ["default"])[-1] == "default"  # hidepid in any form hides them
    assert svc.get("ProcSubset", ["all"]) == ["all"]


def test_unit_directories_match_the_agent_defaults() -> None:
    from agent.sdk import SYSTEM_SOCKET_PATH

    svc = parse_unit(UNIT.read_text())["Service"]
    assert Path("/var/lib", svc["StateDirectory"][0]) == Path(AgentConfig().state_dir)
    assert Path("/run", svc["RuntimeDirectory"][0]) == Path(SYSTEM_SOCKET_PATH).parent
    assert svc["RuntimeDirectoryMode"] == ["0755"]  # training jobs of every user reach the socket
    # AGENT_ARGS, not GPUSOC_AGENT_*: the config treats unknown GPUSOC_AGENT_ variables as errors.
    assert "$AGENT_ARGS" in svc["ExecStart"][0]
    default = (PKG / "gpusoc-agent.default").read_text()
    for name in re.findall(r"^#?\s*(GPUSOC_AGENT_[A-Z_]+)=", default, re.M):
        assert name.removeprefix("GPUSOC_AGENT_").lower() in FIELD_NAMES, name


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_security_exposure_at_most_4() -> None:
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=60,
    )
    if "Unknown command verb" in out.stderr or "unrecognized option" in out.stderr:
        pytest.skip("systemd-analyze without offline security (needs systemd >= 250)")
    got = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout)
    assert got, out.stdout[-2000:] + out.stderr
    assert float(got.group(1)) <= MAX_EXPOSURE, out.stdout
    assert "Unknown key" not in out.stderr and "Unknown section" not in out.stderr, out.stderr


def test_response_drop_in_parses_and_stays_bounded() -> None:
    """The opt-in profile for freeze/rollback: root, but only the capabilities those commands use."""
    drop = parse_unit((PKG / "response-actions.conf").read_text())
    svc = drop["Service"]
    assert set(drop) == {"Service"} and svc["User"] == ["root"]
    caps = set(svc["CapabilityBoundingSet"][0].split())
    assert caps <= {"CAP_KILL", "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE",
                    "CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"}
    assert "CAP_SYS_ADMIN" not in caps and "AmbientCapabilities" not in svc
    assert svc["StateDirectoryMode"] == ["0755"]  # job users reach staged checkpoints


# ---------------------------------------------------------------- nfpm, config, scripts


def test_nfpm_references_existing_files() -> None:
    text = (PKG / "nfpm.yaml").read_text()
    srcs = re.findall(r"^\s*-\s*src:\s*(\S+)\s*$", text, re.M)
    scripts = re.findall(r"^\s*(?:pre|post)(?:install|remove):\s*(\S+)\s*$", text, re.M)
    assert len(scripts) == 4
    assert srcs
    for src in srcs + scripts:
        if src.startswith("build/"):  # produced by build_deb.sh from packaging/gpusoc-agent.spec
            assert src.rstrip("/").endswith("gpusoc-agent")
            continue
        if src.startswith("/"):  # symlink target inside the package
            assert src == "/opt/gpusoc-agent/gpusoc-agent"
            continue
        assert (ROOT / src).exists(), src
    assert 'name="gpusoc-agent"' in (PKG / "gpusoc-agent.spec").read_text()


def test_nfpm_config_files_are_conffiles() -> None:
    text = (PKG / "nfpm.yaml").read_text()
    for dst in ("/etc/gpusoc/agent.toml", "/etc/default/gpusoc-agent"):
        block = text.split(f"dst: {dst}", 1)[1].split("- src:", 1)[0]
        assert "type: config|noreplace" in block, dst
    assert "dst: /usr/lib/systemd/system/gpusoc-agent.service" in text


def test_default_config_is_valid_and_documents_real_keys(tmp_path: Path) -> None:
    """The packaged file loads; uncommenting any documented default loads and changes nothing."""
    path = PKG / "agent.toml"
    base = load_config(str(path), env={})
    text = path.read_text()
    commented = re.findall(r"^# ([a-z_]+) = ([^\n]+?)(?:[ \t]+#[^\n]*)?$", text, re.M)
    assert len(commented) >= 10
    examples = {"host", "metrics_listen"}  # commented values that show a setting, not its default
    for key, value in commented:
        assert key in FIELD_NAMES, f"agent.toml documents unknown key {key!r}"
        trial = tmp_path / f"{key}.toml"
        trial.write_text(text.replace(f"# {key} = {value}", f"{key} = {value}", 1))
        cfg = load_config(str(trial), env={})
        if key not in examples:
            assert getattr(cfg, key) == getattr(base, key), key


@pytest.mark.parametrize("script", sorted((PKG / "scripts").glob("*.sh")), ids=lambda p: p.name)
def test_maintainer_scripts_are_posix_sh(script: Path) -> None:
    assert script.read_text().startswith("#!/bin/sh\n")
    subprocess.run(["sh", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-s", "sh", str(script)], check=True)


@pytest.mark.parametrize("script", ["build_deb.sh", "build_desktop.sh", "test_deb_debootstrap.sh"])
def test_build_scripts_parse(script: Path) -> None:
    subprocess.run(["bash", "-n", str(PKG / script)], check=True)


def test_entry_points_run_from_source() -> None:
    """The PyInstaller entry scripts, unfrozen; the console one routes `-m agent.cli` to the agent."""
    agent = subprocess.run([sys.executable, str(PKG / "entry_agent.py"), "--version"],
                           capture_output=True, text=True, cwd=ROOT, check=True)
    assert agent.stdout.strip() == f"gpusoc-agent {agent_version}"
    routed = subprocess.run([sys.executable, str(PKG / "entry_console.py"), "-m", "agent.cli", "--version"],
                            capture_output=True, text=True, cwd=ROOT, check=True)
    assert routed.stdout.strip() == f"gpusoc-agent {agent_version}"


# ---------------------------------------------------------------- desktop entry and icon


def test_desktop_entry() -> None:
    text = DESKTOP.read_text()
    assert text.startswith("[Desktop Entry]\n")
    entry = dict(line.split("=", 1) for line in text.split("\n\n")[0].splitlines()[1:] if "=" in line)
    assert entry["Type"] == "Application"
    assert entry["Exec"].split()[0] == "gpusoc-console" and "gpusoc-console" in pyproject_scripts()
    assert entry["Icon"] == "gpusoc-console" and (PKG / "icons" / "gpusoc-console.svg").is_file()
    assert entry["Categories"].endswith(";") and "System" in entry["Categories"].split(";")
    if shutil.which("desktop-file-validate"):
        out = subprocess.run(["desktop-file-validate", str(DESKTOP)], capture_output=True, text=True)
        assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_icons() -> None:
    svg = ET.parse(PKG / "icons" / "gpusoc-console.svg").getroot()
    assert svg.tag.endswith("svg") and svg.get("viewBox") == "0 0 256 256"
    for name, size in (("gpusoc-console.png", 256), ("gpusoc-console-48.png", 48)):
        data = (PKG / "icons" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])
        assert (width, height) == (size, size)
        assert len(data) < 64 * 1024
