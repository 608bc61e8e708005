#!/bin/sh
# Installs the system tools the ops tests need: prometheus + promtool (rule unit tests, live
# scrape test) and systemd-analyze (unit verify/security). Idempotent and quiet; run as root on
# Debian/Ubuntu:  sh .ci/install-ops.sh
set -eu

missing=""
command -v prometheus >/dev/null 2>&1 || missing="$missing prometheus"
command -v promtool >/dev/null 2>&1 || missing="$missing prometheus"
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "install-ops.sh: need root to apt-get install:$missing" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# --no-install-recommends keeps prometheus from pulling node-exporter etc.; policy-rc.d stops
# the package's postinst from starting services in containers without an init.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $(echo $missing | tr ' ' '\n' | sort -u) >/dev/null
command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v systemd-analyze >/dev/null
