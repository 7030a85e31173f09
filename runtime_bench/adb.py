"""The ``adb:<serial>`` benchmark target: run a native runner on a device over adb.

Written for Android phones first (toybox/mksh shell, getprop, cpufreq and thermal sysfs) and
tested against a real Linux adbd (runtime_bench/adbd_peer.py; docs/adb_target.md says what that
peer does and does not exercise).

Flow of one benchmark (``bench_on_device``):

1. push the runner bundle (binary + shared libraries) and the model (+ input files) to
   ``/data/local/tmp/pocketformer/<hash>/``, where <hash> covers every pushed file's sha256;
   files whose sha256 on the device already matches are not pushed again;
2. read the device context (governor, frequencies, thermal zones), run the runner pinned with
   ``taskset`` to the cores of highest max frequency, ``LD_LIBRARY_PATH`` set to that directory,
   writing JSON to a device path; pull the JSON; read the context again;
3. throttling rule (see ``throttle_reasons``): a pinned core's frequency cap
   (``scaling_max_freq``) fell by more than 10 %, or a CPU/SoC thermal zone ended at or above
   ``temp_limit_c``: retry after ``cooldown_s`` (``retries`` times), else flag
   ``"throttled": true``.
"""
from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from pocketformer.errors import BadInputError, RuntimeFailure
from pocketformer.fsutil import sha256_file

DEVICE_ROOT = "/data/local/tmp/pocketformer"
RC_MARKER = "__pocketformer_rc="
PROPS = {
    "abi": "ro.product.cpu.abi",
    "abilist": "ro.product.cpu.abilist",
    "model": "ro.product.model",
    "manufacturer": "ro.product.manufacturer",
    "soc_model": "ro.soc.model",
    "soc_manufacturer": "ro.soc.manufacturer",
    "board_platform": "ro.board.platform",
    "android_release": "ro.build.version.release",
    "android_sdk": "ro.build.version.sdk",
    "build_fingerprint": "ro.build.fingerprint",
}
CPU_FILES = ("cpuinfo_max_freq", "scaling_max_freq", "scaling_cur_freq", "scaling_governor")
# Thermal zone types that measure the CPU or SoC, across vendors (Qualcomm cpu-*/cpuss-*/tsens,
# MediaTek mtktscpu/cpu_*, Exynos/Tensor BIG/MID/LITTLE and soc_thermal, x86 x86_pkg_temp).
CPU_ZONE_RE = re.compile(r"cpu|cpuss|soc|tsens|mtktscpu|big|mid|little|x86_pkg|apc|core",
                         re.IGNORECASE)
FREQ_DROP = 0.10            # a pinned core's frequency cap fell by more than this fraction
TEMP_LIMIT_C = 80.0         # a CPU/SoC zone at or above this after the run



def list_devices(adb: list[str] | tuple[str, ...] = ("adb",), timeout: float = 30) -> dict[str, str]:
    """``adb devices`` as {serial: state} (state: device, offline, unauthorized, ...)."""
    try:
        proc = subprocess.run([*adb, "devices"], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise RuntimeFailure(f"adb not found ({adb[0]}): install Android platform-tools "
                             "or Debian's adb package") from e
    except subprocess.TimeoutExpired as e:
        raise RuntimeFailure(f"adb devices timed out after {timeout:.0f} s") from e
    if proc.returncode != 0:
        raise RuntimeFailure(f"adb devices failed (exit {proc.returncode}): {proc.stderr.strip()}")
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and not line.startswith(("List of devices", "*")):
            out[parts[0]] = parts[1]
    return out


class Adb:
    """One device, through the adb client command ``adb`` (a list, so it can be prefixed,
    e.g. by nsenter for the test peer). Every failure names the device."""

    def __init__(self, serial: str, adb: list[str] | tuple[str, ...] = ("adb",), *,
                 timeout: float = 600):
        self.serial = serial
        self.adb = list(adb)
        self.timeout = timeout
        devices = list_devices(self.adb)
        if serial not in devices:
            listed = ", ".join(f"{s} ({st})" for s, st in devices.items()) or "none"
            # a device failure (exit 4), like one that drops off mid-run: the contract
            raise RuntimeFailure(f"no such device: not in `adb devices` (listed: {listed}); for a device over "
                                f"TCP run `adb connect {serial}` first", device=serial)
        if devices[serial] != "device":
            hint = {"unauthorized": "accept the USB debugging prompt on the phone",
                    "offline": "reconnect it or restart adbd"}.get(devices[serial], "")
            raise RuntimeFailure(f"device state is {devices[serial]!r}, not 'device'"
                                 + (f": {hint}" if hint else ""), device=serial)

    def _run(self, args: list[str], what: str, timeout: float | None = None,
             ) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([*self.adb, "-s", self.serial, *args], capture_output=True,
                                  text=True, errors="replace", timeout=timeout or self.timeout)
        except subprocess.TimeoutExpired as e:
            raise RuntimeFailure(f"{what} timed out after {timeout or self.timeout:.0f} s",
                                 device=self.serial) from e
        except OSError as e:
            raise RuntimeFailure(f"{what}: cannot run adb: {e}", device=self.serial) from e

    def shell(self, command: str, *, check: bool = False, timeout: float | None = None,
              ) -> tuple[int, str, str]:
        """Run ``command`` in the device shell; returns (exit code, stdout, stderr).

        The exit code is read from a marker the shell prints after a subshell running the
        command, so it is right with and without adb's shell v2 protocol (pre-Android 7 adbd
        always reports 0) and an adb transport failure (no marker) is never mistaken for the
        command's own exit status. Without shell v2, stderr arrives merged into stdout.
        """
        wrapped = f"({command}); __pf_r=$?; echo; echo {RC_MARKER}$__pf_r"
        proc = self._run(["shell", wrapped], f"adb shell {command[:60]!r}", timeout)
        out = proc.stdout.replace("\r\n", "\n")
        idx = out.rfind("\n" + RC_MARKER)
        m = re.match(rf"\n{RC_MARKER}(\d+)\s*$", out[idx:]) if idx >= 0 else None
        if not m:
            raise RuntimeFailure(f"adb shell failed (adb exit {proc.returncode}): "
                                 f"{(proc.stderr or proc.stdout).strip()[-500:]}",
                                 device=self.serial)
        rc, stdout = int(m.group(1)), out[:idx]
        if check and rc != 0:
            raise RuntimeFailure(f"`{command[:200]}` exited {rc}: "
                                 f"{(proc.stderr or stdout).strip()[-500:]}", device=self.serial)
        return rc, stdout, proc.stderr

    def push(self, local: Path | str, remote: str) -> None:
        local = Path(local)
        if not local.exists():
            raise BadInputError("file to push not found", file=str(local), device=self.serial)
        proc = self._run(["push", str(local), remote], f"adb push {local.name}")
        if proc.returncode != 0:
            raise RuntimeFailure(f"adb push {local} -> {remote} failed: "
                                 f"{(proc.stderr or proc.stdout).strip()[-500:]}", device=self.serial)

    def pull(self, remote: str, local: Path | str) -> Path:
        local = Path(local)
        proc = self._run(["pull", remote, str(local)], f"adb pull {remote}")
        if proc.returncode != 0 or not local.exists():
            raise RuntimeFailure(f"adb pull {remote} failed: "
                                 f"{(proc.stderr or proc.stdout).strip()[-500:]}", device=self.serial)
        return local

    def has(self, tool: str) -> bool:
        rc, out, _ = self.shell(f"command -v {shlex.quote(tool)}")
        return rc == 0 and bool(out.strip())


# ---------------------------------------------------------------- device context

_INFO_SCRIPT = r"""
for p in %(props)s; do echo "prop $p=$(getprop $p 2>/dev/null)"; done
echo "uname_m=$(uname -m 2>/dev/null)"
echo "uname_r=$(uname -r 2>/dev/null)"
for c in /sys/devices/system/cpu/cpu[0-9]*; do
  [ -d "$c" ] || continue
  n=${c##*/cpu}
  for f in %(cpufiles)s; do echo "cpu $n $f=$(cat $c/cpufreq/$f 2>/dev/null)"; done
  echo "cpu $n cpu_capacity=$(cat $c/cpu_capacity 2>/dev/null)"
  echo "cpu $n online=$(cat $c/online 2>/dev/null)"
done
for z in /sys/class/thermal/thermal_zone*; do
  [ -e "$z/temp" ] || continue
  echo "tz ${z##*/} $(cat $z/type 2>/dev/null | tr ' ' '_') $(cat $z/temp 2>/dev/null)"
done
echo "tool taskset=$(command -v taskset 2>/dev/null)"
echo "tool sha256sum=$(command -v sha256sum 2>/dev/null)"
echo "tool getprop=$(command -v getprop 2>/dev/null)"
"""


def _num(v: str | None) -> int | None:
    v = (v or "").strip()
    return int(v) if re.fullmatch(r"-?\d+", v) else None


def _temp_c(raw: int | None) -> float | None:
    if raw is None:
        return None
    # Most kernels report millidegrees; some vendor zones report degrees or decidegrees.
    if abs(raw) >= 1000:
        return raw / 1000.0
    return float(raw) if abs(raw) < 200 else raw / 10.0


def take_json(adb: Adb, remote: str, who: str) -> dict:
    """Pull a JSON result file, parse it and remove it from the device; `who` names the writer
    in the error for a file that is not JSON."""
    with tempfile.TemporaryDirectory(prefix="pf-adb-") as tmp:
        local = adb.pull(remote, Path(tmp) / "result.json")
        try:
            data = json.loads(local.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise RuntimeFailure(f"{who} wrote invalid JSON: {e}", device=adb.serial) from e
    adb.shell(f"rm -f {shlex.quote(remote)}")
    return data


def read_context(adb: Adb) -> dict:
    """Everything volatile or descriptive a benchmark should carry: properties, per-core
    frequencies and governor, thermal zones, available tools. Missing files are None."""
    script = _INFO_SCRIPT % {"props": " ".join(PROPS.values()), "cpufiles": " ".join(CPU_FILES)}
    _, out, _ = adb.shell(script, check=False)
    props, cpus, zones, tools, misc = {}, {}, [], {}, {}
    for line in out.splitlines():
        if line.startswith("prop "):
            k, _, v = line[5:].partition("=")
            props[k] = v.strip() or None
        elif line.startswith("cpu "):
            _, n, rest = line.split(" ", 2)
            k, _, v = rest.partition("=")
            cpu = cpus.setdefault(int(n), {"cpu": int(n)})
            if k == "scaling_governor":
                cpu["governor"] = v.strip() or None
            elif k == "online":
                cpu["online"] = None if _num(v) is None else bool(_num(v))
            else:
                cpu[k] = _num(v)
        elif line.startswith("tz "):
            parts = line.split(" ")
            name, typ = parts[1], (parts[2] if len(parts) > 2 else "")
            raw = _num(parts[3]) if len(parts) > 3 else None
            zones.append({"zone": name, "type": typ or None, "temp_c": _temp_c(raw)})
        elif line.startswith("tool "):
            k, _, v = line[5:].partition("=")
            tools[k] = v.strip() or None
        elif "=" in line and line.startswith("uname_"):
            k, _, v = line.partition("=")
            misc[k] = v.strip() or None
    for c in cpus.values():          # cpu0 has no "online" file on most kernels: it is online
        c.setdefault("online", None)
        if c["online"] is None and c["cpu"] == 0:
            c["online"] = True
    return {"props": props, "cpus": [cpus[k] for k in sorted(cpus)], "thermal": zones,
            "tools": tools, **misc, "time": time.time()}


def device_info(adb: Adb, context: dict | None = None) -> dict:
    """A flat description of the device. Android properties when present (``getprop``),
    Linux fallbacks otherwise; None where nothing tells."""
    ctx = context or read_context(adb)
    p = ctx["props"]
    android = bool(ctx["tools"].get("getprop")) and p.get("ro.build.version.release") is not None
    abi = p.get("ro.product.cpu.abi") or ctx.get("uname_m")
    return {
        "serial": adb.serial,
        "os": "android" if android else "linux",
        "abi": abi,
        "abilist": p.get("ro.product.cpu.abilist"),
        "model": p.get("ro.product.model") or "unknown",
        "manufacturer": p.get("ro.product.manufacturer") or "unknown",
        "soc": p.get("ro.soc.model") or p.get("ro.board.platform") or "unknown",
        "soc_manufacturer": p.get("ro.soc.manufacturer") or "unknown",
        "android_version": p.get("ro.build.version.release"),
        "android_sdk": _num(p.get("ro.build.version.sdk")),
        "build_fingerprint": p.get("ro.build.fingerprint"),
        "kernel": ctx.get("uname_r"),
        "cores": len(ctx["cpus"]),
        "cpus": ctx["cpus"],
        "governors": sorted({c.get("governor") for c in ctx["cpus"] if c.get("governor")}),
        "max_freq_khz": [c.get("cpuinfo_max_freq") for c in ctx["cpus"]],
        "cur_freq_khz": [c.get("scaling_cur_freq") for c in ctx["cpus"]],
        "thermal": ctx["thermal"],
        "taskset": ctx["tools"].get("taskset"),
        "sha256sum": ctx["tools"].get("sha256sum"),
    }


def bundle_arch(info: dict) -> str:
    """The native runner bundle a device needs (native.build_runner's ``arch``)."""
    abi = (info.get("abi") or "").lower()
    android = info.get("os") == "android"
    if abi in ("arm64-v8a", "aarch64", "arm64"):
        return "android-arm64" if android else "aarch64"
    if abi in ("x86_64", "amd64"):
        # A Bionic x86-64 device (emulator, Chromebook) needs its own build: name it apart.
        return "android-x86_64" if android else "x86_64"
    raise BadInputError(f"unsupported device ABI {abi or 'unknown'!r}: runners exist for "
                        "arm64-v8a (Android), aarch64 and x86_64 (Linux)",
                        device=info.get("serial"))


def big_cores(info: dict, need: int = 1) -> tuple[list[int], str]:
    """The cores of highest max frequency (``cpu_capacity`` when no cpufreq; all cores when
    neither is known) and their taskset mask, hex without 0x (toybox and util-linux both
    accept it). When fewer than ``need`` (the runner's thread count), the next-fastest
    cluster is added until there are enough, so threads are never crowded onto fewer cores."""
    cpus = [c for c in info.get("cpus", []) if c.get("online") is not False]
    if not cpus:
        cores = list(range(max(1, int(info.get("cores") or 1))))
    else:
        for key in ("cpuinfo_max_freq", "cpu_capacity"):
            vals = [c.get(key) for c in cpus]
            if all(v is not None for v in vals):
                levels = sorted(set(vals), reverse=True)
                cores = []
                for level in levels:
                    cores += [c["cpu"] for c in cpus if c.get(key) == level]
                    if len(cores) >= need:
                        break
                break
        else:
            cores = [c["cpu"] for c in cpus]
    cores = sorted(cores)
    mask = 0
    for c in cores:
        mask |= 1 << c
    return cores, format(mask, "x")


def _threads(runner_args: list[str]) -> int:
    args = [str(a) for a in runner_args]
    for i, a in enumerate(args[:-1]):
        if a == "--threads" and args[i + 1].isdigit():
            return max(1, int(args[i + 1]))
    return 1


def throttle_reasons(before: dict, after: dict, cores: list[int], *,
                     freq_drop: float = FREQ_DROP, temp_limit_c: float = TEMP_LIMIT_C) -> list[str]:
    """Why a run counts as throttled (empty: not throttled, or nothing to tell from).

    - a pinned core's frequency cap (``scaling_max_freq``, the limit that thermal cooling
      devices lower) fell by more than ``freq_drop`` between before and after;
    - a CPU/SoC thermal zone (type matching CPU_ZONE_RE) reads at or above ``temp_limit_c``
      after the run.
    The current frequency (``scaling_cur_freq``) is recorded but not used: after a run the
    governor legitimately drops it while idle.
    """
    reasons = []
    b = {c["cpu"]: c for c in before.get("cpus", [])}
    a = {c["cpu"]: c for c in after.get("cpus", [])}
    for n in cores:
        f0 = (b.get(n) or {}).get("scaling_max_freq")
        f1 = (a.get(n) or {}).get("scaling_max_freq")
        if f0 and f1 is not None and f1 < (1 - freq_drop) * f0:
            reasons.append(f"cpu{n} frequency cap {f0} -> {f1} kHz")
    for z in after.get("thermal", []):
        t = z.get("temp_c")
        if t is not None and z.get("type") and CPU_ZONE_RE.search(z["type"]) and t >= temp_limit_c:
            reasons.append(f"{z['zone']} ({z['type']}) at {t:.1f} C")
    return reasons


def _throttle_observable(ctx: dict, cores: list[int]) -> bool:
    cpus = {c["cpu"]: c for c in ctx.get("cpus", [])}
    freq = any((cpus.get(n) or {}).get("scaling_max_freq") for n in cores)
    temp = any(z.get("temp_c") is not None and z.get("type") and CPU_ZONE_RE.search(z["type"])
               for z in ctx.get("thermal", []))
    return bool(freq or temp)


def _context_summary(ctx: dict, cores: list[int]) -> dict:
    cpus = {c["cpu"]: c for c in ctx.get("cpus", [])}
    return {
        "time": ctx.get("time"),
        "governor": {n: (cpus.get(n) or {}).get("governor") for n in cores},
        "cur_freq_khz": {n: (cpus.get(n) or {}).get("scaling_cur_freq") for n in cores},
        "max_freq_cap_khz": {n: (cpus.get(n) or {}).get("scaling_max_freq") for n in cores},
        "thermal": ctx.get("thermal", []),
    }


# ---------------------------------------------------------------- push + run

def _bundle_files(bundle_dir: Path) -> list[Path]:
    if not bundle_dir.is_dir():
        raise BadInputError("runner bundle directory not found", file=str(bundle_dir))
    # Every regular file (symlinks followed: a lib.so -> lib.so.1 link arrives as a copy),
    # except dot files (build stamps, not needed on the device).
    files = sorted(p for p in bundle_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise BadInputError("runner bundle directory is empty", file=str(bundle_dir))
    return files


def sync_files(adb: Adb, files: dict[str, Path], *, root: str = DEVICE_ROOT) -> dict:
    """Push ``files`` ({device name: local path}) to ``root/<hash>/``; <hash> covers every
    name and sha256. Files already there with the same sha256 are skipped (``sha256sum`` on
    the device when it has one; otherwise a manifest written after a complete push)."""
    sums = {name: sha256_file(path) for name, path in files.items()}
    key = hashlib.sha256("".join(f"{n}\0{s}\n" for n, s in sorted(sums.items())).encode())
    remote = f"{root}/{key.hexdigest()[:16]}"
    q = shlex.quote
    adb.shell(f"mkdir -p {q(remote)}", check=True)
    present: dict[str, str] = {}
    if adb.has("sha256sum"):
        names = " ".join(q(n) for n in sums)
        _, out, _ = adb.shell(f"cd {q(remote)} && sha256sum {names} 2>/dev/null")
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2:
                present[parts[1].lstrip("*")] = parts[0].lower()
        check = "sha256sum"
    else:
        rc, out, _ = adb.shell(f"cat {q(remote)}/.manifest 2>/dev/null")
        for line in out.splitlines() if rc == 0 else []:
            parts = line.split()
            if len(parts) == 2:
                present[parts[1]] = parts[0]
        check = "manifest"
    pushed, skipped = [], []
    for name, path in files.items():
        if present.get(name) == sums[name]:
            skipped.append(name)
            continue
        adb.push(path.resolve(), f"{remote}/{name}")
        pushed.append(name)
    if pushed and check == "sha256sum":
        _, out, _ = adb.shell(f"cd {q(remote)} && sha256sum {' '.join(q(n) for n in pushed)}")
        got = {ln.split()[1].lstrip("*"): ln.split()[0] for ln in out.splitlines() if len(ln.split()) == 2}
        bad = [n for n in pushed if got.get(n) != sums[n]]
        if bad:
            raise RuntimeFailure(f"pushed files arrived corrupted: {bad}", device=adb.serial)
    manifest = "".join(f"{sums[n]} {n}\n" for n in sorted(sums))
    adb.shell(f"printf %s {q(manifest)} > {q(remote)}/.manifest", check=True)
    return {"dir": remote, "pushed": pushed, "skipped": skipped, "check": check, "sha256": sums}


def bench_on_device(adb: Adb, bundle_dir: Path, runner_name: str, model: Path,
                    runner_args: list[str], *, inputs: list[Path] = (), retries: int = 1,
                    cooldown_s: float = 60.0, pin: bool = True, timeout: float = 1800,
                    freq_drop: float = FREQ_DROP, temp_limit_c: float = TEMP_LIMIT_C,
                    device_root: str = DEVICE_ROOT) -> dict:
    """Run one native benchmark on one device; returns the runner's JSON plus device context.

    ``runner_args`` are the runner's own flags except ``--model`` and ``--json``, which this
    function adds (``--warmup/--runs/--threads/--seed/--input``). The runner runs with its
    working directory set to the pushed directory, so ``--input NAME:DTYPE:DIMS`` may name a
    file of ``inputs`` by its base name.
    """
    bundle_dir, model = Path(bundle_dir), Path(model)
    if not model.is_file():
        raise BadInputError("model file not found", file=str(model), device=adb.serial)
    files = {p.name: p for p in _bundle_files(bundle_dir)}
    if runner_name not in files:
        raise BadInputError(f"runner {runner_name!r} is not in the bundle", file=str(bundle_dir))
    for extra in [model, *map(Path, inputs)]:
        if not extra.is_file():
            raise BadInputError("file not found", file=str(extra), device=adb.serial)
        if extra.name in files and files[extra.name].resolve() != extra.resolve():
            raise BadInputError(f"two different files are both named {extra.name!r}",
                                file=str(extra), device=adb.serial)
        files[extra.name] = extra
    for flag in ("--model", "--json"):
        if flag in runner_args:
            raise BadInputError(f"runner_args must not contain {flag} (bench_on_device sets it)",
                                field="runner_args", device=adb.serial)

    t0 = time.monotonic()
    sync = sync_files(adb, files, root=device_root)
    push_s = time.monotonic() - t0
    remote = sync["dir"]
    q = shlex.quote
    adb.shell(f"chmod 755 {q(remote)}/{q(runner_name)}", check=True)

    before = read_context(adb)
    info = device_info(adb, before)
    cores, mask = big_cores(info, need=_threads(runner_args))
    pinned = bool(pin and info["taskset"])
    observable = _throttle_observable(before, cores)
    # Cores already held below their hardware maximum before the run (a hot phone, a power
    # saving mode): not a throttle *during* the run, but the numbers are not peak numbers.
    capped_at_start = [c["cpu"] for c in info["cpus"] if c["cpu"] in cores
                       and c.get("scaling_max_freq") and c.get("cpuinfo_max_freq")
                       and c["scaling_max_freq"] < c["cpuinfo_max_freq"]]
    attempts = []
    result = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(cooldown_s)
            before = read_context(adb)
        out_json = f"{remote}/result-{uuid.uuid4().hex[:12]}.json"
        argv = " ".join(q(a) for a in [f"./{runner_name}", "--model", model.name,
                                       *map(str, runner_args), "--json", out_json])
        pin_cmd = f"taskset {mask} " if pinned else ""
        cmd = f"cd {q(remote)} && LD_LIBRARY_PATH={q(remote)} {pin_cmd}{argv}"
        t1 = time.monotonic()
        rc, out, err = adb.shell(cmd, timeout=timeout)
        wall = time.monotonic() - t1
        after = read_context(adb)
        if rc != 0:
            adb.shell(f"rm -f {q(out_json)}")
            tail = (err or out).strip()[-800:]
            kind = BadInputError if rc == 2 else RuntimeFailure
            raise kind(f"runner {runner_name} exited {rc} on the device: {tail}", device=adb.serial)
        runner_json = take_json(adb, out_json, "runner")
        reasons = throttle_reasons(before, after, cores, freq_drop=freq_drop,
                                   temp_limit_c=temp_limit_c)
        attempts.append({"attempt": attempt, "wall_s": wall, "throttle_reasons": reasons,
                         "before": _context_summary(before, cores),
                         "after": _context_summary(after, cores)})
        result = runner_json
        if not reasons:
            break
    last = attempts[-1]
    return {
        "target": f"adb:{adb.serial}",
        "serial": adb.serial,
        "arch": bundle_arch(info),
        "device": info,
        "runner_name": runner_name,
        "command": cmd,
        "remote_dir": remote,
        "push": {"pushed": sync["pushed"], "skipped": sync["skipped"], "check": sync["check"],
                 "seconds": push_s},
        "pinning": {"applied": pinned, "cores": cores, "mask": mask,
                    "reason": None if pinned else ("disabled" if not pin else
                                                   "no taskset on the device")},
        "throttle_check": "observed" if observable else "unavailable (no cpufreq cap or CPU "
                                                        "thermal zone readable)",
        "throttled": bool(last["throttle_reasons"]),
        "throttle_rule": {"freq_cap_drop_gt": freq_drop, "cpu_zone_temp_ge_c": temp_limit_c},
        "capped_at_start": capped_at_start,
        "attempts": attempts,
        "context_before": last["before"],
        "context_after": last["after"],
        "runner": result,
    }


def bench_devices(serials: list[str], runtime: str, model: Path, runner_args: list[str], *,
                  adb: list[str] | tuple[str, ...] = ("adb",), inputs: list[Path] = (),
                  build=None, **kwargs) -> list[dict]:
    """``bench_on_device`` on each serial in turn (one device at a time, so devices sharing a
    USB hub or the host's CPU do not disturb each other). The runner bundle for each device's
    ABI is built once (``native.build_runner(runtime, arch)`` unless ``build`` is given)."""
    if not serials:
        raise BadInputError("no device serials given", field="target")
    if build is None:
        from pocketformer.runtime_bench.native import build_runner as build
    devices = [Adb(s, adb) for s in serials]       # all serials checked before any work
    bundles: dict[str, object] = {}
    results = []
    for dev in devices:
        info = device_info(dev)
        arch = bundle_arch(info)
        if arch not in bundles:
            bundles[arch] = build(runtime, arch)
        b = bundles[arch]
        res = bench_on_device(dev, Path(b.dir), Path(b.binary).name, Path(model), runner_args,
                              inputs=inputs, **kwargs)
        res["runtime"] = runtime
        res["runtime_version"] = getattr(b, "runtime_version", None)
        results.append(res)
    return results


def parse_target(target: str) -> list[str]:
    """``adb:SERIAL[,SERIAL...]`` -> serials (for the CLI)."""
    if not target.startswith("adb:") or not target[4:].strip():
        raise BadInputError(f"bad target {target!r}; expected adb:SERIAL[,SERIAL...]",
                            field="target")
    return [s.strip() for s in target[4:].split(",") if s.strip()]


def default_adb() -> list[str]:
    exe = shutil.which("adb")
    return [exe] if exe else ["adb"]
