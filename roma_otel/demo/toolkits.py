"""Real tool code for the demo agent: a safe calculator and a BM25 search over bundled Markdown docs.

Public methods are the tools; their docstrings (with Args) are what dspy.Tool shows the model.
"""

from __future__ import annotations

import ast
import math
import operator
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from roma_otel import toolkit

__all__ = ["CalculatorToolkit", "DocSearchToolkit", "tool_methods"]

_BIN_OPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPS: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt,
    "round": round,
    "abs": abs,
    "min": min,
    "max": max,
    "floor": math.floor,
    "ceil": math.ceil,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}
# Bounds that keep one tool call cheap: a model (or a prompt injection) can otherwise ask for
# 9**9**9 and pin a CPU, or nest brackets until the parser recurses too deep.
_MAX_EXPRESSION_CHARS = 500
_MAX_EXPONENT = 1000
_MAX_INT_BITS = 4096


def tool_methods(*toolkits: object) -> list[Callable[..., Any]]:
    """The public bound methods of each toolkit instance, in definition order: the tools an agent gets."""
    tools: list[Callable[..., Any]] = []
    for kit in toolkits:
        # Walk the MRO rather than vars(type(kit)): a class decorator may hand back a subclass.
        names = dict.fromkeys(n for cls in reversed(type(kit).__mro__[:-1]) for n in vars(cls))
        for name in names:
            attr = getattr(kit, name, None)
            if not name.startswith("_") and callable(attr) and not isinstance(attr, type):
                tools.append(attr)
    return tools


@toolkit
class CalculatorToolkit:
    """Exact arithmetic for the agent, so it never has to do sums in its head."""

    def evaluate(self, expression: str) -> str:
        """Evaluate an arithmetic expression and return the result as text.

        Supports numbers, + - * / // % **, unary minus, parentheses, the constants pi and e, and the
        functions sqrt, round, abs, min, max, floor and ceil. Names, attributes and other Python
        syntax are rejected.

        Args:
            expression: The arithmetic expression to evaluate, for example "300 / 2" or "sqrt(16) * 3".
        """
        if len(expression) > _MAX_EXPRESSION_CHARS:
            raise ValueError(f"expression is longer than {_MAX_EXPRESSION_CHARS} characters")
        try:
            tree = ast.parse(expression.strip(), mode="eval")
        except SyntaxError as exc:
            raise ValueError(f"not a valid arithmetic expression: {expression!r}") from exc
        return _format_number(self._eval(tree.body))

    def percent(self, part: float, whole: float) -> float:
        """Return what percentage `part` is of `whole` (part / whole * 100).

        Args:
            part: The portion, for example the amount spent on food.
            whole: The total it is a share of, for example the whole budget; must not be zero.
        """
        if whole == 0:
            raise ValueError("whole must not be zero")
        return round(float(part) / float(whole) * 100.0, 6)

    def _eval(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            # bool is an int subclass; True + True is not arithmetic anyone meant to ask for.
            if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
                return node.value
            raise ValueError(f"unsupported constant {node.value!r} (ast.Constant)")
        if isinstance(node, ast.Name):
            if node.id in _CONSTANTS:
                return _CONSTANTS[node.id]
            raise ValueError(f"unsupported name {node.id!r} (ast.Name)")
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
            return _UNARY_OPS[type(node.op)](self._eval(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
            left, right = self._eval(node.left), self._eval(node.right)
            if isinstance(node.op, ast.Pow):
                _check_power(left, right)
            try:
                result = _BIN_OPS[type(node.op)](left, right)
            except ZeroDivisionError as exc:
                raise ValueError(f"division by zero in {ast.unparse(node)!r}") from exc
            except OverflowError as exc:
                raise ValueError(f"result too large in {ast.unparse(node)!r}") from exc
            if isinstance(result, int) and result.bit_length() > _MAX_INT_BITS:
                raise ValueError(f"result too large in {ast.unparse(node)!r}")
            if isinstance(result, complex):  # (-8) ** 0.5 yields a complex number, not a price
                raise ValueError(f"complex result in {ast.unparse(node)!r}")
            return result
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else None
            if name not in _FUNCTIONS:
                raise ValueError(f"unsupported function call {ast.unparse(node.func)!r} (ast.Call)")
            if node.keywords:
                raise ValueError(f"keyword arguments are not supported in {name}() (ast.keyword)")
            args = [self._eval(arg) for arg in node.args]
            try:
                return _FUNCTIONS[name](*args)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"invalid arguments to {name}(): {exc}") from exc
        raise ValueError(f"unsupported syntax: ast.{type(node).__name__} in {ast.unparse(node)!r}")


def _check_power(base: Any, exponent: Any) -> None:
    if abs(exponent) > _MAX_EXPONENT:
        raise ValueError(f"exponent {exponent} exceeds the limit of {_MAX_EXPONENT}")
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and abs(base) > 1
        and exponent * math.log2(abs(base)) > _MAX_INT_BITS
    ):
        raise ValueError(f"{base} ** {exponent} is too large")


def _format_number(value: Any) -> str:
    # 300 / 2 gives 150.0; an agent (and a reader) expects "150".
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            raise ValueError("result is not a finite number")
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(round(value, 10))
    return str(value)


_TOKEN_RE = re.compile(r"[0-9a-z]+")
_STOPWORDS = frozenset(
    {"a", "an", "and", "are", "as", "at", "be", "by", "can", "do", "does", "for", "from", "how", "i", "in"}
    | {"is", "it", "me", "my", "of", "on", "or", "our", "that", "the", "this", "to", "we", "what", "when"}
    | {"where", "which", "with", "you", "your"}
)


def _tokens(text: str) -> list[str]:
    # Fold accents so "Familia" finds "Família" and "Guell" finds "Güell".
    folded = "".join(c for c in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(c))
    return [t for t in _TOKEN_RE.findall(folded) if t not in _STOPWORDS]


@toolkit
class DocSearchToolkit:
    """Search and read a small bundled library of travel-planning notes (Markdown)."""

    # Standard Okapi BM25 parameters.
    _K1 = 1.5
    _B = 0.75

    def __init__(self, docs_dir: str | Path | None = None) -> None:
        self._docs_dir = Path(docs_dir) if docs_dir is not None else Path(__file__).with_name("docs")
        self._docs: dict[str, str] = {}
        for path in sorted(self._docs_dir.glob("*.md")):
            text = path.read_text(encoding="utf-8").strip()
            first, _, body = text.partition("\n")
            title = (
                first.lstrip("# ").strip() if first.startswith("#") else path.stem.replace("_", " ").title()
            )
            self._docs[title] = body.strip() if first.startswith("#") else text
        if not self._docs:
            raise FileNotFoundError(f"no Markdown documents found in {self._docs_dir}")
        # The title is counted twice: it is the densest summary of what a document is about.
        self._doc_tokens = {t: Counter(_tokens(f"{t} {t} {body}")) for t, body in self._docs.items()}
        self._doc_len = {t: sum(c.values()) for t, c in self._doc_tokens.items()}
        self._avg_len = sum(self._doc_len.values()) / len(self._doc_len)
        n = len(self._docs)
        df = Counter(term for counts in self._doc_tokens.values() for term in counts)
        self._idf = {term: math.log(1 + (n - f + 0.5) / (f + 0.5)) for term, f in df.items()}

    def search_docs(self, query: str, top_k: int = 3) -> list[dict]:
        """Search the travel notes and return the best matching documents, best first.

        Args:
            query: Keywords describing what to look for, for example "museum opening hours monday".
            top_k: How many results to return (1 to 10).
        """
        top_k = max(1, min(int(top_k), 10))
        terms = _tokens(query)
        scores: dict[str, float] = {}
        for title, counts in self._doc_tokens.items():
            norm = self._K1 * (1 - self._B + self._B * self._doc_len[title] / self._avg_len)
            score = sum(
                self._idf[term] * counts[term] * (self._K1 + 1) / (counts[term] + norm)
                for term in terms
                if term in counts
            )
            if score > 0:
                scores[title] = score
        ranked = sorted(scores.items(), key=lambda item: item[1], reverse=True)[:top_k]
        return [
            {"title": title, "snippet": self._snippet(title, terms), "score": round(score, 3)}
            for title, score in ranked
        ]

    def read_doc(self, title: str) -> str:
        """Return the full text of one document, found by its exact title (case-insensitive).

        Args:
            title: The document title as returned by search_docs, for example "Budget Travel Tips".
        """
        wanted = title.strip().lower()
        for known, body in self._docs.items():
            if known.lower() == wanted:
                return f"# {known}\n\n{body}"
        raise KeyError(f"unknown document title {title!r}; available: {', '.join(self._docs)}")

    def _snippet(self, title: str, terms: list[str], limit: int = 240) -> str:
        # The sentence sharing the most query terms is a better preview than the opening line.
        sentences = re.split(r"(?<=[.!?])\s+", self._docs[title].replace("\n", " "))
        wanted = set(terms)
        best = max(sentences, key=lambda s: len(wanted & set(_tokens(s))))
        best = best.replace("**", "").strip()
        return best if len(best) <= limit else best[: limit - 1].rstrip() + "…"
