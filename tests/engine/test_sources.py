"""Minibatch sources and the data checks: detached data, a bounded validation cost."""

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyroflows as pf
from pyroflows import engine
from pyroflows.engine.sources import as_rows, default_eval_every, validation_chunks
from pyroflows.infer import fit_svi


def test_data_and_context_that_require_grad_are_detached_before_training():
    # Before: "Trying to backward through the graph a second time" after the first step, with
    # the flow already changed.
    w = torch.tensor(2.0, requires_grad=True)
    x = w * torch.randn(300, 2)
    c = w * torch.randn(300, 1)
    flow = pf.RealNVP(2, layers=1, hidden=(8,), context_dim=1)
    history = pf.fit(flow, x, context=c, steps=5, batch_size=50, progress=False, seed=0)
    assert history.steps == 5 and w.grad is None
    (rows,) = as_rows("data", w * torch.ones(3, 2))
    assert not rows.requires_grad

    def model(x, size=None, subsample=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x) if size is None else size, subsample=subsample):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x, size=None, subsample=None):
        pyro.sample("mu", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))

    fit_svi(model, guide, data=w * torch.randn(40), batch_size=10, steps=5, progress=False)
    assert w.grad is None


def test_validation_takes_at_most_valid_rows_evenly_spaced():
    torch.manual_seed(0)
    flow = pf.RealNVP(2, layers=1, hidden=(8,))
    x, held_out = torch.randn(200, 2), torch.randn(1000, 2) * 3
    history = pf.fit(
        flow, x, valid=held_out, valid_rows=100, steps=4, eval_every=4, progress=False, seed=0
    )
    index = torch.linspace(0, 999, 100).round().long()
    with torch.no_grad():
        expected = -flow().log_prob(held_out[index]).mean().item()
    assert history.valid_nll[-1] == pytest.approx(expected, rel=1e-6)
    chunks = validation_chunks((held_out,), pf.engine.sources.VALID_ROWS, 4096)
    assert chunks.size == 1000  # below the default cap: all rows
    assert (
        validation_chunks((torch.randn(50_000, 1),), pf.engine.sources.VALID_ROWS, 4096).size
        == 20_000
    )


def test_validation_is_not_run_more_often_than_it_costs_by_default():
    # 200,000 held-out rows after every one of 50 steps dominated a short fit before; now
    # validation waits until the training rows since the last one reach the validation rows.
    torch.manual_seed(0)
    x = torch.randn(3000, 2)
    history = pf.fit(
        pf.RealNVP(2, layers=1, hidden=(8,)),
        x,
        valid=0.5,
        steps=50,
        batch_size=100,
        progress=False,
        seed=0,
    )
    assert history.valid_steps == [15, 30, 45, 50]
    chunks = engine.Chunks((torch.zeros(1500, 2),), 100)
    assert default_eval_every(50, chunks, 100) == 15
    assert default_eval_every(4000, chunks, 100) == 100
    assert default_eval_every(4000, None, 100) == 100


def test_batches_cover_each_epoch_once_and_resume_from_their_state():
    x = torch.arange(10.0)[:, None]
    source = engine.Batches((x,), 4, torch.Generator().manual_seed(0))
    assert source.steps_per_epoch == 3
    epoch = torch.cat([source.batch(s).rows[0] for s in range(3)]).flatten()
    assert sorted(epoch.tolist()) == list(range(10))
    state = source.state_dict()
    after = [source.batch(s).index for s in range(3, 7)]
    again = engine.Batches((x,), 4, torch.Generator())
    again.load_state_dict(state)
    assert all(
        torch.equal(a, again.batch(s).index) for s, a in zip(range(3, 7), after, strict=True)
    )
    full = engine.Batches((x,), 4, torch.Generator(), drop_last=True)
    assert full.steps_per_epoch == 2 and len(full.batch(1).index) == 4


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("text", TypeError, "data: expected a tensor, a numpy array"),
        (torch.tensor(1.0), ValueError, "0-d tensor"),
        ((torch.zeros(3), torch.zeros(4)), ValueError, r"same number of rows; got \[3, 4\]"),
        (torch.zeros(0, 2), ValueError, "at least one row"),
        (torch.tensor([1.0, float("nan")]), ValueError, r"rows \[1\] contain NaN"),
        (torch.zeros(2, dtype=torch.complex64), TypeError, "expected real numbers"),
    ],
)
def test_bad_data_is_refused_naming_what_was_expected(value, error, match):
    with pytest.raises(error, match=match):
        as_rows("data", value)
