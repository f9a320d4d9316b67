#!/bin/sh
# Starts three nats-servers as one JetStream cluster on 127.0.0.1:4222-4224 (stores in
# ./data); Ctrl-C stops them.
cd "$(dirname "$0")" || exit 1
trap 'kill 0' INT TERM
for i in 1 2 3; do nats-server -c "nats$i.conf" & done
wait
