import dataclasses

import pytest

from dsq.quant import QuantFormat

F = QuantFormat


@pytest.mark.parametrize("spec, want", [
    ("int8:channel", F(8, "channel")),
    ("int4:token:asym", F(4, "token", symmetric=False)),
    ("int8:group128", F(8, "group", group_size=128)),
    ("int8:tensor:stochastic", F(8, "tensor", rounding="stochastic")),
    ("INT2:group32:asym:stochastic", F(2, "group", 32, False, "stochastic")),
    ("int8", F(8, "tensor")),
    ({"bits": 8, "granularity": "channel", "symmetric": False, "rounding": "stochastic",
      "group_size": 128}, F(8, "channel", symmetric=False, rounding="stochastic")),
    ({"bits": 4, "granularity": "group", "group_size": 64}, F(4, "group", 64)),
    ({"bits": 4, "granularity": "group64"}, F(4, "group", 64)),
])
def test_parse(spec, want):
    assert F.parse(spec) == want


@pytest.mark.parametrize("spec", [None, "", "none", " None ", {}])
def test_parse_none(spec):
    assert F.parse(spec) is None


@pytest.mark.parametrize("fmt", [F(8, "channel"), F(4, "token", symmetric=False),
                                 F(8, "group", 128), F(3, "tensor", rounding="stochastic"),
                                 F(2, "group", 32, False, "stochastic")])
def test_str_round_trips(fmt):
    assert F.parse(str(fmt)) == fmt
    assert F.parse(fmt) is fmt


def test_canonical_strings():
    assert str(F(8, "channel")) == "int8:channel"
    assert str(F(4, "token", symmetric=False)) == "int4:token:asym"
    assert str(F(8, "group", 128)) == "int8:group128"
    assert str(F(8, "tensor", rounding="stochastic")) == "int8:tensor:stochastic"
    assert (F(8).qmin, F(8).qmax, F(4).qmin, F(4).qmax, F(2).qmin) == (-128, 127, -8, 7, -2)


@pytest.mark.parametrize("spec, words", [
    ("int16:channel", ["bits=16", "2 to 8"]),
    ("int1", ["bits=1"]),
    ("float8:channel", ["'float8'", "int8"]),
    ("uint8:tensor", ["unsigned", "asym"]),
    ("int8:row", ["'row'", "tensor, channel, token, group<N>"]),
    ("int8:group0", ["group_size", "positive"]),
    ("int8:channel:token", ["granularity", "twice"]),
    ({"bits": 8, "granularity": "rows"}, ["'rows'", "tensor, channel, token, group"]),
    ({"bits": 8, "granularity": "group"}, ["group_size"]),
    ({"bits": 8, "rounding": "up"}, ["'up'", "nearest, stochastic"]),
    ({"bits": 8, "scale": 2}, ["unknown key", "scale", "group_size"]),
    ({"bits": "8"}, ["bits='8'"]),
    (8, ["not a string", "int8:channel"]),
])
def test_parse_errors_name_the_bad_part(spec, words):
    with pytest.raises(ValueError) as e:
        F.parse(spec)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        F(8).bits = 4
