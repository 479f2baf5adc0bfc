"""The synthetic reasoning tasks themselves (issue 28): how a document of each task is
drawn, and how its queries are answered from its words alone. `loopedlm.data.synthetic`
writes them as a data set; the module docstring there describes the tasks."""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass

from loopedlm.common.validation import check, is_int

PAD = "."
MAX_TRIES = 1000  # resampling an unanswerable query


def check_fits(seq_len: int, needed: int, documents: str) -> None:
    """A document of `seq_len` words must hold the `needed` ones of its smallest content."""
    if seq_len < needed:
        raise ValueError(f"seq_len={seq_len} is too short for {documents}: at least {needed} "
                         f"words")


def draw_hops(rng: random.Random, max_hops: int, query_hops: int | None,
              weights: Sequence[float] | None, limit: int, documents: str) -> int:
    """A document's hop count: `query_hops`, or drawn from 1..max_hops (`weights`: their
    odds; default uniform); at most `limit`."""
    hops = query_hops if query_hops is not None else \
        rng.choices(range(1, max_hops + 1), weights=weights)[0]
    if hops > limit:
        raise ValueError(f"{documents} have at most {limit} hops, not {hops}")
    return hops


@dataclass(frozen=True)
class Query:
    """One answer in a document: `index` is the answer word's index in the document's words
    (the model predicts it from the word before), `hops` the lookups it takes, `guess` the
    chance of getting it right without doing them."""

    index: int
    answer: str
    hops: int
    guess: float


# ---- variable chains -------------------------------------------------------------------
@dataclass(frozen=True)
class ChainTask:
    """Variable chains (module docstring). A document holds ten root variables `r = d`,
    one per digit (twenty, two per digit, in documents of at most 2 hops: twice the 1-hop
    lookups); every query's leaf hangs below a root drawn uniformly at random, at exactly
    its hop count: a root itself is 1 hop away from its digit, and a leaf of h >= 2 hops
    ends a new path grown from a node of that root's tree (the root, or an inner node of
    an earlier path) of depth < h. Queried variables are leaves (or roots, whose digit the
    program states anyway): no answer in the document shortens another's lookup. The
    root of each query is drawn afresh, so the digits in view and the answers already
    given say nothing about the next one (`guess` = 1/10), except for 1-hop queries, which
    ask each root at most once (their `guess` counts the roots not asked yet)."""

    n_vars: int = 64

    name = "chain"
    DIGITS = 10
    EASY_HOPS = 2  # documents of at most this many hops have two roots per digit

    def validate(self) -> None:
        check(is_int(self.n_vars) and self.n_vars >= 2 * self.DIGITS, "n_vars", self.n_vars,
              f"an integer >= {2 * self.DIGITS}")

    def words(self) -> list[str]:
        return [str(d) for d in range(self.DIGITS)] + [f"v{i}" for i in range(self.n_vars)] \
            + ["=", "?", PAD]

    def default_seq_len(self) -> int:
        return 128

    def min_length(self, hops: int) -> int:
        """Words of the shortest document with one query of `hops` hops."""
        return 3 * self.DIGITS + 3 * max(0, hops - 1) + 3

    def document(self, rng: random.Random, max_hops: int, seq_len: int,
                 query_hops: int | None = None,
                 weights: Sequence[float] | None = None) -> list[str]:
        """A document of `seq_len` words, queries added while they fit: each of `query_hops`
        hops, or of a hop count drawn from 1..max_hops (`weights`: their odds; default
        uniform)."""
        hops_needed = query_hops or 1
        check_fits(seq_len, self.min_length(hops_needed),
                   f"chain documents with {hops_needed} hops")
        per_digit = 2 if query_hops is None and max_hops <= self.EASY_HOPS else 1
        names = [f"v{i}" for i in rng.sample(range(self.n_vars), self.n_vars)]
        roots = names[:self.DIGITS * per_digit]
        free = names[len(roots):]
        digits = [d for d in range(self.DIGITS) for _ in range(per_digit)]
        rng.shuffle(digits)
        assignments = [(r, str(d)) for r, d in zip(roots, digits, strict=True)]
        grow = [[(r, 1)] for r in roots]  # per root: (variable, depth) that paths grow from
        unasked = list(range(len(roots)))  # roots not asked yet (1-hop queries)
        queries: list[tuple[str, str]] = []
        used, misses = 3 * len(assignments), 0
        while misses < 8:
            hops = query_hops if query_hops is not None else \
                rng.choices(range(1, max_hops + 1), weights=weights)[0]
            if hops == 1:
                if not unasked:
                    misses += 1
                    continue
                root = unasked.pop(rng.randrange(len(unasked)))
                if used + 3 > seq_len:
                    break
                used += 3
                queries.append((roots[root], str(digits[root])))
                continue
            root = rng.randrange(len(roots))
            parent, depth = rng.choice([(v, d) for v, d in grow[root] if d < hops])
            cost = 3 * (hops - depth) + 3
            if used + cost > seq_len or hops - depth > len(free):
                misses += 1
                continue
            used += cost
            for k in range(depth + 1, hops + 1):
                node = free.pop()
                assignments.append((node, parent))
                if k < hops:
                    grow[root].append((node, k))
                parent = node
            queries.append((parent, str(digits[root])))
        rng.shuffle(assignments)
        words = [w for lhs, rhs in assignments for w in (lhs, "=", rhs)]
        for var, value in queries:
            words += ["?", var, value]
        return words + [PAD] * (seq_len - len(words))

    def queries(self, words: Sequence[str]) -> list[Query]:
        """Every query of a document, answered from its assignments."""
        values: dict[str, str] = {}
        out = []
        i = 0
        while i + 2 < len(words) and words[i + 1] == "=":
            values[words[i]] = words[i + 2]
            i += 3
        unasked = [v for v in values.values() if v.isdigit()]  # the digits of unasked roots
        while i + 2 < len(words) and words[i] == "?":
            var, hops = words[i + 1], 0
            while var in values:
                var, hops = values[var], hops + 1
            guess = 1.0 / self.DIGITS
            if hops == 1:  # the roots not asked yet, their most common digit
                guess = max(unasked.count(d) for d in set(unasked)) / len(unasked)
                unasked.remove(var)
            out.append(Query(index=i + 2, answer=var, hops=hops, guess=guess))
            i += 3
        return out


# ---- p-hop induction -------------------------------------------------------------------
@dataclass(frozen=True)
class PHopTask:
    """p-hop induction (module docstring): a marker `hP`, a random prefix of `prefix`
    letters, then (letter, answer) pairs to the document's end."""

    alphabet: int = 16
    prefix: int = 64

    name = "phop"
    MAX_HOPS = 32

    def validate(self) -> None:
        check(is_int(self.alphabet) and 2 <= self.alphabet <= 26, "alphabet", self.alphabet,
              "an integer in 2..26 (letters a..z)")
        check(is_int(self.prefix) and self.prefix >= 1, "prefix", self.prefix,
              "an integer >= 1")

    def letters(self) -> list[str]:
        return [chr(ord("a") + k) for k in range(self.alphabet)]

    def words(self) -> list[str]:
        return self.letters() + [f"h{p}" for p in range(1, self.MAX_HOPS + 1)]

    def default_seq_len(self) -> int:
        return 128

    def min_length(self, hops: int) -> int:
        return 1 + self.prefix + 2

    @staticmethod
    def answer_at(sequence: Sequence[str], i: int, hops: int) -> str | None:
        """The letter at hop^hops(i), or None where a hop finds no earlier occurrence."""
        for _ in range(hops):
            j = i - 1
            while j >= 0 and sequence[j] != sequence[i]:
                j -= 1
            if j < 0:
                return None
            i = j + 1
        return sequence[i]

    def document(self, rng: random.Random, max_hops: int, seq_len: int,
                 query_hops: int | None = None,
                 weights: Sequence[float] | None = None) -> list[str]:
        """A document of `seq_len` words whose hop count is drawn from 1..max_hops
        (`weights`: their odds; default uniform), or is `query_hops`."""
        check_fits(seq_len, self.min_length(1), f"phop documents with prefix={self.prefix}")
        if (query_hops or max_hops) > self.MAX_HOPS:
            raise ValueError(f"phop documents have at most {self.MAX_HOPS} hops, not "
                             f"{query_hops or max_hops}")
        hops = query_hops if query_hops is not None else \
            rng.choices(range(1, max_hops + 1), weights=weights)[0]
        letters = self.letters()
        sequence = [rng.choice(letters) for _ in range(self.prefix)]
        while 1 + len(sequence) + 2 <= seq_len:
            for _ in range(MAX_TRIES):
                letter = rng.choice(letters)
                answer = self.answer_at(sequence + [letter], len(sequence), hops)
                if answer is not None:
                    break
            else:
                raise ValueError(f"no answerable {hops}-hop query after {MAX_TRIES} tries: "
                                 f"make the prefix longer than {self.prefix}")
            sequence += [letter, answer]
        # a word left over is one more random letter (not a query)
        return [f"h{hops}", *sequence] + [rng.choice(letters)] * (seq_len - 1 - len(sequence))

    def queries(self, words: Sequence[str]) -> list[Query]:
        """Every (letter, answer) pair after the prefix, answered from the sequence."""
        hops = int(words[0][1:])
        sequence = list(words[1:])
        out = []
        for i in range(self.prefix, len(sequence) - 1, 2):
            answer = self.answer_at(sequence, i, hops)
            if answer is not None:
                out.append(Query(index=i + 2, answer=answer, hops=hops,
                                 guess=1.0 / self.alphabet))
        return out


# ---- pointer chasing on an in-context permutation ------------------------------------------
@dataclass(frozen=True)
class PermTask:
    """Pointer chasing (module docstring of `loopedlm.data.synthetic`): a marker `hK`, a
    random cyclic permutation of the first `alphabet` letters written as shuffled arrow
    words `a>f` (one word per arrow: a hop is then one attention lookup keyed on the word's
    first letter, with no previous-token step to learn first), then `asked` distinct
    letters in random order, each followed by its answer: the letter K arrows on. The
    permutation is one cycle through every letter, so for K < alphabet the answer is never
    the letter asked, and K hops differ from any other hop count below `alphabet`: too few
    or too many lookups are wrong. Answers are distinct (K steps around a cycle are a
    bijection), so a guesser can rule out the letter asked and the answers already given:
    `guess` is that best blind guess, 1 / (letters left), and only half the letters are
    asked (`asked`), which keeps it near 1 / alphabet."""

    alphabet: int = 16
    asked: int = 8

    name = "perm"
    MAX_HOPS = 32

    def validate(self) -> None:
        check(is_int(self.alphabet) and 3 <= self.alphabet <= 26, "alphabet", self.alphabet,
              "an integer in 3..26 (letters a..z)")
        check(is_int(self.asked) and 1 <= self.asked < self.alphabet, "asked", self.asked,
              f"an integer in 1..{self.alphabet - 1} (fewer than alphabet={self.alphabet})")

    def letters(self) -> list[str]:
        return [chr(ord("a") + k) for k in range(self.alphabet)]

    def words(self) -> list[str]:
        letters = self.letters()
        return letters + [f"{a}>{b}" for a in letters for b in letters if a != b] \
            + [f"h{p}" for p in range(1, self.MAX_HOPS + 1)] + [PAD]

    def default_seq_len(self) -> int:
        """Marker, arrows and the letters asked: no padding."""
        return 1 + self.alphabet + 2 * self.asked

    def min_length(self, hops: int) -> int:
        return 1 + self.alphabet + 2

    def document(self, rng: random.Random, max_hops: int, seq_len: int,
                 query_hops: int | None = None,
                 weights: Sequence[float] | None = None) -> list[str]:
        """A document of `seq_len` words whose hop count is drawn from 1..max_hops
        (`weights`: their odds; default uniform), or is `query_hops`."""
        check_fits(seq_len, self.min_length(1), f"perm documents with alphabet={self.alphabet}")
        hops = draw_hops(rng, max_hops, query_hops, weights, self.MAX_HOPS, "perm documents")
        cycle = self.letters()
        rng.shuffle(cycle)
        arrows = [f"{a}>{b}" for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True)]
        rng.shuffle(arrows)
        position = {letter: k for k, letter in enumerate(cycle)}
        queries = self.letters()
        rng.shuffle(queries)
        room = min(self.asked, (seq_len - 1 - len(arrows)) // 2)
        pairs = [w for q in queries[:room]
                 for w in (q, cycle[(position[q] + hops) % len(cycle)])]
        words = [f"h{hops}", *arrows, *pairs]
        return words + [PAD] * (seq_len - len(words))

    def queries(self, words: Sequence[str]) -> list[Query]:
        """Every (letter, answer) pair after the arrows, answered by following them."""
        hops = int(words[0][1:])
        arrow = dict(w.split(">") for w in words[1:1 + self.alphabet])
        out: list[Query] = []
        for i in range(1 + self.alphabet, len(words) - 1, 2):
            if words[i] == PAD:
                break
            answer = words[i]
            for _ in range(hops):
                answer = arrow[answer]
            ruled_out = {q.answer for q in out} | {words[i]}
            out.append(Query(index=i + 1, answer=answer, hops=hops,
                             guess=1.0 / (self.alphabet - len(ruled_out))))
        return out


# ---- pointer chasing with two-word arrows -------------------------------------------------
@dataclass(frozen=True)
class PointerTask:
    """Pointer chasing as `perm`, with each arrow written as two words, `A b` (a -> b: the
    letter it leaves in upper case, the one it reaches in lower case), then `|`, then
    `asked` distinct upper-case letters, each followed by its answer in lower case, K
    arrows on. A hop is the induction step (find the arrow that leaves the current letter,
    read the word after it) with one letter-matching rule shared by every letter, instead
    of one association per arrow word (`perm`'s 240, which a first run never learned).
    The cycle, the distinct answers and `guess` (the best elimination guess) are as in
    `perm`."""

    alphabet: int = 16
    asked: int = 8

    name = "pointer"
    MAX_HOPS = 32
    SEPARATOR = "|"

    def validate(self) -> None:
        check(is_int(self.alphabet) and 3 <= self.alphabet <= 26, "alphabet", self.alphabet,
              "an integer in 3..26 (letters a..z)")
        check(is_int(self.asked) and 1 <= self.asked < self.alphabet, "asked", self.asked,
              f"an integer in 1..{self.alphabet - 1} (fewer than alphabet={self.alphabet})")

    def letters(self) -> list[str]:
        return [chr(ord("a") + k) for k in range(self.alphabet)]

    def words(self) -> list[str]:
        return self.letters() + [c.upper() for c in self.letters()] \
            + [f"h{p}" for p in range(1, self.MAX_HOPS + 1)] + [self.SEPARATOR, PAD]

    def default_seq_len(self) -> int:
        """Marker, arrows, separator and the letters asked: no padding."""
        return 2 + 2 * self.alphabet + 2 * self.asked

    def min_length(self, hops: int) -> int:
        return 2 + 2 * self.alphabet + 2

    def document(self, rng: random.Random, max_hops: int, seq_len: int,
                 query_hops: int | None = None,
                 weights: Sequence[float] | None = None) -> list[str]:
        """A document of `seq_len` words whose hop count is drawn from 1..max_hops
        (`weights`: their odds; default uniform), or is `query_hops`."""
        check_fits(seq_len, self.min_length(1),
                   f"pointer documents with alphabet={self.alphabet}")
        hops = draw_hops(rng, max_hops, query_hops, weights, self.MAX_HOPS, "pointer documents")
        cycle = self.letters()
        rng.shuffle(cycle)
        arrows = list(zip(cycle, cycle[1:] + cycle[:1], strict=True))
        rng.shuffle(arrows)
        position = {letter: k for k, letter in enumerate(cycle)}
        queries = self.letters()
        rng.shuffle(queries)
        room = min(self.asked, (seq_len - self.min_length(1) + 2) // 2)
        pairs = [w for q in queries[:room]
                 for w in (q.upper(), cycle[(position[q] + hops) % len(cycle)])]
        words = [f"h{hops}", *[w for a, b in arrows for w in (a.upper(), b)], self.SEPARATOR,
                 *pairs]
        return words + [PAD] * (seq_len - len(words))

    def queries(self, words: Sequence[str]) -> list[Query]:
        """Every (letter, answer) pair after the separator, answered by following arrows."""
        hops = int(words[0][1:])
        end = words.index(self.SEPARATOR)
        arrow = {words[k].lower(): words[k + 1] for k in range(1, end, 2)}
        out: list[Query] = []
        for i in range(end + 1, len(words) - 1, 2):
            if words[i] == PAD:
                break
            answer = words[i].lower()
            for _ in range(hops):
                answer = arrow[answer]
            ruled_out = {q.answer for q in out} | {words[i].lower()}
            out.append(Query(index=i + 1, answer=answer, hops=hops,
                             guess=1.0 / (self.alphabet - len(ruled_out))))
        return out


# ---- composing fixed functions, held in the weights ----------------------------------------
@dataclass(frozen=True)
class ComposeTask:
    """In-weights function composition: `functions` fixed random permutations of `alphabet`
    symbols `s0 s1 ...`, named `f1 f2 ...` (each one cycle through every symbol, drawn from
    `function_seed`: the same in every document and every data set with these options), and
    queries `x g1 g2 ... gK = y` with y = gK(...g2(g1(x))), K = hops. Nothing in the
    document says what the functions are: the model must hold them in its weights (a
    memorised lookup per hop, no search of the context) and apply them in turn. With
    several functions the answer depends on the whole word, so the table of every (x, word)
    is alphabet x functions^K entries (32 x 4^8 = 2M at 8 hops): too many to memorise, where
    the functions themselves are 128; a first version with one function and `x hK y`
    queries was answered at one loop from a memorised (x, K) table (docs/reasoning.md). With
    `functions=1` the word is K marks `f1 f1 ...`: the hop count written as a count.
    Queries are added while they fit; their start symbols are distinct, so no answer can be
    copied from an earlier query. `guess` is 1 / alphabet."""

    alphabet: int = 32
    functions: int = 4
    function_seed: int = 0

    name = "compose"
    EQUALS = "="

    def validate(self) -> None:
        check(is_int(self.alphabet) and 2 <= self.alphabet <= 256, "alphabet", self.alphabet,
              "an integer in 2..256 (symbols s0, s1, ...)")
        check(is_int(self.functions) and 1 <= self.functions <= 64, "functions",
              self.functions, "an integer in 1..64")
        check(is_int(self.function_seed) and self.function_seed >= 0, "function_seed",
              self.function_seed, "an integer >= 0")

    def symbols(self) -> list[str]:
        return [f"s{k}" for k in range(self.alphabet)]

    def names(self) -> list[str]:
        return [f"f{k}" for k in range(1, self.functions + 1)]

    @functools.cached_property
    def table(self) -> dict[str, dict[str, str]]:
        """Each function by name: symbol -> symbol, one cycle through every symbol."""
        rng = random.Random(f"compose/{self.function_seed}/{self.alphabet}")
        out = {}
        for name in self.names():
            cycle = self.symbols()
            rng.shuffle(cycle)
            out[name] = dict(zip(cycle, cycle[1:] + cycle[:1], strict=True))
        return out

    def words(self) -> list[str]:
        return self.symbols() + self.names() + [self.EQUALS, PAD]

    def default_seq_len(self) -> int:
        return 64

    def min_length(self, hops: int) -> int:
        """Words of one query of `hops` hops."""
        return hops + 3

    def apply(self, symbol: str, word: Sequence[str]) -> str:
        for name in word:
            symbol = self.table[name][symbol]
        return symbol

    def document(self, rng: random.Random, max_hops: int, seq_len: int,
                 query_hops: int | None = None,
                 weights: Sequence[float] | None = None) -> list[str]:
        """A document of `seq_len` words: queries added while they fit, each of `query_hops`
        hops or of a hop count drawn from 1..max_hops (`weights`: their odds; default
        uniform)."""
        hops_needed = query_hops or 1
        check_fits(seq_len, self.min_length(hops_needed),
                   f"compose documents with {hops_needed} hops")
        starts = self.symbols()
        rng.shuffle(starts)
        words: list[str] = []
        while starts:
            hops = query_hops if query_hops is not None else \
                rng.choices(range(1, max_hops + 1), weights=weights)[0]
            if len(words) + self.min_length(hops) > seq_len:
                break
            x = starts.pop()
            word = rng.choices(self.names(), k=hops)
            words += [x, *word, self.EQUALS, self.apply(x, word)]
        return words + [PAD] * (seq_len - len(words))

    def queries(self, words: Sequence[str]) -> list[Query]:
        """Every `x g1 ... gK = y`, answered by applying the functions in turn."""
        out: list[Query] = []
        i = 0
        while i < len(words) and words[i] != PAD:
            end = words.index(self.EQUALS, i)
            word = words[i + 1:end]
            out.append(Query(index=end + 1, answer=self.apply(words[i], word), hops=len(word),
                             guess=1.0 / self.alphabet))
            i = end + 2
        return out


# ---- reachability along a row (1-D flood fill) ---------------------------------------------
@dataclass(frozen=True)
class ReachTask:
    """1-D reachability: a row of cells, each a source `S`, a wall `#` or open (one of
    `open_kinds` letters `a b ...`, drawn at random: they all mean "open"). An asked cell
    `?` (open) is followed by its answer: `y` when the nearest non-open cell to its left is
    a source (the cell is reached by flooding rightwards from it), `n` when it is a wall.
    The difficulty (`hops`) is the distance in cells from that marker to `?`:

        S b a d ? y # c ? n S ? y ...      (distances 4, 2, 1)

    A document is a series of runs `marker, open x (d - 1), ?, answer`, so a marker lies
    between any two questions: an answer in view never tells the next one (were every cell
    answered in place, each answer would be the previous one's copy, a one-step rule that
    needs no depth). The marker is a source or a wall with odds 1/2, independent of all
    else, so a blind guess is right half the time (`guess` 1/2), at every distance. A model
    whose layers all see only the last w positions (`window_size`, `full_last_layer=False`)
    cannot answer a distance beyond what its layers together reach: more loops carry the
    marker farther (docs/reasoning.md). The open cells are of several kinds, each unlike
    the one before, because a loop mode whose state enters only as attention queries
    (`flt`) can carry nothing through a run of identical tokens: their values are all
    alike, so no choice of attention weights changes what a layer reads."""

    open_kinds: int = 4

    name = "reach"
    SOURCE, WALL, ASK, YES, NO = "S", "#", "?", "y", "n"

    def validate(self) -> None:
        check(is_int(self.open_kinds) and 1 <= self.open_kinds <= 26, "open_kinds",
              self.open_kinds, "an integer in 1..26 (letters a..z)")

    def cells(self) -> list[str]:
        return [chr(ord("a") + k) for k in range(self.open_kinds)]

    def words(self) -> list[str]:
        return self.cells() + [self.SOURCE, self.WALL, self.ASK, self.YES, self.NO, PAD]

    def default_seq_len(self) -> int:
        return 64

    def min_length(self, hops: int) -> int:
        """Words of one run of distance `hops`: marker, hops - 1 open cells, ?, answer."""
        return hops + 2

    def document(self, rng: random.Random, max_hops: int, seq_len: int,
                 query_hops: int | None = None,
                 weights: Sequence[float] | None = None) -> list[str]:
        """A document of `seq_len` words: runs added while they fit, each of distance
        `query_hops` or of one drawn from 1..max_hops (`weights`: their odds; default
        uniform)."""
        hops_needed = query_hops or 1
        check_fits(seq_len, self.min_length(hops_needed),
                   f"reach documents with distance {hops_needed}")
        cells = self.cells()
        words: list[str] = []
        while True:
            hops = query_hops if query_hops is not None else \
                rng.choices(range(1, max_hops + 1), weights=weights)[0]
            if len(words) + self.min_length(hops) > seq_len:
                break
            source = rng.random() < 0.5
            run = []
            for _ in range(hops - 1):  # each open cell unlike the one before (see above)
                run.append(rng.choice([c for c in cells if not run or c != run[-1]] or cells))
            words += [self.SOURCE if source else self.WALL, *run, self.ASK,
                      self.YES if source else self.NO]
        return words + [PAD] * (seq_len - len(words))

    def queries(self, words: Sequence[str]) -> list[Query]:
        """Every `?`, answered from the nearest marker to its left (none: as a wall at the
        row's start, one cell before it)."""
        out: list[Query] = []
        marker, at = self.WALL, -1
        for i, word in enumerate(words[:-1]):
            if word in (self.SOURCE, self.WALL):
                marker, at = word, i
            elif word == self.ASK:
                out.append(Query(index=i + 1, answer=self.YES if marker == self.SOURCE
                                 else self.NO, hops=i - at, guess=0.5))
        return out


TASKS = {"chain": ChainTask, "phop": PHopTask, "perm": PermTask, "pointer": PointerTask,
         "compose": ComposeTask, "reach": ReachTask}
HOP_MIXES = ("uniform", "inverse")


__all__ = ["Query", "ChainTask", "PHopTask", "PermTask", "PointerTask", "ComposeTask",
           "ReachTask", "TASKS", "HOP_MIXES", "PAD"]
