"""Built-in instruction tasks with checkable answers, generated from a seed by our own code.

They exist so that a run on a small model can show, with a number, that it learned: SmolLM2-135M
answers almost none of them exactly before tuning (it ignores "reply with only ...") and learns them
in a few hundred steps. The held-out split shares no item with the training split (no digit string,
number pair or word appears in both), so a gain is generalisation, not recall.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from qlora_dist.config import TASK_NAMES


@dataclass(frozen=True)
class TaskItem:
    task: str
    prompt: str
    answer: str


def _sort_digits(rng: random.Random) -> tuple[str, TaskItem]:
    digits = [str(rng.randrange(10)) for _ in range(rng.choice((3, 4)))]
    shown = " ".join(digits)
    prompt = f"Sort these digits from smallest to largest: {shown}. Reply with only the sorted digits."
    return shown, TaskItem("sort_digits", prompt, " ".join(sorted(digits)))


def _add(rng: random.Random) -> tuple[str, TaskItem]:
    a, b = rng.randrange(10, 100), rng.randrange(10, 100)
    prompt = f"What is {a} + {b}? Reply with only the number."
    return f"{a}+{b}", TaskItem("add", prompt, str(a + b))


_WORDS = """
apple river garden window pencil rabbit candle forest silver orange planet button coffee dragon
yellow bottle castle winter summer spring autumn monkey pocket ladder island mirror basket doctor
hammer jacket kitten lemon market needle ocean pepper rocket saddle tomato valley wallet zebra
anchor bridge cactus desert engine feather guitar harbor igloo jungle kettle lantern meadow napkin
oyster parrot quiver rainbow sandal tunnel umbrella violin walnut yogurt blanket cookie dinner
eagle falcon garlic helmet insect jelly kayak lizard magnet noodle onion pillow puzzle quilt ribbon
salad teapot unicorn velvet wizard yacht zipper badger camera dolphin emerald fabric goblin hockey
iron jigsaw koala lobster marble nickel orbit pirate raven shadow tiger turtle vessel whistle
acorn biscuit carrot daisy ember fossil glacier hazel ivory jasmine kernel lotus maple nutmeg olive
pebble quartz radish spider thunder tulip urchin vapor willow almond beacon cobalt dune echo fern
granite honey indigo juniper knight lagoon mango nectar opal petal quail reef sparrow thistle
cabin comet copper crystal dagger denim domino flute galaxy gravel hollow jewel kiwi lilac
meteor mosaic nugget orchid paddle pickle pigeon plum pony pretzel prism raisin rose ruby sapphire
scarf shovel slipper sponge squirrel stamp statue summit sunset sweater table tablet tassel thimble
timber torch tower trumpet vase waffle wagon walrus wheel wolf wren anvil apron attic bamboo banjo
barrel beetle bell berry blossom bonnet boulder bucket bugle buffalo cannon canyon cargo cedar
chalk cherry chimney cider clover coral cotton crab crane crayon crown cupcake cymbal dart donkey
drum dust elbow elk fiddle fig flag flame fox frog gate gem glove goat gong goose grape harp hawk
hill horn hut jar kite lamb leaf lily lime lion llama loom lynx mask melon mint mole moth mouse
mule nest oak otter owl palm panda peach pear pine pond pot quill rake rat robin rope sail
salt seal sheep shell silk skate sled snail sock sofa star stone swan tent toad train tree truck
tuba vine wasp whale wheat wing yarn
""".split()


def _uppercase_from(words: list[str]) -> Callable[[random.Random], tuple[str, TaskItem]]:
    def make(rng: random.Random) -> tuple[str, TaskItem]:
        word = rng.choice(words)
        prompt = f"Write the word '{word}' in capital letters. Reply with only the word."
        return word, TaskItem("uppercase", prompt, word.upper())
    return make


TASKS = TASK_NAMES  # the schema's list (config.py); _makers below has one entry per name


def _makers(rng: random.Random, held_out_share: float = 0.2) -> dict[str, tuple[Callable, Callable]]:
    """(train maker, eval maker) per task; uppercase splits the word list so eval words are unseen."""
    words = sorted(set(_WORDS))
    rng.shuffle(words)
    cut = int(len(words) * held_out_share)
    return {
        "sort_digits": (_sort_digits, _sort_digits),
        "add": (_add, _add),
        "uppercase": (_uppercase_from(words[cut:]), _uppercase_from(words[:cut])),
    }


def _draw(make: Callable, rng: random.Random, n: int, exclude: set[str], unique: bool) -> tuple[list[TaskItem], set[str]]:
    items, keys = [], set()
    for _ in range(n * 50):  # bounded: the item spaces are far larger than the counts asked for
        if len(items) == n:
            break
        key, item = make(rng)
        if key in exclude or (unique and key in keys):
            continue
        items.append(item)
        keys.add(key)
    return items, keys


def make_split(tasks: list[str], num_train: int, num_eval: int, seed: int) -> tuple[list[TaskItem], list[TaskItem]]:
    """Training and held-out items for each task; the same seed gives the same items."""
    rng = random.Random(seed)
    makers = _makers(rng)
    train: list[TaskItem] = []
    held_out: list[TaskItem] = []
    for task in tasks:
        train_make, eval_make = makers[task]
        ev, ev_keys = _draw(eval_make, rng, num_eval, set(), unique=True)
        tr, _ = _draw(train_make, rng, num_train, ev_keys, unique=False)
        held_out += ev
        train += tr
    rng.shuffle(train)
    return train, held_out


def exact_match(prediction: str, answer: str) -> bool:
    return prediction.strip() == answer.strip()


def majority_baseline(items: list[TaskItem]) -> float:
    """Accuracy of always giving the most common answer: the floor a real gain must clear."""
    if not items:
        return 0.0
    return Counter(i.answer for i in items).most_common(1)[0][1] / len(items)
