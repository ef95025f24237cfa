#!/usr/bin/env bash
# A fresh shared secret for one job's sampler servers and trainers (rollout.server.secret_file):
# 32 random bytes as hex, in a file only this user can read or write, written aside and moved into
# place so no reader sees half of it. Prints nothing: only the file's path ever reaches a log.
#   launch/make_secret.sh FILE
set -euo pipefail
file=${1:?usage: make_secret.sh FILE}
mkdir -p "$(dirname "$file")"
aside="$file.$$.tmp"
(
  umask 077
  od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$aside"
)
mv -f "$aside" "$file"
