"""What `launch.sh` cannot install before Python runs: the Debian packages the ranks and
the tests need; and `setup --all-hosts`, which runs `./launch.sh setup` on every host.
(`launch.sh` itself creates `.venv` and installs the project into it.)"""

from __future__ import annotations

import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from config import REPO_DIR
from config.blas import DEBIAN_OPENBLAS
from launcher import LaunchError
from launcher.hosts import Layout

log = logging.getLogger(__name__)

# Package and the command or file that shows it is installed. The ranks need Open MPI
# for BACKEND=mpi and OpenBLAS for FAST_BLAS (config/blas.py looks for this file); the
# tests also need sshd (hosts simulated in network namespaces) and shellcheck.
RUNTIME_PACKAGES = {"openmpi-bin": "mpirun", "libopenblas0-pthread": str(DEBIAN_OPENBLAS)}
TEST_PACKAGES = {"openssh-server": "sshd", "shellcheck": "shellcheck"}


def _present(check: str) -> bool:
    if check.startswith("/"):
        return Path(check).exists()
    return shutil.which(check) is not None or Path("/usr/sbin", check).exists()


def install_debian(packages: dict[str, str]) -> None:
    """Install the packages whose command or file is missing (Linux, as root with
    apt-get); elsewhere log the command that would."""
    if platform.system() != "Linux":
        return
    missing = [name for name, check in packages.items() if not _present(check)]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        log.info("missing Debian packages: %s (install them: apt-get install %s)", " ".join(missing),
                 " ".join(missing))
        return
    log.info("installing %s", " ".join(missing))
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def setup_hosts(layout: Layout) -> None:
    """`./launch.sh setup` in REMOTE_DIR on every remote host (the repository must be there)."""
    remote_dir = layout.settings.remote_dir
    for machine in layout.remote_machines():
        machine.check(f"{remote_dir}/launch.sh", "clone the repository there (or set REMOTE_DIR to where it is)")
        log.info("setup on %s", machine)
        if machine.shell(f"cd {shlex.quote(remote_dir)} && ./launch.sh setup", capture=False).returncode != 0:
            raise LaunchError(f"setup failed on {machine} (output above)")


def run_tests(pytest_args: list[str]) -> None:
    """The test suite, in place of this process."""
    install_debian(RUNTIME_PACKAGES | TEST_PACKAGES)
    os.chdir(REPO_DIR)
    os.execv(sys.executable, [sys.executable, "-m", "pytest", *pytest_args])
