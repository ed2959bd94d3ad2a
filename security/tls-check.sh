#!/usr/bin/env bash
# security/tls-check.sh: outside TLS checkers against a real ztp-dataplane on loopback.
#
# A throwaway PKI (ztpctl pki), a python echo backend, one data plane serving the tcp
# service echo.svc.internal to user alice; then testssl.sh (Debian), sslyze (PyPI, in
# security/.venv) and openssl s_client probes. One PASS/FAIL line per verdict; exit 1 if
# any verdict failed. Logs and reports stay in security/out/tls-check/.
# Environment: ZTP_BIN_DIR (default target/release), ZTP_BUILD=1 (cargo build even if the
# binaries exist), TLS_CHECK_SKIP_TESTSSL=1, TLS_CHECK_SKIP_SSLYZE=1,
# TLS_CHECK_KEEP_LIMITS=1 (keep the data plane's per-source limits during the scans).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BIN="${ZTP_BIN_DIR:-$ROOT/target/release}"
VENV="$HERE/.venv"
OUT="$HERE/out/tls-check"
LOGS="$OUT/logs"
REPORTS="$OUT/reports"
SSLYZE_VERSION="6.3.1"
SERVICE="echo.svc.internal"
TLS13_SUITES="TLS_AES_128_GCM_SHA256 TLS_AES_256_GCM_SHA384 TLS_CHACHA20_POLY1305_SHA256"
# shellcheck source=security/lib.sh
source "$HERE/lib.sh"

rm -rf "$OUT"
mkdir -p "$LOGS" "$REPORTS"
: >"$OUT/verdicts.txt"
WORK="$(mktemp -d /tmp/ztp-tls-check.XXXXXX)"

# ---------------------------------------------------------------- tools and binaries
step "binaries and tools"
if [[ -n "${ZTP_BUILD:-}" || ! -x "$BIN/ztp-dataplane" || ! -x "$BIN/ztpctl" ]]; then
  [[ -z "${ZTP_BIN_DIR:-}" ]] || die "ztp-dataplane or ztpctl missing in ZTP_BIN_DIR=$BIN"
  echo "building ztp-dataplane and ztpctl (release)…"
  run 3600 cargo build --manifest-path "$ROOT/Cargo.toml" --release -p ztp-dataplane -p ztpctl
fi
for tool in openssl jq python3 curl timeout; do
  command -v "$tool" >/dev/null || die "$tool is needed"
done

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then SUDO=(sudo); fi
if [[ -z "${TLS_CHECK_SKIP_TESTSSL:-}" ]] && ! command -v testssl >/dev/null; then
  echo "installing testssl.sh from Debian…"
  if ! run 600 "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends testssl.sh >"$LOGS/apt.log" 2>&1; then
    run 600 "${SUDO[@]}" apt-get update >>"$LOGS/apt.log" 2>&1
    run 600 "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y --no-install-recommends testssl.sh >>"$LOGS/apt.log" 2>&1
  fi
fi
if [[ -z "${TLS_CHECK_SKIP_SSLYZE:-}" ]] && ! "$VENV/bin/sslyze" --help >/dev/null 2>&1; then
  echo "installing sslyze==$SSLYZE_VERSION into $VENV…"
  [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
  run 900 "$VENV/bin/pip" install --disable-pip-version-check -q "sslyze==$SSLYZE_VERSION" \
    >"$LOGS/pip.log" 2>&1
fi
echo "ztp-dataplane: $("$BIN/ztp-dataplane" --version)"
# A binary older than the last commit to its sources tests old code: say so.
stale() { # BINARY PATHS...
  local bin="$1" last
  shift
  last="$(git -C "$ROOT" log -1 --format=%ct -- "$@" 2>/dev/null || true)"
  if [[ -n "$last" ]] && (($(stat -c %Y "$bin") < last)); then
    note "$(basename "$bin") is older than the last commit to $* ($(git -C "$ROOT" log -1 --format=%h -- "$@")): run 'cargo build --release -p ztp-dataplane -p ztpctl' to test the current code"
  fi
}
stale "$BIN/ztp-dataplane" dataplane proto
echo "openssl: $(openssl version)"

# ---------------------------------------------------------------- PKI, backend, data plane
step "throwaway PKI, echo backend, data plane"
ZTPCTL="$BIN/ztpctl"
PKI="$WORK/pki"
OTHER="$WORK/other-pki"
timeout 60 "$ZTPCTL" pki init "$PKI" >/dev/null
timeout 60 "$ZTPCTL" pki issue alice@example.com --ttl 1h --dir "$PKI" >/dev/null
# The same identity from CAs the data plane does not trust: one with the trusted CA's
# name (ztpctl's "ZTP CA", another key), one with a name of its own (openssl).
timeout 60 "$ZTPCTL" pki init "$OTHER" >/dev/null
timeout 60 "$ZTPCTL" pki issue alice@example.com --ttl 1h --dir "$OTHER" >/dev/null
ROGUE="$WORK/rogue-pki"
mkdir -p "$ROGUE"
(
  cd "$ROGUE"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key \
    -out ca.pem -days 1 -subj "/CN=Rogue CA" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout alice.key \
    -out alice.csr -subj "/CN=alice" 2>/dev/null
  printf 'subjectAltName=email:alice@example.com\nextendedKeyUsage=clientAuth\n' >ext.cnf
  openssl x509 -req -in alice.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
    -out alice.pem -extfile ext.cnf 2>/dev/null
) || die "openssl could not make the rogue CA"
for f in ca.pem ca.key server.pem server.key alice.pem alice.key; do
  [[ -s "$PKI/$f" ]] || die "ztpctl pki did not write $PKI/$f"
done

# Wait until a JSON log line with this message appears; print its addr field.
wait_addr() {
  local file="$1" msg="$2" pid="$3" secs="$4" addr
  local deadline=$((SECONDS + secs))
  while ((SECONDS < deadline)); do
    addr="$(jq -rR --arg m "$msg" 'fromjson? | select(.message == $m) | .addr' "$file" 2>/dev/null | head -1)"
    if [[ -n "$addr" ]]; then
      echo "$addr"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

cat >"$WORK/echo.py" <<'EOF'
# Loopback TCP echo: writes its port to argv[1], logs one line per accepted connection.
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen(64)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(s.getsockname()[1]))
import os
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
def serve(c):
    with c:
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(d)
while True:
    c, peer = s.accept()
    print("accepted", peer[0], peer[1], flush=True)
    threading.Thread(target=serve, args=(c,), daemon=True).start()
EOF
python3 "$WORK/echo.py" "$WORK/echo.port" >"$LOGS/backend.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
  [[ -s "$WORK/echo.port" ]] && break
  sleep 0.1
done
[[ -s "$WORK/echo.port" ]] || die "echo backend did not start"
BACKEND_PORT="$(cat "$WORK/echo.port")"

cat >"$WORK/snapshot.yaml" <<EOF
version: 1
services:
  - name: $SERVICE
    protocol: tcp
    address: "127.0.0.1:$BACKEND_PORT"
    groups: [admins]
users:
  - name: alice
    identities: ["alice@example.com"]
    groups: [admins]
groups:
  - name: admins
revoked: []
EOF
cp "$WORK/snapshot.yaml" "$REPORTS/snapshot.yaml"
timeout 30 "$BIN/ztp-dataplane" --check "$WORK/snapshot.yaml" >"$LOGS/check.log" 2>&1 ||
  die "snapshot refused by ztp-dataplane --check: $(cat "$LOGS/check.log")"

# The scanners open hundreds of connections a second from 127.0.0.1: per-source limits
# (where this build has them) would shed some before the handshake, and a shed suite
# looks "rejected" to a scanner. They are off here; this checks the TLS configuration.
# TLS_CHECK_KEEP_LIMITS=1 keeps the defaults (to see what a scanner meets in production).
DP_EXTRA=()
dp_help="$("$BIN/ztp-dataplane" --help)"
[[ -z "${TLS_CHECK_KEEP_LIMITS:-}" ]] || dp_help=""
[[ "$dp_help" != *--handshake-rate-per-source* ]] || DP_EXTRA+=(--handshake-rate-per-source 0)
[[ "$dp_help" != *--max-connections-per-source* ]] || DP_EXTRA+=(--max-connections-per-source 0)
"$BIN/ztp-dataplane" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
  --cert "$PKI/server.pem" --key "$PKI/server.key" --client-ca "$PKI/ca.pem" \
  --snapshot "$WORK/snapshot.yaml" --log-format json --threads 1 "${DP_EXTRA[@]}" \
  >"$LOGS/dataplane.out" 2>"$LOGS/dataplane.err" &
DP_PID=$!
PIDS+=("$DP_PID")
DP="$(wait_addr "$LOGS/dataplane.err" listening "$DP_PID" 30)" || die "data plane did not start: $(tail -3 "$LOGS/dataplane.err")"
DP_ADMIN="$(wait_addr "$LOGS/dataplane.err" "admin listening" "$DP_PID" 30)" || die "data plane admin did not start"
DP_PORT="${DP##*:}"
[[ "$DP" == 127.0.0.1:* ]] || die "data plane not on loopback: $DP"
echo "data plane on $DP (admin $DP_ADMIN), backend 127.0.0.1:$BACKEND_PORT${DP_EXTRA[*]:+, with ${DP_EXTRA[*]}}"

# ---------------------------------------------------------------- openssl s_client probes
step "openssl s_client probes"
PROBE="ztp-tls-check-probe-$RANDOM$RANDOM"
backend_conns() { grep -c '^accepted' "$LOGS/backend.log" || true; }

# probe NAME ARGS...: one s_client connection that sends PROBE and reads for 2 s.
probe() {
  local name="$1"
  shift
  (
    printf '%s\n' "$PROBE"
    sleep 2
  ) | timeout 20 openssl s_client -connect "$DP" -no_ign_eof "$@" \
    >"$REPORTS/s_client-$name.txt" 2>&1 || true
}
alert_name() {
  case "$1" in
    40) echo handshake_failure ;; 42) echo bad_certificate ;; 44) echo certificate_revoked ;;
    45) echo certificate_expired ;; 46) echo certificate_unknown ;; 48) echo unknown_ca ;;
    51) echo decrypt_error ;; 70) echo protocol_version ;; 80) echo internal_error ;; 109) echo missing_extension ;;
    112) echo unrecognized_name ;; 116) echo certificate_required ;; *) echo "alert#$1" ;;
  esac
}
# The alert the server sent in probe NAME ("" for none).
alert_of() {
  local n
  n="$(grep -o 'SSL alert number [0-9]*' "$REPORTS/s_client-$1.txt" | head -1 | awk '{print $4}')"
  [[ -z "$n" ]] || alert_name "$n"
}
echoed() { grep -qF "$PROBE" "$REPORTS/s_client-$1.txt"; }

# check_refused NAME WHAT EXPECTED_ALERT BACKEND_BEFORE
check_refused() {
  local name="$1" what="$2" expected="$3" before="$4" alert after
  alert="$(alert_of "$name")"
  after="$(backend_conns)"
  if echoed "$name"; then
    fail "s_client $what: application data reached the backend and came back"
  elif [[ -z "$alert" ]]; then
    fail "s_client $what: no TLS alert (see $REPORTS/s_client-$name.txt)"
  elif [[ "$after" != "$before" ]]; then
    fail "s_client $what: refused with $alert but the backend got a connection"
  elif [[ "$alert" != "$expected" ]]; then
    pass "s_client $what: refused with $alert (DESIGN names $expected)"
  else
    pass "s_client $what: refused with $alert, no backend connection"
  fi
}

CA=(-CAfile "$PKI/ca.pem")
ALICE=(-cert "$PKI/alice.pem" -key "$PKI/alice.key")

b="$(backend_conns)"
probe no-sni -noservername "${CA[@]}" "${ALICE[@]}"
check_refused no-sni "no SNI (valid client certificate)" missing_extension "$b"

b="$(backend_conns)"
probe unknown-sni -servername nope.svc.internal "${CA[@]}" "${ALICE[@]}"
check_refused unknown-sni "unknown SNI nope.svc.internal (valid client certificate)" unrecognized_name "$b"

b="$(backend_conns)"
probe no-client-cert -servername "$SERVICE" "${CA[@]}"
check_refused no-client-cert "no client certificate" certificate_required "$b"

b="$(backend_conns)"
probe untrusted-ca -servername "$SERVICE" "${CA[@]}" -cert "$ROGUE/alice.pem" -key "$ROGUE/alice.key"
check_refused untrusted-ca "alice@example.com from an untrusted CA (\"Rogue CA\")" unknown_ca "$b"

b="$(backend_conns)"
probe same-name-ca -servername "$SERVICE" "${CA[@]}" -cert "$OTHER/alice.pem" -key "$OTHER/alice.key"
check_refused same-name-ca "alice@example.com from an untrusted CA named like the trusted one" unknown_ca "$b"

b="$(backend_conns)"
probe tls12 -tls1_2 -servername "$SERVICE" "${CA[@]}" "${ALICE[@]}"
check_refused tls12 "TLS 1.2 forced (valid client certificate)" protocol_version "$b"

b="$(backend_conns)"
probe alice -servername "$SERVICE" "${CA[@]}" "${ALICE[@]}" -verify_return_error
if echoed alice && grep -q 'TLSv1.3' "$REPORTS/s_client-alice.txt" &&
  grep -q 'Verify return code: 0 (ok)' "$REPORTS/s_client-alice.txt" &&
  (($(backend_conns) == b + 1)); then
  pass "s_client with alice's certificate: TLS 1.3, server verified, data echoed through the backend"
else
  fail "s_client with alice's certificate: no echo (alert: $(alert_of alice); see $REPORTS/s_client-alice.txt)"
fi

# ---------------------------------------------------------------- testssl.sh
if [[ -z "${TLS_CHECK_SKIP_TESTSSL:-}" ]]; then
  step "testssl.sh: protocols and ciphers per protocol"
  command -v testssl >/dev/null || die "testssl is not installed (apt-get install testssl.sh)"
  echo "testssl.sh $(dpkg-query -W -f='${Version}' testssl.sh 2>/dev/null || echo '(version unknown)')"
  # testssl 3.0 has no --sni: the SNI is the host name of the URI, and --ip says where to
  # connect. It has no client certificate option either; TLS 1.3 servers still answer
  # its probes (the certificate is asked for after the ServerHello).
  TS_JSON="$REPORTS/testssl.json"
  ts_rc=0
  run 900 testssl --quiet --color 0 --warnings off --nodns none --ip 127.0.0.1 \
    --connect-timeout 5 --openssl-timeout 5 --fast -p -E \
    --jsonfile "$TS_JSON" "$SERVICE:$DP_PORT" >"$REPORTS/testssl.txt" 2>&1 || ts_rc=$?
  echo "testssl exit code $ts_rc (report: $REPORTS/testssl.txt)"
  if ((ts_rc == 124)) || [[ ! -s "$TS_JSON" ]] || ! jq -e 'type == "array"' "$TS_JSON" >/dev/null 2>&1; then
    fail "testssl: no usable JSON report (exit $ts_rc)"
  else
    finding() { jq -r --arg id "$1" '[.[] | select(.id == $id) | .finding] | first // "absent"' "$TS_JSON"; }
    bad=""
    for id in SSLv2 SSLv3 TLS1 TLS1_1 TLS1_2; do
      f="$(finding "$id")"
      [[ "$f" == "not offered"* ]] || bad+=" $id=\"$f\""
    done
    f13="$(finding TLS1_3)"
    if [[ -z "$bad" && "$f13" == offered* ]]; then
      pass "testssl: only TLS 1.3 offered (SSLv2, SSLv3, TLS 1, 1.1, 1.2 not offered; TLS1_3: $f13)"
    else
      fail "testssl: protocols:$bad TLS1_3=\"$f13\""
    fi
    suites="$(jq -r '.[] | select(.id | startswith("cipher-")) | "\(.id) \(.finding | split(" ") | map(select(. != "")) | last)"' "$TS_JSON")"
    bad=""
    n=0
    while read -r id name; do
      [[ -n "$id" ]] || continue
      n=$((n + 1))
      [[ "$id" == cipher-tls1_3_* && " $TLS13_SUITES " == *" $name "* ]] || bad+=" $id:$name"
    done <<<"$suites"
    if ((n > 0)) && [[ -z "$bad" ]]; then
      pass "testssl: $n cipher suites accepted, all TLS 1.3 ($(awk '{print $2}' <<<"$suites" | sort | paste -sd' '))"
    else
      fail "testssl: accepted cipher suites outside TLS 1.3 or none at all:${bad:- (none accepted)}"
    fi
    problems="$(jq -r '.[] | select(.severity == "FATAL" or .id == "scanProblem") | "\(.id): \(.finding)"' "$TS_JSON")"
    [[ -z "$problems" ]] || note "testssl reported: $problems"
  fi
fi

# ---------------------------------------------------------------- sslyze
if [[ -z "${TLS_CHECK_SKIP_SSLYZE:-}" ]]; then
  step "sslyze $SSLYZE_VERSION: cipher suites per protocol (with alice's certificate)"
  SY_JSON="$REPORTS/sslyze.json"
  sy_rc=0
  run 600 "$VENV/bin/sslyze" --cert "$PKI/alice.pem" --key "$PKI/alice.key" \
    --sni "$SERVICE" --mozilla_config disable \
    --sslv2 --sslv3 --tlsv1 --tlsv1_1 --tlsv1_2 --tlsv1_3 \
    --heartbleed --openssl_ccs --compression --early_data --elliptic_curves \
    --json_out "$SY_JSON" "$DP" >"$REPORTS/sslyze.txt" 2>&1 || sy_rc=$?
  echo "sslyze exit code $sy_rc (report: $REPORTS/sslyze.txt)"
  R='.server_scan_results[0]'
  if [[ ! -s "$SY_JSON" ]] || [[ "$(jq -r "$R.connectivity_status // \"none\"" "$SY_JSON")" != COMPLETED ]]; then
    fail "sslyze: could not connect or no JSON (exit $sy_rc; see $REPORTS/sslyze.txt)"
  else
    bad=""
    for p in ssl_2_0 ssl_3_0 tls_1_0 tls_1_1 tls_1_2; do
      st="$(jq -r "$R.scan_result.${p}_cipher_suites.status" "$SY_JSON")"
      acc="$(jq -r "[$R.scan_result.${p}_cipher_suites.result.accepted_cipher_suites[]?.cipher_suite.name] | join(\",\")" "$SY_JSON")"
      if [[ "$st" != COMPLETED ]]; then
        bad+=" $p:scan-$st"
      elif [[ -n "$acc" ]]; then bad+=" $p:$acc"; fi
    done
    if [[ -z "$bad" ]]; then
      pass "sslyze: no SSL 2.0/3.0, TLS 1.0/1.1/1.2 cipher suite accepted"
    else
      fail "sslyze: legacy protocol suites accepted or not scanned:$bad"
    fi
    st="$(jq -r "$R.scan_result.tls_1_3_cipher_suites.status" "$SY_JSON")"
    acc="$(jq -r "$R.scan_result.tls_1_3_cipher_suites.result.accepted_cipher_suites[]?.cipher_suite.name" "$SY_JSON" | sort)"
    bad=""
    for s in $acc; do [[ " $TLS13_SUITES " == *" $s "* ]] || bad+=" $s"; done
    if [[ "$st" == COMPLETED && -n "$acc" && -z "$bad" ]]; then
      pass "sslyze: accepted TLS 1.3 suites: $(paste -sd' ' <<<"$acc")"
    else
      fail "sslyze: TLS 1.3 scan $st, accepted: ${acc:-none}, unexpected:${bad:- none}"
    fi
    sy_bool() { jq -r "$R.scan_result.$1.result.$2 | if . == null then \"not-scanned\" else tostring end" "$SY_JSON"; }
    for check in "heartbleed is_vulnerable_to_heartbleed false Heartbleed" \
      "openssl_ccs_injection is_vulnerable_to_ccs_injection false CCS-injection" \
      "tls_compression supports_compression false TLS-compression" \
      "tls_1_3_early_data supports_early_data false 0-RTT-early-data"; do
      read -r cmd field want label <<<"$check"
      got="$(sy_bool "$cmd" "$field")"
      if [[ "$got" == "$want" ]]; then
        pass "sslyze: ${label//-/ }: $field=$got"
      else
        fail "sslyze: ${label//-/ }: $field=$got (want $want)"
      fi
    done
    note "sslyze: curves accepted: $(jq -r "[$R.scan_result.elliptic_curves.result.supported_curves[]?.name] | join(\" \")" "$SY_JSON")"
  fi

  step "sslyze: client authentication requirement (no client certificate)"
  # sslyze probes the requirement only when it holds no client certificate itself.
  SY2_JSON="$REPORTS/sslyze-no-client-cert.json"
  run 300 "$VENV/bin/sslyze" --sni "$SERVICE" --mozilla_config disable --tlsv1_3 \
    --json_out "$SY2_JSON" "$DP" >"$REPORTS/sslyze-no-client-cert.txt" 2>&1 || true
  req="$(jq -r "$R.connectivity_result.client_auth_requirement // \"unknown\"" "$SY2_JSON" 2>/dev/null || echo unknown)"
  if [[ "$req" == REQUIRED ]]; then
    pass "sslyze: client authentication REQUIRED"
  else
    fail "sslyze: client authentication $req (want REQUIRED)"
  fi
fi

# ---------------------------------------------------------------- the node, its logs
step "data plane health and logs"
code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://$DP_ADMIN/healthz" || true)"
if kill -0 "$DP_PID" 2>/dev/null && [[ "$code" == 200 ]]; then
  pass "data plane still running and healthy after the scans (/healthz 200)"
else
  fail "data plane not healthy after the scans (alive: $(kill -0 "$DP_PID" 2>/dev/null && echo yes || echo no), /healthz: $code)"
fi
shed="$(jq -rR 'fromjson? | select((.message // "") | test("shed")) | "\(.reason // "?") (+\(."shed.unlogged" // 0) unlogged)"' "$LOGS/dataplane.err" | sort | uniq -c | sed 's/^ *//' | paste -sd';' || true)"
if [[ -z "$shed" ]]; then
  pass "no connection shed before the handshake during the scans (the scanners saw every answer)"
else
  fail "connections were shed before the handshake ($shed): scanner results may count them as refusals"
fi
# Private key bodies of this run, as literal secrets for the log scan.
grep -hv -- '-----' "$PKI"/*.key "$OTHER"/*.key "$ROGUE"/*.key >"$WORK/secrets.txt"
set +e
"$HERE/secrets-in-logs.sh" --secrets-file "$WORK/secrets.txt" "$LOGS" | tee "$REPORTS/secrets-in-logs.txt" | sed "s/^/   /"
sl_rc=${PIPESTATUS[0]}
set -e
if ((sl_rc == 0)); then
  pass "secrets-in-logs: no key material or token in $LOGS"
else
  fail "secrets-in-logs: secret material in $LOGS (see above)"
fi

printf '\ntls-check: %d passed, %d failed in %ds (logs and reports: %s)\n' \
  "$PASSED" "$FAILED" "$((SECONDS - STARTED))" "$OUT"
((FAILED == 0))
