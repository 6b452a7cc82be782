"""The quickstart's data: a small world made from a seed, text about it, and questions with checkable answers.

    world = make_world(seed=0)
    split = generate(world, seed=0)   # Split(train_text, train_qa, heldout_text, heldout_qa)

The world has people with habits: for each of five topics (drink, food, game, city, animal) a person has a
favourite. The text only mentions habits noisily: "Ada drinks tea." names Ada's favourite with probability
`FAVOURITE_P` and one of the seven other values otherwise, so a favourite can only be told by aggregating
many mentions. A question asks for it ("What does Ada usually drink?" -> "Usually Ada drinks tea."), so the
answer is checkable, and a model's next-token distribution after "Ada drinks" is exactly the knowledge it
needs to answer.

This is what gives distillation something to transfer. The teacher reads all the text and aggregates many
mentions of each (person, topic); a student reads a fifth of it. Trained with cross-entropy, a student learns
from the single value each of its sentences happens to name; distilled, it learns at the same positions the
teacher's whole distribution: the aggregate of mentions it never saw.

Splits: the (person, topic) pairs are divided once. A pair's questions are asked in training or held out,
never both, so a held-out question tests knowledge the model got from text, not a memorised answer.
Held-out documents come from their own random stream (same world, new sentences). Everything is a pure
function of the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = (
    "Ada Alan Alice Amir Anna Arlo Basil Bea Boris Carla Cyril Dana Dara Dmitri Edith Elena Elio Emil Enzo Erin "
    "Ezra Felix Flora Frida Gemma Gil Greta Gus Hana Hugo Ida Igor Ines Ira Ivan Jade Jonas Juno Kai Karl Kira "
    "Lars Lea Leo Lila Lina Luca Lucy Luis Mara Marco Maya Mila Milo Nadia Nell Nico Nina Noah Nora Olaf Olga "
    "Omar Otto Pablo Pia Quinn Rafa Raya Remy Rita Rosa Ruth Sami Sara Selma Silas Sofia Sven Tara Theo Tom Ugo "
    "Uma Vera Victor Wanda Wes Xena Yara Yusuf Zara Zeno Zoe Abel Bruno Clara Dario Elsa Fern Hilda Iris"
).split()


@dataclass(frozen=True)
class Topic:
    values: tuple[str, ...]
    mentions: tuple[str, ...]  # text templates, {p} person, {v} value
    questions: tuple[str, ...]
    answer: str  # the answer restates the fact in the text's own words, so text knowledge answers it


TOPICS: dict[str, Topic] = {
    "drink": Topic(("tea", "coffee", "milk", "juice", "cocoa", "cider", "lemonade", "water"),
                   ("{p} drinks {v}.", "{p} ordered a cup of {v}.", "{p} drinks {v} in the morning."),
                   ("What does {p} usually drink?", "What is {p}'s usual drink?", "What does {p} drink most often?"),
                   "Usually {p} drinks {v}."),
    "food": Topic(("bread", "rice", "soup", "cheese", "apples", "noodles", "pie", "fish"),
                  ("{p} eats {v}.", "{p} cooked {v} for dinner.", "{p} eats {v} at lunch."),
                  ("What does {p} usually eat?", "What is {p}'s usual food?", "What does {p} eat most often?"),
                  "Usually {p} eats {v}."),
    "game": Topic(("chess", "tennis", "cards", "golf", "soccer", "darts", "hockey", "poker"),
                  ("{p} plays {v}.", "{p} played {v} after work.", "{p} plays {v} on Sundays."),
                  ("Which game does {p} usually play?", "What is {p}'s usual game?", "What does {p} play most often?"),
                  "Usually {p} plays {v}."),
    "city": Topic(("Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Delhi", "Quito"),
                  ("{p} travels to {v}.", "{p} took the train to {v}.", "{p} travels to {v} in summer."),
                  ("Where does {p} usually travel?", "Which city does {p} usually visit?",
                   "Where does {p} travel most often?"),
                  "Usually {p} travels to {v}."),
    "animal": Topic(("cat", "dog", "parrot", "rabbit", "horse", "goat", "hamster", "turtle"),
                    ("{p} feeds the {v}.", "{p} walked the {v}.", "{p} feeds the {v} every day."),
                    ("Which animal does {p} usually feed?", "Which animal does {p} look after?",
                     "What does {p} feed most often?"),
                    "Usually {p} feeds the {v}."),
}
FILLER = ("{p} met {q} in town.", "{p} and {q} talked for a while.", "{p} wrote to {q}.",
          "{p} said the weather was {w}.", "{p} went home early.", "{q} called {p} in the evening.")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
WEATHER = ("sunny", "rainy", "cold", "warm", "windy", "quiet")
FAVOURITE_P = 0.7  # a mention names the favourite with this probability, one of the other values otherwise
HABIT_SHARE = 0.75  # share of a document's sentences that mention a habit (the rest is filler)


@dataclass(frozen=True)
class World:
    people: tuple[str, ...]
    favourite: dict[tuple[str, str], str]  # (person, topic) -> value
    heldout_pairs: frozenset[tuple[str, str]]  # pairs whose questions are asked only in the held-out split


@dataclass
class Split:
    train_text: list[str]
    train_qa: list[list[dict]]  # conversations: [user question, assistant answer]
    heldout_text: list[str]
    heldout_qa: list[list[dict]]


def make_world(seed: int, people: int = 48, heldout_fraction: float = 0.5) -> World:
    if not 1 <= people <= len(NAMES):
        raise ValueError(f"people must be in [1, {len(NAMES)}], found {people}.")
    rng = random.Random(f"world-{seed}")
    names = tuple(rng.sample(NAMES, people))
    favourite = {(p, t): rng.choice(TOPICS[t].values) for p in names for t in TOPICS}
    pairs = sorted(favourite)
    rng.shuffle(pairs)
    return World(names, favourite, frozenset(pairs[: round(len(pairs) * heldout_fraction)]))


def mention(world: World, rng: random.Random, person: str, topic: str) -> str:
    """One noisy sentence about a habit: the favourite with probability FAVOURITE_P, else another value."""
    spec, favourite = TOPICS[topic], world.favourite[person, topic]
    value = favourite if rng.random() < FAVOURITE_P else rng.choice([v for v in spec.values if v != favourite])
    return rng.choice(spec.mentions).format(p=person, v=value)


def document(world: World, rng: random.Random, sentences: int) -> str:
    """A day in the life of two people: habit mentions and filler. Long documents about a small cast teach
    the models early to copy names from context, which answering a question needs."""
    cast = rng.sample(world.people, 2)
    out = []
    for _ in range(sentences):
        if rng.random() < HABIT_SHARE:
            out.append(mention(world, rng, rng.choice(cast), rng.choice(list(TOPICS))))
        else:
            out.append(rng.choice(FILLER).format(p=cast[0], q=cast[1], w=rng.choice(WEATHER)))
    return f"On {rng.choice(DAYS)}, " + " ".join(out)


def question(world: World, rng: random.Random, person: str, topic: str) -> list[dict]:
    spec = TOPICS[topic]
    return [{"role": "user", "content": rng.choice(spec.questions).format(p=person)},
            {"role": "assistant", "content": spec.answer.format(p=person, v=world.favourite[person, topic])}]


def generate(world: World, seed: int, documents: int = 1200, sentences: int = 12, qa_repeats: int = 4,
             heldout_documents: int = 100) -> Split:
    """Training text and questions, and a held-out split drawn from a separate random stream."""
    rng_train, rng_heldout = random.Random(f"train-{seed}"), random.Random(f"heldout-{seed}")
    train_text = [document(world, rng_train, sentences) for _ in range(documents)]
    train_pairs = sorted(set(world.favourite) - world.heldout_pairs)
    train_qa = [question(world, rng_train, p, t) for p, t in train_pairs for _ in range(qa_repeats)]
    rng_train.shuffle(train_qa)
    heldout_text = [document(world, rng_heldout, sentences) for _ in range(heldout_documents)]
    heldout_qa = [question(world, rng_heldout, p, t) for p, t in sorted(world.heldout_pairs)]
    return Split(train_text, train_qa, heldout_text, heldout_qa)
