"""Deployment files: docker-compose.yml, Dockerfile, .dockerignore, docker/install.sh, and the
README's configuration table. No Docker engine needed: the compose file is parsed (PyYAML) and
validated by ``docker-compose config``; the image's build steps run in a throwaway venv."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.local.infra import KAFKA_VERSION
from service.local.settings_doc import MEANINGS, env_name, markdown_table
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
CTP_SERVICES = ("topics", "ingest", "trainer", "api", "producer")
SECRETISH = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.I)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")),
    )
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in _dockerfile():
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return env


# ------------------------------------------------------------------------------------ compose


def test_compose_services_and_images(services):
    assert set(services) == {"kafka", "redis", "topics", "ingest", "trainer", "api", "producer"}
    assert services["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"  # same broker as `ctp up`
    assert services["redis"]["image"] == "redis:7"
    for name in CTP_SERVICES:  # one image for every role, built from this repository
        assert services[name]["image"] == "ctp:latest", name
        assert services[name]["build"]["context"] == "."
    assert services["ingest"]["command"] == ["ingest"]
    assert services["trainer"]["command"] == ["train"]
    assert services["api"]["command"] == ["serve"]
    producer = services["producer"]
    assert producer["profiles"] == ["demo"]
    assert producer["command"][:3] == ["produce", "--synthetic", "class-incremental-small"]
    assert "--rate" in producer["command"]
    assert "profiles" not in services["ingest"]  # the pipeline itself comes up without a profile


def test_every_ctp_variable_is_a_setting(services):
    fields = {env_name(f) for f in Settings.model_fields}
    used = {k for s in services.values() for k in (s.get("environment") or {}) if k.startswith("CTP_")}
    used |= {k for k in _dockerfile_env() if k.startswith("CTP_")}
    assert used, "no CTP_ variables found"
    assert used <= fields, f"not Settings fields: {sorted(used - fields)}"
    # every ctp role talks to the compose servers, not the localhost defaults
    for name in CTP_SERVICES:
        env = services[name]["environment"]
        assert env["CTP_KAFKA_BOOTSTRAP"] == "kafka:19092", name
        assert env["CTP_REDIS_URL"] == "redis://redis:6379/0", name
        assert env["CTP_DATA_DIR"] == "/data", name
    # values a container gets are valid settings
    env = {k[4:].lower(): v for k, v in services["trainer"]["environment"].items() if k.startswith("CTP_")}
    assert Settings(**env).device == "cuda"


def test_no_secret_values_in_compose(services):
    for name, s in services.items():
        for key, value in (s.get("environment") or {}).items():
            if SECRETISH.search(key):
                assert value is None, f"{name}: {key} must be passed through from the shell, not written"
    assert "CTP_API_KEY" in services["api"]["environment"]


def test_volumes_declared_and_mounted(compose, services):
    declared = set(compose["volumes"])
    assert {"kafka-data", "redis-data", "ctp-data"} <= declared
    mounts = {
        name: {v.split(":")[0]: v.split(":")[1] for v in s.get("volumes", [])} for name, s in services.items()
    }
    for name, m in mounts.items():
        for source in m:
            assert source in declared, f"{name} mounts undeclared volume {source}"
    assert mounts["kafka"]["kafka-data"] == services["kafka"]["environment"]["KAFKA_LOG_DIRS"]
    assert mounts["redis"]["redis-data"] == "/data"
    for name in ("ingest", "trainer", "api", "producer"):  # chunks and checkpoints shared
        assert mounts[name]["ctp-data"] == services[name]["environment"]["CTP_DATA_DIR"], name


def test_trainer_reserves_a_gpu(services):
    trainer = services["trainer"]
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert trainer["environment"]["CTP_DEVICE"] == "cuda"
    assert trainer["environment"]["CTP_TRAINER_NAME"]  # stable consumer name across re-creation


def test_healthchecks_and_start_order(services):
    for name in ("kafka", "redis", "api"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    assert "kafka-broker-api-versions.sh" in services["kafka"]["healthcheck"]["test"][1]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]

    def deps(name):
        return {k: v["condition"] for k, v in services[name]["depends_on"].items()}

    assert deps("topics") == {"kafka": "service_healthy"}
    assert deps("ingest") == {
        "kafka": "service_healthy",
        "redis": "service_healthy",
        "topics": "service_completed_successfully",
    }
    assert deps("trainer")["redis"] == "service_healthy"
    assert deps("api")["redis"] == "service_healthy"
    assert deps("producer")["topics"] == "service_completed_successfully"
    # the topics job creates exactly what the settings name, with ctp's own helper
    script = services["topics"]["command"][0]
    assert "ensure_topics" in script and "s.topic" in script and "s.dlq_topic" in script
    assert services["topics"]["restart"] == "no"


def test_api_port_published(services):
    api = services["api"]
    port = int(api["environment"]["CTP_API_PORT"])
    assert api["environment"]["CTP_API_HOST"] == "0.0.0.0"
    published = [p.split(":")[-2:] for p in api["ports"]]
    assert [str(port), str(port)] in published  # host port : container port


def test_kafka_single_node_kraft(services):
    env = services["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert env["CLUSTER_ID"]
    factors = {
        k: v for k, v in env.items() if k.endswith(("REPLICATION_FACTOR", "MIN_ISR", "MIN_INSYNC_REPLICAS"))
    }
    assert len(factors) >= 6 and set(factors.values()) == {"1"}, factors
    for k in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_DEFAULT_REPLICATION_FACTOR",
    ):
        assert env[k] == "1", k
    # an internal listener for the containers, a host listener for producers outside Docker
    listeners = dict(x.split("://") for x in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert listeners["INTERNAL"] == services["ingest"]["environment"]["CTP_KAFKA_BOOTSTRAP"]
    assert listeners["HOST"].endswith(":9092") and "9092:9092" in services["kafka"]["ports"]
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] == "INTERNAL"
    # the broker accepts every message ingest would accept
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= Settings.model_fields["max_message_bytes"].default


def test_redis_appendonly(services):
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"


def _compose_cli() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    return None


def test_docker_compose_config_validates():
    cli = _compose_cli()
    # like Kafka and Redis for the service tests: `make test` installs it (.ci/install-servers --test-tools)
    assert cli is not None, (
        "docker-compose is not installed; run `bash .ci/install-servers --test-tools` (make test does)"
    )
    env = {**os.environ, "KAFKA_HOST_ADDRESS": "gpu-host.example", "DEMO_RATE": "7"}
    env.pop("CTP_API_KEY", None)
    out = subprocess.run(
        [*cli, "-f", str(COMPOSE), "--profile", "demo", "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)["services"]
    assert set(resolved) >= {"kafka", "redis", "topics", "ingest", "trainer", "api", "producer"}
    assert "HOST://gpu-host.example:9092" in resolved["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert "7" in [str(a) for a in resolved["producer"]["command"]]
    assert resolved["trainer"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


# ------------------------------------------------------------------------------------ Dockerfile


def test_dockerfile():
    instructions = _dockerfile()
    words = [w for w, _ in instructions]
    assert words[0] == "FROM" and words.count("FROM") == 1
    user = [rest for w, rest in instructions if w == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert words.index("USER") > max(
        i for i, w in enumerate(words) if w == "RUN"
    )  # nothing runs as root after
    health = [rest for w, rest in instructions if w == "HEALTHCHECK"]
    assert len(health) == 1 and "CMD" in health[0] and "ctp-healthcheck" in health[0]
    assert [rest for w, rest in instructions if w == "ENTRYPOINT"] == ['["ctp"]']
    runs = [rest for w, rest in instructions if w == "RUN"]
    assert all("docker/install.sh" in r for r in runs), runs  # every build step lives in the script
    steps = " ".join(runs)
    for step in ("deps", "package", "check", "user"):
        assert re.search(rf"install\.sh\b.*\b{step}\b", steps), step
    # deps are installed from pyproject.toml alone, before the source is copied
    copies = [(i, rest) for i, (w, rest) in enumerate(instructions) if w == "COPY"]
    deps_run = next(i for i, (w, rest) in enumerate(instructions) if w == "RUN" and " deps" in rest)
    source_copy = next(i for i, rest in copies if rest.split()[0] == ".")
    assert deps_run < source_copy
    assert all(
        rest.split()[0] in ("pyproject.toml", "docker/install.sh") for i, rest in copies if i < deps_run
    )
    for key in _dockerfile_env():
        assert not SECRETISH.search(key), f"secret-looking ENV {key} in the image"
    assert not [rest for w, rest in instructions if w == "ARG" and SECRETISH.search(rest)]
    script = (ROOT / "docker/install.sh").read_text()
    assert "--no-cache-dir" in script


def test_dockerignore_lets_in_only_the_build_inputs():
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*"  # an allow-list: .venv, runs, data, .git and any .env stay out
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "ctp", "service", "docker"}


def _healthcheck_module():
    spec = importlib.util.spec_from_file_location("ctp_healthcheck", ROOT / "docker/healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_healthcheck_finds_the_role(tmp_path):
    hc = _healthcheck_module()
    assert hc.role_of(["/usr/local/bin/python", "/usr/local/bin/ctp", "serve"]) == "serve"
    assert hc.role_of(["python", "-m", "service.cli", "train"]) == "train"
    assert (
        hc.role_of(
            [
                "/usr/local/bin/python",
                "/usr/local/bin/torchrun",
                "--nproc_per_node",
                "4",
                "-m",
                "service.cli",
                "train",
            ]
        )
        == "train"
    )
    assert hc.role_of(["python", "-c", "print()"]) is None
    for pid, argv in {"1": [b"/sbin/docker-init", b"--", b"ctp", b"ingest"], "7": [b"sleep", b"1"]}.items():
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "cmdline").write_bytes(b"\0".join(argv) + b"\0")
    assert hc.running_role(tmp_path) == "ingest"
    assert hc.probe(None) == "no ctp process is running"
    assert hc.probe("produce") is None


@pytest.mark.slow
def test_build_steps_run_outside_docker(tmp_path):
    """docker/install.sh's real steps, in a throwaway venv: requirements from pyproject.toml, the
    package installed (not editable, --no-deps: the dependencies come from this environment through
    a .pth), then the same import/CLI/package-data checks the image build runs."""
    src = tmp_path / "src"  # what .dockerignore lets into the build context
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("ctp", "service", "docker"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    py = venv / "bin" / "python"
    purelib = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # this environment's packages (pip, torch, ...) visible after the venv's own
    (Path(purelib) / "_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    steps = ["deps", "--print", "package", "--no-deps", "check"]
    import torch

    if torch.version.cuda:
        steps.append("--cuda")
    env = {**os.environ, "PYTHON": str(py), "SRC": str(src)}
    out = subprocess.run(
        ["bash", str(src / "docker/install.sh"), *steps],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "check: ok" in out.stdout
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = project["dependencies"] + project["optional-dependencies"]["service"]
    assert [ln for ln in out.stdout.splitlines() if ln in expected] == expected  # deps --print
    assert (venv / "bin" / "ctp").exists() and (venv / "bin" / "ctp-healthcheck").exists()
    assert list(Path(purelib).glob("ctp-*.dist-info"))
    assert not (src / "build").exists()


def test_build_steps_usage():
    out = subprocess.run(
        ["bash", str(ROOT / "docker/install.sh"), "nonsense"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "unknown step" in out.stderr


# ------------------------------------------------------------------------------------ README


def _readme_table() -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- settings-table:start -->")
    end = text.index("<!-- settings-table:end -->")
    return [ln for ln in text[start:end].splitlines() if ln.startswith("|")]


def test_readme_configuration_table_lists_exactly_the_settings():
    rows = _readme_table()
    names = [re.match(r"\| `(CTP_\w+)` \|", r).group(1) for r in rows[2:]]
    assert sorted(names) == sorted(env_name(f) for f in Settings.model_fields)
    assert len(names) == len(set(names))
    assert set(MEANINGS) == set(Settings.model_fields)
    # generated, not hand-edited: `python -m service.local.settings_doc` prints it
    assert "\n".join(rows) + "\n" == markdown_table()


def test_readme_links_the_docs():
    text = (ROOT / "README.md").read_text()
    for doc in ("docs/architecture.md", "docs/operations.md", "docs/method.md"):
        assert f"]({doc})" in text, doc
        assert (ROOT / doc).exists(), doc
    assert "make demo" in text and "make test" in text
