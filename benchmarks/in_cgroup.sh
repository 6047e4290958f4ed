#!/usr/bin/env bash
# Runs a command inside a child memory cgroup (v1) of this shell's own, limited to LIMIT bytes:
# how the streaming benchmarks give a run less memory without any streaming option (issue 35).
# Usage: bash benchmarks/in_cgroup.sh NAME LIMIT_BYTES command...   (needs write access to it)
set -euo pipefail
name=$1 limit=$2
shift 2
own=$(awk -F: '$2 ~ /(^|,)memory(,|$)/ {print $3}' /proc/self/cgroup)
cg=/sys/fs/cgroup/memory${own}/$name
mkdir -p "$cg"
echo "$limit" > "$cg/memory.limit_in_bytes"
echo $$ > "$cg/cgroup.procs"
exec "$@"
