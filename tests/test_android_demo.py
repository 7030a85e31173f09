"""android_demo: the Gradle-free APK build and the app's code on real tools and runtimes.

- The APK (built once per module around a real all-MiniLM-L6-v2 ONNX export): `apksigner
  verify`, `zipalign -c`, `aapt dump badging` (package, launchable activity, arm64-v8a), every
  `native` method in the dex (dexdump) exported by the arm64 .so (readelf --dyn-syms).
- The same Java + JNI C sources on the host JVM (javac + gcc, Linux x64 libonnxruntime 1.30):
  WordPiece ids == transformers' tokenizer on every STS dev sentence; embeddings == Python
  onnxruntime (cosine >= 0.9999); STS dev Spearman == pocketformer.evaluation on the artifact.
- The app's benchmark mode JSON (native runner schema) and the adb app-mode helper against the
  real adbd peer (push, shell, poll, pull); `am start` and `adb install` (phone only) as the
  exact commands sent.
- Bad input: exit code 2 naming what is missing, no APK left behind.

Needs the tool chain from `python -m pocketformer.android setup` (scripts/setup.sh); the first
fixture runs it (idempotent, cached under $POCKETFORMER_CACHE/android). Bionic code cannot run
here: nothing in this file runs on a phone (docs/android_demo.md).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, STS_DEV
from pocketformer import android
from pocketformer.errors import EXIT_BAD_INPUT, BadInputError, RuntimeFailure

CLI = str(Path(sys.executable).parent / "pocketformer")
SCHEMA = {"runner", "runtime_version", "arch", "model", "threads", "warmup", "runs", "load_ms",
          "first_inference_ms", "latencies_ms", "peak_rss_mb", "rss_before_load_mb", "outputs",
          "threads_applied", "inputs"}
# What `pocketformer build` saves under OUT/model for MiniLM (transformers 5 writes tokenizer.json,
# no vocab.txt): the app's vocab.txt is derived from tokenizer.json.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "sentence_bert_config.json")


@pytest.fixture(scope="module")
def tools() -> dict:
    return android.ensure_android_tools()


@pytest.fixture(scope="module")
def build_out(tmp_path_factory, tools) -> Path:
    """The layout of a `pocketformer build` output, made cheaply: the ONNX export of MiniLM
    (the CLI's export command) + the tokenizer files a build saves under model/."""
    from pocketformer.models import builtin_path

    out = tmp_path_factory.mktemp("android_build")
    proc = subprocess.run([CLI, "export", "minilm", "--format", "onnx", "--out", str(out / "artifacts")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "model").mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy2(builtin_path("minilm") / name, out / "model" / name)
    return out


@pytest.fixture(scope="module")
def built(build_out, tmp_path_factory) -> dict:
    apk = tmp_path_factory.mktemp("apk") / "app.apk"
    res = android.build_apk(build_out, apk)
    assert apk.is_file() and res["apk"] == str(apk)
    return res


@pytest.fixture(scope="module")
def vocab(built, tmp_path_factory) -> Path:
    """The vocab.txt inside the APK: what the app's tokenizer reads."""
    out = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    with zipfile.ZipFile(built["apk"]) as z:
        out.write_bytes(z.read("assets/vocab.txt"))
    return out


@pytest.fixture(scope="module")
def sts():
    from pocketformer.data import DataSpec, load_pairs
    # the held-out half the demo recipe scores (examples/minilm.toml): 750 pairs, 1500 sentences
    return load_pairs(DataSpec.parse(f"{STS_DEV}@0.5:1"))


# ---------------------------------------------------------------- the APK

def test_apk_signed_aligned_and_badged(built):
    apk = built["apk"]
    v = subprocess.run(["apksigner", "verify", "--verbose", apk], capture_output=True, text=True)
    assert v.returncode == 0, v.stderr
    assert "Verified using v2 scheme (APK Signature Scheme v2): true" in v.stdout
    assert subprocess.run(["zipalign", "-c", "-p", "4", apk]).returncode == 0
    badging = subprocess.run(["aapt", "dump", "badging", apk], capture_output=True, text=True,
                             check=True).stdout
    assert "package: name='com.pocketformer.demo'" in badging
    assert "launchable-activity: name='com.pocketformer.demo.MainActivity'" in badging
    assert "native-code: 'arm64-v8a'" in badging
    assert f"sdkVersion:'{android.MIN_SDK}'" in badging
    assert built["timings_s"]["total"] < 300


def test_every_native_method_has_its_jni_symbol(built, tmp_path):
    with zipfile.ZipFile(built["apk"]) as z:
        z.extract("classes.dex", tmp_path)
        z.extract("lib/arm64-v8a/libpfdemo.so", tmp_path)
        z.extract("lib/arm64-v8a/libonnxruntime.so", tmp_path)
    dump = subprocess.run(["dexdump", str(tmp_path / "classes.dex")], capture_output=True, text=True,
                          check=True).stdout
    natives = android.dex_native_methods(tmp_path / "classes.dex")
    assert {n for _, n, _ in natives} == {"nativeVersion", "nativeCreate", "nativeCreateFromBuffer",
                                          "nativeInputNames", "nativeOutputNames", "nativeRun",
                                          "nativeClose"}
    assert dump.count("NATIVE") >= len(natives)
    so = tmp_path / "lib/arm64-v8a/libpfdemo.so"
    syms = subprocess.run(["readelf", "--dyn-syms", "-W", str(so)], capture_output=True, text=True,
                          check=True).stdout
    defined = {ln.split()[7] for ln in syms.splitlines()
               if len(ln.split()) >= 8 and ln.split()[6] != "UND" and ln.split()[4] == "GLOBAL"}
    for cls, name, _ in natives:
        assert cls == "Lcom/pocketformer/demo/OrtSession;"
        assert f"Java_com_pocketformer_demo_OrtSession_{name}" in defined
    hdr = subprocess.run(["readelf", "-h", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    assert "AArch64" in hdr and "DYN" in hdr
    assert "[libonnxruntime.so]" in hdr and "[libc.so]" in hdr and "[libpfdemo.so]" in hdr
    undefined = {ln.split()[7].split("@")[0] for ln in syms.splitlines()
                 if len(ln.split()) >= 8 and ln.split()[6] == "UND" and ln.split()[7] != "0"}
    assert undefined <= android.JNI_LIBC | {"OrtGetApiBase"}
    ort = subprocess.run(["readelf", "--dyn-syms", "-W", str(tmp_path / "lib/arm64-v8a/libonnxruntime.so")],
                         capture_output=True, text=True, check=True).stdout
    assert "OrtGetApiBase" in ort


def test_apk_contents_and_size_breakdown(built, build_out):
    s = built["sizes"]
    g = s["in_apk_bytes"]
    assert s["apk_bytes"] == Path(built["apk"]).stat().st_size
    assert sum(g.values()) + s["zip_and_signing_overhead_bytes"] == s["apk_bytes"]
    model = build_out / "artifacts" / "model.onnx"
    assert g["model"] == s["uncompressed_bytes"]["model"] == model.stat().st_size   # stored
    assert 5e6 < g["runtime_library"] < 20e6 and g["code_dex"] < 200e3
    with zipfile.ZipFile(built["apk"]) as z:
        info = z.getinfo("assets/model.onnx")
        assert info.compress_type == zipfile.ZIP_STORED
        from pocketformer.models import builtin_path
        # derived from the build's tokenizer.json, identical to the original model's vocab.txt
        assert z.read("assets/vocab.txt") == (builtin_path("minilm") / "vocab.txt").read_bytes()
        props = z.read(f"assets/{android.CONFIG_ASSET}").decode()
        assert "model=model.onnx" in props and "do_lower_case=true" in props
        assert "max_seq_length=256" in props
        names = set(z.namelist())
    assert not any(n.endswith((".class", ".jks", ".keystore")) for n in names)
    assert built["checks"]["native_code"] == ["arm64-v8a"]
    assert built["tokenizer_source"] == str(build_out / "model" / "tokenizer.json")


# ---------------------------------------------------------------- the same code on the host JVM

def test_host_jvm_tokenizer_embeddings_and_sts_match_python(build_out, vocab, sts):
    """Java WordPiece == transformers on 1500 STS dev sentences; JNI embeddings == Python
    onnxruntime (cosine >= 0.9999); Spearman == pocketformer.evaluation on the artifact (the
    functions `pocketformer eval ARTIFACT` calls)."""
    from scipy.stats import spearmanr
    from transformers import AutoTokenizer

    from pocketformer.evaluation import EvalOptions, artifact_forward, evaluate
    from pocketformer.models import load_model

    model = build_out / "artifacts" / "model.onnx"
    sentences = sts.first + sts.second
    ids, emb = android.host_embed(model, vocab, sentences, batch_size=16, threads=2)

    ref_ids = AutoTokenizer.from_pretrained(build_out / "model")(
        sentences, truncation=True, max_length=256)["input_ids"]
    mismatched = [s for s, a, b in zip(sentences, ids, ref_ids) if a != b]
    assert not mismatched, f"{len(mismatched)} sentences tokenized differently, e.g. {mismatched[:3]}"

    fn, opts, note = artifact_forward(model, EvalOptions())
    captured = []

    def recording(*args):
        y = fn(*args)
        captured.append(np.asarray(y, dtype=np.float32))
        return y
    result = evaluate(load_model(json.loads(model.with_name("model.onnx.json").read_text())["source"]),
                      "sts", sts, fn=recording, opts=opts)
    py = np.concatenate(captured)
    assert py.shape == emb.shape == (len(sentences), 384)
    cos = (py * emb).sum(1) / (np.linalg.norm(py, axis=1) * np.linalg.norm(emb, axis=1))
    assert cos.min() >= 0.9999, f"min cosine {cos.min()}"

    n = len(sts.first)
    pair_cos = (emb[:n] * emb[n:]).sum(1) / (np.linalg.norm(emb[:n], axis=1) * np.linalg.norm(emb[n:], axis=1))
    java_rho = float(spearmanr(pair_cos, sts.scores).statistic)
    assert abs(java_rho - result.value) < 1e-4, (java_rho, result.value)
    assert 0.8 < java_rho < 0.95          # all-MiniLM-L6-v2 on the second half of STS-B dev


def test_host_jvm_tokenizer_edge_cases(build_out, vocab):
    """Accents, Turkish dotted I, Greek sigma, CJK, NBSP/em space, zero-width and control
    characters, emoji, over-long words, truncation: same ids as transformers."""
    from transformers import AutoTokenizer

    texts = ["Héllo İstanbul naïve café 中文 ok", "ΣΑΣ σας ΟΔΟΣ", "tab\there\u00a0nbsp\u2003em",
             "zero\u200bwidth soft\u00adhyphen", "emoji 😀 test 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "a" * 150,
             "Ǆemo ﬁnance Ⅻ ½", "“quotes” — dash… ¿qué?", "\x00ctrl\x07bell\ufffd", "ß ẞ İı",
             "x" * 99 + " " + "unaffable" * 12, "word " * 300, ""]
    ids, _ = android.host_embed(build_out / "artifacts" / "model.onnx", vocab, texts, batch_size=4)
    ref = AutoTokenizer.from_pretrained(build_out / "model")(texts, truncation=True, max_length=256)["input_ids"]
    assert ids == ref
    assert len(ids[-2]) == 256


def test_host_jvm_buffer_load_and_bench_json(build_out, vocab, tmp_path):
    """The phone's load path (model mapped from the APK into a direct buffer) gives the same
    embeddings; the benchmark mode writes the native runners' schema with the right output."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    model = build_out / "artifacts" / "model.onnx"
    few = ["A man is playing a guitar.", "A woman slices an onion."]
    _, by_path = android.host_embed(model, vocab, few)
    _, by_buf = android.host_embed(model, vocab, few, via_buffer=True)
    np.testing.assert_allclose(by_path, by_buf, atol=1e-6)

    d = android.host_bench(model, vocab, tmp_path / "bench.json", warmup=1, runs=3, threads=1)
    assert SCHEMA <= set(d), SCHEMA - set(d)
    assert d["runtime_version"] == "onnxruntime 1.30.0" and d["arch"] == "x86_64"
    assert len(d["latencies_ms"]) == 3 and d["load_ms"] > 0 and d["peak_rss_mb"] > 0
    out = d["outputs"][0]
    assert out["dtype"] == "float32" and out["shape"] == [1, 384] and out["numel"] == 384
    enc = AutoTokenizer.from_pretrained(build_out / "model")(
        "A man is playing a guitar on the stage.", padding="max_length", max_length=128, return_tensors="np")
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": enc["input_ids"].astype(np.int64),
               "attention_mask": enc["attention_mask"].astype(np.int64)})[0]
    assert abs(out["sum"] - float(ref.sum())) < 1e-4
    np.testing.assert_allclose(out["values"], ref[0, :8], atol=1e-5)
    assert d["inputs"][0]["tokens"] == int(enc["attention_mask"].sum())


def test_host_jvm_unloadable_artifact_is_bad_input(vocab, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf" * 10)
    d = android.host_bench(junk, vocab, tmp_path / "err.json", runs=1)
    assert d["exit_code"] == 2 and "cannot load" in d["error"], d


# ---------------------------------------------------------------- app mode over adb

def test_app_bench_command_is_exact():
    cmd, result = android.app_bench_command(
        "model.onnx", warmup=5, runs=30, threads=4,
        result="/sdcard/Android/data/com.pocketformer.demo/files/pocketformer/bench/r.json")
    assert cmd == ("am start -S -W -n com.pocketformer.demo/.MainActivity -a com.pocketformer.demo.BENCH "
                   "--es artifact model.onnx --ei warmup 5 --ei runs 30 --ei threads 4 --ei seq_len 128 "
                   "--es result /sdcard/Android/data/com.pocketformer.demo/files/pocketformer/bench/r.json")
    assert result.endswith("/bench/r.json")
    cmd, result = android.app_bench_command("/sdcard/x y.onnx", text="it's here")
    assert "--es artifact '/sdcard/x y.onnx'" in cmd and "--es text 'it'\"'\"'s here'" in cmd
    assert result.startswith(android.DEVICE_APP_DIR + "/bench/result-") and result.endswith(".json")
    assert android.app_install_args("app.apk") == ["install", "-r", "app.apk"]
    with pytest.raises(BadInputError):
        android.app_bench_command("m.onnx", runs=0)


class RecordingPhone:
    """What run_app_bench sends to a phone, for the parts no test peer can run (adb install,
    am start): records every adb call; the 'app' writes its result when am start arrives."""

    def __init__(self, result_json: dict):
        self.serial = "PHONE123"
        self.calls: list[str] = []
        self.files: dict[str, str] = {}
        self.result_json = result_json

    def _run(self, args, what, timeout=None):
        self.calls.append("adb " + " ".join(map(str, args)))
        return subprocess.CompletedProcess(args, 0, "Performing Streamed Install\nSuccess\n", "")

    def shell(self, command, *, check=False, timeout=None):
        self.calls.append(command)
        argv = shlex.split(command)
        if argv[:2] == ["am", "start"]:
            self.files[argv[argv.index("result") + 1]] = json.dumps(self.result_json)
            return 0, "Starting: Intent { ... }\nStatus: ok\n", ""
        if argv[:2] == ["test", "-f"]:
            return (0 if argv[2] in self.files else 1), "", ""
        return 0, "", ""

    def pull(self, remote, local):
        Path(local).write_text(self.files[remote])
        return Path(local)


def test_run_app_bench_sends_install_and_am_start(tmp_path):
    apk = tmp_path / "app.apk"
    apk.write_bytes(b"PK")
    phone = RecordingPhone({"runner": "pocketformer-android-app", "latencies_ms": [1.0]})
    res = android.run_app_bench(phone, "asset:model.onnx", apk=apk, warmup=2, runs=10, threads=4,
                                poll_s=0.01)
    r = res["result_path"]
    assert r.startswith("/sdcard/Android/data/com.pocketformer.demo/files/pocketformer/bench/result-")
    assert phone.calls == [
        f"adb install -r {apk}",
        f"mkdir -p {r.rsplit('/', 1)[0]} && rm -f {r}",
        "am start -S -W -n com.pocketformer.demo/.MainActivity -a com.pocketformer.demo.BENCH "
        f"--es artifact model.onnx --ei warmup 2 --ei runs 10 --ei threads 4 --ei seq_len 128 --es result {r}",
        f"test -f {r}",
        f"rm -f {r}",
    ]
    assert res["runner"]["latencies_ms"] == [1.0] and res["artifact_on_device"] == "model.onnx"
    err = RecordingPhone({"error": "cannot load model.onnx: bad", "exit_code": 2})
    with pytest.raises(BadInputError, match="cannot load"):
        android.run_app_bench(err, "asset:model.onnx", poll_s=0.01)


@pytest.fixture(scope="module")
def peer():
    from pocketformer.runtime_bench.adbd_peer import running_peer, setup_peer
    setup_peer()
    with running_peer() as p:
        yield p


FAKE_AM = r"""#!/bin/sh
# Stands in for Android's `am` on the Linux adbd peer: records its arguments, then does what
# the app does at the end of a benchmark: writes its JSON (canned) to the --es result path,
# through a temporary file and a rename, after a delay (so the caller has to poll).
here=$(dirname "$0")
printf '%s\n' "$@" > "$here/am.args"
res=""; prev=""
for a in "$@"; do [ "$prev" = "result" ] && res="$a"; prev="$a"; done
(sleep 1; cp "$here/canned.json" "$res.tmp" && mv "$res.tmp" "$res") >/dev/null 2>&1 &
echo "Starting: Intent { cmp=com.pocketformer.demo/.MainActivity }"
"""


def test_app_mode_over_real_adbd(peer, build_out, vocab, tmp_path):
    """push (sync_files), shell (am start, poll), pull over the real adb protocol; the app's
    JSON is what its benchmark mode wrote on the host JVM."""
    from pocketformer.runtime_bench.adb import Adb

    dev = Adb(peer.serial, peer.adb_prefix)
    droot = f"/data/local/tmp/pf-android-test-{os.getpid()}"
    dev.shell(f"mkdir -p {droot}", check=True)
    try:
        canned = android.host_bench(build_out / "artifacts" / "model.onnx", vocab, tmp_path / "canned.json",
                                    warmup=0, runs=2)
        (tmp_path / "am").write_text(FAKE_AM)
        dev.push(tmp_path / "am", f"{droot}/am")
        dev.push(tmp_path / "canned.json", f"{droot}/canned.json")
        dev.shell(f"chmod 755 {droot}/am", check=True)
        small = tmp_path / "model.onnx"            # a stand-in file for the push path
        small.write_bytes(os.urandom(4096))
        res = android.run_app_bench(dev, small, warmup=1, runs=3, threads=2, device_dir=droot,
                                    am=f"{droot}/am", poll_s=0.2, timeout=60)
        assert res["runner"] == canned
        assert res["push"]["pushed"] == ["model.onnx"] and res["artifact_on_device"].startswith(f"{droot}/artifacts/")
        args = dev.shell(f"cat {droot}/am.args", check=True)[1].splitlines()
        assert args == shlex.split(res["command"])[1:]
        assert args[args.index("artifact") + 1] == res["artifact_on_device"]
        assert dev.shell(f"test -f {res['result_path']}")[0] == 1          # removed after the pull
        again = android.run_app_bench(dev, small, runs=3, device_dir=droot, am=f"{droot}/am", poll_s=0.2)
        assert again["push"]["pushed"] == [] and again["push"]["skipped"] == ["model.onnx"]
    finally:
        dev.shell(f"rm -rf {droot}")


# ---------------------------------------------------------------- bad input: exit 2, no APK

def _tiny_float_input_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def _assert_no_apk(out: Path, before: bytes | None = None):
    if before is None:
        assert not out.exists()
    else:
        assert out.read_bytes() == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], list(out.parent.iterdir())


@pytest.mark.parametrize("case", ["empty", "pte_only", "garbage_onnx", "float_inputs", "no_vocab",
                                  "bpe_tokenizer"])
def test_bad_build_output_is_exit_2_and_writes_nothing(case, build_out, tmp_path, tools):
    bo = tmp_path / "bo"
    (bo / "artifacts").mkdir(parents=True)
    (bo / "model").mkdir()
    if case not in ("no_vocab", "bpe_tokenizer"):
        shutil.copy2(build_out / "model" / "tokenizer.json", bo / "model" / "tokenizer.json")
    expect = {"empty": "no usable artifact", "pte_only": "model.pte", "garbage_onnx": "not a loadable ONNX",
              "float_inputs": "int64 token inputs", "no_vocab": "no tokenizer found",
              "bpe_tokenizer": "model 'BPE'"}[case]
    if case == "pte_only":
        (bo / "artifacts" / "model.pte").write_bytes(b"x")
    elif case == "garbage_onnx":
        (bo / "artifacts" / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
    elif case == "float_inputs":
        _tiny_float_input_onnx(bo / "artifacts" / "model.onnx")
    elif case in ("no_vocab", "bpe_tokenizer"):     # a good model, but no usable tokenizer
        os.link(build_out / "artifacts" / "model.onnx", bo / "artifacts" / "model.onnx")
        (bo / "artifacts" / "model.onnx.json").write_text(json.dumps({"family": "bert", "source": str(tmp_path)}))
        if case == "bpe_tokenizer":
            tj = json.loads((build_out / "model" / "tokenizer.json").read_text())
            tj["model"] = {"type": "BPE", "vocab": {"a": 0}, "merges": []}
            (bo / "model" / "tokenizer.json").write_text(json.dumps(tj))
    outdir = tmp_path / "apkout"
    outdir.mkdir()
    out = outdir / "app.apk"
    out.write_bytes(b"previous")
    with pytest.raises(BadInputError) as e:
        android.build_apk(bo, out)
    assert expect in str(e.value) and e.value.exit_code == EXIT_BAD_INPUT
    _assert_no_apk(out, b"previous")


def test_missing_tool_is_exit_2_with_install_hint(build_out, tmp_path, monkeypatch):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in android.DEBIAN_TOOLS:
        if tool != "zipalign":
            os.symlink(shutil.which(tool), fake_bin / tool)
    monkeypatch.setenv("PATH", str(fake_bin))
    out = tmp_path / "out" / "app.apk"
    with pytest.raises(BadInputError) as e:
        android.build_apk(build_out, out)
    msg = str(e.value)
    assert "zipalign" in msg and "apt-get install zipalign" in msg and e.value.exit_code == 2
    assert not out.exists()


def test_module_cli_exit_codes(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "pocketformer.android", "build", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "a.apk")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "build output directory not found" in proc.stderr
    assert not (tmp_path / "a.apk").exists()


def test_wrong_keystore_password_is_bad_input(build_out, tmp_path):
    ks, _, alias = android._debug_keystore()
    out = tmp_path / "o" / "app.apk"
    with pytest.raises(BadInputError, match="wrong password"):
        android.build_apk(build_out, out, keystore=ks, ks_pass="wrong-password", ks_alias=alias)
    assert not out.exists()


def test_runtime_failure_leaves_no_apk(build_out, tmp_path, monkeypatch):
    """A tool failing mid-build (here clang on a broken JNI source) leaves neither an APK nor a
    temporary directory."""
    broken = tmp_path / "ort_jni.c"
    broken.write_text("int this is not C;\n")
    monkeypatch.setattr(android, "JNI_SRC", broken)
    out = tmp_path / "o" / "app.apk"
    with pytest.raises(RuntimeFailure, match="clang"):
        android.build_apk(build_out, out)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_gradle_assets_command(build_out, tmp_path):
    """What the Gradle task `pocketformerAssets` runs: the same inputs and checks as build (a)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    dest = tmp_path / "assets"
    proc = subprocess.run([sys.executable, "-m", "pocketformer.android", "assets", str(build_out), str(dest)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["model.onnx", "pocketformer_app.properties", "vocab.txt"]
    assert (dest / "model.onnx").stat().st_size == (build_out / "artifacts" / "model.onnx").stat().st_size
    gradle = (REPO / "android_demo" / "app" / "build.gradle.kts").read_text()
    assert '"pocketformer.android", "assets"' in gradle and 'dependsOn(pocketformerAssets)' in gradle
    assert "3 -> throw GradleException" in gradle
    bad = subprocess.run([sys.executable, "-m", "pocketformer.android", "assets", str(tmp_path / "none"),
                          str(dest)], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
