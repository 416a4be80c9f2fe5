import json
import pickle

import pytest
import torch

import pyroflows as pf
from pyroflows import flows
from pyroflows.io import can_save
from pyroflows.transforms import ElementwiseAffine

BUILDERS = {
    "NICE": lambda cd: pf.NICE(3, layers=2, hidden=(8,), context_dim=cd),
    "RealNVP": lambda cd: pf.RealNVP(3, layers=2, hidden=(8,), context_dim=cd),
    "MAF": lambda cd: pf.MAF(3, layers=2, hidden=(8, 8), context_dim=cd, mixing="random"),
    "IAF": lambda cd: pf.IAF(3, layers=2, hidden=(8, 8), context_dim=cd),
    "NSF": lambda cd: pf.NSF(3, layers=2, hidden=(8,), bins=4, context_dim=cd),
    "NSF-AR": lambda cd: pf.NSF(3, layers=2, hidden=(8, 8), autoregressive=True, context_dim=cd),
    "LinearFlow": lambda cd: pf.LinearFlow(3, layers=2, context_dim=cd, linear="qr"),
    "NAF": lambda cd: pf.NAF(3, layers=2, hidden=(8,), units=4, context_dim=cd),
    "BNAF": lambda cd: pf.BNAF(3, layers=2, hidden_factor=4, context_dim=cd, fast="sampling"),
    "ResidualFlow": lambda cd: pf.ResidualFlow(3, layers=2, hidden=(8,), context_dim=cd),
    "SylvesterFlow": lambda cd: pf.SylvesterFlow(3, layers=2, kind="householder", context_dim=cd),
    "CNF": lambda cd: pf.CNF(3, hidden=(8,), context_dim=cd, solver="rk4", steps=4),
}
#: the names under which config.json records each builder (pyroflows.flows.BUILDERS)
SAVED_NAMES = {
    "NICE": "nice",
    "RealNVP": "realnvp",
    "MAF": "maf",
    "IAF": "iaf",
    "NSF": "nsf",
    "LinearFlow": "linear",
    "NAF": "naf",
    "BNAF": "bnaf",
    "ResidualFlow": "residual",
    "SylvesterFlow": "sylvester",
    "CNF": "cnf",
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
    assert config["dtype"] == "float64" and config["builder"] == SAVED_NAMES[name.split("-")[0]]
    assert config["format_version"] == 2
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


# --- the builder table: registered subclasses -----------------------------------------------


@pytest.fixture
def builder_table():
    """Leave pyroflows.flows.BUILDERS as it was after a test that registers builders."""
    before = dict(flows._BUILDERS)
    yield
    flows._BUILDERS.clear()
    flows._BUILDERS.update(before)


class TwoLayerMAF(pf.MAF):
    """A subclass that keeps MAF's constructor (and so its recorded configuration)."""


class WideNSF(pf.NSF):
    """A subclass with a constructor of its own, which records its own arguments."""

    def __init__(self, dim: int, width: int = 8) -> None:
        super().__init__(dim, layers=2, hidden=(width, width), bins=4)
        self.set_config(dim=dim, width=width)


class ForgetfulNSF(pf.NSF):
    """A subclass with a constructor of its own that does not record its arguments."""

    def __init__(self, dim: int, width: int = 8) -> None:
        super().__init__(dim, layers=2, hidden=(width, width), bins=4)


def test_a_registered_subclass_is_saved_and_loaded(tmp_path, builder_table):
    flows.register_builder("two_layer_maf", TwoLayerMAF)
    flows.register_builder("wide_nsf", WideNSF)
    x = torch.randn(5, 2)
    for name, flow in (("two_layer_maf", TwoLayerMAF(2, layers=2)), ("wide_nsf", WideNSF(2, 6))):
        assert can_save(flow)
        pf.save(flow, tmp_path / name)
        assert json.loads((tmp_path / name / "config.json").read_text())["builder"] == name
        loaded = pf.load(tmp_path / name)
        assert type(loaded) is type(flow)
        assert json.dumps(loaded.config) == json.dumps(flow.config)  # tuples become lists
        assert torch.equal(loaded().log_prob(x), flow().log_prob(x))
    assert WideNSF(2, 6).config == {"builder": "wide_nsf", "kwargs": {"dim": 2, "width": 6}}


def test_an_unregistered_or_misconfigured_subclass_is_refused_with_how(tmp_path, builder_table):
    flow = TwoLayerMAF(2, layers=2)
    assert flow.config["builder"] is None and not can_save(flow)
    with pytest.raises(ValueError, match=r"register_builder\('a_name', TwoLayerMAF\).*state_dict"):
        pf.save(flow, tmp_path / "a")
    flows.register_builder("forgetful_nsf", ForgetfulNSF)
    # NSF's recorded arguments (dim, layers, hidden, ...) would not rebuild a ForgetfulNSF
    with pytest.raises(ValueError, match=r"does not take the recorded configuration.*set_config"):
        pf.save(ForgetfulNSF(2), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_register_builder_checks_its_arguments(builder_table):
    with pytest.raises(ValueError, match="name: expected lower-case letters"):
        flows.register_builder("Wide NSF", WideNSF)
    with pytest.raises(ValueError, match="'nsf' is a built-in builder"):
        flows.register_builder("nsf", WideNSF)
    with pytest.raises(TypeError, match=r"expected a subclass of pyroflows.Flow"):
        flows.register_builder("linear_layer", torch.nn.Linear)
    flows.register_builder("wide_nsf", WideNSF)
    flows.register_builder("wide_nsf", WideNSF)  # again: nothing changes
    with pytest.raises(ValueError, match="already registered as 'wide_nsf'"):
        flows.register_builder("other_name", WideNSF)
    with pytest.raises(ValueError, match="'wide_nsf' is already registered for"):
        flows.register_builder("wide_nsf", TwoLayerMAF)
    with pytest.raises(TypeError):
        flows.BUILDERS["mine"] = WideNSF  # read-only: register_builder is the way in
    flows.unregister_builder("wide_nsf")
    assert "wide_nsf" not in flows.BUILDERS and flows.builder_name(WideNSF) is None
    with pytest.raises(ValueError, match="expected a registered builder; got 'wide_nsf'"):
        flows.unregister_builder("wide_nsf")
    with pytest.raises(ValueError, match="'nsf' is a built-in builder; it cannot be removed"):
        flows.unregister_builder("nsf")


def test_unknown_builders_name_the_known_ones_and_how_to_register(saved, builder_table):
    flows.register_builder("wide_nsf", WideNSF)
    edit_config(saved, builder="fancy")
    with pytest.raises(ValueError, match=r"unknown builder 'fancy'.*'wide_nsf'.*register_builder"):
        pf.load(saved)


# --- folders written by pyroflows 0.1 (format version 1) ----------------------------------------

#: config.json kwargs exactly as pyroflows 0.1 recorded them (every constructor argument, with
#: RealNVP's image arguments beside its vector ones), under qualified class names.
V1_FOLDERS = {
    "nsf": (
        "pyroflows.flows.NSF",
        {"dim": 2, "layers": 2, "hidden": [8], "context_dim": 1, "bins": 4, "bound": 5.0,
         "autoregressive": False, "mixing": "lu", "actnorm": True, "base": "normal"},
        lambda: pf.NSF(2, layers=2, hidden=(8,), bins=4, context_dim=1),
    ),
    "iaf": (
        "pyroflows.flows.IAF",
        {"dim": 2, "layers": 2, "hidden": [8], "context_dim": 0, "mixing": "reverse",
         "actnorm": False, "log_scale_bound": 3.0, "base": "normal"},
        lambda: pf.IAF(2, layers=2, hidden=(8,)),
    ),
    "realnvp": (
        "pyroflows.flows.RealNVP",
        {"dim": 2, "layers": 2, "hidden": [8], "context_dim": 0, "mask": "half",
         "actnorm": False, "log_scale_bound": 3.0, "base": "normal", "shape": None, "scales": 2,
         "channels": 64, "blocks": 2, "logit": 0.05},
        lambda: pf.RealNVP(2, layers=2, hidden=(8,)),
    ),
    "image_realnvp": (
        "pyroflows.flows.RealNVP",
        {"dim": None, "layers": 5, "hidden": [64, 64], "context_dim": 0, "mask": "half",
         "actnorm": False, "log_scale_bound": 3.0, "base": "normal", "shape": [1, 4, 4],
         "scales": 2, "channels": 4, "blocks": 1, "logit": 0.05},
        lambda: flows.ImageRealNVP((1, 4, 4), channels=4, blocks=1),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(V1_FOLDERS))
def test_folders_of_format_version_1_still_load(tmp_path, name):
    qualified, kwargs, build = V1_FOLDERS[name]
    torch.manual_seed(0)
    flow = build()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path / name
    folder.mkdir()
    document = {"format": "pyroflows.flow", "format_version": 1, "pyroflows_version": "0.1.0"}
    document.update(builder=qualified, kwargs=kwargs, dtype="float32")
    (folder / "config.json").write_text(json.dumps(document, indent=2))
    torch.save(flow.state_dict(), folder / "weights.pt")
    loaded = pf.load(folder)
    assert type(loaded) is type(flow) and loaded.config["builder"] == name
    shape = tuple(flow.event_shape)
    x = torch.rand(5, *shape)
    c = torch.randn(5, 1) if flow.context_dim else None
    assert torch.equal(loaded(c).log_prob(x), flow(c).log_prob(x))
    # saved again, it is written in the current format, under the table's name
    again = json.loads((pf.save(loaded, tmp_path / "again") / "config.json").read_text())
    assert (again["format_version"], again["builder"]) == (2, name)


def test_format_version_1_resolves_only_registered_classes(saved):
    edit_config(saved, format_version=1, builder="os.system")
    with pytest.raises(ValueError, match=r"unknown builder 'os.system'"):
        pf.load(saved)


# --- untrusted folders: bounded memory, finite numbers ------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        # 10**12 weights in one Linear layer: refused before anything is allocated
        ({"hidden": [1_000_000, 1_000_000]}, "more than max_parameters=100,000,000 numbers"),
        ({"layers": 1_000_000_000}, "more than 10,000 tensors"),
        ({"dim": 10**9}, "more than max_parameters"),
    ],
)
def test_configs_asking_for_too_much_memory_are_refused(saved, kwargs, match):
    edit_config(saved, kwargs=kwargs)
    with pytest.raises(ValueError, match=f"is refused: it (asks for|creates) {match}"):
        pf.load(saved)


def test_max_parameters_is_the_bound_and_none_lifts_it(saved):
    size = sum(p.numel() for p in pf.load(saved).parameters())
    with pytest.raises(ValueError, match=rf"max_parameters={size - 1} numbers.*pass a larger"):
        pf.load(saved, max_parameters=size - 1)  # every parameter counts
    assert sum(p.numel() for p in pf.load(saved, max_parameters=None).parameters()) == size
    with pytest.raises(TypeError, match="max_parameters: expected an integer or None"):
        pf.load(saved, max_parameters=1e9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(saved, bad):
    state = torch.load(saved / "weights.pt", weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name].view(-1)[1] = bad
    torch.save(state, saved / "weights.pt")
    with pytest.raises(
        ValueError, match=rf"not all finite: NaN or infinite values in \['{name}'\]"
    ):
        pf.load(saved)


def test_non_finite_and_oversized_configs_are_refused(saved):
    text = (
        (saved / "config.json")
        .read_text()
        .replace('"log_scale_bound": 3.0', '"log_scale_bound": NaN')
    )
    (saved / "config.json").write_text(text)
    with pytest.raises(ValueError, match=r"not valid JSON.*NaN is not a number JSON allows"):
        pf.load(saved)
    (saved / "config.json").write_text(" " * 2_000_000)
    with pytest.raises(ValueError, match="expected at most 1,000,000 bytes"):
        pf.load(saved)
    flow = pf.RealNVP(2)
    flow.set_config(**{**flow.config["kwargs"], "log_scale_bound": float("inf")})
    with pytest.raises(ValueError, match="the non-finite number inf"):
        pf.save(flow, saved)  # JSON has no infinity: saving it would write an unreadable file
