#!/usr/bin/env bash
# Installs the peer proxies (Debian 12 packages) without starting their system daemons.
set -euo pipefail

PKGS=(haproxy nginx libnginx-mod-stream hitch stunnel4 openssl)
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install.sh: must run as root (no sudo found)" >&2; exit 1; fi
fi

missing=()
for p in "${PKGS[@]}"; do
  st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [ "$st" = "install ok installed" ] || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
  POLICY=/usr/sbin/policy-rc.d
  BACKUP=""
  if [ -e "$POLICY" ]; then
    BACKUP=$(mktemp)
    $SUDO cp -p "$POLICY" "$BACKUP"
  fi
  restore() {
    if [ -n "$BACKUP" ]; then $SUDO cp -p "$BACKUP" "$POLICY"; rm -f "$BACKUP"
    else $SUDO rm -f "$POLICY"; fi
  }
  trap restore EXIT
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod 755 "$POLICY"
  $SUDO apt-get update
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

# The benchmark starts its own instances on loopback ports: stop a system instance if one
# runs anyway. Only the process named by the package's pidfile (or the systemd unit) is
# touched (by its PID): `service hitch status/stop` would match, and kill, every process
# named hitch, including the benchmark's own.
for svc in haproxy:/usr/sbin/haproxy nginx:/usr/sbin/nginx hitch:/usr/sbin/hitch stunnel4:/usr/bin/stunnel4; do
  name=${svc%%:*}; exe=${svc#*:}
  if [ -d /run/systemd/system ]; then
    if systemctl is-active --quiet "$name" 2>/dev/null; then $SUDO systemctl stop "$name" || true; fi
  elif [ -s "/run/$name.pid" ]; then
    for pid in $(cat "/run/$name.pid"); do
      if [ "$($SUDO readlink "/proc/$pid/exe" 2>/dev/null)" = "$exe" ]; then
        echo "install.sh: stopping system $name (pid $pid)"
        $SUDO kill "$pid" || true
      fi
    done
  fi
done

dpkg-query -W "${PKGS[@]}"
