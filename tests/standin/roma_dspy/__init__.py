"""Test stand-in for ROMA's ``roma_dspy`` package (sentient-agi/ROMA).

Same import paths / class / method names as the real package, much smaller
implementation, built on real DSPy. Must never import roma_otel.
"""
