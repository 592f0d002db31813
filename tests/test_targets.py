import pytest

from edgeft.errors import TargetError, UsageError
from edgeft.schemes import parse_scheme
from edgeft.targets import list_targets, load_target

REQUIRED = {"raspberry-pi-4-4gb", "raspberry-pi-5-8gb", "raspberry-pi-zero-2w", "jetson-orin-nano-8gb", "jetson-agx-orin-64gb", "x86-64-cpu"}
GOOD = """
name = "mine"
arch = "aarch64"
[memory]
ram_mb = 1024
budget_mb = 512
[compute]
threads = 2
execution_providers = ["CPUExecutionProvider"]
[quantization]
scheme = "int4-g32"
[training]
max_seq_len = 64
batch_size = 2
"""


def test_builtin_profiles_load_and_cover_the_devices():
    profiles = {t.name: t for t in list_targets()}
    assert REQUIRED <= set(profiles)
    assert profiles["raspberry-pi-zero-2w"].ram_mb == 512
    assert {t.scheme.kind for t in profiles.values()} == {"int", "nf4"}
    assert {t.scheme.bits for t in profiles.values()} == {8, 4, 3}
    for t in profiles.values():
        assert t.budget_mb <= t.ram_mb


def test_user_profile_by_path(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text(GOOD)
    t = load_target(p)
    assert (t.name, t.scheme.name, t.batch_size) == ("mine", "int4-g32", 2)


@pytest.mark.parametrize(
    "edit, field",
    [
        (("batch_size = 2", "batch_size = 0"), "training.batch_size"),
        (("batch_size = 2", 'batch_size = "two"'), "training.batch_size"),
        (('scheme = "int4-g32"', 'scheme = "int9"'), "quantization.scheme"),
        (("budget_mb = 512", "budget_mb = 4096"), "memory.budget_mb"),
        (('arch = "aarch64"', 'arch = "sparc"'), "arch"),
        (("threads = 2\n", ""), "compute.threads"),
        (('["CPUExecutionProvider"]', '["QuantumEP"]'), "compute.execution_providers"),
    ],
)
def test_invalid_profile_names_the_field(tmp_path, edit, field):
    p = tmp_path / "bad.toml"
    p.write_text(GOOD.replace(*edit))
    with pytest.raises(TargetError, match=field.replace(".", r"\.")):
        load_target(p)


def test_unknown_target_lists_known_ones():
    with pytest.raises(TargetError, match="raspberry-pi-5-8gb"):
        load_target("toaster")


def test_broken_toml(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text("name = ")
    with pytest.raises(TargetError, match="not valid TOML"):
        load_target(p)


@pytest.mark.parametrize("text, name, bits, group, sym", [
    ("nf4", "nf4", 4, 64, True), ("int8", "int8", 8, 0, True), ("INT4-g128", "int4-g128", 4, 128, True),
    ("int3-g32", "int3-g32", 3, 32, False), ("int2-g16", "int2-g16", 2, 16, False), ("int4-g32-asym", "int4-g32-asym", 4, 32, False),
])
def test_parse_scheme(text, name, bits, group, sym):
    s = parse_scheme(text)
    assert (s.name, s.bits, s.group_size, s.symmetric) == (name, bits, group, sym)
    assert parse_scheme(s.name) == s


@pytest.mark.parametrize("text", ["int1", "int4-g30", "fp8", "int4-g4", ""])
def test_bad_scheme(text):
    with pytest.raises(UsageError):
        parse_scheme(text)


def test_int4_bytes_per_param_is_device_sized():
    assert parse_scheme("int4-g128").bytes_per_param <= 0.6
    assert parse_scheme("int8").bytes_per_param == 1.0
