"""`pocketformer android-demo`: the Android demo/benchmark app (android_demo/) built without Gradle.

Inputs: a `pocketformer build` output (BUILD_OUT/artifacts/model*.onnx, the tokenizer's
vocab.txt in BUILD_OUT/model/). Output: a signed, aligned APK for arm64-v8a holding

- the Java app (android_demo/app/src/main/java): one activity (two sentences -> cosine
  similarity and latency) plus a benchmark mode driven by intent extras over adb;
- our JNI layer (android_demo/app/src/main/cpp/ort_jni.c) over ONNX Runtime's C API, and the
  official Android `libonnxruntime.so` (the AAR in npm `com.github.asus4.onnxruntime@0.4.9`);
- the model, vocab.txt and `pocketformer_app.properties` as assets (the model stored, so the
  app maps it straight out of the APK).

Tool chain (no SDK/NDK/Gradle can be installed here): Debian bookworm `aapt`/`aapt2`,
`apksigner`, `zipalign`, `dexdump`, `clang`, `lld`, a JDK; from Debian bullseye (downloaded with
a private APT configuration, unpacked with `dpkg -x`): `libandroid-23-java` (android.jar) and
`dalvik-exchange` (dx). `ensure_android_tools()` installs/fetches all of it (scripts/setup.sh);
`build_apk()` never installs and fails with exit code 2 naming what is missing.

Steps of build_apk: aapt2 compile + link (manifest, resources, assets) -> javac --release 8
against android.jar -> dx -> clang --target=aarch64-linux-android24 + lld for libpfdemo.so ->
zip (dex, libs) -> zipalign -p 4 -> apksigner (debug key generated once with keytool into the
cache) -> verify_apk (apksigner verify, aapt badging, dexdump natives vs .so symbols) -> rename
into place. Host checks: the same Java and C sources built for the host JVM
(`run_host_jvm`, `host_embed`, `host_bench`). App benchmark over adb: `app_bench_command`,
`run_app_bench`. docs/android_demo.md has the numbers and what was and was not verified.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pocketformer import fsutil
from pocketformer.errors import BadInputError, RuntimeFailure

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / "android_demo"
APP_SRC = DEMO_DIR / "app" / "src" / "main"
JAVA_SRC = APP_SRC / "java"
HOST_JAVA_SRC = DEMO_DIR / "app" / "src" / "test" / "java"
JNI_SRC = APP_SRC / "cpp" / "ort_jni.c"

APP_PACKAGE = "com.pocketformer.demo"
APP_ACTIVITY = ".MainActivity"
APP_COMPONENT = f"{APP_PACKAGE}/{APP_ACTIVITY}"
BENCH_ACTION = f"{APP_PACKAGE}.BENCH"
MIN_SDK = 24
TARGET_SDK = 34
VERSION_CODE = 1
VERSION_NAME = "0.1.0"
ABI = "arm64-v8a"
ANDROID_TARGET = f"aarch64-linux-android{MIN_SDK}"
JNI_LIB = "libpfdemo.so"
ORT_LIB = "libonnxruntime.so"
CONFIG_ASSET = "pocketformer_app.properties"
# The app's external files dir: the app reads and writes it without permissions, adb shell
# can push to and pull from it.
DEVICE_APP_DIR = f"/sdcard/Android/data/{APP_PACKAGE}/files/pocketformer"

# The ONNX Runtime in the APK is 1.29 (the AAR of com.github.asus4.onnxruntime@0.4.9). Models
# above these are refused at build time (conservative: ORT 1.29 reads at least these).
ORT_ANDROID_MAX_IR = 11
ORT_ANDROID_MAX_OPSET = 23
APP_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Every C library function the JNI layer may call (resolved by Bionic on the phone). Anything
# else undefined in libpfdemo.so (a compiler helper, a typo) fails the build.
JNI_LIBC = {"malloc", "calloc", "free", "memcpy", "memset", "memmove", "strlen", "strcmp"}

# Tool -> Debian (bookworm) package.
DEBIAN_TOOLS = {
    "aapt": "aapt", "aapt2": "aapt", "apksigner": "apksigner", "zipalign": "zipalign",
    "dexdump": "dexdump", "clang": "clang", "ld.lld": "lld", "readelf": "binutils",
    "javac": "openjdk-17-jdk-headless", "java": "openjdk-17-jre-headless",
    "keytool": "openjdk-17-jre-headless",
}
HOST_TOOLS = {"gcc": "gcc"}           # host JNI build (tests only)


@dataclass(frozen=True)
class BullseyeDeb:
    package: str
    version: str
    sha256: str
    member: str        # the file we use, inside the .deb
    name: str          # its name in the cache


BULLSEYE_DEBS = (
    BullseyeDeb("libandroid-23-java", "6.0.1+r72-6",
                "8af1b6df556971dda0a6da3536ea526a838e0c363afcdd454213d8bce94793e3",
                "usr/share/java/com.android.android-23.jar", "android.jar"),
    BullseyeDeb("dalvik-exchange", "10.0.0+r36-1",
                "8fc128db7c27253d963eb9b33de79b197162a4749d2ba69019b2fd0664cbd7fe",
                "usr/share/java/com.android.dx-10.0.0.jar", "dx.jar"),
)


def _say(msg: str) -> None:
    from pocketformer.progress import say
    say(f"android: {msg}")


def cache_dir() -> Path:
    base = os.environ.get("POCKETFORMER_CACHE") or str(Path.home() / ".cache" / "pocketformer")
    return Path(base).expanduser() / "android"


def _tail(text: str | None, n: int = 3000) -> str:
    return (text or "").strip()[-n:]


def _run(cmd: list, *, what: str | None = None, cwd: Path | None = None, timeout: float = 600,
         env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", cwd=cwd,
                           timeout=timeout, env=env)
    except FileNotFoundError as e:
        tool = cmd[0]
        raise BadInputError(f"{tool} not found: {_install_hint([tool])}") from e
    except subprocess.TimeoutExpired as e:
        raise RuntimeFailure(f"{what or cmd[0]} timed out after {timeout:.0f} s") from e
    if r.returncode != 0:
        raise RuntimeFailure(f"{what or cmd[0]} failed (exit {r.returncode}): {' '.join(cmd)}\n"
                             f"{_tail(r.stderr or r.stdout)}")
    return r


def _install_hint(tools) -> str:
    pkgs = sorted({DEBIAN_TOOLS.get(t) or HOST_TOOLS.get(t) or t for t in tools})
    return (f"install with `apt-get install {' '.join(pkgs)}` and run "
            "`python -m pocketformer.android setup` (scripts/setup.sh does both)")


# ----------------------------------------------------------------------------- tools

@dataclass
class AndroidTools:
    android_jar: Path
    dx_jar: Path
    ort_include: Path
    ort_android_lib: Path
    java_home: Path
    tools: dict

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


def _java_home() -> Path | None:
    env = os.environ.get("JAVA_HOME")
    cands = [Path(env)] if env else []
    javac = shutil.which("javac")
    if javac:
        cands.append(Path(os.path.realpath(javac)).parent.parent)
    for c in cands:
        if (c / "include" / "jni.h").is_file() and (c / "include" / "linux" / "jni_md.h").is_file():
            return c
    return None


def _bullseye_dir() -> Path:
    return cache_dir() / "bullseye"


def _ort_android_paths() -> tuple[Path, Path]:
    from pocketformer.runtime_bench import native
    dest = native.cache_root() / "sdk" / f"onnxruntime-{native.ORT_ANDROID_VERSION}-android"
    return dest / "include", dest / "android-arm64" / ORT_LIB


def missing_android_tools(*, host: bool = False) -> dict[str, str]:
    """What build_apk (and, with host=True, the host JVM checks) lack: {thing: how to get it}."""
    missing = {}
    tools = dict(DEBIAN_TOOLS, **(HOST_TOOLS if host else {}))
    for tool, pkg in tools.items():
        if shutil.which(tool) is None:
            missing[tool] = f"apt-get install {pkg}"
    if "javac" not in missing and _java_home() is None:
        missing["jni.h (JDK include)"] = "apt-get install openjdk-17-jdk-headless"
    setup = "python -m pocketformer.android setup"
    for deb in BULLSEYE_DEBS:
        if not (_bullseye_dir() / deb.name).is_file():
            missing[f"{deb.name} (Debian bullseye {deb.package})"] = setup
    inc, lib = _ort_android_paths()
    if not (inc / "onnxruntime_c_api.h").is_file() or not lib.is_file():
        missing["ONNX Runtime Android AAR (npm com.github.asus4.onnxruntime@0.4.9)"] = setup
    if host:
        from pocketformer.runtime_bench import native
        linux = (native.cache_root() / "sdk" / f"onnxruntime-{native.ORT_LINUX_VERSION}-linux-x86_64"
                 / "libonnxruntime.so.1")
        if not linux.is_file():
            missing["ONNX Runtime Linux x64 (npm onnxruntime-node@1.30.0)"] = setup
    return missing


def android_tools(*, host: bool = False) -> AndroidTools:
    """The installed tool chain, or BadInputError (exit 2) naming what is missing and how to
    install it. Never installs or downloads anything."""
    missing = missing_android_tools(host=host)
    if missing:
        apt = sorted({v.split()[-1] for v in missing.values() if v.startswith("apt-get")})
        how = []
        if apt:
            how.append(f"`apt-get install {' '.join(apt)}`")
        if any(not v.startswith("apt-get") for v in missing.values()):
            how.append("`python -m pocketformer.android setup`")
        raise BadInputError(f"Android tools missing: {', '.join(missing)}; install with "
                            f"{' then '.join(how)} (scripts/setup.sh runs both)")
    inc, lib = _ort_android_paths()
    return AndroidTools(android_jar=_bullseye_dir() / "android.jar", dx_jar=_bullseye_dir() / "dx.jar",
                        ort_include=inc, ort_android_lib=lib, java_home=_java_home(),
                        tools={t: shutil.which(t) for t in DEBIAN_TOOLS})


def _apt_install(pkgs: list[str]) -> None:
    if not pkgs:
        return
    from pocketformer.runtime_bench.native import apt_install, can_apt_install

    if not can_apt_install():
        raise BadInputError(f"Debian packages missing: {' '.join(pkgs)}; run "
                            f"`sudo apt-get install {' '.join(pkgs)}`")
    apt_install(pkgs)


def _bullseye_mirror() -> str:
    env = os.environ.get("POCKETFORMER_BULLSEYE_MIRROR")
    if env:
        return env.rstrip("/")
    try:
        from pocketformer.runtime_bench.adbd_peer import debian_mirror
        return debian_mirror().rstrip("/")
    except Exception:
        return "http://deb.debian.org/debian"


def _fetch_bullseye() -> None:
    """libandroid-23-java and dalvik-exchange from bullseye, through a private APT config
    (the host's own sources and state are not touched), sha256-pinned, unpacked with dpkg -x."""
    dest = _bullseye_dir()
    want = "".join(f"{d.package} {d.version} {d.sha256}\n" for d in BULLSEYE_DEBS)
    stamp = dest / ".stamp"
    if stamp.is_file() and stamp.read_text() == want and all((dest / d.name).is_file() for d in BULLSEYE_DEBS):
        return
    root = cache_dir() / "apt-bullseye"
    for sub in ("etc/apt.conf.d", "etc/preferences.d", "etc/sources.list.d", "state/lists/partial",
                "cache/archives/partial"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    keyring = next((k for k in ("/usr/share/keyrings/debian-archive-bullseye-stable.gpg",
                                "/usr/share/keyrings/debian-archive-keyring.gpg") if Path(k).is_file()),
                   None)
    opt = f"[signed-by={keyring}] " if keyring else "[trusted=yes] "   # the .debs are sha256-pinned anyway
    (root / "etc" / "sources.list").write_text(f"deb {opt}{_bullseye_mirror()} bullseye main\n")
    (root / "apt.conf").write_text("\n".join([
        f'Dir::Etc "{root}/etc";', f'Dir::Etc::SourceList "{root}/etc/sources.list";',
        f'Dir::Etc::SourceParts "{root}/etc/sources.list.d";', f'Dir::Etc::Parts "{root}/etc/apt.conf.d";',
        f'Dir::Etc::Preferences "{root}/etc/preferences";',
        f'Dir::Etc::PreferencesParts "{root}/etc/preferences.d";', f'Dir::State "{root}/state";',
        'Dir::State::status "/dev/null";', f'Dir::Cache "{root}/cache";',
        'APT::Architecture "amd64";', 'Acquire::Languages "none";',
        'APT::Sandbox::User "root";', ""]))
    env = dict(os.environ, APT_CONFIG=str(root / "apt.conf"), DEBIAN_FRONTEND="noninteractive")
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    need = [d for d in BULLSEYE_DEBS
            if not ((debs / f"{d.package}.deb").is_file()
                    and fsutil.sha256_file(debs / f"{d.package}.deb") == d.sha256)]
    if need:
        _say("fetching " + ", ".join(f"{d.package}={d.version}" for d in need) + " from bullseye")
        _run(["apt-get", "update"], what="apt-get update (private bullseye config)", env=env)
        with tempfile.TemporaryDirectory(dir=debs) as td:
            _run(["apt-get", "download", *[f"{d.package}={d.version}" for d in need]],
                 what="apt-get download (bullseye)", cwd=Path(td), env=env)
            for d in need:
                got = list(Path(td).glob(f"{d.package}_*.deb"))
                if len(got) != 1 or fsutil.sha256_file(got[0]) != d.sha256:
                    raise RuntimeFailure(f"{d.package} {d.version}: download missing or sha256 "
                                         f"mismatch (expected {d.sha256})")
                os.replace(got[0], debs / f"{d.package}.deb")
    with fsutil.atomic_dir(dest) as tmp:
        for d in BULLSEYE_DEBS:
            with tempfile.TemporaryDirectory(dir=tmp) as x:
                _run(["dpkg", "-x", debs / f"{d.package}.deb", x], what=f"dpkg -x {d.package}")
                src = Path(x) / d.member
                if not src.is_file():
                    raise RuntimeFailure(f"{d.package} has no {d.member}")
                shutil.copy2(src, tmp / d.name)
        (tmp / ".stamp").write_text(want)


def ensure_android_tools(*, install_missing: bool = True, host: bool = True) -> dict:
    """Install/fetch everything build_apk and the host checks need (for scripts/setup.sh):
    Debian packages (apt-get, as root), the two bullseye jars, the ORT Android AAR and headers
    and the Linux x64 libonnxruntime (npm, via runtime_bench.native's pinned downloads).
    Idempotent; returns a summary. Raises BadInputError when something cannot be installed."""
    from pocketformer.runtime_bench import native

    start = time.perf_counter()
    tools = dict(DEBIAN_TOOLS, **(HOST_TOOLS if host else {}))
    missing = sorted({pkg for t, pkg in tools.items() if shutil.which(t) is None})
    if missing and install_missing:
        _apt_install(missing)
    elif missing:
        raise BadInputError(f"Debian packages missing: {' '.join(missing)}; "
                            f"run `apt-get install {' '.join(missing)}`")
    _fetch_bullseye()
    native._ort_headers_and_android()
    if host:
        native._ort_linux_lib("x86_64")
    t = android_tools(host=host)
    summary = t.to_dict()
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


# ----------------------------------------------------------------------------- inputs

@dataclass
class DemoInputs:
    model: Path
    sidecar: dict
    vocab: bytes             # vocab.txt content (one token per line, line number = id)
    vocab_source: Path       # the vocab.txt or tokenizer.json it came from
    lower_case: bool
    max_seq_length: int
    candidates: list[Path]


def _onnx_candidates(build_out: Path) -> list[Path]:
    arts = build_out / "artifacts"
    if not arts.is_dir():
        return []
    return sorted(p for p in arts.glob("model*.onnx") if p.is_file() and "-gen" not in p.stem)


def _tokenizer_dirs(build_out: Path, sidecar: dict) -> list[Path]:
    dirs = [build_out / "model", build_out / "artifacts", build_out]
    src = sidecar.get("source")
    if src:
        if Path(src).is_dir():
            dirs.append(Path(src))
        else:
            try:
                from pocketformer.models import BUILTIN_MODELS, builtin_path
                if src in BUILTIN_MODELS:
                    dirs.append(builtin_path(src))
            except Exception:
                pass
    return dirs


def vocab_from_tokenizer_json(path: Path) -> tuple[bytes, bool]:
    """(vocab.txt bytes, lower-case) from a Hugging Face tokenizer.json, if it describes what the
    app's Java tokenizer implements: BertNormalizer (clean text, CJK spacing, accents stripped
    exactly when lower-casing) + BertPreTokenizer + WordPiece ("##", [UNK], 100 chars).
    `pocketformer build` saves BERT tokenizers this way (transformers 5 writes no vocab.txt)."""
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadInputError(f"unreadable tokenizer.json: {e}", file=str(path)) from e
    model, norm, pre = tj.get("model") or {}, tj.get("normalizer") or {}, tj.get("pre_tokenizer") or {}
    lower = bool(norm.get("lowercase", True))
    problems = []
    if model.get("type") != "WordPiece":
        problems.append(f"model {model.get('type')!r} (the app implements WordPiece)")
    if model.get("continuing_subword_prefix", "##") != "##" or model.get("unk_token", "[UNK]") != "[UNK]" \
            or int(model.get("max_input_chars_per_word", 100)) != 100:
        problems.append("WordPiece options other than '##', [UNK], 100 chars")
    if norm.get("type") != "BertNormalizer" or not norm.get("clean_text", True) \
            or not norm.get("handle_chinese_chars", True) \
            or norm.get("strip_accents") not in (None, lower):
        problems.append(f"normalizer {norm.get('type')!r} with options the app does not implement")
    if pre.get("type") != "BertPreTokenizer":
        problems.append(f"pre-tokenizer {pre.get('type')!r} (the app implements BertPreTokenizer)")
    if problems:
        raise BadInputError("the app's Java tokenizer is BERT WordPiece; this tokenizer has "
                            + "; ".join(problems), file=str(path))
    vocab = model.get("vocab") or {}
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if not by_id or [i for _, i in by_id] != list(range(len(by_id))):
        raise BadInputError("WordPiece vocab ids are not 0..N-1", file=str(path))
    if any("\n" in t or "\r" in t for t, _ in by_id):
        raise BadInputError("a vocab token contains a line break", file=str(path))
    return "".join(t + "\n" for t, _ in by_id).encode("utf-8"), lower


def find_demo_inputs(build_out: str | os.PathLike, artifact: str | os.PathLike | None = None) -> DemoInputs:
    """The ONNX artifact and tokenizer a build output gives the app, or BadInputError.

    Artifact: `artifact` if given, else BUILD_OUT/artifacts/model*.onnx (forward graphs; the
    smallest when there are several, e.g. fp32 and int8). Tokenizer, first found: vocab.txt or
    tokenizer.json (WordPiece) in BUILD_OUT/model (`pocketformer build` saves tokenizer.json
    there), BUILD_OUT/artifacts, BUILD_OUT, then the directory the artifact's sidecar names as
    its source (a built-in model's package directory)."""
    build_out = Path(build_out)
    if not build_out.is_dir():
        raise BadInputError("build output directory not found (run `pocketformer build RECIPE "
                            "--out DIR` first)", file=str(build_out))
    cands = _onnx_candidates(build_out)
    if artifact is not None:
        model = Path(artifact)
        if not model.is_absolute() and not model.exists():
            model = build_out / model
        if not model.is_file():
            raise BadInputError("artifact not found", file=str(model))
    else:
        if not cands:
            pte = sorted((build_out / "artifacts").glob("*.pte")) if (build_out / "artifacts").is_dir() else []
            extra = (f" (it has {', '.join(p.name for p in pte)}: the Gradle-free APK runs ONNX "
                     "Runtime only; add \"onnx\" to [export] formats)") if pte else ""
            raise BadInputError("no usable artifact: expected artifacts/model*.onnx from "
                                f"`pocketformer build` (export formats must include onnx){extra}",
                                file=str(build_out))
        model = min(cands, key=lambda p: (p.stat().st_size, p.name))
    if model.suffix != ".onnx":
        raise BadInputError("the APK's runtime is ONNX Runtime: give an .onnx artifact "
                            "(.pte needs the Gradle build with executorch-android)", file=str(model))
    sidecar_path = model.with_name(model.name + ".json")
    sidecar = {}
    if sidecar_path.is_file():
        try:
            sidecar = json.loads(sidecar_path.read_text())
        except ValueError as e:
            raise BadInputError(f"sidecar is not JSON: {e}", file=str(sidecar_path)) from e
    if sidecar.get("family") not in (None, "bert"):
        raise BadInputError(f"the demo app runs sentence encoders (bert family); this artifact is "
                            f"{sidecar.get('family')!r}", file=str(model))
    if sidecar.get("kind") == "generation":
        raise BadInputError("generation graphs are not supported by the demo app", file=str(model))
    vocab = source = None
    lower = True
    for d in _tokenizer_dirs(build_out, sidecar):
        if (d / "vocab.txt").is_file():
            source = d / "vocab.txt"
            vocab = source.read_bytes()
            try:
                lower = bool(json.loads((d / "tokenizer_config.json").read_text()).get("do_lower_case", True))
            except (OSError, ValueError):
                pass
            break
        if (d / "tokenizer.json").is_file():
            source = d / "tokenizer.json"
            vocab, lower = vocab_from_tokenizer_json(source)
            break
    if vocab is None:
        raise BadInputError("no tokenizer found: neither vocab.txt nor tokenizer.json in model/, "
                            "artifacts/ or the artifact's source; the app needs a BERT WordPiece "
                            "vocabulary", file=str(build_out))
    max_len = 256
    try:
        max_len = int(json.loads((source.parent / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    _check_onnx(model)
    return DemoInputs(model, sidecar, vocab, source, lower, max_len, cands)


def write_assets(inputs: DemoInputs, dest: str | os.PathLike) -> Path:
    """The app's assets: the model (hard link when possible), vocab.txt and
    pocketformer_app.properties (read by AppConfig.java). Used by build_apk and, through
    `python -m pocketformer.android assets`, by the Gradle build."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / inputs.model.name
    target.unlink(missing_ok=True)
    try:
        os.link(inputs.model, target)
    except OSError:
        shutil.copy2(inputs.model, target)
    (dest / "vocab.txt").write_bytes(inputs.vocab)
    (dest / CONFIG_ASSET).write_text(
        "# written by pocketformer (pocketformer/android.py)\n"
        f"model={inputs.model.name}\nvocab=vocab.txt\n"
        f"do_lower_case={'true' if inputs.lower_case else 'false'}\n"
        f"max_seq_length={inputs.max_seq_length}\n"
        f"source={inputs.sidecar.get('source', '')}\n"
        f"sha256={inputs.sidecar.get('sha256', '')}\n", encoding="utf-8")
    return dest


def _check_onnx(model: Path) -> dict:
    """Refuse, before building, an artifact the app's runtime cannot load or feed."""
    try:
        import onnx
        m = onnx.load(str(model), load_external_data=False)
    except Exception as e:
        raise BadInputError(f"not a loadable ONNX model ({type(e).__name__}: {str(e)[:200]}); "
                            "re-export it with `pocketformer export --format onnx`",
                            file=str(model)) from e
    g = m.graph
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in g.initializer):
        raise BadInputError("the model keeps weights in external data files; the app loads one "
                            "self-contained .onnx", file=str(model))
    opset = max([o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] or [0])
    if m.ir_version > ORT_ANDROID_MAX_IR or opset > ORT_ANDROID_MAX_OPSET:
        raise BadInputError(f"IR version {m.ir_version} / opset {opset} is newer than the APK's "
                            f"ONNX Runtime 1.29 is known to load (IR <= {ORT_ANDROID_MAX_IR}, opset <= "
                            f"{ORT_ANDROID_MAX_OPSET}); export with a lower opset", file=str(model))
    inits = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    bad = [f"{i.name} ({onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type)})" for i in inputs
           if i.name not in APP_INPUTS or i.type.tensor_type.elem_type != onnx.TensorProto.INT64]
    if bad or not any(i.name == "input_ids" for i in inputs):
        raise BadInputError(f"the app feeds int64 token inputs {', '.join(APP_INPUTS[:2])} (and "
                            f"token_type_ids); this model's inputs are not that: "
                            f"{', '.join(bad) or 'no input_ids'}", file=str(model))
    if not g.output or g.output[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise BadInputError("the app reads a float32 first output (the sentence embedding)",
                            file=str(model))
    return {"ir_version": m.ir_version, "opset": opset}


# ----------------------------------------------------------------------------- building

def _aarch64_jni(tools: AndroidTools, work: Path) -> Path:
    """libpfdemo.so for arm64-v8a: clang + lld without the NDK. C library calls are declared
    in generated shim headers and linked against a stub libc.so (Bionic resolves them)."""
    shim = work / "shim"
    shim.mkdir()
    (shim / "stdlib.h").write_text(
        "#pragma once\n#include <stddef.h>\nvoid* malloc(size_t);\nvoid* calloc(size_t, size_t);\n"
        "void free(void*);\n")
    (shim / "string.h").write_text(
        "#pragma once\n#include <stddef.h>\nvoid* memcpy(void*, const void*, size_t);\n"
        "void* memset(void*, int, size_t);\nvoid* memmove(void*, const void*, size_t);\n"
        "size_t strlen(const char*);\nint strcmp(const char*, const char*);\n")
    (shim / "stdio.h").write_text("#pragma once\n/* jni.h includes it; nothing from it is used */\n")
    resource = _run(["clang", "-print-resource-dir"]).stdout.strip()
    jdk = tools.java_home / "include"
    obj = work / "ort_jni.o"
    _run(["clang", f"--target={ANDROID_TARGET}", "-std=c11", "-O2", "-fPIC", "-ffreestanding",
          "-fvisibility=hidden", "-fno-stack-protector", "-Wall", "-Werror", "-nostdinc",
          "-isystem", shim, "-isystem", f"{resource}/include", "-I", jdk, "-I", jdk / "linux",
          "-I", tools.ort_include, "-c", JNI_SRC, "-o", obj], what="clang (JNI, arm64)")
    sysroot = _stub_libc(obj, work)
    out = work / JNI_LIB
    _run(["clang", f"--target={ANDROID_TARGET}", "-shared", "-nostdlib", "-fuse-ld=lld",
          f"-Wl,-soname,{JNI_LIB}", "-Wl,-z,max-page-size=16384", "-Wl,-z,now", "-Wl,-z,relro",
          "-Wl,--build-id=sha1", "-Wl,--no-undefined-version", obj, f"-L{sysroot}", "-lc",
          tools.ort_android_lib, "-o", out], what="lld (JNI, arm64)")
    undefined = set(_dynamic_symbols(out, defined=False))
    extra = undefined - JNI_LIBC - {"OrtGetApiBase"}
    if extra:
        raise RuntimeFailure(f"{JNI_LIB} needs symbols outside the C library subset it may use: "
                             f"{sorted(extra)}")
    return out


def _stub_libc(obj: Path, work: Path) -> Path:
    """A link-time-only libc.so (soname libc.so) defining the C functions `obj` calls, so lld
    records them as coming from libc.so; on the phone Bionic's libc.so provides them."""
    r = _run(["readelf", "-sW", obj], what="readelf -s")
    undefined = sorted({p[7] for p in (ln.split() for ln in r.stdout.splitlines())
                        if len(p) >= 8 and p[6] == "UND" and p[7] and p[4] in ("GLOBAL", "WEAK")}
                       - {"OrtGetApiBase"})
    extra = set(undefined) - JNI_LIBC
    if extra:
        raise RuntimeFailure(f"{JNI_SRC.name} calls functions outside the C library subset the "
                             f"Gradle-free build supports ({', '.join(sorted(JNI_LIBC))}): {sorted(extra)}")
    sysroot = work / "stub-libc"
    sysroot.mkdir()
    asm = [".text"]
    for sym in undefined:
        asm += [f".globl {sym}", f".type {sym},%function", f"{sym}:", "  ret"]
    (sysroot / "libc.S").write_text("\n".join(asm) + "\n")
    _run(["clang", f"--target={ANDROID_TARGET}", "-shared", "-nostdlib", "-fuse-ld=lld",
          "-Wl,-soname,libc.so", sysroot / "libc.S", "-o", sysroot / "libc.so"], what="stub libc.so")
    return sysroot


def _dynamic_symbols(so: Path, *, defined: bool = True) -> list[str]:
    r = _run(["readelf", "--dyn-syms", "-W", so], what="readelf")
    out = []
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[0].endswith(":") and parts[4] in ("GLOBAL", "WEAK"):
            is_def = parts[6] != "UND"
            if is_def == defined:
                out.append(parts[7].split("@")[0])
    return out


def _java_sources(*, android: bool) -> list[Path]:
    """The app's Java sources; for the host, only those that do not use android.* (the host
    JVM has no Android classes) plus the host driver under src/test."""
    srcs = sorted(JAVA_SRC.rglob("*.java"))
    if not android:
        srcs = [p for p in srcs if "import android." not in p.read_text(encoding="utf-8")]
        srcs += sorted(HOST_JAVA_SRC.rglob("*.java"))
    return srcs


def _manifest_with_package(work: Path) -> Path:
    text = (APP_SRC / "AndroidManifest.xml").read_text(encoding="utf-8")
    if "package=" not in text:
        text = text.replace("<manifest ", f'<manifest package="{APP_PACKAGE}" ', 1)
    out = work / "AndroidManifest.xml"
    out.write_text(text, encoding="utf-8")
    return out


def _debug_keystore() -> tuple[Path, str, str]:
    """A debug signing key generated once with keytool into the cache (never committed; the
    same key across builds, so `adb install -r` can update the app)."""
    ks = cache_dir() / "debug.keystore"
    if not ks.is_file():
        ks.parent.mkdir(parents=True, exist_ok=True)
        with fsutil.atomic_path(ks) as tmp:
            tmp.unlink()
            _run(["keytool", "-genkeypair", "-noprompt", "-keystore", tmp, "-storetype", "PKCS12",
                  "-storepass", "android", "-keypass", "android", "-alias", "androiddebugkey",
                  "-keyalg", "RSA", "-keysize", "2048", "-validity", "10000",
                  "-dname", "CN=Android Debug,O=Android,C=US"], what="keytool -genkeypair")
    return ks, "android", "androiddebugkey"


_FIXED_TIME = (2008, 1, 1, 0, 0, 0)


def _add_file(z: zipfile.ZipFile, src: Path, name: str, compress: bool) -> None:
    info = zipfile.ZipInfo(name, _FIXED_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    with open(src, "rb") as f, z.open(info, "w", force_zip64=src.stat().st_size > 0x7FFF0000) as out:
        shutil.copyfileobj(f, out, 1 << 20)


def _size_breakdown(apk: Path, model_name: str) -> dict:
    groups = {"runtime_library": 0, "jni_layer": 0, "model": 0, "tokenizer_and_config": 0,
              "code_dex": 0, "resources_and_manifest": 0, "signature": 0}
    raw = dict.fromkeys(groups, 0)
    entries = []
    with zipfile.ZipFile(apk) as z:
        for i in z.infolist():
            n = i.filename
            if n == f"lib/{ABI}/{ORT_LIB}":
                g = "runtime_library"
            elif n == f"lib/{ABI}/{JNI_LIB}":
                g = "jni_layer"
            elif n == f"assets/{model_name}":
                g = "model"
            elif n.startswith("assets/"):
                g = "tokenizer_and_config"
            elif n.endswith(".dex"):
                g = "code_dex"
            elif n.startswith("META-INF/"):
                g = "signature"
            else:
                g = "resources_and_manifest"
            groups[g] += i.compress_size
            raw[g] += i.file_size
            entries.append({"name": n, "stored": i.compress_type == zipfile.ZIP_STORED,
                            "size": i.file_size, "in_apk": i.compress_size})
    total = apk.stat().st_size
    return {"apk_bytes": total, "in_apk_bytes": groups, "uncompressed_bytes": raw,
            "zip_and_signing_overhead_bytes": total - sum(groups.values()),
            "entries": entries}


def build_apk(build_out: str | os.PathLike, out_apk: str | os.PathLike, *,
              keystore: str | os.PathLike | None = None, ks_pass: str = "android",
              ks_alias: str = "androiddebugkey", artifact: str | os.PathLike | None = None,
              verify: bool = True) -> dict:
    """Build the demo APK around a `pocketformer build` output; returns sizes, timings, paths.

    The APK is assembled in a temporary directory and renamed to `out_apk` only when it is
    signed and verified, so a failure leaves no APK behind. `keystore` (PKCS12/JKS, with
    `ks_pass`/`ks_alias`) defaults to a debug key generated once into the cache."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name, t0):
        timings[name] = round(time.perf_counter() - t0, 2)

    out_apk = Path(out_apk)
    if out_apk.exists() and out_apk.is_dir():
        raise BadInputError("--out is a directory; give the .apk file to write", file=str(out_apk))
    t0 = time.perf_counter()
    inputs = find_demo_inputs(build_out, artifact)
    tools = android_tools()
    if keystore is not None:
        ks = Path(keystore)
        if not ks.is_file():
            raise BadInputError("keystore not found", file=str(ks))
        r = subprocess.run(["keytool", "-list", "-keystore", str(ks), "-storepass", ks_pass,
                            "-alias", ks_alias], capture_output=True, text=True)
        if r.returncode != 0:
            raise BadInputError(f"cannot open key {ks_alias!r} in the keystore (wrong password or "
                                f"alias?): {_tail(r.stdout or r.stderr, 300)}", file=str(ks))
    else:
        ks, ks_pass, ks_alias = _debug_keystore()
    lap("inputs_and_tools", t0)
    _say(f"APK around {inputs.model} ({inputs.model.stat().st_size / 1e6:.1f} MB), tokenizer from "
         f"{inputs.vocab_source}")

    out_apk.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pf-apk-", dir=out_apk.parent) as td:
        work = Path(td)
        # 1. JNI layer for arm64-v8a
        t0 = time.perf_counter()
        jni = _aarch64_jni(tools, work)
        lap("jni_arm64", t0)

        # 2. resources, manifest, assets -> base.apk (aapt2)
        t0 = time.perf_counter()
        assets = work / "assets"
        write_assets(inputs, assets)
        manifest = _manifest_with_package(work)
        _run(["aapt2", "compile", "--dir", APP_SRC / "res", "-o", work / "res.zip"], what="aapt2 compile")
        gen = work / "gen"
        _run(["aapt2", "link", "-o", work / "base.apk", "-I", tools.android_jar, "--manifest", manifest,
              "--min-sdk-version", MIN_SDK, "--target-sdk-version", TARGET_SDK,
              "--version-code", VERSION_CODE, "--version-name", VERSION_NAME,
              "-A", assets, "-0", "onnx", "-0", "pte", "--java", gen, "--auto-add-overlay",
              work / "res.zip"], what="aapt2 link")
        lap("aapt2", t0)

        # 3. Java -> classes.dex (javac --release 8, dx)
        t0 = time.perf_counter()
        classes = work / "classes"
        classes.mkdir()
        _run(["javac", "--release", "8", "-Xlint:-options", "-encoding", "UTF-8", "-cp", tools.android_jar,
              "-d", classes, *_java_sources(android=True), *sorted(gen.rglob("*.java"))], what="javac")
        dex_dir = work / "dex"
        dex_dir.mkdir()
        _run(["java", "-Xmx1g", "-cp", tools.dx_jar, "com.android.dx.command.Main", "--dex",
              f"--min-sdk-version={MIN_SDK}", f"--output={dex_dir / 'classes.dex'}", classes], what="dx")
        lap("java_and_dex", t0)

        # 4. assemble, align, sign, verify
        t0 = time.perf_counter()
        unaligned = work / "unaligned.apk"
        with zipfile.ZipFile(work / "base.apk") as zin, zipfile.ZipFile(unaligned, "w") as zout:
            for info in zin.infolist():
                with zin.open(info) as src, zout.open(info, "w", force_zip64=info.file_size > 0x7FFF0000) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            _add_file(zout, dex_dir / "classes.dex", "classes.dex", True)
            _add_file(zout, tools.ort_android_lib, f"lib/{ABI}/{ORT_LIB}", True)
            _add_file(zout, jni, f"lib/{ABI}/{JNI_LIB}", True)
        aligned = work / "aligned.apk"
        _run(["zipalign", "-f", "-p", "4", unaligned, aligned], what="zipalign")
        unaligned.unlink()
        signed = work / "signed.apk"
        _run(["apksigner", "sign", "--ks", ks, "--ks-pass", f"pass:{ks_pass}", "--key-pass",
              f"pass:{ks_pass}", "--ks-key-alias", ks_alias, "--out", signed, aligned], what="apksigner sign")
        lap("package_align_sign", t0)
        checks = None
        if verify:
            t0 = time.perf_counter()
            checks = verify_apk(signed)
            lap("verify", t0)
        sizes = _size_breakdown(signed, inputs.model.name)
        with fsutil.atomic_path(out_apk) as tmp:
            os.replace(signed, tmp)
    timings["total"] = round(time.perf_counter() - t_start, 2)
    result = {
        "apk": str(out_apk),
        "package": APP_PACKAGE,
        "activity": APP_COMPONENT,
        "abi": ABI,
        "min_sdk": MIN_SDK,
        "target_sdk": TARGET_SDK,
        "model": str(inputs.model),
        "model_candidates": [str(p) for p in inputs.candidates],
        "tokenizer_source": str(inputs.vocab_source),
        "tokenizer": {"do_lower_case": inputs.lower_case, "max_seq_length": inputs.max_seq_length},
        "runtime": "onnxruntime 1.29 (AAR of npm com.github.asus4.onnxruntime@0.4.9)",
        "sha256": fsutil.sha256_file(out_apk),
        "sizes": sizes,
        "checks": checks,
        "timings_s": timings,
    }
    _say(f"wrote {out_apk} ({sizes['apk_bytes'] / 1e6:.1f} MB) in {timings['total']:.1f} s")
    return result


# ----------------------------------------------------------------------------- checks

def jni_symbol(class_descriptor: str, method: str) -> str:
    """The short JNI symbol of a native method (`Lcom/x/Y;`, `name`)."""
    def mangle(s: str) -> str:
        out = []
        for ch in s:
            if ch == "/":
                out.append("_")
            elif ch == "_":
                out.append("_1")
            elif ch == ";":
                out.append("_2")
            elif ch == "[":
                out.append("_3")
            elif ch.isascii() and ch.isalnum():
                out.append(ch)
            else:
                out.append(f"_0{ord(ch):04x}")
        return "".join(out)
    cls = class_descriptor[1:-1] if class_descriptor.startswith("L") else class_descriptor
    return f"Java_{mangle(cls)}_{mangle(method)}"


def dex_native_methods(dex: Path) -> list[tuple[str, str, str]]:
    """(class descriptor, method name, signature) of every `native` method in a .dex (dexdump)."""
    r = _run(["dexdump", dex], what="dexdump")
    out, cls, name, sig = [], None, None, None
    for line in r.stdout.splitlines():
        s = line.strip()
        m = re.match(r"Class descriptor\s*:\s*'(.+)'", s)
        if m:
            cls = m.group(1)
            continue
        m = re.match(r"name\s*:\s*'(.+)'", s)
        if m:
            name, sig = m.group(1), None
            continue
        m = re.match(r"type\s*:\s*'(.+)'", s)
        if m:
            sig = m.group(1)
            continue
        m = re.match(r"access\s*:\s*0x([0-9a-f]+)", s)
        if m and name and cls and int(m.group(1), 16) & 0x0100:       # ACC_NATIVE
            out.append((cls, name, sig or ""))
    return out


def verify_apk(apk: str | os.PathLike) -> dict:
    """The checks CI runs on an APK: `apksigner verify`, `zipalign -c`, `aapt dump badging`
    (package, launchable activity, native code), and every native method the dex declares has
    its JNI symbol exported by an arm64 .so in the APK. Raises RuntimeFailure on a failure."""
    apk = Path(apk)
    r = _run(["apksigner", "verify", "--verbose", apk], what="apksigner verify")
    schemes = sorted(set(re.findall(r"Verified using (v\S+) scheme.*: true", r.stdout)))
    _run(["zipalign", "-c", "-p", "4", apk], what="zipalign -c")
    badging = _run(["aapt", "dump", "badging", apk], what="aapt dump badging").stdout
    pkg = re.search(r"package: name='([^']+)'", badging)
    act = re.search(r"launchable-activity: name='([^']+)'", badging)
    native = re.search(r"native-code: (.*)", badging)
    info = {"apksigner": r.stdout.strip().splitlines()[0] if r.stdout.strip() else "",
            "signature_schemes": schemes,
            "package": pkg.group(1) if pkg else None,
            "launchable_activity": act.group(1) if act else None,
            "native_code": re.findall(r"'([^']+)'", native.group(1)) if native else []}
    problems = []
    if info["package"] != APP_PACKAGE:
        problems.append(f"package is {info['package']!r}")
    if info["launchable_activity"] != APP_PACKAGE + APP_ACTIVITY:
        problems.append(f"launchable activity is {info['launchable_activity']!r}")
    if info["native_code"] != [ABI]:
        problems.append(f"native code is {info['native_code']!r}, expected ['{ABI}']")
    with tempfile.TemporaryDirectory(prefix="pf-apkcheck-") as td:
        with zipfile.ZipFile(apk) as z:
            dexes = [n for n in z.namelist() if re.fullmatch(r"classes\d*\.dex", n)]
            libs = [n for n in z.namelist() if n.startswith(f"lib/{ABI}/") and n.endswith(".so")]
            for n in dexes + libs:
                z.extract(n, td)
        natives = []
        for d in dexes:
            natives += dex_native_methods(Path(td) / d)
        exported: dict[str, str] = {}
        for lib in libs:
            hdr = _run(["readelf", "-h", Path(td) / lib], what="readelf -h").stdout
            if "AArch64" not in hdr:
                problems.append(f"{lib} is not an AArch64 ELF")
            for sym in _dynamic_symbols(Path(td) / lib):
                exported.setdefault(sym, Path(lib).name)
        missing = [f"{c}.{n}{s}" for c, n, s in natives if jni_symbol(c, n) not in exported]
        if not natives:
            problems.append("the dex declares no native methods")
        if missing:
            problems.append(f"native methods without a JNI symbol in lib/{ABI}/*.so: {missing}")
    info["native_methods"] = [{"class": c, "method": n, "signature": s, "symbol": jni_symbol(c, n),
                               "library": exported.get(jni_symbol(c, n))} for c, n, s in natives]
    info["libraries"] = [Path(x).name for x in libs]
    if problems:
        raise RuntimeFailure(f"APK check failed for {apk}: " + "; ".join(problems))
    return info


# ----------------------------------------------------------------------------- host JVM

def _host_key(tools: AndroidTools) -> str:
    from pocketformer.runtime_bench import native
    h = hashlib.sha256()
    for p in [JNI_SRC, *_java_sources(android=False)]:
        h.update(f"{p.name}:{fsutil.sha256_file(p)}\n".encode())
    h.update(str(native.ORT_NODE.sha256).encode())
    h.update(fsutil.sha256_file(tools.ort_include / "onnxruntime_c_api.h").encode())
    for tool in ("gcc", "javac"):
        h.update(_run([tool, "--version" if tool == "gcc" else "-version"]).stdout.encode()[:200])
    return h.hexdigest()[:16]


def build_host(force: bool = False) -> Path:
    """The app's platform-independent Java classes + libpfdemo.so built for the host (gcc,
    Linux x64 libonnxruntime.so.1 of onnxruntime-node@1.30.0, the asus4 headers), cached."""
    from pocketformer.runtime_bench import native

    tools = android_tools(host=True)
    dest = cache_dir() / "host" / _host_key(tools)
    if not force and (dest / ".ok").is_file():
        return dest
    ort = native.cache_root() / "sdk" / f"onnxruntime-{native.ORT_LINUX_VERSION}-linux-x86_64" / "libonnxruntime.so.1"
    with fsutil.atomic_dir(dest) as tmp:
        shutil.copy2(ort, tmp / "libonnxruntime.so.1")
        jdk = tools.java_home / "include"
        _run(["gcc", "-std=c11", "-O2", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall", "-Werror",
              "-I", jdk, "-I", jdk / "linux", "-I", tools.ort_include, JNI_SRC, "-o", tmp / JNI_LIB,
              tmp / "libonnxruntime.so.1", "-Wl,-rpath,$ORIGIN"], what="gcc (JNI, host)")
        (tmp / "classes").mkdir()
        _run(["javac", "--release", "8", "-Xlint:-options", "-encoding", "UTF-8", "-d", tmp / "classes",
              *_java_sources(android=False)], what="javac (host)")
        (tmp / ".ok").write_text("ok\n")
    return dest


def run_host_jvm(args: list, *, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Run the host driver (android_demo/app/src/test/java/.../HostCheck.java) on the host JVM
    with the host build of our JNI layer: `run_host_jvm(["bench", "--model", M, ...])`."""
    host = build_host()
    cmd = ["java", "-Xmx2g", f"-Dpfdemo.lib={host / JNI_LIB}", "-cp", str(host / "classes"),
           "com.pocketformer.demo.HostCheck", *map(str, args)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeFailure(f"host JVM run timed out after {timeout:.0f} s") from e
    if check and r.returncode != 0:
        kind = BadInputError if r.returncode == 2 else RuntimeFailure
        raise kind(f"host JVM run failed (exit {r.returncode}): {_tail(r.stderr or r.stdout)}")
    return r


def host_embed(model, vocab, sentences: list[str], *, batch_size: int = 16, threads: int = 1,
               max_len: int = 256, lower_case: bool = True, via_buffer: bool = False):
    """(token ids per sentence, embeddings [n, d] float32) from the app's Java tokenizer and
    JNI session on the host JVM."""
    import numpy as np

    bad = [s for s in sentences if "\n" in s or "\r" in s]
    if bad:
        raise BadInputError(f"sentences must not contain line breaks: {bad[0]!r}")
    with tempfile.TemporaryDirectory(prefix="pf-hostjvm-") as td:
        td = Path(td)
        (td / "s.txt").write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
        args = ["embed", "--model", model, "--vocab", vocab, "--sentences", td / "s.txt",
                "--ids", td / "ids.txt", "--emb", td / "emb.f32", "--batch", batch_size,
                "--threads", threads, "--max-len", max_len]
        if not lower_case:
            args.append("--cased")
        if via_buffer:
            args.append("--buffer")
        run_host_jvm(args)
        ids = [[int(x) for x in line.split()] for line in
               (td / "ids.txt").read_text(encoding="utf-8").splitlines()]
        emb = np.fromfile(td / "emb.f32", dtype="<f4")
    return ids, emb.reshape(len(sentences), -1) if len(sentences) else emb


def host_bench(model, vocab, json_out, *, warmup: int = 2, runs: int = 5, threads: int = 1,
               seq_len: int = 128, text: str | None = None) -> dict:
    """The app's benchmark mode (BenchRunner) on the host JVM; returns the JSON it wrote."""
    args = ["bench", "--model", model, "--vocab", vocab, "--json", json_out, "--warmup", warmup,
            "--runs", runs, "--threads", threads, "--seq-len", seq_len]
    if text is not None:
        args += ["--text", text]
    run_host_jvm(args, check=False)
    if not Path(json_out).is_file():
        raise RuntimeFailure("the host JVM benchmark wrote no JSON", file=str(json_out))
    return json.loads(Path(json_out).read_text())


# ----------------------------------------------------------------------------- adb (app mode)

def app_install_args(apk: str | os.PathLike) -> list[str]:
    """`adb install` arguments (replace an installed copy signed with the same key)."""
    return ["install", "-r", str(apk)]


def app_bench_command(artifact: str, *, warmup: int = 5, runs: int = 30, threads: int = 1,
                      seq_len: int = 128, text: str | None = None, result: str | None = None,
                      device_dir: str = DEVICE_APP_DIR, am: str = "am") -> tuple[str, str]:
    """(the device shell command that starts the app's benchmark mode, the result JSON path).

    `artifact` is an asset name of the APK (`model.onnx`) or an absolute device path. `-S`
    stops a running instance first, `-W` waits until the activity has started (the benchmark
    itself runs on after that: poll for the result file)."""
    for k, v in (("warmup", warmup), ("runs", runs), ("threads", threads), ("seq_len", seq_len)):
        if not isinstance(v, int) or v < (0 if k == "warmup" else 1):
            raise BadInputError(f"{k} must be an integer >= {0 if k == 'warmup' else 1}", field=k)
    if not artifact:
        raise BadInputError("no artifact given", field="artifact")
    result = result or f"{device_dir}/bench/result-{uuid.uuid4().hex[:12]}.json"
    argv = [am, "start", "-S", "-W", "-n", APP_COMPONENT, "-a", BENCH_ACTION,
            "--es", "artifact", artifact, "--ei", "warmup", str(warmup), "--ei", "runs", str(runs),
            "--ei", "threads", str(threads), "--ei", "seq_len", str(seq_len)]
    if text is not None:
        argv += ["--es", "text", text]
    argv += ["--es", "result", result]
    return " ".join(shlex.quote(a) for a in argv), result


def run_app_bench(adb, artifact: str | os.PathLike, *, apk: str | os.PathLike | None = None,
                  warmup: int = 5, runs: int = 30, threads: int = 1, seq_len: int = 128,
                  text: str | None = None, timeout: float = 900, poll_s: float = 1.0,
                  device_dir: str = DEVICE_APP_DIR, am: str = "am") -> dict:
    """Benchmark an artifact in the app on a device through a runtime_bench.adb.Adb.

    `artifact`: a local file (pushed to `device_dir/artifacts/<hash>/`, skipped when already
    there), `asset:NAME` (a model bundled in the APK) or an absolute device path. With `apk`,
    the app is installed first. Then `am start` with extras, poll for the result file, pull it,
    remove it. A result carrying "error" raises BadInputError (exit_code 2) or RuntimeFailure."""
    from pocketformer.runtime_bench.adb import sync_files, take_json

    q = shlex.quote
    install = None
    if apk is not None:
        apk = Path(apk)
        if not apk.is_file():
            raise BadInputError("APK not found", file=str(apk))
        proc = adb._run(app_install_args(apk), f"adb install {apk.name}")
        if proc.returncode != 0 or "Success" not in proc.stdout:
            raise RuntimeFailure(f"adb install failed: {_tail(proc.stderr or proc.stdout, 500)}",
                                 device=adb.serial)
        install = proc.stdout.strip()[-200:]
    push = None
    text_art = str(artifact)
    if isinstance(artifact, Path) or Path(text_art).is_file():
        local = Path(artifact)
        if not local.is_file():
            raise BadInputError("artifact not found", file=str(local), device=adb.serial)
        push = sync_files(adb, {local.name: local}, root=f"{device_dir}/artifacts")
        on_device = f"{push['dir']}/{local.name}"
    elif text_art.startswith("asset:"):
        on_device = text_art[len("asset:"):]
    elif text_art.startswith("/"):
        on_device = text_art              # already on the device
    else:
        raise BadInputError("artifact is not a local file, asset:NAME or an absolute device path",
                            file=text_art, device=adb.serial)
    cmd, result = app_bench_command(on_device, warmup=warmup, runs=runs, threads=threads,
                                    seq_len=seq_len, text=text, device_dir=device_dir, am=am)
    rdir = result.rsplit("/", 1)[0]
    adb.shell(f"mkdir -p {q(rdir)} && rm -f {q(result)}", check=True)
    t0 = time.monotonic()
    rc, out, err = adb.shell(cmd, timeout=120)
    if rc != 0 or re.search(r"^Error", out, re.MULTILINE):
        raise RuntimeFailure(f"am start failed (exit {rc}): {_tail(err or out, 500)}", device=adb.serial)
    deadline = time.monotonic() + timeout
    while adb.shell(f"test -f {q(result)}")[0] != 0:
        if time.monotonic() > deadline:
            raise RuntimeFailure(f"no result from the app after {timeout:.0f} s ({result}); is "
                                 f"{APP_PACKAGE} installed and the screen unlocked?", device=adb.serial)
        time.sleep(poll_s)
    wall = time.monotonic() - t0
    data = take_json(adb, result, "the app")
    if "error" in data:
        kind = BadInputError if data.get("exit_code") == 2 else RuntimeFailure
        raise kind(f"the app's benchmark failed: {data['error']}", device=adb.serial)
    return {"target": f"adb:{adb.serial}", "mode": "app", "command": cmd, "result_path": result,
            "artifact_on_device": on_device, "install": install,
            "push": None if push is None else {k: push[k] for k in ("dir", "pushed", "skipped", "check")},
            "wall_s": wall, "runner": data}


# ----------------------------------------------------------------------------- CLI entry

def _mb(n: int) -> str:
    return f"{n / 1e6:8.2f} MB" if n >= 100_000 else f"{n / 1e3:8.1f} kB"


def main_android_demo(build_out: str, out: str) -> int:
    """`pocketformer android-demo BUILD_OUT --out app.apk`: build, print the size breakdown.
    Errors propagate as PocketformerError (the CLI maps them to exit codes)."""
    res = build_apk(build_out, out)
    s = res["sizes"]
    print(f"{res['apk']}: {s['apk_bytes'] / 1e6:.1f} MB, {res['package']} ({res['abi']}, "
          f"minSdk {res['min_sdk']}), built in {res['timings_s']['total']:.1f} s")
    print(f"  model       {Path(res['model']).name}")
    labels = {"runtime_library": "runtime library (libonnxruntime.so)", "jni_layer": "JNI layer (libpfdemo.so)",
              "model": "model", "tokenizer_and_config": "vocab + config", "code_dex": "code (classes.dex)",
              "resources_and_manifest": "resources + manifest", "signature": "signature (META-INF)"}
    for k, label in labels.items():
        print(f"  {label:38s} {_mb(s['in_apk_bytes'][k])} in APK ({_mb(s['uncompressed_bytes'][k])} unpacked)")
    print(f"  {'zip headers + signing block':38s} {_mb(s['zip_and_signing_overhead_bytes'])}")
    checks = res.get("checks") or {}
    if checks:
        print(f"  checks: apksigner {'/'.join(checks['signature_schemes'])}, badging "
              f"{checks['package']} / {checks['launchable_activity']} / {','.join(checks['native_code'])}, "
              f"{len(checks['native_methods'])} native methods bound")
    return 0


def _main(argv: list[str] | None = None) -> int:
    import argparse

    from pocketformer.errors import PocketformerError

    p = argparse.ArgumentParser(prog="python -m pocketformer.android")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="install/fetch the Android tool chain (scripts/setup.sh)")
    s.add_argument("--no-host", action="store_true", help="skip the host JVM check tools")
    b = sub.add_parser("build", help="build the demo APK around a pocketformer build output")
    b.add_argument("build_out")
    b.add_argument("--out", required=True)
    a = sub.add_parser("assets", help="write the app's assets (model, vocab.txt, properties) for Gradle")
    a.add_argument("build_out")
    a.add_argument("dest")
    v = sub.add_parser("verify", help="run the APK checks (apksigner, badging, JNI symbols)")
    v.add_argument("apk")
    args = p.parse_args(argv)
    try:
        if args.cmd == "setup":
            print(json.dumps(ensure_android_tools(host=not args.no_host), indent=2))
            return 0
        if args.cmd == "build":
            return main_android_demo(args.build_out, args.out)
        if args.cmd == "assets":
            inputs = find_demo_inputs(args.build_out)
            write_assets(inputs, args.dest)
            print(f"{args.dest}: {inputs.model.name}, vocab.txt (from {inputs.vocab_source}), {CONFIG_ASSET}")
            return 0
        print(json.dumps(verify_apk(args.apk), indent=2))
        return 0
    except PocketformerError as e:
        print(f"error: {e.describe()}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(_main())
