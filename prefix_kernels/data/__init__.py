"""Small synthetic E2E-style table-to-text data shipped with the package (for `prefix-kernels demo`).

E2E (Novikova et al., 2017) pairs a restaurant's attribute table with a sentence describing it;
it is the first task of the prefix-tuning paper. Nothing can be downloaded where this package is
tested, so `make_e2e` generates a deterministic look-alike from templates; `e2e_synthetic.jsonl`
is its output with the default arguments (a test checks they agree).
"""

from __future__ import annotations

import json
import random
from importlib import resources

NAMES = ["Blue Spice", "The Eagle", "Aromi", "Cotto", "The Mill", "Zizzi", "Fitzbillies", "The Punter",
         "Green Man", "Loch Fyne", "The Wrestlers", "Strada", "Giraffe", "Wildwood", "Alimentum", "Clowns"]
FOODS = ["Italian", "French", "English", "Chinese", "Indian", "Japanese", "Fast food"]
AREAS = ["riverside", "city centre"]
PRICES = ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"]
RATINGS = ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"]
TYPES = ["restaurant", "pub", "coffee shop"]
NEAR = ["Café Rouge", "The Bakers", "Burger King", "Raja Indian Cuisine", "Crowne Plaza Hotel", "All Bar One"]

FILE = "e2e_synthetic.jsonl"


def _sentence(rng: random.Random, row: dict) -> str:
    name, kind = row["name"], row.get("eatType", "restaurant")
    parts = [f"{name} is a {row['food']} {kind}" if "food" in row else f"{name} is a {kind}"]
    if "area" in row:
        parts.append(rng.choice([f"in the {row['area']}", f"located in the {row['area']}"]))
    if "near" in row:
        parts.append(f"near {row['near']}")
    text = " ".join(parts) + "."
    if "priceRange" in row:
        text += rng.choice([f" It has a {row['priceRange']} price range.", f" Prices are {row['priceRange']}."])
    if "customer rating" in row:
        text += f" Customers rate it {row['customer rating']}."
    if "familyFriendly" in row:
        text += " It is family friendly." if row["familyFriendly"] == "yes" else " It is not family friendly."
    return text


def make_e2e(n: int = 600, seed: int = 0) -> list:
    """n rows of {"table": "name[...] | food[...] | ...", "text": "..."}, deterministic in seed."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        row = {"name": rng.choice(NAMES)}
        for key, values in (("eatType", TYPES), ("food", FOODS), ("priceRange", PRICES),
                            ("customer rating", RATINGS), ("area", AREAS), ("familyFriendly", ["yes", "no"]),
                            ("near", NEAR)):
            if rng.random() < 0.6:
                row[key] = rng.choice(values)
        table = " | ".join(f"{k}[{v}]" for k, v in row.items())
        rows.append({"table": table, "text": _sentence(rng, row)})
    return rows


def load_e2e() -> list:
    """The shipped rows."""
    text = resources.files(__package__).joinpath(FILE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
