#!/usr/bin/env bash
# Removes what scripts/debug-k8s.sh deployed.  Deleting the pods runs their preStop
# hook, which unloads the debug probe (/sys/fs/bpf/tcpmon-debug) on every node.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

command -v kubectl >/dev/null || {
	echo "cleanup-debug: kubectl not found" >&2
	exit 1
}
# The DaemonSet first and waiting for its pods, so that preStop runs before the
# namespace goes.
kubectl -n tcpmon-debug delete daemonset/tcpmon-debug --ignore-not-found --wait=true
kubectl -n tcpmon-debug wait --for=delete pod -l app.kubernetes.io/name=tcpmon-debug --timeout=120s 2>/dev/null || true
kubectl delete -f "$repo/k8s/debug-daemonset.yaml" --ignore-not-found --wait=true
echo "cleanup-debug: tcpmon-debug removed"
