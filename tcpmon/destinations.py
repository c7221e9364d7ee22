"""The `remote` label of tcpmon_connect_destinations_total: the remote address, or the
name of the first configured network that holds it."""
import ipaddress

AF_INET6 = 10


def parse_networks(text):
    """'office=10.0.0.0/8,dns=192.0.2.53/32' -> ((name, network), ...); a clear error otherwise."""
    networks = []
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, cidr = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError("not NAME=CIDR")
            networks.append((name, ipaddress.ip_network(cidr, strict=False)))
        except ValueError as exc:
            raise ValueError(f"network '{item}' is not NAME=CIDR (e.g. office=10.0.0.0/8): {exc}") from None
    return tuple(networks)


def address_of(key):
    """The remote address of a destinations key; an IPv4-mapped IPv6 address as IPv4."""
    if key["family"] == AF_INET6:
        address = ipaddress.IPv6Address(key["addr"])
        return address.ipv4_mapped or address
    return ipaddress.IPv4Address(key["addr"][:4])


def remote_of(key, networks):
    address = address_of(key)
    for name, network in networks:
        if address.version == network.version and address in network:
            return name
    return str(address)
