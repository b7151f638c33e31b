"""Settings come from flags over TORCHWIRE_* env vars over the TOML file over defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchwire.config import load_model_config, load_settings
from torchwire.errors import ConfigError


def test_flags_beat_env_which_beats_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "torchwire.toml"
    config.write_text('port = 6000\nhost = "127.0.0.2"\ngrace_period_s = 3.5\n')
    env = {"TORCHWIRE_PORT": "7000", "TORCHWIRE_INPUT_SHAPE": "3,224,224"}
    settings = load_settings({"config": str(config), "grace_period_s": "1"}, env)
    assert settings.host == "127.0.0.2"  # file
    assert settings.port == 7000  # env over file
    assert settings.grace_period_s == 1.0  # flag over file
    assert settings.input_shape == (3, 224, 224)
    assert load_settings({}, {}).port == 50051


def test_the_config_file_may_come_from_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "t.toml"
    config.write_text("metrics_port = 9100\n")
    assert load_settings({}, {"TORCHWIRE_CONFIG": str(config)}).metrics_port == 9100


def test_a_toml_section_sets_the_prefixed_settings(tmp_path: Path) -> None:
    config = tmp_path / "t.toml"
    config.write_text(
        '[metrics]\nenabled = false\nhost = "127.0.0.1"\n[watchdog]\ninterval_s = 1\n'
    )
    settings = load_settings({"config": str(config)}, {})
    assert settings.metrics_enabled is False and settings.metrics_host == "127.0.0.1"
    assert settings.watchdog_interval_s == 1.0


def test_unknown_keys_and_bad_values_are_named(tmp_path: Path) -> None:
    config = tmp_path / "t.toml"
    config.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="prot: Extra inputs are not permitted"):
        load_settings({"config": str(config)}, {})
    with pytest.raises(ConfigError, match="input_shape: Value error, expected comma-separated"):
        load_settings({"input_shape": "3,two"}, {})


def test_model_config_errors_name_file_key_and_expectation(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[[inputs]]\nname = "x"\ndtype = "FP8"\nshape = [0]\n[instances]\ncount = 0\n')
    with pytest.raises(ConfigError) as caught:
        load_model_config(path)
    message = str(caught.value)
    assert str(path) in message
    assert "inputs.0.dtype: Input should be 'FP32', 'FP64'" in message
    assert "inputs.0.shape: Value error, dimensions must be positive or -1" in message
    assert "instances.count: Input should be greater than or equal to 1" in message
    path.write_text("[[inputs]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_model_config(path)


def test_two_tensors_of_one_name_are_refused(tmp_path: Path) -> None:
    # Each input has its own staging buffer, found by name: two of one name would share it.
    path = tmp_path / "config.toml"
    spec = 'name = "x"\nshape = [2]\n'
    path.write_text(f"[[inputs]]\n{spec}[[inputs]]\n{spec}[[outputs]]\n{spec}")
    with pytest.raises(ConfigError, match="inputs: Value error, tensor names must differ; x is"):
        load_model_config(path)
    path.write_text(f"[[inputs]]\n{spec}[[outputs]]\n{spec}[[outputs]]\n{spec}")
    with pytest.raises(ConfigError, match="outputs: Value error, tensor names must differ"):
        load_model_config(path)


def test_workers_auto_is_one_per_available_core() -> None:
    from torchwire.config import ServerSettings, available_cores

    assert ServerSettings(workers="auto").worker_count() == available_cores() >= 1
    assert load_settings({"workers": "3"}, environ={}).worker_count() == 3
    with pytest.raises(ConfigError, match="workers"):
        load_settings({"workers": "0"}, environ={})


def test_the_native_front_end_gets_one_io_thread_below_eight_cores_unless_told() -> None:
    from torchwire.config import ServerSettings
    from torchwire.server.rpc.native import io_threads

    assert [io_threads(ServerSettings(), cores) for cores in (1, 2, 7, 8, 16)] == [1, 1, 1, 2, 2]
    assert io_threads(ServerSettings(grpc_io_threads=3), 2) == 3


def test_a_message_size_beyond_what_grpc_takes_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="max_message_bytes"):
        load_settings({"max_message_bytes": "3000000000"}, environ={})
