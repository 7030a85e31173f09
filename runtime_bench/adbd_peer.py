"""A real adb protocol peer for tests: Debian trixie's Linux ``adbd`` in a chroot, inside a
private network, mount and PID namespace.

What it is: the same adbd daemon source as Android's (packages/modules/adb, Debian's 34.0.5
build), speaking the real adb wire protocol over TCP to a real adb server/client. What it is
not: a phone (glibc not Bionic, x86-64 not arm64, no getprop, no SELinux, no big.LITTLE).
docs/adb_target.md lists both sides.

Layout at run time::

    unshare --net --mount --pid --fork     (host pid U; owns the private netns and pid ns)
      └─ adbd  (pid 1 of the new pid ns, chrooted into ROOT, /proc /sys(ro) /dev mounted inside,
                listening on 127.0.0.1:5555 of the private netns only)
    nsenter --net=/proc/U/ns/net --pid=/proc/U/ns/pid_for_children  adb nodaemon server
      └─ the adb server (port 5037 of the private netns), inside the same pid ns

Tearing down kills the pid namespace's init, which makes the kernel kill every process in it
(adbd, its shells, the adb server, anything a test left behind); the mounts live in the private
mount namespace and vanish with it. Nothing listens on the host's network.

Needs root (mmdebstrap, unshare, chroot). Build once (~20 s, ~130 MB)::

    python -m pocketformer.runtime_bench.adbd_peer setup
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pocketformer.errors import RuntimeFailure

SUITE = "trixie"
PACKAGES = ("adbd", "adb", "procps")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
READY_MARKER = ".pocketformer-adbd-ready"
ADBD = "/usr/lib/android-sdk/platform-tools/adbd"
ADB = "usr/lib/android-sdk/platform-tools/adb"  # relative to the chroot root


def cache_dir() -> Path:
    return Path(os.environ.get("POCKETFORMER_CACHE", Path.home() / ".cache" / "pocketformer"))


def default_root() -> Path:
    return cache_dir() / "adbd-trixie"


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The host's Debian archive mirror (not the security archive), from its apt sources."""
    texts = []
    for path in [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*"))]:
        if path.suffix in ("", ".list", ".sources") and path.is_file():
            with contextlib.suppress(OSError):
                texts.append(path.read_text(errors="replace"))
    uris = []
    for text in texts:
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("#"):
                continue
            m = re.match(r"deb\s+(?:\[[^\]]*\]\s+)?(\S+)", line)        # one-line format
            if m:
                uris.append(m.group(1))
            m = re.match(r"URIs:\s*(.+)", line, re.IGNORECASE)          # deb822 format
            if m:
                uris.extend(m.group(1).split())
    for uri in uris:
        u = uri.rstrip("/")
        if u.startswith(("http://", "https://")) and u.endswith("/debian") and "security" not in u:
            return u
    return DEFAULT_MIRROR


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise RuntimeFailure(f"{what} needs root (mmdebstrap, unshare and chroot)")


def _run(cmd: list[str], what: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeFailure(f"{what} failed: {e}") from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise RuntimeFailure(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc


def _ensure_mmdebstrap() -> str:
    exe = shutil.which("mmdebstrap")
    if exe:
        return exe
    env_cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q", "mmdebstrap"]
    try:
        _run(env_cmd, "apt-get install mmdebstrap")
    except RuntimeFailure:
        # A stale package list is the usual cause on a fresh machine.
        _run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "update", "-q"], "apt-get update")
        _run(env_cmd, "apt-get install mmdebstrap")
    exe = shutil.which("mmdebstrap")
    if not exe:
        raise RuntimeFailure("mmdebstrap is still not on PATH after apt-get install")
    return exe


def setup_peer(root: Path | str | None = None, *, mirror: str | None = None,
               verbose: bool = False) -> Path:
    """Build the trixie chroot with adbd, adb and procps once; later calls return at once.

    Built into a temporary sibling and renamed into place, so an interrupted build never
    leaves a half root behind; a file lock serialises concurrent callers.
    """
    root = Path(root) if root else default_root()
    if (root / READY_MARKER).is_file():
        return root
    _need_root("building the adbd peer")
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / READY_MARKER).is_file():
            return root
        exe = _ensure_mmdebstrap()
        mirror = mirror or debian_mirror()
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.monotonic()
        if verbose:
            print(f"adbd peer: mmdebstrap {SUITE} from {mirror} into {root} ...", file=sys.stderr)
        try:
            _run([exe, "--variant=apt", f"--include={','.join(PACKAGES)}", SUITE, str(tmp),
                  mirror], f"mmdebstrap {SUITE} (mirror {mirror})")
            for rel in (ADBD, "/" + ADB):
                if not (tmp / rel.lstrip("/")).is_file():
                    raise RuntimeFailure(f"the {SUITE} chroot has no {rel}")
            data = tmp / "data" / "local" / "tmp"       # where a phone lets `adb push` write
            data.mkdir(parents=True, exist_ok=True)
            data.chmod(0o1777)
            (tmp / READY_MARKER).write_text(f"{SUITE} {' '.join(PACKAGES)} {mirror}\n"
                                            f"built in {time.monotonic() - t0:.1f} s\n")
            if root.exists():                           # a half root from an older layout
                shutil.rmtree(root)
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _chroot_adb_client(root: Path) -> list[str]:
    """trixie's adb client run from the host file system through the chroot's own loader and
    libraries (host paths for push/pull stay valid). It cannot start its own server that way
    (it would re-exec the loader), so running_peer starts the server explicitly."""
    lib = root / "usr" / "lib" / "x86_64-linux-gnu"
    return [str(root / "usr" / "lib64" / "ld-linux-x86-64.so.2"),
            "--library-path", f"{lib}:{lib / 'android'}", str(root / ADB)]


def _pdeathsig_kill() -> None:
    # The namespace holder dies with whoever started it, even on SIGKILL of the test runner.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Peer:
    serial: str
    adb_prefix: list[str]       # run the adb CLIENT inside the peer's network namespace
    root: Path
    holder_pid: int             # the unshare process; its namespaces are the peer's
    adbd_pid: int               # host pid of adbd (pid 1 in the peer's pid namespace)
    log: Path
    extra: dict = field(default_factory=dict)

    def adb(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.adb_prefix, *args], capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeFailure(f"adb {' '.join(args)} failed (exit {proc.returncode}): "
                                 f"{proc.stderr.strip() or proc.stdout.strip()}", device=self.serial)
        return proc

    def device_path(self, remote: str) -> Path:
        """Where a device path lies on the host (test assertions only; a phone has no such view)."""
        return self.root / remote.lstrip("/")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _mounts_under(root: Path) -> list[str]:
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    prefix = str(root.resolve())
    return [ln.split()[1] for ln in lines if len(ln.split()) > 1 and
            (ln.split()[1] == prefix or ln.split()[1].startswith(prefix + "/"))]


@contextlib.contextmanager
def running_peer(root: Path | str | None = None, *, port: int = 5555, client: str = "chroot",
                 start_timeout: float = 30.0):
    """Start adbd in its private namespaces, an adb server beside it, connect, yield a Peer.

    ``client``: "chroot" runs trixie's adb client (same release as the daemon); "host" runs the
    host's ``adb`` from PATH instead (e.g. Debian bookworm's ``adb`` package).
    Teardown (always, also when the body raises): adb kill-server, then the pid namespace's
    init is killed, which kills everything in it; the mount namespace and its mounts go with it.
    """
    _need_root("running the adbd peer")
    root = setup_peer(root)
    if client == "host":
        host_adb = shutil.which("adb")
        if not host_adb:
            raise RuntimeFailure("client='host' but no adb on PATH (apt-get install adb)")
        client_cmd = [host_adb]
    else:
        client_cmd = _chroot_adb_client(root)
    for tool in ("unshare", "nsenter", "ip", "chroot"):
        if not shutil.which(tool):
            raise RuntimeFailure(f"the adbd peer needs {tool} on PATH")

    work = Path(tempfile.mkdtemp(prefix="pocketformer-adbd-"))
    log = work / "adbd.log"
    r = str(root)
    # Device-like mounts inside the private mount namespace: a fresh /proc for the new pid
    # namespace, /sys read-only, the host's /dev (with /dev/pts for interactive shells).
    script = (
        "set -e; ip link set lo up; "
        f"mount -t proc proc '{r}/proc'; "
        f"mount --rbind /sys '{r}/sys'; mount -o remount,bind,ro '{r}/sys'; "
        f"mount --rbind /dev '{r}/dev'; "
        f"exec chroot '{r}' /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "
        f"ADBD_PORT={port} {ADBD}"
    )
    logf = open(log, "wb")
    holder = subprocess.Popen(
        ["unshare", "--net", "--mount", "--pid", "--fork", "--propagation", "private",
         "--kill-child=SIGKILL", "sh", "-c", script],
        stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
        preexec_fn=_pdeathsig_kill, start_new_session=True)
    server = None
    serial = f"127.0.0.1:{port}"
    ns = [f"--net=/proc/{holder.pid}/ns/net", f"--pid=/proc/{holder.pid}/ns/pid_for_children"]
    adb_prefix = ["nsenter", *ns, "env", f"HOME={work}", *client_cmd]
    peer = None
    try:
        deadline = time.monotonic() + start_timeout
        adbd_pid = None
        while time.monotonic() < deadline:          # wait for the chroot exec to reach adbd
            if holder.poll() is not None:
                break
            kids = _children(holder.pid)
            if kids:
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{kids[0]}/exe").endswith("/adbd"):
                        adbd_pid = kids[0]
                        break
            time.sleep(0.05)
        if adbd_pid is None:
            raise RuntimeFailure(f"adbd did not start: {log.read_text(errors='replace')[-2000:]}")
        # The adb server, inside the same network and pid namespace; no emulator port scan
        # (it would list the same adbd a second time as emulator-5554), no mDNS.
        server = subprocess.Popen(
            ["nsenter", *ns, "env", f"HOME={work}", "ADB_EMU=0", "ADB_MDNS=0", "ADB_USB=0",
             *client_cmd, "nodaemon", "server"],
            stdin=subprocess.DEVNULL, stdout=open(work / "adb-server.log", "wb"),
            stderr=subprocess.STDOUT, preexec_fn=_pdeathsig_kill, start_new_session=True)
        peer = Peer(serial=serial, adb_prefix=adb_prefix, root=root, holder_pid=holder.pid,
                    adbd_pid=adbd_pid, log=log, extra={"work": str(work)})
        last = ""
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeFailure("adb server exited: " + (work / "adb-server.log").read_text(
                    errors="replace")[-2000:])
            proc = peer.adb("connect", serial, check=False, timeout=10)
            last = (proc.stdout + proc.stderr).strip()
            if proc.returncode == 0 and last.startswith(("connected to", "already connected")):
                state = peer.adb("-s", serial, "get-state", check=False, timeout=10)
                if state.stdout.strip() == "device":
                    break
            time.sleep(0.2)
        else:
            raise RuntimeFailure(f"adb could not connect to the peer at {serial}: {last}; "
                                 f"adbd log: {log.read_text(errors='replace')[-1000:]}")
        yield peer
    finally:
        if server is not None and server.poll() is None:
            with contextlib.suppress(Exception):
                subprocess.run([*adb_prefix, "kill-server"], capture_output=True, timeout=5)
        # SIGKILL adbd, the pid namespace's init: the kernel then SIGKILLs every process in the
        # namespace (the adb server included) and the holder reaps adbd and exits. Killing the
        # holder instead would also work (--kill-child) but leaves adbd a zombie of pid 1.
        if peer is not None and holder.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(peer.adbd_pid, signal.SIGKILL)
        for sig, wait in ((None, 5), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            if holder.poll() is not None:
                break
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    holder.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                holder.wait(wait)
        if server is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(5)
            if server.poll() is None:
                server.kill()
                server.wait(5)
        logf.close()
        for mnt in reversed(_mounts_under(root)):   # only if propagation ever leaked a mount
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pocketformer.runtime_bench.adbd_peer",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["setup", "shell"],
                    help="setup: build the chroot; shell: start the peer and run one command")
    ap.add_argument("--root", default=None)
    ap.add_argument("command", nargs="*", help="for 'shell': the device shell command")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    root = setup_peer(args.root, verbose=True)
    if args.action == "setup":
        size = subprocess.run(["du", "-sh", str(root)], capture_output=True, text=True).stdout.split()
        print(f"{root} ready ({size[0] if size else '?'}, {time.monotonic() - t0:.1f} s)")
        return 0
    with running_peer(root) as peer:
        proc = peer.adb("-s", peer.serial, "shell", " ".join(args.command) or "uname -a",
                        check=False)
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
