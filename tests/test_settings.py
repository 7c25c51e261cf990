"""Settings: every field from ``SSE_*`` variables and ``.env`` files; bad values name the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
from helpers.paths import ROOT
from helpers.servers import free_port
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fastapi_sse import SettingsError, SSEService, SSESettings, load_settings

SPECIAL = {
    "channel_pattern": "[a-z]+",
    "publish_buffer_size": 5,
    "redis_url": "redis://127.0.0.1:6390/3",
}


def other_value(name: str, field: FieldInfo) -> Any:
    """A valid value different from the field's default."""
    if name in SPECIAL:
        return SPECIAL[name]
    default = field.default
    annotation = field.annotation
    if get_origin(annotation) is Literal:
        return next(option for option in get_args(annotation) if option != default)
    if annotation is bool:
        return not default
    if annotation is int:
        return default + 1
    if annotation is float:
        return default * 2 + 0.5
    if annotation is str:
        return default + "x"
    raise AssertionError(f"add a test value for setting {name!r} ({annotation})")


def leaves(model: type[BaseModel], env_prefix: str = "SSE_") -> list[tuple[str, list[str], Any]]:
    """(environment variable, attribute path, test value) for every setting, nested ones included."""
    out = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for env, path, value in leaves(annotation, f"{env_prefix}{name.upper()}__"):
                out.append((env, [name, *path], value))
        else:
            out.append((env_prefix + name.upper(), [name], other_value(name, field)))
    return out


SETTINGS = leaves(SSESettings)


def read(settings: Any, path: list[str]) -> Any:
    for part in path:
        settings = getattr(settings, part)
    return settings


def test_every_field_is_documented() -> None:
    for name, field in SSESettings.model_fields.items():
        assert field.description, f"setting {name} has no description"


# Every field includes the deprecated publish_buffer_size.
DEPRECATED = "ignore:publish_buffer_size:DeprecationWarning"


@pytest.mark.filterwarnings(DEPRECATED)
def test_every_field_read_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for env, _, value in SETTINGS:
        monkeypatch.setenv(env, str(value))
    settings = load_settings()
    for env, path, value in SETTINGS:
        assert read(settings, path) == value, env


def test_service_reads_environment_when_built_without_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSE_MAX_CONNECTIONS", "7")
    assert SSEService().settings.max_connections == 7


@pytest.mark.filterwarnings(DEPRECATED)
def test_every_field_read_from_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for env, _, _ in SETTINGS:
        monkeypatch.delenv(env, raising=False)
    env_file = tmp_path / "sse.env"
    env_file.write_text("".join(f"{env}={value}\n" for env, _, value in SETTINGS))
    settings = SSESettings(_env_file=env_file)  # type: ignore[call-arg]
    for env, path, value in SETTINGS:
        assert read(settings, path) == value, env
    assert load_settings(_env_file=env_file) == settings


def test_the_outbox_count_bound_is_deprecated_for_its_byte_bound() -> None:
    with pytest.warns(DeprecationWarning, match="publish_buffer_bytes"):
        settings = SSESettings(publish_buffer_size=100)
    assert settings.publish_buffer_size == 100
    assert SSESettings().publish_buffer_size is None
    assert SSESettings().publish_buffer_bytes == 64 * 2**20


def test_keyword_arguments_win_and_settings_are_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSE_RETRY_INTERVAL", "9")
    settings = SSESettings(retry_interval=1.25)
    assert settings.retry_interval == 1.25
    assert SSESettings().retry_interval == 9
    with pytest.raises(ValueError):
        settings.retry_interval = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "value", "message"),
    [
        ("SSE_HEARTBEAT_INTERVAL", "-1", "greater than 0"),
        ("SSE_HEARTBEAT_INTERVAL", "soon", "valid number"),
        ("SSE_OVERFLOW_POLICY", "ignore", "disconnect"),
        ("SSE_IDENTITY_LIMIT_POLICY", "maybe", "refuse"),
        ("SSE_MAX_BUFFER_BYTES", "10", "1024"),
        ("SSE_HISTORY_SIZE", "-5", "greater than or equal to 0"),
        ("SSE_CHANNEL_PATTERN", "[unclosed", "not a valid regular expression"),
        ("SSE_BACKEND", "postgres", "memory"),
    ],
)
def test_invalid_environment_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, message: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    text = str(info.value)
    assert env in text
    assert message in text
    assert repr(value) in text
    assert isinstance(info.value, ValueError)


def test_app_fails_to_start_with_the_settings_message() -> None:
    env = {**__import__("os").environ, "SSE_HEARTBEAT_INTERVAL": "-1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.helpers.process_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode != 0
    output = (result.stdout + result.stderr).decode()
    assert "SSE_HEARTBEAT_INTERVAL" in output
    assert "invalid SSE settings" in output
