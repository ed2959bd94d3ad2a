#!/usr/bin/env bash
# security/secrets-in-logs.sh: look for secret material in log files.
#
#   security/secrets-in-logs.sh [--secrets-file FILE] DIR_OR_FILE...
#
# Searches every file under the given directories (recursively, binary files as text) for:
#   - PEM private key headers  (-----BEGIN ... PRIVATE KEY-----)
#   - ZTP tokens                (ztp_<16 hex>_<64 hex>)
#   - bearer token values       (Bearer <8+ token characters>; "Bearer [Filtered]" is fine)
#   - every literal line of --secrets-file (tokens that were sent, key bodies...), lines
#     of fewer than 8 characters are ignored
# A hit prints the file and line number and a redacted excerpt, never the secret itself.
# Exit 0 when nothing is found, 1 when something is, 2 on bad usage.
set -euo pipefail

usage() {
  echo "usage: $0 [--secrets-file FILE] DIR_OR_FILE..." >&2
  exit 2
}

SECRETS_FILE=""
TARGETS=()
while (($#)); do
  case "$1" in
    --secrets-file)
      [[ $# -ge 2 ]] || usage
      SECRETS_FILE="$2"
      shift 2
      ;;
    -h | --help) usage ;;
    *)
      TARGETS+=("$1")
      shift
      ;;
  esac
done
((${#TARGETS[@]})) || usage
for t in "${TARGETS[@]}"; do
  [[ -e "$t" ]] || {
    echo "secrets-in-logs: no such file or directory: $t" >&2
    exit 2
  }
done

FOUND=0

# Prints "file:line: <redacted excerpt>" for each hit of an extended regex (or of fixed
# strings with -F -f FILE), and returns 1 if there were hits.
redact() {
  # Keep the first 6 characters of anything that looks like a secret, hide the rest.
  sed -E \
    -e 's/(-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----)/\1 (header only)/' \
    -e 's/(ztp_[0-9a-f]{2})[0-9a-f]{14}_[0-9a-f]{64}/\1…(redacted)/g' \
    -e 's/([Bb]earer[[:space:]]+[A-Za-z0-9._~+\/=-]{2})[A-Za-z0-9._~+\/=-]{6,}/\1…(redacted)/g' \
    -e 's/[A-Za-z0-9+\/=_-]{24,}/…(long token redacted)…/g' |
    cut -c1-200
}

# scan NAME SHOW_EXCERPT GREP_ARGS...
scan() {
  local name="$1" show="$2"
  shift 2
  local hits
  # -a: logs may hold stray bytes; search them as text all the same.
  hits="$(grep -r -n -a "$@" -- "${TARGETS[@]}" 2>/dev/null | cut -d: -f1,2 | sort -u || true)"
  if [[ -z "$hits" ]]; then
    printf 'PASS  secrets-in-logs: no %s\n' "$name"
    return 0
  fi
  FOUND=1
  printf 'FAIL  secrets-in-logs: %s found:\n' "$name"
  while IFS= read -r loc; do
    local file="${loc%:*}" line="${loc##*:}"
    if ((show)); then
      printf '        %s:%s: %s\n' "$file" "$line" "$(sed -n "${line}p" "$file" | redact)"
    else
      printf '        %s:%s: (line not shown: it holds a secret of this run)\n' "$file" "$line"
    fi
  done <<<"$hits"
  return 0
}

scan "PEM private key header" 1 -E -e '-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----'
scan "ZTP token (ztp_<16 hex>_<64 hex>)" 1 -E -e 'ztp_[0-9a-f]{16}_[0-9a-f]{64}'
scan "bearer token value" 1 -E -i -e 'bearer[[:space:]]+[A-Za-z0-9._~+/=-]{8,}'

if [[ -n "$SECRETS_FILE" ]]; then
  patterns="$(mktemp)"
  trap 'rm -f "$patterns"' EXIT
  # Literal secrets, one a line; short or empty lines would match nearly everything.
  awk 'length($0) >= 8' "$SECRETS_FILE" >"$patterns"
  n="$(wc -l <"$patterns")"
  if ((n > 0)); then
    scan "literal secret of the run ($n given)" 0 -F -f "$patterns"
  else
    printf 'NOTE  secrets-in-logs: --secrets-file held no secret of 8+ characters\n'
  fi
fi

files="$(find "${TARGETS[@]}" -type f | wc -l)"
if ((FOUND)); then
  printf 'FAIL  secrets-in-logs: secret material in %s (%s files searched)\n' "${TARGETS[*]}" "$files"
  exit 1
fi
printf 'PASS  secrets-in-logs: %s files searched, nothing found\n' "$files"
