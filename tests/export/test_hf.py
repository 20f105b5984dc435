"""Export to transformers and import back: the exported model computes what budgetlm's does, and comes back whole."""

import io
import json

import pytest
import torch

from budgetlm.data.tokenizer import EOT, train_tokenizer
from budgetlm.errors import UserError
from budgetlm.models.gpt import GPT
from budgetlm.train.checkpoint import load_model
from budgetlm.workflows import export, generate, import_
from tests.export.tiny_run import tiny_run

transformers = pytest.importorskip("transformers")

EXPORTABLE = {
    "swiglu": dict(mlp="swiglu"),
    "relu2": dict(mlp="relu2"),
    "relu2-tempered": dict(mlp="relu2", temperature=0.7),
    "swiglu-tempered": dict(mlp="swiglu", temperature=1.3, rope_base=500.0, mlp_ratio=2.5),
}


@pytest.fixture(scope="module")
def tokenizer(play_text):
    return train_tokenizer(play_text.split("\n\n")[:400], 320)


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", EXPORTABLE)
def test_exported_logits_equal_budgetlm_and_round_trip_is_exact(tmp_path, tokenizer, name):
    run = tiny_run(tmp_path / "run", tokenizer, **EXPORTABLE[name])
    export.run(str(run), tmp_path / "hf")
    ours, config, _ = load_model(run)
    theirs = hf_model(tmp_path / "hf")
    assert type(theirs).__name__ == ("Qwen3ForCausalLM" if config["mlp"] == "swiglu" else "ApertusForCausalLM")
    ids = torch.randint(0, config["vocab_size"], (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(ids)
        assert (theirs(ids).logits - expected).abs().max() < 1e-4
    import_.run(f"hf:{tmp_path / 'hf'}", tmp_path / "back")
    back, back_config, _ = load_model(tmp_path / "back")
    def computed(c):  # dropout rates are training settings, which transformers' config does not carry
        return {k: v for k, v in c.items() if "dropout" not in k}

    assert computed(back_config) == computed(ours.config.to_dict())
    before, after = ours.state_dict(), back.state_dict()
    assert before.keys() == after.keys()
    for key in before:  # the final norm was divided by the temperature on the way out and multiplied back
        if key == "norm.weight":
            torch.testing.assert_close(after[key], before[key], rtol=1e-6, atol=0)
        else:
            assert torch.equal(after[key], before[key]), key
    with torch.no_grad():
        assert (back(ids) - expected).abs().max() < 1e-5


def test_tokenizer_and_greedy_generation_match_budgetlm_and_the_imported_model(tmp_path, tokenizer):
    run = tiny_run(tmp_path / "run", tokenizer, mlp="relu2", temperature=0.8)
    export.run(str(run), tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ("ROMEO: what light", "  two spaces,\nnew line — ünïcode ", "x"):
        expected = [tokenizer.token_to_id(EOT)] + tokenizer.encode(text, add_special_tokens=False).ids
        assert tok(text).input_ids == expected
        assert tok.decode(expected, skip_special_tokens=True) == text
    ours = generate.run(str(run), "ROMEO:", max_new_tokens=12, temperature=0, precision="fp32", out=io.StringIO())
    ids = tok("ROMEO:", return_tensors="pt").input_ids
    out = hf_model(tmp_path / "hf").generate(ids, max_new_tokens=12, do_sample=False)
    theirs = tok.decode(out[0], skip_special_tokens=True)
    assert len(out[0]) == ids.shape[1] + 12  # no end-of-text token cut transformers' continuation short
    assert theirs == ours
    import_.run(f"hf:{tmp_path / 'hf'}", tmp_path / "back")
    again = generate.run(str(tmp_path / "back"), "ROMEO:", max_new_tokens=12, temperature=0, precision="fp32",
                         out=io.StringIO())
    assert again == ours


def test_model_card_carries_the_runs_figures(tmp_path, tokenizer):
    export.run(str(tiny_run(tmp_path / "run", tokenizer)), tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "| best validation bits per byte | 2.5 |" in card
    assert "ApertusForCausalLM" in card


def test_a_classifier_is_refused_in_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"arch": "classifier"}))
    with pytest.raises(UserError, match="only language models") as refused:
        export.run(str(tmp_path / "run"), tmp_path / "hf")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "hf").exists()


def test_import_refuses_shapes_the_gpt_cannot_hold(tmp_path, tokenizer):
    export.run(str(tiny_run(tmp_path / "run", tokenizer, mlp="swiglu")), tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_key_value_heads": 1}))
    with pytest.raises(UserError, match="num_key_value_heads=1"):
        import_.run(f"hf:{tmp_path / 'hf'}", tmp_path / "back")
    config_path.write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(UserError, match="llama model cannot be imported"):
        import_.run(f"hf:{tmp_path / 'hf'}", tmp_path / "back")


def test_greedy_generation_keeps_fp32_weights_unless_told(tmp_path, tokenizer, monkeypatch):
    run = tiny_run(tmp_path / "run", tokenizer, mlp="relu2", temperature=1.0)
    casts = []
    monkeypatch.setattr(generate, "pick_precision", lambda asked, device: "bf16" if asked == "auto" else asked)
    monkeypatch.setattr(GPT, "cast_weights", lambda self, dtype: casts.append(dtype))
    generate.run(str(run), "ROMEO:", max_new_tokens=3, temperature=0, out=io.StringIO())
    assert casts == []  # greedy: the automatic precision stays fp32 where sampling would take bf16
    generate.run(str(run), "ROMEO:", max_new_tokens=3, temperature=0.8, out=io.StringIO())
    generate.run(str(run), "ROMEO:", max_new_tokens=3, temperature=0, precision="bf16", out=io.StringIO())
    assert casts == [torch.bfloat16, torch.bfloat16]
