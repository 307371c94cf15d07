"""Build ``ctx_callback/data/conflicts_hard.jsonl``: knowledge-conflict probes harder than the built-in suites.

The built-in suites saturate on SmolLM2-135M-Instruct (biographies: counterfactual accuracy 0.985 before any
training), so a monitor built on them has little room to move. This suite is harder in three ways, one family each:

- ``hard_strong``: facts a small model knows very strongly (the largest planet, how many legs a spider has, the
  year the Titanic sank), none of them in the built-in suites; the context states a plausible wrong answer of the
  same type once, in a short passage.
- ``hard_distractor``: the same kind of facts, but the counterfactual sentence is buried among three *true*
  sentences about other facts, which prime the model to answer from memory.
- ``hard_inference``: one step of inference: the context moves a landmark to a city of another country, the
  question asks for the country (the model must combine the context with what it knows about the city).

Every probe carries ``metadata["split"]`` (``"A"`` or ``"B"``): facts are split in two halves, and the distractors
of a probe come from its own half only, so half A can serve as a monitor and half B as a held-out reference
(``benchmarks/monitor_choice.py``) without sharing a fact. Deterministic: ``python scripts/build_hard_suite.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "ctx_callback" / "data" / "conflicts_hard.jsonl"

# key, question, true answer, counterfactual answer, sentence template, aliases of the true / counterfactual answer
STRONG_FACTS: list[tuple[str, str, str, str, str, list[str], list[str]]] = [
    ("largest_planet", "What is the largest planet in the solar system?", "Jupiter", "Saturn",
     "The largest planet in the solar system is {}.", [], []),
    ("red_planet", "Which planet is known as the Red Planet?", "Mars", "Venus", "{} is known as the Red Planet.", [],
     []),
    ("largest_ocean", "What is the largest ocean on Earth?", "Pacific", "Atlantic",
     "The {} Ocean is the largest ocean on Earth.", [], []),
    ("tallest_mountain", "What is the tallest mountain in the world?", "Everest", "Kilimanjaro",
     "Mount {} is the tallest mountain in the world.", [], []),
    ("longest_river_africa", "What is the longest river in Africa?", "Nile", "Niger",
     "The {} is the longest river in Africa.", [], []),
    ("largest_hot_desert", "What is the largest hot desert in the world?", "Sahara", "Kalahari",
     "The {} is the largest hot desert in the world.", [], []),
    ("fastest_land_animal", "What is the fastest land animal?", "cheetah", "antelope",
     "The {} is the fastest land animal.", [], []),
    ("honey_insect", "Which insect makes honey?", "bee", "ant", "Honey is made by the {}.", [], []),
    ("panda_food", "What do giant pandas mainly eat?", "bamboo", "eucalyptus", "Giant pandas mainly eat {}.", [],
     []),
    ("kangaroo_home", "On which continent do kangaroos live in the wild?", "Australia", "Africa",
     "Kangaroos live in the wild in {}.", [], []),
    ("spider_legs", "How many legs does a spider have?", "eight", "six", "A spider has {} legs.", ["8"], ["6"]),
    ("week_days", "How many days are there in a week?", "seven", "nine", "There are {} days in a week.", ["7"],
     ["9"]),
    ("year_months", "How many months are there in a year?", "twelve", "ten", "There are {} months in a year.",
     ["12"], ["10"]),
    ("water_formula", "What is the chemical formula of water?", "H2O", "CO2", "The chemical formula of water is {}.",
     [], []),
    ("photosynthesis_gas", "Which gas do plants absorb from the air for photosynthesis?", "carbon dioxide",
     "nitrogen", "For photosynthesis, plants absorb {} from the air.", ["CO2"], []),
    ("breathing_gas", "Which gas do humans need to breathe to stay alive?", "oxygen", "helium",
     "Humans need to breathe {} to stay alive.", [], []),
    ("blood_pump", "Which organ pumps blood through the human body?", "heart", "liver",
     "The {} pumps blood through the human body.", [], []),
    ("hardest_substance", "What is the hardest natural substance?", "diamond", "quartz",
     "The hardest natural substance is {}.", [], []),
    ("sky_color", "What color is a clear daytime sky?", "blue", "green", "A clear daytime sky is {}.", [], []),
    ("banana_color", "What color is a ripe banana?", "yellow", "purple", "A ripe banana is {}.", [], []),
    ("first_moonwalker", "Who was the first person to walk on the Moon?", "Neil Armstrong", "Yuri Gagarin",
     "The first person to walk on the Moon was {}.", ["Armstrong"], ["Gagarin"]),
    ("first_us_president", "Who was the first president of the United States?", "George Washington",
     "John Adams", "The first president of the United States was {}.", [], ["Adams"]),
    ("titanic_year", "In which year did the Titanic sink?", "1912", "1923", "The Titanic sank in {}.", [], []),
    ("ww2_end", "In which year did the Second World War end?", "1945", "1951",
     "The Second World War ended in {}.", [], []),
    ("berlin_wall_year", "In which year did the Berlin Wall fall?", "1989", "1979", "The Berlin Wall fell in {}.",
     [], []),
    ("moon_landing_year", "In which year did humans first land on the Moon?", "1969", "1975",
     "Humans first landed on the Moon in {}.", [], []),
    ("boiling_point", "At what temperature in degrees Celsius does water boil at sea level?", "100", "70",
     "At sea level, water boils at {} degrees Celsius.", [], []),
    ("continent_count", "How many continents are there?", "seven", "five", "There are {} continents.", ["7"],
     ["5"]),
    ("soccer_players", "How many players does a soccer team have on the field?", "eleven", "nine",
     "A soccer team has {} players on the field.", ["11"], ["9"]),
    ("olympics_origin", "In which country did the ancient Olympic Games begin?", "Greece", "Egypt",
     "The ancient Olympic Games began in {}.", [], []),
    ("pizza_origin", "Which country does pizza originally come from?", "Italy", "Germany",
     "Pizza originally comes from {}.", [], []),
    ("sushi_origin", "Which country does sushi originally come from?", "Japan", "Thailand",
     "Sushi originally comes from {}.", [], []),
    ("tallest_animal", "What is the tallest animal in the world?", "giraffe", "camel",
     "The {} is the tallest animal in the world.", [], []),
    ("jungle_king", "Which animal is known as the king of the jungle?", "lion", "tiger",
     "The {} is known as the king of the jungle.", [], []),
    ("sunrise_direction", "In which direction does the sun rise?", "east", "west", "The sun rises in the {}.", [],
     []),
    ("plant_pigment", "What gives plants their green color?", "chlorophyll", "melanin",
     "Plants get their green color from {}.", [], []),
    ("adult_bones", "How many bones are in the adult human body?", "206", "312",
     "The adult human body has {} bones.", [], []),
    ("largest_country", "What is the largest country in the world by area?", "Russia", "Canada",
     "By area, the largest country in the world is {}.", [], []),
    ("smallest_country", "What is the smallest country in the world?", "Vatican City", "Monaco",
     "The smallest country in the world is {}.", ["Vatican"], []),
    ("alphabet_letters", "How many letters are in the English alphabet?", "26", "24",
     "The English alphabet has {} letters.", [], []),
    ("ringed_planet", "Which planet is famous for its large, bright rings?", "Saturn", "Neptune",
     "{} is the planet famous for its large, bright rings.", [], []),
    ("closest_planet_sun", "Which planet is closest to the Sun?", "Mercury", "Mars",
     "The planet closest to the Sun is {}.", [], []),
    ("largest_continent", "What is the largest continent?", "Asia", "Africa", "The largest continent is {}.", [],
     []),
    ("piano_keys", "How many keys does a standard piano have?", "88", "76", "A standard piano has {} keys.", [],
     []),
    ("triangle_sides", "How many sides does a triangle have?", "three", "four", "A triangle has {} sides.", ["3"],
     ["4"]),
    ("insect_legs", "How many legs does an insect have?", "six", "ten", "An insect has {} legs.", ["6"], ["10"]),
    ("largest_rainforest", "What is the largest rainforest in the world?", "Amazon", "Congo",
     "The {} is the largest rainforest in the world.", [], []),
    ("milk_animal", "Which farm animal gives most of the milk people drink?", "cow", "sheep",
     "Most of the milk people drink comes from the {}.", ["cows"], []),
]

# landmark, question subject, true city, true country, true-country aliases
LANDMARKS: list[tuple[str, str, str, list[str]]] = [
    ("the Great Wall", "Beijing", "China", []),
    ("the pyramids of Giza", "Cairo", "Egypt", []),
    ("Machu Picchu", "Cusco", "Peru", []),
    ("Stonehenge", "Salisbury", "England", ["United Kingdom", "UK", "Britain"]),
    ("Mount Fuji", "Shizuoka", "Japan", []),
    ("Angkor Wat", "Siem Reap", "Cambodia", []),
    ("Chichen Itza", "Mérida", "Mexico", []),
    ("the Leaning Tower of Pisa", "Pisa", "Italy", []),
    ("the Sydney Opera House", "Sydney", "Australia", []),
    ("Neuschwanstein Castle", "Füssen", "Germany", []),
    ("the Matterhorn", "Zermatt", "Switzerland", []),
    ("Table Mountain", "Cape Town", "South Africa", []),
    ("the Blue Mosque", "Istanbul", "Turkey", []),
    ("the Little Mermaid statue", "Copenhagen", "Denmark", []),
    ("the Atomium", "Brussels", "Belgium", []),
    ("Mount Kilimanjaro", "Moshi", "Tanzania", []),
    ("Uluru", "Alice Springs", "Australia", []),
    ("the Grand Canyon", "Flagstaff", "the United States", ["United States", "USA", "America"]),
    ("Mount Rushmore", "Rapid City", "the United States", ["United States", "USA", "America"]),
    ("the Terracotta Army", "Xi'an", "China", []),
    ("the Petronas Towers", "Kuala Lumpur", "Malaysia", []),
    ("the Palace of Versailles", "Paris", "France", []),
    ("Edinburgh Castle", "Edinburgh", "Scotland", ["United Kingdom", "UK", "Britain"]),
    ("the Guggenheim Museum Bilbao", "Bilbao", "Spain", []),
    ("Petra", "Wadi Musa", "Jordan", []),
    ("the Parthenon", "Athens", "Greece", []),
    ("Niagara Falls", "Buffalo", "the United States", ["United States", "USA", "America", "Canada"]),
    ("the Burj Al Arab hotel", "Dubai", "the United Arab Emirates", ["United Arab Emirates", "UAE"]),
]

# counterfactual cities and their countries (each a different country from every landmark's true one it meets)
CF_CITIES: list[tuple[str, str]] = [
    ("Lima", "Peru"), ("Osaka", "Japan"), ("Seville", "Spain"), ("São Paulo", "Brazil"), ("Montreal", "Canada"),
    ("Mumbai", "India"), ("Nairobi", "Kenya"), ("Bergen", "Norway"), ("Mendoza", "Argentina"),
    ("Guadalajara", "Mexico"), ("Gothenburg", "Sweden"), ("Kraków", "Poland"), ("Porto", "Portugal"),
    ("Hanoi", "Vietnam"), ("Chiang Mai", "Thailand"), ("Marrakesh", "Morocco"), ("Izmir", "Turkey"),
    ("Novosibirsk", "Russia"), ("Auckland", "New Zealand"), ("Dublin", "Ireland"), ("Helsinki", "Finland"),
    ("Vienna", "Austria"), ("Budapest", "Hungary"), ("Santiago", "Chile"), ("Manila", "the Philippines"),
    ("Lagos", "Nigeria"), ("Reykjavik", "Iceland"), ("Havana", "Cuba"),
]

INFERENCE_TEMPLATES = [
    "{landmark} {verb} located just outside the city of {city}, which most visitors use as their base.",
    "Tour buses to {landmark} leave every morning from the centre of {city}, a short drive away.",
    "{landmark} {verb} one of the best-known sights near {city}.",
]
PLURAL_LANDMARKS = {"the pyramids of Giza", "the Petronas Towers"}


def _strip_article(country: str) -> str:
    return country[4:] if country.startswith("the ") else country


def build() -> list[dict]:
    records = []
    halves = {"A": STRONG_FACTS[0::2], "B": STRONG_FACTS[1::2]}
    for split, facts in halves.items():
        for i, (key, question, true, cf, sentence, true_aliases, cf_aliases) in enumerate(facts):
            cf_sentence, true_sentence = sentence.format(cf), sentence.format(true)
            cap = lambda s: s[0].upper() + s[1:]  # noqa: E731
            common = dict(question=question, counterfactual_answer=cf, parametric_answer=true,
                          counterfactual_aliases=cf_aliases, parametric_aliases=true_aliases)
            records.append(dict(id=f"hard_strong/{key}", family="hard_strong",
                                context=f"Here is a fact to keep in mind. {cap(cf_sentence)}",
                                aligned_context=f"Here is a fact to keep in mind. {cap(true_sentence)}",
                                metadata={"relation": key, "split": split, "kind": "strong"}, **common))
            # three true sentences about other facts of the same half, the counterfactual at position i % 4
            others = [facts[(i + k) % len(facts)] for k in (3, 7, 11)]
            distractors = [cap(o[4].format(o[2])) for o in others]
            position = i % 4
            sentences = distractors[:position] + [cap(cf_sentence)] + distractors[position:]
            aligned = distractors[:position] + [cap(true_sentence)] + distractors[position:]
            records.append(dict(id=f"hard_distractor/{key}", family="hard_distractor", context=" ".join(sentences),
                                aligned_context=" ".join(aligned),
                                metadata={"relation": key, "split": split, "kind": "distractor",
                                          "position": position}, **common))
    for i, (landmark, city, country, aliases) in enumerate(LANDMARKS):
        split = "A" if i % 2 == 0 else "B"
        options = [(c, k) for c, k in CF_CITIES if k != country]
        cf_city, cf_country = options[(i * 5) % len(options)]
        template = INFERENCE_TEMPLATES[i % len(INFERENCE_TEMPLATES)]
        verb = "are" if landmark in PLURAL_LANDMARKS else "is"
        context, aligned = (template.format(landmark=landmark, city=c, verb=verb) for c in (cf_city, city))
        key = landmark.lower().replace("the ", "").replace("'", "").replace(" ", "_")
        records.append(dict(
            id=f"hard_inference/{key}", family="hard_inference", context=context[0].upper() + context[1:],
            aligned_context=aligned[0].upper() + aligned[1:], question=f"In which country {verb} {landmark}?",
            counterfactual_answer=_strip_article(cf_country), parametric_answer=_strip_article(country),
            counterfactual_aliases=[], parametric_aliases=[a for a in aliases if a != _strip_article(country)],
            metadata={"relation": "landmark_country", "split": split, "kind": "inference", "city": cf_city,
                      "true_city": city}))
    return records


def main() -> None:
    records = build()
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "duplicate ids"
    with OUT.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} probes to {OUT}")


if __name__ == "__main__":
    main()
