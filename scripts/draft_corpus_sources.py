"""Where `scripts/draft_corpus.py` finds its prompts: one function per source, each
giving `Candidate`s of one or more kinds, in a deterministic order (files sorted,
rows in file order). Everything is read from the repository, the standard library or
the installed packages; nothing is downloaded.

A candidate's `key` is the item it was made from (a question, a paragraph, a
function's stub): the corpus uses an item once, in one kind and one split, however
many prompts could be made of it. `seen` marks items the shipped head was trained on
(scripts/train_eagle_smollm2.sh): they may go into training files, never into a
held-out one, so that a held-out k measured before and after retraining is fair.
"""

from __future__ import annotations

import ast
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from code_prompts import Function, code_request, functions_of

KINDS = ("chat", "instruction", "text", "word-problem", "code-completion", "code-stub",
         "code-request")


@dataclass(frozen=True, slots=True)
class Candidate:
    kind: str
    source: str  # where it came from, as the manifest counts it
    text: str
    key: str  # the item it was made from: used once in the whole corpus
    raw: bool = False  # a completion (no chat template): {"completion": text}
    seen: bool = False  # the shipped head trained on this item: training files only


def words(text: str) -> list[str]:
    """The normalised words of a text: lower case, letters and digits."""
    return re.findall(r"[a-z0-9]+", text.lower())


def read_jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- chat questions and instructions ----------------------------------------------------

# BFCL files left out: memory (questions about an earlier conversation), Java and
# JavaScript (requests to call a named API method), format_sensitivity (not one object
# a line, and not user requests)
BFCL_SKIP = ("memory", "format_sensitivity", "simple_java", "simple_javascript")
QUESTION_WORDS = frozenset([
    "what", "why", "how", "who", "whom", "whose", "where", "when", "which", "is", "are",
    "am", "can", "could", "would", "do", "does", "did", "should", "will", "may",
    "might", "shall"])
# a request that only makes sense to a function-calling model
TOOLISH = re.compile(r"\b(api|apis|function|functions|tool|tools|parameters?|arguments?|"
                     r"endpoint|json|schema|invoke|database|id|ids)\b|[A-Za-z0-9]_[A-Za-z0-9]|"
                     r"[`{}=<>\\]|https?:|www\.", re.IGNORECASE)
# "... using the Geocoding API": dropped, the rest of the request kept
TOOL_CLAUSE = re.compile(r",?\s+(?:using|via|with|through|by calling|from)\s+(?:the\s+)?"
                         r"[\w .'-]{0,40}?\b(?:api|function|tool)\b", re.IGNORECASE)


def is_question(text: str) -> bool:
    first = words(text)[:1]
    return text.rstrip().endswith("?") or (bool(first) and first[0] in QUESTION_WORDS)


def bfcl_requests(data_dir: Path) -> list[Candidate]:
    """The first user turn of each BFCL entry: everyday requests (weather, recipes,
    finance, travel), questions as `chat`, the rest as `instruction`; the ones that
    only make sense with tools dropped."""
    found: list[Candidate] = []
    for path in sorted(data_dir.glob("BFCL_v4_*.json")):
        if path.stem.removeprefix("BFCL_v4_") in BFCL_SKIP:
            continue
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                turn = row["question"][0]
                text = next(m["content"] for m in turn if m.get("role") == "user")
            except (ValueError, KeyError, IndexError, TypeError, StopIteration,
                    AttributeError):
                continue  # not a row of user requests
            if not isinstance(text, str):
                continue
            text = TOOL_CLAUSE.sub("", text.strip().strip('"').strip())
            if not text.isascii() or TOOLISH.search(text) or not 15 <= len(text) <= 500 \
                    or len(words(text)) < 4:
                continue
            kind = "chat" if is_question(text) else "instruction"
            found.append(Candidate(kind, "bfcl", text, " ".join(words(text))))
    return found


def draft_prompts(path: Path) -> list[Candidate]:
    """peerd's own draft prompts (the shipped head's: `seen`): code requests as
    `code-request`, questions as `chat`, the rest as `instruction`."""
    found = []
    for row in read_jsonl(path):
        text = str(row["prompt"]).strip()
        kind = ("code-request" if re.search(r"\b(python|function|code)\b", text, re.I)
                else "chat" if is_question(text) else "instruction")
        found.append(Candidate(kind, "draft-prompts", text, " ".join(words(text)),
                               seen=True))
    return found


# ---- explanations, lists, summaries, rewriting ------------------------------------------

TEXT_TEMPLATES = ("Summarise this in two sentences:", "Rewrite this paragraph in plain words:",
                  "List the main points of this text:", "Explain what this means to a beginner:")
PROSE_MIN, PROSE_MAX = 200, 800
NOT_PROSE = re.compile(r"```|>>>|https?:|www\.|[<>{}|\\$]|::|\.\. |pip install|"
                       r"licen[cs]e|copyright|warrant|redistribut|\bpermission\b", re.I)
# a line that starts a heading, list item, quote, table row, badge, rst field or rule
BULLET = re.compile(r"\s*([#>|!:]|\[!|[*+-]\s|\d+[.)]\s|={3,}|-{3,}|~{3,})")
# inline markup kept as its text: [text](url), [text][ref], `code`, **bold**, *emphasis*
MARKUP = ((re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),
          (re.compile(r"\[([^\]]+)\]\[[^\]]*\]"), r"\1"),
          (re.compile(r"`+([^`]+)`+_?"), r"\1"),
          (re.compile(r"(\*\*|__)(\S.*?\S|\S)\1"), r"\2"),
          (re.compile(r"(?<![*\w])\*(\S[^*]*?)\*(?![*\w])"), r"\1"))


def prose(paragraph: str, shortest: int = PROSE_MIN) -> str | None:
    """The paragraph joined into one line, inline markup kept as its text, if it is
    plain prose of `shortest`-800 characters (no code blocks, tables, lists, headings,
    links or licence text), else None."""
    lines = paragraph.splitlines()
    if "```" in paragraph or ">>>" in paragraph or any(
            line.startswith(("    ", "\t")) or BULLET.match(line) for line in lines):
        return None
    text = " ".join(line.strip() for line in lines)
    for pattern, keep in MARKUP:
        text = pattern.sub(keep, text)
    if not shortest <= len(text) <= PROSE_MAX or not text.isascii() or NOT_PROSE.search(text):
        return None
    letters = sum(c.isalpha() or c.isspace() for c in text)
    if letters < 0.88 * len(text) or text[-1] not in ".!?" or text.count(". ") < 1:
        return None
    return text


def readme_paragraphs(site_packages: Path) -> list[str]:
    """Prose paragraphs of the installed packages' READMEs (the bodies of
    `*.dist-info/METADATA`)."""
    found = []
    for path in sorted(site_packages.glob("*.dist-info/METADATA")):
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        _headers, _, body = text.partition("\n\n")
        found += [p for p in (prose(part) for part in body.split("\n\n")) if p]
    return found


def docstring_paragraphs(tree: ast.Module, shortest: int = 120) -> list[str]:
    """The first paragraph of each module, class and function docstring of a parsed
    module, where it is prose of `shortest` characters or more (see `prose`)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef) and \
                (doc := ast.get_docstring(node)) and (p := prose(doc.split("\n\n")[0], shortest)):
            found.append(p)
    return found


def harvest(path: Path) -> tuple[list[Function], list[str]]:
    """A module's functions (code_prompts.functions) and its docstrings' prose
    paragraphs, from one parse."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return [], []
    return functions_of(source, tree), docstring_paragraphs(tree)


def text_requests(paragraphs: Sequence[str], source: str, seed: int) -> list[Candidate]:
    """One request per paragraph (summarise, rewrite, list the points, explain), the
    template chosen by a seeded draw."""
    rng = random.Random(f"{seed}:{source}")
    return [Candidate("text", source, f"{rng.choice(TEXT_TEMPLATES)}\n\n{p}", p)
            for p in paragraphs]


# ---- word problems -----------------------------------------------------------------------

def gsm8k_train(path: Path, seen: set[str]) -> list[Candidate]:
    return [Candidate("word-problem", "gsm8k-train", q, q, seen=q in seen)
            for q in (str(row["question"]).strip() for row in read_jsonl(path))]


# ---- code ----------------------------------------------------------------------------------

# the verbs a docstring's first sentence may start with to be asked for as a function
VERBS = frozenset([
    "return", "get", "compute", "calculate", "convert", "create", "make", "build", "check",
    "test", "determine", "find", "parse", "split", "join", "format", "read", "write",
    "remove", "strip", "count", "sort", "merge", "generate", "encode", "decode",
    "escape", "normalize", "normalise", "load", "save", "copy", "extract", "replace",
    "validate", "apply", "compare", "filter", "expand", "resolve", "translate", "wrap",
    "fill", "pad", "round", "truncate", "flatten", "combine", "search", "match",
    "collect", "list", "update", "add", "append", "insert", "delete", "scale",
    "transform", "reverse", "select", "construct", "evaluate", "estimate",
    "interpolate", "map", "group", "serialize", "deserialize", "quote", "unquote",
    "hash", "compress", "decompress", "rotate", "clip", "concatenate", "partition",
    "tokenize", "detect", "guess", "infer", "shorten", "dedent", "indent", "encrypt",
    "decrypt", "sum", "multiply", "divide", "subtract", "solve", "approximate", "draw",
    "plot", "render", "print"])
REQUEST_BAD = re.compile(r"[`*<>{}\[\]|=:\\_]|\b(self|cls|deprecated|internal|helper|alias|"
                         r"wrapper|same as|see)\b", re.I)


def base_verb(word: str) -> str | None:
    """The verb's base form if it is one of VERBS ("Returns" -> "return"), else None."""
    w = word.lower()
    forms = (w, w[:-3] + "y" if w.endswith("ies") else "", w[:-2] if w.endswith("es") else "",
             w[:-1] if w.endswith("s") else "")
    return next((f for f in forms if f in VERBS), None)


def third_person(verb: str) -> str:
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + ("es" if verb.endswith(("s", "sh", "ch", "x", "z", "o")) else "s")


def request_of(doc: str, how_to: bool) -> str | None:
    """A docstring's first sentence as a request: "Write a Python function that
    returns ..." or "How do I get ... in Python?"; None where it does not read as one."""
    first = " ".join(doc.split("\n\n")[0].split())
    sentence = re.split(r"(?<=[.!?])\s", first)[0].rstrip(".")
    if not 20 <= len(sentence) <= 150 or not sentence.isascii() or REQUEST_BAD.search(sentence):
        return None
    verb, _, rest = sentence.partition(" ")
    base = base_verb(verb)
    if base is None or not rest:
        return None
    if how_to:
        return f"How do I {'get' if base == 'return' else base} {rest} in Python?"
    return f"Write a Python function that {third_person(base)} {rest}."


def code_candidates(funcs: Sequence[Function], origin: str, seen: set[str],
                    seed: int) -> list[Candidate]:
    """For each function (key: its stub): its stub continued raw (`code-completion`),
    pasted as a chat request (`code-stub`), and its docstring as a request
    (`code-request`, a description or a how-to question, by a seeded draw)."""
    rng = random.Random(f"{seed}:{origin}:request")
    found = []
    for f in funcs:
        was = f.stub in seen
        found += [Candidate("code-completion", f"{origin}-stub", f.stub, f.stub, True, was),
                  Candidate("code-stub", f"{origin}-stub", code_request(f.stub), f.stub,
                            seen=was)]
        how_to = rng.random() < 0.5
        if (request := request_of(f.doc, how_to)) is not None:
            form = "howto" if how_to else "description"
            found.append(Candidate("code-request", f"{origin}-{form}", request, f.stub,
                                   seen=was))
    return found


# scripts/train_eagle_smollm2.sh's draws of stubs (scripts/code_prompts.py, seed 0): 624
# then 200 more of the standard library's, 824 then 1000 more of the packages' (its
# first file's 400 are among the 624)
SHIPPED_STUB_DRAWS = ((624, 200), (824, 1000))


def shipped_stubs(stdlib: Sequence[str], packages: Sequence[str]) -> set[str]:
    """The stubs the shipped head was trained on, drawn again from these lists (in
    code_prompts' order) as scripts/train_eagle_smollm2.sh drew them."""
    def draw(found: Sequence[str], n: int, known: set[str]) -> list[str]:
        left = [s for s in found if s not in known]
        random.Random(0).shuffle(left)
        return left[:n]

    seen: set[str] = set()
    for found, (first, more) in zip((stdlib, packages), SHIPPED_STUB_DRAWS, strict=True):
        drawn = draw(found, first, set())
        seen |= {*drawn, *draw(found, more, set(drawn))}
    return seen


SHIPPED_GSM8K = 24 + 2400  # eagle_data.split_prompts' draw: held out, then trained on


def shipped_gsm8k(path: Path) -> set[str]:
    """The GSM8K train questions the shipped head was trained on or measured with:
    eagle_data.split_prompts' draw (seed 0, 24 held out, 2400 trained)."""
    questions = [str(row["question"]).strip() for row in read_jsonl(path)]
    random.Random(f"0:{path.stem}").shuffle(questions)
    return set(questions[:SHIPPED_GSM8K])


# ---- prompts the model writes itself (draft_corpus.py --self-instruct) -------------------

Generate = Callable[[Sequence[str]], Sequence[str]]  # prompts -> the model's replies
# A list for the model to continue, raw (no chat template): asked under the chat
# template to "write one new request", SmolLM2-135M answers as the assistant ("I'm ready
# to help...", 16 of 16 in a check), while it continues a numbered list with a request
# of its own (15 of 16)
SELF_INSTRUCT = "Questions and requests people send to an AI assistant:\n{examples}\n{next}."


def self_instruct(generate: Generate, seeds: Sequence[str], n: int, seed: int = 0,
                  batch: int = 8, shots: int = 4, max_calls: int = 50,
                  progress: Callable[[int], None] | None = None) -> list[Candidate]:
    """Up to `n` requests the model writes itself (self-instruct): `generate` gets a
    batch of prompts, each showing `shots` of `seeds`, and returns one reply each; the
    reply's first line, cleaned, is a new request unless it repeats a seed or an
    earlier one. Kinds as for BFCL's requests; the corpus' exclusions apply to them as
    to any other source (pass them to draft_corpus.build as `extra`). `progress` is
    told how many there are after each batch."""
    rng = random.Random(f"{seed}:self-instruct")
    known = {" ".join(words(s)) for s in seeds}
    made: list[Candidate] = []
    for _ in range(max_calls):
        if len(made) >= n or len(seeds) < shots:
            break
        asks = [SELF_INSTRUCT.format(examples="\n".join(
            f"{i + 1}. {s}" for i, s in enumerate(rng.sample(list(seeds), shots))),
            next=shots + 1) for _ in range(batch)]
        for reply in generate(asks):
            line = next((x for x in reply.strip().splitlines() if x.strip()), "")
            text = re.sub(r"^\s*(\d+[.)]|[-*])\s*", "", line).strip().strip('"').strip()
            key = " ".join(words(text))
            if not 15 <= len(text) <= 300 or key in known or len(made) >= n:
                continue
            known.add(key)
            made.append(Candidate("chat" if is_question(text) else "instruction",
                                  "self-instruct", text, key))
        if progress is not None:
            progress(len(made))
    return made
