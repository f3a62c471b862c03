"""DSPy modules for hierarchical task decomposition (stand-in)."""

from .aggregator import Aggregator
from .atomizer import Atomizer
from .base_module import BaseModule
from .executor import Executor
from .planner import Planner
from .verifier import Verifier

__all__ = ["Aggregator", "Atomizer", "BaseModule", "Executor", "Planner", "Verifier"]
