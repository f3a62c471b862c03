"""USD cost of one LM call, computed from its token usage.

The formula is the one from the spec::

    cost = prompt_tokens * prompt_price_per_1k / 1000 + completion_tokens * completion_price_per_1k / 1000

:func:`compute_cost` picks the first source that applies:

1. ``cache_hit`` -> ``Cost(0.0, "cache")``: a cache hit costs nothing, whatever the cached
   response's metadata says.
2. A provider-reported cost (litellm's ``response_cost``, OpenRouter's ``usage.cost``) that is a
   finite number >= 0 -> ``"provider"``.
3. Missing token counts -> :data:`UNKNOWN`.
4. The bundled price table ``roma_otel/data/prices.json`` -> ``"price_table"``.
5. ``litellm.model_cost``, but only if litellm has *already* been imported by someone else
   (this module never imports it: it takes seconds) -> ``"litellm"``.
6. Otherwise :data:`UNKNOWN`. An unknown cost is ``usd=None``, never ``0.0``.

Model names are normalised before lookup: lowercased, a known provider prefix (``openai/``,
``azure/``, ``anthropic/``, ``fireworks_ai/`` ...) stripped, ``accounts/fireworks/models/``
stripped, then the exact key is tried before the key without a dated snapshot suffix
(``-YYYY-MM-DD`` / ``-YYYYMMDD``) or ``-latest``. ``openrouter/<vendor>/<model>`` resolves
``<model>`` against that vendor's entries, since OpenRouter passes the vendor's price through.

Lookups are cached per model string (bounded), so a repeated model costs about a microsecond.
Only the standard library is imported.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "UNKNOWN",
    "Cost",
    "CostSource",
    "Price",
    "compute_cost",
    "lookup_price",
    "reset_price_cache",
    "split_cost",
]

_logger = logging.getLogger(__name__)

CostSource = Literal["provider", "price_table", "litellm", "cache", "unknown"]


@dataclass(frozen=True, slots=True)
class Price:
    """List price of a model in USD per 1,000 tokens."""

    prompt_per_1k: float
    completion_per_1k: float


@dataclass(frozen=True, slots=True)
class Cost:
    """Cost of one LM call. ``usd`` is ``None`` when the cost is unknown (never ``0.0``)."""

    usd: float | None
    source: CostSource


UNKNOWN = Cost(None, "unknown")
_CACHE_HIT = Cost(0.0, "cache")

_PRICES_PATH = Path(__file__).resolve().parent / "data" / "prices.json"

# Prefixes (litellm provider routes) whose models are billed at the model vendor's list price.
_PROVIDER_PREFIXES: tuple[str, ...] = (
    "openai/",
    "azure/",
    "anthropic/",
    "fireworks_ai/",
    "fireworks/",
    "together_ai/",
    "text-completion-openai/",
)
_OPENROUTER_PREFIX = "openrouter/"
_FIREWORKS_PATH = "accounts/fireworks/models/"
_DATE_SUFFIX_RE = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8})$")
_DOTTED_VERSION_RE = re.compile(r"(?<=\d)\.(?=\d)")
# OpenRouter variant suffixes that do not change the price.
_OPENROUTER_SAME_PRICE_VARIANTS: tuple[str, ...] = (":beta", ":thinking")
_OPENROUTER_FREE_VARIANT = ":free"
_FREE = Price(0.0, 0.0)

_MAX_CACHE_ENTRIES = 1024


@dataclass(frozen=True, slots=True)
class _Resolved:
    """Normalised form of one model string, plus its price-table result."""

    vendor: str | None  # required vendor (openrouter/<vendor>/...), else None
    candidates: tuple[str, ...]  # names to try, best first
    raw: tuple[str, ...]  # the original string forms, tried first against litellm.model_cost
    table_price: Price | None


# Table: name -> (price, vendor). None until loaded.
_table: dict[str, tuple[Price, str | None]] | None = None
_table_lock = threading.Lock()
_resolved_cache: dict[str, _Resolved] = {}


def _load_table() -> dict[str, tuple[Price, str | None]]:
    global _table
    table = _table
    if table is not None:
        return table
    with _table_lock:
        if _table is None:
            _table = _read_prices_file(_PRICES_PATH)
        return _table


def _read_prices_file(path: Path) -> dict[str, tuple[Price, str | None]]:
    """Parse prices.json; a broken file degrades to an empty table (costs become unknown)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        models = doc["models"]
        if not isinstance(models, dict):
            raise TypeError("'models' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _logger.warning("roma_otel: cannot load price table %s: %s", path, exc)
        return {}
    table: dict[str, tuple[Price, str | None]] = {}
    for name, entry in models.items():
        try:
            prompt = float(entry["prompt_per_1k"])
            completion = float(entry["completion_per_1k"])
        except (KeyError, TypeError, ValueError):
            _logger.warning("roma_otel: skipping malformed price entry %r", name)
            continue
        if not (_is_price(prompt) and _is_price(completion)):
            _logger.warning("roma_otel: skipping invalid price entry %r", name)
            continue
        vendor = entry.get("vendor")
        table[str(name).lower()] = (
            Price(prompt, completion),
            vendor.lower() if isinstance(vendor, str) else None,
        )
    return table


def _is_price(value: float) -> bool:
    return math.isfinite(value) and value >= 0.0


def _is_amount(value: object) -> bool:
    """A finite, non-negative int or float (bool excluded)."""
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    )


def _name_variants(name: str) -> list[str]:
    """Spellings of a prefix-free model name to try, most specific first."""
    out = [name]
    if name.startswith(_FIREWORKS_PATH):
        name = name[len(_FIREWORKS_PATH) :]
        out.append(name)
    if name.startswith("claude-") and "." in name:
        # OpenRouter spells "claude-3.5-sonnet"; Anthropic spells "claude-3-5-sonnet".
        name = _DOTTED_VERSION_RE.sub("-", name)
        out.append(name)
    undated = _DATE_SUFFIX_RE.sub("", name)
    if undated != name:
        out.append(undated)
    if name.endswith("-latest"):
        out.append(name[: -len("-latest")])
    return list(dict.fromkeys(out))


def _resolve(model: str) -> _Resolved:
    cached = _resolved_cache.get(model)
    if cached is not None:
        return cached
    table = _load_table()
    name = model.strip().lower()
    vendor: str | None = None
    forced: Price | None = None
    if name.startswith(_OPENROUTER_PREFIX):
        name = name[len(_OPENROUTER_PREFIX) :]
        if "/" in name:
            vendor, name = name.split("/", 1)
        if name.endswith(_OPENROUTER_FREE_VARIANT):
            forced = _FREE
            name = name[: -len(_OPENROUTER_FREE_VARIANT)]
        for variant in _OPENROUTER_SAME_PRICE_VARIANTS:
            if name.endswith(variant):
                name = name[: -len(variant)]
                break
    else:
        for prefix in _PROVIDER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
    candidates = tuple(_name_variants(name)) if name and ":" not in name else ()
    price = forced
    if price is None:
        for candidate in candidates:
            hit = table.get(candidate)
            if hit is not None and (vendor is None or hit[1] == vendor):
                price = hit[0]
                break
    resolved = _Resolved(
        vendor=vendor,
        candidates=candidates,
        raw=tuple(dict.fromkeys((model, model.strip(), model.strip().lower()))),
        table_price=price,
    )
    if len(_resolved_cache) >= _MAX_CACHE_ENTRIES:
        _resolved_cache.clear()
    _resolved_cache[model] = resolved
    return resolved


def lookup_price(model: str) -> Price | None:
    """Price of ``model`` from the bundled table (after name normalisation), or ``None``."""
    if not isinstance(model, str) or not model:
        return None
    return _resolve(model).table_price


def _litellm_price(resolved: _Resolved) -> Price | None:
    """Price from ``litellm.model_cost``, only if litellm is already imported."""
    litellm = sys.modules.get("litellm")
    if litellm is None:
        return None
    model_cost = getattr(litellm, "model_cost", None)
    if not isinstance(model_cost, dict):
        return None
    for key in (*resolved.raw, *resolved.candidates):
        entry = model_cost.get(key)
        if not isinstance(entry, dict):
            continue
        if resolved.vendor is not None and key in resolved.candidates:
            provider = entry.get("litellm_provider")
            if isinstance(provider, str) and resolved.vendor not in provider:
                continue
        price = _price_from_litellm_entry(entry)
        if price is not None:
            return price
    return None


def _price_from_litellm_entry(entry: dict[str, Any]) -> Price | None:
    prompt = entry.get("input_cost_per_token")
    completion = entry.get("output_cost_per_token")
    if not (_is_amount(prompt) and _is_amount(completion)):
        return None
    return Price(float(prompt) * 1000.0, float(completion) * 1000.0)


def compute_cost(
    model: str,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    *,
    provider_cost: float | None = None,
    cache_hit: bool = False,
) -> Cost:
    """USD cost of one LM call; see the module docstring for the order of sources.

    Never raises for bad input: unusable values (negative or NaN costs, negative token counts,
    a non-string model) are treated as missing.
    """
    if cache_hit:
        return _CACHE_HIT
    if provider_cost is not None and _is_amount(provider_cost):
        return Cost(float(provider_cost), "provider")
    if (
        prompt_tokens is None
        or completion_tokens is None
        or not (_is_amount(prompt_tokens) and _is_amount(completion_tokens))
    ):
        return UNKNOWN
    if not isinstance(model, str) or not model:
        return UNKNOWN
    resolved = _resolve(model)
    price = resolved.table_price
    source: CostSource = "price_table"
    if price is None:
        price = _litellm_price(resolved)
        source = "litellm"
        if price is None:
            return UNKNOWN
    usd = prompt_tokens * price.prompt_per_1k / 1000 + completion_tokens * price.completion_per_1k / 1000
    return Cost(usd, source)


def split_cost(model: str, prompt_tokens: int, completion_tokens: int) -> tuple[float, float] | None:
    """(input, output) USD of a call priced from a table (ours, then litellm's), or None when unpriced."""
    if not isinstance(model, str) or not model or not (_is_amount(prompt_tokens) and _is_amount(completion_tokens)):
        return None
    resolved = _resolve(model)
    price = resolved.table_price or _litellm_price(resolved)
    if price is None:
        return None
    return prompt_tokens * price.prompt_per_1k / 1000, completion_tokens * price.completion_per_1k / 1000


def reset_price_cache() -> None:
    """Forget the loaded price table and all cached lookups (the file is re-read on next use)."""
    global _table
    with _table_lock:
        _table = None
        _resolved_cache.clear()
