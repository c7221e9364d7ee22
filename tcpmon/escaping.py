"""Label values of any length in comm_label's notation: the exposition writes attribution
labels (cgroup path parts: bytes the kernel does not check) and `tcpmon top` shows them so."""
import re

_CONTROL = re.compile("[\x00-\x1f\x7f]")


def label_text(value):
    """A label value (str) in comm_label's notation: control characters, backslash and bytes
    that are not UTF-8 (which os.scandir hands over as surrogates) as \\xNN of their bytes."""
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "surrogatepass")  # a lone surrogate from elsewhere: its bytes
    text = raw.replace(b"\\", b"\\x5c").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", text)
