"""A varied caption set for metric tests: punctuation, casing, unicode, an empty prediction, 1 to 5 references.

No caption ends in a bare single letter plus period or in "ca."/"no."/"pp.": there the COCO toolkit's
own tokenisation depends on the next caption in its file (see `ovis_batch.eval.ptb_tokenizer`).
"""

from __future__ import annotations

import random

VARIED_CAPTIONS: list[tuple[str, list[str]]] = [
    (
        "A man riding a wave on top of a surfboard.",
        [
            "A man riding a wave on top of a surfboard.",
            "A surfer rides a large wave in the ocean.",
            "a person on a surf board riding a wave",
            "A man on a surfboard catching a wave!",
            "Surfer in black wetsuit riding a big wave.",
        ],
    ),
    ("", ["Two dogs playing with a frisbee in the park.", "Dogs run on the grass."]),
    (
        "TWO DOGS PLAYING IN THE SNOW!!!",
        ["Two dogs play in the snow.", "A pair of dogs in the snow , running ."],
    ),
    (
        "A café in São Paulo — with naïve décor…",
        ["A small café with tables outside.", "The façade of a coffee shop in Brazil."],
    ),
    ('The sign says "STOP" (in red).', ["A red stop sign on a pole.", 'A sign reading "stop" at a corner.']),
    ("It's a cat; it isn't a dog, and it can't fly.", ["A cat sitting on a window sill."]),
    (
        "3 giraffes, 2 zebras & 1 elephant at 5:30pm",
        [
            "Three giraffes and two zebras near an elephant.",
            "Animals at a watering hole in the evening.",
            "Giraffes, zebras, and an elephant together.",
        ],
    ),
    ("🐶 a puppy 🐶 on a sofa", ["A puppy sleeping on a couch.", "A small dog on a sofa."]),
    (
        "a black-and-white photo of a 1950s diner",
        [
            "An old diner in black and white.",
            "Black-and-white image of a retro restaurant.",
            "A vintage photograph of a diner's counter.",
            "People sitting at a counter in an old diner.",
        ],
    ),
    ("Pizza!", ["A pizza with pepperoni and cheese on a table.", "A large pizza on a wooden board."]),
    ("Ein Hund läuft am Strand entlang.", ["A dog running along the beach."]),
    ("A bus, a bus, a bus, a bus.", ["A red double-decker bus on a street.", "A bus driving down the road."]),
    (
        "Close-up of a cat's face; its eyes are green!",
        ["A close up of a cat with green eyes.", "The face of a tabby cat.", "A cat's green eyes, up close."],
    ),
    ("U.S. flag waving over a building", ["An American flag on top of a building."]),
    ("A train (engine no. 4501) pulls into the station.", ["A steam train arriving at a platform."]),
    ("Ελληνικό ΚΑΦΕ στην πλατεία", ["A Greek coffee shop in a square.", "Cafe tables in a town square."]),
    ("a plate of food with broccoli , rice and chicken", ["A plate with chicken, rice and broccoli."]),
    ("Skier... jumping?!", ["A skier jumping off a ramp in the snow.", "A person doing a ski jump."]),
    ("   ", ["An empty room with white walls."]),
    ("$5 hot dogs at a stand", ["A hot dog stand with a price sign.", "People buying hot dogs from a cart."]),
]

WORDS = [
    "a",
    "an",
    "the",
    "man",
    "woman",
    "dog",
    "cat",
    "two",
    "people",
    "sitting",
    "standing",
    "on",
    "in",
    "of",
    "with",
    "near",
    "next",
    "to",
    "table",
    "street",
    "car",
    "red",
    "blue",
    "large",
    "small",
    "group",
    "riding",
    "horse",
    "beach",
    "water",
    "tree",
    "grass",
    "building",
    "sign",
    "white",
    "black",
    "young",
    "playing",
    "ball",
    "kitchen",
    "pizza",
    "plate",
    "bus",
    "train",
    "clock",
    "sky",
    "field",
]


def random_caption_set(seed: int, n: int) -> list[tuple[str, list[str]]]:
    """n images: a random hypothesis (sometimes empty or one word) and 1 to 5 random references."""
    rng = random.Random(seed)

    def sentence(low: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, 14)))

    return [(sentence(0), [sentence(1) for _ in range(rng.randint(1, 5))]) for _ in range(n)]
