"""The attribution labels, their order, and the --labels value that picks some of them."""

LABELS = ("unit", "container_id", "pod_uid", "namespace", "pod", "container")
PATH_LABELS = LABELS[:3]      # read from the cgroup path
NAME_LABELS = LABELS[3:]      # read from the Kubernetes API
OTHER = "~other"              # every label value of the overflow series


def parse_labels(text, kubernetes=False):
    """The labels a --labels value names, in LABELS order.

    'auto' is the path labels, plus the name labels when the names come from Kubernetes;
    'all' is every label; 'none' or '' is no label; otherwise a comma-separated list.
    """
    text = text.strip()
    if text == "auto":
        return LABELS if kubernetes else PATH_LABELS
    if text == "all":
        return LABELS
    if text in ("", "none"):
        return ()
    names = {name.strip() for name in text.split(",")}
    unknown = sorted(names - set(LABELS))
    if unknown:
        raise ValueError(f"unknown attribution label '{unknown[0]}': use auto, all, none "
                         f"or some of {','.join(LABELS)}")
    return tuple(name for name in LABELS if name in names)
