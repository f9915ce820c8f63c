"""``cqrs-stack-operator``: run the CqrsStack operator (kopf, standalone: no peering).

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
import logging
import os
import sys

import kopf

from . import __version__, metrics

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
    args = parser.parse_args(argv)
    if not 0 <= args.metrics_port <= 65535:
        parser.error(f"--metrics-port {args.metrics_port}: give 0 (none) to 65535")
    if not args.namespace and not args.all_namespaces:
        env = os.environ.get("WATCH_NAMESPACE", "").strip()
        if env == "*":
            args.all_namespaces = True
        else:
            args.namespace = [ns.strip() for ns in env.split(",") if ns.strip()]
    if not args.namespace and not args.all_namespaces:
        parser.error("give --namespace NS, --all-namespaces or WATCH_NAMESPACE")
    return args


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
    kopf.run(
        memo=kopf.Memo(image_tag=args.image_tag, crd_file=args.crd),
        standalone=True,
        clusterwide=args.all_namespaces,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
