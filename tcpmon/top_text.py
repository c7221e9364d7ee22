"""`tcpmon top`, the text: a Frame laid out as lines that fit a terminal's width.

Shared by `--once`, which prints the lines, and the screen, which draws them
with curses (top_screen): what a script sees is what the screen shows.  No
escape codes here; a line's style is a name the screen maps to an attribute.

Names arrive as the exposition's label text (tcpmon._render.comm_label: control
bytes, backslash and invalid UTF-8 as \\xNN); attribution values (a unit is a
cgroup directory's name, which may hold any byte but '/') are made label text
the same way by `tcpmon.escaping.label_text`.  Valid UTF-8 can still hold characters a terminal
acts on or that reorder what it shows: C1 controls (U+0080..U+009F, U+009B is
CSI), bidi overrides and other format characters, line and paragraph
separators.  `terminal_text` writes those as the \\xNN of their UTF-8 bytes
too, in the same notation, which stays one-to-one because every backslash in a
label is an escape.  Widths count East Asian wide characters as two columns and
combining marks as none.
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


def seconds_text(value, width, ascii_only=False):
    """A duration in at most `width` characters, in µs, ms or s as its size asks."""
    for unit, scale, places in (("us" if ascii_only else "µs", 1e-6, 1), ("ms", 1e-3, 1), ("s", 1.0, 2)):
        if value < 1000 * scale or unit == "s":
            return number_text(value / scale, width - len(unit), places) + unit
    raise AssertionError("unreachable")


def cell(column, value, width, ascii_only=False, marker="…"):
    """One cell of `column`, `width` columns wide."""
    if column.kind == "name":
        return pad(clip(terminal_text(value, ascii_only), width, marker), width, "<")
    if value is None and column.kind in ("rate", "percent", "seconds"):
        text = "-"
    elif column.kind == "rate":
        text = number_text(value, width, 1)
    elif column.kind == "percent":
        text = number_text(100 * value, width - 1, 1) + "%"
    elif column.kind == "seconds":
        text = seconds_text(value, width, ascii_only)
    elif column.kind == "count":
        text = number_text(value, width)
    else:
        text = str(value)
    return pad(text, width, ">")


def fit_columns(columns, width, gap=GAP):
    """[(column, its width)] filling `width`: columns dropped by `drop` while they don't fit,
    then what is left goes to the flex columns."""
    shown = list(columns)

    def need():
        return sum(c.width for c in shown) + gap * (len(shown) - 1)
    while need() > width and any(c.drop for c in shown):
        shown.remove(max((c for c in shown if c.drop), key=lambda c: c.drop))
    spare = max(0, width - need())
    widths = [c.width for c in shown]
    flex = [i for i, c in enumerate(shown) if c.flex]
    for n, i in enumerate(flex):
        widths[i] += spare // len(flex) + (n < spare % len(flex))
    return list(zip(shown, widths))


def _join(cells, width, gap):
    return clip((" " * gap).join(cells), width, "").rstrip()


def table_lines(table, rows, total, width, limit=None, ascii_only=False, marker="…"):
    """A table's header line and up to `limit` rows (all without a limit); the widest flex
    column's title (the last of equals) says which table it is and how many rows it shows
    (only how many, shorter still, when that does not fit)."""
    fitted = fit_columns(table.columns, width, table.gap)
    captioned = max((i for i, (column, _) in enumerate(fitted) if column.flex), default=None,
                    key=lambda i: (fitted[i][1], i))
    titles = []
    for i, (column, w) in enumerate(fitted):
        title = column.title
        if i == captioned:
            captions = (f"({table.title}: {len(rows)} of {total})", f"({len(rows)} of {total})",
                        f"({len(rows)}/{total})")
            title = next((f"{title} {caption}" for caption in captions if width_of(f"{title} {caption}") <= w),
                         f"{title} {captions[-1]}")
        titles.append(pad(clip(title, w, marker), w, "<" if column.kind == "name" else ">"))
    lines = [(_join(titles, width, table.gap), "header")]
    for row in rows[:limit]:
        cells = [cell(column, row[column.field], w, ascii_only, marker) for column, w in fitted]
        lines.append((_join(cells, width, table.gap), "row"))
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
    """The title line; the host's rates and the maps' fill (a second line when they do not fit
    in one); why there are no pod/unit labels; why the last read failed."""
    title = f"tcpmon top  sort: {frame.sort}"
    if frame.name_filter:
        title += f"  filter: {terminal_text(frame.name_filter, ascii_only)}"
    title += f"  over {frame.seconds:.2f}s" if frame.seconds else "  (rates from the next read)"
    title += f"  {terminal_text(frame.pin_dir, ascii_only)}"
    host = [f"host {_rate_text(frame.host_rate)} conn/s {_rate_text(frame.host_failures_rate)} fail/s",
            *(f"{name} {fill.entries}/{fill.max_entries}" for name, fill in frame.maps.items())]
    lines = [(clip(title, width, marker), "title")]
    lines += [(text, "title") for text in pack(host, width, 2, marker)]
    if frame.attribution_problem:
        problem = terminal_text(f"no pod/unit: {frame.attribution_problem}", ascii_only)
        lines.append((clip(problem, width, marker), "error"))
    if frame.error:
        error = terminal_text(f"read failed (showing the read before): {frame.error}", ascii_only)
        lines += [(text, "error") for text in wrap(error, width, 2, marker)]
    return lines


def pack(parts, width, most, marker="…"):
    """`parts` joined by two spaces in at most `most` lines of `width` columns, a part never
    split across lines (but cut, with the rest of the last line, if need be)."""
    lines = [parts[0]]
    for part in parts[1:]:
        if width_of(f"{lines[-1]}  {part}") <= width or len(lines) == most:
            lines[-1] += f"  {part}"
        else:
            lines.append(part)
    return [clip(line, width, marker) for line in lines]


def wrap(text, width, most, marker="…"):
    """`text` in at most `most` lines of `width` columns; the last one cut if need be."""
    parts = textwrap.wrap(text, max(1, width), break_on_hyphens=False) or [""]
    if len(parts) > most:
        parts = parts[:most - 1] + [" ".join(parts[most - 1:])]
    return [clip(part, width, marker) for part in parts]


def frame_lines(frame, width, height=None, ascii_only=False):
    """[(text, style)] of a frame: no line wider than `width` columns, at most `height`
    lines (every row without a height).  Styles: title, error, header, row.

    Every table keeps its header; the rows left room for are shared out equally (what one
    table does not need goes to the others), so a short terminal cuts the rows lowest in
    each table's order first.  A narrow one cuts columns by their `drop` (top.OUTCOME_COLUMNS:
    the smaller failure classes, then p50), then clips names with the marker."""
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
