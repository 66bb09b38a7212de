"""A config file from a clumsy or hostile operator costs bounded time and memory and ends in a
ConfigError that names the problem in a short line: never a traceback, a hang or a flood."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import pytest

from agent.app import load_config
from agent.config import MAX_CONFIG_BYTES, MAX_PFS, MAX_RESOURCES, MAX_YAML_DEPTH, parse_config
from agent.errors import ConfigError

GOOD = ("resources:\n  - resourceName: nvidia.com/cx7_qsfp\n    pfs:\n"
        "      - {pfName: enP2p1s0f0np0, numVfs: 4}\n")


def laughs(key: str) -> str:
    """The classic billion laughs, 9^9 "lol"s from about 500 bytes, its last level under ``key``."""
    names = "abcdefgh"
    lines = ["a: &a [" + ",".join(['"lol"'] * 9) + "]"]
    lines += [f"{b}: &{b} [" + ",".join([f"*{a}"] * 9) + "]" for a, b in itertools.pairwise(names)]
    lines.append(f"{key}: [" + ",".join(["*h"] * 9) + "]")
    return "\n".join(lines) + "\n"


def _refused(data: str | bytes) -> ConfigError:
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert time.monotonic() - start < 5, "refusing a bad config must be quick"
    assert len(str(err.value)) < 400, "the error must be one short line"
    return err.value


@pytest.mark.timeout(20)
@pytest.mark.parametrize("key", ["version", "unknownKey"])
def test_billion_laughs_is_refused_at_once(key: str) -> None:
    text = laughs(key)
    assert len(text) < 600
    err = _refused(text)
    assert err.field == "<file>" and "YAML nodes" in err.reason and "alias" in err.reason


def test_anchors_and_merge_keys_stay_usable() -> None:
    cfg = parse_config(
        "resources:\n  - resourceName: nvidia.com/cx7_qsfp\n    pfs:\n"
        "      - {pfName: enp1, <<: &vf {numVfs: 4, trust: true}}\n"
        "      - {pfName: enp2, <<: *vf}\n")
    assert [(p.num_vfs, p.vf.trust) for p in cfg.resources[0].pfs] == [(4, True), (4, True)]


def test_a_recursive_alias_is_refused() -> None:
    err = _refused("resources: &r [*r]\n")
    assert "recursive" in err.reason


def test_nesting_beyond_the_limit_is_refused_not_a_recursion_error() -> None:
    depth = 5000
    err = _refused("resources: " + "[" * depth + "]" * depth + "\n")
    assert f"more than {MAX_YAML_DEPTH} levels" in err.reason


def test_a_non_utf8_byte_names_its_offset(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(GOOD.encode().replace(b"enP2p1s0f0np0", b"enP2p1s0f0np\xff"))
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    offset = GOOD.index("enP2p1s0f0np0") + len("enP2p1s0f0np")
    assert err.value.field == "<file>" and "not UTF-8" in err.value.reason
    assert err.value.value == f"byte 0xff at offset {offset}"


def test_a_file_over_the_size_limit_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(GOOD + "#" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert err.value.field == "--config" and f"limit of {MAX_CONFIG_BYTES} bytes" in err.value.reason
    with pytest.raises(ConfigError) as err:
        parse_config(GOOD + "#" * MAX_CONFIG_BYTES)  # text handed over directly is bounded too
    assert err.value.field == "<file>" and "larger than" in err.value.reason


@pytest.mark.timeout(20)
def test_a_config_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)  # nobody writes: an open() without O_NONBLOCK would wait forever
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(str(fifo))
    with pytest.raises(ConfigError, match="cannot read: Is a directory"):
        load_config(str(tmp_path))


@pytest.mark.timeout(30)
def test_too_many_pfs_fail_fast() -> None:
    """188,679 PFs took 45 s and 742 MB; past MAX_PFS entries the config is refused, and a list far
    beyond it stops at the YAML node budget without being read to the end."""
    entry = "      - {pfName: enp1, numVfs: 1}\n"
    head = "resources:\n  - resourceName: nvidia.com/cx7_qsfp\n    pfs:\n"
    err = _refused(head + entry * (MAX_PFS + 1))
    assert err.field == "resources" and f"at most {MAX_PFS} PFs" in err.reason
    huge = head + entry * 30_000  # just under 1 MiB
    err = _refused(huge)
    assert "YAML nodes" in err.reason


def test_too_many_resources_are_refused() -> None:
    res = "".join(f"  - {{resourceName: example.com/r{i}, pfs: [{{pfName: e{i}, numVfs: 1}}]}}\n"
                  for i in range(MAX_RESOURCES + 1))
    err = _refused("resources:\n" + res)
    assert err.field == "resources" and f"at most {MAX_RESOURCES} resources" in err.reason


@pytest.mark.parametrize("where", ["pfName", "resourceName", "key"])
def test_a_huge_value_is_echoed_cut_short(where: str) -> None:
    big = "x" * 500_000
    text = {
        "pfName": GOOD.replace("enP2p1s0f0np0", big),
        "resourceName": GOOD.replace("nvidia.com/cx7_qsfp", "nvidia.com/" + big),
        "key": GOOD + f"? {big}\n: 1\n",  # an explicit key: implicit ones stop at 1024 chars
    }[where]
    err = _refused(text)
    assert " chars)" in str(err) and big not in str(err)


@pytest.mark.parametrize("text", [
    "resources: 2001-02-30\n",  # a timestamp the datetime type refuses
    "resources: !!timestamp nonsense\n",
    "resources: " + "1" * 5000 + "\n",  # beyond Python's int-from-string digit limit
    "resources: !!float nonsense\n",
    "resources: !!int ''\n",  # IndexError inside PyYAML
    "resources: !!binary a\n",
    "resources: \x00\n",
])
def test_yaml_values_python_cannot_represent_are_config_errors(text: str) -> None:
    err = _refused(text)
    assert err.field == "<file>" and err.reason.startswith("not valid YAML")
