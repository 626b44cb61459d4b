"""The ``infergate`` command: ``serve``, ``check``, ``plugins`` and ``route explain``;
``jobs``, ``deliveries``, ``studies`` and ``selftest`` ask a running gateway."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from infergate import __version__
from infergate.config import Settings, load_settings
from infergate.dicom.tls import client_context, server_context
from infergate.errors import ConfigError, InfergateError, OpsClientError
from infergate.inference.embedded import EmbeddedTriton
from infergate.ingest.listener_pool import ListenerPool
from infergate.ingest.spool import Spool
from infergate.logs import configure_logging, get_logger
from infergate.ops import commands
from infergate.plugins import (
    LoadedPlugin,
    check_plugin_names,
    check_plugins,
    discover,
    enabled_plugins,
)
from infergate.routing.explain import explain
from infergate.store import Recovered, Store
from infergate.work.forkserver import start_forkserver
from infergate.work.states import JobState

if TYPE_CHECKING:
    from infergate.inference.endpoints import Endpoints

log = get_logger("infergate.cli")


@contextlib.contextmanager
def triton_for(
    settings: Settings,
    plugins: list[LoadedPlugin],
    meanwhile: Callable[[], None] | None = None,
    *,
    share: bool = False,
) -> Iterator[tuple[Endpoints, EmbeddedTriton | None]]:
    """The configured Triton endpoints, at least one of them ready, and the embedded
    Triton when Infergate runs it (started here with the models of ``plugins``,
    stopped on leaving). ``meanwhile`` runs while the embedded Triton loads its models
    (seconds: its Python-backend stubs import numpy and scipy). ``share``: the
    embedded Triton of a gateway that runs on the same state folder is used as it is
    (``check`` beside ``serve``)."""
    embedded = None
    try:
        if settings.triton.mode == "embedded":
            embedded = EmbeddedTriton(
                settings.triton,
                settings.node_dir / "triton",
                models=tuple(p.spec.model_name for p in plugins),
            )
            gateway = embedded.serving_gateway() if share else None
            if gateway is not None:
                log.info("triton.embedded.shared", gateway_pid=gateway)
                embedded = None
            else:
                embedded.launch()
        if meanwhile is not None:
            meanwhile()
        if embedded is not None:
            embedded.wait_ready()
        # The gRPC client's modules, imported once tritonserver is launched (see launch).
        from infergate.inference.endpoints import Endpoints
        from infergate.inference.shared_memory import remove_stale_regions

        triton = settings.triton
        if any(triton.shared_memory_with(url) for url in triton.endpoints):
            remove_stale_regions()
        endpoints = Endpoints.for_settings(triton)
        try:
            ready = endpoints.check()
            for url in endpoints.urls:
                if url not in ready:
                    log.warning("triton.endpoint.not_ready", url=url)
            if not ready:
                raise InfergateError(
                    f"Triton at {', '.join(endpoints.urls)} is not ready"
                    if len(endpoints.urls) == 1
                    else f"no Triton endpoint is ready (of {', '.join(endpoints.urls)})"
                )
            yield endpoints, embedded
        finally:
            endpoints.close()
    finally:
        if embedded is not None:
            embedded.stop()


def serve(settings: Settings) -> int:
    stop = threading.Event()
    failed = False

    def on_signal(signum: int, _frame: object) -> None:
        log.info("serve.signal", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    check_tls_files(settings)
    plugins = enabled_plugins(settings, discover())
    check_plugin_names(settings, plugins)
    for loaded in plugins:
        log.info("plugins.loaded", plugin=loaded.spec.name, version=loaded.spec.version)
    store = Store(settings.storage.database, pool_size=settings.storage.database_pool_size)
    listeners = ListenerPool(settings, store)
    recovered = Recovered()
    taking_since = 0.0

    def meanwhile() -> None:
        """While Triton loads its models (Triton is launched first: its model stubs take
        the longest to start): what the last run left, then the listeners. Instances are
        taken (and kept durably) from the first seconds; their series wait for the
        stages, which start once Triton is ready."""
        nonlocal recovered, taking_since
        recovered = _clean_after_the_last_run(store, settings)
        if settings.work.job_processes:
            start_forkserver()  # it warms up, at a lower priority, while Triton starts
        listeners.start()
        taking_since = time.time()
        # The stages' modules, imported while Triton loads (see infergate.stages).
        import infergate.stages  # noqa: F401

    try:
        with triton_for(settings, plugins, meanwhile=meanwhile) as (endpoints, embedded):
            from infergate.stages import run_stages  # imported by meanwhile

            failed = run_stages(
                settings,
                store,
                plugins=plugins,
                endpoints=endpoints,
                embedded=embedded,
                listeners=listeners,
                taking_since=taking_since,
                recovered=recovered,
                stop=stop,
            )
    finally:
        listeners.stop()
    store.leave(settings.node.name)
    store.close()
    log.info("serve.stopped", failed=failed)
    # A stage that could no longer work is a failure: a supervisor (systemd's
    # Restart=on-failure, Kubernetes) must see it and start the gateway again.
    return 1 if failed else 0


def _clean_after_the_last_run(store: Store, settings: Settings) -> Recovered:
    """What this node's last run left, before its listeners start: its half-written
    spool files, and the work it held (associations, jobs, deliveries, notifications;
    every node's on SQLite, where there is only this one). The node then beats: it
    is alive, to the nodes it shares the database with."""
    node, now = settings.node.name, time.time()
    alone = store.backend == "sqlite"
    # A shared spool's tmp/ has a folder for each node; a lone node's is all its own.
    orphans = Spool(settings.storage.spool_dir, None if alone else node).clean_orphans()
    if orphans:
        log.warning("ingest.spool.orphans_removed", files=orphans)
    others = [
        n.node
        for n in store.nodes()
        if n.node != node and n.heartbeat_at >= now - settings.work.lease_s
    ]
    recovered = store.recover(
        now,
        settings.work.max_interruptions,
        nodes=None if alone else [node],
        fresh_quiet=not others,
    )
    store.beat(node, now, started_at=now, version=__version__)
    if recovered.associations:
        log.warning("ingest.associations.ended_at_start", associations=recovered.associations)
    return recovered


def check_tls_files(settings: Settings) -> None:
    """The certificate, key and CA files of the TLS listener and of every TLS
    destination can be used; raises :class:`ConfigError` naming the one that cannot."""
    if settings.ingest.tls is not None:
        server_context(settings.ingest.tls)
    for destination in settings.destinations():
        if destination.tls is not None:
            client_context(destination.tls)


def check(settings: Settings) -> int:
    from infergate.export.scu import echo
    from infergate.export.stow import reach

    check_tls_files(settings)
    plugins = enabled_plugins(settings, discover())
    check_plugin_names(settings, plugins)
    if not plugins:
        log.warning("check.no_plugins")
    with triton_for(settings, plugins, share=True) as (endpoints, _):
        ready = endpoints.ready()
        for url in ready:
            check_plugins(endpoints.client(url), plugins)
        # A replica that does not answer is a fault to report, though serve would run.
        not_ready = len(endpoints.urls) - len(ready)
    unreachable = 0
    for destination in settings.destinations():
        reason = (
            reach(destination, settings.export.timeout_s)
            if destination.dicomweb
            else echo(destination, settings.ingest.ae_title, settings.export.timeout_s)
        )
        if reason is None:
            log.info("check.destination.answered", destination=destination.ae_title)
        else:
            unreachable += 1
            log.error(
                "check.destination.unreachable", destination=destination.ae_title, reason=reason
            )
    if unreachable or not_ready:
        log.error(
            "check.failed",
            destinations_unreachable=unreachable,
            triton_endpoints_not_ready=not_ready,
        )
        return 1
    log.info("check.ok", plugins=len(plugins), destinations=len(settings.destinations()))
    return 0


def list_plugins() -> int:
    for loaded in discover():
        spec = loaded.spec
        print(f"{spec.name} {spec.version}")
        print(f"  {spec.description}")
        print(f"  modalities: {', '.join(sorted(spec.modalities))}")
        rule = json.dumps(spec.rule) if spec.rule else "acquired images of its modalities"
        print(f"  default rule ({spec.priority}): {rule}")
        if spec.opt_in:
            print("  opt-in: runs only where plugins.enabled lists it")
        print(
            f"  Triton model: {spec.model_name}"
            + (f" v{spec.model_version}" if spec.model_version else "")
        )
        for kind, tensors in (("inputs", spec.inputs), ("outputs", spec.outputs)):
            described = ", ".join(f"{t.name} {t.datatype} {list(t.shape)}" for t in tensors)
            print(f"  {kind}: {described}")
        if spec.segments:
            print(f"  segments: {', '.join(f'{s.number}={s.label}' for s in spec.segments)}")
        print(f"  from: {loaded.source}")
    return 0


def explain_routes(settings: Settings, path: Path, calling_ae: str, called_ae: str | None) -> int:
    plugins = enabled_plugins(settings, discover())
    check_plugin_names(settings, plugins)
    for line in explain(settings, plugins, path, calling_ae, called_ae):
        print(line)
    return 0


def _admin_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``jobs``, ``deliveries``, ``studies``, ``notifications`` and ``selftest``: they ask
    the running gateway."""
    jobs = commands.add_parser("jobs", help="jobs of the running gateway: list, show ID, retry ID")
    jobs.add_argument("action", nargs="?", choices=["show", "retry"])
    jobs.add_argument("job_id", nargs="?")
    jobs.add_argument("--state", choices=[s.value for s in JobState])
    jobs.add_argument("--plugin")
    jobs.add_argument("--since", help="changed since: 90m, 2h, 1d, or 2026-12-01T08:00")
    deliveries = commands.add_parser(
        "deliveries", help="deliveries of results: list, or replay ID | --all-dead"
    )
    deliveries.add_argument("action", nargs="?", choices=["replay"])
    deliveries.add_argument("delivery_id", nargs="?")
    deliveries.add_argument("--dead", action="store_true", help="only dead letters")
    deliveries.add_argument("--all-dead", action="store_true", help="replay every dead letter")
    deliveries.add_argument("--to", help="replay to this configured destination (AE title)")
    studies = commands.add_parser("studies", help="per study: what arrived, ran, was delivered")
    nodes = commands.add_parser(
        "nodes", help="the gateway nodes on this state store: list, or forget NAME (a gone one)"
    )
    nodes.add_argument("action", nargs="?", choices=["forget"])
    nodes.add_argument("node", nargs="?")
    notifications = commands.add_parser(
        "notifications", help="critical findings sent to people: list, or resend ID (a dead one)"
    )
    notifications.add_argument("action", nargs="?", choices=["resend"])
    notifications.add_argument("notification_id", nargs="?")
    notifications.add_argument("--dead", action="store_true", help="only dead letters")
    for sub in (jobs, deliveries, studies, notifications, nodes):
        sub.add_argument("--config", type=Path, help="the running gateway's YAML settings")
        sub.add_argument("--json", action="store_true", help="JSON instead of a table")
        sub.add_argument("--limit", type=int, default=100, help="at most this many rows")
    selftest = commands.add_parser(
        "selftest", help="send a generated study through the running gateway and check it"
    )
    selftest.add_argument("--config", type=Path, help="the running gateway's YAML settings")
    selftest.add_argument(
        "--destination", help="also send the results to this configured destination (AE title)"
    )
    selftest.add_argument("--timeout", type=float, default=600.0, help="seconds to wait, in all")


def _admin(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "selftest":
        from infergate.ops.selftest import run_selftest

        return run_selftest(settings, destination=args.destination, timeout_s=args.timeout)
    if args.command == "studies":
        return commands.studies(settings, limit=args.limit, as_json=args.json)
    asking = {"nodes": _nodes, "notifications": _notifications, "deliveries": _deliveries}
    return asking.get(args.command, _jobs)(args, settings)


def _deliveries(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "replay":
        return commands.replay(settings, args.delivery_id, all_dead=args.all_dead, to=args.to)
    return commands.deliveries(settings, dead=args.dead, limit=args.limit, as_json=args.json)


def _nodes(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "forget":
        return commands.forget(settings, args.node)
    return commands.nodes(settings, limit=args.limit, as_json=args.json)


def _notifications(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "resend":
        return commands.resend(settings, args.notification_id)
    return commands.notifications(settings, dead=args.dead, limit=args.limit, as_json=args.json)


def _jobs(args: argparse.Namespace, settings: Settings) -> int:
    if args.action is not None and args.job_id is None:
        raise OpsClientError(f"jobs {args.action} takes a job id")
    if args.action == "show":
        return commands.job_show(settings, args.job_id, as_json=args.json)
    if args.action == "retry":
        return commands.job_retry(settings, args.job_id)
    return commands.jobs(
        settings,
        state=args.state,
        plugin=args.plugin,
        since=args.since,
        limit=args.limit,
        as_json=args.json,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infergate", description="DICOM inference gateway")
    parser.add_argument("--version", action="version", version=f"infergate {__version__}")
    commands_ = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("serve", "receive studies, run plugins on Triton, send results"),
        ("check", "check config, plugins and their Triton models, then exit"),
        ("plugins", "list installed plugins"),
        ("route", "explain routing: route explain PATH"),
    ):
        sub = commands_.add_parser(name, help=text)
        sub.add_argument("--config", type=Path, help="YAML settings file")
        if name == "route":
            sub.add_argument("action", choices=["explain"])
            sub.add_argument("path", type=Path, help="a DICOM file or a folder of them")
            sub.add_argument("--calling-ae", default="", help="as if sent by this AE title")
            sub.add_argument("--called-ae", help="as if sent to this AE title of ours")
    _admin_parsers(commands_)
    args = parser.parse_args(argv)
    configure_logging()  # until the settings say otherwise; a config error is logged too
    try:
        settings = load_settings(args.config)
        if args.command in _ASKING:
            # What they print is for a person or a script; their log lines are warnings up.
            configure_logging("warning", form=settings.logging.format)
            return _admin(args, settings)
        configure_logging(
            settings.logging.level, form=settings.logging.format, node=settings.node.name
        )
        if args.command == "plugins":
            return list_plugins()
        if args.command == "route":
            return explain_routes(settings, args.path, args.calling_ae, args.called_ae)
        if args.command == "check":
            return check(settings)
        return serve(settings)
    except InfergateError as exc:
        log.error(f"{args.command}.failed", error=type(exc).__name__, reason=str(exc))
        print(f"infergate {args.command}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1


# The commands that ask a running gateway (its ops endpoint) rather than being one.
_ASKING = frozenset({"jobs", "deliveries", "studies", "notifications", "nodes", "selftest"})


if __name__ == "__main__":
    sys.exit(main())
