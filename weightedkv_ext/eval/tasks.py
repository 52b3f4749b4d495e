"""Synthetic long-context retrieval prompts (passkey, needle in a haystack) and their scoring.

Everything is generated from a seed; nothing is downloaded. A prompt is built at the token level so
that it holds exactly ``length`` tokens::

    [special tokens] instruction | haystack[:k] | needle | haystack[k:] | question

The haystack is made of whole sentences (each tokenised on its own, with a leading space) cut to
the number of tokens left. The needle goes at the sentence boundary nearest to ``depth`` percent
of the haystack tokens (depth 0: right after the instruction; depth 100: right before the
question), so a needle never splits a sentence.

* ``passkey`` (LongLoRA, Mohtashami & Jaggi 2023): repeated neutral filler sentences, the needle
  "The pass key is NNNNN. Remember it. NNNNN is the pass key.", the question "What is the pass
  key? The pass key is".
* ``niah`` (RULER, Hsieh et al. 2024, "niah_single"/"niah_multikey"): sentences of real text, the
  needle "One of the special magic numbers for KEY is: VALUE." (7-digit value) and, with
  ``distractors > 0``, that many more needles with other keys at random depths.

Scoring (:func:`exact_match`): the first run of digits in the greedy continuation must equal the
answer exactly.
"""
from __future__ import annotations

import math
import random
import re
from bisect import bisect_left
from dataclasses import dataclass
from typing import Sequence

TASKS = ("ppl", "passkey", "niah", "kl")
RETRIEVAL_TASKS = ("passkey", "niah")

PASSKEY_INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it "
                       "and memorize them. I will quiz you about the important information there.")
PASSKEY_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again.")
PASSKEY_NEEDLE = "The pass key is {value}. Remember it. {value} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to "
                    "memorize it. I will quiz you about the numbers afterwards.")
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = ("What is the special magic number for {key} mentioned in the provided text? "
                 "The special magic number for {key} mentioned in the provided text is")
_ADJECTIVES = ("ancient", "bitter", "calm", "daring", "eager", "faint", "gentle", "hollow", "icy",
               "jolly", "keen", "lively", "misty", "noble", "odd", "proud", "quiet", "rapid",
               "silent", "tidy", "vast", "wild", "young", "zealous")
_NOUNS = ("anchor", "badger", "candle", "desert", "engine", "falcon", "garden", "harbor", "island",
          "jacket", "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river",
          "saddle", "tunnel", "valley", "walnut", "yard", "zephyr")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_DIGITS = re.compile(r"\d+")


class TaskError(ValueError):
    """A task argument that cannot be used; the message names the argument and the value."""


@dataclass(frozen=True)
class Sample:
    ids: tuple[int, ...]  # the prompt, exactly ``length`` tokens
    answer: str  # the digits the model must produce
    needle: tuple[int, int]  # token span [start, end) of the queried needle in ``ids``
    depth: float  # requested depth, percent
    haystack: tuple[int, int]  # token span [start, end) of the haystack (needles included)


def sample_key(depth: float, index: int) -> str:
    """The key of prompt ``index`` at ``depth`` percent in a retrieval cell's results: "10/3"."""
    return f"{depth:g}/{index}"


def split_sample_key(key: str) -> tuple[float, int]:
    """(depth, index) of a :func:`sample_key`."""
    depth, index = key.split("/")
    return float(depth), int(index)


def exact_match(continuation: str, answer: str) -> bool:
    """True when the first run of digits in ``continuation`` is exactly ``answer``."""
    m = _DIGITS.search(continuation)
    return m is not None and m.group() == answer


def wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (``(0, 1)`` when ``n == 0``)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact bounds, not 1 - 1e-16
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (split after . ! ? and at blank lines), whitespace normalised."""
    out = []
    for s in _SENTENCE_END.split(text):
        s = " ".join(s.split())
        if s:
            out.append(s)
    return out


def check_depths(depths: Sequence[float]) -> None:
    bad = [d for d in depths if not 0 <= d <= 100]
    if bad:
        raise TaskError(f"argument --depths: a depth is a percentage of the context in 0..100, "
                        f"got {bad[0]!r}")


def _rng(*parts) -> random.Random:
    # str seeds are hashed with SHA-512 by random.Random: stable across runs and Python versions.
    return random.Random("/".join(map(str, parts)))


class _Generator:
    """Shared prompt assembly; subclasses choose the haystack sentences and the needles."""

    name = ""
    instruction = ""
    answer_digits = 0

    def __init__(self, tokenizer, seed: int = 0):
        self.tok = tokenizer
        self.seed = seed
        self._cache: dict[str, list[int]] = {}
        head = tokenizer("", add_special_tokens=True)["input_ids"]
        self.special = list(head)  # e.g. [bos] for Llama tokenizers, [] for GPT-2-style ones
        self.head = self.special + self.encode(self.instruction)

    def encode(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
            self._cache[text] = ids
        return ids

    @property
    def max_new_tokens(self) -> int:
        """Tokens to generate: the answer's tokens (with its leading space) plus one."""
        return len(self.encode(" " + "9" * self.answer_digits)) + 1

    def sentences(self, rng: random.Random):
        """An endless iterator of haystack sentences (strings)."""
        raise NotImplementedError

    def needles(self, rng: random.Random) -> tuple[str, str, str, list[str]]:
        """(needle, answer, question, distractor needles)."""
        raise NotImplementedError

    def min_length(self) -> int:
        """Shortest length that leaves room for one haystack token (answer-independent bound)."""
        rng = _rng(self.name, self.seed, "min")
        needle, _, question, distract = self.needles(rng)
        fixed = len(self.head) + len(self.encode(" " + needle)) + len(self.encode("\n" + question))
        return fixed + sum(len(self.encode(" " + d)) for d in distract) + 1

    def sample(self, length: int, depth: float, index: int) -> Sample:
        """Sample ``index`` of the cell (length, depth): same inputs, same prompt."""
        check_depths([depth])
        rng = _rng(self.name, self.seed, length, depth, index)
        needle, answer, question, distract = self.needles(rng)
        needle_ids = self.encode(" " + needle)
        question_ids = self.encode("\n" + question)
        distract_ids = [self.encode(" " + d) for d in distract]
        n_hay = (length - len(self.head) - len(needle_ids) - len(question_ids)
                 - sum(map(len, distract_ids)))
        if n_hay < 1:
            raise TaskError(f"argument --lengths: {self.name} needs more than "
                            f"{length - n_hay} tokens for its instruction, needle(s) and question, "
                            f"got length {length}; pass a larger length")
        hay, bounds = [], [0]
        for s in self.sentences(rng):
            hay += self.encode(" " + s)
            if len(hay) >= n_hay:
                break
            bounds.append(len(hay))
        hay = hay[:n_hay]
        bounds.append(n_hay)
        target = depth / 100 * n_hay
        i = bisect_left(bounds, target)
        k = min(bounds[max(i - 1, 0):i + 1], key=lambda b: (abs(b - target), b))
        inserts = [(k, 0, needle_ids)]
        for j, d in enumerate(distract_ids):
            inserts.append((rng.choice(bounds), j + 1, d))
        inserts.sort(key=lambda t: (t[0], t[1]))
        ids, at, start = list(self.head), 0, None
        for pos, j, piece in inserts:
            ids += hay[at:pos]
            at = pos
            if j == 0:
                start = len(ids)
            ids += piece
        ids += hay[at:]
        hay_end = len(ids)
        ids += question_ids
        assert len(ids) == length, (len(ids), length)
        return Sample(tuple(ids), answer, (start, start + len(needle_ids)), float(depth),
                      (len(self.head), hay_end))


class PasskeyTask(_Generator):
    name = "passkey"
    instruction = PASSKEY_INSTRUCTION
    answer_digits = 5

    def sentences(self, rng):
        while True:
            yield from PASSKEY_FILLER

    def needles(self, rng):
        value = str(rng.randint(10000, 99999))
        return PASSKEY_NEEDLE.format(value=value), value, PASSKEY_QUESTION, []


class NiahTask(_Generator):
    """RULER-style needles in real text; the haystack starts at a random sentence (wrapping)."""

    name = "niah"
    instruction = NIAH_INSTRUCTION
    answer_digits = 7

    def __init__(self, tokenizer, text: str, distractors: int = 0, seed: int = 0):
        if distractors < 0:
            raise TaskError(f"argument --distractors: must be >= 0, got {distractors}")
        self.distractors = distractors
        if distractors:
            self.name = f"niah_mk{distractors + 1}"
        self.text_sentences = split_sentences(text)
        if not self.text_sentences:
            raise TaskError("argument --data: the niah haystack text holds no sentence")
        super().__init__(tokenizer, seed)

    def sentences(self, rng):
        n = len(self.text_sentences)
        i = rng.randrange(n)
        while True:
            yield self.text_sentences[i % n]
            i += 1

    def needles(self, rng):
        keys = rng.sample([f"{a}-{b}" for a in _ADJECTIVES for b in _NOUNS], self.distractors + 1)
        values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
        needle = NIAH_NEEDLE.format(key=keys[0], value=values[0])
        distract = [NIAH_NEEDLE.format(key=k, value=v) for k, v in zip(keys[1:], values[1:])]
        return needle, values[0], NIAH_QUESTION.format(key=keys[0]), distract
