"""Checks of the deployment files in deploy/, without a cluster or a systemd to run them.

- Every Kubernetes manifest validates, in strict mode (unknown fields fail), against the
  OpenAPI schemas of one Kubernetes version that `kubernetes-validate` bundles (offline).
- The manifests fit together: Service and Deployment labels, RBAC and service account,
  the agents' labels and port against the control plane's discovery flags, the Secrets.
- The systemd units pass `systemd-analyze verify`, and the control plane's is sandboxed.
- Every flag and environment variable the files give `wrenn` is one that
  `wrenn serve --help` / `wrenn agent --help` lists.

Run: .venv/bin/python -m pytest tests/deploy
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

try:
    import kubernetes_validate
    from kubernetes_validate.utils import (
        SchemaNotFoundError,
        ValidationError,
        all_versions,
    )
except ImportError as e:  # a missing validator must fail, not skip: the checks would be vacuous
    raise ImportError(
        "kubernetes-validate is missing: .venv/bin/pip install -r tests/requirements.txt"
    ) from e

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S_DIR = DEPLOY / "kubernetes"
SYSTEMD_DIR = DEPLOY / "systemd"
# The Kubernetes version whose schemas the manifests must satisfy (bundled by the pinned
# kubernetes-validate, see tests/requirements.txt; it never downloads schemas).
K8S_VERSION = "1.37.0"
KUSTOMIZATION = "kustomization.yaml"
SECRETS_EXAMPLE = "secrets.example.yaml"
# Where the units expect the binary; the tests use the build's instead when it is absent.
INSTALLED_WRENN = "/usr/local/bin/wrenn"
WRENN = Path(os.environ.get("WRENN_BIN", REPO / "target" / "debug" / "wrenn"))
SUBCOMMANDS = ("serve", "agent")


# --- loading -------------------------------------------------------------------------


def load_yaml_docs(path: Path) -> list[dict]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def k8s_files() -> list[Path]:
    return sorted(K8S_DIR.glob("*.yaml"))


def manifests(include_example: bool = False) -> list[dict]:
    """Every object of the manifests the kustomization applies (and the example Secrets)."""
    docs = []
    for path in k8s_files():
        if path.name == KUSTOMIZATION or (path.name == SECRETS_EXAMPLE and not include_example):
            continue
        docs.extend(load_yaml_docs(path))
    return docs


def one(kind: str, name: str | None = None, include_example: bool = False) -> dict:
    found = [
        d
        for d in manifests(include_example)
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def deployment() -> dict:
    return one("Deployment", "wrenn-control-plane")


def daemonset() -> dict:
    return one("DaemonSet", "wrenn-agent")


def container(workload: dict) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']}: expected one container"
    return containers[0]


def command_line(c: dict) -> list[str]:
    return list(c.get("command", [])) + list(c.get("args", []))


def flag_value(argv: list[str], flag: str) -> str:
    """The value of `--flag VALUE` or `--flag=VALUE` in argv."""
    for i, arg in enumerate(argv):
        if arg == flag:
            assert i + 1 < len(argv), f"{flag} has no value in {argv}"
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} is not in {argv}")


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file or drop-in: section -> [(key, value)] in order (keys repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {line!r}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def unit_values(unit: dict, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def unit_value(unit: dict, section: str, key: str) -> str:
    values = unit_values(unit, section, key)
    assert values, f"[{section}] {key}= is not set"
    return values[-1]


def exec_starts(path: Path) -> list[list[str]]:
    """The (non-empty) ExecStart= command lines of a unit or drop-in, split into words."""
    return [
        shlex.split(v.lstrip("-@+!:"))
        for v in unit_values(parse_unit(path), "Service", "ExecStart")
        if v
    ]


def unit_files() -> list[Path]:
    return sorted(SYSTEMD_DIR.glob("*.service")) + sorted(SYSTEMD_DIR.glob("*.conf"))


ENV_ASSIGNMENT = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=")


def env_file_names(path: Path) -> set[str]:
    """The variables an env example sets or shows (commented `#NAME=value` lines too)."""
    return {m.group(1) for line in path.read_text().splitlines() if (m := ENV_ASSIGNMENT.match(line))}


def subcommand_of(argv: list[str]) -> str:
    assert argv and Path(argv[0]).name == "wrenn", f"not a wrenn command: {argv}"
    for word in argv[1:]:
        if word in SUBCOMMANDS:
            return word
    raise AssertionError(f"no subcommand among {SUBCOMMANDS} in {argv}")


def flags_of(argv: list[str]) -> set[str]:
    return {w.split("=", 1)[0] for w in argv if w.startswith("--")}


# --- Kubernetes: schema validation -----------------------------------------------------


def test_the_pinned_validator_bundles_the_kubernetes_version():
    # validate() silently falls back to the newest bundled version not newer than the one
    # asked for: make sure the one we name is really there.
    assert K8S_VERSION in all_versions(), (
        f"kubernetes-validate {kubernetes_validate.__version__} bundles {all_versions()}, "
        f"not {K8S_VERSION}"
    )


# kustomization.yaml is no Kubernetes object (no schema): test_kustomization_* checks it.
@pytest.mark.parametrize(
    "path", [p for p in k8s_files() if p.name != KUSTOMIZATION], ids=lambda p: p.name
)
def test_manifest_validates_strictly(path: Path):
    docs = load_yaml_docs(path)
    assert docs, f"{path.name} has no YAML document"
    for doc in docs:
        what = f"{path.name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            checked = kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except ValidationError as e:
            at = ".".join(str(p) for p in e.path)
            pytest.fail(f"{what} does not validate against {K8S_VERSION} at {at}: {e.message}")
        except SchemaNotFoundError as e:
            pytest.fail(f"{what}: {e.message}")
        assert checked == "1.37", f"{what} was checked against {checked}, not {K8S_VERSION}"


def _rejected(doc: dict, strict: bool = True) -> str | None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=strict)
    except ValidationError as e:
        return e.message
    return None


def test_validator_rejects_broken_manifests():
    """The validation above could pass vacuously: show that it fails broken manifests."""
    good = daemonset()
    assert _rejected(good) is None

    misspelled = copy.deepcopy(good)
    pod = misspelled["spec"]["template"]["spec"]
    pod["hostNetwrok"] = pod.pop("hostNetwork")
    message = _rejected(misspelled)
    assert message and "hostNetwrok" in message, message
    # Without strict mode the typo passes (and the agent would run without the host's
    # network): that is why the manifests are checked strictly.
    assert _rejected(misspelled, strict=False) is None

    nested = copy.deepcopy(good)
    nested["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privilegd"] = True
    assert _rejected(nested), "a misspelled field deep in a container passed"

    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "300"
    assert _rejected(wrong_type), "a string where an integer belongs passed"

    missing = copy.deepcopy(deployment())
    del missing["spec"]["template"]["spec"]["containers"][0]["name"]
    assert _rejected(missing), "a container without its required name passed"


# --- Kubernetes: the files fit together --------------------------------------------------


def test_kustomization_lists_exactly_the_manifests():
    kust = load_yaml_docs(K8S_DIR / KUSTOMIZATION)
    assert len(kust) == 1
    kust = kust[0]
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kust["kind"] == "Kustomization"
    assert set(kust) <= {"apiVersion", "kind", "resources", "namespace", "labels"}, set(kust)
    resources = kust["resources"]
    assert len(resources) == len(set(resources)), f"listed twice: {resources}"
    expected = {p.name for p in k8s_files()} - {KUSTOMIZATION, SECRETS_EXAMPLE}
    assert set(resources) == expected
    assert SECRETS_EXAMPLE not in resources, "the example Secrets must never be applied"
    # The namespace comes first, so a plain `kubectl apply -f` of the list works as well.
    assert load_yaml_docs(K8S_DIR / resources[0])[0]["kind"] == "Namespace"


def test_everything_is_in_namespace_wrenn():
    ns = one("Namespace")
    assert ns["metadata"]["name"] == "wrenn"
    for doc in manifests(include_example=True):
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "wrenn", doc["metadata"]["name"]
    # The discovery looks in the control plane's own namespace: the agents must be there.
    assert daemonset()["metadata"]["namespace"] == deployment()["metadata"]["namespace"]


def test_service_selects_the_control_plane_pods():
    svc = one("Service", "wrenn")
    dep = deployment()
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    selector = svc["spec"]["selector"]
    assert selector and selector.items() <= pod_labels.items(), (selector, pod_labels)
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # ...and nothing else: not the agents.
    agent_labels = daemonset()["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= agent_labels.items()

    (port,) = svc["spec"]["ports"]
    assert port["port"] == 8080
    c = container(dep)
    target = port["targetPort"]
    matching = [p for p in c["ports"] if target in (p.get("name"), p["containerPort"])]
    assert matching, f"targetPort {target!r} names no port of the control-plane container"
    listen = flag_value(command_line(c), "--listen")
    assert listen == f"0.0.0.0:{matching[0]['containerPort']}", listen


def test_control_plane_pod():
    dep = deployment()
    c = container(dep)
    argv = command_line(c)
    assert subcommand_of(argv) == "serve"
    assert "--no-local-host" in argv
    assert flag_value(argv, "--discovery") == "kubernetes"
    assert c["image"] == "ghcr.io/wrenn/wrenn:latest"

    port_names = {p.get("name"): p["containerPort"] for p in c["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health", probe
        assert port_names.get(get["port"], get["port"]) == 8080, probe

    env = {e["name"]: e for e in c["env"]}
    for name, key in (("DATABASE_URL", "database-url"), ("JWT_SECRET", "jwt-secret")):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("wrenn-secrets", key)
        assert not ref.get("optional"), f"{name} must not be optional"

    assert c["resources"]["requests"] and c["resources"]["limits"]
    pod = dep["spec"]["template"]["spec"]
    sc = c["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert not sc.get("privileged")
    # The only writable places: emptyDirs, the data directory among them.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert "/var/lib/wrenn" in mounts
    for path, name in mounts.items():
        assert "emptyDir" in volumes[name], f"{path} is not an emptyDir"
    # It finishes its requests on the way out (the agents keep their capsules).
    assert pod["terminationGracePeriodSeconds"] >= 30


def test_rbac_lets_the_control_plane_watch_agent_pods():
    dep = deployment()
    sa_name = dep["spec"]["template"]["spec"]["serviceAccountName"]
    assert sa_name == "wrenn-control-plane"
    sa = one("ServiceAccount", sa_name)
    binding = one("RoleBinding")
    assert binding["roleRef"]["kind"] == "Role"
    assert binding["roleRef"]["apiGroup"] == "rbac.authorization.k8s.io"
    role = one("Role", binding["roleRef"]["name"])
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "wrenn"
    assert {
        (s["kind"], s["name"], s.get("namespace")) for s in binding["subjects"]
    } == {("ServiceAccount", sa_name, sa["metadata"]["namespace"])}
    pods = [r for r in role["rules"] if "" in r["apiGroups"] and "pods" in r["resources"]]
    assert pods, "the Role grants nothing on pods"
    assert {"get", "list", "watch"} <= set(pods[0]["verbs"])
    # Read-only, and nothing else.
    for rule in role["rules"]:
        assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
        assert set(rule["resources"]) == {"pods"}, rule


def parse_selector(selector: str) -> dict[str, str]:
    labels = {}
    for term in selector.split(","):
        key, sep, value = term.strip().partition("=")
        assert sep and key and "!" not in key, f"not an equality selector term: {term!r}"
        labels[key] = value.lstrip("=")
    return labels


def test_agents_are_what_the_discovery_looks_for():
    argv = command_line(container(deployment()))
    selector = parse_selector(flag_value(argv, "--k8s-agent-selector"))
    port = int(flag_value(argv, "--k8s-agent-port"))
    assert port == 7070

    ds = daemonset()
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items(), (selector, labels)
    assert labels["app.kubernetes.io/name"] == "wrenn-agent"
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # The control plane's own pods must not match.
    assert not selector.items() <= deployment()["spec"]["template"]["metadata"]["labels"].items()

    c = container(ds)
    agent_argv = command_line(c)
    assert subcommand_of(agent_argv) == "agent"
    advertise = flag_value(agent_argv, "--advertise")
    assert advertise.rsplit(":", 1) == ["$(HOST_IP)", str(port)], advertise
    assert [p["containerPort"] for p in c["ports"]] == [port]
    assert c["readinessProbe"]["tcpSocket"]["port"] == port

    # It registers with the control plane through the Service.
    svc = one("Service", "wrenn")
    url = flag_value(agent_argv, "--control-plane")
    svc_port = svc["spec"]["ports"][0]["port"]
    assert url == f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc:{svc_port}"


def test_agent_runs_privileged_on_the_host():
    ds = daemonset()
    pod = ds["spec"]["template"]["spec"]
    c = container(ds)
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert c["securityContext"]["privileged"] is True
    assert pod["terminationGracePeriodSeconds"] >= 300
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    assert pod["nodeSelector"] == {"wrenn.dev/host": "true"}
    assert any(t["key"] == "wrenn.dev/host" for t in pod["tolerations"])

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    expected = {
        "/dev/kvm": "CharDevice",
        "/dev/net/tun": "CharDevice",
        "/var/lib/wrenn": "DirectoryOrCreate",
        "/sys/fs/cgroup": None,
        "/lib/modules": None,
    }
    for path, kind in expected.items():
        assert path in mounts, f"{path} is not mounted"
        host_path = volumes[mounts[path]["name"]].get("hostPath")
        assert host_path and host_path["path"] == path, f"{path} is not the node's"
        if kind:
            assert host_path.get("type") == kind, f"{path}: type {host_path.get('type')}"
    assert mounts["/lib/modules"].get("readOnly") is True

    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    argv = command_line(c)
    assert flag_value(argv, "--host-id") == "$(NODE_NAME)"
    # Every $(VAR) in the command line is a variable of the container (else Kubernetes
    # passes the text unexpanded).
    for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", " ".join(argv)):
        assert var in env, f"$({var}) is not set in the agent's env"
    token = env["WRENN_REGISTER_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert (token["name"], token["key"], token.get("optional")) == ("wrenn-agent-join", "token", True)


def test_referenced_secrets_are_in_the_example():
    example: dict[str, set[str]] = {}
    for doc in load_yaml_docs(K8S_DIR / SECRETS_EXAMPLE):
        assert doc["kind"] == "Secret"
        keys = set(doc.get("stringData", {})) | set(doc.get("data", {}))
        example[doc["metadata"]["name"]] = keys
    assert set(example) == {"wrenn-secrets", "wrenn-agent-join"}

    def refs(node):
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                yield node["secretKeyRef"]
            if "secretRef" in node:
                yield {"name": node["secretRef"]["name"], "key": None}
            for v in node.values():
                yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    seen = set()
    for doc in manifests():
        for ref in refs(doc):
            assert ref["name"] in example, f"Secret {ref['name']} is not in {SECRETS_EXAMPLE}"
            if ref["key"] is not None:
                assert ref["key"] in example[ref["name"]], f"{ref['name']}/{ref['key']} missing"
                seen.add((ref["name"], ref["key"]))
    assert {("wrenn-secrets", "database-url"), ("wrenn-secrets", "jwt-secret"),
            ("wrenn-agent-join", "token")} <= seen


# --- systemd: static checks ----------------------------------------------------------------


def test_units_run_the_installed_binary_and_restart():
    for name, sub in (("wrenn-serve.service", "serve"), ("wrenn-agent.service", "agent")):
        path = SYSTEMD_DIR / name
        unit = parse_unit(path)
        (argv,) = exec_starts(path)
        assert argv[0] == INSTALLED_WRENN, argv
        assert subcommand_of(argv) == sub
        assert unit_value(unit, "Service", "Restart") == "on-failure"
        assert unit_value(unit, "Service", "KillMode") == "mixed"
        assert int(unit_value(unit, "Service", "TimeoutStopSec")) >= 300
        assert int(unit_value(unit, "Service", "LimitNOFILE")) >= 65536
        assert "network-online.target" in unit_value(unit, "Unit", "After").split()
        assert "network-online.target" in unit_value(unit, "Unit", "Wants").split()
        assert unit_value(unit, "Install", "WantedBy") == "multi-user.target"
        env_file = unit_value(unit, "Service", "EnvironmentFile")
        assert env_file == f"/etc/wrenn/{sub}.env", env_file
        assert (SYSTEMD_DIR / f"wrenn-{sub}.env.example").is_file()

    serve = parse_unit(SYSTEMD_DIR / "wrenn-serve.service")
    (argv,) = exec_starts(SYSTEMD_DIR / "wrenn-serve.service")
    assert "--no-local-host" in argv
    assert unit_value(serve, "Service", "DynamicUser") == "yes"
    assert unit_value(serve, "Service", "PrivateDevices") == "yes"
    assert unit_value(serve, "Service", "CapabilityBoundingSet") == ""
    agent = parse_unit(SYSTEMD_DIR / "wrenn-agent.service")
    assert unit_value(agent, "Service", "User") == "root"
    # The agent must keep the host's mount namespace and devices (see its comments).
    for key in ("PrivateDevices", "ProtectSystem", "PrivateTmp", "ProtectHome",
                "CapabilityBoundingSet", "MemoryDenyWriteExecute", "RestrictNamespaces"):
        assert not unit_values(agent, "Service", key), f"the agent unit sets {key}="

    # The local-host drop-in runs capsules in the control plane: no --no-local-host, root.
    dropin = SYSTEMD_DIR / "wrenn-serve-local-host.conf"
    (argv,) = exec_starts(dropin)
    assert argv[0] == INSTALLED_WRENN and subcommand_of(argv) == "serve"
    assert "--no-local-host" not in argv
    lifted = parse_unit(dropin)
    assert unit_values(lifted, "Service", "ExecStart")[0] == "", "ExecStart= must be reset first"
    assert unit_value(lifted, "Service", "User") == "root"
    assert unit_value(lifted, "Service", "DynamicUser") == "no"


def test_env_examples_document_the_essentials():
    serve = env_file_names(SYSTEMD_DIR / "wrenn-serve.env.example")
    agent = env_file_names(SYSTEMD_DIR / "wrenn-agent.env.example")
    assert {"DATABASE_URL", "JWT_SECRET", "WRENN_LISTEN", "WRENN_LOG", "WRENN_DATA_DIR"} <= serve
    assert {"WRENN_CONTROL_PLANE", "WRENN_REGISTER_TOKEN", "WRENN_ADVERTISE", "WRENN_HOST_ID",
            "WRENN_DATA_DIR", "WRENN_LOG"} <= agent
    # Every variable the serve unit's command line expands has a default in the unit.
    unit = parse_unit(SYSTEMD_DIR / "wrenn-serve.service")
    defaults = {v.split("=", 1)[0] for v in unit_values(unit, "Service", "Environment")}
    for argv in exec_starts(SYSTEMD_DIR / "wrenn-serve.service"):
        for var in re.findall(r"\$\{([A-Z0-9_]+)\}", " ".join(argv)):
            assert var in defaults, f"${{{var}}} has no Environment= default"


# --- systemd: systemd-analyze --------------------------------------------------------------


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip(
            "SKIPPED: systemd-analyze is not installed on this machine, so the systemd "
            "units in deploy/systemd were NOT verified (apt-get install systemd to check them)"
        )
    return tool


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The units and the drop-in, as systemd would find them, with a binary that exists.

    `systemd-analyze verify` checks that ExecStart's program exists: without an installed
    /usr/local/bin/wrenn the units point at this build's binary (or at a stand-in script,
    which is enough to check the units themselves).
    """
    if Path(INSTALLED_WRENN).exists():
        binary = INSTALLED_WRENN
    elif WRENN.exists():
        binary = str(tmp_path / "bin" / "wrenn")
        (tmp_path / "bin").mkdir()
        os.symlink(WRENN.resolve(), binary)
    else:
        binary = str(tmp_path / "bin" / "wrenn")
        (tmp_path / "bin").mkdir()
        Path(binary).write_text("#!/bin/sh\nexit 0\n")
        os.chmod(binary, 0o755)
    units = tmp_path / "units"
    units.mkdir()
    for path in SYSTEMD_DIR.glob("*.service"):
        (units / path.name).write_text(path.read_text().replace(INSTALLED_WRENN, binary))
    dropin = (SYSTEMD_DIR / "wrenn-serve-local-host.conf").read_text()
    (units / "local-host").mkdir()
    (units / "local-host" / "wrenn-serve.service.d").mkdir()
    (units / "local-host" / "wrenn-serve.service").write_text(
        (units / "wrenn-serve.service").read_text()
    )
    (units / "local-host" / "wrenn-serve.service.d" / "local-host.conf").write_text(
        dropin.replace(INSTALLED_WRENN, binary)
    )
    return units


def verify(tool: str, unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool, "verify", "--man=no", unit.name],
        cwd=unit.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "unit",
    ["wrenn-serve.service", "wrenn-agent.service", "local-host/wrenn-serve.service"],
)
def test_systemd_analyze_verify(unit: str, unit_dir: Path):
    tool = systemd_analyze()
    r = verify(tool, unit_dir / unit)
    # Unknown keys and unparsable values are only warnings (exit 0): any output fails.
    out = (r.stdout + r.stderr).strip()
    assert r.returncode == 0 and not out, f"systemd-analyze verify {unit}:\n{out}"


def test_systemd_analyze_catches_broken_units(unit_dir: Path):
    """The check above could pass vacuously: a misspelled key and value must show up."""
    tool = systemd_analyze()
    broken = unit_dir / "broken" / "wrenn-agent.service"
    broken.parent.mkdir()
    text = (unit_dir / "wrenn-agent.service").read_text()
    broken.write_text(text.replace("KillMode=mixed", "KillMode=mixd").replace("Restart=", "Restrat="))
    r = verify(tool, broken)
    out = r.stdout + r.stderr
    assert "Restrat" in out and "mixd" in out, out


def test_control_plane_unit_is_sandboxed(unit_dir: Path):
    tool = systemd_analyze()
    # Exposure 0.0 (locked down) .. 10.0 (unprotected); --threshold is in tenths.
    r = subprocess.run(
        [tool, "security", "--offline=yes", "--man=no", "--threshold=20", "wrenn-serve.service"],
        cwd=unit_dir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    level = re.search(r"Overall exposure level for wrenn-serve.service: ([0-9.]+)", r.stdout)
    assert level, r.stdout + r.stderr
    assert r.returncode == 0 and float(level.group(1)) <= 2.0, (
        f"the control plane's sandbox got weaker: exposure {level.group(1)}\n{r.stdout}"
    )


# --- the flags and variables are wrenn's ---------------------------------------------------


def wrenn_help(*args: str) -> str:
    if not WRENN.exists():
        pytest.skip(
            f"SKIPPED: {WRENN} does not exist (cargo build), so the flags and variables used "
            "in deploy/ were NOT checked against wrenn --help"
        )
    r = subprocess.run([str(WRENN), *args, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


HELP_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
HELP_ENV = re.compile(r"\[env: ([A-Z][A-Z0-9_]*)")


def used_command_lines() -> list[tuple[str, list[str]]]:
    """(where, argv) of every wrenn command line in deploy/: units, drop-in, manifests."""
    lines = []
    for path in unit_files():
        for argv in exec_starts(path):
            lines.append((f"systemd/{path.name}", argv))
    for doc in manifests():
        if doc["kind"] in ("Deployment", "DaemonSet"):
            lines.append((f"kubernetes {doc['kind']}/{doc['metadata']['name']}",
                          command_line(container(doc))))
    return lines


def test_flags_used_in_deploy_are_wrenn_flags():
    """E.g. the Deployment's --discovery, --k8s-agent-selector and --k8s-agent-port."""
    helps = {sub: set(HELP_FLAG.findall(wrenn_help(sub))) for sub in SUBCOMMANDS}
    lines = used_command_lines()
    assert {subcommand_of(argv) for _, argv in lines} == set(SUBCOMMANDS)
    missing = []
    for where, argv in lines:
        sub = subcommand_of(argv)
        for flag in sorted(flags_of(argv)):
            if flag not in helps[sub]:
                missing.append(f"{where}: `wrenn {sub} {flag}` is not in `wrenn {sub} --help`")
    assert not missing, "\n".join(missing)


def used_variables() -> dict[str, set[tuple[str, str]]]:
    """subcommand -> {(where, NAME)}: variables deploy/ hands to wrenn, not to the unit or pod."""
    used: dict[str, set[tuple[str, str]]] = {sub: set() for sub in SUBCOMMANDS}
    for sub in SUBCOMMANDS:
        unit_path = SYSTEMD_DIR / f"wrenn-{sub}.service"
        paths = [unit_path] + ([SYSTEMD_DIR / "wrenn-serve-local-host.conf"] if sub == "serve" else [])
        # Variables the unit expands into the command line itself (e.g. ${WRENN_LISTEN}).
        by_unit = {
            v
            for path in paths
            for argv in exec_starts(path)
            for v in re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", " ".join(argv))
        }
        for path in paths:
            for value in unit_values(parse_unit(path), "Service", "Environment"):
                for assignment in shlex.split(value):
                    name = assignment.split("=", 1)[0]
                    if name not in by_unit:
                        used[sub].add((f"systemd/{path.name}", name))
        example = SYSTEMD_DIR / f"wrenn-{sub}.env.example"
        for name in env_file_names(example) - by_unit:
            used[sub].add((f"systemd/{example.name}", name))
    for doc in manifests():
        if doc["kind"] not in ("Deployment", "DaemonSet"):
            continue
        c = container(doc)
        argv = command_line(c)
        expanded = set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", " ".join(argv)))
        for e in c.get("env", []):
            if e["name"] not in expanded:
                used[subcommand_of(argv)].add((f"kubernetes {doc['kind']}", e["name"]))
    return used


def test_variables_used_in_deploy_are_wrenn_variables():
    missing = []
    for sub, names in used_variables().items():
        known = set(HELP_ENV.findall(wrenn_help(sub)))
        assert known, f"`wrenn {sub} --help` lists no environment variables"
        for where, name in sorted(names):
            if name not in known:
                missing.append(f"{where}: {name} is not an [env: …] of `wrenn {sub} --help`")
    assert not missing, "\n".join(missing)


def test_agent_starts_without_a_registration_token():
    """The DaemonSet always passes --control-plane, and its join token is optional (a
    registered agent needs none, and the Secret may be gone): `wrenn agent` must accept
    --control-plane without --register. Fails while --control-plane `requires` it."""
    wrenn_help("agent")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WRENN_")}
    r = subprocess.run(
        # A data directory that cannot be created: the agent stops right after parsing.
        [str(WRENN), "--data-dir", "/dev/null/wrenn-deploy-test", "agent",
         "--control-plane", "http://127.0.0.1:9", "--advertise", "127.0.0.1:7070",
         "--host-id", "deploy-test"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    out = r.stdout + r.stderr
    assert "required arguments were not provided" not in out and "--register" not in out, out
    assert "/dev/null/wrenn-deploy-test" in out, f"expected to fail on the data directory:\n{out}"
