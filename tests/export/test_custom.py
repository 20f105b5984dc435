"""Export as transformers custom code (BERT, T5, GPTs no family computes) and import back: the Auto classes with
trust_remote_code load a model that computes what budgetlm's does, and the round trip gives back every bit."""

import ast
import io
import json

import pytest
import torch

from budgetlm.data.tokenizer import MASK, PAD, sentinel, train_tokenizer, with_special_tokens
from budgetlm.export import custom
from budgetlm.models.sampling import generate_seq2seq
from budgetlm.train.checkpoint import load_model
from budgetlm.workflows import export, fill, generate, import_
from tests.export.tiny_run import tiny_run as shared_tiny_run

transformers = pytest.importorskip("transformers")

AUTO = {"bert": "AutoModelForMaskedLM", "t5": "AutoModelForSeq2SeqLM", "gpt": "AutoModelForCausalLM"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any request to the Hub fails: the exported folder loads by itself."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def texts(play_text):
    return play_text.split("\n\n")[:400]


def tiny_run(folder, texts, arch, seed=0, **overrides):
    """A random model of `arch`, with a tokenizer carrying its special tokens, saved as a run folder."""
    tokenizer = with_special_tokens(train_tokenizer(texts, 320), arch)
    return shared_tiny_run(folder, tokenizer, arch, seed, figures={"best_val_loss": 4.25}, **overrides)


def exported(tmp_path, run, arch):
    """budgetlm's model, and the export loaded by transformers with its remote code (no weight left out)."""
    export.run(str(run), tmp_path / "hf")
    auto = getattr(transformers, AUTO[arch])
    theirs, info = auto.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32,
                                        output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    ours, _, _ = load_model(run)
    return ours, theirs.eval()


def assert_round_trip(tmp_path, ours):
    import_.run(f"hf:{tmp_path / 'hf'}", tmp_path / "back")
    back, back_config, _ = load_model(tmp_path / "back")
    assert back_config == ours.config.to_dict()
    before, after = ours.state_dict(), back.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(after[key], before[key]), key


def padded_batch(vocab):
    ids = torch.randint(0, vocab, (3, 32), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 32, dtype=torch.long)
    mask[1, 20:] = 0
    mask[2, 5:] = 0
    return ids, mask


def test_bert_loads_as_a_masked_lm_computing_budgetlms_logits(tmp_path, texts):
    run = tiny_run(tmp_path / "run", texts, "bert")
    ours, theirs = exported(tmp_path, run, "bert")
    assert type(theirs).__name__ == "BudgetLMForMaskedLM"
    ids, mask = padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        expected = ours(ids, mask=mask)
        assert (theirs(input_ids=ids, attention_mask=mask).logits - expected).abs().max() < 1e-4
        assert (theirs(input_ids=ids, attention_mask=mask).logits - ours(ids)).abs().max() > 1e-3  # mask is read
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    assert tok.mask_token == MASK and tok.pad_token == PAD
    text = f"ROMEO: what {MASK} through yonder"
    top = transformers.pipeline("fill-mask", model=str(tmp_path / "hf"), tokenizer=tok, trust_remote_code=True,
                                top_k=3)(text)
    ours_top = fill.run(str(run), text, top_k=3, out=io.StringIO())[0]
    assert [t["token_str"] for t in top] == [token for token, _ in ours_top]
    assert [t["score"] for t in top] == pytest.approx([p for _, p in ours_top], abs=1e-5)
    assert_round_trip(tmp_path, ours)


def test_t5_loads_as_seq2seq_and_generates_budgetlms_greedy_spans(tmp_path, texts):
    run = tiny_run(tmp_path / "run", texts, "t5", mlp="swiglu", seed=3)
    ours, theirs = exported(tmp_path, run, "t5")
    assert type(theirs).__name__ == "BudgetLMForSeq2SeqLM"
    src, mask = padded_batch(ours.config.vocab_size)
    tgt = torch.randint(0, ours.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ours(src, tgt, src_mask=mask)
        got = theirs(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        assert (got - expected).abs().max() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    assert sentinel(0) in tok.all_special_tokens and tok.pad_token == PAD
    prompt = tok(f"ROMEO: what {sentinel(0)} through yonder", return_tensors="pt")
    assert theirs.config.decoder_start_token_id == tok.pad_token_id
    theirs_ids = theirs.generate(**prompt, max_new_tokens=10, do_sample=False)[0, 1:].tolist()
    ours_ids = [int(t) for t in generate_seq2seq(ours, prompt.input_ids, tok.pad_token_id, 10, temperature=0)]
    assert theirs_ids == ours_ids
    assert len(set(ours_ids)) > 2  # a varied continuation, not one token repeated
    assert_round_trip(tmp_path, ours)


@pytest.mark.parametrize("overrides", [dict(canon=4, temperature=0.8), dict(logit_softcap=15.0, mlp="swiglu")],
                         ids=["canon", "softcap"])
def test_gpts_no_family_computes_load_as_causal_lms(tmp_path, texts, overrides):
    run = tiny_run(tmp_path / "run", texts, "gpt", **overrides)
    ours, theirs = exported(tmp_path, run, "gpt")
    assert type(theirs).__name__ == "BudgetLMForCausalLM"
    ids, _ = padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    expected = generate.run(str(run), "ROMEO:", max_new_tokens=12, temperature=0, precision="fp32",
                            out=io.StringIO())
    out = theirs.generate(**tok("ROMEO:", return_tensors="pt"), max_new_tokens=12, do_sample=False)
    assert tok.decode(out[0], skip_special_tokens=True) == expected
    assert_round_trip(tmp_path, ours)


def test_folder_carries_code_card_and_config_transformers_reads(tmp_path, texts):
    export.run(str(tiny_run(tmp_path / "run", texts, "t5")), tmp_path / "hf")
    folder = tmp_path / "hf"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "budgetlm" and config["architectures"] == ["BudgetLMForSeq2SeqLM"]
    assert config["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling_budgetlm.BudgetLMForSeq2SeqLM"
    assert config["is_encoder_decoder"] and "temperature" not in config  # generate would read it as its own
    card = (folder / "README.md").read_text()
    assert "trust_remote_code=True" in card and "| best validation loss (nats per token) | 4.25 |" in card
    for name in custom.CODE_FILES:  # the shipped code needs torch and transformers only
        assert (folder / name).read_bytes() == custom.code(name)
        tree = ast.parse((folder / name).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.level == 0}
        assert imported <= {"torch", "transformers"}, imported
