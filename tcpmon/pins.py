"""Where everything tcpmon loads is pinned: the paths under one pin dir."""
from pathlib import Path

from tcpmon import _abi, maps

DEFAULT_PIN_DIR = "/sys/fs/bpf/tcpmon"


class Pins:
    """The paths of everything pinned under one pin dir."""

    def __init__(self, pin_dir=DEFAULT_PIN_DIR):
        self.dir = Path(pin_dir)
        for name, pin in _abi.PINS.items():
            setattr(self, name, self.dir / pin)
        # An empty directory whose name says which ABI the pins follow (bpffs holds
        # only directories and BPF objects; a directory needs no bpf() to check).
        self.stamp = self.dir / f"abi-{maps.ABI_VERSION}"
        # An empty directory `tcpmon load --foreground` holds an flock on while it holds
        # the links: the kernel drops the lock when that process dies, however it dies.
        self.holder = self.dir / "foreground"

    def not_a_directory(self):
        """What to say when something else than a directory sits at the pin dir's path."""
        return (f"pin dir {self.dir} is not a directory: remove what is there ('rm {self.dir}') "
                "and run 'tcpmon load', or use another --pin-dir")

    def map(self, spec):
        return self.dir / spec.name

    def links(self):
        """In the order they are removed: connects stop first."""
        return (self.connect_link, self.outcome_link, self.exit_link)

    def programs(self):
        return (self.connect_prog, self.outcome_prog, self.exit_prog)

    def maps(self):
        return tuple(self.map(spec) for spec in maps.MAPS)

    def all(self):
        """Links first: removing them in this order detaches before anything else goes."""
        return self.links() + self.programs() + self.maps()

    def all_names(self):
        """The name of every pin tcpmon may make, the stamp and the holder."""
        return [path.name for path in self.all()] + [self.stamp.name, self.holder.name]

    def stamps(self):
        """ABI stamps present, newest first (an older release's pins have none)."""
        found = [path for path in self.dir.glob("abi-*") if path.name[4:].isdigit()]
        return sorted(found, key=lambda path: int(path.name[4:]), reverse=True)
