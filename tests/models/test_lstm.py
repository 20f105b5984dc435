import torch
import torch.nn.functional as F

from budgetlm.models.classifier import Classifier, ClassifierConfig
from budgetlm.models.lstm import LSTMConfig, LSTMEncoder, word_tokenizer


def lstm_classifier() -> Classifier:
    torch.manual_seed(0)
    config = ClassifierConfig(body="lstm", body_config=LSTMConfig(vocab_size=50).to_dict(), labels=["neg", "pos"],
                              pooling="last", dropout=0.5)
    return Classifier(config)


def test_the_guides_shapes():
    model = lstm_classifier()
    body = model.body
    assert body.embed.weight.shape == (50, 64)
    assert (body.lstm.input_size, body.lstm.hidden_size, body.lstm.num_layers) == (64, 128, 1)
    assert model.head.drop.p == 0.5 and model.head.out.weight.shape == (2, 128)
    ids = torch.randint(1, 50, (3, 7))
    hidden = body(ids, torch.ones_like(ids))
    assert hidden.shape == (3, 7, 128)
    logits = model(ids, torch.ones_like(ids))
    assert logits.shape == (3, 2)
    F.cross_entropy(logits, torch.tensor([0, 1, 1])).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_last_pooling_reads_the_final_state_of_each_row():
    body = LSTMEncoder(LSTMConfig(vocab_size=50)).eval()
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        hidden = body(ids, mask)
        _, (h_n, _) = body.lstm(body.embed(ids[:1, :3]))
    torch.testing.assert_close(hidden[0, 2], h_n[0, 0])
    assert torch.equal(hidden[0, 3:], torch.zeros(3, 128))  # padding never enters the recurrence


def test_padding_does_not_change_a_prediction():
    model = lstm_classifier().eval()
    short = torch.randint(1, 50, (1, 4))
    ids = torch.zeros(2, 9, dtype=torch.int64)
    ids[0, :4], ids[1] = short[0], torch.randint(1, 50, (9,))
    mask = (torch.arange(9) < torch.tensor([[4], [9]])).long()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask)[0], model(short, torch.ones_like(short))[0], atol=1e-6, rtol=1e-5)


def test_word_vocabulary_keeps_the_most_frequent_lowercased_words():
    texts = ["The film is GOOD .", "the film is bad", "the plot , the actors", "rare"]
    tok = word_tokenizer(texts, vocab_words=4)
    vocab = tok.get_vocab()
    assert vocab["[PAD]"] == 0 and vocab["[UNK]"] == 1
    assert {"the", "film", "is"} <= set(vocab) and len(vocab) == 4 + 2
    ids = tok.encode("THE Film don't").ids
    assert ids[:2] == [vocab["the"], vocab["film"]] and ids[2] == 1  # "don't" is one unknown word
    words = [w for w, _ in tok.pre_tokenizer.pre_tokenize_str("don't stop, ok.")]
    assert words == ["don't", "stop", ",", "ok", "."]
