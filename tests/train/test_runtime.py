import ctypes
import subprocess
import sys
import textwrap

import pytest

# A training step's pattern: tensors of a few MB held together (activations, here 8 of 16 MB), then all freed.
# Prints the page faults that costs once the heap has settled.
FAULTS = textwrap.dedent("""
    import ctypes, resource, sys, torch
    from budgetlm.train.runtime import M_MMAP_THRESHOLD, keep_freed_memory
    # glibc's starting threshold (128 KiB), fixed: its adaptive rule settles some patterns by luck, not others
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 << 10)
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    def steps(times):
        for _ in range(times):
            held = [torch.ones(4, 1 << 20) for _ in range(8)]
            del held
    steps(3)  # the first steps fault in either mode
    before = faults()
    steps(5)
    print(faults() - before)
""")


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the setting is glibc's")
def test_keep_freed_memory_stops_tensors_faulting_in_fresh_pages():
    try:
        ctypes.CDLL("libc.so.6")
    except OSError:
        pytest.skip("no glibc here (musl, say)")
    default, kept = page_faults("default"), page_faults("keep")
    # 128 MB a step is 32,768 pages, mapped afresh each step unless freed memory is kept
    assert default > 5 * 30_000
    assert kept < default / 10



def test_the_allocator_is_set_by_the_command_line_not_by_the_library(monkeypatch, tmp_path):
    """glibc's malloc settings are process-wide: the command line makes them (cli.main); a program calling a
    workflow from Python keeps its own."""
    from budgetlm import cli
    from budgetlm.errors import UserError
    from budgetlm.train import runtime
    from budgetlm.workflows import evaluate

    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(1) or True)
    with pytest.raises(UserError):
        evaluate.run(str(tmp_path / "no-model"), [str(tmp_path / "no-text.txt")])
    assert calls == []
    assert cli.main(["eval", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-text.txt")]) == 2
    assert calls == []  # evaluation streams text: its memory stays lower without the setting
    assert cli.main(["generate", "--model", str(tmp_path / "no-model")]) == 2
    assert calls == [1]
