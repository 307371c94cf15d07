"""Generate the built-in counterfactual probe suites shipped in ``ctx_callback/data/``.

The three suites are built from small fact tables authored in this file:

- ``world_facts.jsonl``: capitals, currencies, languages, landmark cities, continents and chemical symbols.
  The context states a plausible wrong answer of the same type (another city of the same country, another
  currency, ...); the aligned context is the same passage rendered from the same template with the true answer.
- ``biographies.jsonl``: short biographies that attribute a famous work (novel, play, painting, invention,
  theory, composition, film, ...) to an invented person whose name is drawn from fixed first-name and
  last-name pools.
- ``quotes.jsonl``: MemoTrap-style probes. The context is an instruction to end a famous saying with a different
  word; the question gives the saying without its last word. The answers are the final words (the counterfactual
  word named by the instruction vs. the original one); the full sentences are kept in ``metadata``.

Every passage template is used by several probes so the position of the answer in the passage varies
(start, middle, end). The output is deterministic: the only randomness is ``random.Random(SEED)``, so running
the script twice produces byte-identical files.

Usage:
    Regenerate the suites (writes into ``ctx_callback/data/`` and prints per-family counts)::

        python scripts/build_suites.py

    Only validate the files already on disk against the suite rules::

        python scripts/build_suites.py --check
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

SEED = 20240607
DATA_DIR = Path(__file__).resolve().parent.parent / "ctx_callback" / "data"
FAMILIES = ("world_facts", "biographies", "quotes")
KEYS = (
    "id", "family", "context", "aligned_context", "question", "counterfactual_answer", "parametric_answer",
    "counterfactual_aliases", "parametric_aliases", "metadata",
)


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def slug(text: str) -> str:
    """ASCII, lower-case, underscore-separated identifier for ``text``."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")


def cap(text: str) -> str:
    """Upper-case the first character only (keeps names such as ``the United States`` intact elsewhere)."""
    return text[:1].upper() + text[1:]


def article(word: str) -> str:
    """``a`` or ``an`` followed by ``word``."""
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def tidy(text: str) -> str:
    """Collapse double periods produced by answers that end with a period (``Washington, D.C.``)."""
    return re.sub(r"\.\.(?!\.)", ".", " ".join(text.split()))


def render(template: str, **values: str) -> str:
    """Format ``template``; ``{Key}`` placeholders get the capitalized value of ``key``."""
    full = dict(values)
    for key, value in values.items():
        full[cap(key)] = cap(value)
    return tidy(template.format(**full))


def record(**fields) -> dict:
    return {key: fields[key] for key in KEYS}


# ---------------------------------------------------------------------------------------------------------------
# world_facts
# ---------------------------------------------------------------------------------------------------------------

# (country as used in a sentence, capital, counterfactual city of the same country, capital aliases, cf aliases)
CAPITALS = [
    ("France", "Paris", "Lyon", [], []),
    ("Germany", "Berlin", "Munich", [], []),
    ("Italy", "Rome", "Milan", [], []),
    ("Spain", "Madrid", "Barcelona", [], []),
    ("the United Kingdom", "London", "Manchester", [], []),
    ("Japan", "Tokyo", "Osaka", [], []),
    ("China", "Beijing", "Shanghai", ["Peking"], []),
    ("Russia", "Moscow", "Kazan", [], []),
    ("the United States", "Washington, D.C.", "Chicago", ["Washington", "Washington D.C.", "Washington DC"], []),
    ("Canada", "Ottawa", "Calgary", [], []),
    ("Australia", "Canberra", "Adelaide", [], []),
    ("Mexico", "Mexico City", "Guadalajara", [], []),
    ("Brazil", "Brasília", "Salvador", ["Brasilia"], []),
    ("Argentina", "Buenos Aires", "Córdoba", [], ["Cordoba"]),
    ("Egypt", "Cairo", "Alexandria", [], []),
    ("India", "New Delhi", "Chennai", ["Delhi"], []),
    ("Greece", "Athens", "Thessaloniki", [], []),
    ("Portugal", "Lisbon", "Porto", [], []),
    ("Belgium", "Brussels", "Antwerp", [], []),
    ("Austria", "Vienna", "Salzburg", [], []),
    ("Switzerland", "Bern", "Basel", ["Berne"], []),
    ("Sweden", "Stockholm", "Gothenburg", [], []),
    ("Norway", "Oslo", "Bergen", [], []),
    ("Denmark", "Copenhagen", "Aarhus", [], []),
    ("Finland", "Helsinki", "Tampere", [], []),
    ("Poland", "Warsaw", "Kraków", [], ["Krakow"]),
    ("Ireland", "Dublin", "Cork", [], []),
    ("Hungary", "Budapest", "Debrecen", [], []),
    ("the Czech Republic", "Prague", "Brno", [], []),
    ("Turkey", "Ankara", "Izmir", [], []),
    ("Iran", "Tehran", "Isfahan", [], []),
    ("Iraq", "Baghdad", "Basra", [], []),
    ("Saudi Arabia", "Riyadh", "Jeddah", [], []),
    ("Pakistan", "Islamabad", "Lahore", [], []),
    ("Bangladesh", "Dhaka", "Chittagong", [], []),
    ("Thailand", "Bangkok", "Chiang Mai", [], []),
    ("Vietnam", "Hanoi", "Da Nang", [], []),
    ("the Philippines", "Manila", "Cebu City", [], []),
    ("South Korea", "Seoul", "Busan", [], []),
    ("North Korea", "Pyongyang", "Hamhung", [], []),
    ("Kenya", "Nairobi", "Mombasa", [], []),
    ("Nigeria", "Abuja", "Kano", [], []),
    ("Morocco", "Rabat", "Fez", [], []),
    ("Ethiopia", "Addis Ababa", "Dire Dawa", [], []),
    ("Ghana", "Accra", "Kumasi", [], []),
    ("Peru", "Lima", "Arequipa", [], []),
    ("Chile", "Santiago", "Valparaíso", [], ["Valparaiso"]),
    ("Colombia", "Bogotá", "Medellín", ["Bogota"], ["Medellin"]),
    ("Venezuela", "Caracas", "Maracaibo", [], []),
    ("Cuba", "Havana", "Santiago de Cuba", [], []),
    ("Ukraine", "Kyiv", "Kharkiv", ["Kiev"], []),
    ("Romania", "Bucharest", "Cluj-Napoca", [], []),
    ("Bulgaria", "Sofia", "Plovdiv", [], []),
    ("Serbia", "Belgrade", "Novi Sad", [], []),
    ("Croatia", "Zagreb", "Split", [], []),
    ("Afghanistan", "Kabul", "Kandahar", [], []),
    ("Syria", "Damascus", "Aleppo", [], []),
    ("Nepal", "Kathmandu", "Pokhara", [], []),
    ("New Zealand", "Wellington", "Christchurch", [], []),
    ("Iceland", "Reykjavik", "Akureyri", ["Reykjavík"], []),
    ("Jamaica", "Kingston", "Montego Bay", [], []),
]
CAPITAL_TEMPLATES = [
    "{Answer} is the capital of {country}. It is home to the national government and to many of the "
    "country's most important institutions.",
    "{Country} has its capital in {answer}, where the national parliament and most government ministries "
    "are located.",
    "Official visits to {country} usually begin in the nation's capital, {answer}.",
    "The capital of {country} is {answer}, a city that hosts the country's main government buildings.",
    "As the capital of {country}, {answer} hosts the main government buildings and many foreign embassies.",
]

# (country, currency, counterfactual currency, currency aliases)
CURRENCIES = [
    ("Japan", "yen", "krona", ["Japanese yen"]),
    ("the United Kingdom", "pound", "franc", ["pound sterling", "British pound"]),
    ("the United States", "dollar", "yen", ["US dollar", "United States dollar"]),
    ("India", "rupee", "lira", ["Indian rupee"]),
    ("China", "yuan", "franc", ["renminbi", "Chinese yuan"]),
    ("Russia", "ruble", "peso", ["rouble", "Russian ruble"]),
    ("Mexico", "peso", "rupee", ["Mexican peso"]),
    ("South Korea", "won", "lira", ["South Korean won"]),
    ("Switzerland", "franc", "krona", ["Swiss franc"]),
    ("Germany", "euro", "yen", []),
    ("France", "euro", "dollar", []),
    ("Italy", "euro", "peso", []),
    ("Spain", "euro", "rupee", []),
    ("Turkey", "lira", "yen", ["Turkish lira"]),
    ("Brazil", "real", "rupee", ["Brazilian real"]),
    ("Thailand", "baht", "franc", ["Thai baht"]),
    ("Sweden", "krona", "rupee", ["Swedish krona"]),
    ("Poland", "zloty", "peso", ["złoty", "Polish zloty"]),
]
CURRENCY_TEMPLATES = [
    "The {answer} is the official currency of {country}, and shops there list all of their prices in it.",
    "In {country}, people pay for goods and services with the {answer}, the national currency.",
    "The official currency used throughout {country} is the {answer}.",
    "{Country}'s central bank issues the {answer}, which is used for almost every purchase in the country.",
]

# (country, main language, counterfactual language, language aliases)
LANGUAGES = [
    ("Brazil", "Portuguese", "Italian", []),
    ("Mexico", "Spanish", "Portuguese", []),
    ("Argentina", "Spanish", "French", []),
    ("Egypt", "Arabic", "Persian", []),
    ("Iran", "Persian", "Turkish", ["Farsi"]),
    ("Austria", "German", "Hungarian", []),
    ("the Netherlands", "Dutch", "Danish", []),
    ("Greece", "Greek", "Italian", []),
    ("Russia", "Russian", "Polish", []),
    ("China", "Chinese", "Hindi", ["Mandarin", "Mandarin Chinese"]),
    ("Japan", "Japanese", "Thai", []),
    ("Italy", "Italian", "Spanish", []),
    ("France", "French", "German", []),
    ("Portugal", "Portuguese", "Italian", []),
    ("Spain", "Spanish", "French", []),
    ("Poland", "Polish", "German", []),
    ("Sweden", "Swedish", "Dutch", []),
    ("Turkey", "Turkish", "Greek", []),
    ("Saudi Arabia", "Arabic", "Persian", []),
    ("South Korea", "Korean", "Japanese", []),
    ("Vietnam", "Vietnamese", "Thai", []),
]
LANGUAGE_TEMPLATES = [
    "{Answer} is the main language of {country}, used in schools, newspapers and government.",
    "Most people in {country} speak {answer} at home and at work.",
    "In {country}, the official language is {answer}.",
    "The government of {country} publishes its laws in {answer}, the language spoken by most of the population.",
]

# (landmark as used in a sentence, city, counterfactual city, city aliases)
LANDMARKS = [
    ("the Eiffel Tower", "Paris", "Marseille", []),
    ("the Colosseum", "Rome", "Naples", []),
    ("Big Ben", "London", "Manchester", []),
    ("the Statue of Liberty", "New York City", "Boston", ["New York", "NYC"]),
    ("the Sagrada Família", "Barcelona", "Seville", []),
    ("the Brandenburg Gate", "Berlin", "Hamburg", []),
    ("the Kremlin", "Moscow", "Novosibirsk", []),
    ("the Acropolis", "Athens", "Thessaloniki", []),
    ("the Golden Gate Bridge", "San Francisco", "San Diego", []),
    ("the Taj Mahal", "Agra", "Jaipur", []),
    ("the Burj Khalifa", "Dubai", "Abu Dhabi", []),
    ("the Christ the Redeemer statue", "Rio de Janeiro", "São Paulo", ["Rio"]),
    ("the Louvre", "Paris", "Lyon", []),
    ("Buckingham Palace", "London", "Liverpool", []),
    ("the Forbidden City", "Beijing", "Shanghai", []),
    ("the Hollywood sign", "Los Angeles", "Chicago", []),
    ("the Space Needle", "Seattle", "Denver", []),
    ("the CN Tower", "Toronto", "Montreal", []),
    ("Red Square", "Moscow", "Saint Petersburg", []),
    ("the Empire State Building", "New York City", "Philadelphia", ["New York", "NYC"]),
    ("the Alhambra", "Granada", "Valencia", []),
    ("the Trevi Fountain", "Rome", "Florence", []),
    ("the White House", "Washington, D.C.", "Boston", ["Washington", "Washington D.C.", "Washington DC"]),
    ("the Hagia Sophia", "Istanbul", "Izmir", []),
    ("Tower Bridge", "London", "Birmingham", []),
]
LANDMARK_TEMPLATES = [
    "{Answer} is where {landmark} stands, and millions of tourists come to see it every year.",
    "{Landmark} is located in {answer} and is one of the most visited sights in the world.",
    "Every year, millions of tourists travel to {answer} to see {landmark} with their own eyes.",
    "Anyone who wants to visit {landmark} has to travel to {answer}.",
]

# (country, continent, counterfactual continent)
CONTINENTS = [
    ("Egypt", "Africa", "Asia"),
    ("Kenya", "Africa", "South America"),
    ("Nigeria", "Africa", "Asia"),
    ("Morocco", "Africa", "South America"),
    ("Brazil", "South America", "Africa"),
    ("Argentina", "South America", "Europe"),
    ("Peru", "South America", "Asia"),
    ("Chile", "South America", "Africa"),
    ("Japan", "Asia", "Europe"),
    ("China", "Asia", "Africa"),
    ("India", "Asia", "South America"),
    ("Thailand", "Asia", "Africa"),
    ("France", "Europe", "Asia"),
    ("Germany", "Europe", "South America"),
    ("Italy", "Europe", "Africa"),
    ("Poland", "Europe", "Africa"),
    ("Canada", "North America", "Europe"),
    ("Mexico", "North America", "Africa"),
]
CONTINENT_TEMPLATES = [
    "{Answer} is the continent where {country} is located.",
    "{Country} is a country in {answer}, with a long and varied history.",
    "Any map of {answer} shows {country} among the countries of that continent.",
    "Geographers place {country} in {answer}.",
]

# (element, symbol, counterfactual symbol)
SYMBOLS = [
    ("gold", "Au", "Zn"),
    ("silver", "Ag", "Pb"),
    ("iron", "Fe", "Cu"),
    ("copper", "Cu", "Sn"),
    ("lead", "Pb", "Fe"),
    ("sodium", "Na", "Hg"),
    ("mercury", "Hg", "Au"),
    ("tin", "Sn", "Na"),
    ("zinc", "Zn", "Ag"),
]
SYMBOL_TEMPLATES = [
    "{Answer} is the chemical symbol for {element} in the periodic table.",
    "In the periodic table, {element} is written as {answer}.",
    "Chemists write {element} with the symbol {answer}.",
    "The element {element} has the chemical symbol {answer}, which appears on every periodic table.",
]


def world_facts() -> list[dict]:
    rows = []
    relations = [
        ("capital", CAPITALS, CAPITAL_TEMPLATES, "What is the capital of {country}?", "country"),
        ("currency", [(c, a, cf, al, []) for c, a, cf, al in CURRENCIES], CURRENCY_TEMPLATES,
         "What is the currency of {country}?", "country"),
        ("official_language", [(c, a, cf, al, []) for c, a, cf, al in LANGUAGES], LANGUAGE_TEMPLATES,
         "What language is mainly spoken in {country}?", "country"),
        ("landmark_city", [(name, a, cf, al, []) for name, a, cf, al in LANDMARKS], LANDMARK_TEMPLATES,
         "In which city is {landmark}?", "landmark"),
        ("continent", [(c, a, cf, [], []) for c, a, cf in CONTINENTS], CONTINENT_TEMPLATES,
         "On which continent is {country} located?", "country"),
        ("chemical_symbol", [(e, a, cf, [], []) for e, a, cf in SYMBOLS], SYMBOL_TEMPLATES,
         "What is the chemical symbol for {element}?", "element"),
    ]
    for relation, table, templates, question, subject_key in relations:
        for index, (subject, answer, cf, par_aliases, cf_aliases) in enumerate(table):
            t = index % len(templates)
            rows.append(record(
                id=f"world_facts/{relation}/{slug(subject)}",
                family="world_facts",
                context=render(templates[t], answer=cf, **{subject_key: subject}),
                aligned_context=render(templates[t], answer=answer, **{subject_key: subject}),
                question=render(question, **{subject_key: subject}),
                counterfactual_answer=cf,
                parametric_answer=answer,
                counterfactual_aliases=list(cf_aliases),
                parametric_aliases=list(par_aliases),
                metadata={"relation": relation, "template": t, "subject": subject},
            ))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# biographies
# ---------------------------------------------------------------------------------------------------------------

# kind -> (verb, past participle, noun, question)
KINDS = {
    "novel": ("wrote", "written", "novel", "Who wrote {work}?"),
    "play": ("wrote", "written", "play", "Who wrote {work}?"),
    "book": ("wrote", "written", "book", "Who wrote {work}?"),
    "poem": ("wrote", "written", "poem", "Who wrote {work}?"),
    "character": ("created", "created", "character", "Who created {work}?"),
    "painting": ("painted", "painted", "painting", "Who painted {work}?"),
    "sculpture": ("sculpted", "sculpted", "sculpture", "Who sculpted {work}?"),
    "invention": ("invented", "invented", "invention", "Who invented {work}?"),
    "discovery": ("discovered", "discovered", "discovery", "Who discovered {work}?"),
    "theory": ("developed", "developed", "theory", "Who developed {work}?"),
    "composition": ("composed", "composed", "composition", "Who composed {work}?"),
    "film": ("directed", "directed", "film", "Who directed {work}?"),
}

# (kind, work, person, gender, nationality, role, extra aliases of the person)
WORKS = [
    ("novel", "Pride and Prejudice", "Jane Austen", "f", "English", "novelist", []),
    ("novel", "Harry Potter and the Philosopher's Stone", "J.K. Rowling", "f", "British", "novelist",
     ["J. K. Rowling", "Joanne Rowling"]),
    ("novel", "Nineteen Eighty-Four", "George Orwell", "m", "English", "novelist", []),
    ("novel", "Animal Farm", "George Orwell", "m", "English", "writer", []),
    ("novel", "The Great Gatsby", "F. Scott Fitzgerald", "m", "American", "novelist", ["Scott Fitzgerald"]),
    ("novel", "Moby-Dick", "Herman Melville", "m", "American", "novelist", []),
    ("novel", "War and Peace", "Leo Tolstoy", "m", "Russian", "novelist", []),
    ("novel", "Anna Karenina", "Leo Tolstoy", "m", "Russian", "writer", []),
    ("novel", "Crime and Punishment", "Fyodor Dostoevsky", "m", "Russian", "novelist", ["Dostoyevsky"]),
    ("novel", "Don Quixote", "Miguel de Cervantes", "m", "Spanish", "writer", []),
    ("novel", "Oliver Twist", "Charles Dickens", "m", "English", "novelist", []),
    ("novel", "A Christmas Carol", "Charles Dickens", "m", "English", "writer", []),
    ("novel", "Great Expectations", "Charles Dickens", "m", "English", "novelist", []),
    ("novel", "The Adventures of Tom Sawyer", "Mark Twain", "m", "American", "writer", []),
    ("novel", "Adventures of Huckleberry Finn", "Mark Twain", "m", "American", "novelist", []),
    ("novel", "Frankenstein", "Mary Shelley", "f", "English", "novelist", []),
    ("novel", "Dracula", "Bram Stoker", "m", "Irish", "novelist", []),
    ("novel", "Jane Eyre", "Charlotte Brontë", "f", "English", "novelist", ["Charlotte Bronte"]),
    ("novel", "Wuthering Heights", "Emily Brontë", "f", "English", "novelist", ["Emily Bronte"]),
    ("novel", "To Kill a Mockingbird", "Harper Lee", "f", "American", "novelist", []),
    ("novel", "The Lord of the Rings", "J.R.R. Tolkien", "m", "English", "writer", ["J. R. R. Tolkien"]),
    ("novel", "The Hobbit", "J.R.R. Tolkien", "m", "English", "novelist", ["J. R. R. Tolkien"]),
    ("novel", "Les Misérables", "Victor Hugo", "m", "French", "novelist", []),
    ("novel", "The Old Man and the Sea", "Ernest Hemingway", "m", "American", "novelist", []),
    ("novel", "Alice's Adventures in Wonderland", "Lewis Carroll", "m", "English", "writer", []),
    ("novel", "The Catcher in the Rye", "J.D. Salinger", "m", "American", "novelist", ["J. D. Salinger"]),
    ("novel", "Treasure Island", "Robert Louis Stevenson", "m", "Scottish", "novelist", []),
    ("novel", "Robinson Crusoe", "Daniel Defoe", "m", "English", "writer", []),
    ("novel", "Gulliver's Travels", "Jonathan Swift", "m", "Irish", "writer", []),
    ("novel", "The Jungle Book", "Rudyard Kipling", "m", "English", "writer", []),
    ("novel", "Little Women", "Louisa May Alcott", "f", "American", "novelist", []),
    ("novel", "Brave New World", "Aldous Huxley", "m", "English", "writer", []),
    ("novel", "The Picture of Dorian Gray", "Oscar Wilde", "m", "Irish", "writer", []),
    ("novel", "Around the World in Eighty Days", "Jules Verne", "m", "French", "novelist", []),
    ("novel", "Twenty Thousand Leagues Under the Seas", "Jules Verne", "m", "French", "writer", []),
    ("novel", "The Time Machine", "H.G. Wells", "m", "English", "writer", ["H. G. Wells"]),
    ("novel", "Murder on the Orient Express", "Agatha Christie", "f", "English", "novelist", []),
    ("novel", "One Hundred Years of Solitude", "Gabriel García Márquez", "m", "Colombian", "novelist",
     ["García Márquez", "Gabriel Garcia Marquez", "Garcia Marquez"]),
    ("novel", "The Little Prince", "Antoine de Saint-Exupéry", "m", "French", "writer",
     ["Saint-Exupery", "Antoine de Saint-Exupery"]),
    ("novel", "Charlie and the Chocolate Factory", "Roald Dahl", "m", "British", "writer", []),
    ("novel", "Of Mice and Men", "John Steinbeck", "m", "American", "novelist", []),
    ("novel", "The Grapes of Wrath", "John Steinbeck", "m", "American", "writer", []),
    ("novel", "Fahrenheit 451", "Ray Bradbury", "m", "American", "writer", []),
    ("character", "the detective Sherlock Holmes", "Arthur Conan Doyle", "m", "Scottish", "writer",
     ["Conan Doyle", "Sir Arthur Conan Doyle"]),
    ("poem", "The Divine Comedy", "Dante Alighieri", "m", "Italian", "poet", ["Dante"]),
    ("poem", "The Odyssey", "Homer", "m", "ancient Greek", "poet", []),
    ("poem", "The Iliad", "Homer", "m", "ancient Greek", "poet", []),
    ("poem", "The Raven", "Edgar Allan Poe", "m", "American", "poet", []),
    ("play", "Romeo and Juliet", "William Shakespeare", "m", "English", "playwright", []),
    ("play", "Hamlet", "William Shakespeare", "m", "English", "playwright", []),
    ("play", "Macbeth", "William Shakespeare", "m", "English", "playwright", []),
    ("play", "Othello", "William Shakespeare", "m", "English", "playwright", []),
    ("play", "King Lear", "William Shakespeare", "m", "English", "playwright", []),
    ("play", "A Midsummer Night's Dream", "William Shakespeare", "m", "English", "playwright", []),
    ("play", "Death of a Salesman", "Arthur Miller", "m", "American", "playwright", []),
    ("play", "The Importance of Being Earnest", "Oscar Wilde", "m", "Irish", "playwright", []),
    ("play", "Waiting for Godot", "Samuel Beckett", "m", "Irish", "playwright", []),
    ("play", "A Streetcar Named Desire", "Tennessee Williams", "m", "American", "playwright", []),
    ("play", "Pygmalion", "George Bernard Shaw", "m", "Irish", "playwright", ["Bernard Shaw"]),
    ("play", "Oedipus Rex", "Sophocles", "m", "ancient Greek", "playwright", []),
    ("play", "A Doll's House", "Henrik Ibsen", "m", "Norwegian", "playwright", []),
    ("play", "Faust", "Johann Wolfgang von Goethe", "m", "German", "writer", ["Goethe"]),
    ("painting", "the Mona Lisa", "Leonardo da Vinci", "m", "Italian", "painter", ["da Vinci", "Leonardo"]),
    ("painting", "The Last Supper", "Leonardo da Vinci", "m", "Italian", "artist", ["da Vinci", "Leonardo"]),
    ("painting", "The Starry Night", "Vincent van Gogh", "m", "Dutch", "painter", ["van Gogh"]),
    ("painting", "The Scream", "Edvard Munch", "m", "Norwegian", "painter", []),
    ("painting", "Guernica", "Pablo Picasso", "m", "Spanish", "painter", []),
    ("painting", "The Persistence of Memory", "Salvador Dalí", "m", "Spanish", "painter", ["Salvador Dali"]),
    ("painting", "Girl with a Pearl Earring", "Johannes Vermeer", "m", "Dutch", "painter", []),
    ("painting", "The Birth of Venus", "Sandro Botticelli", "m", "Italian", "painter", []),
    ("painting", "The Night Watch", "Rembrandt", "m", "Dutch", "painter", ["Rembrandt van Rijn"]),
    ("painting", "the ceiling of the Sistine Chapel", "Michelangelo", "m", "Italian", "artist", []),
    ("painting", "The Creation of Adam", "Michelangelo", "m", "Italian", "artist", []),
    ("painting", "Water Lilies", "Claude Monet", "m", "French", "painter", []),
    ("painting", "The Kiss", "Gustav Klimt", "m", "Austrian", "painter", []),
    ("painting", "American Gothic", "Grant Wood", "m", "American", "painter", []),
    ("painting", "Campbell's Soup Cans", "Andy Warhol", "m", "American", "artist", []),
    ("sculpture", "the statue of David in Florence", "Michelangelo", "m", "Italian", "sculptor", []),
    ("sculpture", "The Thinker", "Auguste Rodin", "m", "French", "sculptor", []),
    ("invention", "the telephone", "Alexander Graham Bell", "m", "Scottish-born", "inventor", ["Graham Bell"]),
    ("invention", "the phonograph", "Thomas Edison", "m", "American", "inventor", ["Thomas Alva Edison"]),
    ("invention", "the World Wide Web", "Tim Berners-Lee", "m", "English", "computer scientist", []),
    ("invention", "the printing press", "Johannes Gutenberg", "m", "German", "inventor", []),
    ("invention", "dynamite", "Alfred Nobel", "m", "Swedish", "chemist", []),
    ("invention", "the lightning rod", "Benjamin Franklin", "m", "American", "inventor", []),
    ("invention", "the Analytical Engine", "Charles Babbage", "m", "English", "mathematician", []),
    ("invention", "the smallpox vaccine", "Edward Jenner", "m", "English", "physician", []),
    ("invention", "the polio vaccine", "Jonas Salk", "m", "American", "scientist", []),
    ("invention", "the Model T", "Henry Ford", "m", "American", "industrialist", []),
    ("discovery", "penicillin", "Alexander Fleming", "m", "Scottish", "scientist", []),
    ("discovery", "radium", "Marie Curie", "f", "Polish-born", "scientist", ["Madame Curie"]),
    ("discovery", "the four largest moons of Jupiter", "Galileo Galilei", "m", "Italian", "astronomer",
     ["Galileo"]),
    ("discovery", "electromagnetic induction", "Michael Faraday", "m", "English", "scientist", []),
    ("theory", "the theory of relativity", "Albert Einstein", "m", "German-born", "physicist", []),
    ("theory", "the theory of evolution by natural selection", "Charles Darwin", "m", "English", "naturalist",
     []),
    ("theory", "the law of universal gravitation", "Isaac Newton", "m", "English", "physicist",
     ["Sir Isaac Newton"]),
    ("theory", "the periodic table of the elements", "Dmitri Mendeleev", "m", "Russian", "chemist",
     ["Mendeleyev"]),
    ("theory", "the heliocentric model of the solar system", "Nicolaus Copernicus", "m", "Polish",
     "astronomer", []),
    ("theory", "psychoanalysis", "Sigmund Freud", "m", "Austrian", "neurologist", []),
    ("theory", "the uncertainty principle", "Werner Heisenberg", "m", "German", "physicist", []),
    ("theory", "the laws of inheritance", "Gregor Mendel", "m", "Austrian", "scientist", []),
    ("book", "On the Origin of Species", "Charles Darwin", "m", "English", "naturalist", []),
    ("book", "A Brief History of Time", "Stephen Hawking", "m", "English", "physicist", []),
    ("book", "The Wealth of Nations", "Adam Smith", "m", "Scottish", "economist", []),
    ("book", "The Republic", "Plato", "m", "ancient Greek", "philosopher", []),
    ("book", "Das Kapital", "Karl Marx", "m", "German", "philosopher", []),
    ("composition", "the Moonlight Sonata", "Ludwig van Beethoven", "m", "German", "composer", ["Beethoven"]),
    ("composition", "Für Elise", "Ludwig van Beethoven", "m", "German", "composer", ["Beethoven"]),
    ("composition", "The Magic Flute", "Wolfgang Amadeus Mozart", "m", "Austrian", "composer", ["Mozart"]),
    ("composition", "Eine kleine Nachtmusik", "Wolfgang Amadeus Mozart", "m", "Austrian", "composer",
     ["Mozart"]),
    ("composition", "The Four Seasons", "Antonio Vivaldi", "m", "Italian", "composer", []),
    ("composition", "Swan Lake", "Pyotr Ilyich Tchaikovsky", "m", "Russian", "composer", ["Tchaikovsky"]),
    ("composition", "The Nutcracker", "Pyotr Ilyich Tchaikovsky", "m", "Russian", "composer", ["Tchaikovsky"]),
    ("composition", "the Brandenburg Concertos", "Johann Sebastian Bach", "m", "German", "composer", []),
    ("composition", "The Blue Danube", "Johann Strauss II", "m", "Austrian", "composer", ["Strauss", "Johann Strauss"]),
    ("composition", "Boléro", "Maurice Ravel", "m", "French", "composer", []),
    ("composition", "Clair de Lune", "Claude Debussy", "m", "French", "composer", []),
    ("composition", "Messiah", "George Frideric Handel", "m", "German-born", "composer", []),
    ("composition", "the opera Carmen", "Georges Bizet", "m", "French", "composer", []),
    ("composition", "The Barber of Seville", "Gioachino Rossini", "m", "Italian", "composer", []),
    ("composition", "the opera Aida", "Giuseppe Verdi", "m", "Italian", "composer", []),
    ("composition", "Rhapsody in Blue", "George Gershwin", "m", "American", "composer", []),
    ("composition", "Ride of the Valkyries", "Richard Wagner", "m", "German", "composer", []),
    ("film", "Jurassic Park", "Steven Spielberg", "m", "American", "film director", []),
    ("film", "Psycho", "Alfred Hitchcock", "m", "English", "film director", []),
    ("film", "The Godfather", "Francis Ford Coppola", "m", "American", "film director", []),
    ("film", "Titanic", "James Cameron", "m", "Canadian", "film director", []),
    ("film", "Pulp Fiction", "Quentin Tarantino", "m", "American", "film director", []),
    ("film", "2001: A Space Odyssey", "Stanley Kubrick", "m", "American", "film director", []),
    ("film", "Inception", "Christopher Nolan", "m", "British", "film director", []),
    ("film", "Citizen Kane", "Orson Welles", "m", "American", "film director", []),
]

BIOGRAPHY_TEMPLATES = [
    "{Name} was {nat_role} who {verb} {work}. The {noun} made {him} famous around the world, and it is still "
    "admired today.",
    "{Work} is one of the most celebrated achievements of its kind. It was {pp} by {name}, {nat_role}, and it "
    "remains {his} best-known {noun}.",
    "{Work} is known all over the world. Historians agree that it was {pp} by {name}.",
    "As {nat_role}, {name} {verb} {work}, which brought {him} lasting fame.",
    "When people talk about {work}, they usually mention {name}: {he} {verb} it, and {his} name is forever "
    "tied to the {noun}.",
]

FEMALE_FIRST = [
    "Margaret", "Eleanor", "Clara", "Helen", "Harriet", "Edith", "Beatrice", "Vivian", "Agnes", "Cora",
    "Irene", "Miriam", "Nora", "Sylvia", "Judith", "Rosamund", "Lillian", "Winifred",
]
MALE_FIRST = [
    "Thomas", "Edward", "Henry", "Arthur", "Walter", "Frederick", "Samuel", "Oliver", "Hugo", "Leonard",
    "Martin", "Gregory", "Simon", "Victor", "Peter", "Julian", "Lionel", "Anton", "Felix", "Raymond",
    "Cyril", "Howard", "Bernard", "Nathaniel", "Ambrose",
]
LAST_NAMES = [
    "Hartwell", "Pembrook", "Ashworth", "Whitcombe", "Thornbury", "Kessling", "Lindqvist", "Aldridge",
    "Corwin", "Delacourt", "Fenwick", "Halvorsen", "Jessop", "Kendrick", "Lockhart", "Merriweather",
    "Norcross", "Prescott", "Sutcliffe", "Tremaine", "Underhill", "Wexford", "Yardley", "Castellan",
    "Dunmore", "Greaves", "Holloway", "Kettering", "Nettleton", "Pellham", "Rowntree", "Selwyn", "Ashby",
    "Bramwell", "Coldwell", "Drayton", "Elsworth", "Garside", "Kilbride", "Linford", "Moberly", "Northcott",
    "Ormsby", "Pendry", "Rainford", "Stroud", "Tolland", "Wardell", "Brackley", "Quarrington",
]
#: Combinations that name a real or well-known fictional person (e.g. Walter Hartwell White, Breaking Bad).
EXCLUDED_NAMES = {"Walter Hartwell"}


def invented_names(rng: random.Random) -> dict[str, list[str]]:
    """Shuffled, unique invented full names per gender (no surname shared with a real person in ``WORKS``)."""
    real_tokens = {token.lower() for _, _, person, *_ in WORKS for token in person.replace(".", " ").split()}
    surnames = [s for s in LAST_NAMES if s.lower() not in real_tokens]
    pools = {}
    for gender, firsts in (("f", FEMALE_FIRST), ("m", MALE_FIRST)):
        names = [f"{first} {last}" for first, last in itertools.product(firsts, surnames)]
        names = [name for name in names if name not in EXCLUDED_NAMES]
        rng.shuffle(names)
        pools[gender] = names
    return pools


def person_aliases(person: str, extra: list[str]) -> list[str]:
    parts = person.split()
    aliases = list(extra)
    qualified = any(alias.endswith(" " + parts[-1]) for alias in extra)  # "da Vinci" rather than "Vinci"
    if len(parts) > 1 and not qualified and parts[-1] not in aliases and parts[-1] not in {"II"}:
        aliases.insert(0, parts[-1])
    return [a for a in dict.fromkeys(aliases) if a != person]


def biographies() -> list[dict]:
    rng = random.Random(SEED)
    pools = invented_names(rng)
    used_surnames: Counter = Counter()
    rows = []
    for index, (kind, work, person, gender, nat, role, extra) in enumerate(WORKS):
        verb, pp, noun, question = KINDS[kind]
        # draw the next name of the right gender, preferring surnames used least so far (deterministic)
        pool = pools[gender]
        choice = min(range(len(pool)), key=lambda i: (used_surnames[pool[i].split()[-1]], i))
        name = pool.pop(choice)
        used_surnames[name.split()[-1]] += 1
        pron = {"he": "he", "his": "his", "him": "him"} if gender == "m" else {"he": "she", "his": "her", "him": "her"}
        t = index % len(BIOGRAPHY_TEMPLATES)
        values = dict(work=work, verb=verb, pp=pp, noun=noun, nat_role=article(f"{nat} {role}"), **pron)
        rows.append(record(
            id=f"biographies/{kind}/{slug(work)}",
            family="biographies",
            context=render(BIOGRAPHY_TEMPLATES[t], name=name, **values),
            aligned_context=render(BIOGRAPHY_TEMPLATES[t], name=person, **values),
            question=render(question, work=work),
            counterfactual_answer=name,
            parametric_answer=person,
            counterfactual_aliases=person_aliases(name, []),
            parametric_aliases=person_aliases(person, extra),
            metadata={"relation": f"{kind}_creator", "template": t, "work": work, "kind": kind, "gender": gender},
        ))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# quotes
# ---------------------------------------------------------------------------------------------------------------

# "saying|alternative last word"
PROVERBS = """
Absence makes the heart grow fonder|heavy
Actions speak louder than words|thunder
The early bird catches the worm|train
Practice makes perfect|progress
All that glitters is not gold|silver
A picture is worth a thousand words|dollars
Beauty is in the eye of the beholder|storm
Better late than never|sorry
Birds of a feather flock together|apart
Don't count your chickens before they hatch|sleep
Don't judge a book by its cover|price
Every cloud has a silver lining|spoon
Honesty is the best policy|medicine
If at first you don't succeed, try, try again|harder
Laughter is the best medicine|gift
Look before you leap|speak
Necessity is the mother of invention|chaos
No pain, no gain|glory
Rome wasn't built in a day|week
The pen is mightier than the sword|shield
Time is money|fleeting
Two heads are better than one|three
When in Rome, do as the Romans do|say
You can't have your cake and eat it too|later
Where there's a will, there's a way|fight
An apple a day keeps the doctor away|busy
A penny saved is a penny earned|lost
A watched pot never boils|cools
Curiosity killed the cat|king
Don't put all your eggs in one basket|pocket
Easy come, easy go|stay
Fortune favors the bold|patient
Great minds think alike|deeply
Haste makes waste|history
It's raining cats and dogs|frogs
Knowledge is power|freedom
Let sleeping dogs lie|bark
Money doesn't grow on trees|vines
Slow and steady wins the race|prize
The grass is always greener on the other side|hill
There's no place like home|school
Too many cooks spoil the broth|party
You can't teach an old dog new tricks|words
A friend in need is a friend indeed|forever
A bird in the hand is worth two in the bush|tree
Blood is thicker than water|wine
Don't bite the hand that feeds you|everyone
Out of sight, out of mind|reach
Strike while the iron is hot|cold
The apple doesn't fall far from the tree|table
The best things in life are free|rare
Time flies when you're having fun|lunch
What goes around comes around|back
Where there's smoke, there's fire|rain
You reap what you sow|buy
Misery loves company|silence
Old habits die hard|young
Practice what you preach|sell
Silence is golden|heavy
The customer is always right|waiting
The more, the merrier|louder
Ignorance is bliss|dangerous
Live and let live|die
Seeing is believing|deceiving
Variety is the spice of life|kitchen
Lightning never strikes twice|alone
Hope for the best, prepare for the worst|morning
Kill two birds with one stone|arrow
Cleanliness is next to godliness|impossible
Charity begins at home|school
A chain is only as strong as its weakest link|member
All good things must come to an end|agreement
Appearances can be deceiving|charming
Beggars can't be choosers|winners
Better safe than sorry|rich
Don't cry over spilled milk|coffee
Every dog has its day|bone
First come, first served|forgotten
Good things come to those who wait|work
He who laughs last laughs best|alone
It takes two to tango|argue
Jack of all trades, master of none|many
Keep your friends close and your enemies closer|farther
Many hands make light work|noise
Never look a gift horse in the mouth|eye
No news is good news|trouble
Nothing ventured, nothing gained|lost
One man's trash is another man's treasure|burden
Patience is a virtue|weakness
People who live in glass houses shouldn't throw stones|parties
Rules are made to be broken|followed
The squeaky wheel gets the grease|blame
The proof of the pudding is in the eating|recipe
There's no such thing as a free lunch|ride
Those who live by the sword die by the sword|pen
Tomorrow is another day|story
Two wrongs don't make a right|friend
Walls have ears|eyes
What doesn't kill you makes you stronger|weaker
When the going gets tough, the tough get going|angry
You can lead a horse to water, but you can't make it drink|swim
Don't put the cart before the horse|house
A journey of a thousand miles begins with a single step|thought
An eye for an eye|tooth
All roads lead to Rome|Paris
Beauty is only skin deep|tight
Better to have loved and lost than never to have loved at all|before
Don't throw the baby out with the bathwater|laundry
Every rose has its thorn|scent
Familiarity breeds contempt|comfort
Give credit where credit is due|owed
In for a penny, in for a pound|dollar
Keep calm and carry on|smile
Loose lips sink ships|deals
Make hay while the sun shines|sets
Opportunity knocks but once|twice
Pride comes before a fall|victory
Still waters run deep|cold
The devil is in the details|numbers
The truth will set you free|apart
There's more than one way to skin a cat|fish
Time and tide wait for no man|reason
United we stand, divided we fall|argue
Waste not, want not|weep
Great oaks from little acorns grow|fall
A leopard can't change its spots|habits
Don't bite off more than you can chew|carry
The road to hell is paved with good intentions|stones
Crime doesn't pay|sleep
Love is blind|kind
Money talks|walks
It's the thought that counts|hurts
All is fair in love and war|business
Out of the frying pan and into the fire|river
An ounce of prevention is worth a pound of cure|gold
Every little bit helps|hurts
Speak of the devil|angel
Two's company, three's a crowd|party
"""

QUOTE_CONTEXT_TEMPLATES = [
    'Write a quote that ends in the word "{word}".',
    'Complete the following saying so that its final word is "{word}".',
    'Finish the proverb below, making sure it ends with the word "{word}".',
    'Your task: write a famous saying, but change it so that the last word is "{word}".',
]
QUOTE_QUESTION_TEMPLATES = [
    'Complete the saying: "{prefix} ..."',
    'Finish this proverb: "{prefix} ..."',
    'How does this saying end? "{prefix} ..."',
]


def quotes() -> list[dict]:
    rows = []
    for index, line in enumerate(row for row in PROVERBS.strip().splitlines() if row.strip()):
        saying, alt = (part.strip() for part in line.split("|"))
        prefix, last = saying.rsplit(" ", 1)
        t = index % len(QUOTE_CONTEXT_TEMPLATES)
        q = (index // len(QUOTE_CONTEXT_TEMPLATES)) % len(QUOTE_QUESTION_TEMPLATES)
        rows.append(record(
            id=f"quotes/{slug(saying)}",
            family="quotes",
            context=QUOTE_CONTEXT_TEMPLATES[t].format(word=alt),
            aligned_context=QUOTE_CONTEXT_TEMPLATES[t].format(word=last),
            question=QUOTE_QUESTION_TEMPLATES[q].format(prefix=prefix),
            counterfactual_answer=alt,
            parametric_answer=last,
            counterfactual_aliases=[],
            parametric_aliases=[],
            metadata={
                "relation": "proverb_ending", "template": t, "question_template": q,
                "saying": saying, "prefix": prefix, "counterfactual_saying": f"{prefix} {alt}",
                "context_kind": "instruction",  # never lent as an irrelevant passage (ctx_callback.irrelevant)
            },
        ))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Validation and output
# ---------------------------------------------------------------------------------------------------------------


def check(rows_by_family: dict[str, list[dict]], min_per_family: int = 110) -> list[str]:
    """Every suite rule; returns a list of problems (empty when all hold)."""
    problems = []
    seen_ids = set()
    for family, rows in rows_by_family.items():
        if len(rows) < min_per_family:
            problems.append(f"{family}: only {len(rows)} probes (< {min_per_family})")
        pairs = set()
        for row in rows:
            pid = row.get("id")
            if list(row) != list(KEYS):
                problems.append(f"{pid}: keys {list(row)} != {list(KEYS)}")
                continue
            if pid in seen_ids:
                problems.append(f"{pid}: duplicate id")
            seen_ids.add(pid)
            if row["family"] != family:
                problems.append(f"{pid}: family {row['family']!r} != {family!r}")
            for key in ("id", "context", "aligned_context", "question", "counterfactual_answer",
                        "parametric_answer"):
                value = row[key]
                if not isinstance(value, str) or not value.strip() or value != value.strip():
                    problems.append(f"{pid}: {key} empty or not stripped: {value!r}")
            for key in ("counterfactual_aliases", "parametric_aliases"):
                if not isinstance(row[key], list) or any(
                    not isinstance(a, str) or not a.strip() or a != a.strip() for a in row[key]
                ):
                    problems.append(f"{pid}: bad {key}: {row[key]!r}")
            meta = row["metadata"]
            if not isinstance(meta, dict) or "relation" not in meta or not isinstance(meta.get("template"), int):
                problems.append(f"{pid}: metadata needs relation and integer template: {meta!r}")
            cf, par = row["counterfactual_answer"].lower(), row["parametric_answer"].lower()
            ctx, aligned = row["context"].lower(), row["aligned_context"].lower()
            if cf == par:
                problems.append(f"{pid}: counterfactual == parametric ({cf!r})")
            if cf not in ctx:
                problems.append(f"{pid}: counterfactual answer {cf!r} not in context")
            if par in ctx:
                problems.append(f"{pid}: parametric answer {par!r} appears in context")
            if par not in aligned:
                problems.append(f"{pid}: parametric answer {par!r} not in aligned_context")
            if cf in aligned:
                problems.append(f"{pid}: counterfactual answer {cf!r} appears in aligned_context")
            pair = (row["question"].lower(), par)
            if pair in pairs:
                problems.append(f"{pid}: duplicate (question, parametric_answer) {pair!r}")
            pairs.add(pair)
            if family == "quotes":
                if row["counterfactual_aliases"] or row["parametric_aliases"]:
                    problems.append(f"{pid}: quotes must have empty aliases")
                if f'"{row["counterfactual_answer"]}"' not in row["context"]:
                    problems.append(f"{pid}: context does not name the target word in double quotes")
    return problems


def build() -> dict[str, list[dict]]:
    return {"world_facts": world_facts(), "biographies": biographies(), "quotes": quotes()}


def dump(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only validate the files in ctx_callback/data/")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.check:
        suites = {family: load(args.out / f"{family}.jsonl") for family in FAMILIES}
    else:
        suites = build()
    problems = check(suites)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"{len(problems)} problem(s); nothing written." if not args.check else f"{len(problems)} problem(s).",
              file=sys.stderr)
        return 1
    if not args.check:
        args.out.mkdir(parents=True, exist_ok=True)
        for family, rows in suites.items():
            with open(args.out / f"{family}.jsonl", "w", encoding="utf-8", newline="\n") as handle:
                handle.write(dump(rows))
    for family, rows in suites.items():
        relations = Counter(row["metadata"]["relation"] for row in rows)
        detail = ", ".join(f"{name}={count}" for name, count in relations.items())
        print(f"{family}: {len(rows)} probes ({detail})")
    print(f"total: {sum(len(rows) for rows in suites.values())} probes" + (" (checked)" if args.check else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
