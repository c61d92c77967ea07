"""Caption metrics against naive oracles written here and against the pycocoevalcap scorers.

The oracles follow the metric definitions with plain dictionaries; pycocoevalcap is the implementation
users trust. Both are compared on a varied caption set (punctuation, casing, unicode, an empty
prediction, one to five references) and on random captions.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest
from eval_case_data import VARIED_CAPTIONS, random_caption_set

from ovis_batch.eval import caption_metrics as cm
from ovis_batch.eval.ptb_tokenizer import java_available, ptb_tokenize_many

TOLERANCE = 1e-6


def tokenized(cases):
    hyps = ptb_tokenize_many([h for h, _ in cases])
    refs = [ptb_tokenize_many(r) for _, r in cases]
    return hyps, refs


def caption_sets():
    return {"varied": tokenized(VARIED_CAPTIONS), "random": tokenized(random_caption_set(seed=7, n=300))}


# --------------------------------------------------------------------------------------------------
# naive oracles
# --------------------------------------------------------------------------------------------------


def ngrams(words, n):
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def oracle_bleu(hyps, refs, max_n=4):
    """Corpus BLEU with clipped counts, closest reference length, and the toolkit's 1e-15/1e-9 smoothing."""
    correct, guess = [0] * max_n, [0] * max_n
    hyp_total = ref_total = 0
    for hyp, references in zip(hyps, refs, strict=True):
        words = hyp.split()
        hyp_total += len(words)
        lengths = [len(r.split()) for r in references]
        ref_total += min(lengths, key=lambda length: (abs(length - len(words)), length))
        for n in range(1, max_n + 1):
            best = Counter()
            for r in references:
                best |= ngrams(r.split(), n)
            correct[n - 1] += sum(min(c, best[g]) for g, c in ngrams(words, n).items())
            guess[n - 1] += max(0, len(words) - n + 1)
    scores, product = [], 1.0
    for n in range(max_n):
        product *= (correct[n] + 1e-15) / (guess[n] + 1e-9)
        scores.append(product ** (1 / (n + 1)))
    ratio = (hyp_total + 1e-15) / (ref_total + 1e-9)
    return [s * math.exp(1 - 1 / ratio) if ratio < 1 else s for s in scores]


def oracle_cider_d(hyps, refs, max_n=4, sigma=6.0):
    """CIDEr-D from its definition, one image at a time."""
    images = len(hyps)
    df = Counter()
    for references in refs:
        df.update({g for r in references for n in range(1, max_n + 1) for g in ngrams(r.split(), n)})

    def vectors(sentence):
        words = sentence.split()
        vec = [
            {g: c * (math.log(images) - math.log(max(1.0, df[g]))) for g, c in ngrams(words, n).items()}
            for n in range(1, max_n + 1)
        ]
        return vec, [math.sqrt(sum(w * w for w in v.values())) for v in vec], max(len(words) - 1, 0)

    scores = []
    for hyp, references in zip(hyps, refs, strict=True):
        h_vec, h_norm, h_len = vectors(hyp)
        total = [0.0] * max_n
        for r in references:
            r_vec, r_norm, r_len = vectors(r)
            for n in range(max_n):
                dot = sum(min(w, r_vec[n].get(g, 0.0)) * r_vec[n].get(g, 0.0) for g, w in h_vec[n].items())
                if h_norm[n] and r_norm[n]:
                    dot /= h_norm[n] * r_norm[n]
                total[n] += dot * math.exp(-((h_len - r_len) ** 2) / (2 * sigma**2))
        scores.append(sum(total) / max_n / len(references) * 10)
    return sum(scores) / len(scores), scores


def oracle_lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = (
                table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
            )
    return table[-1][-1]


def oracle_rouge_l(hyps, refs, beta=1.2):
    scores = []
    for hyp, references in zip(hyps, refs, strict=True):
        h = hyp.split(" ")
        precision = max(oracle_lcs(r.split(" "), h) / len(h) for r in references)
        recall = max(oracle_lcs(r.split(" "), h) / len(r.split(" ")) for r in references)
        f = (
            (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
            if precision and recall
            else 0.0
        )
        scores.append(f)
    return sum(scores) / len(scores), scores


# --------------------------------------------------------------------------------------------------
# against the oracles
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["varied", "random"])
def test_bleu_matches_oracle(name):
    hyps, refs = caption_sets()[name]
    stats = cm.bleu_stats(cm.NgramTable.build(hyps, refs, 4))
    np.testing.assert_allclose(cm.corpus_bleu(stats), oracle_bleu(hyps, refs), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["varied", "random"])
def test_cider_d_matches_oracle(name):
    hyps, refs = caption_sets()[name]
    corpus, per_image = cm.cider_d(cm.NgramTable.build(hyps, refs, 4))
    expected_corpus, expected = oracle_cider_d(hyps, refs)
    np.testing.assert_allclose(per_image, expected, rtol=0, atol=1e-12)
    assert corpus == pytest.approx(expected_corpus, abs=1e-12)


@pytest.mark.parametrize("name", ["varied", "random"])
def test_rouge_l_matches_oracle(name):
    hyps, refs = caption_sets()[name]
    corpus, per_image = cm.rouge_l(hyps, refs)
    expected_corpus, expected = oracle_rouge_l(hyps, refs)
    np.testing.assert_allclose(per_image, expected, rtol=0, atol=1e-12)
    assert corpus == pytest.approx(expected_corpus, abs=1e-12)


def test_bit_parallel_lcs_matches_dynamic_programming():
    rng = random.Random(3)
    for _ in range(500):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 70))]
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 70))]
        assert cm.lcs_length(a, b) == oracle_lcs(a, b)


def test_category_bleu_is_corpus_bleu_of_the_subset():
    hyps, refs = caption_sets()["random"]
    stats = cm.bleu_stats(cm.NgramTable.build(hyps, refs, 4))
    mask = np.arange(len(hyps)) % 3 == 0
    subset = [i for i in range(len(hyps)) if mask[i]]
    expected = oracle_bleu([hyps[i] for i in subset], [refs[i] for i in subset])
    np.testing.assert_allclose(cm.corpus_bleu(stats.subset(mask)), expected, rtol=0, atol=1e-12)


def test_empty_reference_list_is_refused():
    with pytest.raises(ValueError, match="no reference caption"):
        cm.score_captions(["a cat"], [[]], with_meteor=False)


# --------------------------------------------------------------------------------------------------
# against pycocoevalcap
# --------------------------------------------------------------------------------------------------


def toolkit_scores(hyps, refs):
    bleu = pytest.importorskip("pycocoevalcap.bleu.bleu")
    cider = pytest.importorskip("pycocoevalcap.cider.cider")
    rouge = pytest.importorskip("pycocoevalcap.rouge.rouge")
    gts = {i: list(r) for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    b, b_images = bleu.Bleu(4).compute_score(gts, res, verbose=0)
    r, r_images = rouge.Rouge().compute_score(gts, res)
    c, c_images = cider.Cider().compute_score(gts, res)
    corpus = {f"BLEU-{k + 1}": v for k, v in enumerate(b)} | {"ROUGE-L": r, "CIDEr-D": c}
    per_image = {f"BLEU-{k + 1}": np.array(v) for k, v in enumerate(b_images)}
    per_image |= {"ROUGE-L": np.array(r_images), "CIDEr-D": np.array(c_images)}
    return corpus, per_image


@pytest.mark.parametrize("name", ["varied", "random"])
def test_scores_equal_pycocoevalcap_scorers(name):
    hyps, refs = caption_sets()[name]
    expected, expected_images = toolkit_scores(hyps, refs)
    scores = cm.score_captions(hyps, refs, with_meteor=False)
    for metric, value in expected.items():
        assert scores.corpus[metric] == pytest.approx(value, abs=TOLERANCE), metric
        np.testing.assert_allclose(scores.per_image[metric], expected_images[metric], rtol=0, atol=TOLERANCE)
    assert scores.skipped == {"METEOR": "not computed: disabled (--no-meteor)"}


@pytest.mark.skipif(java_available() is not None, reason=f"needs Java: {java_available()}")
def test_full_pipeline_equals_pycocoevalcap_with_its_java_tokenizer():
    """Raw captions -> toolkit (Java PTBTokenizer + scorers) == raw captions -> ptb_tokenize + our scorers."""
    toolkit = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    cases = VARIED_CAPTIONS + random_caption_set(seed=11, n=60)
    gts = {i: [{"caption": r} for r in refs] for i, (_, refs) in enumerate(cases)}
    res = {i: [{"caption": h}] for i, (h, _) in enumerate(cases)}
    tokenizer = toolkit.PTBTokenizer()
    gts_tok, res_tok = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    expected, _ = toolkit_scores(
        [res_tok[i][0] for i in range(len(cases))], [gts_tok[i] for i in range(len(cases))]
    )

    hyps, refs = tokenized(cases)
    scores = cm.score_captions(hyps, refs, with_meteor=False)
    for metric, value in expected.items():
        assert scores.corpus[metric] == pytest.approx(value, abs=TOLERANCE), metric


def test_meteor_is_skipped_with_the_reason_when_java_is_missing(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    hyps, refs = caption_sets()["varied"]
    scores = cm.score_captions(hyps, refs, with_meteor=True)
    assert "METEOR" not in scores.corpus
    assert "Java" in scores.skipped["METEOR"]


def test_meteor_goes_through_the_toolkit_wrapper(monkeypatch):
    """The wrapper receives every image's tokenised hypothesis and references, and its scores come back."""
    seen = {}

    class FakeMeteor:
        def compute_score(self, gts, res):
            seen["gts"], seen["res"] = gts, res
            return 0.25, [0.1 * i for i in range(len(gts))]

    meteor_module = pytest.importorskip("pycocoevalcap.meteor.meteor")
    monkeypatch.setattr(meteor_module, "Meteor", FakeMeteor)
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/java")
    hyps, refs = caption_sets()["varied"]
    scores = cm.score_captions(hyps, refs, with_meteor=True)
    assert scores.corpus["METEOR"] == 0.25
    np.testing.assert_allclose(scores.per_image["METEOR"], [0.1 * i for i in range(len(hyps))])
    assert seen["res"] == {i: [h] for i, h in enumerate(hyps)}
    assert seen["gts"] == {i: r for i, r in enumerate(refs)}


def test_meteor_failure_is_reported_not_raised(monkeypatch):
    class DeadMeteor:
        def compute_score(self, gts, res):
            raise ValueError("could not convert string to float: b''")

    meteor_module = pytest.importorskip("pycocoevalcap.meteor.meteor")
    monkeypatch.setattr(meteor_module, "Meteor", DeadMeteor)
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/java")
    hyps, refs = caption_sets()["varied"]
    scores = cm.score_captions(hyps, refs, with_meteor=True)
    assert scores.skipped["METEOR"].startswith("not computed: METEOR failed (ValueError")
    assert "CIDEr-D" in scores.corpus


@pytest.mark.slow
@pytest.mark.skipif(java_available() is not None, reason=f"needs Java: {java_available()}")
def test_meteor_equals_pycocoevalcap():
    meteor_module = pytest.importorskip("pycocoevalcap.meteor.meteor")
    hyps, refs = caption_sets()["varied"]
    expected, expected_images = meteor_module.Meteor().compute_score(
        {i: r for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)}
    )
    scores = cm.score_captions(hyps, refs, with_meteor=True)
    assert scores.corpus["METEOR"] == pytest.approx(expected, abs=TOLERANCE)
    np.testing.assert_allclose(scores.per_image["METEOR"], expected_images, atol=TOLERANCE)
