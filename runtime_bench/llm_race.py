"""`pocketformer bench --llm ARTIFACT... --against llama.cpp[:GGUF]`: our decoders' generation
programs and llama.cpp on the same prompt length, generation length, thread count and text, in
one run, in one table (docs/llm_race.md).

Our side runs in the native runners' generation mode (prefill + one-token decode steps with the
KV cache kept in the program), llama.cpp's in `llama-bench` built from a pinned source release
(runtime_bench/llamacpp.py). Perplexity follows llama.cpp's `llama-perplexity` protocol on both
sides: the text is cut into CTX-token chunks and the second half of each chunk is scored with the
first half as context. Under `qemu:` the comparable figure is instructions per generated token.
"""
from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pocketformer.data import DataSpec, load_text
from pocketformer.errors import BadInputError, PocketformerError, RuntimeFailure
from pocketformer.export import load_sidecar
from pocketformer.progress import say
from pocketformer.runtime_bench.config import parse_target

RUNTIME_OF = {".pte": "executorch", ".onnx": "onnxruntime"}
ENGINE = {".pte": "ExecuTorch (XNNPACK), native runner", ".onnx": "ONNX Runtime, native runner"}


@dataclass
class RaceConfig:
    target: str = "host"
    threads: int = 2
    prompt_tokens: int = 128
    new_tokens: int = 32
    runs: int = 3                 # timed generations (ours) / llama-bench repetitions
    warmup: int = 1
    data: str | None = None       # text for perplexity, PATH[@START:END]
    ctx: int = 128                # perplexity chunk length (tokens)
    chunks: int = 16              # perplexity chunks
    qemu_tokens: tuple[int, int] = (8, 24)   # two decode lengths: their difference is per token
    rounds: int = 1               # host: every engine measured once per round, the order
                                  # alternating; speeds are medians over rounds, ratios the
                                  # median of the per-round ratios (a shared machine's slow
                                  # spells then hit both sides of a ratio alike)

    def validate(self) -> None:
        kind, _ = parse_target(self.target)
        if kind == "adb":
            raise BadInputError("the LLM race runs on host or qemu:CPU", field="target")
        if self.threads < 1 or self.runs < 1 or self.warmup < 0:
            raise BadInputError("threads >= 1, runs >= 1 and warmup >= 0 are required", field="runs")
        if self.prompt_tokens < 1 or self.new_tokens < 2:
            raise BadInputError("prompt_tokens >= 1 and new_tokens >= 2 are required",
                                field="new_tokens")
        if self.rounds < 1 or (self.rounds > 1 and kind != "host"):
            raise BadInputError("rounds >= 1, and more than one only on the host (instruction "
                                "counts under qemu do not vary)", field="rounds")
        if self.ctx < 8 or self.ctx % 2 or self.chunks < 1:
            raise BadInputError("ctx must be an even number >= 8 and chunks >= 1", field="ctx")
        if self.data and kind != "host":
            raise BadInputError("perplexity (--data) is measured on the host only: the program's "
                                "weights are the same under qemu, so run the host race for it",
                                field="data")


@dataclass
class RaceRow:
    name: str
    engine: str
    file: str
    size_mb: float
    quantization: str | None = None
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    ttft_ms: float | None = None
    peak_rss_mb: float | None = None
    perplexity: float | None = None
    instructions_per_token: float | None = None
    detail: dict = field(default_factory=dict)


def default_gguf(artifacts: list[Path]) -> Path:
    """The GGUF users would otherwise run: the built-in SmolLM2's, when the artifacts came from it."""
    from pocketformer.models import builtin_path

    sources = {str((load_sidecar(a) or {}).get("source", "")) for a in artifacts}
    if sources and all("smollm2" in s.lower() or s.endswith(".gguf") for s in sources):
        gguf = [Path(s) for s in sources if s.endswith(".gguf")]
        return gguf[0] if gguf else builtin_path("smollm2")
    raise BadInputError("no default GGUF for these artifacts (they did not come from the built-in "
                        "SmolLM2); pass --against llama.cpp:PATH.gguf", field="against")


def _check_generation(artifact: Path) -> dict:
    if not artifact.is_file():
        raise BadInputError("artifact not found", file=str(artifact))
    side = load_sidecar(artifact) or {}
    if artifact.suffix not in RUNTIME_OF or side.get("kind") != "generation":
        raise BadInputError("the LLM race takes decoders' generation programs (model[-Q]-gen.pte "
                            "or .onnx, written by `pocketformer export` for llama-family models)",
                            file=str(artifact))
    return side


# ---- perplexity, llama-perplexity's protocol on our programs --------------------------------------

def _token_ids(source: str, text: str) -> list[int]:
    from pocketformer.models import load_model

    tok = load_model(source).tokenizer
    return tok(text, add_special_tokens=False)["input_ids"]


def perplexity_like_llamacpp(artifact: Path, ids: list[int], ctx: int, chunks: int) -> dict:
    """CTX-token chunks, each fed from position 0, and only its second half is scored (the
    logits at positions ctx/2 .. ctx-2 predict the next token), as llama-perplexity does. A
    program whose steps return the last position's logits is fed the first half in one call and
    the rest one token per call (`score_positions`). Returns the perplexity and the tokens scored."""
    from pocketformer.export.runtimes import open_generator, score_positions

    side = load_sidecar(artifact) or {}
    if ctx > int(side.get("max_len", ctx)) - 1:
        raise BadInputError(f"ctx {ctx} does not fit the exported KV cache ({side.get('max_len')})",
                            field="ctx", file=str(artifact))
    n = min(chunks, len(ids) // ctx)
    if n < 1:
        raise BadInputError(f"the text has {len(ids)} tokens, fewer than one {ctx}-token chunk",
                            field="data")
    gen = open_generator(artifact)
    nll, count = 0.0, 0
    first = ctx // 2
    for c in range(n):
        toks = np.asarray(ids[c * ctx:(c + 1) * ctx], dtype=np.int64)
        lg = np.asarray(score_positions(gen, toks[:ctx - 1], first), dtype=np.float64)  # [ctx/2 - 1, V]
        target = toks[first + 1:ctx]
        m = lg.max(axis=1, keepdims=True)
        logz = (m[:, 0] + np.log(np.exp(lg - m).sum(axis=1)))
        nll += float((logz - lg[np.arange(len(target)), target]).sum())
        count += len(target)
    return {"perplexity": math.exp(nll / count), "chunks": n, "ctx": ctx, "scored_tokens": count}


# ---- our side ------------------------------------------------------------------------------------

def _ours_host(artifact: Path, side: dict, cfg: RaceConfig) -> RaceRow:
    from pocketformer.runtime_bench import native

    bundle = native.build_runner(RUNTIME_OF[artifact.suffix], "x86_64", install_missing=True)
    say(f"race: {artifact.name}: native generate {cfg.prompt_tokens}+{cfg.new_tokens} tokens, "
        f"{cfg.threads} threads")
    raw = native.run_native_generate(bundle, artifact, prompt_tokens=cfg.prompt_tokens,
                                     new_tokens=cfg.new_tokens, warmup=cfg.warmup, runs=cfg.runs,
                                     threads=cfg.threads)
    g = raw["generation"]
    return RaceRow(name=artifact.name, engine=ENGINE[artifact.suffix], file=str(artifact),
                   size_mb=artifact.stat().st_size / 1e6, quantization=side.get("quantization"),
                   prefill_tokens_per_s=g["prefill_tokens_per_s"],
                   decode_tokens_per_s=g["decode_tokens_per_s"],
                   ttft_ms=float(np.median(g["ttft_ms"])), peak_rss_mb=raw["peak_rss_mb"],
                   detail={"runtime_version": raw.get("runtime_version"), "runs": cfg.runs})


def _ours_qemu(artifact: Path, side: dict, cpu: str, cfg: RaceConfig) -> RaceRow:
    from pocketformer.runtime_bench import native, qemu

    bundle = native.build_runner(RUNTIME_OF[artifact.suffix], "aarch64", install_missing=True)
    counts = []
    with tempfile.TemporaryDirectory(prefix="pf-race-") as td:
        for n in cfg.qemu_tokens:
            out = Path(td) / f"g{n}.json"
            cmd = [str(bundle.binary), "--model", str(artifact.resolve()), "--generate", f"8,{n}",
                   "--seed", "0", "--warmup", "0", "--runs", "1", "--threads", "1", "--json", str(out)]
            say(f"race: {artifact.name} under qemu:{cpu}: 8-token prompt + {n} tokens (emulated)")
            run = qemu.run_qemu(cmd, cpu, count_instructions=True)
            if run.returncode != 0:
                raise RuntimeFailure(f"{bundle.binary.name} exited {run.returncode} under QEMU: "
                                     f"{run.stderr.strip()[-600:]}", file=str(artifact),
                                     device=f"qemu:{cpu}")
            counts.append(run)
    per_tok = qemu.per_inference(counts[0], counts[1], *cfg.qemu_tokens, main_thread=True)
    return RaceRow(name=artifact.name, engine=ENGINE[artifact.suffix], file=str(artifact),
                   size_mb=artifact.stat().st_size / 1e6, quantization=side.get("quantization"),
                   instructions_per_token=per_tok,
                   peak_rss_mb=max(r.peak_rss_mb for r in counts),
                   detail={"main_thread_instructions": [r.main_thread_instructions for r in counts],
                           "new_tokens": list(cfg.qemu_tokens), "threads": 1})


# ---- llama.cpp -----------------------------------------------------------------------------------

def _llamacpp(gguf: Path, cfg: RaceConfig, text_file: Path | None) -> RaceRow:
    from pocketformer.runtime_bench import llamacpp

    kind, cpu = parse_target(cfg.target)
    build = llamacpp.build_llamacpp("x86_64" if kind == "host" else "aarch64")
    row = RaceRow(name=gguf.name, engine=f"llama.cpp {build.version} ({build.commit}), llama-bench",
                  file=str(gguf), size_mb=gguf.stat().st_size / 1e6, quantization="gguf")
    if kind == "host":
        say(f"race: llama-bench {gguf.name}: -p {cfg.prompt_tokens} -n {cfg.new_tokens} "
            f"-t {cfg.threads} -r {cfg.runs}")
        b = llamacpp.llama_bench(build, gguf, prompt_tokens=cfg.prompt_tokens,
                                 new_tokens=cfg.new_tokens, threads=cfg.threads, repetitions=cfg.runs)
        row.prefill_tokens_per_s = b["prefill_tokens_per_s"]
        row.decode_tokens_per_s = b["decode_tokens_per_s"]
        # time to first token = the prompt's processing time (llama-bench's pp test)
        row.ttft_ms = (1e3 * cfg.prompt_tokens / b["prefill_tokens_per_s"]
                       if b["prefill_tokens_per_s"] else None)
        row.peak_rss_mb = b["peak_rss_mb"]
        row.detail = {k: b.get(k) for k in ("prefill_tokens_per_s_stddev",
                                             "decode_tokens_per_s_stddev", "cpu_info", "model_type",
                                             "backends", "wall_s", "fallback")}
        if b["fallback"]:
            row.engine += f", {' '.join(b['fallback']['args'])}"
        if text_file is not None:
            say(f"race: llama-perplexity {gguf.name}: ctx {cfg.ctx}, {cfg.chunks} chunks")
            p = llamacpp.llama_perplexity(build, gguf, text_file, ctx=cfg.ctx, chunks=cfg.chunks,
                                          threads=cfg.threads, details=True)
            row.perplexity = p["perplexity"]
            row.detail["perplexity"] = p
            if p["fallback"]:
                row.engine += f"; llama-perplexity {' '.join(p['fallback']['args'])}"
    else:
        say(f"race: llama-bench {gguf.name} under qemu:{cpu} (emulated)")
        q = llamacpp.llama_bench_instructions(build, gguf, cpu, new_tokens=cfg.qemu_tokens)
        row.instructions_per_token = q["instructions_per_token"]
        row.peak_rss_mb = q["peak_rss_mb"]
        row.detail = {"main_thread_instructions": q["main_thread_instructions"],
                      "new_tokens": q["new_tokens"], "threads": 1}
    return row


# ---- the race --------------------------------------------------------------------------------------

def race(artifacts, cfg: RaceConfig, *, against: str | None = "llama.cpp") -> dict:
    """Returns {"config", "rows", "llamacpp_error", "ratios"}. A llama.cpp that cannot be built
    or run is reported in `llamacpp_error` after our rows are measured; the caller exits 4."""
    cfg.validate()
    artifacts = [Path(a) for a in artifacts]
    sides = [_check_generation(a) for a in artifacts]
    kind, cpu = parse_target(cfg.target)
    gguf = None
    if against:
        name, _, path = against.partition(":")
        if name != "llama.cpp":
            raise BadInputError(f"unknown peer {name!r}; expected llama.cpp[:GGUF]", field="against")
        gguf = Path(path) if path else default_gguf(artifacts)
        if not gguf.is_file():
            raise BadInputError("GGUF file not found", file=str(gguf), field="against")

    text_file = ids = None
    tmp = tempfile.TemporaryDirectory(prefix="pf-race-")
    try:
        if cfg.data and kind == "host":
            text = load_text(DataSpec.parse(cfg.data)).text
            text_file = Path(tmp.name) / "text.txt"
            text_file.write_text(text, encoding="utf-8")
            ids = _token_ids(str(sides[0].get("source")), text)

        # rounds[i][j]: engine j (our artifacts in order, then llama.cpp) in round i; the first
        # round also measures perplexity (deterministic, so once)
        rounds: list[list[RaceRow | None]] = []
        error = None
        for r in range(cfg.rounds):
            got: list[RaceRow | None] = [None] * (len(artifacts) + 1)
            if cfg.rounds > 1:
                say(f"race: round {r + 1}/{cfg.rounds}" + (", llama.cpp first" if r % 2 else ""))

            def ours(j):
                artifact, side = artifacts[j], sides[j]
                if kind != "host":
                    got[j] = _ours_qemu(artifact, side, cpu, cfg)
                    return
                got[j] = _ours_host(artifact, side, cfg)
                if ids is not None and r == 0:
                    say(f"race: {artifact.name}: perplexity, ctx {cfg.ctx}, {cfg.chunks} chunks")
                    p = perplexity_like_llamacpp(artifact, ids, cfg.ctx, cfg.chunks)
                    got[j].perplexity = p["perplexity"]
                    got[j].detail["perplexity"] = p

            def peer():
                nonlocal error
                if gguf is None or error is not None:
                    return
                start = time.perf_counter()
                try:
                    got[-1] = _llamacpp(gguf, cfg, text_file if r == 0 else None)
                except PocketformerError as e:
                    error = e.describe()
                say(f"race: llama.cpp took {time.perf_counter() - start:.0f} s")

            steps = [lambda j=j: ours(j) for j in range(len(artifacts))] + [peer]
            for step in (steps if r % 2 == 0 else steps[::-1]):
                step()
            rounds.append(got)
    finally:
        tmp.cleanup()

    rows = [_pooled([rd[j] for rd in rounds]) for j in range(len(artifacts))]
    if gguf is not None and error is None:
        rows.append(_pooled([rd[-1] for rd in rounds]))
    ref = rows[-1] if gguf is not None and error is None else None
    ratios = {}
    if ref is not None:
        for j, row in enumerate(rows[:-1]):
            per_round = {
                key: [_ratio(getattr(rd[j], key), getattr(rd[-1], key)) for rd in rounds]
                for key in ("decode_tokens_per_s", "prefill_tokens_per_s")}
            ratios[row.file] = {      # keyed by path: two programs may share a file name
                "decode_vs_llamacpp": _median(per_round["decode_tokens_per_s"]),
                "prefill_vs_llamacpp": _median(per_round["prefill_tokens_per_s"]),
                # fewer instructions per token is faster: llama.cpp's count over ours
                "instructions_speedup_vs_llamacpp": _ratio(ref.instructions_per_token,
                                                           row.instructions_per_token),
                "perplexity_vs_llamacpp": _ratio(row.perplexity, ref.perplexity),
            }
            if cfg.rounds > 1:
                ratios[row.file]["decode_vs_llamacpp_rounds"] = per_round["decode_tokens_per_s"]
                ratios[row.file]["prefill_vs_llamacpp_rounds"] = per_round["prefill_tokens_per_s"]
    return {"config": asdict(cfg), "against": str(gguf) if gguf else None,
            "rows": [asdict(r) for r in rows], "ratios": ratios, "llamacpp_error": error}


def _median(values):
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def _pooled(per_round: list[RaceRow]) -> RaceRow:
    """One engine's row over the rounds: the first round's (which holds the perplexity), with
    the speeds and TTFT the medians over rounds and each round's figures in `detail["rounds"]`."""
    if len(per_round) == 1:
        return per_round[0]
    row = copy.deepcopy(per_round[0])      # the rounds' own rows stay as measured
    keys = ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_ms")
    row.detail["rounds"] = [{k: getattr(r, k) for k in keys} for r in per_round]
    for k in keys:
        setattr(row, k, _median([getattr(r, k) for r in per_round]))
    rss = [r.peak_rss_mb for r in per_round if r.peak_rss_mb is not None]
    row.peak_rss_mb = max(rss) if rss else None
    return row


def _ratio(a, b):
    return a / b if a is not None and b else None


def render(result: dict) -> str:
    """The one table the command prints."""
    def f(v, fmt):
        return "" if v is None else format(v, fmt)
    head = ["file", "engine", "MB", "prefill tok/s", "decode tok/s", "TTFT ms", "peak RSS MB",
            "perplexity", "instr./token", "decode x llama.cpp", "prefill x llama.cpp"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = [r["name"] for r in result["rows"]]
    for r in result["rows"]:
        q = result["ratios"].get(r["file"], {})
        name = r["name"]
        if names.count(name) > 1:       # same file name from different exports: show its folder
            name = f"{Path(r['file']).parent.name}/{name}"
        speed = q.get("decode_vs_llamacpp")
        if speed is None and q.get("instructions_speedup_vs_llamacpp") is not None:
            speed = q["instructions_speedup_vs_llamacpp"]
        lines.append("| " + " | ".join([
            name, r["engine"], f(r["size_mb"], ".1f"), f(r["prefill_tokens_per_s"], ".1f"),
            f(r["decode_tokens_per_s"], ".1f"), f(r["ttft_ms"], ".1f"), f(r["peak_rss_mb"], ".0f"),
            f(r["perplexity"], ".3f"), f(r["instructions_per_token"], ",.0f"), f(speed, ".3f"),
            f(q.get("prefill_vs_llamacpp"), ".3f")]) + " |")
    c = result["config"]
    lines.append("")
    lines.append(f"target {c['target']}, {c['threads']} threads, prompt {c['prompt_tokens']} tokens, "
                 f"{c['new_tokens']} generated; perplexity: "
                 + (f"llama-perplexity protocol, ctx {c['ctx']}, {c['chunks']} chunks of {c['data']}"
                    if c["data"] else "not measured (no --data)")
                 + ("; under qemu the speed ratio is llama.cpp's instructions per token over ours"
                    if c["target"].startswith("qemu:") else ""))
    for r in result["rows"]:
        for what in (r["detail"], r["detail"].get("perplexity") or {}):
            if what.get("fallback"):
                lines.append(f"llama.cpp: {what['fallback']['reason']}")
    if result["llamacpp_error"]:
        lines.append(f"llama.cpp: FAILED: {result['llamacpp_error']}")
    return "\n".join(lines)


def write_json(path, result: dict) -> None:
    from pocketformer import fsutil

    fsutil.write_text(path, json.dumps(result, indent=2, default=str))
