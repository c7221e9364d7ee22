#!/usr/bin/env bash
# Remote-debug tcpmon in Kubernetes: builds the release and debug images, makes the
# debug image available to the cluster, deploys k8s/debug-daemonset.yaml and
# forwards localhost:5678 (debugpy) and localhost:9090 (/metrics) to one of its pods.
# Then attach with "Attach to Kubernetes Pod" (.vscode/launch.json).  Ctrl-C stops
# the port-forward; scripts/cleanup-debug.sh removes everything.
#
# Environment:
#   REGISTRY   push tcpmon:debug there (e.g. ghcr.io/me) instead of loading it into
#              a local kind or minikube cluster
#   NODE       debug the pod on this node (default: the first pod)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
manifest=$repo/k8s/debug-daemonset.yaml
namespace=tcpmon-debug
image=tcpmon:debug

die() {
	echo "debug-k8s: $*" >&2
	exit 1
}

for tool in docker kubectl; do
	command -v "$tool" >/dev/null || die "$tool not found: install it (docker with buildx, kubectl with a cluster context)"
done
context=$(kubectl config current-context 2>/dev/null) || die "kubectl has no current context: point it at a cluster"

echo "debug-k8s: building tcpmon:latest and $image"
docker buildx build --load -t tcpmon:latest "$repo"
docker buildx build --load -f "$repo/Dockerfile.debug" --build-arg RELEASE_IMAGE=tcpmon:latest -t "$image" "$repo"

if [ -n "${REGISTRY:-}" ]; then
	docker tag "$image" "$REGISTRY/$image"
	docker push "$REGISTRY/$image"
	image=$REGISTRY/$image
elif [[ $context == kind-* ]] && command -v kind >/dev/null; then
	kind load docker-image "$image" --name "${context#kind-}"
elif [[ $context == minikube* ]] && command -v minikube >/dev/null; then
	minikube image load "$image"
else
	die "cluster '$context' cannot see local images: set REGISTRY to push $image somewhere it can pull from"
fi

echo "debug-k8s: deploying $manifest to $context"
sed "s|image: tcpmon:debug|image: $image|" "$manifest" | kubectl apply -f -
kubectl -n "$namespace" rollout status daemonset/tcpmon-debug --timeout=180s

selector=app.kubernetes.io/name=tcpmon-debug
if [ -n "${NODE:-}" ]; then
	pod=$(kubectl -n "$namespace" get pods -l "$selector" --field-selector "spec.nodeName=$NODE" \
		-o jsonpath='{.items[0].metadata.name}')
else
	pod=$(kubectl -n "$namespace" get pods -l "$selector" -o jsonpath='{.items[0].metadata.name}')
fi
[ -n "$pod" ] || die "no tcpmon-debug pod found${NODE:+ on node $NODE}"

echo "debug-k8s: forwarding localhost:5678 (debugpy) and localhost:9090 (/metrics) to $namespace/$pod"
echo "debug-k8s: attach with 'Attach to Kubernetes Pod' in VS Code; Ctrl-C stops forwarding"
exec kubectl -n "$namespace" port-forward "pod/$pod" 5678:5678 9090:9090
