"""The `qemu:<cpu>` target's emulation layer: run aarch64 programs under QEMU user mode.

What this gives a benchmark (see docs/qemu_target.md):
  * executed guest instructions, counted by our own TCG plugin (plugins/insn_count.c),
    deterministic for single-threaded work and comparable across artifacts for one CPU model;
  * peak RSS of the qemu process (its own translator buffers included: subtract `baseline`);
  * emulated wall time, which is NOT phone latency (it is labelled as such in the results);
  * an ARM /proc/cpuinfo whose Features line and MIDR fields match the `-cpu` model, bind-mounted
    over /proc/cpuinfo inside a private mount namespace (QEMU 7.2 shows the guest the host's x86
    cpuinfo, and ONNX Runtime's cpuinfo library crashes on it). The host is never touched.

Entry points: `setup_qemu()` (packages, plugin header, plugin and helper builds; cached),
`run_qemu(cmd, cpu)`, `baseline(cpu)`, `per_inference(run_a, run_b, n_a, n_b)`,
`cpu_features(cpu)`, `qemu_device(cpu)`.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pocketformer.errors import BadInputError, RuntimeFailure
from pocketformer.fsutil import write_text

# Debian packages the target needs. `qemu-user` is the DYNAMIC qemu-aarch64 (TCG plugins can
# only be loaded by it, not by qemu-user-static). The cross compilers bring the aarch64
# glibc/libstdc++ sysroot under /usr/aarch64-linux-gnu. gcc builds the plugin, patch applies
# Debian's patches to the plugin header if any touch it. The plugin needs no GLib.
APT_PACKAGES = ("qemu-user", "gcc-aarch64-linux-gnu", "g++-aarch64-linux-gnu", "gcc",
                "libc6-dev", "xz-utils", "patch")

QEMU_BIN = "qemu-aarch64"
CROSS_CC = "aarch64-linux-gnu-gcc"
CROSS_CXX = "aarch64-linux-gnu-g++"
DEFAULT_SYSROOT = "/usr/aarch64-linux-gnu"
PLUGIN_SOURCE = Path(__file__).resolve().parent / "plugins" / "insn_count.c"

# Models we describe in docs and tests. Any other model that the installed qemu-aarch64 lists
# (`qemu-aarch64 -cpu help`) is accepted too, except `max`.
KNOWN_CPUS = ("cortex-a53", "cortex-a55", "cortex-a72", "cortex-a76", "neoverse-n1")

# CPU models the installed QEMU may lack, mapped to the QEMU model that runs the same ISA.
# QEMU 7.2 has no cortex-a55 (it arrived in QEMU 8.0). The A55 is ARMv8.2-A with dotprod,
# fp16 and RCpc: exactly the user-visible feature set of QEMU's cortex-a76 model, so we run
# that model and advertise the A55's identity (implementer 0x41, part 0xd05, r1p0) in the fake
# cpuinfo, so libraries that tune kernels per micro-architecture (XNNPACK via cpuinfo) pick
# their A55 paths. Features are still read from the emulated model.
CPU_FALLBACKS = {"cortex-a55": ("cortex-a76", 0x411FD050)}

# Why `max` is refused (also the error text).
MAX_REFUSAL = ("-cpu max is refused: on QEMU 7.2 it enables SME/SVE2 and int8 kernels give "
               "wrong results; pin a real core model instead")

# Linux's AT_HWCAP / AT_HWCAP2 bit names as /proc/cpuinfo prints them (arch/arm64 hwcap_str).
HWCAP_NAMES = ("fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics",
               "fphp", "asimdhp", "cpuid", "asimdrdm", "jscvt", "fcma", "lrcpc", "dcpop", "sha3",
               "sm3", "sm4", "asimddp", "sha512", "sve", "asimdfhm", "dit", "uscat", "ilrcpc",
               "flagm", "ssbs", "sb", "paca", "pacg")
HWCAP2_NAMES = ("dcpodp", "sve2", "sveaes", "svepmull", "svebitperm", "svesha3", "svesm4",
                "flagm2", "frint", "svei8mm", "svef32mm", "svef64mm", "svebf16", "i8mm", "bf16",
                "dgh", "rng", "bti", "mte", "ecv", "afp", "rpres", "mte3", "sme", "smei16i64",
                "smef64f64", "smei8i32", "smef16f32", "smeb16f32", "smef32f32", "smefa64", "wfxt",
                "ebf16", "sveebf16")

# Human names of the MIDR part numbers we may print (implementer 0x41 = Arm, 0x46 = Fujitsu).
PART_NAMES = {(0x41, 0xD03): "Cortex-A53", (0x41, 0xD04): "Cortex-A35",
              (0x41, 0xD05): "Cortex-A55", (0x41, 0xD07): "Cortex-A57",
              (0x41, 0xD08): "Cortex-A72", (0x41, 0xD0B): "Cortex-A76",
              (0x41, 0xD0C): "Neoverse-N1", (0x46, 0x001): "A64FX"}

_EMPTY_C = "int main(void) { return 0; }\n"
# Reads what the emulated CPU really offers: the kernel-style hwcaps qemu-user hands the guest
# and the MIDR (qemu-user emulates reading ID registers, as Linux does with HWCAP_CPUID).
_PROBE_C = r"""
#include <stdio.h>
#include <sys/auxv.h>
int main(void) {
    unsigned long midr = 0;
    __asm__ volatile("mrs %0, midr_el1" : "=r"(midr));
    printf("hwcap %#lx\nhwcap2 %#lx\nmidr %#lx\n",
           getauxval(AT_HWCAP), getauxval(AT_HWCAP2), midr);
    return 0;
}
"""
# Host-side launcher: the peak RSS that wait4 reports for a direct child of Python includes the
# forked Python image (Linux keeps the pre-exec high-water mark), so Python starts this small
# program, which forks, execs the command and reports the command's own rusage via wait4
# (one source with the llama.cpp peer's launcher).
_SPAWN_C = (Path(__file__).resolve().parent / "native" / "pf_rusage.c").read_text()
_MOUNT_FAIL = "pocketformer-qemu: cannot bind-mount the fake /proc/cpuinfo"
_MOUNT_FAIL_RC = 125


@dataclass(frozen=True)
class QemuTools:
    qemu: Path                 # dynamic qemu-aarch64
    qemu_version: str          # e.g. "7.2.22"
    qemu_source_version: str   # Debian source version the plugin header came from
    plugin: Path               # our insn_count.so
    plugin_header: Path        # qemu-plugin.h matching the installed qemu
    cc: Path                   # aarch64-linux-gnu-gcc
    cxx: Path                  # aarch64-linux-gnu-g++
    sysroot: Path
    cache_dir: Path
    empty_program: Path        # aarch64 `int main(){return 0;}` for baselines
    probe_program: Path        # prints hwcaps + MIDR
    spawn: Path                # host launcher reporting the command's own rusage
    cpus: tuple[str, ...]      # models this qemu accepts (without `max`), plus fallbacks


@dataclass
class CpuModel:
    name: str                  # what the user asked for, e.g. "cortex-a55"
    qemu_cpu: str              # what qemu runs, e.g. "cortex-a76"
    midr: int                  # advertised in the fake cpuinfo
    features: list[str]        # Linux hwcap names the emulated model provides

    @property
    def implementer(self) -> int:
        return (self.midr >> 24) & 0xFF

    @property
    def variant(self) -> int:
        return (self.midr >> 20) & 0xF

    @property
    def part(self) -> int:
        return (self.midr >> 4) & 0xFFF

    @property
    def revision(self) -> int:
        return self.midr & 0xF

    @property
    def part_name(self) -> str:
        return PART_NAMES.get((self.implementer, self.part), f"part {self.part:#x}")


@dataclass
class QemuRun:
    cmd: list[str]
    cpu: str                       # requested model
    qemu_cpu: str                  # model qemu ran (differs for fallbacks, e.g. a55 -> a76)
    features: list[str]
    returncode: int                # the guest's exit status; negative = killed by that signal
    stdout: str
    stderr: str
    wall_s: float                  # EMULATED wall time (QEMU TCG on the host), not device time
    instructions: int | None       # executed guest instructions, all threads (None if not counted)
    peak_rss_mb: float             # peak RSS of the qemu process, translator buffers included
    vcpus: int | None = None       # vCPU slots used (~ most guest threads alive at once)
    instructions_exact: bool | None = None  # False: mode=inline with several threads
    count_mode: str | None = None
    # Instructions of the guest's main thread alone (vCPU 0; count_mode "tb"). With --threads 1
    # all inference work runs there, while idle pool threads spin for timing-dependent counts.
    main_thread_instructions: int | None = None
    wall_kind: str = "emulated"
    device: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# setup

def cache_root() -> Path:
    base = os.environ.get("POCKETFORMER_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "pocketformer")
    return Path(base) / "qemu"


def _run(cmd: list[str], *, timeout: float = 600, check: bool = True, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        tail = (res.stderr or res.stdout).strip()[-2000:]
        raise RuntimeFailure(f"command failed ({res.returncode}): "
                             f"{' '.join(map(str, cmd))}\n{tail}", device="qemu:setup")
    return res


def _missing_packages(packages) -> list[str]:
    if not shutil.which("dpkg-query"):
        return []
    res = _run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n", *packages],
               check=False)
    installed = {line.split()[0] for line in res.stdout.splitlines()
                 if line.endswith(" installed")}
    return [p for p in packages if p not in installed]


def _ensure_packages() -> None:
    missing = _missing_packages(APT_PACKAGES)
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeFailure(f"missing Debian packages: {' '.join(missing)}; install them as root: "
                             f"apt-get install -y {' '.join(missing)}", device="qemu:setup")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if _run(install, check=False, env=env).returncode != 0:
        _run(["apt-get", "update", "-q"], env=env)
        _run(install, env=env)


def _is_dynamic_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    return head[:4] == b"\x7fELF" and b"ld-linux" in head


def _qemu_versions(qemu: Path) -> tuple[str, str]:
    out = _run([str(qemu), "--version"]).stdout
    m = re.search(r"version (\S+)", out)
    version = m.group(1) if m else "unknown"
    src = ""
    if shutil.which("dpkg-query"):
        res = _run(["dpkg-query", "-W", "-f", "${source:Package} ${source:Version}",
                    "qemu-user"], check=False)
        if res.returncode == 0:
            src = res.stdout.strip()
    return version, src


def _private_apt(tmp: Path) -> list[str]:
    """apt options for a throw-away apt state whose sources are the system's `deb` entries
    turned into `deb-src` (the system's apt configuration is left untouched)."""
    parts = tmp / "sources.list.d"
    for d in (parts, tmp / "lists" / "partial", tmp / "cache" / "archives" / "partial"):
        d.mkdir(parents=True, exist_ok=True)
    lines = []
    etc = Path("/etc/apt")
    for f in [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]:
        if f.is_file():
            lines += [re.sub(r"^deb(\s)", r"deb-src\1", ln) for ln in f.read_text().splitlines()
                      if re.match(r"^deb\s", ln)]
    (tmp / "sources.list").write_text("\n".join(lines) + "\n")
    for f in sorted((etc / "sources.list.d").glob("*.sources")):
        stanzas = []
        for stanza in re.split(r"\n\s*\n", f.read_text()):
            m = re.search(r"^Types:(.*)$", stanza, re.M)
            if m and "deb" in m.group(1).split() and not re.search(r"^Enabled:\s*no", stanza,
                                                                    re.M | re.I):
                stanzas.append(stanza[:m.start()] + "Types: deb-src" + stanza[m.end():])
        if stanzas:
            (parts / f.name).write_text("\n\n".join(stanzas) + "\n")
    opts = ["-o", f"Dir::Etc::SourceList={tmp / 'sources.list'}",
            "-o", f"Dir::Etc::SourceParts={parts}",
            "-o", f"Dir::State::Lists={tmp / 'lists'}",
            "-o", f"Dir::Cache={tmp / 'cache'}"]
    if os.geteuid() == 0:
        opts += ["-o", "APT::Sandbox::User=root"]
    return opts


def _patch_sections(patch_text: str, target: str) -> str:
    """The parts of a unified diff that change `target` (a path suffix)."""
    lines = patch_text.splitlines(keepends=True)
    out, keep = [], False
    for i, ln in enumerate(lines):
        if ln.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            new = lines[i + 1][4:].split("\t")[0].strip()
            keep = new.endswith(target)
        elif ln.startswith("diff ") or ln.startswith("Index: "):
            keep = False
        if keep:
            out.append(ln)
    return "".join(out)


def _fetch_plugin_header(source: str, dest: Path) -> None:
    """qemu-plugin.h of exactly the installed Debian source version: `apt-get source
    --download-only` through a private apt state (hash-verified through the signed Sources
    index, ~24 MB, no full unpack), then only include/qemu/qemu-plugin.h is extracted and any
    Debian patch touching it is applied."""
    if not shutil.which("apt-get"):
        raise RuntimeFailure("cannot fetch qemu-plugin.h: apt-get not found (place the header of "
                             f"your QEMU version at {dest})", device="qemu:setup")
    name, version = source.split(" ", 1)
    target = "include/qemu/qemu-plugin.h"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qemu-src.", dir=dest.parent) as td:
        tmp = Path(td)
        opts = _private_apt(tmp / "apt")
        _run(["apt-get", *opts, "-q", "update"], check=False)
        dl = tmp / "dl"
        dl.mkdir()
        res = _run(["apt-get", *opts, "-q", "source", "--download-only", "--only-source",
                    f"{name}={version}"], cwd=dl, check=False)
        if res.returncode != 0:
            raise RuntimeFailure(
                f"cannot download Debian source {name}={version} for qemu-plugin.h "
                f"(upgrade qemu-user to the version the mirror carries, or place the header at "
                f"{dest}): {res.stderr.strip()[-800:]}", device="qemu:setup")
        header = None
        for orig in sorted(dl.glob(f"{name}_*.orig*.tar.*")):
            with tarfile.open(orig) as tf:
                for member in tf:
                    if member.isfile() and member.name.endswith("/" + target):
                        header = tf.extractfile(member).read()
                        break
            if header:
                break
        if header is None:
            raise RuntimeFailure(f"{target} not found in the {name} source", device="qemu:setup")
        tree = tmp / "tree"
        (tree / "include" / "qemu").mkdir(parents=True)
        (tree / target).write_bytes(header)
        applied = []
        for deb in dl.glob(f"{name}_*.debian.tar.*"):
            with tarfile.open(deb) as tf:
                members = {m.name: m for m in tf if m.isfile()}
                series = members.get("debian/patches/series")
                names = []
                if series:
                    names = [ln.split()[0] for ln in tf.extractfile(series).read().decode()
                             .splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
                for pname in names:
                    m = members.get(f"debian/patches/{pname}")
                    if m is None:
                        continue
                    text = tf.extractfile(m).read().decode("utf-8", "replace")
                    if "qemu-plugin.h" not in text:
                        continue
                    part = _patch_sections(text, target)
                    if part:
                        _run(["patch", "-p1", "--forward", "--no-backup-if-mismatch", "-s",
                              "-d", str(tree)], input=part)
                        applied.append(pname)
        text = (tree / target).read_text()
        if "QEMU_PLUGIN_VERSION" not in text:
            raise RuntimeFailure("the fetched qemu-plugin.h has no QEMU_PLUGIN_VERSION",
                                 device="qemu:setup")
        write_text(dest, text)
        write_text(dest.with_name("SOURCE"), f"{name} {version}\npatches: "
                   f"{' '.join(applied) or 'none touch the header'}\n")


def _build(key_parts: list[bytes], out_dir: Path, build) -> Path:
    """Run `build(tmpdir)` once per content hash, into out_dir-<hash> (atomic)."""
    h = hashlib.sha256()
    for p in key_parts:
        h.update(hashlib.sha256(p).digest())
    final = out_dir.with_name(f"{out_dir.name}-{h.hexdigest()[:16]}")
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)     # atomic; never replaces a build another process published
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


_TOOLS: QemuTools | None = None
_TOOLS_LOCK = threading.Lock()


def setup_qemu(*, install: bool = True) -> QemuTools:
    """Make the qemu target usable and return the paths of its tools (cached per process).

    Installs APT_PACKAGES when missing (root only), fetches the plugin header of the installed
    qemu, builds plugins/insn_count.c and the aarch64 helper programs into
    ${POCKETFORMER_CACHE:-~/.cache/pocketformer}/qemu/ (atomically, keyed by content hash),
    and checks once that qemu loads the plugin."""
    global _TOOLS
    with _TOOLS_LOCK:
        if _TOOLS is not None:
            return _TOOLS
        if install:
            _ensure_packages()
        found = {n: shutil.which(n) for n in (QEMU_BIN, CROSS_CC, CROSS_CXX, "gcc", "unshare",
                                              "mount")}
        missing = [n for n, p in found.items() if not p]
        if missing:
            raise RuntimeFailure(f"missing tools {missing}; as root: apt-get install -y "
                                 f"{' '.join(APT_PACKAGES)}", device="qemu:setup")
        qemu = Path(found[QEMU_BIN])
        if not _is_dynamic_elf(qemu):
            raise RuntimeFailure(f"{qemu} is statically linked and cannot load TCG plugins; "
                                 "install the dynamic one: apt-get install qemu-user",
                                 device="qemu:setup")
        version, source = _qemu_versions(qemu)
        cache = cache_root()
        cache.mkdir(parents=True, exist_ok=True)

        tag = re.sub(r"[^A-Za-z0-9.+-]", "_", source.replace(" ", "_") or version)
        header = cache / "include" / tag / "qemu-plugin.h"
        if not header.is_file():
            if not source:
                raise RuntimeFailure(f"cannot tell which QEMU source built {qemu}; place its "
                                     f"qemu-plugin.h at {header}", device="qemu:setup")
            _fetch_plugin_header(source, header)

        gcc_v = _run(["gcc", "--version"]).stdout.encode()
        src = PLUGIN_SOURCE.read_bytes()

        def build_plugin(tmp: Path) -> None:
            _run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror",
                  f"-I{header.parent}", str(PLUGIN_SOURCE), "-o", str(tmp / "insn_count.so")])

        plugin = _build([src, header.read_bytes(), gcc_v], cache / "plugin",
                        build_plugin) / "insn_count.so"

        xgcc_v = _run([found[CROSS_CC], "--version"]).stdout.encode()

        def build_helpers(tmp: Path) -> None:
            for name, code in (("empty", _EMPTY_C), ("probe", _PROBE_C)):
                (tmp / f"{name}.c").write_text(code)
                _run([found[CROSS_CC], "-O1", str(tmp / f"{name}.c"), "-o", str(tmp / name)])

        helpers = _build([_EMPTY_C.encode(), _PROBE_C.encode(), xgcc_v], cache / "bin",
                         build_helpers)

        def build_spawn(tmp: Path) -> None:
            (tmp / "rusage_spawn.c").write_text(_SPAWN_C)
            _run(["gcc", "-O2", "-Wall", "-Werror", str(tmp / "rusage_spawn.c"), "-o",
                  str(tmp / "rusage_spawn")])

        spawn = _build([_SPAWN_C.encode(), gcc_v], cache / "host", build_spawn) / "rusage_spawn"

        listing = _run([str(qemu), "-cpu", "help"], check=False).stdout  # exits 1
        cpus = [ln.strip() for ln in listing.splitlines()[1:] if ln.strip()]
        cpus = [c for c in cpus if c != "max"]
        cpus += [c for c, (model, _) in CPU_FALLBACKS.items() if c not in cpus and model in cpus]

        tools = QemuTools(qemu=qemu, qemu_version=version, qemu_source_version=source,
                          plugin=plugin, plugin_header=header, cc=Path(found[CROSS_CC]),
                          cxx=Path(found[CROSS_CXX]), sysroot=Path(DEFAULT_SYSROOT),
                          cache_dir=cache, empty_program=helpers / "empty",
                          probe_program=helpers / "probe", spawn=spawn, cpus=tuple(sorted(cpus)))
        # Check that this qemu loads the plugin (header/ABI mismatch shows here, once).
        with tempfile.TemporaryDirectory(prefix="qemu-check.") as td:
            out = Path(td) / "count"
            res = _run([str(qemu), "-L", DEFAULT_SYSROOT, "-cpu", "cortex-a53", "-plugin",
                        f"{plugin},outfile={out}", str(tools.empty_program)], check=False)
            if res.returncode != 0 or not out.is_file():
                raise RuntimeFailure(f"qemu could not load {plugin}: {res.stderr.strip()[-800:]}",
                                     device="qemu:setup")
        _TOOLS = tools
        return tools


# ---------------------------------------------------------------------------------------------
# CPU models and the fake /proc/cpuinfo

_MODELS: dict[str, CpuModel] = {}


def _validate_cpu(cpu: str, tools: QemuTools) -> None:
    if not isinstance(cpu, str) or not cpu:
        raise BadInputError("a CPU model is required, e.g. qemu:cortex-a76", field="cpu")
    base = cpu.split(",", 1)[0]
    if base == "max":
        raise BadInputError(MAX_REFUSAL, field="cpu")
    if "," in cpu:
        raise BadInputError(f"CPU properties are not supported ({cpu!r}); use a plain model name",
                            field="cpu")
    if cpu not in tools.cpus:
        raise BadInputError(f"unknown CPU model {cpu!r} for {tools.qemu.name} "
                            f"{tools.qemu_version}; choose one of: {', '.join(tools.cpus)}",
                            field="cpu")


def cpu_model(cpu: str, tools: QemuTools | None = None) -> CpuModel:
    """The emulated model: what qemu runs, its MIDR and its Linux feature names, read from the
    emulator itself (hwcaps qemu hands the guest, MIDR_EL1), so the fake cpuinfo agrees with
    what the guest can execute."""
    tools = tools or setup_qemu()
    _validate_cpu(cpu, tools)
    if cpu in _MODELS:
        return _MODELS[cpu]
    qemu_cpu, midr_override = cpu, None
    listing = set(tools.cpus) - set(CPU_FALLBACKS)
    if cpu in CPU_FALLBACKS and cpu not in listing:
        qemu_cpu, midr_override = CPU_FALLBACKS[cpu]
    res = _run([str(tools.qemu), "-L", str(tools.sysroot), "-cpu", qemu_cpu,
                str(tools.probe_program)], check=False, timeout=60)
    vals = dict(ln.split() for ln in res.stdout.splitlines() if len(ln.split()) == 2)
    if res.returncode != 0 or not {"hwcap", "hwcap2", "midr"} <= vals.keys():
        raise RuntimeFailure(f"CPU probe failed: {res.stderr.strip()[-500:]}",
                             device=f"qemu:{cpu}")
    hw, hw2 = int(vals["hwcap"], 16), int(vals["hwcap2"], 16)
    feats = [n for i, n in enumerate(HWCAP_NAMES) if hw >> i & 1]
    feats += [n for i, n in enumerate(HWCAP2_NAMES) if hw2 >> i & 1]
    model = CpuModel(name=cpu, qemu_cpu=qemu_cpu,
                     midr=midr_override if midr_override is not None else int(vals["midr"], 16),
                     features=feats)
    _MODELS[cpu] = model
    return model


def cpu_features(cpu: str) -> list[str]:
    return list(cpu_model(cpu).features)


def fake_cpuinfo(cpu: str, n_cpus: int | None = None) -> str:
    """An arm64 Linux /proc/cpuinfo for `cpu`, one block per logical CPU."""
    m = cpu_model(cpu)
    n = n_cpus or os.cpu_count() or 1
    block = ("processor\t: {i}\n"
             "BogoMIPS\t: 50.00\n"
             f"Features\t: {' '.join(m.features)}\n"
             f"CPU implementer\t: {m.implementer:#04x}\n"
             "CPU architecture: 8\n"
             f"CPU variant\t: {m.variant:#x}\n"
             f"CPU part\t: {m.part:#05x}\n"
             f"CPU revision\t: {m.revision}\n\n")
    return "".join(block.format(i=i) for i in range(n))


def qemu_device(cpu: str) -> dict:
    """Device context for a result (like host_device() for the host target)."""
    tools = setup_qemu()
    m = cpu_model(cpu, tools)
    return {"target": f"qemu:{cpu}", "machine": "aarch64 (emulated)",
            "cpu": m.part_name, "qemu_cpu": m.qemu_cpu, "midr": f"{m.midr:#010x}",
            "features": list(m.features), "emulator": f"qemu-aarch64 {tools.qemu_version} TCG",
            "logical_cores": os.cpu_count(),
            "notes": "emulated: wall time is not device latency; instruction counts compare "
                     "artifacts on this CPU model; no cache or memory-latency model"}


# ---------------------------------------------------------------------------------------------
# running

def _check_binary(cmd: list[str], cwd) -> Path:
    if not cmd:
        raise BadInputError("empty command", field="cmd")
    path = Path(cmd[0])
    if not path.is_absolute() and cwd is not None:
        path = Path(cwd) / path
    if not path.is_file():
        raise BadInputError("aarch64 program not found", file=str(cmd[0]))
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF" or len(head) < 20 or int.from_bytes(head[18:20], "little") != 183:
        raise BadInputError("not an aarch64 ELF executable", file=str(cmd[0]))
    return path


def _wrap_namespace(fake: Path, argv: list[str]) -> list[str]:
    """Run argv in a private mount namespace where `fake` is bind-mounted on /proc/cpuinfo.
    `unshare -m` makes mounts private (util-linux's default propagation), so the host's
    /proc/cpuinfo is never affected. Non-root users get a user namespace (-r) as well."""
    script = (f'mount --bind "$0" /proc/cpuinfo || {{ echo "{_MOUNT_FAIL}" >&2; '
              f'exit {_MOUNT_FAIL_RC}; }}; exec "$@"')
    ns = ["unshare", "-m", "--propagation", "private"]
    if os.geteuid() != 0:
        ns.insert(1, "-r")
    return [*ns, "--", "/bin/sh", "-c", script, str(fake), *argv]


def qemu_prefix(cpu: str, *, workdir: str | os.PathLike,
                sysroot: str | os.PathLike = DEFAULT_SYSROOT,
                count_file: str | os.PathLike | None = None, count_mode: str = "tb",
                fake_cpuinfo_file: bool = True) -> list[str]:
    """The command prefix run_qemu uses, for callers that launch the program themselves
    (e.g. native.run_native(prefix=...)): `[unshare ... sh -c 'mount --bind ...' qemu-aarch64
    -L sysroot -cpu model [-plugin insn_count.so,outfile=count_file]]`. The fake cpuinfo is
    written into `workdir`, which must outlive the run; read the count with read_count()."""
    tools = setup_qemu()
    model = cpu_model(cpu, tools)
    argv = [str(tools.qemu), "-L", str(sysroot), "-cpu", model.qemu_cpu]
    if count_file is not None:
        if count_mode not in ("tb", "inline"):
            raise BadInputError("count_mode must be 'tb' or 'inline'", field="count_mode")
        if "," in str(count_file):
            raise BadInputError("the count file path may not contain ','", file=str(count_file))
        argv += ["-plugin", f"{tools.plugin},outfile={count_file},mode={count_mode}"]
    if fake_cpuinfo_file:
        fake = Path(workdir) / f"cpuinfo-{cpu}"
        write_text(fake, fake_cpuinfo(cpu))
        argv = _wrap_namespace(fake, argv)
    return argv


def read_count(count_file: str | os.PathLike) -> dict:
    """Parse the plugin's output file."""
    vals = dict(ln.split(None, 1) for ln in Path(count_file).read_text().splitlines()
                if " " in ln)
    mode = vals.get("mode", "tb").strip()
    vcpus = int(vals.get("vcpus", "1"))
    return {"instructions": int(vals["insns"]), "vcpus": vcpus, "count_mode": mode,
            "instructions_exact": mode == "tb" or vcpus <= 1,
            "main_thread_instructions": int(vals["insns_vcpu0"]) if "insns_vcpu0" in vals
            else None}


def run_qemu(cmd: list[str], cpu: str, *, sysroot: str | os.PathLike = DEFAULT_SYSROOT,
             count_instructions: bool = True, env: dict | None = None,
             timeout: float | None = None, cwd: str | os.PathLike | None = None,
             count_mode: str = "tb", fake_cpuinfo_file: bool = True,
             check: bool = False) -> QemuRun:
    """Run the aarch64 program `cmd` (cmd[0] is its path) under qemu-aarch64 -cpu `cpu`.

    env: variables added to the environment (the guest inherits qemu's environment).
    count_mode: "tb" (exact with threads) or "inline" (faster, single-threaded only).
    A guest that exits non-zero is returned as is (check=True raises); qemu failing, the guest
    dying from a signal, or a timeout raise RuntimeFailure naming the device qemu:<cpu>."""
    if isinstance(cpu, str) and cpu.split(",", 1)[0] == "max":
        raise BadInputError(MAX_REFUSAL, field="cpu")
    if count_mode not in ("tb", "inline"):
        raise BadInputError("count_mode must be 'tb' or 'inline'", field="count_mode")
    cmd = [str(c) for c in cmd]
    _check_binary(cmd, cwd)
    if not Path(sysroot).is_dir():
        raise BadInputError("aarch64 sysroot not found", file=str(sysroot), field="sysroot")
    tools = setup_qemu()
    model = cpu_model(cpu, tools)
    device = f"qemu:{cpu}"

    with tempfile.TemporaryDirectory(prefix="pf-qemu.") as td:
        tmp = Path(td)
        os.chmod(tmp, 0o755)
        count_file = tmp / "insn_count.txt"
        argv = [*qemu_prefix(cpu, workdir=tmp, sysroot=sysroot,
                             count_file=count_file if count_instructions else None,
                             count_mode=count_mode, fake_cpuinfo_file=fake_cpuinfo_file), *cmd]
        run_env = dict(os.environ)
        if env:
            run_env.update({str(k): str(v) for k, v in env.items()})
        report = tmp / "rusage.txt"
        argv = [str(tools.spawn), str(report), *argv]
        out_f = open(tmp / "stdout", "w+b")
        err_f = open(tmp / "stderr", "w+b")
        try:
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f,
                                    cwd=cwd, env=run_env, start_new_session=True)
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except BaseException as exc:  # timeout, Ctrl-C: never leave qemu running
                timed_out = isinstance(exc, subprocess.TimeoutExpired)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if not timed_out:
                    raise
            wall = time.perf_counter() - t0
            out_f.seek(0)
            err_f.seek(0)
            stdout = out_f.read().decode("utf-8", "replace")
            stderr = err_f.read().decode("utf-8", "replace")
        finally:
            out_f.close()
            err_f.close()
        # Resource usage of qemu itself, from wait4 in the launcher (see _SPAWN_C).
        usage = {}
        if report.is_file():
            usage = dict(ln.split(None, 1) for ln in report.read_text().splitlines() if " " in ln)
        peak_rss_mb = int(usage["maxrss_kb"]) / 1024.0 if "maxrss_kb" in usage else float("nan")

        rc = proc.returncode
        if timed_out:
            raise RuntimeFailure(f"timed out after {timeout}s (emulated): {' '.join(cmd)}",
                                 device=device)
        if rc == _MOUNT_FAIL_RC and _MOUNT_FAIL in stderr:
            raise RuntimeFailure("cannot bind-mount the fake /proc/cpuinfo in a private mount "
                                 "namespace (needs root or unprivileged user namespaces): "
                                 + stderr.strip()[-300:], device=device)
        qemu_msgs = [ln for ln in stderr.splitlines()
                     if ln.startswith(("qemu-aarch64:", "qemu: ", "insn_count:"))]
        if rc < 0 or (qemu_msgs and rc != 0):
            what = f"killed by signal {-rc}" if rc < 0 else f"exit {rc}"
            raise RuntimeFailure(f"qemu run failed ({what}): {' '.join(cmd)}\n"
                                 + "\n".join((qemu_msgs or stderr.splitlines())[-10:]),
                                 device=device)
        if check and rc != 0:
            raise RuntimeFailure(f"program exited {rc}: {' '.join(cmd)}\n{stderr.strip()[-800:]}",
                                 device=device)

        instructions = vcpus = exact = main = None
        if count_instructions:
            if not count_file.is_file():
                raise RuntimeFailure("the instruction-count plugin wrote no result "
                                     f"(exit {rc}): {stderr.strip()[-500:]}", device=device)
            counts = read_count(count_file)
            instructions, vcpus = counts["instructions"], counts["vcpus"]
            exact, main = counts["instructions_exact"], counts["main_thread_instructions"]

    return QemuRun(cmd=cmd, cpu=cpu, qemu_cpu=model.qemu_cpu, features=list(model.features),
                   returncode=rc, stdout=stdout, stderr=stderr, wall_s=wall,
                   instructions=instructions, peak_rss_mb=peak_rss_mb,
                   vcpus=vcpus, instructions_exact=exact,
                   count_mode=count_mode if count_instructions else None,
                   main_thread_instructions=main, device=device)


_BASELINES: dict[tuple, QemuRun] = {}


def baseline(cpu: str, *, count_mode: str = "tb") -> QemuRun:
    """qemu running an empty aarch64 program (`int main(){return 0;}`, dynamically linked):
    the emulator's own RSS (translator buffers, loader) and the instructions the dynamic loader
    and libc start-up execute. Subtract from a measured run; cached per process."""
    key = (cpu, count_mode)
    if key not in _BASELINES:
        tools = setup_qemu()
        _BASELINES[key] = run_qemu([str(tools.empty_program)], cpu, count_mode=count_mode,
                                   check=True)
    return _BASELINES[key]


def rss_over_baseline_mb(run: QemuRun, base: QemuRun) -> float:
    """Peak RSS attributable to the program: qemu's peak minus the empty-program peak."""
    return max(0.0, run.peak_rss_mb - base.peak_rss_mb)


def per_inference(run_a: QemuRun, run_b: QemuRun, n_a: int, n_b: int, *,
                  main_thread: bool = False) -> float:
    """Instructions per inference from two runs that differ only in the number of timed
    inferences: (I_b - I_a) / (n_b - n_a). Loading, start-up, warm-up and teardown cancel.

    main_thread=True uses the main thread's count only: right for runners benchmarked with one
    thread, whose runtime still starts (idle, spinning) pool threads; their timing-dependent
    spinning otherwise adds noise of a few thousand instructions per run."""
    if n_a == n_b:
        raise BadInputError("the two runs must differ in the number of inferences", field="runs")
    attr = "main_thread_instructions" if main_thread else "instructions"
    i_a, i_b = getattr(run_a, attr), getattr(run_b, attr)
    if i_a is None or i_b is None:
        raise BadInputError(f"both runs need {attr.replace('_', ' ')} (count_instructions=True"
                            + (", count_mode='tb')" if main_thread else ")"), field="instructions")
    if run_a.cpu != run_b.cpu:
        raise BadInputError(f"runs on different CPU models ({run_a.cpu} vs {run_b.cpu})",
                            field="cpu")
    if not (run_a.instructions_exact and run_b.instructions_exact):
        raise BadInputError("instruction counts are not exact (mode=inline with threads); "
                            "use count_mode='tb'", field="count_mode")
    return (i_b - i_a) / (n_b - n_a)


__all__ = ["APT_PACKAGES", "KNOWN_CPUS", "CPU_FALLBACKS", "QemuTools", "QemuRun", "CpuModel",
           "setup_qemu", "run_qemu", "baseline", "per_inference", "rss_over_baseline_mb",
           "cpu_model", "cpu_features", "fake_cpuinfo", "qemu_device", "cache_root",
           "qemu_prefix", "read_count"]
