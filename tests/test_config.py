"""The daemon's configuration (``pvhub.config``): TOML in, a ``Config`` or a ``ConfigError`` out."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvhub.config import DEFAULT_ADDRESS, Config, ConfigError, load, parse


def write(tmp_path: Path, text: str, name: str = "pvhub.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def assert_defaults(config: Config) -> None:
    assert config.address == DEFAULT_ADDRESS
    assert config.readings is None
    assert config.allow == ("*",)
    assert config.start == ()
    assert config.groups == {}


# --- defaults and every key ---------------------------------------------------------------------


def test_no_file_means_defaults():
    assert_defaults(load(None))


def test_an_empty_file_means_defaults(tmp_path):
    assert_defaults(load(write(tmp_path, "")))


def test_empty_sections_mean_defaults(tmp_path):
    assert_defaults(load(write(tmp_path, "[daemon]\n[pvs]\n[groups]\n")))


def test_every_key_is_read(tmp_path):
    path = write(
        tmp_path,
        """
        [daemon]
        address = "tcp://0.0.0.0:6000"
        readings = "tcp://0.0.0.0:6001"

        [pvs]
        allow = ["IOC:*", "random_walk:?"]
        start = ["random_walk:x", "IOC:m1"]

        [groups.motors]
        pvs = ["IOC:m1", "IOC:m2"]

        [groups.slits]
        pvs = ["IOC:s1"]
        """,
    )
    config = load(path)
    assert config.address == "tcp://0.0.0.0:6000"
    assert config.readings == "tcp://0.0.0.0:6001"
    assert config.allow == ("IOC:*", "random_walk:?")
    assert config.start == ("random_walk:x", "IOC:m1")
    assert config.groups == {"motors": ("IOC:m1", "IOC:m2"), "slits": ("IOC:s1",)}


def test_load_takes_a_string_path(tmp_path):
    path = write(tmp_path, '[daemon]\naddress = "ipc:///tmp/hub"\n')
    assert load(str(path)).address == "ipc:///tmp/hub"


def test_a_group_without_pvs_is_empty(tmp_path):
    assert load(write(tmp_path, "[groups.empty]\n")).groups == {"empty": ()}


# --- mistakes ----------------------------------------------------------------------------------


def test_an_unknown_section_is_refused(tmp_path):
    path = write(tmp_path, '[deamon]\naddress = "tcp://127.0.0.1:1"\n')
    with pytest.raises(ConfigError, match="deamon"):
        load(path)


@pytest.mark.parametrize(
    "text",
    [
        "[daemon]\naddress = 5570\n",
        '[daemon]\naddress = ""\n',
        "[daemon]\nreadings = 5571\n",
        '[daemon]\nreadings = ["tcp://a:1"]\n',
        '[pvs]\nallow = "*"\n',
        "[pvs]\nallow = [1, 2]\n",
        '[pvs]\nstart = "IOC:x"\n',
        '[pvs]\nstart = ["IOC:x", 3]\n',
        '[groups]\nmotors = ["IOC:m1"]\n',
        '[groups.motors]\npvs = "IOC:m1"\n',
    ],
    ids=[
        "address-int",
        "address-empty",
        "readings-int",
        "readings-list",
        "allow-string",
        "allow-ints",
        "start-string",
        "start-mixed",
        "group-not-a-table",
        "group-pvs-string",
    ],
)
def test_a_key_of_the_wrong_type_is_refused(tmp_path, text):
    with pytest.raises(ConfigError):
        load(write(tmp_path, text))


@pytest.mark.parametrize(
    "text",
    ["daemon = 5\n", 'pvs = ["IOC:x"]\n', 'groups = "motors"\n'],
    ids=["daemon", "pvs", "groups"],
)
def test_a_section_that_is_not_a_table_is_refused(tmp_path, text):
    with pytest.raises(ConfigError):
        load(write(tmp_path, text))


def test_a_pv_in_two_groups_is_refused(tmp_path):
    path = write(
        tmp_path,
        """
        [groups.motors]
        pvs = ["IOC:m1", "IOC:shared"]
        [groups.slits]
        pvs = ["IOC:shared"]
        """,
    )
    with pytest.raises(ConfigError, match="IOC:shared") as info:
        load(path)
    assert "motors" in str(info.value) and "slits" in str(info.value)


@pytest.mark.parametrize("bad", ["has space", "", "x" * 257, "caf\u00e9", "tab\tpv", "R" * 60, "R" * 60 + ".VAL"])
@pytest.mark.parametrize("where", ["start", "group"])
def test_an_invalid_pv_name_is_refused(bad, where):
    data = {"pvs": {"start": [bad]}} if where == "start" else {"groups": {"g": {"pvs": [bad]}}}
    with pytest.raises(ConfigError, match="not a valid PV name"):
        parse(data)


def test_a_pv_name_of_256_printable_characters_is_valid():
    pv = "A:" + "x" * 57 + "." + "F" * 196  # a record name Channel Access takes: 59 characters
    assert parse({"pvs": {"start": [pv]}}).start == (pv,)


def test_errors_name_their_source():
    with pytest.raises(ConfigError, match="site.toml"):
        parse({"bogus": {}}, source="site.toml")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "nope.toml")


def test_a_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path)


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[daemon]\naddress = "caf\xe9"\n')
    with pytest.raises(ConfigError):
        load(path)


@pytest.mark.parametrize(
    "text",
    ["[daemon\n", "address = \n", '[pvs]\nallow = ["*"\n', "[pvs]\n[pvs]\n"],
    ids=["unclosed-header", "no-value", "unclosed-array", "duplicate-table"],
)
def test_invalid_toml_is_a_config_error_naming_the_file(tmp_path, text):
    path = write(tmp_path, text, name="broken.toml")
    with pytest.raises(ConfigError, match="broken.toml.*not valid TOML"):
        load(path)


# --- questions a Config answers -----------------------------------------------------------------


@pytest.mark.parametrize(
    "allow, pv, allowed",
    [
        (("*",), "anything:at:all", True),
        (("IOC:*",), "IOC:m1", True),
        (("IOC:*",), "OTHER:m1", False),
        (("IOC:*",), "ioc:m1", False),  # case matters, as in EPICS
        (("IOC:m?",), "IOC:m1", True),
        (("IOC:m?",), "IOC:m10", False),
        (("IOC:m[12]",), "IOC:m2", True),
        (("IOC:m[12]",), "IOC:m3", False),
        (("A:*", "B:*"), "B:x", True),
        ((), "IOC:m1", False),
    ],
)
def test_allows_matches_glob_patterns(allow, pv, allowed):
    assert Config(allow=allow).allows(pv) is allowed


@pytest.mark.parametrize("pv", ["has space", "", "x" * 257, "caf\u00e9"])
def test_allows_refuses_invalid_names_even_when_everything_is_allowed(pv):
    assert Config(allow=("*",)).allows(pv) is False


def test_allow_patterns_come_from_the_file(tmp_path):
    config = load(write(tmp_path, '[pvs]\nallow = ["IOC:*"]\n'))
    assert config.allows("IOC:x") and not config.allows("SIM:x")


def test_group_of_names_the_group_or_none():
    config = parse({"groups": {"motors": {"pvs": ["M:1", "M:2"]}, "slits": {"pvs": ["S:1"]}}})
    assert config.group_of("M:2") == "motors"
    assert config.group_of("S:1") == "slits"
    assert config.group_of("M:3") is None
    assert config.group_of("M:") is None  # whole names, not prefixes
