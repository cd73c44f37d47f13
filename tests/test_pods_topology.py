"""TPU slice names -> topology strings, host counts and HBM (no JAX needed)."""

import pytest

from cadenza.errors import CadenzaError
from cadenza.train.topology import GIB, known_slice_names, parse_slice


@pytest.mark.parametrize("name, topology, chips, hosts, per_host, hbm_gib", [
    ("v5p-8", "v5p:2x2x1", 4, 1, (2, 2, 1), 95),
    ("v5p-32", "v5p:2x2x4", 16, 4, (2, 2, 1), 95),
    ("v4-8", "v4:2x2x1", 4, 1, (2, 2, 1), 32),
    ("v5e-4", "v5e:2x2", 4, 1, (2, 2, 1), 16),
    ("v5e-8", "v5e:2x4", 8, 1, (2, 4, 1), 16),
    ("v5e-16", "v5e:4x4", 16, 4, (2, 2, 1), 16),
    ("v5litepod-256", "v5e:16x16", 256, 64, (2, 2, 1), 16),
    ("v6e-64", "v6e:8x8", 64, 16, (2, 2, 1), 32),
    ("v5e:2x2", "v5e:2x2", 4, 1, (2, 2, 1), 16),
    ("v5p:2x2x2", "v5p:2x2x2", 8, 2, (2, 2, 1), 95),
])
def test_slice_names_map_to_topologies(name, topology, chips, hosts, per_host, hbm_gib):
    s = parse_slice(name)
    assert (s.topology, s.chips, s.hosts, s.chips_per_host) == (topology, chips, hosts, per_host)
    assert s.hbm_bytes == hbm_gib * GIB


def test_accelerator_type_names_round_trip():
    for name in known_slice_names():
        assert parse_slice(name).name == name
    assert parse_slice("v5e:4x4").name == "v5e-16"


@pytest.mark.parametrize("bad", ["v5p-31", "v5p-6", "v7-8", "v5e:2x2x2", "v5p:2x2", "tpu", "v5e-"])
def test_unknown_slices_fail_with_the_list(bad):
    with pytest.raises(CadenzaError) as e:
        parse_slice(bad, where="--accelerator")
    assert "--accelerator" in str(e.value)
    assert "v5p-8" in str(e.value) and "v5e-256" in str(e.value)
