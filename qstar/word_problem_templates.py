"""The templates of the word-problem corpus (:mod:`qstar.word_problems`): people, objects, and one
function per template that draws its numbers from a ``random.Random`` and writes the question and
the worked solution.

A template is ``fn(rng, work) -> question``; each call of ``work.step(sentence, a, op, b)`` is one
operation: it computes ``a op b`` (which must be an exact non-negative integer: ``/`` divides
exactly), writes ``sentence`` with ``{eq}`` replaced by ``"a op b = result"`` as one line of the
solution, and returns the result for the next step. The last step's result is the answer.
:data:`TEMPLATES` maps each name to its number of operations and its function.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["TEMPLATES", "Work", "pick"]

# --------------------------------------------------------------------------------------------------
# Building blocks: people, steps, exact arithmetic
# --------------------------------------------------------------------------------------------------

_NAMES = [
    ("Mira", "f"), ("Omar", "m"), ("Lena", "f"), ("Tomas", "m"), ("Aisha", "f"), ("Kenji", "m"),
    ("Sofia", "f"), ("Diego", "m"), ("Priya", "f"), ("Jonas", "m"), ("Hana", "f"), ("Samuel", "m"),
    ("Ines", "f"), ("Felix", "m"), ("Zara", "f"), ("Malik", "m"), ("Greta", "f"), ("Ravi", "m"),
    ("Chloe", "f"), ("Pablo", "m"), ("Nadia", "f"), ("Emil", "m"), ("Yuki", "f"), ("Arjun", "m"),
    ("Leila", "f"), ("Oscar", "m"), ("Maya", "f"), ("Victor", "m"), ("Elena", "f"), ("Kofi", "m"),
    ("Ruth", "f"), ("Liam", "m"), ("Amara", "f"), ("Noah", "m"), ("Ivy", "f"), ("Hugo", "m"),
]  # fmt: skip


@dataclass(frozen=True)
class Person:
    name: str
    he: str  # subject pronoun, lower case
    his: str  # possessive
    him: str  # object

    @property
    def He(self) -> str:  # noqa: N802 - the capitalised pronoun starts a sentence
        return self.he.capitalize()

    @property
    def His(self) -> str:  # noqa: N802
        return self.his.capitalize()


def _people(rng: random.Random, k: int) -> list[Person]:
    picked = rng.sample(_NAMES, k)
    return [Person(n, *(("she", "her", "her") if g == "f" else ("he", "his", "him"))) for n, g in picked]


def _exact(a: int, op: str, b: int) -> int:
    """``a op b``, which must be an exact non-negative integer (a template bug otherwise)."""
    if op == "+":
        r = a + b
    elif op == "-":
        r = a - b
    elif op == "*":
        r = a * b
    elif op == "/":
        if b == 0 or a % b:
            raise AssertionError(f"{a} / {b} is not an exact integer")
        r = a // b
    else:
        raise AssertionError(f"unknown operation {op!r}")
    if r < 0:
        raise AssertionError(f"{a} {op} {b} is negative")
    return r


class Work:
    """The steps of a worked solution: each ``step`` is one sentence holding one equation."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.results: list[int] = []

    def step(self, sentence: str, a: int, op: str, b: int) -> int:
        r = _exact(a, op, b)
        self.lines.append(sentence.format(eq=f"{a} {op} {b} = {r}"))
        self.results.append(r)
        return r


#: a template: (rng, work) -> question; the work's last step is the answer.
Template = Callable[[random.Random, Work], str]
#: name -> (number of operations, template).
TEMPLATES: dict[str, tuple[int, Template]] = {}


def _template(name: str, n_ops: int):
    def register(fn: Template) -> Template:
        TEMPLATES[name] = (n_ops, fn)
        return fn

    return register


def _remainder_to_take(rng: random.Random, total: int, group: int) -> int:
    """A number ``t`` with ``1 <= t``, ``total - t`` a positive multiple of ``group`` (``total > group``)."""
    short = total % group
    take = short if short else group
    return take + group * rng.randint(0, max(0, (total - take) // group - 1))


def pick(rng: random.Random, items: Sequence):
    return items[rng.randrange(len(items))]


_GOODS = [("notebook", "notebooks"), ("pen", "pens"), ("apple", "apples"), ("mug", "mugs"),
          ("comic book", "comic books"), ("sticker sheet", "sticker sheets"), ("candle", "candles"),
          ("plant pot", "plant pots"), ("T-shirt", "T-shirts"), ("toy car", "toy cars")]  # fmt: skip
_TREATS = ["cookies", "muffins", "cupcakes", "brownies", "pancakes", "dumplings", "tarts"]
_VEHICLES = [("train", "kilometers"), ("bus", "kilometers"), ("truck", "miles"), ("car", "miles"),
             ("ferry", "kilometers"), ("cyclist", "kilometers")]  # fmt: skip
_PLACES = [("library", "books"), ("zoo", "animals"), ("museum", "paintings"), ("school", "chairs"),
           ("toy shop", "puzzles"), ("farm", "sheep"), ("bakery", "loaves of bread")]  # fmt: skip
_INGREDIENTS = [("flour", "cups"), ("sugar", "spoons"), ("milk", "cups"), ("butter", "grams"),
                ("rice", "cups"), ("oats", "cups")]  # fmt: skip
_PLANTS = ["tomato plants", "sunflowers", "rose bushes", "carrot seedlings", "tulips", "bean plants"]
_WIDGETS = ["bottles", "toys", "bolts", "shirts", "bricks", "cans", "buttons"]
_WANTS = ["bicycle", "guitar", "video game", "tent", "skateboard", "telescope", "camera"]


# --------------------------------------------------------------------------------------------------
# One operation
# --------------------------------------------------------------------------------------------------


@_template("shop_total", 1)
def _shop_total(rng, w):
    p, (one, many) = _people(rng, 1)[0], pick(rng, _GOODS)
    n, price = rng.randint(2, 15), rng.randint(2, 30)
    w.step(f"Each {one} costs {price} dollars, so {p.he} spends {{eq}} dollars.", n, "*", price)
    return f"{p.name} buys {n} {many} for {price} dollars each. How many dollars does {p.he} spend?"


@_template("share_equally", 1)
def _share_equally(rng, w):
    p, treat = _people(rng, 1)[0], pick(rng, _TREATS)
    k, each = rng.randint(2, 12), rng.randint(2, 30)
    total = k * each
    w.step(f"Each friend gets {{eq}} {treat}.", total, "/", k)
    return (
        f"{p.name} has {total} {treat} and shares them equally among {k} friends. "
        f"How many {treat} does each friend get?"
    )


@_template("age_future", 1)
def _age_future(rng, w):
    p = _people(rng, 1)[0]
    age, years = rng.randint(4, 60), rng.randint(2, 30)
    w.step(f"In {years} years {p.he} will be {{eq}} years old.", age, "+", years)
    return f"{p.name} is {age} years old. How old will {p.he} be in {years} years?"


@_template("travel_distance", 1)
def _travel_distance(rng, w):
    vehicle, unit = pick(rng, _VEHICLES)
    speed, hours = rng.randint(4, 30) * 5, rng.randint(2, 12)
    w.step(f"It travels {{eq}} {unit}.", speed, "*", hours)
    return (
        f"A {vehicle} travels at {speed} {unit} per hour for {hours} hours. How many {unit} does it travel?"
    )


@_template("money_left", 1)
def _money_left(rng, w):
    p, (one, _) = _people(rng, 1)[0], pick(rng, _GOODS)
    have = rng.randint(20, 200)
    spent = rng.randint(1, have - 1)
    w.step(f"{p.He} has {{eq}} dollars left.", have, "-", spent)
    return (
        f"{p.name} had {have} dollars and spent {spent} dollars on a {one}. "
        f"How many dollars does {p.he} have left?"
    )


@_template("place_donation", 1)
def _place_donation(rng, w):
    place, things = pick(rng, _PLACES)
    have, more = rng.randint(20, 500), rng.randint(3, 120)
    w.step(f"The {place} now has {{eq}} {things}.", have, "+", more)
    return (
        f"A {place} had {have} {things}. It got {more} more {things}. "
        f"How many {things} does the {place} have now?"
    )


@_template("recipe_batches", 1)
def _recipe_batches(rng, w):
    ingredient, unit = pick(rng, _INGREDIENTS)
    per, batches = rng.randint(2, 20), rng.randint(2, 15)
    w.step(f"{batches} batches need {{eq}} {unit} of {ingredient}.", per, "*", batches)
    return (
        f"A recipe needs {per} {unit} of {ingredient} for one batch. "
        f"How many {unit} of {ingredient} are needed for {batches} batches?"
    )


@_template("work_hours", 1)
def _work_hours(rng, w):
    p, widget = _people(rng, 1)[0], pick(rng, _WIDGETS)
    rate, hours = rng.randint(3, 25), rng.randint(2, 15)
    total = rate * hours
    w.step(f"{p.He} needs {{eq}} hours.", total, "/", rate)
    return (
        f"{p.name} can pack {rate} {widget} in an hour. "
        f"How many hours does {p.he} need to pack {total} {widget}?"
    )


@_template("pages_left", 1)
def _pages_left(rng, w):
    p = _people(rng, 1)[0]
    pages = rng.randint(60, 400)
    read = rng.randint(10, pages - 5)
    w.step("There are {eq} pages left.", pages, "-", read)
    return f"A book has {pages} pages. {p.name} has read {read} of them. How many pages are left to read?"


# --------------------------------------------------------------------------------------------------
# Two operations
# --------------------------------------------------------------------------------------------------


@_template("shop_change", 2)
def _shop_change(rng, w):
    p, (_, many) = _people(rng, 1)[0], pick(rng, _GOODS)
    n, price = rng.randint(2, 10), rng.randint(2, 25)
    bill = pick(rng, [b for b in (20, 50, 100, 200, 500) if b > n * price][:2])
    cost = w.step(f"The {many} cost {{eq}} dollars.", n, "*", price)
    w.step(f"{p.His} change is {{eq}} dollars.", bill, "-", cost)
    return (
        f"{p.name} buys {n} {many} that cost {price} dollars each and pays with a {bill}-dollar bill. "
        f"How many dollars of change does {p.he} get?"
    )


@_template("share_after_eating", 2)
def _share_after_eating(rng, w):
    p, treat = _people(rng, 1)[0], pick(rng, _TREATS)
    k, each, eaten = rng.randint(2, 8), rng.randint(2, 10), rng.randint(1, 6)
    baked = k * each + eaten
    rest = w.step(f"After eating some, {p.he} has {{eq}} {treat}.", baked, "-", eaten)
    w.step(f"Each friend gets {{eq}} {treat}.", rest, "/", k)
    return (
        f"{p.name} bakes {baked} {treat}. {p.He} eats {eaten} of them and shares the rest equally "
        f"among {k} friends. How many {treat} does each friend get?"
    )


@_template("ages_sum", 2)
def _ages_sum(rng, w):
    a, b = _people(rng, 2)
    age, older = rng.randint(5, 40), rng.randint(2, 25)
    b_age = w.step(f"{b.name} is {{eq}} years old.", age, "+", older)
    w.step("Together they are {eq} years old.", age, "+", b_age)
    return (
        f"{a.name} is {age} years old. {b.name} is {older} years older than {a.name}. "
        f"What is the sum of their ages?"
    )


@_template("travel_two_legs", 2)
def _travel_two_legs(rng, w):
    vehicle, unit = pick(rng, _VEHICLES)
    speed, hours, extra = rng.randint(2, 14) * 5, rng.randint(2, 6), rng.randint(5, 90)
    first = w.step(f"The first part is {{eq}} {unit}.", speed, "*", hours)
    w.step(f"In all it travels {{eq}} {unit}.", first, "+", extra)
    return (
        f"A {vehicle} travels at {speed} {unit} per hour for {hours} hours, then {extra} more {unit}. "
        f"How many {unit} does it travel in all?"
    )


@_template("savings_weeks", 2)
def _savings_weeks(rng, w):
    p = _people(rng, 1)[0]
    start, weekly, weeks = rng.randint(5, 120), rng.randint(3, 30), rng.randint(2, 12)
    saved = w.step(f"In {weeks} weeks {p.he} saves {{eq}} dollars.", weekly, "*", weeks)
    w.step(f"{p.He} will have {{eq}} dollars.", start, "+", saved)
    return (
        f"{p.name} has {start} dollars and saves {weekly} dollars every week. "
        f"How many dollars will {p.he} have after {weeks} weeks?"
    )


@_template("eggs_left", 2)
def _eggs_left(rng, w):
    p, treat = _people(rng, 1)[0], pick(rng, ["cakes", "omelettes", "quiches", "flans"])
    per, n = rng.randint(2, 6), rng.randint(2, 8)
    have = per * n + rng.randint(1, 30)
    used = w.step(f"{p.He} uses {{eq}} eggs.", per, "*", n)
    w.step(f"{p.He} has {{eq}} eggs left.", have, "-", used)
    return (
        f"{p.name} has {have} eggs. Each of {p.his} {treat} needs {per} eggs, and {p.he} makes {n} {treat}. "
        f"How many eggs does {p.he} have left?"
    )


@_template("two_workers", 2)
def _two_workers(rng, w):
    a, b = _people(rng, 2)
    widget = pick(rng, _WIDGETS)
    ra, rb, hours = rng.randint(2, 15), rng.randint(2, 15), rng.randint(2, 8)
    both = w.step(f"Together they make {{eq}} {widget} an hour.", ra, "+", rb)
    w.step(f"In {hours} hours they make {{eq}} {widget}.", both, "*", hours)
    return (
        f"{a.name} makes {ra} {widget} an hour and {b.name} makes {rb} {widget} an hour. "
        f"Working together, how many {widget} do they make in {hours} hours?"
    )


@_template("garden_rows", 2)
def _garden_rows(rng, w):
    p, plant = _people(rng, 1)[0], pick(rng, _PLANTS)
    rows, per = rng.randint(2, 12), rng.randint(3, 15)
    failed = rng.randint(1, max(1, rows * per // 4))
    planted = w.step(f"{p.He} plants {{eq}} {plant}.", rows, "*", per)
    w.step(f"So {{eq}} {plant} grow.", planted, "-", failed)
    return (
        f"{p.name} plants {rows} rows of {plant} with {per} in each row. {failed} of them do not grow. "
        f"How many {plant} grow?"
    )


@_template("bus_stop", 2)
def _bus_stop(rng, w):
    start = rng.randint(15, 60)
    off, on = rng.randint(1, start - 1), rng.randint(1, 30)
    left = w.step("After some get off there are {eq} passengers.", start, "-", off)
    w.step("After the others get on there are {eq} passengers.", left, "+", on)
    return (
        f"A bus leaves with {start} passengers. At the first stop {off} get off and {on} get on. "
        f"How many passengers are on the bus now?"
    )


@_template("fuel_trip", 2)
def _fuel_trip(rng, w):
    p = _people(rng, 1)[0]
    per_litre = rng.randint(8, 20)
    litres = rng.randint(2, 12)
    there = rng.randint(1, per_litre * litres - 1)
    back = per_litre * litres - there
    total = w.step(f"{p.He} drives {{eq}} kilometers in all.", there, "+", back)
    w.step("The car uses {eq} liters of fuel.", total, "/", per_litre)
    return (
        f"{p.name}'s car goes {per_litre} kilometers on one liter of fuel. {p.He} drives {there} kilometers "
        f"on Saturday and {back} kilometers on Sunday. How many liters of fuel does the car use?"
    )


# --------------------------------------------------------------------------------------------------
# Three operations
# --------------------------------------------------------------------------------------------------


@_template("shop_two_items", 3)
def _shop_two_items(rng, w):
    p = _people(rng, 1)[0]
    (one1, many1), (one2, many2) = rng.sample(_GOODS, 2)
    n1, p1, n2, p2 = rng.randint(2, 9), rng.randint(2, 15), rng.randint(2, 9), rng.randint(2, 15)
    c1 = w.step(f"The {many1} cost {{eq}} dollars.", n1, "*", p1)
    c2 = w.step(f"The {many2} cost {{eq}} dollars.", n2, "*", p2)
    w.step(f"{p.He} spends {{eq}} dollars in all.", c1, "+", c2)
    return (
        f"{p.name} buys {n1} {many1} at {p1} dollars each and {n2} {many2} at {p2} dollars each. "
        f"How many dollars does {p.he} spend in all?"
    )


@_template("party_packs", 3)
def _party_packs(rng, w):
    p, treat = _people(rng, 1)[0], pick(rng, _TREATS)
    guests, packs, size = rng.randint(2, 10), rng.randint(1, 6), rng.randint(3, 12)
    short = (packs * size) % guests
    loose = (guests - short if short else guests) + guests * rng.randint(0, 3)
    in_packs = w.step(f"The packs hold {{eq}} {treat}.", packs, "*", size)
    together = w.step(f"With the loose ones there are {{eq}} {treat}.", in_packs, "+", loose)
    w.step(f"Each guest gets {{eq}} {treat}.", together, "/", guests)
    return (
        f"{p.name} buys {packs} packs of {size} {treat} and {loose} loose {treat}. {p.He} shares them "
        f"equally among {guests} guests. How many {treat} does each guest get?"
    )


@_template("ages_chain", 3)
def _ages_chain(rng, w):
    a, b, c = _people(rng, 3)
    age, younger, years = rng.randint(3, 20), rng.randint(1, 5), rng.randint(2, 15)
    b_age = w.step(f"{b.name} is {{eq}} years old.", age, "*", 2)
    c_age = w.step(f"{c.name} is {{eq}} years old.", b_age, "-", younger)
    w.step(f"In {years} years {c.name} will be {{eq}} years old.", c_age, "+", years)
    return (
        f"{a.name} is {age} years old. {b.name} is twice as old as {a.name}. {c.name} is {younger} "
        f"years younger than {b.name}. How old will {c.name} be in {years} years?"
    )


@_template("round_trip_detour", 3)
def _round_trip_detour(rng, w):
    p = _people(rng, 1)[0]
    vehicle, unit = pick(rng, _VEHICLES[1:4])
    speed, hours, detour = rng.randint(4, 14) * 5, rng.randint(1, 4), rng.randint(3, 40)
    one_way = w.step(f"One way is {{eq}} {unit}.", speed, "*", hours)
    both = w.step(f"There and back is {{eq}} {unit}.", one_way, "*", 2)
    w.step(f"With the detour {p.he} travels {{eq}} {unit}.", both, "+", detour)
    return (
        f"{p.name} takes a {vehicle} that goes {speed} {unit} per hour. The ride to {p.his} aunt takes "
        f"{hours} hours, and {p.he} comes back the same way plus a detour of {detour} {unit}. "
        f"How many {unit} does {p.he} travel in all?"
    )


@_template("savings_goal", 3)
def _savings_goal(rng, w):
    p, thing = _people(rng, 1)[0], pick(rng, _WANTS)
    weekly, weeks = rng.randint(3, 25), rng.randint(2, 15)
    have, gift = rng.randint(5, 100), rng.randint(5, 60)
    price = have + gift + weekly * weeks
    missing = w.step(f"Without the gift {p.he} is missing {{eq}} dollars.", price, "-", have)
    still = w.step(f"After the gift {p.he} still needs {{eq}} dollars.", missing, "-", gift)
    w.step(f"Saving {weekly} dollars a week, that takes {{eq}} weeks.", still, "/", weekly)
    return (
        f"{p.name} wants a {thing} that costs {price} dollars. {p.He} has {have} dollars, gets {gift} "
        f"dollars as a gift, and saves {weekly} dollars every week. How many weeks does {p.he} need to "
        f"save to buy the {thing}?"
    )


@_template("recipe_servings", 3)
def _recipe_servings(rng, w):
    p = _people(rng, 1)[0]
    ingredient, unit = pick(rng, _INGREDIENTS)
    serves, per, times = rng.randint(2, 6), rng.randint(2, 9), rng.randint(2, 6)
    want = serves * times
    has = rng.randint(0, per * times - 1)
    scale = w.step(f"{want} servings is {{eq}} times the recipe.", want, "/", serves)
    need = w.step(f"{p.He} needs {{eq}} {unit} of {ingredient}.", per, "*", scale)
    w.step(f"{p.He} must buy {{eq}} more {unit}.", need, "-", has)
    return (
        f"A recipe for {serves} servings uses {per} {unit} of {ingredient}. {p.name} wants to make "
        f"{want} servings and already has {has} {unit} of {ingredient}. How many more {unit} of "
        f"{ingredient} must {p.he} buy?"
    )


@_template("factory_output", 3)
def _factory_output(rng, w):
    widget = pick(rng, _WIDGETS)
    rate, hours, days = rng.randint(5, 40), rng.randint(2, 10), rng.randint(2, 7)
    faulty = rng.randint(1, rate * hours * days // 4)
    per_day = w.step(f"Each day it makes {{eq}} {widget}.", rate, "*", hours)
    made = w.step(f"In {days} days it makes {{eq}} {widget}.", per_day, "*", days)
    w.step(f"So {{eq}} {widget} are good.", made, "-", faulty)
    return (
        f"A machine makes {rate} {widget} an hour and runs {hours} hours a day. After {days} days, "
        f"{faulty} of the {widget} are faulty. How many good {widget} has it made?"
    )


@_template("fruit_bags", 3)
def _fruit_bags(rng, w):
    fruit = pick(rng, ["apples", "oranges", "pears", "peaches", "lemons", "plums"])
    crates, per, bag = rng.randint(2, 9), rng.randint(10, 30), rng.randint(2, 8)
    sold = _remainder_to_take(rng, crates * per, bag)
    all_fruit = w.step(f"The stand has {{eq}} {fruit}.", crates, "*", per)
    rest = w.step(f"After the sale {{eq}} {fruit} are left.", all_fruit, "-", sold)
    w.step("They fill {eq} bags.", rest, "/", bag)
    return (
        f"A fruit stand has {crates} crates with {per} {fruit} in each. It sells {sold} {fruit}, then "
        f"packs the rest into bags of {bag}. How many bags does it fill?"
    )


@_template("class_teams", 3)
def _class_teams(rng, w):
    classes, students, team = rng.randint(2, 6), rng.randint(15, 30), rng.randint(2, 6)
    absent = _remainder_to_take(rng, classes * students, team)
    everyone = w.step("The school has {eq} students.", classes, "*", students)
    present = w.step("So {eq} students are present.", everyone, "-", absent)
    w.step("They make {eq} teams.", present, "/", team)
    return (
        f"A school has {classes} classes of {students} students. On sports day {absent} students are "
        f"absent, and the rest form teams of {team}. How many teams are there?"
    )


@_template("weekly_reading", 3)
def _weekly_reading(rng, w):
    p = _people(rng, 1)[0]
    weekday, weekend = rng.randint(5, 30), rng.randint(10, 60)
    weeks = rng.randint(2, 6)
    week_days = w.step(f"On weekdays {p.he} reads {{eq}} pages a week.", weekday, "*", 5)
    week = w.step("With the weekend that is {eq} pages a week.", week_days, "+", weekend)
    w.step(f"In {weeks} weeks {p.he} reads {{eq}} pages.", week, "*", weeks)
    return (
        f"{p.name} reads {weekday} pages every weekday and {weekend} pages over each weekend. "
        f"How many pages does {p.he} read in {weeks} weeks?"
    )
