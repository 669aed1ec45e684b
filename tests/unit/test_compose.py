"""docker-compose.yml, the Dockerfile and the files they mount stay consistent with the settings.

There is no Docker engine here, so this reads the files: the compose file must be valid against the
Compose specification's JSON Schema (``tests/compose/``), every GATEWAY_* name must be a real setting
whose value validates, every host named in a URL or a command must be a service of the file, and the
ports must line up from the settings to the Dockerfile, compose and HAProxy.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from gateway.config import Settings, load_settings, split_host_port

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
ENV_EXAMPLE = REPO / ".env.example"
SCHEMA = REPO / "tests" / "compose" / "compose-spec.json"
GATEWAYS = ("gateway", "gateway-a", "gateway-b")
_INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's variable substitution as it happens with none of the variables set."""

    def replace(match: re.Match[str]) -> str:
        if match.group() == "$$":
            return "$"
        default = match.group("default")
        assert default is not None, f"{match.group()} has no default: the file needs a variable set"
        return default

    return _INTERPOLATION.sub(replace, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): interpolate(str(v)) for k, v in env.items()}


def gateway_env(service: Mapping[str, Any]) -> dict[str, str]:
    return {k: v for k, v in environment(service).items() if k.startswith("GATEWAY_")}


def settings_of(service: Mapping[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings the service's container would get: the image's ENV, then the service's."""
    for name in list(os.environ):
        if name.upper().startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    for name, value in {**dockerfile_env(), **gateway_env(service)}.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def setting_variables(model: type[BaseModel] = Settings, prefix: str = "GATEWAY_") -> Iterator[str]:
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from setting_variables(annotation, f"{prefix}{name.upper()}__")
        else:
            yield f"{prefix}{name.upper()}"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for parts in (line.split(None, 1) for line in lines if line and not line.startswith("#"))
    ]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, rest in dockerfile_instructions():
        if instruction == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def published(service: Mapping[str, Any]) -> dict[int, int]:
    """container port -> host port, with the defaults of the file's variables."""
    ports = {}
    for entry in service.get("ports", []):
        host, _, container = interpolate(str(entry)).rpartition(":")
        ports[int(container.split("/")[0])] = int(host.rpartition(":")[2])
    return ports


def interpolated(value: Any) -> Any:
    """The file as compose reads it with no variable set: every string's ``${...}`` replaced."""
    if isinstance(value, dict):
        return {key: interpolated(item) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolated(item) for item in value]
    return interpolate(value) if isinstance(value, str) else value


def env_example() -> dict[str, str]:
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_the_file_is_valid_against_the_compose_specification(compose: dict[str, Any]) -> None:
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text(encoding="utf-8")))
    for form, data in (("as written", compose), ("with the variables' defaults", interpolated(compose))):
        problems = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)]
        assert not problems, f"docker-compose.yml {form}:\n" + "\n".join(problems)


def test_the_schema_check_would_catch_a_mistake(compose: dict[str, Any]) -> None:
    """The validation above can fail: a misspelt key and a wrong type are refused."""
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text(encoding="utf-8")))
    broken = json.loads(json.dumps(compose))
    broken["services"]["gateway"]["restart_policy"] = "on-failure"
    broken["services"]["mosquitto"]["ports"] = "1883:1883"
    assert len(list(validator.iter_errors(broken))) == 2


def test_every_gateway_name_in_the_container_files_is_a_setting() -> None:
    known = set(setting_variables())
    for path in (COMPOSE, ENV_EXAMPLE, DOCKERFILE):
        names = set(re.findall(r"\bGATEWAY_[A-Z0-9_]*[A-Z0-9]", path.read_text(encoding="utf-8")))
        assert names, path.name
        assert names <= known, f"{path.name} names no setting: {sorted(names - known)}"


def test_the_default_profile_runs_the_gateway_mosquitto_and_the_emulator(services: dict[str, dict[str, Any]]) -> None:
    assert {name for name, service in services.items() if "profiles" not in service} == {
        "gateway",
        "mosquitto",
        "emulator",
    }
    assert set(services["postgres"]["profiles"]) == {"postgres", "scale"}  # not started for the SQLite gateway
    for name in ("gateway-a", "gateway-b", "haproxy"):
        assert services[name]["profiles"] == ["scale"], name


@pytest.mark.parametrize("name", GATEWAYS)
def test_a_gateway_that_cannot_start_is_not_restarted_forever(services: dict[str, dict[str, Any]], name: str) -> None:
    """Exit code 2 (a setting is wrong) never heals; Docker cannot exclude an exit code from a
    restart policy, so the policy must be bounded (or none)."""
    restart = str(services[name].get("restart", "no"))
    match = re.fullmatch(r"on-failure:(\d+)", restart)
    assert restart == "no" or (match is not None and 1 <= int(match.group(1)) <= 5), restart


def test_published_ports_listen_on_loopback_and_each_can_be_moved_in_an_env_file(
    services: dict[str, dict[str, Any]],
) -> None:
    example = env_example()
    host_ports = []
    for name, service in services.items():
        for entry in service.get("ports", []):
            match = re.fullmatch(r"\$\{ISO_BIND:-127\.0\.0\.1\}:\$\{(ISO_\w+_PORT):-(\d+)\}:(\d+)", str(entry))
            assert match is not None, f"{name}: {entry} (bind to ${{ISO_BIND:-127.0.0.1}}, port from an ISO_*_PORT)"
            variable, default, _ = match.groups()
            assert example[variable] == default, f".env.example does not document {variable}={default}"
            host_ports.append(int(default))
    assert example["ISO_BIND"] == "127.0.0.1"
    assert len(host_ports) == len(set(host_ports))  # no two services fight over a host port
    assert 1883 not in host_ports  # a Mosquitto of the host usually has it
    used = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text(encoding="utf-8")))
    assert used == set(example), "every variable of the file is in .env.example, and only those"


def test_the_data_volume_belongs_to_the_images_user(services: dict[str, dict[str, Any]]) -> None:
    instructions = dockerfile_instructions()
    (user,) = [rest for instruction, rest in instructions if instruction == "USER"]
    assert re.fullmatch(r"\d+:\d+", user) and not user.startswith("0:"), "a numeric user that is not root"
    assert ("VOLUME", '["/data"]') in instructions
    runs = " ".join(rest for instruction, rest in instructions if instruction == "RUN")
    assert f"chown {user} /data" in runs
    for name in GATEWAYS:
        mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in services[name].get("volumes", [])}
        if "/data" in mounts:  # a named volume starts as the image's /data, owned by its user
            assert not mounts["/data"].startswith((".", "/")), f"{name} bind-mounts /data"


def test_the_emulator_keeps_its_journal_where_the_images_user_may_write(services: dict[str, dict[str, Any]]) -> None:
    emulator = services["emulator"]
    assert environment(emulator)["XDG_STATE_HOME"].startswith("/tmp/")
    assert "--journal" not in emulator["command"]
    assert emulator["restart"] == "no"  # plays its scenario once


def test_the_file_has_the_services_and_profiles_of_the_design(services: dict[str, dict[str, Any]]) -> None:
    assert {"gateway", "mosquitto", "postgres", "emulator", "gateway-a", "gateway-b", "haproxy"} <= set(services)
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    assert services["postgres"]["image"] == "postgres:16"
    for name in GATEWAYS:
        assert services[name]["build"] == ".", name
    assert services["emulator"]["image"] == services["gateway"]["image"]


@pytest.mark.parametrize("name", GATEWAYS)
def test_every_gateway_variable_is_a_real_setting(services: dict[str, dict[str, Any]], name: str) -> None:
    known = set(setting_variables())
    unknown = set(gateway_env(services[name])) - known
    assert not unknown, f"{name} sets variables that are no settings: {sorted(unknown)}"
    assert set(dockerfile_env()) - {"PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK"} <= known


@pytest.mark.parametrize("name", GATEWAYS)
def test_every_gateway_value_validates_and_names_services_of_the_file(
    services: dict[str, dict[str, Any]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_of(services[name], monkeypatch)
    mqtt = urlsplit(settings.mqtt_url)
    assert mqtt.scheme == "mqtt"
    assert mqtt.hostname in services
    assert mqtt.hostname in services[name]["depends_on"]
    ledger = urlsplit(settings.ledger_url)
    if ledger.scheme.startswith("postgres"):
        assert ledger.hostname in services
        assert ledger.hostname in services[name]["depends_on"]
        postgres_env = environment(services[ledger.hostname])
        assert ledger.path.lstrip("/") == postgres_env["POSTGRES_DB"]
        assert ledger.password is None  # trust authentication, no password in the file
        assert postgres_env["POSTGRES_HOST_AUTH_METHOD"] == "trust"
    else:
        path = settings.sqlite_path()
        assert path is not None
        assert path.is_absolute()
        mounts = [str(v).split(":")[1] for v in services[name].get("volumes", [])]
        assert any(path.is_relative_to(mount) for mount in mounts), f"{path} is not on a volume"
    host, _ = split_host_port(settings.listen, 0)
    assert host == "0.0.0.0"  # reachable from other containers


def test_instances_have_their_own_ids_and_share_the_hmac_key(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = [settings_of(services[name], monkeypatch) for name in GATEWAYS]
    assert len({s.instance_id for s in settings}) == len(GATEWAYS)
    assert len({s.pan_hmac_key.get_secret_value() for s in settings}) == 1
    scale = settings[1:]
    assert len({s.ledger_url for s in scale}) == 1  # the scale pair shares one ledger
    assert scale[0].ledger_url.startswith("postgresql://")


def test_the_listen_port_is_exposed_by_the_image_and_published(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_of(services["gateway"], monkeypatch)
    _, port = split_host_port(settings.listen, 0)
    exposed = [int(rest.split("/")[0]) for instruction, rest in dockerfile_instructions() if instruction == "EXPOSE"]
    assert exposed == [port]
    assert published(services["gateway"])[port] == port
    _, image_port = split_host_port(dockerfile_env()["GATEWAY_LISTEN"], 0)
    assert image_port == port
    assert str(port) in " ".join(services["gateway"]["healthcheck"]["test"])
    assert settings.metrics_listen is not None
    _, metrics_port = split_host_port(settings.metrics_listen, 0)
    assert metrics_port in published(services["gateway"])


def test_the_dockerfile_runs_the_gateway_from_the_python_311_slim_image() -> None:
    instructions = dockerfile_instructions()
    assert ("FROM", "python:3.11-slim") in instructions
    assert ("ENTRYPOINT", '["iso-gateway"]') in instructions
    assert ("CMD", '["serve"]') in instructions
    for instruction, rest in instructions:
        if instruction == "COPY":
            *sources, _ = rest.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    copied = {part for instruction, rest in instructions if instruction == "COPY" for part in rest.split()[:-1]}
    assert {"specs", "gateway", "terminal_emulator", "pyproject.toml"} <= copied


def test_the_broker_config_lets_the_gateways_in(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["mosquitto"]["volumes"]}
    config = REPO / mounts["/mosquitto/config/mosquitto.conf"]
    text = config.read_text(encoding="utf-8")
    port = urlsplit(settings_of(services["gateway"], monkeypatch).mqtt_url).port
    assert re.search(rf"^listener {port}\b", text, re.MULTILINE)
    assert re.search(r"^allow_anonymous true$", text, re.MULTILINE)
    assert "$SYS" in " ".join(interpolate(part) for part in services["mosquitto"]["healthcheck"]["test"])


def test_haproxy_balances_the_scale_gateways_on_their_listen_port(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["haproxy"]["volumes"]}
    config = (REPO / mounts["/usr/local/etc/haproxy/haproxy.cfg"]).read_text(encoding="utf-8")
    assert re.search(r"^\s*mode tcp$", config, re.MULTILINE)
    bind = re.search(r"^\s*bind :(\d+)$", config, re.MULTILINE)
    assert bind is not None
    assert int(bind.group(1)) in published(services["haproxy"])
    targets = re.findall(r"^\s*server (\S+) (\S+):(\d+)", config, re.MULTILINE)
    assert {host for _, host, _ in targets} == {"gateway-a", "gateway-b"}
    for _, host, port in targets:
        _, listen_port = split_host_port(settings_of(services[host], monkeypatch).listen, 0)
        assert int(port) == listen_port
    assert set(services["haproxy"]["depends_on"]) == {"gateway-a", "gateway-b"}
    # the single gateway and HAProxy can run together without fighting over a host port
    assert not set(published(services["haproxy"]).values()) & set(published(services["gateway"]).values())


def test_the_emulator_plays_a_shipped_scenario_against_a_service(services: dict[str, dict[str, Any]]) -> None:
    emulator = services["emulator"]
    assert emulator["entrypoint"] == ["iso-terminal"]
    command = emulator["command"]
    host = command[command.index("--host") + 1]
    assert host in services
    assert host in emulator["depends_on"]
    scenario = command[command.index("scenario") + 1]
    assert (REPO / "terminal_emulator" / "scenarios" / f"{scenario}.yaml").is_file()


def test_dependencies_and_named_volumes_exist(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("."):
                assert (REPO / source).is_file(), f"{name} mounts missing {source}"
            else:
                assert source in declared_volumes, f"{name} uses undeclared volume {source}"


def test_the_readme_says_what_the_compose_stack_needs() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    docker = readme.split("\n## Docker\n", 1)[1].split("\n## ", 1)[0]
    assert "Compose v2" in docker and "docker compose up --build" in docker
    for variable, default in env_example().items():
        if variable.endswith("_PORT"):
            assert default in docker, f"the README does not name the host port {default} ({variable})"
    needed = (".env.example", "ISO_BIND", "GATEWAY_PAN_HMAC_KEY", "10001", "--profile postgres", "--profile scale")
    for word in needed:
        assert word in docker, word
