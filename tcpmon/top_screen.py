"""`tcpmon top`, the screen: top_text's lines drawn with curses, and the keys.

Why curses (the standard library's, on ncursesw): it ships with every Python
tcpmon runs on (a pyenv build, Debian's /usr/bin/python3, the slim image), so
`top` adds no dependency to a node; it drives the terminal through terminfo, so
it works with whatever TERM an SSH session brings; curses.wrapper gives the
terminal back (endwin: normal screen, cursor, keypad) however the loop ends;
resizes arrive as KEY_RESIZE.  rich or textual would add a dependency tree (and
textual an asyncio application) to draw three tables.

Keys: q quits; s cycles the sort, r t f l p n pick rate, total, failures, latency
(p99), pid, name; / types a filter (applied as it is typed; Enter keeps it, Esc
restores the one before); Esc clears the filter.
"""
import curses
import locale
import os
import time

from tcpmon import top_text
from tcpmon.errors import TcpmonError, describe
from tcpmon.top import SORT_KEYS, is_utf8

ESC = "\x1b"
SORT_BY_KEY = {"r": "rate", "t": "total", "f": "failures", "l": "p99", "p": "pid", "n": "comm"}
MAX_FILTER = 64
_ENTER = ("\n", "\r", curses.KEY_ENTER)
_BACKSPACE = ("\x7f", "\b", curses.KEY_BACKSPACE)


class Keys:
    """What each key does to the Watch: sort, filter; `press` is False for quit."""

    def __init__(self, watch):
        self.watch = watch
        self.editing = False
        self._before = ""

    def press(self, key):
        if self.editing:
            self._edit(key)
        elif key in ("q", "Q"):
            return False
        elif key == "s":
            self.watch.sort = SORT_KEYS[(SORT_KEYS.index(self.watch.sort) + 1) % len(SORT_KEYS)]
        elif key in SORT_BY_KEY:
            self.watch.sort = SORT_BY_KEY[key]
        elif key == "/":
            self.editing, self._before = True, self.watch.name_filter
        elif key == ESC:
            self.watch.name_filter = ""
        return True

    def _edit(self, key):
        if key in _ENTER:
            self.editing = False
        elif key == ESC:
            self.editing, self.watch.name_filter = False, self._before
        elif key in _BACKSPACE:
            self.watch.name_filter = self.watch.name_filter[:-1]
        elif isinstance(key, str) and key.isprintable() and len(self.watch.name_filter) < MAX_FILTER:
            self.watch.name_filter += key

    def help_line(self, ascii_only):
        if self.editing:
            typed = top_text.terminal_text(self.watch.name_filter, ascii_only)
            return f"filter: {typed}_   Enter keeps it, Esc cancels"
        return "q quit  s sort  r t f l p n: rate total fail p99 pid name  / filter  Esc clear"


_STYLES = {"title": curses.A_BOLD, "error": curses.A_BOLD, "header": curses.A_REVERSE, "row": curses.A_NORMAL}


class Screen:
    """Draws the Watch's frame each refresh and after each key; reads every `interval` s."""

    def __init__(self, watch, read, interval, ascii_only):
        self.watch, self.read, self.interval, self.ascii_only = watch, read, interval, ascii_only

    def loop(self, window):
        try:
            curses.curs_set(0)
        except curses.error:
            pass  # a terminal that cannot hide its cursor
        keys = Keys(self.watch)
        due = time.monotonic() + self.interval
        while True:
            self._draw(window, keys)
            now = time.monotonic()
            if now >= due:
                self._refresh()
                due = max(due + self.interval, now)
                continue
            window.timeout(max(1, int((due - now) * 1000)))
            try:
                key = window.get_wch()
            except curses.error:
                continue  # no key before the next read is due
            if key == curses.KEY_RESIZE:
                curses.update_lines_cols()
            elif not keys.press(key):
                return 0

    def _refresh(self):
        try:
            self.watch.add(self.read())
        except (TcpmonError, OSError, ValueError) as exc:
            self.watch.failed(describe(exc))

    def _draw(self, window, keys):
        height, width = window.getmaxyx()
        window.erase()
        lines = top_text.frame_lines(self.watch.frame(), width, height - 1, self.ascii_only)
        for y, (text, style) in enumerate(lines):
            self._put(window, y, text, width, _STYLES[style], fill=style == "header")
        marker = "~" if self.ascii_only else "…"
        self._put(window, height - 1, top_text.clip(keys.help_line(self.ascii_only), width, marker),
                  width, curses.A_REVERSE, fill=True)
        window.refresh()

    @staticmethod
    def _put(window, y, text, width, attr, fill):
        if fill:
            text = top_text.pad(text, width, "<")
        try:
            window.addstr(y, 0, text, attr)
        except curses.error:
            pass  # the bottom-right cell: curses writes it, then fails to move the cursor past it


def run(watch, read, interval):
    """The screen until q; 0.  Refuses, in one line, a terminal curses cannot drive."""
    os.environ.setdefault("ESCDELAY", "25")  # Esc is a key here, not the start of a sequence
    locale.setlocale(locale.LC_ALL, "")
    term = os.environ.get("TERM", "")
    try:
        curses.setupterm(term or "unknown")
    except curses.error as exc:
        raise TcpmonError(f"top cannot drive terminal TERM={term!r} ({exc}): "
                          "set TERM to your terminal, or use --once") from None
    screen = Screen(watch, read, interval, ascii_only=not is_utf8(locale.getpreferredencoding(False)))
    return curses.wrapper(screen.loop)
