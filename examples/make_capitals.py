"""Builds examples/data/capitals-{train,eval}.jsonl: questions about capitals answered in a fixed
JSON format that the base model does not use on its own. Held-out countries go to eval.
Also capitals-prefs-{train,eval}.jsonl for DPO: the JSON answer is preferred over a prose one.

    python examples/make_capitals.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "United Kingdom": "London",
    "Ireland": "Dublin",
    "Netherlands": "Amsterdam",
    "Belgium": "Brussels",
    "Austria": "Vienna",
    "Switzerland": "Bern",
    "Poland": "Warsaw",
    "Czech Republic": "Prague",
    "Hungary": "Budapest",
    "Greece": "Athens",
    "Sweden": "Stockholm",
    "Norway": "Oslo",
    "Denmark": "Copenhagen",
    "Finland": "Helsinki",
    "Iceland": "Reykjavik",
    "Russia": "Moscow",
    "Ukraine": "Kyiv",
    "Romania": "Bucharest",
    "Bulgaria": "Sofia",
    "Serbia": "Belgrade",
    "Croatia": "Zagreb",
    "Turkey": "Ankara",
    "Egypt": "Cairo",
    "Morocco": "Rabat",
    "Kenya": "Nairobi",
    "Nigeria": "Abuja",
    "Ghana": "Accra",
    "Ethiopia": "Addis Ababa",
    "South Africa": "Pretoria",
    "Algeria": "Algiers",
    "Tunisia": "Tunis",
    "Senegal": "Dakar",
    "Japan": "Tokyo",
    "China": "Beijing",
    "South Korea": "Seoul",
    "India": "New Delhi",
    "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Indonesia": "Jakarta",
    "Philippines": "Manila",
    "Malaysia": "Kuala Lumpur",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Saudi Arabia": "Riyadh",
    "Israel": "Jerusalem",
    "Jordan": "Amman",
    "Lebanon": "Beirut",
    "Syria": "Damascus",
    "Afghanistan": "Kabul",
    "Nepal": "Kathmandu",
    "Mongolia": "Ulaanbaatar",
    "Australia": "Canberra",
    "New Zealand": "Wellington",
    "Canada": "Ottawa",
    "United States": "Washington, D.C.",
    "Mexico": "Mexico City",
    "Cuba": "Havana",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Chile": "Santiago",
    "Peru": "Lima",
    "Colombia": "Bogota",
    "Venezuela": "Caracas",
    "Ecuador": "Quito",
    "Uruguay": "Montevideo",
    "Paraguay": "Asuncion",
    "Bolivia": "Sucre",
    "Jamaica": "Kingston",
    "Qatar": "Doha",
    "Kuwait": "Kuwait City",
    "Oman": "Muscat",
    "Sri Lanka": "Colombo",
    "Singapore": "Singapore",
    "Estonia": "Tallinn",
    "Latvia": "Riga",
    "Lithuania": "Vilnius",
    "Slovakia": "Bratislava",
    "Slovenia": "Ljubljana",
    "Luxembourg": "Luxembourg",
}
QUESTIONS = [
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "Name the capital city of {c}.",
    "Tell me the capital of {c}.",
]


def answer(country: str, capital: str) -> str:
    return json.dumps({"country": country, "capital": capital})


def main() -> None:
    rng = random.Random(0)
    countries = sorted(CAPITALS)
    rng.shuffle(countries)
    held_out = set(countries[:16])
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    train, evals = [], []
    for country in countries:
        for q in QUESTIONS if country not in held_out else QUESTIONS[:2]:
            row = {"instruction": q.format(c=country), "output": answer(country, CAPITALS[country])}
            (evals if country in held_out else train).append(row)
    rng.shuffle(train)

    def prefs(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        out = []
        for r in rows:
            data = json.loads(r["output"])
            prose = f"The capital of {data['country']} is {data['capital']}."
            out.append({"prompt": r["instruction"], "chosen": r["output"], "rejected": prose})
        return out

    for name, rows in (
        ("capitals-train.jsonl", train),
        ("capitals-eval.jsonl", evals),
        ("capitals-prefs-train.jsonl", prefs(train)),
        ("capitals-prefs-eval.jsonl", prefs(evals)),
    ):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{out / name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
