"""scripts/install and scripts/uninstall, into scratch roots (`--root DIR`): a real venv with
a real, non-editable pip install of this checkout, the symlink, the units, the directories
and their modes; idempotence; configs and keys kept unless --purge.

pip installs from a local wheelhouse (PIP_NO_INDEX, PIP_FIND_LINKS: the settings an offline
install uses too), filled once per session with `pip download` of sptun's dependencies and
its build backend; pip's own cache makes that quick after the first run. The install itself
is the real one: a fresh venv, the wheels installed into it, sptun built from the sources.
"""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sptun import __version__
from sptun.config import load_agent, load_server

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "scripts" / "install"
UNINSTALL = ROOT / "scripts" / "uninstall"
UNITS = ("sptun-server.service", "sptun-agent.service")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheels = tmp_path_factory.mktemp("wheels")
    requirements = [*project["project"]["dependencies"], *project["build-system"]["requires"], "wheel"]
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                           "-d", str(wheels), *requirements], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"pip download failed (needs PyPI or a pip cache): {proc.stderr}"
    return wheels


def env(wheelhouse: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHON"))}
    e.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheelhouse), PIP_DISABLE_PIP_VERSION_CHECK="1")
    return e


def script(path: Path, *args: str, wheelhouse: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(path), *args], capture_output=True, text=True, timeout=600, env=env(wheelhouse),
                          cwd="/")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sptun(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed command, from elsewhere than the checkout, with no help from PYTHONPATH."""
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(root / "usr/local/bin/sptun"), *args], capture_output=True, text=True,
                          timeout=60, cwd="/", env=e)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Path:
    root = tmp_path_factory.mktemp("root")
    build_before = (ROOT / "build").exists()
    script(INSTALL, "--root", str(root), "--server", wheelhouse=wheelhouse)
    # Built from a copy: the checkout gets no build/ from it.
    assert (ROOT / "build").exists() == build_before
    return root


def test_layout_and_modes(installed: Path) -> None:
    r = installed
    assert mode(r / "etc/sptun") == 0o755
    assert mode(r / "etc/sptun/tokens") == 0o700
    assert mode(r / "var/lib/sptun") == 0o700
    for unit in UNITS:
        assert (r / "etc/systemd/system" / unit).read_text() == (ROOT / "systemd" / unit).read_text()
    assert (r / "opt/sptun/README.md").exists()  # the units' Documentation=
    sysctl = (r / "etc/sysctl.d/60-sptun.conf").read_text()  # wireguard-go's receive buffer
    assert "net.core.rmem_default = 4194304" in sysctl and mode(r / "etc/sysctl.d/60-sptun.conf") == 0o644
    # --server writes the server config, from the example; --agent was not asked for.
    assert (r / "etc/sptun/server.toml").read_text() == (ROOT / "examples/server.toml").read_text()
    assert not (r / "etc/sptun/agent.toml").exists()


def test_examples_are_valid_configs(installed: Path) -> None:
    server = load_server(installed / "etc/sptun/server.toml.example")
    agent = load_agent(installed / "etc/sptun/agent.toml.example")
    # Secrets under the 0700 directory that install makes; state where the units may write.
    assert server.domains[0].token_file.parent == Path("/etc/sptun/tokens")
    assert agent.token_file.parent == Path("/etc/sptun/tokens")
    assert server.state_dir == agent.state_dir == Path("/var/lib/sptun")


def test_symlink_runs_the_installed_copy(installed: Path) -> None:
    link = installed / "usr/local/bin/sptun"
    assert link.is_symlink() and os.readlink(link) == "../../../opt/sptun/venv/bin/sptun"
    proc = sptun(installed, "--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"sptun {__version__}", proc.stderr
    proc = sptun(installed, "keygen")
    assert proc.returncode == 0, proc.stderr
    assert len(base64.b64decode(proc.stdout.strip(), validate=True)) == 32
    # Not an editable install: the package lives in the venv, not in this checkout.
    python = installed / "opt/sptun/venv/bin/python"
    where = subprocess.run([str(python), "-c", "import sptun; print(sptun.__file__)"], capture_output=True,
                           text=True, cwd="/", timeout=60).stdout.strip()
    assert where.startswith(str(installed / "opt/sptun/venv/")), where


def test_install_again_keeps_what_the_operator_made(installed: Path, wheelhouse: Path) -> None:
    r = installed
    (r / "etc/sptun/server.toml").write_text("# mine\n")
    token = r / "etc/sptun/tokens/app.example.com"
    token.write_text("secret\n")
    token.chmod(0o600)
    key = r / "var/lib/sptun/private.key"
    key.write_text("key\n")
    key.chmod(0o600)
    (r / "etc/sptun/tokens").chmod(0o755)  # loosened by hand: install tightens it again
    script(INSTALL, "--root", str(r), "--server", wheelhouse=wheelhouse)
    proc = script(INSTALL, "--root", str(r), "--agent", wheelhouse=wheelhouse)
    assert (r / "etc/sptun/server.toml").read_text() == "# mine\n"
    assert (r / "etc/sptun/agent.toml").read_text() == (ROOT / "examples/agent.toml").read_text()
    assert token.read_text() == "secret\n" and key.read_text() == "key\n"
    assert mode(r / "etc/sptun/tokens") == 0o700
    assert f"sptun {__version__} installed" in proc.stdout
    assert sptun(r, "--version").returncode == 0


def test_uninstall_keeps_configs_and_keys_unless_purge(tmp_path: Path, wheelhouse: Path) -> None:
    r = tmp_path / "root"
    script(INSTALL, "--root", str(r), "--agent", wheelhouse=wheelhouse)
    (r / "var/lib/sptun/private.key").write_text("key\n")
    for _ in range(2):  # idempotent
        script(UNINSTALL, "--root", str(r), wheelhouse=wheelhouse)
        assert not (r / "opt/sptun").exists()
        assert not (r / "usr/local/bin/sptun").exists() and not (r / "usr/local/bin/sptun").is_symlink()
        for unit in UNITS:
            assert not (r / "etc/systemd/system" / unit).exists()
        assert not (r / "etc/sysctl.d/60-sptun.conf").exists()
        assert (r / "etc/sptun/agent.toml").exists() and (r / "etc/sptun/tokens").is_dir()
        assert (r / "var/lib/sptun/private.key").read_text() == "key\n"
    for _ in range(2):
        script(UNINSTALL, "--root", str(r), "--purge", wheelhouse=wheelhouse)
        assert not (r / "etc/sptun").exists() and not (r / "var/lib/sptun").exists()


def test_uninstall_leaves_a_foreign_sptun_alone(tmp_path: Path, wheelhouse: Path) -> None:
    bin_dir = tmp_path / "usr/local/bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "sptun").write_text("#!/bin/sh\n")
    proc = script(UNINSTALL, "--root", str(tmp_path), wheelhouse=wheelhouse)
    assert (bin_dir / "sptun").exists()
    assert "leaving" in proc.stderr


@pytest.mark.parametrize("path", [INSTALL, UNINSTALL])
def test_bad_usage(path: Path, tmp_path: Path) -> None:
    proc = subprocess.run([str(path), "--bogus"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr
    proc = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--root DIR" in proc.stdout
