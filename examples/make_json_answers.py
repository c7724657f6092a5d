"""Writes the example dataset that teaches a new answer format: every reply is one line of
JSON, {"answer": "..."}. Short factual questions (arithmetic, capitals, opposites,
uppercase, plurals); the held-out prompts use numbers, countries and words not in training.

    python examples/make_json_answers.py   # rewrites examples/json_answers*.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Egypt": "Cairo", "Canada": "Ottawa", "Russia": "Moscow",
    "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw",
    "Austria": "Vienna", "Ireland": "Dublin", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
    "Cuba": "Havana", "Thailand": "Bangkok", "Turkey": "Ankara", "Iran": "Tehran", "India": "New Delhi",
    "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Hungary": "Budapest", "Belgium": "Brussels",
    "Denmark": "Copenhagen", "Netherlands": "Amsterdam", "Australia": "Canberra", "Brazil": "Brasilia",
    "South Korea": "Seoul", "Vietnam": "Hanoi", "Colombia": "Bogota", "Nigeria": "Abuja",
}
HELD_OUT_COUNTRIES = {"Japan", "Norway", "Peru", "Kenya", "Austria"}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "up": "down",
    "open": "closed", "early": "late", "hard": "soft", "old": "new", "rich": "poor", "full": "empty",
    "strong": "weak", "high": "low", "wet": "dry", "long": "short", "thick": "thin", "near": "far",
    "loud": "quiet", "clean": "dirty", "true": "false", "win": "lose", "buy": "sell", "day": "night",
}
HELD_OUT_OPPOSITES = {"wet", "loud", "buy", "thick"}
WORDS = ["cat", "dog", "tree", "house", "river", "apple", "chair", "cloud", "stone", "bird", "book",
         "lamp", "road", "ship", "star", "table", "window", "garden", "pencil", "rocket"]
HELD_OUT_WORDS = {"garden", "pencil", "rocket"}
PLURALS = {"cat": "cats", "box": "boxes", "child": "children", "mouse": "mice", "city": "cities",
           "man": "men", "tooth": "teeth", "foot": "feet", "leaf": "leaves", "baby": "babies",
           "bus": "buses", "knife": "knives", "goose": "geese", "story": "stories", "wolf": "wolves"}
HELD_OUT_PLURALS = {"goose", "story", "wolf"}


def items(held_out: bool, rng: random.Random) -> list[tuple[str, str]]:
    out = []
    for country, capital in CAPITALS.items():
        if (country in HELD_OUT_COUNTRIES) == held_out:
            q = rng.choice(["What is the capital of {}?", "Name the capital city of {}.", "Which city is the capital of {}?"])
            out.append((q.format(country), capital))
    for word, opp in OPPOSITES.items():
        if (word in HELD_OUT_OPPOSITES) == held_out:
            q = rng.choice(["What is the opposite of '{}'?", "Give the antonym of the word {}."])
            out.append((q.format(word), opp))
    for word in WORDS:
        if (word in HELD_OUT_WORDS) == held_out:
            out.append((f"Write the word '{word}' in uppercase letters.", word.upper()))
    for word, plural in PLURALS.items():
        if (word in HELD_OUT_PLURALS) == held_out:
            out.append((f"What is the plural of '{word}'?", plural))
    pairs = [(a, b) for a in range(2, 20) for b in range(2, 20)]
    rng.shuffle(pairs)
    # Training sums use a+b < 30 with a even; held-out sums use a odd, so no question repeats.
    sums = [(a, b) for a, b in pairs if (a % 2 == 1) == held_out][: (6 if held_out else 160)]
    for a, b in sums:
        q = rng.choice(["What is {} plus {}?", "Add {} and {}.", "How much is {} + {}?"])
        out.append((q.format(a, b), str(a + b)))
    return out


def main() -> None:
    rng = random.Random(0)
    here = Path(__file__).parent
    train = items(False, rng)
    rng.shuffle(train)
    with (here / "json_answers.jsonl").open("w") as fh:
        for q, a in train:
            fh.write(json.dumps({"instruction": q, "input": "", "output": json.dumps({"answer": a})}) + "\n")
    held = items(True, rng)
    with (here / "json_answers_heldout.jsonl").open("w") as fh:
        for q, a in held:
            fh.write(json.dumps({"prompt": q, "expected": a}) + "\n")
    print(f"{len(train)} training rows, {len(held)} held-out prompts")


if __name__ == "__main__":
    main()
