#!/usr/bin/env bash
# Writes configs/tcpmon.rules.yml, the alert rules for a Prometheus without the operator:
# the chart's PrometheusRule spec (charts/tcpmon/templates/prometheusrule.yaml, where the
# rules are defined) rendered with the chart's default values.
#
#   scripts/render-rules.sh                 rewrite configs/tcpmon.rules.yml
#   scripts/render-rules.sh --check         exit 1, with a diff, when it is not what the chart renders
#   scripts/render-rules.sh --stdout ARGS   print the rules rendered with helm ARGS instead, e.g.
#       --set-json prometheusRule.connectFailureRatio=0.05 --set fullnameOverride=JOB (the job the rules select)
#
# helm is the one scripts/lint.sh installs into $VENV (default .venv, made by `make build`).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-.venv}
case $venv in /*) ;; *) venv=$repo/$venv ;; esac
out=$repo/configs/tcpmon.rules.yml

usage() {
	echo "usage: scripts/render-rules.sh [--check | --stdout [HELM_ARGS...]]" >&2
	exit 2
}

render() { # render [HELM_ARGS...]: the rule file on stdout
	local helm=$venv/bin/helm
	[ "$(uname -m)" = x86_64 ] || helm=$(command -v helm) # the bundled helm is linux-amd64
	"$repo/scripts/lint.sh" tools
	cat <<'HEADER'
# tcpmon's alert rules for a Prometheus without the operator (configs/prometheus.yml loads
# this file).  Do not edit: scripts/render-rules.sh renders it from the chart's
# PrometheusRule (charts/tcpmon/templates/prometheusrule.yaml) with the default values;
# `scripts/render-rules.sh --stdout --set-json prometheusRule.KEY=VALUE` renders other thresholds.
# The rules select job="tcpmon" (--set fullnameOverride=JOB selects another job).
HEADER
	# the manifest's spec, one level less indented
	"$helm" template tcpmon "$repo/charts/tcpmon" --set prometheusRule.enabled=true "$@" \
		--show-only templates/prometheusrule.yaml |
		awk 'in_spec { sub(/^  /, ""); print } /^spec:$/ { in_spec = 1 }'
}

case ${1:-} in
--check)
	[ $# -eq 1 ] || usage
	diff -u "$out" <(render) || {
		echo "render-rules: $out is not what the chart renders: run scripts/render-rules.sh" >&2
		exit 1
	}
	;;
--stdout)
	shift
	render "$@"
	;;
"")
	render >"$out.part"
	mv "$out.part" "$out"
	;;
*) usage ;;
esac
