#!/usr/bin/env bash
# Seeds the fuzz corpora (fuzz/corpus/<target>/, not committed) from mosquitto's conformance
# vectors (../shared/conformance/mosquitto-vectors; README there) and the example configs.
#
#   fuzz/seed.sh [VECTORS_DIR]
#
# decode_v31/v311/v5: each test's client-to-broker bytes ("send" steps) concatenated, by the
# test's level. connection: the same bytes behind a head byte (fuzz_targets/connection.rs):
# 0/1/2 = the target sends its fixed CONNECT at 3.1/3.1.1/5.0 first (tests with "connect"),
# 3 = the bytes bring their own CONNECT. topic: every topic in a "publish" step plus a few
# filters. config: config/*.toml. Files are named by content hash, so re-running adds nothing
# twice. Without the vectors only the topic and config seeds are written.
set -euo pipefail
cd "$(dirname "$0")"
VECTORS=${1:-../../shared/conformance/mosquitto-vectors}
python3 - "$VECTORS" <<'PY'
import glob, hashlib, json, os, sys

vectors = sys.argv[1]
written = {}

def put(target, data):
    d = os.path.join("corpus", target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()
    path = os.path.join(d, name)
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(data)
        written[target] = written.get(target, 0) + 1

topics = ["a/b", "+/b/#", "#", "+", "a//b", "$SYS/x", "$share/g/a/+", "$share//a", "$share/g", "a/#/b", "a+"]
if os.path.isdir(vectors):
    for path in sorted(glob.glob(os.path.join(vectors, "*.json"))):
        for group in json.load(open(path)):
            for test in group["tests"]:
                ver = test.get("ver", 4)
                sent = b""
                for m in test["msgs"]:
                    if m["type"] == "send":
                        sent += bytes.fromhex("".join(m["payload"].split()))
                    elif m["type"] == "publish":
                        topics.append(m["topic"])
                if not sent:
                    continue
                put({3: "decode_v31", 4: "decode_v311", 5: "decode_v5"}[ver], sent)
                if ver == 4:  # 3.1 differs from 3.1.1 in little but CONNECT; few 3.1 vectors
                    put("decode_v31", sent)
                head = {3: 0, 4: 1, 5: 2}[ver] if test.get("connect", True) else 3
                put("connection", bytes([head]) + sent)
else:
    print(f"seed.sh: {vectors} not found; only topic and config seeds", file=sys.stderr)
for t in topics:
    put("topic", t.encode())
for path in sorted(glob.glob("../config/*.toml")):
    put("config", open(path, "rb").read())
print("seed.sh: new seeds " + ", ".join(f"{k} {v}" for k, v in sorted(written.items())))
PY
