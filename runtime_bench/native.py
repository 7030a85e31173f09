"""Native (C++) benchmark runners for ExecuTorch and ONNX Runtime, built by the tool.

The sources live in `native/` beside this module: `et_bench.cpp` (ExecuTorch Module API),
`ort_bench.cpp` (ONNX Runtime C API) and `bench_common.h` (argument parsing, timing, JSON;
C library only). Both runners take the same command line and write the same JSON
(see bench_common.h and docs/native_runners.md).

Runtime libraries are fetched once, pinned and sha256-checked, into
`${POCKETFORMER_CACHE:-~/.cache/pocketformer}/native/`:

- ExecuTorch x86_64: the installed `executorch` wheel's `lib/*.so` and `include/`.
- ExecuTorch aarch64: the same version's manylinux_2_28_aarch64 wheel (`pip download`).
- ONNX Runtime Linux x64/arm64: `onnxruntime-node@1.30.0` from the npm registry.
- ONNX Runtime Android arm64 + C API headers: `com.github.asus4.onnxruntime@0.4.9` (its AAR).

A built runner is a directory {binary, libs} with an `$ORIGIN` rpath, so it can be copied to a
device as is. Builds are cached: a stamp holds the hash of sources, compiler, flags and library
checksums; a build goes to a temporary directory that is renamed into place.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pocketformer import fsutil
from pocketformer.errors import BadInputError, RuntimeFailure

ARCHS = ("x86_64", "aarch64", "android-arm64")
RUNTIMES = ("executorch", "onnxruntime")
BINARIES = {"executorch": "pf-et-bench", "onnxruntime": "pf-ort-bench"}
SRC_DIR = Path(__file__).resolve().parent / "native"
BUILD_SCHEMA = 1     # bump to invalidate every cached build

NPM = "https://registry.npmjs.org/"


@dataclass(frozen=True)
class Pinned:
    """A downloaded archive, pinned by URL and sha256."""
    name: str
    url: str
    sha256: str


ORT_NODE = Pinned("onnxruntime-node-1.30.0.tgz",
                  NPM + "onnxruntime-node/-/onnxruntime-node-1.30.0.tgz",
                  "6e3390d6b783e7be946fad629292799da28d0b42f84856e50d2c1b0383291e75")
ORT_ANDROID = Pinned("com.github.asus4.onnxruntime-0.4.9.tgz",
                     NPM + "com.github.asus4.onnxruntime/-/com.github.asus4.onnxruntime-0.4.9.tgz",
                     "e59788788818fdde1b2e522e766a21ba0f7d8391de55737abf81e32cc801785d")
ORT_LINUX_VERSION = "1.30.0"     # onnxruntime-node@1.30.0 carries ORT 1.30.0
ORT_ANDROID_VERSION = "1.29"     # the AAR inside com.github.asus4.onnxruntime@0.4.9
# Files inside ORT_NODE per Linux arch.
ORT_NODE_LIBS = {"x86_64": "package/bin/napi-v6/linux/x64/libonnxruntime.so.1",
                 "aarch64": "package/bin/napi-v6/linux/arm64/libonnxruntime.so.1"}
# sha256 of the executorch manylinux_2_28_aarch64 cp311 wheel, per ExecuTorch version.
ET_AARCH64_WHEELS = {
    "1.5.1": ("executorch-1.5.1-cp311-cp311-manylinux_2_28_aarch64.whl",
              "8ee02348a3ea80ddf770822911ebf78da616b73afce0fbaaa79f23311c88c66a"),
}
# The wheel's libraries a runner links and ships. The quantized kernels are needed by
# quantized (int8 / 8da4w) programs; the XNNPACK delegate registers itself from a static
# initializer, so all of these are linked with --no-as-needed.
ET_LIBS = ("libexecutorch.so", "libexecutorch_kernels_optimized.so",
           "libexecutorch_kernels_quantized.so", "libexecutorch_backend_xnnpack.so",
           "libexecutorch_threadpool.so")
ET_DEFINES = ("-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_EVENT_TRACER_ENABLED", "-DET_USE_THREADPOOL")

# Tool -> Debian package, per target arch; "run" tools are needed to execute (emulate) only.
TOOLS = {
    "x86_64": {"g++": "g++", "readelf": "binutils"},
    "aarch64": {"aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu", "qemu-aarch64": "qemu-user"},
    "android-arm64": {"clang": "clang", "ld.lld": "lld", "readelf": "binutils"},
}
ANDROID_TARGET = "aarch64-linux-android24"
AARCH64_SYSROOT = Path("/usr/aarch64-linux-gnu")


def apt_packages(archs=ARCHS) -> list[str]:
    """The Debian packages the native runners need (for scripts/setup.sh)."""
    out: list[str] = []
    for arch in archs:
        for pkg in TOOLS[arch].values():
            if pkg not in out:
                out.append(pkg)
    return out


@dataclass
class RunnerBundle:
    runtime: str
    arch: str
    binary: Path
    libs: list[Path]
    dir: Path
    runtime_version: str
    runnable_here: bool = True          # android binaries are build-only on this host
    build: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(binary=str(self.binary), dir=str(self.dir), libs=[str(p) for p in self.libs])
        return d


# ----------------------------------------------------------------------------- cache, fetching

def cache_root() -> Path:
    base = os.environ.get("POCKETFORMER_CACHE") or str(Path.home() / ".cache" / "pocketformer")
    return Path(base).expanduser() / "native"


def _log(msg: str) -> None:
    try:
        from pocketformer.progress import say
        say(msg)
    except Exception:  # pragma: no cover - progress is optional here
        print(msg, file=sys.stderr)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verified(path: Path, sha256: str) -> bool:
    return path.is_file() and fsutil.sha256_file(path) == sha256


def fetch(pin: Pinned) -> Path:
    """Download `pin` into the cache (once), verify its sha256, return its path."""
    path = cache_root() / "downloads" / pin.name
    if _verified(path, pin.sha256):
        return path
    _log(f"native: downloading {pin.url}")
    try:
        with urllib.request.urlopen(pin.url, timeout=300) as r:
            data = r.read()
    except Exception as e:
        raise RuntimeFailure(f"download failed: {e}", file=pin.url) from e
    got = _sha256_bytes(data)
    if got != pin.sha256:
        raise RuntimeFailure(f"sha256 mismatch: expected {pin.sha256}, got {got}", file=pin.url)
    fsutil.write_bytes(path, data)
    return path


def _extract_members(archive: Path, members: dict[str, str], dest: Path) -> None:
    """Copy archive members (tar or zip) to dest/<name>; `members` maps member -> name."""
    with fsutil.atomic_dir(dest) as tmp:
        found = set()
        if archive.suffix in (".tgz", ".gz"):
            with tarfile.open(archive) as tf:
                for m in tf:
                    if m.name in members and m.isfile():
                        out = tmp / members[m.name]
                        out.parent.mkdir(parents=True, exist_ok=True)
                        out.write_bytes(tf.extractfile(m).read())
                        found.add(m.name)
        else:
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    if name in members:
                        out = tmp / members[name]
                        out.parent.mkdir(parents=True, exist_ok=True)
                        out.write_bytes(zf.read(name))
                        found.add(name)
        missing = set(members) - found
        if missing:
            raise RuntimeFailure(f"archive lacks {sorted(missing)}", file=str(archive))


def _ort_headers_and_android() -> tuple[Path, Path]:
    """(C API header dir, Android arm64 lib dir) from the AAR in com.github.asus4.onnxruntime."""
    dest = cache_root() / "sdk" / f"onnxruntime-{ORT_ANDROID_VERSION}-android"
    stamp = dest / ".sha256"
    if not (stamp.is_file() and stamp.read_text().strip() == ORT_ANDROID.sha256):
        archive = fetch(ORT_ANDROID)
        with tarfile.open(archive) as tf:
            aar = tf.extractfile("package/Plugins/Android/onnxruntime.aar").read()
        with fsutil.atomic_dir(dest) as tmp:
            with zipfile.ZipFile(io.BytesIO(aar)) as zf:
                for name in zf.namelist():
                    if name.startswith("headers/") and name.endswith((".h", ".inc")):
                        out = tmp / "include" / Path(name).name
                    elif name == "jni/arm64-v8a/libonnxruntime.so":
                        out = tmp / "android-arm64" / "libonnxruntime.so"
                    else:
                        continue
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(zf.read(name))
            (tmp / ".sha256").write_text(ORT_ANDROID.sha256 + "\n")
    return dest / "include", dest / "android-arm64"


def _ort_linux_lib(arch: str) -> Path:
    dest = cache_root() / "sdk" / f"onnxruntime-{ORT_LINUX_VERSION}-linux-{arch}"
    stamp = dest / ".sha256"
    if not (stamp.is_file() and stamp.read_text().strip() == ORT_NODE.sha256):
        archive = fetch(ORT_NODE)
        with fsutil.atomic_dir(dest) as tmp:
            with tarfile.open(archive) as tf:
                data = tf.extractfile(ORT_NODE_LIBS[arch]).read()
            (tmp / "libonnxruntime.so.1").write_bytes(data)
            (tmp / ".sha256").write_text(ORT_NODE.sha256 + "\n")
    return dest / "libonnxruntime.so.1"


def executorch_version() -> str:
    from executorch.version import __version__
    return __version__.split("+")[0]


def _installed_executorch_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("executorch")
    if spec is None:
        raise RuntimeFailure("the executorch Python package is not installed")
    for loc in spec.submodule_search_locations or []:
        if (Path(loc) / "lib" / "libexecutorch.so").is_file():
            return Path(loc)
    raise RuntimeFailure("the installed executorch wheel ships no lib/libexecutorch.so")


def _executorch_sdk(arch: str) -> Path:
    """A directory with lib/ and include/ of ExecuTorch for `arch`."""
    if arch == "x86_64":
        return _installed_executorch_dir()
    if arch != "aarch64":
        raise RuntimeFailure(f"no ExecuTorch libraries for {arch}")
    version = executorch_version()
    if version not in ET_AARCH64_WHEELS:
        raise RuntimeFailure(f"no pinned aarch64 wheel for executorch {version}; add its name and "
                             f"sha256 to ET_AARCH64_WHEELS in runtime_bench/native.py")
    wheel_name, sha = ET_AARCH64_WHEELS[version]
    dest = cache_root() / "sdk" / f"executorch-{version}-aarch64"
    stamp = dest / ".sha256"
    if stamp.is_file() and stamp.read_text().strip() == sha:
        return dest
    wheel = cache_root() / "downloads" / wheel_name
    if not _verified(wheel, sha):
        wheel.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=wheel.parent) as td:
            cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps",
                   "--platform", "manylinux_2_28_aarch64", "--python-version", "3.11",
                   f"executorch=={version}", "-d", td]
            _log("native: " + " ".join(cmd))
            r = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(td) / wheel_name
            if r.returncode != 0 or not got.is_file():
                raise RuntimeFailure(f"pip download of the aarch64 executorch wheel failed: "
                                     f"{_tail(r.stderr or r.stdout)}")
            if fsutil.sha256_file(got) != sha:
                raise RuntimeFailure(f"sha256 mismatch for {wheel_name}", file=str(got))
            wheel.parent.mkdir(parents=True, exist_ok=True)
            os.replace(got, wheel)
    with fsutil.atomic_dir(dest) as tmp:
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.startswith(("executorch/lib/", "executorch/include/")) and not name.endswith("/"):
                    out = tmp / name[len("executorch/"):]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(zf.read(name))
        (tmp / ".sha256").write_text(sha + "\n")
    return dest


# ----------------------------------------------------------------------------- toolchains

def missing_tools(arch: str, *, for_running: bool = False) -> dict[str, str]:
    """Tools (-> Debian package) missing for building (and, if asked, running) on `arch`."""
    tools = dict(TOOLS[arch])
    if not for_running:
        tools.pop("qemu-aarch64", None)
    return {t: p for t, p in tools.items() if shutil.which(t) is None}


def can_apt_install() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


def apt_install(pkgs: list[str]) -> None:
    """`apt-get install -y` (root), retried once after `apt-get update`; RuntimeFailure if not.
    The one installer the setup steps share (runners, Android tools, llama.cpp)."""
    if not pkgs:
        return
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *pkgs]
    _log("setup: " + " ".join(cmd))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, env=env)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeFailure(f"apt-get install {' '.join(pkgs)} failed: {_tail(r.stderr)}")


def ensure_toolchain(arch: str, *, install_missing: bool = False, for_running: bool = False) -> None:
    missing = missing_tools(arch, for_running=for_running)
    if arch == "aarch64" and not (AARCH64_SYSROOT / "lib").is_dir():
        missing.setdefault("aarch64 glibc", "g++-aarch64-linux-gnu")
    if not missing:
        return
    pkgs = sorted(set(missing.values()))
    if install_missing and can_apt_install():
        apt_install(pkgs)
        missing = missing_tools(arch, for_running=for_running)
        if not missing:
            return
    raise RuntimeFailure(f"toolchain for {arch} missing: {', '.join(sorted(missing))}; install with "
                         f"`apt-get install {' '.join(pkgs)}` (scripts/setup.sh does this)")


def _tool_version(tool: str) -> str:
    try:
        r = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30)
        return (r.stdout or r.stderr).splitlines()[0].strip()
    except Exception:
        return "unknown"


def _tail(text: str | None, n: int = 2000) -> str:
    text = (text or "").strip()
    return text[-n:]


# ----------------------------------------------------------------------------- build

def _android_sysroot(objects: list[Path], work: Path) -> Path:
    """A stub libc.so defining the symbols `objects` use (for linking only, never run)."""
    r = subprocess.run(["readelf", "-sW", *map(str, objects)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeFailure(f"readelf failed: {_tail(r.stderr)}")
    undefined = set()
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[6] == "UND" and parts[7] and parts[4] in ("GLOBAL", "WEAK"):
            undefined.add(parts[7])
    undefined -= {"OrtGetApiBase", "main"}
    data = {"stderr", "stdout", "stdin", "environ", "__sF"}
    asm = [".text"]
    for sym in sorted(undefined - data):
        asm += [f".globl {sym}", f".type {sym},%function", f"{sym}:", "  ret"]
    asm.append(".data")
    for sym in sorted(undefined & data):
        asm += [f".globl {sym}", f".type {sym},%object", f".size {sym},8", ".balign 8", f"{sym}:",
                "  .quad 0"]
    sysroot = work / "android-sysroot"
    sysroot.mkdir(parents=True, exist_ok=True)
    (sysroot / "libc_stub.S").write_text("\n".join(asm) + "\n")
    _run(["clang", f"--target={ANDROID_TARGET}", "-shared", "-nostdlib", "-fuse-ld=lld",
          "-Wl,-soname,libc.so", str(sysroot / "libc_stub.S"), "-o", str(sysroot / "libc.so")])
    return sysroot


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        raise RuntimeFailure(f"build command failed ({r.returncode}): {' '.join(cmd)}\n"
                             f"{_tail(r.stderr or r.stdout, 4000)}")


def _plan(runtime: str, arch: str) -> dict:
    """Everything a build depends on: sources, libraries (with checksums), commands."""
    common = SRC_DIR / "bench_common.h"
    if runtime == "executorch":
        if arch == "android-arm64":
            raise RuntimeFailure(
                "ExecuTorch runner for android-arm64 is not supported: the only Android ExecuTorch "
                "library reachable here (npm react-native-executorch) is built against the NDK's "
                "libc++ (std::__ndk1) and an older ExecuTorch; our Module-API runner cannot be "
                "compiled against it without NDK headers. See docs/native_runners.md.")
        sdk = _executorch_sdk(arch)
        libs = [sdk / "lib" / name for name in ET_LIBS]
        for p in libs:
            if not p.is_file():
                raise RuntimeFailure(f"ExecuTorch library missing for {arch}", file=str(p))
        cxx = "g++" if arch == "x86_64" else "aarch64-linux-gnu-g++"
        inc = sdk / "include"
        version = executorch_version()
        compile_flags = ["-std=c++17", "-O2", "-fPIE", *ET_DEFINES,
                         f'-DPF_RUNTIME_VERSION="{version}"',
                         f"-I{inc}", f"-I{inc / 'executorch/runtime/core/portable_type/c10'}"]
        link = ["-pie", "-Wl,--no-as-needed", *[f"-l:{p.name}" for p in libs], "-Wl,--as-needed",
                "-Wl,-rpath,$ORIGIN", "-Wl,--enable-new-dtags"]
        return {"runtime": runtime, "arch": arch, "version": version, "compiler": cxx,
                "sources": [SRC_DIR / "et_bench.cpp", common], "libs": libs,
                "compile": compile_flags, "link": link, "lib_dir": sdk / "lib"}
    # onnxruntime
    headers, android_dir = _ort_headers_and_android()
    flags = ["-std=c++17", "-O2", "-fno-exceptions", "-fno-rtti", f"-I{headers}"]
    if arch == "android-arm64":
        resource = subprocess.run(["clang", "-print-resource-dir"], capture_output=True,
                                  text=True).stdout.strip()
        lib = android_dir / "libonnxruntime.so"
        # No NDK here: the C-library-only source compiles against the aarch64 glibc headers
        # (same LP64 ABI for every call it makes) and links against a stub libc.so; Bionic
        # provides the real symbols on the device.
        flags = [f"--target={ANDROID_TARGET}", *flags, "-fPIE", "-fno-stack-protector",
                 "-fno-unwind-tables", "-fno-asynchronous-unwind-tables", "-nostdinc", "-nostdinc++",
                 "-isystem", f"{resource}/include", "-isystem", str(AARCH64_SYSROOT / "include")]
        link = [f"--target={ANDROID_TARGET}", "-fuse-ld=lld", "-nostdlib", "-pie",
                "-Wl,--dynamic-linker=/system/bin/linker64", "-Wl,-z,now",
                "-Wl,--allow-shlib-undefined", "-Wl,-rpath,$ORIGIN", "-Wl,--enable-new-dtags"]
        return {"runtime": runtime, "arch": arch, "version": ORT_ANDROID_VERSION, "compiler": "clang++",
                "sources": [SRC_DIR / "ort_bench.cpp", common, SRC_DIR / "android_start.c"],
                "libs": [lib], "compile": flags, "link": link, "lib_dir": android_dir}
    lib = _ort_linux_lib(arch)
    cxx = "g++" if arch == "x86_64" else "aarch64-linux-gnu-g++"
    link = ["-pie", f"-l:{lib.name}", "-Wl,-rpath,$ORIGIN", "-Wl,--enable-new-dtags"]
    return {"runtime": runtime, "arch": arch, "version": ORT_LINUX_VERSION, "compiler": cxx,
            "sources": [SRC_DIR / "ort_bench.cpp", common], "libs": [lib],
            "compile": [*flags, "-fPIE"], "link": link, "lib_dir": lib.parent}


def _stamp_key(plan: dict) -> str:
    h = hashlib.sha256()
    h.update(f"schema={BUILD_SCHEMA}\n".encode())
    h.update(f"compiler={plan['compiler']} {_tool_version(plan['compiler'])}\n".encode())
    h.update(("flags=" + " ".join(plan["compile"] + plan["link"]) + "\n").encode())
    for src in plan["sources"]:
        h.update(f"src={src.name}:{fsutil.sha256_file(src)}\n".encode())
    for lib in plan["libs"]:
        h.update(f"lib={lib.name}:{fsutil.sha256_file(lib)}\n".encode())
    return h.hexdigest()


def bundle_dir(runtime: str, arch: str) -> Path:
    return cache_root() / "runners" / f"{runtime}-{arch}"


def build_runner(runtime: str, arch: str, *, force: bool = False,
                 install_missing: bool = False) -> RunnerBundle:
    """Build (or reuse) the native runner of `runtime` for `arch`; see the module docstring."""
    if runtime not in RUNTIMES:
        raise BadInputError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}",
                            field="runtime")
    if arch not in ARCHS:
        raise BadInputError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}", field="arch")
    ensure_toolchain(arch, install_missing=install_missing)
    plan = _plan(runtime, arch)
    key = _stamp_key(plan)
    dest = bundle_dir(runtime, arch)
    binary_name = BINARIES[runtime]
    stamp_path = dest / ".stamp.json"
    if not force and stamp_path.is_file():
        try:
            stamp = json.loads(stamp_path.read_text())
        except ValueError:
            stamp = {}
        if stamp.get("key") == key and (dest / binary_name).is_file():
            return _bundle(plan, dest, stamp)

    _log(f"native: building {binary_name} for {arch} ({runtime} {plan['version']})")
    start = time.perf_counter()
    with fsutil.atomic_dir(dest) as tmp:
        for lib in plan["libs"]:
            shutil.copy2(lib, tmp / lib.name)
        out = tmp / binary_name
        main_src = plan["sources"][0]
        if arch == "android-arm64":
            work = tmp / ".build"
            work.mkdir()
            obj = work / "ort_bench.o"
            start_obj = work / "android_start.o"
            _run(["clang++", *plan["compile"], "-c", str(main_src), "-o", str(obj)])
            _run(["clang", f"--target={ANDROID_TARGET}", "-O2", "-fPIE", "-fno-stack-protector",
                  "-c", str(SRC_DIR / "android_start.c"), "-o", str(start_obj)])
            sysroot = _android_sysroot([obj, start_obj], work)
            _run(["clang", *plan["link"], str(start_obj), str(obj), f"-L{sysroot}", "-lc",
                  str(tmp / "libonnxruntime.so"), "-o", str(out)])
            shutil.rmtree(work)
        else:
            _run([plan["compiler"], *plan["compile"], str(main_src), "-o", str(out),
                  f"-L{tmp}", *plan["link"]])
        stamp = {"key": key, "runtime": runtime, "arch": arch, "runtime_version": plan["version"],
                 "compiler": f"{plan['compiler']} ({_tool_version(plan['compiler'])})",
                 "compile_flags": plan["compile"], "link_flags": plan["link"],
                 "libs": {lib.name: fsutil.sha256_file(lib) for lib in plan["libs"]},
                 "sources": {s.name: fsutil.sha256_file(s) for s in plan["sources"]},
                 "build_s": round(time.perf_counter() - start, 2)}
        (tmp / ".stamp.json").write_text(json.dumps(stamp, indent=2) + "\n")
    return _bundle(plan, dest, stamp)


def _bundle(plan: dict, dest: Path, stamp: dict) -> RunnerBundle:
    arch = plan["arch"]
    return RunnerBundle(runtime=plan["runtime"], arch=arch, binary=dest / BINARIES[plan["runtime"]],
                        libs=[dest / lib.name for lib in plan["libs"]], dir=dest,
                        runtime_version=plan["version"], runnable_here=arch != "android-arm64",
                        build=stamp)


def setup_runners(archs=ARCHS, runtimes=RUNTIMES, *, force: bool = False,
                  install_missing: bool = True) -> dict:
    """Build every runner; errors are collected per runtime/arch (and logged), not raised."""
    summary: dict = {"cache": str(cache_root()), "runners": {}, "errors": {}}
    for arch in archs:
        for runtime in runtimes:
            name = f"{runtime}-{arch}"
            start = time.perf_counter()
            try:
                b = build_runner(runtime, arch, force=force, install_missing=install_missing)
            except Exception as e:  # collected: one arch failing must not stop the others
                msg = getattr(e, "message", None) or str(e)
                summary["errors"][name] = msg
                _log(f"native: {name}: FAILED: {msg.splitlines()[0] if msg else e!r}")
                continue
            summary["runners"][name] = {"binary": str(b.binary), "dir": str(b.dir),
                                        "runtime_version": b.runtime_version,
                                        "libs": [str(p) for p in b.libs],
                                        "runnable_here": b.runnable_here,
                                        "seconds": round(time.perf_counter() - start, 2)}
            _log(f"native: {name}: ok ({b.binary})")
    return summary


# ----------------------------------------------------------------------------- running

def run_native(bundle: RunnerBundle, model: str | os.PathLike, *,
               inputs: list[tuple[Path, str, list[int]]] | None = None, seed: int = 0,
               warmup: int, runs: int, threads: int, values: int = 8,
               prefix: list[str] | None = None, timeout: float | None = None,
               env: dict | None = None) -> dict:
    """Run a native runner and return its JSON (see bench_common.h for the fields).

    `inputs`: (raw file, dtype, shape) in the model's input order, e.g. from npz_to_raw; None
    fills the inputs from `seed` using the model's metadata. `prefix` wraps the command (QEMU).
    Raises RuntimeFailure (with the stderr tail and `.returncode`) when the runner fails.
    """
    args = runner_args(inputs, seed=seed, warmup=warmup, runs=runs, threads=threads, values=values)
    return _invoke(bundle, model, args, prefix=prefix, timeout=timeout, env=env)


def runner_args(inputs, *, seed: int = 0, warmup: int, runs: int, threads: int,
                values: int = 8) -> list[str]:
    """The runners' flags except --model and --json (bench_common.h); each input is
    `--input FILE:DTYPE:D1xD2...` (`scalar` for a 0-d one)."""
    args = []
    for path, dtype, shape in inputs or []:
        dims = "x".join(str(int(d)) for d in shape) if len(shape) else "scalar"
        args += ["--input", f"{path}:{dtype}:{dims}"]
    return args + ["--seed", str(seed), "--warmup", str(warmup), "--runs", str(runs),
                   "--threads", str(threads), "--values", str(values)]


def _invoke(bundle: RunnerBundle, model, args: list[str], *, prefix, timeout, env) -> dict:
    """Run `bundle` on `model` with `args` (plus --json), return the parsed JSON."""
    with tempfile.TemporaryDirectory(prefix="pf-native-") as td:
        out = Path(td) / "result.json"
        cmd = [*(prefix or []), str(bundle.binary), "--model", str(model), *args, "--json", str(out)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                               env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired as e:
            raise RuntimeFailure(f"{bundle.binary.name} timed out after {timeout} s: "
                                 f"{_tail(e.stderr if isinstance(e.stderr, str) else '')}") from e
        except OSError as e:
            raise RuntimeFailure(f"cannot start {cmd[0]}: {e}") from e
        if r.returncode != 0 or not out.is_file():
            err = RuntimeFailure(f"{bundle.binary.name} ({bundle.arch}) exited {r.returncode}: "
                                 f"{_tail(r.stderr) or _tail(r.stdout)}", file=str(model))
            err.returncode = r.returncode
            err.stderr = r.stderr
            raise err
        result = json.loads(out.read_text())
    result["command"] = cmd
    result["runner_arch"] = bundle.arch
    return result


def run_native_generate(bundle: RunnerBundle, model: str | os.PathLike, *,
                        prompt: list[int] | None = None, prompt_tokens: int = 128,
                        new_tokens: int = 32, warmup: int, runs: int, threads: int,
                        prefix: list[str] | None = None, timeout: float | None = None,
                        seed: int = 0, env: dict | None = None) -> dict:
    """Greedy generation with a `-gen` step program inside the native runner (`--generate`).

    Each run: reset, prefill of the prompt at position 0 (time to first token), then
    `new_tokens - 1` one-token decode steps with greedy argmax, every step timed; `warmup`
    runs untimed before `runs` timed ones. `prompt` (ids) is written to a raw int64 file for
    `--prompt-ids`; None lets the runner draw `prompt_tokens` ids in [3, vocab) from `seed`.
    Returns the runner's JSON; its "generation" block holds prompt_tokens, new_tokens,
    ttft_ms (per run), decode_ms (every step), prefill_tokens_per_s (prompt / median TTFT),
    decode_tokens_per_s (1000 / median step), tokens (the last run's greedy tokens) and prompt.
    """
    import numpy as np

    if prompt is not None:
        prompt = [int(t) for t in prompt]
        if not prompt or min(prompt) < 0:
            raise BadInputError("prompt must be a non-empty list of ids >= 0", field="prompt")
        prompt_tokens = len(prompt)
    if prompt_tokens < 1 or new_tokens < 1:
        raise BadInputError("prompt_tokens and new_tokens must be >= 1", field="new_tokens")
    sidecar = Path(f"{model}.json")
    if sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text())
        except ValueError:
            meta = {}
        max_len = meta.get("max_len") if isinstance(meta, dict) else None
        if isinstance(max_len, int) and prompt_tokens + new_tokens > max_len:
            raise BadInputError(f"prompt ({prompt_tokens}) + new tokens ({new_tokens}) exceed the "
                                f"exported cache length {max_len}", file=str(model))
    args = ["--generate", f"{prompt_tokens},{new_tokens}", "--seed", str(seed),
            "--warmup", str(warmup), "--runs", str(runs), "--threads", str(threads)]
    with tempfile.TemporaryDirectory(prefix="pf-native-prompt-") as td:
        if prompt is not None:
            ids = Path(td) / "prompt.i64"
            ids.write_bytes(np.asarray(prompt, dtype="<i8").tobytes())
            args += ["--prompt-ids", str(ids)]
        return _invoke(bundle, model, args, prefix=prefix, timeout=timeout, env=env)


# ----------------------------------------------------------------------------- inputs

_NP_DTYPES = {"float32": "float32", "int64": "int64", "int32": "int32", "bool": "bool",
              "uint8": "uint8"}


def npz_to_raw(npz_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[tuple[Path, str, list[int]]]:
    """Write each array of `<artifact>.inputs.npz` (in the model's input order) as a raw
    little-endian file; return [(file, dtype, shape)] for run_native(inputs=...)."""
    import numpy as np

    npz_path, out_dir = Path(npz_path), Path(out_dir)
    if not npz_path.is_file():
        raise BadInputError("inputs file not found", file=str(npz_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    result = []
    with np.load(npz_path) as z:
        for i, name in enumerate(z.files):
            arr = np.asarray(z[name])
            dtype = str(arr.dtype)
            if dtype == "float64":
                arr, dtype = arr.astype(np.float32), "float32"
            if dtype not in _NP_DTYPES:
                raise BadInputError(f"input {name!r} has dtype {dtype}; native runners take "
                                    f"{', '.join(_NP_DTYPES)}", file=str(npz_path))
            arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
            path = out_dir / f"{i:02d}-{safe}.bin"
            fsutil.write_bytes(path, arr.tobytes())
            result.append((path, dtype, [int(d) for d in arr.shape]))
    return result
