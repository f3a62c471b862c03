from .dag import TaskDAG

__all__ = ["TaskDAG"]
