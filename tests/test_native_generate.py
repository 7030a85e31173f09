"""Generation inside the native runners (`--generate`): the C++ runners drive a `-gen` step
program themselves (prefill, then one-token greedy decode steps with the KV cache kept in the
ExecuTorch program's buffers or, for ONNX Runtime, carried in swapped past/present buffers).
Real runtimes, no mocks: tokens are checked against eager `transformers` generation and against
the Python generation loop on the same file, on the host and under QEMU (aarch64)."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from pocketformer.errors import BadInputError, RuntimeFailure
from pocketformer.runtime_bench import native, qemu

MAX_LEN = 48
RUNTIME_OF = {"onnx": "onnxruntime", "pte": "executorch"}
GEN_FIELDS = {"prompt_tokens", "new_tokens", "ttft_ms", "decode_ms", "prefill_tokens_per_s",
              "decode_tokens_per_s", "tokens"}


@pytest.fixture(scope="module")
def gen_exports(tiny_llama, tmp_path_factory):
    """The tiny llama cut to 2 layers (export time) with larger random weights (at the default
    init scale greedy decoding repeats one token, which would not show a wrong cache), exported
    as fp32 (model[-gen].pte/.onnx), and cut to its first layer as 8da4w (model-8da4w[-gen].pte,
    checked against the Python loop on the same file: one layer is enough there)."""
    import copy

    from pocketformer.export import ExportConfig
    from pocketformer.export.exporters import _stem, export_generation
    from pocketformer.models import load_model

    loaded = load_model(tiny_llama)
    loaded.adapter.keep_layers(loaded.model, [0, 1])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    out = tmp_path_factory.mktemp("native_gen")
    fast = dict(seq_len=16, max_len=MAX_LEN, greedy_tokens=8, etrecord=False)
    # only the -gen programs (the forward programs are not used here)
    one = copy.deepcopy(loaded)
    one.adapter.keep_layers(one.model, [0])
    for sub, model, cfg in (("fp32", loaded, ExportConfig(**fast)),
                            ("q4", one, ExportConfig(quantize="8da4w", formats=["pte"], **fast))):
        (out / sub).mkdir()
        for fmt in cfg.formats:
            export_generation(model, out / sub, fmt, cfg, stem=_stem("model", cfg), extra={})
    return loaded, out


@pytest.fixture(scope="module")
def runners() -> dict:
    pairs = [("executorch", "x86_64"), ("onnxruntime", "x86_64"), ("executorch", "aarch64"),
             ("onnxruntime", "aarch64")]
    missing = {t: p for arch in ("x86_64", "aarch64")
               for t, p in native.missing_tools(arch, for_running=True).items()}
    assert not missing, (f"toolchain missing: {sorted(missing)}; run `apt-get install "
                         f"{' '.join(sorted(set(missing.values())))}` (scripts/setup.sh does this)")
    return {pair: native.build_runner(*pair) for pair in pairs}


def _prompt(vocab: int, n: int = 10) -> list[int]:
    return np.random.default_rng(5).integers(3, vocab, n).tolist()


def _check_shape_of_result(res: dict, *, prompt_tokens: int, new_tokens: int, runs: int, vocab: int):
    g = res["generation"]
    assert GEN_FIELDS <= set(g), GEN_FIELDS - set(g)
    assert g["prompt_tokens"] == prompt_tokens == len(g["prompt"]) and g["new_tokens"] == new_tokens
    assert len(g["ttft_ms"]) == runs and len(g["decode_ms"]) == runs * (new_tokens - 1)
    assert len(g["tokens"]) == new_tokens and g["vocab"] == vocab and g["max_len"] == MAX_LEN
    assert all(x > 0 for x in g["ttft_ms"] + g["decode_ms"])
    assert g["prefill_tokens_per_s"] == pytest.approx(prompt_tokens / np.median(g["ttft_ms"]) * 1e3, rel=1e-6)
    assert g["decode_tokens_per_s"] == pytest.approx(1e3 / np.median(g["decode_ms"]), rel=1e-6)
    assert res["latencies_ms"] == g["decode_ms"] and res["runs"] == runs
    assert res["load_ms"] > 0 and res["peak_rss_mb"] >= res["rss_before_load_mb"] > 0
    assert res["outputs"][0]["shape"] == [1, 1, vocab] and res["outputs"][0]["dtype"] == "float32"


@pytest.mark.parametrize("fmt", ["pte", "onnx"])
def test_native_greedy_tokens_match_eager(fmt, gen_exports, runners):
    from pocketformer.models.generation import greedy_eager

    loaded, out = gen_exports
    vocab = loaded.model.config.vocab_size
    prompt, n = _prompt(vocab), 12
    expected, _ = greedy_eager(loaded.model, prompt, n)
    assert len(set(expected)) > 3, expected       # a varied sequence: the cache matters
    res = native.run_native_generate(runners[(RUNTIME_OF[fmt], "x86_64")], out / "fp32" / f"model-gen.{fmt}",
                                     prompt=prompt, new_tokens=n, warmup=1, runs=2, threads=1, timeout=300)
    _check_shape_of_result(res, prompt_tokens=len(prompt), new_tokens=n, runs=2, vocab=vocab)
    g = res["generation"]
    assert g["prompt"] == prompt and g["prompt_source"] != "seed"
    assert g["tokens"] == expected, (fmt, g["tokens"], expected)
    assert res["runner"] == f"{RUNTIME_OF[fmt]}-native" and res["arch"] == "x86_64"


def test_native_8da4w_matches_python_loop_on_the_same_file(gen_exports, runners):
    """The seeded default prompt (ids in [3, vocab) from --seed, found by an untimed probe),
    two threads; the Python EtGenerator greedy loop on the same prompt and file agrees."""
    from pocketformer.export.runtimes import open_generator
    from pocketformer.models.generation import greedy_loop

    loaded, out = gen_exports
    vocab = loaded.model.config.vocab_size
    model = out / "q4" / "model-8da4w-gen.pte"
    bundle = runners[("executorch", "x86_64")]
    res = native.run_native_generate(bundle, model, prompt_tokens=16, new_tokens=10, seed=3,
                                     warmup=1, runs=3, threads=2, timeout=300)
    _check_shape_of_result(res, prompt_tokens=16, new_tokens=10, runs=3, vocab=vocab)
    g = res["generation"]
    assert g["prompt_source"] == "seed" and all(3 <= t < vocab for t in g["prompt"])
    assert res["threads_effective"] == 2
    expected, _ = greedy_loop(open_generator(model), g["prompt"], 10, MAX_LEN)
    assert g["tokens"] == expected
    again = native.run_native_generate(bundle, model, prompt_tokens=16, new_tokens=2, seed=3,
                                       warmup=0, runs=1, threads=1)
    other = native.run_native_generate(bundle, model, prompt_tokens=16, new_tokens=2, seed=4,
                                       warmup=0, runs=1, threads=1)
    assert again["generation"]["prompt"] == g["prompt"] != other["generation"]["prompt"]
    assert again["generation"]["tokens"] == expected[:2] and again["generation"]["decode_ms"] != []


@pytest.mark.parametrize("fmt", ["pte", "onnx"])
def test_aarch64_runner_under_qemu_gives_the_same_tokens(fmt, gen_exports, runners, tmp_path):
    from pocketformer.models.generation import greedy_eager

    loaded, out = gen_exports
    prompt, n = _prompt(loaded.model.config.vocab_size), 6
    expected, _ = greedy_eager(loaded.model, prompt, n)
    prefix = qemu.qemu_prefix("neoverse-n1", workdir=tmp_path, fake_cpuinfo_file=True)
    res = native.run_native_generate(runners[(RUNTIME_OF[fmt], "aarch64")], out / "fp32" / f"model-gen.{fmt}",
                                     prompt=prompt, new_tokens=n, warmup=0, runs=1, threads=1,
                                     prefix=prefix, timeout=600)
    assert res["arch"] == "aarch64" and res["runner_arch"] == "aarch64"
    assert res["generation"]["tokens"] == expected
    assert len(res["generation"]["decode_ms"]) == n - 1


def _forward_program(tmp_path, fmt: str):
    """A plain forward program (int64 ids -> float logits, no cache inputs)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    model = torch.nn.Sequential(torch.nn.Embedding(32, 8), torch.nn.Linear(8, 32)).eval()
    ids = torch.zeros(1, 4, dtype=torch.long)
    path = tmp_path / f"forward.{fmt}"
    if fmt == "onnx":
        torch.onnx.export(model, (ids,), str(path), dynamo=True)
    else:
        ep = torch.export.export(model, (ids,))
        path.write_bytes(to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
                         .to_executorch().buffer)
    return path


def test_generate_bad_input_exits_2(gen_exports, runners, tmp_path):
    loaded, out = gen_exports
    for fmt in ("pte", "onnx"):
        bundle = runners[(RUNTIME_OF[fmt], "x86_64")]
        model = out / "fp32" / f"model-gen.{fmt}"
        base = [str(bundle.binary), "--model", str(model), "--json", str(tmp_path / "o.json"),
                "--warmup", "0", "--runs", "1"]
        # prompt + new tokens beyond the cache: refused by the runner and by the wrapper (sidecar)
        r = subprocess.run(base + ["--generate", f"40,{MAX_LEN - 39}"], capture_output=True, text=True)
        assert r.returncode == 2 and "KV cache" in r.stderr, (fmt, r.returncode, r.stderr)
        with pytest.raises(BadInputError):
            native.run_native_generate(bundle, model, prompt_tokens=40, new_tokens=9, warmup=0,
                                       runs=1, threads=1)
        short = tmp_path / "short.i64"
        short.write_bytes(b"\0" * 12)
        r = subprocess.run(base + ["--generate", "4,2", "--prompt-ids", str(short)], capture_output=True, text=True)
        assert r.returncode == 2 and str(short) in r.stderr, (fmt, r.stderr)
        big = tmp_path / "big.i64"
        big.write_bytes(np.asarray([1, 2, 10 ** 6], dtype="<i8").tobytes())
        r = subprocess.run(base + ["--generate", "3,2", "--prompt-ids", str(big)], capture_output=True, text=True)
        assert r.returncode == 2 and "vocabulary" in r.stderr, (fmt, r.stderr)
        r = subprocess.run(base + ["--generate", "3"], capture_output=True, text=True)
        assert r.returncode == 2 and "--generate" in r.stderr
        # a forward (non -gen) program is refused with exit 2
        with pytest.raises(RuntimeFailure) as e:
            native.run_native_generate(bundle, _forward_program(tmp_path, fmt), prompt_tokens=4,
                                       new_tokens=2, warmup=0, runs=1, threads=1)
        assert e.value.returncode == 2 and "-gen" in e.value.stderr
