"""Map entries made readable for `tcpmon dump` and `status`: comms as their labels,
addresses as text, arrays as lists, and a plain-text table."""
from tcpmon import destinations
from tcpmon._render import comm_label


def readable(entry):
    """A decoded map entry (key and value fields) with JSON-friendly values."""
    out = {}
    for name, value in entry.items():
        if name == "comm":
            value = comm_label(value)
        elif name == "addr":
            value = str(destinations.address_of(entry))
        elif isinstance(value, tuple):
            value = list(value)
        if name != "pad":
            out[name] = value
    return out


def table(entries):
    """Columns named after the fields, numbers right-aligned; lists shown summed."""
    if not entries:
        return ""
    names = list(entries[0])
    rows = [[str(sum(v) if isinstance(v, list) else v) for v in entry.values()] for entry in entries]
    widths = [max(len(name), *(len(row[i]) for row in rows)) for i, name in enumerate(names)]
    numeric = [all(row[i].isdigit() for row in rows) for i in range(len(names))]

    def line(cells):
        return "  ".join(cell.rjust(w) if num else cell.ljust(w)
                         for cell, w, num in zip(cells, widths, numeric)).rstrip()
    return "\n".join([line([name.upper() for name in names])] + [line(row) for row in rows])
