"""The paper's chatbot numbers from judge reviews (files: evaluate/bench_files.py).

Score relative to ChatGPT (`eval score`): per system and presentation order, 100 x (sum of the system's
scores) / (sum of ChatGPT's) over the reviews whose stored score parsed ([-1, -1] dropped and counted);
the mean pools both orders (the sums over both), as the paper's table does. The 95% interval is a
percentile bootstrap over questions (each resampled question brings its reviews in both orders); the
paper's intervals are wider than this obvious bootstrap gives, so ours is reported beside theirs.

Elo (`eval elo`): every three-class pairwise review is a match (a tie half a win); the paper's ratings
start at 1000, move by K=32 per match, and are averaged over 10,000 random orders of the matches. The
orders are simulated together (numpy, one step per match for all orders at once).
"""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qlora_dist.errors import ConfigError
from qlora_dist.evaluate.bench_files import THREE_CLASS, UNPARSED, Answer, read_reviews

BOOTSTRAP_SAMPLES = 10_000
ELO_START, ELO_K, ELO_ORDERINGS = 1000.0, 32.0, 10_000
ELO_CHUNK = 2_000  # orderings simulated at once (memory: CHUNK x matches int32)


# ------------------------------------------------------------------------------- relative to ChatGPT
@dataclass(frozen=True)
class Pair:
    question_id: object
    system_first: bool
    system: float
    chatgpt: float


def relative_pairs(path: Path, reference: dict[object, Answer]) -> tuple[list[Pair], int]:
    """(the parsed reviews of a relative review file, the count of unparsed ones). Which assistant is
    ChatGPT comes from the ids: answer1_id or answer2_id must be the reference's answer_id."""
    pairs, unparsed = [], 0
    for r in read_reviews(path, "--reviews"):
        ref = reference.get(r.question_id)
        if ref is None:
            raise ConfigError([f"{r.where}: question_id {r.question_id!r} has no answer in the reference "
                               f"({next(iter(reference.values())).where.rsplit(':', 1)[0]})"])
        if ref.answer_id not in (r.first_id, r.second_id) or r.first_id == r.second_id:
            raise ConfigError([f"{r.where}: neither answer1_id {r.first_id!r} nor answer2_id {r.second_id!r} is "
                               f"ChatGPT's answer_id {ref.answer_id!r} for question {r.question_id!r} "
                               f"({ref.where}); is it a review against ChatGPT?"])
        if UNPARSED in r.score:
            unparsed += 1
            continue
        system_first = r.second_id == ref.answer_id
        system, chatgpt = (r.score[0], r.score[1]) if system_first else (r.score[1], r.score[0])
        pairs.append(Pair(r.question_id, system_first, float(system), float(chatgpt)))
    return pairs, unparsed


def _ratio(pairs: list[Pair]) -> float | None:
    chatgpt = sum(p.chatgpt for p in pairs)
    return round(100.0 * sum(p.system for p in pairs) / chatgpt, 1) if chatgpt else None


def bootstrap_ci(pairs: list[Pair], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> list[float]:
    """95% percentile interval of the pooled ratio, resampling questions with replacement."""
    by_question: dict[object, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for p in pairs:
        by_question[p.question_id][0] += p.system
        by_question[p.question_id][1] += p.chatgpt
    sums = np.array(list(by_question.values()))  # (questions, 2)
    idx = np.random.default_rng(seed).integers(0, len(sums), size=(samples, len(sums)))
    picked = sums[idx].sum(axis=1)  # (samples, 2)
    ratios = 100.0 * picked[:, 0] / np.maximum(picked[:, 1], 1e-12)
    return [round(float(v), 1) for v in np.percentile(ratios, [2.5, 97.5])]


def score_systems(reviews: list[tuple[str, Path]], reference: dict[object, Answer], seed: int = 0) -> list[dict]:
    """One row per system name (a name given for several files pools them), in the order first named."""
    pairs: dict[str, list[Pair]] = {}
    unparsed: dict[str, int] = defaultdict(int)
    for name, path in reviews:
        found, skipped = relative_pairs(path, reference)
        pairs.setdefault(name, []).extend(found)
        unparsed[name] += skipped
    rows = []
    for name, ps in pairs.items():
        rows.append({"model": name,
                     "chatgpt_first": _ratio([p for p in ps if not p.system_first]),
                     "system_first": _ratio([p for p in ps if p.system_first]),
                     "mean": _ratio(ps), "ci95": bootstrap_ci(ps, seed=seed) if ps else None,
                     "n_reviews": len(ps), "n_unparsed": unparsed[name]})
    return rows


def format_scores(rows: list[dict]) -> str:
    def pct(v):
        return "      -" if v is None else f"{v:6.1f}%"

    lines = [f"{'system':24s} {'ChatGPT 1st':>11s} {'system 1st':>11s} {'mean':>8s}  95% CI (bootstrap)  reviews (unparsed)"]
    for r in sorted(rows, key=lambda r: -(r["mean"] or 0)):
        ci = f"[{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}]" if r["ci95"] else "-"
        lines.append(f"{r['model']:24s} {pct(r['chatgpt_first']):>11s} {pct(r['system_first']):>11s} "
                     f"{pct(r['mean']):>8s}  {ci:18s}  {r['n_reviews']} ({r['n_unparsed']})")
    return "\n".join(lines)


def write_report(folder: Path, rows: list[dict], name: str = "relative_to_chatgpt") -> list[Path]:
    """The table (.txt), the rows (.json) and a bar plot of the mean with its interval (.png) in `folder`."""
    from qlora_dist import atomic

    table, data, png = (folder / f"{name}{ext}" for ext in (".txt", ".json", ".png"))
    atomic.write_text(table, format_scores(rows) + "\n")
    atomic.write_text(data, json.dumps(rows, indent=1) + "\n")
    _plot(png, sorted(rows, key=lambda r: -(r["mean"] or 0)))
    return [table, data, png]


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = [r["mean"] or 0.0 for r in rows]
    low = [m - (r["ci95"] or [m, m])[0] for m, r in zip(means, rows)]
    high = [(r["ci95"] or [m, m])[1] - m for m, r in zip(means, rows)]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(rows), 3.6))
    ax.bar(range(len(rows)), means, yerr=[low, high], capsize=4, color="#4c72b0")
    ax.axhline(100, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows], rotation=20, ha="right")
    ax.set_ylabel("% of ChatGPT's score")
    ax.set_title("Vicuna benchmark, judged relative to ChatGPT (mean of both orders, 95% CI)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)  # atomically, as every output (see atomic.py)


# ------------------------------------------------------------------------------------------- Elo
# The authors' pairwise files: FIRST-vs-SECOND-JUDGE-reviewer-threeclass.jsonl (JUDGE e.g. gpt-4).
PAIRWISE_NAME = re.compile(r"^(?P<a>.+?)-vs-(?P<b>.+?)-(?:gpt-[\w.]+|[\w.]+)-reviewer-threeclass\.jsonl$")
# The paper's names for the systems of its tournament (the file names' stems; 30b is the 33B model).
PAPER_NAMES = {"answer-gpt4": "GPT-4", "answer-gpt35": "ChatGPT", "answer-bard": "Bard",
               "answer-vicuna-13b": "Vicuna 13B",
               **{f"{f}b-guanaco-vicuna-generations-topp0.9-temp0.7": f"Guanaco {s}B"
                  for f, s in (("7", "7"), ("13", "13"), ("30", "33"), ("65", "65"))}}


@dataclass(frozen=True)
class Matches:
    systems: list[str]
    first: np.ndarray    # index of the system shown first
    second: np.ndarray
    result: np.ndarray   # the first's result: 1 win, 0 loss, 0.5 tie
    unparsed: int


def read_tournament(paths: list[Path | str] | Path | str) -> Matches:
    """Every three-class review of the pairwise files given (a folder: its .jsonl files). The two systems
    of a file come from its name; which was Assistant 1 from the ids: a system's answer to a question has
    the same id in all its files, so it is the id most of its reviews of that question show."""
    files = []
    for path in map(Path, paths if isinstance(paths, list) else [paths]):
        found = sorted(path.glob("*.jsonl")) if path.is_dir() else [path] if path.is_file() else []
        if not found:
            raise ConfigError([f"--pairwise: {path}: no .jsonl review files"])
        files += found
    named = []
    for f in files:
        m = PAIRWISE_NAME.match(f.name)
        if not m:
            raise ConfigError([f"--pairwise: {f}: expected a name FIRST-vs-SECOND-<judge>-reviewer-threeclass.jsonl"])
        named.append((m["a"], m["b"], read_reviews(f, "--pairwise", three_class=True)))
    ids = _answer_ids(named)
    return _matches(named, ids)


def _answer_ids(named) -> dict[tuple[str, object], str]:
    """(system, question) -> the system's answer id: the id most of its reviews of that question show (all
    of them, in a sound tournament; a review that shows another is refused later, naming its line)."""
    seen: dict[tuple[str, object], Counter] = defaultdict(Counter)
    for a, b, reviews in named:
        for r in reviews:
            for system in (a, b):
                seen[(system, r.question_id)].update({r.first_id, r.second_id})
    ids = {}
    for (system, q), counts in seen.items():
        top = counts.most_common(2)
        if len(top) > 1 and top[0][1] == top[1][1]:
            raise ConfigError([f"--pairwise: cannot tell {system}'s answer to question {q!r} from the ids ({top[0][0]!r} "
                               f"and {top[1][0]!r} are as frequent; it needs reviews against two other systems)"])
        ids[(system, q)] = top[0][0]
    return ids


def _matches(named, ids) -> Matches:
    systems = sorted({s for a, b, _ in named for s in (a, b)})
    index = {s: i for i, s in enumerate(systems)}
    first, second, result, unparsed = [], [], [], 0
    for a, b, reviews in named:
        for r in reviews:
            order = {ids[(a, r.question_id)]: a, ids[(b, r.question_id)]: b}
            if r.first_id not in order or r.second_id not in order or r.first_id == r.second_id:
                raise ConfigError([f"{r.where}: the ids {r.first_id!r}, {r.second_id!r} match neither side "
                                   f"({a}, {b}) at question {r.question_id!r}"])
            if r.score == UNPARSED:
                unparsed += 1
                continue
            first.append(index[order[r.first_id]])
            second.append(index[order[r.second_id]])
            result.append(THREE_CLASS[r.score])
    return Matches(systems, np.array(first), np.array(second), np.array(result), unparsed)


def elo(matches: Matches, orderings: int = ELO_ORDERINGS, seed: int = 0, k: float = ELO_K,
        start: float = ELO_START) -> np.ndarray:
    """(orderings, systems): each ordering's final ratings after playing the matches in a random order."""
    rng = np.random.default_rng(seed)
    out = []
    for done in range(0, orderings, ELO_CHUNK):
        n = min(ELO_CHUNK, orderings - done)
        order = rng.permuted(np.tile(np.arange(len(matches.result), dtype=np.int32), (n, 1)), axis=1).T.copy()
        ratings = np.full((n, len(matches.systems)), start)
        rows = np.arange(n)
        for step in order:  # one match of every ordering at once
            a, b, s = matches.first[step], matches.second[step], matches.result[step]
            expected = 1.0 / (1.0 + 10.0 ** ((ratings[rows, b] - ratings[rows, a]) / 400.0))
            delta = k * (s - expected)
            ratings[rows, a] += delta
            ratings[rows, b] -= delta
        out.append(ratings)
    return np.concatenate(out)


def elo_table(matches: Matches, ratings: np.ndarray) -> list[dict]:
    """Systems by mean rating: the mean and the spread (standard deviation) over the orderings."""
    rows = [{"system": PAPER_NAMES.get(s, s), "elo": round(float(ratings[:, i].mean()), 1),
             "sd": round(float(ratings[:, i].std()), 1),
             "matches": int(((matches.first == i) | (matches.second == i)).sum())}
            for i, s in enumerate(matches.systems)]
    return sorted(rows, key=lambda r: -r["elo"])


def format_elo(rows: list[dict], matches: Matches, orderings: int) -> str:
    lines = [f"Elo over {orderings} random orders of {len(matches.result)} matches (K={ELO_K:g}, start "
             f"{ELO_START:g}; {matches.unparsed} unparsed reviews left out)",
             f"{'rank':>4s}  {'system':28s} {'Elo':>7s}  {'sd':>5s}  matches"]
    lines += [f"{i:>4d}  {r['system']:28s} {r['elo']:7.1f}  {r['sd']:5.1f}  {r['matches']}" for i, r in enumerate(rows, 1)]
    return "\n".join(lines)
