import torch

from budgetlm.models.config import ModelConfig
from budgetlm.models.sampling import generate_seq2seq
from budgetlm.models.t5 import T5


def tiny() -> T5:
    torch.manual_seed(0)
    return T5(ModelConfig(arch="t5", vocab_size=97, context=24, n_layer=2, d_model=32, n_head=2)).eval()


def test_decoding_with_the_cache_equals_decoding_without():
    model = tiny()
    src, tgt = torch.randint(0, 97, (2, 10)), torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        memory = model.encode(src)
        whole = model.decode(tgt, memory)
        caches = model.new_caches(2, src.device)
        steps = torch.cat([model.decode(tgt[:, i : i + 1], memory, caches=caches) for i in range(7)], dim=1)
    assert torch.allclose(whole, steps, atol=1e-5)
    assert all(c.memory is not None for c in caches)  # the memory's projection was kept, not recomputed


def test_greedy_generation_with_and_without_the_cache_agree():
    model = tiny()
    src = torch.randint(0, 97, (1, 12))
    cached = [int(t) for t in generate_seq2seq(model, src, 0, 10, temperature=0)]
    plain = [int(t) for t in generate_seq2seq(model, src, 0, 10, temperature=0, use_cache=False)]
    assert cached == plain and len(cached) == 10


def test_the_decoder_reads_the_encoder():
    model = tiny()
    src, tgt = torch.randint(0, 97, (1, 10)), torch.randint(0, 97, (1, 5))
    other = src.clone()
    other[0, 0] = (src[0, 0] + 1) % 97
    with torch.no_grad():
        assert not torch.allclose(model(src, tgt), model(other, tgt), atol=1e-5)
