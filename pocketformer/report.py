"""The report schema: one versioned JSON document per build, read by the Markdown report, the
budget gate, `pocketformer report` and the tests alike.

Fields (schema_version 1):
  schema_version, created, tool (versions), recipe {path, sha256, content},
  model {source, family, before{...}, after{...}}   (describe(): params, layers, heads, widths)
  compress {steps[{method, params, params_before, params_after, seconds, details,
                   quality_after?: {value, relative_drop, seconds} (recipes of several steps
                   with an evaluation split)}]}
  quality {task, metric, higher_is_better, before, after, relative_drop, data, samples}
  artifacts[{format, path, runtime, quantization, size_bytes, size_mb, sha256, export_seconds,
             inputs, outputs, parity{max_abs_diff, cosine, min_cosine, max_abs_limit, passed},
             details}]
  bench[{artifact, format, runtime, runner, target, threads, warmup, runs, load_ms,
         first_inference_ms, latency_ms{min,p50,p90,p99,mean,std,max,trimmed_mean},
         inferences_per_s, peak_rss_mb, runtime_overhead_rss_mb, input_shapes, device,
         latencies_ms, emulated, instructions_per_inference (qemu), outputs (native runners),
         throttled (adb), generation{prompt_tokens, new_tokens, ttft_ms{...},
         prefill_tokens_per_s, decode_tokens_per_s} (decoder -gen artifacts only)}]
  budgets[{name, target, limit, value, passed, detail}], passed, timings_s{stage: seconds}
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pocketformer import fsutil
from pocketformer.errors import BadInputError

SCHEMA_VERSION = 1
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


@dataclass
class Budgets:
    """[budgets] of a recipe. Unset budgets are not checked; parity is always enforced."""
    max_size_mb: float | None = None                          # every artifact
    max_p50_ms: dict[str, float] = field(default_factory=dict)  # per bench target
    max_quality_drop: float | None = None                     # relative; see evaluation.relative_drop

    def validate(self) -> None:
        if self.max_size_mb is not None and self.max_size_mb <= 0:
            raise BadInputError("must be > 0", field="max_size_mb")
        if self.max_quality_drop is not None and not 0 <= self.max_quality_drop < 1:
            raise BadInputError("must be in [0, 1): a fraction such as 0.03 for 3%",
                                field="max_quality_drop")
        for target, limit in self.max_p50_ms.items():
            if limit <= 0:
                raise BadInputError("must be > 0", field=f"max_p50_ms.{target}")


@dataclass
class BudgetCheck:
    name: str
    limit: float | None
    value: float | None
    passed: bool
    target: str | None = None
    detail: str = ""


@dataclass
class Report:
    schema_version: int = SCHEMA_VERSION
    created: str = ""
    tool: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    compress: dict = field(default_factory=lambda: {"steps": []})
    quality: dict = field(default_factory=dict)
    artifacts: list[dict] = field(default_factory=list)
    bench: list[dict] = field(default_factory=list)
    budgets: list[dict] = field(default_factory=list)
    passed: bool | None = None
    timings_s: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, blob: dict, *, file: str | None = None) -> "Report":
        version = blob.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BadInputError(f"report schema_version {version!r} is not {SCHEMA_VERSION}",
                                file=file, field="schema_version")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in blob.items() if k in known})

    @classmethod
    def load(cls, path: str | Path) -> "Report":
        path = Path(path)
        if path.is_dir():
            path = path / REPORT_JSON
        if not path.is_file():
            raise BadInputError("no report.json here", file=str(path))
        try:
            blob = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BadInputError(f"not valid JSON: {e}", file=str(path)) from e
        return cls.from_dict(blob, file=str(path))

    def failed_checks(self) -> list[dict]:
        return [b for b in self.budgets if not b["passed"]]

    def write(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        fsutil.write_json(out_dir / REPORT_JSON, self.to_dict())
        fsutil.write_text(out_dir / REPORT_MD, render_markdown(self))
        fsutil.write_text(out_dir / REPORT_HTML, render_html([self]))


def _greedy(a: dict) -> str:
    p = a["parity"]
    return f"{p['greedy_match_prefix']}/{p['greedy_tokens']}" if "greedy_tokens" in p else ""


def _xnnpack(a: dict) -> str:
    share = (a.get("details", {}).get("delegation") or {}).get("delegated_flops_share")
    return "" if share is None else f"{share:.2%}"


def check_budgets(report: Report, budgets: Budgets) -> list[BudgetCheck]:
    checks: list[BudgetCheck] = []
    for a in report.artifacts:
        p = a["parity"]
        checks.append(BudgetCheck(
            "parity", p["min_cosine"], p["cosine"], p["passed"], detail=(
                f"{a['path']}: cosine {p['cosine']:.6f} (min {p['min_cosine']}), max abs diff "
                f"{p['max_abs_diff']:.3g} (limit {'none' if p['max_abs_limit'] is None else format(p['max_abs_limit'], 'g')})"
                + (f", greedy {p['greedy_match_prefix']}/{p['greedy_tokens']} tokens as eager"
                   if "greedy_tokens" in p else ""))))
    if budgets.max_size_mb is not None:
        for a in report.artifacts:
            checks.append(BudgetCheck("max_size_mb", budgets.max_size_mb, round(a["size_mb"], 3),
                                      a["size_mb"] <= budgets.max_size_mb, detail=a["path"]))
    for target, limit in budgets.max_p50_ms.items():
        results = [b for b in report.bench if b["target"] == target]
        if not results:
            checks.append(BudgetCheck("max_p50_ms", limit, None, False, target,
                                      f"no benchmark ran on target {target!r}"))
        for b in results:
            p50 = b["latency_ms"]["p50"]
            checks.append(BudgetCheck("max_p50_ms", limit, round(p50, 3), p50 <= limit, target,
                                      f"{Path(b['artifact']).name} ({b['runtime']})"))
    if budgets.max_quality_drop is not None and report.quality:
        drop = report.quality["relative_drop"]
        checks.append(BudgetCheck("max_quality_drop", budgets.max_quality_drop, round(drop, 5),
                                  drop <= budgets.max_quality_drop,
                                  detail=f"{report.quality['metric']} {report.quality['before']:.4f}"
                                         f" -> {report.quality['after']:.4f}"))
    return checks


def apply_budgets(report: Report, budgets: Budgets) -> None:
    checks = check_budgets(report, budgets)
    report.budgets = [asdict(c) for c in checks]
    report.passed = all(c.passed for c in checks)


# ---- Markdown ------------------------------------------------------------------------------------

def _table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(r: Report) -> str:
    out = [f"# pocketformer report: {r.model.get('source', '?')}", ""]
    verdict = {True: "PASSED", False: "FAILED", None: "not gated"}[r.passed]
    out += [f"**Budgets: {verdict}**  ", f"Recipe: `{r.recipe.get('path', '-')}` "
            f"(sha256 {r.recipe.get('sha256', '')[:12]}), schema v{r.schema_version}, {r.created}", ""]
    before, after = r.model.get("before", {}), r.model.get("after", {})
    if before:
        out += ["## Model", ""]
        keys = ["num_layers", "params", "embedding_params", "non_embedding_params"]
        rows = [[k, before.get(k), after.get(k),
                 (f"{after[k] / before[k]:.3f}" if before.get(k) and after.get(k) is not None else "")]
                for k in keys]
        out += [_table(["", "before", "after", "after/before"], rows), ""]
    steps = r.compress.get("steps", [])
    if steps:
        out += ["## Compression steps", ""]
        rows = []
        for s in steps:
            d = s.get("details", {})
            what = f"removed layers {d['removed']}" if "removed" in d else ""
            if "ratio" in d and "vocab" in d:
                what = (f"embedding {d['params_before']:,} -> {d['params_after']:,} params "
                        f"({d['ratio']:.1f}x{', tied head' if d.get('tied_head') else ''})")
            rows.append([s["method"], s["params_before"], s["params_after"], what, s["seconds"]])
        head = ["method", "params before", "params after", "what", "seconds"]
        if any("quality_after" in s for s in steps):
            metric = (r.quality or {}).get("metric", "quality")
            head.append(f"{metric} after (drop)")
            for row, s in zip(rows, steps):
                q = s.get("quality_after")
                row.append(f"{q['value']:.4g} ({q['relative_drop']:+.2%})" if q else "")
        out += [_table(head, rows), ""]
    q = r.quality
    if q:
        out += ["## Quality", "", _table(
            ["task", "metric", "before", "after", "relative drop", "samples", "data"],
            [[q["task"], q["metric"], q["before"], q["after"], q["relative_drop"], q["samples"],
              f"`{q['data']}`"]]), ""]
    if r.artifacts:
        out += ["## Artifacts", ""]
        rows = [[a["path"], a["runtime"], a["quantization"], round(a["size_mb"], 2), a["sha256"][:12],
                 f"{a['parity']['cosine']:.7f}", f"{a['parity']['max_abs_diff']:.2e}",
                 _greedy(a), _xnnpack(a),
                 "yes" if a["parity"]["passed"] else "NO", a["export_seconds"]] for a in r.artifacts]
        out += [_table(["file", "runtime", "quant", "MB", "sha256", "parity cos", "max abs diff",
                        "greedy = eager", "XNNPACK FLOPs", "parity ok", "export s"], rows), ""]
    if r.bench:
        out += ["## Benchmarks", ""]
        rows = []
        for b in r.bench:
            lat = b["latency_ms"]
            rows.append([Path(b["artifact"]).name, b["runtime"], b["runner"],
                         b["target"] + (" (emulated)" if b.get("emulated") else ""), b["threads"],
                         b["load_ms"], b["first_inference_ms"], lat["min"], lat["p50"], lat["p90"],
                         lat["p99"], lat["mean"], lat["std"], b["peak_rss_mb"],
                         b.get("instructions_per_inference")])
        out += [_table(["artifact", "runtime", "runner", "target", "threads", "load ms", "first ms",
                        "min", "p50", "p90", "p99", "mean", "std", "peak RSS MB",
                        "instructions/inference"], rows)]
        gens = [b for b in r.bench if b.get("generation")]
        if gens:
            out += ["", "Decoders (-gen artifacts; the latency columns above are per decode step):", ""]
            out += [_table(["artifact", "runtime", "runner", "target", "prompt tokens",
                            "prefill tok/s", "TTFT p50 ms", "decode tok/s", "new tokens"],
                           [[Path(b["artifact"]).name, b["runtime"], b["runner"], b["target"],
                             b["generation"]["prompt_tokens"], b["generation"]["prefill_tokens_per_s"],
                             b["generation"]["ttft_ms"]["p50"], b["generation"]["decode_tokens_per_s"],
                             b["generation"]["new_tokens"]] for b in gens])]
        dev = r.bench[0]["device"]
        out += ["", f"Device: {dev.get('cpu')} ({dev.get('logical_cores')} logical cores, "
                    f"{dev.get('machine')}); {r.bench[0]['warmup']} warm-up, {r.bench[0]['runs']} "
                    "timed runs each; latencies in ms.", ""]
    if r.budgets:
        out += ["## Budgets", ""]
        rows = [[b["name"], b.get("target") or "", b["limit"], b["value"],
                 "pass" if b["passed"] else "FAIL", b.get("detail", "")] for b in r.budgets]
        out += [_table(["budget", "target", "limit", "value", "result", "detail"], rows), ""]
    if r.timings_s:
        out += ["## Stage timings", "", _table(["stage", "seconds"],
                                                [[k, round(v, 2)] for k, v in r.timings_s.items()]), ""]
    return "\n".join(out) + "\n"


# ---- HTML (one build, or several side by side) ---------------------------------------------------

REPORT_HTML = "report.html"


def _html_table(headers: list[str], rows: list[list]) -> str:
    from html import escape

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return "" if v is None else escape(str(v))
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def comparison_rows(reports: list[Report], names: list[str]) -> list[dict]:
    """One row per (build, artifact, bench result): size, quality, latency, and ratios against the
    first build's artifact of the same file name, runner and target (dense vs compressed)."""
    rows = []
    for name, r in zip(names, reports):
        sizes = {Path(a["path"]).name: a["size_mb"] for a in r.artifacts}
        quality = r.quality.get("after") if r.quality else None
        benched = {(Path(b["artifact"]).name, b["runner"], b["target"]): b for b in r.bench}
        keys = list(benched) or [(f, None, None) for f in sizes]
        for key in keys:
            b = benched.get(key)
            rows.append({"build": name, "artifact": key[0], "runner": key[1], "target": key[2],
                         "size_mb": sizes.get(key[0]), "quality": quality,
                         "metric": r.quality.get("metric") if r.quality else None,
                         "p50_ms": b["latency_ms"]["p50"] if b else None,
                         "instructions": b.get("instructions_per_inference") if b else None,
                         "peak_rss_mb": b["peak_rss_mb"] if b else None,
                         "latencies_ms": b.get("latencies_ms", []) if b else []})
    base = {(row["artifact"], row["runner"], row["target"]): row for row in rows
            if row["build"] == names[0]}
    for row in rows:
        ref = base.get((row["artifact"], row["runner"], row["target"]))
        for k in ("size_mb", "p50_ms", "instructions"):
            ok = ref is not None and ref[k] and row[k] is not None
            row[f"{k}_ratio"] = row[k] / ref[k] if ok else None
    return rows


def render_html(reports: list[Report], names: list[str] | None = None) -> str:
    from html import escape

    from pocketformer.plots import latency_svg, scatter_svg

    names = names or [r.model.get("source", f"build {i}") for i, r in enumerate(reports)]
    rows = comparison_rows(reports, names)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>pocketformer report</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:"
             "collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "th{background:#f3f3f3}td:first-child{text-align:left}</style></head><body>",
             "<h1>pocketformer report</h1>"]
    for name, r in zip(names, reports):
        verdict = {True: "PASSED", False: "FAILED", None: "not gated"}[r.passed]
        q = r.quality
        qtxt = (f"; {q['metric']} {q['before']:.4f} -> {q['after']:.4f}" if q else "")
        parts.append(f"<p><b>{escape(name)}</b>: budgets {verdict}; params "
                     f"{r.model.get('before', {}).get('params', '?'):,} -> "
                     f"{r.model.get('after', {}).get('params', '?'):,}{escape(qtxt)}</p>")
    parts.append("<h2>Side by side</h2>")
    parts.append(_html_table(
        ["build", "artifact", "runner", "target", "MB", "size ratio", "quality", "p50 ms",
         "p50 ratio", "instructions", "instr. ratio", "peak RSS MB"],
        [[r["build"], r["artifact"], r["runner"], r["target"], r["size_mb"], r["size_mb_ratio"],
          r["quality"], r["p50_ms"], r["p50_ms_ratio"], r["instructions"], r["instructions_ratio"],
          r["peak_rss_mb"]] for r in rows]))
    parts.append("<p>Ratios are against the first build's artifact with the same file name, runner "
                 "and target. Emulated (qemu) wall time is not phone latency; compare instructions "
                 "there.</p>")
    for target in dict.fromkeys(r["target"] for r in rows if r["target"]):
        series = {f"{r['build']} / {r['artifact']} [{r['runner']}]": r["latencies_ms"]
                  for r in rows if r["target"] == target and r["latencies_ms"]}
        parts.append(f"<h2>Latency distribution: {escape(target)}</h2>"
                     + latency_svg(series, title=f"latency per run on {target} (ms)"))
    metric = next((r["metric"] for r in rows if r["metric"]), "quality")
    for target in dict.fromkeys(r["target"] for r in rows if r["target"]):
        pts = [(f"{r['build']} / {r['artifact']}", r["p50_ms"], r["quality"]) for r in rows
               if r["target"] == target]
        parts.append(scatter_svg(pts, xlabel=f"p50 latency on {target} (ms)", ylabel=metric,
                                 title=f"{metric} vs latency ({target})"))
    sizes = {(r["build"], r["artifact"]): (r["size_mb"], r["quality"]) for r in rows}
    parts.append(scatter_svg([(f"{b} / {a}", s, q) for (b, a), (s, q) in sizes.items()],
                             xlabel="file size (MB)", ylabel=metric, title=f"{metric} vs size"))
    parts.append("</body></html>")
    return "\n".join(parts)
