"""A conjugate Normal model whose evidence and posterior are known exactly, for the tests.

z ~ N(0, 1), x_i | z ~ N(z, 1): x ~ N(0, I + 11^T) and z | x ~ N(sum(x) / (1 + N), 1 / (1 + N)).
"""

import pyro
import pyro.distributions as dist
import torch

X = torch.tensor([0.3, 1.2, -0.4, 2.0, 0.9])
N = len(X)
EXACT = dist.MultivariateNormal(torch.zeros(N), torch.eye(N) + torch.ones(N, N)).log_prob(X).item()
POST_MEAN, POST_SD = X.sum() / (1 + N), (1 / (1 + N)) ** 0.5


def model(x):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide_with(scale):
    """The exact posterior's mean with ``scale`` times its standard deviation."""

    def guide(x):
        pyro.sample("z", dist.Normal(POST_MEAN, scale * POST_SD))

    return guide
