"""Phrases behind the demo head datasets (book-review sentiment, question topic).

Written for this project. make_datasets.py combines them into each head's data.jsonl; the
held-out sentences the tests score live in tests/, not here.
"""

BOOKS = [
    "this novel", "the book", "this memoir", "the sequel", "this thriller", "the biography",
    "this collection of stories", "the cookbook", "this fantasy saga", "the mystery",
]

POSITIVE = [
    "I loved {book}; I could not put it down",
    "{book} is a wonderful, moving read",
    "an absolute delight from start to finish, {book} is brilliant",
    "{book} was beautifully written and deeply satisfying",
    "one of the best things I have read this year, {book} is superb",
    "the characters in {book} felt real and I adored them",
    "{book} made me laugh and cry, a true gem",
    "I would happily read {book} again, it is excellent",
    "{book} is gripping, clever and warm",
    "highly recommended: {book} is a masterpiece",
    "{book} exceeded every expectation I had",
    "what a joy {book} was, charming and smart",
]

NEGATIVE = [
    "I hated {book}; it was a chore to finish",
    "{book} is dull, slow and badly written",
    "a complete waste of time, {book} is awful",
    "{book} was boring and deeply disappointing",
    "one of the worst things I have read this year, {book} is terrible",
    "the characters in {book} were flat and I could not care less",
    "{book} made me want to throw it across the room",
    "I regret buying {book}, it is poor",
    "{book} is tedious, clumsy and cold",
    "avoid it: {book} is a mess",
    "{book} fell far short of every expectation I had",
    "what a letdown {book} was, predictable and shallow",
]

ENDINGS = ["", ".", "!", " Five stars." , " One star."]

TOPICS = {
    "science": [
        "Why do {x} glow in the dark?", "How does {x} affect the climate?", "What is {x} made of at the atomic level?",
        "How do scientists measure {x}?", "Can {x} be observed with a telescope?", "What causes {x} in a chemical reaction?",
    ],
    "sports": [
        "Who won the {x} final last season?", "How many players are on a {x} team?", "What are the rules of {x}?",
        "How do I train for a {x} match?", "Which {x} club has the most titles?", "How long does a {x} game last?",
    ],
    "cooking": [
        "How long should I bake {x}?", "What spices go well with {x}?", "Can I freeze {x} after cooking it?",
        "What is the best recipe for {x}?", "How do I stop {x} from burning in the pan?", "Should {x} be served hot or cold?",
    ],
    "travel": [
        "What is the cheapest way to get to {x}?", "Do I need a visa to visit {x}?", "When is the best season to visit {x}?",
        "Which hotels in {x} are near the center?", "How many days should I spend in {x}?", "Is it safe to travel alone in {x}?",
    ],
}

TOPIC_FILLERS = {
    "science": ["fireflies", "carbon dioxide", "a neutron star", "volcanic ash", "ocean currents", "a comet", "rust", "lightning", "a black hole", "photosynthesis"],
    "sports": ["football", "basketball", "tennis", "rugby", "volleyball", "cricket", "hockey", "baseball", "handball", "water polo"],
    "cooking": ["bread", "chicken", "lasagna", "a cheesecake", "rice", "salmon", "pancakes", "a pumpkin pie", "soup", "dumplings"],
    "travel": ["Lisbon", "Japan", "Peru", "Iceland", "Morocco", "Vietnam", "Canada", "Greece", "Kenya", "Norway"],
}
