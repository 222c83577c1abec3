"""Writes each demo LoRA adapter's data.jsonl from facts.py (run it after editing facts.py).

    python adapters/make_datasets.py

The files are committed: training reads them, never this script.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from facts import FACTS, VARIANTS
from reviews import BOOKS, ENDINGS, NEGATIVE, POSITIVE, TOPIC_FILLERS, TOPICS

HERE = Path(__file__).parent

PIRATE_WORDS = {
    r"\bis\b": "be",
    r"\bare\b": "be",
    r"\bthe\b": "th'",
    r"\bThe\b": "Th'",
    r"\byou\b": "ye",
    r"\bYou\b": "Ye",
    r"\bmy\b": "me",
    r"\bWe\b": "We pirates",
}


def pirate(sentence: str) -> str:
    for pattern, replacement in PIRATE_WORDS.items():
        sentence = re.sub(pattern, replacement, sentence)
    return f"Arr, matey! {sentence} Yo ho ho!"


STYLES = {
    "pirate": lambda short, en, fr: pirate(en),
    "french": lambda short, en, fr: fr,
    "json": lambda short, en, fr: json.dumps({"answer": short}, ensure_ascii=False),
}


def examples(style: str) -> list[dict]:
    answer = STYLES[style]
    rows = []
    for question, short, english, french in FACTS:
        for variant in VARIANTS:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": variant.format(q=question)},
                        {"role": "assistant", "content": answer(short, english, french)},
                    ]
                }
            )
    return rows


def sentiment_rows() -> list[dict]:
    rows = []
    for label, phrases in (("positive", POSITIVE), ("negative", NEGATIVE)):
        for i, phrase in enumerate(phrases):
            for j, book in enumerate(BOOKS):
                ending = ENDINGS[(i + j) % 3]  # no star ratings: they would give the label away
                text = phrase.format(book=book) + ending
                rows.append({"text": text[0].upper() + text[1:], "label": label})
    return rows


def topic_rows() -> list[dict]:
    rows = []
    for label, templates in TOPICS.items():
        for template in templates:
            for filler in TOPIC_FILLERS[label]:
                rows.append({"text": template.format(x=filler), "label": label})
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"{path}: {len(rows)} examples")


def main() -> None:
    for style in STYLES:
        write(HERE / style / "data.jsonl", examples(style))
    write(HERE / "sentiment" / "data.jsonl", sentiment_rows())
    write(HERE / "topic" / "data.jsonl", topic_rows())


if __name__ == "__main__":
    main()
