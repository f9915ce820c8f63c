"""``cqrs-stack-operator``: run the CqrsStack operator (kopf, standalone: no peering).

High availability: with ``--leader-elect`` (or CQRS_OPERATOR_LEADER_ELECT=true; the chart
runs two replicas so) the replicas elect a leader on a Lease (``--leader-election-id`` in
``--leader-election-namespace``, default $POD_NAMESPACE); only the leader runs kopf's
handlers, a follower waits. Timings: ``--lease-duration`` (15 s), ``--renew-deadline``
(10 s), ``--retry-period`` (2 s), as client-go's. A leader that cannot renew within the
deadline exits at once (status 3) and is restarted as a follower.

Scope: ``--namespace NS`` (repeatable; or $WATCH_NAMESPACE, comma-separated) or
``--all-namespaces`` (or WATCH_NAMESPACE="*"). Tuning by environment:
CQRS_OPERATOR_STATUS_INTERVAL (seconds between two full reconciles of a stack, default 15),
CQRS_OPERATOR_RETRY_DELAY (first back-off after a failure, default 5),
CQRS_OPERATOR_DELETE_TIMEOUT (seconds a failing teardown is retried before the finalizer is
released, default 300), LOG_LEVEL.

Upgrades: ``--image-tag`` (or $CQRS_OPERATOR_IMAGE_TAG; default the operator's own version)
is the tag of every stack that pins no ``spec.image.tag``: such stacks move with the
operator. ``--crd FILE`` (or $CQRS_OPERATOR_CRD) applies that CustomResourceDefinition at
start with server-side apply, so that a ``helm upgrade`` brings a new CRD (Helm never
upgrades ``crds/``), unless the live CRD is of a newer release (``cqrs.dev/operator-version``).

Metrics: ``--metrics-port N`` (or $CQRS_OPERATOR_METRICS_PORT; default 0, none) serves
``/metrics`` in the Prometheus text format on ``--metrics-host`` (default 0.0.0.0): reconcile
durations and errors, stacks by phase, each stack's Ready (see cqrs_operator.metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

import kopf

from . import __version__, kube, leadership, metrics

LOG_FORMAT = "time=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cqrs-stack-operator",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="namespace to watch (repeatable); default $WATCH_NAMESPACE",
    )
    scope.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        help="watch CqrsStacks in every namespace (needs the ClusterRole)",
    )
    parser.add_argument(
        "--liveness",
        default=os.environ.get("OPERATOR_LIVENESS_ENDPOINT"),
        help="serve a liveness probe, e.g. http://0.0.0.0:8080/healthz",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    parser.add_argument(
        "--image-tag",
        default=os.environ.get("CQRS_OPERATOR_IMAGE_TAG") or __version__,
        help="image tag of stacks that pin none (default: the operator's version)",
    )
    parser.add_argument(
        "--crd",
        default=os.environ.get("CQRS_OPERATOR_CRD") or None,
        metavar="FILE",
        help="apply this CustomResourceDefinition (YAML) at start, server-side",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=os.environ.get("CQRS_OPERATOR_METRICS_PORT") or "0",
        help="serve Prometheus /metrics on this port (0: none)",
    )
    parser.add_argument(
        "--metrics-host",
        default=os.environ.get("CQRS_OPERATOR_METRICS_HOST") or "0.0.0.0",
        help="address the metrics port listens on (default 0.0.0.0)",
    )
    _election_args(parser)
    args = parser.parse_args(argv)
    if not 0 <= args.metrics_port <= 65535:
        parser.error(f"--metrics-port {args.metrics_port}: give 0 (none) to 65535")
    if args.leader_elect:
        args.election = _election_config(parser, args)
    if not args.namespace and not args.all_namespaces:
        env = os.environ.get("WATCH_NAMESPACE", "").strip()
        if env == "*":
            args.all_namespaces = True
        else:
            args.namespace = [ns.strip() for ns in env.split(",") if ns.strip()]
    if not args.namespace and not args.all_namespaces:
        parser.error("give --namespace NS, --all-namespaces or WATCH_NAMESPACE")
    return args


# The election's timings: (flag, environment variable, type, help). The default of each is
# ElectionConfig's field of the flag's name.
_TIMINGS: tuple[tuple[str, str, type[int] | type[float], str], ...] = (
    (
        "--lease-duration",
        "CQRS_OPERATOR_LEASE_DURATION",
        int,
        "seconds a follower waits for an unrenewed Lease before taking it",
    ),
    (
        "--renew-deadline",
        "CQRS_OPERATOR_RENEW_DEADLINE",
        float,
        "seconds the leader tries to renew before it stops leading",
    ),
    (
        "--retry-period",
        "CQRS_OPERATOR_RETRY_PERIOD",
        float,
        "seconds between two tries to acquire or renew",
    ),
)


def _election_args(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    defaults = leadership.ElectionConfig("", "", "")
    group = parser.add_argument_group("leader election (several replicas, one reconciles)")
    # The timing defaults are strings: argparse converts them with ``type`` as it does a
    # command-line value, so a bad $CQRS_OPERATOR_LEASE_DURATION is a usage error naming
    # the option, not a traceback.
    group.add_argument(
        "--leader-elect",
        action="store_true",
        default=env("CQRS_OPERATOR_LEADER_ELECT", "").lower() in ("1", "true", "yes"),
        help="elect a leader on a Lease before reconciling ($CQRS_OPERATOR_LEADER_ELECT)",
    )
    group.add_argument(
        "--leader-election-namespace",
        default=env("CQRS_OPERATOR_LEASE_NAMESPACE") or leadership.default_namespace(),
        help="namespace of the Lease (default $POD_NAMESPACE, else the pod's own)",
    )
    group.add_argument(
        "--leader-election-id",
        default=env("CQRS_OPERATOR_LEASE_NAME", "cqrs-stack-operator"),
        help="name of the Lease (one per operator installation)",
    )
    group.add_argument(
        "--leader-election-identity",
        default=None,
        help="this replica's name in the Lease (default: pod name + random suffix)",
    )
    for flag, variable, kind, what in _TIMINGS:
        default = getattr(defaults, flag.removeprefix("--").replace("-", "_"))
        group.add_argument(
            flag,
            type=kind,
            default=env(variable) or str(default),
            help=f"{what} ({default:g}; ${variable})",
        )


def _election_config(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> leadership.ElectionConfig:
    if not args.leader_election_namespace:
        parser.error("--leader-elect needs --leader-election-namespace or $POD_NAMESPACE")
    config = leadership.ElectionConfig(
        namespace=args.leader_election_namespace,
        name=args.leader_election_id,
        identity=args.leader_election_identity or leadership.default_identity(),
        lease_duration=args.lease_duration,
        renew_deadline=args.renew_deadline,
        retry_period=args.retry_period,
    )
    if problem := config.problem():
        parser.error(problem)
    return config


async def run_elected(
    config: leadership.ElectionConfig, liveness: str | None, **operator: Any
) -> None:
    """Wait to lead, then run kopf while renewing the Lease; release it on a graceful stop."""
    api = await kube.connect()
    elected = leadership.Leadership(api, config)
    try:
        async with leadership.follower_liveness(liveness, elected):
            await elected.acquire()
        # Until kopf installs its own handlers (as it starts), a SIGTERM or Ctrl-C just after
        # the Lease was acquired took the signal's default action: the process died holding
        # the Lease, and the follower waited out its duration. A stop flag kopf honours instead.
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for stop_signal in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(stop_signal, stopping.set)
        operator["memo"].leadership = elected  # the handlers and their API client check it
        keeper = asyncio.create_task(elected.keep(), name="lease renewal")
        keeper.add_done_callback(_renewal_ended)
        try:
            await kopf.operator(
                standalone=True, liveness_endpoint=liveness, stop_flag=stopping, **operator
            )
        finally:
            keeper.remove_done_callback(_renewal_ended)
            keeper.cancel()
            await elected.release()
    finally:
        await api.close()


def _renewal_ended(task: asyncio.Task[None]) -> None:
    """The renewal loop never ends on its own: if it crashed, nobody renews; stop leading."""
    if not task.cancelled():
        logging.getLogger(__name__).error("lease renewal failed: %r", task.exception())
        os._exit(leadership.LOST_EXIT_CODE)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    from . import handlers  # noqa: F401  (registers the handlers)

    if args.metrics_port:
        try:
            metrics.serve(args.metrics_port, args.metrics_host)
        except OSError as exc:
            print(
                f"cqrs-stack-operator: cannot serve metrics on "
                f"{args.metrics_host}:{args.metrics_port}: {exc.strerror}",
                file=sys.stderr,
            )
            return 2

    logging.getLogger(__name__).info(
        "operator starting version=%s image_tag=%s namespaces=%s all_namespaces=%s crd=%s "
        "metrics_port=%s",
        __version__,
        args.image_tag,
        ",".join(args.namespace) or "-",
        args.all_namespaces,
        args.crd or "-",
        args.metrics_port or "-",
    )
    memo = kopf.Memo(image_tag=args.image_tag, crd_file=args.crd)
    if args.leader_elect:
        asyncio.run(
            run_elected(
                args.election,
                args.liveness,
                memo=memo,
                clusterwide=args.all_namespaces,
                namespaces=args.namespace,
            )
        )
        return 0
    kopf.run(
        memo=memo,
        standalone=True,
        clusterwide=args.all_namespaces,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
