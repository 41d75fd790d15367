"""Build a tiny, deterministic training fixture: data files, data config and a tiny BERT.

Usage:
    python scripts/make_tiny_data.py OUT [--lines N] [--seed S]

or, from tests (with scripts/ on sys.path):
    from make_tiny_data import build_fixture
    build_fixture(out_dir, lines_per_file=2000, seed=0)

It writes
    OUT/data/...jsonl.gz        one gzip'd JSON-lines file per line format of the real data
    OUT/data_config.json        every file, in the format of the published data_config.json
    OUT/data_config_pairs.json  only the sources whose rows are exactly two texts
    OUT/model/                  a 2-layer, 32-wide BERT plus a WordPiece tokenizer whose
                                vocab is built from the fixture text, loadable offline by transformers

The text is synthetic but not random noise: every row is built from one "fact"
(a verb, a noun, an adjective, a tool, maybe a place and a time, all from one topic),
rendered twice through different templates and synonyms. Partners therefore share
most content words in a different order, which a tiny model trained from scratch can
learn to match, so smoke runs show a falling loss and rising in-batch accuracy.

Everything depends only on --seed and --lines: each file has its own RNG seeded from
(seed, file name), gzip headers carry no name or time, and the model init is seeded.
"""

import argparse
import gzip
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for train_script; scripts/ is on the path already (run from it, or by the tests)

DEFAULT_LINES = 2000
MAX_POSITIONS = 128
TOKENIZER_VOCAB_SIZE = 1200
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] must be id 0

# --------------------------------------------------------------------------------------
# Vocabulary. "a/b" means a and b are synonyms: a paraphrase may swap one for the other.
# Grouping by topic keeps verb-noun combinations sensible ("prune a hedge", not
# "prune a laptop") and gives a batch several rows that share a topic, which makes
# in-batch retrieval a little harder than matching topics alone.
# --------------------------------------------------------------------------------------

TOPICS = {
    "food": dict(
        nouns="rice, soup/broth, bread/loaf, pasta/noodles, chicken/poultry, salad, cake/dessert, "
        "lentils/beans, steak/beef, salmon/fish, omelette, potatoes/spuds, vegetables/veggies, pie/tart, sauce/gravy",
        verbs="cook/prepare, bake/roast, store/keep, season/flavor, reheat/warm up, chop/slice, freeze/chill",
        tools="pan/skillet, oven/stove, knife/blade, pot/saucepan, microwave, ladle/spoon",
        places="in the kitchen/at home, at a campsite/outdoors, in a restaurant/at a diner",
    ),
    "vehicles": dict(
        nouns="car/automobile, truck/pickup, bicycle/bike, motorcycle/motorbike, scooter, van/minivan, "
        "tire/wheel, engine/motor, battery, brakes, windshield/windscreen, trailer",
        verbs="fix/repair, wash/clean, paint/repaint, park, sell/trade in, inspect/check, tune/service",
        tools="wrench/spanner, jack/lift, sponge/cloth, screwdriver, hose/sprayer, pump/compressor",
        places="in the garage/in the workshop, on the street/by the road, in the driveway",
    ),
    "pets": dict(
        nouns="dog/puppy, cat/kitten, parrot/bird, rabbit/bunny, hamster, horse/pony, turtle/tortoise, "
        "lizard/gecko, ferret, pig/piglet, goat, canary",
        verbs="feed, train/teach, bathe/wash, groom/brush, walk, adopt, calm/soothe",
        tools="leash/lead, comb/brush, treat/snack, crate/kennel, collar/harness, bowl/dish",
        places="at the park/in the park, at the vet/at the clinic, in the backyard/in the yard",
    ),
    "garden": dict(
        nouns="tomato/tomatoes, rose/roses, tree/sapling, lawn/grass, herbs, orchid, cactus/succulent, "
        "hedge/shrub, tulip/bulb, vine/creeper, fern, pumpkin/squash",
        verbs="water/irrigate, plant/sow, prune/trim, grow/cultivate, fertilize/nourish, protect/shield, "
        "transplant/repot",
        tools="shovel/spade, sprinkler/watering can, shears/clippers, rake, planter/pot, compost/mulch",
        places="in the garden/in the yard, on the balcony/on the patio, in a greenhouse",
    ),
    "devices": dict(
        nouns="laptop/notebook, phone/smartphone, printer, router/modem, tablet, camera, keyboard, "
        "monitor/screen, headphones/earbuds, television/tv, speaker, console",
        verbs="reset/restart, update/upgrade, charge/power, connect/pair, dust/wipe, repair/fix, configure/set up",
        tools="cable/cord, charger/adapter, microfiber cloth/wipe, manual/guide, app/application, software/program",
        places="at the office/at work, in the bedroom, at school/in class",
    ),
    "clothing": dict(
        nouns="shirt/blouse, jacket/coat, jeans/trousers, sweater/jumper, dress/gown, sneakers/shoes, "
        "boots, scarf, hat/cap, socks, tie/necktie, suit",
        verbs="wash/launder, iron/press, fold, sew/stitch, dry, store/pack away, mend/patch",
        tools="needle/thread, steamer, detergent/soap, hanger, dryer/tumble dryer, basket/hamper",
        places="in the laundry room/in the basement, in the closet/in the wardrobe, at the laundromat/at the cleaners",
    ),
    "furniture": dict(
        nouns="table/desk, chair/stool, shelf/bookcase, bed/mattress, sofa/couch, door, window, "
        "floor/carpet, wall, cabinet/cupboard, fence, roof",
        verbs="build/assemble, paint/stain, move/carry, install/mount, polish/shine, measure, level/straighten",
        tools="hammer/mallet, drill, saw, ladder/stepladder, roller/paintbrush, tape measure/ruler",
        places="in the living room/in the lounge, in the attic/upstairs, in the apartment/in the flat",
    ),
    "writing": dict(
        nouns="essay/paper, report/document, letter/email, resume/cv, thesis/dissertation, "
        "presentation/slides, poem/verse, story/novel, speech/talk, budget/spreadsheet, homework/assignment, blog post",
        verbs="write/draft, edit/revise, print, submit/hand in, read/review, translate, plan/outline",
        tools="pen/pencil, journal/notepad, computer/pc, dictionary/thesaurus, template, calculator",
        places="at the library, in the classroom/at university, at the cafe/in a coffee shop",
    ),
    "travel": dict(
        nouns="flight/plane ticket, hotel/inn, trip/journey, passport, suitcase/luggage, tent, "
        "train ticket, map, visa, cruise, backpack/rucksack, itinerary/route",
        verbs="book/reserve, plan/organize, pack, cancel, renew/extend, find/locate, compare",
        tools="website/site, travel agent/agency, guidebook, credit card/card, gps/navigation app, checklist/list",
        places="abroad/overseas, in europe, in the mountains/in the hills, at the airport",
    ),
    "fitness": dict(
        nouns="stamina/endurance, posture, knee/joint, back/spine, shoulder, diet/meals, "
        "balance, sleep/rest, running/jogging, swimming, squat, workout/routine",
        verbs="improve/boost, stretch/loosen, strengthen/build up, track/measure, protect/guard, "
        "practice/train, rebuild/restore",
        tools="dumbbell/weights, mat/yoga mat, treadmill, resistance band/band, stopwatch/timer, foam roller",
        places="at the gym/at the fitness center, at home/in my apartment, outdoors/outside",
    ),
}

ADJECTIVES = (
    "old/aged, new/brand new, small/little, big/large, cheap/inexpensive, expensive/pricey, "
    "broken/damaged, dirty/filthy, heavy/bulky, light/lightweight, favorite/beloved, red/crimson, "
    "blue/navy, black/dark, white/pale, wet/damp, fresh/recent, frozen/icy, rusty/corroded, "
    "noisy/loud, slow/sluggish, tiny/miniature, huge/giant, simple/basic, fancy/elegant, "
    "delicate/fragile, stubborn/tricky, shiny/glossy, warm/hot, cold/chilly, wooden, plastic, "
    "metal/steel, vintage/antique, homemade/handmade, borrowed/rented, spare/extra, local/nearby"
)
TIMES = (
    "in the morning/early in the day, at night/after dark, in winter/during the winter, "
    "in summer/during the summer, on weekends/on the weekend, every day/daily, "
    "after dinner/in the evening, in the rain/during a storm, on a budget/without much money, "
    "in a hurry/quickly, for the first time/as a beginner, before a holiday/before the holidays"
)
PEOPLE = (
    "friend/buddy, neighbor/neighbour, grandmother/grandma, father/dad, mother/mom, brother, "
    "sister, uncle, teacher/instructor, coworker/colleague, roommate/flatmate"
)
DURATIONS = "about ten minutes, half an hour, a couple of hours, most of the afternoon, two days, almost a week"

Concept = tuple  # the synonyms of one concept; the first is the most common surface form


def _concepts(spec: str) -> list:
    """Parse "a/b, c" into [("a", "b"), ("c",)]."""
    return [tuple(w.strip() for w in item.split("/")) for item in spec.split(",")]


TOPIC_TABLES = {name: {k: _concepts(v) for k, v in t.items()} for name, t in TOPICS.items()}
ADJ_TABLE, TIME_TABLE, PEOPLE_TABLE = _concepts(ADJECTIVES), _concepts(TIMES), _concepts(PEOPLE)
DURATION_LIST = [d.strip() for d in DURATIONS.split(",")]

# --------------------------------------------------------------------------------------
# Templates. Slots: {v} verb, {vg} gerund, {a_np}/{the_np}/{my_np} noun phrase with its
# adjective, {n} bare noun, {a_tool}/{the_tool}, {place}/{time} (" in the kitchen" or ""),
# {time_lead} ("in the morning, " or ""), plus filler-only slots filled from the topic.
# Question and statement templates put the same slots in different orders, so a
# paraphrase cannot be found by word position alone.
# --------------------------------------------------------------------------------------

QUESTIONS = [
    "how do i {v} {a_np}{place}{time}?",
    "what is the best way to {v} {a_np}{place}?",
    "{time_lead}how should i {v} {my_np}{place}?",
    "tips for {vg} {a_np}{place}{time}",
    "is it hard to {v} {a_np}{time}?",
    "{vg} {a_np}{place}{time} - where do i start?",
    "how can i {v} {the_np}{time}{place} without much effort?",
    "what do you need to {v} {a_np}{place}?",
    "any advice on {vg} {my_np}{time}?",
    "why is {vg} {a_np}{place} so difficult?",
    "best way of {vg} {a_np}{time}",
    "how long does it take to {v} {a_np}{place}?",
]
STATEMENTS = [
    "you can {v} {a_np} with {a_tool}{place}{time}.",
    "{time_lead}use {a_tool} to {v} {the_np}{place}.",
    "the easiest way to {v} {a_np} is with {a_tool}{time}.",
    "{a_tool} is all you need to {v} {the_np}{place}.",
    "to {v} {my_np}{place}, i always grab {a_tool}{time}.",
    "{vg} {a_np}{time} is simple if you have {a_tool}.",
    "{time_lead}i {v} {my_np} with {a_tool}{place}.",
    "with {a_tool}, {vg} {the_np}{place} takes only a few minutes.",
]
# Openings of a question body (Stack Exchange) and of a Reddit post: they describe the
# problem rather than answer it, like the real sources.
PROBLEMS = [
    "{time_lead}i have {a_np}{place} and i want to {v} it properly.",
    "i am trying to {v} {my_np}{place}{time} but i am not sure how.",
    "last week i bought {a_np} and now i need to {v} it{place}.",
    "every time i {v} {my_np}{time} something goes wrong.",
]
REDDIT_POSTS = [
    "just got {a_np}. any idea how to {v} {the_np}{place}?",
    "unpopular opinion: {vg} {a_np}{time} is overrated.",
    "does anyone else {v} {my_np}{place}{time}?",
    "{time_lead}i tried to {v} {my_np} and it went badly.",
    "what is your trick for {vg} {a_np}{place}?",
]
REDDIT_REPLIES = [
    "honestly just {v} {the_np} with {a_tool}, worked fine for my {n}{time}.",
    "{a_tool} changed everything for me when i {v} {my_np}{place}.",
    "same here, {vg} {the_np}{place} was a pain until i got {a_tool}.",
]
# Sentences that pad a long text. They mention the fact again (so long texts stay on
# topic) and add details from the same topic (so long texts are all different).
FILLERS = [
    "first, look closely at {the_np} before you start.",
    "make sure you have {a_tool} nearby.",
    "my {person} taught me to {v} {a_np2} the same way{time2}.",
    "do not rush, because {vg} {the_np} too fast can ruin the result.",
    "if you do not own {a_tool}, borrow one from your {person}.",
    "some people prefer {a_tool2} instead, but i find it harder to use.",
    "after that, leave {the_np} alone for a while{place2}.",
    "it took me {duration} to {v} {my_np} the first time.",
    "the result was much better than when i tried to {v2} {a_np2}{place2}.",
    "keep {the_tool} {place2_bare} so you can find it next time.",
    "a friend of mine says {vg} {a_np}{time2} works even better.",
    "in my experience, {adj2} ones are easier than {adj3} ones.",
    "you will need patience, {a_tool}, and a bit of practice.",
    "the whole process usually takes {duration}{time2}.",
    "my {person} still asks me how to {v} {a_np2}.",
]

_DOUBLE_FINAL_CONSONANT = {"chop", "trim", "repot", "reset", "submit", "plan", "set", "cut", "jog", "swim", "run"}


def _gerund(verb: str) -> str:
    """"cook" -> "cooking", "warm up" -> "warming up"; only needs to cover the verbs above."""
    head, *rest = verb.split(" ")
    if head in _DOUBLE_FINAL_CONSONANT:
        head = head + head[-1] + "ing"
    elif head.endswith("ie"):
        head = head[:-2] + "ying"
    elif head.endswith("e") and not head.endswith(("ee", "ye", "oe")):
        head = head[:-1] + "ing"
    else:
        head = head + "ing"
    return " ".join([head, *rest])


def _is_plural(noun: str) -> bool:
    last = noun.split(" ")[-1]
    return last.endswith("s") and not last.endswith(("ss", "us", "is"))


def _indefinite(phrase: str, head_noun: str) -> str:
    """Article for a noun phrase: "some" for plurals, "an" before a vowel, else "a"."""
    if _is_plural(head_noun):
        return "some " + phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


# --------------------------------------------------------------------------------------
# Facts and rendering
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    """What a row is about. Both sides of a positive pair render the same Fact."""

    topic: str
    verb: Concept
    noun: Concept
    adj: Concept
    tool: Concept
    place: Optional[Concept]
    time: Optional[Concept]


def _random_fact(rng: random.Random, topic: Optional[str] = None) -> Fact:
    topic = topic or rng.choice(sorted(TOPIC_TABLES))
    table = TOPIC_TABLES[topic]
    return Fact(
        topic=topic,
        verb=rng.choice(table["verbs"]),
        noun=rng.choice(table["nouns"]),
        adj=rng.choice(ADJ_TABLE),
        tool=rng.choice(table["tools"]),
        place=rng.choice(table["places"]) if rng.random() < 0.5 else None,
        time=rng.choice(TIME_TABLE) if rng.random() < 0.4 else None,
    )


def _related_fact(rng: random.Random, fact: Fact) -> Fact:
    """A hard negative: same topic and the same noun or verb, everything else redrawn."""
    other = _random_fact(rng, fact.topic)
    if rng.random() < 0.6:
        return replace(other, noun=fact.noun)
    return replace(other, verb=fact.verb)


def _pick(rng: random.Random, concept: Concept) -> str:
    """Usually the common word, sometimes a synonym: paraphrases share most words, not all."""
    return concept[0] if rng.random() < 0.6 else rng.choice(concept)


def _slots(rng: random.Random, fact: Fact) -> dict:
    """Surface words for one rendering of `fact`, plus random same-topic extras for fillers."""
    table = TOPIC_TABLES[fact.topic]
    verb, noun, adj, tool = (_pick(rng, c) for c in (fact.verb, fact.noun, fact.adj, fact.tool))
    place = _pick(rng, fact.place) if fact.place else ""
    when = _pick(rng, fact.time) if fact.time else ""
    noun2, tool2 = _pick(rng, rng.choice(table["nouns"])), _pick(rng, rng.choice(table["tools"]))
    np2 = _pick(rng, rng.choice(ADJ_TABLE)) + " " + noun2
    place2 = _pick(rng, rng.choice(table["places"]))
    return {
        "v": verb,
        "vg": _gerund(verb),
        "n": noun,
        "a_np": _indefinite(f"{adj} {noun}", noun),
        "the_np": f"the {adj} {noun}",
        "my_np": f"my {adj} {noun}",
        "a_tool": _indefinite(tool, tool),
        "the_tool": f"the {tool}",
        "place": " " + place if place else "",
        "time": " " + when if when else "",
        "time_lead": when + ", " if when else "",
        # filler-only slots
        "v2": _pick(rng, rng.choice(table["verbs"])),
        "a_np2": _indefinite(np2, noun2),
        "a_tool2": _indefinite(tool2, tool2),
        "place2": " " + place2 if rng.random() < 0.5 else "",
        "place2_bare": place2,
        "time2": " " + _pick(rng, rng.choice(TIME_TABLE)) if rng.random() < 0.3 else "",
        "adj2": _pick(rng, rng.choice(ADJ_TABLE)),
        "adj3": _pick(rng, rng.choice(ADJ_TABLE)),
        "person": _pick(rng, rng.choice(PEOPLE_TABLE)),
        "duration": rng.choice(DURATION_LIST),
    }


def _sentence(rng: random.Random, templates: list, fact: Fact, capitalize: bool = True) -> str:
    text = rng.choice(templates).format(**_slots(rng, fact))
    return text[0].upper() + text[1:] if capitalize else text


def _question(rng, fact):
    # Real question sources (Quora, WikiAnswers) are mostly lower case; keep them so.
    return _sentence(rng, QUESTIONS, fact, capitalize=rng.random() < 0.5)


def _statement(rng, fact):
    return _sentence(rng, STATEMENTS, fact)


def _passage(rng: random.Random, fact: Fact, min_words: int, max_words: int, opening=STATEMENTS) -> str:
    """An opening sentence about `fact`, then distinct filler sentences until the target
    length. Long passages (40-80 words) make truncation at small max_seq_length matter."""
    target = rng.randint(min_words, max_words)
    sentences = [_sentence(rng, opening, fact)]
    fillers = rng.sample(FILLERS, len(FILLERS))
    words = len(sentences[0].split())
    # Fillers run about 6-14 words: stopping once within 10 of the target keeps us near it.
    while fillers and words < target - 5:
        sentence = _sentence(rng, [fillers.pop()], fact)
        if words + len(sentence.split()) > max_words:
            continue
        sentences.append(sentence)
        words += len(sentence.split())
    return " ".join(sentences)


def _long(rng, fact, opening=STATEMENTS):
    return _passage(rng, fact, 40, 80, opening)


def _medium(rng, fact, opening=STATEMENTS):
    return _passage(rng, fact, 15, 35, opening)


# --------------------------------------------------------------------------------------
# One row builder per line format. Each takes an RNG and returns a JSON-able row.
# --------------------------------------------------------------------------------------


def _pair_row(rng: random.Random) -> list:
    """["text", "paraphrase"]: like WikiAnswers / Quora / PAQ pairs."""
    fact, r = _random_fact(rng), rng.random()
    if r < 0.45:
        return [_question(rng, fact), _question(rng, fact)]
    if r < 0.70:
        return [_statement(rng, fact), _statement(rng, fact)]
    if r < 0.85:
        return [_question(rng, fact), _statement(rng, fact)]
    return [_question(rng, fact), _long(rng, fact)]


def _triplet_row(rng: random.Random) -> list:
    """[anchor, positive, hard negative]: like AllNLI / quora_duplicates_triplets."""
    fact = _random_fact(rng)
    negative = _related_fact(rng, fact)
    render = _question if rng.random() < 0.4 else _statement
    positive = _medium(rng, fact) if rng.random() < 0.1 else render(rng, fact)
    return [render(rng, fact), positive, render(rng, negative)]


def _title_body_row(rng: random.Random) -> dict:
    """{"texts": [title, body]}: like stackexchange_title_body; bodies are mostly long."""
    fact = _random_fact(rng)
    body = _long(rng, fact, PROBLEMS) if rng.random() < 0.7 else _medium(rng, fact, PROBLEMS)
    return {"texts": [_question(rng, fact), body]}


def _set_row(rng: random.Random) -> dict:
    """{"set": [q1, q2, ...]}: 2-5 duplicate questions, like quora_duplicates / WikiAnswers."""
    fact = _random_fact(rng)
    return {"set": [_question(rng, fact) for _ in range(rng.randint(2, 5))]}


def _msmarco_row(rng: random.Random) -> dict:
    """{"query", "pos", "neg"}: a short search query, answering and near-miss passages."""
    fact = _random_fact(rng)
    slots = _slots(rng, fact)
    query = rng.choice(["{v} {a_np}{place}", "how to {v} {n}{time}", "{vg} {n} with {a_tool}"]).format(**slots)

    def passage(f: Fact) -> str:
        return _long(rng, f) if rng.random() < 0.3 else _medium(rng, f)

    positives = [passage(fact) for _ in range(rng.randint(1, 2))]
    negatives = [passage(_related_fact(rng, fact)) for _ in range(rng.randint(2, 4))]
    return {"query": query, "pos": positives, "neg": negatives}


def _reddit_row(rng: random.Random) -> dict:
    """{"context", "response"}: the shape of the reddit/reddit_*.jsonl.gz files."""
    fact = _random_fact(rng)
    context = _sentence(rng, REDDIT_POSTS + QUESTIONS, fact, capitalize=False)
    if rng.random() < 0.2:
        response = _long(rng, fact, REDDIT_REPLIES)
    else:
        response = _sentence(rng, REDDIT_REPLIES + STATEMENTS, fact, capitalize=False)
    return {"context": context, "response": response}


@dataclass(frozen=True)
class Source:
    name: str  # path relative to OUT/data, as in data_config.json
    weight: int
    two_column: bool  # every row is exactly two texts -> also listed in data_config_pairs.json
    make_row: Callable[[random.Random], object]


# Names echo the real files. Reddit sits in reddit/ and keeps "reddit_" in its name
# because the original train_script picks its Reddit reader by that substring.
SOURCES = [
    Source("paraphrase_pairs.jsonl.gz", 5, True, _pair_row),
    Source("stackexchange_title_body/tiny.stackexchange.com.jsonl.gz", 3, True, _title_body_row),
    Source("reddit/reddit_tiny.jsonl.gz", 4, True, _reddit_row),
    Source("duplicate_question_sets.jsonl.gz", 2, False, _set_row),
    Source("nli_triplets.jsonl.gz", 1, False, _triplet_row),
    Source("msmarco_query_pos_neg.jsonl.gz", 2, False, _msmarco_row),
]

# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _texts_of(row) -> list:
    """All strings in a row, whatever its format."""
    if isinstance(row, str):
        return [row]
    values = row.values() if isinstance(row, dict) else row
    return [t for v in values for t in _texts_of(v)]


def _unique_rows(rng: random.Random, make_row, n: int) -> list:
    """n rows whose texts are all distinct across the file: the producer skips duplicate
    texts within a batch, and retrieval tests need every text to have one true partner."""
    seen, rows = set(), []
    while len(rows) < n:
        for _ in range(1000):
            row = make_row(rng)
            texts = _texts_of(row)
            if len(set(texts)) == len(texts) and seen.isdisjoint(texts):
                break
        else:
            raise RuntimeError("could not generate a unique row; the vocabulary is too small")
        seen.update(texts)
        rows.append(row)
    return rows


def _write_jsonl_gz(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # filename="" and mtime=0 keep the gzip header free of the path and the clock,
    # so the same seed gives byte-identical files wherever they are written.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row) + "\n").encode("utf-8"))


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=4) + "\n")


def _write_data(out_dir: Path, lines_per_file: int, seed: int) -> list:
    """Write every source; return all texts (in a fixed order) for tokenizer training."""
    all_texts, config = [], []
    for source in SOURCES:
        # One RNG per file, seeded by name, so files do not depend on each other's order.
        rows = _unique_rows(random.Random(f"{seed}:{source.name}"), source.make_row, lines_per_file)
        _write_jsonl_gz(out_dir / "data" / source.name, rows)
        all_texts.extend(t for row in rows for t in _texts_of(row))
        config.append({"name": source.name, "lines": len(rows), "weight": source.weight})
    _write_json(out_dir / "data_config.json", config)
    pair_names = {s.name for s in SOURCES if s.two_column}
    _write_json(out_dir / "data_config_pairs.json", [c for c in config if c["name"] in pair_names])
    return all_texts


def _word_counts(texts: list) -> Counter:
    """Count words exactly as the BERT tokenizer will see them (lowercased, punctuation
    split off), using the tokenizers library's own BERT normalizer and pre-tokenizer."""
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    return counts


def _by_count(counts: Counter) -> list:
    """Most frequent first, ties alphabetical: a total order, so the vocab is reproducible."""
    return [key for key, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _wordpiece_vocab(counts: Counter, size: int) -> list:
    """A WordPiece vocab: special tokens, every character (word-initial and "##"),
    the frequent whole words, then frequent "##" word endings to fill up to `size`.

    Why not tokenizers.trainers.WordPieceTrainer: its merges break ties in Rust
    hash-map order, so two runs on the same text give different vocabularies (checked
    with tokenizers 0.22), and the fixture must be reproducible from --seed alone.
    Word endings keep real WordPiece behaviour: an unseen "cooked" becomes "cook ##ed".
    """
    chars = sorted({c for word in counts for c in word})
    vocab = SPECIAL_TOKENS + chars + ["##" + c for c in chars]
    vocab += [w for w in _by_count(counts) if len(w) > 1][: size - len(vocab)]
    endings = Counter()
    for word, n in counts.items():
        for start in range(max(1, len(word) - 5), len(word) - 1):  # endings of 2-5 characters
            endings["##" + word[start:]] += n
    vocab += _by_count(endings)[: size - len(vocab)]
    return vocab


def _write_tokenizer(model_dir: Path, texts: list):
    """Build the vocab from the fixture text and save it as a lowercase BertTokenizerFast
    (loading from vocab.txt gives exactly BERT's usual normalizer, pre-tokenizer and
    [CLS] ... [SEP] template)."""
    from transformers import BertTokenizerFast

    model_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = model_dir / "vocab.txt"
    vocab = _wordpiece_vocab(_word_counts(texts), TOKENIZER_VOCAB_SIZE)
    vocab_file.write_text("".join(token + "\n" for token in vocab))
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True, model_max_length=MAX_POSITIONS)
    assert tokenizer.pad_token_id == 0, "padding code assumes [PAD] is id 0"
    tokenizer.save_pretrained(str(model_dir))
    return tokenizer


def _write_model(model_dir: Path, vocab_size: int, seed: int) -> None:
    # train_script first, as every caller in the tests and scripts/ has it: its settings (the
    # filter on transformers' Flax deprecation notice, the RBG random generator that draws the
    # init) then hold for this model too, so `make smoke` and the tests build the same fixture.
    import train_script  # noqa: F401
    from transformers import BertConfig, FlaxBertModel

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=0,
    )  # dropout stays at BERT's default 0.1
    FlaxBertModel(config, seed=seed).save_pretrained(str(model_dir))


def build_fixture(out_dir, lines_per_file: int = DEFAULT_LINES, seed: int = 0) -> None:
    """Write OUT/data/, OUT/data_config.json, OUT/data_config_pairs.json and OUT/model/."""
    out_dir = Path(out_dir)
    texts = _write_data(out_dir, lines_per_file, seed)
    tokenizer = _write_tokenizer(out_dir / "model", texts)
    _write_model(out_dir / "model", len(tokenizer), seed)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder (created if missing)")
    parser.add_argument("--lines", type=int, default=DEFAULT_LINES, help="rows per data file")
    parser.add_argument("--seed", type=int, default=0, help="seed for text generation and model init")
    args = parser.parse_args(argv)
    start = time.time()
    build_fixture(args.out, lines_per_file=args.lines, seed=args.seed)
    print(f"wrote fixture to {args.out} in {time.time() - start:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
