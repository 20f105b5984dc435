import json

import pytest

from budgetlm.cli import SECTIONS, build_parser
from budgetlm.config import RunConfig, resolve
from budgetlm.errors import UserError
from budgetlm.workflows import compare

TINY = ["--n-layer", "1", "--d-model", "32", "--n-head", "1", "--context", "32", "--micro-batch", "16",
        "--vocab-size", "300", "--compile", "off", "--max-steps", "6", "--eval-every", "3", "--eval-tokens", "1024"]


def base_config(play_file, *extra) -> RunConfig:
    """The config `budgetlm pretrain` would resolve from these flags."""
    flags = vars(build_parser().parse_args(["pretrain", "--data", str(play_file), *TINY, *extra]))
    return resolve(RunConfig, SECTIONS, None, flags)


def table_rows(markdown: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # without the header


def test_grid_of_variants_runs_and_reports_best_first(play_file, tmp_path, capsys):
    base = base_config(play_file)
    found = compare.variants(base, vary=["optim=adamw,sgd", "lr=1e-2,1e-4"])
    records = compare.run(base, found, tmp_path / "cmp")

    names = ["optim=adamw,lr=1e-2", "optim=adamw,lr=1e-4", "optim=sgd,lr=1e-2", "optim=sgd,lr=1e-4"]
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved == records
    assert [r["name"] for r in saved] == names
    assert saved[2]["settings"] == {"optim": "sgd", "lr": 0.01}
    for r in saved:
        assert r["error"] is None and r["stop_reason"] == "max_steps"
        assert r["tokens_seen"] == 6 * 16 * 32
        assert r["best_val_bpb"] > 0 and r["tokens_per_s"] > 0 and r["wall_s"] > 0
        # the start is scored on the validation sample, the best on the whole split: equal within its noise
        assert r["best_val_loss"] <= r["start_val_loss"] * 1.01
        assert r["model"] == "1×32, context 32"
        assert (tmp_path / "cmp" / r["name"] / "metrics.jsonl").is_file()
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == sorted([*names, "compare.json", "compare.md",
                                                                          "compare.png"])
    # the warm-up trained the tokenizer, not the first variant's budget
    assert "tokenizer" not in (tmp_path / "cmp" / names[0] / "pretrain.log").read_text()
    by_name = {r["name"]: r for r in saved}
    assert by_name["optim=adamw,lr=1e-2"]["best_val_loss"] < by_name["optim=adamw,lr=1e-2"]["start_val_loss"] - 0.1

    report = (tmp_path / "cmp" / "compare.md").read_text()
    rows = table_rows(report)
    assert sorted(row[1] for row in rows) == sorted(names)
    bpbs = [float(row[2]) for row in rows]
    assert bpbs == sorted(bpbs) and bpbs[0] == pytest.approx(min(r["best_val_bpb"] for r in saved), abs=1e-4)
    assert str(play_file) in report
    assert (tmp_path / "cmp" / "compare.png").read_bytes().startswith(b"\x89PNG")
    assert "| rank | variant |" in capsys.readouterr().out


def test_a_failing_variant_is_recorded_and_the_others_go_on(play_file, tmp_path):
    base = base_config(play_file)
    found = compare.variants(base, vary=["context=32,100000"])
    records = compare.run(base, found, tmp_path / "cmp")
    ok, failed = records
    assert ok["error"] is None and ok["best_val_bpb"] is not None
    assert failed["stop_reason"] == "failed" and "context window" in failed["error"]
    rows = table_rows((tmp_path / "cmp" / "compare.md").read_text())
    assert rows[0][1] == "context=32" and rows[-1][1] == "context=100000" and "failed" in rows[-1][-2]


def test_every_variant_failing_is_an_error_after_the_reports(play_file, tmp_path):
    base = base_config(play_file)
    with pytest.raises(UserError, match="every variant failed"):
        compare.run(base, compare.variants(base, vary=["context=100000,200000"]), tmp_path / "cmp")
    assert len(json.loads((tmp_path / "cmp" / "compare.json").read_text())) == 2


@pytest.mark.parametrize("vary,fragments", [
    (["optim=adamw,nadam"], ["optim", "'nadam' is not allowed", "adamw"]),
    (["n_layers=1,2"], ["unknown key 'n_layers' (did you mean n_layer?)", "allowed: arch, attention_dropout, batch_tokens"]),
    (["lr=fast"], ["lr: expected float"]),
    (["optim"], ["write KEY=V1,V2"]),
    (["optim=adamw,,sgd"], ["write KEY=V1,V2"]),
    (["optim=adamw", "optim=sgd"], ["given twice"]),
])
def test_bad_vary_is_one_clear_error(play_file, vary, fragments):
    with pytest.raises(UserError) as error:
        compare.variants(base_config(play_file), vary=vary)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_values_are_read_by_the_keys_type(play_file):
    found = compare.variants(base_config(play_file), vary=["n-layer=1,2", "batch_tokens=256,auto", "warmup=3"])
    assert found[0].name == "n_layer=1,batch_tokens=256,warmup=3"
    assert found[0].settings == {"n_layer": 1, "batch_tokens": 256, "warmup": 3.0}
    assert found[-1].config.model.n_layer == 2 and found[-1].config.train.batch_tokens == "auto"


def test_sweep_file_variants(play_file, tmp_path):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('[[variant]]\nname = "wide"\nlr = 0.003\n[variant.model]\nd_model = 64\n\n'
                     '[[variant]]\noptim = "sgd"\n')
    wide, sgd = compare.variants(base_config(play_file), sweep=str(sweep))
    assert (wide.name, wide.settings) == ("wide", {"lr": 0.003, "d_model": 64})
    assert wide.config.model.d_model == 64 and wide.config.train.lr == 0.003
    assert (sgd.name, sgd.settings) == ("optim=sgd", {"optim": "sgd"})

    sweep.write_text('[[variant]]\n[variant.model]\nlr = 0.1\n')
    with pytest.raises(UserError, match=r"'lr' is not a key of \[model\]"):
        compare.variants(base_config(play_file), sweep=str(sweep))


def test_vary_or_sweep_and_a_limit_are_required(play_file, tmp_path):
    base = base_config(play_file)
    with pytest.raises(UserError, match="--vary"):
        compare.variants(base)
    with pytest.raises(UserError, match="not both"):
        compare.variants(base, vary=["optim=sgd"], sweep=str(tmp_path / "s.toml"))
    unlimited = resolve(RunConfig, SECTIONS, None, {"data": [str(play_file)]})
    with pytest.raises(UserError, match="give a limit"):
        compare.variants(unlimited, vary=["optim=sgd,adamw"])


def test_the_plot_ends_each_curve_with_the_reported_figure(tmp_path, monkeypatch):
    from tests.conftest import SavedFigures

    figures = SavedFigures(monkeypatch)
    records = []
    for name, best in (("optim=adamw", 2.1234), ("optim=sgd", 2.5678)):
        folder = tmp_path / name
        folder.mkdir()
        evals = [{"kind": "eval", "step": s, "elapsed_s": 5.0 * s, "val_bpb": best + 0.5 - 0.1 * s,
                  "val_sample_tokens": 4096, "val_full": False} for s in range(5)]
        final = {"kind": "final", "step": 4, "elapsed_s": 21.0, "val_bpb": best, "val_full": True}
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*evals, final]))
        records.append({"name": name, "run": str(folder), "error": None, "best_val_bpb": best})
    compare.plot(records, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").read_bytes().startswith(b"\x89PNG")
    for name, best in (("optim=adamw", 2.1234), ("optim=sgd", 2.5678)):
        (curve,) = figures.labelled(f"{name} ({best:.3f})")
        assert curve[1] == [0.0, 5.0, 10.0, 15.0, 20.0]
        assert ([21.0], [best]) in [(x, y) for _, x, y in figures.entries]  # the star at the reported figure
    assert figures.labelled("final: whole validation split")
    assert figures.labelled("fixed sample of 4,096 tokens")
