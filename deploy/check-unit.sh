#!/usr/bin/env bash
# Scores a systemd unit with `systemd-analyze security --offline=yes`, prints the score and fails
# when it is above the limit (1.5 by default: "OK" in systemd's words), or when the unit does
# not parse. Usage: deploy/check-unit.sh UNIT [LIMIT]
set -euo pipefail
unit=${1:?usage: check-unit.sh UNIT [LIMIT]}
limit=${2:-1.5}
out=$(systemd-analyze security --offline=yes --no-pager "$unit" 2>&1) || {
  echo "$out" >&2
  echo "ERROR: systemd-analyze security cannot score $unit" >&2
  exit 1
}
score=$(sed -n 's/.*Overall exposure level for .*: \([0-9][0-9.]*\) .*/\1/p' <<<"$out")
if [ -z "$score" ]; then
  echo "$out" >&2
  echo "ERROR: no exposure level in systemd-analyze's output for $unit" >&2
  exit 1
fi
echo "$unit: exposure $score (limit $limit)"
if awk -v s="$score" -v l="$limit" 'BEGIN { exit !(s > l) }'; then
  grep '✗' <<<"$out" >&2 || true
  echo "ERROR: $unit scores $score, above $limit" >&2
  exit 1
fi
