"""Tests for the generated math problems in velocitune.demo.math_problems: every generated value is checked.

Answers are re-derived from each question with exact Fraction arithmetic, independently of the generator.
Every test here runs with network connections refused.
"""

import ast
import itertools
import math
import operator
import re
from fractions import Fraction

import pytest
from conftest import jsonl_texts

from velocitune.demo import math_problems

pytestmark = pytest.mark.usefixtures("no_network")

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
            def apply(side: str, x=x, term=term, verb=verb) -> Fraction:
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


def test_math_answers_and_steps_are_correct(demo_corpus):
    generated = list(itertools.islice(math_problems.math_documents(), 2500))
    kinds = [check_problem(doc) for doc in generated]
    counts = {kind: kinds.count(kind) for kind in set(kinds)}
    expected = {"add", "sub", "mul", "div", "frac", "linear", "expand", "shop", "train", "sale", "share", "garden"}
    assert set(counts) == expected
    assert min(counts.values()) >= 20
    # The corpus file holds the same stream from its start.
    written = jsonl_texts(demo_corpus["math"])
    assert written == generated[: len(written)]
    # Problems are not repeats of each other.
    assert len(set(generated)) >= 0.99 * len(generated)


def test_fraction_subtraction_and_negative_solutions_occur():
    docs = list(itertools.islice(math_problems.math_documents(), 2500))
    answers = [DOC.fullmatch(d)["a"] for d in docs]
    assert any(re.fullmatch(r"-\d+/\d+", a) for a in answers)
    assert any(re.fullmatch(r"x = -\d+", a) for a in answers)
    assert any(re.fullmatch(r"x = -?\d+/\d+", a) for a in answers)
