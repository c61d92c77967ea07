"""Caption metrics with the COCO caption toolkit's exact definitions: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D.

Inputs are captions already tokenised by `ptb_tokenizer` (space-separated, lower-cased, punctuation
removed), one hypothesis and one or more references per image, so that the numbers equal
`pycocoevalcap`'s on the same inputs:

- BLEU: corpus level, n-gram counts clipped by the maximum count in any reference, brevity penalty from
  the reference length closest to each hypothesis (ties to the shorter), the toolkit's smoothing
  constants (1e-15 / 1e-9). Per-image BLEU is the toolkit's per-image value.
- CIDEr-D: tf-idf n-gram vectors (n = 1..4) with document frequencies from the references of the images
  being evaluated, per-n cosine with the hypothesis weights clipped to the reference weights, a Gaussian
  length penalty (sigma 6) on the difference in bigram counts (the toolkit's "length"), averaged over
  references and n, times 10.
- ROUGE-L: longest common subsequence F-measure with beta 1.2, using the best precision and the best
  recall over the references.
- METEOR: the toolkit's own wrapper around `meteor-1.5.jar` (needs Java and `pycocoevalcap`); when either
  is missing the metric is skipped with the reason.

BLEU and CIDEr-D are vectorised here (n-grams are interned to integers and every sum is a numpy
reduction), which is several times faster than the toolkit's dictionaries (see `benchmarks/`); ROUGE-L
uses a bit-parallel LCS. Tokenisation, answer matching and reports live elsewhere.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

BLEU_ORDERS = 4
CIDER_SIGMA = 6.0
ROUGE_BETA = 1.2
_BLEU_TINY = 1e-15  # the toolkit's constants, kept so that scores match it to the last digit
_BLEU_SMALL = 1e-9


@dataclass(frozen=True)
class BleuStats:
    """Per-image sufficient statistics of corpus BLEU (any subset of images can be re-scored)."""

    hypothesis_length: np.ndarray  # (images,) int
    reference_length: np.ndarray  # (images,) int, the closest reference length
    guess: np.ndarray  # (images, orders) int, n-grams in the hypothesis
    correct: np.ndarray  # (images, orders) int, clipped matches

    def subset(self, mask: np.ndarray) -> BleuStats:
        """The statistics of the images where `mask` is true."""
        return BleuStats(
            self.hypothesis_length[mask], self.reference_length[mask], self.guess[mask], self.correct[mask]
        )


@dataclass(frozen=True)
class CaptionScores:
    """Corpus scores and per-image scores of one evaluation."""

    corpus: dict[str, float]
    per_image: dict[str, np.ndarray]
    bleu_stats: BleuStats
    skipped: dict[str, str] = field(default_factory=dict)


def score_captions(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], with_meteor: bool = True
) -> CaptionScores:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of tokenised hypotheses against tokenised references.

    `hypotheses[i]` is scored against `references[i]` (at least one reference each). METEOR is skipped
    (with its reason in `skipped`) when `with_meteor` is false or Java is unavailable.
    """
    _check_inputs(hypotheses, references)
    corpus: dict[str, float] = {}
    per_image: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}

    table = NgramTable.build(hypotheses, references, BLEU_ORDERS)
    stats = bleu_stats(table)
    for order, value in enumerate(corpus_bleu(stats), start=1):
        corpus[f"BLEU-{order}"] = value
    for order, values in enumerate(per_image_bleu(stats).T, start=1):
        per_image[f"BLEU-{order}"] = values

    if not with_meteor:
        skipped["METEOR"] = "not computed: disabled (--no-meteor)"
    else:
        meteor_result = meteor(hypotheses, references)
        if isinstance(meteor_result, str):
            skipped["METEOR"] = meteor_result
        else:
            corpus["METEOR"], per_image["METEOR"] = meteor_result

    corpus["ROUGE-L"], per_image["ROUGE-L"] = rouge_l(hypotheses, references)
    corpus["CIDEr-D"], per_image["CIDEr-D"] = cider_d(table)
    return CaptionScores(corpus, per_image, stats, skipped)


# --------------------------------------------------------------------------------------------------
# n-gram table shared by BLEU and CIDEr-D
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NgramTable:
    """Every n-gram (n = 1..orders) of every sentence, interned to integers, as sparse counts.

    Sentences are the hypotheses (sentence i belongs to image i) followed by all references (sentence
    `n_images + r` belongs to `ref_image[r]`). Entries are sorted by (sentence, gram).
    """

    n_images: int
    orders: int
    ref_image: np.ndarray  # (refs,) image of each reference sentence
    lengths: np.ndarray  # (sentences,) words per sentence
    entry_sentence: np.ndarray  # (entries,)
    entry_gram: np.ndarray  # (entries,) global gram id
    entry_count: np.ndarray  # (entries,) occurrences of the gram in the sentence
    gram_order: np.ndarray  # (grams,) order - 1 of each gram id

    @classmethod
    def build(cls, hypotheses: Sequence[str], references: Sequence[Sequence[str]], orders: int) -> NgramTable:
        """Intern the n-grams of whitespace-split sentences (`str.split()`, as the toolkit's scorers)."""
        ref_image = np.fromiter(
            (i for i, refs in enumerate(references) for _ in refs),
            dtype=np.int64,
            count=sum(map(len, references)),
        )
        split = [sentence.split() for sentence in (*hypotheses, *(r for refs in references for r in refs))]
        lengths = np.fromiter(map(len, split), dtype=np.int64, count=len(split))
        vocabulary: defaultdict[str, int] = defaultdict()
        vocabulary.default_factory = vocabulary.__len__  # a new word gets the next id
        words_flat = np.fromiter(
            map(vocabulary.__getitem__, itertools.chain.from_iterable(split)),
            dtype=np.int64,
            count=int(lengths.sum()),
        )
        sentence_of_word = np.repeat(np.arange(len(split), dtype=np.int64), lengths)
        position_in_sentence = np.arange(len(words_flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)

        entry_sentence, entry_gram, gram_order = [], [], []
        grams = words_flat  # id of the n-gram starting at each word, for the current n
        n_grams_so_far = 0
        for n in range(1, orders + 1):
            if n > 1:
                # the n-gram at i is the (n-1)-gram at i followed by word i+n-1
                valid = (
                    position_in_sentence[: len(grams) - 1] + n <= lengths[sentence_of_word[: len(grams) - 1]]
                )
                pairs = grams[:-1] * (len(vocabulary) + 1) + words_flat[n - 1 :]
                pairs = np.where(valid, pairs, -1)
                grams = _dense_ids(pairs)
            else:
                valid = np.ones(len(grams), dtype=bool)  # word ids are already dense: 0..vocabulary-1
            starts = np.flatnonzero(valid)
            distinct = int(grams[starts].max()) + 1 if len(starts) else 0
            entry_sentence.append(sentence_of_word[starts])
            entry_gram.append(grams[starts] + n_grams_so_far)
            gram_order.append(np.full(distinct, n - 1, dtype=np.int64))
            n_grams_so_far += distinct

        sentence_ids = np.concatenate(entry_sentence) if entry_sentence else np.empty(0, np.int64)
        gram_ids = np.concatenate(entry_gram) if entry_gram else np.empty(0, np.int64)
        keys, counts = np.unique(sentence_ids * max(n_grams_so_far, 1) + gram_ids, return_counts=True)
        return cls(
            n_images=len(hypotheses),
            orders=orders,
            ref_image=ref_image,
            lengths=lengths,
            entry_sentence=keys // max(n_grams_so_far, 1),
            entry_gram=keys % max(n_grams_so_far, 1),
            entry_count=counts.astype(np.int64),
            gram_order=np.concatenate(gram_order) if gram_order else np.empty(0, np.int64),
        )

    @property
    def n_grams(self) -> int:
        return len(self.gram_order)

    def hypothesis_entries(self) -> np.ndarray:
        return self.entry_sentence < self.n_images

    def image_of_entries(self) -> np.ndarray:
        """The image each entry's sentence belongs to."""
        image_of_sentence = np.concatenate([np.arange(self.n_images, dtype=np.int64), self.ref_image])
        return image_of_sentence[self.entry_sentence]


def _dense_ids(values: np.ndarray) -> np.ndarray:
    """Map values >= 0 to 0..k-1 (same value, same id); negative values stay negative."""
    out = np.full(values.shape, -1, dtype=np.int64)
    keep = values >= 0
    _, inverse = np.unique(values[keep], return_inverse=True)
    out[keep] = inverse
    return out


def _lookup(sorted_keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """values[k] where sorted_keys[k] == query, else 0."""
    if len(sorted_keys) == 0:
        return np.zeros(len(queries), dtype=values.dtype)
    pos = np.minimum(np.searchsorted(sorted_keys, queries), len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == queries, values[pos], 0)


# --------------------------------------------------------------------------------------------------
# BLEU
# --------------------------------------------------------------------------------------------------


def bleu_stats(table: NgramTable) -> BleuStats:
    """Hypothesis lengths, closest reference lengths, guessed and clipped-correct n-grams per image."""
    n_images, orders = table.n_images, table.orders
    hyp_len = table.lengths[:n_images]
    ref_len = table.lengths[n_images:]
    # closest reference length: min over references of (|ref - hyp|, ref), i.e. ties go to the shorter
    distance = np.abs(ref_len - hyp_len[table.ref_image])
    order = np.lexsort((ref_len, distance, table.ref_image))
    first = np.ones(len(order), dtype=bool)
    first[1:] = table.ref_image[order][1:] != table.ref_image[order][:-1]
    closest = np.zeros(n_images, dtype=np.int64)
    closest[table.ref_image[order][first]] = ref_len[order][first]

    guess = np.maximum(0, hyp_len[:, None] - np.arange(orders)[None, :])

    # maximum count of each gram over an image's references
    is_hyp = table.hypothesis_entries()
    image = table.image_of_entries()
    key = image * table.n_grams + table.entry_gram
    ref_keys, ref_counts = key[~is_hyp], table.entry_count[~is_hyp]
    by_key = np.argsort(ref_keys, kind="stable")
    ref_keys, ref_counts = ref_keys[by_key], ref_counts[by_key]
    group_start = (
        np.flatnonzero(np.r_[True, ref_keys[1:] != ref_keys[:-1]]) if len(ref_keys) else np.empty(0, int)
    )
    max_keys = ref_keys[group_start]
    max_counts = np.maximum.reduceat(ref_counts, group_start) if len(ref_keys) else ref_counts

    clipped = np.minimum(table.entry_count[is_hyp], _lookup(max_keys, max_counts, key[is_hyp]))
    correct = np.zeros((n_images, orders), dtype=np.int64)
    np.add.at(correct, (table.entry_sentence[is_hyp], table.gram_order[table.entry_gram[is_hyp]]), clipped)
    return BleuStats(hyp_len, closest, guess, correct)


def corpus_bleu(stats: BleuStats) -> list[float]:
    """Corpus BLEU-1..n from summed statistics, computed exactly as the toolkit does."""
    guess = stats.guess.sum(axis=0)
    correct = stats.correct.sum(axis=0)
    scores, product = [], 1.0
    for k in range(len(guess)):
        product *= (float(correct[k]) + _BLEU_TINY) / (float(guess[k]) + _BLEU_SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (float(stats.hypothesis_length.sum()) + _BLEU_TINY) / (
        float(stats.reference_length.sum()) + _BLEU_SMALL
    )
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def per_image_bleu(stats: BleuStats) -> np.ndarray:
    """(images, orders) BLEU of each image on its own, as the toolkit reports it."""
    ratios = (stats.correct + _BLEU_TINY) / (stats.guess + _BLEU_SMALL)
    products = np.cumprod(ratios, axis=1)
    scores = products ** (1.0 / np.arange(1, stats.guess.shape[1] + 1))[None, :]
    length_ratio = (stats.hypothesis_length + _BLEU_TINY) / (stats.reference_length + _BLEU_SMALL)
    with np.errstate(divide="ignore"):
        penalty = np.where(length_ratio < 1, np.exp(1 - 1 / length_ratio), 1.0)
    return scores * penalty[:, None]


# --------------------------------------------------------------------------------------------------
# CIDEr-D
# --------------------------------------------------------------------------------------------------


def cider_d(table: NgramTable, sigma: float = CIDER_SIGMA) -> tuple[float, np.ndarray]:
    """Corpus CIDEr-D (the mean of per-image scores) and the per-image scores."""
    n_images, orders = table.n_images, table.orders
    if n_images == 0:
        return float("nan"), np.empty(0)
    is_hyp = table.hypothesis_entries()
    image = table.image_of_entries()

    # document frequency: the number of images whose references contain the gram
    ref_pairs = np.sort(image[~is_hyp] * table.n_grams + table.entry_gram[~is_hyp])
    ref_pairs = ref_pairs[np.r_[True, ref_pairs[1:] != ref_pairs[:-1]]] if len(ref_pairs) else ref_pairs
    document_frequency = np.bincount(ref_pairs % max(table.n_grams, 1), minlength=table.n_grams)
    idf = np.log(float(n_images)) - np.log(np.maximum(1.0, document_frequency.astype(np.float64)))
    weight = table.entry_count * idf[table.entry_gram]
    gram_order = table.gram_order[table.entry_gram]

    n_sentences = len(table.lengths)
    squared = np.bincount(
        table.entry_sentence * orders + gram_order, weights=weight**2, minlength=n_sentences * orders
    )
    norms = np.sqrt(squared).reshape(n_sentences, orders)
    bigrams = np.maximum(table.lengths - 1, 0)  # the toolkit's "length" counts bigrams

    # clipped dot products: sum over the reference's grams of min(w_hyp, w_ref) * w_ref
    hyp_key = image[is_hyp] * table.n_grams + table.entry_gram[is_hyp]  # sorted: hyp entries are in order
    ref_rows = ~is_hyp
    hyp_weight = _lookup(
        hyp_key, weight[is_hyp], image[ref_rows] * table.n_grams + table.entry_gram[ref_rows]
    )
    contribution = np.minimum(hyp_weight, weight[ref_rows]) * weight[ref_rows]
    ref_index = table.entry_sentence[ref_rows] - n_images
    n_refs = len(table.ref_image)
    dots = np.bincount(
        ref_index * orders + gram_order[ref_rows], weights=contribution, minlength=n_refs * orders
    ).reshape(n_refs, orders)

    hyp_norms = norms[:n_images][table.ref_image]
    ref_norms = norms[n_images:]
    both = (hyp_norms != 0) & (ref_norms != 0)
    values = np.where(both, dots / np.where(both, hyp_norms * ref_norms, 1.0), dots)
    delta = (bigrams[:n_images][table.ref_image] - bigrams[n_images:]).astype(np.float64)
    values *= np.exp(-(delta**2) / (2 * sigma**2))[:, None]

    per_image_sum = np.zeros((n_images, orders))
    np.add.at(per_image_sum, table.ref_image, values)
    refs_per_image = np.bincount(table.ref_image, minlength=n_images)
    scores = per_image_sum.mean(axis=1) / refs_per_image * 10.0
    return float(scores.mean()), scores


# --------------------------------------------------------------------------------------------------
# ROUGE-L
# --------------------------------------------------------------------------------------------------


def rouge_l(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], beta: float = ROUGE_BETA
) -> tuple[float, np.ndarray]:
    """Corpus ROUGE-L (mean of per-image scores) and the per-image scores.

    Sentences are split on single spaces, as in the toolkit, so an empty sentence is one empty token.
    """
    scores = np.empty(len(hypotheses))
    for i, (hypothesis, refs) in enumerate(zip(hypotheses, references, strict=True)):
        candidate = hypothesis.split(" ")
        best_precision = best_recall = 0.0
        for reference in refs:
            ref_tokens = reference.split(" ")
            lcs = lcs_length(ref_tokens, candidate)
            best_precision = max(best_precision, lcs / len(candidate))
            best_recall = max(best_recall, lcs / len(ref_tokens))
        if best_precision != 0 and best_recall != 0:
            scores[i] = ((1 + beta**2) * best_precision * best_recall) / (
                best_recall + beta**2 * best_precision
            )
        else:
            scores[i] = 0.0
    return (float(scores.mean()) if len(scores) else float("nan")), scores


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, with the bit-parallel algorithm (Allison-Dix / Hyyrö).

    Each bit of `row` stands for a position of `a`; one pass over `b` with integer arithmetic replaces
    the quadratic table.
    """
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for position, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << position)
    all_ones = (1 << len(a)) - 1
    row = all_ones
    for token in b:
        match = row & masks.get(token, 0)
        row = ((row + match) | (row - match)) & all_ones
    return len(a) - row.bit_count()


# --------------------------------------------------------------------------------------------------
# METEOR (Java, through the toolkit)
# --------------------------------------------------------------------------------------------------


def meteor(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, np.ndarray] | str:
    """Corpus and per-image METEOR 1.5 via `pycocoevalcap`, or the reason it cannot run here."""
    import shutil

    if shutil.which("java") is None:
        return "not computed: METEOR needs Java (no `java` on PATH)"
    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ImportError:
        return "not computed: METEOR needs the `pycocoevalcap` package, which is not installed"
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [hypothesis] for i, hypothesis in enumerate(hypotheses)}
    try:
        scorer = Meteor()
        score, scores = scorer.compute_score(gts, res)
    except (OSError, ValueError) as err:  # the JVM did not start, or died and answered nothing
        return f"not computed: METEOR failed ({type(err).__name__}: {err})"
    finally:
        scorer = None  # the wrapper's __del__ stops its Java process
    return float(score), np.asarray(scores, dtype=np.float64)


def _check_inputs(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    empty = [i for i, refs in enumerate(references) if len(refs) == 0]
    if empty:
        raise ValueError(f"images at positions {empty[:10]} have no reference caption")
