"""Writes json_facts_train.jsonl and json_facts_eval.jsonl: the demo's dataset (tools/demo.py).

Each record is an instruction record: a short free-text description of a (made-up) person -> one line of JSON
with a fixed schema {"name": str, "born": int, "city": str, "job": str}. People, sentences and the split are
drawn from a fixed seed, so running this again rewrites the same files:  python tools/data/make_json_facts.py
The eval people never appear in the training file (names are unique across both).
"""
import json
import os
import random

INSTRUCTION = ("Extract the person described below. Answer with only a JSON object with the keys "
               "\"name\", \"born\" (a number), \"city\" and \"job\".")

FIRST = ["Amelie", "Tomas", "Mei", "Kwame", "Ingrid", "Rafael", "Priya", "Oskar", "Leila", "Diego", "Hana",
         "Mateo", "Sofia", "Yusuf", "Elena", "Kenji", "Aisha", "Lars", "Nadia", "Pedro", "Zara", "Felix", "Ines",
         "Omar", "Clara", "Ravi", "Greta", "Jonas", "Lucia", "Emeka", "Astrid", "Hugo", "Noor", "Viktor", "Chloe",
         "Tariq", "Maren", "Bruno", "Ayumi", "Samir"]
LAST = ["Durand", "Berg", "Tanaka", "Mensah", "Lund", "Moreno", "Sharma", "Nilsson", "Haddad", "Romero", "Novak",
        "Rossi", "Keller", "Demir", "Petrova", "Sato", "Okafor", "Jensen", "Farouk", "Silva", "Costa", "Weber",
        "Almeida", "Nakamura", "Fischer", "Gupta", "Larsen", "Ivanova", "Bakker", "Mwangi"]
CITIES = ["Lyon", "Oslo", "Osaka", "Accra", "Bergen", "Seville", "Pune", "Uppsala", "Beirut", "Cordoba", "Brno",
          "Turin", "Zurich", "Izmir", "Sofia", "Kyoto", "Lagos", "Aarhus", "Cairo", "Porto", "Recife", "Munich",
          "Lisbon", "Sapporo", "Hamburg", "Jaipur", "Odense", "Kazan", "Utrecht", "Nairobi", "Quito", "Perth",
          "Halifax", "Tartu", "Graz", "Bilbao"]
JOBS = ["botanist", "carpenter", "architect", "nurse", "pilot", "baker", "chemist", "violinist", "librarian",
        "geologist", "tailor", "firefighter", "journalist", "potter", "surgeon", "translator", "engineer",
        "photographer", "beekeeper", "cartographer", "chef", "teacher", "astronomer", "blacksmith", "dentist",
        "sailor", "painter", "economist", "glassblower", "veterinarian"]

# {n}ame, {y}ear, {c}ity, {j}ob; a and an are fixed by the job's first letter
TEMPLATES = [
    "{n} was born in {y} in {c} and works as {a} {j}.",
    "Born in {c} in {y}, {n} became {a} {j}.",
    "{n} ({y}) is {a} {j} from {c}.",
    "The {j} {n} grew up in {c}; {p} was born in {y}.",
    "{a_cap} {j} by trade, {n} was born in {y} in the city of {c}.",
    "{n}, {a} {j}, comes from {c}. Year of birth: {y}.",
    "In {y}, {n} was born in {c}. Today {p} works as {a} {j}.",
    "{c} is the hometown of {n}, {a} {j} born in {y}.",
    "Meet {n}: born {y}, lives in {c}, works as {a} {j}.",
    "{n} works as {a} {j}. {p_cap} was born in {c} in {y}.",
    "Record: {n}, {j}, born {y}, {c}.",
    "After being born in {y}, {n} spent a whole life in {c} working as {a} {j}.",
]


def people(rng, n):
    seen, out = set(), []
    while len(out) < n:
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        if name in seen:
            continue
        seen.add(name)
        out.append({"name": name, "born": rng.randint(1931, 2004), "city": rng.choice(CITIES),
                    "job": rng.choice(JOBS)})
    return out


def record(rng, person):
    a = "an" if person["job"][0] in "aeiou" else "a"
    p = rng.choice(["she", "he", "they"])
    text = rng.choice(TEMPLATES).format(n=person["name"], y=person["born"], c=person["city"], j=person["job"],
                                        a=a, a_cap=a.capitalize(), p=p, p_cap=p.capitalize())
    if p == "they":  # singular they takes plural verbs
        for a_, b_ in (("they was", "they were"), ("They was", "They were"), ("they works", "they work")):
            text = text.replace(a_, b_)
    return {"instruction": INSTRUCTION, "input": text, "output": json.dumps(person)}


def main():
    rng = random.Random(20240517)
    everyone = people(rng, 380)
    here = os.path.dirname(os.path.abspath(__file__))
    for name, group in (("json_facts_train.jsonl", everyone[:320]), ("json_facts_eval.jsonl", everyone[320:])):
        with open(os.path.join(here, name), "w", encoding="utf-8") as f:
            for person in group:
                f.write(json.dumps(record(rng, person)) + "\n")


if __name__ == "__main__":
    main()
