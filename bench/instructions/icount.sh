#!/bin/bash
# usage: icount.sh ROOT [APP] [N] -> instructions per request (valgrind, deterministic-ish)
here=$(cd "$(dirname "$0")" && pwd); venv=${VENV:-$here/../../.venv}
root=$1; app=${2:-wsgi:app}; n=${3:-1000}
run() { valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null "$venv/bin/python" "$here/ichild.py" $root $1 $app 2>&1 | grep "I *refs" | awk '{gsub(",","",$4); print $4}'; }
a=$(run 0); b=$(run $n)
echo "$(( (b - a) / n )) instr/request  ($root $app)"
