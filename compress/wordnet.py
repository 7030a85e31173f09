"""A small reader for the WordNet 3.0 database files (Debian's `wordnet-base`), enough for SEE:
the senses of a word, each sense's lexicographer file (its coarse semantic field) and its
hypernym ancestors. Reads the plain-text index.* and data.* files directly; no downloads."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pocketformer.errors import BadInputError

POS = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
SEARCH_PATHS = ("/usr/share/wordnet", "/usr/local/share/wordnet", "/usr/share/wordnet-3.0/dict")


@dataclass(frozen=True)
class Synset:
    key: str                 # "<pos>:<offset>"
    lexfile: int             # lexicographer file number (0..44): noun.animal, verb.motion, ...
    hypernyms: tuple[str, ...]


def find_dict() -> Path:
    env = os.environ.get("WORDNET_DIR")
    for candidate in ([env] if env else []) + list(SEARCH_PATHS):
        if candidate and (Path(candidate) / "index.noun").is_file():
            return Path(candidate)
    raise BadInputError("WordNet 3.0 database not found (looked in $WORDNET_DIR and "
                        f"{', '.join(SEARCH_PATHS)}); install it with "
                        "`apt-get install wordnet-base` (scripts/setup.sh does)", field="inventory")


# WordNet's "morphy" detachment rules (wndb(5WN) / morphy(7WN)): inflected form -> base form.
_SUFFIXES = {
    "n": [("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
          ("men", "man"), ("ies", "y")],
    "v": [("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"),
          ("ing", "")],
    "a": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")],
}


class WordNet:
    def __init__(self, root: Path | None = None):
        self.root = root or find_dict()
        self.index: dict[str, list[str]] = {}
        self.synsets: dict[str, Synset] = {}
        self.exceptions: dict[str, list[str]] = {}
        for pos, name in POS.items():
            self._read_index(self.root / f"index.{name}", pos)
            self._read_data(self.root / f"data.{name}", pos)
            exc = self.root / f"{name}.exc"
            if exc.is_file():
                for line in exc.read_text(encoding="latin-1").splitlines():
                    parts = line.split()
                    if len(parts) >= 2:
                        self.exceptions.setdefault(parts[0], []).extend(parts[1:])

    def base_forms(self, word: str) -> list[str]:
        """The word itself if WordNet lists it, else its base forms by exception list and
        detachment rules (e.g. "banks" -> "bank", "ran" -> "run")."""
        word = word.lower()
        forms = [word] if word in self.index else []
        forms += [b for b in self.exceptions.get(word, []) if b in self.index]
        for rules in _SUFFIXES.values():
            for suffix, repl in rules:
                if word.endswith(suffix) and len(word) > len(suffix) + 1:
                    base = word[: -len(suffix)] + repl
                    if base in self.index:
                        forms.append(base)
        return list(dict.fromkeys(forms))

    def _read_index(self, path: Path, pos: str) -> None:
        with open(path, encoding="latin-1") as f:
            for line in f:
                if line.startswith(" "):
                    continue   # licence header
                parts = line.split()
                lemma, synset_cnt, p_cnt = parts[0], int(parts[2]), int(parts[3])
                offsets = parts[4 + p_cnt + 2:]
                self.index.setdefault(lemma, []).extend(f"{pos}:{o}" for o in offsets[:synset_cnt])

    def _read_data(self, path: Path, pos: str) -> None:
        with open(path, encoding="latin-1") as f:
            for line in f:
                if line.startswith(" "):
                    continue
                parts = line.split(" | ")[0].split()
                offset, lexfile = parts[0], int(parts[1])
                w_cnt = int(parts[3], 16)
                i = 4 + 2 * w_cnt
                p_cnt = int(parts[i])
                hyper = []
                for k in range(p_cnt):
                    sym, target, tpos = parts[i + 1 + 4 * k], parts[i + 2 + 4 * k], parts[i + 3 + 4 * k]
                    if sym in ("@", "@i"):
                        hyper.append(f"{'a' if tpos == 's' else tpos}:{target}")
                key = f"{pos}:{offset}"
                self.synsets[key] = Synset(key, lexfile, tuple(hyper))

    def senses(self, word: str) -> list[Synset]:
        """Senses of a word or of its base forms (WordNet's order: most frequent first)."""
        keys: list[str] = []
        for form in self.base_forms(word):
            keys += [k for k in self.index[form] if k not in keys]
        return [self.synsets[k] for k in keys if k in self.synsets]

    @lru_cache(maxsize=None)
    def ancestors(self, key: str) -> tuple[str, ...]:
        """The synset and its hypernyms up to a root along the first hypernym at each step."""
        chain = [key]
        seen = {key}
        while True:
            hyper = self.synsets[chain[-1]].hypernyms if chain[-1] in self.synsets else ()
            if not hyper or hyper[0] in seen:
                break
            chain.append(hyper[0])
            seen.add(hyper[0])
        return tuple(chain)


def load(root: Path | None = None) -> WordNet:
    """The database at `root` (default: find_dict(), looked up on every call), parsed once per
    process and directory: SEE plans units for every model it compresses from the same
    read-only files (~2-3 s to parse)."""
    return _parsed(Path(root) if root else find_dict())


@lru_cache(maxsize=4)
def _parsed(root: Path) -> WordNet:
    return WordNet(root)
