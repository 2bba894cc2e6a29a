#!/bin/bash
# usage: gcount.sh ROOT APP N -> instructions per request in the gunicorn worker (callgrind, zeroed after warm-up)
here=$(cd "$(dirname "$0")" && pwd); venv=${VENV:-$here/../../.venv}
root=$1; app=$2; n=${3:-300}
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
out=$(mktemp -d /tmp/gcount.XXXX)
cd $root
env -u OPTIN_STORAGE_URL OPTIN_STORAGE_URL=memory:// WEB_CONCURRENCY=1 OPTIN_BIND=127.0.0.1:$port \
  valgrind --tool=callgrind --trace-children=yes --callgrind-out-file=$out/cg.%p --collect-atstart=yes \
  "$venv"/bin/python "$venv"/bin/gunicorn -c gunicorn.conf.py -t 600 $app 2>$out/stderr &
vpid=$!
for i in $(seq 120); do sleep 1; "$venv"/bin/python -c "
import http.client,sys
try:
    c=http.client.HTTPConnection('127.0.0.1',$port,timeout=60); c.request('GET','/'); c.getresponse(); sys.exit(0)
except Exception: sys.exit(1)" && break; done
"$venv"/bin/python "$here/client.py" $port 300   # warm-up
worker=$(pgrep -P $vpid -f gunicorn | head -1); [ -z "$worker" ] && worker=$(ps -o pid= --ppid $vpid | head -1)
callgrind_control -z $worker >/dev/null
"$venv"/bin/python "$here/client.py" $port $n
callgrind_control -d $worker >/dev/null
sleep 1
kill -TERM $vpid; wait $vpid 2>/dev/null
f=$(ls -t $out/cg.$worker.* 2>/dev/null | head -1)
total=$(grep -m1 "^summary:\|^totals:" $f | awk '{print $2}')
echo "$(( total / n )) instr/request in the worker ($root $app, $n requests; $f)"
