import json
import pickle

import pytest
import torch

import pyroflows as pf
from pyroflows.transforms import ElementwiseAffine

BUILDERS = {
    "NICE": lambda cd: pf.NICE(3, layers=2, hidden=(8,), context_dim=cd),
    "RealNVP": lambda cd: pf.RealNVP(3, layers=2, hidden=(8,), context_dim=cd),
    "MAF": lambda cd: pf.MAF(3, layers=2, hidden=(8, 8), context_dim=cd, mixing="random"),
    "IAF": lambda cd: pf.IAF(3, layers=2, hidden=(8, 8), context_dim=cd),
    "NSF": lambda cd: pf.NSF(3, layers=2, hidden=(8,), bins=4, context_dim=cd),
    "NSF-AR": lambda cd: pf.NSF(3, layers=2, hidden=(8, 8), autoregressive=True, context_dim=cd),
    "LinearFlow": lambda cd: pf.LinearFlow(3, layers=2, context_dim=cd, linear="qr"),
}


@pytest.mark.parametrize("context_dim", [0, 2])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_save_load_round_trip(tmp_path, name, context_dim):
    flow = BUILDERS[name](context_dim).double()
    c = torch.randn(6, context_dim, dtype=torch.float64) if context_dim else None
    x = torch.randn(6, 3, dtype=torch.float64) * 2 + 1
    flow(c).log_prob(x)  # ActNorm initialises from this batch
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    pf.save(flow, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["dtype"] == "float64" and config["builder"].endswith(name.split("-")[0])
    torch.manual_seed(1234)  # a rebuilt flow would draw other random permutations
    loaded = pf.load(tmp_path / "m")
    assert type(loaded) is type(flow)
    assert next(loaded.parameters()).dtype == torch.float64
    assert torch.equal(loaded(c).log_prob(x), flow(c).log_prob(x))


def test_hand_built_flows_and_custom_bases_cannot_be_saved(tmp_path):
    with pytest.raises(ValueError, match="assembled by hand"):
        pf.save(pf.Flow([ElementwiseAffine(2)], dim=2), tmp_path / "a")
    with pytest.raises(ValueError, match="argument that JSON cannot hold"):
        pf.save(pf.RealNVP(2, base=pf.bases.DiagNormal(2)), tmp_path / "b")
    with pytest.raises(TypeError, match="expected a pyroflows Flow"):
        pf.save(torch.nn.Linear(2, 2), tmp_path / "c")


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "model"
    pf.save(pf.RealNVP(2, layers=2, hidden=(8,)), folder)
    return folder


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "kwargs":
            config["kwargs"].update(value)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_load_errors_are_clear(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved flow at"):
        pf.load(tmp_path / "nothing")
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        pf.load(saved)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"format": "other"}, "is not a pyroflows flow configuration"),
        ({"format_version": 99}, "format_version 99"),
        ({"builder": "os.system"}, "unknown builder 'os.system'"),
        ({"dtype": "int64"}, "unknown floating dtype"),
        ({"kwargs": {"layers": 0}}, "does not rebuild RealNVP: layers: expected a positive"),
        ({"kwargs": {"colour": "red"}}, "does not rebuild RealNVP"),
        ({"kwargs": {"hidden": [16]}}, "do not fit the configured architecture: .*other shapes"),
        ({"kwargs": {"layers": 3}}, "do not fit the configured architecture: missing"),
    ],
)
def test_bad_configs_are_refused(saved, changes, match):
    edit_config(saved, **changes)
    with pytest.raises(ValueError, match=match):
        pf.load(saved)


def test_weights_are_never_unpickled(saved):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (saved / "weights.pt").write_bytes(pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(ValueError, match=r"cannot read .* as weights"):
        pf.load(saved)
    (saved / "weights.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"weights\.pt is missing"):
        pf.load(saved)
