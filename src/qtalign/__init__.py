"""qtalign: question-translation alignment of LLMs, multilingual few-shot evaluation and analysis."""

__version__ = "0.1.0"
