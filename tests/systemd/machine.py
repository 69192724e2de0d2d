"""A Debian machine with systemd as PID 1, in a container, for `make systemd-test`.

Three steps, each its own command so that the Makefile can time and skip them:

- ``prepare ROOT WHEEL``: build the root once (``debootstrap --variant=minbase`` of
  bookworm with systemd, dbus, Python and procps), kept in ROOT (``build/systemd-root``) and
  reused while its package list is the same; then install WHEEL, the working tree's tend,
  into ``/opt/tend`` inside it (``pip --no-index``: no network inside), with ``tend``,
  ``tendctl`` and ``get-poetry`` linked into ``/usr/local/bin``, where the shipped service
  unit looks for ``tend``.
- `Machine.boot` (the tests' fixture): ``systemd-nspawn --boot`` on a throwaway overlay of
  ROOT (``--volatile=overlay``), so every run starts from the same clean machine, with a
  network namespace of its own (``--private-network``): its own loopback, so port 10000 in
  there clashes with nothing on the host, and nothing in there reaches any network.
- `Machine.run`: a command in every namespace of the container's PID 1 (``nsenter``), so
  ``systemctl`` and ``journalctl`` in there talk to that systemd. ``machinectl`` and
  ``systemd-run -M`` would need systemd-machined on the host, which a host without systemd
  as PID 1 (a CI container, say) does not have; nsenter needs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# procps for /bin/kill, which the shipped unit's ExecReload= runs (Debian installs it on
# every machine but a minbase one).
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "procps")
VENV = "/opt/tend"
COMMANDS = ("tend", "tendctl", "get-poetry")
STAMP = ".tend-systemd-root"  # in ROOT: what the root was built with, written last
# The names every Debian machine has in /etc/hosts; debootstrap writes no /etc/hosts.
HOSTS = "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n"
# nspawn without systemd on the host: no machined to register with (--register=no), and
# no unit to make a scope in (--keep-unit: the container stays in our own cgroup).
NSPAWN = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--private-network"]


def stamp_text() -> str:
    return json.dumps({"suite": SUITE, "packages": PACKAGES}, sort_keys=True)


def build_root(root: Path) -> bool:
    """Make the Debian root at *root* unless one built with the same packages is there.

    Returns True if it built one. A root left half-made by an interrupted build has no
    stamp, and is removed and built again.
    """
    stamp = root / STAMP
    if stamp.is_file() and stamp.read_text() == stamp_text():
        return False
    remove_tree(root)
    partial = root.with_name(root.name + ".partial")
    remove_tree(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=" + ",".join(PACKAGES),
            SUITE,
            str(partial),
            MIRROR,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    (partial / "etc" / "hosts").write_text(HOSTS)
    # A machine id of its own (debootstrap leaves it empty: systemd would make a new one
    # on every boot, and the journal's files would not be found again).
    machine_id = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:32]
    (partial / "etc" / "machine-id").write_text(machine_id + "\n")
    # Nothing on the console to log in to.
    getty = partial / "etc" / "systemd" / "system" / "console-getty.service"
    getty.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        getty.symlink_to("/dev/null")
    (partial / STAMP).write_text(stamp_text())
    partial.rename(root)
    return True


def remove_tree(path: Path) -> None:
    """Remove *path*, a root perhaps left half-made, never what is mounted inside it.

    An interrupted debootstrap leaves /proc and /sys (and in a container /dev, bound from
    the host) mounted in its target: unmount them first, and never cross into another
    file system while removing.
    """
    if not path.exists():
        return
    top = str(path.resolve())
    with open("/proc/self/mountinfo") as mountinfo:
        points = [line.split()[4] for line in mountinfo]
    for point in sorted(points, key=len, reverse=True):
        if point.startswith(top + "/"):
            subprocess.run(["umount", "--lazy", point], check=True)
    subprocess.run(["rm", "-rf", "--one-file-system", top], check=True)


def install_wheel(root: Path, wheel: Path) -> None:
    """Install *wheel* into the venv /opt/tend of *root*, by Python inside the root."""
    script = (
        f"set -e; [ -x {VENV}/bin/python ] || python3 -m venv {VENV}; "
        f"{VENV}/bin/pip install --quiet --no-index --no-deps --force-reinstall "
        f"--disable-pip-version-check /mnt/wheels/{wheel.name}; "
        + "; ".join(f"ln -sf {VENV}/bin/{name} /usr/local/bin/{name}" for name in COMMANDS)
    )
    subprocess.run(
        [
            *NSPAWN,
            "--directory",
            str(root),
            f"--bind-ro={wheel.parent.resolve()}:/mnt/wheels",
            "/bin/sh",
            "-c",
            script,
        ],
        check=True,
    )


class Machine:
    """The booted container: `run` a command in it, `write` a file into it, `shutdown`."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.leader = 0  # the container's PID 1, as the host numbers it

    def boot(self, timeout: float = 60.0) -> None:
        """Boot the container and wait until systemd says the system is up."""
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [
                    *NSPAWN,
                    "--directory",
                    str(self.root),
                    "--volatile=overlay",
                    "--boot",
                    "--console=passive",
                    f"--machine=tend-test-{os.getpid()}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.process.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited: {self.log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no container init after {timeout} s: {self.log.read_text()}")
            self.leader = self._init_pid()
            time.sleep(0.05)
        # systemctl can reach systemd once its private socket exists, a moment after exec.
        while True:
            state = self.run("systemctl", "is-system-running", "--wait", check=False)
            if state.stdout.strip() in ("running", "degraded"):
                return
            if "Failed to connect to bus" not in state.stderr or time.monotonic() > deadline:
                raise RuntimeError(f"the container did not boot: {state.stdout}{state.stderr}")
            time.sleep(0.05)

    def _init_pid(self) -> int:
        """The pid of systemd in the container: nspawn's child whose command is systemd."""
        assert self.process is not None
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            for pid in children.read_text().split():
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
        except OSError:
            pass
        return 0

    def command(self, *argv: str) -> list[str]:
        """*argv* as run in every namespace of the container's PID 1."""
        return ["nsenter", "--target", str(self.leader), "--all", "--", *argv]

    def run(
        self, *argv: str, check: bool = True, timeout: float = 60.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run *argv* in the container and return what it printed."""
        result = subprocess.run(
            self.command(*argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def popen(self, *argv: str) -> subprocess.Popen[str]:
        """Start *argv* in the container, its output in pipes, without waiting."""
        return subprocess.Popen(
            self.command(*argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def path(self, inside: str) -> Path:
        """The host's way to the file *inside* names in the container's file system."""
        return Path(f"/proc/{self.leader}/root") / inside.lstrip("/")

    def write(self, inside: str, text: str, mode: int = 0o644) -> None:
        """Write *text* to the file *inside* in the container, making its folders."""
        path = self.path(inside)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)

    def remove(self, inside: str) -> None:
        path = self.path(inside)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Power the container off (nspawn turns SIGTERM into a clean shutdown), or kill it."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@contextlib.contextmanager
def booted(root: Path, log: Path) -> Iterator[Machine]:
    """A booted Machine on *root*, shut down at the end."""
    machine = Machine(root, log)
    try:
        machine.boot()
        yield machine
    finally:
        machine.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="build ROOT if needed; install WHEEL in it")
    prepare.add_argument("root", type=Path)
    prepare.add_argument("wheel", type=Path)
    arguments = parser.parse_args(argv)
    started = time.monotonic()
    built = build_root(arguments.root)
    middle = time.monotonic()
    install_wheel(arguments.root, arguments.wheel)
    end = time.monotonic()
    what = "built" if built else "reused"
    print(
        f"systemd-test: {what} the Debian {SUITE} root {arguments.root} "
        f"({middle - started:.0f} s); installed {arguments.wheel.name} ({end - middle:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
