from __future__ import annotations

import pytest

from pocketformer.data import DataSpec, detokenize_wikitext, load_for, load_pairs, load_text
from pocketformer.errors import BadInputError

from conftest import STS_DEV, WIKITEXT


def test_slices_are_disjoint_and_cover_the_file():
    a = load_pairs(DataSpec.parse(f"{STS_DEV}@0:0.5"))
    b = load_pairs(DataSpec.parse(f"{STS_DEV}@0.5:1"))
    full = load_pairs(DataSpec.parse(STS_DEV))
    assert len(a.first) + len(b.first) == len(full.first) == 1500
    assert a.first == full.first[:750] and b.first == full.first[750:]
    assert 0 <= full.scores.min() and full.scores.max() <= 5


def test_wikitext_detokenizer():
    raw = " = Valkyria = \n The game @-@ play costs $ 1 @,@ 000 @.@ 5 , and it 's \" fine \" . \n"
    assert detokenize_wikitext(raw) == "# Valkyria\nThe game-play costs $1,000.5, and it's \"fine\".\n"
    text = load_text(DataSpec.parse(f"{WIKITEXT}@0:0.1")).text
    assert " @-@ " not in text and " @,@ " not in text


def test_bad_pairs_file_and_bad_slice(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\tc\td\tnot-a-number\ts1\ts2\n")
    with pytest.raises(BadInputError, match="line 1: score"):
        load_pairs(DataSpec.parse(bad))
    with pytest.raises(BadInputError, match="start < end"):
        DataSpec.parse(f"{STS_DEV}@0.7:0.2")
    # A plain-text file given to an encoder is read as unscored sentences.
    sents = load_for("pairs", DataSpec.parse(f"{WIKITEXT}@0:0.01"))
    assert len(sents.sentences()) > 10
