"""llama.cpp as a measured peer: build it from a pinned source release, write GGUFs, run it.

llama.cpp is what app teams would otherwise ship, so the project races it on the same CPU. It is
not a dependency of the product: this module builds it on demand, from the llama.cpp tree that the
`llama-cpp-python` source distribution on PyPI vendors (`vendor/llama.cpp`), pinned to one release
and sha256-checked, and caches the build under
`${POCKETFORMER_CACHE:-~/.cache/pocketformer}/llamacpp/`. See docs/llamacpp_peer.md.

Entry points:
  * `build_llamacpp(arch)`: `llama-bench`, `llama-perplexity`, and `pf-greedy` (our own ~150-line
    program against `llama.h`: greedy decode from token ids, prints ids and logit margins as
    JSON) for `x86_64` (this host, GGML_NATIVE) or `aarch64` (static, for `qemu:` targets).
  * `write_gguf(model_dir, out)`: the vendored `convert_hf_to_gguf.py` of the same source.
  * `llama_bench`, `llama_perplexity`, `llama_greedy`: run them and parse their results.
  * `llama_bench_instructions`: `qemu:` figure (aarch64 instructions per generated token, from
    two single-threaded llama-bench runs that differ only in -n; ~101 M for SmolLM2-135M Q4_1
    on cortex-a76).

Every failure (no compiler, download, checksum, configure, compile, a tool exiting non-zero) is a
`RuntimeFailure` (exit code 4) that says what failed and how to fix it; callers keep reporting the
project's own figures.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pocketformer.errors import BadInputError, RuntimeFailure
from pocketformer.fsutil import sha256_file
from pocketformer.progress import say

# ---- the pinned source ----------------------------------------------------------------------------
# llama-cpp-python 0.3.36 vendors ggml-org/llama.cpp@0c1e57098 (its CHANGELOG). The sdist is fetched
# with pip (the registry's ordinary client) and checked against this sha256 before anything of it
# is used.
PINNED_VERSION = "0.3.36"
PINNED_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PINNED_COMMIT = "0c1e57098"
SDIST_NAME = "llama-cpp-python"
KNOWN_SHA256 = {PINNED_VERSION: PINNED_SHA256}

# Debian packages a build needs (host: cmake + g++; aarch64: the cross compilers, which also bring
# the static glibc/libstdc++/libgomp the aarch64 binaries link). ninja is optional (faster).
APT_PACKAGES = ("cmake", "g++", "make")
APT_PACKAGES_AARCH64 = ("g++-aarch64-linux-gnu", "gcc-aarch64-linux-gnu")
ARCHS = ("x86_64", "aarch64")

# QEMU's cortex-a76 model (and the A55 it stands in for) is ARMv8.2-A + dotprod + fp16: the same
# -march the `qemu:` runners of the project target. GGML_NATIVE must be OFF when cross-compiling.
AARCH64_ARM_ARCH = "armv8.2-a+dotprod+fp16"

TARGETS = ("llama-bench", "llama-perplexity", "pf-greedy")
DEVICE = "llama.cpp"


def cache_root() -> Path:
    """$POCKETFORMER_LLAMACPP_CACHE, else ${POCKETFORMER_CACHE:-~/.cache/pocketformer}/llamacpp."""
    if os.environ.get("POCKETFORMER_LLAMACPP_CACHE"):
        return Path(os.environ["POCKETFORMER_LLAMACPP_CACHE"])
    base = os.environ.get("POCKETFORMER_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "pocketformer")
    return Path(base) / "llamacpp"


@dataclass
class LlamaCppBuild:
    arch: str
    version: str                 # llama-cpp-python release whose vendored llama.cpp was built
    commit: str                  # llama.cpp commit that release vendors
    source_dir: Path             # extracted vendor/llama.cpp (convert_hf_to_gguf.py lives here)
    build_dir: Path              # the cache entry
    llama_bench: Path
    llama_perplexity: Path
    greedy: Path                 # pf-greedy: token ids in, greedy ids + logit margins out (JSON)
    rusage: Path | None          # host launcher reporting the child's own wait4 rusage
    cmake_flags: list[str] = field(default_factory=list)
    compiler: str = ""
    build_seconds: float | None = None

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dir(cls, d: Path) -> "LlamaCppBuild":
        meta = json.loads((d / "build.json").read_text())
        rus = d / "bin" / "pf-rusage"
        return cls(arch=meta["arch"], version=meta["version"], commit=meta["commit"],
                   source_dir=Path(meta["source_dir"]), build_dir=d,
                   llama_bench=d / "bin" / "llama-bench",
                   llama_perplexity=d / "bin" / "llama-perplexity",
                   greedy=d / "bin" / "pf-greedy", rusage=rus if rus.is_file() else None,
                   cmake_flags=meta["cmake_flags"], compiler=meta.get("compiler", ""),
                   build_seconds=meta.get("build_seconds"))


# ---- our own programs built in the same tree -------------------------------------------------------

_GREEDY_CPP = r"""
// pf-greedy: greedy decoding with llama.cpp from token ids (no tokenizer, no sampler chain), so the
// project can compare its tokens with llama.cpp's exactly. Prints one JSON object on stdout:
// {"prompt": [...], "tokens": [...], "margins": [...], "n_vocab": V, "logits": [[...], ...]?}
// margins[i] = top-1 minus top-2 logit at step i (how safe the comparison is for that token).
// Parity mode unless --defaults: fp32 KV cache, no flash attention (see below).
#include "llama.h"
#include <clocale>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static void quiet_log(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static std::vector<llama_token> parse_ids(const char * s) {
    std::vector<llama_token> out;
    while (*s) {
        char * end = nullptr;
        long v = strtol(s, &end, 10);
        if (end == s) { fprintf(stderr, "pf-greedy: bad token list\n"); exit(2); }
        out.push_back((llama_token) v);
        s = end;
        while (*s == ',' || *s == ' ') s++;
    }
    return out;
}

int main(int argc, char ** argv) {
    std::setlocale(LC_NUMERIC, "C");
    std::string model_path, prompt_text;
    std::vector<llama_token> prompt;
    int n_predict = 16, n_threads = 1, dump_logits = 0, verbose = 0, add_bos = 0, defaults = 0;
    for (int i = 1; i < argc; i++) {
        const char * a = argv[i];
        auto next = [&](void) -> const char * {
            if (i + 1 >= argc) { fprintf(stderr, "pf-greedy: %s needs a value\n", a); exit(2); }
            return argv[++i];
        };
        if (!strcmp(a, "-m")) model_path = next();
        else if (!strcmp(a, "-n")) n_predict = atoi(next());
        else if (!strcmp(a, "-t")) n_threads = atoi(next());
        else if (!strcmp(a, "--ids")) prompt = parse_ids(next());
        else if (!strcmp(a, "--prompt")) prompt_text = next();
        else if (!strcmp(a, "--add-bos")) add_bos = 1;
        else if (!strcmp(a, "--logits")) dump_logits = 1;
        else if (!strcmp(a, "--defaults")) defaults = 1;
        else if (!strcmp(a, "-v")) verbose = 1;
        else { fprintf(stderr, "usage: pf-greedy -m MODEL.gguf (--ids 1,2,3 | --prompt TEXT [--add-bos]) "
                               "[-n N] [-t THREADS] [--logits] [--defaults] [-v]\n"); return 2; }
    }
    if (model_path.empty() || (prompt.empty() && prompt_text.empty()) || n_predict < 1) {
        fprintf(stderr, "pf-greedy: need -m MODEL, a non-empty prompt and -n >= 1\n");
        return 2;
    }
    if (!verbose) llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    if (!verbose) mp.progress_callback = [](float, void *) { return true; };  // no loading dots
    llama_model * model = llama_model_load_from_file(model_path.c_str(), mp);
    if (!model) { fprintf(stderr, "pf-greedy: cannot load %s\n", model_path.c_str()); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    if (prompt.empty()) {
        int n = -llama_tokenize(vocab, prompt_text.c_str(), (int) prompt_text.size(), nullptr, 0, add_bos, true);
        prompt.resize(n);
        if (llama_tokenize(vocab, prompt_text.c_str(), (int) prompt_text.size(), prompt.data(), n, add_bos, true) < 0) {
            fprintf(stderr, "pf-greedy: tokenization failed\n"); return 1;
        }
    }
    for (llama_token t : prompt) {
        if (t < 0 || t >= n_vocab) { fprintf(stderr, "pf-greedy: token %d outside the vocabulary (%d)\n", t, n_vocab); return 2; }
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) (prompt.size() + n_predict);
    cp.n_batch = (uint32_t) prompt.size();
    cp.n_ubatch = (uint32_t) prompt.size();
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    // Parity mode (default): fp32 KV cache and no flash attention. llama.cpp's defaults (f16 KV
    // cache; flash attention "auto", which casts K and V to f16 even from an f32 cache) move the
    // logits of an f32 model by ~1e-3 relative. --defaults keeps llama.cpp's own settings.
    if (!defaults) {
        cp.type_k = GGML_TYPE_F32;
        cp.type_v = GGML_TYPE_F32;
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "pf-greedy: cannot create a context\n"); return 1; }

    std::vector<llama_token> out;
    std::vector<float> margins;
    std::vector<std::vector<float>> all_logits;
    std::vector<llama_token> cur = prompt;
    for (int step = 0; step < n_predict; step++) {
        llama_batch batch = llama_batch_get_one(cur.data(), (int32_t) cur.size());
        if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "pf-greedy: decode failed at step %d\n", step); return 1; }
        const float * logits = llama_get_logits_ith(ctx, -1);
        int best = 0;
        for (int v = 1; v < n_vocab; v++) if (logits[v] > logits[best]) best = v;
        float second = -1e30f;
        for (int v = 0; v < n_vocab; v++) if (v != best && logits[v] > second) second = logits[v];
        out.push_back(best);
        margins.push_back(logits[best] - second);
        if (dump_logits) all_logits.emplace_back(logits, logits + n_vocab);
        cur.assign(1, (llama_token) best);
    }
    printf("{\"prompt\": [");
    for (size_t i = 0; i < prompt.size(); i++) printf("%s%d", i ? ", " : "", prompt[i]);
    printf("], \"tokens\": [");
    for (size_t i = 0; i < out.size(); i++) printf("%s%d", i ? ", " : "", out[i]);
    printf("], \"margins\": [");
    for (size_t i = 0; i < margins.size(); i++) printf("%s%.9g", i ? ", " : "", margins[i]);
    printf("], \"n_vocab\": %d", n_vocab);
    if (dump_logits) {
        printf(", \"logits\": [");
        for (size_t s = 0; s < all_logits.size(); s++) {
            printf("%s[", s ? ", " : "");
            for (int v = 0; v < n_vocab; v++) printf("%s%.9g", v ? ", " : "", all_logits[s][v]);
            printf("]");
        }
        printf("]");
    }
    printf("}\n");
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
"""

# Reports the child's OWN peak RSS (runtime_bench/native/pf_rusage.c, shared with the qemu target):
# a direct child of Python would carry the forked Python's high-water mark across exec.
_RUSAGE_C = (Path(__file__).resolve().parent / "native" / "pf_rusage.c").read_text()

_CMAKE_APPEND = """
# ---- appended by pocketformer (runtime_bench/llamacpp.py) ----
add_executable(pf-greedy pocketformer/pf_greedy.cpp)
target_link_libraries(pf-greedy PRIVATE llama ${CMAKE_THREAD_LIBS_INIT})
target_compile_features(pf-greedy PRIVATE cxx_std_17)
if (NOT CMAKE_CROSSCOMPILING)
    add_executable(pf-rusage pocketformer/pf_rusage.c)
endif()
"""


# ---- helpers ---------------------------------------------------------------------------------------

def _fail(msg: str) -> RuntimeFailure:
    return RuntimeFailure(msg, device=DEVICE)


def _run(cmd: list, *, what: str, timeout: float | None = None, log: Path | None = None,
         env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except FileNotFoundError as exc:
        raise _fail(f"{what}: cannot run {cmd[0]!r}: {exc.strerror}") from None
    except subprocess.TimeoutExpired:
        raise _fail(f"{what}: timed out after {timeout}s: {' '.join(cmd)}") from None
    if log is not None:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {' '.join(cmd)}\n{res.stdout}\n{res.stderr}\n")
    if res.returncode != 0:
        tail = "\n".join((res.stderr.strip() or res.stdout.strip()).splitlines()[-25:])
        err = _fail(f"{what} failed ({_exit_words(res.returncode)}): {' '.join(cmd[:6])}"
                    f"{' ...' if len(cmd) > 6 else ''}\n{tail}")
        err.returncode = res.returncode      # negative: killed by that signal
        raise err
    return res


def _exit_words(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit {returncode}"



def _publish(tmp: Path, final: Path) -> None:
    os.chmod(tmp, 0o755)
    try:
        os.rename(tmp, final)   # atomic; never replaces an entry another process published
    except OSError:
        if not final.is_dir():
            raise


def _compilers(arch: str) -> tuple[str, str]:
    if arch == "x86_64":
        return os.environ.get("CC", "gcc"), os.environ.get("CXX", "g++")
    return "aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++"


def _check_tools(arch: str) -> dict[str, str]:
    cc, cxx = _compilers(arch)
    need = {"cmake": "cmake", cc: "gcc", cxx: "g++"}
    found, missing = {}, []
    for exe in need:
        path = shutil.which(exe)
        (found.__setitem__(exe, path) if path else missing.append(exe))
    if missing:
        pkgs = APT_PACKAGES if arch == "x86_64" else APT_PACKAGES + APT_PACKAGES_AARCH64
        raise _fail(f"cannot build llama.cpp for {arch}: {', '.join(missing)} not found on PATH; "
                    f"install the build tools (Debian: apt-get install -y {' '.join(pkgs)}). "
                    "The project's own figures do not need llama.cpp.")
    return found


def _compiler_id(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return cxx
    return out.splitlines()[0].strip() if out else cxx


def cmake_flags(arch: str) -> list[str]:
    """The configure flags of a build (also the cache key, with the version and compiler)."""
    if arch not in ARCHS:
        raise BadInputError(f"unknown llama.cpp build arch {arch!r}; expected one of {ARCHS}",
                            field="arch")
    common = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",        # static libllama/libggml: self-contained binaries
        "-DLLAMA_CURL=OFF",               # older releases: no downloader
        "-DLLAMA_OPENSSL=OFF",            # this release: no HTTPS downloader either
        "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
        f"-DLLAMA_BUILD_COMMIT={PINNED_COMMIT}", "-DLLAMA_BUILD_NUMBER=0",
    ]
    if arch == "x86_64":
        # The llama.cpp authors' recommended CPU build: GGML_NATIVE=ON (-march=native), which
        # picks AVX2/AVX-512/FMA/F16C kernels for exactly this CPU.
        # OpenMP is upstream's default thread pool.
        return common + ["-DGGML_NATIVE=ON", "-DGGML_OPENMP=ON"]
    cc, cxx = _compilers(arch)
    return common + [
        "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
        f"-DCMAKE_C_COMPILER={cc}", f"-DCMAKE_CXX_COMPILER={cxx}",
        "-DCMAKE_FIND_ROOT_PATH=/usr/aarch64-linux-gnu",
        "-DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER",
        "-DCMAKE_FIND_ROOT_PATH_MODE_LIBRARY=ONLY", "-DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY",
        "-DGGML_NATIVE=OFF", f"-DGGML_CPU_ARM_ARCH={AARCH64_ARM_ARCH}",
        "-DCMAKE_EXE_LINKER_FLAGS=-static",   # one static binary: runs and counts under qemu
        # FindOpenMP only offers libgomp.so, which cannot be linked -static: ggml's own pthread
        # pool instead (what the instruction counts use anyway: -t 1).
        "-DGGML_OPENMP=OFF",
    ]


# ---- source ----------------------------------------------------------------------------------------

def _download_sdist(version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary=:all:", "--no-deps",
           "--disable-pip-version-check", "-q", f"{SDIST_NAME}=={version}", "-d", str(dest)]
    _run(cmd, what=f"downloading the {SDIST_NAME} {version} source distribution from PyPI "
                   "(llama.cpp is built from the copy it vendors)", timeout=1800)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise _fail(f"pip download of {SDIST_NAME}=={version} produced no source archive")
    return found[0]


def source_dir(version: str = PINNED_VERSION, *, sha256: str | None = None) -> Path:
    """The vendored llama.cpp tree of `llama-cpp-python==version`, extracted once into the cache
    after checking the sdist's sha256 (pinned for PINNED_VERSION; required for any other)."""
    expected = sha256 or KNOWN_SHA256.get(version)
    if not expected:
        raise BadInputError(f"no sha256 pinned for {SDIST_NAME} {version}; pass sha256= "
                            f"(pinned: {PINNED_VERSION})", field="version")
    root = cache_root()
    final = root / f"src-{version}"
    if (final / "llama.cpp" / "CMakeLists.txt").is_file():
        return final / "llama.cpp"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        sdist = _download_sdist(version, tmp / "dl")
        got = sha256_file(sdist)
        if got != expected:
            raise _fail(f"{sdist.name}: sha256 {got} does not match the pinned {expected}; "
                        "refusing to build from it")
        prefix = f"{sdist.name[:-len('.tar.gz')]}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tf:
            members = []
            for m in tf.getmembers():
                if not m.name.startswith(prefix) or not (m.isfile() or m.isdir()):
                    continue
                rel = m.name[len(prefix):]
                if not rel or rel == ".git" or rel.startswith((".git/", "media/", "docs/")):
                    continue
                m.name = "llama.cpp/" + rel
                members.append(m)
            if not members:
                raise _fail(f"{sdist.name} has no vendor/llama.cpp tree")
            try:
                tf.extractall(tmp, members=members, filter="data")
            except TypeError:   # Python without extraction filters (< 3.10.12 / 3.11.4)
                tf.extractall(tmp, members=members)
        (tmp / "llama.cpp" / "SOURCE").write_text(
            f"{SDIST_NAME} {version} sdist sha256 {got}\nllama.cpp {PINNED_COMMIT if version == PINNED_VERSION else 'unknown'}\n")
        shutil.rmtree(tmp / "dl", ignore_errors=True)
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "llama.cpp"


# ---- build -----------------------------------------------------------------------------------------

def build_llamacpp(arch: str = "x86_64", *, force: bool = False, version: str = PINNED_VERSION,
                   sha256: str | None = None, jobs: int = 2, log=None) -> LlamaCppBuild:
    """Build llama-bench, llama-perplexity and pf-greedy for `arch` (cached, atomic).

    x86_64: this host, GGML_NATIVE=ON. aarch64: cross-compiled static binaries for qemu
    (ARMv8.2-A + dotprod + fp16). Raises RuntimeFailure (exit 4) when it cannot."""
    flags = cmake_flags(arch)
    cc, cxx = _compilers(arch)
    key = hashlib.sha256(json.dumps([version, sha256 or KNOWN_SHA256.get(version), arch, flags,
                                     _GREEDY_CPP, _RUSAGE_C, _CMAKE_APPEND]).encode()).hexdigest()[:12]
    root = cache_root()
    final = root / f"{version}-{arch}-{key}"
    if not force and (final / "build.json").is_file():
        return LlamaCppBuild.from_dir(final)
    _check_tools(arch)
    ninja = shutil.which("ninja")
    src = source_dir(version, sha256=sha256)
    compiler = _compiler_id(cxx)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    t0 = time.perf_counter()
    try:
        # A private copy of the tree with our two programs appended to its top-level CMakeLists
        # (symlinks keep it cheap: only CMakeLists.txt and pocketformer/ are real files).
        tree = tmp / "src"
        tree.mkdir()
        for entry in src.iterdir():
            if entry.name != "CMakeLists.txt":
                (tree / entry.name).symlink_to(entry)
        (tree / "CMakeLists.txt").write_text((src / "CMakeLists.txt").read_text() + _CMAKE_APPEND)
        (tree / "pocketformer").mkdir()
        (tree / "pocketformer" / "pf_greedy.cpp").write_text(_GREEDY_CPP)
        (tree / "pocketformer" / "pf_rusage.c").write_text(_RUSAGE_C)
        build = tmp / "build"
        logfile = tmp / "build.log"
        gen = ["-G", "Ninja"] if ninja else []
        env = dict(os.environ, CC=cc, CXX=cxx)
        _run(["cmake", "-S", tree, "-B", build, *gen, *flags],
             what=f"configuring llama.cpp ({arch})", log=logfile, env=env, timeout=900)
        targets = list(TARGETS) + (["pf-rusage"] if arch == "x86_64" else [])
        nice = ["nice", "-n", "10"] if shutil.which("nice") else []
        _run([*nice, "cmake", "--build", build, "--config", "Release", "-j", str(jobs),
              "--target", *targets], what=f"compiling llama.cpp ({arch})", log=logfile,
             env=env, timeout=7200)
        bindir = tmp / "bin"
        bindir.mkdir()
        for t in targets:
            hits = [p for p in build.rglob(t) if p.is_file() and os.access(p, os.X_OK)]
            if not hits:
                raise _fail(f"the llama.cpp build produced no {t} binary (see {logfile})")
            shutil.copy2(hits[0], bindir / t)
        seconds = time.perf_counter() - t0
        meta = {"arch": arch, "version": version, "commit": PINNED_COMMIT if version == PINNED_VERSION else "unknown",
                "source": f"{SDIST_NAME}=={version} (PyPI sdist, vendor/llama.cpp)",
                "sdist_sha256": sha256 or KNOWN_SHA256.get(version),
                "source_dir": str(src), "cmake_flags": flags, "compiler": compiler,
                "generator": "Ninja" if ninja else "default", "jobs": jobs,
                "build_seconds": round(seconds, 1), "targets": targets}
        (tmp / "build.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(build, ignore_errors=True)
        shutil.rmtree(tree, ignore_errors=True)
        if force and final.exists():
            old = final.with_name(f".{final.name}.old.{os.getpid()}")
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        _publish(tmp, final)
    except RuntimeFailure as exc:
        # keep the log of a failed build where the user can read it
        logdir = root / "failed"
        logdir.mkdir(parents=True, exist_ok=True)
        saved = logdir / f"{final.name}.log"
        if (tmp / "build.log").is_file():
            shutil.copy2(tmp / "build.log", saved)
            exc.message += f"\n(full log: {saved})"
            exc.args = (exc.describe(),)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return LlamaCppBuild.from_dir(final)


# ---- GGUF ------------------------------------------------------------------------------------------

# Runs the vendored converter in-process so that, when the BPE pre-tokenizer's hash is not in its
# table (any tokenizer trained by a user, e.g. the tests' tiny ByteLevel BPE), a pre-tokenizer name
# given by us is used instead of failing. Only the name llama.cpp uses to pick its split regex is
# overridden; vocab, merges and weights are converted by the converter's own code.
_CONVERT_WRAPPER = r"""
import os, runpy, sys
src, pre = sys.argv[1], sys.argv[2]
sys.path.insert(0, src)
sys.path.insert(1, os.path.join(src, "gguf-py"))
import conversion.base as base
cls = next(c for c in vars(base).values()
           if isinstance(c, type) and "get_vocab_base_pre" in vars(c))
orig = cls.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return orig(self, tokenizer)
    except NotImplementedError:
        if not pre:
            raise
        base.logger.warning("pocketformer: BPE pre-tokenizer hash not in this converter's table; "
                            "using %r (checked against tokenizer.json)", pre)
        return pre
cls.get_vocab_base_pre = get_vocab_base_pre
script = os.path.join(src, "convert_hf_to_gguf.py")
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


def _gpt2_style_pretokenizer(model_dir: Path) -> bool:
    """True when tokenizer.json pre-tokenizes exactly like GPT-2: ByteLevel with its regex and no
    prefix space (alone, or as the only step of a Sequence). llama.cpp's "gpt-2" pre-tokenizer is
    then the same split."""
    tj = model_dir / "tokenizer.json"
    if not tj.is_file():
        return False
    pre = json.loads(tj.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    return (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False))


def write_gguf(model_dir, out_path, outtype: str = "f32", *, version: str = PINNED_VERSION,
               pre_tokenizer: str | None = None, timeout: float = 1800) -> Path:
    """GGUF from a Hugging Face llama-family directory (safetensors + tokenizer), written by the
    vendored `convert_hf_to_gguf.py` of the same llama.cpp source the binaries are built from.

    pre_tokenizer: llama.cpp pre-tokenizer name to use if the converter does not recognise the
    tokenizer's hash. Default: "gpt-2" when tokenizer.json is a plain GPT-2 style ByteLevel
    pre-tokenizer (the split is then identical), otherwise the converter's own error stands."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    if not (model_dir / "config.json").is_file():
        raise BadInputError("not a Hugging Face model directory (no config.json)", file=str(model_dir))
    if outtype not in ("f32", "f16", "bf16", "q8_0", "auto"):
        raise BadInputError(f"outtype {outtype!r}: expected f32, f16, bf16, q8_0 or auto",
                            field="outtype")
    src = source_dir(version)
    if pre_tokenizer is None and _gpt2_style_pretokenizer(model_dir):
        pre_tokenizer = "gpt-2"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    env = dict(os.environ, PYTHONNOUSERSITE="1")
    env.pop("NO_LOCAL_GGUF", None)
    try:
        _run([sys.executable, "-c", _CONVERT_WRAPPER, src, pre_tokenizer or "", str(model_dir),
              "--outfile", tmp_out, "--outtype", outtype],
             what=f"converting {model_dir} to GGUF with llama.cpp's convert_hf_to_gguf.py",
             env=env, timeout=timeout)
        if not tmp_out.is_file():
            raise _fail(f"convert_hf_to_gguf.py wrote no file for {model_dir}")
        os.replace(tmp_out, out_path)
    finally:
        tmp_out.unlink(missing_ok=True)
    return out_path


# ---- running ---------------------------------------------------------------------------------------

def _launch(build: LlamaCppBuild, cmd: list, *, what: str, timeout: float | None,
            prefix: list | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """Run a llama.cpp tool; with the host launcher, also its own peak RSS (wait4)."""
    cmd = [str(c) for c in (prefix or [])] + [str(c) for c in cmd]
    usage: dict = {}
    if build.rusage is not None and not prefix:
        with tempfile.TemporaryDirectory(prefix="pf-llamacpp.") as td:
            report = Path(td) / "rusage.txt"
            res = _run([build.rusage, report, *cmd], what=what, timeout=timeout)
            if report.is_file():
                usage = dict(ln.split(None, 1) for ln in report.read_text().splitlines() if " " in ln)
    else:
        res = _run(cmd, what=what, timeout=timeout)
    return res, usage


# How each tool turns off ggml's extra CPU buffer types (the AMX one and the repacked-weight one),
# so that every weight is used from a plain CPU buffer with ggml's generic CPU kernels.
NO_EXTRA_BUFFERS = {"llama-bench": ["--repack", "0"], "llama-perplexity": ["--no-repack"]}
# (build folder, tool) -> why this process already runs that tool without them
_FALLEN_BACK: dict[tuple[str, str], dict] = {}


def _launch_with_fallback(build: LlamaCppBuild, cmd: list, *, what: str,
                          timeout: float | None, prefix: list | None = None):
    """_launch, and when the run is killed by a signal, once more with NO_EXTRA_BUFFERS[what].

    Why: ggml's AMX buffer type (compiled in by GGML_NATIVE=ON on a CPU with AMX) dies with a
    general protection fault at its first `ldtilecfg` in some virtual machines, although the kernel
    grants the tile permission (docs/llamacpp_peer.md, "AMX CPUs"). Without the extra buffer
    types llama.cpp runs; the fallback is recorded, never silent: returns (result, usage,
    fallback) where fallback is None or {"args", "reason", "first_error"}. A tool that failed
    any other way, or that was already given those arguments, raises as before. Later runs of the
    same tool and build in this process go straight to the fallback."""
    extra = NO_EXTRA_BUFFERS[what]
    key = (str(build.build_dir), what)
    given = extra[0] in map(str, cmd)
    fallback = None if given else _FALLEN_BACK.get(key)
    if fallback is None:
        try:
            res, usage = _launch(build, cmd, what=what, timeout=timeout, prefix=prefix)
            return res, usage, None
        except RuntimeFailure as e:
            code = getattr(e, "returncode", 0)
            if code >= 0 or given:
                raise
            fallback = {"args": list(extra),
                        "reason": f"{what} with its default buffer types was {_exit_words(code)}; "
                                  f"rerun with {' '.join(extra)} (no AMX or repacked-weight buffers)",
                        "first_error": e.message[-600:]}
        say(f"llama.cpp: {fallback['reason']}")
    res, usage = _launch(build, [*cmd, *extra], what=what, timeout=timeout, prefix=prefix)
    _FALLEN_BACK[key] = fallback
    return res, usage, fallback


def _check_gguf(gguf) -> Path:
    p = Path(gguf)
    if not p.is_file():
        raise BadInputError("GGUF file not found", file=str(p))
    return p


def _parse_bench(stdout: str) -> list[dict]:
    text = stdout.strip()
    start = text.find("[")
    try:
        rows = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        rows = None
    if not isinstance(rows, list):
        raise _fail(f"llama-bench printed no JSON result:\n{text[-800:]}")
    return rows


def llama_bench(build: LlamaCppBuild, gguf, *, prompt_tokens: int = 128, new_tokens: int = 32,
                threads: int = 2, repetitions: int = 3, prefix: list | None = None,
                extra_args: list | None = None, timeout: float | None = 1800) -> dict:
    """`llama-bench -m GGUF -p P -n N -t T -r R -o json`: prefill (pp P) and decode (tg N)
    tokens/s as llama-bench reports them (mean and stddev over R repetitions, after its warm-up
    run), the peak RSS of the llama-bench process itself, and the model file size.

    prefix: command run in front (e.g. a qemu prefix); peak RSS is then not measured here."""
    path = _check_gguf(gguf)
    cmd = [build.llama_bench, "-m", path, "-p", str(prompt_tokens), "-n", str(new_tokens),
           "-t", str(threads), "-r", str(repetitions), "-o", "json", *(extra_args or [])]
    t0 = time.perf_counter()
    res, usage, fallback = _launch_with_fallback(build, cmd, what="llama-bench", timeout=timeout,
                                                 prefix=prefix)
    wall = time.perf_counter() - t0
    rows = _parse_bench(res.stdout)
    out = {"tool": "llama-bench", "llama_cpp_version": f"{build.version} ({build.commit})",
           "arch": build.arch, "model": str(path), "model_file_bytes": path.stat().st_size,
           "threads": threads, "repetitions": repetitions, "prompt_tokens": prompt_tokens,
           "new_tokens": new_tokens, "wall_s": round(wall, 3),
           "peak_rss_mb": (int(usage["maxrss_kb"]) / 1024.0) if "maxrss_kb" in usage else None,
           "prefill_tokens_per_s": None, "prefill_tokens_per_s_stddev": None,
           "decode_tokens_per_s": None, "decode_tokens_per_s_stddev": None, "rows": rows,
           "fallback": fallback}
    for row in rows:
        if row.get("n_prompt", 0) > 0 and row.get("n_gen", 0) == 0:
            out["prefill_tokens_per_s"] = row.get("avg_ts")
            out["prefill_tokens_per_s_stddev"] = row.get("stddev_ts")
        elif row.get("n_gen", 0) > 0 and row.get("n_prompt", 0) == 0:
            out["decode_tokens_per_s"] = row.get("avg_ts")
            out["decode_tokens_per_s_stddev"] = row.get("stddev_ts")
        for k in ("cpu_info", "model_type", "model_size", "model_n_params", "build_commit",
                  "backends"):
            if k in row and k not in out:
                out[k] = row[k]
    return out


_PPL_FINAL = re.compile(r"Final estimate:\s*PPL\s*=\s*([0-9.]+)\s*\+/-\s*([0-9.]+)")


def llama_perplexity(build: LlamaCppBuild, gguf, text_file, *, ctx: int = 256,
                     chunks: int | None = 32, threads: int = 2, batch: int | None = None,
                     timeout: float | None = 3600, details: bool = False):
    """`llama-perplexity -f TEXT -c CTX --chunks K`: its final perplexity estimate. llama.cpp
    splits the text into CTX-token chunks (BOS first when the model asks for one) and scores the
    second half of each chunk, the first half being context. details=True returns a dict with the
    +/- figure and the tokens scored."""
    path = _check_gguf(gguf)
    if not Path(text_file).is_file():
        raise BadInputError("text file not found", file=str(text_file))
    cmd = [build.llama_perplexity, "-m", path, "-f", text_file, "-c", str(ctx), "-t", str(threads)]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    if batch:
        cmd += ["-b", str(batch)]
    # llama.cpp logs through a worker thread whose logger is deliberately never destroyed
    # (common/log.cpp, common_log_main: "this design may cause logs to be lost if not flushed
    # before the program exits"), so a run that exits 0 can lose its last lines, the final
    # estimate among them; seen on tiny models, whose whole run takes milliseconds, and more
    # often on a loaded machine (the suite once lost it three times in a row). Such a run is
    # repeated, at most seven times more.
    for _ in range(8):
        res, usage, fallback = _launch_with_fallback(build, cmd, what="llama-perplexity",
                                                     timeout=timeout)
        text = res.stdout + "\n" + res.stderr
        m = _PPL_FINAL.search(text)
        if m:
            break
    if not m:
        raise _fail(f"llama-perplexity printed no final estimate (8 runs, each exit 0):\n"
                    f"{text.strip()[-800:]}")
    ppl = float(m.group(1))
    if not details:
        return ppl
    n_chunks = re.search(r"calculating perplexity over (\d+) chunks", text)
    return {"perplexity": ppl, "plus_minus": float(m.group(2)), "ctx": ctx,
            "chunks": int(n_chunks.group(1)) if n_chunks else chunks,
            "scored_tokens": (int(n_chunks.group(1)) * (ctx - ctx // 2)) if n_chunks else None,
            "peak_rss_mb": (int(usage["maxrss_kb"]) / 1024.0) if "maxrss_kb" in usage else None,
            "fallback": fallback}


def llama_greedy(build: LlamaCppBuild, gguf, prompt, n: int, *, threads: int = 1,
                 add_bos: bool = False, details: bool = False, logits: bool = False,
                 defaults: bool = False,
                 prefix: list | None = None, timeout: float | None = 600):
    """Greedy (argmax) continuation of `prompt` (a list of token ids, or text tokenized by the
    GGUF's own tokenizer) for `n` tokens, from our pf-greedy program. It runs in parity mode
    (fp32 KV cache, flash attention off) unless defaults=True (llama.cpp's own context defaults:
    f16 KV, flash attention auto, ~1e-3 relative logit error on an f32 model). Returns the ids;
    details=True returns the parsed JSON (tokens, top-1 minus top-2 logit margins, logits)."""
    path = _check_gguf(gguf)
    if n < 1:
        raise BadInputError("n must be >= 1", field="n")
    cmd = [build.greedy, "-m", path, "-n", str(n), "-t", str(threads)]
    if isinstance(prompt, str):
        cmd += ["--prompt", prompt] + (["--add-bos"] if add_bos else [])
    else:
        ids = [int(i) for i in prompt]
        if not ids:
            raise BadInputError("empty prompt", field="prompt")
        cmd += ["--ids", ",".join(map(str, ids))]
    if logits:
        cmd.append("--logits")
    if defaults:
        cmd.append("--defaults")
    res, _ = _launch(build, cmd, what="pf-greedy (llama.cpp greedy decode)", timeout=timeout,
                     prefix=prefix)
    line = next((ln for ln in reversed(res.stdout.splitlines()) if ln.startswith("{")), None)
    if line is None:
        raise _fail(f"pf-greedy printed no result:\n{res.stdout[-400:]}{res.stderr[-400:]}")
    out = json.loads(line)
    return out if (details or logits) else out["tokens"]


def llama_bench_instructions(build: LlamaCppBuild, gguf, cpu: str = "cortex-a76", *,
                             prompt_tokens: int = 0, new_tokens: tuple[int, int] = (8, 24),
                             timeout: float | None = 3600) -> dict:
    """The `qemu:` figure: aarch64 instructions per generated token, from two single-threaded
    llama-bench runs under qemu that differ only in -n (one repetition each, no warm-up), counted
    by the project's TCG plugin (main thread). Needs an aarch64 build."""
    from pocketformer.runtime_bench import qemu

    if build.arch != "aarch64":
        raise BadInputError("instruction counts need the aarch64 build (build_llamacpp('aarch64'))",
                            field="arch")
    path = _check_gguf(gguf)
    runs = []
    for n in new_tokens:
        cmd = [str(build.llama_bench), "-m", str(path), "-p", str(prompt_tokens), "-n", str(n),
               "-t", "1", "-r", "1", "--no-warmup", "-o", "json"]
        run = qemu.run_qemu(cmd, cpu, count_instructions=True, check=True, timeout=timeout)
        runs.append(run)
    n_a, n_b = new_tokens
    per_tok = qemu.per_inference(runs[0], runs[1], n_a, n_b, main_thread=True)
    per_tok_all = qemu.per_inference(runs[0], runs[1], n_a, n_b)
    return {"tool": "llama-bench", "device": f"qemu:{cpu}", "threads": 1,
            "model": str(path), "model_file_bytes": path.stat().st_size,
            "new_tokens": list(new_tokens),
            "instructions": [r.instructions for r in runs],
            "main_thread_instructions": [r.main_thread_instructions for r in runs],
            "instructions_per_token": per_tok, "instructions_per_token_all_threads": per_tok_all,
            "peak_rss_mb": max(r.peak_rss_mb for r in runs),
            "emulated_wall_s": [round(r.wall_s, 1) for r in runs], "wall_kind": "emulated"}


__all__ = ["APT_PACKAGES", "APT_PACKAGES_AARCH64", "PINNED_VERSION", "PINNED_SHA256",
           "PINNED_COMMIT", "LlamaCppBuild", "build_llamacpp", "cmake_flags", "source_dir",
           "write_gguf", "llama_bench", "llama_perplexity", "llama_greedy",
           "llama_bench_instructions", "cache_root"]
