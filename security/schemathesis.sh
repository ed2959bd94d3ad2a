#!/usr/bin/env bash
# security/schemathesis.sh: the control plane's REST API under outside checks, on loopback.
#
# Starts ztp-control on a throwaway store, then:
#   - input limits: a body over 1 MiB (with Content-Length and chunked) is 413, malformed
#     JSON is 400 application/problem+json, and nothing is stored;
#   - a bounded token brute force (30 wrong tokens from one source, 127.0.0.2): the later
#     ones are slowed (up to 5 s), other sources and good tokens are not, and the log
#     records the failures without the token text;
#   - schemathesis (PyPI, in security/.venv) against /v1/openapi.json with the admin token:
#     not_a_server_error and response_schema_conformance decide; status_code_conformance
#     is reported (counted only with STRICT_STATUS_CODES=1);
#   - secrets-in-logs.sh over the control plane's logs.
# One PASS/FAIL line per verdict; exit 1 if any failed. Logs and reports stay in
# security/out/schemathesis/. Environment: ZTP_BIN_DIR (default target/release),
# ZTP_BUILD=1 (cargo build even if the binaries exist), ST_MAX_EXAMPLES (50), ST_TIMEOUT
# (900 s), ST_WORKERS (2), ST_SEED, ST_CHECKS (schemathesis' --checks), STRICT_STATUS_CODES=1,
# SKIP_SCHEMATHESIS=1, SKIP_BRUTE_FORCE=1.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BIN="${ZTP_BIN_DIR:-$ROOT/target/release}"
VENV="$HERE/.venv"
OUT="$HERE/out/schemathesis"
LOGS="$OUT/logs"
REPORTS="$OUT/reports"
SCHEMATHESIS_VERSION="4.32.5"
ST_MAX_EXAMPLES="${ST_MAX_EXAMPLES:-50}"
ST_TIMEOUT="${ST_TIMEOUT:-900}"
ST_WORKERS="${ST_WORKERS:-2}"
ST_CHECKS="${ST_CHECKS:-not_a_server_error,response_schema_conformance,status_code_conformance}"
ATTACKER="127.0.0.2" # source of the brute force (loopback: every 127/8 address is local)
BYSTANDER="127.0.0.3"
BRUTE_N=30
# shellcheck source=security/lib.sh
source "$HERE/lib.sh"

rm -rf "$OUT"
mkdir -p "$LOGS" "$REPORTS"
: >"$OUT/verdicts.txt"
WORK="$(mktemp -d /tmp/ztp-schemathesis.XXXXXX)"

# ---------------------------------------------------------------- tools and binaries
step "binaries and tools"
if [[ -n "${ZTP_BUILD:-}" || ! -x "$BIN/ztp-control" || ! -x "$BIN/ztpctl" ]]; then
  [[ -z "${ZTP_BIN_DIR:-}" ]] || die "ztp-control or ztpctl missing in ZTP_BIN_DIR=$BIN"
  echo "building ztp-control and ztpctl (release)…"
  run 3600 cargo build --manifest-path "$ROOT/Cargo.toml" --release -p ztp-control -p ztpctl
fi
for tool in jq python3 curl timeout stat; do
  command -v "$tool" >/dev/null || die "$tool is needed"
done
if [[ -z "${SKIP_SCHEMATHESIS:-}" ]] && ! "$VENV/bin/schemathesis" --version >/dev/null 2>&1; then
  echo "installing schemathesis==$SCHEMATHESIS_VERSION into $VENV…"
  [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
  run 900 "$VENV/bin/pip" install --disable-pip-version-check -q \
    "schemathesis==$SCHEMATHESIS_VERSION" >"$LOGS/pip.log" 2>&1
fi
echo "ztp-control: $("$BIN/ztp-control" --version)"
# A binary older than the last commit to its sources tests old code: say so.
last="$(git -C "$ROOT" log -1 --format=%ct -- control proto migrations 2>/dev/null || true)"
if [[ -n "$last" ]] && (($(stat -c %Y "$BIN/ztp-control") < last)); then
  note "ztp-control is older than the last commit to control/, proto/, migrations/ ($(git -C "$ROOT" log -1 --format=%h -- control proto migrations)): run 'cargo build --release -p ztp-control -p ztpctl' (or ZTP_BUILD=1) to test the current code"
fi

# ---------------------------------------------------------------- the control plane
step "control plane on a throwaway store"
PKI="$WORK/pki"
DATA="$WORK/data"
timeout 60 "$BIN/ztpctl" pki init "$PKI" >/dev/null
"$BIN/ztp-control" --data-dir "$DATA" --api-listen 127.0.0.1:0 \
  --grpc-listen 127.0.0.1:0 --grpc-cert "$PKI/server.pem" --grpc-key "$PKI/server.key" \
  --node-ca "$PKI/ca.pem" --log-format json >"$LOGS/control.out" 2>"$LOGS/control.err" &
CP_PID=$!
PIDS+=("$CP_PID")

api_addr=""
for _ in $(seq 300); do
  api_addr="$(jq -rR 'fromjson? | select(.message == "api listening") | .addr' "$LOGS/control.err" 2>/dev/null | head -1)"
  [[ -z "$api_addr" ]] || break
  kill -0 "$CP_PID" 2>/dev/null || die "ztp-control exited: $(tail -3 "$LOGS/control.err")"
  sleep 0.1
done
[[ -n "$api_addr" ]] || die "ztp-control did not start listening"
[[ "$api_addr" == 127.0.0.1:* ]] || die "API not on loopback: $api_addr"
API="http://$api_addr"
[[ -s "$DATA/admin-token" ]] || die "no $DATA/admin-token"
TOKEN="$(tr -d '[:space:]' <"$DATA/admin-token")"
AUTH="Authorization: Bearer $TOKEN"
echo "API on $API"

mode_tok="$(stat -c %a "$DATA/admin-token")"
mode_dir="$(stat -c %a "$DATA")"
if [[ "$mode_tok" == 600 && "$mode_dir" == 700 ]]; then
  pass "admin-token is mode 0600 in a 0700 data folder"
else
  fail "admin-token mode $mode_tok, data folder mode $mode_dir (want 600 and 700)"
fi

# http CURL_ARGS...: prints "status time_total content_type"; the body goes to $WORK/body.
http() {
  curl -s -o "$WORK/body" -w '%{http_code} %{time_total} %{content_type}\n' --max-time 20 "$@" || true
}

read -r code _ _ < <(http "$API/healthz")
if [[ "$code" == 200 ]]; then
  pass "/healthz 200 without a token"
else
  fail "/healthz answered $code"
fi
read -r code _ _ < <(http "$API/v1/openapi.json")
if [[ "$code" == 401 ]]; then
  pass "/v1/openapi.json without a token: 401"
else
  fail "/v1/openapi.json without a token: $code (want 401)"
fi
read -r code _ _ < <(http -H "$AUTH" "$API/v1/openapi.json")
if [[ "$code" == 200 ]] && jq -e '.openapi and .paths' "$WORK/body" >/dev/null 2>&1; then
  cp "$WORK/body" "$REPORTS/openapi.json"
  pass "/v1/openapi.json with the token: OpenAPI $(jq -r .openapi "$WORK/body"), $(jq '[.paths[] | keys[] | select(. != "parameters")] | length' "$WORK/body") operations"
else
  die "/v1/openapi.json with the token: $code"
fi

# ---------------------------------------------------------------- input limits
step "input limits: oversize bodies, malformed JSON"
count_services() {
  curl -s --max-time 20 -H "$AUTH" "$API/v1/services?limit=1000" | jq '.items | length'
}
before="$(count_services)"
python3 - "$WORK/big.json" <<'EOF'
import json, sys
# A well-formed service whose name alone is 1.1 MiB: only the size is wrong.
json.dump({"name": "a" * (1100 * 1024) + ".svc.internal", "protocol": "tcp",
           "address": "127.0.0.1:1"}, open(sys.argv[1], "w"))
EOF
size="$(stat -c %s "$WORK/big.json")"
problem_ok() { # STATUS: body is a problem document with that status
  jq -e --argjson s "$1" '.status == $s and (.type | type == "string") and (.title | type == "string")' "$WORK/body" >/dev/null 2>&1
}
read -r code t ct < <(http -H "$AUTH" -H 'Content-Type: application/json' --data-binary @"$WORK/big.json" "$API/v1/services")
if [[ "$code" == 413 && "$ct" == application/problem+json* ]] && problem_ok 413; then
  pass "POST /v1/services with a $size-byte body (Content-Length): 413 problem+json in ${t}s"
else
  fail "POST /v1/services with a $size-byte body (Content-Length): $code $ct: $(head -c 300 "$WORK/body")"
fi
read -r code t ct < <(http -H "$AUTH" -H 'Content-Type: application/json' -H 'Transfer-Encoding: chunked' --data-binary @"$WORK/big.json" "$API/v1/services")
if [[ "$code" == 413 && "$ct" == application/problem+json* ]] && problem_ok 413; then
  pass "POST /v1/services with a $size-byte body (chunked, no length): 413 problem+json in ${t}s"
else
  fail "POST /v1/services with a $size-byte body (chunked): $code $ct: $(head -c 300 "$WORK/body")"
fi
for bad in '{"name": "x.svc.internal", "protocol": ' '{"name": "x.svc.internal",, "protocol": "tcp"}' 'not json at all' '[1, 2'; do
  read -r code t ct < <(http -H "$AUTH" -H 'Content-Type: application/json' --data-binary "$bad" "$API/v1/services")
  if [[ "$code" == 400 && "$ct" == application/problem+json* ]] && problem_ok 400; then
    pass "POST /v1/services with malformed JSON '$bad': 400 problem+json ($(jq -r .detail "$WORK/body"))"
  else
    fail "POST /v1/services with malformed JSON '$bad': $code $ct: $(head -c 300 "$WORK/body")"
  fi
done
after="$(count_services)"
if [[ "$before" == "$after" ]]; then
  pass "nothing stored by the refused requests ($after services)"
else
  fail "refused requests changed the store: $before -> $after services"
fi

# ---------------------------------------------------------------- token brute force
# Wrong tokens: random ones in ZTP's format, near misses of the real token (one hex digit
# changed), and random base64 strings. Kept only in $WORK (removed at exit) and checked
# against the logs by their full text and by their secret part.
if [[ -z "${SKIP_BRUTE_FORCE:-}" ]]; then
  step "token brute force: $BRUTE_N wrong tokens from $ATTACKER"
  python3 - "$TOKEN" "$BRUTE_N" >"$WORK/wrong-tokens.txt" <<'EOF'
import base64, os, random, sys
real, n = sys.argv[1], int(sys.argv[2])
out = []
for i in range(n):
    kind = i % 3
    if kind == 0:
        out.append("ztp_%s_%s" % (os.urandom(8).hex(), os.urandom(32).hex()))
    elif kind == 1 and real.startswith("ztp_"):
        pos = random.randrange(len(real) - 64, len(real))  # in the secret part
        c = real[pos]
        repl = random.choice([h for h in "0123456789abcdef" if h != c])
        out.append(real[:pos] + repl + real[pos + 1:])
    else:
        out.append(base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("="))
print("\n".join(out))
EOF
  {
    echo "$TOKEN"
    cat "$WORK/wrong-tokens.txt"
    # the secret parts alone (after the last "_"), in case a log printed only those
    awk -F_ 'NF > 1 && length($NF) >= 16 {print $NF}' "$WORK/wrong-tokens.txt"
    awk -F_ 'NF > 1 {print $NF}' <<<"$TOKEN"
  } >"$WORK/secrets.txt"

  read -r code _ _ < <(http --interface "$ATTACKER" "$API/healthz")
  if [[ "$code" != 200 ]]; then
    note "cannot send from $ATTACKER (got '$code'): the brute force uses 127.0.0.1"
    ATTACKER=127.0.0.1
  fi
  printf 'n\tsource\tkind\tstatus\tseconds\n' >"$REPORTS/bruteforce.tsv"
  times=()
  leaked_in_body=0
  i=0
  while IFS= read -r wrong; do
    i=$((i + 1))
    kind=random-ztp
    ((i % 3 == 2)) && kind=near-miss
    ((i % 3 == 0)) && kind=random-b64
    read -r code t _ < <(http --interface "$ATTACKER" -H "Authorization: Bearer $wrong" "$API/v1/services")
    grep -qF -- "$wrong" "$WORK/body" && leaked_in_body=$((leaked_in_body + 1))
    printf '%d\t%s\t%s\t%s\t%s\n' "$i" "$ATTACKER" "$kind" "$code" "$t" >>"$REPORTS/bruteforce.tsv"
    [[ "$code" == 401 ]] || fail "brute force request $i answered $code (want 401)"
    times+=("$t")
    if ((i == 20)); then
      # While $ATTACKER is slowed: a good token from it, a good one from 127.0.0.1 and a
      # bad one from another source must all be answered at once.
      read -r gc gt _ < <(http --interface "$ATTACKER" -H "$AUTH" "$API/v1/services")
      read -r lc lt _ < <(http -H "$AUTH" "$API/v1/services")
      read -r bc bt _ < <(http --interface "$BYSTANDER" -H "Authorization: Bearer ztp_not_a_token" "$API/v1/services")
    fi
  done <"$WORK/wrong-tokens.txt"
  column -t "$REPORTS/bruteforce.tsv" | sed 's/^/   /'

  python3 - "${times[@]}" >"$WORK/bf-verdict.txt" <<'EOF'
import sys
t = [float(x) for x in sys.argv[1:]]
free, ramp = t[:3], t[3:20]
lines = []
ok = max(free) < 0.5
lines.append(("PASS" if ok else "FAIL") + "  brute force: the first 3 failures are answered at once (max %.3fs)" % max(free))
# Each further failure in the window waits longer: allow 0.1 s of jitter between neighbours.
mono = all(b >= a - 0.1 for a, b in zip(ramp, ramp[1:]))
ok = mono and ramp[0] >= 0.1 and ramp[-1] > ramp[0] + 1.0
lines.append(("PASS" if ok else "FAIL") + "  brute force: failures 4..20 slowed more and more (%.2fs -> %.2fs)" % (ramp[0], ramp[-1]))
mx = max(t)
ok = 4.5 <= mx <= 6.0
lines.append(("PASS" if ok else "FAIL") + "  brute force: the delay reaches its cap and stays under it (max %.2fs, documented 5 s)" % mx)
# The window is fixed (a minute from the first failure): a reset shows as a fast answer
# after slow ones.
reset = [i + 1 for i in range(20, len(t)) if t[i] < 0.5 and max(t[:i]) >= 4.5]
lines.append("NOTE  brute force: %d requests took %.1fs in all%s" % (
    len(t), sum(t),
    "; fast again from request %d on (the per-source window of one minute restarted)" % reset[0] if reset else ""))
print("\n".join(lines))
EOF
  while IFS= read -r line; do
    case "$line" in
      PASS*) pass "${line#PASS  }" ;;
      FAIL*) fail "${line#FAIL  }" ;;
      *) note "${line#NOTE  }" ;;
    esac
  done <"$WORK/bf-verdict.txt"
  if [[ "$gc" == 200 ]] && awk -v a="$gt" 'BEGIN{exit !(a < 0.5)}'; then
    pass "brute force: a good token from the slowed source is answered at once (200 in ${gt}s)"
  else
    fail "brute force: good token from the slowed source: $gc in ${gt}s"
  fi
  if [[ "$lc" == 200 ]] && awk -v a="$lt" 'BEGIN{exit !(a < 0.5)}'; then
    pass "brute force: other sources are not slowed (good token from 127.0.0.1: 200 in ${lt}s)"
  else
    fail "brute force: good token from 127.0.0.1 during the attack: $lc in ${lt}s"
  fi
  if [[ "$bc" == 401 ]] && awk -v a="$bt" 'BEGIN{exit !(a < 0.5)}'; then
    pass "brute force: a bad token from another source ($BYSTANDER) is not slowed (401 in ${bt}s)"
  else
    fail "brute force: bad token from $BYSTANDER during the attack: $bc in ${bt}s"
  fi
  if ((leaked_in_body == 0)); then
    pass "brute force: no 401 body repeats the token sent"
  else
    fail "brute force: $leaked_in_body 401 bodies repeat the token sent"
  fi
  logged="$(jq -rR --arg a "$ATTACKER" 'fromjson? | select((.message // "") | test("refused")) | select(."client.addr" == $a) | .failures' "$LOGS/control.err" | wc -l)"
  if ((logged >= BRUTE_N)); then
    pass "brute force: the control plane logged $logged refusals from $ATTACKER (with a failure count)"
  else
    fail "brute force: only $logged refusals from $ATTACKER in the control plane's log (want $BRUTE_N)"
  fi
  awk 'length($0) >= 8' "$WORK/secrets.txt" >"$WORK/secrets-8.txt"
  hits="$(grep -c -F -f "$WORK/secrets-8.txt" "$LOGS/control.err" || true)"
  if ((hits == 0)); then
    pass "brute force: none of the $BRUTE_N wrong tokens (nor their secret parts, nor the admin token) is in the log"
  else
    fail "brute force: $hits log lines hold a token sent (see $LOGS/control.err)"
  fi
else
  echo "$TOKEN" >"$WORK/secrets.txt"
fi

# ---------------------------------------------------------------- token lifecycle
# Schemathesis is kept away from DELETE /v1/tokens/{id}: with the ids it learns from
# GET /v1/tokens it once revoked the admin token with itself (allowed while another token
# exists), and every later request was a 401. The lifecycle is checked here instead.
step "token lifecycle: create, use, list, revoke, the last one"
read -r code _ _ < <(http -H "$AUTH" -H 'Content-Type: application/json' -d '{"name":"security-check"}' "$API/v1/tokens")
NEW_ID="$(jq -r '.id // empty' "$WORK/body" 2>/dev/null || true)"
NEW_TOKEN="$(jq -r '.token // empty' "$WORK/body" 2>/dev/null || true)"
if [[ "$code" == 201 && -n "$NEW_ID" && -n "$NEW_TOKEN" ]]; then
  echo "$NEW_TOKEN" >>"$WORK/secrets.txt"
  pass "POST /v1/tokens: 201, the secret shown once"
  read -r code _ _ < <(http -H "Authorization: Bearer $NEW_TOKEN" "$API/v1/services")
  [[ "$code" == 200 ]] && ok=1 || ok=0
  read -r lcode _ _ < <(http -H "$AUTH" "$API/v1/tokens")
  listed="$(jq -r --arg id "$NEW_ID" '[.items[]? | select(.id == $id)] | length' "$WORK/body" 2>/dev/null || echo 0)"
  if ((ok)) && [[ "$lcode" == 200 && "$listed" == 1 ]] && ! grep -qF -e "${NEW_TOKEN##*_}" -e "${TOKEN##*_}" "$WORK/body"; then
    pass "the new token works; GET /v1/tokens lists it without any secret"
  else
    fail "new token: use $code, list $lcode (listed $listed, or a secret in the list)"
  fi
  read -r code _ _ < <(http -X DELETE -H "$AUTH" "$API/v1/tokens/$NEW_ID")
  read -r ucode _ _ < <(http -H "Authorization: Bearer $NEW_TOKEN" "$API/v1/services")
  if [[ "$code" == 204 && "$ucode" == 401 ]]; then
    pass "DELETE /v1/tokens/{id}: 204, and the revoked token is refused (401)"
  else
    fail "revoking the new token: DELETE $code, then its use $ucode (want 204, 401)"
  fi
else
  fail "POST /v1/tokens: $code $(head -c 300 "$WORK/body")"
fi
read -r code _ _ < <(http -X DELETE -H "$AUTH" "$API/v1/tokens/0000000000000000")
if [[ "$code" == 404 ]]; then
  pass "DELETE /v1/tokens/{unknown id}: 404"
else
  fail "DELETE /v1/tokens/{unknown id}: $code (want 404)"
fi
ADMIN_ID="$(cut -d_ -f2 <<<"$TOKEN")"
read -r code _ _ < <(http -X DELETE -H "$AUTH" "$API/v1/tokens/$ADMIN_ID")
read -r ucode _ _ < <(http -H "$AUTH" "$API/v1/services")
if [[ "$code" == 409 && "$ucode" == 200 ]]; then
  pass "the last token cannot be revoked (409), and still works"
else
  fail "revoking the last token: $code, then its use $ucode (want 409, 200)"
fi

# ---------------------------------------------------------------- schemathesis
if [[ -z "${SKIP_SCHEMATHESIS:-}" ]]; then
  step "schemathesis $SCHEMATHESIS_VERSION: ≤$ST_MAX_EXAMPLES examples per operation, at most ${ST_TIMEOUT}s"
  ST_DIR="$REPORTS/schemathesis"
  mkdir -p "$ST_DIR"
  seed=()
  [[ -z "${ST_SEED:-}" ]] || seed=(--seed "$ST_SEED")
  st_rc=0
  # The token is in this process's arguments (loopback, throwaway store); schemathesis
  # prints and records it as [Filtered].
  cd "$WORK" # anything schemathesis leaves in its working folder goes with $WORK
  run "$ST_TIMEOUT" "$VENV/bin/schemathesis" run "$API/v1/openapi.json" \
    -H "$AUTH" \
    --checks "$ST_CHECKS" \
    --exclude-path '/v1/tokens/{id}' \
    --max-examples "$ST_MAX_EXAMPLES" --workers "$ST_WORKERS" --request-timeout 20 \
    --no-color --generation-database none "${seed[@]}" \
    --report junit,ndjson --report-dir "$ST_DIR" \
    --report-junit-path "$ST_DIR/junit.xml" --report-ndjson-path "$ST_DIR/events.ndjson" \
    >"$ST_DIR/output.txt" 2>&1 || st_rc=$?
  echo "schemathesis exit code $st_rc (console output: $ST_DIR/output.txt)"
  # Its warnings (operations whose generated data the API mostly refused, or that lacked
  # test data) say where the document is looser than the API: information, not verdicts.
  sed -n '/^=* WARNINGS =*$/,/^=* SUMMARY =*$/p' "$ST_DIR/output.txt" | sed '/^$/d; /SUMMARY/d; s/^/   /'
  sed -n '/^Test cases:/,/^Seed:/p' "$ST_DIR/output.txt" | sed '/^$/d; /^Reports:/,/NDJSON/d; s/^/   /'
  if ((st_rc == 124)); then
    fail "schemathesis did not finish within ${ST_TIMEOUT}s"
  fi
  if [[ ! -s "$ST_DIR/events.ndjson" ]]; then
    fail "schemathesis wrote no events (exit $st_rc): $(tail -5 "$ST_DIR/output.txt")"
  else
    "$VENV/bin/python" - "$ST_DIR/events.ndjson" "$ST_DIR/summary.json" "$ST_DIR/failures.txt" <<'EOF'
import base64, json, re, sys
from collections import defaultdict

events, summary_path, failures_path = sys.argv[1:4]
counts = defaultdict(lambda: {"success": 0, "failure": 0, "skip": 0})
operations, cases = set(), set()
failures = {}
errors = []
stop_reason = None

def text(x, limit=4000):
    if x is None:
        return ""
    if isinstance(x, dict) and "$base64" in x:
        raw = base64.b64decode(x["$base64"])
        try:
            x = raw.decode()
        except UnicodeDecodeError:
            x = "base64:" + x["$base64"]
    elif not isinstance(x, str):
        x = json.dumps(x)
    return x if len(x) <= limit else x[:limit] + "…(%d bytes)" % len(x)

for line in open(events):
    ev = json.loads(line)
    if "EngineFinished" in ev:
        stop_reason = ev["EngineFinished"].get("stop_reason")
    for key in ("NonFatalError", "FatalError"):
        if key in ev:
            e = ev[key]
            errors.append("%s: %s %s" % (key, e.get("label", ""), text(e.get("info") or e.get("value") or e, 600)))
    sf = ev.get("ScenarioFinished")
    if not sf:
        continue
    rec = sf.get("recorder") or {}
    if re.match(r"^[A-Z]+ /", rec.get("label") or ""):
        operations.add(rec["label"])
    interactions = rec.get("interactions") or {}
    cases_rec = rec.get("cases") or {}
    for cid, results in (rec.get("checks") or {}).items():
        cases.add(cid)
        for r in results:
            st = r.get("status")
            counts[r["name"]][st if st in ("success", "failure") else "skip"] += 1
            if st != "failure":
                continue
            f = (r.get("failure_info") or {}).get("failure") or {}
            it = interactions.get(cid) or {}
            req, resp = it.get("request") or {}, it.get("response") or {}
            status = resp.get("status_code")
            case = (cases_rec.get(cid) or {}).get("value") or {}
            meta = (case.get("meta") or {}).get("phase") or {}
            key = (r["name"], f.get("code"), f.get("operation") or rec.get("label"), status)
            if key in failures:
                failures[key]["count"] += 1
                continue
            headers = {k: v for k, v in (req.get("headers") or {}).items()}
            body = text(req.get("body"))
            curl = ["curl", "-i", "-X", req.get("method", "?")]
            for k, v in headers.items():
                for vv in (v if isinstance(v, list) else [v]):
                    if k.lower() == "authorization":
                        vv = "Bearer $ZTP_TOKEN" if vv == "[Filtered]" else vv
                    curl += ["-H", "%s: %s" % (k, vv)]
            if body:
                curl += ["--data-binary", body]
            curl.append(req.get("uri", "?"))
            def q(s):
                return "'" + s.replace("'", "'\\''") + "'" if any(c in s for c in " \"'$&;|<>(){}*?!") else s
            failures[key] = {
                "check": r["name"], "code": f.get("code"), "title": f.get("title"),
                "operation": key[2], "message": f.get("message"), "count": 1,
                "phase": meta.get("name"), "scenario": (meta.get("data") or {}).get("description"),
                "request": {"method": req.get("method"), "uri": req.get("uri"),
                            "headers": headers, "body": body},
                "response": {"status": status,
                             "content_type": ((resp.get("headers") or {}).get("content-type") or [None])[0],
                             "body": text(resp.get("content") if "content" in resp else resp.get("body"))},
                "curl": " ".join(q(c) for c in curl),
            }

by_check = defaultdict(list)
for f in failures.values():
    by_check[f["check"]].append(f)
summary = {
    "stop_reason": stop_reason, "operations": len(operations), "cases": len(cases),
    "checks": counts, "unique_failures": {k: len(v) for k, v in by_check.items()},
    "failure_statuses": {k: sorted({str(f["response"]["status"]) for f in v}) for k, v in by_check.items()},
    "errors": errors,
}
json.dump(summary, open(summary_path, "w"), indent=2)
with open(failures_path, "w") as out:
    if not failures:
        out.write("no failure\n")
    for f in sorted(failures.values(), key=lambda f: (f["check"], f["operation"] or "")):
        out.write("=" * 78 + "\n")
        out.write("%s %s (%s): %s  [x%d]\n" % (f["check"], f["code"], f["title"], f["operation"], f["count"]))
        out.write("  phase: %s%s\n" % (f["phase"], " / " + f["scenario"] if f["scenario"] else ""))
        out.write("  %s\n" % (f["message"] or "").replace("\n", "\n  "))
        rq, rs = f["request"], f["response"]
        out.write("  request:  %s %s\n" % (rq["method"], rq["uri"]))
        for k, v in rq["headers"].items():
            out.write("            %s: %s\n" % (k, ", ".join(v) if isinstance(v, list) else v))
        out.write("            body: %s\n" % (rq["body"] or "(none)"))
        out.write("  response: %s %s\n" % (rs["status"], rs["content_type"] or ""))
        out.write("            body: %s\n" % (rs["body"] or "(none)"))
        out.write("  reproduce: %s\n" % f["curl"])
EOF
    S="$ST_DIR/summary.json"
    echo "   tested $(jq .operations "$S") operations, $(jq .cases "$S") test cases, stop reason: $(jq -r .stop_reason "$S")"
    for check in ${ST_CHECKS//,/ }; do
      ok="$(jq -r --arg c "$check" '.checks[$c].success // 0' "$S")"
      bad="$(jq -r --arg c "$check" '.unique_failures[$c] // 0' "$S")"
      statuses="$(jq -r --arg c "$check" '(.failure_statuses[$c] // []) | join(",")' "$S")"
      if ((ok == 0 && bad == 0)); then
        fail "schemathesis $check: never ran"
      elif ((bad == 0)); then
        pass "schemathesis $check: $ok responses checked, no failure"
      elif [[ "$check" == status_code_conformance && -z "${STRICT_STATUS_CODES:-}" ]]; then
        warn "schemathesis $check: $bad operations answered an undocumented status ($statuses); details in $ST_DIR/failures.txt (counted with STRICT_STATUS_CODES=1)"
      else
        fail "schemathesis $check: $bad unique failures (statuses $statuses); details in $ST_DIR/failures.txt"
      fi
    done
    nerr="$(jq '.errors | length' "$S")"
    if ((nerr == 0)); then
      pass "schemathesis: no request errors (timeouts, connection failures)"
    else
      fail "schemathesis: $nerr errors: $(jq -r '.errors[:3] | join(" | ")' "$S")"
    fi
    if ((st_rc != 0 && st_rc != 1)); then
      fail "schemathesis exited $st_rc (see $ST_DIR/output.txt)"
    fi
    if grep -qF -- "$TOKEN" "$ST_DIR"/* 2>/dev/null; then
      note "schemathesis' reports hold the admin token (throwaway, but do not publish $ST_DIR)"
    fi
  fi
fi

# ---------------------------------------------------------------- after
step "control plane after the run"
read -r code _ _ < <(http "$API/healthz")
read -r tcode _ _ < <(http -H "$AUTH" "$API/v1/services")
if kill -0 "$CP_PID" 2>/dev/null && [[ "$code" == 200 && "$tcode" == 200 ]]; then
  pass "control plane still running, healthy, admin token still accepted"
else
  fail "control plane after the run: alive=$(kill -0 "$CP_PID" 2>/dev/null && echo yes || echo no) /healthz=$code token=$tcode"
fi
panics="$(grep -c -i -E 'panick|panic' "$LOGS/control.err" || true)"
if ((panics == 0)); then
  pass "no panic in the control plane's log"
else
  fail "$panics panic lines in $LOGS/control.err"
fi
grep -hv -- '-----' "$PKI"/*.key >>"$WORK/secrets.txt"
sl_rc=0
"$HERE/secrets-in-logs.sh" --secrets-file "$WORK/secrets.txt" "$LOGS" >"$REPORTS/secrets-in-logs.txt" || sl_rc=$?
sed 's/^/   /' "$REPORTS/secrets-in-logs.txt"
if ((sl_rc == 0)); then
  pass "secrets-in-logs: no key material or token in $LOGS"
else
  fail "secrets-in-logs: secret material in $LOGS (see above)"
fi

printf '\nschemathesis: %d passed, %d failed (%d warnings) in %ds (logs and reports: %s)\n' \
  "$PASSED" "$FAILED" "$WARNED" "$((SECONDS - STARTED))" "$OUT"
((FAILED == 0))
