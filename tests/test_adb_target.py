"""The adb:<serial> target against a real adbd (Debian trixie's, chrooted in private namespaces;
runtime_bench/adbd_peer.py). No mocks: every adb call below crosses the real adb protocol.

The first run builds the chroot (~20 s, ~130 MB under $POCKETFORMER_CACHE); needs root.
What this peer cannot tell about a phone is listed in docs/adb_target.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pocketformer.errors import EXIT_RUNTIME, BadInputError, RuntimeFailure
from pocketformer.runtime_bench.adb import (Adb, bench_devices, bench_on_device, big_cores,
                                            bundle_arch, device_info, parse_target, sync_files,
                                            throttle_reasons)



def test_runs_as_root():
    assert os.geteuid() == 0, "the adbd peer needs root (chroot, unshare, mmdebstrap)"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def peer():
    from pocketformer.runtime_bench.adbd_peer import running_peer, setup_peer
    setup_peer()
    with running_peer() as p:
        yield p


@pytest.fixture(scope="module")
def dev(peer) -> Adb:
    return Adb(peer.serial, peer.adb_prefix)


@pytest.fixture(scope="module")
def droot(dev):
    """A device directory of this test run's own (two runs at once share the chroot)."""
    root = f"/data/local/tmp/pocketformer-test-{os.getpid()}"
    yield root
    dev.shell(f"rm -rf {root}", check=True)


# ---------------------------------------------------------------- protocol basics

def test_unknown_serial_is_a_device_failure(peer):
    with pytest.raises(RuntimeFailure) as e:
        Adb("no-such-phone-1234", peer.adb_prefix)
    assert "no-such-phone-1234" in str(e.value)
    assert peer.serial in str(e.value)           # the message lists what adb does see
    assert e.value.exit_code == EXIT_RUNTIME


def test_shell_exit_codes_and_streams(dev):
    assert dev.shell("exit 3")[0] == 3
    assert dev.shell("false")[0] == 1
    rc, out, err = dev.shell("echo out; echo err >&2; exit 0")
    assert (rc, out, err) == (0, "out\n", "err\n")
    assert dev.shell("printf 'no newline'")[1] == "no newline"
    assert dev.shell("echo \"it's $((6*7))\"")[1] == "it's 42\n"
    with pytest.raises(RuntimeFailure) as e:
        dev.shell("exit 7", check=True)
    assert dev.serial in str(e.value) and "exited 7" in str(e.value)


def test_push_pull_round_trip(dev, peer, droot, tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    remote = f"{droot}/blob.bin"
    dev.shell(f"mkdir -p {droot}", check=True)
    dev.push(src, remote)
    _, out, _ = dev.shell(f"sha256sum {remote}", check=True)
    assert out.split()[0] == _sha(src)
    back = dev.pull(remote, tmp_path / "back.bin")
    assert _sha(back) == _sha(src)
    assert _sha(peer.device_path(remote)) == _sha(src)    # it really landed in the chroot
    with pytest.raises(RuntimeFailure) as e:
        dev.pull(f"{droot}/missing.bin", tmp_path / "x")
    assert dev.serial in str(e.value)


def test_sync_files_skips_unchanged(dev, droot, tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.so"
    a.write_bytes(os.urandom(1000))
    b.write_bytes(os.urandom(2000))
    first = sync_files(dev, {"a.bin": a, "b.so": b}, root=droot)
    assert sorted(first["pushed"]) == ["a.bin", "b.so"] and first["check"] == "sha256sum"
    again = sync_files(dev, {"a.bin": a, "b.so": b}, root=droot)
    assert again["dir"] == first["dir"] and again["pushed"] == [] and len(again["skipped"]) == 2
    b.write_bytes(os.urandom(2000))                   # new content -> new directory
    third = sync_files(dev, {"a.bin": a, "b.so": b}, root=droot)
    assert third["dir"] != first["dir"]


# ---------------------------------------------------------------- device context

def _host_sys(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def test_device_info_matches_the_kernel(dev):
    info = device_info(dev)
    assert info["abi"] == "x86_64" and info["os"] == "linux"
    assert info["model"] == "unknown" and info["android_version"] is None   # no getprop here
    assert bundle_arch(info) == "x86_64"
    assert info["cores"] == len([p for p in Path("/sys/devices/system/cpu").glob("cpu[0-9]*")])
    # Real values where the kernel has them, None where it does not: compare with the host's
    # sysfs, which the chroot sees read-only.
    for c in info["cpus"]:
        base = f"/sys/devices/system/cpu/cpu{c['cpu']}/cpufreq"
        for key in ("cpuinfo_max_freq", "scaling_cur_freq", "scaling_max_freq"):
            host = _host_sys(f"{base}/{key}")
            if key == "scaling_cur_freq":
                assert (c[key] is None) == (host is None)          # it moves between reads
            else:
                assert c[key] == (int(host) if host else None)
        assert c["governor"] == _host_sys(f"{base}/scaling_governor")
    host_zones = sorted(p.name for p in Path("/sys/class/thermal").glob("thermal_zone*")
                        if (p / "temp").exists())
    assert sorted(z["zone"] for z in info["thermal"]) == host_zones
    for z in info["thermal"]:
        assert z["temp_c"] is None or -40 < z["temp_c"] < 150
    assert info["taskset"] and info["sha256sum"]
    json.dumps(info)                                  # serialisable as a report field


def test_arch_mapping_and_core_choice():
    assert bundle_arch({"abi": "arm64-v8a", "os": "android"}) == "android-arm64"
    assert bundle_arch({"abi": "aarch64", "os": "linux"}) == "aarch64"
    assert bundle_arch({"abi": "x86_64", "os": "linux"}) == "x86_64"
    with pytest.raises(BadInputError):
        bundle_arch({"abi": "armeabi-v7a", "os": "android"})
    # A 4+3+1 phone (e.g. Snapdragon 8 Gen 2 style): the prime core is the big core set.
    freqs = [1804800] * 4 + [2803200] * 3 + [3187200]
    info = {"cpus": [{"cpu": i, "cpuinfo_max_freq": f, "online": True} for i, f in enumerate(freqs)]}
    assert big_cores(info) == ([7], "80")
    assert big_cores(info, need=4) == ([4, 5, 6, 7], "f0")
    # No cpufreq at all: every online core.
    info = {"cpus": [{"cpu": i, "cpuinfo_max_freq": None, "cpu_capacity": None, "online": True}
                     for i in range(3)]}
    assert big_cores(info) == ([0, 1, 2], "7")
    assert parse_target("adb:R58N,127.0.0.1:5555") == ["R58N", "127.0.0.1:5555"]


def test_throttle_rule():
    def ctx(cap, temp):
        return {"cpus": [{"cpu": 7, "scaling_max_freq": cap}],
                "thermal": [{"zone": "thermal_zone12", "type": "cpu-1-3-0", "temp_c": temp},
                            {"zone": "thermal_zone40", "type": "battery", "temp_c": 95.0}]}
    assert throttle_reasons(ctx(3187200, 45.0), ctx(3187200, 60.0), [7]) == []
    assert throttle_reasons(ctx(3187200, 45.0), ctx(2900000, 60.0), [7]) == []   # -9 %
    assert "cpu7" in throttle_reasons(ctx(3187200, 45.0), ctx(2400000, 60.0), [7])[0]
    assert "cpu-1-3-0" in throttle_reasons(ctx(3187200, 45.0), ctx(3187200, 85.0), [7])[0]
    assert throttle_reasons(ctx(None, None), ctx(None, None), [7]) == []


# ---------------------------------------------------------------- the real runner, end to end

def _tiny_onnx(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["z"]),
         helper.make_node("Tanh", ["z"], ["y"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return w, b


def _bundle():
    from pocketformer.runtime_bench.native import build_runner

    return build_runner("onnxruntime", "x86_64")


def test_runner_end_to_end_on_peer(dev, peer, droot, tmp_path):
    bundle = _bundle()
    model = tmp_path / "tiny.onnx"
    w, b = _tiny_onnx(model)
    x = np.random.default_rng(2).standard_normal((1, 16)).astype(np.float32)
    (tmp_path / "x.bin").write_bytes(x.tobytes())
    args = ["--input", "x.bin:float32:1x16", "--warmup", "2", "--runs", "7", "--threads", "1"]

    res = bench_on_device(dev, Path(bundle.dir), Path(bundle.binary).name, model, args,
                          inputs=[tmp_path / "x.bin"], cooldown_s=0, device_root=droot)
    run = res["runner"]
    assert len(run["latencies_ms"]) == run["runs"] == 7
    assert all(v > 0 for v in run["latencies_ms"])
    assert run["arch"] == "x86_64"
    assert res["pinning"]["applied"] and res["throttled"] is False
    assert res["throttle_check"].startswith("unavailable")     # no cpufreq/thermal in this VM
    assert res["remote_dir"].startswith(droot + "/")
    assert res["capped_at_start"] == []
    assert Path(bundle.binary).name in res["push"]["pushed"]
    assert "LD_LIBRARY_PATH=" in res["command"] and "taskset" in res["command"]
    ref = np.tanh(x @ w + b).ravel()
    out = run["outputs"][0]
    assert out["shape"] == [1, 8]
    np.testing.assert_allclose(out["values"], ref[:len(out["values"])], rtol=1e-5, atol=1e-6)

    # The same runner on the host gives the same outputs, bit for bit (same binary, same CPU).
    local_json = tmp_path / "local.json"
    env = {**os.environ, "LD_LIBRARY_PATH": str(bundle.dir)}
    subprocess.run([str(bundle.binary), "--model", str(model), "--input",
                    f"{tmp_path / 'x.bin'}:float32:1x16", "--warmup", "0", "--runs", "1",
                    "--threads", "1", "--json", str(local_json)], check=True, env=env,
                   capture_output=True)
    local = json.loads(local_json.read_text())
    assert [(o["shape"], o["sum"], o["values"]) for o in local["outputs"]] == \
           [(o["shape"], o["sum"], o["values"]) for o in run["outputs"]]

    # Second time through bench_devices: nothing re-pushed, same directory.
    again = bench_devices([dev.serial], "onnxruntime", model, args, adb=peer.adb_prefix,
                          inputs=[tmp_path / "x.bin"], cooldown_s=0, device_root=droot)
    assert len(again) == 1 and again[0]["remote_dir"] == res["remote_dir"]
    assert again[0]["push"]["pushed"] == [] and again[0]["runtime"] == "onnxruntime"


def test_runner_failure_names_device(dev, droot, tmp_path):
    bundle = _bundle()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises((RuntimeFailure, BadInputError)) as e:
        bench_on_device(dev, Path(bundle.dir), Path(bundle.binary).name, bad,
                        ["--runs", "1", "--warmup", "0", "--threads", "1"], device_root=droot)
    assert dev.serial in str(e.value)


# ---------------------------------------------------------------- teardown

def _peer_leftovers(root: Path, holder: int) -> list[str]:
    left = [ln for ln in Path("/proc/self/mounts").read_text().splitlines()
            if str(root) in ln]
    if Path(f"/proc/{holder}").exists():
        left.append(f"holder pid {holder}")
    return left


def test_teardown_after_failure_leaves_nothing():
    from pocketformer.runtime_bench.adbd_peer import running_peer

    # A second, short-lived peer on another port (the module's peer keeps running beside it:
    # each has its own network namespace).
    with pytest.raises(ZeroDivisionError):
        with running_peer(port=5557) as p:
            holder, adbd, root = p.holder_pid, p.adbd_pid, p.root
            assert Adb(p.serial, p.adb_prefix).shell("echo $((1+1))")[1] == "2\n"
            1 / 0
    assert _peer_leftovers(root, holder) == []
    assert not Path(f"/proc/{adbd}").exists()
