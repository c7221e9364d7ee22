"""The tcpmon command: load | unload | status | dump | serve | run | top.

Every flag has an environment twin (TCPMON_<FLAG>), read after parsing and
only for the command that runs; a flag given on the command line wins.  Errors are one line on stderr and a non-zero exit.
"""
import argparse
import json
import logging
import os
import sys

from tcpmon import __version__, attach, maps, serve_options, state
from tcpmon.serve_options import split_addr
from tcpmon.errors import TcpmonError, describe
from tcpmon.pins import DEFAULT_PIN_DIR, Pins

_LOG_LEVELS = ("debug", "info", "warning", "error")
_READ_MODES = ("auto", "batch", "iterate")


def _env(flag):
    return "TCPMON_" + flag.lstrip("-").upper().replace("-", "_").replace(".", "_")


def _ascii_digits(text):
    return text.isascii() and text.isdigit()


def _whole_number(low, high):
    """An argparse type: an ASCII whole number from `low` to `high` ('²' and '٣' are not)."""
    def whole_number(text):
        if not _ascii_digits(text) or len(text) > len(str(high)) + 8 or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number from {low} to {high}")
        return int(text)
    return whole_number


_positive_int = _whole_number(1, 2 ** 31 - 1)
_MAP_SIZE = _whole_number(1, 1 << 22)      # pid_max can be at most 2^22


def _seconds_between(low, high):
    """An argparse type: a number of seconds in ASCII digits ('1.5', not '1e3', 'nan' or '١')."""
    def seconds(text):
        whole, dot, fraction = text.partition(".")
        if not (_ascii_digits(whole) and (not dot or _ascii_digits(fraction))) or len(text) > 32 \
                or not low <= float(text) <= high:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds from {low} to {high}")
        return float(text)
    return seconds


_seconds = _seconds_between(0.1, 3600)


def _address(text):
    """HOST:PORT with a port from 1 to 65535."""
    try:
        split_addr(text, "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not HOST:PORT with a port from 1 to 65535 "
                                         "(e.g. 0.0.0.0:9090)") from None
    return text


def _pin_dir(text):
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give the bpffs directory (default /sys/fs/bpf/tcpmon)")
    return text


def _path(text):
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give a file")
    return text


def _networks(text):
    """NAME=CIDR,... checked here, so a bad one is a usage error like any other value."""
    from tcpmon.destinations import parse_networks
    try:
        parse_networks(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _web_config(text):
    """A web config file that loads (exporter-toolkit's format), else one line naming the key."""
    from tcpmon import web
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give a web config file")
    try:
        web.load(text)
    except web.WebConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _option(parser, flag, default, help, **kwargs):
    """A flag with an environment twin; the flag wins, then the twin, then `default`."""
    env = _env(flag)
    action = parser.add_argument(flag, default=None, help=f"{help} (env {env}; default: {default})", **kwargs)
    parser.env_twins.append((action, env, default))


def _switch(parser, flag, help):
    """An on/off flag; its twin takes 1/0, true/false, yes/no, on/off."""
    env = _env(flag)
    action = parser.add_argument(flag, action="store_const", const=True, default=None,
                                 help=f"{help} (env {env}; 1 turns it on)")
    parser.env_twins.append((action, env, False))


class _Parser(argparse.ArgumentParser):
    """Fills options left off the command line from their environment twins, for the
    command that runs only (each subcommand parser holds its own twins)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.env_twins = []

    def error(self, message):
        """One line and exit 2: the error, not the usage (`--help` shows that)."""
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, rest = super().parse_known_args(args, namespace)
        for action, env, default in self.env_twins:
            if getattr(namespace, action.dest, None) is None:
                value = self._from_env(action, env, os.environ[env]) if env in os.environ else default
                setattr(namespace, action.dest, value)
        return namespace, rest

    def _from_env(self, action, env, text):
        if action.const is True:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off", ""):
                return False
            self.error(f"{env}='{text}' is not a switch: use 1 or 0")
        try:
            value = action.type(text) if action.type else text
        except (argparse.ArgumentTypeError, ValueError) as exc:
            self.error(f"{env}: {exc}")
        if action.choices and value not in action.choices:
            self.error(f"{env}='{text}' is not one of {', '.join(map(str, action.choices))}")
        return value


def _common(parser):
    _option(parser, "--pin-dir", DEFAULT_PIN_DIR, "bpffs directory holding tcpmon's maps and links",
            type=_pin_dir)
    _option(parser, "--log-level", "info", "log verbosity", choices=_LOG_LEVELS)


def _load_options(parser):
    _option(parser, "--attach", "auto", "connect hook; auto tries fentry, kprobe, tp_btf, tracepoint in order",
            choices=("auto",) + attach.MODE_NAMES)
    _option(parser, "--bpf-object", None, "BPF object to load (default: the one shipped in the package)",
            type=_path)
    _option(parser, "--max-pids", None, "capacity of the per-PID map (processes with connects alive at once)",
            type=_MAP_SIZE)
    _option(parser, "--max-comms", None, "capacity of the per-comm totals map", type=_MAP_SIZE)
    _option(parser, "--max-sockets", None, "capacity of the map of connects in flight", type=_positive_int)
    _option(parser, "--max-outcomes", None, "capacity of the per (cgroup, comm) outcome map", type=_positive_int)
    _switch(parser, "--destinations", "also count connects per remote address and port")
    _option(parser, "--max-destinations", None, "capacity of the destinations map", type=_positive_int)


def _labels(text):
    from tcpmon.attribution import parse_labels
    try:
        parse_labels(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _attribution_options(parser):
    from tcpmon.attribution import DEFAULT_MAX_CGROUPS, DEFAULT_MAX_SERIES
    _option(parser, "--labels", "auto", "attribution labels: auto (unit,container_id,pod_uid, + namespace,pod,"
            "container with --kubernetes), all, none, or a comma list", type=_labels)
    _option(parser, "--max-series", DEFAULT_MAX_SERIES, "label sets per family; the rest are summed into ~other",
            type=_positive_int)
    _option(parser, "--max-cgroups", DEFAULT_MAX_CGROUPS, "cgroup id -> path entries cached", type=_positive_int)
    _cgroup_root_option(parser)
    _switch(parser, "--kubernetes", "namespace, pod and container names from the Kubernetes API (in a pod)")
    _option(parser, "--node-name", None, "this node's name, for --kubernetes (the chart sets it from spec.nodeName)")


def _cgroup_root_option(parser):
    _option(parser, "--cgroup-root", "auto", "where to look for the cgroup2 mount (in a pod: the host's /sys/fs/cgroup)")


def attribution_config(args):
    """The attribution.Config that serve's flags describe."""
    from tcpmon.attribution import Config, parse_labels
    return Config(labels=parse_labels(args.labels, args.kubernetes), max_series=args.max_series,
                  max_cgroups=args.max_cgroups, cgroup_root=args.cgroup_root, kubernetes=args.kubernetes,
                  node_name=args.node_name or "")


def _serve_options(parser):
    _option(parser, "--metrics-addr", "0.0.0.0:9090", "HOST:PORT serving /metrics", type=_address)
    _option(parser, "--health-addr", "0.0.0.0:8080", "HOST:PORT serving /liveness, /readiness, /health",
            type=_address)
    _option(parser, "--workers", 1, "gunicorn worker processes (each its own event loop and map reader)",
            type=_whole_number(1, 64))
    _option(parser, "--threads", serve_options.THREADS, "native threads per worker for map reads, rendering and gzip",
            type=_whole_number(1, 64))
    _option(parser, "--read-mode", "auto", "map read: batch lookups with per-key fallback, or force one",
            choices=_READ_MODES)
    _option(parser, "--read-timeout", serve_options.READ_TIMEOUT, "seconds a connection has, from its accept or its "
            "last response, to send a whole request (and its TLS handshake); then it is closed",
            type=_seconds)
    _option(parser, "--max-connections", serve_options.MAX_CONNECTIONS, "connections each port of a worker holds at "
            "once; more are closed as they arrive", type=_whole_number(1, 1 << 20))
    _option(parser, "--web.config.file", None, "exporter-toolkit web config (TLS, basic auth, headers) for the "
            "metrics port, re-read when it or a certificate changes and on SIGHUP", type=_web_config,
            dest="web_config_file")
    _switch(parser, "--health-tls", "serve the health port with the web config's TLS too (no basic auth)")
    _option(parser, "--networks", None, "NAME=CIDR,... naming remote networks in tcpmon_connect_destinations_total",
            type=_networks)
    _attribution_options(parser)


def _top_options(parser):
    from tcpmon.top import SORT_KEYS
    _option(parser, "--interval", 1.0, "seconds between reads; a rate takes two reads, so --once and --json "
            "read twice this far apart", type=_seconds)
    _option(parser, "--sort", "rate", "row order (keys s, r, t, f, l, p, n on the screen)", choices=SORT_KEYS)
    _option(parser, "--filter", None, "show only rows whose name, pod or unit contains this text, any case "
            "(key / on the screen)")
    _option(parser, "--labels", "auto", "attribution labels the POD/UNIT column is made of: auto "
            "(unit,container_id,pod_uid), none, or a comma list", type=_labels)
    _cgroup_root_option(parser)
    _switch(parser, "--once", "print one frame to stdout and exit: no terminal needed")
    _switch(parser, "--json", "print one JSON document and exit (as --once)")


def build_parser():
    parser = _Parser(prog="tcpmon", description="Count TCP connect attempts per process "
                                     "with eBPF and serve them to Prometheus.")
    parser.add_argument("--version", action="version", version=f"tcpmon {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, help):
        return commands.add_parser(name, help=help)

    load = command("load", "load and attach the probe, pin it, exit")
    _common(load)
    _load_options(load)
    _switch(load, "--foreground", "keep the probe attached only while this process runs (kernels that cannot pin links)")

    unload = command("unload", "detach the probe and remove its pins")
    _common(unload)

    status = command("status", "show what is loaded")
    _common(status)
    _switch(status, "--json", "print JSON")

    dump = command("dump", "print one read of a pinned map (default: the per-PID map)")
    _common(dump)
    _switch(dump, "--json", "print JSON")
    _option(dump, "--map", maps.CONNECTS.name, "the map to print", choices=tuple(maps.BY_NAME))
    _option(dump, "--read-mode", "auto", "map read method", choices=_READ_MODES)

    serve = command("serve", "serve /metrics and health (needs only CAP_BPF)")
    _common(serve)
    _serve_options(serve)

    run = command("run", "load if needed, then serve in the foreground")
    _common(run)
    _load_options(run)
    _serve_options(run)

    top = command("top", "live view of connect rates, failures and latency from the pinned maps "
                  "(no exporter needed)")
    _common(top)
    _top_options(top)
    return parser


def cmd_load(args):
    from tcpmon import loader
    result = loader.load(args.pin_dir, args.attach, args.bpf_object, args.max_pids, args.max_comms,
                         foreground=getattr(args, "foreground", False), max_sockets=args.max_sockets,
                         max_outcomes=args.max_outcomes, destinations=args.destinations,
                         max_destinations=args.max_destinations)
    for line in result.migrated:
        print(f"tcpmon: {line}")
    if result.already_loaded:
        print(f"tcpmon: already attached in mode {result.mode} under {result.pin_dir}")
    else:
        print(f"tcpmon: attached in mode {result.mode} under {result.pin_dir}")
    for mode, why in result.skipped.items():
        print(f"tcpmon: skipped {mode}: {why}")
    if getattr(args, "foreground", False):
        loader.hold(result, ready=lambda: print("tcpmon: holding the probe until SIGTERM or SIGINT", flush=True))
    return 0


def cmd_unload(args):
    from tcpmon import loader
    removed = loader.unload(args.pin_dir)
    print(f"tcpmon: removed {len(removed)} pins from {args.pin_dir}" if removed
          else f"tcpmon: nothing pinned under {args.pin_dir}")
    return 0


def _fill(pins, spec):
    try:
        with maps.open_map(pins, spec) as bpf_map:
            return {"entries": bpf_map.read(), "max_entries": bpf_map.max_entries}
    except (TcpmonError, OSError) as exc:
        return {"error": describe(exc)}


def cmd_status(args):
    pins = Pins(args.pin_dir)
    probe_state = state.inspect(pins)
    report = {"pin_dir": str(pins.dir), "attached": probe_state.attached, "attach_mode": probe_state.mode,
              "problem": probe_state.problem, "programs": probe_state.programs, "links": probe_state.links,
              "held_by_foreground": probe_state.held,
              "maps": {spec.name: _fill(pins, spec) for spec in maps.MAPS if not spec.per_cpu},
              "bpf_stats_enabled": state.bpf_stats_enabled()}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_status(report)
    return 0 if probe_state.attached else 3


def _print_status(report):
    print(f"pin dir:     {report['pin_dir']}")
    print(f"attached:    {'yes, mode ' + report['attach_mode'] if report['attached'] else 'no'}")
    if report["problem"]:
        print(f"problem:     {report['problem']}")
    for pin, info in report["programs"].items():
        print(f"program:     {pin} id {info['id']} ({info['name']})")
    for pin, info in report["links"].items():
        print(f"link:        {pin} id {info['id']} -> program {info['prog_id']}")
    if report["held_by_foreground"]:
        print("links:       held by a live 'tcpmon load --foreground'")
    for name, fill in report["maps"].items():
        text = fill.get("error") or f"{fill['entries']} / {fill['max_entries']} entries"
        print(f"map:         {name}: {text}")
    print(f"bpf stats:   {'on' if report['bpf_stats_enabled'] else 'off (sysctl -w kernel.bpf_stats_enabled=1)'}")


def read_entries(pin_dir, spec, read_mode="auto"):
    """[{field: value}] of one read of `spec`'s map, key fields first; comms as their labels,
    addresses as text, per-CPU values summed."""
    from tcpmon.dumping import readable
    with maps.open_map(Pins(pin_dir), spec) as bpf_map:
        bpf_map.read(read_mode)
        return [readable({**key, **value}) for key, value in spec.entries(bpf_map)]


def read_pid_entries(pin_dir, read_mode="auto"):
    """[{pid, comm, connects}] from one read of the per-PID map, sorted by pid."""
    entries = [{"pid": entry["tgid"], "comm": entry["comm"], "connects": entry["connects"]}
               for entry in read_entries(pin_dir, maps.CONNECTS, read_mode)]
    return sorted(entries, key=lambda entry: entry["pid"])


def cmd_dump(args):
    if args.map == maps.CONNECTS.name:
        entries = read_pid_entries(args.pin_dir, args.read_mode)
    else:
        entries = sorted(read_entries(args.pin_dir, maps.BY_NAME[args.map], args.read_mode),
                         key=lambda entry: json.dumps(entry, sort_keys=True))
    if args.json:
        print(json.dumps(entries))
        return 0
    from tcpmon.dumping import table
    print(table(entries))
    return 0


def cmd_serve(args):
    from tcpmon.server import Exporter
    from tcpmon.destinations import parse_networks
    Exporter(args.pin_dir, args.metrics_addr, args.health_addr, workers=args.workers,
             threads=args.threads, log_level=args.log_level, read_mode=args.read_mode,
             read_timeout=args.read_timeout, max_connections=args.max_connections,
             web_config_file=args.web_config_file, health_tls=args.health_tls,
             networks=parse_networks(args.networks), attribution=attribution_config(args)).run()
    return 0


def cmd_run(args):
    cmd_load(args)
    return cmd_serve(args)


def cmd_top(args):
    from tcpmon import top
    from tcpmon.attribution import Config, parse_labels
    attribution = Config(labels=parse_labels(args.labels), cgroup_root=args.cgroup_root)
    return top.main(args.pin_dir, args.interval, args.sort, args.filter, once=args.once, as_json=args.json,
                    attribution=attribution)


COMMANDS = {"load": cmd_load, "unload": cmd_unload, "status": cmd_status, "dump": cmd_dump,
            "serve": cmd_serve, "run": cmd_run, "top": cmd_top}


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "kubernetes", False) and not args.node_name:
        parser.error("--kubernetes needs --node-name (env TCPMON_NODE_NAME; the chart sets it from spec.nodeName)")
    logging.basicConfig(level=args.log_level.upper(), format="tcpmon: %(levelname)s: %(message)s")
    if args.log_level == "debug" and args.command in ("load", "run"):
        from tcpmon import _libbpf
        _libbpf.set_debug(True)
    try:
        return COMMANDS[args.command](args)
    except (TcpmonError, OSError, ValueError) as exc:
        print(f"tcpmon: {describe(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
