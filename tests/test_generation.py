"""Generation: the KV cache gives the uncached path's logits and tokens, sampling filters, the CLI."""

import pytest
import torch

from s2moe_ds.config import load_config
from s2moe_ds.model import MoELanguageModel, sample_next

ROUTERS = [
    ("smoe", True),
    ("smoe", False),
    ("xmoe", False),
    ("stablemoe", False),
    ("competesmoe", False),
    ("vqmoe", False),
]


def model(router="smoe", s2=True, context=16):
    cfg = load_config(
        None,
        [
            "model.vocab_size=50",
            f"model.context={context}",
            "model.n_layer=2",
            "model.d_model=32",
            "model.n_head=2",
            f"model.moe.router={router}",
            f"model.moe.s2moe.enabled={str(s2).lower()}",
            "model.moe.k=2",
        ],
    ).model
    torch.manual_seed(0)
    return MoELanguageModel(cfg).eval()


@pytest.mark.parametrize("router,s2", ROUTERS)
def test_cached_logits_equal_the_full_forward(router, s2):
    m = model(router, s2)
    idx = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        full = m(idx).logits
        cache = m.new_cache()
        steps = [m(idx[:, :5], cache=cache).logits]
        steps += [m(idx[:, t : t + 1], cache=cache).logits for t in range(5, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router,s2", ROUTERS)
def test_greedy_decoding_is_the_same_with_and_without_the_cache(router, s2):
    m = model(router, s2)
    idx = torch.randint(0, 50, (2, 3))
    cached = m.generate(idx, 40, greedy=True, use_cache=True)  # past the context of 16: the window slides
    plain = m.generate(idx, 40, greedy=True, use_cache=False)
    assert cached.shape == (2, 43) and torch.equal(cached, plain)


def test_a_cache_holding_tokens_takes_one_new_token_per_forward():
    m = model()
    cache = m.new_cache()
    with torch.no_grad():
        m(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="one new token"):
            m(torch.zeros(1, 2, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="exceeds model.context"):
            m(torch.zeros(1, 17, dtype=torch.long))


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert sample_next(logits, greedy=True).item() == 0
    torch.manual_seed(0)
    draws = {sample_next(logits, top_k=2).item() for _ in range(200)}
    assert draws == {0, 1}
    draws = {sample_next(logits, top_p=0.7).item() for _ in range(200)}  # 0.5 < 0.7 <= 0.8: the two likeliest
    assert draws == {0, 1}
    draws = {sample_next(logits, top_p=0.4).item() for _ in range(100)}  # the likeliest alone reaches 0.4
    assert draws == {0}
    draws = {sample_next(logits, temperature=100.0).item() for _ in range(400)}  # nearly uniform
    assert draws == {0, 1, 2, 3}
