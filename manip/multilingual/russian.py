"""Russian captions for EmojiWorld scenes.

Russian adjectives agree with their noun in gender and number, so the vocabulary is a table of
nouns with their gender and of adjectives with all four nominative forms, written out by hand
rather than derived from endings (синий/синяя is soft, ночной is stressed: rules would need
exceptions for a table this small). Every phrasing keeps nouns in the nominative, the way
Russian image prompts are written ("красная кошка слева на пляже ночью"). Edit instructions
("замени кошку на собаку") need the accusative, which differs from the nominative only for
feminine nouns in -а/-я and animate masculine ones; the table gives it where it differs.

Captions write е for ё (зеленый, желтый, днем, самолет): that is correct Russian spelling, it is
how the emoji package's Russian names and most typed text spell them, and ё and е are different
characters to a tokenizer. `fold_yo` brings a prompt to the same spelling.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

from manip.world.scene import Placed, Scene

Gender = Literal["m", "f", "n", "pl"]


class Noun(NamedTuple):
    word: str
    gender: Gender
    accusative: str | None = None  # where it is not the nominative

    @property
    def acc(self) -> str:
        return self.accusative or self.word


class Adjective(NamedTuple):
    """The nominative forms an adjective takes beside a masculine, feminine, neuter or plural noun."""

    m: str
    f: str
    n: str
    pl: str

    def agree(self, gender: Gender) -> str:
        return getattr(self, gender)


class Background(NamedTuple):
    place: str  # where: preposition and the noun in the case it takes
    noun: str  # what: the noun phrase a time adjective can describe
    gender: Gender


class TimeOfDay(NamedTuple):
    adverb: str
    adjective: Adjective


# English caption word -> Russian noun. Names come from the emoji package's Russian (CLDR)
# annotations unless `NOT_FROM_EMOJI` says why not.
OBJECTS_RU: dict[str, Noun] = {
    "cat": Noun("кошка", "f", "кошку"), "dog": Noun("собака", "f", "собаку"),
    "rabbit": Noun("кролик", "m", "кролика"), "cow": Noun("корова", "f", "корову"),
    "pig": Noun("свинья", "f", "свинью"), "horse": Noun("лошадь", "f"), "sheep": Noun("овца", "f", "овцу"),
    "monkey": Noun("обезьяна", "f", "обезьяну"), "chicken": Noun("курица", "f", "курицу"),
    "frog": Noun("лягушка", "f", "лягушку"), "turtle": Noun("черепаха", "f", "черепаху"),
    "fish": Noun("рыба", "f", "рыбу"), "octopus": Noun("осьминог", "m", "осьминога"),
    "snail": Noun("улитка", "f", "улитку"), "butterfly": Noun("бабочка", "f", "бабочку"),
    "bee": Noun("пчела", "f", "пчелу"), "crab": Noun("краб", "m", "краба"), "elephant": Noun("слон", "m", "слона"),
    "owl": Noun("сова", "f", "сову"), "whale": Noun("кит", "m", "кита"), "apple": Noun("яблоко", "n"),
    "banana": Noun("банан", "m"), "grapes": Noun("виноград", "m"), "watermelon": Noun("арбуз", "m"),
    "strawberry": Noun("клубника", "f", "клубнику"), "pineapple": Noun("ананас", "m"),
    "carrot": Noun("морковь", "f"), "pizza": Noun("пицца", "f", "пиццу"), "burger": Noun("гамбургер", "m"),
    "donut": Noun("пончик", "m"), "car": Noun("машина", "f", "машину"), "bicycle": Noun("велосипед", "m"),
    "rocket": Noun("ракета", "f", "ракету"), "airplane": Noun("самолет", "m"), "sailboat": Noun("парусник", "m"),
    "umbrella": Noun("зонт", "m"), "guitar": Noun("гитара", "f", "гитару"), "house": Noun("дом", "m"),
    "tree": Noun("дерево", "n"), "mushroom": Noun("гриб", "m"), "sunflower": Noun("подсолнух", "m"),
    "key": Noun("ключ", "m"), "balloon": Noun("воздушный шарик", "m"), "crown": Noun("корона", "f", "корону"),
    "teapot": Noun("чайник", "m"), "robot": Noun("робот", "m", "робота"), "cactus": Noun("кактус", "m"),
    "penguin": Noun("пингвин", "m", "пингвина"),
}

# Where the emoji's Russian name is not the plain name of the object class.
NOT_FROM_EMOJI: dict[str, str] = {
    "frog": "the emoji is голова лягушки, the frog's head; captions name the animal",
    "whale": "кит с фонтанчиком (spouting whale) describes the artwork, not the class",
    "apple": "красное яблоко would fix a colour, which scenes set separately",
    "car": "машина is the everyday word; автомобиль reads as formal",
    "umbrella": "зонт под дождем (umbrella in the rain) describes the artwork, not the class",
}

# The "natural" colour keeps the artwork's own colours and is not named, as in English.
COLOURS_RU: dict[str, Adjective] = {
    "red": Adjective("красный", "красная", "красное", "красные"),
    "green": Adjective("зеленый", "зеленая", "зеленое", "зеленые"),
    "blue": Adjective("синий", "синяя", "синее", "синие"),
    "yellow": Adjective("желтый", "желтая", "желтое", "желтые"),
    "purple": Adjective("фиолетовый", "фиолетовая", "фиолетовое", "фиолетовые"),
}

BACKGROUNDS_RU: dict[str, Background] = {
    "beach": Background("на пляже", "пляж", "m"),
    "grass": Background("на траве", "лужайка", "f"),
    "snow": Background("на снегу", "снежное поле", "n"),
    "city": Background("в городе", "город", "m"),
    "sky": Background("в небе", "небо", "n"),
    "desert": Background("в пустыне", "пустыня", "f"),
}

TIMES_RU: dict[str, TimeOfDay] = {
    "day": TimeOfDay("днем", Adjective("солнечный", "солнечная", "солнечное", "солнечные")),
    "sunset": TimeOfDay("на закате", Adjective("закатный", "закатная", "закатное", "закатные")),
    "night": TimeOfDay("ночью", Adjective("ночной", "ночная", "ночное", "ночные")),
}

SLOTS_RU: dict[str, str] = {"left": "слева", "center": "в центре", "right": "справа"}

STYLES_RU: dict[str, str] = {
    "photo": "фотография", "sketch": "набросок карандашом", "pixel-art": "пиксель-арт",
    "inverted": "инвертированные цвета", "mosaic": "мозаика",
}

N_PHRASINGS_RU = 4


def fold_yo(text: str) -> str:
    """The spelling captions use: a prompt typed with ё then meets the same tokens."""
    return text.replace("ё", "е").replace("Ё", "Е")


def object_phrase_ru(obj: Placed, slot_first: bool = False) -> str:
    noun = OBJECTS_RU[obj.name]
    words = [noun.word] if obj.colour == "natural" else [COLOURS_RU[obj.colour].agree(noun.gender), noun.word]
    slot = SLOTS_RU[obj.slot]
    return " ".join([slot, *words] if slot_first else [*words, slot])


def caption_ru(scene: Scene, phrasing: int = 0) -> str:
    """Phrasing 0 is canonical, as in English; the others vary word order and where the style
    and the time of day are said, so a text encoder does not learn one template."""
    objects = scene.ordered_objects()
    listed = " и ".join(object_phrase_ru(o) for o in objects)
    background, time = BACKGROUNDS_RU[scene.background], TIMES_RU[scene.time]
    place = f"{background.place} {time.adverb}"
    style = STYLES_RU[scene.style]
    suffix = "" if scene.style == "photo" else f", {style}"
    if phrasing == 0:
        return f"{style}: {listed}, {place}"
    if phrasing == 1:
        return f"{listed} {place}{suffix}"
    if phrasing == 2:
        return f"{place}: {', '.join(object_phrase_ru(o, slot_first=True) for o in objects)}{suffix}"
    if phrasing == 3:
        return f"{time.adjective.agree(background.gender)} {background.noun}, {listed}{suffix}"
    raise ValueError(f"phrasing must be in [0, {N_PHRASINGS_RU}), got {phrasing}")


def all_captions_ru(scene: Scene) -> list[str]:
    return [caption_ru(scene, p) for p in range(N_PHRASINGS_RU)]
