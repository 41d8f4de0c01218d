"""The statistics query: what a statistics spec asks each node to release, and how, validated once.

A statistics spec (``experiments.study``) is a TOML file; everything in it that a node
acts on is parsed here, on both sides, from the same mapping: the research partner's
tools validate and cost it, and each node parses and checks it again itself (it trusts
nothing the coordinator says and may not import ``experiments``). The tables::

    [data]               dataset, filter (optional), group_by (optional)
    [columns.<name>]     type = "numeric" (lower, upper, bins), "categorical" (levels)
                         or "boolean"; unit (optional)
    [[statistics]]       kind, name (optional), and what the kind needs:
                         count; sum, mean, variance, sd (column); proportion (column,
                         level for a categorical column); histogram (column, bins);
                         quantiles (column, bins, probabilities); two_by_two (exposure,
                         outcome); kaplan_meier (time, event, bins)
    [privacy]            epsilon, delta, split = "equal", mechanism = "laplace"
    [federation]         secure_aggregation = false (optional): how the answers travel

``kind`` and ``[study]`` belong to the spec around the query and are not read here.

``[federation] secure_aggregation = true`` asks that each site's noisy answer leave only
masked, through Flower's SecAgg+, so that the coordinator learns the element-wise sum of
the releases over the sites and, per cell, how many sites reported it (a site's
suppressed cells contribute nothing). Every statistic kind is covered: each pooling rule
(``federation.statistics``) reads only those totals and the per-site noise scales, which
the spec fixes. It is part of the signed spec, so each node and its officer see it, and a
node answers such a study only through SecAgg+ (and a plain study never through it). The
canonical form lists ``[federation]`` only when it is true, so the digests of studies
written before it existed do not change.

:meth:`StatisticsQuery.from_mapping` is the only way in. It reports every problem at once,
each naming its field (``statistics[2].column 'bmi' is not declared in [columns]``), as
one :class:`~privacy.errors.QueryError`, before any data is read; the result is frozen.

Rules the query states and every node applies
----------------------------------------------
- **Declared columns only.** A node reads the columns declared in ``[columns]`` and no
  other; a declared column no part of the query uses is a problem (read nothing more
  than is needed).
- **One row per patient** (the registered tabular dataset, whose connector refuses a
  duplicated id), so a patient falls in at most one cell of the group-by: a vector of
  per-cell counts has L1 sensitivity 1 (add/remove one patient).
- **Cells.** ``group_by`` columns are categorical (by their declared levels, never levels
  found in the data, which would reveal who is present), boolean (false, then true) or
  numeric (by the column's declared bins). Cells are the Cartesian product in
  ``group_by`` order, the first column varying slowest (:meth:`StatisticsQuery.cells`).
  A row whose group-by value is missing, or is not a declared level, is in no cell.
- **Bounds and clipping.** Every numeric column declares ``[lower, upper]``; values are
  clipped to them before any sum or binning (a value outside lands in the first or last
  bin). Sums are of the value *centred* at the midpoint ``m`` of the bounds, so a patient
  changes a centred sum by at most ``h = (upper - lower) / 2`` and a centred sum of
  squares by at most ``h**2``.
- **Bins** are ``[e0, e1), [e1, e2), ..., [e(k-1), ek]``: strictly increasing edges with
  ``e0 = lower`` and ``ek = upper``, so the bins cover the bounds exactly.
- **Missing values.** A row with a missing value in a statistic's column(s) is left out
  of that statistic; the count released with it counts the rows that contributed.
  Booleans are true/false or 1/0 (anything else is missing); categorical values are
  compared as text.
- **Filter** (``data.filter``): a small expression language over declared columns:
  comparisons ``= != < <= > >=``, ``in (...)``, ``not in (...)``, ``is null``, ``is not
  null``, ``and``, ``or``, ``not``, parentheses, number and string literals, ``true`` and
  ``false``; a boolean column may stand alone (``smoker and not diabetic``). It is parsed
  by :func:`parse_filter` into neutral dataclasses (never ``eval``, never SQL text) and
  evaluated with SQL's three-valued logic: a comparison with a missing value is unknown,
  and a row is kept only when the whole filter is true. Values are compared as read
  (before clipping).
- **Kaplan-Meier.** Time is clipped to its bounds; a time above the upper bound is
  censored there (administrative end of follow-up), whatever its event flag says.

The DP model (fixed by the plan of issue 10)
--------------------------------------------
The query's ``privacy.epsilon`` is split **equally across its statistics**, and inside a
statistic equally across its releases (:meth:`StatisticsQuery.releases`):

============== ================================================ ===================
statistic      releases (one DP release each)                    epsilon each
============== ================================================ ===================
count          count                                              eps_i
sum, mean      sum (centred), count                               eps_i / 2
variance, sd   sum (centred), sum_squares (centred^2), count      eps_i / 3
proportion     events, count                                      eps_i / 2
histogram      histogram (cells x bins)                           eps_i
quantiles      histogram (cells x bins)                           eps_i
two_by_two     table (cells x 4)                                  eps_i
kaplan_meier   events (2 x cells x bins), total (cells)           eps_i / 2
============== ================================================ ===================

Counts (integer vectors) get the discrete Laplace mechanism, sums (float vectors) the
Laplace mechanism, scale ``b = sensitivity / epsilon_release``. Each release is one DP
event for the ledger (:meth:`StatisticsQuery.events`), which composes them with PLD.

Limits on the work one query may ask of a node (cells, bins, levels, statistics, the
filter's length and depth) are the module's ``MAX_*`` constants; ``max_cells`` is the
node policy's to tighten.
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Union

from privacy import limits
from privacy.errors import QueryError
from privacy.events import DPEvent

__all__ = [
    "And",
    "COLUMN_TYPES",
    "ColumnSpec",
    "Compare",
    "Const",
    "ENVELOPE_KEYS",
    "FilterExpr",
    "FilterSyntaxError",
    "GroupBy",
    "IsIn",
    "IsNull",
    "MAX_BINS",
    "MAX_CELLS",
    "MAX_COLUMNS",
    "MAX_FILTER_DEPTH",
    "MAX_FILTER_LENGTH",
    "MAX_FILTER_TERMS",
    "MAX_GROUP_BY",
    "MAX_IN_VALUES",
    "MAX_LEVELS",
    "MAX_PROBABILITIES",
    "MAX_STATISTICS",
    "MAX_VALUES",
    "MIN_SECURE_SITES",
    "NOISE",
    "Not",
    "Or",
    "Ref",
    "Release",
    "SPLIT_RULES",
    "STATISTIC_KINDS",
    "STUDY_KIND",
    "Statistic",
    "StatisticsQuery",
    "Truth",
    "filter_columns",
    "parse_filter",
]

# ---------------------------------------------------------------- limits

#: Cells of a group-by (the product of its columns' levels or bins): the default policy.
MAX_CELLS = 1000
#: Columns one query may declare.
MAX_COLUMNS = 64
#: Columns one query may group by.
MAX_GROUP_BY = 4
#: Levels of one categorical column.
MAX_LEVELS = 100
#: Bins of one column or statistic.
MAX_BINS = 200
#: Statistics in one query.
MAX_STATISTICS = 32
#: Probabilities one quantiles statistic may ask for.
MAX_PROBABILITIES = 19
#: Numbers one query releases in all (sum of the release sizes).
MAX_VALUES = 200_000
#: The filter's text, in characters.
MAX_FILTER_LENGTH = 2000
#: Nesting of parentheses and ``not`` in the filter.
MAX_FILTER_DEPTH = 16
#: Predicates (comparisons, null checks, ``in`` lists, boolean columns) in the filter.
MAX_FILTER_TERMS = 64
#: Values in one ``in (...)`` list.
MAX_IN_VALUES = 100
#: Largest absolute value of a bound or bin edge: keeps h**2 of a centred square finite.
MAX_ABS_BOUND = 1e12
#: Column names, level names and statistic names.
MAX_NAME_LENGTH = 64

COLUMN_TYPES = ("numeric", "categorical", "boolean")
STATISTIC_KINDS = (
    "count", "sum", "mean", "variance", "sd", "proportion", "histogram", "quantiles", "two_by_two", "kaplan_meier",
)
#: How the query's epsilon is divided: equally across statistics, then across each one's releases.
SPLIT_RULES = ("equal",)
#: The noise family: discrete Laplace for counts, Laplace for sums.
NOISE = ("laplace",)
#: The fewest sites a securely aggregated study is answered by: a SecAgg+ "sum" over one site is its answer.
MIN_SECURE_SITES = 2
#: The ``kind`` of a statistics spec: what tells it apart from an experiment spec, signed with it.
STUDY_KIND = "statistics"
#: Top-level keys of the spec around the query (``experiments.study``); ``kind`` is checked here.
ENVELOPE_KEYS = ("kind", "study")

_TABLES = ("data", "columns", "statistics", "privacy", "federation")
_DATA_KEYS = ("dataset", "filter", "group_by", "cohort")
_PRIVACY_KEYS = ("epsilon", "delta", "split", "mechanism")
_FEDERATION_KEYS = ("secure_aggregation",)
# An experiment's [federation] keys: named as such when a study carries one.
_EXPERIMENT_FEDERATION_KEYS = (
    "strategy", "rounds", "min_nodes", "local_epochs", "learning_rate", "proximal_mu", "server_learning_rate",
    "node_wait_seconds", "approval_wait_seconds", "round_timeout_seconds", "secagg_num_shares",
    "secagg_reconstruction_threshold",
)
_COLUMN_KEYS = {
    "numeric": ("type", "lower", "upper", "bins", "unit"),
    "categorical": ("type", "levels", "unit"),
    "boolean": ("type", "unit"),
}
# The keys each statistic kind takes besides ``kind`` and ``name``.
_STATISTIC_KEYS: dict[str, tuple[str, ...]] = {
    "count": (),
    "sum": ("column",),
    "mean": ("column",),
    "variance": ("column",),
    "sd": ("column",),
    "proportion": ("column", "level"),
    "histogram": ("column", "bins"),
    "quantiles": ("column", "bins", "probabilities"),
    "two_by_two": ("exposure", "outcome"),
    "kaplan_meier": ("time", "event", "bins"),
}
_ALL_STATISTIC_KEYS = ("kind", "name", "column", "level", "bins", "probabilities", "exposure", "outcome", "time", "event")
_MAX_UNKNOWN_KEYS = 20  # named one by one up to this many per table
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")

# ---------------------------------------------------------------- the filter: neutral AST


@dataclass(frozen=True)
class Ref:
    """A declared column, by name."""

    column: str

    def render(self) -> str:
        return self.column


@dataclass(frozen=True)
class Const:
    """A literal: a number (int or float), a string or a boolean."""

    value: int | float | str | bool

    def render(self) -> str:
        value = self.value
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return f"'{value}'" if '"' in value else f'"{value}"'
        return repr(value)


@dataclass(frozen=True)
class Compare:
    """``left op right``; ``op`` is one of ``= != < <= > >=``. A column stands on the left."""

    op: str
    left: Ref
    right: Ref | Const

    def render(self) -> str:
        return f"{self.left.render()} {self.op} {self.right.render()}"


@dataclass(frozen=True)
class IsIn:
    """``column in (v1, v2, ...)``, or ``not in`` when `negated`."""

    column: str
    values: tuple[Const, ...]
    negated: bool = False

    def render(self) -> str:
        listed = ", ".join(value.render() for value in self.values)
        return f"{self.column} {'not in' if self.negated else 'in'} ({listed})"


@dataclass(frozen=True)
class IsNull:
    """``column is null``, or ``is not null`` when `negated`."""

    column: str
    negated: bool = False

    def render(self) -> str:
        return f"{self.column} is {'not null' if self.negated else 'null'}"


@dataclass(frozen=True)
class Truth:
    """A boolean column standing alone: true where the column is true."""

    column: str

    def render(self) -> str:
        return self.column


@dataclass(frozen=True)
class Not:
    operand: FilterExpr

    def render(self) -> str:
        return f"not {_grouped(self.operand)}"


@dataclass(frozen=True)
class And:
    operands: tuple[FilterExpr, ...]

    def render(self) -> str:
        return " and ".join(_grouped(operand) for operand in self.operands)


@dataclass(frozen=True)
class Or:
    operands: tuple[FilterExpr, ...]

    def render(self) -> str:
        return " or ".join(_grouped(operand) for operand in self.operands)


FilterExpr = Union[Compare, IsIn, IsNull, Truth, Not, And, Or]


def _grouped(expr: FilterExpr) -> str:
    return f"({expr.render()})" if isinstance(expr, (And, Or)) else expr.render()


def filter_columns(expr: FilterExpr) -> Iterator[str]:
    """Every column `expr` names, in order of appearance (with repeats)."""
    if isinstance(expr, Compare):
        yield expr.left.column
        if isinstance(expr.right, Ref):
            yield expr.right.column
    elif isinstance(expr, (IsIn, IsNull, Truth)):
        yield expr.column
    elif isinstance(expr, Not):
        yield from filter_columns(expr.operand)
    else:
        for operand in expr.operands:
            yield from filter_columns(operand)


# ---------------------------------------------------------------- the filter: parser


class FilterSyntaxError(ValueError):
    """The filter text is not a sentence of the filter language; the message says where."""


_KEYWORDS = frozenset({"and", "or", "not", "in", "is", "null", "true", "false"})
_COMPARISONS = {"=": "=", "==": "=", "!=": "!=", "<>": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
_FLIPPED = {"=": "=", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_TOKEN = re.compile(
    r"""
      (?P<space>[ \t\r\n]+)
    | (?P<number>(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)
    | (?P<string>'[^'\r\n]*'|"[^"\r\n]*")
    | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<op><=|>=|!=|<>|==|=|<|>|\(|\)|,|-)
    """,
    re.VERBOSE,
)
# Characters that mean the author (or an attacker) expected another language.
_FOREIGN = {
    ";": "statements are not part of the filter language",
    ".": "attributes are not part of the filter language",
    "[": "subscripts are not part of the filter language",
    "]": "subscripts are not part of the filter language",
    "{": "braces are not part of the filter language",
    "}": "braces are not part of the filter language",
    "#": "comments are not part of the filter language",
    "+": "arithmetic is not part of the filter language",
    "*": "arithmetic is not part of the filter language",
    "/": "arithmetic is not part of the filter language",
    "%": "arithmetic is not part of the filter language",
    "&": "write 'and'",
    "|": "write 'or'",
    "~": "write 'not'",
    "!": "write 'not', or '!=' to compare",
    "`": "quote strings with ' or \"",
    "\\": "strings have no escapes",
}


@dataclass(frozen=True)
class _Token:
    kind: str  # number, string, name, keyword, op, end
    text: str
    pos: int  # 1-based character position

    def shown(self) -> str:
        return "end of the filter" if self.kind == "end" else f"{_clip(self.text)!r} at position {self.pos}"


def _tokens(text: str) -> Iterator[_Token]:
    """The tokens of `text`, lazily: a bad character is reported when the parser reaches it,
    so the first problem in the text is the one named."""
    at = 0
    while at < len(text):
        match = _TOKEN.match(text, at)
        if match is None:
            char = text[at]
            if char in "'\"":
                raise FilterSyntaxError(f"the string opened at position {at + 1} is not closed on its line")
            hint = _FOREIGN.get(char, "the filter language has comparisons, in, is null, and, or, not and parentheses")
            raise FilterSyntaxError(f"unexpected character {char!r} at position {at + 1}; {hint}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            word = match.group()
            if kind == "name" and word.lower() in _KEYWORDS:
                yield _Token("keyword", word.lower(), at + 1)
            else:
                yield _Token(kind, word, at + 1)
        at = match.end()
    yield _Token("end", "", len(text) + 1)


class _Parser:
    """Recursive descent over the grammar::

        expr      := conj ("or" conj)*
        conj      := neg ("and" neg)*
        neg       := "not" neg | "(" expr ")" | predicate
        predicate := operand (cmp operand | "is" ["not"] "null" | ["not"] "in" "(" values ")")
                   | name                                  -- a boolean column
        operand   := name | number | "-" number | string | "true" | "false"
    """

    def __init__(self, text: str) -> None:
        self.source = _tokens(text)
        self.tokens: list[_Token] = []
        self.at = 0
        self.terms = 0

    def parse(self) -> FilterExpr:
        expr = self.disjunction(0)
        if self.peek().kind != "end":
            raise self.unexpected(self.peek(), "expected 'and', 'or' or the end of the filter")
        return expr

    def peek(self, ahead: int = 0) -> _Token:
        while len(self.tokens) <= self.at + ahead and (not self.tokens or self.tokens[-1].kind != "end"):
            self.tokens.append(next(self.source))
        return self.tokens[min(self.at + ahead, len(self.tokens) - 1)]

    def take(self) -> _Token:
        token = self.peek()
        self.at += 1
        return token

    def is_keyword(self, word: str, ahead: int = 0) -> bool:
        token = self.peek(ahead)
        return token.kind == "keyword" and token.text == word

    def is_op(self, op: str) -> bool:
        token = self.peek()
        return token.kind == "op" and token.text == op

    def unexpected(self, token: _Token, expected: str) -> FilterSyntaxError:
        return FilterSyntaxError(f"unexpected {token.shown()}; {expected}")

    def disjunction(self, depth: int) -> FilterExpr:
        parts = [self.conjunction(depth)]
        while self.is_keyword("or"):
            self.take()
            parts.append(self.conjunction(depth))
        flat = tuple(p for part in parts for p in (part.operands if isinstance(part, Or) else (part,)))
        return flat[0] if len(flat) == 1 else Or(flat)

    def conjunction(self, depth: int) -> FilterExpr:
        parts = [self.negation(depth)]
        while self.is_keyword("and"):
            self.take()
            parts.append(self.negation(depth))
        flat = tuple(p for part in parts for p in (part.operands if isinstance(part, And) else (part,)))
        return flat[0] if len(flat) == 1 else And(flat)

    def negation(self, depth: int) -> FilterExpr:
        if depth >= MAX_FILTER_DEPTH:
            raise FilterSyntaxError(
                f"nests deeper than {MAX_FILTER_DEPTH} levels of parentheses and 'not' at {self.peek().shown()}"
            )
        if self.is_keyword("not"):
            self.take()
            return Not(self.negation(depth + 1))
        if self.is_op("("):
            opened = self.take()
            expr = self.disjunction(depth + 1)
            if not self.is_op(")"):
                raise self.unexpected(self.peek(), f"expected ')' to close the '(' at position {opened.pos}")
            self.take()
            return expr
        return self.predicate()

    def predicate(self) -> FilterExpr:
        self.terms += 1
        if self.terms > MAX_FILTER_TERMS:
            raise FilterSyntaxError(f"has more than {MAX_FILTER_TERMS} terms (comparisons, null checks, in lists)")
        start = self.peek()
        left = self.operand()
        token = self.peek()
        if token.kind == "op" and token.text in _COMPARISONS:
            self.take()
            right = self.operand()
            op = _COMPARISONS[token.text]
            if isinstance(left, Ref):
                return Compare(op, left, right)
            if isinstance(right, Ref):
                return Compare(_FLIPPED[op], right, left)  # a column on the left: `18 <= age` is `age >= 18`
            raise FilterSyntaxError(
                f"the comparison at position {start.pos} compares two values; one side must be a column"
            )
        if self.is_keyword("is"):
            self.take()
            negated = self.is_keyword("not")
            if negated:
                self.take()
            if not self.is_keyword("null"):
                raise self.unexpected(self.peek(), "'is' is followed by 'null' or 'not null'")
            self.take()
            return IsNull(self.column_of(left, start, "is null"), negated)
        if self.is_keyword("in") or (self.is_keyword("not") and self.is_keyword("in", 1)):
            negated = self.is_keyword("not")
            self.at += 2 if negated else 1
            column = self.column_of(left, start, "not in" if negated else "in")
            return IsIn(column, self.values(), negated)
        if isinstance(left, Ref):
            return Truth(left.column)
        raise self.unexpected(token, "a value cannot stand alone; compare a column with it")

    def column_of(self, operand: Ref | Const, start: _Token, what: str) -> str:
        if isinstance(operand, Ref):
            return operand.column
        raise FilterSyntaxError(f"'{what}' at position {start.pos} must follow a column, not a value")

    def values(self) -> tuple[Const, ...]:
        if not self.is_op("("):
            raise self.unexpected(self.peek(), "'in' is followed by a list of values in parentheses")
        opened = self.take()
        values: list[Const] = []
        while True:
            if len(values) >= MAX_IN_VALUES:
                raise FilterSyntaxError(f"the list at position {opened.pos} has more than {MAX_IN_VALUES} values")
            value = self.operand()
            if isinstance(value, Ref):
                raise FilterSyntaxError(f"the list at position {opened.pos} holds column {value.column!r}; it takes values only")
            values.append(value)
            if self.is_op(","):
                self.take()
                if self.is_op(")"):
                    break
                continue
            if not self.is_op(")"):
                raise self.unexpected(self.peek(), f"expected ',' or ')' to close the list at position {opened.pos}")
            break
        self.take()
        return tuple(values)

    def operand(self) -> Ref | Const:
        token = self.take()
        if token.kind == "name":
            if self.is_op("("):
                raise FilterSyntaxError(
                    f"{token.text!r} at position {token.pos} is called like a function; "
                    "function calls are not part of the filter language"
                )
            return Ref(token.text)
        if token.kind == "number":
            return Const(_number(token))
        if token.kind == "op" and token.text == "-" and self.peek().kind == "number":
            return Const(-_number(self.take()))
        if token.kind == "string":
            return Const(token.text[1:-1])
        if token.kind == "keyword" and token.text in ("true", "false"):
            return Const(token.text == "true")
        if token.kind == "keyword" and token.text == "null":
            raise FilterSyntaxError(
                f"null at position {token.pos} compares with nothing (SQL's rule); write 'column is null' or 'column is not null'"
            )
        raise self.unexpected(token, "expected a column, a number, a string, true or false")


def _number(token: _Token) -> int | float:
    text = token.text
    if re.fullmatch(r"[0-9]+", text):
        value: int | float = int(text)
        if abs(value) > 2**53:
            raise FilterSyntaxError(f"the number at position {token.pos} is too large to compare exactly")
        return value
    value = float(text)
    if not math.isfinite(value):
        raise FilterSyntaxError(f"the number at position {token.pos} is not finite")
    return value


def parse_filter(text: str) -> FilterExpr:
    """Parse a filter in the filter language into neutral dataclasses; checks syntax only.

    Columns are not resolved here: :meth:`StatisticsQuery.from_mapping` checks every name
    and type against ``[columns]``. Rendering the result (``expr.render()``) gives the
    canonical text, which parses to the same expression.

    Raises
    ------
    FilterSyntaxError
        The text is too long, nests too deep, or is not a sentence of the language; the
        message names the position.
    """
    if len(text) > MAX_FILTER_LENGTH:
        raise FilterSyntaxError(f"is {len(text)} characters long; at most {MAX_FILTER_LENGTH} are allowed")
    if not text.strip():
        raise FilterSyntaxError("is empty; leave data.filter out to keep every row")
    return _Parser(text).parse()


# ---------------------------------------------------------------- the query's parts


@dataclass(frozen=True)
class ColumnSpec:
    """One declared column: its type and what the query may do with it.

    ``lower``/``upper`` (numeric) bound it, ``bins`` (numeric, optional) cut it,
    ``levels`` (categorical) are its values, in the order cells list them.
    """

    name: str
    type: str
    lower: float | None = None
    upper: float | None = None
    bins: tuple[float, ...] | None = None
    levels: tuple[str, ...] | None = None
    unit: str = ""

    @property
    def center(self) -> float:
        """Midpoint of the bounds: sums are of ``clip(value) - center``."""
        assert self.lower is not None and self.upper is not None
        return (self.lower + self.upper) / 2

    @property
    def half_width(self) -> float:
        """``(upper - lower) / 2``: the most one patient changes a centred sum."""
        assert self.lower is not None and self.upper is not None
        return (self.upper - self.lower) / 2

    def to_mapping(self) -> dict[str, Any]:
        mapping: dict[str, Any] = {"type": self.type}
        if self.type == "numeric":
            mapping.update(lower=self.lower, upper=self.upper)
            if self.bins is not None:
                mapping["bins"] = list(self.bins)
        if self.levels is not None:
            mapping["levels"] = list(self.levels)
        if self.unit:
            mapping["unit"] = self.unit
        return mapping


@dataclass(frozen=True)
class GroupBy:
    """One group-by column and its cell labels, in cell order."""

    column: str
    type: str  # categorical, boolean or numeric
    labels: tuple[str, ...]  # levels; "false", "true"; or bins as "[18, 40)" ... "[70, 90]"
    levels: tuple[str, ...] | None = None  # categorical
    bins: tuple[float, ...] | None = None  # numeric: the edges

    @property
    def size(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Statistic:
    """One statistic of the query, with the columns it reads and its share of epsilon.

    ``bins`` are resolved: the statistic's own, or its column's.
    """

    name: str
    kind: str
    epsilon: float
    column: str | None = None  # sum, mean, variance, sd, proportion, histogram, quantiles
    level: str | None = None  # proportion of a categorical level
    bins: tuple[float, ...] | None = None  # histogram, quantiles, kaplan_meier
    probabilities: tuple[float, ...] | None = None  # quantiles
    exposure: str | None = None  # two_by_two
    outcome: str | None = None  # two_by_two
    time: str | None = None  # kaplan_meier
    event: str | None = None  # kaplan_meier

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns this statistic reads."""
        named = (self.column, self.exposure, self.outcome, self.time, self.event)
        return tuple(name for name in named if name is not None)

    def to_mapping(self) -> dict[str, Any]:
        mapping: dict[str, Any] = {"kind": self.kind, "name": self.name}
        for key in _STATISTIC_KEYS[self.kind]:
            value = getattr(self, key)
            if value is not None:
                mapping[key] = list(value) if isinstance(value, tuple) else value
        return mapping


@dataclass(frozen=True)
class Release:
    """One DP release of one statistic: a vector, its noise and its share of epsilon.

    Attributes
    ----------
    statistic
        The statistic's name in the spec.
    name
        ``count``, ``sum``, ``sum_squares``, ``events``, ``histogram``, ``table``, ``total``.
    kind
        ``count`` (an integer vector) or ``sum`` (a float vector).
    column
        The value column, for sums.
    transform
        What is summed: ``centred`` (``clip(x) - center``), ``centred_square``
        (``(clip(x) - center) ** 2``) or ``none`` (counts).
    sensitivity
        L1 sensitivity of the whole vector under add/remove one patient.
    mechanism
        ``discrete-laplace`` (counts) or ``laplace`` (sums).
    scale
        Noise scale ``b = sensitivity / epsilon``.
    epsilon
        This release's share of the query's epsilon.
    shape
        The vector's layout, row-major: ``(cells,)``; ``(cells, bins)`` for a histogram;
        ``(cells, 4)`` for a 2x2 table; ``(2, cells, bins)`` for Kaplan-Meier events
        (events, then censorings).
    """

    statistic: str
    name: str
    kind: str
    column: str | None
    transform: str
    sensitivity: float
    mechanism: str
    scale: float
    epsilon: float
    shape: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        """How many values the release holds."""
        return math.prod(self.shape)


# ---------------------------------------------------------------- the query


@dataclass(frozen=True)
class StatisticsQuery:
    """A validated, frozen statistics query. Build it with :meth:`from_mapping`."""

    dataset: str
    filter: FilterExpr | None
    columns: tuple[ColumnSpec, ...]
    group_by: tuple[GroupBy, ...]
    statistics: tuple[Statistic, ...]
    epsilon: float
    delta: float
    split: str = "equal"
    mechanism: str = "laplace"
    secure_aggregation: bool = False
    # A cohort the node builds from its OMOP source (``[data.cohort]``; dates as ISO text):
    # its task, dates and windows, checked by ``experiments.study`` and by the node against
    # the clinical task definitions. Its covariates are the declared columns but its label.
    cohort: Mapping[str, Any] | None = None

    @classmethod
    def from_mapping(
        cls, mapping: Mapping[str, Any], *, source: str = "<mapping>", max_cells: int = MAX_CELLS
    ) -> StatisticsQuery:
        """Validate a query given as nested mappings (TOML tables, parsed JSON).

        `mapping` is the whole statistics spec; its ``kind`` and ``[study]`` are left to
        the spec. `max_cells` is the most cells a group-by may have (a node passes its
        policy's limit).

        Raises
        ------
        QueryError
            Listing every problem, each naming its field.
        """
        if not isinstance(mapping, Mapping):
            raise QueryError(source, [f"a statistics spec must be a table of tables; found {_show(mapping)}"])
        check = _Check(max_cells)
        query = check.query(mapping)
        if check.problems or query is None:
            raise QueryError(source, list(dict.fromkeys(check.problems)))
        return query

    def column(self, name: str) -> ColumnSpec:
        """The declaration of column `name`.

        Raises
        ------
        KeyError
            `name` is not declared.
        """
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(name)

    @property
    def column_names(self) -> tuple[str, ...]:
        """Every declared column, by name: all a node may read."""
        return tuple(column.name for column in self.columns)

    @property
    def n_cells(self) -> int:
        return math.prod(group.size for group in self.group_by)

    def cells(self) -> list[tuple[str, ...]]:
        """Group labels of every cell, in release order (first group-by column slowest).

        A query without ``group_by`` has one cell, ``()``.
        """
        return list(itertools.product(*(group.labels for group in self.group_by)))

    def releases(self) -> list[Release]:
        """The release plan: every DP release of the query, in order (statistics in spec order)."""
        releases: list[Release] = []
        cells = self.n_cells
        for statistic in self.statistics:
            planned = _planned(statistic, self, cells)
            share = statistic.epsilon / len(planned)
            for name, kind, column, transform, sensitivity, shape in planned:
                mechanism = "discrete-laplace" if kind == "count" else "laplace"
                releases.append(Release(
                    statistic=statistic.name, name=name, kind=kind, column=column, transform=transform,
                    sensitivity=sensitivity, mechanism=mechanism, scale=sensitivity / share, epsilon=share,
                    shape=shape,
                ))
        return releases

    def events(self) -> list[DPEvent]:
        """One DP event per release, in release order: what the ledger charges and ``cost`` composes.

        ``noise_multiplier`` is the scale over the sensitivity (for discrete Laplace, whose
        sensitivity is 1, the scale itself).
        """
        return [
            DPEvent(
                noise_multiplier=release.scale / release.sensitivity, sample_rate=1.0, steps=1,
                mechanism=release.mechanism,
            )
            for release in self.releases()
        ]

    def to_mapping(self) -> dict[str, Any]:
        """The query's tables as plain JSON-compatible values, every default filled.

        :meth:`from_mapping` reads it back to an equal query; the filter is its canonical
        text (:func:`parse_filter` of it renders the same).
        """
        data: dict[str, Any] = {"dataset": self.dataset, "group_by": [group.column for group in self.group_by]}
        if self.filter is not None:
            data["filter"] = self.filter.render()
        if self.cohort is not None:  # only when asked: a study of a flat dataset keeps its digest
            data["cohort"] = dict(self.cohort)
        mapping: dict[str, Any] = {
            "data": data,
            "columns": {column.name: column.to_mapping() for column in self.columns},
            "statistics": [statistic.to_mapping() for statistic in self.statistics],
            "privacy": {"epsilon": self.epsilon, "delta": self.delta, "split": self.split, "mechanism": self.mechanism},
        }
        if self.secure_aggregation:  # only when asked: a plain study's canonical form (and digest) is as before
            mapping["federation"] = {"secure_aggregation": True}
        return mapping


def _planned(
    statistic: Statistic, query: StatisticsQuery, cells: int
) -> list[tuple[str, str, str | None, str, float, tuple[int, ...]]]:
    """(name, kind, column, transform, sensitivity, shape) of each release of `statistic`."""
    kind = statistic.kind
    count = ("count", "count", None, "none", 1.0, (cells,))
    if kind == "count":
        return [count]
    if kind in ("sum", "mean", "variance", "sd"):
        assert statistic.column is not None
        h = query.column(statistic.column).half_width
        total = ("sum", "sum", statistic.column, "centred", h, (cells,))
        if kind in ("sum", "mean"):
            return [total, count]
        return [total, ("sum_squares", "sum", statistic.column, "centred_square", h * h, (cells,)), count]
    if kind == "proportion":
        return [("events", "count", None, "none", 1.0, (cells,)), count]
    if kind in ("histogram", "quantiles"):
        assert statistic.bins is not None
        return [("histogram", "count", None, "none", 1.0, (cells, len(statistic.bins) - 1))]
    if kind == "two_by_two":
        return [("table", "count", None, "none", 1.0, (cells, 4))]
    assert kind == "kaplan_meier" and statistic.bins is not None
    return [
        ("events", "count", None, "none", 1.0, (2, cells, len(statistic.bins) - 1)),
        ("total", "count", None, "none", 1.0, (cells,)),
    ]


# ---------------------------------------------------------------- validation

_ABSENT = object()


class _Check:
    """Reads a query mapping, collecting every problem by field instead of stopping at the first."""

    def __init__(self, max_cells: int) -> None:
        self.max_cells = max_cells
        self.problems: list[str] = []
        # Every declared name, with its declaration when that is valid (None when not, so
        # that a reference to it is not reported a second time as undeclared).
        self.declared: dict[str, ColumnSpec | None] = {}
        self.used: set[str] = set()

    def add(self, message: str) -> None:
        self.problems.append(message)

    # ---------------------------------------------------------------- the tables

    def query(self, raw: Mapping[str, Any]) -> StatisticsQuery | None:
        extra = [key for key in raw if key not in _TABLES and key not in ENVELOPE_KEYS]
        if len(extra) > _MAX_UNKNOWN_KEYS:
            self.add(f"the spec has {len(extra)} tables that are not known; the tables are {', '.join(f'[{t}]' for t in _TABLES)}")
            extra = []
        for key in extra:
            hint = _did_you_mean(str(key), _TABLES, fmt="[{}]") or f"; the tables are {', '.join(f'[{t}]' for t in _TABLES)}"
            if key in ("experiment", "model"):
                hint = "; this looks like an experiment spec: use `medfed experiment` for it"
            self.add(f"[{_clip(str(key))}] is not a known table{hint}")
        kind = raw.get("kind", STUDY_KIND)
        if kind != STUDY_KIND:
            self.add(f"kind must be {STUDY_KIND!r} for a statistics spec; found {_show(kind)}")
        columns = self.columns(raw.get("columns", _ABSENT))
        data = self.table(raw.get("data", _ABSENT), "data", _DATA_KEYS)
        dataset = self.text(data.get("dataset", _ABSENT), "data.dataset") if data is not None else None
        expr = self.filter(data.get("filter", _ABSENT)) if data is not None else None
        group_by = self.group_by(data.get("group_by", []) if data is not None else [])
        cohort = self.cohort(data.get("cohort", _ABSENT)) if data is not None else None
        privacy = self.table(raw.get("privacy", _ABSENT), "privacy", _PRIVACY_KEYS)
        epsilon = self.epsilon(privacy.get("epsilon", _ABSENT)) if privacy is not None else None
        statistics = self.statistics(raw.get("statistics", _ABSENT), epsilon)
        delta = split = mechanism = None
        if privacy is not None:
            delta = self.number(privacy.get("delta", _ABSENT), "privacy.delta")
            if delta is not None and not limits.MIN_DELTA <= delta < 1:
                self.add(f"privacy.delta must be in [{limits.MIN_DELTA:g}, 1); found {_show(delta)}")
                delta = None
            split = self.choice(privacy.get("split", "equal"), "privacy.split", SPLIT_RULES)
            if privacy.get("mechanism") == "gaussian":
                self.add("privacy.mechanism 'gaussian' is not available for statistics yet; use 'laplace'")
            else:
                mechanism = self.choice(privacy.get("mechanism", "laplace"), "privacy.mechanism", NOISE)
        for name, column in self.declared.items() if not self.problems else ():
            # Judged only on an otherwise valid query: a reference that failed would make it look unused.
            if column is not None and name not in self.used:
                self.add(
                    f"columns.{name} is declared but no part of the query uses it; remove it (a node reads "
                    "only the columns a query needs)"
                )
        if group_by is not None and statistics is not None:
            self.sizes(group_by, statistics, columns)
        secure = self.federation(raw.get("federation", _ABSENT))
        if self.problems or None in (dataset, group_by, statistics, epsilon, delta, split, mechanism, columns, secure):
            return None
        assert dataset is not None and group_by is not None and statistics is not None and columns is not None
        assert epsilon is not None and delta is not None and split is not None and mechanism is not None
        assert secure is not None
        return StatisticsQuery(
            dataset=dataset, filter=expr, columns=columns, group_by=group_by, statistics=statistics,
            epsilon=epsilon, delta=delta, split=split, mechanism=mechanism, secure_aggregation=secure,
            cohort=cohort,
        )

    def cohort(self, raw: Any) -> dict[str, Any] | None:
        """``data.cohort``: a table, kept with its dates as ISO text (its content is judged against the tasks)."""
        if raw is _ABSENT:
            return None
        if not isinstance(raw, Mapping):
            self.add(f"data.cohort must be a table; found {_show(raw)}")
            return None

        def plain(value: Any) -> Any:
            if isinstance(value, (date, datetime)):
                return value.isoformat()
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value

        return {str(key): plain(value) for key, value in raw.items()}

    def federation(self, raw: Any) -> bool | None:
        """``[federation]``: whether the answers travel through SecAgg+ (absent: they do not)."""
        if raw is _ABSENT:
            return False
        if not isinstance(raw, Mapping):
            self.add(f"federation must be a table; found {_show(raw)}")
            return None
        for key in raw:
            if key in _EXPERIMENT_FEDERATION_KEYS:
                self.add(
                    f"federation.{key} is an experiment's setting; a study's [federation] has only "
                    f"{', '.join(_FEDERATION_KEYS)}"
                )
        self.keys({k: v for k, v in raw.items() if k not in _EXPERIMENT_FEDERATION_KEYS}, "federation", _FEDERATION_KEYS)
        secure = raw.get("secure_aggregation", False)
        if not isinstance(secure, bool):
            self.add(f"federation.secure_aggregation must be true or false; found {_show(secure)}")
            return None
        return secure

    def columns(self, raw: Any) -> tuple[ColumnSpec, ...] | None:
        if raw is _ABSENT:
            self.add("the [columns] table is required: declare each column the query reads ([columns.<name>])")
            return None
        if not isinstance(raw, Mapping):
            self.add(f"columns must be a table of column declarations; found {_show(raw)}")
            return None
        if not raw:
            self.add("[columns] must declare at least one column")
            return None
        if len(raw) > MAX_COLUMNS:
            self.add(f"[columns] declares {len(raw)} columns; at most {MAX_COLUMNS} are allowed")
            return None
        out: list[ColumnSpec] = []
        for name, declaration in raw.items():
            column = self.column(str(name), declaration)
            self.declared[str(name)] = column
            if column is not None:
                out.append(column)
        # By name: the order the canonical JSON gives them, so that a query read back from it is equal.
        return tuple(sorted(out, key=lambda c: c.name)) if len(out) == len(raw) else None

    def column(self, name: str, raw: Any) -> ColumnSpec | None:
        where = f"columns.{name}"
        ok = True
        if not _IDENTIFIER.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
            self.add(
                f"{where}: a column name must be letters, digits and '_', not starting with a digit, "
                f"at most {MAX_NAME_LENGTH} characters (the filter names columns so)"
            )
            ok = False
        elif name.lower() in _KEYWORDS:
            self.add(f"{where}: {name!r} is a word of the filter language and cannot name a column")
            ok = False
        if not isinstance(raw, Mapping):
            self.add(f"{where} must be a table (type = ...); found {_show(raw)}")
            return None
        kind = self.choice(raw.get("type", _ABSENT), f"{where}.type", COLUMN_TYPES)
        if kind is None:
            return None
        self.keys(raw, where, _COLUMN_KEYS[kind], what=f"a {kind} column", every=_COLUMN_KEYS["numeric"] + ("levels",))
        unit = raw.get("unit", "")
        if not isinstance(unit, str):
            self.add(f"{where}.unit must be a string; found {_show(unit)}")
            ok = False
        if kind == "boolean":
            return ColumnSpec(name, kind, unit=unit) if ok and isinstance(unit, str) else None
        if kind == "categorical":
            levels = self.levels(raw.get("levels", _ABSENT), f"{where}.levels")
            if levels is None or not ok:
                return None
            return ColumnSpec(name, kind, levels=levels, unit=unit)
        lower = self.bound(raw.get("lower", _ABSENT), f"{where}.lower")
        upper = self.bound(raw.get("upper", _ABSENT), f"{where}.upper")
        if lower is not None and upper is not None and not lower < upper:
            self.add(f"{where}.lower must be < {where}.upper; found {_show(lower)} and {_show(upper)}")
            return None
        bins = None
        if "bins" in raw:
            bins = self.edges(raw["bins"], f"{where}.bins", lower, upper)
            ok = ok and bins is not None
        if lower is None or upper is None or not ok:
            return None
        return ColumnSpec(name, kind, lower=lower, upper=upper, bins=bins, unit=unit)

    def filter(self, raw: Any) -> FilterExpr | None:
        if raw is _ABSENT:
            return None
        if not isinstance(raw, str):
            self.add(f"data.filter must be a string; found {_show(raw)}")
            return None
        try:
            expr = parse_filter(raw)
        except FilterSyntaxError as err:
            self.add(f"data.filter: {err}")
            return None
        self.filter_types(expr)
        return expr

    def group_by(self, raw: Any) -> tuple[GroupBy, ...] | None:
        if isinstance(raw, (list, tuple)) and len(raw) > MAX_GROUP_BY:
            self.add(f"data.group_by lists {len(raw)} columns; at most {MAX_GROUP_BY} are allowed")
            return None
        if not isinstance(raw, (list, tuple)) or not all(isinstance(name, str) for name in raw):
            self.add(f"data.group_by must be a list of column names; found {_show(raw)}")
            return None
        repeated = sorted({name for name in raw if raw.count(name) > 1})
        if repeated:
            self.add(f"data.group_by lists {', '.join(map(repr, repeated))} more than once")
            return None
        groups: list[GroupBy] = []
        for index, name in enumerate(raw):
            column = self.reference(name, f"data.group_by[{index}]")
            if column is None:
                continue
            if column.type == "categorical":
                assert column.levels is not None
                groups.append(GroupBy(name, "categorical", column.levels, levels=column.levels))
            elif column.type == "boolean":
                groups.append(GroupBy(name, "boolean", ("false", "true")))
            elif column.bins is None:
                self.add(
                    f"data.group_by[{index}] groups by numeric column {name!r}, which needs columns.{name}.bins "
                    "(its cells are declared bins, never values found in the data)"
                )
            else:
                groups.append(GroupBy(name, "numeric", _bin_labels(column.bins), bins=column.bins))
        return tuple(groups) if len(groups) == len(raw) else None

    def statistics(self, raw: Any, epsilon: float | None) -> tuple[Statistic, ...] | None:
        if raw is _ABSENT:
            self.add("at least one [[statistics]] entry is required")
            return None
        if not isinstance(raw, (list, tuple)) or not raw:
            self.add(f"statistics must be a non-empty list of tables ([[statistics]]); found {_show(raw)}")
            return None
        if len(raw) > MAX_STATISTICS:
            self.add(f"statistics has {len(raw)} entries; at most {MAX_STATISTICS} are allowed")
            return None
        share = epsilon / len(raw) if epsilon is not None else 1.0
        out = [self.statistic(index, entry, share) for index, entry in enumerate(raw)]
        names = [statistic.name for statistic in out if statistic is not None]
        repeated = sorted({name for name in names if names.count(name) > 1})
        for name in repeated:
            self.add(
                f"statistics name {name!r} is given to more than one entry; give each a distinct name = ..."
            )
        if any(statistic is None for statistic in out) or repeated:
            return None
        return tuple(s for s in out if s is not None)

    def statistic(self, index: int, raw: Any, epsilon: float) -> Statistic | None:
        where = f"statistics[{index}]"
        if not isinstance(raw, Mapping):
            self.add(f"{where} must be a table; found {_show(raw)}")
            return None
        kind = self.choice(raw.get("kind", _ABSENT), f"{where}.kind", STATISTIC_KINDS)
        if kind is None:
            return None
        allowed = ("kind", "name", *_STATISTIC_KEYS[kind])
        self.keys(raw, where, allowed, what=f"kind = {kind!r}", every=_ALL_STATISTIC_KEYS)
        ok = all(key in allowed for key in raw)
        fields: dict[str, Any] = {}
        for key in _STATISTIC_KEYS[kind]:
            if key in ("level", "bins", "probabilities"):
                continue  # not columns; read below, against the columns they qualify
            column = self.reference(raw.get(key, _ABSENT), f"{where}.{key}")
            fields[key] = column
            ok = ok and column is not None
        # What each kind needs of its columns.
        value = fields.get("column")
        if kind in ("sum", "mean", "variance", "sd", "histogram", "quantiles") and value is not None:
            ok = self.expect(value, "numeric", f"{where}.column", kind) and ok
        for key in ("exposure", "outcome", "event"):
            if fields.get(key) is not None:
                ok = self.expect(fields[key], "boolean", f"{where}.{key}", kind) and ok
        if fields.get("time") is not None:
            time = fields["time"]
            ok = self.expect(time, "numeric", f"{where}.time", kind) and ok
            if time.type == "numeric" and time.lower is not None and time.lower < 0:
                self.add(f"{where}.time {time.name!r} is a duration: columns.{time.name}.lower must be >= 0; found {_show(time.lower)}")
                ok = False
        level = None
        if kind == "proportion" and value is not None:
            level, ok_level = self.proportion_level(raw.get("level", _ABSENT), value, where)
            ok = ok and ok_level
        bins = None
        if kind in ("histogram", "quantiles", "kaplan_meier"):
            binned = fields.get("column") if kind != "kaplan_meier" else fields.get("time")
            bins = self.statistic_bins(raw.get("bins", _ABSENT), binned, where, "column" if kind != "kaplan_meier" else "time")
            ok = ok and bins is not None
        probabilities = None
        if kind == "quantiles":
            probabilities = self.probabilities(raw.get("probabilities", _ABSENT), f"{where}.probabilities")
            ok = ok and probabilities is not None
        name = raw.get("name", _ABSENT)
        if name is _ABSENT:
            name = _default_name(kind, {key: raw.get(key) for key in _STATISTIC_KEYS[kind]})
        elif not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
            self.add(
                f"{where}.name must be letters, digits, '_', '.' and '-', at most {MAX_NAME_LENGTH} characters; "
                f"found {_show(name)}"
            )
            ok = False
        if not ok:
            return None
        return Statistic(
            name=name, kind=kind, epsilon=epsilon, column=value.name if value is not None else None, level=level,
            bins=bins, probabilities=probabilities,
            exposure=_name_of(fields.get("exposure")), outcome=_name_of(fields.get("outcome")),
            time=_name_of(fields.get("time")), event=_name_of(fields.get("event")),
        )

    def sizes(
        self, group_by: tuple[GroupBy, ...], statistics: tuple[Statistic, ...], columns: tuple[ColumnSpec, ...] | None
    ) -> None:
        cells = math.prod(group.size for group in group_by)
        if cells > self.max_cells:
            parts = " x ".join(f"{g.column}: {g.size} {'bins' if g.type == 'numeric' else 'levels'}" for g in group_by)
            self.add(f"data.group_by gives {cells} cells ({parts}); at most {self.max_cells} are allowed")
            return
        values = 0
        for statistic in statistics:
            bins = len(statistic.bins) - 1 if statistic.bins is not None else 0
            values += {
                "count": cells, "sum": 2 * cells, "mean": 2 * cells, "variance": 3 * cells, "sd": 3 * cells,
                "proportion": 2 * cells, "histogram": cells * bins, "quantiles": cells * bins,
                "two_by_two": 4 * cells, "kaplan_meier": 2 * cells * bins + cells,
            }[statistic.kind]
        if values > MAX_VALUES:
            self.add(
                f"statistics release {values} numbers in all over {cells} cells; at most {MAX_VALUES} are allowed: "
                "use fewer cells, bins or statistics"
            )

    # ---------------------------------------------------------------- the filter's names and types

    def filter_types(self, expr: FilterExpr) -> None:
        if isinstance(expr, (And, Or)):
            for operand in expr.operands:
                self.filter_types(operand)
            return
        if isinstance(expr, Not):
            self.filter_types(expr.operand)
            return
        if isinstance(expr, IsNull):
            self.reference(expr.column, "data.filter: column")
            return
        if isinstance(expr, Truth):
            column = self.reference(expr.column, "data.filter: column")
            if column is not None and column.type != "boolean":
                self.add(
                    f"data.filter: {expr.column!r} stands alone, which only a boolean column may; "
                    f"it is {column.type}: compare it with a value"
                )
            return
        if isinstance(expr, IsIn):
            column = self.reference(expr.column, "data.filter: column")
            if column is not None:
                for value in expr.values:
                    self.filter_value(column, value, expr.render())
            return
        left = self.reference(expr.left.column, "data.filter: column")
        if isinstance(expr.right, Ref):
            right = self.reference(expr.right.column, "data.filter: column")
            if left is None or right is None:
                return
            if left.type != right.type:
                self.add(f"data.filter: {expr.render()!r} compares a {left.type} column with a {right.type} one")
            elif left.type != "numeric" and expr.op not in ("=", "!="):
                self.add(f"data.filter: {expr.render()!r} orders {left.type} columns; only = and != apply to them")
            return
        if left is None:
            return
        if left.type != "numeric" and expr.op not in ("=", "!="):
            self.add(f"data.filter: {expr.render()!r} orders a {left.type} column; only = and != apply to it")
            return
        self.filter_value(left, expr.right, expr.render())

    def filter_value(self, column: ColumnSpec, value: Const, term: str) -> None:
        literal = value.value
        if column.type == "numeric":
            if isinstance(literal, bool) or not isinstance(literal, (int, float)):
                self.add(f"data.filter: {term!r} compares numeric column {column.name!r} with {value.render()}; use a number")
        elif column.type == "boolean":
            if not isinstance(literal, bool):
                self.add(f"data.filter: {term!r} compares boolean column {column.name!r} with {value.render()}; use true or false")
        elif not isinstance(literal, str):
            self.add(f"data.filter: {term!r} compares categorical column {column.name!r} with {value.render()}; use a quoted level")
        else:
            assert column.levels is not None
            if literal not in column.levels:
                self.add(
                    f"data.filter: {term!r} compares {column.name!r} with {value.render()}, which is not one of "
                    f"columns.{column.name}.levels{_did_you_mean(literal, column.levels)}"
                )

    # ---------------------------------------------------------------- fields

    def reference(self, name: Any, where: str) -> ColumnSpec | None:
        """The declaration `name` refers to, marking it used; None (and a problem) when it has none."""
        if name is _ABSENT:
            self.add(f"{where} is required")
            return None
        if not isinstance(name, str):
            self.add(f"{where} must be a column name; found {_show(name)}")
            return None
        if name not in self.declared:
            declared = [n for n in self.declared]
            hint = _did_you_mean(name, declared) or (
                f"; declared: {', '.join(declared)}" if declared else ""
            )
            self.add(f"{where} {_clip(name)!r} is not declared in [columns]{hint}")
            return None
        self.used.add(name)
        return self.declared[name]

    def expect(self, column: ColumnSpec, kind: str, where: str, statistic: str) -> bool:
        if column.type == kind:
            return True
        self.add(f"{where} {column.name!r} is {column.type}; kind = {statistic!r} needs a {kind} column")
        return False

    def proportion_level(self, raw: Any, column: ColumnSpec, where: str) -> tuple[str | None, bool]:
        if column.type == "boolean":
            if raw is not _ABSENT:
                self.add(f"{where}.level applies to a categorical column; {column.name!r} is boolean (its share of true is the proportion)")
                return None, False
            return None, True
        if column.type == "numeric":
            self.add(f"{where}.column {column.name!r} is numeric; a proportion is of a boolean column or of a categorical level")
            return None, False
        assert column.levels is not None
        if raw is _ABSENT:
            self.add(f"{where}.level is required for categorical column {column.name!r}: one of {', '.join(map(repr, column.levels))}")
            return None, False
        if not isinstance(raw, str) or raw not in column.levels:
            hint = _did_you_mean(raw, column.levels) if isinstance(raw, str) else ""
            self.add(f"{where}.level must be one of columns.{column.name}.levels; found {_show(raw)}{hint}")
            return None, False
        return raw, True

    def statistic_bins(self, raw: Any, column: ColumnSpec | None, where: str, key: str) -> tuple[float, ...] | None:
        if column is None or column.type != "numeric":
            return None
        if raw is _ABSENT:
            if column.bins is None:
                self.add(f"{where}.bins is required: give bins here or columns.{column.name}.bins")
            return column.bins
        return self.edges(raw, f"{where}.bins", column.lower, column.upper, of=f"columns.{column.name}")

    def probabilities(self, raw: Any, where: str) -> tuple[float, ...] | None:
        if raw is _ABSENT:
            self.add(f"{where} is required, e.g. [0.25, 0.5, 0.75]")
            return None
        if not isinstance(raw, (list, tuple)) or not raw:
            self.add(f"{where} must be a non-empty list of numbers; found {_show(raw)}")
            return None
        if len(raw) > MAX_PROBABILITIES:
            self.add(f"{where} lists {len(raw)} probabilities; at most {MAX_PROBABILITIES} are allowed")
            return None
        if not all(_is_number(p) and math.isfinite(p) for p in raw):
            self.add(f"{where} must hold numbers only; found {_show(raw)}")
            return None
        values = tuple(float(p) for p in raw)
        if not all(0 < p < 1 for p in values):
            self.add(f"{where} must each be in (0, 1); found {_show(raw)}")
            return None
        if any(b <= a for a, b in zip(values, values[1:])):
            self.add(f"{where} must be strictly increasing; found {_show(raw)}")
            return None
        return values

    def levels(self, raw: Any, where: str) -> tuple[str, ...] | None:
        if raw is _ABSENT:
            self.add(f"{where} is required: list the column's values (levels found in the data would reveal who is present)")
            return None
        if not isinstance(raw, (list, tuple)) or not raw:
            self.add(f"{where} must be a non-empty list of strings; found {_show(raw)}")
            return None
        if len(raw) > MAX_LEVELS:
            self.add(f"{where} lists {len(raw)} levels; at most {MAX_LEVELS} are allowed")
            return None
        if not all(isinstance(level, str) and level and len(level) <= MAX_NAME_LENGTH for level in raw):
            self.add(f"{where} must hold non-empty strings of at most {MAX_NAME_LENGTH} characters; found {_show(raw)}")
            return None
        if any("'" in level and '"' in level for level in raw):
            self.add(f"{where}: a level may hold ' or \", not both (the filter quotes levels)")
            return None
        repeated = sorted({level for level in raw if raw.count(level) > 1})
        if repeated:
            self.add(f"{where} lists {', '.join(map(repr, repeated))} more than once")
            return None
        return tuple(raw)

    def bound(self, raw: Any, where: str) -> float | None:
        if raw is _ABSENT:
            self.add(f"{where} is required: every numeric column declares its bounds (values are clipped to them)")
            return None
        value = self.number(raw, where)
        if value is not None and abs(value) > MAX_ABS_BOUND:
            self.add(f"{where} must be within +-{MAX_ABS_BOUND:g}; found {_show(value)}")
            return None
        return value

    def edges(
        self, raw: Any, where: str, lower: float | None, upper: float | None, *, of: str | None = None
    ) -> tuple[float, ...] | None:
        if not isinstance(raw, (list, tuple)) or not all(_is_number(e) for e in raw):
            self.add(f"{where} must be a list of numbers (bin edges); found {_show(raw)}")
            return None
        if len(raw) < 2:
            self.add(f"{where} needs at least two edges (one bin); found {_show(raw)}")
            return None
        if len(raw) - 1 > MAX_BINS:
            self.add(f"{where} makes {len(raw) - 1} bins; at most {MAX_BINS} are allowed")
            return None
        edges = tuple(float(e) for e in raw)
        if not all(math.isfinite(e) for e in edges):
            self.add(f"{where} must be finite numbers; found {_show(raw)}")
            return None
        if any(b <= a for a, b in zip(edges, edges[1:])):
            self.add(f"{where} must be strictly increasing; found {_show(raw)}")
            return None
        if lower is None or upper is None:
            return None  # the bounds are reported; coverage cannot be judged
        owner = of or where.rsplit(".", 1)[0]
        if edges[0] != lower or edges[-1] != upper:
            self.add(
                f"{where} must cover the bounds exactly: first edge {_show(lower)} ({owner}.lower) and last edge "
                f"{_show(upper)} ({owner}.upper); found {_show(edges[0])} and {_show(edges[-1])}"
            )
            return None
        return edges

    def epsilon(self, raw: Any) -> float | None:
        value = self.number(raw, "privacy.epsilon")
        if value is None:
            return None
        if not value > 0:
            self.add(f"privacy.epsilon must be > 0; found {_show(value)}")
            return None
        if value > limits.MAX_EPSILON:
            self.add(f"privacy.epsilon must be <= {limits.MAX_EPSILON:g}; found {_show(value)}")
            return None
        return value

    def table(self, raw: Any, name: str, known: Sequence[str]) -> Mapping[str, Any] | None:
        if raw is _ABSENT:
            self.add(f"the [{name}] table is required")
            return None
        if not isinstance(raw, Mapping):
            self.add(f"{name} must be a table; found {_show(raw)}")
            return None
        self.keys(raw, name, known)
        return raw

    def keys(
        self, raw: Mapping[str, Any], where: str, known: Sequence[str], *, what: str = "", every: Sequence[str] = ()
    ) -> None:
        unknown = [key for key in raw if key not in known]
        if len(unknown) > _MAX_UNKNOWN_KEYS:
            # Bounded work and a readable answer for a mapping stuffed with keys.
            self.add(f"{where} has {len(unknown)} keys that are not known; its keys are {', '.join(known)}")
            return
        for key in unknown:
            if key in every:
                self.add(f"{where}.{key} does not apply to {what}; its keys are {', '.join(known)}")
                continue
            hint = _did_you_mean(str(key), known) or f"; the keys of {where} are {', '.join(known)}"
            self.add(f"{where}.{_clip(str(key))} is not a known key{hint}")

    def text(self, raw: Any, where: str) -> str | None:
        if raw is _ABSENT:
            self.add(f"{where} is required")
            return None
        if not isinstance(raw, str) or not raw:
            self.add(f"{where} must be a non-empty string; found {_show(raw)}")
            return None
        return raw

    def number(self, raw: Any, where: str) -> float | None:
        if raw is _ABSENT:
            self.add(f"{where} is required")
            return None
        if not _is_number(raw):
            self.add(f"{where} must be a number; found {_show(raw)}")
            return None
        if not math.isfinite(raw):
            self.add(f"{where} must be a finite number; found {_show(raw)}")
            return None
        return float(raw)

    def choice(self, raw: Any, where: str, choices: Sequence[str]) -> str | None:
        if raw is _ABSENT:
            self.add(f"{where} is required: one of {', '.join(map(repr, choices))}")
            return None
        if not isinstance(raw, str) or raw not in choices:
            hint = _did_you_mean(raw, choices) if isinstance(raw, str) and len(choices) > 1 else ""
            rule = f"one of {', '.join(map(repr, choices))}" if len(choices) > 1 else repr(choices[0])
            self.add(f"{where} must be {rule}; found {_show(raw)}{hint}")
            return None
        return raw


def _name_of(column: ColumnSpec | None) -> str | None:
    return column.name if column is not None else None


def _default_name(kind: str, keys: Mapping[str, Any]) -> str:
    """A statistic's name when the spec gives none: its kind and the columns it reads."""
    parts = [kind] + [str(keys[k]) for k in ("column", "level", "exposure", "outcome", "time") if isinstance(keys.get(k), str)]
    return "_".join(parts)[:MAX_NAME_LENGTH]


def _bin_labels(edges: Sequence[float]) -> tuple[str, ...]:
    last = len(edges) - 2
    return tuple(
        f"[{_fmt(a)}, {_fmt(b)}{']' if i == last else ')'}" for i, (a, b) in enumerate(zip(edges, edges[1:]))
    )


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(float(value))


def _did_you_mean(word: str, choices: Sequence[str], *, fmt: str = "'{}'") -> str:
    matches = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {fmt.format(matches[0])}?" if matches else ""


def _clip(text: str, most: int = 40) -> str:
    return text if len(text) <= most else text[: most - 3] + "..."


def _show(value: Any) -> str:
    """A value as the spec's author wrote it (TOML spelling for booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        return str(int(value)) if abs(value) < 1e15 else repr(value)
    if isinstance(value, str):
        return repr(_clip(value))
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, (list, tuple)):
        shown = "[" + ", ".join(_show(v) if not isinstance(v, (list, tuple, Mapping)) else "..." for v in value[:8])
        return shown + (", ...]" if len(value) > 8 else "]")
    if value is None:
        return "nothing"
    return type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
