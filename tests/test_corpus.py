"""Tests for the embedded demo corpus and tokenizer in velocitune.corpus.

The corpus is built at a tiny scale (fast); the full-size build is a slow test. Math answers are
re-derived from each question with exact Fraction arithmetic, independently of the generator.
Every test here runs with network connections refused.
"""

import ast
import itertools
import json
import math
import operator
import os
import re
import socket
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from tqdm import tqdm

from velocitune import corpus
from velocitune.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
SCALE = 0.02
ALL_DOMAINS = (corpus.PRETRAIN_DOMAIN, *corpus.CPT_DOMAINS)


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Refuse every outgoing connection, so a test that needed the network would fail."""

    def refuse(*args, **kwargs):
        raise AssertionError("velocitune.corpus tried to open a network connection")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return corpus.build_corpus(tmp_path_factory.mktemp("corpus"), scale=SCALE, progress=False)


def texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def text_bytes(docs: list[str]) -> int:
    return sum(len(d.encode("utf-8")) for d in docs)


def paragraphs(docs: list[str], min_chars: int) -> set[str]:
    """Whitespace-normalised paragraphs of at least `min_chars` characters."""
    found = set()
    for doc in docs:
        for para in doc.split("\n\n"):
            key = " ".join(para.split())
            if len(key) >= min_chars:
                found.add(key)
    return found


# --- Corpus layout, determinism, rebuilds ------------------------------------------------------


def test_network_is_really_refused():
    with pytest.raises(AssertionError, match="network"):
        socket.create_connection(("127.0.0.1", 9))


def test_every_domain_is_a_nonempty_jsonl_file_with_a_documented_source(tiny):
    assert set(tiny) == set(ALL_DOMAINS)
    assert len(corpus.CPT_DOMAINS) >= 4 and corpus.PRETRAIN_DOMAIN not in corpus.CPT_DOMAINS
    for name, path in tiny.items():
        assert path.name == f"{name}.jsonl" and path.parent == tiny["code"].parent
        lines = path.read_text(encoding="utf-8").splitlines()
        assert lines, name
        for line in lines:
            obj = json.loads(line)
            assert list(obj) == ["text"] and isinstance(obj["text"], str) and obj["text"].strip()
        source = corpus.SOURCES[name]
        assert source.description and source.licence


def test_domains_differ_in_content(tiny):
    docs = {name: texts(path) for name, path in tiny.items()}
    assert all(d.startswith("Problem: ") and "\nAnswer: " in d for d in docs["math"])
    # Python source parses; prose does not look like source files.
    for doc in docs["code"]:
        ast.parse(doc)
    assert sum("def " in d or "import " in d for d in docs["code"]) >= len(docs["code"]) - 1
    sci = "\n".join(docs["sci"])
    assert "Parameters\n----------" in sci or "Examples\n--------" in sci
    assert not any(d.startswith("Problem: ") for d in docs["replay"] + docs["sci"] + docs["pretrain_prose"])


def test_build_is_byte_identical_across_processes_and_hash_seeds(tiny, tmp_path):
    script = (
        "import sys; from velocitune import corpus; "
        "corpus.build_corpus(sys.argv[1], scale=float(sys.argv[2]), progress=False)"
    )
    for seed in ("0", "4242"):
        out = tmp_path / f"seed{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-c", script, str(out), str(SCALE)], check=True, env=env, cwd=tmp_path)
        for name, path in tiny.items():
            assert (out / path.name).read_bytes() == path.read_bytes(), (seed, name)
        assert (out / corpus.STAMP_NAME).read_bytes() == (tiny["code"].parent / corpus.STAMP_NAME).read_bytes()


def test_rebuild_is_skipped_when_complete_and_redone_when_stale(tmp_path):
    first = corpus.build_corpus(tmp_path, scale=0.01, progress=False)
    original = {name: path.read_bytes() for name, path in first.items()}
    mtimes = {name: path.stat().st_mtime_ns for name, path in first.items()}

    again = corpus.build_corpus(tmp_path, scale=0.01, progress=False)
    assert again == first
    assert {name: path.stat().st_mtime_ns for name, path in again.items()} == mtimes

    # A damaged file is noticed (its size no longer matches the stamp) and rebuilt.
    first["math"].write_bytes(original["math"][:100])
    corpus.build_corpus(tmp_path, scale=0.01, progress=False)
    assert first["math"].read_bytes() == original["math"]

    # A different scale rebuilds everything and records the new parameters.
    corpus.build_corpus(tmp_path, scale=0.02, progress=False)
    assert json.loads((tmp_path / corpus.STAMP_NAME).read_text())["scale"] == 0.02
    assert len(first["code"].read_bytes()) > len(original["code"])


def test_smaller_scale_is_a_prefix_of_larger(tiny, tmp_path):
    smaller = corpus.build_corpus(tmp_path, scale=SCALE / 2, progress=False)
    for name in ALL_DOMAINS:
        small, large = texts(smaller[name]), texts(tiny[name])
        assert 0 < len(small) <= len(large)
        assert large[: len(small)] == small, name


def test_sizes_follow_the_budgets_and_span_10x(tiny):
    sizes = {}
    for name, path in tiny.items():
        docs = texts(path)
        sizes[name] = text_bytes(docs)
        budget = corpus.BUDGET_BYTES[name] * SCALE
        # Whole documents until the budget is reached: at most one document past it.
        assert budget <= sizes[name] < budget + max(len(d.encode("utf-8")) for d in docs), name
    cpt = [sizes[name] for name in corpus.CPT_DOMAINS]
    assert max(cpt) >= 10 * min(cpt)


@pytest.mark.slow
def test_full_scale_corpus_sizes(tmp_path):
    paths = corpus.build_corpus(tmp_path, scale=1.0, progress=False)
    docs = {name: texts(path) for name, path in paths.items()}
    mb = {name: text_bytes(d) / 1e6 for name, d in docs.items()}
    print({name: (round(mb[name], 3), len(docs[name])) for name in ALL_DOMAINS})
    cpt = [mb[name] for name in corpus.CPT_DOMAINS]
    assert max(cpt) >= 10 * min(cpt)
    assert 6 <= sum(cpt) <= 12
    assert mb[corpus.PRETRAIN_DOMAIN] >= 1.4
    replay, pretrain = docs["replay"], docs[corpus.PRETRAIN_DOMAIN]
    assert not set(replay) & set(pretrain)
    shared = corpus.MIN_SHARED_PARAGRAPH_CHARS
    assert not paragraphs(replay, shared) & paragraphs(pretrain, shared)


def test_scale_must_be_a_positive_number(tmp_path):
    for bad in (0, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ConfigError, match="scale"):
            corpus.build_corpus(tmp_path, scale=bad, progress=False)


# --- Replay / pretraining split ----------------------------------------------------------------


def test_replay_and_pretrain_prose_share_no_document_or_paragraph(tiny):
    replay, pretrain = texts(tiny["replay"]), texts(tiny[corpus.PRETRAIN_DOMAIN])
    assert not set(replay) & set(pretrain)
    shared = corpus.MIN_SHARED_PARAGRAPH_CHARS
    assert not paragraphs(replay, shared) & paragraphs(pretrain, shared)


def test_prose_split_stays_disjoint_when_documents_repeat_and_quote_each_other():
    # 300 documents built from 120 paragraphs: many share paragraphs, some are exact repeats.
    paras = [f"Paragraph {i} says something long enough to count as shared text, number {i * 7}." for i in range(120)]
    docs = [f"{paras[i % 120]}\n\n{paras[(i * 7 + 3) % 120]}\n\nShort tail {i}." for i in range(300)]
    docs += docs[:50]
    replay, pretrain = corpus._split_prose(iter(docs), 10**9, 10**9, tqdm(disable=True))
    assert replay and pretrain
    assert not set(replay) & set(pretrain)
    assert not paragraphs(replay, 60) & paragraphs(pretrain, 60)
    # No long paragraph is used twice anywhere, yet every one of them is used once.
    used = [p for d in replay + pretrain for p in d.split("\n\n") if len(p) >= 60]
    assert len(used) == len(set(used)) == len(paras)
    # Roughly REPLAY_FRACTION of the documents go to replay.
    share = len(replay) / (len(replay) + len(pretrain))
    assert abs(share - corpus.REPLAY_FRACTION) < 0.1


# --- Math: every generated value is checked ---------------------------------------------------

DOC = re.compile(r"Problem: (?P<q>.+?)\n\nSolution:\n(?P<steps>.+)\n\nAnswer: (?P<a>.+)", re.S)
ARITH = re.compile(r"[\d\s+\-*/()]+")
POLY = re.compile(r"[\dx\s+\-*/()^]+")
OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}


def ev(expr: str, x: Fraction | None = None) -> Fraction:
    """Exact value of arithmetic as the corpus writes it: '3x^2 - (2x)(x + 1)', '3/4 * 6/5'."""
    text = re.sub(r"(\d|\))\s*(x|\()", r"\1*\2", expr.replace("^", "**"))

    def go(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.Name) and node.id == "x" and x is not None:
            return x
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -go(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](go(node.left), go(node.right))
        raise ValueError(f"unexpected {ast.dump(node)} in {expr!r}")

    return go(ast.parse(text, mode="eval").body)


def equalities(steps: str, pattern: re.Pattern) -> list[list[str]]:
    """Every 'A = B [= C]' between the ':', ';' and ',' of the steps whose sides all match `pattern`."""
    found = []
    for line in steps.splitlines():
        for segment in re.split(r"[:;,]", line):
            sides = [s.strip() for s in segment.split("=")]
            if len(sides) > 1 and all(pattern.fullmatch(s) for s in sides):
                found.append(sides)
    return found


COLUMN = re.compile(
    r"^(?:ones|tens|hundreds|thousands|ten thousands|hundred thousands|millions|ten millions): (.*)$", re.M
)


def check_addition_columns(steps: str, a: int, b: int) -> None:
    """Each column adds the right digits and carry, and the digits written spell a + b."""
    written, carry = [], 0
    for i, line in enumerate(COLUMN.findall(steps)):
        terms = [int(c) for c in (str(a)[::-1][i : i + 1], str(b)[::-1][i : i + 1]) if c] + ([carry] if carry else [])
        m = re.fullmatch(r"(?:([\d +]+) = )?(\d+), write (\d), carry (\d)", line)
        assert m, line
        shown = [int(t) for t in m[1].split(" + ")] if m[1] else [int(m[2])]
        total, write, carry = int(m[2]), int(m[3]), int(m[4])
        assert shown == terms and total == sum(terms) and (write, carry) == (total % 10, total // 10)
        written.append(write)
    assert int("".join(map(str, reversed(written)))) + carry * 10 ** len(written) == a + b


def check_subtraction_columns(steps: str, a: int, b: int) -> None:
    """Each column borrows exactly when it must, and the differences spell a - b."""
    top_digits = [int(c) for c in reversed(str(a))]
    bottom_digits = [int(c) for c in reversed(str(b).zfill(len(str(a))))]
    lines = COLUMN.findall(steps)
    assert len(lines) == len(top_digits)
    borrow, results = 0, []
    for top, bottom, line in zip(top_digits, bottom_digits, lines):
        have = top - borrow
        lent = re.match(r"the top digit (\d) lent 1 to the column on its right, leaving (-?\d+); ", line)
        assert bool(lent) == bool(borrow), line
        if lent:
            assert (int(lent[1]), int(lent[2])) == (top, have)
        if have < bottom:
            m = re.search(r"(-?\d+) is less than (\d), so borrow 10: (\d+) - (\d) = (\d+)$", line)
            assert m and (int(m[1]), int(m[2]), int(m[3]), int(m[4])) == (have, bottom, have + 10, bottom), line
            borrow = 1
        else:
            m = re.search(r"(?:^|; )(\d+) - (\d) = (\d+)$", line)
            assert m and (int(m[1]), int(m[2])) == (have, bottom), line
            borrow = 0
        results.append(m.group(m.lastindex))
    assert borrow == 0 and int("".join(reversed(results))) == a - b


def check_multiplication_parts(steps: str, a: int, b: int) -> None:
    """One partial product per nonzero digit of b, each a times that digit in its place."""
    assert f"Multiply {a} by each digit of {b}" in steps
    parts = [int(p) for p in re.findall(rf"^\w[\w ]*: {a} \* (\d+) = \d+$", steps, re.M)]
    expected = [int(c) * 10**i for i, c in enumerate(reversed(str(b))) if c != "0"]
    assert parts == expected


def check_long_division(steps: str, n: int, d: int) -> None:
    """Each step brings down the next digit, takes the largest multiple of d, and keeps the rest."""
    lines = re.findall(
        r"^Bring down (\d) to get (\d+); (\d+) goes into it (\d) times: (\d+) \* (\d) = (\d+), (\d+) - (\d+) = (\d+)$",
        steps,
        re.M,
    )
    digits = str(n)
    skipped = len(digits) - len(lines)
    remainder = int(digits[:skipped] or 0)
    assert remainder < d and (skipped == 0 or int(digits[: skipped + 1]) >= d)
    for i, line in enumerate(lines):
        digit, current, d1, k, d2, k2, product, current2, product2, rest = map(int, line)
        assert digit == int(digits[skipped + i]) and current == current2 == 10 * remainder + digit
        assert d1 == d2 == d and k == k2 and product == product2 == d * k and rest == current - product
        assert 0 <= rest < d
        remainder = rest
    assert "".join(line[3] for line in lines) == str(n // d) and remainder == n % d


def check_fraction_steps(steps: str, op: str, x_text: str, y_text: str) -> None:
    """The named common denominator, reciprocal and common divisor are the right ones."""
    for label, left in re.findall(r"^Rewrite (\S+): (\S+) = ", steps, re.M):
        assert label == left and left in (x_text, y_text)
    if m := re.search(r"The least common denominator of (\d+) and (\d+) is (\d+)\.", steps):
        assert op in "+-" and int(m[3]) == math.lcm(int(m[1]), int(m[2]))
    if m := re.search(r"Dividing by (\d+/\d+) is multiplying by its reciprocal (\d+)/(\d+)\.", steps):
        assert op == "÷" and m[1] == y_text and Fraction(int(m[2]), int(m[3])) == 1 / Fraction(y_text)
    last = steps.splitlines()[-1]
    if m := re.search(r"greatest common divisor (\d+): (-?\d+)/(\d+) = ", last):
        assert int(m[1]) == math.gcd(int(m[2]), int(m[3])) > 1
    elif m := re.fullmatch(r"(-?\d+)/(\d+) is already in lowest terms\.", last):
        assert math.gcd(int(m[1]), int(m[2])) == 1
    else:
        assert last == "The numerator is 0, so the result is 0."


def check_linear_moves(steps: str, left: str, right: str) -> None:
    """Each 'Subtract/Add T to both sides' or 'Divide both sides by k' line does just that."""
    moves = re.findall(
        r"^(Subtract|Add|Divide both sides by) (.*?)(?: from both sides| to both sides)?: (.+) = (.+)$", steps, re.M
    )
    assert moves
    for verb, term, new_left, new_right in moves:
        for x in (Fraction(0), Fraction(1), Fraction(-2)):
            def apply(side: str) -> Fraction:
                value, t = ev(side, x), ev(term, x)
                if verb == "Subtract":
                    return value - t
                return value + t if verb == "Add" else value / t

            assert (apply(left), apply(right)) == (ev(new_left, x), ev(new_right, x)), (verb, term, steps)
        left, right = new_left, new_right
    assert left == "x"


def check_problem(doc: str) -> str:
    """Re-derive the answer of one worked problem from its question; return the problem's kind."""
    m = DOC.fullmatch(doc)
    assert m, doc
    q, steps, ans = m["q"], m["steps"], m["a"]
    for sides in equalities(steps, ARITH):
        assert len({ev(s) for s in sides}) == 1, (sides, doc)

    if m2 := re.fullmatch(r"Compute (\d+) ([-+*]) (\d+)\.", q):
        a, op, b = int(m2[1]), m2[2], int(m2[3])
        expected = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert ans == str(expected) and f"So {a} {op} {b} = {expected}" in steps
        {"+": check_addition_columns, "-": check_subtraction_columns, "*": check_multiplication_parts}[op](steps, a, b)
        return {"+": "add", "-": "sub", "*": "mul"}[op]
    if m2 := re.fullmatch(r"Divide (\d+) by (\d+)\. Give the quotient and the remainder\.", q):
        n, d = int(m2[1]), int(m2[2])
        quotient, remainder = divmod(n, d)
        assert ans == f"quotient {quotient}, remainder {remainder}"
        check_long_division(steps, n, d)
        assert steps.startswith(f"Long division of {n} by {d}:")
        assert f"The quotient is {quotient} and the remainder is {remainder}." in steps
        return "div"
    if m2 := re.fullmatch(r"Compute (\d+)/(\d+) ([-+*÷]) (\d+)/(\d+)\. Write the result in lowest terms\.", q):
        x, op, y = Fraction(int(m2[1]), int(m2[2])), m2[3], Fraction(int(m2[4]), int(m2[5]))
        expected = {"+": x + y, "-": x - y, "*": x * y, "÷": x / y}[op]
        assert ans == str(expected)  # str(Fraction) is '19/12', '-1/12' or '5': lowest terms
        check_fraction_steps(steps, op, f"{m2[1]}/{m2[2]}", f"{m2[4]}/{m2[5]}")
        return "frac"
    if m2 := re.fullmatch(r"Solve for x: (.+) = (.+)\.", q):
        f0 = ev(m2[1], Fraction(0)) - ev(m2[2], Fraction(0))
        slope = ev(m2[1], Fraction(1)) - ev(m2[2], Fraction(1)) - f0
        solution = -f0 / slope
        assert ans == f"x = {solution}"
        check_linear_moves(steps, m2[1], m2[2])
        # Every rewritten equation still holds at the solution.
        rewritten = [s for s in equalities(steps, POLY) if any("x" in side for side in s)]
        assert rewritten
        for sides in rewritten:
            assert len({ev(s, solution) for s in sides}) == 1, (sides, doc)
        return "linear"
    if m2 := re.fullmatch(r"Expand \((.+)\)\((.+)\)\.", q):
        points = [Fraction(v) for v in (-3, 2, 5, Fraction(7, 2))]
        for x in points:
            assert ev(ans, x) == ev(m2[1], x) * ev(m2[2], x), doc
        identities = [s for s in equalities(steps, POLY) if any("x" in side for side in s)]
        assert len(identities) >= 5
        for sides in identities:
            for x in points:
                assert len({ev(s, x) for s in sides}) == 1, (sides, doc)
        assert ans.startswith(tuple("x-123456789")) and "+ -" not in ans and "- -" not in ans
        assert steps.endswith(f"Result: {ans}")
        return "expand"
    if m2 := re.match(r"\w+ buys (\d+) \w+ at \$(\d+) each and (\d+) \w+ at \$(\d+) each\.", q):
        n1, p1, n2, p2 = map(int, m2.groups())
        assert ans == f"${n1 * p1 + n2 * p2}"
        return "shop"
    if m2 := re.match(r"A train travels at (\d+) km/h for (\d+) hours, then at (\d+) km/h for (\d+) hours\.", q):
        v1, t1, v2, t2 = map(int, m2.groups())
        assert ans == f"{v1 * t1 + v2 * t2} km"
        return "train"
    if m2 := re.match(r"A jacket costs \$(\d+) and is on sale for (\d+)% off\.", q):
        price = Fraction(int(m2[1])) * (1 - Fraction(int(m2[2]), 100))
        assert price.denominator == 1 and ans == f"${price}"
        return "sale"
    if m2 := re.search(r"shares (\d+) marbles equally among (\d+) friends, and each friend then gives away (\d+)\.", q):
        total, friends, given = map(int, m2.groups())
        assert total % friends == 0 and total // friends > given and ans == str(total // friends - given)
        return "share"
    if m2 := re.match(r"A rectangular garden is (\d+) m long and (\d+) m wide\.", q):
        length, width = map(int, m2.groups())
        assert ans == f"area {length * width} m^2, perimeter {2 * (length + width)} m"
        return "garden"
    raise AssertionError(f"unknown kind of problem: {q!r}")


def test_math_worked_examples_check_themselves_against_an_independent_evaluator():
    # Guards for the checker itself, so that a broken checker cannot pass everything.
    assert ev("3/4 * 6/5") == Fraction(9, 10)
    assert ev("(2x + 3)(x - 4)", Fraction(5)) == 13 and ev("-x^2", Fraction(3)) == -9
    with pytest.raises(AssertionError):
        check_problem("Problem: Compute 12 + 30.\n\nSolution:\nSo 12 + 30 = 43\n\nAnswer: 43")
    with pytest.raises(AssertionError):
        check_problem("Problem: Compute 1/2 + 1/2. Write the result in lowest terms.\n\nSolution:\nx\n\nAnswer: 2/2")
    with pytest.raises(AssertionError):
        check_problem(
            "Problem: Solve for x: 2x + 1 = 7.\n\nSolution:\nSubtract 1 from both sides: 2x = 5\n\nAnswer: x = 3"
        )


def test_math_answers_and_steps_are_correct(tiny):
    generated = list(itertools.islice(corpus._math_documents(), 2500))
    kinds = [check_problem(doc) for doc in generated]
    counts = {kind: kinds.count(kind) for kind in set(kinds)}
    expected = {"add", "sub", "mul", "div", "frac", "linear", "expand", "shop", "train", "sale", "share", "garden"}
    assert set(counts) == expected
    assert min(counts.values()) >= 20
    # The corpus file holds the same stream from its start.
    written = texts(tiny["math"])
    assert written == generated[: len(written)]
    # Problems are not repeats of each other.
    assert len(set(generated)) >= 0.99 * len(generated)


def test_fraction_subtraction_and_negative_solutions_occur():
    docs = list(itertools.islice(corpus._math_documents(), 2500))
    answers = [DOC.fullmatch(d)["a"] for d in docs]
    assert any(re.fullmatch(r"-\d+/\d+", a) for a in answers)
    assert any(re.fullmatch(r"x = -\d+", a) for a in answers)
    assert any(re.fullmatch(r"x = -?\d+/\d+", a) for a in answers)


# --- Tokenizer ---------------------------------------------------------------------------------

TRICKY = [
    "",
    " leading and trailing spaces  ",
    "tabs\tand\nnew lines\r\n\n\n",
    "a . , ; : ! ? ( ) [ ] { }  -- ''",
    "Ünïcödé – “quotes” — 数学 😀 \u200b",
    f"two docs{corpus.EOS_TOKEN}joined",
    "\x00\x01 control bytes \x7f",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tiny, tmp_path_factory) -> Path:
    return corpus.train_tokenizer(list(tiny.values()), tmp_path_factory.mktemp("tok"), vocab_size=1024)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def test_tokenizer_has_eos_as_bos_and_pad(tokenizer):
    assert tokenizer.eos_token == corpus.EOS_TOKEN
    eos = tokenizer.eos_token_id
    assert eos == tokenizer.convert_tokens_to_ids(corpus.EOS_TOKEN)
    assert tokenizer.pad_token_id == eos and tokenizer.bos_token_id == eos
    assert tokenizer.encode(corpus.EOS_TOKEN, add_special_tokens=False) == [eos]
    # Nothing is added around a text: encoding with special tokens on changes nothing.
    plain = tokenizer.encode("def f(x):", add_special_tokens=False)
    assert tokenizer.encode("def f(x):", add_special_tokens=True) == plain
    assert 256 < len(tokenizer) <= 1024


def test_tokenizer_round_trips_every_document_and_odd_text(tiny, tokenizer):
    for name, path in tiny.items():
        for doc in texts(path):
            assert tokenizer.decode(tokenizer.encode(doc)) == doc, name
    for text in TRICKY:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_learned_merges(tiny, tokenizer):
    # A byte-level BPE that learned nothing would spend one token per byte.
    code = "\n".join(texts(tiny["code"]))
    assert len(code.encode("utf-8")) / len(tokenizer.encode(code)) > 2.0


def test_tokenizer_is_deterministic_and_skips_a_finished_build(tiny, tokenizer_dir, tmp_path):
    files = list(tiny.values())
    before = (tokenizer_dir / "tokenizer.json").stat().st_mtime_ns
    assert corpus.train_tokenizer(files, tokenizer_dir, vocab_size=1024) == tokenizer_dir
    assert (tokenizer_dir / "tokenizer.json").stat().st_mtime_ns == before

    again = corpus.train_tokenizer(files, tmp_path / "again", vocab_size=1024)
    assert (again / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()

    # Other inputs retrain in place.
    corpus.train_tokenizer(files, again, vocab_size=600)
    vocab = json.loads((again / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == 600


def test_tokenizer_input_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl"):
        corpus.train_tokenizer([tmp_path / "missing.jsonl"], tmp_path / "tok")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        corpus.train_tokenizer([bad], tmp_path / "tok")
    with pytest.raises(ConfigError, match="vocab_size"):
        corpus.train_tokenizer([bad], tmp_path / "tok", vocab_size=100)
    with pytest.raises(ConfigError):
        corpus.train_tokenizer([], tmp_path / "tok")


# --- the second domain set (issue 9's study) ----------------------------------------------------


@pytest.fixture(scope="module")
def alt(tmp_path_factory):
    return corpus.build_alt_corpus(tmp_path_factory.mktemp("alt"), scale=SCALE, progress=False)


def test_alt_set_has_every_domain_from_its_own_sources(alt, tiny):
    assert list(alt) == list(corpus.ALT_DOMAINS) and set(corpus.ALT_SOURCES) == set(corpus.ALT_DOMAINS)
    texts = {n: [json.loads(line)["text"] for line in p.read_text().splitlines()] for n, p in alt.items()}
    assert all(texts[n] for n in corpus.ALT_DOMAINS)
    # replay is the demo's slice (disjoint from the base model's prose); the rest is new material.
    assert alt["replay"].read_bytes() == tiny["replay"].read_bytes()
    demo_docs = {json.loads(line)["text"] for d in corpus.CPT_DOMAINS for line in tiny[d].read_text().splitlines()}
    assert not demo_docs & {t for n in ("cpp", "markdown", "records") for t in texts[n]}
    assert all("#include" in t or "#pragma" in t or "namespace" in t for t in texts["cpp"][:20])
    for doc in texts["records"]:  # every line of a records document is a JSON object
        assert all(isinstance(json.loads(line), dict) for line in doc.splitlines())
    assert all(len(t) >= corpus.MIN_MARKDOWN_CHARS for t in texts["markdown"])


def test_alt_set_is_deterministic_and_cached(alt, tmp_path):
    again = corpus.build_alt_corpus(tmp_path, scale=SCALE, progress=False)
    assert all(again[n].read_bytes() == alt[n].read_bytes() for n in corpus.ALT_DOMAINS)
    mtime = again["cpp"].stat().st_mtime_ns
    corpus.build_alt_corpus(tmp_path, scale=SCALE, progress=False)
    assert again["cpp"].stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match="scale"):
        corpus.build_alt_corpus(tmp_path, scale=0, progress=False)
