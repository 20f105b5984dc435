"""Property tests: whatever bytes, encodings, lines or values come in, the outcome is a result or a
clean one-line UserError, never another exception; and what is accepted keeps its meaning (a config value
survives a TOML round trip, a duration its formatting)."""

import json
import math
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tomllib

from budgetlm.budget import format_duration, parse_duration
from budgetlm.config import (
    DataConfig,
    FinetuneConfig,
    FinetuneRunConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply,
    resolve,
    to_toml,
)
from budgetlm.data.sources import load_corpus, split_validation
from budgetlm.errors import UserError

SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def outcome(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        assert str(e) and "\n" not in str(e)
        return e


text_or_mess = st.one_of(
    st.binary(max_size=400),
    st.text(max_size=200).map(lambda t: t.encode("utf-8")),
    st.text(max_size=200).map(lambda t: t.encode("utf-16")),
    st.text(alphabet="éàü€漢", max_size=50).map(lambda t: t.encode("latin-1", errors="replace")),
    st.lists(st.sampled_from(["", "\n", "  ", "word", "\r\n", "\t"]), max_size=30).map(lambda l: "".join(l).encode()),
)


@FAST
@given(files=st.lists(text_or_mess, min_size=1, max_size=4))
def test_text_files_of_any_bytes(tmp_path_factory, files):
    folder = tmp_path_factory.mktemp("corpus")
    for i, raw in enumerate(files):
        (folder / f"f{i}.txt").write_bytes(raw)
    result = outcome(load_corpus, [str(folder)])
    if not isinstance(result, UserError):
        assert result.documents and all(d.strip() for d in result.documents)
        outcome(split_validation, result.documents, 0.1)


@FAST
@given(lines=st.lists(st.one_of(st.text(max_size=40), st.dictionaries(st.sampled_from(["text", "body", "x"]),
                                                                        st.one_of(st.text(max_size=20), st.integers(), st.none()),
                                                                        max_size=3).map(json.dumps)), max_size=10))
def test_jsonl_of_odd_lines(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("j") / "d.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    outcome(load_corpus, [str(path)])


@FAST
@given(header=st.lists(st.text(alphabet=string.ascii_letters + ' ,"', min_size=0, max_size=6), min_size=0, max_size=4),
       rows=st.lists(st.lists(st.text(alphabet=string.printable, max_size=12), max_size=5), max_size=6),
       sep=st.sampled_from([",", "\t"]), column=st.one_of(st.none(), st.sampled_from(["a", "text", ""])))
def test_tables_with_odd_columns(tmp_path_factory, header, rows, sep, column):
    path = tmp_path_factory.mktemp("t") / ("d.csv" if sep == "," else "d.tsv")
    path.write_text("\n".join(sep.join(r) for r in [header, *rows]), encoding="utf-8")
    outcome(load_corpus, [str(path)], text_column=column)


duration_like = st.builds("{}{}".format, st.one_of(st.integers(0, 10**20), st.floats(0, 1e20).map(repr)),
                          st.sampled_from(["", "s", "m", "h", "ms", "h30m"]))
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(10**300, 10**400), st.floats(allow_nan=True),
                   st.text(max_size=10), st.lists(st.text(max_size=5), max_size=3), st.lists(st.floats(), max_size=2),
                   st.dates(), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2), duration_like,
                   st.builds("val_loss,{},{}".format, st.integers(-1, 10**20), st.floats(allow_nan=True)))
RUNS = {**{table: (RunConfig, cls) for table, cls in SECTIONS.items()}, "finetune": (FinetuneRunConfig, FinetuneConfig)}


@FAST
@given(table_key=st.sampled_from([(table, f) for table, (_, cls) in RUNS.items() for f in cls.__dataclass_fields__]),
       other_key=st.text(max_size=10), use_other=st.booleans(), value=scalar)
def test_config_values(table_key, other_key, use_other, value):
    table, key = table_key
    key = other_key if use_other else key
    run_cls, _ = RUNS[table]
    run = run_cls()
    before = to_toml(run)
    result = outcome(apply, getattr(run, table), {key: value})
    if isinstance(result, UserError):
        assert str(result).startswith(f"{key}:") or "unknown key" in str(result)  # it names the setting
        assert to_toml(run) == before  # a refused value changes nothing
        return
    # an accepted value is stored typed and comes back exactly from the TOML the run would save
    stored = getattr(getattr(run, table), key)
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in (stored if isinstance(stored, list) else [stored]))
    again = run_cls()
    for name, values in tomllib.loads(to_toml(run)).items():
        apply(getattr(again, name), values)
    assert getattr(getattr(again, table), key) == stored


@FAST
@given(doc=st.text(max_size=200))
def test_config_files_of_any_text(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("c") / "c.toml"
    path.write_text(doc, encoding="utf-8")
    outcome(resolve, RunConfig, SECTIONS, str(path), {})


@FAST
@given(text=st.text(max_size=12))
def test_durations(text):
    result = outcome(parse_duration, text)
    if not isinstance(result, UserError):
        assert result > 0
        if result >= 0.5:  # formatting rounds to whole seconds and reads back as those seconds
            assert parse_duration(format_duration(result)) == max(1, round(result))


@FAST
@given(seconds=st.integers(min_value=1, max_value=10**6))
def test_whole_seconds_format_and_parse_back_exactly(seconds):
    assert parse_duration(format_duration(seconds)) == seconds
    assert parse_duration(f"{seconds}s") == parse_duration(str(seconds)) == seconds
