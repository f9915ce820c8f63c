"""``kubectl cqrs``: the day-2 commands of a CqrsStack, as a kubectl plugin.

kubectl runs an executable named ``kubectl-cqrs`` found on PATH for ``kubectl cqrs ...``; the
package installs it. It talks to the API server with the kubeconfig kubectl uses
(``--kubeconfig``, else ``$KUBECONFIG``, else ``~/.kube/config``; ``--context``; ``-n``):

- ``status STACK``: phase, conditions, replicas ready/desired per component, projection lag,
  dead letters, rebuild, on one screen.
- ``rebuild STACK``: asks the operator for a rebuild (annotation ``cqrs.dev/rebuild``).
- ``dlq list|retry|drop STACK ...``: ``cqrs-stack dlq`` with the stack's own settings, read
  from the ConfigMap and the credentials Secret the operator keeps for it.
- ``psql STACK --read|--write``: the local ``psql`` on the stack's database as its role; the
  login goes by environment (``PGPASSWORD``...), never on a command line ``ps`` shows.

The databases and Redis are reached at the addresses the stack's pods use, so they must be
reachable from where the plugin runs. No secret value is ever printed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import os
import shutil
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from cqrs_stack.cli import CommandError, add_dlq_commands, reason_of, run_dlq, where
from cqrs_stack.config import Settings, known_secrets, redact_text

from . import manifests
from .rebuild_job import REBUILD_ANNOTATION
from .spec import GROUP, PLURAL, VERSION, CaBundle, SpecError, StackSpec, parse_spec

# Exit codes (README, "kubectl cqrs"): besides those of `cqrs-stack dlq`, which it passes on.
EXIT_USAGE = 2
EXIT_NOT_FOUND = 20  # no such stack, or a child the operator has not created yet
EXIT_KUBE = 21  # the API server refused or cannot be reached
EXIT_NO_PSQL = 22
# What psql reads from its environment, by the URL query parameter it comes from.
_PSQL_QUERY_ENV = {
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "application_name": "PGAPPNAME",
}


# The environment the plugin was started with: psql gets it, not the stack's settings.
_ORIGINAL_ENVIRONMENT: dict[str, str] = {}
# libpq variables of the user's environment that psql keeps: they shape the session, never
# where it goes or as whom. Every other PG* variable (PGSERVICE/PGSERVICEFILE, whose service
# file libpq prefers to PGHOST..., PGHOSTADDR, PGPASSFILE, PGOPTIONS, PGSSL*, PGSYSCONFDIR...)
# is dropped: it could send the stack's login to another server.
_PSQL_KEPT_ENV = frozenset({"PGDATESTYLE", "PGTZ", "PGGEQO", "PGCLIENTENCODING"})


class PluginError(Exception):
    """A failure the user can fix: one line on stderr and its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ------------------------------------------------------------------- the API server


def _kubeconfig(args: argparse.Namespace) -> str:
    if args.kubeconfig:
        return str(args.kubeconfig)
    first = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    return first or str(Path.home() / ".kube" / "config")


def _namespace(args: argparse.Namespace, path: str) -> str:
    """``-n``, else the namespace of the (chosen or current) context, else ``default``."""
    if args.namespace:
        return str(args.namespace)
    try:
        contexts, current = config.list_kube_config_contexts(config_file=path)
    except (config.ConfigException, OSError):
        return "default"
    chosen = next((c for c in contexts if c.get("name") == args.context), current)
    return str(((chosen or {}).get("context") or {}).get("namespace") or "default")


async def _connect(args: argparse.Namespace, path: str) -> client.ApiClient:
    try:
        return await config.new_client_from_config(
            config_file=path, context=args.context, persist_config=False
        )
    except (config.ConfigException, OSError) as exc:
        raise PluginError(f"cannot load the kubeconfig {path}: {exc}", EXIT_KUBE) from exc


async def _read_stack(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    try:
        obj: dict[str, Any] = await client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
    except ApiException as exc:
        if exc.status == 404:
            raise PluginError(
                f"no CqrsStack {name} in namespace {namespace}", EXIT_NOT_FOUND
            ) from None
        raise
    return obj


def _typed(obj: Mapping[str, Any]) -> StackSpec:
    meta = obj["metadata"]
    try:
        return parse_spec(
            obj.get("spec") or {},
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta.get("uid", ""),
            status=obj.get("status"),
        )
    except SpecError as exc:
        raise PluginError(f"CqrsStack {meta['name']}: {exc}", EXIT_USAGE) from exc


async def stack_environment(api: client.ApiClient, spec: StackSpec) -> dict[str, str]:
    """The settings the stack's pods get: its ConfigMap, and the URLs of its credentials
    Secret (the active login, also during a rotation)."""
    core = client.CoreV1Api(api)
    names = {
        "ConfigMap": manifests.child_name(spec, "config"),
        "Secret": manifests.child_name(spec, "credentials"),
    }
    kind = "ConfigMap"
    try:
        config_map = await core.read_namespaced_config_map(names["ConfigMap"], spec.namespace)
        kind = "Secret"
        secret = await core.read_namespaced_secret(names["Secret"], spec.namespace)
    except ApiException as exc:
        if exc.status == 403:
            raise PluginError(
                f"the API server refused to read {kind} {names[kind]} in namespace"
                f" {spec.namespace} (403 Forbidden: your account needs get on"
                f" {kind.lower()}s there)",
                EXIT_KUBE,
            ) from exc
        if exc.status == 404:
            raise PluginError(
                f"the stack {spec.name} has no ConfigMap {names['ConfigMap']} or Secret"
                f" {names['Secret']} yet: is the operator provisioning it? (kubectl cqrs status)",
                EXIT_NOT_FOUND,
            ) from exc
        raise
    found = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
    urls = {k: found[k] for k in manifests.SECRET_URL_KEYS if k in found}
    missing = sorted(set(manifests.SECRET_URL_KEYS) - set(urls))
    if missing:
        raise PluginError(
            f"the Secret {names['Secret']} lacks {', '.join(missing)} (still provisioning?)",
            EXIT_NOT_FOUND,
        )
    return {**(config_map.data or {}), **urls, **await _tls_environment(api, spec, urls)}


async def _tls_environment(
    api: client.ApiClient, spec: StackSpec, urls: Mapping[str, str]
) -> dict[str, str]:
    """What the pods get for TLS, with the CA bundles they mount written to local files
    instead (PGSSLMODE, PGSSLROOTCERT; the Redis URL's ssl_ca_certs pointed at the copy)."""
    env: dict[str, str] = {}
    tls = spec.database_tls
    if tls is not None:
        env["PGSSLMODE"] = tls.mode
        if tls.ca is not None:
            env["PGSSLROOTCERT"] = str(await _local_ca(api, spec, tls.ca, "postgresql"))
    if spec.redis_ca is not None:
        mounted = f"{manifests.REDIS_CA_DIR}/{spec.redis_ca.key}"
        local = await _local_ca(api, spec, spec.redis_ca, "redis")
        env["REDIS_URL"] = urls["REDIS_URL"].replace(mounted, str(local))
    return env


async def _local_ca(api: client.ApiClient, spec: StackSpec, ca: CaBundle, which: str) -> Path:
    """The CA bundle (public certificates, not a secret) in a file of this user's cache,
    rewritten on each run (psql replaces this process, so nothing is left to remove it)."""
    core = client.CoreV1Api(api)
    try:
        if ca.kind == "Secret":
            data = (await core.read_namespaced_secret(ca.name, spec.namespace)).data or {}
            pem = base64.b64decode(data[ca.key]).decode() if ca.key in data else None
        else:
            data = (await core.read_namespaced_config_map(ca.name, spec.namespace)).data or {}
            pem = data.get(ca.key)
    except ApiException as exc:
        if exc.status != 404:
            raise
        pem = None
    if pem is None:
        raise PluginError(
            f"the {which} CA bundle {ca.kind} {ca.name} (key {ca.key}) is missing", EXIT_NOT_FOUND
        )
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kubectl-cqrs"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{spec.namespace}.{spec.name}.{which}-ca.crt"
    path.write_text(pem)
    return path


# ------------------------------------------------------------------- status


async def _deployments(
    api: client.ApiClient, namespace: str, stack: str
) -> list[tuple[str, str, str]]:
    """Per component: ready/desired replicas and whether its rollout is done (by name, as
    manifests.child_name names them: an invalid spec still has its Deployments)."""
    apps = client.AppsV1Api(api)
    rows = []
    for component in manifests.COMPONENTS:
        name = f"{stack}-{component}"
        try:
            dep = await apps.read_namespaced_deployment(name, namespace)
        except ApiException as exc:
            if exc.status == 403:
                rows.append((component, "-", f"not shown: reading Deployment {name} is forbidden"))
                continue
            if exc.status != 404:
                raise
            rows.append((component, "-", "not created"))
            continue
        wanted = dep.spec.replicas or 0
        st = dep.status
        ready = (st.ready_replicas or 0) if st else 0
        current = st is not None and st.observed_generation == dep.metadata.generation
        updated = (st.updated_replicas or 0) if st else 0
        state = "available" if current and updated == wanted and ready == wanted else "rolling"
        rows.append((component, f"{ready}/{wanted}", state))
    return rows


async def _dead_letters(environment: Mapping[str, str], stack: str) -> str:
    """The dead-letter count and oldest age, read from the stack's Redis (or why not)."""
    from cqrs_stack import dead_letters, stream

    settings = _settings(environment)
    redis = stream.connect(settings)
    try:
        count = int(await redis.xlen(settings.dead_letter_stream))
        oldest = await dead_letters.oldest_age(redis, settings)
    except Exception as exc:  # any failure to reach it is one line of the screen
        return f"unknown: cannot reach Redis at {where(settings.redis_url)}: {reason_of(exc)}"
    finally:
        await redis.aclose()
    if not count:
        return "0"
    age = "" if oldest is None else f" (oldest {dead_letters.age_text(oldest)} old)"
    return f"{count}{age}: kubectl cqrs dlq list {stack}"


def _raw_image(obj: Mapping[str, Any]) -> str:
    """The image as the (unparsed) spec names it, for a stack whose spec is invalid."""
    image = (obj.get("spec") or {}).get("image") or {}
    if not isinstance(image, Mapping):
        return "?"
    return f"{image.get('repository', '?')}:{image.get('tag', '?')}"


def _scalars(section: Any) -> str:
    if not isinstance(section, Mapping):
        return ""
    return " ".join(
        f"{k}={v}" for k, v in section.items() if isinstance(v, str | int | float | bool)
    )


async def _status(args: argparse.Namespace, api: client.ApiClient, namespace: str) -> int:
    obj = await _read_stack(api, namespace, args.stack)
    st = obj.get("status") or {}
    meta = obj["metadata"]
    # An invalid spec is one line of the screen: its conditions and replicas are still shown.
    spec: StackSpec | None = None
    try:
        spec = _typed(obj)
    except PluginError as exc:
        invalid = str(exc)
    image = spec.image if spec is not None else _raw_image(obj)
    out = [
        f"CqrsStack {namespace}/{args.stack}  phase {st.get('phase', 'Unknown')}  generation"
        f" {meta.get('generation')} (observed {st.get('observedGeneration', '-')})"
        f"  image {image}",
        *([] if spec is not None else [f"invalid spec:  {invalid}"]),
        "",
        f"{'CONDITION':<22} {'STATUS':<8} {'REASON':<26} MESSAGE",
    ]
    for cond in st.get("conditions") or []:
        out.append(
            f"{cond.get('type', ''):<22} {cond.get('status', ''):<8}"
            f" {cond.get('reason', ''):<26} {str(cond.get('message', ''))[:100]}"
        )
    out += ["", f"{'COMPONENT':<12} {'READY':<8} STATE"]
    out += [f"{c:<12} {r:<8} {s}" for c, r, s in await _deployments(api, namespace, args.stack)]
    projector = st.get("projector") or {}
    out += ["", f"projection:    {_scalars(projector) or 'no figures yet'}"]
    if spec is None:
        dead = "unknown: the spec is invalid (see above)"
    else:
        try:
            dead = await _dead_letters(await stack_environment(api, spec), spec.name)
        except PluginError as exc:
            dead = f"not shown: {exc}" if exc.exit_code == EXIT_KUBE else f"unknown: {exc}"
    out.append(f"dead letters:  {dead}")
    requested = (meta.get("annotations") or {}).get(REBUILD_ANNOTATION)
    rebuild = _scalars(st.get("rebuild")) or "none in progress"
    if requested:
        rebuild += f" (last requested: {REBUILD_ANNOTATION}={requested})"
    out.append(f"rebuild:       {rebuild}")
    print("\n".join(out))
    return 0


# ------------------------------------------------------------------- rebuild


async def _rebuild(args: argparse.Namespace, api: client.ApiClient, namespace: str) -> int:
    await _read_stack(api, namespace, args.stack)
    # A new value each time (the operator acts on a change): the time, to the microsecond.
    value = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # Typed loosely: the generated signature does not declare _content_type.
    patch: Callable[..., Awaitable[Any]] = client.CustomObjectsApi(
        api
    ).patch_namespaced_custom_object
    await patch(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        args.stack,
        {"metadata": {"annotations": {REBUILD_ANNOTATION: value}}},
        _content_type="application/merge-patch+json",
    )
    print(
        f"rebuild requested: {REBUILD_ANNOTATION}={value} set on CqrsStack"
        f" {namespace}/{args.stack}; the operator runs the rebuild (kubectl cqrs status"
        f" {args.stack} shows its progress)"
    )
    return 0


# ------------------------------------------------------------------- dlq


def _settings(environment: Mapping[str, str]) -> Settings:
    """Settings as the stack's pods read them: from their environment, which this process
    takes on (so that every message is redacted of the stack's passwords, as theirs are)."""
    os.environ.update(environment)
    return Settings()


async def _stack_settings(args: argparse.Namespace, api: client.ApiClient, ns: str) -> Settings:
    spec = _typed(await _read_stack(api, ns, args.stack))
    return _settings(await stack_environment(api, spec))


# ------------------------------------------------------------------- psql


def psql_environment(url: str) -> dict[str, str]:
    """libpq's variables for a database URL: host, port, database, login and TLS options."""
    parts = urlsplit(url)
    env = {
        "PGHOST": parts.hostname or "localhost",
        "PGPORT": str(parts.port or 5432),
        "PGDATABASE": unquote(parts.path.lstrip("/")),
        "PGUSER": unquote(parts.username or ""),
        "PGPASSWORD": unquote(parts.password or ""),
    }
    for key, value in parse_qsl(parts.query):
        if key in _PSQL_QUERY_ENV:
            env[_PSQL_QUERY_ENV[key]] = value
    return {k: v for k, v in env.items() if v}


def _find_psql(wanted: str) -> str:
    found = shutil.which(wanted)
    if found is None:
        raise PluginError(
            f"psql not found ({wanted!r} is not an executable on PATH): install the PostgreSQL"
            " client (e.g. apt install postgresql-client) or name it with --psql PATH",
            EXIT_NO_PSQL,
        )
    return found


# ------------------------------------------------------------------- the command line


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kubectl cqrs``."""
    parser = argparse.ArgumentParser(
        prog="kubectl cqrs", description="Day-2 commands for CqrsStack resources."
    )
    kube = argparse.ArgumentParser(add_help=False)
    for where_ in (parser, kube):  # accepted before the command and after it
        where_.add_argument("--kubeconfig", default=argparse.SUPPRESS, help="kubeconfig file")
        where_.add_argument("--context", default=argparse.SUPPRESS, help="kubeconfig context")
        where_.add_argument(
            "-n", "--namespace", default=argparse.SUPPRESS, help="the stack's namespace"
        )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    stack = argparse.ArgumentParser(add_help=False)
    stack.add_argument("stack", help="the CqrsStack's name")

    status = commands.add_parser(
        "status", help="conditions, replicas, lag, dead letters, rebuild", parents=[kube, stack]
    )
    status.set_defaults(handler=_status)
    rebuild = commands.add_parser(
        "rebuild",
        help=f"ask the operator for a rebuild ({REBUILD_ANNOTATION})",
        parents=[kube, stack],
    )
    rebuild.set_defaults(handler=_rebuild)
    dlq = commands.add_parser("dlq", help="list, retry or drop the stack's dead letters")
    add_dlq_commands(dlq, [kube, stack])
    dlq.set_defaults(handler=None)
    psql = commands.add_parser(
        "psql",
        help="psql on the stack's read or write DB, as its role (psql's own arguments after --)",
        parents=[kube, stack],
    )
    which = psql.add_mutually_exclusive_group(required=True)
    which.add_argument("--read", action="store_true", help="the read DB")
    which.add_argument("--write", action="store_true", help="the write DB")
    psql.add_argument("--psql", default="psql", help="the psql to run (default: psql on PATH)")
    psql.set_defaults(handler=None)
    return parser


async def _run(args: argparse.Namespace) -> tuple[int, Settings | None, list[str] | None]:
    """Run a Kubernetes-side command; for dlq the stack's settings, for psql its argv+env
    (both run after the client is closed: they start event loops or replace the process)."""
    path = _kubeconfig(args)
    namespace = _namespace(args, path)
    api = await _connect(args, path)
    try:
        if args.command == "dlq":
            return 0, await _stack_settings(args, api, namespace), None
        if args.command == "psql":
            spec = _typed(await _read_stack(api, namespace, args.stack))
            environment = await stack_environment(api, spec)
            settings = _settings(environment)
            url = settings.read_db_url if args.read else settings.write_db_url
            # The TLS variables the stack's pods get: from the stack, not from this process.
            tls = [
                f"{k}={environment[k]}" for k in ("PGSSLMODE", "PGSSLROOTCERT") if k in environment
            ]
            return 0, settings, [url, *tls]
        return int(await args.handler(args, api, namespace)), None, None
    finally:
        await api.close()


def psql_child_environment(
    original: Mapping[str, str], url: str, tls: Mapping[str, str]
) -> dict[str, str]:
    """psql's environment: the user's, less every libpq variable that could redirect the
    connection or its login, plus the stack's TLS variables and the URL's login."""
    kept = {k: v for k, v in original.items() if not k.startswith("PG") or k in _PSQL_KEPT_ENV}
    return {**kept, **tls, **psql_environment(url)}


def _exec_psql(args: argparse.Namespace, url: str, tls: Mapping[str, str]) -> int:
    program = _find_psql(args.psql)
    extra: Sequence[str] = args.psql_args
    env = psql_child_environment(_ORIGINAL_ENVIRONMENT, url, tls)
    # exec: psql takes this process's place; its argv holds no login, its environment does.
    os.execve(program, [program, *extra], env)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kubectl-cqrs`` console script."""
    _ORIGINAL_ENVIRONMENT.update(os.environ)
    given = sys.argv[1:] if argv is None else list(argv)
    # Everything after the first `--` is psql's own (e.g. -c 'select 1').
    cut = given.index("--") if "--" in given else len(given)
    parser = build_parser()
    args = parser.parse_args(given[:cut])
    args.psql_args = given[cut + 1 :]
    if args.psql_args and args.command != "psql":
        parser.error("arguments after -- are for psql only")
    for name in ("kubeconfig", "context", "namespace"):
        setattr(args, name, getattr(args, name, None))
    try:
        code, settings, psql = asyncio.run(_run(args))
        if args.command == "dlq" and settings is not None:
            return run_dlq(args, settings)
        if psql is not None:
            tls = dict(item.split("=", 1) for item in psql[1:])
            return _exec_psql(args, psql[0], tls)
        return code
    except (PluginError, CommandError) as exc:
        print(f"kubectl cqrs {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except ApiException as exc:
        detail = f"{exc.status} {exc.reason}"
        print(f"kubectl cqrs {args.command}: the API server answered {detail}", file=sys.stderr)
        return EXIT_KUBE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the edge: one line, never a secret
        detail = redact_text(f"{type(exc).__name__}: {reason_of(exc)}", known_secrets())
        print(f"kubectl cqrs {args.command}: {detail}", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
