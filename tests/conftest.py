"""Shared fixtures: tiny random-weight models of each family (fast structural tests) and the
paths of the real data in ../shared/data (quality tests on the real pre-trained models)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("POCKETFORMER_NO_PROGRESS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on the machine's 2 cores: one intra-op thread each, so
    # OpenMP does not spin four threads on two cores (tests that name a thread count, such as
    # the benches' --threads 2, still get it)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
WIKITEXT = SHARED / "wikitext-2" / "valid.txt"
STS_DEV = SHARED / "stsbenchmark" / "sts-dev.csv"


# The files in the order `make test` hands them to its two workers, longest first (each file's
# wall time on its worker, scripts/suite_timeline.py): a long file that starts last would leave the
# other worker idle at the end (pytest-xdist's own order is by test count). Files not listed
# follow in collection order.
LONGEST_FIRST = ["test_see_tiny.py", "test_see_real.py", "test_layered_prune_real.py",
                 "test_export_tiny.py", "test_gptq.py", "test_minilm_build.py", "test_rotate.py",
                 "test_smollm2.py", "test_android_demo.py", "test_grid.py", "test_see_tier_real.py",
                 "test_native_generate.py", "test_native_runners.py", "test_bench_targets.py",
                 "test_combined_recipe.py", "test_see_metric_real.py", "test_layered_prune_tiny.py",
                 "test_llm_race.py", "test_xnnpack_passes.py", "test_export_real.py"]


def _timeline(event: str, nodeid: str) -> None:
    """PF_TEST_TIMELINE=FILE: one line per test start/finish (worker, event, time, test), to see
    how the two workers' files line up (scripts/suite_timeline.py)."""
    path = os.environ.get("PF_TEST_TIMELINE")
    if path:
        import time
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}\t{event}\t{time.time():.3f}\t{nodeid}\n")


def pytest_runtest_setup(item):          # runs where the test runs (not in xdist's controller)
    _timeline("start", item.nodeid)


def pytest_runtest_teardown(item, nextitem):
    _timeline("finish", item.nodeid)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))   # stable


def crashes_unless(path: Path, real: Path, needed: str) -> Path:
    """A stand-in for a llama.cpp tool that dies on a real SIGSEGV, as ggml's AMX kernel does in
    some virtual machines, unless it is given `needed`; then it runs the real tool. It logs its
    arguments, one call per line."""
    path.write_text(f"""#!/bin/bash
echo "$*" >> "{path}.calls"
case " $* " in *" {needed} "*) exec "{real}" "$@";; esac
ulimit -c 0
kill -SEGV $$
""")
    path.chmod(0o755)
    return path


def calls_of(stand_in: Path) -> list[str]:
    """The arguments each call of a `crashes_unless` stand-in was given, in order."""
    return Path(f"{stand_in}.calls").read_text().splitlines()


def built_once(name: str, tmp_path_factory, build) -> Path:
    """A folder `build(folder)` fills, made once for the whole suite where scripts/run_tests.sh
    names a PF_TEST_CACHE folder for its two pytest runs (the parallel workers and the serial
    run then share it, under a lock; the builder writes to a temporary name, renamed when
    done), else once per process. For deterministic artifacts that both runs need."""
    import fcntl
    import shutil

    root = os.environ.get("PF_TEST_CACHE")
    if not root:
        out = tmp_path_factory.mktemp(name)
        build(out)
        return out
    done = Path(root) / name
    with open(Path(root) / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_dir():
            part = Path(root) / f"{name}.part"
            shutil.rmtree(part, ignore_errors=True)
            part.mkdir()
            build(part)
            part.rename(done)
    return done


@pytest.fixture(scope="session")
def dense_minilm_sts(tmp_path_factory) -> float:
    """The real MiniLM's STS Spearman on STS-B dev pairs 751-1500 (the held-out half every
    real-MiniLM quality test scores on): computed once for the suite (built_once), since it is
    the same number in every file that compares with it."""
    import json

    def build(out: Path) -> None:
        from pocketformer.data import DataSpec, load_for
        from pocketformer.evaluation import evaluate
        from pocketformer.models import load_model

        value = evaluate(load_model("minilm"), "sts", load_for("pairs", DataSpec.parse(f"{STS_DEV}@0.5:1"))).value
        (out / "value.json").write_text(json.dumps(value))

    return json.loads((built_once("dense_minilm_sts", tmp_path_factory, build) / "value.json").read_text())


@pytest.fixture(scope="session")
def shared_data() -> dict[str, Path]:
    missing = [p for p in (WIKITEXT, STS_DEV) if not p.is_file()]
    assert not missing, f"shared data missing (expected beside the repo): {missing}"
    return {"wikitext": WIKITEXT, "sts": STS_DEV}


@pytest.fixture(scope="session")
def small_text(tmp_path_factory) -> Path:
    """~40 KB of WikiText for tiny-model calibration."""
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(WIKITEXT.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


def _byte_bpe_tokenizer(text_file: Path, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(text_file)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _save_causal(tmp_path_factory, small_text, model_type: str, layers: int = 6) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp(f"tiny_{model_type}_{layers}")
    tok = _byte_bpe_tokenizer(small_text)
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=layers,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, small_text) -> Path:
    return _save_causal(tmp_path_factory, small_text, "llama")


@pytest.fixture(scope="session")
def tiny_llama_2l(tmp_path_factory, small_text) -> Path:
    """tiny_llama with two layers: for tests whose time is ExecuTorch lowering, which grows with
    the number of linears."""
    return _save_causal(tmp_path_factory, small_text, "llama", layers=2)


@pytest.fixture(scope="session")
def tiny_llama_1l(tmp_path_factory, small_text) -> Path:
    """tiny_llama with one layer: for tests of one program's lowering (a generation program, a
    gate), where a second layer repeats the same graph and only adds lowering time."""
    return _save_causal(tmp_path_factory, small_text, "llama", layers=1)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, small_text) -> Path:
    return _save_causal(tmp_path_factory, small_text, "qwen2")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pocketformer.models import builtin_path

    out = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(builtin_path("minilm"))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=4,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert_small_vocab(tmp_path_factory) -> Path:
    """tiny_bert with the first 6,000 entries of all-MiniLM-L6-v2's WordPiece vocabulary (its
    special tokens, characters and ~4,000 most frequent words): for SEE tests that exercise the
    training and the module, not the unit plan of a full vocabulary, whose clustering of 30,522
    rows is most of such a test's time."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from pocketformer.models import builtin_path

    out = tmp_path_factory.mktemp("tiny_bert_small_vocab")
    words = (builtin_path("minilm") / "vocab.txt").read_text(encoding="utf-8").splitlines()[:6000]
    (out / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    # the vocabulary as a dict: transformers 5's BertTokenizer takes `vocab`, and an unknown
    # `vocab_file` keyword left it with the 5 special tokens only
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    assert len(tok) == len(words)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=4,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_vit_config(tmp_path_factory) -> Path:
    from transformers import ViTConfig

    out = tmp_path_factory.mktemp("tiny_vit")
    ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=4,
              num_attention_heads=4, intermediate_size=64, num_labels=10).save_pretrained(out)
    return out / "config.json"


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory) -> Path:
    """scikit-learn's 8x8 digits, as raw images + labels."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    out = tmp_path_factory.mktemp("digits") / "digits.npz"
    np.savez(out, images=(d.images / 16.0).astype("float32"), labels=d.target)
    return out
