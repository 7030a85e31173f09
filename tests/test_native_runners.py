"""Native (C++) benchmark runners on real runtimes: built by the tool, run on the host and under
QEMU (aarch64), checked against the Python runtimes on the same inputs; the Android runner is
checked as an ELF file (Bionic programs cannot run here).

Nothing is skipped: a missing toolchain fails with the apt packages to install
(scripts/setup.sh installs them)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pocketformer.errors import RuntimeFailure
from pocketformer.runtime_bench import native, qemu

FIELDS = {"runner", "runtime_version", "arch", "model", "threads", "warmup", "runs", "load_ms",
          "first_inference_ms", "latencies_ms", "peak_rss_mb", "rss_before_load_mb", "outputs",
          "threads_applied"}
RUNTIME_OF = {"onnx": "onnxruntime", "pte": "executorch"}


@pytest.fixture(scope="module")
def artifacts(tiny_bert, tmp_path_factory) -> Path:
    """A tiny BERT exported by the project's exporter: model.onnx, model.pte, their .inputs.npz."""
    from pocketformer.export import ExportConfig, export_model
    from pocketformer.models import load_model

    out = tmp_path_factory.mktemp("native_art")
    # Layer norms etc. stay in portable kernels: that also exercises the linked kernel library.
    export_model(load_model(tiny_bert), out, ExportConfig(seq_len=16, etrecord=False,
                                                          min_delegated_flops=None))
    return out


@pytest.fixture(scope="module")
def runners() -> dict:
    pairs = [("executorch", "x86_64"), ("onnxruntime", "x86_64"), ("executorch", "aarch64"),
             ("onnxruntime", "aarch64"), ("onnxruntime", "android-arm64")]
    missing = {t: p for arch in ("x86_64", "aarch64", "android-arm64")
               for t, p in native.missing_tools(arch, for_running=True).items()}
    assert not missing, (f"toolchain missing: {sorted(missing)}; run `apt-get install "
                         f"{' '.join(sorted(set(missing.values())))}` (scripts/setup.sh does this)")
    return {pair: native.build_runner(*pair) for pair in pairs}


def _python_outputs(model: Path) -> np.ndarray:
    from pocketformer.export.runtimes import RUNNERS

    with np.load(f"{model}.inputs.npz") as z:
        arrays = [z[k] for k in z.files]
    return RUNNERS[model.suffix](model, threads=1)(*arrays)


def _run(bundle, model, raw, **kw):
    kw.setdefault("warmup", 1)
    kw.setdefault("runs", 3)
    kw.setdefault("threads", 1)
    kw.setdefault("values", 1000)
    return native.run_native(bundle, model, inputs=raw, timeout=300, **kw)


def _readelf(path: Path) -> str:
    return subprocess.run(["readelf", "-hldW", str(path)], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.parametrize("fmt", ["onnx", "pte"])
def test_host_runner_matches_python_runtime(fmt, artifacts, runners, tmp_path):
    model = artifacts / f"model.{fmt}"
    raw = native.npz_to_raw(f"{model}.inputs.npz", tmp_path / "raw")
    assert [(d, s) for _, d, s in raw] == [("int64", [1, 16]), ("int64", [1, 16])]
    bundle = runners[(RUNTIME_OF[fmt], "x86_64")]
    res = _run(bundle, model, raw, runs=5)
    assert FIELDS <= set(res), FIELDS - set(res)
    assert res["runner"] == f"{RUNTIME_OF[fmt]}-native" and res["arch"] == "x86_64"
    assert res["runtime_version"] == bundle.runtime_version
    assert res["runs"] == 5 == len(res["latencies_ms"]) and res["warmup"] == 1
    assert res["threads"] == 1 and res["threads_applied"] is True
    assert all(x > 0 for x in res["latencies_ms"]) and res["load_ms"] > 0
    assert res["peak_rss_mb"] >= res["rss_before_load_mb"] > 0
    assert [i["source"] for i in res["inputs"]] == [str(p) for p, _, _ in raw]

    expected = _python_outputs(model)
    out = res["outputs"][0]
    assert out["dtype"] == "float32" and out["shape"] == list(expected.shape)
    got = np.array(out["values"], dtype=np.float64)
    assert got.size == expected.size
    assert np.abs(got - expected.ravel()).max() < 1e-5
    assert out["abs_sum"] == pytest.approx(float(np.abs(expected.astype(np.float64)).sum()), rel=1e-5)

    # The bundle directory is self-contained ($ORIGIN rpath): it runs from a copy.
    copy = tmp_path / "copy"
    shutil.copytree(bundle.dir, copy)
    moved = native.RunnerBundle(runtime=bundle.runtime, arch=bundle.arch, binary=copy / bundle.binary.name,
                                libs=[copy / p.name for p in bundle.libs], dir=copy,
                                runtime_version=bundle.runtime_version)
    again = _run(moved, model, raw, runs=1, warmup=0)
    assert again["outputs"][0]["values"] == out["values"]


@pytest.mark.parametrize("fmt", ["onnx", "pte"])
def test_seeded_inputs_follow_model_metadata(fmt, artifacts, runners):
    model = artifacts / f"model.{fmt}"
    bundle = runners[(RUNTIME_OF[fmt], "x86_64")]
    a = native.run_native(bundle, model, inputs=None, seed=7, warmup=0, runs=1, threads=1)
    b = native.run_native(bundle, model, inputs=None, seed=7, warmup=0, runs=1, threads=1)
    c = native.run_native(bundle, model, inputs=None, seed=8, warmup=0, runs=1, threads=1)
    assert a["outputs"] == b["outputs"] and a["outputs"] != c["outputs"]
    # .pte: the static example shape; .onnx: dynamic batch/sequence dims become 1.
    shape = [1, 16] if fmt == "pte" else [1, 1]
    assert [(i["dtype"], i["shape"], i["source"]) for i in a["inputs"]] == [("int64", shape, "random")] * 2


def test_bad_arguments_exit_2_and_name_the_culprit(artifacts, runners, tmp_path):
    for runtime in ("executorch", "onnxruntime"):
        binary = runners[(runtime, "x86_64")].binary
        missing = tmp_path / "no-such-model.bin"
        r = subprocess.run([str(binary), "--model", str(missing), "--json", str(tmp_path / "o.json")],
                           capture_output=True, text=True)
        assert r.returncode == 2 and str(missing) in r.stderr, (runtime, r.returncode, r.stderr)
        model = artifacts / ("model.pte" if runtime == "executorch" else "model.onnx")
        short = tmp_path / "short.bin"
        short.write_bytes(b"\0" * 12)
        r = subprocess.run([str(binary), "--model", str(model), "--input", f"{short}:int64:1x16",
                            "--input", f"{short}:int64:1x16", "--json", str(tmp_path / "o.json")],
                           capture_output=True, text=True)
        assert r.returncode == 2 and str(short) in r.stderr, (runtime, r.stderr)
        r = subprocess.run([str(binary), "--model", str(model), "--runs", "zero", "--json", "x"],
                           capture_output=True, text=True)
        assert r.returncode == 2 and "--runs" in r.stderr
        # A file that is not a model is bad input (2), reported through run_native (the bench
        # command turns that exit code into BadInputError).
        junk = tmp_path / "junk.model"
        junk.write_bytes(b"not a model" * 10)
        with pytest.raises(RuntimeFailure) as e:
            native.run_native(runners[(runtime, "x86_64")], junk, warmup=0, runs=1, threads=1)
        assert e.value.returncode == 2 and "junk.model" in e.value.stderr
    assert not list(tmp_path.glob("o.json*"))          # nothing half-written


@pytest.mark.parametrize("fmt", ["pte", "onnx"])
def test_aarch64_runner_under_qemu_matches_host(fmt, artifacts, runners, tmp_path):
    model = artifacts / f"model.{fmt}"
    raw = native.npz_to_raw(f"{model}.inputs.npz", tmp_path)
    runtime = RUNTIME_OF[fmt]
    bundle = runners[(runtime, "aarch64")]
    elf = _readelf(bundle.binary)
    assert "AArch64" in elf and "/lib/ld-linux-aarch64.so.1" in elf and "[$ORIGIN]" in elf
    host = _run(runners[(runtime, "x86_64")], model, raw, runs=1)
    # ONNX Runtime needs an ARM /proc/cpuinfo under QEMU 7.2 (bind-mounted, unshare -m).
    prefix = qemu.qemu_prefix("neoverse-n1", workdir=tmp_path,
                              fake_cpuinfo_file=(runtime == "onnxruntime"))
    arm = _run(bundle, model, raw, runs=2, prefix=prefix)
    assert arm["arch"] == "aarch64" and len(arm["latencies_ms"]) == 2
    assert arm["runtime_version"] == host["runtime_version"]
    for a, h in zip(arm["outputs"], host["outputs"], strict=True):
        assert a["shape"] == h["shape"] and a["dtype"] == h["dtype"]
        assert np.abs(np.array(a["values"]) - np.array(h["values"])).max() < 1e-5


def test_quantized_8da4w_program_runs_natively(tiny_bert, runners, tmp_path):
    """8da4w programs need the quantized kernels library besides XNNPACK."""
    from pocketformer.export import ExportConfig, export_model
    from pocketformer.models import load_model

    (rec,) = export_model(load_model(tiny_bert), tmp_path, ExportConfig(
        quantize="8da4w", group_size=32, formats=["pte"], seq_len=16, etrecord=False,
        min_delegated_flops=None))
    model = tmp_path / rec.path
    raw = native.npz_to_raw(f"{model}.inputs.npz", tmp_path / "raw")
    expected = _python_outputs(model)
    for arch, prefix in (("x86_64", []), ("aarch64", qemu.qemu_prefix("neoverse-n1", workdir=tmp_path,
                                                                   fake_cpuinfo_file=False))):
        res = _run(runners[("executorch", arch)], model, raw, runs=2, prefix=prefix)
        got = np.array(res["outputs"][0]["values"])
        assert np.abs(got - expected.ravel()).max() < 1e-4, arch


def test_android_onnxruntime_runner_is_a_bionic_executable(runners):
    bundle = runners[("onnxruntime", "android-arm64")]
    assert not bundle.runnable_here
    elf = _readelf(bundle.binary)
    assert "Machine:                           AArch64" in elf
    assert "[Requesting program interpreter: /system/bin/linker64]" in elf
    assert "Shared library: [libonnxruntime.so]" in elf and "Shared library: [libc.so]" in elf
    assert "[$ORIGIN]" in elf
    notes = subprocess.run(["readelf", "-nW", str(bundle.binary)], capture_output=True, text=True).stdout
    assert ".note.android.ident" in notes
    (lib,) = bundle.libs
    lib_elf = _readelf(lib)
    assert lib.parent == bundle.dir and "AArch64" in lib_elf and "[libonnxruntime.so]" in lib_elf


def test_executorch_android_refuses_clearly():
    with pytest.raises(RuntimeFailure, match="docs/native_runners.md"):
        native.build_runner("executorch", "android-arm64")


def test_builds_are_cached_and_bundles_complete(runners):
    for (runtime, arch), bundle in runners.items():
        again = native.build_runner(runtime, arch)
        assert again.binary == bundle.binary and again.build["key"] == bundle.build["key"]
        assert bundle.binary.parent == bundle.dir and all(p.is_file() for p in bundle.libs)
        stamp = json.loads((bundle.dir / ".stamp.json").read_text())
        assert stamp["libs"] == {p.name: native.fsutil.sha256_file(p) for p in bundle.libs}
    assert {"g++", "g++-aarch64-linux-gnu", "qemu-user", "clang", "lld"} <= set(native.apt_packages())
