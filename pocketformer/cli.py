"""The `pocketformer` command. Exit codes: 0 ok, 2 bad input, 3 budget/gate failed,
4 runtime or device failure, 130 interrupted."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from pathlib import Path

from pocketformer.errors import (EXIT_BUDGET, EXIT_INTERRUPTED, EXIT_OK, EXIT_RUNTIME,
                                 BadInputError, BudgetError, PocketformerError)


def _quiet_libraries() -> None:
    """Keep third-party chatter (hub warnings, optional kernels) off the user's terminal."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("torchao", "torch.onnx", "torch._export", "torch.export", "torch.utils._pytree",
                 "onnxscript", "executorch", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ---- compress options generated from the method registry --------------------------------------

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_BOOLS = {"true": True, "false": False, "1": True, "0": False}


def _parse_bool(s: str) -> bool:
    try:
        return _BOOLS[s.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}") from None


def _arg_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType")) and args:
        tp = args[0]
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1]
        return lambda s: [inner(x) for x in s.split(",") if x.strip()]
    if tp is bool:
        return _parse_bool
    return tp


def _add_method_options(p: argparse.ArgumentParser) -> dict[str, set[str]]:
    from pocketformer.compress import METHODS

    owners: dict[str, set[str]] = {}
    group = p.add_argument_group("method options (each applies to the methods named)")
    seen = {}
    for method in METHODS.values():
        hints = typing.get_type_hints(method.config_cls)
        for f in dataclasses.fields(method.config_cls):
            owners.setdefault(f.name, set()).add(method.name)
            if f.name in seen:
                continue
            seen[f.name] = True
            group.add_argument(_flag(f.name), dest=f"opt_{f.name}", type=_arg_type(hints[f.name]),
                               default=None, metavar=f.name.upper())
    for name, methods in owners.items():
        for action in group._group_actions:
            if action.dest == f"opt_{name}":
                action.help = f"({', '.join(sorted(methods))})"
    return owners


def _method_params(args, owners: dict[str, set[str]], method: str) -> dict:
    params = {}
    for name, methods in owners.items():
        value = getattr(args, f"opt_{name}")
        if value is None:
            continue
        if method not in methods:
            raise BadInputError(f"option {_flag(name)} does not apply to method {method!r}",
                                field=_flag(name))
        params[name] = value
    return params


# ---- commands -------------------------------------------------------------------------------------

def cmd_build(args) -> int:
    from pocketformer.pipeline import build, check_out_dir
    from pocketformer.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    out = Path(args.out or Path("out") / recipe.path.stem)
    check_out_dir(out)
    report = build(recipe, out)
    _print_summary(report, out)
    if not report.passed:
        failed = "; ".join(f"{b['name']} {b.get('target') or ''} {b['detail']}".strip()
                           for b in report.failed_checks())
        raise BudgetError(f"budget failed: {failed} (see {out / 'report.md'})")
    return EXIT_OK


def _print_summary(report, out: Path) -> None:
    from pocketformer.report import REPORT_MD

    m = report.model
    print(f"model      {m['source']} ({m['family']}): {m['before']['params']:,} -> "
          f"{m['after']['params']:,} params, {m['before']['num_layers']} -> {m['after']['num_layers']} layers")
    if report.quality:
        q = report.quality
        print(f"quality    {q['metric']} {q['before']:.4f} -> {q['after']:.4f} "
              f"(relative drop {q['relative_drop']:+.2%})")
    for a in report.artifacts:
        print(f"artifact   {describe_artifact(a['path'], a)}")
    for b in report.bench:
        print(f"bench      {b['artifact']} [{b['runtime']}, {b['target']}, {b['threads']} threads]: "
              f"p50 {b['latency_ms']['p50']:.2f} ms, p90 {b['latency_ms']['p90']:.2f} ms, "
              f"peak RSS {b['peak_rss_mb']:.0f} MB")
    print("timings    " + ", ".join(f"{k} {v:.1f}s" for k, v in report.timings_s.items()))
    verdict = {True: "PASSED", False: "FAILED", None: "no budgets"}[report.passed]
    print(f"budgets    {verdict}; report: {out / REPORT_MD}")


def cmd_compress(args, owners) -> int:
    from pocketformer.compress import Calibration, get_method, parse_params, run_step
    from pocketformer.data import DataSpec, load_for
    from pocketformer.models import load_model, save_model

    method = get_method(args.method, field="--method")
    config = parse_params(method, _method_params(args, owners, method.name))
    spec = None
    if args.calibration:
        spec = DataSpec.parse(args.calibration, field="--calibration")
        spec.check_exists(field="--calibration")
    elif method.needs_calibration(config):
        raise BadInputError(f"method {method.name!r} with these options needs --calibration FILE",
                            field="--calibration")
    loaded = load_model(args.model)
    calib = None
    if spec is not None:
        calib = Calibration(load_for(loaded.adapter.data_kind, spec), seq_len=args.seq_len,
                            max_samples=args.samples)
    before = loaded.adapter.describe(loaded.model)
    record = run_step(loaded, method.name, config, calib)
    after = loaded.adapter.describe(loaded.model)
    save_model(loaded, args.out)
    print(json.dumps({"out": str(args.out), "step": record,
                      "params": [before["params"], after["params"]],
                      "layers": [before["num_layers"], after["num_layers"]]}, indent=2))
    return EXIT_OK


def cmd_export(args) -> int:
    from pocketformer.export import ExportConfig, export_model
    from pocketformer.models import load_model
    from pocketformer.schema import from_dict

    raw = {"formats": [f.strip() for f in args.format.split(",") if f.strip()],
           "quantize": args.quantize, "batch": args.batch, "etrecord": not args.no_etrecord,
           "xnnpack_form": not args.no_xnnpack_form,
           "ort_format": args.ort_format, "max_len": args.max_len,
           "greedy_tokens": args.greedy_tokens, "gen_logits": args.gen_logits,
           "max_unquantized_share": args.max_unquantized_share}
    for name in ("seq_len", "group_size", "calibration"):
        if getattr(args, name) is not None:
            raw[name] = getattr(args, name)
    raw["lm_head"] = args.lm_head
    if args.int8_linears:
        raw["int8_linears"] = [p.strip() for p in args.int8_linears.split(",") if p.strip()]
    raw["rounding"] = args.rounding
    raw["rotation"] = args.rotation
    raw["smoothing"] = args.smoothing or None
    raw["calibration_samples"] = args.samples
    if args.min_delegated_flops is not None:
        raw["min_delegated_flops"] = None if args.min_delegated_flops < 0 else args.min_delegated_flops
    if args.no_generation:
        raw["generation"] = False
    cfg = from_dict(ExportConfig, raw, prefix="export")
    loaded = load_model(args.model)
    records = export_model(loaded, args.out, cfg)
    failed = []
    for r in records:
        print(describe_artifact(Path(args.out) / r.path, r.to_dict()))
        if not r.parity["passed"]:
            failed.append(r.path)
    if failed:
        raise BudgetError(f"parity gate failed for {', '.join(failed)} (limits: cosine >= "
                          f"{cfg.parity_min_cosine} fp32 / {cfg.quant_min_cosine} quantized, max |diff| <= "
                          f"{cfg.parity_max_abs} fp32; fp32 generation graphs must match eager greedy tokens)")
    return EXIT_OK


def describe_artifact(path, rec: dict) -> str:
    p, d = rec["parity"], rec.get("details", {})
    parts = [f"{path}: {rec['size_bytes'] / 1e6:.1f} MB {rec['quantization']}",
             f"parity cos {p['cosine']:.7f} max|diff| {p['max_abs_diff']:.2e}"]
    if "greedy_tokens" in p:
        parts.append(f"greedy {p['greedy_match_prefix']}/{p['greedy_tokens']} tokens as eager")
    gen = d.get("generation")
    if gen and gen.get("decode_tokens_per_s"):
        eager = gen.get("eager_decode_tokens_per_s")
        parts.append(f"decode {gen['decode_tokens_per_s']:.1f} tok/s"
                     + (f" (eager {eager:.1f})" if eager else ""))
    dele = d.get("delegation")
    if dele and dele.get("delegated_flops_share") is not None:
        parts.append(f"XNNPACK {dele['delegated_flops_share']:.2%} of FLOPs")
    q = d.get("quantization")
    if isinstance(q, dict) and q.get("unquantized_share") is not None and rec["quantization"] != "fp32":
        parts.append(f"{q['quantized']} linears quantized (group {q.get('group_size') or 'per-channel'}), "
                     f"{len(q.get('skipped', []))} left fp32"
                     + (f", {len(q['int8_linears'])} kept at int8" if q.get("int8_linears") else ""))
    parts.append("ok" if p["passed"] else "FAILED")
    return ", ".join(parts)


def _split_targets(text: str) -> list[str]:
    """'host,qemu:cortex-a76,adb:A,B' -> ['host', 'qemu:cortex-a76', 'adb:A,B'] (an adb target
    takes several serials, so a piece that starts no new target continues the previous one)."""
    targets: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if piece.startswith(("host", "qemu:", "adb:")) or not targets:
            targets.append(piece)
        else:
            targets[-1] += "," + piece
    return targets


def _profiles(artifacts, threads: int, target: str) -> list[dict]:
    """`--profile`: an ETDump per-operator profile of each .pte, on this host (the Python
    bindings), printed and returned for the JSON."""
    from pocketformer.progress import say
    from pocketformer.runtime_bench.profile import etdump_profile, render_profile

    if "host" not in _split_targets(target):
        say(f"bench: --profile runs on this host (Python bindings), not on {target}")
    profiles = []
    for a in artifacts:
        if str(a).endswith(".pte"):
            profiles.append(etdump_profile(a, threads=threads))
            print(render_profile(profiles[-1]))
    return profiles


def cmd_bench_llm(args) -> int:
    from pocketformer.runtime_bench.llm_race import RaceConfig, race, render, write_json
    from pocketformer.schema import from_dict

    cfg = from_dict(RaceConfig, {"target": args.target, "threads": args.threads,
                                 "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                                 "runs": args.runs, "warmup": args.warmup, "data": args.data,
                                 "ctx": args.ctx, "chunks": args.chunks,
                                 "rounds": args.processes}, prefix="bench")
    result = race(args.artifacts, cfg, against=None if args.against == "none" else args.against)
    print(render(result))
    if args.profile:
        # after the race, so the profile's own runs never overlap a timed one
        result["profiles"] = _profiles(args.artifacts, args.threads, args.target)
    if args.json:
        write_json(args.json, result)
    if result["llamacpp_error"]:
        print(f"pocketformer: llama.cpp could not be measured: {result['llamacpp_error']} "
              "(our figures above are complete)", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


def cmd_bench(args) -> int:
    if args.llm:
        return cmd_bench_llm(args)
    from pocketformer import fsutil
    from pocketformer.runtime_bench import BenchConfig, bench
    from pocketformer.schema import from_dict

    cfg = from_dict(BenchConfig, {"targets": _split_targets(args.target),
                                  "runs": args.runs, "warmup": args.warmup, "threads": args.threads,
                                  "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                                  "runners": [r.strip() for r in args.runner.split(",")],
                                  "qemu_runs": args.qemu_runs, "processes": args.processes},
                    prefix="bench")
    results = bench(args.artifacts, cfg, inputs=args.inputs)
    for r in results:
        lat = r.latency_ms
        emu = " (emulated)" if r.emulated else ""
        print(f"{r.artifact} [{r.runtime}, {r.runner}, {r.target}, {r.threads} threads]: load "
              f"{r.load_ms:.1f} ms, first {r.first_inference_ms:.1f} ms, p50 {lat['p50']:.2f} ms{emu}, "
              f"p90 {lat['p90']:.2f}, p99 {lat['p99']:.2f}, peak RSS {r.peak_rss_mb:.1f} MB"
              + (f", {r.instructions_per_inference:,.0f} instructions/inference"
                 if r.instructions_per_inference is not None else "")
              + (" THROTTLED" if r.throttled else ""))
        if r.generation:
            g = r.generation
            print(f"  decoder: prefill {g['prompt_tokens']} tokens {g['prefill_tokens_per_s']:.1f} tok/s "
                  f"(TTFT p50 {g['ttft_ms']['p50']:.1f} ms), decode {g['decode_tokens_per_s']:.1f} tok/s "
                  f"over {g['new_tokens']} tokens (latency figures above are per decode step)")
    profiles = _profiles(args.artifacts, args.threads, args.target) if args.profile else []
    if args.json:
        fsutil.write_json(args.json, {"schema_version": 1, "results": [r.to_dict() for r in results],
                                      **({"profiles": profiles} if profiles else {})})
    return EXIT_OK


def cmd_eval(args) -> int:
    from pocketformer import fsutil
    from pocketformer.data import DataSpec, load_for
    from pocketformer.evaluation import EvalOptions, artifact_forward, check_task, evaluate
    from pocketformer.export import load_sidecar
    from pocketformer.models import load_model

    spec = DataSpec.parse(args.data, field="--data")
    spec.check_exists(field="--data")
    opts = EvalOptions(seq_len=args.seq_len, max_windows=args.max_windows)
    fn, note = None, None
    source = args.model
    if Path(args.model).suffix in (".pte", ".onnx"):
        fn, opts, note = artifact_forward(args.model, opts)
        source = load_sidecar(args.model)["source"]
    loaded = load_model(source)
    task = args.task or loaded.adapter.task
    check_task(loaded, task)
    data = load_for(loaded.adapter.data_kind, spec)
    result = evaluate(loaded, task, data, fn=fn, opts=opts)
    where = f" through {note['runtime']} ({note['kind']} graph, {note['quantization']})" if note else ""
    print(f"{result.metric} {result.value:.6g} ({result.samples} samples of {result.data}{where}, "
          f"{result.seconds:.1f}s)" + (f"; {note['seq_len_note']}" if note and "seq_len_note" in note else ""))
    if args.json:
        blob = result.to_dict()
        blob[result.metric] = result.value
        blob["model"] = str(args.model)
        if note:
            blob["artifact"] = note
        fsutil.write_json(args.json, blob)
    return EXIT_OK


def cmd_report(args) -> int:
    from pocketformer import fsutil
    from pocketformer.report import REPORT_MD, Report, comparison_rows, render_html

    if len(args.dirs) == 1 and not args.html:
        report = Report.load(args.dirs[0])
        report.write(args.dirs[0])
        _print_summary(report, Path(args.dirs[0]))
        if report.passed is False:
            print(f"see {Path(args.dirs[0]) / REPORT_MD}", file=sys.stderr)
            return EXIT_BUDGET
        return EXIT_OK
    # Several builds (dense vs compressed, fp32 vs int8) side by side, ratios against the first.
    reports = [Report.load(d) for d in args.dirs]
    names = [Path(d).name for d in args.dirs]
    for row in comparison_rows(reports, names):
        ratio = lambda k: "" if row[k] is None else f" ({row[k]:.3f}x)"  # noqa: E731
        p50 = "" if row["p50_ms"] is None else f", p50 {row['p50_ms']:.2f} ms{ratio('p50_ms_ratio')}"
        ins = ("" if row["instructions"] is None
               else f", {row['instructions']:,.0f} instr{ratio('instructions_ratio')}")
        q = "" if row["quality"] is None else f", {row['metric']} {row['quality']:.4f}"
        size = "" if row["size_mb"] is None else f"{row['size_mb']:.1f} MB{ratio('size_mb_ratio')}"
        print(f"{row['build']}/{row['artifact']} [{row['runner']}, {row['target']}]: {size}{q}{p50}{ins}")
    html = Path(args.html or Path(args.dirs[0]) / "compare.html")
    fsutil.write_text(html, render_html(reports, names))
    print(f"wrote {html}")
    return EXIT_OK


SETUP_PARTS = ("runners", "qemu", "adbd", "android", "llamacpp")


def cmd_setup(args) -> int:
    """Fetch, build and cache what the bench targets need (pinned, checksummed, idempotent)."""
    from pocketformer.errors import RuntimeFailure

    parts = args.parts or ["runners", "qemu"]
    parts = list(SETUP_PARTS) if "all" in parts else parts
    failed = []
    for part in parts:
        if part == "runners":
            from pocketformer.runtime_bench.native import setup_runners

            summary = setup_runners()
            for name, r in summary["runners"].items():
                print(f"runner {name}: {r['binary']} ({r['runtime_version']})")
            for name, msg in summary["errors"].items():
                print(f"runner {name}: FAILED: {msg.splitlines()[0]}", file=sys.stderr)
                # ExecuTorch has no Android library this machine can link (docs/native_runners.md)
                if name != "executorch-android-arm64":
                    failed.append(name)
        elif part == "qemu":
            from pocketformer.runtime_bench.qemu import setup_qemu

            tools = setup_qemu()
            print(f"qemu: {tools.qemu} with plugin {tools.plugin}")
        elif part == "adbd":
            from pocketformer.runtime_bench.adbd_peer import setup_peer

            print(f"adbd test peer: {setup_peer()}")
        elif part == "llamacpp":
            # the measured peer of `bench --llm`: built from the pinned llama-cpp-python sdist
            import shutil

            from pocketformer.runtime_bench.llamacpp import APT_PACKAGES, build_llamacpp
            from pocketformer.runtime_bench.native import apt_install, can_apt_install

            missing = [p for p in APT_PACKAGES if not shutil.which(p)]   # cmake, g++, make
            if missing and can_apt_install():
                apt_install(missing)
            b = build_llamacpp("x86_64")
            print(f"llama.cpp {b.version} ({b.commit}): {b.llama_bench}")
        elif part == "android":
            from pocketformer.android import ensure_android_tools

            print(f"android tools: {ensure_android_tools()}")
    if failed:
        raise RuntimeFailure(f"setup failed for {', '.join(failed)}")
    return EXIT_OK


def cmd_android_demo(args) -> int:
    from pocketformer.android import main_android_demo

    return main_android_demo(args.build_out, args.out)


def cmd_models(args) -> int:
    from pocketformer.compress import METHODS
    from pocketformer.models import BUILTIN_MODELS, supported_families

    print("built-in models:")
    for name, desc in BUILTIN_MODELS.items():
        print(f"  {name:10s} {desc}")
    print(f"families: {supported_families()}")
    print("compression methods:")
    for m in METHODS.values():
        print(f"  {m.name:14s} {m.summary}")
    return EXIT_OK


def make_parser():
    p = argparse.ArgumentParser(
        prog="pocketformer",
        description="Compress a pre-trained transformer for your data, export it for phones, measure it.",
        epilog="exit codes: 0 ok, 2 bad input, 3 budget failed, 4 runtime/device failure")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="run a recipe: compress -> export -> bench -> eval -> gate")
    b.add_argument("recipe")
    b.add_argument("--out", help="output directory (default out/<recipe name>)")

    c = sub.add_parser("compress", help="apply one compression method and save the model")
    c.add_argument("--model", required=True, help="built-in name, HF directory, .gguf or config.json")
    c.add_argument("--method", required=True)
    c.add_argument("--calibration", help="calibration data, PATH[@START:END]")
    c.add_argument("--seq-len", type=int, default=128, help="calibration sequence length")
    c.add_argument("--samples", type=int, default=128, help="calibration samples")
    c.add_argument("--out", required=True)
    owners = _add_method_options(c)

    e = sub.add_parser("export", help="export a model to ONNX and/or ExecuTorch with parity checks")
    e.add_argument("model")
    e.add_argument("--format", default="onnx,pte", help="comma list of onnx, pte")
    e.add_argument("--quantize", default="fp32", help="fp32 | int8 | 8da4w (8da4w: .pte only)")
    e.add_argument("--group-size", type=int, help="8da4w weight group, 0 for one scale per output "
                   "channel (default: one that divides every quantized width; 32 first, or the "
                   "largest when rotated and GPTQ-rounded)")
    e.add_argument("--lm-head", default="int4",
                   help="8da4w: the output head's weights, int4 like the other linears or int8 "
                        "(per output channel; what llama.cpp's 4-bit files keep at 8 bits)")
    e.add_argument("--int8-linears", metavar="PATTERN[,PATTERN]",
                   help="8da4w: linears kept at 8 bits (int8 per output channel), by name glob or "
                        "dotted suffix, e.g. v_proj (what llama.cpp's Q4_K_M keeps at 6 bits)")
    e.add_argument("--rounding", default="auto",
                   help="8da4w weights: rtn (round to nearest), gptq (calibrated, needs "
                        "--calibration), grid (keep the weights' own 4-bit block grid, e.g. a "
                        "GGUF Q4_1's, exactly, plus a low-rank recovery term: export/grid.py), "
                        "auto (grid for a model with low-rank recovery factors, else gptq when "
                        "--calibration is given)")
    e.add_argument("--rotation", default="auto",
                   help="8da4w / int8 ONNX: rotate the residual stream first (export/rotate.py): "
                        "on, off, auto (on for RMSNorm decoders with gptq / with --calibration)")
    e.add_argument("--smoothing", type=float, default=0.5,
                   help="int8 ONNX with --calibration: SmoothQuant alpha for the FFN down-projection "
                        "inputs of gated decoders (0 turns it off)")
    e.add_argument("--calibration", help="calibration data, PATH[@START:END], for 8da4w's gptq "
                   "rounding and int8 ONNX's smoothing (keep it apart from the text you evaluate on)")
    e.add_argument("--samples", type=int, default=64, help="calibration samples")
    e.add_argument("--max-unquantized-share", type=float, default=0.0,
                   help="gate: share of linear weights a scheme may leave unquantized (exit 3)")
    e.add_argument("--min-delegated-flops", type=float,
                   help="gate: share of .pte FLOPs that must run in XNNPACK (default 0.99; <0 disables)")
    e.add_argument("--batch", type=int, default=1)
    e.add_argument("--seq-len", type=int)
    e.add_argument("--max-len", type=int, default=256, help="decoders: KV cache length")
    e.add_argument("--gen-logits", default="last",
                   help="decoders' generation programs: logits of each call's last position "
                        "(last, what generating needs: the prompt's other positions skip the "
                        "output head) or of every position (all, to score a text in one call)")
    e.add_argument("--greedy-tokens", type=int, default=32,
                   help="decoders: greedy tokens compared with eager generation")
    e.add_argument("--no-generation", action="store_true",
                   help="decoders: skip the KV-cache generation graphs")
    e.add_argument("--ort-format", action="store_true",
                   help="also write the ORT mobile format and its required_operators.config")
    e.add_argument("--no-etrecord", action="store_true", help="do not write <file>.pte.etrecord")
    e.add_argument("--no-xnnpack-form", action="store_true",
                   help="trace the .pte forward program with the model's own norms and attention "
                        "(default: in operators XNNPACK delegates whole; docs/export.md)")
    e.add_argument("--out", required=True)

    n = sub.add_parser("bench", help="measure artifacts (latency distribution, load time, memory)")
    n.add_argument("artifacts", nargs="+")
    n.add_argument("--target", default="host",
                   help="comma-separated: host, qemu:CPU (cortex-a55/a76, neoverse-n1, ...), "
                        "adb:SERIAL[,SERIAL...]")
    n.add_argument("--runner", default="native",
                   help="native (C++ runners, every target), python (host only), app (the "
                        "android_demo app's benchmark mode, adb targets), comma-separated")
    n.add_argument("--processes", type=int, default=1,
                   help="host, native runner: repeat the measurement in this many runner "
                        "processes and pool the latencies (steadier p50 on a shared machine); "
                        "with --llm: rounds, each measuring every engine once, the order "
                        "alternating; speeds are medians over rounds and each ratio the median "
                        "of its per-round ratios")
    n.add_argument("--qemu-runs", type=int, default=3,
                   help="inferences in the instruction-counted run under qemu")
    n.add_argument("--profile", action="store_true",
                   help="also a per-operator profile of each .pte from ETDump + its ETRecord "
                        "(per decode step for -gen programs; with --llm after the race, into its JSON)")
    n.add_argument("--llm", action="store_true",
                   help="decoders: race the -gen programs (native runners) against --against, one "
                        "table of prefill/decode tok/s, TTFT, RSS, size, perplexity (docs/llm_race.md)")
    n.add_argument("--against", default="llama.cpp", metavar="llama.cpp[:GGUF]",
                   help="with --llm: the peer (default GGUF: the built-in SmolLM2's); 'none' to skip")
    n.add_argument("--data", help="with --llm: text for perplexity, PATH[@START:END] (held out); host target only")
    n.add_argument("--ctx", type=int, default=128, help="with --llm: perplexity chunk length")
    n.add_argument("--chunks", type=int, default=16, help="with --llm: perplexity chunks")
    n.add_argument("--runs", type=int, default=30)
    n.add_argument("--warmup", type=int, default=5)
    n.add_argument("--threads", type=int, default=2)
    n.add_argument("--inputs", help=".npz of inputs (default: the artifact's .inputs.npz)")
    n.add_argument("--prompt-tokens", type=int, default=128,
                   help="decoder -gen artifacts: prompt length prefilled per run")
    n.add_argument("--new-tokens", type=int, default=32,
                   help="decoder -gen artifacts: tokens decoded per run (one step each)")
    n.add_argument("--json", help="write results here")

    v = sub.add_parser("eval", help="perplexity, STS Spearman or accuracy of a model or an exported file")
    v.add_argument("model", help="built-in name, model directory, or an exported .pte/.onnx")
    v.add_argument("--task", choices=["ppl", "sts", "accuracy"])
    v.add_argument("--data", required=True, help="PATH[@START:END]")
    v.add_argument("--seq-len", type=int, default=256, help="perplexity window")
    v.add_argument("--max-windows", type=int, default=64, help="perplexity windows scored")
    v.add_argument("--json")

    r = sub.add_parser("report", help="re-render report.md/.html from OUT/report.json and print the "
                       "verdict; with several build dirs, compare them side by side")
    r.add_argument("dirs", nargs="+", metavar="dir")
    r.add_argument("--html", help="write the (comparison) HTML page here")

    sub.add_parser("models", help="list built-in models, families and compression methods")

    ad = sub.add_parser("android-demo", help="a signed arm64-v8a APK of android_demo/ around the "
                        "ONNX artifact of a `pocketformer build` output (no Gradle needed)")
    ad.add_argument("build_out", help="the OUT directory of `pocketformer build`")
    ad.add_argument("--out", required=True, help="the .apk to write")

    st = sub.add_parser("setup", help="fetch and build what benchmarking needs: native runners "
                        "(host, linux-aarch64, android-arm64), the QEMU plugin, the adbd test peer, "
                        "the Android demo's tools, llama.cpp (the peer of bench --llm)")
    st.add_argument("parts", nargs="*", choices=[*SETUP_PARTS, "all"],
                    help="default: runners qemu")
    return p, owners


def main(argv=None) -> int:
    _quiet_libraries()
    parser, owners = make_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "compress":
            return cmd_compress(args, owners)
        handler = {"build": cmd_build, "export": cmd_export, "bench": cmd_bench, "eval": cmd_eval,
                   "report": cmd_report, "models": cmd_models, "setup": cmd_setup,
                   "android-demo": cmd_android_demo}[args.command]
        return handler(args)
    except PocketformerError as e:
        print(f"pocketformer: error: {e.describe()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("pocketformer: interrupted; no partial artifacts were kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug or an unexpected runtime failure: say so, keep exit code 4
        if os.environ.get("POCKETFORMER_DEBUG"):
            raise
        print(f"pocketformer: error: unexpected {type(e).__name__}: {e} "
              "(set POCKETFORMER_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
