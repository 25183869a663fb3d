#!/usr/bin/env bash
# Installs Debian's `prometheus` package, whose server binary tests/test_deploy.py starts on
# loopback to evaluate the PromQL of deploy/k8s and deploy/grafana against a live thrifty server.
#
# Unlike scripts/install_chromium.sh this one exits non-zero when it cannot install Prometheus:
# that test must fail loudly rather than skip, so a missing binary is seen.
#
# The package's post-install would enable and start a system Prometheus on :9090. A test has no
# use for it (it starts its own on a free port), so services are kept from starting during the
# install: a policy-rc.d that refuses every start (the Debian mechanism invoke-rc.d and
# deb-systemd-invoke obey) is put in place for the install if the machine has none, and removed
# afterwards.
set -u

if command -v prometheus >/dev/null 2>&1; then
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install_prometheus: not root and no sudo: install Debian's prometheus package" >&2; exit 1; }
    sudo="sudo -n"  # never prompt: CI has no one to type a password
fi
command -v apt-get >/dev/null 2>&1 || { echo "install_prometheus: no apt-get: install a prometheus binary on PATH" >&2; exit 1; }

policy=/usr/sbin/policy-rc.d
ours=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# install_prometheus.sh: no service starts during the install\nexit 101\n' \
        | $sudo tee "$policy" >/dev/null && $sudo chmod 755 "$policy" && ours=1
fi
cleanup() { if [ "$ours" = 1 ]; then $sudo rm -f "$policy"; fi; }
trap cleanup EXIT

log=$(mktemp)
if $sudo apt-get update -qq >"$log" 2>&1 \
    && $sudo env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends prometheus >>"$log" 2>&1 \
    && command -v prometheus >/dev/null 2>&1; then
    rm -f "$log"
    exit 0
fi
echo "install_prometheus: could not install Debian's prometheus package (tests/test_deploy.py needs it):" >&2
tail -n 20 "$log" >&2
rm -f "$log"
exit 1
