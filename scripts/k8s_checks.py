#!/usr/bin/env python3
"""Static checks of Tessera's deployment files, run by scripts/test-k8s.

    k8s_checks.py dockerfile              the Dockerfile and .dockerignore
    k8s_checks.py manifests DIR           base.yaml, dev.yaml and prod.yaml rendered into DIR
    k8s_checks.py tiltfile                the Tiltfile, against stubs of Tilt's built-ins

Schema validation is kubernetes-validate's job (scripts/test-k8s runs it); these checks assert
what the schemas cannot: the properties each workload must have, that references resolve, and
which pod can reach which through the NetworkPolicies. Each failure names the object and the
property; the exit status is 1 when any check failed.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent

SERVICES = ("ingestion", "identity", "profile", "scoring")
COMPONENTS = SERVICES + ("migrate",)
GRPC_PORT = 50051
HTTP_PORT = 8080
# Plaintext gRPC health only, for the kubelet's probes (the grpc port speaks TLS in prod).
PROBE_PORT = 50052
# Who calls whom, on the gRPC port (docs/architecture.md).
CALLS = {
    ("ingestion", "identity"),
    ("ingestion", "profile"),
    ("identity", "profile"),
    ("profile", "identity"),
    ("profile", "scoring"),
    ("profile", "ingestion"),
    ("scoring", "profile"),
}
# What clients outside the namespace may reach.
EXTERNAL = {("ingestion", GRPC_PORT), ("ingestion", HTTP_PORT), ("profile", GRPC_PORT),
            ("profile", HTTP_PORT)}
POSTGRES_USERS = {"ingestion", "identity", "profile", "scoring", "migrate"}
REDIS_USERS = {"identity", "profile"}
# Webhook destinations: HTTPS outside the cluster.
INTERNET_HTTPS_USERS = {"profile"}
# Secrets the pods read; in production they are created outside the repository (k8s/README.md).
SECRETS = {
    "tessera-database",
    "tessera-redis",
    "tessera-profile-api",
    "tessera-auth",
    "tessera-tls",
}
NAMESPACES = {"base": None, "dev": "tessera-dev", "prod": "tessera"}

# Addresses standing for places a connection can come from or go to.
POD_IP = ipaddress.ip_address("10.244.1.10")        # any pod of the cluster
INTERNET_IP = ipaddress.ip_address("203.0.113.10")  # a managed database, a webhook, a client


class Checks:
    """Collects failures instead of stopping at the first one."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.passed = 0
        self.failures: list[str] = []

    def check(self, ok: object, message: str) -> bool:
        if ok:
            self.passed += 1
        else:
            self.failures.append(message)
        return bool(ok)

    def finish(self) -> int:
        for failure in self.failures:
            print(f"k8s-checks: FAIL [{self.name}] {failure}", file=sys.stderr)
        print(f"k8s-checks: {self.name}: {self.passed} checks passed, "
              f"{len(self.failures)} failed", file=sys.stderr)
        return 1 if self.failures else 0


# ---------------------------------------------------------------------------------------------
# Dockerfile


def parse_dockerfile(text: str) -> list[tuple[str, str, int]]:
    """The instructions as (KEYWORD, arguments, line), continuation lines joined."""
    out, buf, start = [], "", 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buf:
            start = lineno
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.partition(" ")
        out.append((keyword.upper(), args.strip(), start))
        buf = ""
    return out


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves `path` out of the context (last matching pattern wins; a pattern
    matching a directory matches everything under it)."""

    def to_regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                out += ".*"
                i += 2
                if pattern.startswith("/", i):
                    out += "/?"
                    i += 1
            elif pattern[i] == "*":
                out += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                out += "[^/]"
                i += 1
            else:
                out += re.escape(pattern[i])
                i += 1
        return re.compile(out + "(/.*)?")

    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if to_regex(pattern).fullmatch(path):
            excluded = not negate
    return excluded


def check_dockerfile() -> int:
    c = Checks("dockerfile")
    text = (ROOT / "Dockerfile").read_text()
    instructions = parse_dockerfile(text)
    global_args: dict[str, str] = {}
    stages: list[dict] = []
    for keyword, args, line in instructions:
        if keyword == "ARG" and not stages:
            name, _, default = args.partition("=")
            global_args[name] = default
            continue
        if keyword == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)),
                           words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append({"image": image, "name": name, "line": line, "steps": []})
            continue
        c.check(stages, f"line {line}: {keyword} before the first FROM")
        if stages:
            stages[-1]["steps"].append((keyword, args, line))

    by_name = {s["name"]: s for s in stages if s["name"]}
    c.check(len(stages) >= 3, "a multi-stage build (builder stages and a runtime stage)")
    c.check(stages and stages[-1]["name"] == "runtime",
            "the last stage (what `docker build .` produces) is named runtime")
    for stage in stages:
        image = stage["image"]
        if image in by_name:
            continue
        c.check("$" not in image, f"FROM {image}: every variable has a default")
        c.check(":" in image.split("/")[-1] and not image.endswith(":latest"),
                f"FROM {image} (line {stage['line']}): a pinned tag, not latest")

    # The Rust toolchain is at least the workspace's rust-version.
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    want = tuple(int(x) for x in cargo["workspace"]["package"]["rust-version"].split("."))
    rust_images = [s["image"] for s in stages if s["image"].startswith("rust:")]
    c.check(rust_images, "a stage builds from the official rust image")
    for image in rust_images:
        m = re.match(r"rust:(\d+)\.(\d+)", image)
        c.check(m and tuple(int(x) for x in m.groups()) >= want[:2],
                f"{image} is at least the workspace's rust-version {'.'.join(map(str, want))}")

    # Dependency caching: the builder cooks the dependencies from the recipe before it copies
    # the sources, and copies everything the workspace needs to build.
    builder = by_name.get("builder")
    if c.check(builder, "a stage named builder"):
        steps = builder["steps"]
        cook = next((i for i, s in enumerate(steps) if s[0] == "RUN" and "cargo chef cook" in s[1]),
                    None)
        first_source = next((i for i, s in enumerate(steps)
                             if s[0] == "COPY" and "--from" not in s[1]
                             and re.search(r"\b(libs|services)\b", s[1])), None)
        c.check(cook is not None, "builder: `cargo chef cook` builds the dependencies")
        c.check(cook is not None and first_source is not None and cook < first_source,
                "builder: dependencies are cooked before the sources are copied (their layer "
                "survives a code change)")
        build = [s for s in steps if s[0] == "RUN" and "cargo build" in s[1]]
        c.check(build and all(f in build[0][1] for f in ("--release", "--locked", "--bin tessera")),
                "builder: `cargo build --release --locked --bin tessera`")
        copied = " ".join(s[1] for s in steps if s[0] == "COPY" and "--from" not in s[1])
        members = {m.split("/")[0] for m in cargo["workspace"]["members"]}
        # libs/proto's build script compiles ../../proto.
        for needed in sorted(members | {"proto", "Cargo.toml", "Cargo.lock"}):
            c.check(re.search(rf"(^|\s){re.escape(needed)}(\s|$)", copied),
                    f"builder: copies {needed} (a workspace member or build input)")
    planner = by_name.get("planner")
    if c.check(planner, "a stage named planner (cargo chef prepare)"):
        c.check(any(s[0] == "RUN" and "cargo chef prepare" in s[1] for s in planner["steps"]),
                "planner: `cargo chef prepare`")

    for name, binary in (("runtime", "/usr/local/bin/tessera"), ("dev", None)):
        stage = by_name.get(name)
        if not c.check(stage, f"a stage named {name}"):
            continue
        users = [s[1] for s in stage["steps"] if s[0] == "USER"]
        last_user = users[-1] if users else None
        c.check(last_user and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", last_user),
                f"{name}: USER is a numeric non-root uid(:gid) (got {last_user})")
        entry = [s[1] for s in stage["steps"] if s[0] == "ENTRYPOINT"]
        try:
            entry_argv = json.loads(entry[-1]) if entry else None
        except json.JSONDecodeError:
            entry_argv = None
        c.check(isinstance(entry_argv, list) and entry_argv
                and Path(entry_argv[0]).name == "tessera",
                f"{name}: ENTRYPOINT in exec form runs tessera (the subcommand comes from args)")
        if binary:
            c.check(any(s[0] == "COPY" and "--from=builder" in s[1] and s[1].endswith(binary)
                        for s in stage["steps"]),
                    f"{name}: copies the release binary from the builder to {binary}")
            c.check(not any(s[0] == "RUN" and re.search(r"\b(cargo|rustc|gcc)\b", s[1])
                            for s in stage["steps"]),
                    f"{name}: no compiler in the runtime image")

    # No secrets: no credentials in ENV or ARG, no key files or .env copied, nothing fetched.
    secret_name = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE_?KEY|CREDENTIAL)",
                             re.I)
    for keyword, args, line in instructions:
        if keyword in ("ENV", "ARG"):
            for pair in re.findall(r"(\w+)=(\S*)", args) or [(args.split()[0], "")]:
                c.check(not (secret_name.search(pair[0]) and pair[1]),
                        f"line {line}: {keyword} {pair[0]} carries no credential")
        if keyword in ("COPY", "ADD"):
            c.check(not re.search(r"(\.env\b|\.pem\b|\.key\b|id_rsa|id_ed25519|\.npmrc|"
                                  r"credentials)", args),
                    f"line {line}: {keyword} copies no key or credentials file")
        if keyword == "ADD":
            c.check(not re.search(r"https?://", args), f"line {line}: ADD fetches nothing")
        if keyword == "RUN":
            c.check(not re.search(r"(curl|wget)[^|]*\|\s*(ba)?sh", args),
                    f"line {line}: no piping a download into a shell")
    c.check(not re.search(r"(postgres|redis)://[^\s@/]*:[^\s@/]+@", text),
            "no URL with a password in the Dockerfile")

    # .dockerignore: build output, VCS and caches stay out; what the build copies stays in.
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.strip().startswith("#")]
    for path in ("target/debug/tessera", "target/release/tessera", ".git/HEAD", ".cache/x",
                 ".venv/bin/python", "tessera-data/ingestion.db", "k8s/base/kustomization.yaml"):
        c.check(dockerignore_excludes(ignore, path), f".dockerignore leaves out {path}")
    for path in ("Cargo.toml", "Cargo.lock", "proto/tessera/common/v1/common.proto",
                 "libs/proto/build.rs", "services/cli/src/main.rs", "tests/Cargo.toml",
                 "target/tilt/tessera"):
        c.check(not dockerignore_excludes(ignore, path), f".dockerignore keeps {path}")
    return c.finish()


# ---------------------------------------------------------------------------------------------
# Manifests


def load_stream(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def labels_match(selector: dict | None, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against labels."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def quantity(value: object) -> float:
    """A resource quantity ("250m", "1Gi", 2) as a number."""
    s = str(value)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20,
             "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", s)
    if not m or m.group(2) not in units and m.group(2):
        raise ValueError(f"not a quantity: {s}")
    return float(m.group(1)) * units.get(m.group(2), 1)


class Endpoint:
    """Where a connection starts or ends: a pod of some namespace, or an address outside."""

    def __init__(self, name: str, namespace: str | None, labels: dict, ports: dict[str, int],
                 ip: ipaddress.IPv4Address, ns_labels: dict) -> None:
        self.name, self.namespace, self.labels, self.ports = name, namespace, labels, ports
        self.ip, self.ns_labels = ip, ns_labels

    @property
    def is_pod(self) -> bool:
        return self.namespace is not None


class Network:
    """NetworkPolicy semantics (networking.k8s.io/v1) over the policies of one namespace."""

    def __init__(self, policies: list[dict], namespace: str | None) -> None:
        self.policies, self.namespace = policies, namespace

    def _selecting(self, pod: Endpoint, kind: str) -> list[dict]:
        out = []
        for p in self.policies:
            spec = p["spec"]
            types = spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec
                                                               else []))
            if (pod.is_pod and pod.namespace == self.namespace and kind in types
                    and labels_match(spec.get("podSelector", {}), pod.labels)):
                out.append(spec)
        return out

    def _peer_matches(self, peer: dict, other: Endpoint) -> bool:
        if "ipBlock" in peer:
            block = peer["ipBlock"]
            if other.ip not in ipaddress.ip_network(block["cidr"]):
                return False
            return not any(other.ip in ipaddress.ip_network(e) for e in block.get("except", []))
        if not other.is_pod:
            return False
        if "namespaceSelector" in peer:
            if not labels_match(peer["namespaceSelector"], other.ns_labels):
                return False
        elif other.namespace != self.namespace:
            return False
        return labels_match(peer.get("podSelector", {}), other.labels)

    @staticmethod
    def _port_matches(rule_port: dict, port: int, protocol: str, target: Endpoint) -> bool:
        if rule_port.get("protocol", "TCP") != protocol:
            return False
        want = rule_port.get("port")
        if want is None:
            return True
        if isinstance(want, str):
            want = target.ports.get(want)
        if want is None:
            return False
        return want <= port <= rule_port.get("endPort", want)

    def _allowed(self, pod: Endpoint, other: Endpoint, port: int, protocol: str, kind: str,
                 target: Endpoint) -> bool:
        specs = self._selecting(pod, kind)
        if not specs:
            return True  # not isolated in this direction
        key, peers_key = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
        for spec in specs:
            for rule in spec.get(key) or []:
                peers = rule.get(peers_key)
                ports = rule.get("ports")
                if peers and not any(self._peer_matches(p, other) for p in peers):
                    continue
                if ports and not any(self._port_matches(p, port, protocol, target)
                                     for p in ports):
                    continue
                return True
        return False

    def can_connect(self, src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> bool:
        return (self._allowed(src, dst, port, protocol, "Egress", dst)
                and self._allowed(dst, src, port, protocol, "Ingress", dst))


def pod_template(obj: dict) -> dict:
    return obj["spec"]["template"]


def check_pod_security(c: Checks, where: str, pod: dict) -> None:
    spec = pod["spec"]
    psc = spec.get("securityContext") or {}
    c.check(psc.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot: true")
    c.check(isinstance(psc.get("runAsUser"), int) and psc["runAsUser"] > 0,
            f"{where}: pod runAsUser is a non-zero uid")
    c.check((psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
            f"{where}: seccompProfile RuntimeDefault")
    c.check(spec.get("automountServiceAccountToken") is False,
            f"{where}: automountServiceAccountToken: false")
    c.check(not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"),
            f"{where}: no host namespaces")
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        cw = f"{where} container {container['name']}"
        sc = container.get("securityContext") or {}
        c.check(sc.get("allowPrivilegeEscalation") is False,
                f"{cw}: allowPrivilegeEscalation: false")
        c.check(sc.get("readOnlyRootFilesystem") is True, f"{cw}: readOnlyRootFilesystem: true")
        c.check(sc.get("privileged") is not True, f"{cw}: not privileged")
        c.check("ALL" in ((sc.get("capabilities") or {}).get("drop") or []),
                f"{cw}: capabilities drop ALL")
        c.check(not (sc.get("capabilities") or {}).get("add"), f"{cw}: no capabilities added")
        c.check(sc.get("runAsUser", 1) != 0, f"{cw}: not run as uid 0")
        res = container.get("resources") or {}
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                c.check(r in (res.get(kind) or {}), f"{cw}: resources.{kind}.{r}")
        for r in ("cpu", "memory"):
            try:
                ok = quantity(res["requests"][r]) <= quantity(res["limits"][r])
            except (KeyError, TypeError, ValueError):
                ok = True  # reported above
            c.check(ok, f"{cw}: requests.{r} <= limits.{r}")
        for env in container.get("env") or []:
            c.check(not (re.search(r"(URL|PASSWORD|TOKEN|SECRET|KEY)$", env["name"])
                         and "value" in env and re.search(r"://[^@/\s]*:[^@/\s]+@|.{12,}",
                                                          str(env["value"]))
                         and env["name"] not in ("PGDATA",)),
                    f"{cw}: {env['name']} comes from a Secret, not a literal value")


def example_keys() -> set[str]:
    """Every dotted key path of docs/tessera.example.toml (parsed by a Rust test with
    deny_unknown_fields, so each one exists in the binary's settings)."""
    keys: set[str] = set()

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                keys.add(prefix + k)
                walk(prefix + k + ".", v)

    walk("", tomllib.loads((ROOT / "docs/tessera.example.toml").read_text()))
    return keys


def check_overlay(c: Checks, overlay: str, objects: list[dict]) -> None:
    namespace = NAMESPACES[overlay]
    by_kind: dict[str, list[dict]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)

    def named(kind: str, name: str) -> dict | None:
        for obj in by_kind.get(kind, []):
            if obj["metadata"]["name"] == name:
                return obj
        return None

    def generated(kind: str, name: str) -> dict | None:
        """A ConfigMap or Secret by its generator name (kustomize appends a content hash)."""
        for obj in by_kind.get(kind, []):
            n = obj["metadata"]["name"]
            if n == name or re.fullmatch(re.escape(name) + r"-[a-z0-9]{10}", n):
                return obj
        return None

    # Namespaces: every namespaced object in the overlay's namespace, which enforces the
    # restricted Pod Security Standard.
    for obj in objects:
        if obj["kind"] == "Namespace":
            continue
        c.check(obj["metadata"].get("namespace") == namespace,
                f"{overlay}: {obj['kind']}/{obj['metadata']['name']} is in namespace {namespace}")
    ns_labels = {"kubernetes.io/metadata.name": namespace or "default"}
    if namespace:
        ns = named("Namespace", namespace)
        if c.check(ns, f"{overlay}: the Namespace {namespace} is part of the overlay"):
            ns_labels.update(ns["metadata"].get("labels") or {})
            c.check(ns_labels.get("pod-security.kubernetes.io/enforce") == "restricted",
                    f"{overlay}: namespace {namespace} enforces the restricted Pod Security "
                    f"Standard")

    # Secrets: none in base or prod; in dev only fake values.
    secrets = by_kind.get("Secret", [])
    if overlay in ("base", "prod"):
        c.check(not secrets, f"{overlay}: no Secret objects (no secret values in the repository)")
    for secret in secrets:
        for key, value in (secret.get("data") or {}).items():
            plain = base64.b64decode(value).decode()
            parts = urlsplit(plain) if "://" in plain else None
            credential = parts.password if parts else plain
            c.check(credential is None or "dev-only" in credential,
                    f"{overlay}: Secret {secret['metadata']['name']} key {key} is marked as a "
                    f"fake dev-only value")

    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job")]
    for obj in workloads:
        where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        pod = pod_template(obj)
        check_pod_security(c, where, pod)
        sa = pod["spec"].get("serviceAccountName")
        account = named("ServiceAccount", sa) if sa else None
        c.check(account and account.get("automountServiceAccountToken") is False,
                f"{where}: its own ServiceAccount ({sa}) with automountServiceAccountToken: false")
        # Every reference resolves to an object of the overlay (or, in base and prod, to one of
        # the Secrets created outside the repository).
        spec = pod["spec"]
        refs = []
        for container in spec["containers"]:
            for env in container.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    refs.append(("Secret", ref["name"], ref.get("key"), ref.get("optional")))
                ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
                if ref:
                    refs.append(("ConfigMap", ref["name"], ref.get("key"), ref.get("optional")))
            for src in container.get("envFrom") or []:
                if "configMapRef" in src:
                    refs.append(("ConfigMap", src["configMapRef"]["name"], None, None))
                if "secretRef" in src:
                    refs.append(("Secret", src["secretRef"]["name"], None, None))
        for volume in spec.get("volumes") or []:
            if "configMap" in volume:
                refs.append(("ConfigMap", volume["configMap"]["name"], None,
                             volume["configMap"].get("optional")))
            if "secret" in volume:
                refs.append(("Secret", volume["secret"]["secretName"], None,
                             volume["secret"].get("optional")))
        for kind, name, key, optional in refs:
            target = named(kind, name)
            if kind == "Secret" and overlay in ("base", "prod"):
                c.check(name in SECRETS, f"{where}: Secret {name} is one of the documented "
                                         f"Secrets {sorted(SECRETS)}")
                continue
            if optional and target is None:
                continue
            if c.check(target, f"{where}: {kind} {name} exists in the overlay"):
                if key:
                    c.check(key in (target.get("data") or {}),
                            f"{where}: {kind} {name} has key {key}")

    # The four services and the migration Job.
    keys = example_keys()
    config_map = generated("ConfigMap", "tessera-config")
    settings: dict = {}
    if c.check(config_map and "tessera.toml" in config_map.get("data", {}),
               f"{overlay}: ConfigMap tessera-config holds tessera.toml"):
        settings = tomllib.loads(config_map["data"]["tessera.toml"])

        def walk(prefix: str, value: object) -> None:
            for k, v in value.items():
                c.check(prefix + k in keys, f"{overlay}: tessera.toml key {prefix + k} is a "
                                            f"setting of docs/tessera.example.toml")
                if isinstance(v, dict):
                    walk(prefix + k + ".", v)

        walk("", settings)
        c.check(settings.get("grpc_addr") == f"0.0.0.0:{GRPC_PORT}"
                and settings.get("http_addr") == f"0.0.0.0:{HTTP_PORT}"
                and settings.get("probe_addr") == f"0.0.0.0:{PROBE_PORT}",
                f"{overlay}: tessera.toml listens on 0.0.0.0:{GRPC_PORT}, 0.0.0.0:{HTTP_PORT} "
                f"and 0.0.0.0:{PROBE_PORT} (probes)")
    env_vars: dict[str, str] = {}
    for name in ("tessera-peers", "tessera-env"):
        cm = generated("ConfigMap", name)
        if c.check(cm, f"{overlay}: ConfigMap {name}"):
            env_vars.update(cm.get("data") or {})
    # Mutual TLS between services: on in prod; dev allows plaintext instead; the base leaves
    # the choice to the overlays (a service refuses plaintext beyond loopback otherwise).
    tls_files = {k: env_vars.get(f"TESSERA__TLS__{k.upper()}")
                 for k in ("ca_file", "cert_file", "key_file")}
    tls_on = all(tls_files.values())
    plaintext = env_vars.get("TESSERA__TLS__ALLOW_PLAINTEXT", "").lower() == "true"
    c.check(tls_on or not any(tls_files.values()),
            f"{overlay}: tls.ca_file, tls.cert_file and tls.key_file all set or none")
    if overlay == "prod":
        c.check(tls_on and not plaintext, "prod: mutual TLS between services, no plaintext gRPC")
    if overlay == "dev":
        c.check(plaintext and not tls_on, "dev: plaintext gRPC allowed (tls.allow_plaintext)")
    for var, value in env_vars.items():
        path = var.removeprefix("TESSERA__").lower().replace("__", ".")
        c.check(var.startswith("TESSERA__") and path in keys,
                f"{overlay}: {var} names a setting of docs/tessera.example.toml")
        if var.startswith("TESSERA__PEERS__"):
            peer = urlsplit(value)
            service = named("Service", peer.hostname or "")
            c.check(peer.scheme == ("https" if tls_on else "http") and service
                    and any(p["port"] == peer.port for p in service["spec"]["ports"]),
                    f"{overlay}: {var}={value} is a Service of the overlay with that port, "
                    f"{'https' if tls_on else 'http'}")
    peers = {v.removeprefix("TESSERA__PEERS__").lower() for v in env_vars
             if v.startswith("TESSERA__PEERS__")}
    c.check(peers == set(SERVICES), f"{overlay}: tessera-peers names every service")

    for component in COMPONENTS:
        kind = "Job" if component == "migrate" else "Deployment"
        name = f"tessera-{component}"
        where = f"{overlay}: {kind}/{name}"
        obj = named(kind, name)
        if not c.check(obj, f"{where} exists"):
            continue
        pod = pod_template(obj)
        labels = pod["metadata"].get("labels") or {}
        c.check(labels.get("app.kubernetes.io/name") == "tessera"
                and labels.get("app.kubernetes.io/component") == component,
                f"{where}: pods labelled app.kubernetes.io/name=tessera, component={component}")
        containers = pod["spec"]["containers"]
        c.check(len(containers) == 1, f"{where}: one container")
        container = containers[0]
        image = container["image"]
        repo, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        c.check(repo.split("/")[-1] == "tessera", f"{where}: runs the tessera image ({image})")
        if overlay == "base":
            c.check(not tag, f"{where}: the base leaves the tag to the overlays")
        else:
            c.check(tag and tag != "latest", f"{where}: image {image} has a pinned tag")
        if overlay == "prod":
            c.check("/" in repo and tag != "dev", f"{where}: a registry image, not the dev one")
        args = container.get("args") or []
        c.check(not container.get("command"), f"{where}: no command (the image's entrypoint "
                                               f"is tessera; Tilt replaces it)")
        c.check(args[:1] == [component], f"{where}: args start with the subcommand {component}")
        if "--config" in args:
            path = Path(args[args.index("--config") + 1])
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts") or []}
            volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
            volume = volumes.get(mounts.get(str(path.parent)), {})
            cm_name = (volume.get("configMap") or {}).get("name", "")
            c.check(config_map and cm_name == config_map["metadata"]["name"]
                    and path.name in config_map.get("data", {}),
                    f"{where}: --config {path} is tessera.toml of the mounted tessera-config")
        else:
            c.check(False, f"{where}: --config points at the mounted tessera.toml")
        env = {e["name"]: e for e in container.get("env") or []}
        c.check(("DATABASE_URL" in env) == (component in POSTGRES_USERS),
                f"{where}: DATABASE_URL set exactly when it uses Postgres")
        c.check(("REDIS_URL" in env) == (component in REDIS_USERS),
                f"{where}: REDIS_URL set exactly when it uses Redis")
        for var in ("DATABASE_URL", "REDIS_URL", "TESSERA_ACCESS_TOKEN"):
            if var in env:
                c.check("secretKeyRef" in (env[var].get("valueFrom") or {}),
                        f"{where}: {var} from a secretKeyRef")
        tmp = [m for m in container.get("volumeMounts") or [] if m["mountPath"] == "/tmp"]
        c.check(tmp, f"{where}: a writable /tmp (emptyDir) beside the read-only root")
        if component == "migrate":
            c.check(pod["spec"].get("restartPolicy") in ("OnFailure", "Never"),
                    f"{where}: restartPolicy OnFailure or Never")
            continue

        # A service: ports, probes, Service, HPA, PDB, NetworkPolicy.
        ports = {p["name"]: p["containerPort"] for p in container.get("ports") or []}
        c.check(ports.get("grpc") == GRPC_PORT and ports.get("http") == HTTP_PORT
                and ports.get("probe") == PROBE_PORT,
                f"{where}: ports grpc={GRPC_PORT}, http={HTTP_PORT} and probe={PROBE_PORT} "
                f"(got {ports})")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc = (container.get(probe) or {}).get("grpc") or {}
            c.check(grpc.get("port") == PROBE_PORT and not grpc.get("service"),
                    f"{where}: {probe} uses the gRPC health protocol on the probe port "
                    f"{PROBE_PORT}")
        if tls_on:
            # Each service reads the CA and its own certificate and key, from the Secret.
            tls_volume = next((v for v in pod["spec"].get("volumes") or []
                               if (v.get("secret") or {}).get("secretName") == "tessera-tls"),
                              None)
            secret = (tls_volume or {}).get("secret") or {}
            c.check(tls_volume and not secret.get("optional", False),
                    f"{where}: mounts the Secret tessera-tls, not optional")
            mount = next((m for m in container.get("volumeMounts") or []
                          if tls_volume and m["name"] == tls_volume["name"]), {})
            c.check(mount.get("readOnly") is True, f"{where}: tessera-tls mounted read-only")
            items = {i["key"]: i["path"] for i in secret.get("items") or []}
            for setting, key in (("ca_file", "ca.pem"), ("cert_file", f"{component}.pem"),
                                 ("key_file", f"{component}-key.pem")):
                want = f"{mount.get('mountPath')}/{items.get(key)}"
                c.check(key in items and tls_files[setting] == want,
                        f"{where}: tls.{setting} ({tls_files[setting]}) is {key} of tessera-tls")
        c.check(pod["spec"].get("enableServiceLinks") is False,
                f"{where}: enableServiceLinks: false (no TESSERA_*_PORT variables)")
        service = named("Service", name)
        if c.check(service, f"{overlay}: Service/{name}"):
            c.check(labels_match({"matchLabels": service["spec"].get("selector") or {}}, labels)
                    and service["spec"].get("selector"),
                    f"{overlay}: Service/{name} selects the {component} pods")
            sports = {p.get("name"): p for p in service["spec"]["ports"]}
            c.check("grpc" in sports and sports["grpc"]["port"] == GRPC_PORT
                    and sports["grpc"].get("targetPort") in ("grpc", GRPC_PORT),
                    f"{overlay}: Service/{name} has a port named grpc to the container's grpc")
            want = "https" if tls_on else "kubernetes.io/h2c"
            c.check(sports.get("grpc", {}).get("appProtocol") == want,
                    f"{overlay}: Service/{name} port grpc has appProtocol {want}")
            c.check("http" in sports and sports["http"].get("targetPort") in ("http", HTTP_PORT),
                    f"{overlay}: Service/{name} has a port named http")
        hpa = named("HorizontalPodAutoscaler", name)
        if c.check(hpa, f"{overlay}: HorizontalPodAutoscaler/{name}"):
            ref = hpa["spec"]["scaleTargetRef"]
            c.check(ref["kind"] == "Deployment" and ref["name"] == name,
                    f"{overlay}: HorizontalPodAutoscaler/{name} scales Deployment/{name}")
            c.check(hpa["spec"].get("minReplicas", 1) <= hpa["spec"]["maxReplicas"],
                    f"{overlay}: HorizontalPodAutoscaler/{name} minReplicas <= maxReplicas")
        pdb = named("PodDisruptionBudget", name)
        c.check(pdb and labels_match(pdb["spec"].get("selector"), labels),
                f"{overlay}: PodDisruptionBudget/{name} selects the {component} pods")
        if overlay == "prod":
            replicas = obj["spec"].get("replicas", 1)
            c.check(replicas >= 2, f"{where}: at least two replicas (got {replicas})")
            c.check(hpa and hpa["spec"].get("minReplicas", 1) >= 2,
                    f"{overlay}: HorizontalPodAutoscaler/{name} keeps at least two replicas")
            c.check(pdb and (pdb["spec"].get("maxUnavailable") == 1
                             or pdb["spec"].get("minAvailable", 0) >= 1),
                    f"{overlay}: PodDisruptionBudget/{name} keeps a replica up")
            anti = (pod["spec"].get("affinity") or {}).get("podAntiAffinity") or {}
            terms = [t.get("podAffinityTerm", t) for key in
                     ("requiredDuringSchedulingIgnoredDuringExecution",
                      "preferredDuringSchedulingIgnoredDuringExecution")
                     for t in anti.get(key) or []]
            c.check(any(t.get("topologyKey") == "kubernetes.io/hostname"
                        and labels_match(t.get("labelSelector"), labels) for t in terms),
                    f"{where}: pod anti-affinity between its replicas per node")
            spread = pod["spec"].get("topologySpreadConstraints") or []
            for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone"):
                c.check(any(t["topologyKey"] == key and labels_match(t.get("labelSelector"), labels)
                            for t in spread),
                        f"{where}: topology spread over {key}")

    # Dev runs Postgres and Redis in the cluster, one replica each; prod none.
    statefulsets = {o["metadata"]["name"]: o for o in by_kind.get("StatefulSet", [])}
    if overlay == "dev":
        for name, port in (("postgres", 5432), ("redis", 6379)):
            sts = statefulsets.get(name)
            if c.check(sts, f"dev: StatefulSet/{name}"):
                c.check(sts["spec"].get("replicas") == 1, f"dev: StatefulSet/{name} one replica")
                c.check(named("Service", name), f"dev: Service/{name}")
    else:
        c.check(not statefulsets, f"{overlay}: no database in the cluster (managed Postgres "
                                  f"and Redis)")

    check_network(c, overlay, objects, namespace, ns_labels)


def check_network(c: Checks, overlay: str, objects: list[dict], namespace: str | None,
                  ns_labels: dict) -> None:
    # The base has no namespace: its objects land in whichever one kubectl uses.
    namespace = namespace or "default"
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    net = Network(policies, namespace)
    default_deny = [p for p in policies if p["spec"].get("podSelector") == {}
                    and set(p["spec"].get("policyTypes") or []) == {"Ingress", "Egress"}
                    and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    c.check(default_deny, f"{overlay}: a default-deny NetworkPolicy for every pod")

    pods: dict[str, Endpoint] = {}
    for obj in objects:
        if obj["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        pod = pod_template(obj)
        ports = {p["name"]: p["containerPort"] for ct in pod["spec"]["containers"]
                 for p in ct.get("ports") or [] if "name" in p}
        labels = pod["metadata"].get("labels") or {}
        key = labels.get("app.kubernetes.io/component") if labels.get(
            "app.kubernetes.io/name") == "tessera" else obj["metadata"]["name"]
        pods[key] = Endpoint(key, namespace, labels, ports, POD_IP, ns_labels)
    elsewhere = Endpoint("a pod of another namespace", "elsewhere", {"app": "client"}, {},
                         POD_IP, {"kubernetes.io/metadata.name": "elsewhere"})
    internet = Endpoint("an address outside the cluster", None, {}, {}, INTERNET_IP, {})
    dns = Endpoint("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, {"dns": 53}, POD_IP,
                   {"kubernetes.io/metadata.name": "kube-system"})

    for src in COMPONENTS:
        for dst in SERVICES:
            if src not in pods or dst not in pods:
                continue
            for port in (GRPC_PORT, HTTP_PORT):
                want = (src, dst) in CALLS and port == GRPC_PORT
                got = net.can_connect(pods[src], pods[dst], port)
                c.check(got == want, f"{overlay}: {src} -> {dst}:{port} is "
                                     f"{'allowed' if want else 'denied'} (policies say "
                                     f"{'allowed' if got else 'denied'})")
        if src not in pods:
            continue
        c.check(net.can_connect(pods[src], dns, 53, "UDP") and net.can_connect(pods[src], dns, 53),
                f"{overlay}: {src} resolves names (DNS, UDP and TCP 53)")
        want = src in INTERNET_HTTPS_USERS
        c.check(net.can_connect(pods[src], internet, 443) == want,
                f"{overlay}: {src} -> HTTPS outside the cluster is "
                f"{'allowed' if want else 'denied'}")
        for port, users, name in ((5432, POSTGRES_USERS, "postgres"), (6379, REDIS_USERS, "redis")):
            want = src in users
            # In dev the database is a pod of the namespace, in prod a managed service outside.
            dst = pods.get(name, internet)
            got = net.can_connect(pods[src], dst, port)
            c.check(got == want, f"{overlay}: {src} -> {name}:{port} is "
                                 f"{'allowed' if want else 'denied'}")
            if name in pods:
                c.check(not net.can_connect(pods[src], internet, port),
                        f"{overlay}: {src} -> {name} port {port} outside the cluster is denied")
    for dst in SERVICES:
        if dst not in pods:
            continue
        for port in (GRPC_PORT, HTTP_PORT):
            want = (dst, port) in EXTERNAL
            for src in (elsewhere, internet):
                got = net.can_connect(src, pods[dst], port)
                c.check(got == want, f"{overlay}: {src.name} -> {dst}:{port} is "
                                     f"{'allowed' if want else 'denied'}")
    for name in ("postgres", "redis"):
        if name in pods:
            for src in (elsewhere, internet):
                c.check(not net.can_connect(src, pods[name], pods[name].ports.get(name, 0)),
                        f"{overlay}: {src.name} cannot reach {name}")


def check_manifests(rendered: Path) -> int:
    c = Checks("manifests")
    for overlay in ("base", "dev", "prod"):
        check_overlay(c, overlay, load_stream(rendered / f"{overlay}.yaml"))
    return c.finish()


# ---------------------------------------------------------------------------------------------
# Tiltfile

# The parameters of the Tilt built-ins the stubs accept (Tilt's API reference), in order.
TILT_API = {
    "docker_build": ["ref", "context", "build_args", "dockerfile", "dockerfile_contents",
                     "live_update", "match_in_env_vars", "ignore", "only", "entrypoint", "target",
                     "ssh", "network", "secret", "extra_tag", "container_args", "cache_from",
                     "pull", "platform", "extra_hosts"],
    "custom_build": ["ref", "command", "deps", "tag", "disable_push", "skips_local_docker",
                     "live_update", "match_in_env_vars", "ignore", "entrypoint",
                     "command_bat_val", "outputs_image_ref_to", "command_bat", "image_deps",
                     "env", "dir"],
    "k8s_yaml": ["yaml", "allow_duplicates"],
    "kustomize": ["pathToDir", "kustomize_bin", "flags"],
    "k8s_resource": ["workload", "new_name", "port_forwards", "extra_pod_selectors",
                     "trigger_mode", "resource_deps", "objects", "auto_init", "pod_readiness",
                     "links", "labels", "discovery_strategy"],
    "local_resource": ["name", "cmd", "deps", "trigger_mode", "resource_deps", "ignore",
                       "auto_init", "serve_cmd", "cmd_bat", "serve_cmd_bat", "allow_parallel",
                       "links", "labels", "env", "serve_env", "readiness_probe", "dir",
                       "serve_dir"],
    "sync": ["local_path", "remote_path"],
    "run": ["cmd", "trigger", "echo_off"],
    "restart_container": [],
    "fall_back_on": ["files"],
    "initial_sync": [],
    "port_forward": ["local_port", "container_port", "name", "link_path", "host"],
    "link": ["url", "name"],
    "decode_yaml_stream": ["yaml"],
    "encode_yaml_stream": ["objs"],
    "watch_file": ["file_path"],
    "allow_k8s_contexts": ["contexts"],
    "update_settings": ["max_parallel_updates", "k8s_upsert_timeout_secs",
                        "suppress_unused_image_warnings"],
    "config.define_string": ["name", "args", "usage"],
    "config.define_string_list": ["name", "args", "usage"],
    "config.define_bool": ["name", "args", "usage"],
    "config.parse": [],
    "config.set_enabled_resources": ["resources"],
}
REQUIRED = {"docker_build": 2, "custom_build": 3, "k8s_yaml": 1, "kustomize": 1, "sync": 2,
            "run": 1, "port_forward": 1, "local_resource": 2, "decode_yaml_stream": 1,
            "encode_yaml_stream": 1, "config.define_string": 1, "config.define_string_list": 1,
            "config.define_bool": 1, "config.set_enabled_resources": 1, "fall_back_on": 1}
RESTART_PROCESS = '''
def docker_build_with_restart(ref, context, entrypoint, live_update, base_suffix = "-base",
                              restart_file = "/.restart-proc", **kwargs):
    _record("docker_build_with_restart", ref, context, entrypoint = entrypoint,
            live_update = live_update, base_suffix = base_suffix, restart_file = restart_file,
            **kwargs)
'''


class TiltStubs:
    """Records what a Tiltfile asks of Tilt; each call's arguments are checked against the
    built-in's parameters."""

    def __init__(self, kubectl: str, args: dict) -> None:
        self.kubectl, self.args = kubectl, args
        self.calls: list[tuple[str, dict]] = []
        self.errors: list[str] = []

    def bind(self, name: str, args: tuple, kwargs: dict) -> dict:
        params = TILT_API[name]
        bound = dict(zip(params, args))
        if len(args) > len(params):
            self.errors.append(f"{name}: {len(args)} positional arguments, at most {len(params)}")
        for key, value in kwargs.items():
            if key not in params:
                self.errors.append(f"{name}: no parameter {key!r}")
            elif key in bound:
                self.errors.append(f"{name}: {key!r} given twice")
            bound[key] = value
        missing = [p for p in params[:REQUIRED.get(name, 0)] if p not in bound]
        if missing:
            self.errors.append(f"{name}: missing {missing}")
        return bound

    def stub(self, name: str, returns=None):
        def fn(*args, **kwargs):
            bound = self.bind(name, args, kwargs)
            self.calls.append((name, bound))
            if callable(returns):
                return returns(bound)
            return returns if returns is not None else {"_tilt": name, **bound}
        return fn

    def kustomize(self, bound: dict) -> str:
        out = subprocess.run([self.kubectl, "kustomize", str(ROOT / bound["pathToDir"])],
                             check=True, capture_output=True, text=True)
        return out.stdout

    def evaluate(self, path: Path):
        import starlark as sl

        dialect = sl.Dialect.extended()
        # Tilt's Starlark (go.starlark.net) has top-level if/for and no f-strings or types.
        dialect.enable_top_level_stmt = True
        dialect.enable_f_strings = False
        dialect.enable_types = sl.DialectTypes.DISABLE
        dialect.enable_load = True
        dialect.enable_keyword_only_arguments = False
        globals_ = sl.Globals.extended_by([sl.LibraryExtension.StructType,
                                           sl.LibraryExtension.Print,
                                           sl.LibraryExtension.Json])
        module = sl.Module()
        simple = ["docker_build", "custom_build", "k8s_yaml", "k8s_resource", "local_resource",
                  "sync", "run", "restart_container", "fall_back_on", "initial_sync",
                  "port_forward", "link", "watch_file", "allow_k8s_contexts", "update_settings"]
        for name in simple:
            module.add_callable(name, self.stub(name, returns=None if name in (
                "sync", "run", "restart_container", "fall_back_on", "initial_sync",
                "port_forward", "link") else {}))
        module.add_callable("kustomize", self.stub("kustomize", returns=self.kustomize))
        module.add_callable("decode_yaml_stream", self.stub(
            "decode_yaml_stream",
            returns=lambda b: [d for d in yaml.safe_load_all(b["yaml"]) if d]))
        module.add_callable("encode_yaml_stream", self.stub(
            "encode_yaml_stream",
            returns=lambda b: yaml.safe_dump_all(b["objs"], sort_keys=False)))
        module.add_callable("_config_parse", self.stub("config.parse", returns=lambda b: self.args))
        for name in ("define_string", "define_string_list", "define_bool",
                     "set_enabled_resources"):
            module.add_callable(f"_config_{name}", self.stub(f"config.{name}", returns={}))
        prelude = ("config = struct(define_string = _config_define_string, "
                   "define_string_list = _config_define_string_list, "
                   "define_bool = _config_define_bool, parse = _config_parse, "
                   "set_enabled_resources = _config_set_enabled_resources)\n")
        sl.eval(module, sl.parse("prelude", prelude, dialect), globals_)

        def load(name: str):
            if name != "ext://restart_process":
                raise ValueError(f"the stubs have no extension {name}")
            ext = sl.Module()

            def record(kind, *args, **kwargs):
                params = ["ref", "context"]
                bound = dict(zip(params, args))
                bound.update(kwargs)
                extra = set(kwargs) - set(TILT_API["docker_build"]) - {
                    "entrypoint", "live_update", "base_suffix", "restart_file"}
                for key in sorted(extra):
                    self.errors.append(f"docker_build_with_restart: no parameter {key!r}")
                self.calls.append((kind, bound))

            ext.add_callable("_record", record)
            sl.eval(ext, sl.parse("restart_process", RESTART_PROCESS, dialect), globals_)
            return ext.freeze()

        ast = sl.parse(str(path.name), path.read_text(), dialect)
        sl.eval(module, ast, globals_, sl.FileLoader(load))

    def called(self, name: str) -> list[dict]:
        return [b for n, b in self.calls if n == name]


def dockerfile_stage_copy_dest(stage: str, source: str) -> str | None:
    instructions = parse_dockerfile((ROOT / "Dockerfile").read_text())
    current = None
    for keyword, args, _ in instructions:
        if keyword == "FROM":
            words = args.split()
            current = words[2] if len(words) >= 3 else None
        elif keyword == "COPY" and current == stage:
            words = [w for w in args.split() if not w.startswith("--")]
            if source in words[:-1]:
                return words[-1]
    return None


def check_tiltfile(kubectl: str) -> int:
    c = Checks("tiltfile")
    path = ROOT / "Tiltfile"
    expected_forwards = {
        "tessera-ingestion": {(50051, 50051), (8080, 8080)},
        "tessera-identity": {(50052, 50051), (8082, 8080)},
        "tessera-profile": {(50053, 50051), (8083, 8080)},
        "tessera-scoring": {(50054, 50051), (8084, 8080)},
    }
    plain = [d for d in yaml.safe_load_all(subprocess.run(
        [kubectl, "kustomize", str(ROOT / "k8s/overlays/dev")], check=True, capture_output=True,
        text=True).stdout) if d]

    for mode in ("host", "docker"):
        tilt = TiltStubs(kubectl, {"build": mode} if mode != "host" else {})
        try:
            tilt.evaluate(path)
        except Exception as e:  # noqa: BLE001 - any evaluation error fails the check
            c.check(False, f"--build={mode}: the Tiltfile evaluates ({e})")
            continue
        c.check(not tilt.errors, f"--build={mode}: calls match Tilt's API: {tilt.errors}")

        # Manifests: the dev overlay, unchanged but for live-updatable tessera containers.
        applied = tilt.called("k8s_yaml")
        kustomized = [b["pathToDir"] for b in tilt.called("kustomize")]
        c.check(kustomized == ["k8s/overlays/dev"], f"--build={mode}: kustomize k8s/overlays/dev "
                                                     f"(got {kustomized})")
        if not c.check(len(applied) == 1, f"--build={mode}: one k8s_yaml call"):
            continue
        objects = [d for d in yaml.safe_load_all(applied[0]["yaml"]) if d]
        expected = json.loads(json.dumps(plain))
        if mode == "host":
            for obj in expected:
                if obj["kind"] in ("Deployment", "Job"):
                    for ct in obj["spec"]["template"]["spec"]["containers"]:
                        if ct["image"].split(":")[0] == "tessera":
                            ct["securityContext"]["readOnlyRootFilesystem"] = False
        c.check(objects == expected,
                f"--build={mode}: applies the dev overlay as rendered"
                + (", tessera containers' root writable for live update" if mode == "host" else ""))

        # Images: tessera is built; in host mode from the host binary with live update.
        workloads = {o["metadata"]["name"]: o for o in objects
                     if o["kind"] in ("Deployment", "StatefulSet", "Job")}
        images = {ct["image"].split(":")[0] for o in workloads.values()
                  for ct in pod_template(o)["spec"]["containers"]}
        builds = tilt.called("docker_build") + tilt.called("docker_build_with_restart") + \
            tilt.called("custom_build")
        c.check([b["ref"] for b in builds] == ["tessera"],
                f"--build={mode}: one image build, tessera (got {[b['ref'] for b in builds]})")
        c.check("tessera" in images, f"--build={mode}: the workloads run the image Tilt builds")
        binaries = [b for b in tilt.called("local_resource") if b["name"] == "tessera-binary"]
        if mode == "host":
            restart = tilt.called("docker_build_with_restart")
            if c.check(len(restart) == 1,
                       "--build=host: docker_build_with_restart (restart_process)"):
                b = restart[0]
                host_binary = (b.get("only") or [None])[0]
                dest = dockerfile_stage_copy_dest(b.get("target", ""), host_binary or "")
                c.check(b.get("dockerfile") == "Dockerfile" and b.get("target") == "dev"
                        and dest, "--build=host: builds the Dockerfile's dev stage, which copies "
                                  f"the host binary {host_binary}")
                c.check(b.get("only") == [host_binary], "--build=host: the context is the binary "
                                                          "alone (nothing else triggers a build)")
                ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                          if ln.strip() and not ln.strip().startswith("#")]
                c.check(host_binary and not dockerignore_excludes(ignore, host_binary),
                        f"--build=host: .dockerignore lets {host_binary} into the context")
                c.check(b.get("entrypoint") == [dest], f"--build=host: the restarted entrypoint "
                                                       f"is the binary {dest}")
                syncs = [s for s in b.get("live_update") or [] if s.get("_tilt") == "sync"]
                c.check(syncs == [{"_tilt": "sync", "local_path": host_binary,
                                   "remote_path": dest}],
                        f"--build=host: live update syncs {host_binary} to {dest}")
                c.check(str(b.get("restart_file", "/.restart-proc")).startswith(
                    str(Path(dest).parent.parent) + "/"),
                        "--build=host: the restart file is in the user's /opt/tessera (the image "
                        "user cannot write /)")
                if c.check(len(binaries) == 1, "--build=host: local_resource tessera-binary"):
                    cmd = binaries[0]["cmd"]
                    c.check("cargo build" in cmd and "--bin tessera" in cmd
                            and str(host_binary) in cmd,
                            f"--build=host: tessera-binary runs cargo build and writes "
                            f"{host_binary}")
                    deps = binaries[0].get("deps") or []
                    c.check(all((ROOT / d).exists() for d in deps)
                            and {"Cargo.lock", "libs", "services", "proto"} <= set(deps),
                            f"--build=host: tessera-binary watches the Rust sources ({deps})")
        else:
            c.check(not binaries and not tilt.called("docker_build_with_restart"),
                    "--build=docker: no host build, no live update")
            plain_build = tilt.called("docker_build")
            c.check(plain_build and plain_build[0].get("target", "") in ("", "runtime")
                    and plain_build[0].get("dockerfile", "Dockerfile") == "Dockerfile",
                    "--build=docker: builds the Dockerfile's runtime image")

        # Resources: every workload configured, ports forwarded, dependencies known.
        resources = tilt.called("k8s_resource")
        configured = {r.get("workload") for r in resources if r.get("workload")}
        c.check(configured == set(workloads),
                f"--build={mode}: a k8s_resource for every workload (got {sorted(configured)}, "
                f"workloads {sorted(workloads)})")
        names = set(configured) | {r["new_name"] for r in resources if r.get("new_name")} | \
            {b["name"] for b in tilt.called("local_resource")}
        for r in resources:
            for dep in r.get("resource_deps") or []:
                c.check(dep in names, f"--build={mode}: resource dependency {dep} exists")
            for selector in r.get("objects") or []:
                name, _, kind = selector.partition(":")
                c.check(any(o["metadata"]["name"] == name and o["kind"].lower() == kind.lower()
                            for o in objects), f"--build={mode}: object {selector} exists")
        forwards: dict[str, set] = {}
        for r in resources:
            for pf in r.get("port_forwards") or []:
                if isinstance(pf, dict):
                    local, remote = pf["local_port"], pf.get("container_port", pf["local_port"])
                else:  # "LOCAL", "LOCAL:CONTAINER" or "HOST:LOCAL:CONTAINER"
                    parts = str(pf).split(":")
                    local, remote = (parts[-2] if len(parts) > 1 else parts[0]), parts[-1]
                forwards.setdefault(r.get("workload"), set()).add((int(local), int(remote)))
        c.check(forwards == expected_forwards,
                f"--build={mode}: port forwards {forwards} are {expected_forwards}")
        locals_ = [p[0] for fs in forwards.values() for p in fs]
        c.check(len(locals_) == len(set(locals_)), f"--build={mode}: local ports are distinct")
        for workload, pairs in forwards.items():
            obj = workloads.get(workload)
            cports = {p["containerPort"] for ct in pod_template(obj)["spec"]["containers"]
                      for p in ct.get("ports") or []} if obj else set()
            for _, remote in pairs:
                c.check(remote in cports, f"--build={mode}: {workload} listens on {remote}")

    # `tilt up RESOURCE...` enables only those resources.
    tilt = TiltStubs(kubectl, {"to-run": ["tessera-profile", "postgres"]})
    try:
        tilt.evaluate(path)
        enabled = [b["resources"] for b in tilt.called("config.set_enabled_resources")]
    except Exception as e:  # noqa: BLE001
        enabled = [str(e)]
    c.check(enabled == [["tessera-profile", "postgres"]],
            f"`tilt up tessera-profile postgres` enables those two resources (got {enabled})")

    # A wrong --build value stops Tilt with a message.
    tilt = TiltStubs(kubectl, {"build": "nonsense"})
    try:
        tilt.evaluate(path)
        failed = False
    except Exception:  # noqa: BLE001
        failed = True
    c.check(failed, "--build=nonsense fails the Tiltfile")
    return c.finish()


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    command = sys.argv[1]
    if command == "dockerfile":
        return check_dockerfile()
    if command == "manifests" and len(sys.argv) == 3:
        return check_manifests(Path(sys.argv[2]))
    if command == "tiltfile":
        return check_tiltfile(os.environ.get("KUBECTL", "kubectl"))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
