"""`tcpmon top`, the text: a Frame laid out as lines that fit a terminal's width.

Shared by `--once`, which prints the lines, and the screen, which draws them
with curses (top_screen): what a script sees is what the screen shows.  No
escape codes here; a line's style is a name the screen maps to an attribute.

Names arrive as the exposition's label text (tcpmon._render.comm_label: control
bytes, backslash and invalid UTF-8 as \\xNN).  Valid UTF-8 can still hold
characters a terminal acts on or that reorder what it shows: C1 controls
(U+0080..U+009F, U+009B is CSI), bidi overrides and other format characters,
line and paragraph separators.  `terminal_text` writes those as the \\xNN of
their UTF-8 bytes too, in the same notation, which stays one-to-one because
every backslash in a label is an escape.  Widths count East Asian wide
characters as two columns and combining marks as none.
"""
import textwrap
import unicodedata

_UNSAFE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
_SUFFIXES = ("", "k", "M", "G", "T", "P", "E", "Z")
GAP = 2  # blank columns between two columns


def terminal_text(text, ascii_only=False):
    """`text` with everything a terminal could act on as \\xNN; with `ascii_only` (a
    terminal that is not UTF-8) every non-ASCII character too."""
    return "".join(ch if _safe(ch, ascii_only) else _hex(ch) for ch in text)


def _safe(ch, ascii_only):
    if ch < "\x80":
        return " " <= ch < "\x7f"
    return not ascii_only and unicodedata.category(ch) not in _UNSAFE


def _hex(ch):
    return "".join(f"\\x{byte:02x}" for byte in ch.encode("utf-8", "surrogatepass"))


def _char_width(ch):
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def width_of(text):
    """Terminal columns `text` takes."""
    return sum(_char_width(ch) for ch in text)


def clip(text, width, marker="…"):
    """`text` in at most `width` columns; a cut one ends in `marker`."""
    if width_of(text) <= width:
        return text
    room, used, kept = width - width_of(marker), 0, []
    if room < 0:
        return ""
    for ch in text:
        used += _char_width(ch)
        if used > room:
            break
        kept.append(ch)
    return "".join(kept) + marker


def pad(text, width, align):
    gap = " " * max(0, width - width_of(text))
    return text + gap if align == "<" else gap + text


def number_text(value, width, places=0):
    """`value` in at most `width` characters: as it is, then with fewer decimals, then
    in thousands, millions, ... (12.3k)."""
    for suffix in _SUFFIXES:
        for decimals in range(places if not suffix else 1, -1, -1):
            text = f"{value:.{decimals}f}{suffix}"
            if len(text) <= width:
                return text
        value /= 1000
    return "#" * width


def cell(column, value, width, ascii_only=False, marker="…"):
    """One cell of `column`, `width` columns wide."""
    if column.kind == "name":
        return pad(clip(terminal_text(value, ascii_only), width, marker), width, "<")
    if column.kind == "rate":
        text = "-" if value is None else number_text(value, width, 1)
    elif column.kind == "count":
        text = number_text(value, width)
    else:
        text = str(value)
    return pad(text, width, ">")


def fit_columns(columns, width):
    """[(column, its width)] filling `width`: columns dropped by `drop` while they don't fit,
    then what is left goes to the flex columns."""
    shown = list(columns)

    def need():
        return sum(c.width for c in shown) + GAP * (len(shown) - 1)
    while need() > width and any(c.drop for c in shown):
        shown.remove(max((c for c in shown if c.drop), key=lambda c: c.drop))
    spare = max(0, width - need())
    widths = [c.width for c in shown]
    flex = [i for i, c in enumerate(shown) if c.flex]
    for n, i in enumerate(flex):
        widths[i] += spare // len(flex) + (n < spare % len(flex))
    return list(zip(shown, widths))


def _join(cells, width):
    return clip((" " * GAP).join(cells), width, "").rstrip()


def table_lines(table, rows, total, width, limit=None, ascii_only=False, marker="…"):
    """A table's header line and up to `limit` rows (all without a limit)."""
    fitted = fit_columns(table.columns, width)
    titles = []
    for column, w in fitted:
        title = column.title
        if column.flex:
            title = f"{title} ({table.title}: {len(rows)} of {total})"
        titles.append(pad(clip(title, w, marker), w, "<" if column.kind == "name" else ">"))
    lines = [(_join(titles, width), "header")]
    for row in rows[:limit]:
        cells = [cell(column, row[column.field], w, ascii_only, marker) for column, w in fitted]
        lines.append((_join(cells, width), "row"))
    return lines


def share_rows(wanted, room):
    """Rows each table gets of `room`: an equal share, and what one table does not need
    goes to the others (the first table gets the odd row)."""
    given = [0] * len(wanted)
    pending = [i for i, n in enumerate(wanted) if n > 0]
    while pending and room > 0:
        share = max(1, room // len(pending))
        for i in list(pending):
            take = min(share, wanted[i] - given[i], room)
            given[i] += take
            room -= take
            if given[i] == wanted[i]:
                pending.remove(i)
            if room == 0:
                break
    return given


def _rate_text(value):
    return "-" if value is None else number_text(value, 12, 1)


def heading_lines(frame, width, ascii_only=False, marker="…"):
    title = f"tcpmon top  sort: {frame.sort}"
    if frame.name_filter:
        title += f"  filter: {terminal_text(frame.name_filter, ascii_only)}"
    title += f"  {terminal_text(frame.pin_dir, ascii_only)}"
    over = f"over {frame.seconds:.2f}s" if frame.seconds else "(rates from the next read)"
    fills = "  ".join(f"{name} {fill.entries}/{fill.max_entries}" for name, fill in frame.maps.items())
    lines = [(clip(title, width, marker), "title"),
             (clip(f"host {_rate_text(frame.host_rate)} conn/s {over}  {fills}", width, marker), "title")]
    if frame.error:
        error = terminal_text(f"read failed (showing the read before): {frame.error}", ascii_only)
        lines += [(text, "error") for text in wrap(error, width, 2, marker)]
    return lines


def wrap(text, width, most, marker="…"):
    """`text` in at most `most` lines of `width` columns; the last one cut if need be."""
    parts = textwrap.wrap(text, max(1, width), break_on_hyphens=False) or [""]
    if len(parts) > most:
        parts = parts[:most - 1] + [" ".join(parts[most - 1:])]
    return [clip(part, width, marker) for part in parts]


def frame_lines(frame, width, height=None, ascii_only=False):
    """[(text, style)] of a frame: no line wider than `width` columns, at most `height`
    lines (every row without a height).  Styles: title, error, header, row."""
    marker = "~" if ascii_only else "…"
    lines = heading_lines(frame, width, ascii_only, marker)
    tables = frame.tables
    limits = [None] * len(tables)
    if height is not None:
        room = max(0, height - len(lines) - len(tables))
        limits = share_rows([len(rows) for _, rows, _ in tables], room)
    for (table, rows, total), limit in zip(tables, limits):
        lines += table_lines(table, rows, total, width, limit, ascii_only, marker)
    return lines if height is None else lines[:height]
