"""Generated math problems with step-by-step worked solutions: the demo corpus's `math` domain.

Column addition and subtraction, long multiplication and division, fractions, linear equations,
expanding products and word problems, drawn from a seeded `random.Random`, which gives the same
stream on every platform.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from fractions import Fraction

MATH_SEED = 20250601

_PLACES = ("ones", "tens", "hundreds", "thousands", "ten thousands", "hundred thousands", "millions", "ten millions")
_NAMES = ("Ana", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam", "Mei")
_ITEMS = ("notebooks", "pens", "apples", "tickets", "stamps", "candles", "mugs", "books", "plants", "batteries")


def _frac(q: Fraction) -> str:
    """'7/3', '-7/3' or '5' for a fraction in lowest terms."""
    return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


def _x_term(a: int) -> str:
    """'3x', 'x', '-x' or '-3x'."""
    return {1: "x", -1: "-x"}.get(a, f"{a}x")


def _linear(a: int, b: Fraction | int) -> str:
    """The expression a*x + b as written by hand: '3x - 5', 'x', '-7'."""
    if a == 0:
        return _frac(Fraction(b))
    if b == 0:
        return _x_term(a)
    return f"{_x_term(a)} {'+' if b > 0 else '-'} {_frac(abs(Fraction(b)))}"


def _quadratic(c2: int, c1: int, c0: int) -> str:
    """The polynomial c2*x^2 + c1*x + c0 (c2 != 0) as written by hand: '2x^2 - 5x - 12'."""
    text = {1: "x^2", -1: "-x^2"}.get(c2, f"{c2}x^2")
    for coeff, term in ((c1, _x_term(abs(c1))), (c0, str(abs(c0)))):
        if coeff:
            text += f" {'+' if coeff > 0 else '-'} {term}"
    return text


def _paren(text: str) -> str:
    return f"({text})" if text.startswith("-") else text


def _document(question: str, steps: list[str], answer: str) -> str:
    return f"Problem: {question}\n\nSolution:\n" + "\n".join(steps) + f"\n\nAnswer: {answer}"


def _digits(n: int) -> list[int]:
    """Decimal digits of n >= 0, least significant first."""
    return [int(c) for c in reversed(str(n))]


def _number(rng: random.Random, min_digits: int, max_digits: int) -> int:
    """A random whole number whose digit count is uniform in [min_digits, max_digits]."""
    k = rng.randint(min_digits, max_digits)
    return rng.randint(10 ** (k - 1), 10**k - 1)


def _signed(b: Fraction | int) -> str:
    """' + 5', ' - 5' or '' (for 0): a number appended to an expression."""
    if b == 0:
        return ""
    return f" {'+' if b > 0 else '-'} {_frac(abs(Fraction(b)))}"


def _math_addition(rng: random.Random) -> str:
    a, b = _number(rng, 3, 7), _number(rng, 2, 6)
    da, db = _digits(a), _digits(b)
    steps = ["Add the digits column by column from the right, carrying the tens of each column sum."]
    carry = 0
    for i in range(max(len(da), len(db))):
        terms = [d[i] for d in (da, db) if i < len(d)] + ([carry] if carry else [])
        total = sum(terms)
        shown = f"{' + '.join(map(str, terms))} = {total}" if len(terms) > 1 else str(total)
        steps.append(f"{_PLACES[i]}: {shown}, write {total % 10}, carry {total // 10}")
        carry = total // 10
    if carry:
        steps.append(f"The final carry {carry} becomes the leading digit.")
    steps.append(f"So {a} + {b} = {a + b}")
    return _document(f"Compute {a} + {b}.", steps, str(a + b))


def _math_subtraction(rng: random.Random) -> str:
    a = _number(rng, 3, 7)
    b = rng.randint(1, a - 1)
    da = _digits(a)
    db = _digits(b) + [0] * (len(da) - len(_digits(b)))  # pad with leading zeros
    steps = ["Subtract column by column from the right, borrowing 10 from the next column when needed."]
    borrow = 0
    for i, (top, bottom) in enumerate(zip(da, db)):
        have = top - borrow
        lead = f"{_PLACES[i]}: "
        if borrow:
            lead += f"the top digit {top} lent 1 to the column on its right, leaving {have}; "
        if have < bottom:
            steps.append(
                f"{lead}{have} is less than {bottom}, so borrow 10: {have + 10} - {bottom} = {have + 10 - bottom}"
            )
            borrow = 1
        else:
            steps.append(f"{lead}{have} - {bottom} = {have - bottom}")
            borrow = 0
    steps.append(f"So {a} - {b} = {a - b}")
    return _document(f"Compute {a} - {b}.", steps, str(a - b))


def _math_multiplication(rng: random.Random) -> str:
    a, b = _number(rng, 2, 4), _number(rng, 2, 3)
    steps = [f"Multiply {a} by each digit of {b}, shifted to its place, then add the partial products."]
    partials = []
    for i, digit in enumerate(_digits(b)):
        if digit:
            part = digit * 10**i
            partials.append(a * part)
            steps.append(f"{_PLACES[i]}: {a} * {part} = {a * part}")
    if len(partials) > 1:
        steps.append(f"Add the partial products: {' + '.join(map(str, partials))} = {sum(partials)}")
    steps.append(f"So {a} * {b} = {a * b}")
    return _document(f"Compute {a} * {b}.", steps, str(a * b))


def _math_division(rng: random.Random) -> str:
    d, n = rng.randint(3, 29), _number(rng, 3, 5)
    q, r = divmod(n, d)
    steps = [f"Long division of {n} by {d}: bring down one digit at a time."]
    current, started = 0, False
    for digit in str(n):
        current = current * 10 + int(digit)
        if not started and current < d:  # no leading zeros in the quotient
            continue
        started = True
        k = current // d
        steps.append(
            f"Bring down {digit} to get {current}; {d} goes into it {k} times: "
            f"{d} * {k} = {d * k}, {current} - {d * k} = {current - d * k}"
        )
        current -= d * k
    steps.append(f"The quotient is {q} and the remainder is {r}.")
    steps.append(f"Check: {q} * {d} + {r} = {n}")
    return _document(f"Divide {n} by {d}. Give the quotient and the remainder.", steps, f"quotient {q}, remainder {r}")


def _math_fraction(rng: random.Random) -> str:
    b, d = rng.randint(2, 12), rng.randint(2, 12)
    xn, yn = rng.randint(1, 2 * b), rng.randint(1, 2 * d)  # left unreduced: simplifying is part of it
    op = rng.choice("+-*/")
    x, y = Fraction(xn, b), Fraction(yn, d)
    xs, ys = f"{xn}/{b}", f"{yn}/{d}"
    steps = []
    if op in "+-":
        m = math.lcm(b, d)
        steps.append(f"The least common denominator of {b} and {d} is {m}.")
        for num, den in ((xn, b), (yn, d)):
            if den != m:
                steps.append(f"Rewrite {num}/{den}: {num}/{den} = {num * (m // den)}/{m}")
        left, right = xn * (m // b), yn * (m // d)
        raw_num, raw_den = (left + right if op == "+" else left - right), m
        steps.append(f"{left}/{m} {op} {right}/{m} = {raw_num}/{m}")
        result = x + y if op == "+" else x - y
    elif op == "*":
        raw_num, raw_den = xn * yn, b * d
        steps.append(f"Multiply the numerators and the denominators: {xs} * {ys} = {raw_num}/{raw_den}")
        result = x * y
    else:
        raw_num, raw_den = xn * d, b * yn
        steps.append(f"Dividing by {ys} is multiplying by its reciprocal {d}/{yn}.")
        steps.append(f"Multiply: {xs} * {d}/{yn} = {raw_num}/{raw_den}")
        result = x / y
    g = math.gcd(raw_num, raw_den)
    if raw_num == 0:
        steps.append("The numerator is 0, so the result is 0.")
    elif g > 1:
        steps.append(
            f"Divide the numerator and the denominator by their greatest common divisor {g}: "
            f"{raw_num}/{raw_den} = {_frac(result)}"
        )
    else:
        steps.append(f"{raw_num}/{raw_den} is already in lowest terms.")
    symbol = "÷" if op == "/" else op  # a plain '/' between two fractions would read as 3/4/5/6
    return _document(f"Compute {xs} {symbol} {ys}. Write the result in lowest terms.", steps, _frac(result))


def _math_linear(rng: random.Random) -> str:
    a = rng.randint(2, 9)
    c = rng.randint(-9, a - 1)  # c < a: the x terms gather on the left with a positive coefficient
    b = rng.randint(-40, 40)
    if rng.random() < 0.7:  # mostly whole-number solutions, as in textbooks
        d = (a - c) * rng.randint(-12, 12) + b
    else:
        d = rng.randint(-40, 40)
    solution = Fraction(d - b, a - c)
    steps = ["Gather the x terms on the left and the numbers on the right."]
    if c > 0:
        steps.append(f"Subtract {_x_term(c)} from both sides: {_linear(a - c, b)} = {d}")
    elif c < 0:
        steps.append(f"Add {_x_term(-c)} to both sides: {_linear(a - c, b)} = {d}")
    if b > 0:
        steps.append(f"Subtract {b} from both sides: {_x_term(a - c)} = {d - b}")
    elif b < 0:
        steps.append(f"Add {-b} to both sides: {_x_term(a - c)} = {d - b}")
    if a - c != 1:
        steps.append(f"Divide both sides by {a - c}: x = {_frac(solution)}")
    s = _frac(solution)
    steps.append(f"Check the left side: {a} * ({s}){_signed(b)} = {_frac(a * solution + b)}")
    if c:
        steps.append(f"Check the right side: {c} * ({s}){_signed(d)} = {_frac(c * solution + d)}")
    return _document(f"Solve for x: {_linear(a, b)} = {_linear(c, d)}.", steps, f"x = {s}")


def _math_expand(rng: random.Random) -> str:
    a, c = (rng.choice([k for k in range(-5, 7) if k]) for _ in range(2))
    b, d = (rng.choice([k for k in range(-9, 10) if k]) for _ in range(2))
    ax, cx, pb, pd = _paren(_x_term(a)), _paren(_x_term(c)), _paren(str(b)), _paren(str(d))
    outer, inner = a * d, b * c
    result = _quadratic(a * c, outer + inner, b * d)
    steps = [
        "Multiply every term of the first factor by every term of the second.",
        f"({_linear(a, b)})({_linear(c, d)}) = {ax} * {cx} + {ax} * {pd} + {pb} * {cx} + {pb} * {pd}",
        f"First: {ax} * {cx} = {_quadratic(a * c, 0, 0)}",
        f"Outer: {ax} * {pd} = {_x_term(outer)}",
        f"Inner: {pb} * {cx} = {_x_term(inner)}",
        f"Last: {pb} * {pd} = {b * d}",
        f"Combine the x terms: {_x_term(outer)} {'+' if inner > 0 else '-'} {_x_term(abs(inner))}"
        f" = {_linear(outer + inner, 0)}",
        f"Result: {result}",
    ]
    return _document(f"Expand ({_linear(a, b)})({_linear(c, d)}).", steps, result)


def _math_word(rng: random.Random) -> str:
    kind = rng.randrange(5)
    name = rng.choice(_NAMES)
    if kind == 0:
        item1, item2 = rng.sample(_ITEMS, 2)
        n1, p1, n2, p2 = rng.randint(2, 15), rng.randint(1, 25), rng.randint(2, 15), rng.randint(1, 25)
        question = (
            f"{name} buys {n1} {item1} at ${p1} each and {n2} {item2} at ${p2} each. "
            f"How much does {name} spend in total?"
        )
        total = n1 * p1 + n2 * p2
        steps = [
            f"{item1}: {n1} * {p1} = {n1 * p1}",
            f"{item2}: {n2} * {p2} = {n2 * p2}",
            f"Total: {n1 * p1} + {n2 * p2} = {total}",
        ]
        return _document(question, steps, f"${total}")
    if kind == 1:
        v1, t1, v2, t2 = rng.randint(40, 120), rng.randint(1, 6), rng.randint(40, 120), rng.randint(1, 6)
        question = (
            f"A train travels at {v1} km/h for {t1} hours, then at {v2} km/h for {t2} hours. "
            "How far does it travel in total?"
        )
        total = v1 * t1 + v2 * t2
        steps = [
            "Distance is speed times time.",
            f"First part: {v1} * {t1} = {v1 * t1}",
            f"Second part: {v2} * {t2} = {v2 * t2}",
            f"Total: {v1 * t1} + {v2 * t2} = {total}",
        ]
        return _document(question, steps, f"{total} km")
    if kind == 2:
        price, rate = 20 * rng.randint(1, 30), 5 * rng.randint(1, 15)
        off = price * rate // 100  # exact: price is a multiple of 20 and rate a multiple of 5
        question = f"A jacket costs ${price} and is on sale for {rate}% off. What is the sale price?"
        steps = [f"Discount: {price} * {rate}/100 = {off}", f"Sale price: {price} - {off} = {price - off}"]
        return _document(question, steps, f"${price - off}")
    if kind == 3:
        friends, each, given = rng.randint(2, 12), rng.randint(4, 20), rng.randint(1, 3)
        question = (
            f"{name} shares {friends * each} marbles equally among {friends} friends, and each friend "
            f"then gives away {given}. How many marbles does each friend have left?"
        )
        steps = [
            f"Share per friend: {friends * each} / {friends} = {each}",
            f"After giving some away: {each} - {given} = {each - given}",
        ]
        return _document(question, steps, str(each - given))
    length, width = rng.randint(3, 40), rng.randint(2, 30)
    question = f"A rectangular garden is {length} m long and {width} m wide. What are its area and its perimeter?"
    steps = [
        f"Area: {length} * {width} = {length * width}",
        f"Perimeter: 2 * ({length} + {width}) = {2 * (length + width)}",
    ]
    return _document(question, steps, f"area {length * width} m^2, perimeter {2 * (length + width)} m")


_MATH_KINDS = (
    _math_addition,
    _math_subtraction,
    _math_multiplication,
    _math_division,
    _math_fraction,
    _math_linear,
    _math_expand,
    _math_word,
)


def math_documents(seed: int = MATH_SEED) -> Iterator[str]:
    """An endless stream of worked problems; `random.Random(seed)` is the same on every platform."""
    rng = random.Random(seed)
    while True:
        yield rng.choice(_MATH_KINDS)(rng)
