"""`medfed coordinator`: set up, enrol nodes for, start, stop and check the alliance's SuperLink.

User mistakes raise :class:`~federation.errors.CoordinatorError` (or a privacy error for
certificates and enrolment files); ``medfed.cli.main`` prints them as one line and
exits with code 2.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from federation.coordinator import CONNECTION, DEFAULT_CONTROL_ADDRESS, DEFAULT_FLEET_PORT, Coordinator
from privacy.pki import CA_CERT_FILE

__all__ = ["app"]

HOME_ENVVAR = "MEDFED_COORDINATOR_HOME"
_HOME_HELP = "The coordinator home folder (holds coordinator.toml, the PKI and the SuperLink state)."
_MODES_SHOWN = 10

app = typer.Typer(help="Run the alliance coordinator (Flower SuperLink with TLS and node authentication).",
                  no_args_is_help=True)


@app.command()
def init(
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    host: list[str] = typer.Option([], "--host", help="A DNS name hospitals dial (repeatable)."),
    address: list[str] = typer.Option([], "--address", help="An IP address hospitals dial (repeatable)."),
    fleet_port: int = typer.Option(DEFAULT_FLEET_PORT, "--fleet-port", help="Port of the gRPC Fleet API."),
    fleet_bind: str | None = typer.Option(
        None, "--fleet-bind",
        help="HOST:PORT the gRPC Fleet API listens on (default: 0.0.0.0:<fleet port>, every interface).",
    ),
    fleet_address: str | None = typer.Option(
        None, "--fleet-address", help="HOST:PORT the nodes dial (default: the first --host or --address)."
    ),
    control_address: str = typer.Option(
        DEFAULT_CONTROL_ADDRESS, "--control-address", help="Loopback HOST:PORT of the unauthenticated control API."
    ),
) -> None:
    """Create the alliance CA, the SuperLink's certificate, coordinator.toml and the partners' connection."""
    coordinator = Coordinator.init(
        home, hosts=host, addresses=address, fleet_port=fleet_port, fleet_bind=fleet_bind,
        fleet_address=fleet_address, control_address=control_address,
    )
    info = coordinator.check_certificate()
    partner = coordinator.partner_home
    typer.echo(f"created coordinator home {coordinator.home}")
    typer.echo(f"  CA certificate {coordinator.ca_path}")
    typer.echo(f"  server certificate for {', '.join(info.dns_names + info.ip_addresses)}, "
               f"valid until {info.not_after:%Y-%m-%d} ({info.days_left} days)")
    typer.echo(f"  Fleet API listens on {coordinator.config.fleet_bind}; nodes dial {coordinator.config.fleet_address}; "
               f"control API on {coordinator.config.control_address}")
    typer.echo(f"research partners' connection {partner} (config.toml and {CA_CERT_FILE}); to submit from this host:")
    typer.echo(f"  FLWR_HOME={partner} medfed experiment submit SPEC --superlink {CONNECTION} --key PARTNER.key")
    typer.echo(f"  copied elsewhere, set root-certificates in config.toml to the absolute path of its {CA_CERT_FILE}; "
               "the control API must be reachable from there (`medfed coordinator start --expose-control-on`)")


@app.command()
def enrol(
    request: Path = typer.Argument(..., help="The node's enrolment request file (from `medfed node init`)."),
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    out: Path | None = typer.Option(None, "--out", help="Where to write the bundle (default: <node>.enrolment.toml)."),
) -> None:
    """Register a node's auth key with the running SuperLink and write its enrolment bundle."""
    from privacy.enrolment import EnrolmentRequest

    coordinator = Coordinator.open(home)
    target = out or Path(f"{EnrolmentRequest.read(request).node}.enrolment.toml")
    bundle = coordinator.enrol(request, out=target)
    typer.echo(f"enrolled node {bundle.node!r} as SuperNode {bundle.node_id} (auth key {bundle.auth_key_fingerprint})")
    typer.echo(f"send {target} to the site; it installs it with `medfed node enrol {target.name}`")


@app.command()
def start(
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    expose_control_on: str | None = typer.Option(
        None, "--expose-control-on", help="Serve the control API on this HOST:PORT instead of loopback."
    ),
    acknowledged: bool = typer.Option(
        False, "--i-understand-the-control-api-is-unauthenticated",
        help="Required with a non-loopback --expose-control-on: anyone who reaches it can submit runs.",
    ),
    foreground: bool = typer.Option(False, "--foreground", help="Stay in the foreground (for systemd)."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait for the SuperLink to be ready."),
) -> None:
    """Start flower-superlink with TLS and SuperNode authentication; wait until it is ready."""
    coordinator = Coordinator.open(home)
    if foreground:
        typer.echo(f"starting the SuperLink in the foreground; log {coordinator.log_path}")
        coordinator.start(expose_control_on=expose_control_on,
                          i_understand_the_control_api_is_unauthenticated=acknowledged,
                          foreground=True, timeout=timeout)
        return
    pid = coordinator.start(expose_control_on=expose_control_on,
                            i_understand_the_control_api_is_unauthenticated=acknowledged, timeout=timeout)
    typer.echo(f"SuperLink running (pid {pid}): fleet {coordinator.config.fleet_bind}, "
               f"control {expose_control_on or coordinator.config.control_address}; log {coordinator.log_path}")


@app.command()
def stop(home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP)) -> None:
    """Stop the SuperLink (SIGTERM to its process group, then wait)."""
    pid = Coordinator.open(home).stop()
    typer.echo("the SuperLink was not running" if pid is None else f"stopped the SuperLink (pid {pid})")


@app.command()
def status(home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP)) -> None:
    """Is the SuperLink running and healthy; certificate days left; SuperNodes it knows."""
    coordinator = Coordinator.open(home)
    report = coordinator.status()
    failed = False
    if report.running:
        typer.echo(f"ok    SuperLink running (pid {report.pid}), health {'ok' if report.healthy else 'NOT answering'}")
        failed |= not report.healthy
    else:
        typer.echo("fail  SuperLink not running; start it with `medfed coordinator start`")
        failed = True
    cert = report.certificate
    if cert is None:
        typer.echo(f"fail  server certificate: {report.certificate_problem}")
        failed = True
    else:
        level = "warn " if cert.expires_soon else "ok   "
        typer.echo(f"{level} server certificate valid until {cert.not_after:%Y-%m-%d} ({cert.days_left} days left)"
                   + ("; run `medfed coordinator renew`" if cert.expires_soon else ""))
    if report.healthy:
        online = sum(1 for n in report.nodes if str(n.get("status", "")).lower() == "online")
        typer.echo(f"ok    {len(report.nodes)} SuperNodes registered, {online} online")
    if report.loose_modes:
        failed = True
        for loose in report.loose_modes[:_MODES_SHOWN]:
            typer.echo(f"fail  file modes: {loose}")
        rest = len(report.loose_modes) - _MODES_SHOWN
        if rest > 0:
            typer.echo(f"fail  file modes: {rest} more paths in {coordinator.home} are open to other users; "
                       f"run `chmod -R go-rwx {shlex.quote(str(coordinator.home))}`")
    else:
        typer.echo(f"ok    file modes: {coordinator.home} and everything in it are the operator's alone")
    if failed:
        raise typer.Exit(1)


@app.command()
def renew(
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    days: int | None = typer.Option(None, "--days", min=1, help="Validity in days (default 397)."),
) -> None:
    """Re-issue the SuperLink's server certificate (new key, same names); then restart it."""
    coordinator = Coordinator.open(home)
    info = coordinator.renew(days=days)
    typer.echo(f"renewed {coordinator.server_cert_path}: valid until {info.not_after:%Y-%m-%d} ({info.days_left} days)")
    if coordinator.pid() is not None:
        typer.echo("the running SuperLink still uses the old certificate: "
                   "`medfed coordinator stop` and `medfed coordinator start` to switch")
