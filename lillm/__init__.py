"""lillm: the pieces of a small chat LLM, each built by hand in a chapter and collected here."""

__version__ = "0.1.0"
