"""budgetlm: train the best language model a given compute budget allows."""

__version__ = "0.1.0"
