"""budgetlm: train the best language model a given compute budget allows.

    import budgetlm
    run = budgetlm.pretrain("corpus/", budget="5m")
    print(budgetlm.load(run.path).generate("Once upon a time"))

The API (budgetlm.api) loads on first use, so `import budgetlm` stays quick and imports no torch."""

from budgetlm.errors import UserError

__version__ = "0.1.0"

_API = ("pretrain", "finetune", "compare", "tune", "load", "Run", "Model", "Comparison", "Search")
__all__ = [*_API, "UserError", "__version__"]


def __getattr__(name: str):
    if name in _API:
        from budgetlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'budgetlm' has no attribute {name!r}")
