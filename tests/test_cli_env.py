"""Every flag's environment twin, of every command, against any text (hypothesis): the parser
either takes the value with the flag's type or stops with exit 2 and one line naming the variable,
never a traceback.  The parser is cli.build_parser() itself, so a flag added later is covered."""
import contextlib
import io
import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, TCPMON
from tcpmon import cli


def _twins():
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    return [(name, env, action) for name, sub in commands.items() for action, env, _ in sub.env_twins]


TWINS = _twins()
NASTY = ["", " ", "0", "-1", "+1", "²", "٣", "१२", "１２", "0x10", "1_000", "1e3", "1.5", ".5", "5.", "nan", "inf",
         "-inf", "65536", "4294967296", "9" * 30, "9" * 5000, "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:", ":9090",
         "[::]:9090", "host:port", "yes", "on", "TRUE", "2", "/", ".", "/dev/null", "/nonexistent", "a\nb", "\t"]
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)


@contextlib.contextmanager
def environment(env, value):
    saved = dict(os.environ)
    for key in [key for key in os.environ if key.startswith("TCPMON_")]:
        del os.environ[key]
    os.environ[env] = value
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def parse(command, env, value):
    """(namespace or None, exit code or None, stderr) of `tcpmon COMMAND` with env=value."""
    stderr = io.StringIO()
    with environment(env, value), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            return cli.build_parser().parse_args([command]), None, stderr.getvalue()
        except SystemExit as exc:
            return None, exc.code, stderr.getvalue()


def check(command, env, action, value):
    namespace, code, stderr = parse(command, env, value)
    if namespace is None:
        assert code == 2, (value, code, stderr)
        assert stderr.count("\n") == 1 and stderr.startswith(f"tcpmon {command}: error: {env}"), (value, stderr)
        return
    got = getattr(namespace, action.dest)
    if action.const is True:
        assert isinstance(got, bool)
    elif action.type is not None:
        assert got == action.type(value)
    if action.choices:
        assert got in action.choices


IDS = [f"{command}-{env}" for command, env, _ in TWINS]


@pytest.mark.parametrize("command, env, action", TWINS, ids=IDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.one_of(TEXT, st.integers().map(str)))
def test_any_text_in_an_env_twin_is_taken_or_refused_in_one_line(command, env, action, value):
    check(command, env, action, value)


@pytest.mark.parametrize("command, env, action", TWINS, ids=IDS)
def test_nasty_values_in_every_env_twin(command, env, action):
    for value in NASTY:
        check(command, env, action, value)


@pytest.mark.parametrize("command, env, value, words", [
    ("load", "TCPMON_MAX_PIDS", "²", ["'²'", "whole number"]),
    ("load", "TCPMON_MAX_COMMS", "9" * 40, ["TCPMON_MAX_COMMS"]),
    ("serve", "TCPMON_METRICS_ADDR", "127.0.0.1:0", ["port from 1 to 65535"]),
    ("serve", "TCPMON_HEALTH_ADDR", "0.0.0.0:65536", ["port from 1 to 65535"]),
    ("serve", "TCPMON_WORKERS", "٣", ["'٣'"]),
    ("serve", "TCPMON_READ_TIMEOUT", "nan", ["'nan'", "seconds"]),
    ("run", "TCPMON_MAX_CONNECTIONS", "0", ["'0'"]),
    ("status", "TCPMON_PIN_DIR", "", ["is empty"]),
    ("dump", "TCPMON_PIN_DIR", "  ", ["is empty"]),
])
def test_the_real_command_refuses_a_bad_env_value_in_one_line(command, env, value, words):
    clean = {key: val for key, val in os.environ.items() if not key.startswith("TCPMON_")}
    result = subprocess.run([*TCPMON, command], capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env={**clean, env: value})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"tcpmon {command}: error: {env}")
    for word in words:
        assert word in result.stderr, (word, result.stderr)


@pytest.mark.parametrize("command", ["load", "unload", "status", "dump", "serve", "run"])
def test_an_empty_pin_dir_flag_is_refused_in_one_line(command):
    result = subprocess.run([*TCPMON, command, "--pin-dir", ""], capture_output=True, text=True, timeout=60,
                            cwd=ROOT)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--pin-dir" in result.stderr and "is empty" in result.stderr
