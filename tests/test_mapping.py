"""Mapping spec: parsing, files, derived groups, and every rejected combination."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adp_pass.mapping import Mapping, MappingError


def test_parse_compact_form_defaults_to_replicated_mlp():
    m = Mapping.parse("tp=8,attn_dp=1")
    assert (m.world_size, m.tp_size, m.attn_tp_size, m.mlp_tp_size) == (8, 8, 1, 1)
    assert m.enable_attention_dp and m.dp_size == 8
    assert str(m) == "tp=8,attn_dp=1,attn_tp=1,mlp_tp=1"


def test_parse_accepts_long_names_and_booleans():
    m = Mapping.parse(" tp_size=4 , enable_attention_dp=true, mlp_tp=1 ")
    assert m.tp_size == 4 and m.enable_attention_dp and m.mlp_tp_size == 1


def test_plain_tp_mapping_keeps_everything_tp():
    m = Mapping.parse("tp=4")
    assert not m.enable_attention_dp and m.attn_tp_size == 4 and m.mlp_tp_size == 4
    assert m.dp_size == 1 and m.attn_group(2) == [0, 1, 2, 3]


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_from_file(tmp_path, suffix):
    path = tmp_path / f"mapping{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"tp": 2, "attn_dp": True}))
    else:
        path.write_text("[mapping]\ntp_size = 2\nenable_attention_dp = true\n")
    assert Mapping.load(path) == Mapping(tp_size=2, enable_attention_dp=True)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty mapping"),
        ("tp=8,,attn_dp=1", "empty entry"),
        ("tp", "key=value"),
        ("tp=", "key=value"),
        ("tp=eight", "must be an integer"),
        ("tp=0", "must be >= 1"),
        ("tp=-2", "must be >= 1"),
        ("tp=8,tp=4", "given twice"),
        ("tp=8,pp=2", "unknown mapping key 'pp'"),
        ("tp=8,attn_dp=maybe", "attn_dp must be 0/1"),
        ("attn_dp=1", "needs tp"),
        ("tp=8,world=16,attn_dp=1", "world (16) must equal tp (8)"),
        ("tp=8,attn_dp=1,mlp_tp=3", "mlp_tp (3) must divide tp (8)"),
        ("tp=8,attn_tp=3,attn_dp=1", "attn_tp (3) must divide tp (8)"),
        ("tp=8,attn_tp=2", "set attn_dp=1"),
        ("tp=8,mlp_tp=1", "needs attention-DP"),
    ],
)
def test_malformed_mappings_name_the_problem(spec, message):
    with pytest.raises(MappingError, match=__import__("re").escape(message)):
        Mapping.parse(spec)


@pytest.mark.parametrize("spec, lockstep, dp", [
    ("tp=8,attn_dp=1", 1, 8), ("tp=8,attn_dp=0", 8, 1), ("tp=8,attn_dp=1,mlp_tp=8", 8, 8),
    ("tp=8,attn_dp=1,attn_tp=2", 2, 4), ("tp=8,attn_dp=1,attn_tp=2,mlp_tp=4", 4, 4),
    ("tp=8,attn_dp=1,attn_tp=4,mlp_tp=2", 4, 2),
])
def test_every_mapping_is_valid_and_knows_its_lockstep_and_dp_groups(spec, lockstep, dp):
    mapping = Mapping.parse(spec)
    assert (mapping.lockstep_size, mapping.dp_size) == (lockstep, dp)
    assert Mapping.parse(str(mapping)) == mapping


@pytest.mark.parametrize(
    "heads, kv, inter, what",
    [(16, 4, 256, "num_key_value_heads (4)"), (6, 8, 256, "num_attention_heads (6)"),
     (16, 8, 100, "intermediate_size (100)")],
)
def test_check_model_rejects_tp_not_dividing_the_model(heads, kv, inter, what):
    with pytest.raises(MappingError, match=__import__("re").escape(what)):
        Mapping.parse("tp=8,attn_dp=1").check_model(heads, kv, inter)


def test_rank_outside_world_is_rejected():
    with pytest.raises(MappingError, match="outside world 4"):
        Mapping.parse("tp=4,attn_dp=1").dp_rank(4)


@settings(max_examples=60, deadline=None)
@given(tp=st.sampled_from([1, 2, 3, 4, 6, 8, 16]), data=st.data())
def test_groups_partition_the_world(tp, data):
    divisors = [d for d in range(1, tp + 1) if tp % d == 0]
    attn_tp, mlp_tp = data.draw(st.sampled_from(divisors)), data.draw(st.sampled_from(divisors))
    m = Mapping(tp_size=tp, enable_attention_dp=True, attn_tp_size=attn_tp, mlp_tp_size=mlp_tp)
    for group_of, size in ((m.attn_group, attn_tp), (m.mlp_group, mlp_tp)):
        groups = {tuple(group_of(r)) for r in range(tp)}
        assert sorted(r for g in groups for r in g) == list(range(tp))
        assert all(len(g) == size for g in groups)
    assert tp % m.lockstep_size == 0 and m.lockstep_size % max(attn_tp, mlp_tp) == 0
    assert {m.dp_rank(r) for r in range(tp)} == set(range(m.dp_size))
    assert Mapping.parse(str(m)) == m


# Files take the string form's keys and values, checked by the same code.
@pytest.mark.parametrize(
    "values, message",
    [
        ({"tp": 2, "attn_dp": 1}, None),  # 1 for attn_dp, as in "tp=2,attn_dp=1"
        ({"tp": "2", "attn_dp": "true"}, None),
        ({"tp": 0, "attn_dp": 1}, "tp must be >= 1, got 0"),
        ({"tp": 2.0, "attn_dp": 1}, "tp must be an integer >= 1, got 2.0"),
        ({"tp": [2]}, "tp must be an integer >= 1, got [2]"),
        ({"tp": 2, "attn_dp": "maybe"}, "attn_dp must be 0/1 or true/false, got 'maybe'"),
        ({"tp": 2, "attn_dp": 2}, "attn_dp must be 0/1 or true/false, got '2'"),
        ({"tp": 2, "pp": 2}, "unknown mapping key 'pp'"),
        ({"tp": 2, "tp_size": 2}, "mapping key 'tp_size' given twice"),
        ({"attn_dp": 1}, "needs tp"),
    ],
)
@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_files_take_the_string_forms_keys_and_values(tmp_path, values, message, suffix):
    path = tmp_path / f"m{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    if message is None:
        assert Mapping.load(path) == Mapping.parse("tp=2,attn_dp=1")
    else:
        with pytest.raises(MappingError, match=__import__("re").escape(message)):
            Mapping.load(path)


def test_missing_mapping_file_is_named(tmp_path):
    with pytest.raises(MappingError, match="does not exist"):
        Mapping.load(tmp_path / "nope.json")
