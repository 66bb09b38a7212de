"""parse_config over generated input: the only exception that may leave it is ConfigError, its
message is one short line, and it comes quickly."""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import _PF_KEYS, Config, parse_config
from agent.errors import ConfigError

SCHEMA_KEYS = sorted({"version", "resources", "lifecycle", "health", "resourceName", "pfs", "rdma",
                      "sysfsWriteTimeoutSeconds", "vfWaitTimeoutSeconds", "startupWaitSeconds",
                      "recoverySeconds", *_PF_KEYS})
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


def check(data: str | bytes) -> None:
    try:
        out = parse_config(data)
    except ConfigError as e:
        assert len(str(e)) < 600, str(e)[:1000]
    else:
        assert isinstance(out, Config)


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), TEXT,
    st.sampled_from(["v1", "nvidia.com/cx7_qsfp", "enP2p1s0f0np0", "0002:01:00.0", "15b3", "0x1021",
                     "keep", "stable", "auto", "enable", "4", "2001-02-30", "1" * 5000, "~", ""]),
)
keys = st.one_of(st.sampled_from(SCHEMA_KEYS), TEXT, st.integers())
values: st.SearchStrategy[Any] = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(keys, inner, max_size=6)),
    max_leaves=30)


@st.composite
def config_like(draw: st.DrawFn) -> dict[str, Any]:
    """Documents shaped like a config, with any field swapped for anything."""
    pf = draw(st.dictionaries(st.sampled_from(sorted(_PF_KEYS)), values, max_size=6))
    resource = draw(st.fixed_dictionaries({}, optional={"resourceName": values, "pfs": st.one_of(
        st.just([pf]), st.lists(values, max_size=3)), "rdma": values}))
    doc = draw(st.fixed_dictionaries({}, optional={
        "version": st.one_of(st.just("v1"), values), "resources": st.one_of(st.just([resource]), values),
        "lifecycle": values, "health": values}))
    return doc


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_any_bytes(data: bytes) -> None:
    check(data)


@settings(max_examples=200)
@given(st.text(max_size=400))
def test_any_text(text: str) -> None:
    check(text)


@settings(max_examples=200)
@given(config_like())
def test_config_shaped_documents(doc: dict[str, Any]) -> None:
    check(yaml.safe_dump(doc, allow_unicode=True))


@settings(max_examples=120)
@given(config_like(), st.integers(min_value=0, max_value=10_000), st.binary(min_size=1, max_size=8))
def test_config_shaped_documents_with_bytes_spliced_in(doc: dict[str, Any], at: int, junk: bytes) -> None:
    data = yaml.safe_dump(doc, allow_unicode=True).encode()
    at %= len(data) + 1
    check(data[:at] + junk + data[at:])


@settings(max_examples=150)
@given(st.lists(st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=12), min_size=1,
                max_size=12),
       st.sampled_from(["version", "resources", "unknown", "health"]))
def test_alias_graphs(refs: list[list[int]], key: str) -> None:
    """Anchors that refer to earlier anchors any number of times: a billion laughs is one such graph."""
    lines = ["a0: &a0 [lol, lol]"]
    for i, row in enumerate(refs, start=1):
        lines.append(f"a{i}: &a{i} [" + ", ".join(f"*a{r % i}" for r in row) + "]")
    lines.append(f"{key}: *a{len(refs)}")
    check("\n".join(lines) + "\n")


TOKENS = ["resources:", "version:", "pfs:", "- ", "  ", "    ", "pfName:", "numVfs:", "resourceName:", "&a ",
          "*a", "&b ", "*b", "<<: ", "[", "]", "{", "}", ", ", ": ", "? ", "!!timestamp ", "!!binary ",
          "!!float ", "!!int ", "!!set ", "!!omap ", "!!str ", "!!python/object:os.system ", "2001-02-30",
          "2001-12-14t21:59:43.10-05:00", "0x1F", "0o17", "1e999", ".nan", "-.inf", "1" * 4400, "~", "null",
          "yes", "'q'", '"\\x00"', "|\n", ">\n", "#c", "---\n", "...\n", "\t", "\n", "\ufeff", "\x85",
          "%YAML 1.1\n"]


@settings(max_examples=400)
@given(st.lists(st.sampled_from(TOKENS), max_size=40))
def test_yaml_token_soup(tokens: list[str]) -> None:
    """Raw YAML syntax, unquoted: tags, anchors, merge keys and scalars PyYAML resolves by regex and
    Python then refuses (timestamps, huge ints)."""
    check("".join(tokens))
