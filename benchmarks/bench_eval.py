"""Evaluation speed: our caption metrics against pycocoevalcap's, and exact Recall@K at COCO-test scale.

    python benchmarks/bench_eval.py                 # 5,000 images x 5 references; 25k x 5k embeddings
    python benchmarks/bench_eval.py --images 1000 --dim 512 --repeats 1   # quicker

Captions are synthetic but shaped like COCO's (templates over a few hundred words, 8-16 tokens,
punctuation, some repeated references), PTB-tokenised once up front, then scored by both
implementations on the same tokenised inputs; the scores are checked equal (1e-6) before any time is
reported. Times are the best of `--repeats` runs. Recall@K uses random unit vectors with 5 captions per
image (the 5k COCO test split), dim 2048 (Ovis2.5-2B's hidden size), in both directions.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovis_batch.eval import caption_metrics as cm
from ovis_batch.eval.ptb_tokenizer import java_available, java_ptb_tokenize, ptb_tokenize_many
from ovis_batch.eval.retrieval import retrieval_recall

SUBJECTS = [
    "A man", "A woman", "Two dogs", "A little girl", "A group of people", "An old red car", "The black cat",
    "A young boy", "Several birds", "A double-decker bus", "A giraffe", "Three zebras", "A chef", "A skier",
    "A surfer", "Two children", "A brown horse", "A large elephant", "A plate of food", "A teddy bear",
]  # fmt: skip
VERBS = [
    "riding", "sitting on", "standing next to", "looking at", "walking down", "playing with", "holding",
    "parked near", "eating", "flying over", "lying on", "jumping over", "carrying", "cooking", "watching",
]  # fmt: skip
OBJECTS = [
    "a wave", "the beach", "a wooden bench", "a busy street", "a frisbee", "a large pizza", "the kitchen counter",
    "a snowy hill", "a grassy field", "a tall tree", "a city sidewalk", "a white plate", "a laptop", "the ocean",
    "a fence", "a skateboard", "an umbrella", "a train station", "a clock tower", "a bowl of fruit",
]  # fmt: skip
TAILS = [
    "", " on a sunny day", " in the park", ", with trees behind it", " while it's raining", " near the water",
    " in front of a building", " at night", " (black and white photo)", " next to a stop sign",
]  # fmt: skip
ENDS = [".", ".", ".", "", " .", "!"]


def synthetic_captions(images: int, references: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    rng = np.random.default_rng(seed)

    def caption() -> str:
        parts = (SUBJECTS, VERBS, OBJECTS, TAILS, ENDS)
        subject, verb, obj, tail, end = (p[rng.integers(len(p))] for p in parts)
        return f"{subject} {verb} {obj}{tail}{end}"

    refs = [[caption() for _ in range(references)] for _ in range(images)]
    # hypotheses: usually a paraphrase-like sample, sometimes a copy of a reference
    hyps = [r[0] if rng.random() < 0.1 else caption() for r in refs]
    return hyps, refs


def best_time(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def ours_bleu(hyps, refs):
    stats = cm.bleu_stats(cm.NgramTable.build(hyps, refs, 4))
    return cm.corpus_bleu(stats), cm.per_image_bleu(stats)


def ours_cider(hyps, refs):
    return cm.cider_d(cm.NgramTable.build(hyps, refs, 4))


def caption_benchmarks(images: int, references: int, repeats: int) -> list[tuple[str, float, float | None]]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    raw_hyps, raw_refs = synthetic_captions(images, references)
    flat = raw_hyps + [r for refs in raw_refs for r in refs]
    rows = []
    t_python, tokens = best_time(lambda: ptb_tokenize_many(flat), 1)
    t_java = None
    if java_available() is None:
        t_java, java_tokens = best_time(lambda: java_ptb_tokenize(flat), 1)
        assert java_tokens == tokens, "Python and Java PTB tokenisations differ"
    rows.append(
        (
            f"PTB tokenisation of {len(flat)} captions (ours: Python; reference: the Java jar)",
            t_python,
            t_java,
        )
    )

    hyps = tokens[:images]
    refs = [tokens[images + i * references : images + (i + 1) * references] for i in range(images)]
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}

    t_ours, (bleu, bleu_images) = best_time(lambda: ours_bleu(hyps, refs), repeats)
    t_ref, (bleu_ref, bleu_images_ref) = best_time(
        lambda: Bleu(4).compute_score(gts, res, verbose=0), repeats
    )
    np.testing.assert_allclose(bleu, bleu_ref, atol=1e-6)
    np.testing.assert_allclose(bleu_images, np.array(bleu_images_ref).T, atol=1e-6)
    rows.append(("BLEU-1..4 (corpus + per image)", t_ours, t_ref))

    t_ours, (cider, cider_images) = best_time(lambda: ours_cider(hyps, refs), repeats)
    t_ref, (cider_ref, cider_images_ref) = best_time(lambda: Cider().compute_score(gts, res), repeats)
    assert abs(cider - cider_ref) < 1e-6
    np.testing.assert_allclose(cider_images, cider_images_ref, atol=1e-6)
    rows.append(("CIDEr-D", t_ours, t_ref))

    t_ours, (rouge, _) = best_time(lambda: cm.rouge_l(hyps, refs), repeats)
    t_ref, (rouge_ref, _) = best_time(lambda: Rouge().compute_score(gts, res), repeats)
    assert abs(rouge - rouge_ref) < 1e-6
    rows.append(("ROUGE-L", t_ours, t_ref))
    print(
        f"scores (equal in both): BLEU-4 {bleu[3]:.4f}  CIDEr-D {cider:.4f}  ROUGE-L {rouge:.4f}",
        file=sys.stderr,
    )
    return rows


def recall_benchmark(
    images: int, per_image: int, dim: int, repeats: int
) -> list[tuple[str, float, float | None]]:
    rng = np.random.default_rng(1)
    image_vectors = rng.normal(size=(images, dim)).astype(np.float32)
    text_image = np.repeat(np.arange(images), per_image)
    text_vectors = (image_vectors[text_image] + 2.0 * rng.normal(size=(len(text_image), dim))).astype(
        np.float32
    )
    t_ours, result = best_time(lambda: retrieval_recall(image_vectors, text_vectors, text_image), repeats)

    def full_matrix_argsort():
        # the usual notebook way: the whole matrix in memory, then a top-10 per row in both directions
        similarity = image_vectors @ text_vectors.T
        top_texts = np.argsort(-similarity, axis=1, kind="stable")[:, :10]
        top_images = np.argsort(-similarity.T, axis=1, kind="stable")[:, :10]
        return (text_image[top_texts] == np.arange(images)[:, None]).any(axis=1).mean(), (
            top_images == text_image[:, None]
        ).any(axis=1).mean()

    t_full, (i2t10, t2i10) = best_time(full_matrix_argsort, repeats)
    assert abs(i2t10 - result.image_to_text[10]) < 1e-9 and abs(t2i10 - result.text_to_image[10]) < 1e-9
    label = f"Recall@1/5/10 both directions, {images} images x {len(text_image)} texts, dim {dim}"
    return [(label + " (reference: full matrix + argsort)", t_ours, t_full)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--references", type=int, default=5)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rows = caption_benchmarks(args.images, args.references, args.repeats)
    rows += recall_benchmark(args.images, args.references, args.dim, args.repeats)
    print("| what | ours (s) | reference (s) | speed-up |")
    print("|---|---:|---:|---:|")
    for what, ours, reference in rows:
        ratio = f"{reference / ours:.1f}x" if reference else "n/a"
        print(
            f"| {what} | {ours:.2f} | {reference:.2f} | {ratio} |"
            if reference
            else f"| {what} | {ours:.2f} | n/a | n/a |"
        )


if __name__ == "__main__":
    main()
