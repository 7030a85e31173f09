"""`pocketformer bench --llm --against llama.cpp:GGUF` end to end on a tiny decoder: our generation
program and llama.cpp on a GGUF written from the same weights, in one run and one table; the same
perplexity protocol on both sides gives the same number; a llama.cpp that cannot be built is
exit 4 with our figures still printed."""
from __future__ import annotations

import json

import pytest

from pocketformer.cli import main
from pocketformer.runtime_bench import llamacpp

from conftest import WIKITEXT, calls_of, crashes_unless


@pytest.fixture(scope="module")
def tiny_race(tiny_llama_2l, tmp_path_factory):
    from pocketformer.export import ExportConfig
    from pocketformer.export.exporters import export_generation
    from pocketformer.models import load_model

    out = tmp_path_factory.mktemp("race")
    gguf = llamacpp.write_gguf(tiny_llama_2l, out / "tiny-f32.gguf", outtype="f32")
    cfg = ExportConfig(formats=["pte"], seq_len=16, max_len=80, greedy_tokens=8, etrecord=False)
    export_generation(load_model(tiny_llama_2l), out, "pte", cfg, stem="model", extra={})
    llamacpp.build_llamacpp("x86_64")     # cached by `pocketformer setup llamacpp`
    return out, gguf


ARGS = ["--prompt-tokens", "24", "--new-tokens", "8", "--runs", "2", "--warmup", "1",
        "--data", f"{WIKITEXT}@0.6:0.65", "--ctx", "64", "--chunks", "6"]


def test_race_one_table_same_weights_same_perplexity(tiny_race, tmp_path, capsys):
    out, gguf = tiny_race
    js = tmp_path / "race.json"
    rc = main(["bench", "--llm", str(out / "model-gen.pte"), "--against", f"llama.cpp:{gguf}",
               *ARGS, "--processes", "2", "--profile", "--json", str(js)])
    captured = capsys.readouterr()
    printed = captured.out
    assert rc == 0, captured.err[-3000:]
    res = json.loads(js.read_text())
    ours, peer = res["rows"]
    assert peer["engine"].startswith("llama.cpp") and res["llamacpp_error"] is None
    for r in (ours, peer):
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert r["ttft_ms"] > 0 and r["peak_rss_mb"] > 0 and r["size_mb"] > 0
    # the same f32 weights and the same protocol (second half of each 64-token chunk)
    assert ours["perplexity"] == pytest.approx(peer["perplexity"], rel=0.01)
    assert ours["detail"]["perplexity"]["scored_tokens"] == 6 * 31
    # two rounds (--processes 2): each engine's speed is the median of its rounds, the ratio the
    # median of the per-round ratios
    q = res["ratios"][ours["file"]]
    per_round = [a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
                 for a, b in zip(ours["detail"]["rounds"], peer["detail"]["rounds"])]
    assert len(per_round) == 2 and q["decode_vs_llamacpp_rounds"] == pytest.approx(per_round)
    assert q["decode_vs_llamacpp"] == pytest.approx(sum(per_round) / 2)
    assert ours["decode_tokens_per_s"] == pytest.approx(
        sum(r["decode_tokens_per_s"] for r in ours["detail"]["rounds"]) / 2)
    assert "| model-gen.pte |" in printed and "| tiny-f32.gguf |" in printed
    # --profile: one decode step of our program, per operator, after the race
    (prof,) = res["profiles"]
    assert prof["kind"] == "decode step" and prof["step_ms"] > 0 and prof["events"]
    assert "model-gen.pte: per-operator profile" in printed


def test_failed_llamacpp_build_is_exit_4_after_our_figures(tiny_race, tmp_path, monkeypatch, capsys):
    out, gguf = tiny_race
    import shutil

    # an empty llama.cpp cache and a PATH without cmake: the peer cannot be built, while our
    # (cached) runner still finds the compiler it fingerprints its build with
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("g++", "gcc", "readelf", "c++", "cc"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    monkeypatch.setenv("POCKETFORMER_LLAMACPP_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PATH", str(bin_dir))
    js = tmp_path / "race.json"
    rc = main(["bench", "--llm", str(out / "model-gen.pte"), "--against", f"llama.cpp:{gguf}",
               "--prompt-tokens", "24", "--new-tokens", "8", "--runs", "1", "--json", str(js)])
    captured = capsys.readouterr()
    assert rc == 4 and "cannot build llama.cpp" in captured.err
    res = json.loads(js.read_text())
    assert len(res["rows"]) == 1 and res["rows"][0]["decode_tokens_per_s"] > 0
    assert "| model-gen.pte |" in captured.out and "llama.cpp: FAILED" in captured.out


def test_a_llamacpp_killed_by_a_signal_races_without_extra_buffers_and_says_so(
        tiny_race, tmp_path, monkeypatch, capsys):
    """llama.cpp's tools dying on SIGSEGV (as its AMX kernel does in some VMs) are rerun with
    their extra buffer types off; the race completes, names the switch in the llama.cpp row and
    prints why under the table."""
    from dataclasses import replace

    out, gguf = tiny_race
    real = llamacpp.build_llamacpp("x86_64")
    fake = replace(real, build_dir=tmp_path,
                   llama_bench=crashes_unless(tmp_path / "llama-bench", real.llama_bench,
                                              "--repack 0"),
                   llama_perplexity=crashes_unless(tmp_path / "llama-perplexity",
                                                   real.llama_perplexity, "--no-repack"))
    monkeypatch.setattr(llamacpp, "build_llamacpp", lambda *a, **k: fake)
    js = tmp_path / "race.json"
    rc = main(["bench", "--llm", str(out / "model-gen.pte"), "--against", f"llama.cpp:{gguf}",
               *ARGS, "--processes", "2", "--json", str(js)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    res = json.loads(js.read_text())
    ours, peer = res["rows"]
    assert res["llamacpp_error"] is None and peer["decode_tokens_per_s"] > 0
    assert peer["engine"].endswith("llama-bench, --repack 0; llama-perplexity --no-repack")
    assert peer["detail"]["fallback"]["args"] == ["--repack", "0"]
    assert peer["detail"]["perplexity"]["fallback"]["args"] == ["--no-repack"]
    # the fallback measures the same weights: perplexity as ours, as in the race above
    assert ours["perplexity"] == pytest.approx(peer["perplexity"], rel=0.01)
    for line in ("llama-bench with its default buffer types was killed by SIGSEGV; rerun with "
                 "--repack 0", "llama-perplexity with its default buffer types was killed by "
                 "SIGSEGV; rerun with --no-repack"):
        assert f"llama.cpp: {line}" in captured.out
    # two rounds: the first crashed once, every later run went straight to the switch
    assert [c.endswith("--repack 0") for c in calls_of(fake.llama_bench)] == [False, True, True]


def test_same_named_programs_keep_their_own_ratios():
    """Two exports' model-8da4w-gen.pte in one race: each row gets its own ratio and folder."""
    from dataclasses import asdict

    from pocketformer.runtime_bench.llm_race import RaceRow, render

    rows = [RaceRow("model-8da4w-gen.pte", "ExecuTorch", "/a/dense/model-8da4w-gen.pte", 105.0,
                    decode_tokens_per_s=150.0, prefill_tokens_per_s=2000.0),
            RaceRow("model-8da4w-gen.pte", "ExecuTorch", "/a/pruned/model-8da4w-gen.pte", 89.0,
                    decode_tokens_per_s=225.0, prefill_tokens_per_s=2500.0),
            RaceRow("x.gguf", "llama.cpp", "/g/x.gguf", 98.0, decode_tokens_per_s=150.0,
                    prefill_tokens_per_s=500.0)]
    ratios = {r.file: {"decode_vs_llamacpp": r.decode_tokens_per_s / 150.0,
                       "prefill_vs_llamacpp": r.prefill_tokens_per_s / 500.0} for r in rows[:2]}
    table = render({"config": {"target": "host", "threads": 2, "prompt_tokens": 128,
                               "new_tokens": 32, "ctx": 128, "chunks": 4, "data": None},
                    "rows": [asdict(r) for r in rows], "ratios": ratios, "llamacpp_error": None})
    assert "| dense/model-8da4w-gen.pte |" in table and "| pruned/model-8da4w-gen.pte |" in table
    assert "| 1.000 | 4.000 |" in table and "| 1.500 | 5.000 |" in table


def test_rounds_alternate_the_engines_and_pool_by_median(monkeypatch, tmp_path):
    """--processes N with --llm: every engine once per round, llama.cpp first in odd rounds, the
    row's speeds the medians over rounds and the ratio the median of the per-round ratios (a
    slow spell of the shared machine in one round then moves both sides of that round's ratio)."""
    from pocketformer.runtime_bench import llm_race
    from pocketformer.errors import BadInputError
    from pocketformer.runtime_bench.llm_race import RaceConfig, RaceRow

    art = tmp_path / "model-gen.pte"
    art.write_bytes(b"x")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    order, speed = [], {"ours": iter([200.0, 100.0, 150.0]), "peer": iter([100.0, 40.0, 120.0])}
    monkeypatch.setattr(llm_race, "_check_generation", lambda a: {"source": "x"})

    def ours(artifact, side, cfg):
        order.append("ours")
        return RaceRow("model-gen.pte", "ExecuTorch", str(artifact), 1.0,
                       decode_tokens_per_s=next(speed["ours"]), prefill_tokens_per_s=1.0, ttft_ms=1.0)

    def peer(g, cfg, text_file):
        order.append("peer")
        return RaceRow("m.gguf", "llama.cpp", str(g), 1.0, decode_tokens_per_s=next(speed["peer"]),
                       prefill_tokens_per_s=1.0, ttft_ms=1.0)

    monkeypatch.setattr(llm_race, "_ours_host", ours)
    monkeypatch.setattr(llm_race, "_llamacpp", peer)
    res = llm_race.race([art], RaceConfig(rounds=3), against=f"llama.cpp:{gguf}")
    assert order == ["ours", "peer", "peer", "ours", "ours", "peer"]
    q = res["ratios"][str(art)]
    assert q["decode_vs_llamacpp_rounds"] == [2.0, 2.5, 1.25]
    assert q["decode_vs_llamacpp"] == 2.0               # the ratio of the medians would be 1.5
    assert [r["decode_tokens_per_s"] for r in res["rows"]] == [150.0, 100.0]
    with pytest.raises(Exception, match="rounds"):
        RaceConfig(target="qemu:cortex-a76", rounds=2).validate()
    with pytest.raises(BadInputError, match="host only") as e:   # not silently dropped
        RaceConfig(target="qemu:cortex-a76", data="x.txt").validate()
    assert e.value.field == "data"
